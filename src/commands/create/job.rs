//! What every part of `create` shares: the request, the job (cache, Glance, options, instance),
//! the bases disks are made from, what was made, and the errors particular to instance disks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cache::{self, Cache, EntryLock};
use crate::configdrive;
use crate::error::Kind;
use crate::fetch;
use crate::fsutil;
use crate::glance;
use crate::inspect;
use crate::instance::Instance;
use crate::openstack;
use crate::progress::Reporter;
use crate::qemu_img;
use crate::rbd;
use crate::templates;
use crate::units;

/// Times a base may vanish (pruned) between fetching it and locking it before we give up.
const BASE_ATTEMPTS: u32 = 3;

/// Instance disk formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A full copy of the base (reflink or sparse copy), extended (Nova's Flat).
    Raw,
    /// A qcow2 overlay backed by the base (Nova's use_cow_images, the default).
    Qcow2,
    /// A Ceph RBD clone of the image, imported into the images pool once (Nova's rbd backend).
    Rbd,
}

/// What to create, resolved from the command line.
#[derive(Debug)]
pub struct Request {
    pub cache: Cache,
    pub instance: String,
    pub image: String,
    /// Root disk size in bytes; 0 = the image's virtual size.
    pub root_size: u64,
    pub backend: Backend,
    pub ephemeral_gib: Option<u64>,
    pub ephemeral_fs: templates::Fs,
    pub swap_mib: Option<u64>,
    pub preallocate: bool,
    pub force: bool,
    /// With the rbd backend: keep the local `_base` entry after importing it.
    pub keep_local_base: bool,
    /// `--config-drive`: what goes on `disk.config`.
    pub config_drive: Option<configdrive::Spec>,
    pub cluster: rbd::Cluster,
    pub access: openstack::Access,
    pub opts: fetch::Options,
    pub json: bool,
}

/// Failures particular to instance disks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "requested {what} size {requested} ({requested_h}) is smaller than the image's virtual size {virtual_size} ({virtual_h}); pick a larger flavor or --size (disks are never shrunk)"
    )]
    TooSmall {
        what: &'static str,
        requested: u64,
        requested_h: String,
        virtual_size: u64,
        virtual_h: String,
    },
    #[error("{path} already exists and {why}; pass --force to replace it")]
    Exists { path: PathBuf, why: String },
    #[error(
        "base {path} changed format: expected {expected}, found {found}; refusing to use it as a backing file"
    )]
    BaseChanged {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("base {path} keeps disappearing (pruned while in use?); run the command again")]
    BaseGone { path: PathBuf },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::TooSmall { .. } => Kind::Usage,
            Error::Exists { .. } => Kind::Conflict,
            Error::BaseChanged { .. } => Kind::Refused,
            Error::BaseGone { .. } => Kind::Other,
        }
    }
}

/// What happened to one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    /// A differing disk was replaced (`--force`).
    Replaced,
    /// A matching disk was already there.
    Exists,
}

/// One file placed (or found already in place) in the instance directory.
#[derive(Debug, Serialize)]
pub struct Made {
    pub role: &'static str,
    pub path: PathBuf,
    pub format: String,
    pub size: u64,
    pub base: PathBuf,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
}

/// A base the instance will use.
pub struct Base {
    pub name: String,
    pub path: PathBuf,
    /// Format of the base file (`raw`, or the source format with --no-force-raw).
    pub format: String,
    pub virtual_size: u64,
    pub image_id: Option<String>,
    pub properties: serde_json::Map<String, serde_json::Value>,
}

impl Base {
    /// A template (ephemeral, swap) described as a base.
    pub fn template(path: PathBuf, size: u64) -> Result<Base> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow::anyhow!("template path has no name"))?;
        Ok(Base {
            name,
            path,
            format: "raw".into(),
            virtual_size: size,
            image_id: None,
            properties: serde_json::Map::new(),
        })
    }
}

/// One `create` run.
pub struct Job<'a> {
    pub req: &'a Request,
    pub client: &'a glance::Client,
    pub inst: &'a Instance,
    pub rep: &'a dyn Reporter,
}

impl Job<'_> {
    pub fn cache(&self) -> &Cache {
        &self.req.cache
    }

    /// Fetches (if needed) and describes an image's base.
    pub fn image_base(&self, id: &str, opts: &fetch::Options) -> Result<Base> {
        cache::validate_id("image id", id)?;
        let f = fetch::ensure(self.cache(), self.client, id, opts, self.rep)?;
        let name = cache::entry_name(id);
        Ok(match f.record {
            Some(r) => Base {
                name,
                path: f.path,
                format: r.format,
                virtual_size: r.virtual_size,
                image_id: Some(id.to_owned()),
                properties: r.properties,
            },
            None => {
                // A base made by another tool (Nova with `force_raw_images = False` leaves
                // qcow2): never assumed raw. The inspector decides its format and runs its
                // safety checks, qemu-img gives the second opinion and the size, Glance the
                // properties.
                let file = fsutil::open_regular(&f.path)
                    .with_context(|| format!("cannot open {}", f.path.display()))?;
                let report = inspect::inspect_file(&file, &f.path, &opts.limits)?;
                let format = report.format.qemu_name();
                let info = qemu_img::info_file(&file, &f.path, format)?;
                fetch::second_opinion(&report, &info)?;
                if format != "raw" {
                    self.rep.warn(&format!(
                        "{} has no imgcache record and is {format}, not raw; it is used as {format}",
                        f.path.display()
                    ));
                }
                let properties = self
                    .client
                    .show(id)
                    .map(|i| i.properties())
                    .unwrap_or_default();
                Base {
                    name,
                    path: f.path,
                    format: format.into(),
                    virtual_size: info.virtual_size,
                    image_id: Some(id.to_owned()),
                    properties,
                }
            }
        })
    }

    /// Takes the base's lock and marks it in use (mtime = now), re-checking that it still
    /// exists: a prune deletes only under this lock and only what is old, so from here on the
    /// base stays.
    pub fn lock_base(&self, base: &Base) -> Result<EntryLock> {
        let entry = self.cache().entry(&base.name);
        let opts = &self.req.opts;
        for _ in 0..BASE_ATTEMPTS {
            let lock = entry.lock(&format!("base {}", base.name), opts.lock_timeout, self.rep)?;
            match fsutil::touch(&base.path) {
                Ok(()) => return Ok(lock),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    drop(lock);
                    // Pruned between fetch and lock: fetch it again (images only; templates
                    // are rebuilt by the next run).
                    if let Some(id) = &base.image_id {
                        fetch::ensure(self.cache(), self.client, id, opts, self.rep)?;
                    }
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot touch {}", base.path.display())));
                }
            }
        }
        Err(Error::BaseGone {
            path: base.path.clone(),
        }
        .into())
    }
}

/// Sets a base's mtime to now: "in use" for prune. Done under the base's lock before a disk is
/// made from it and again after, so a prune whose scan started before the disk appeared sees a
/// base touched after its scan began and keeps it.
pub fn touch(path: &std::path::Path) -> Result<()> {
    fsutil::touch(path)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot touch {}", path.display())))
}

/// The root disk size: the request, or the image's virtual size for 0; never smaller.
pub fn check_size(requested: u64, virtual_size: u64) -> Result<u64> {
    let size = if requested == 0 {
        virtual_size
    } else {
        requested
    };
    if size < virtual_size {
        return Err(Error::TooSmall {
            what: "root disk",
            requested: size,
            requested_h: units::human(size),
            virtual_size,
            virtual_h: units::human(virtual_size),
        }
        .into());
    }
    Ok(size)
}
