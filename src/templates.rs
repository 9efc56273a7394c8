//! Ephemeral and swap templates in `_base`, built once under their locks (imgcache's and Nova's):
//! a sparse file formatted with mkfs (`ephemeral_<GiB>_<md5(filesystem)[:7]>`) or mkswap
//! (`swap_<MiB>`), named exactly as Nova names them, so Nova's cache manager counts the ones its
//! instances use and a hard reboot finds its template where it looks. Instance disks are then
//! copied or overlaid from the template.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cache::Cache;
use crate::error::Kind;
use crate::fsutil;
use crate::process;
use crate::progress::Reporter;

/// Label of ephemeral filesystems, as Nova's `_get_fs_label`.
pub const EPHEMERAL_LABEL: &str = "ephemeral0";

/// Filesystems an ephemeral disk can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Vfat,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Ext2 => "ext2",
            Fs::Ext3 => "ext3",
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
            Fs::Vfat => "vfat",
        }
    }

    /// mkfs options, as in Nova's default mkfs commands.
    fn options(self) -> &'static [&'static str] {
        match self {
            Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => &["-F", "-L", EPHEMERAL_LABEL],
            Fs::Xfs => &["-f", "-L", EPHEMERAL_LABEL],
            Fs::Vfat => &["-n", EPHEMERAL_LABEL],
        }
    }

    fn package(self) -> &'static str {
        match self {
            Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => "e2fsprogs",
            Fs::Xfs => "xfsprogs",
            Fs::Vfat => "dosfstools",
        }
    }

    /// The command line the template name hashes: `mkfs -t <fs> <options>`.
    pub fn command(self) -> String {
        format!("mkfs -t {} {}", self.name(), self.options().join(" "))
    }
}

/// Template failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found; install it: apt-get install {package}")]
    Missing { tool: String, package: String },
    #[error("{tool} failed on {path} ({status}): {stderr}")]
    Failed {
        tool: String,
        path: PathBuf,
        status: String,
        stderr: String,
    },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        Kind::Tool
    }
}

/// Entry name of an ephemeral template, as Nova's `get_file_extension_for_os_type` names it
/// for the filesystem it was given (`[DEFAULT] default_ephemeral_format`, no `virt_mkfs`
/// command): the first 7 hex digits of the MD5 of the filesystem's name. Nova's default, with
/// no format configured, hashes "vfat".
pub fn ephemeral_name(gib: u64, fs: Fs) -> String {
    // libcrypto's MD5 (already linked for Glance's hashes); it names a file, it secures nothing.
    let hash = openssl::hash::hash(openssl::hash::MessageDigest::md5(), fs.name().as_bytes())
        .map(|d| hex::encode(&*d))
        .unwrap_or_default();
    format!("ephemeral_{gib}_{}", hash.get(..7).unwrap_or("0000000"))
}

/// Entry name of a swap template.
pub fn swap_name(mib: u64) -> String {
    format!("swap_{mib}")
}

/// One template to build: a sparse file of `size` bytes formatted by `tool args <file>`.
struct Template<'a> {
    name: String,
    size: u64,
    tool: String,
    package: &'static str,
    args: Vec<String>,
    lock_timeout: Duration,
    rep: &'a dyn Reporter,
}

/// Makes sure the ephemeral template exists; returns its path.
pub fn ephemeral(
    cache: &Cache,
    gib: u64,
    fs: Fs,
    lock_timeout: Duration,
    rep: &dyn Reporter,
) -> Result<PathBuf> {
    let mut args: Vec<String> = fs.options().iter().map(|s| s.to_string()).collect();
    if fs == Fs::Vfat {
        // Large vfat volumes need FAT32 explicitly.
        args.insert(0, "-F".into());
        args.insert(1, "32".into());
    }
    Template {
        name: ephemeral_name(gib, fs),
        size: gib << 30,
        tool: format!("mkfs.{}", fs.name()),
        package: fs.package(),
        args,
        lock_timeout,
        rep,
    }
    .build(cache)
}

/// Makes sure the swap template exists; returns its path.
pub fn swap(
    cache: &Cache,
    mib: u64,
    lock_timeout: Duration,
    rep: &dyn Reporter,
) -> Result<PathBuf> {
    Template {
        name: swap_name(mib),
        size: mib << 20,
        tool: "mkswap".into(),
        package: "util-linux",
        args: Vec::new(),
        lock_timeout,
        rep,
    }
    .build(cache)
}

impl Template<'_> {
    fn missing(&self) -> Error {
        Error::Missing {
            tool: self.tool.clone(),
            package: self.package.to_owned(),
        }
    }

    /// Builds the template under its lock unless it exists (checked again under the lock).
    fn build(&self, cache: &Cache) -> Result<PathBuf> {
        let entry = cache.entry(&self.name);
        let path = entry.path();
        if entry.exists() {
            return Ok(path);
        }
        let binary = process::find_tool(&self.tool).ok_or_else(|| self.missing())?;
        cache.ensure_dirs()?;
        let _lock = entry.lock(
            &format!("template {}", self.name),
            self.lock_timeout,
            self.rep,
        )?;
        if entry.exists() {
            return Ok(path);
        }
        let tmp = entry.part_path();
        // Anything but our own regular files at these paths is refused, never followed.
        for p in [&path, &tmp] {
            fsutil::check_not_foreign(p).with_context(|| format!("template {}", self.name))?;
        }
        // Under the lock a `.part` is a killed run's: start from a new file.
        fsutil::remove_own(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
        let result = self.format(&binary, &tmp).and_then(|f| {
            fsutil::persist(&f, &tmp, &path)
                .with_context(|| format!("cannot move {} into place", path.display()))
        });
        if result.is_err() {
            let _ = fsutil::remove_own(&tmp);
        }
        result.map(|()| path)
    }

    /// Creates `tmp` (new, sparse, `size` bytes) and runs the tool on it, through our
    /// descriptor (the tool never opens a path someone could swap). Returns the file.
    fn format(&self, binary: &Path, tmp: &Path) -> Result<std::fs::File> {
        let f =
            fsutil::create_new(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.set_len(self.size)
            .with_context(|| format!("cannot size {}", tmp.display()))?;
        self.rep.debug(&format!(
            "{} {} {}",
            binary.display(),
            self.args.join(" "),
            tmp.display()
        ));
        let mut cmd = Command::new(binary);
        cmd.args(&self.args).arg(process::fd_path(&f));
        let limits = process::Limits {
            pass_fds: vec![std::os::fd::AsRawFd::as_raw_fd(&f)],
            ..process::Limits::default()
        };
        let out = process::run(cmd, &self.tool, &limits).map_err(|_| self.missing())?;
        if !out.status.success() {
            return Err(Error::Failed {
                tool: self.tool.clone(),
                path: tmp.to_owned(),
                status: out.status.to_string(),
                stderr: out.stderr,
            }
            .into());
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_nova() {
        assert_eq!(swap_name(512), "swap_512");
        // Nova's names: md5("ext4")[:7], md5("vfat")[:7].
        assert_eq!(ephemeral_name(10, Fs::Ext4), "ephemeral_10_40d1d2c");
        assert_eq!(ephemeral_name(1, Fs::Vfat), "ephemeral_1_0706d66");
        assert_ne!(ephemeral_name(10, Fs::Ext4), ephemeral_name(10, Fs::Xfs));
        assert_eq!(Fs::Ext4.command(), "mkfs -t ext4 -F -L ephemeral0");
    }
}
