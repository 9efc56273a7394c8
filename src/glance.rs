//! Glance v2 over HTTP: the image record (`GET /v2/images/{id}`), the data stream
//! (`GET /v2/images/{id}/file`, optionally from a `Range` offset), and the classification of
//! every failure into "retry" or "give up" with its exit-code kind.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use reqwest::blocking::{Client as Http, Response};
use reqwest::header::{self, HeaderMap};
use serde::Deserialize;

use crate::error::{Classified, Kind};
use crate::http::{self, HttpSettings, Secret, TokenSource};

/// Characters left as they are in an image id path segment (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Glance failures, each classified as retryable or not.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image {id} not found in Glance at {url}; check the id with `openstack image show`")]
    NotFound { id: String, url: String },
    #[error(
        "Glance refused the request for {url} ({status}); check the token (--token / OS_AUTH_TOKEN) and that the image is visible to this project"
    )]
    Auth { url: String, status: u16 },
    #[error(
        "Glance refused the request for {url} ({status}) and no token was sent: give credentials (OS_AUTH_URL with OS_PASSWORD or an application credential, --os-cloud, or --token / OS_AUTH_TOKEN)"
    )]
    NoToken { url: String, status: u16 },
    #[error(
        "image {id} has no data in Glance (204 No Content); it may still be uploading or its stored file is missing — ask the image owner to upload it again"
    )]
    NoData { id: String },
    #[error("Glance answered {status} for {url}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach Glance at {url}: {detail}")]
    Transport { url: String, detail: String },
    /// Glance was reached and started sending the data, which then failed.
    #[error("image {id}: the data transfer from Glance failed: {detail}")]
    Data { id: String, detail: String },
    /// The data arrives, but slower than `--min-rate`.
    #[error("image {id}: the data arrives too slowly: {detail}")]
    TooSlow { id: String, detail: String },
    #[error("Glance sent an image record for {id} that cannot be read: {detail}")]
    BadRecord { id: String, detail: String },
    #[error(
        "Glance answered the request for image {asked} with the record of image {got}; refusing it (a proxy or Glance itself is misbehaving)"
    )]
    WrongRecord { asked: String, got: String },
    #[error(
        "Glance answered {status} for {url}, a redirect to {location}; redirects are not followed (the token would go with them): point --glance-url at the Glance API itself"
    )]
    Redirect {
        url: String,
        status: u16,
        location: String,
    },
    #[error("invalid Glance URL {url:?}: {detail}; pass e.g. --glance-url http://controller:9292")]
    BadUrl { url: String, detail: String },
    #[error(transparent)]
    Http(#[from] http::Error),
    #[error("{detail}")]
    Credentials { kind: Kind, detail: String },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::NotFound { .. } => Kind::NotFound,
            Error::Auth { .. } | Error::NoToken { .. } => Kind::Auth,
            Error::NoData { .. } => Kind::NotUsable,
            Error::Status { .. }
            | Error::Transport { .. }
            | Error::Data { .. }
            | Error::TooSlow { .. } => Kind::Unavailable,
            Error::BadRecord { .. } => Kind::Protocol,
            Error::BadUrl { .. } => Kind::Usage,
            Error::WrongRecord { .. } => Kind::Integrity,
            Error::Redirect { .. } => Kind::Unavailable,
            Error::Http(e) => e.kind(),
            Error::Credentials { kind, .. } => *kind,
        }
    }

    /// True for failures worth another attempt: transport errors, timeouts, 5xx and 429.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Data { .. } | Error::TooSlow { .. } => true,
            Error::Credentials { kind, .. } => *kind == Kind::Unavailable,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How to reach Glance.
#[derive(Clone)]
pub struct Settings {
    /// Endpoint without `/v2`, e.g. `http://controller:9292`.
    pub url: String,
    pub auth: Option<Arc<dyn TokenSource>>,
    pub http: HttpSettings,
}

/// The image record fields imgcache uses. Everything else Glance sends is kept in `extra`.
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub status: String,
    #[serde(default)]
    pub disk_format: Option<String>,
    #[serde(default)]
    pub container_format: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub virtual_size: Option<u64>,
    #[serde(default)]
    pub checksum: Option<String>,
    #[serde(default)]
    pub os_hash_algo: Option<String>,
    #[serde(default)]
    pub os_hash_value: Option<String>,
    #[serde(default)]
    pub direct_url: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Image properties worth keeping in the cache record (all string-valued top-level fields that
/// are not part of Glance's own schema).
const SCHEMA_FIELDS: &[&str] = &[
    "visibility",
    "protected",
    "min_ram",
    "min_disk",
    "owner",
    "os_hidden",
    "created_at",
    "updated_at",
    "tags",
    "self",
    "file",
    "schema",
    "stores",
    "locations",
];

impl Image {
    /// User-visible image properties (kernel_id, ramdisk_id, os_type, ...).
    pub fn properties(&self) -> serde_json::Map<String, serde_json::Value> {
        self.extra
            .iter()
            .filter(|(k, v)| v.is_string() && !SCHEMA_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// What a data request returned.
pub enum Data {
    /// 200: the whole image from byte 0.
    Full { body: Response, len: Option<u64> },
    /// 206 whose `Content-Range` starts where we asked.
    Partial { body: Response },
}

/// A Glance v2 client. The HTTP client is built at the first request: building it loads the
/// system CA store, which a `create` or `fetch` of a cached image never needs.
pub struct Client {
    settings: HttpSettings,
    http: std::sync::OnceLock<Http>,
    base: String,
    /// `base` as messages show it (a password in it redacted).
    shown_base: String,
    auth: Option<Arc<dyn TokenSource>>,
}

impl Client {
    /// Builds the client and checks the URL; TLS settings are applied at the first request.
    pub fn new(settings: &Settings) -> Result<Client, Error> {
        let base = settings.url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|e| Error::BadUrl {
            url: http::redact_url(&settings.url),
            detail: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::BadUrl {
                url: http::redact_url(&settings.url),
                detail: "the scheme must be http or https".into(),
            });
        }
        // Accept an endpoint given with its version suffix too.
        let base = base.strip_suffix("/v2").map(str::to_owned).unwrap_or(base);
        Ok(Client {
            settings: settings.http.clone(),
            http: std::sync::OnceLock::new(),
            shown_base: http::redact_url(&base),
            base,
            auth: settings.auth.clone(),
        })
    }

    fn http(&self) -> Result<&Http, Error> {
        if let Some(h) = self.http.get() {
            return Ok(h);
        }
        let built = self.settings.client()?;
        Ok(self.http.get_or_init(|| built))
    }

    /// A URL of ours as messages show it.
    fn shown(&self, url: &str) -> String {
        url.replacen(&self.base, &self.shown_base, 1)
    }

    fn image_url(&self, id: &str) -> String {
        format!(
            "{}/v2/images/{}",
            self.base,
            utf8_percent_encode(id, SEGMENT)
        )
    }

    /// Sends a GET with the current token; after a 401, asks the token source for a new token
    /// once (an expired Keystone token is renewed; a fixed one is not) and resends.
    fn get(&self, url: &str, range: Option<u64>) -> Result<Response, Error> {
        let http = self.http()?;
        let send = |token: Option<&Secret>| {
            let mut req = http.get(url).header(header::ACCEPT, "application/json");
            if let Some(t) = token {
                req = req.header("X-Auth-Token", t.expose());
            }
            if let Some(offset) = range {
                req = req.header(header::RANGE, format!("bytes={offset}-"));
            }
            let shown = self.shown(url);
            let resp = req.send().map_err(|e| transport(&shown, &e))?;
            http::trace(&format!(
                "GET {shown}{} → {}",
                range.map_or(String::new(), |o| format!(" (Range: bytes={o}-)")),
                resp.status().as_u16()
            ));
            Ok(resp)
        };
        let Some(auth) = &self.auth else {
            return send(None);
        };
        let token = auth.token().map_err(credentials)?;
        let resp = send(Some(&token))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        match auth.renew(&token).map_err(credentials)? {
            Some(fresh) => send(Some(&fresh)),
            None => Ok(resp),
        }
    }

    /// `GET /v2/images/{id}`, one attempt.
    pub fn show(&self, id: &str) -> Result<Image, Error> {
        let url = self.image_url(id);
        let resp = self.get(&url, None)?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                id: id.to_owned(),
                url: self.shown_base.clone(),
            });
        }
        if !status.is_success() {
            return Err(status_error(&self.shown(&url), resp, self.auth.is_some()));
        }
        let bytes = http::read_capped(resp, http::MAX_DOCUMENT).map_err(|e| Error::BadRecord {
            id: id.to_owned(),
            detail: e.to_string(),
        })?;
        let image: Image = serde_json::from_slice(&bytes).map_err(|e| Error::BadRecord {
            id: id.to_owned(),
            detail: e.to_string(),
        })?;
        // Case aside (a MySQL-backed Glance matches ids case-insensitively), the record must be
        // the image asked for.
        if !image.id.eq_ignore_ascii_case(id) {
            return Err(Error::WrongRecord {
                asked: id.to_owned(),
                got: image.id,
            });
        }
        Ok(image)
    }

    /// `GET /v2/images/{id}/file`, from `offset` with `Range: bytes=offset-` when it is not 0.
    ///
    /// A 206 is accepted only if its `Content-Range` starts at `offset`; any other 206 and any 200
    /// are returned as [`Data::Full`] (read from byte 0) or an error, so the caller restarts
    /// cleanly. 416 on a resume is returned as `Full` of a fresh request from 0.
    pub fn open_data(&self, id: &str, offset: u64) -> Result<Data, Error> {
        let url = format!("{}/file", self.image_url(id));
        let resp = self.get(&url, (offset > 0).then_some(offset))?;
        let status = resp.status();
        match status {
            StatusCode::OK => {
                let len = resp.content_length();
                Ok(Data::Full { body: resp, len })
            }
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                if content_range_start(resp.headers()) == Some(offset) {
                    Ok(Data::Partial { body: resp })
                } else {
                    // A range we did not ask for: start over rather than splice wrong bytes.
                    drop(resp);
                    self.open_data(id, 0)
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => self.open_data(id, 0),
            StatusCode::NO_CONTENT => Err(Error::NoData { id: id.to_owned() }),
            StatusCode::NOT_FOUND => Err(Error::NotFound {
                id: id.to_owned(),
                url: self.shown_base.clone(),
            }),
            _ => Err(status_error(&self.shown(&url), resp, self.auth.is_some())),
        }
    }
}

/// Parses the start of `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

fn transport(url: &str, e: &reqwest::Error) -> Error {
    Error::Transport {
        url: url.to_owned(),
        detail: http::describe(e),
    }
}

/// A failure of the token source (Keystone), with its own exit-code kind.
fn credentials(e: Classified) -> Error {
    Error::Credentials {
        kind: e.kind,
        detail: e.message,
    }
}

fn status_error(url: &str, resp: Response, token_sent: bool) -> Error {
    let status = resp.status().as_u16();
    if resp.status().is_redirection() {
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(summarize)
            .unwrap_or_else(|| "(no Location)".into());
        return Error::Redirect {
            url: url.to_owned(),
            status,
            location,
        };
    }
    if (status == 401 || status == 403) && !token_sent {
        return Error::NoToken {
            url: url.to_owned(),
            status,
        };
    }
    if status == 401 || status == 403 {
        return Error::Auth {
            url: url.to_owned(),
            status,
        };
    }
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = http::error_text(resp, http::MAX_ERROR_BODY);
    Error::Status {
        url: url.to_owned(),
        status,
        body: summarize(&body),
        retry_after,
    }
}

/// One line, at most 200 chars, of an error body (Glance sends HTML or JSON with `<br />`).
fn summarize(body: &str) -> String {
    let text = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.to_owned());
    let mut out = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(if c.is_control() { ' ' } else { c }),
            _ => {}
        }
    }
    let collapsed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        "(empty body)".into()
    } else {
        collapsed.chars().take(200).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn content_range_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(content_range_start(&h), None);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/200"),
        );
        assert_eq!(content_range_start(&h), Some(100));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes */200"),
        );
        assert_eq!(content_range_start(&h), None);
    }

    #[test]
    fn ids_are_percent_encoded_in_urls() {
        let c = Client::new(&Settings {
            url: "http://h:9292/v2/".into(),
            auth: None,
            http: HttpSettings {
                cacert: None,
                insecure: false,
                connect_timeout: Duration::from_secs(1),
                read_timeout: Duration::from_secs(1),
            },
        })
        .unwrap();
        assert_eq!(
            c.image_url("a b?#%"),
            "http://h:9292/v2/images/a%20b%3F%23%25"
        );
    }

    #[test]
    fn summarize_strips_glance_html() {
        let body =
            r#"{"message": "No image found with ID x<br /><br />\n\n\n", "code": "404 Not Found"}"#;
        assert_eq!(summarize(body), "No image found with ID x");
        assert_eq!(
            summarize("<html><h1>503 Service Unavailable</h1></html>"),
            "503 Service Unavailable"
        );
    }

    #[test]
    fn classification() {
        let s = |status| Error::Status {
            url: String::new(),
            status,
            body: String::new(),
            retry_after: None,
        };
        assert!(s(503).retryable());
        assert!(s(429).retryable());
        assert!(!s(400).retryable());
        assert!(
            !Error::Auth {
                url: String::new(),
                status: 401
            }
            .retryable()
        );
        assert_eq!(Error::NoData { id: "x".into() }.kind(), Kind::NotUsable);
    }
}
