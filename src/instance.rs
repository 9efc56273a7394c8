//! Instance directories under `instances_path`: name checks that keep every path inside it, the
//! instance's lock, the usage record (`imgcache.json`) that tells prune which `_base` entries an
//! instance needs, and Nova's `disk.info`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::{self, Cache};
use crate::error::UsageError;
use crate::fsutil;
use crate::lock::{self, FileLock};
use crate::progress::Reporter;

/// The usage record in each instance directory.
pub const RECORD_FILE: &str = "imgcache.json";
/// Nova's per-instance map of disk path → format.
pub const DISK_INFO_FILE: &str = "disk.info";

/// One instance directory.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub dir: PathBuf,
    lock_path: PathBuf,
}

impl Instance {
    /// Checks the name (same rules as image ids, and not one of the cache's own directories)
    /// and builds the path. Nothing is created.
    pub fn resolve(cache: &Cache, name: &str) -> Result<Instance> {
        cache::validate_id("instance name", name)?;
        let base_name = cache
            .base_dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == base_name || name == "locks" {
            return Err(UsageError(format!(
                "invalid instance name {name:?}: it is the cache's own directory; pass the instance's UUID"
            ))
            .into());
        }
        Ok(Instance {
            name: name.to_owned(),
            dir: cache.instances_dir().join(name),
            lock_path: cache.instance_lock_path(name),
        })
    }

    /// Takes the instance's lock (create and delete hold it), waiting up to `timeout`.
    pub fn lock(&self, timeout: Duration, rep: &dyn Reporter) -> Result<FileLock, lock::Error> {
        lock::acquire(
            &self.lock_path,
            lock::Style::Flock,
            &format!("instance {}", self.name),
            timeout,
            rep,
        )
    }

    /// Creates the directory if missing. Returns true if this call created it. A symlink or a
    /// non-directory at the path is refused: an instance directory never leads elsewhere.
    pub fn ensure_dir(&self) -> Result<bool> {
        match fsutil::stat(&self.dir) {
            Ok(Some(m)) if m.is_dir() => Ok(false),
            Ok(Some(m)) if m.file_type().is_symlink() => Err(UsageError(format!(
                "{} is a symlink; instance directories must be real directories inside the instances path",
                self.dir.display()
            ))
            .into()),
            Ok(Some(_)) => Err(UsageError(format!(
                "{} exists and is not a directory; remove it or pick another instance name",
                self.dir.display()
            ))
            .into()),
            Ok(None) => fsutil::create_dir(&self.dir)
                .with_context(|| format!("cannot create {}", self.dir.display())),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot stat {}", self.dir.display()))),
        }
    }

    /// Path of a file in the instance directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes `.<name>.tmp-<random>` files a killed run left (call under the instance lock).
    pub fn remove_stale_temps(&self) {
        for (name, path, meta) in fsutil::list(&self.dir).unwrap_or_default() {
            let ours = name.starts_with('.') && name.contains(".tmp-");
            if ours && meta.is_file() {
                let _ = fsutil::remove_file(&path);
            }
        }
    }

    /// Reads the usage record, if any.
    pub fn read_record(&self) -> Option<Record> {
        read_record(&self.dir)
    }

    /// Writes the usage record atomically.
    pub fn write_record(&self, record: &Record) -> Result<()> {
        write_json(&self.file(RECORD_FILE), record)
    }

    /// Removes the directory if it is empty (a failed create that made it).
    pub fn remove_if_empty(&self) {
        let _ = fsutil::remove_empty_dir(&self.dir);
    }

    /// Writes Nova's `disk.info`: `{"<absolute disk path>": "raw"|"qcow2"}`.
    pub fn write_disk_info(&self, disks: &BTreeMap<String, DiskRecord>) -> Result<()> {
        let map: BTreeMap<String, &str> = disks
            .iter()
            .filter(|(_, d)| d.format == "raw" || d.format == "qcow2")
            .map(|(name, d)| {
                (
                    self.file(name).to_string_lossy().into_owned(),
                    d.format.as_str(),
                )
            })
            .collect();
        write_json(&self.file(DISK_INFO_FILE), &map)
    }
}

/// Reads `dir/imgcache.json` (bounded, regular files only).
pub fn read_record(dir: &Path) -> Option<Record> {
    fsutil::read_json(&dir.join(RECORD_FILE))
}

/// What an instance uses, written by `create`, read by `prune`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub instance: String,
    /// `_base` entry names this instance needs (images, kernels, ramdisks, templates).
    pub bases: Vec<String>,
    /// Disk file name in the instance directory → what it is.
    pub disks: BTreeMap<String, DiskRecord>,
    pub updated_at: String,
}

/// One file `create` placed in an instance directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskRecord {
    /// `raw`, `qcow2`, or `file` for kernels and ramdisks.
    pub format: String,
    pub size: u64,
    /// The `_base` entry it was made from.
    pub base: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// For rbd disks: the clone, `pool/image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<String>,
}

/// Writes JSON to `path` atomically (temp file, fsync, rename, fsync dir).
fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    fsutil::write_json(path, value).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_or_collide_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path(), "_base").unwrap();
        for bad in ["..", ".", "a/b", "_base", "locks", ""] {
            assert!(Instance::resolve(&cache, bad).is_err(), "{bad:?}");
        }
        let i = Instance::resolve(&cache, "0b7c6d1e").unwrap();
        assert_eq!(i.dir, dir.path().join("0b7c6d1e"));
    }

    #[test]
    fn symlinked_instance_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("evil")).unwrap();
        let cache = Cache::new(dir.path(), "_base").unwrap();
        let i = Instance::resolve(&cache, "evil").unwrap();
        let e = i.ensure_dir().unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
    }
}
