//! The config drive's inputs: the flags as given ([`Flags`]) and what they name, read with a
//! bound and checked ([`Spec::load`]): every problem is a usage error naming its flag.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::Format;
use crate::error::UsageError;
use crate::fsutil;

/// Largest user data, in bytes. Nova's API takes user data base64-encoded with `maxLength`
/// 65535 characters (nova/api/openstack/compute/schemas/servers.py), which is 49149 bytes.
pub const MAX_USER_DATA: u64 = 65535 / 4 * 3;
/// Largest JSON document read from `--meta-data`, `--network-data`, `--vendor-data`.
const MAX_JSON: u64 = 1 << 20;
/// Largest public key file.
const MAX_KEY: u64 = 64 << 10;
/// Largest `--file` (the whole tree must fit a 64 MiB vfat drive too).
const MAX_INJECTED: u64 = 16 << 20;
/// Longest `--meta` key or value and `--file` guest path: Nova's limits (255).
const MAX_FIELD: usize = 255;
/// The config drive flags as given.
#[derive(Debug, Clone)]
pub struct Flags {
    pub format: Format,
    pub user_data: Option<PathBuf>,
    pub meta_data: Option<PathBuf>,
    pub network_data: Option<PathBuf>,
    pub vendor_data: Option<PathBuf>,
    pub hostname: Option<OsString>,
    /// `NAME=FILE`
    pub ssh_keys: Vec<OsString>,
    /// `KEY=VALUE`
    pub meta: Vec<String>,
    /// `GUEST_PATH=LOCAL_FILE`
    pub files: Vec<OsString>,
}

/// What goes on the drive, checked and loaded.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub format: Format,
    /// The instance name: the default `uuid` and `name`.
    pub instance: String,
    pub hostname: String,
    #[serde(serialize_with = "as_hex")]
    pub user_data: Option<Vec<u8>>,
    /// `--meta-data`, merged over the fields filled in here.
    pub meta_data: Map<String, Value>,
    pub network_data: Value,
    pub vendor_data: Value,
    pub ssh_keys: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    /// Guest path → content, in command-line order (`content/0000`, `0001`, ...).
    #[serde(serialize_with = "files_as_hex")]
    pub files: Vec<(String, Vec<u8>)>,
}

fn as_hex<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().map(hex::encode).serialize(s)
}

fn files_as_hex<S: serde::Serializer>(v: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
    let v: Vec<(&str, String)> = v
        .iter()
        .map(|(p, c)| (p.as_str(), hex::encode(c)))
        .collect();
    v.serialize(s)
}

fn usage(msg: String) -> anyhow::Error {
    UsageError(msg).into()
}

/// Reads a file the operator named for `flag`, at most `limit` bytes.
fn read(flag: &str, path: &Path, limit: u64) -> Result<Vec<u8>> {
    fsutil::read_operator_file(path, limit).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::InvalidData {
            format!("larger than {limit} bytes")
        } else {
            e.to_string()
        };
        usage(format!(
            "invalid {flag} {}: {why}; pass a readable regular file",
            path.display()
        ))
    })
}

/// Reads a JSON document for `flag`.
fn read_json(flag: &str, path: &Path) -> Result<Value> {
    let bytes = read(flag, path, MAX_JSON)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        usage(format!(
            "invalid {flag} {}: not JSON ({e}); pass a JSON document",
            path.display()
        ))
    })
}

/// Splits `A=B` at the first `=`; both sides non-empty.
fn split_pair<'a>(flag: &str, what: &str, s: &'a str) -> Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a, b)),
        _ => Err(usage(format!("invalid {flag} {s:?}: expected {what}"))),
    }
}

/// The flag's value as UTF-8 (it goes into JSON).
fn utf8<'a>(flag: &str, s: &'a OsString) -> Result<&'a str> {
    s.to_str().ok_or_else(|| {
        usage(format!(
            "invalid {flag} {s:?}: not valid UTF-8; metadata is JSON text"
        ))
    })
}

impl Spec {
    /// Checks and reads everything the flags name. Every problem is a usage error naming the
    /// flag: a missing or oversized file, JSON that does not parse, meta-data that is not an
    /// object, a hostname that is not one, a guest path that is relative or climbs.
    pub fn load(instance: &str, flags: &Flags) -> Result<Spec> {
        let user_data = flags
            .user_data
            .as_deref()
            .map(|p| read("--user-data", p, MAX_USER_DATA))
            .transpose()?;
        let meta_data = match &flags.meta_data {
            None => Map::new(),
            Some(p) => match read_json("--meta-data", p)? {
                Value::Object(m) => m,
                _ => {
                    return Err(usage(format!(
                        "invalid --meta-data {}: not a JSON object; pass {{\"key\": value, ...}}",
                        p.display()
                    )));
                }
            },
        };
        let json_or_empty = |flag: &str, p: &Option<PathBuf>| match p {
            Some(p) => read_json(flag, p),
            None => Ok(json!({})),
        };
        let hostname = match &flags.hostname {
            Some(h) => check_hostname(utf8("--hostname", h)?)?,
            None => sanitize_hostname(instance),
        };
        Ok(Spec {
            format: flags.format,
            instance: instance.to_owned(),
            hostname,
            user_data,
            meta_data,
            network_data: json_or_empty("--network-data", &flags.network_data)?,
            vendor_data: json_or_empty("--vendor-data", &flags.vendor_data)?,
            ssh_keys: load_keys(&flags.ssh_keys)?,
            meta: load_meta(&flags.meta)?,
            files: load_files(&flags.files)?,
        })
    }
}

/// `--hostname`: an RFC 1123 host name (labels of letters, digits and inner hyphens, at most
/// 63 bytes each, 253 in all).
fn check_hostname(h: &str) -> Result<String> {
    let bad = |why: &str| usage(format!("invalid --hostname {h:?}: {why}"));
    if h.is_empty() || h.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label must be 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad(
                "use letters, digits and hyphens (not at a label's start or end)",
            ));
        }
    }
    Ok(h.to_owned())
}

/// The default hostname from the instance name, as Nova's `sanitize_hostname`: lower case,
/// spaces and underscores become hyphens, other characters outside `[a-z0-9.-]` go, at most
/// 63 characters, no leading or trailing `.`/`-`; `server` if nothing is left.
fn sanitize_hostname(name: &str) -> String {
    let s: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c == ' ' || c == '_' { '-' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect();
    let s = s.trim_matches(|c| c == '.' || c == '-');
    let s: String = s.chars().take(63).collect();
    let s = s.trim_end_matches(['.', '-']);
    if s.is_empty() {
        "server".into()
    } else {
        s.into()
    }
}

fn load_keys(pairs: &[OsString]) -> Result<BTreeMap<String, String>> {
    let mut keys = BTreeMap::new();
    for pair in pairs {
        let s = utf8("--ssh-key", pair)?;
        let (name, file) = split_pair("--ssh-key", "NAME=FILE", s)?;
        if name.len() > MAX_FIELD || name.chars().any(char::is_control) {
            return Err(usage(format!(
                "invalid --ssh-key {s:?}: the name must be at most {MAX_FIELD} bytes without control characters"
            )));
        }
        let data = read("--ssh-key", Path::new(file), MAX_KEY)?;
        let data = String::from_utf8(data).map_err(|_| {
            usage(format!(
                "invalid --ssh-key {s:?}: {file} is not text; pass an OpenSSH public key file"
            ))
        })?;
        if keys
            .insert(name.to_owned(), data.trim().to_owned())
            .is_some()
        {
            return Err(usage(format!(
                "invalid --ssh-key {s:?}: key name {name:?} given twice"
            )));
        }
    }
    Ok(keys)
}

fn load_meta(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut meta = BTreeMap::new();
    for s in pairs {
        let Some((k, v)) = s.split_once('=') else {
            return Err(usage(format!("invalid --meta {s:?}: expected KEY=VALUE")));
        };
        if k.is_empty() || k.len() > MAX_FIELD || v.len() > MAX_FIELD {
            return Err(usage(format!(
                "invalid --meta {s:?}: the key must be 1 to {MAX_FIELD} bytes and the value at most {MAX_FIELD} (Nova's limits)"
            )));
        }
        if meta.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(usage(format!(
                "invalid --meta {s:?}: key {k:?} given twice"
            )));
        }
    }
    Ok(meta)
}

fn load_files(pairs: &[OsString]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    for pair in pairs {
        let s = utf8("--file", pair)?;
        let (guest, local) = split_pair("--file", "GUEST_PATH=LOCAL_FILE", s)?;
        let g = Path::new(guest);
        let plain = g
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
        if !g.is_absolute() || !plain || guest.contains("/./") || guest.ends_with("/.") {
            return Err(usage(format!(
                "invalid --file {s:?}: the guest path must be absolute, without `..` or `.` components"
            )));
        }
        if guest.len() > MAX_FIELD || guest == "/" || guest.chars().any(char::is_control) {
            return Err(usage(format!(
                "invalid --file {s:?}: the guest path must name a file in at most {MAX_FIELD} bytes, without control characters"
            )));
        }
        if !seen.insert(guest.to_owned()) {
            return Err(usage(format!(
                "invalid --file {s:?}: guest path {guest} given twice"
            )));
        }
        files.push((
            guest.to_owned(),
            read("--file", Path::new(local), MAX_INJECTED)?,
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(check_hostname("web-1.example.org").is_ok());
        for bad in ["", "-a", "a-", "a..b", "a_b", "é"] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(sanitize_hostname("My_Server 1"), "my-server-1");
        assert_eq!(sanitize_hostname("__"), "server");
    }
}
