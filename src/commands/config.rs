//! `imgcache config show`: every setting a configuration file can hold, with its effective value
//! and where it came from (worked out by `config`, which knows the command line and the file).
//! Secrets are not settings here and are never shown.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use super::Outcome;
use crate::progress::{self, Render};

/// One setting as `config show` reports it.
#[derive(Debug, Serialize)]
pub struct Setting {
    pub key: &'static str,
    pub value: Option<String>,
    /// `flag`, `env:<VAR>`, `file:<path>`, `default`, `default (Ceph's)`, or `unset`.
    pub source: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub config_file: Option<String>,
    /// The authentication a Glance command would use, in words (never a secret).
    pub auth: String,
    pub settings: Vec<Setting>,
}

impl Render for Report {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "# configuration file: {}",
            self.config_file.as_deref().unwrap_or("(none)")
        )?;
        writeln!(out, "# authentication: {}", self.auth)?;
        for r in &self.settings {
            writeln!(
                out,
                "{:<18} {:<32} {}",
                r.key,
                r.value.as_deref().unwrap_or("-"),
                r.source
            )?;
        }
        Ok(())
    }
}

/// Runs the command.
pub fn show(report: &Report, json: bool) -> Result<Outcome> {
    progress::print(report, json)?;
    Ok(Outcome::Success)
}
