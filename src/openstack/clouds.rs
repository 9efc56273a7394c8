//! clouds.yaml and secure.yaml, from the standard locations (`OS_CLIENT_CONFIG_FILE`, `./`,
//! `~/.config/openstack/`, `/etc/openstack/`), merged as openstacksdk does: secure.yaml's values
//! are laid over clouds.yaml's for the same cloud.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_norway::Value;

use super::Credentials;
use crate::error::UsageError;
use crate::http::Secret;

fn search_dirs(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(".")];
    if let Some(home) = env("HOME") {
        dirs.push(Path::new(&home).join(".config/openstack"));
    }
    dirs.push(PathBuf::from("/etc/openstack"));
    dirs
}

fn find(
    name: &str,
    explicit: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(PathBuf::from(p));
    }
    search_dirs(env)
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn read(path: &Path) -> Result<Value> {
    let bytes = crate::fsutil::read_operator_file(path, 4 << 20)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    serde_norway::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))
}

/// Deep-merges `over` into `base`.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Loads cloud `name` from clouds.yaml (+ secure.yaml).
pub fn load(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Credentials> {
    let clouds_path = find("clouds.yaml", env("OS_CLIENT_CONFIG_FILE"), env).ok_or_else(|| {
        UsageError(format!(
            "cloud {name:?} requested but no clouds.yaml found in ./, ~/.config/openstack/ or /etc/openstack/"
        ))
    })?;
    let mut doc = read(&clouds_path)?;
    if let Some(secure) = find("secure.yaml", env("OS_CLIENT_SECURE_FILE"), env) {
        merge(&mut doc, read(&secure)?);
    }
    let cloud = doc.get("clouds").and_then(|c| c.get(name)).ok_or_else(|| {
        UsageError(format!(
            "cloud {name:?} is not in {}; check --os-cloud / OS_CLOUD",
            clouds_path.display()
        ))
    })?;
    let s = |v: Option<&Value>| {
        v.and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let auth = cloud.get("auth");
    let a = |k: &str| s(auth.and_then(|a| a.get(k)));
    let verify = cloud.get("verify").and_then(Value::as_bool);
    Ok(Credentials {
        auth_url: a("auth_url"),
        auth_type: s(cloud.get("auth_type")),
        username: a("username"),
        user_id: a("user_id"),
        password: a("password").map(Secret::new),
        user_domain_name: a("user_domain_name").or_else(|| a("domain_name")),
        user_domain_id: a("user_domain_id").or_else(|| a("domain_id")),
        project_name: a("project_name").or_else(|| a("tenant_name")),
        project_id: a("project_id").or_else(|| a("tenant_id")),
        project_domain_name: a("project_domain_name").or_else(|| a("domain_name")),
        project_domain_id: a("project_domain_id").or_else(|| a("domain_id")),
        application_credential_id: a("application_credential_id"),
        application_credential_name: a("application_credential_name"),
        application_credential_secret: a("application_credential_secret").map(Secret::new),
        token: a("token").map(Secret::new),
        region_name: s(cloud.get("region_name")),
        interface: s(cloud.get("interface")),
        image_url: s(cloud.get("image_endpoint_override")),
        cacert: s(cloud.get("cacert")).map(PathBuf::from),
        insecure: verify == Some(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_yaml_is_merged_and_secrets_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("clouds.yaml"),
            "clouds:\n  lab:\n    auth:\n      auth_url: http://k:5000/v3\n      username: demo\n      project_name: demo\n      user_domain_name: Default\n    region_name: RegionTwo\n    interface: internal\n    verify: false\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("secure.yaml"),
            "clouds:\n  lab:\n    auth:\n      password: hunter2\n",
        )
        .unwrap();
        let d = dir.path().to_owned();
        let env = move |k: &str| match k {
            "OS_CLIENT_CONFIG_FILE" => Some(d.join("clouds.yaml").display().to_string()),
            "OS_CLIENT_SECURE_FILE" => Some(d.join("secure.yaml").display().to_string()),
            _ => None,
        };
        let c = load("lab", &env).unwrap();
        assert_eq!(c.username.as_deref(), Some("demo"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("hunter2"));
        assert_eq!(c.region_name.as_deref(), Some("RegionTwo"));
        assert_eq!(c.interface.as_deref(), Some("internal"));
        assert!(c.insecure);
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = load("nope", &env).unwrap_err().to_string();
        assert!(e.contains("\"nope\""), "{e}");
    }
}
