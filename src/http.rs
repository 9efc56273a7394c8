//! The one HTTP layer: client settings (TLS, timeouts) shared by the Glance and Keystone clients,
//! the [`Secret`] type and the [`TokenSource`] trait that hands Glance its `X-Auth-Token`, reqwest
//! error descriptions, and bounded body reads (nothing a server sends is read without a cap).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::blocking::{Client, Response};

use crate::error::{Classified, Kind};

/// Largest JSON document (an image record, a Keystone token with its catalog) read from a server.
pub const MAX_DOCUMENT: u64 = 8 << 20;
/// Largest error body read (only its first line is shown).
pub const MAX_ERROR_BODY: u64 = 64 << 10;

/// Client-side failures of the HTTP layer itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read CA certificate {path}: {detail}")]
    CaCert { path: PathBuf, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        Kind::Usage
    }
}

/// A secret string: never shown by `Debug`, only by [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Supplies the `X-Auth-Token` for requests. Failures come with their exit-code kind decided
/// (a refused password is `Auth`, an unreachable Keystone `Unavailable`).
pub trait TokenSource: Send + Sync {
    /// The current token (authenticating first if needed).
    fn token(&self) -> Result<Secret, Classified>;
    /// Called once after the server rejected `rejected` with 401: a new token if this source can
    /// re-authenticate (an expired token mid-run), `None` if it cannot (a fixed token).
    fn renew(&self, rejected: &Secret) -> Result<Option<Secret>, Classified>;
    /// The URL of another service of the same cloud (`key-manager`), from the token's catalog;
    /// `None` from a source that has no catalog (a fixed token).
    fn endpoint(
        &self,
        _service_type: &str,
        _interface: &str,
        _region: Option<&str>,
    ) -> Result<Option<String>, Classified> {
        Ok(None)
    }
}

/// A token given as it is (`--token`, `OS_AUTH_TOKEN`): never renewed.
pub struct StaticToken(pub Secret);

impl TokenSource for StaticToken {
    fn token(&self) -> Result<Secret, Classified> {
        Ok(self.0.clone())
    }

    fn renew(&self, _: &Secret) -> Result<Option<Secret>, Classified> {
        Ok(None)
    }
}

/// TLS and timeouts, shared by the Glance and Keystone clients.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
    pub connect_timeout: Duration,
    /// Longest silence allowed while waiting for a response or for the next bytes of a body.
    pub read_timeout: Duration,
}

impl HttpSettings {
    /// A blocking HTTP client with these settings.
    pub fn client(&self) -> Result<Client, Error> {
        let mut builder = Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.read_timeout)
            .user_agent(concat!("imgcache/", env!("CARGO_PKG_VERSION")))
            // Glance and Keystone answer where they are asked; a redirect is never followed, so
            // the token is never sent to an origin nobody configured.
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .danger_accept_invalid_certs(self.insecure);
        if let Some(path) = &self.cacert {
            let ca_error = |detail: String| Error::CaCert {
                path: path.clone(),
                detail,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| ca_error(e.to_string()))?;
            builder = builder.add_root_certificate(cert);
        }
        builder.build().map_err(|e| Error::Client(e.to_string()))
    }
}

/// Where `-vv` sends its lines about HTTP requests (set once by the binary; nothing is traced
/// otherwise). Never given a secret: callers pass methods, redacted URLs and statuses only.
static TRACE: std::sync::OnceLock<Tracer> = std::sync::OnceLock::new();

/// A sink for `-vv` lines.
pub type Tracer = Box<dyn Fn(&str) + Send + Sync>;

/// Installs the `-vv` request tracer (the first call wins).
pub fn set_trace(f: Tracer) {
    let _ = TRACE.set(f);
}

/// Traces one line about a request (`POST http://keystone:5000/v3/auth/tokens → 201`).
pub fn trace(line: &str) {
    if let Some(f) = TRACE.get() {
        f(line);
    }
}

/// One line naming what went wrong with a request: reqwest's Display omits the cause ("error
/// sending request"), so the cause is found in the chain and said in plain words (connection refused, timed out,
/// a name that does not resolve, an untrusted certificate).
pub fn describe(e: &reqwest::Error) -> String {
    let mut chain = Vec::new();
    let mut io = None;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        if let Some(i) = s.downcast_ref::<std::io::Error>() {
            io = Some(i.kind());
        }
        source = s.source();
    }
    let all = chain.join(": ").to_ascii_lowercase();
    let innermost = chain.last().cloned().unwrap_or_else(|| e.to_string());
    use std::io::ErrorKind as K;
    if e.is_timeout() || io == Some(K::TimedOut) {
        return "timed out (no answer within --connect-timeout / --read-timeout)".into();
    }
    match io {
        Some(K::ConnectionRefused) => {
            return "connection refused: nothing listens at that address and port (is the service running, is the URL's port right?)".into();
        }
        Some(K::ConnectionReset) => return "the connection was reset by the other side".into(),
        Some(K::UnexpectedEof) | Some(K::ConnectionAborted) => {
            return "the connection was closed before the answer was complete".into();
        }
        _ => {}
    }
    if all.contains("dns error") || all.contains("failed to lookup address") {
        return "the host name does not resolve (check the URL and the host's DNS)".into();
    }
    if all.contains("certificate") || all.contains("tls") {
        return format!(
            "TLS failed: {innermost}; pass --cacert with the CA that signed the server's certificate"
        );
    }
    if e.is_body() || e.is_decode() {
        return format!("the response body failed: {innermost}");
    }
    innermost
}

/// Reads a response body of at most `limit` bytes. A longer body is an error (`InvalidData`),
/// never a truncated document that happens to parse.
pub fn read_capped(resp: Response, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    resp.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the response is larger than {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// The first `limit` bytes of an error body, lossily decoded (the rest is not read).
pub fn error_text(resp: Response, limit: u64) -> String {
    let mut buf = Vec::new();
    let _ = resp.take(limit).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `url` with the password of its userinfo (if any) replaced by `***`, for messages: a password
/// in `--glance-url` is sent, never printed.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            let shown = u.to_string();
            // Url adds a trailing slash to a bare host; keep the caller's spelling otherwise.
            if !url.ends_with('/') {
                shown.trim_end_matches('/').to_owned()
            } else {
                shown
            }
        }
        Ok(_) => url.to_owned(),
        // Unparsable: show only what precedes a userinfo `@`.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("http://user:hunter2@glance:9292"),
            "http://user:***@glance:9292"
        );
        assert_eq!(redact_url("http://glance:9292/v2"), "http://glance:9292/v2");
        assert!(!redact_url("h t t p://u:hunter2@x").contains("hunter2"));
    }
}
