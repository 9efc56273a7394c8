//! The one subprocess runner (qemu-img, rbd, ceph, mkfs, mkswap): stdin closed, stdout and stderr
//! drained on their own threads with a cap, an optional deadline after which the child is
//! killed, optional rlimits, and `PR_SET_PDEATHSIG` so a child never outlives us.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most stdout kept from a child (JSON from `qemu-img info`, `rbd ls`); the rest is drained.
const MAX_STDOUT: u64 = 64 << 20;
/// Most stderr kept (it goes into a one-line error message).
const MAX_STDERR: u64 = 64 << 10;
/// How often a running child is polled.
const POLL: Duration = Duration::from_millis(20);

/// Why a child could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{shown}` timed out after {}", crate::units::round_duration(*.after))]
    Timeout { shown: String, after: Duration },
    /// The watch passed to [`run_watched`] asked to stop it.
    #[error("`{shown}` was stopped: {why}")]
    Stopped { shown: String, why: String },
}

/// Limits a child runs under.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Killed after this long.
    pub timeout: Option<Duration>,
    /// `RLIMIT_AS` in bytes.
    pub address_space: Option<u64>,
    /// `RLIMIT_CPU` in seconds.
    pub cpu_seconds: Option<u64>,
    /// Descriptors the child inherits (it reaches them as [`fd_path`]): a child writes to a
    /// file we created and hold, never to a path someone could swap meanwhile.
    pub pass_fds: Vec<RawFd>,
}

/// The path a child opens to reach an inherited descriptor.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/dev/fd/{}", fd.as_raw_fd()))
}

/// What a finished child left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// stderr on one line: trimmed non-empty lines joined by `; `.
    pub stderr: String,
}

impl Output {
    /// The exit code, or -1 when the child was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Runs `cmd` to its end (or its deadline) and returns its output, whatever its exit status.
/// `shown` names the command in a timeout error.
pub fn run(cmd: Command, shown: &str, limits: &Limits) -> Result<Output, Error> {
    run_inner(cmd, shown, limits, None)
}

/// [`run`], asking `watch` every 20 ms whether to go on: `Some(why)` kills the child and
/// fails with [`Error::Stopped`] (a conversion about to fill the filesystem).
pub fn run_watched(
    cmd: Command,
    shown: &str,
    limits: &Limits,
    watch: &dyn Fn() -> Option<String>,
) -> Result<Output, Error> {
    run_inner(cmd, shown, limits, Some(watch))
}

/// Without a deadline or a watch the child is waited for blocking (no poll latency on the
/// many short qemu-img calls); otherwise it is polled.
fn run_inner(
    mut cmd: Command,
    shown: &str,
    limits: &Limits,
    watch: Option<&dyn Fn() -> Option<String>>,
) -> Result<Output, Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (address_space, cpu) = (limits.address_space, limits.cpu_seconds);
    let pass = limits.pass_fds.clone();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // syscalls (prctl, getppid, fcntl, setrlimit); it reads its own copy of the fd list.
    unsafe {
        cmd.pre_exec(move || {
            die_with_parent()?;
            for &fd in &pass {
                // Keep it open across exec (ours are opened with O_CLOEXEC).
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(v) = address_space {
                set_limit(libc::RLIMIT_AS, v)?;
            }
            if let Some(v) = cpu {
                set_limit(libc::RLIMIT_CPU, v)?;
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .map_err(|source| Error::Spawn { program, source })?;
    let stdout = drain(child.stdout.take(), MAX_STDOUT);
    let stderr = drain(child.stderr.take(), MAX_STDERR);
    let waited = match (limits.timeout, watch) {
        (None, None) => Ok(child.wait().unwrap_or_else(|_| killed())),
        (timeout, watch) => wait(&mut child, timeout, watch.unwrap_or(&|| None)),
    };
    let status = match waited {
        Ok(status) => status,
        Err(stop) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(match stop {
                Some(why) => Error::Stopped {
                    shown: shown.to_owned(),
                    why,
                },
                None => Error::Timeout {
                    shown: shown.to_owned(),
                    after: limits.timeout.unwrap_or_default(),
                },
            });
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    // A child quicker than one poll is judged by the watch at its end all the same.
    if let Some(why) = watch.and_then(|w| w()) {
        return Err(Error::Stopped {
            shown: shown.to_owned(),
            why,
        });
    }
    Ok(Output {
        status,
        stdout,
        stderr: one_line(&String::from_utf8_lossy(&stderr)),
    })
}

/// Waits for the child, up to `timeout`, polling `watch`. `Err(None)`: the deadline passed;
/// `Err(Some(why))`: the watch asked to stop.
fn wait(
    child: &mut Child,
    timeout: Option<Duration>,
    watch: &dyn Fn() -> Option<String>,
) -> Result<ExitStatus, Option<String>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    // Short children (qemu-img info, create: a few ms) must not wait a whole poll: start at
    // 1 ms and double up to POLL.
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => return Err(None),
            Ok(None) => {
                if let Some(why) = watch() {
                    return Err(Some(why));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(POLL);
            }
            // Nothing left to wait for; report it like a signal death.
            Err(_) => return Ok(killed()),
        }
    }
}

/// An exit status that reads as "killed by SIGKILL".
fn killed() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw(libc::SIGKILL)
}

/// Reads a pipe to its end on its own thread, keeping at most `cap` bytes.
fn drain<R: Read + Send + 'static>(pipe: Option<R>, cap: u64) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.by_ref().take(cap).read_to_end(&mut kept);
            let _ = std::io::copy(&mut p, &mut std::io::sink());
        }
        kept
    })
}

/// Trimmed non-empty lines joined by `; `.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Asks the kernel to SIGKILL this (child) process when its parent dies, and closes the race
/// where the parent died before the request.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid takes no arguments.
    if unsafe { libc::getppid() } == 1 {
        return Err(std::io::Error::other("the parent exited before exec"));
    }
    Ok(())
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: plain syscall with a valid pointer to a local struct.
    if unsafe { libc::setrlimit(resource, &lim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Looks a tool up in PATH and in the sbin directories (cron's PATH often lacks them): the
/// first regular, executable file of that name.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(tool))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_both_streams_and_the_code() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo out; echo ' err 1 ' >&2; echo >&2; echo err2 >&2; exit 3",
        ]);
        let out = run(cmd, "sh", &Limits::default()).unwrap();
        assert_eq!(out.code(), 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, "err 1; err2");
    }

    #[test]
    fn a_child_past_its_deadline_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let limits = Limits {
            timeout: Some(Duration::from_millis(100)),
            ..Limits::default()
        };
        let err = run(cmd, "sleep 30", &limits).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
    }

    #[test]
    fn a_watch_stops_a_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let err = run_watched(cmd, "sleep 30", &Limits::default(), &|| {
            Some("enough".into())
        })
        .unwrap_err();
        assert!(err.to_string().contains("stopped: enough"), "{err}");
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let err = run(
            Command::new("/nonexistent/tool"),
            "tool",
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }), "{err}");
    }
}
