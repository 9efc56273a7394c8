//! The complete prefix of a `.part` a parallel download wrote out of order, kept in the
//! `.part`'s extended attribute `user.imgcache.done`: set before the first chunk lands, moved
//! forward as the prefix grows, removed at the end. A resume starts there (the chunks beyond
//! it are downloaded again); a `.part` without it is a single stream's, and all of it counts.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The `.part`'s extended attribute that holds the complete prefix of a parallel download.
const DONE: &std::ffi::CStr = c"user.imgcache.done";

/// The complete prefix a parallel run recorded on `file`, if it is one of those.
pub fn recorded_prefix(file: &File) -> Option<u64> {
    let mut buf = [0u8; 24];
    // SAFETY: the name is NUL-terminated and the buffer is ours, of the length given.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            DONE.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    std::str::from_utf8(buf.get(..n)?).ok()?.parse().ok()
}

/// Records `prefix` as the complete prefix of `file`.
pub fn record_prefix(file: &File, prefix: u64) -> std::io::Result<()> {
    let text = prefix.to_string();
    // SAFETY: the name is NUL-terminated; the value is a live slice of the length given.
    let r = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            DONE.as_ptr(),
            text.as_ptr().cast(),
            text.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes the record (a finished `.part`, or one resumed by a single stream).
pub fn clear_prefix(file: &File) -> std::io::Result<()> {
    // SAFETY: the name is NUL-terminated.
    let r = unsafe { libc::fremovexattr(file.as_raw_fd(), DONE.as_ptr()) };
    let err = std::io::Error::last_os_error();
    if r == 0 || matches!(err.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Where a resume starts: a parallel run's `.part` holds chunks beyond its complete prefix,
/// which are dropped (truncated away and downloaded again); any other `.part` is a stream's
/// and all of it counts.
pub fn resume_point(file: &File, len: u64) -> std::io::Result<u64> {
    let Some(prefix) = recorded_prefix(file) else {
        return Ok(len);
    };
    let prefix = prefix.min(len);
    file.set_len(prefix)?;
    clear_prefix(file)?;
    Ok(prefix)
}
