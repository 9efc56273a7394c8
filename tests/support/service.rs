//! The real services the tests run against (Glance, a Keystone + Glance stack, Ceph), each
//! started by its own script into a temp dir: `scripts/<name>/<start> DIR` prints what the tests
//! need on stdout, `scripts/<name>/<stop> DIR` stops it. A [`Service`] starts one shared
//! instance on first use (kept in a `OnceLock`), or a fresh one per call, and stops every
//! instance it started when the test binary exits.
//!
//! Logs are kept when something went wrong: a failed start panics naming the dir with the logs
//! and leaves it in place, and at exit the dirs are removed only if no test panicked (a panic
//! hook, chained to the previous one, records that) and their stop script succeeded. Tests that
//! need a service fail (never skip) when it cannot start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// What a successful start left: the service's dir and what the start script printed.
pub struct Started {
    pub dir: PathBuf,
    pub stdout: String,
}

impl Started {
    /// The string field `key` of the JSON object the start script printed.
    pub fn json_str(&self, key: &str) -> Result<String, String> {
        let v: serde_json::Value = serde_json::from_str(&self.stdout)
            .map_err(|e| format!("output is not JSON ({e}): {:?}", self.stdout))?;
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no string {key:?} in {}", self.stdout.trim()))
    }
}

/// A kind of service: where its scripts are and how to turn a started one into a fixture `T`.
pub struct Service<T> {
    /// The directory under `scripts/` with the start and stop scripts.
    scripts: &'static str,
    start: &'static str,
    stop: &'static str,
    /// Prefix of the temp dir each start gets.
    prefix: &'static str,
    /// What to run first if the start fails because something is not installed.
    install: &'static str,
    /// Builds the fixture from a started service; an `Err` fails the start.
    ready: fn(&Started) -> Result<T, String>,
    shared: OnceLock<Result<T, String>>,
}

/// Set once any thread panics after the first service started (see [`watch`]).
static PANICKED: AtomicBool = AtomicBool::new(false);
/// Every started service, in start order: (stop script, dir).
static RUNNING: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
static WATCH: Once = Once::new();

impl<T> Service<T> {
    pub const fn new(
        scripts: &'static str,
        start: &'static str,
        stop: &'static str,
        prefix: &'static str,
        install: &'static str,
        ready: fn(&Started) -> Result<T, String>,
    ) -> Service<T> {
        Service {
            scripts,
            start,
            stop,
            prefix,
            install,
            ready,
            shared: OnceLock::new(),
        }
    }

    fn script(&self, name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(self.scripts)
            .join(name)
    }

    /// The shared instance: started on first use, the same one for every later call. If it
    /// could not start, every call panics with the same message (there is one attempt).
    #[track_caller]
    pub fn shared(&'static self) -> &'static T
    where
        T: Send + Sync,
    {
        match self.shared.get_or_init(|| self.try_start(&[])) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// A fresh instance of its own, with extra environment for the start script; stopped at
    /// exit like the shared one.
    #[track_caller]
    pub fn start(&self, env: &[(&str, &str)]) -> T {
        match self.try_start(env) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn try_start(&self, env: &[(&str, &str)]) -> Result<T, String> {
        watch();
        let what = format!("scripts/{}/{}", self.scripts, self.start);
        let dir = tempfile::Builder::new()
            .prefix(self.prefix)
            .tempdir()
            .map_err(|e| format!("{what}: cannot make a temp dir: {e}"))?
            .keep();
        let mut cmd = Command::new(self.script(self.start));
        cmd.arg(&dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {what} (logs kept in {}): {e}", dir.display()))?;
        if !out.status.success() {
            return Err(format!(
                "cannot start {} ({what} {}; run {} first if it is not installed); logs kept \
                 in {}:\n{}",
                self.scripts,
                out.status,
                self.install,
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Running now: stop it at exit whatever happens next.
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.script(self.stop), dir.clone()));
        let started = Started {
            dir,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        };
        (self.ready)(&started).map_err(|e| {
            format!(
                "{what} succeeded but its output is unusable: {e}; logs kept in {}",
                started.dir.display()
            )
        })
    }
}

/// Once: records panics from now on (chained to the previous hook, so test output is as
/// before) and registers [`stop_all`] to run at exit.
fn watch() {
    WATCH.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(stop_all);
        }
    });
}

/// At exit: stops every started service, newest first, and removes its dir unless a test
/// panicked or the stop script failed (then the dir, with its logs, is kept and named).
extern "C" fn stop_all() {
    let running = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    let panicked = PANICKED.load(Ordering::SeqCst);
    for (stop, dir) in running.into_iter().rev() {
        let stopped = Command::new(&stop)
            .arg(&dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped {
            let _ = writeln!(
                std::io::stderr(),
                "{} {} failed; kept {}",
                stop.display(),
                dir.display(),
                dir.display()
            );
        } else if panicked {
            let _ = writeln!(
                std::io::stderr(),
                "a test failed: kept the logs in {}",
                dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
