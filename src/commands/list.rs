//! `imgcache list`: every `_base` entry with its type, image, formats, sizes, last use and
//! number of users; totals. A table for people, `--json` for scripts.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde::Serialize;

use super::Outcome;
use crate::cache::{Cache, Record};
use crate::progress::{self, Render, printable};
use crate::scan::{self, Usage};
use crate::units::{ago, human, idle, rfc3339, unix_secs};

/// What to list.
#[derive(Debug)]
pub struct Request {
    pub cache: Cache,
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    image_id: Option<String>,
    image_name: Option<String>,
    source_format: Option<String>,
    format: Option<String>,
    size: u64,
    allocated: u64,
    last_used: String,
    idle_seconds: u64,
    users: usize,
    /// The certificate that verified the image's signature (`--verify-signatures`).
    signature_certificate: Option<String>,
}

#[derive(Serialize)]
struct Listing {
    entries: Vec<Row>,
    temps: Vec<Row>,
    total_size: u64,
    total_allocated: u64,
    instances: usize,
}

/// Runs the command.
pub fn run(req: Request) -> Result<Outcome> {
    let usage = scan::scan_usage(&req.cache, &[])?;
    let base = scan::scan_base(&req.cache)?;
    let rows = Rows {
        usage: &usage,
        now: SystemTime::now(),
    };
    let entries: Vec<Row> = base
        .entries
        .iter()
        .map(|e| {
            rows.row(
                &e.name,
                e.kind.name(),
                &e.path,
                (e.size, e.allocated),
                e.mtime,
                e.record.as_ref(),
            )
        })
        .collect();
    let temps: Vec<Row> = base
        .temps
        .iter()
        .map(|t| {
            rows.row(
                &t.file,
                "temp",
                &t.path,
                (t.size, t.allocated),
                t.mtime,
                None,
            )
        })
        .collect();
    let listing = Listing {
        total_size: entries.iter().chain(&temps).map(|r| r.size).sum(),
        total_allocated: entries.iter().chain(&temps).map(|r| r.allocated).sum(),
        instances: usage.instances,
        entries,
        temps,
    };
    progress::print(&listing, req.json)?;
    Ok(Outcome::Success)
}

/// Builds rows against one usage scan and one clock reading.
struct Rows<'a> {
    usage: &'a Usage,
    now: SystemTime,
}

impl Rows<'_> {
    fn row(
        &self,
        name: &str,
        kind: &'static str,
        path: &Path,
        (size, allocated): (u64, u64),
        mtime: SystemTime,
        rec: Option<&Record>,
    ) -> Row {
        Row {
            name: name.to_owned(),
            kind,
            path: path.display().to_string(),
            image_id: rec.map(|r| r.image_id.clone()),
            image_name: rec.and_then(|r| r.name.clone()),
            source_format: rec.map(|r| r.source_format.clone()),
            format: rec.map(|r| r.format.clone()),
            size,
            allocated,
            last_used: rfc3339(unix_secs(mtime)),
            idle_seconds: idle(self.now, mtime).as_secs(),
            users: self.usage.count(name),
            signature_certificate: rec.and_then(|r| r.signature_certificate.clone()),
        }
    }
}

impl Render for Listing {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        // The entry column fits the longest name (a `.part` or `.info` is longer than a sha1).
        let width = self
            .entries
            .iter()
            .chain(&self.temps)
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(40);
        writeln!(
            out,
            "{:<9} {:<width$} {:<36} {:<20} {:<6} {:>10} {:>10} {:>9} {:>5}  SIGNED BY",
            "TYPE", "ENTRY", "IMAGE ID", "NAME", "FROM", "SIZE", "ALLOCATED", "IDLE", "USERS"
        )?;
        for r in self.entries.iter().chain(&self.temps) {
            writeln!(
                out,
                "{:<9} {:<width$} {:<36} {:<20} {:<6} {:>10} {:>10} {:>9} {:>5}  {}",
                r.kind,
                printable(&r.name),
                r.image_id
                    .as_deref()
                    .map(printable)
                    .unwrap_or_else(|| "-".into()),
                r.image_name
                    .as_deref()
                    .map(|n| printable(n).chars().take(20).collect::<String>())
                    .unwrap_or_else(|| "-".into()),
                r.source_format.as_deref().unwrap_or("-"),
                human(r.size),
                human(r.allocated),
                ago(Duration::from_secs(r.idle_seconds)),
                r.users,
                r.signature_certificate.as_deref().unwrap_or("-")
            )?;
        }
        writeln!(
            out,
            "{}, {}: {} apparent, {} allocated; {}",
            count(self.entries.len(), "entry", "entries"),
            count(self.temps.len(), "temp file", "temp files"),
            human(self.total_size),
            human(self.total_allocated),
            count(self.instances, "instance", "instances")
        )
    }
}

/// `1 entry`, `2 entries`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
