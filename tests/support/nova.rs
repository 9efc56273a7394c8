//! A real Nova beside imgcache: the venv made by `scripts/nova/install` and the Python scripts in
//! `tests/support/nova/` that run Nova's own code (its image cache manager, `fetch_to_raw` under
//! its lock, its external lock). Tests that need it fail (never skip) when the venv is missing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// The venv: `IMGCACHE_NOVA_VENV`, else `~/.cache/imgcache/nova-venv` (as scripts/nova/install).
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("IMGCACHE_NOVA_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    Path::new(&home).join(".cache/imgcache/nova-venv")
}

/// `python -W ignore tests/support/nova/<script>` from the Nova venv.
#[track_caller]
pub fn python(script: &str) -> Command {
    let py = venv().join("bin/python");
    assert!(
        py.is_file(),
        "no nova venv at {}: run scripts/nova/install first (IMGCACHE_NOVA_VENV overrides the \
         path)",
        venv().display()
    );
    let mut cmd = Command::new(py);
    cmd.arg("-W")
        .arg("ignore")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/support/nova")
                .join(script),
        )
        .stdin(Stdio::null());
    cmd
}

/// Nova's external lock on `locks/nova-<name>`, held through `nova.utils.synchronized` by a
/// Python process until this is dropped.
pub struct NovaLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl NovaLock {
    /// Returns once the lock is held.
    #[track_caller]
    pub fn hold(instances: &Path, name: &str) -> NovaLock {
        let mut child = python("lock.py")
            .arg("hold")
            .arg(instances)
            .arg(name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lock.py");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read lock.py");
        assert_eq!(line.trim(), "locked", "lock.py hold {name} did not lock");
        NovaLock { child, stdin }
    }

    /// Releases the lock (Nova's process exits) and waits for it.
    pub fn release(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for NovaLock {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One non-blocking acquire of Nova's lock on `name` through oslo.concurrency/fasteners:
/// true if it was free (it is released again at once).
#[track_caller]
pub fn try_lock(instances: &Path, name: &str) -> bool {
    let out = python("lock.py")
        .arg("try")
        .arg(instances)
        .arg(name)
        .output()
        .expect("run lock.py");
    super::assert_exit_ok(&out);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "acquired" => true,
        "busy" => false,
        other => panic!("lock.py try {name}: {other:?}"),
    }
}

/// Runs Nova's `ImageCacheManager.update` once over `instances`, with `listing` as the
/// database's instances and `overrides` (`group.option=value`) in nova.conf; returns its JSON.
#[track_caller]
pub fn cache_manager(
    instances: &Path,
    listing: &serde_json::Value,
    overrides: &[&str],
) -> serde_json::Value {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), listing.to_string()).expect("write listing");
    let out = python("cache_manager.py")
        .arg(instances)
        .arg(file.path())
        .args(overrides)
        .output()
        .expect("run cache_manager.py");
    super::assert_exit_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cache_manager.py output ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A `fetch_to_raw.py --go-on-stdin` process: Nova imported and configured, waiting for
/// [`go`](NovaFetch::go) to take its lock and download.
pub struct NovaFetch {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl NovaFetch {
    #[track_caller]
    pub fn ready(instances: &Path, glance_url: &str, image_id: &str) -> NovaFetch {
        let mut child = python("fetch_to_raw.py")
            .arg("--go-on-stdin")
            .arg(instances)
            .arg(glance_url)
            .arg(image_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fetch_to_raw.py");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read fetch_to_raw.py");
        assert_eq!(line.trim(), "ready", "fetch_to_raw.py did not start");
        // Give the rest of stdout back to wait_with_output.
        child.stdout = Some(out.into_inner());
        NovaFetch { child, stdin }
    }

    /// Lets it go.
    pub fn go(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"go\n");
        }
    }

    /// Waits; returns (exit code, `downloaded` from its JSON, stderr).
    pub fn wait(mut self) -> (Option<i32>, Option<bool>, String) {
        self.go();
        let out = self.child.wait_with_output().expect("wait fetch_to_raw.py");
        let v: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        (
            out.status.code(),
            v.and_then(|v| v["downloaded"].as_bool()),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// What `F_OFD_GETLK` says about a whole-file write lock on `path`: `None` if nothing would
/// block it, else `(l_type, l_pid, l_start, l_len)` of the lock in the way (`l_pid` is -1 for an
/// open-file-description lock, the holder's pid for a POSIX `lockf`/`fcntl` lock).
pub fn ofd_conflict(path: &Path) -> std::io::Result<Option<(i32, i32, i64, i64)>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an fd we own with a pointer to a live flock.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if i32::from(fl.l_type) == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some((i32::from(fl.l_type), fl.l_pid, fl.l_start, fl.l_len)))
}

/// Whether a non-blocking `flock(LOCK_EX)` on `path` would fail (someone holds it).
pub fn flock_held(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    match fs2::FileExt::try_lock_exclusive(&f) {
        Ok(()) => {
            let _ = fs2::FileExt::unlock(&f);
            false
        }
        Err(_) => true,
    }
}
