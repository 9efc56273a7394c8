//! `imgcache list`: every `_base` entry with its type, image, formats, sizes, last use and
//! number of users; totals. A table for people, `--json` for scripts.

use std::io::Write;
use std::time::SystemTime;

use anyhow::Result;
use serde::Serialize;

use crate::Outcome;
use crate::cache::Cache;
use crate::cli::{Global, ListArgs};
use crate::commands::prune::ago;
use crate::scan;
use crate::size::human;

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
pub fn run(global: &Global, args: ListArgs) -> Result<Outcome> {
    let cache = Cache::new(&global.instances_path, &global.base_dir_name)?;
    let usage = scan::scan_usage(&cache, &[])?;
    let base = scan::scan_base(&cache)?;
    let now = SystemTime::now();
    let row = |name: &str,
               kind: &'static str,
               path: &std::path::Path,
               size,
               allocated,
               mtime: SystemTime,
               rec: Option<&crate::cache::Record>| {
        let idle = now.duration_since(mtime).unwrap_or_default();
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
            last_used: crate::cache::rfc3339(
                mtime
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            idle_seconds: idle.as_secs(),
            users: usage.count(name),
        }
    };
    let entries: Vec<Row> = base
        .entries
        .iter()
        .map(|e| {
            row(
                &e.name,
                e.kind.name(),
                &e.path,
                e.size,
                e.allocated,
                e.mtime,
                e.record.as_ref(),
            )
        })
        .collect();
    let temps: Vec<Row> = base
        .temps
        .iter()
        .map(|t| row(&t.file, "temp", &t.path, t.size, t.allocated, t.mtime, None))
        .collect();
    let listing = Listing {
        total_size: entries.iter().chain(&temps).map(|r| r.size).sum(),
        total_allocated: entries.iter().chain(&temps).map(|r| r.allocated).sum(),
        instances: usage.instances,
        entries,
        temps,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &listing)?;
        writeln!(out)?;
        return Ok(Outcome::Success);
    }
    writeln!(
        out,
        "{:<9} {:<42} {:<36} {:<20} {:<6} {:>10} {:>10} {:>9} {:>5}",
        "TYPE", "ENTRY", "IMAGE ID", "NAME", "FROM", "SIZE", "ALLOCATED", "IDLE", "USERS"
    )?;
    for r in listing.entries.iter().chain(&listing.temps) {
        writeln!(
            out,
            "{:<9} {:<42} {:<36} {:<20} {:<6} {:>10} {:>10} {:>9} {:>5}",
            r.kind,
            r.name,
            r.image_id.as_deref().unwrap_or("-"),
            r.image_name
                .as_deref()
                .map(|n| n.chars().take(20).collect::<String>())
                .unwrap_or_else(|| "-".into()),
            r.source_format.as_deref().unwrap_or("-"),
            human(r.size),
            human(r.allocated),
            ago(std::time::Duration::from_secs(r.idle_seconds)),
            r.users
        )?;
    }
    writeln!(
        out,
        "{} entries, {} temp files: {} apparent, {} allocated; {} instance(s)",
        listing.entries.len(),
        listing.temps.len(),
        human(listing.total_size),
        human(listing.total_allocated),
        listing.instances
    )?;
    Ok(Outcome::Success)
}
