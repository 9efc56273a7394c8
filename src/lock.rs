//! Inter-process file locks with a "waiting for the lock on ..." notice and a timeout, in the
//! two styles the instances path needs: `flock` on imgcache's own lock files, and an
//! open-file-description record lock (`F_OFD_SETLK` over the whole file) on Nova's
//! `locks/nova-<name>`, which conflicts with the `fcntl.lockf` lock oslo.concurrency (through
//! fasteners) takes there for nova-compute. Both belong to our open file, not to the process,
//! and both vanish when it closes, so a killed imgcache never leaves a stale lock.
//!
//! A lock file is never trusted by name alone: after locking, the open file's inode is compared with
//! the inode now at the path. If they differ, someone (a prune sweeping stale lock files, Nova's
//! cache manager removing `nova-<name>` after a base) unlinked or replaced the file between our
//! open and our lock, and we start over. This closes the classic race where two processes each
//! "hold" the lock on a different inode (Nova bug 1256306 era).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use fs2::FileExt;

use crate::error::{self, Kind};
use crate::fsutil;
use crate::progress::Reporter;

/// How a lock file is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `flock(LOCK_EX)`: imgcache's own lock files (`locks/imgcache-*`).
    Flock,
    /// An exclusive open-file-description record lock on the whole file: Nova's lock files
    /// (`locks/nova-*`), so that nova-compute's `fcntl.lockf` and we exclude each other.
    Ofd,
}

impl Style {
    /// Who may be holding a lock of this style, for the messages.
    fn holder(self) -> &'static str {
        match self {
            Style::Flock => "another imgcache",
            Style::Ofd => "another process, possibly nova-compute",
        }
    }
}

/// Lock failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "timed out after {} waiting for the lock on {what} ({path}); {holder} still holds it — retry later or raise --lock-timeout",
        crate::units::round_duration(*waited)
    )]
    Timeout {
        what: String,
        path: PathBuf,
        waited: Duration,
        holder: &'static str,
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

/// An exclusive lock, released when dropped (closing the file releases it, in both styles).
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
    style: Style,
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
        let _ = match self.style {
            Style::Flock => FileExt::unlock(&self.file),
            Style::Ofd => ofd(&self.file, libc::F_OFD_SETLK, libc::F_UNLCK).map(drop),
        };
    }
}

const POLL_START: Duration = Duration::from_millis(10);
// Waiters poll (neither style has a timed lock); a short cap lets a herd of fetches return
// within ~20 ms of the holder finishing.
const POLL_MAX: Duration = Duration::from_millis(20);

/// Takes an exclusive lock on `path`, creating the file if needed. If another process holds it,
/// says once on `rep` what we wait for (`what`, e.g. "image <id>") and keeps trying until
/// `timeout` has passed.
pub fn acquire(
    path: &Path,
    style: Style,
    what: &str,
    timeout: Duration,
    rep: &dyn Reporter,
) -> Result<FileLock, Error> {
    let start = Instant::now();
    let mut spinner = None;
    let mut delay = POLL_START;
    loop {
        if let Some(lock) = try_acquire_once(path, style)? {
            match lock {
                Attempt::Held(l) => return Ok(l),
                // The file was unlinked or replaced while we locked it: our lock protects
                // nothing. Drop it and lock whatever is at the path now.
                Attempt::Stale => continue,
            }
        }
        if spinner.is_none() {
            let who = match (style, holder(path)) {
                (Style::Ofd, Some(pid)) => format!("{}: {pid}", style.holder()),
                _ => style.holder().to_owned(),
            };
            rep.info(&format!("waiting for the lock on {what} (held by {who})"));
            // On a terminal: a spinner with the time waited, until we have it.
            let s = rep.transfer(what);
            s.stage("waiting for its lock");
            spinner = Some(s);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                path: path.to_owned(),
                waited,
                holder: style.holder(),
            });
        }
        thread::sleep(delay.min(timeout - waited));
        delay = (delay * 2).min(POLL_MAX);
    }
}

enum Attempt {
    Held(FileLock),
    /// Locked an inode that is no longer at the path.
    Stale,
}

/// One non-blocking attempt. `Ok(None)`: someone else holds it.
fn try_acquire_once(path: &Path, style: Style) -> Result<Option<Attempt>, Error> {
    let file = open(path, style)?;
    let locked = match style {
        Style::Flock => match file.try_lock_exclusive() {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => Ok(false),
            Err(e) => Err(e),
        },
        Style::Ofd => ofd(&file, libc::F_OFD_SETLK, libc::F_WRLCK),
    }
    .map_err(|source| Error::Lock {
        path: path.to_owned(),
        source,
    })?;
    if !locked {
        return Ok(None);
    }
    if !same_inode(&file, path) {
        return Ok(Some(Attempt::Stale));
    }
    Ok(Some(Attempt::Held(FileLock {
        file,
        path: path.to_owned(),
        style,
    })))
}

/// Tries once, without waiting. `Ok(None)` means someone else holds it.
pub fn try_acquire(path: &Path, style: Style) -> Result<Option<FileLock>, Error> {
    Ok(match try_acquire_once(path, style)? {
        Some(Attempt::Held(l)) => Some(l),
        Some(Attempt::Stale) | None => None,
    })
}

/// Opens (creating if needed) a lock file; a symlink or FIFO planted there is refused. Nova's
/// lock files are created for the owner of `locks/`, so nova-compute can still open them.
fn open(path: &Path, style: Style) -> Result<File, Error> {
    match style {
        Style::Flock => fsutil::open_or_create(path),
        Style::Ofd => fsutil::open_or_create_shared(path),
    }
    .map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// True if another process holds the lock at `path`. Creates nothing (for `--dry-run`).
pub fn is_held(path: &Path, style: Style) -> bool {
    let Ok(file) = fsutil::open_regular(path) else {
        return false;
    };
    match style {
        Style::Flock => match FileExt::try_lock_shared(&file) {
            Ok(()) => {
                let _ = FileExt::unlock(&file);
                false
            }
            Err(_) => true,
        },
        Style::Ofd => ofd_conflict(&file).unwrap_or(false),
    }
}

/// `fcntl(F_OFD_SETLK)` with `l_type` over the whole file. `Ok(false)`: another holder
/// conflicts.
fn ofd(file: &File, cmd: libc::c_int, l_type: libc::c_int) -> std::io::Result<bool> {
    let mut fl = whole_file(l_type);
    // SAFETY: fcntl with a lock command and a pointer to a valid, initialised `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// True if a write lock on the whole file would conflict with someone's (`F_OFD_GETLK`; works
/// on a read-only descriptor and takes nothing).
fn ofd_conflict(file: &File) -> std::io::Result<bool> {
    let mut fl = whole_file(libc::F_WRLCK);
    // SAFETY: as in `ofd`; GETLK only writes into `fl`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Who holds a record lock, when the kernel says: a POSIX (`lockf`) holder's pid and command,
/// e.g. `pid 4242 (nova-compute)`. OFD holders have no pid.
fn holder(path: &Path) -> Option<String> {
    let file = fsutil::open_regular(path).ok()?;
    let mut fl = whole_file(libc::F_WRLCK);
    // SAFETY: as in `ofd_conflict`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 || i32::from(fl.l_type) == libc::F_UNLCK || fl.l_pid <= 0 {
        return None;
    }
    let pid = fl.l_pid;
    let comm = fsutil::read_operator_file(Path::new(&format!("/proc/{pid}/comm")), 64)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_graphic() || ch == ' '));
    Some(match comm {
        Some(c) => format!("pid {pid} ({c})"),
        None => format!("pid {pid}"),
    })
}

fn whole_file(l_type: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value (l_start = l_len = 0: the
    // whole file; l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
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
        let _held = acquire(&path, Style::Flock, "x", Duration::from_secs(1), &Silent).unwrap();
        let notes = Notes::default();
        let err = acquire(
            &path,
            Style::Flock,
            "entry abc",
            Duration::from_millis(100),
            &notes,
        )
        .unwrap_err();
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
        let first = acquire(&path, Style::Flock, "x", Duration::from_secs(1), &Silent).unwrap();
        assert!(first.is_current());
        std::fs::remove_file(&path).unwrap();
        assert!(!first.is_current());
        // A new locker gets the new inode at once, even though `first` still holds the old one.
        let second = try_acquire(&path, Style::Flock)
            .unwrap()
            .expect("fresh inode is free");
        assert!(second.is_current());
    }

    #[test]
    fn nova_style_lock_conflicts_with_lockf_and_is_seen_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nova-x");
        // What fasteners does for Nova, in another process (a POSIX lock held by this test
        // process would be dropped by the first close of any descriptor of the file).
        let mut holder = std::process::Command::new("python3")
            .args([
                "-c",
                "import fcntl,sys; f=open(sys.argv[1],'a'); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "held");
        assert!(try_acquire(&path, Style::Ofd).unwrap().is_none());
        assert!(is_held(&path, Style::Ofd));
        let err = acquire(
            &path,
            Style::Ofd,
            "image y",
            Duration::from_millis(50),
            &Silent,
        )
        .unwrap_err();
        assert!(err.to_string().contains("possibly nova-compute"), "{err}");
        drop(holder.stdin.take());
        assert!(holder.wait().unwrap().success());
        let held = try_acquire(&path, Style::Ofd)
            .unwrap()
            .expect("free after lockf release");
        assert!(!is_held(&dir.path().join("absent"), Style::Ofd));
        // A second OFD lock (another imgcache) conflicts too, and the file is released on drop.
        assert!(try_acquire(&path, Style::Ofd).unwrap().is_none());
        drop(held);
        assert!(try_acquire(&path, Style::Ofd).unwrap().is_some());
    }

    #[test]
    fn released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = acquire(&path, Style::Flock, "x", Duration::from_secs(1), &Silent).unwrap();
        assert!(try_acquire(&path, Style::Flock).unwrap().is_none());
        drop(held);
        assert!(try_acquire(&path, Style::Flock).unwrap().is_some());
    }
}
