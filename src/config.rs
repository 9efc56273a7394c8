//! The configuration file (`/etc/imgcache/imgcache.toml`, `--config`, `IMGCACHE_CONFIG`): a
//! flat TOML table whose keys are the long flags' names (`lock_timeout = "30m"`). Precedence is
//! flags > environment > file > defaults, done by handing clap the file's values as extra flags
//! for exactly the settings that neither a flag nor the environment set — so a value from the
//! file is parsed and validated by the same code as the flag.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};

use crate::cli::Cli;
use crate::commands::config::{Report, Setting};
use crate::error::UsageError;

/// The default configuration file, read if it exists.
pub const DEFAULT_PATH: &str = "/etc/imgcache/imgcache.toml";

/// Keys a file may set: every setting that is a flag, except secrets.
pub const KEYS: &[&str] = &[
    "instances_path",
    "base_dir_name",
    "glance_url",
    "os_cloud",
    "os_region_name",
    "os_interface",
    "cacert",
    "insecure",
    "connect_timeout",
    "read_timeout",
    "min_rate",
    "retries",
    "connections",
    "retry_backoff",
    "lock_timeout",
    "jobs",
    "force_raw",
    "allow_direct_file",
    "revalidate",
    "max_virtual_size",
    "max_image_size",
    "min_free",
    "verify_signatures",
    "certificate_dir",
    "min_age",
    "min_age_resized",
    "temp_age",
    "max_size",
    "ceph_conf",
    "ceph_id",
    "ceph_keyring",
    "images_pool",
    "instances_pool",
    "rbd_timeout",
    "keep_local_base",
    "config_drive_format",
];

/// A loaded configuration file.
#[derive(Debug, Clone)]
pub struct File {
    pub path: PathBuf,
    pub values: BTreeMap<String, toml::Value>,
}

/// Finds the file: `--config` (given here as `explicit`), `IMGCACHE_CONFIG`, or the default
/// path if it exists. An explicit path that does not exist is an error.
pub fn locate(explicit: Option<PathBuf>) -> Option<(PathBuf, bool)> {
    if let Some(p) = explicit {
        return Some((p, true));
    }
    if let Some(p) = std::env::var_os("IMGCACHE_CONFIG").filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    let p = PathBuf::from(DEFAULT_PATH);
    p.is_file().then_some((p, false))
}

/// Reads and checks a configuration file: TOML, known keys only.
pub fn load(path: &Path) -> Result<File> {
    let bytes = match crate::fsutil::read_operator_file(path, MAX_FILE) {
        Ok(b) => b,
        // A path the operator named (--config, IMGCACHE_CONFIG) that is not there is a typo.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(UsageError(format!(
                "configuration file {} does not exist; check --config or IMGCACHE_CONFIG",
                path.display()
            ))
            .into());
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("cannot read configuration file {}", path.display())));
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        UsageError(format!(
            "configuration file {}: {}",
            path.display(),
            toml_problem(&text, &e)
        ))
    })?;
    let mut values = BTreeMap::new();
    for (k, v) in table {
        if k == "token" || k == "password" {
            return Err(UsageError(format!(
                "configuration file {}: key {k:?} is a secret; put it in the environment or clouds.yaml/secure.yaml",
                path.display()
            ))
            .into());
        }
        if !KEYS.contains(&k.as_str()) {
            return Err(UsageError(format!(
                "configuration file {}: unknown key {k:?}; known keys: {}",
                path.display(),
                KEYS.join(", ")
            ))
            .into());
        }
        validate(&k, &v, path)?;
        values.insert(k, v);
    }
    Ok(File {
        path: path.to_owned(),
        values,
    })
}

/// Checks a value with the very parser its flag uses (and, for sizes the commands parse later,
/// with that parser), so `jobs = "four"` is an error naming the key whatever command runs.
fn validate(key: &str, value: &toml::Value, path: &Path) -> Result<(), UsageError> {
    let Some(flag) = as_flag(key, value, path)? else {
        return Ok(());
    };
    let Some((_, text)) = flag.split_once('=') else {
        return Ok(());
    };
    let bad = |why: &str| {
        UsageError(format!(
            "configuration file {}: {key} = {text:?}: {why}",
            path.display()
        ))
    };
    let cmd = Cli::command();
    let id = arg_id(key);
    if let Some(arg) = cmd
        .get_arguments()
        .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
        .find(|a| a.get_id() == id)
    {
        // The flag alone in a command of its own: its parser, range and possible values.
        clap::Command::new("imgcache")
            .arg(arg.clone().required(false).global(false))
            .try_get_matches_from(["imgcache", flag.as_str()])
            .map_err(|e| bad(&clap_reason(&e)))?;
    }
    let checked = match key {
        "max_virtual_size" | "max_image_size" | "min_rate" => {
            crate::units::parse_size(key, text).map(drop)
        }
        "min_free" | "max_size" => crate::units::parse_reserve(key, text).map(drop),
        _ => Ok(()),
    };
    checked.map_err(|e| bad(&e.0))
}

/// The reason in a clap value error, without its "error:" prefix and help footer.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // "invalid value 'four' for '--jobs <N>': invalid digit found in string"
    match first.rsplit_once("': ") {
        Some((_, why)) => why.to_owned(),
        None => first.to_owned(),
    }
}

/// Largest configuration file read.
const MAX_FILE: u64 = 1 << 20;

/// Where and why a TOML file does not parse, on one line: `line 3, column 9: invalid array;
/// expected ']'`.
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let why = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {why}")
        }
        None => why,
    }
}

/// The flag a key becomes, or `None` when the value needs no flag (a false switch).
fn as_flag(key: &str, value: &toml::Value, path: &Path) -> Result<Option<String>, UsageError> {
    let flag = key.replace('_', "-");
    let bad = |want: &str| {
        UsageError(format!(
            "configuration file {}: {key} must be {want}",
            path.display()
        ))
    };
    Ok(match (key, value) {
        ("force_raw", toml::Value::Boolean(b)) => (!b).then(|| "--no-force-raw".to_owned()),
        (
            "insecure" | "allow_direct_file" | "revalidate" | "keep_local_base"
            | "verify_signatures",
            toml::Value::Boolean(b),
        ) => b.then(|| format!("--{flag}")),
        (
            "force_raw" | "insecure" | "allow_direct_file" | "revalidate" | "keep_local_base"
            | "verify_signatures",
            _,
        ) => {
            return Err(bad("true or false"));
        }
        (_, toml::Value::String(s)) => Some(format!("--{flag}={s}")),
        (_, toml::Value::Integer(i)) => Some(format!("--{flag}={i}")),
        _ => return Err(bad("a string or an integer")),
    })
}

/// The arg id a key sets in the subcommand's matches (`force_raw` is the `no_force_raw` switch).
fn arg_id(key: &str) -> &str {
    if key == "force_raw" {
        "no_force_raw"
    } else {
        key
    }
}

/// True if the subcommand `sub` has an argument with this id.
fn has_arg(sub: &str, id: &str) -> bool {
    let cmd = Cli::command();
    cmd.get_arguments().any(|a| a.get_id() == id)
        || cmd
            .find_subcommand(sub)
            .is_some_and(|s| s.get_arguments().any(|a| a.get_id() == id))
}

/// Where a setting's value came from.
pub fn source_of(m: &ArgMatches, id: &str) -> Option<ValueSource> {
    m.try_get_raw(id).ok().flatten()?;
    m.value_source(id)
}

/// Adds the file's values as flags for the settings the command line and environment left at
/// their defaults, right after the subcommand name.
pub fn inject(
    argv: &[OsString],
    matches: &ArgMatches,
    file: &File,
) -> Result<Vec<OsString>, UsageError> {
    let Some((sub, sub_m)) = matches.subcommand() else {
        return Ok(argv.to_vec());
    };
    let mut extra = Vec::new();
    for (key, value) in &file.values {
        let id = arg_id(key);
        if !has_arg(sub, id) {
            continue;
        }
        let set_by_user = matches!(
            source_of(sub_m, id),
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
        );
        if set_by_user {
            continue;
        }
        if let Some(flag) = as_flag(key, value, &file.path)? {
            extra.push(OsString::from(flag));
        }
    }
    let at = argv
        .iter()
        .position(|a| a == sub)
        .map_or(argv.len(), |i| i + 1);
    let mut out = argv[..at].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[at..]);
    Ok(out)
}

/// The `--config` value, read from the raw arguments before clap runs (the file changes how the
/// rest is parsed).
pub fn explicit_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The effective value of every key and where it came from, for `config show`. `matches` are
/// the command line's (before the file was applied); `file` the configuration file, if any.
pub fn effective(matches: &ArgMatches, file: Option<&File>) -> Report {
    let cmd = Cli::command();
    let settings: Vec<Setting> = KEYS
        .iter()
        .filter_map(|key| {
            let id = arg_id(key);
            let arg = cmd
                .get_arguments()
                .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
                .find(|a| a.get_id() == id)?;
            let (value, source) = value_and_source(key, arg, matches, file);
            Some(Setting { key, value, source })
        })
        .collect();
    let value = |key: &str| {
        settings
            .iter()
            .find(|s| s.key == key)
            .and_then(|s| s.value.clone())
    };
    let auth = crate::openstack::describe_auth(&crate::openstack::Flags {
        cloud: value("os_cloud"),
        glance_url: value("glance_url"),
        ..Default::default()
    });
    Report {
        config_file: file.map(|f| f.path.display().to_string()),
        auth,
        settings,
    }
}

/// Defaults that live outside clap: the catalog interface, and what the Ceph tools use when
/// imgcache passes nothing (`CEPH_CONF`, `CEPH_ARGS`, then Ceph's own defaults).
fn implicit(key: &str) -> Option<(String, String)> {
    let ceph_arg = |names: &[&str]| {
        let args = std::env::var("CEPH_ARGS").ok()?;
        let words: Vec<&str> = args.split_whitespace().collect();
        words.iter().enumerate().find_map(|(i, w)| {
            names.iter().find_map(|n| {
                w.strip_prefix(&format!("{n}="))
                    .map(str::to_owned)
                    .or_else(|| (w == n).then(|| words.get(i + 1).map(|v| v.to_string()))?)
            })
        })
    };
    match key {
        "os_interface" => Some(("public".into(), "default".into())),
        "ceph_conf" => match std::env::var("CEPH_CONF").ok().filter(|v| !v.is_empty()) {
            Some(v) => Some((v, "env:CEPH_CONF".into())),
            None => Some((
                crate::rbd::DEFAULT_CEPH_CONF.into(),
                "default (Ceph's)".into(),
            )),
        },
        "ceph_id" => match ceph_arg(&["--id", "-i"]) {
            Some(v) => Some((v, "env:CEPH_ARGS".into())),
            None => ceph_arg(&["--name", "-n"])
                .map(|n| (n, "env:CEPH_ARGS".into()))
                .or_else(|| Some(("admin".into(), "default (Ceph's)".into()))),
        },
        "ceph_keyring" => ceph_arg(&["--keyring", "-k"]).map(|v| (v, "env:CEPH_ARGS".into())),
        _ => None,
    }
}

/// [`raw_value_and_source`], with a password in a URL setting redacted.
fn value_and_source(
    key: &str,
    arg: &clap::Arg,
    matches: &ArgMatches,
    file: Option<&File>,
) -> (Option<String>, String) {
    let (value, source) = raw_value_and_source(key, arg, matches, file);
    (value.map(|v| crate::http::redact_url(&v)), source)
}

/// Flag > environment > file > default, as clap and [`inject`] apply them.
fn raw_value_and_source(
    key: &str,
    arg: &clap::Arg,
    matches: &ArgMatches,
    file: Option<&File>,
) -> (Option<String>, String) {
    let id = arg_id(key);
    if matches!(source_of(matches, id), Some(ValueSource::CommandLine)) {
        let value = matches
            .get_raw(id)
            .and_then(|mut v| v.next())
            .map(|v| v.to_string_lossy().into_owned());
        return (value, "flag".to_owned());
    }
    let env = arg
        .get_env()
        .map(|e| e.to_string_lossy().into_owned())
        .filter(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty()));
    if let Some(var) = env {
        return (std::env::var(&var).ok(), format!("env:{var}"));
    }
    if let Some((f, v)) = file.and_then(|f| f.values.get(key).map(|v| (f, v))) {
        let value = match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        return (Some(value), format!("file:{}", f.path.display()));
    }
    let default: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if key == "force_raw" {
        (Some("true".into()), "default".into())
    } else if let Some((value, source)) = implicit(key) {
        (Some(value), source)
    } else if arg.get_action().takes_values() && default.is_empty() {
        (None, "unset".into())
    } else if default.is_empty() {
        (Some("false".into()), "default".into())
    } else {
        (Some(default.join(",")), "default".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_secret_keys_are_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "lock_timeot = \"5m\"\n").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown key \"lock_timeot\""), "{e}");
        std::fs::write(&p, "token = \"x\"\n").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("secret"));
        std::fs::write(&p, "retries = 5\nforce_raw = false\n").unwrap();
        let f = load(&p).unwrap();
        assert_eq!(
            as_flag("retries", &f.values["retries"], &p)
                .unwrap()
                .as_deref(),
            Some("--retries=5")
        );
        assert_eq!(
            as_flag("force_raw", &f.values["force_raw"], &p)
                .unwrap()
                .as_deref(),
            Some("--no-force-raw")
        );
    }

    #[test]
    fn every_key_is_a_real_flag_somewhere() {
        let cmd = Cli::command();
        for key in KEYS {
            let id = arg_id(key);
            let found = cmd.get_arguments().any(|a| a.get_id() == id)
                || cmd
                    .get_subcommands()
                    .any(|s| s.get_arguments().any(|a| a.get_id() == id));
            assert!(found, "{key}");
        }
    }
}
