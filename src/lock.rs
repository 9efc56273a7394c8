//! Inter-process file locks (fs2 `flock`) with a "waiting for lock on ..." notice and a timeout.
//!
//! A lock file is never trusted by name alone: after locking, the open file's inode is compared with
//! the inode now at the path. If they differ, someone (a prune sweeping stale lock files) unlinked or
//! replaced the file between our open and our lock, and we start over. This closes the classic race
//! where two processes each "hold" the lock on a different inode (Nova bug 1256306 era).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use fs2::FileExt;

use crate::error::{self, Kind};
use crate::fsutil;
use crate::progress::Reporter;

/// Lock failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "timed out after {waited:?} waiting for the lock on {what} ({path}); another imgcache is still working on it — retry later or raise --lock-timeout"
    )]
    Timeout {
        what: String,
        path: PathBuf,
        waited: Duration,
    },
    #[error("cannot open lock file {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Timeout { .. } => Kind::LockTimeout,
            Error::Lock { source, .. } if error::is_no_space(source) => Kind::NoSpace,
            Error::Open { source, .. } => error::io_kind(source).unwrap_or(Kind::Other),
            Error::Lock { .. } => Kind::Other,
        }
    }
}

/// An exclusive lock, released when dropped (closing the file releases the `flock`).
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if the lock file at our path is still the inode we hold. A caller that is about to
    /// delete the lock file (prune) uses this to be sure it removes its own.
    pub fn is_current(&self) -> bool {
        same_inode(&self.file, &self.path)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock; an explicit unlock keeps that obvious.
        let _ = FileExt::unlock(&self.file);
    }
}

const POLL_START: Duration = Duration::from_millis(10);
// Waiters poll (fs2 has no timed lock); a short cap lets a herd of fetches return within
// ~20 ms of the holder finishing.
const POLL_MAX: Duration = Duration::from_millis(20);

/// Takes an exclusive lock on `path`, creating the file if needed. If another process holds it,
/// says once on `rep` what we wait for (`what`, e.g. "image <id>") and keeps trying until
/// `timeout` has passed.
pub fn acquire(
    path: &Path,
    what: &str,
    timeout: Duration,
    rep: &dyn Reporter,
) -> Result<FileLock, Error> {
    let start = Instant::now();
    let mut told = false;
    let mut delay = POLL_START;
    loop {
        let file = open(path)?;
        match file.try_lock_exclusive() {
            Ok(()) => {
                if same_inode(&file, path) {
                    return Ok(FileLock {
                        file,
                        path: path.to_owned(),
                    });
                }
                // The file was unlinked or replaced while we locked it: our lock protects
                // nothing. Drop it and lock whatever is at the path now.
                continue;
            }
            Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => {}
            Err(source) => {
                return Err(Error::Lock {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        drop(file);
        if !told {
            rep.info(&format!(
                "waiting for the lock on {what} (another process is working on it)"
            ));
            told = true;
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                path: path.to_owned(),
                waited,
            });
        }
        thread::sleep(delay.min(timeout - waited));
        delay = (delay * 2).min(POLL_MAX);
    }
}

/// Tries once, without waiting. `Ok(None)` means someone else holds it.
pub fn try_acquire(path: &Path) -> Result<Option<FileLock>, Error> {
    let file = open(path)?;
    match file.try_lock_exclusive() {
        Ok(()) if same_inode(&file, path) => Ok(Some(FileLock {
            file,
            path: path.to_owned(),
        })),
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => Ok(None),
        Err(source) => Err(Error::Lock {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Opens (creating if needed) a lock file; a symlink or FIFO planted there is refused.
fn open(path: &Path) -> Result<File, Error> {
    fsutil::open_or_create(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// True if another process holds the lock at `path`. Creates nothing (for `--dry-run`).
pub fn is_held(path: &Path) -> bool {
    let Ok(file) = fsutil::open_regular(path) else {
        return false;
    };
    match FileExt::try_lock_shared(&file) {
        Ok(()) => {
            let _ = FileExt::unlock(&file);
            false
        }
        Err(_) => true,
    }
}

fn same_inode(file: &File, path: &Path) -> bool {
    match (file.metadata(), fsutil::stat(path)) {
        (Ok(a), Ok(Some(b))) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use std::sync::Mutex;

    /// Records what it is told.
    #[derive(Default)]
    struct Notes(Mutex<Vec<String>>);

    impl Reporter for Notes {
        fn info(&self, msg: &str) {
            self.0.lock().unwrap().push(msg.to_owned());
        }
        fn warn(&self, _: &str) {}
        fn debug(&self, _: &str) {}
        fn transfer(&self, _: &str) -> Box<dyn crate::progress::Transfer> {
            crate::progress::Silent.transfer("")
        }
    }

    #[test]
    fn second_lock_times_out_and_reports_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let _held = acquire(&path, "x", Duration::from_secs(1), &Silent).unwrap();
        let notes = Notes::default();
        let err = acquire(&path, "entry abc", Duration::from_millis(100), &notes).unwrap_err();
        let told = notes.0.lock().unwrap().clone();
        assert_eq!(told.len(), 1);
        assert!(
            told[0].starts_with("waiting for the lock on entry abc"),
            "{told:?}"
        );
        assert!(matches!(err, Error::Timeout { .. }));
        assert_eq!(err.kind(), Kind::LockTimeout);
    }

    #[test]
    fn lock_on_unlinked_file_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let first = acquire(&path, "x", Duration::from_secs(1), &Silent).unwrap();
        assert!(first.is_current());
        std::fs::remove_file(&path).unwrap();
        assert!(!first.is_current());
        // A new locker gets the new inode at once, even though `first` still holds the old one.
        let second = try_acquire(&path).unwrap().expect("fresh inode is free");
        assert!(second.is_current());
    }

    #[test]
    fn released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = acquire(&path, "x", Duration::from_secs(1), &Silent).unwrap();
        assert!(try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(try_acquire(&path).unwrap().is_some());
    }
}
