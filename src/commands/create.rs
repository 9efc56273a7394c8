//! `imgcache create INSTANCE --image ID`: the disks of one instance, made from cached bases —
//! root disk (raw copy or qcow2 overlay, extended to the flavor size), kernel and ramdisk,
//! ephemeral and swap disks from templates, then `disk.info` and the usage record.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::Outcome;
use crate::cache::{self, Cache};
use crate::cli::{Backend, CreateArgs, Global};
use crate::commands::fetch::{fetch_options, glance_settings};
use crate::disk;
use crate::error::{Kind, UsageError};
use crate::fetch;
use crate::glance;
use crate::inspect::{self, Format};
use crate::instance::{self, DiskRecord, Instance, TempFile};
use crate::progress::Reporter;
use crate::qemu_img;
use crate::size;
use crate::templates;

/// Times a base may vanish (pruned) between fetching it and locking it before we give up.
const BASE_ATTEMPTS: u32 = 3;

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

/// Runs the command.
pub fn run(global: &Global, args: CreateArgs, rep: &dyn Reporter) -> Result<Outcome> {
    cache::validate_id("image id", &args.image)?;
    let root_size = size::parse("--size", &args.size)?;
    let ephemeral_gib = args
        .ephemeral
        .as_deref()
        .map(|s| whole_units("--ephemeral", s, 30, "GiB"))
        .transpose()?;
    let swap_mib = args
        .swap
        .as_deref()
        .map(|s| whole_units("--swap", s, 20, "MiB"))
        .transpose()?;
    let cache = Cache::new(&global.instances_path, &global.base_dir_name)?;
    let inst = Instance::resolve(&cache, &args.instance)?;
    let client = glance::Client::new(&glance_settings(&args.glance)?)?;
    let opts = fetch_options(&args.glance, &args.fetch)?;

    cache.ensure_dirs()?;
    let _instance_lock = cache.lock(
        &format!("instance-{}", inst.name),
        &format!("instance {}", inst.name),
        opts.lock_timeout,
        &|what| {
            rep.info(&format!(
                "waiting for the lock on {what} (another create or delete)"
            ))
        },
    )?;
    let created_dir = inst.ensure_dir()?;
    // Under the instance lock no other create runs here: temp files are a killed run's.
    inst.remove_stale_temps();
    let job = Job {
        cache: &cache,
        client: &client,
        opts: &opts,
        inst: &inst,
        args: &args,
        rep,
    };
    let result = job.build(root_size, ephemeral_gib, swap_mib);
    if result.is_err() && created_dir {
        // Everything this run made is gone already (temp files clean themselves up); remove
        // the directory only if it is empty, so nothing of anyone else's is touched.
        let _ = fs::remove_dir(&inst.dir);
    }
    let disks = result?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(
            &mut out,
            &Report {
                instance: &inst.name,
                dir: &inst.dir,
                disks: &disks,
            },
        )?;
        writeln!(out)?;
    } else {
        for d in &disks {
            writeln!(out, "{}", d.path.display())?;
        }
    }
    out.flush()?;
    Ok(Outcome::Success)
}

/// A size that must be a whole number of `unit`s (Nova's ephemeral_gb, swap MiB).
fn whole_units(what: &str, s: &str, shift: u32, unit: &str) -> Result<u64, UsageError> {
    let bytes = size::parse(what, s)?;
    if bytes == 0 || bytes % (1 << shift) != 0 {
        return Err(UsageError(format!(
            "invalid {what} {s:?}: must be a positive whole number of {unit}"
        )));
    }
    Ok(bytes >> shift)
}

#[derive(Serialize)]
struct Report<'a> {
    instance: &'a str,
    dir: &'a Path,
    disks: &'a [Made],
}

/// One file placed (or found already in place) in the instance directory.
#[derive(Debug, Serialize)]
pub(crate) struct Made {
    pub(crate) role: &'static str,
    pub(crate) path: PathBuf,
    pub(crate) format: String,
    pub(crate) size: u64,
    pub(crate) base: PathBuf,
    /// `created`, `replaced` or `exists`.
    pub(crate) status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<&'static str>,
}

pub(crate) struct Job<'a> {
    pub(crate) cache: &'a Cache,
    pub(crate) client: &'a glance::Client,
    pub(crate) opts: &'a fetch::Options,
    pub(crate) inst: &'a Instance,
    pub(crate) args: &'a CreateArgs,
    pub(crate) rep: &'a dyn Reporter,
}

/// A base the instance will use.
pub(crate) struct Base {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    /// Format of the base file (`raw`, or the source format with --no-force-raw).
    pub(crate) format: String,
    pub(crate) virtual_size: u64,
    pub(crate) image_id: Option<String>,
    pub(crate) properties: serde_json::Map<String, serde_json::Value>,
}

impl Job<'_> {
    fn build(
        &self,
        root_size: u64,
        ephemeral_gib: Option<u64>,
        swap_mib: Option<u64>,
    ) -> Result<Vec<Made>> {
        // Ephemeral and swap disks stay local files with the rbd backend (qcow2 overlays).
        let backend = match self.args.backend {
            Backend::Rbd => Backend::Qcow2,
            other => other,
        };
        let mut made = Vec::new();
        let mut records = BTreeMap::new();

        let root = if self.args.backend == Backend::Rbd {
            let (root, disk) =
                crate::commands::create_rbd::root_disk(self, root_size, &mut records)?;
            made.push(disk);
            root
        } else {
            let root = self.image_base(&self.args.image, self.opts)?;
            let size = check_size(root_size, root.virtual_size)?;
            made.push(self.disk("root", "disk", &root, backend, size, &mut records)?);
            root
        };

        // Kernel and ramdisk images are used as they are, never converted.
        let raw_as_is = fetch::Options {
            force_raw: false,
            ..self.opts.clone()
        };
        for (prop, file, role) in [
            ("kernel_id", "kernel", "kernel"),
            ("ramdisk_id", "ramdisk", "ramdisk"),
        ] {
            let Some(id) = root.properties.get(prop).and_then(|v| v.as_str()) else {
                continue;
            };
            let id = id.to_owned();
            let base = self.image_base(&id, &raw_as_is)?;
            made.push(self.plain_copy(role, file, &base, &mut records)?);
        }

        if let Some(gib) = ephemeral_gib {
            let path = templates::ephemeral(
                self.cache,
                gib,
                self.args.ephemeral_fs,
                self.opts.lock_timeout,
                self.rep,
            )?;
            let base = template_base(path, gib << 30)?;
            made.push(self.disk(
                "ephemeral",
                "disk.local",
                &base,
                backend,
                gib << 30,
                &mut records,
            )?);
        }
        if let Some(mib) = swap_mib {
            let path = templates::swap(self.cache, mib, self.opts.lock_timeout, self.rep)?;
            let base = template_base(path, mib << 20)?;
            made.push(self.disk("swap", "disk.swap", &base, backend, mib << 20, &mut records)?);
        }

        self.inst.write_disk_info(&records)?;
        let mut bases: Vec<String> = records.values().map(|d| d.base.clone()).collect();
        bases.sort();
        bases.dedup();
        self.inst.write_record(&instance::Record {
            instance: self.inst.name.clone(),
            bases,
            disks: records,
            updated_at: cache::now_stamp().1,
        })?;
        Ok(made)
    }

    /// Fetches (if needed) and describes an image's base.
    pub(crate) fn image_base(&self, id: &str, opts: &fetch::Options) -> Result<Base> {
        cache::validate_id("image id", id)?;
        let f = fetch::ensure(self.cache, self.client, id, opts, self.rep)?;
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
                // A base made by another tool: Nova's bases are raw; ask qemu-img for its size
                // and Glance for the properties.
                let info = qemu_img::info(&f.path, "raw")?;
                let properties = self
                    .client
                    .show(id)
                    .map(|i| i.properties())
                    .unwrap_or_default();
                Base {
                    name,
                    path: f.path,
                    format: "raw".into(),
                    virtual_size: info.virtual_size,
                    image_id: Some(id.to_owned()),
                    properties,
                }
            }
        })
    }

    /// Makes `<instance>/<file>` from `base` with the chosen backend, under the base's lock.
    fn disk(
        &self,
        role: &'static str,
        file: &str,
        base: &Base,
        backend: Backend,
        size: u64,
        records: &mut BTreeMap<String, DiskRecord>,
    ) -> Result<Made> {
        let target = self.inst.file(file);
        let format = match backend {
            Backend::Raw => "raw",
            Backend::Qcow2 | Backend::Rbd => "qcow2",
        };
        records.insert(
            file.to_owned(),
            DiskRecord {
                format: format.into(),
                size,
                base: base.name.clone(),
                image_id: base.image_id.clone(),
                rbd: None,
            },
        );
        let existing = self.existing(&target, backend, base, size)?;
        let mut made = Made {
            role,
            path: target.clone(),
            format: format.into(),
            size,
            base: base.path.clone(),
            status: if existing.is_some() {
                "replaced"
            } else {
                "created"
            },
            method: None,
        };
        let _lock = self.lock_base(base)?;
        if existing == Some(true) {
            made.status = "exists";
            return Ok(made);
        }
        let tmp = TempFile::new(&self.inst.dir, file);
        match backend {
            Backend::Raw => {
                if base.format != "raw" {
                    return Err(UsageError(format!(
                        "base {} is {}, not raw; a raw instance disk needs a raw base (fetch without --no-force-raw)",
                        base.path.display(),
                        base.format
                    ))
                    .into());
                }
                let method = disk::copy_sparse(&base.path, tmp.path()).with_context(|| {
                    format!(
                        "cannot copy {} to {}",
                        base.path.display(),
                        tmp.path().display()
                    )
                })?;
                made.method = Some(method.name());
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(tmp.path())
                    .with_context(|| format!("cannot open {}", tmp.path().display()))?;
                if f.metadata()?.len() < size {
                    f.set_len(size)
                        .with_context(|| format!("cannot extend {}", tmp.path().display()))?;
                }
            }
            Backend::Qcow2 | Backend::Rbd => {
                // The base is re-checked before it becomes a backing file: it must still be
                // what the record says (a raw base that now parses as qcow2 is refused).
                let found = inspect::inspect_path(&base.path)?;
                if found.format.qemu_name() != base.format {
                    return Err(Error::BaseChanged {
                        path: base.path.clone(),
                        expected: base.format.clone(),
                        found: found.format.name().into(),
                    }
                    .into());
                }
                qemu_img::create_overlay(tmp.path(), &base.path, &base.format, size)?;
            }
        }
        if self.args.preallocate {
            let keep_size = backend == Backend::Qcow2;
            let done = disk::preallocate(tmp.path(), size, keep_size)
                .with_context(|| format!("cannot preallocate {}", tmp.path().display()))?;
            if !done {
                self.rep.warn(&format!(
                    "{}: the filesystem cannot preallocate; the disk stays sparse",
                    target.display()
                ));
            }
        }
        tmp.persist(&target)?;
        touch(&base.path)?;
        Ok(made)
    }

    /// Copies a kernel or ramdisk into the instance directory, as it is.
    fn plain_copy(
        &self,
        role: &'static str,
        file: &str,
        base: &Base,
        records: &mut BTreeMap<String, DiskRecord>,
    ) -> Result<Made> {
        let target = self.inst.file(file);
        let size = fs::metadata(&base.path)
            .with_context(|| format!("cannot stat {}", base.path.display()))?
            .len();
        records.insert(
            file.to_owned(),
            DiskRecord {
                format: "file".into(),
                size,
                base: base.name.clone(),
                image_id: base.image_id.clone(),
                rbd: None,
            },
        );
        let _lock = self.lock_base(base)?;
        let mut made = Made {
            role,
            path: target.clone(),
            format: "file".into(),
            size,
            base: base.path.clone(),
            status: "created",
            method: None,
        };
        if fs::symlink_metadata(&target).is_ok() {
            if same_content(&target, &base.path)? {
                made.status = "exists";
                return Ok(made);
            }
            if !self.args.force {
                return Err(Error::Exists {
                    path: target,
                    why: format!("differs from {}", base.path.display()),
                }
                .into());
            }
            made.status = "replaced";
        }
        let tmp = TempFile::new(&self.inst.dir, file);
        let method = disk::copy_sparse(&base.path, tmp.path())
            .with_context(|| format!("cannot copy {}", base.path.display()))?;
        made.method = Some(method.name());
        tmp.persist(&target)?;
        touch(&base.path)?;
        Ok(made)
    }

    /// Takes the base's lock and marks it in use (mtime = now), re-checking that it still
    /// exists: a prune deletes only under this lock and only what is old, so from here on the
    /// base stays.
    pub(crate) fn lock_base(&self, base: &Base) -> Result<crate::lock::FileLock> {
        for _ in 0..BASE_ATTEMPTS {
            let lock = self.cache.lock(
                &base.name,
                &format!("base {}", base.name),
                self.opts.lock_timeout,
                &|what| self.rep.info(&format!("waiting for the lock on {what}")),
            )?;
            match touch(&base.path) {
                Ok(()) => return Ok(lock),
                Err(e) if is_not_found(&e) => {
                    drop(lock);
                    // Pruned between fetch and lock: fetch it again (images only; templates
                    // are rebuilt by the next run).
                    if let Some(id) = &base.image_id {
                        fetch::ensure(self.cache, self.client, id, self.opts, self.rep)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::BaseGone {
            path: base.path.clone(),
        }
        .into())
    }

    /// `None` if there is no disk at `target`; `Some(true)` if it matches the request and may be
    /// kept; `Some(false)` if it differs and `--force` allows replacing it. Without `--force` a
    /// differing disk is an error.
    fn existing(
        &self,
        target: &Path,
        backend: Backend,
        base: &Base,
        size: u64,
    ) -> Result<Option<bool>> {
        let meta = match fs::symlink_metadata(target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot stat {}", target.display()))
                );
            }
        };
        let why = if !meta.is_file() {
            Some("is not a regular file".to_owned())
        } else {
            match backend {
                Backend::Raw => {
                    let detected = inspect::inspect_path(target)?;
                    if detected.format != Format::Raw {
                        Some(format!("is {}, not raw", detected.format.name()))
                    } else if meta.len() != size {
                        Some(format!("is {} bytes, not {size}", meta.len()))
                    } else {
                        None
                    }
                }
                Backend::Qcow2 | Backend::Rbd => match qemu_img::info(target, "qcow2") {
                    Err(_) => Some("is not a qcow2 image".to_owned()),
                    Ok(info) if info.virtual_size != size => Some(format!(
                        "has virtual size {}, not {size}",
                        info.virtual_size
                    )),
                    Ok(info)
                        if info.backing_filename.as_deref().map(Path::new) != Some(&base.path) =>
                    {
                        Some(format!(
                            "is backed by {:?}, not {}",
                            info.backing_filename.unwrap_or_default(),
                            base.path.display()
                        ))
                    }
                    Ok(_) => None,
                },
            }
        };
        match why {
            None => Ok(Some(true)),
            Some(_) if self.args.force => Ok(Some(false)),
            Some(why) => Err(Error::Exists {
                path: target.to_owned(),
                why,
            }
            .into()),
        }
    }
}

/// The root disk size: the request, or the image's virtual size for 0; never smaller.
pub(crate) fn check_size(requested: u64, virtual_size: u64) -> Result<u64> {
    let size = if requested == 0 {
        virtual_size
    } else {
        requested
    };
    if size < virtual_size {
        return Err(Error::TooSmall {
            what: "root disk",
            requested: size,
            requested_h: size::human(size),
            virtual_size,
            virtual_h: size::human(virtual_size),
        }
        .into());
    }
    Ok(size)
}

/// Sets a base's mtime to now: "in use" for prune. Done under the base's lock before a disk is
/// made from it and again after, so a prune whose scan started before the disk appeared sees a
/// base touched after its scan began and keeps it.
fn touch(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .with_context(|| format!("cannot touch {}", path.display()))
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// A template described as a base.
fn template_base(path: PathBuf, size: u64) -> Result<Base> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("template path has no name")?;
    Ok(Base {
        name,
        path,
        format: "raw".into(),
        virtual_size: size,
        image_id: None,
        properties: serde_json::Map::new(),
    })
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (fs::metadata(a)?, fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    Ok(cache::content_digest(a)? == cache::content_digest(b)?)
}
