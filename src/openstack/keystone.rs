//! Keystone v3: password, application-credential and token authentication, the service
//! catalog, and re-authentication when Glance rejects an expired token (once per token, so a
//! wrong password never turns into a retry storm).

use std::sync::Mutex;

use reqwest::blocking::Client as Http;
use serde_json::{Value, json};

use super::Credentials;
use crate::error::{Classified, Kind, UsageError};
use crate::http::{self, HttpSettings, Secret, TokenSource};

/// Keystone failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Keystone at {url} refused the credentials ({status}); check the user, password or application credential (nothing is retried)"
    )]
    Refused { url: String, status: u16 },
    #[error("cannot reach Keystone at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("Keystone at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "no {service} endpoint with interface {interface:?}{} in the service catalog (available: {available}); set --os-region-name / OS_REGION_NAME, OS_INTERFACE{}",
        .region.as_deref().map(|r| format!(" in region {r:?}")).unwrap_or_default(),
        if .service == "image" { ", or OS_IMAGE_URL" } else { "" }
    )]
    NoEndpoint {
        service: String,
        interface: String,
        region: Option<String>,
        available: String,
    },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Refused { .. } => Kind::Auth,
            Error::Unreachable { .. } | Error::Status { .. } => Kind::Unavailable,
            Error::NoEndpoint { .. } => Kind::Usage,
        }
    }
}

impl From<Error> for Classified {
    fn from(e: Error) -> Classified {
        Classified {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// How to obtain a token.
#[derive(Debug, Clone)]
pub enum Method {
    Password {
        user: Value,
        password: Secret,
        scope: Option<Value>,
    },
    ApplicationCredential {
        credential: Value,
        secret: Secret,
    },
    /// A ready token: validated once to read its catalog; cannot be renewed.
    Token(Secret),
}

fn named(name: &Option<String>, id: &Option<String>) -> Option<Value> {
    match (id, name) {
        (Some(id), _) => Some(json!({ "id": id })),
        (None, Some(name)) => Some(json!({ "name": name })),
        _ => None,
    }
}

fn domain(name: &Option<String>, id: &Option<String>) -> Value {
    named(name, id).unwrap_or_else(|| json!({ "id": "default" }))
}

impl Method {
    /// Picks the method from `OS_AUTH_TYPE` (or what the credentials contain).
    pub fn from_credentials(c: &Credentials, auth_type: &str) -> Result<Method, UsageError> {
        let missing = |what: &str| UsageError(format!("Keystone authentication needs {what}"));
        let kind = match auth_type {
            "" => {
                if c.application_credential_secret.is_some() {
                    "v3applicationcredential"
                } else if c.password.is_some() {
                    "password"
                } else {
                    "token"
                }
            }
            other => other,
        };
        match kind {
            "password" | "v3password" => {
                let mut user = named(&c.username, &c.user_id)
                    .ok_or_else(|| missing("OS_USERNAME or OS_USER_ID"))?;
                if c.user_id.is_none() {
                    user["domain"] = domain(&c.user_domain_name, &c.user_domain_id);
                }
                let password = c.password.clone().ok_or_else(|| missing("OS_PASSWORD"))?;
                let scope = named(&c.project_name, &c.project_id).map(|mut p| {
                    if c.project_id.is_none() {
                        p["domain"] = domain(&c.project_domain_name, &c.project_domain_id);
                    }
                    json!({ "project": p })
                });
                Ok(Method::Password {
                    user,
                    password,
                    scope,
                })
            }
            "v3applicationcredential" | "applicationcredential" => {
                let secret = c
                    .application_credential_secret
                    .clone()
                    .ok_or_else(|| missing("OS_APPLICATION_CREDENTIAL_SECRET"))?;
                let credential =
                    match (&c.application_credential_id, &c.application_credential_name) {
                        (Some(id), _) => json!({ "id": id }),
                        (None, Some(name)) => {
                            let mut user = named(&c.username, &c.user_id).ok_or_else(|| {
                                missing(
                                    "OS_USERNAME or OS_USER_ID with OS_APPLICATION_CREDENTIAL_NAME",
                                )
                            })?;
                            if c.user_id.is_none() {
                                user["domain"] = domain(&c.user_domain_name, &c.user_domain_id);
                            }
                            json!({ "name": name, "user": user })
                        }
                        _ => return Err(missing("OS_APPLICATION_CREDENTIAL_ID or _NAME")),
                    };
                Ok(Method::ApplicationCredential { credential, secret })
            }
            "token" | "v3token" | "admin_token" => Ok(Method::Token(
                c.token
                    .clone()
                    .ok_or_else(|| missing("OS_TOKEN or OS_AUTH_TOKEN"))?,
            )),
            other => Err(UsageError(format!(
                "OS_AUTH_TYPE {other:?} is not supported; use password, v3applicationcredential or token"
            ))),
        }
    }
}

#[derive(Clone)]
struct Token {
    value: Secret,
    catalog: Value,
}

/// A Keystone session: one token at a time, renewed when Glance rejects it.
pub struct Session {
    auth_url: String,
    method: Method,
    http: Http,
    current: Mutex<Option<Token>>,
}

impl Session {
    /// A session against `auth_url` (with or without `/v3`).
    pub fn new(
        auth_url: String,
        method: Method,
        http: &HttpSettings,
    ) -> Result<Session, http::Error> {
        let base = auth_url.trim_end_matches('/');
        let base = base.strip_suffix("/v3").unwrap_or(base);
        Ok(Session {
            auth_url: format!("{base}/v3"),
            method,
            http: http.client()?,
            current: Mutex::new(None),
        })
    }

    /// Sends the authentication request of our method.
    fn send_auth(&self) -> Result<reqwest::blocking::Response, Error> {
        let url = format!("{}/auth/tokens", self.auth_url);
        let transport = |e: reqwest::Error| Error::Unreachable {
            url: self.auth_url.clone(),
            detail: http::describe(&e),
        };
        let request = match &self.method {
            Method::Token(t) => self
                .http
                .get(&url)
                .header("X-Auth-Token", t.expose())
                .header("X-Subject-Token", t.expose()),
            Method::Password {
                user,
                password,
                scope,
            } => {
                let mut user = user.clone();
                user["password"] = json!(password.expose());
                let mut auth = json!({
                    "identity": { "methods": ["password"], "password": { "user": user } }
                });
                if let Some(scope) = scope {
                    auth["scope"] = scope.clone();
                }
                self.http.post(&url).json(&json!({ "auth": auth }))
            }
            Method::ApplicationCredential { credential, secret } => {
                let mut cred = credential.clone();
                cred["secret"] = json!(secret.expose());
                self.http.post(&url).json(&json!({ "auth": { "identity": {
                    "methods": ["application_credential"],
                    "application_credential": cred,
                }}}))
            }
        };
        let what = match &self.method {
            Method::Token(_) => "GET",
            _ => "POST",
        };
        http::trace(&format!("{what} {}", http::redact_url(&url)));
        let resp = request.send().map_err(transport)?;
        http::trace(&format!(
            "{what} {} → {}",
            http::redact_url(&url),
            resp.status().as_u16()
        ));
        Ok(resp)
    }

    fn authenticate(&self) -> Result<Token, Error> {
        let resp = self.send_auth()?;
        let status = resp.status().as_u16();
        if status == 401
            || status == 403
            || status == 404 && matches!(self.method, Method::Token(_))
        {
            return Err(Error::Refused {
                url: self.auth_url.clone(),
                status,
            });
        }
        let value = match &self.method {
            Method::Token(t) => Some(t.clone()),
            _ => resp
                .headers()
                .get("X-Subject-Token")
                .and_then(|v| v.to_str().ok())
                .map(Secret::new),
        };
        let body: Value = http::read_capped(resp, http::MAX_DOCUMENT)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(Error::Status {
                url: self.auth_url.clone(),
                status,
                body: body
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        let value = value.ok_or_else(|| Error::Status {
            url: self.auth_url.clone(),
            status,
            body: "no X-Subject-Token header".into(),
        })?;
        Ok(Token {
            value,
            catalog: body
                .pointer("/token/catalog")
                .cloned()
                .unwrap_or(Value::Null),
        })
    }

    fn current(&self) -> Result<Token, Error> {
        let mut slot = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = self.authenticate()?;
        *slot = Some(t.clone());
        Ok(t)
    }

    /// The `image` endpoint for `interface` (and `region`, if given) from the token's catalog.
    pub fn image_endpoint(&self, interface: &str, region: Option<&str>) -> Result<String, Error> {
        self.service_endpoint("image", interface, region)
    }

    /// The endpoint of `service_type` for `interface` (and `region`) from the token's catalog.
    pub fn service_endpoint(
        &self,
        service_type: &str,
        interface: &str,
        region: Option<&str>,
    ) -> Result<String, Error> {
        let token = self.current()?;
        let mut available = Vec::new();
        for service in token.catalog.as_array().into_iter().flatten() {
            if service.get("type").and_then(Value::as_str) != Some(service_type) {
                continue;
            }
            for ep in service
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let field = |k: &str| ep.get(k).and_then(Value::as_str).unwrap_or("");
                available.push(format!("{}/{}", field("region_id"), field("interface")));
                let region_ok =
                    region.is_none_or(|r| field("region_id") == r || field("region") == r);
                if field("interface") == interface && region_ok {
                    let url = field("url").trim_end_matches('/').to_owned();
                    http::trace(&format!(
                        "image endpoint from the catalog: {} (interface {interface}, region {})",
                        http::redact_url(&url),
                        field("region_id")
                    ));
                    return Ok(url);
                }
            }
        }
        Err(Error::NoEndpoint {
            service: service_type.to_owned(),
            interface: interface.to_owned(),
            region: region.map(str::to_owned),
            available: if available.is_empty() {
                "none".into()
            } else {
                available.join(", ")
            },
        })
    }
}

impl TokenSource for Session {
    fn token(&self) -> Result<Secret, Classified> {
        Ok(self.current()?.value)
    }

    fn renew(&self, rejected: &Secret) -> Result<Option<Secret>, Classified> {
        if matches!(self.method, Method::Token(_)) {
            return Ok(None);
        }
        let mut slot = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.as_ref()
            && &t.value != rejected
        {
            // Another thread already renewed it.
            return Ok(Some(t.value.clone()));
        }
        let t = self.authenticate()?;
        *slot = Some(t.clone());
        Ok(Some(t.value))
    }

    fn endpoint(
        &self,
        service_type: &str,
        interface: &str,
        region: Option<&str>,
    ) -> Result<Option<String>, Classified> {
        Ok(Some(self.service_endpoint(
            service_type,
            interface,
            region,
        )?))
    }
}
