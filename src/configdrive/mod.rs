//! Nova's config drive (`<instance>/disk.config`, labelled `config-2`): the operator's inputs
//! checked and loaded ([`input`]: `Spec::load`, every problem a usage error naming its flag),
//! the metadata tree Nova's `metadata_for_config_drive` writes ([`tree`]: `Spec::tree`), and
//! the drive made from it ([`make`]) as ISO 9660 or vfat under a temp name, fsynced and renamed
//! into place. Re-runs compare a digest of the inputs kept in `disk.config.info`: the drive
//! itself carries fresh random seeds and timestamps, so it is never byte-identical to an
//! earlier one.

mod input;
mod tree;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::digest;
use crate::error::Kind;
use crate::fsimage;
use crate::fsutil::{self, PrivateDir, TempFile};
pub use input::{Flags, MAX_USER_DATA, Spec};

/// The drive's file name in the instance directory (Nova's).
pub const FILE: &str = "disk.config";
/// Beside it: what it was made from (format, digest of the inputs, size, content digest).
pub const INFO_FILE: &str = "disk.config.info";
/// The volume label cloud-init's ConfigDrive datasource looks for.
pub const LABEL: &str = "config-2";
/// Size of a vfat drive: Nova's `CONFIGDRIVESIZE_BYTES`.
pub const VFAT_SIZE: u64 = 64 << 20;
/// Filesystems a config drive can carry (Nova's `config_drive_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Iso9660,
    Vfat,
}

/// Failures making the drive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} already exists and was made from other config drive inputs (or by another tool); pass --force to replace it"
    )]
    Exists { path: PathBuf },
    #[error("cannot get random bytes for random_seed: {0}")]
    Random(String),
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Exists { .. } => Kind::Conflict,
            Error::Random(_) => Kind::Other,
        }
    }
}

/// What `disk.config.info` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub format: Format,
    /// [`Spec::fingerprint`] of the inputs.
    pub inputs: String,
    pub size: u64,
    /// [`digest::of_file`] of the drive.
    pub content: String,
}

/// What [`make`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// A drive from other inputs was replaced (`force`).
    Replaced,
    /// A drive from these inputs was already there, unchanged since.
    Exists,
}

/// Makes `dir/disk.config` from `spec` unless the one there was made from the same inputs (and
/// is unchanged since); a drive from other inputs, or one without its record, is a conflict
/// unless `force`. The tree is built in a private directory under the system temp directory
/// and removed afterwards; the drive is built under a temp name in `dir` and renamed into
/// place, then its record written. Returns what happened and the drive's size.
pub fn make(dir: &Path, spec: &Spec, force: bool) -> Result<(Outcome, u64)> {
    let target = dir.join(FILE);
    let info_path = dir.join(INFO_FILE);
    let inputs = spec.fingerprint();
    let outcome =
        match fsutil::stat(&target).with_context(|| format!("cannot stat {}", target.display()))? {
            None => Outcome::Created,
            Some(_) => {
                if let Some(size) = unchanged(&target, &info_path, &inputs, spec.format) {
                    return Ok((Outcome::Exists, size));
                }
                if !force {
                    return Err(Error::Exists { path: target }.into());
                }
                // Only a regular file of ours is replaced; anything else is refused, never followed.
                fsutil::check_not_foreign(&target)?;
                Outcome::Replaced
            }
        };
    let tmp = TempFile::new(dir, FILE)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    build(spec, &tmp)?;
    let size = tmp.file().metadata()?.len();
    let content = digest::of_file(tmp.file())
        .with_context(|| format!("cannot read back {}", tmp.path().display()))?;
    // The old record goes first: a crash before the new one is written leaves a drive without
    // a record, which the next run treats as a conflict, never as matching.
    fsutil::remove_own(&info_path)
        .with_context(|| format!("cannot remove {}", info_path.display()))?;
    tmp.persist(&target)
        .with_context(|| format!("cannot move {} into place", target.display()))?;
    let info = Info {
        format: spec.format,
        inputs,
        size,
        content,
    };
    if let Err(e) = fsutil::write_json(&info_path, &info) {
        // A drive without its record would be a conflict on the next run: one this run
        // created goes again.
        if outcome == Outcome::Created {
            let _ = fsutil::remove_own(&target);
        }
        return Err(anyhow::Error::new(e).context(format!("cannot write {}", info_path.display())));
    }
    Ok((outcome, size))
}

/// The drive's size if its record says it was made from `inputs` and its content still is
/// what was recorded.
fn unchanged(target: &Path, info_path: &Path, inputs: &str, format: Format) -> Option<u64> {
    let info: Info = fsutil::read_json(info_path)?;
    if info.inputs != inputs || info.format != format {
        return None;
    }
    let f = fsutil::open_regular(target).ok()?;
    let size = f.metadata().ok()?.len();
    (size == info.size && digest::of_file(&f).ok()? == info.content).then_some(size)
}

/// Writes the tree into a private directory and the filesystem into `tmp`.
fn build(spec: &Spec, tmp: &TempFile) -> Result<()> {
    let tree = PrivateDir::new(&std::env::temp_dir(), "imgcache-configdrive-")
        .context("cannot create a private directory for the config drive's files")?;
    for (path, bytes) in spec.tree()? {
        tree.write(Path::new(&path), &bytes)
            .with_context(|| format!("cannot write {path} under {}", tree.path().display()))?;
    }
    match spec.format {
        Format::Iso9660 => {
            let publisher = format!("imgcache {}", env!("CARGO_PKG_VERSION"));
            fsimage::iso9660(tree.path(), LABEL, &publisher, tmp.file())?;
        }
        Format::Vfat => {
            tmp.file()
                .set_len(VFAT_SIZE)
                .with_context(|| format!("cannot size {}", tmp.path().display()))?;
            fsimage::vfat(tree.path(), LABEL, tmp.file())?;
        }
    }
    Ok(())
}
