//! The cache layout under `instances_path` and its typed entries: `_base/<name>` with its
//! `.part` and `.converted` temp files and its `.info` record, `locks/` with one lock file per
//! entry and per instance. An [`Entry`] knows its paths, locks itself, reads and writes its
//! record, and owns the one remove-under-lock protocol. Also image-id validation and the content
//! digest records keep.

use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::error::UsageError;
use crate::fsutil;
use crate::lock::{self, FileLock, Style};
use crate::progress::Reporter;

/// Prefix of lock file names in `locks/`, followed by the entry name.
pub const LOCK_PREFIX: &str = "imgcache-";
/// Prefix of Nova's lock files in `locks/` (oslo.concurrency's external lock with Nova's
/// `nova-` prefix), followed by the same entry name. Locked, never deleted by imgcache.
pub const NOVA_LOCK_PREFIX: &str = "nova-";
/// Prefix (after [`LOCK_PREFIX`]) of instance lock names.
pub const INSTANCE_LOCK_PREFIX: &str = "instance-";
/// Suffix of a download in progress (resumable).
pub const PART_SUFFIX: &str = ".part";
/// Suffix of a conversion in progress (never resumed: removed when found under the lock).
pub const CONVERTED_SUFFIX: &str = ".converted";
/// Suffix of the record written beside each entry.
pub const RECORD_SUFFIX: &str = ".info";

/// Checks a user-supplied image id (or any name that becomes one path component).
///
/// Accepts 1–255 bytes with no `/`, no NUL or other control characters, and not `.` or `..`.
pub fn validate_id(what: &str, id: &str) -> Result<(), UsageError> {
    let problem = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if id.contains('/') {
        Some("it contains '/'")
    } else if id.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if id == "." || id == ".." {
        Some("'.' and '..' are not names")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => {
            let fix = if what.contains("image") {
                "pass the id exactly as Glance shows it"
            } else {
                "pass a plain name (an instance's UUID), not a path"
            };
            Err(UsageError(format!("invalid {what} {id:?}: {p}; {fix}")))
        }
    }
}

/// The entry name Nova uses for an image: the hex SHA-1 of its id.
pub fn entry_name(image_id: &str) -> String {
    hex::encode(Sha1::digest(image_id.as_bytes()))
}

/// The cache directories of one `instances_path`.
#[derive(Debug, Clone)]
pub struct Cache {
    instances: PathBuf,
    base: PathBuf,
    locks: PathBuf,
}

impl Cache {
    /// Builds the layout; `instances_path` is made absolute so every printed path is too.
    pub fn new(instances_path: &Path, base_dir_name: &str) -> Result<Cache> {
        validate_id("base directory name", base_dir_name)?;
        if base_dir_name == "locks" {
            return Err(UsageError(
                "invalid base directory name \"locks\": it is the lock directory; choose another name"
                    .into(),
            )
            .into());
        }
        let instances = std::path::absolute(instances_path).with_context(|| {
            format!("cannot resolve instances path {}", instances_path.display())
        })?;
        // The operator's instances path may itself be a link; nothing below it is followed.
        fsutil::trust_root(&instances);
        Ok(Cache {
            base: instances.join(base_dir_name),
            locks: instances.join("locks"),
            instances,
        })
    }

    /// `<instances_path>`.
    pub fn instances_dir(&self) -> &Path {
        &self.instances
    }

    /// `<instances_path>/_base`.
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// `<instances_path>/locks`.
    pub fn locks_dir(&self) -> &Path {
        &self.locks
    }

    /// Creates `_base` and `locks/` if missing. Made as root under an instances path another
    /// account owns (nova), they are given to that account, so nova-compute can still create its
    /// downloads and lock files in them.
    pub fn ensure_dirs(&self) -> Result<()> {
        for dir in [&self.base, &self.locks] {
            fsutil::create_dir_like(dir, &self.instances).with_context(|| {
                format!(
                    "cannot create cache directory {}; check --instances-path and its permissions",
                    dir.display()
                )
            })?;
        }
        Ok(())
    }

    /// The entry `_base/<name>` (an image's sha1, a template's name).
    pub fn entry(&self, name: &str) -> Entry<'_> {
        Entry {
            cache: self,
            name: name.to_owned(),
        }
    }

    /// The entry of an image id (validated).
    pub fn image(&self, id: &str) -> Result<Entry<'_>, UsageError> {
        validate_id("image id", id)?;
        Ok(self.entry(&entry_name(id)))
    }

    /// The lock file `locks/imgcache-<name>`.
    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.locks.join(format!("{LOCK_PREFIX}{name}"))
    }

    /// Nova's lock file for the same entry, `locks/nova-<name>`.
    pub fn nova_lock_path(&self, name: &str) -> PathBuf {
        self.locks.join(format!("{NOVA_LOCK_PREFIX}{name}"))
    }

    /// The lock file of an instance directory.
    pub fn instance_lock_path(&self, instance: &str) -> PathBuf {
        self.lock_path(&format!("{INSTANCE_LOCK_PREFIX}{instance}"))
    }
}

/// How to get an entry's lock before removing it.
#[derive(Clone, Copy)]
pub enum Wait<'a> {
    /// Once, without waiting (prune: a held lock means "busy, leave it").
    No,
    /// Up to this long, telling the reporter if we must wait.
    Up(Duration, &'a dyn Reporter),
}

/// What a remove-under-lock did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// Another process held the lock.
    Busy,
    /// Under the lock the entry was no longer what the caller decided on (gone, replaced,
    /// touched); nothing was removed.
    Changed,
}

/// One entry of the cache: `_base/<name>` and everything that belongs to it.
#[derive(Debug, Clone)]
pub struct Entry<'c> {
    cache: &'c Cache,
    name: String,
}

impl Entry<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The entry file.
    pub fn path(&self) -> PathBuf {
        self.cache.base.join(&self.name)
    }

    /// The resumable download of the entry.
    pub fn part_path(&self) -> PathBuf {
        self.sibling(PART_SUFFIX)
    }

    /// The conversion output of the entry.
    pub fn converted_path(&self) -> PathBuf {
        self.sibling(CONVERTED_SUFFIX)
    }

    /// The record beside the entry.
    pub fn record_path(&self) -> PathBuf {
        self.sibling(RECORD_SUFFIX)
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        self.cache.base.join(format!("{}{suffix}", self.name))
    }

    /// The entry's lock file.
    pub fn lock_path(&self) -> PathBuf {
        self.cache.lock_path(&self.name)
    }

    /// Nova's lock file of the entry.
    pub fn nova_lock_path(&self) -> PathBuf {
        self.cache.nova_lock_path(&self.name)
    }

    /// True if the entry is a regular file (a symlink there is not an entry).
    pub fn exists(&self) -> bool {
        fsutil::is_regular(&self.path())
    }

    /// Takes the entry's locks — imgcache's, then Nova's — waiting up to `timeout` in all
    /// (saying once on `rep` that we wait for `what`, and for whom).
    pub fn lock(
        &self,
        what: &str,
        timeout: Duration,
        rep: &dyn Reporter,
    ) -> Result<EntryLock, lock::Error> {
        let start = Instant::now();
        let ours = lock::acquire(&self.lock_path(), Style::Flock, what, timeout, rep)?;
        let left = timeout.saturating_sub(start.elapsed());
        let nova = lock::acquire(&self.nova_lock_path(), Style::Ofd, what, left, rep)?;
        Ok(EntryLock { nova, ours })
    }

    /// Takes both locks without waiting; `Ok(None)` if someone holds either.
    pub fn try_lock(&self) -> Result<Option<EntryLock>, lock::Error> {
        let Some(ours) = lock::try_acquire(&self.lock_path(), Style::Flock)? else {
            return Ok(None);
        };
        let Some(nova) = lock::try_acquire(&self.nova_lock_path(), Style::Ofd)? else {
            return Ok(None);
        };
        Ok(Some(EntryLock { nova, ours }))
    }

    /// True if another process holds either lock. Creates nothing (for `--dry-run`).
    pub fn is_locked(&self) -> bool {
        lock::is_held(&self.lock_path(), Style::Flock)
            || lock::is_held(&self.nova_lock_path(), Style::Ofd)
    }

    /// Reads the record, if there is one and it parses.
    pub fn read_record(&self) -> Option<Record> {
        fsutil::read_json(&self.record_path())
    }

    /// Writes the record atomically (hidden temp file, fsync, rename, fsync dir).
    pub fn write_record(&self, record: &Record) -> Result<()> {
        let path = self.record_path();
        fsutil::write_json(&path, record)
            .with_context(|| format!("cannot write record {}", path.display()))
    }

    /// The one way an entry leaves the cache: take its locks (`wait`), re-check under them with
    /// `still` on what is at the path now (never a symlink: those are not entries), then remove
    /// the entry, its record and our lock file, and fsync `_base`. Deleting our lock file while
    /// holding it is safe: anyone who opened the old inode notices after locking that it is no
    /// longer at the path and retries (src/lock.rs). Nova's lock file is left: nova-compute
    /// does not re-check inodes.
    pub fn remove_under_lock(
        &self,
        what: &str,
        wait: Wait<'_>,
        still: impl FnOnce(&Metadata) -> bool,
    ) -> Result<Removal> {
        let lock = match wait {
            Wait::No => match self.try_lock()? {
                Some(l) => l,
                None => return Ok(Removal::Busy),
            },
            Wait::Up(timeout, rep) => self.lock(what, timeout, rep)?,
        };
        let path = self.path();
        let current =
            fsutil::stat(&path).with_context(|| format!("cannot stat {}", path.display()))?;
        if !current.is_some_and(|m| m.is_file() && still(&m)) {
            return Ok(Removal::Changed);
        }
        fsutil::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        let _ = fsutil::remove_file(&self.record_path());
        lock.remove_ours();
        fsutil::sync_dir(self.cache.base_dir())
            .with_context(|| format!("cannot sync {}", self.cache.base_dir().display()))?;
        Ok(Removal::Removed)
    }
}

/// Both locks of an entry (imgcache's and Nova's), released together when dropped.
#[derive(Debug)]
pub struct EntryLock {
    nova: FileLock,
    ours: FileLock,
}

impl EntryLock {
    /// Removes our lock file if it is still the one we hold (nobody can be using it for
    /// anything while we hold it; a late opener notices the unlink and retries). Nova's is kept.
    pub fn remove_ours(&self) {
        if self.ours.is_current() {
            let _ = fsutil::remove_file(self.ours.path());
        }
    }

    /// Nova's lock file, held.
    pub fn nova_path(&self) -> &Path {
        self.nova.path()
    }

    /// False if Nova's lock file is no longer the inode we hold: nova-compute's cache manager
    /// deletes `locks/nova-<name>` after removing a base, and a Nova process that comes later
    /// locks a new file — our lock no longer excludes it.
    pub fn nova_is_current(&self) -> bool {
        self.nova.is_current()
    }

    /// Takes Nova's lock again, on the file now at its path (waiting up to `timeout`).
    pub fn retake_nova(
        &mut self,
        what: &str,
        timeout: Duration,
        rep: &dyn Reporter,
    ) -> Result<(), lock::Error> {
        let path = self.nova.path().to_owned();
        self.nova = lock::acquire(&path, Style::Ofd, what, timeout, rep)?;
        Ok(())
    }
}

/// What `fetch` knows about an entry, kept in `<entry>.info` as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub image_id: String,
    pub name: Option<String>,
    /// Glance's `disk_format`.
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    /// The format the inspector found in the downloaded bytes.
    pub source_format: String,
    /// The format of the entry file itself (`raw` after conversion).
    pub format: String,
    /// Bytes Glance served (Glance's `size`).
    pub source_size: u64,
    /// The hash algorithm and value that were verified.
    pub hash_algo: String,
    pub hash_value: String,
    pub virtual_size: u64,
    /// Size of the entry file (apparent), to detect an entry that no longer matches its record.
    pub entry_size: u64,
    /// The entry's content digest (`crate::digest`: XXH3-128 with zero runs counted, written
    /// `zb64k:<hex>`; a plain hex XXH3-128 in records written before), for `verify`: the entry
    /// is derived locally from verified data, so this guards against later corruption (bit
    /// rot, truncation, edits), cheaply enough to compute for converted entries too.
    pub content_xxh3: String,
    pub fetched_at: String,
    pub fetched_at_unix: u64,
    /// Selected image properties (kernel_id, ramdisk_id, os_type, ...), as Glance sent them.
    #[serde(default)]
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// The certificate (`img_signature_certificate_uuid`) whose signature over the data was
    /// verified (`--verify-signatures`); `None` when none was checked, and in older records.
    #[serde(default)]
    pub signature_certificate: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_name_is_sha1_of_id() {
        // sha1("abc") is the FIPS 180 test vector.
        assert_eq!(
            entry_name("abc"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn ids_are_validated() {
        for ok in [
            "a",
            "0b7c6d1e-3e5f-4c3a-9a1b-2f1e0c9d8e7f",
            "x..y",
            "é",
            &"a".repeat(255),
        ] {
            assert!(validate_id("image id", ok).is_ok(), "{ok:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            (".", "'.'"),
            ("..", "'.'"),
            ("a\nb", "control"),
            ("a\0b", "control"),
            (&"a".repeat(256), "255"),
        ] {
            let err = validate_id("image id", bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.starts_with("invalid image id"), "{err}");
        }
    }
}
