//! The one door to the filesystem under the instances path: every file there is opened, created,
//! renamed and removed through these functions, relative to its directory's descriptor
//! ([`at`]: the directory itself opened with `O_NOFOLLOW`). Opens never follow a symlink
//! (`O_NOFOLLOW`) and never block on a FIFO (`O_NONBLOCK`, then `fstat`: regular files only);
//! temp files get unpredictable names and are created with `O_CREAT|O_EXCL`; reads of our own
//! documents are bounded; making a file durable is one protocol (fsync the file, rename, check
//! the inode that landed, fsync the directory).

mod at;
mod sparse;

pub use at::trust_root;
pub use sparse::{BLOCK, is_zero_block, write_sparse_at};

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::Untrusted;

/// Largest JSON document of ours read back (records, `imgcache.json`, `disk.info`).
pub const MAX_DOCUMENT: u64 = 4 << 20;

/// Flags every open under the cache carries.
const SAFE: i32 = libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;

/// Opens an existing regular file for reading. A symlink, FIFO, device or directory is refused
/// with an [`Untrusted`] error (exit code 15) naming the path and what it is.
pub fn open_regular(path: &Path) -> io::Result<File> {
    open_checked(path, libc::O_RDONLY, 0)
}

/// Opens an existing regular file for reading and writing (no create, no truncate).
pub fn open_regular_rw(path: &Path) -> io::Result<File> {
    open_checked(path, libc::O_RDWR, 0)
}

/// Opens a regular file for reading and writing, creating it (mode 0644) if absent; an existing
/// file is neither truncated nor followed if it is a symlink.
pub fn open_or_create(path: &Path) -> io::Result<File> {
    open_checked(path, libc::O_RDWR | libc::O_CREAT, 0o644)
}

/// Opens relative to the directory's descriptor with [`SAFE`] flags and refuses anything but a
/// regular file.
fn open_checked(path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let (dir, name) = at::at(path)?;
    let file = dir
        .open_file(&name, flags | SAFE, mode)
        .map_err(|e| explain_nofollow(e, path))?;
    check_regular(&file, path)?;
    Ok(file)
}

/// Like [`open_or_create`], but a file this call creates is given to the owner of its
/// directory when we run as root: a lock file another account's process must open for writing
/// too (Nova's `locks/nova-<name>`, opened by nova-compute as its own user).
pub fn open_or_create_shared(path: &Path) -> io::Result<File> {
    let (dir, name) = at::at(path)?;
    match dir.open_file(
        &name,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | SAFE,
        0o644,
    ) {
        Ok(file) => {
            if let Some(parent) = path.parent() {
                give_like(&file, parent)?;
            }
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open_or_create(path),
        Err(e) => Err(e),
    }
}

/// When we run as root, gives `file` the owner and group of the directory `like` (a file or
/// directory we just created under a directory another account owns stays usable by it: Nova
/// runs as its own user and must still create files in `_base` and `locks/`). Does nothing
/// when not root or when the owner is already right.
pub fn give_like(file: &File, like: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Some(owner) = stat(like)? else {
        return Ok(());
    };
    let mine = file.metadata()?;
    if mine.uid() == owner.uid() && mine.gid() == owner.gid() {
        return Ok(());
    }
    // SAFETY: fchown on a descriptor we own; no pointers involved.
    let r = unsafe { libc::fchown(file.as_raw_fd(), owner.uid(), owner.gid()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the directory `path` if it is missing (its parent must exist, or is created as the
/// operator's tree) and, if this call created it, gives it the owner of `like` (see
/// [`give_like`]). Returns true if it was created.
pub fn create_dir_like(path: &Path, like: &Path) -> io::Result<bool> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && stat(parent)?.is_none()
    {
        fs::create_dir_all(parent)?;
    }
    let made = create_dir(path)?;
    let opened = File::open(at::Dir::open(path)?.fd_path())?;
    if made {
        give_like(&opened, like)?;
    }
    Ok(made)
}

/// Creates a new regular file (mode 0644); fails with `AlreadyExists` if anything is at the path.
pub fn create_new(path: &Path) -> io::Result<File> {
    let (dir, name) = at::at(path)?;
    dir.open_file(
        &name,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | SAFE,
        0o644,
    )
}

fn check_regular(file: &File, path: &Path) -> io::Result<()> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(());
    }
    Err(Untrusted::io(format!(
        "{} is {}, not a regular file; imgcache does not use it — remove it if it is not yours",
        path.display(),
        describe_type(&meta)
    )))
}

/// ELOOP from `O_NOFOLLOW` means "a symlink is there": say so.
fn explain_nofollow(e: io::Error, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return Untrusted::io(format!(
            "{} is a symlink; imgcache never follows links in the cache — remove it if it is not yours",
            path.display()
        ));
    }
    e
}

/// `a directory`, `a FIFO`, ... for messages.
pub fn describe_type(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// What is at `path`, without following a symlink there (nor at its directory). `None` if
/// nothing is.
pub fn stat(path: &Path) -> io::Result<Option<Metadata>> {
    match at::at(path) {
        Ok((dir, name)) => dir.stat(&name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// True if a regular file (not a symlink to one) is at `path`.
pub fn is_regular(path: &Path) -> bool {
    stat(path).is_ok_and(|m| m.is_some_and(|m| m.is_file()))
}

/// True if anything (a dangling symlink included) is at `path`.
pub fn exists(path: &Path) -> bool {
    stat(path).is_ok_and(|m| m.is_some())
}

/// Reads a whole regular file of at most `limit` bytes; a larger one is `InvalidData`.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_capped(open_regular(path)?, limit, path)
}

/// Reads an open file to its end, at most `limit` bytes; more is `InvalidData`, never a
/// truncated document.
fn read_capped(file: File, limit: u64, path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(buf)
}

/// Reads a file the operator named (the configuration file, clouds.yaml): a link to it is
/// followed, but only a regular file is read (a FIFO or device is refused, never blocked on),
/// and at most `limit` bytes.
pub fn read_operator_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Untrusted::io(format!(
            "{} is {}, not a regular file",
            path.display(),
            describe_type(&meta)
        )));
    }
    read_capped(file, limit, path)
}

/// Sets a regular file's mtime to now (prune reads it as "last used").
pub fn touch(path: &Path) -> io::Result<()> {
    open_regular(path)?.set_modified(SystemTime::now())
}

/// Removes a file (never a directory); `Ok(false)` if nothing was there.
pub fn remove_file(path: &Path) -> io::Result<bool> {
    match at::at(path).and_then(|(dir, name)| dir.unlink(&name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a file of ours: a regular file at `path` that this user owns, never a symlink, a
/// FIFO or another account's file. `Ok(false)` if no such file was there.
pub fn remove_own(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    match stat(path)? {
        Some(m) if m.is_file() && m.uid() == euid => remove_file(path),
        _ => Ok(false),
    }
}

/// Removes a directory tree without following symlinks inside it (std's `remove_dir_all`,
/// CVE-2022-21658 fixed).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    fs::remove_dir_all(path)
}

/// Removes a directory if it is empty.
pub fn remove_empty_dir(path: &Path) -> io::Result<()> {
    fs::remove_dir(path)
}

/// Creates a directory and its parents; the directory must then be a real one (a symlink at
/// its name, unless it is a trusted root, is refused).
pub fn create_dirs(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    at::Dir::open(path).map(drop)
}

/// Creates one directory; `Ok(false)` if something already exists there.
pub fn create_dir(path: &Path) -> io::Result<bool> {
    match at::at(path).and_then(|(dir, name)| dir.mkdir(&name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Lists a directory: `(file name, metadata without following links)` of what is still there
/// when it is looked at. A missing directory is empty.
pub fn list(dir: &Path) -> io::Result<Vec<(String, PathBuf, Metadata)>> {
    let opened = match at::Dir::open(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // Listed through the descriptor: the directory we opened, whatever is at its name now.
    let mut out = Vec::new();
    for item in fs::read_dir(opened.fd_path())?.flatten() {
        let name = item.file_name();
        let Ok(c) =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()))
        else {
            continue;
        };
        if let Ok(Some(meta)) = opened.stat(&c) {
            out.push((name.to_string_lossy().into_owned(), dir.join(&name), meta));
        }
    }
    Ok(out)
}

/// fsyncs a directory so that renames and unlinks in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?
        .sync_all()
}

/// Makes `file` (open, ours, at `tmp`) durable and atomically visible as `dest`: fsync it,
/// rename `tmp`, fsync the directory. A crash at any point leaves either no `dest` or a
/// complete one. The rename goes by name, so it is checked afterwards: if what now sits at
/// `dest` is not our inode (someone swapped `tmp` meanwhile), it is removed again and the
/// persist fails as untrusted.
pub fn persist(file: &File, tmp: &Path, dest: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    file.sync_all()?;
    let (from_dir, from) = at::at(tmp)?;
    let (to_dir, to) = at::at(dest)?;
    from_dir.rename(&from, &to_dir, &to)?;
    let ours = file.metadata()?;
    let placed = stat(dest)?;
    if !placed.is_some_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino()) {
        let _ = to_dir.unlink(&to);
        return Err(Untrusted::io(format!(
            "{} was replaced by another file while it was being built; nothing was kept — check who else writes to {}",
            tmp.display(),
            dest.parent().unwrap_or(Path::new(".")).display()
        )));
    }
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// `Ok(())` if nothing or a regular file is at `path`; an [`Untrusted`] error for anything else
/// (a symlink, a FIFO, a directory).
pub fn check_not_foreign(path: &Path) -> io::Result<()> {
    match stat(path)? {
        Some(m) if !m.is_file() => Err(Untrusted::io(format!(
            "{} is {}, not a regular file; imgcache does not use it — remove it if it is not yours",
            path.display(),
            describe_type(&m)
        ))),
        _ => Ok(()),
    }
}

/// 16 hex digits from the kernel's random pool (a hashed clock and pid if it is unavailable).
pub fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the local buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        bytes = h.finish().to_le_bytes();
    }
    hex::encode(bytes)
}

/// The prefix of every temp file name [`TempFile`] makes for the final name `name`.
pub fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// A file this run is building under an unpredictable hidden name (`.<name>.tmp-<random>`),
/// created with `O_EXCL` in the final file's directory; removed on drop unless persisted.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    /// Creates the temp file for the final file `dir/name`.
    pub fn new(dir: &Path, name: &str) -> io::Result<TempFile> {
        loop {
            let path = dir.join(format!("{}{}", temp_prefix(name), random_hex()));
            match create_new(&path) {
                Ok(file) => return Ok(TempFile { path, file }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file: writers and children (through [`crate::process::fd_path`]) use it, not
    /// the path.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// fsyncs, renames into `dest` (checked to be our inode), fsyncs the directory; the file is
    /// no longer ours to remove.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        persist(&self.file, &self.path, dest)?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A directory only this user can enter (mode 0700, created new under an unpredictable name
/// `<prefix><16 hex>` in `parent`); removed with everything in it on drop. For trees built to
/// be handed to a tool whole (the config drive's files), never for anything kept.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates the directory; a name already taken is tried again with another.
    pub fn new(parent: &Path, prefix: &str) -> io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        loop {
            let path = parent.join(format!("{prefix}{}", random_hex()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a new file at `relative` (a path of plain components), creating the
    /// directories on the way (0700); nothing existing is followed or overwritten.
    pub fn write(&self, relative: &Path, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let path = self.path.join(relative);
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(dir)?;
        }
        let mut f = create_new(&path)?;
        f.write_all(bytes)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Writes `bytes` to `path` atomically: a [`TempFile`] beside it, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = TempFile::new(dir, &name)?;
    let mut f = tmp.file();
    f.write_all(bytes)?;
    tmp.persist(path)
}

/// Writes `value` as pretty JSON plus a newline to `path`, atomically.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Reads one of our JSON documents; `None` if it is missing, not a regular file, too large, or
/// does not parse.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = read_bounded(path, MAX_DOCUMENT).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// True if files in `dir` can be opened with O_DIRECT (so `qemu-img convert -t none` works).
pub fn direct_io_works(dir: &Path) -> bool {
    let probe = dir.join(format!(".imgcache-odirect-{}", random_hex()));
    let Ok((d, name)) = at::at(&probe) else {
        return false;
    };
    let ok = d
        .open_file(
            &name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_DIRECT | SAFE,
            0o600,
        )
        .is_ok();
    let _ = d.unlink(&name);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_renames_and_removes_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("x.part");
        let dest = dir.path().join("x");
        fs::write(&tmp, b"data").unwrap();
        let f = File::open(&tmp).unwrap();
        persist(&f, &tmp, &dest).unwrap();
        assert!(!tmp.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"data");
    }

    #[test]
    fn a_file_swapped_in_before_the_rename_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("x.part");
        let dest = dir.path().join("x");
        let ours = create_new(&tmp).unwrap();
        // Someone replaces our temp file by name before we rename it.
        fs::remove_file(&tmp).unwrap();
        fs::write(&tmp, b"theirs").unwrap();
        let e = persist(&ours, &tmp, &dest).unwrap_err();
        assert!(e.to_string().contains("was replaced"), "{e}");
        assert!(!dest.exists());
    }

    #[test]
    fn temp_file_is_removed_unless_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let t = TempFile::new(dir.path(), "disk").unwrap();
        t.file().write_all(b"x").unwrap();
        let p = t.path().to_owned();
        assert!(
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".disk.tmp-")
        );
        drop(t);
        assert!(!p.exists());
        let t = TempFile::new(dir.path(), "disk").unwrap();
        t.file().write_all(b"y").unwrap();
        t.persist(&dir.path().join("disk")).unwrap();
        assert_eq!(fs::read(dir.path().join("disk")).unwrap(), b"y");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlinked_directory_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("_base")).unwrap();
        let e = create_new(&dir.path().join("_base/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        assert!(create_dirs(&dir.path().join("_base")).is_err());
        // A trusted root may be a link (the operator's instances path).
        trust_root(&dir.path().join("_base"));
        create_new(&dir.path().join("_base/x")).unwrap();
    }

    #[test]
    fn symlinks_and_fifos_are_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_regular(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        let e = open_or_create(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert_eq!(fs::read(&target).unwrap(), b"secret");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = read_bounded(&fifo, 10).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
    }

    #[test]
    fn bounded_reads_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        fs::write(&p, vec![b'x'; 100]).unwrap();
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
        assert_eq!(
            read_bounded(&p, 99).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
