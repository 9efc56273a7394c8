//! Barbican, the OpenStack key manager, over HTTP: the payload of a secret by UUID (a signing
//! or trusted certificate, as castellan fetches it for Nova), with the token and catalog of the
//! session that reaches Glance. Bodies are capped; redirects are never followed.

use std::sync::{Arc, OnceLock};

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::StatusCode;
use reqwest::blocking::{Client as Http, Response};

use crate::error::{Classified, Kind};
use crate::http::{self, HttpSettings, Secret, TokenSource};

/// The largest secret payload read: a certificate is a few KiB.
pub const MAX_PAYLOAD: u64 = 1 << 20;

/// Path-segment escaping (a UUID needs none, but nothing else reaches the URL unescaped).
const SEGMENT: &AsciiSet = &CONTROLS.add(b' ').add(b'/').add(b'?').add(b'#').add(b'%');

/// A failure talking to Barbican.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no key-manager (Barbican) endpoint: the credentials give no service catalog; authenticate with Keystone or use --certificate-dir"
    )]
    NoCatalog,
    #[error("secret {uuid} not found in Barbican ({url})")]
    NotFound { uuid: String, url: String },
    #[error("Barbican ({url}) refused the credentials for secret {uuid} (HTTP {status})")]
    Refused {
        uuid: String,
        url: String,
        status: u16,
    },
    #[error("Barbican ({url}) answered HTTP {status} for secret {uuid}: {body}")]
    Status {
        uuid: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot reach Barbican at {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("secret {uuid} from Barbican: {detail}")]
    Body { uuid: String, detail: String },
    #[error("{message}")]
    Credentials { kind: Kind, message: String },
    #[error("{0}")]
    Http(#[from] http::Error),
}

impl Error {
    /// The exit-code kind: a missing or unreadable certificate refuses the image; an
    /// unreachable or failing (5xx) Barbican is worth trying again later.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Status { status, .. } if *status >= 500 => Kind::Unavailable,
            Error::NoCatalog
            | Error::NotFound { .. }
            | Error::Status { .. }
            | Error::Body { .. } => Kind::Signature,
            Error::Refused { .. } => Kind::Auth,
            Error::Transport { .. } => Kind::Unavailable,
            Error::Credentials { kind, .. } => *kind,
            Error::Http(e) => e.kind(),
        }
    }
}

impl From<Classified> for Error {
    fn from(e: Classified) -> Error {
        Error::Credentials {
            kind: e.kind,
            message: e.message,
        }
    }
}

/// Where Barbican is and how to authenticate to it.
#[derive(Clone)]
pub struct Settings {
    /// The session that reaches Glance (its token and catalog).
    pub auth: Option<Arc<dyn TokenSource>>,
    /// Catalog interface and region, as for Glance.
    pub interface: String,
    pub region: Option<String>,
    pub http: HttpSettings,
}

/// A Barbican client. The endpoint and the HTTP client are found at the first request: a run
/// that verifies no signature never looks for them.
pub struct Client {
    settings: Settings,
    http: OnceLock<Http>,
    base: OnceLock<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("barbican::Client")
            .field("base", &self.base.get())
            .finish()
    }
}

impl Client {
    pub fn new(settings: Settings) -> Client {
        Client {
            settings,
            http: OnceLock::new(),
            base: OnceLock::new(),
        }
    }

    fn http(&self) -> Result<&Http, Error> {
        if let Some(h) = self.http.get() {
            return Ok(h);
        }
        let built = self.settings.http.client()?;
        Ok(self.http.get_or_init(|| built))
    }

    /// The endpoint from the catalog, without a trailing `/` or `/v1`.
    fn base(&self) -> Result<&str, Error> {
        if let Some(b) = self.base.get() {
            return Ok(b);
        }
        let auth = self.settings.auth.as_ref().ok_or(Error::NoCatalog)?;
        let url = auth
            .endpoint(
                "key-manager",
                &self.settings.interface,
                self.settings.region.as_deref(),
            )?
            .ok_or(Error::NoCatalog)?;
        let url = url.trim_end_matches('/');
        let url = url.strip_suffix("/v1").unwrap_or(url).to_owned();
        Ok(self.base.get_or_init(|| url))
    }

    /// `GET /v1/secrets/{uuid}/payload` as `application/octet-stream`, at most
    /// [`MAX_PAYLOAD`] bytes. After a 401 the token is renewed once, as for Glance.
    pub fn payload(&self, uuid: &str) -> Result<Vec<u8>, Error> {
        let base = self.base()?.to_owned();
        let url = format!(
            "{base}/v1/secrets/{}/payload",
            utf8_percent_encode(uuid, SEGMENT)
        );
        let shown = http::redact_url(&base);
        let resp = self.get(&url, &shown)?;
        let status = resp.status();
        match status {
            s if s.is_success() => http::read_capped(resp, MAX_PAYLOAD).map_err(|e| Error::Body {
                uuid: uuid.to_owned(),
                detail: e.to_string(),
            }),
            StatusCode::NOT_FOUND => Err(Error::NotFound {
                uuid: uuid.to_owned(),
                url: shown,
            }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Error::Refused {
                uuid: uuid.to_owned(),
                url: shown,
                status: status.as_u16(),
            }),
            _ => Err(Error::Status {
                uuid: uuid.to_owned(),
                url: shown,
                status: status.as_u16(),
                body: http::error_text(resp, 200).chars().take(200).collect(),
            }),
        }
    }

    fn get(&self, url: &str, shown: &str) -> Result<Response, Error> {
        let http = self.http()?;
        let send = |token: Option<&Secret>| {
            let mut req = http
                .get(url)
                .header(reqwest::header::ACCEPT, "application/octet-stream");
            if let Some(t) = token {
                req = req.header("X-Auth-Token", t.expose());
            }
            req.send().map_err(|e| Error::Transport {
                url: shown.to_owned(),
                detail: http::describe(&e),
            })
        };
        let Some(auth) = &self.settings.auth else {
            return send(None);
        };
        let token = auth.token()?;
        let resp = send(Some(&token))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        match auth.renew(&token)? {
            Some(fresh) => send(Some(&fresh)),
            None => Ok(resp),
        }
    }
}
