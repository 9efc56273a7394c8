//! Prune's actions on the cache, each under the lock of the entry it touches and re-checked
//! there: entries (through [`crate::cache::Entry::remove_under_lock`]), stale temp files, and
//! lock files whose entry or instance is gone.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::decide;
use super::report::Action;
use crate::cache::{self, Cache, Removal, Wait};
use crate::fsutil;
use crate::lock;
use crate::scan;

pub struct Pruner<'a> {
    pub cache: &'a Cache,
    pub dry_run: bool,
    pub scan_start: SystemTime,
    pub now: SystemTime,
    pub freed: u64,
}

impl Pruner<'_> {
    /// Removes an entry and its record under its lock, if it is still there and was not touched
    /// since `scan_start - min_age`.
    pub fn remove_entry(&mut self, e: &scan::Entry, min_age: Duration) -> Result<Action> {
        let entry = self.cache.entry(&e.name);
        if self.dry_run {
            return Ok(self.would_remove(&entry, e.allocated));
        }
        let (scan_start, now) = (self.scan_start, self.now);
        let removal = entry.remove_under_lock(&format!("entry {}", e.name), Wait::No, |m| {
            m.modified()
                .is_ok_and(|mtime| decide::still_old(mtime, scan_start, now, min_age))
        })?;
        Ok(match removal {
            Removal::Removed => {
                self.freed += e.allocated;
                Action::Removed
            }
            Removal::Busy => Action::Busy,
            Removal::Changed => Action::Kept,
        })
    }

    /// Removes a stale temp file under its entry's lock (nobody is writing it then).
    pub fn remove_temp(&mut self, t: &scan::Temp) -> Result<Action> {
        let entry = self.cache.entry(&t.entry);
        if self.dry_run {
            return Ok(self.would_remove(&entry, t.allocated));
        }
        // Both locks: a temp whose imgcache or Nova lock is held is someone's download or
        // conversion in progress (nova-compute writes its `.part` under `locks/nova-<name>`).
        let Some(lock) = entry.try_lock()? else {
            return Ok(Action::Busy);
        };
        if !fsutil::exists(&t.path) {
            return Ok(Action::Kept);
        }
        // Under both locks nobody that follows either protocol is writing it: a stale temp,
        // whoever made it (a killed nova-compute's `.part` too). Removing never follows.
        if !fsutil::remove_file(&t.path)
            .with_context(|| format!("cannot remove {}", t.path.display()))?
        {
            return Ok(Action::Kept);
        }
        if !fsutil::exists(&entry.path()) {
            // No entry left to protect: our lock file goes too (same rule as remove_entry).
            lock.remove_ours();
        }
        self.freed += t.allocated;
        Ok(Action::Removed)
    }

    /// Removes a record whose entry is gone, under the entry's locks, if the entry is still
    /// absent there (a fetch in progress writes the record under those locks).
    pub fn remove_orphan(&mut self, t: &scan::Temp) -> Result<Action> {
        let entry = self.cache.entry(&t.entry);
        if self.dry_run {
            return Ok(self.would_remove(&entry, t.allocated));
        }
        let Some(lock) = entry.try_lock()? else {
            return Ok(Action::Busy);
        };
        if fsutil::exists(&entry.path()) || !fsutil::is_regular(&t.path) {
            return Ok(Action::Kept);
        }
        fsutil::remove_file(&t.path)
            .with_context(|| format!("cannot remove {}", t.path.display()))?;
        if !fsutil::exists(&entry.part_path()) && !fsutil::exists(&entry.converted_path()) {
            lock.remove_ours();
        }
        self.freed += t.allocated;
        Ok(Action::Removed)
    }

    /// `--dry-run`: busy if the entry's lock is held, else it would go (counted as freed).
    fn would_remove(&mut self, entry: &cache::Entry<'_>, allocated: u64) -> Action {
        if entry.is_locked() {
            return Action::Busy;
        }
        self.freed += allocated;
        Action::WouldRemove
    }

    /// True if the entry or instance a lock file (`name` after the prefix) guards is gone.
    fn guards_nothing(&self, name: &str) -> bool {
        match name.strip_prefix(cache::INSTANCE_LOCK_PREFIX) {
            Some(inst) => !fsutil::exists(&self.cache.instances_dir().join(inst)),
            None => {
                let e = self.cache.entry(name);
                !fsutil::exists(&e.path())
                    && !fsutil::exists(&e.part_path())
                    && !fsutil::exists(&e.converted_path())
            }
        }
    }

    /// Removes lock files whose entry (or instance) no longer exists, under the lock itself.
    pub fn sweep_locks(&mut self) -> Result<usize> {
        let Ok(items) = fsutil::list(self.cache.locks_dir()) else {
            return Ok(0);
        };
        let mut removed = 0;
        for (file, path, meta) in items {
            let Some(name) = file.strip_prefix(cache::LOCK_PREFIX) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if !self.guards_nothing(name) {
                continue;
            }
            if self.dry_run {
                removed += usize::from(!lock::is_held(&path, lock::Style::Flock));
                continue;
            }
            let Some(lock) = lock::try_acquire(&path, lock::Style::Flock)? else {
                continue;
            };
            // Re-check under the lock: someone may have created the entry meanwhile.
            if self.guards_nothing(name) && lock.is_current() {
                let _ = fsutil::remove_file(lock.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}
