//! `imgcache verify [ID...]`: re-hashes cached entries against the content digest recorded when
//! they were written. Reports every entry; exits 6 if any is corrupt; deletes only with
//! `--remove-corrupt`, under the entry's lock, and only the very file it found corrupt.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::Outcome;
use crate::cache::{self, Cache, Removal, Wait};
use crate::error::Kind;
use crate::progress::{self, Render, Reporter};
use crate::scan;

/// What to verify.
#[derive(Debug)]
pub struct Request {
    pub cache: Cache,
    /// Image ids (empty: every entry).
    pub ids: Vec<String>,
    pub remove_corrupt: bool,
    pub lock_timeout: Duration,
    pub json: bool,
}

/// The verdict on one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Corrupt,
    /// Corrupt and deleted.
    Removed,
    /// No record to compare with (a template, another tool's entry).
    Unverifiable,
    /// Asked for, not in the cache.
    Missing,
}

#[derive(Serialize)]
struct Item {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    image_id: Option<String>,
    status: Status,
    detail: String,
}

#[derive(Serialize)]
struct Report {
    entries: Vec<Item>,
    checked: usize,
    ok: usize,
    corrupt: usize,
    missing: usize,
}

impl Report {
    fn new(entries: Vec<Item>) -> Report {
        let count = |f: fn(Status) -> bool| entries.iter().filter(|i| f(i.status)).count();
        Report {
            checked: entries.len(),
            ok: count(|s| s == Status::Ok),
            corrupt: count(|s| matches!(s, Status::Corrupt | Status::Removed)),
            missing: count(|s| s == Status::Missing),
            entries,
        }
    }
}

impl Render for Report {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.entries.is_empty() {
            return writeln!(out, "nothing to verify: the cache has no entries");
        }
        for i in &self.entries {
            let status = serde_json::to_value(i.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            writeln!(
                out,
                "{:<12} {} {}: {}",
                status,
                i.name,
                i.image_id.as_deref().unwrap_or("-"),
                i.detail
            )?;
        }
        Ok(())
    }
}

/// Runs the command.
pub fn run(req: Request, rep: &dyn Reporter) -> Result<Outcome> {
    for id in &req.ids {
        cache::validate_id("image id", id)?;
    }
    let base = scan::scan_base(&req.cache)?;
    let wanted: Vec<String> = req.ids.iter().map(|id| cache::entry_name(id)).collect();
    let mut entries = Vec::new();
    for (id, name) in req.ids.iter().zip(&wanted) {
        if !base.entries.iter().any(|e| &e.name == name) {
            entries.push(Item {
                name: name.clone(),
                kind: "image",
                image_id: Some(id.clone()),
                status: Status::Missing,
                detail: "not in the cache".into(),
            });
        }
    }
    for e in base
        .entries
        .iter()
        .filter(|e| wanted.is_empty() || wanted.contains(&e.name))
    {
        entries.push(check(&req, e, rep)?);
    }
    let bad = entries.iter().any(|i| {
        matches!(
            i.status,
            Status::Corrupt | Status::Removed | Status::Missing
        )
    });
    progress::print(&Report::new(entries), req.json)?;
    Ok(if bad {
        Outcome::Partial(Kind::Integrity.exit_code())
    } else {
        Outcome::Success
    })
}

/// Verifies one entry, removing it if it is corrupt and `--remove-corrupt` was given.
fn check(req: &Request, e: &scan::Entry, rep: &dyn Reporter) -> Result<Item> {
    let Some(record) = &e.record else {
        return Ok(Item {
            name: e.name.clone(),
            kind: e.kind.name(),
            image_id: None,
            status: Status::Unverifiable,
            detail: format!(
                "{} has no record (template or made by another tool)",
                e.kind.name()
            ),
        });
    };
    rep.debug(&format!("verifying {}", e.path.display()));
    let problem = if e.size != record.entry_size {
        Some(format!(
            "size {} differs from the recorded {}",
            e.size, record.entry_size
        ))
    } else {
        let digest = crate::fsutil::open_regular(&e.path)
            .and_then(|f| crate::digest::of_file_like(&f, &record.content_xxh3));
        match digest {
            Ok(d) if d == record.content_xxh3 => None,
            Ok(d) => Some(format!(
                "content digest {d} differs from the recorded {}",
                record.content_xxh3
            )),
            Err(err) => Some(format!("cannot read: {err}")),
        }
    };
    let (status, detail) = match problem {
        None => (Status::Ok, "content matches the record".to_owned()),
        Some(p) if req.remove_corrupt => remove(req, e, p, rep)?,
        Some(p) => (
            Status::Corrupt,
            format!("{p}; run `imgcache verify --remove-corrupt` and fetch it again"),
        ),
    };
    Ok(Item {
        name: e.name.clone(),
        kind: e.kind.name(),
        image_id: Some(record.image_id.clone()),
        status,
        detail,
    })
}

/// Removes a corrupt entry under its lock, if it is still the file that was checked (a fetch
/// may have replaced it meanwhile).
fn remove(
    req: &Request,
    e: &scan::Entry,
    problem: String,
    rep: &dyn Reporter,
) -> Result<(Status, String)> {
    let checked = crate::fsutil::stat(&e.path)?.map(|m| (m.dev(), m.ino(), m.len()));
    let removal = req.cache.entry(&e.name).remove_under_lock(
        &format!("entry {}", e.name),
        Wait::Up(req.lock_timeout, rep),
        |now| checked == Some((now.dev(), now.ino(), now.len())),
    )?;
    Ok(match removal {
        Removal::Removed => (
            Status::Removed,
            format!("{problem}; removed (fetch it again)"),
        ),
        Removal::Busy | Removal::Changed => (
            Status::Corrupt,
            format!(
                "{problem}; it changed while waiting for its lock, so it was left; run verify again"
            ),
        ),
    })
}
