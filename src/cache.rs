//! The cache layout under `instances_path`: `_base/<sha1(image id)>` entries, their `.part` and
//! `.converted` temp files, the `.info` record beside each entry, and `locks/` for lock files.
//! Also owns atomic persistence (fsync file, rename, fsync directory) and image-id validation.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::error::UsageError;
use crate::lock::{self, FileLock};

/// Prefix of lock file names in `locks/`, followed by the entry name.
pub const LOCK_PREFIX: &str = "imgcache-";
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
        Some(p) => Err(UsageError(format!(
            "invalid {what} {:?}: {p}; pass the id exactly as Glance shows it",
            id
        ))),
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

    /// Creates `_base` and `locks/` if missing.
    pub fn ensure_dirs(&self) -> Result<()> {
        for dir in [&self.base, &self.locks] {
            fs::create_dir_all(dir).with_context(|| {
                format!(
                    "cannot create cache directory {}; check --instances-path and its permissions",
                    dir.display()
                )
            })?;
        }
        Ok(())
    }

    /// The entry file for a name.
    pub fn entry_path(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }

    /// The resumable download of an entry.
    pub fn part_path(&self, name: &str) -> PathBuf {
        self.base.join(format!("{name}{PART_SUFFIX}"))
    }

    /// The conversion output of an entry.
    pub fn converted_path(&self, name: &str) -> PathBuf {
        self.base.join(format!("{name}{CONVERTED_SUFFIX}"))
    }

    /// The record beside an entry.
    pub fn record_path(&self, name: &str) -> PathBuf {
        self.base.join(format!("{name}{RECORD_SUFFIX}"))
    }

    /// The lock file of an entry.
    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.locks.join(format!("{LOCK_PREFIX}{name}"))
    }

    /// Takes the entry's lock, waiting up to `timeout`; `on_wait` is told once if we must wait.
    pub fn lock(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        on_wait: &dyn Fn(&str),
    ) -> Result<FileLock, lock::Error> {
        lock::acquire(&self.lock_path(name), what, timeout, on_wait)
    }

    /// Reads the record of an entry, if there is one and it parses.
    pub fn read_record(&self, name: &str) -> Option<Record> {
        let bytes = fs::read(self.record_path(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Returns the entry's record if the entry exists and the record agrees with it (same size).
    /// An entry without a consistent record is treated as absent by `fetch`, which then rebuilds
    /// it under the lock.
    pub fn complete_entry(&self, name: &str) -> Option<Record> {
        let meta = fs::metadata(self.entry_path(name)).ok()?;
        let record = self.read_record(name)?;
        (meta.is_file() && record.entry_size == meta.len()).then_some(record)
    }

    /// Writes the record atomically (temp file, fsync, rename). The directory is synced by the
    /// entry's own [`persist`] that follows.
    pub fn write_record(&self, name: &str, record: &Record) -> Result<()> {
        let path = self.record_path(name);
        let tmp = self.base.join(format!("{name}{RECORD_SUFFIX}.tmp"));
        let result = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            serde_json::to_writer_pretty(&mut f, record)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.with_context(|| format!("cannot write record {}", path.display()))
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
    /// XXH3-128 of the entry's content, for `verify`: the entry is derived locally from
    /// verified data, so this guards against later corruption (bit rot, truncation, edits),
    /// cheaply enough to compute for converted entries too.
    pub content_xxh3: String,
    pub fetched_at: String,
    pub fetched_at_unix: u64,
    /// Selected image properties (kernel_id, ramdisk_id, os_type, ...), as Glance sent them.
    #[serde(default)]
    pub properties: serde_json::Map<String, serde_json::Value>,
}

/// The hex form of a finished content digest.
pub fn content_hex(h: &xxhash_rust::xxh3::Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// XXH3-128 of a file's content, reading only its data extents: holes (SEEK_HOLE) are fed as
/// zeros from memory, so a sparse 2 GiB entry with 100 MiB of data reads 100 MiB.
pub fn content_digest(path: &Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;

    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let fd = file.as_raw_fd();
    // lseek(SEEK_DATA / SEEK_HOLE): Ok(offset), or Err(errno).
    let seek = |whence: i32, from: u64| -> Result<u64, i32> {
        let off = i64::try_from(from).map_err(|_| libc::EINVAL)?;
        // SAFETY: lseek on a descriptor that `file` keeps open; no memory is passed.
        let r = unsafe { libc::lseek(fd, off, whence) };
        u64::try_from(r).map_err(|_| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    };
    while pos < len {
        let (data, hole) = match seek(libc::SEEK_DATA, pos) {
            Ok(d) => (d.min(len), seek(libc::SEEK_HOLE, d).unwrap_or(len).min(len)),
            // ENXIO: only a hole from here to the end.
            Err(libc::ENXIO) => (len, len),
            // No SEEK_DATA support here: treat the rest as data.
            Err(_) => (pos, len),
        };
        let mut zeros = data - pos;
        while zeros > 0 {
            let n = zeros.min(ZEROS.len() as u64) as usize;
            h.update(&ZEROS[..n]);
            zeros -= n as u64;
        }
        if data >= len {
            break;
        }
        // SEEK_HOLE always finds a hole after data (at worst the virtual one at EOF).
        let hole = hole.max(data + 1);
        file.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        pos = hole;
    }
    Ok(content_hex(&h))
}

/// Makes `tmp` durable and atomically visible as `dest`: fsync the file, rename it, fsync the
/// directory. A crash at any point leaves either no `dest` or a complete one.
pub fn persist(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    File::open(tmp)?.sync_all()?;
    fs::rename(tmp, dest)?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory so that renames and unlinks in it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Now as seconds since the epoch and as an RFC 3339 UTC string.
pub fn now_stamp() -> (u64, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (secs, rfc3339(secs))
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), as in Howard Hinnant's date algorithms.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_307_045), "2026-11-22T00:24:05Z");
    }

    #[test]
    fn content_digest_of_sparse_file_equals_digest_of_its_bytes() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"data in the middle").unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let bytes = fs::read(&path).unwrap();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&bytes);
        assert_eq!(content_digest(&path).unwrap(), content_hex(&h));
        fs::write(&path, b"").unwrap();
        assert_eq!(
            content_digest(&path).unwrap(),
            content_hex(&xxhash_rust::xxh3::Xxh3::new())
        );
    }

    #[test]
    fn persist_renames_and_removes_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("x.part");
        let dest = dir.path().join("x");
        fs::write(&tmp, b"data").unwrap();
        persist(&tmp, &dest).unwrap();
        assert!(!tmp.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"data");
    }
}
