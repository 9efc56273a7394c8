//! `imgcache inspect FILE`: the inspector every download goes through, on a local file.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use crate::Outcome;
use crate::cli::InspectArgs;
use crate::error::{self, UsageError};
use crate::fetch;
use crate::inspect::{self, Format, Limits};
use crate::qemu_img;

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

/// Runs the command.
pub fn run(args: InspectArgs) -> Result<Outcome> {
    let declared = match &args.declared {
        None => None,
        Some(d) => Some(Format::parse(d).ok_or_else(|| {
            UsageError(format!(
                "invalid --declared {d:?}; use one of raw, qcow2, vmdk, vhd, vhdx, vdi, iso"
            ))
        })?),
    };
    let limits = Limits {
        max_virtual_size: crate::size::parse("--max-virtual-size", &args.max_virtual_size)?,
        allow_luks: args.allow_luks,
    };
    if !args.file.is_file() {
        return Err(UsageError(format!("{} is not a file", args.file.display())).into());
    }
    let result = (|| -> Result<inspect::Report> {
        let report = inspect::inspect_path_with(&args.file, &limits)?;
        if let Some(d) = declared {
            inspect::check_declared(d, report.format)?;
        }
        if !args.no_qemu_img && report.format != Format::Luks {
            let info = qemu_img::info(&args.file, report.format.qemu_name())?;
            fetch::second_opinion(&report, &info)?;
        }
        Ok(report)
    })();
    let path = args.file.display().to_string();
    let (verdict, outcome) = match &result {
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
                error: Some(crate::commands::fetch::one_line(e)),
            },
            Outcome::Partial(error::kind_of(e).exit_code()),
        ),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &verdict)?;
        writeln!(out)?;
    } else if verdict.ok {
        writeln!(
            out,
            "{}: ok: {}, virtual size {}",
            verdict.path,
            verdict.format.unwrap_or("?"),
            verdict
                .virtual_size
                .map_or("unknown".into(), |v| v.to_string())
        )?;
    } else {
        writeln!(
            out,
            "{}: refused: {}",
            verdict.path,
            verdict.error.as_deref().unwrap_or("")
        )?;
    }
    Ok(outcome)
}
