//! `imgcache verify [ID...]`: re-hashes cached entries against the content digest recorded when
//! they were written. Reports every entry; exits 6 if any is corrupt; deletes only with
//! `--remove-corrupt`, under the entry's lock.

use std::fs;
use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use crate::Outcome;
use crate::cache::{self, Cache};
use crate::cli::{Global, VerifyArgs};
use crate::error::Kind;
use crate::progress::Reporter;
use crate::scan;

#[derive(Serialize)]
struct Item {
    name: String,
    image_id: Option<String>,
    /// `ok`, `corrupt`, `removed` (corrupt and deleted), `unverifiable` (no record), `missing`.
    status: &'static str,
    detail: String,
}

/// Runs the command.
pub fn run(global: &Global, args: VerifyArgs, rep: &dyn Reporter) -> Result<Outcome> {
    let cache = Cache::new(&global.instances_path, &global.base_dir_name)?;
    for id in &args.ids {
        cache::validate_id("image id", id)?;
    }
    let base = scan::scan_base(&cache)?;
    let wanted: Vec<String> = args.ids.iter().map(|id| cache::entry_name(id)).collect();
    let mut items = Vec::new();
    for (id, name) in args.ids.iter().zip(&wanted) {
        if !base.entries.iter().any(|e| &e.name == name) {
            items.push(Item {
                name: name.clone(),
                image_id: Some(id.clone()),
                status: "missing",
                detail: "not in the cache".into(),
            });
        }
    }
    for e in base
        .entries
        .iter()
        .filter(|e| wanted.is_empty() || wanted.contains(&e.name))
    {
        let Some(record) = &e.record else {
            items.push(Item {
                name: e.name.clone(),
                image_id: None,
                status: "unverifiable",
                detail: format!(
                    "{} has no record (template or made by another tool)",
                    e.kind.name()
                ),
            });
            continue;
        };
        rep.debug(&format!("verifying {}", e.path.display()));
        let problem = if e.size != record.entry_size {
            Some(format!(
                "size {} differs from the recorded {}",
                e.size, record.entry_size
            ))
        } else {
            match cache::content_digest(&e.path) {
                Ok(d) if d == record.content_xxh3 => None,
                Ok(d) => Some(format!(
                    "content digest {d} differs from the recorded {}",
                    record.content_xxh3
                )),
                Err(err) => Some(format!("cannot read: {err}")),
            }
        };
        let (status, detail) = match problem {
            None => ("ok", "content matches the record".to_owned()),
            Some(p) if args.remove_corrupt => {
                let _lock = cache.lock(
                    &e.name,
                    &format!("entry {}", e.name),
                    args.lock_timeout,
                    &|w| rep.info(&format!("waiting for the lock on {w}")),
                )?;
                fs::remove_file(&e.path).ok();
                fs::remove_file(cache.record_path(&e.name)).ok();
                cache::sync_dir(cache.base_dir())?;
                ("removed", format!("{p}; removed (fetch it again)"))
            }
            Some(p) => (
                "corrupt",
                format!("{p}; run `imgcache verify --remove-corrupt` and fetch it again"),
            ),
        };
        items.push(Item {
            name: e.name.clone(),
            image_id: Some(record.image_id.clone()),
            status,
            detail,
        });
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "entries": items }))?;
        writeln!(out)?;
    } else {
        for i in &items {
            writeln!(
                out,
                "{:<12} {} {}: {}",
                i.status,
                i.name,
                i.image_id.as_deref().unwrap_or("-"),
                i.detail
            )?;
        }
    }
    out.flush()?;
    let bad = items
        .iter()
        .any(|i| matches!(i.status, "corrupt" | "removed" | "missing"));
    Ok(if bad {
        Outcome::Partial(Kind::Integrity.exit_code())
    } else {
        Outcome::Success
    })
}
