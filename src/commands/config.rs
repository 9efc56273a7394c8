//! `imgcache config show`: every setting a configuration file can hold, with its effective value
//! and where it came from. Secrets are not settings here and are never shown.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;
use clap::parser::ValueSource;
use serde::Serialize;

use crate::Outcome;
use crate::cli::Cli;
use crate::config;

#[derive(Serialize)]
struct Setting {
    key: &'static str,
    value: Option<String>,
    /// `flag`, `env:<VAR>`, `file:<path>`, `default`, or `unset`.
    source: String,
}

/// Runs the command. `matches` are the command line's; `file` the configuration file, if any.
pub fn show(
    matches: &clap::ArgMatches,
    file: Option<&config::File>,
    json: bool,
) -> Result<Outcome> {
    let cmd = Cli::command();
    let mut rows = Vec::new();
    for key in config::KEYS {
        let id = if *key == "force_raw" {
            "no_force_raw"
        } else {
            key
        };
        let arg = cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
            .find(|a| a.get_id() == id);
        let Some(arg) = arg else { continue };
        let global_from_cli = matches!(
            config::source_of(matches, id),
            Some(ValueSource::CommandLine)
        );
        let env = arg
            .get_env()
            .map(|e| e.to_string_lossy().into_owned())
            .filter(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty()));
        let (value, source) = if global_from_cli {
            (
                matches
                    .get_raw(id)
                    .and_then(|mut v| v.next())
                    .map(|v| v.to_string_lossy().into_owned()),
                "flag".to_owned(),
            )
        } else if let Some(var) = env {
            (std::env::var(&var).ok(), format!("env:{var}"))
        } else if let Some(v) = file.and_then(|f| f.values.get(*key)) {
            (
                Some(match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
                format!(
                    "file:{}",
                    file.map(|f| f.path.display().to_string())
                        .unwrap_or_default()
                ),
            )
        } else {
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            if *key == "force_raw" {
                (Some("true".into()), "default".into())
            } else if arg.get_action().takes_values() && default.is_empty() {
                (None, "unset".into())
            } else if default.is_empty() {
                (Some("false".into()), "default".into())
            } else {
                (Some(default.join(",")), "default".into())
            }
        };
        rows.push(Setting { key, value, source });
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({
                "config_file": file.map(|f| f.path.display().to_string()),
                "settings": rows,
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "# configuration file: {}",
            file.map_or("(none)".into(), |f| f.path.display().to_string())
        )?;
        for r in &rows {
            writeln!(
                out,
                "{:<18} {:<32} {}",
                r.key,
                r.value.as_deref().unwrap_or("-"),
                r.source
            )?;
        }
    }
    Ok(Outcome::Success)
}
