//! `imgcache prune`: removes what no instance uses — entries past their age, then least
//! recently used ones until the cache fits `--max-size` — plus stale temp files and lock files
//! of entries that are gone, and (with a Ceph cluster) unused imported RBD images. Safe beside
//! `fetch`/`create`: every deletion takes the entry's lock and re-checks, under it, that the
//! entry was not touched since the usage scan began. The decisions are in [`decide`], the
//! actions in [`remove`].

mod decide;
mod rbd;
mod remove;
mod report;

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::Outcome;
use crate::cache::{self, Cache};
use crate::fsutil;
use crate::progress::{self, Reporter};
use crate::rbd::Cluster;
use crate::scan::{self, Usage};
use crate::units::{Reserve, ago, human, idle};
pub use decide::Ages;
use decide::{Survivor, Verdict};
use remove::Pruner;
use report::{Action, Item, Report};

/// Exit code when the entries in use alone exceed `--max-size`.
pub const OVER_MAX_SIZE: u8 = 13;

/// What to prune, resolved from the command line.
#[derive(Debug)]
pub struct Request {
    pub cache: Cache,
    pub ages: Ages,
    /// `.part` / `.converted` files untouched this long are removed.
    pub temp_age: Duration,
    /// Bytes, or a percentage of the cache filesystem's size (`80%`).
    pub max_size: Option<Reserve>,
    /// Image ids to treat as in use.
    pub keep: Vec<String>,
    /// A file (`-` = stdin) with more ids to keep.
    pub keep_from: Option<String>,
    pub dry_run: bool,
    pub json: bool,
    pub quiet: bool,
    /// The images pool pass runs when a cluster is given.
    pub rbd: Option<Cluster>,
}

/// Runs the command.
pub fn run(req: Request, rep: &dyn Reporter) -> Result<Outcome> {
    let keep = kept_ids(&req)?;
    let cache = &req.cache;
    if fsutil::stat(cache.base_dir())?.is_some_and(|m| m.is_dir()) && !req.dry_run {
        cache.ensure_dirs()?;
    }
    // The usage scan starts the clock: an entry touched after this instant may have gained a
    // user the scan did not see, so it is never removed by this run.
    let scan_start = SystemTime::now();
    let usage = scan::scan_usage(cache, &keep)?;
    let base = scan::scan_base(cache)?;
    warn_usage(&usage, rep);
    if !req.dry_run {
        touch_in_use(&base.entries, &usage);
    }
    let mut pruner = Pruner {
        cache,
        dry_run: req.dry_run,
        scan_start,
        now: SystemTime::now(),
        freed: 0,
    };
    let allocated_before: u64 = base.entries.iter().map(|e| e.allocated).sum::<u64>()
        + base.temps.iter().map(|t| t.allocated).sum::<u64>();
    let mut entries = age_pass(&req, &mut pruner, &base.entries, &usage)?;
    let max_size = match req.max_size {
        Some(Reserve::Bytes(b)) => Some(b),
        Some(r) => Some(r.of(filesystem_size(cache)?)),
        None => None,
    };
    let over = match max_size {
        Some(max) if usage.doubts.is_empty() => {
            size_pass(&mut pruner, &base.entries, &usage, &mut entries, max)?
        }
        _ => false,
    };
    let mut temps = temp_pass(&req, &mut pruner, &base.temps)?;
    temps.extend(orphan_pass(&mut pruner, &base.orphans)?);
    let lock_files_removed = pruner.sweep_locks()?;
    let rbd = match &req.rbd {
        Some(cluster) => {
            let ages = (req.ages.original, req.temp_age);
            rbd::pass(cluster, ages, req.dry_run, &mut pruner.freed)?
        }
        None => Vec::new(),
    };
    let report = Report {
        dry_run: req.dry_run,
        instances_scanned: usage.instances,
        entries,
        temps,
        rbd,
        lock_files_removed,
        lock_files_removed_json: (!req.dry_run).then_some(lock_files_removed),
        lock_files_would_remove: req.dry_run.then_some(lock_files_removed),
        freed_bytes: pruner.freed,
        allocated_before,
        allocated_after: allocated_before.saturating_sub(pruner.freed),
        max_size,
        over_max_size: over,
        warnings: usage.warnings.clone(),
        quiet: req.quiet,
    };
    progress::print(&report, req.json)?;
    if over {
        rep.warn(&format!(
            "entries in use alone exceed --max-size {}: {} remain",
            max_size.map(human).unwrap_or_default(),
            human(report.allocated_after)
        ));
        return Ok(Outcome::Partial(OVER_MAX_SIZE));
    }
    Ok(Outcome::Success)
}

/// `--keep` and `--keep-from`, checked.
fn kept_ids(req: &Request) -> Result<Vec<String>> {
    let mut keep = Vec::new();
    for id in &req.keep {
        cache::validate_id("image id in --keep", id)?;
        keep.push(id.clone());
    }
    if let Some(path) = &req.keep_from {
        keep.extend(scan::read_keep_file(path)?);
    }
    Ok(keep)
}

/// The age pass: one item per entry, in use / too young / removed (or busy).
fn age_pass(
    req: &Request,
    pruner: &mut Pruner<'_>,
    entries: &[scan::Entry],
    usage: &Usage,
) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for e in entries {
        let min_age = req.ages.for_type(e.kind);
        let idle = idle(pruner.now, e.mtime);
        let (action, reason) = match decide::verdict(usage.in_use(&e.name), idle, min_age) {
            Verdict::InUse => (
                Action::Kept,
                format!("in use by {}", users_text(usage, &e.name)),
            ),
            Verdict::TooYoung => (
                Action::Kept,
                format!("unused for {}, younger than {}", ago(idle), ago(min_age)),
            ),
            Verdict::Expired if !usage.doubts.is_empty() => (
                Action::Kept,
                format!(
                    "unused for {}, but kept: some disks could not be read",
                    ago(idle)
                ),
            ),
            Verdict::Expired => (
                pruner.remove_entry(e, min_age)?,
                format!("unused for {}", ago(idle)),
            ),
        };
        items.push(item(e, usage, idle, action, reason));
    }
    Ok(items)
}

/// The size pass: least recently used unused survivors go until the cache fits `max`.
/// Returns true if it still does not (the entries in use alone exceed it).
fn size_pass(
    pruner: &mut Pruner<'_>,
    entries: &[scan::Entry],
    usage: &Usage,
    items: &mut [Item],
    max: u64,
) -> Result<bool> {
    // Items and entries are in the same order: one item per entry.
    let survivors: Vec<usize> = (0..entries.len())
        .filter(|&i| matches!(items[i].action, Action::Kept | Action::Busy))
        .collect();
    let view: Vec<Survivor> = survivors
        .iter()
        .map(|&i| Survivor {
            allocated: entries[i].allocated,
            mtime: entries[i].mtime,
            in_use: usage.in_use(&entries[i].name),
        })
        .collect();
    let mut total: u64 = view.iter().map(|s| s.allocated).sum();
    for k in decide::lru_order(&view) {
        if total <= max {
            break;
        }
        let i = survivors[k];
        let e = &entries[i];
        let action = pruner.remove_entry(e, Duration::ZERO)?;
        if action != Action::Busy {
            total = total.saturating_sub(e.allocated);
            items[i].action = action;
            items[i].reason = format!(
                "least recently used (idle {}) while the cache exceeds --max-size {}",
                ago(idle(pruner.now, e.mtime)),
                human(max)
            );
        }
    }
    Ok(total > max)
}

/// Temp files: stale and not being written (their entry's lock is free) are removed.
fn temp_pass(req: &Request, pruner: &mut Pruner<'_>, temps: &[scan::Temp]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for t in temps {
        let idle = idle(pruner.now, t.mtime);
        let mut it = Item {
            name: t.file.clone(),
            kind: "temp",
            image_id: None,
            image_name: None,
            size: t.size,
            allocated: t.allocated,
            idle_seconds: idle.as_secs(),
            users: 0,
            action: Action::Kept,
            reason: format!("temp file, {} old", ago(idle)),
        };
        if idle >= req.temp_age {
            it.action = pruner.remove_temp(t)?;
            it.reason = format!("stale temp file, untouched for {}", ago(idle));
        }
        items.push(it);
    }
    Ok(items)
}

/// Records whose entry is gone (another cache manager removed it): removed under the entry's
/// locks if the entry is still absent there.
fn orphan_pass(pruner: &mut Pruner<'_>, orphans: &[scan::Temp]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for t in orphans {
        items.push(Item {
            name: t.file.clone(),
            kind: "record",
            image_id: None,
            image_name: None,
            size: t.size,
            allocated: t.allocated,
            idle_seconds: idle(pruner.now, t.mtime).as_secs(),
            users: 0,
            action: pruner.remove_orphan(t)?,
            reason: "record of an entry that is gone".into(),
        });
    }
    Ok(items)
}

fn item(e: &scan::Entry, usage: &Usage, idle: Duration, action: Action, reason: String) -> Item {
    Item {
        name: e.name.clone(),
        kind: e.kind.name(),
        image_id: e.record.as_ref().map(|r| r.image_id.clone()),
        image_name: e.record.as_ref().and_then(|r| r.name.clone()),
        size: e.size,
        allocated: e.allocated,
        idle_seconds: idle.as_secs(),
        users: usage.count(&e.name),
        action,
        reason,
    }
}

fn users_text(usage: &Usage, name: &str) -> String {
    match usage.users.get(name) {
        Some(u) if u.len() <= 3 => u.iter().cloned().collect::<Vec<_>>().join(", "),
        Some(u) => format!("{} instances", u.len()),
        None => "the image it was resized from".into(),
    }
}

/// Size of the filesystem holding `_base` (or the instances path), for `--max-size N%`.
fn filesystem_size(cache: &Cache) -> Result<u64> {
    let dir = if cache.base_dir().is_dir() {
        cache.base_dir()
    } else {
        cache.instances_dir()
    };
    fs2::total_space(dir).with_context(|| {
        format!(
            "cannot read the size of the filesystem of {} for --max-size",
            dir.display()
        )
    })
}

/// Says what the usage scan could not read; with doubts, that no entry is removed.
fn warn_usage(usage: &Usage, rep: &dyn Reporter) {
    for w in usage.warnings.iter().chain(&usage.doubts) {
        rep.warn(w);
    }
    if !usage.doubts.is_empty() {
        rep.warn(&format!(
            "removing no entry this run: {} disk(s) could not be read, so what they use is unknown; fix their permissions or remove them",
            usage.doubts.len()
        ));
    }
}

/// Marks in-use entries as used now, so age means "time since last in use" (as Nova).
fn touch_in_use(entries: &[scan::Entry], usage: &Usage) {
    for e in entries.iter().filter(|e| usage.in_use(&e.name)) {
        // A file deleted meanwhile is not an error; it is simply gone.
        let _ = fsutil::touch(&e.path);
    }
}
