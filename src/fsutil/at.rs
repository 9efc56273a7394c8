//! Directory-relative operations: a path under the cache is reached as *(directory fd, name)*,
//! the directory opened with `O_NOFOLLOW` (so a symlink planted at `_base`, `locks/` or an
//! instance directory is refused, not followed), then `openat`, `unlinkat`, `renameat`,
//! `mkdirat` relative to it. The instances path itself is the operator's and may be a link
//! (kolla, a bind mount): roots registered with [`trust_root`] are followed.
//!
//! Built on `libc` (already a dependency) rather than `rustix` or `cap-std`: it is six calls,
//! and the rest of the crate keeps using `std::fs::File` for the descriptors they return.

use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::error::Untrusted;

/// Directories whose own name may be a symlink: the instances paths the operator gave.
static ROOTS: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Trusts `root` (an instances path) as the operator's: it is followed if it is a link.
pub fn trust_root(root: &Path) {
    if let Ok(mut roots) = ROOTS.write()
        && !roots.iter().any(|r| r == root)
    {
        roots.push(root.to_owned());
    }
}

fn trusted(dir: &Path) -> bool {
    ROOTS
        .read()
        .map(|roots| roots.iter().any(|r| r == dir))
        .unwrap_or(false)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A directory opened for `*at` calls.
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens `dir` (`O_PATH | O_DIRECTORY`), refusing a symlink at its own name unless it is a
    /// trusted root.
    pub fn open(dir: &Path) -> io::Result<Dir> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let mut flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        if !trusted(dir) {
            flags |= libc::O_NOFOLLOW;
        }
        let c = cstring(dir.as_os_str().as_bytes())?;
        // SAFETY: open with a valid NUL-terminated path; the fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            if is_link {
                return Err(Untrusted::io(format!(
                    "{} is a symlink; imgcache never follows links in the cache — remove it if it is not yours",
                    dir.display()
                )));
            }
            return Err(e);
        }
        Ok(Dir {
            // SAFETY: a descriptor we just opened and own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// `openat(dir, name, flags, mode)`.
    pub fn open_file(&self, name: &CString, flags: i32, mode: u32) -> io::Result<File> {
        // SAFETY: openat on our directory fd with a valid name; the fd is owned by the File.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode,
            )
        })?;
        // SAFETY: a descriptor we just opened and own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// What is at `name`, the link itself if it is one (`O_PATH | O_NOFOLLOW` + `fstat`).
    pub fn stat(&self, name: &CString) -> io::Result<Option<Metadata>> {
        match self.open_file(name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
            Ok(f) => f.metadata().map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `unlinkat(dir, name, 0)`.
    pub fn unlink(&self, name: &CString) -> io::Result<()> {
        // SAFETY: unlinkat on our directory fd with a valid name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
    }

    /// `renameat(self, from, to_dir, to)`.
    pub fn rename(&self, from: &CString, to_dir: &Dir, to: &CString) -> io::Result<()> {
        // SAFETY: renameat on our directory fds with valid names.
        check(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                from.as_ptr(),
                to_dir.fd.as_raw_fd(),
                to.as_ptr(),
            )
        })
        .map(drop)
    }

    /// `mkdirat(dir, name, 0755)`.
    pub fn mkdir(&self, name: &CString) -> io::Result<()> {
        // SAFETY: mkdirat on our directory fd with a valid name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), 0o755) }).map(drop)
    }

    /// A path that reaches this very directory (not whatever is at its name now).
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// The directory holding `path` (opened as [`Dir::open`] does) and the final name in it.
pub fn at(path: &Path) -> io::Result<(Dir, CString)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a path without a name"))?;
    let dir = Dir::open(path.parent().unwrap_or(Path::new(".")))?;
    Ok((dir, cstring(name.as_bytes())?))
}
