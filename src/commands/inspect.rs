//! `imgcache inspect FILE`: the inspector every download goes through, on a local file.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::{Outcome, kind_of};
use crate::error::{self, UsageError};
use crate::fetch;
use crate::inspect::{self, Format, Limits};
use crate::progress::{self, Render};
use crate::qemu_img;

/// What to inspect, resolved from the command line.
#[derive(Debug)]
pub struct Request {
    pub file: PathBuf,
    /// The disk_format it will be (or was) uploaded as.
    pub declared: Option<Format>,
    pub limits: Limits,
    /// Ask qemu-img for a second opinion.
    pub qemu_img: bool,
    pub json: bool,
}

#[derive(Serialize)]
struct Verdict {
    path: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Render for Verdict {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.ok {
            writeln!(
                out,
                "{}: ok: {}, virtual size {}",
                self.path,
                self.format.unwrap_or("?"),
                self.virtual_size
                    .map_or("unknown".into(), |v| v.to_string())
            )
        } else {
            writeln!(
                out,
                "{}: refused: {}",
                self.path,
                self.error.as_deref().unwrap_or("")
            )
        }
    }
}

/// Runs the command.
pub fn run(mut req: Request) -> Result<Outcome> {
    if !req.file.is_file() {
        return Err(UsageError(format!("{} is not a file", req.file.display())).into());
    }
    // The operator's own path: a symlink they name is followed here, once, on purpose.
    let shown = req.file.display().to_string();
    req.file = std::fs::canonicalize(&req.file)
        .map_err(|e| UsageError(format!("cannot resolve {shown}: {e}")))?;
    let path = shown;
    let (verdict, outcome) = match examine(&req) {
        Ok(r) => (
            Verdict {
                path,
                ok: true,
                format: Some(r.format.name()),
                virtual_size: r.virtual_size,
                error: None,
            },
            Outcome::Success,
        ),
        Err(e) => (
            Verdict {
                path,
                ok: false,
                format: None,
                virtual_size: None,
                error: Some(error::chain(&e)),
            },
            Outcome::Partial(kind_of(&e).exit_code()),
        ),
    };
    progress::print(&verdict, req.json)?;
    Ok(outcome)
}

/// The inspector's verdict, the declared format's, and qemu-img's.
fn examine(req: &Request) -> Result<inspect::Report> {
    let report = inspect::inspect_path_with(&req.file, &req.limits)?;
    if let Some(d) = req.declared {
        inspect::check_declared(d, report.format)?;
    }
    if req.qemu_img && report.format != Format::Luks {
        let info = qemu_img::info(&req.file, report.format.qemu_name())?;
        fetch::second_opinion(&report, &info)?;
    }
    Ok(report)
}
