//! `imgcache prune`: removes what no instance uses — entries past their age, then least
//! recently used ones until the cache fits `--max-size` — plus stale temp files and lock files
//! of entries that are gone. Safe beside `fetch`/`create`: every deletion takes the entry's lock
//! and re-checks, under it, that the entry was not touched since the usage scan began.

use std::fs;
use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde::Serialize;

use crate::Outcome;
use crate::cache::{self, Cache};
use crate::cli::{Global, PruneArgs};
use crate::lock;
use crate::progress::Reporter;
use crate::scan::{self, Entry, EntryType, Usage};
use crate::size::human;

/// Exit code when the entries in use alone exceed `--max-size`.
pub const OVER_MAX_SIZE: u8 = 13;

#[derive(Debug, Serialize)]
struct Item {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_name: Option<String>,
    size: u64,
    allocated: u64,
    /// Seconds since the entry was last used (mtime).
    idle_seconds: u64,
    users: usize,
    /// `kept`, `removed`, `would-remove`, or `busy` (locked by another process; left alone).
    action: &'static str,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Report {
    dry_run: bool,
    instances_scanned: usize,
    entries: Vec<Item>,
    temps: Vec<Item>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rbd: Vec<Item>,
    lock_files_removed: usize,
    freed_bytes: u64,
    allocated_before: u64,
    allocated_after: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_size: Option<u64>,
    over_max_size: bool,
    warnings: Vec<String>,
}

/// Runs the command.
pub fn run(global: &Global, args: PruneArgs, rep: &dyn Reporter) -> Result<Outcome> {
    let cache = Cache::new(&global.instances_path, &global.base_dir_name)?;
    let max_size = args
        .max_size
        .as_deref()
        .map(|s| crate::size::parse("--max-size", s))
        .transpose()?;
    let mut keep = Vec::new();
    for id in &args.keep {
        cache::validate_id("image id in --keep", id)?;
        keep.push(id.clone());
    }
    if let Some(path) = &args.keep_from {
        keep.extend(scan::read_keep_file(path)?);
    }

    if cache.base_dir().is_dir() && !args.dry_run {
        cache.ensure_dirs()?;
    }
    // The usage scan starts the clock: an entry touched after this instant may have gained a
    // user the scan did not see, so it is never removed by this run.
    let scan_start = SystemTime::now();
    let usage = scan::scan_usage(&cache, &keep)?;
    let base = scan::scan_base(&cache)?;
    for w in &usage.warnings {
        rep.warn(w);
    }
    if !args.dry_run {
        touch_in_use(&base.entries, &usage);
    }
    let now = SystemTime::now();
    let allocated_before: u64 = base.entries.iter().map(|e| e.allocated).sum::<u64>()
        + base.temps.iter().map(|t| t.allocated).sum::<u64>();

    let mut pruner = Pruner {
        cache: &cache,
        dry_run: args.dry_run,
        scan_start,
        now,
        freed: 0,
    };
    let mut items = Vec::new();
    let mut survivors = Vec::new();
    for e in &base.entries {
        let in_use = usage.in_use(&e.name);
        let min_age = match e.kind {
            EntryType::Image | EntryType::Kernel | EntryType::Ramdisk => args.min_age,
            EntryType::Resized | EntryType::Ephemeral | EntryType::Swap => args.min_age_resized,
        };
        let idle = idle(now, e.mtime);
        let item = if in_use {
            item(
                e,
                &usage,
                idle,
                "kept",
                format!("in use by {}", users_text(&usage, &e.name)),
            )
        } else if idle < min_age {
            item(
                e,
                &usage,
                idle,
                "kept",
                format!("unused for {}, younger than {}", ago(idle), ago(min_age)),
            )
        } else {
            let action = pruner.remove_entry(e, min_age)?;
            item(e, &usage, idle, action, format!("unused for {}", ago(idle)))
        };
        if item.action == "kept" || item.action == "busy" {
            survivors.push((e, in_use));
        }
        items.push(item);
    }

    // Size pass: least recently used first, unused entries only.
    let mut over = false;
    if let Some(max) = max_size {
        let mut total: u64 = survivors.iter().map(|(e, _)| e.allocated).sum();
        survivors.sort_by_key(|(e, _)| e.mtime);
        for (e, in_use) in &survivors {
            if total <= max {
                break;
            }
            if *in_use {
                continue;
            }
            let action = pruner.remove_entry(e, Duration::ZERO)?;
            if action != "busy" {
                total = total.saturating_sub(e.allocated);
                if let Some(it) = items.iter_mut().find(|i| i.name == e.name) {
                    it.action = action;
                    it.reason = format!(
                        "least recently used (idle {}) while the cache exceeds --max-size {}",
                        ago(idle(now, e.mtime)),
                        human(max)
                    );
                }
            }
        }
        over = total > max;
    }

    // Temp files: stale and not being written (their entry's lock is free).
    let mut temps = Vec::new();
    for t in &base.temps {
        let idle = idle(now, t.mtime);
        let mut it = Item {
            name: t.file.clone(),
            kind: "temp",
            image_id: None,
            image_name: None,
            size: t.size,
            allocated: t.allocated,
            idle_seconds: idle.as_secs(),
            users: 0,
            action: "kept",
            reason: format!("temp file, {} old", ago(idle)),
        };
        if idle >= args.temp_age {
            it.action = pruner.remove_temp(t)?;
            it.reason = format!("stale temp file, untouched for {}", ago(idle));
        }
        temps.push(it);
    }
    let lock_files_removed = pruner.sweep_locks()?;
    let rbd_items = if args.rbd.ceph_conf.is_some() {
        rbd_pass(&args, &mut pruner.freed)?
    } else {
        Vec::new()
    };

    let removed: Vec<&Item> = items
        .iter()
        .chain(temps.iter())
        .chain(rbd_items.iter())
        .filter(|i| i.action == "removed" || i.action == "would-remove")
        .collect();
    let report = Report {
        dry_run: args.dry_run,
        instances_scanned: usage.instances,
        allocated_after: allocated_before.saturating_sub(pruner.freed),
        entries: Vec::new(),
        temps: Vec::new(),
        rbd: Vec::new(),
        lock_files_removed,
        freed_bytes: pruner.freed,
        allocated_before,
        max_size,
        over_max_size: over,
        warnings: usage.warnings.clone(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let report = Report {
            entries: items,
            temps,
            rbd: rbd_items,
            ..report
        };
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for i in &removed {
            let what = match (&i.image_id, &i.image_name) {
                (Some(id), Some(n)) => format!("{}, image {id} \"{n}\"", i.kind),
                (Some(id), None) => format!("{}, image {id}", i.kind),
                _ => i.kind.to_owned(),
            };
            writeln!(
                out,
                "{} {} ({what}, {}): {}",
                if args.dry_run {
                    "would remove"
                } else {
                    "removed"
                },
                i.name,
                human(i.allocated),
                i.reason
            )?;
        }
        let verb = if args.dry_run { "would free" } else { "freed" };
        if !removed.is_empty() || lock_files_removed > 0 {
            writeln!(
                out,
                "{verb} {} in {} file(s); {} stale lock file(s) {}; cache now {}",
                human(report.freed_bytes),
                removed.len(),
                lock_files_removed,
                if args.dry_run { "to remove" } else { "removed" },
                human(report.allocated_after)
            )?;
        } else if !global.quiet {
            writeln!(
                out,
                "nothing to prune: {} entries, {}, {} instance(s) scanned",
                base.entries.len(),
                human(allocated_before),
                usage.instances
            )?;
        }
    }
    out.flush()?;
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

/// Imported RBD images (`imgcache-*` in the images pool) with no clones, idle longer than
/// `--min-age`, are unprotected, their snapshot purged, and removed; images with clones are never
/// touched (and `snap unprotect` refuses with EBUSY if a clone appeared meanwhile). Temporary
/// imports of killed runs are removed after `--temp-age`.
fn rbd_pass(args: &PruneArgs, freed: &mut u64) -> Result<Vec<Item>> {
    let rbd = crate::commands::create_rbd::client(&args.rbd);
    let pool = &args.rbd.images_pool;
    let mut items = Vec::new();
    for name in rbd.ls(pool)? {
        if !name.starts_with(crate::rbd::IMAGE_PREFIX) {
            continue;
        }
        let image = format!("{pool}/{name}");
        let tmp = name.contains(crate::rbd::TMP_INFIX);
        let info = rbd.info(&image)?.unwrap_or(serde_json::Value::Null);
        let size = info
            .get("size")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        // A temporary import killed before its metadata was set is aged by its creation time.
        let idle = match rbd.idle_seconds(&image)? {
            Some(i) => Some(i),
            None if tmp => info
                .get("create_timestamp")
                .and_then(serde_json::Value::as_str)
                .and_then(crate::rbd::parse_ctime)
                .map(|t| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                        .saturating_sub(t)
                }),
            None => None,
        };
        let mut it = Item {
            name: format!("rbd:{image}"),
            kind: if tmp { "rbd-temp" } else { "rbd" },
            image_id: None,
            image_name: None,
            size,
            allocated: size,
            idle_seconds: idle.unwrap_or(0),
            users: 0,
            action: "kept",
            reason: String::new(),
        };
        let children = if tmp {
            Vec::new()
        } else {
            rbd.children(&format!("{image}@{}", crate::rbd::SNAP))?
        };
        let threshold = if tmp { args.temp_age } else { args.min_age };
        it.users = children.len();
        if !children.is_empty() {
            it.reason = format!("{} clone(s), e.g. {}", children.len(), children[0]);
        } else if idle.is_none_or(|i| Duration::from_secs(i) < threshold) {
            it.reason = match idle {
                Some(i) => format!(
                    "unused for {}, younger than {}",
                    ago(Duration::from_secs(i)),
                    ago(threshold)
                ),
                None => "no last-use record".into(),
            };
        } else if args.dry_run {
            it.action = "would-remove";
            it.reason = format!(
                "no clones, unused for {}",
                ago(Duration::from_secs(idle.unwrap_or(0)))
            );
            *freed += size;
        } else {
            match rbd.remove_image(&image) {
                Ok(()) => {
                    it.action = "removed";
                    it.reason = format!(
                        "no clones, unused for {}",
                        ago(Duration::from_secs(idle.unwrap_or(0)))
                    );
                    *freed += size;
                }
                Err(e) if e.code() == Some(crate::rbd::EBUSY) => {
                    it.action = "busy";
                    it.reason = "a clone appeared meanwhile".into();
                }
                Err(e) => return Err(e.into()),
            }
        }
        items.push(it);
    }
    Ok(items)
}

fn item(e: &Entry, usage: &Usage, idle: Duration, action: &'static str, reason: String) -> Item {
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

/// Marks in-use entries as used now, so age means "time since last in use" (as Nova).
fn touch_in_use(entries: &[Entry], usage: &Usage) {
    for e in entries.iter().filter(|e| usage.in_use(&e.name)) {
        // A file deleted meanwhile is not an error; it is simply gone.
        let _ = fs::File::open(&e.path).and_then(|f| f.set_modified(SystemTime::now()));
    }
}

fn idle(now: SystemTime, mtime: SystemTime) -> Duration {
    now.duration_since(mtime).unwrap_or_default()
}

/// `3d 4h`, `2h 10m`, `45s`.
pub fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

struct Pruner<'a> {
    cache: &'a Cache,
    dry_run: bool,
    scan_start: SystemTime,
    now: SystemTime,
    freed: u64,
}

impl Pruner<'_> {
    /// Removes an entry and its record under its lock, if it is still there and was not touched
    /// since `scan_start - min_age`. Returns the action taken.
    fn remove_entry(&mut self, e: &Entry, min_age: Duration) -> Result<&'static str> {
        if self.dry_run {
            if lock::is_held(&self.cache.lock_path(&e.name)) {
                return Ok("busy");
            }
            self.freed += e.allocated;
            return Ok("would-remove");
        }
        let Some(lock) = lock::try_acquire(&self.cache.lock_path(&e.name))? else {
            return Ok("busy");
        };
        let deadline = self
            .scan_start
            .checked_sub(min_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let still_old = fs::symlink_metadata(&e.path)
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .is_some_and(|mtime| mtime < deadline.min(self.now));
        if !still_old {
            return Ok("kept");
        }
        remove_file(&e.path)?;
        let _ = fs::remove_file(self.cache.record_path(&e.name));
        // Deleting the lock file while holding it is safe: anyone who opened the old inode
        // notices it is no longer at the path after locking and retries (src/lock.rs).
        let _ = fs::remove_file(lock.path());
        cache::sync_dir(self.cache.base_dir())?;
        self.freed += e.allocated;
        Ok("removed")
    }

    fn remove_temp(&mut self, t: &scan::Temp) -> Result<&'static str> {
        if self.dry_run {
            if lock::is_held(&self.cache.lock_path(&t.entry)) {
                return Ok("busy");
            }
            self.freed += t.allocated;
            return Ok("would-remove");
        }
        let Some(lock) = lock::try_acquire(&self.cache.lock_path(&t.entry))? else {
            return Ok("busy");
        };
        if !t.path.exists() {
            return Ok("kept");
        }
        remove_file(&t.path)?;
        if !self.cache.entry_path(&t.entry).exists() {
            // No entry left to protect: the lock file goes too (same rule as remove_entry).
            let _ = fs::remove_file(lock.path());
        }
        self.freed += t.allocated;
        Ok("removed")
    }

    /// Removes lock files whose entry (or instance) no longer exists, under the lock itself.
    fn sweep_locks(&mut self) -> Result<usize> {
        let Ok(rd) = fs::read_dir(self.cache.locks_dir()) else {
            return Ok(0);
        };
        let mut removed = 0;
        for item in rd.flatten() {
            let file = item.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_prefix(cache::LOCK_PREFIX) else {
                continue;
            };
            let gone = || match name.strip_prefix("instance-") {
                Some(inst) => !self.cache.instances_dir().join(inst).exists(),
                None => {
                    !self.cache.entry_path(name).exists()
                        && !self.cache.part_path(name).exists()
                        && !self.cache.converted_path(name).exists()
                }
            };
            if !gone() {
                continue;
            }
            if self.dry_run {
                removed += usize::from(!lock::is_held(&item.path()));
                continue;
            }
            let Some(lock) = lock::try_acquire(&item.path())? else {
                continue;
            };
            // Re-check under the lock: someone may have created the entry meanwhile.
            if gone() && lock.is_current() {
                let _ = fs::remove_file(lock.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn remove_file(path: &std::path::Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot remove {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(ago(Duration::from_secs(45)), "45s");
        assert_eq!(ago(Duration::from_secs(600)), "10m");
        assert_eq!(ago(Duration::from_secs(3 * 3600 + 60)), "3h 1m");
        assert_eq!(ago(Duration::from_secs(2 * 86_400 + 7200)), "2d 2h");
    }
}
