//! Filesystem images made from a directory tree by external tools, through `process`: an
//! ISO 9660 image with Rock Ridge and Joliet (`genisoimage`, as Nova's `mkisofs_cmd`), or a
//! FAT volume (`mkfs.vfat`, then `mcopy` from mtools, which writes into the image file without
//! mounting it). The tools write to a file we hold open (`/dev/fd/N`), never to a path.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::Kind;
use crate::process;

/// Longest any one tool may run on a config-drive-sized tree.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// A tool missing or failing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found; install it: apt-get install {package}")]
    Missing { tool: String, package: String },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{tool}: {source}")]
    Run {
        tool: String,
        source: process::Error,
    },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        Kind::Tool
    }
}

/// Writes an ISO 9660 image (Rock Ridge, Joliet) of `tree` labelled `label` into `out`, with
/// the options of Nova's `_make_iso9660`.
pub fn iso9660(tree: &Path, label: &str, publisher: &str, out: &File) -> Result<(), Error> {
    let tool = find("genisoimage", "genisoimage")?;
    let mut cmd = Command::new(&tool);
    cmd.arg("-o").arg(process::fd_path(out));
    cmd.args([
        "-ldots",
        "-allow-lowercase",
        "-allow-multidot",
        "-l",
        "-publisher",
        publisher,
        "-quiet",
        "-J",
        "-r",
        "-V",
        label,
    ]);
    cmd.arg(tree);
    run(cmd, "genisoimage", out)
}

/// Formats `out` (already sized) as FAT labelled `label` and copies the contents of `tree`
/// into its root, as Nova's `_make_vfat` does by mounting it.
pub fn vfat(tree: &Path, label: &str, out: &File) -> Result<(), Error> {
    let mkfs = find("mkfs.vfat", "dosfstools")?;
    let mcopy = find("mcopy", "mtools")?;
    let mut cmd = Command::new(&mkfs);
    cmd.args(["-n", label]).arg(process::fd_path(out));
    run(cmd, "mkfs.vfat", out)?;
    let entries = std::fs::read_dir(tree).map_err(|e| Error::Failed {
        tool: "mcopy".into(),
        status: "not run".into(),
        stderr: format!("cannot list {}: {e}", tree.display()),
    })?;
    let mut cmd = Command::new(&mcopy);
    // -s recursive, -p keep attributes, -Q stop at the first error, -m keep mtimes.
    cmd.args(["-s", "-p", "-Q", "-m", "-i"])
        .arg(process::fd_path(out));
    let mut sources: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    sources.sort();
    cmd.args(&sources).arg("::/");
    // mtools refuses to run on an image it cannot lock unless told; our descriptor is private.
    cmd.env("MTOOLS_SKIP_CHECK", "1");
    run(cmd, "mcopy", out)
}

fn run(cmd: Command, tool: &str, out: &File) -> Result<(), Error> {
    let limits = process::Limits {
        timeout: Some(TOOL_TIMEOUT),
        pass_fds: vec![out.as_raw_fd()],
        ..process::Limits::default()
    };
    let o = process::run(cmd, tool, &limits).map_err(|source| Error::Run {
        tool: tool.into(),
        source,
    })?;
    if !o.status.success() {
        return Err(Error::Failed {
            tool: tool.into(),
            status: o.status.to_string(),
            stderr: o.stderr,
        });
    }
    Ok(())
}

/// The tool, or the package to install for it.
fn find(tool: &str, package: &str) -> Result<PathBuf, Error> {
    process::find_tool(tool).ok_or_else(|| Error::Missing {
        tool: tool.into(),
        package: package.into(),
    })
}
