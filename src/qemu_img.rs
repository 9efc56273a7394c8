//! The qemu-img subprocess. Every call passes `-f <format>` (CVE-2026-24708: never let qemu-img
//! probe), `info` runs under rlimits, and stderr is captured into the error (through the one
//! runner, [`crate::process`]).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::Kind;
use crate::process;

/// Address-space limit for `qemu-img info`: 1 GiB, as Nova's QEMU_IMG_LIMITS before 2023.
const INFO_AS_LIMIT: u64 = 1 << 30;
/// CPU-time limit for `qemu-img info`: 30 s, as Nova's QEMU_IMG_LIMITS.
const INFO_CPU_LIMIT: u64 = 30;

/// qemu-img failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("qemu-img not found ({0}); install it: apt-get install qemu-utils")]
    Missing(String),
    #[error("qemu-img {op} {path} failed ({status}): {stderr}")]
    Failed {
        op: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("cannot parse `qemu-img info` output for {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("qemu-img {op} {path} was stopped: {why}")]
    Stopped {
        op: &'static str,
        path: PathBuf,
        why: String,
    },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Failed { stderr, .. } if stderr.contains("No space left on device") => {
                Kind::NoSpace
            }
            Error::Stopped { .. } => Kind::NoSpace,
            _ => Kind::Tool,
        }
    }
}

/// The parts of `qemu-img info --output=json` imgcache checks.
#[derive(Debug, Clone, Deserialize)]
pub struct Info {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<FormatSpecific>,
}

/// `format-specific` of `qemu-img info`.
#[derive(Debug, Clone, Deserialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Info {
    /// `format-specific.data.data-file` (qcow2 external data file), if any.
    pub fn data_file(&self) -> Option<&str> {
        self.format_specific
            .as_ref()
            .and_then(|f| f.data.get("data-file"))
            .and_then(|v| v.as_str())
    }

    /// `format-specific.data.create-type` (vmdk), if any.
    pub fn create_type(&self) -> Option<&str> {
        self.format_specific
            .as_ref()
            .and_then(|f| f.data.get("create-type"))
            .and_then(|v| v.as_str())
    }
}

/// The qemu-img binary (`IMGCACHE_QEMU_IMG` overrides the one on PATH).
fn binary() -> PathBuf {
    std::env::var_os("IMGCACHE_QEMU_IMG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// Runs `qemu-img info --output=json -f <format> <path>` under rlimits, on a path (a file the
/// operator named, or one that is only read).
pub fn info(path: &Path, format: &str) -> Result<Info, Error> {
    info_at(path, path, format, Vec::new())
}

/// `qemu-img info` on a file we hold open (it reads our descriptor, whatever is at `shown` by
/// then); `shown` names it in errors.
pub fn info_file(file: &File, shown: &Path, format: &str) -> Result<Info, Error> {
    info_at(
        &process::fd_path(file),
        shown,
        format,
        vec![file.as_raw_fd()],
    )
}

fn info_at(path: &Path, shown: &Path, format: &str, pass_fds: Vec<RawFd>) -> Result<Info, Error> {
    let mut cmd = Command::new(binary());
    cmd.args(["info", "--output=json", "-f", format]).arg(path);
    let limits = process::Limits {
        address_space: Some(INFO_AS_LIMIT),
        cpu_seconds: Some(INFO_CPU_LIMIT),
        pass_fds,
        ..process::Limits::default()
    };
    let out = run(cmd, "info", shown, &limits)?;
    serde_json::from_slice(&out).map_err(|e| Error::Parse {
        path: shown.to_owned(),
        detail: e.to_string(),
    })
}

/// Converts `src` to raw into `dst`, both files we hold open:
/// `qemu-img convert -n --target-is-zero -t <cache> -f <from> -O raw /dev/fd/S /dev/fd/D`.
/// `dst` must be new (all zeros) and already as long as the virtual size; qemu-img never opens
/// a path someone could have swapped.
/// `watch` is asked every 20 ms whether to go on (`Some(why)` stops the conversion).
pub fn convert_to_raw(
    src: &File,
    from: &str,
    dst: &File,
    shown: &Path,
    direct_io: bool,
    watch: &dyn Fn() -> Option<String>,
) -> Result<(), Error> {
    let mut cmd = Command::new(binary());
    cmd.args([
        "convert",
        "-n",
        "--target-is-zero",
        "-t",
        if direct_io { "none" } else { "writeback" },
    ])
    .args(["-f", from, "-O", "raw"])
    .arg(process::fd_path(src))
    .arg(process::fd_path(dst));
    let limits = process::Limits {
        pass_fds: vec![src.as_raw_fd(), dst.as_raw_fd()],
        ..process::Limits::default()
    };
    run_watched(cmd, "convert", shown, &limits, Some(watch)).map(drop)
}

/// Writes a qcow2 overlay into `dst`, a new file we hold open:
/// `qemu-img create -f qcow2 -b <base> -F <base_format> /dev/fd/D <size>`. `base` must be
/// absolute so the overlay does not depend on the working directory.
pub fn create_overlay(
    dst: &File,
    shown: &Path,
    base: &Path,
    base_format: &str,
    size: u64,
) -> Result<(), Error> {
    let mut cmd = Command::new(binary());
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", base_format])
        .arg(process::fd_path(dst))
        .arg(size.to_string());
    let limits = process::Limits {
        pass_fds: vec![dst.as_raw_fd()],
        ..process::Limits::default()
    };
    run(cmd, "create", shown, &limits).map(drop)
}

/// Runs qemu-img; returns stdout on success, the captured stderr in the error otherwise.
fn run(
    cmd: Command,
    op: &'static str,
    path: &Path,
    limits: &process::Limits,
) -> Result<Vec<u8>, Error> {
    run_watched(cmd, op, path, limits, None)
}

/// [`run`], with a watch that may stop the child (only the conversion has one; without it the
/// child is waited for blocking).
fn run_watched(
    cmd: Command,
    op: &'static str,
    path: &Path,
    limits: &process::Limits,
    watch: Option<&dyn Fn() -> Option<String>>,
) -> Result<Vec<u8>, Error> {
    let shown = format!("qemu-img {op}");
    let ran = match watch {
        Some(w) => process::run_watched(cmd, &shown, limits, w),
        None => process::run(cmd, &shown, limits),
    };
    let out = ran.map_err(|e| match e {
        process::Error::Stopped { why, .. } => Error::Stopped {
            op,
            path: path.to_owned(),
            why,
        },
        other => Error::Missing(other.to_string()),
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(Error::Failed {
        op,
        path: path.to_owned(),
        status: out.status.to_string(),
        stderr: out.stderr,
    })
}
