//! OpenStack-native configuration: where credentials come from (flags > `OS_*` environment >
//! clouds.yaml/secure.yaml, like python-openstackclient), Keystone v3 authentication, and finding
//! Glance in the token's catalog.

pub mod clouds;
pub mod keystone;

use std::path::PathBuf;
use std::sync::Arc;

use crate::barbican;
use crate::error::UsageError;
use crate::glance;
use crate::http::{HttpSettings, Secret, StaticToken, TokenSource};

/// Everything needed to authenticate and find Glance, after precedence is applied.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub auth_url: Option<String>,
    pub auth_type: Option<String>,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub password: Option<Secret>,
    pub user_domain_name: Option<String>,
    pub user_domain_id: Option<String>,
    pub project_name: Option<String>,
    pub project_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub project_domain_id: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_name: Option<String>,
    pub application_credential_secret: Option<Secret>,
    pub token: Option<Secret>,
    pub region_name: Option<String>,
    pub interface: Option<String>,
    pub image_url: Option<String>,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}

/// The command-line side of the sources (flags win over everything).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub cloud: Option<String>,
    pub glance_url: Option<String>,
    pub token: Option<String>,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
    pub region: Option<String>,
    pub interface: Option<String>,
}

/// Applies the precedence flags > environment > clouds.yaml. `env` reads a variable.
pub fn resolve(
    flags: &Flags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, anyhow::Error> {
    let cloud_name = flags.cloud.clone().or_else(|| env("OS_CLOUD"));
    let mut c = match &cloud_name {
        Some(name) => clouds::load(name, env)?,
        None => Credentials::default(),
    };
    let set = |slot: &mut Option<String>, var: &str| {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            *slot = Some(v);
        }
    };
    set(&mut c.auth_url, "OS_AUTH_URL");
    set(&mut c.auth_type, "OS_AUTH_TYPE");
    set(&mut c.username, "OS_USERNAME");
    set(&mut c.user_id, "OS_USER_ID");
    set(&mut c.user_domain_name, "OS_USER_DOMAIN_NAME");
    set(&mut c.user_domain_id, "OS_USER_DOMAIN_ID");
    set(&mut c.project_name, "OS_TENANT_NAME");
    set(&mut c.project_name, "OS_PROJECT_NAME");
    set(&mut c.project_id, "OS_PROJECT_ID");
    set(&mut c.project_domain_name, "OS_PROJECT_DOMAIN_NAME");
    set(&mut c.project_domain_id, "OS_PROJECT_DOMAIN_ID");
    set(
        &mut c.application_credential_id,
        "OS_APPLICATION_CREDENTIAL_ID",
    );
    set(
        &mut c.application_credential_name,
        "OS_APPLICATION_CREDENTIAL_NAME",
    );
    set(&mut c.region_name, "OS_REGION_NAME");
    set(&mut c.interface, "OS_INTERFACE");
    set(&mut c.image_url, "OS_IMAGE_URL");
    let secret = |var: &str| env(var).filter(|v| !v.is_empty()).map(Secret::new);
    if let Some(p) = secret("OS_PASSWORD") {
        c.password = Some(p);
    }
    if let Some(s) = secret("OS_APPLICATION_CREDENTIAL_SECRET") {
        c.application_credential_secret = Some(s);
    }
    if let Some(t) = secret("OS_TOKEN").or_else(|| secret("OS_AUTH_TOKEN")) {
        c.token = Some(t);
    }
    if let Some(p) = env("OS_CACERT").filter(|v| !v.is_empty()) {
        c.cacert = Some(PathBuf::from(p));
    }
    if env("OS_INSECURE").is_some_and(|v| matches!(v.as_str(), "1" | "true" | "True" | "yes")) {
        c.insecure = true;
    }
    // Flags last: they win.
    if let Some(u) = &flags.glance_url {
        c.image_url = Some(u.clone());
    }
    if let Some(t) = &flags.token {
        c.token = Some(Secret::new(t.clone()));
    }
    if let Some(p) = &flags.cacert {
        c.cacert = Some(p.clone());
    }
    if flags.insecure {
        c.insecure = true;
    }
    if let Some(r) = &flags.region {
        c.region_name = Some(r.clone());
    }
    if let Some(i) = &flags.interface {
        c.interface = Some(i.clone());
    }
    Ok(c)
}

/// The Glance endpoint and how to authenticate to it.
pub struct Endpoint {
    pub url: String,
    pub auth: Option<Arc<dyn TokenSource>>,
}

/// Decides how to reach Glance: an explicit image URL with a static token (or none), or
/// Keystone (password, application credential, or a token validated for its catalog).
pub fn endpoint(c: &Credentials, http: &HttpSettings) -> Result<Endpoint, anyhow::Error> {
    let auth_type = c.auth_type.as_deref().unwrap_or("");
    let uses_keystone = c.auth_url.is_some()
        && (c.password.is_some()
            || c.application_credential_secret.is_some()
            || (c.token.is_some() && c.image_url.is_none()));
    if !uses_keystone {
        let url = c.image_url.clone().ok_or_else(|| {
            UsageError(
                "no Glance endpoint: pass --glance-url http://controller:9292, set OS_IMAGE_URL, or give Keystone credentials (OS_AUTH_URL + OS_PASSWORD, an application credential, --os-cloud)".into(),
            )
        })?;
        let auth = c
            .token
            .clone()
            .map(|t| Arc::new(StaticToken(t)) as Arc<dyn TokenSource>);
        return Ok(Endpoint { url, auth });
    }
    let method = keystone::Method::from_credentials(c, auth_type)?;
    let session = Arc::new(keystone::Session::new(
        c.auth_url.clone().unwrap_or_default(),
        method,
        http,
    )?);
    let url = match &c.image_url {
        Some(u) => u.clone(),
        None => session.image_endpoint(
            c.interface.as_deref().unwrap_or("public"),
            c.region_name.as_deref(),
        )?,
    };
    Ok(Endpoint {
        url,
        auth: Some(session),
    })
}

/// Which authentication a command would use, in words, for `config show` (nothing is sent):
/// `keystone password for user "admin", project "demo" at http://…`, `application credential
/// …`, `a ready token, validated at Keystone …`, `a static token sent to Glance as is`, or `none`.
pub fn describe_auth(flags: &Flags) -> String {
    let c = match resolve(flags, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => return format!("unusable: {e:#}"),
    };
    let uses_keystone = c.auth_url.is_some()
        && (c.password.is_some()
            || c.application_credential_secret.is_some()
            || (c.token.is_some() && c.image_url.is_none()));
    let glance = match &c.image_url {
        Some(u) => format!("Glance at {}", crate::http::redact_url(u)),
        None => "Glance from the catalog".to_owned(),
    };
    if !uses_keystone {
        return match c.token {
            Some(_) => format!("a static token (OS_TOKEN / --token), sent to {glance} as is"),
            None => format!("none: requests to {glance} carry no token"),
        };
    }
    let at = c
        .auth_url
        .as_deref()
        .map(crate::http::redact_url)
        .unwrap_or_default();
    let who = |name: &Option<String>, id: &Option<String>| {
        id.as_ref()
            .map(|i| format!("id {i}"))
            .or_else(|| name.as_ref().map(|n| format!("{n:?}")))
            .unwrap_or_else(|| "?".into())
    };
    match keystone::Method::from_credentials(&c, c.auth_type.as_deref().unwrap_or("")) {
        Ok(keystone::Method::Password { .. }) => format!(
            "Keystone password for user {}, project {} at {at}; {glance}",
            who(&c.username, &c.user_id),
            who(&c.project_name, &c.project_id)
        ),
        Ok(keystone::Method::ApplicationCredential { .. }) => format!(
            "Keystone application credential {} at {at}; {glance}",
            who(&c.application_credential_name, &c.application_credential_id)
        ),
        Ok(keystone::Method::Token(_)) => {
            format!("a ready token, validated at Keystone {at} for its catalog; {glance}")
        }
        Err(e) => format!("unusable: {e}"),
    }
}

/// How to reach Glance, as the command line gave it: the credential sources and the HTTP
/// settings. Resolved (environment, clouds.yaml, Keystone) only when a command needs Glance.
#[derive(Debug, Clone)]
pub struct Access {
    pub flags: Flags,
    pub http: HttpSettings,
}

/// Resolves how to reach Glance: flags > OS_* environment > clouds.yaml, then Keystone (if
/// credentials are given) for a token and the catalog's image endpoint.
pub fn glance_settings(access: &Access) -> Result<glance::Settings, anyhow::Error> {
    Ok(connect(access)?.0)
}

/// Like [`glance_settings`], and Barbican's settings on the same session (its token and
/// catalog, the same interface and region), for the certificates of signed images.
pub fn connect(access: &Access) -> Result<(glance::Settings, barbican::Settings), anyhow::Error> {
    let creds = resolve(&access.flags, &|k| std::env::var(k).ok())?;
    let http = HttpSettings {
        cacert: creds.cacert.clone(),
        insecure: creds.insecure,
        ..access.http.clone()
    };
    let endpoint = endpoint(&creds, &http)?;
    let key_manager = barbican::Settings {
        auth: endpoint.auth.clone(),
        interface: creds.interface.clone().unwrap_or_else(|| "public".into()),
        region: creds.region_name.clone(),
        http: http.clone(),
    };
    Ok((
        glance::Settings {
            url: endpoint.url,
            auth: endpoint.auth,
            http,
        },
        key_manager,
    ))
}
