//! Local instance disks: a qcow2 overlay backed by the base or a raw copy of it (extended to
//! the requested size), and plain copies of kernels and ramdisks. Each is built under a hidden
//! temp name in the instance directory, under the base's lock, then fsynced and renamed into
//! place; a matching disk already there is kept, a differing one is a conflict unless
//! `--force`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::job::{Backend, Base, Error, Job, Made, Status, touch};
use crate::disk;
use crate::error::UsageError;
use crate::fsutil::{self, TempFile};
use crate::inspect::{self, Format};
use crate::instance::DiskRecord;
use crate::qcow2_write;
use crate::qemu_img;

/// What is at a disk's path before it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Absent,
    /// It matches the request: keep it.
    Matches,
    /// It differs and `--force` allows replacing it.
    Replaceable,
}

impl Job<'_> {
    /// Makes `<instance>/<file>` from `base` with the chosen backend, under the base's lock.
    pub fn disk(
        &self,
        (role, file): (&'static str, &str),
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
            status: match existing {
                Existing::Absent => Status::Created,
                _ => Status::Replaced,
            },
            method: None,
        };
        let _lock = self.lock_base(base)?;
        if existing == Existing::Matches {
            made.status = Status::Exists;
            return Ok(made);
        }
        let tmp = TempFile::new(&self.inst.dir, file)
            .with_context(|| format!("cannot create a temp file in {}", self.inst.dir.display()))?;
        match backend {
            Backend::Raw => made.method = Some(self.raw_copy(base, &tmp, size)?),
            Backend::Qcow2 | Backend::Rbd => self.overlay(base, &tmp, size)?,
        }
        if self.req.preallocate {
            self.preallocate(&tmp, &target, size, backend == Backend::Qcow2)?;
        }
        tmp.persist(&target)
            .with_context(|| format!("cannot move {} into place", target.display()))?;
        touch(&base.path)?;
        Ok(made)
    }

    /// A raw copy of a raw base (reflink or sparse), extended to `size`.
    fn raw_copy(&self, base: &Base, tmp: &TempFile, size: u64) -> Result<&'static str> {
        if base.format != "raw" {
            return Err(UsageError(format!(
                "base {} is {}, not raw; a raw instance disk needs a raw base (fetch without --no-force-raw)",
                base.path.display(),
                base.format
            ))
            .into());
        }
        let copy_error = || {
            format!(
                "cannot copy {} to {}",
                base.path.display(),
                tmp.path().display()
            )
        };
        let src = fsutil::open_regular(&base.path).with_context(copy_error)?;
        let out = tmp.file();
        let method = disk::copy_sparse(&src, out).with_context(copy_error)?;
        if out.metadata()?.len() < size {
            out.set_len(size)
                .with_context(|| format!("cannot extend {}", tmp.path().display()))?;
        }
        Ok(method.name())
    }

    /// A qcow2 overlay backed by the base. The base is re-checked before it becomes a backing
    /// file: it must still be what the record says (a raw base that now parses as qcow2 is
    /// refused).
    fn overlay(&self, base: &Base, tmp: &TempFile, size: u64) -> Result<()> {
        let found = inspect::inspect_path_with(&base.path, &self.req.opts.limits)?;
        if found.format.qemu_name() != base.format {
            return Err(Error::BaseChanged {
                path: base.path.clone(),
                expected: base.format.clone(),
                found: found.format.name().into(),
            }
            .into());
        }
        self.write_overlay(base, tmp, size)
    }

    /// Writes the overlay natively (the bytes `qemu-img create` writes, without starting it:
    /// docs/benchmarks.md), through the temp file's descriptor. `qemu-img create` writes
    /// whatever the native writer does not know (a backing name over 1023 bytes, a size past
    /// qemu's L1 limit: qemu-img then gives its own error), and everything when
    /// `IMGCACHE_OVERLAY_WRITER=qemu-img` asks for it.
    fn write_overlay(&self, base: &Base, tmp: &TempFile, size: u64) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let forced = std::env::var_os("IMGCACHE_OVERLAY_WRITER").is_some_and(|v| v == "qemu-img");
        let layout = qcow2_write::Layout::new(base.path.as_os_str().as_bytes(), &base.format, size);
        match layout {
            Ok(layout) if !forced => {
                return layout
                    .write(tmp.file())
                    .with_context(|| format!("cannot write {}", tmp.path().display()));
            }
            Ok(_) => self
                .rep
                .debug("IMGCACHE_OVERLAY_WRITER=qemu-img: overlay by qemu-img create"),
            Err(why) => self
                .rep
                .debug(&format!("overlay by qemu-img create: {why}")),
        }
        qemu_img::create_overlay(tmp.file(), tmp.path(), &base.path, &base.format, size)?;
        Ok(())
    }

    fn preallocate(&self, tmp: &TempFile, target: &Path, size: u64, keep_size: bool) -> Result<()> {
        let done = disk::preallocate(tmp.file(), size, keep_size)
            .with_context(|| format!("cannot preallocate {}", tmp.path().display()))?;
        if !done {
            self.rep.warn(&format!(
                "{}: the filesystem cannot preallocate; the disk stays sparse",
                target.display()
            ));
        }
        Ok(())
    }

    /// Copies a kernel or ramdisk into the instance directory, as it is.
    pub fn plain_copy(
        &self,
        (role, file): (&'static str, &str),
        base: &Base,
        records: &mut BTreeMap<String, DiskRecord>,
    ) -> Result<Made> {
        let target = self.inst.file(file);
        let size = fsutil::stat(&base.path)
            .ok()
            .flatten()
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
            status: Status::Created,
            method: None,
        };
        if fsutil::exists(&target) {
            if same_content(&target, &base.path)? {
                made.status = Status::Exists;
                return Ok(made);
            }
            if !self.req.force {
                return Err(Error::Exists {
                    path: target,
                    why: format!("differs from {}", base.path.display()),
                }
                .into());
            }
            made.status = Status::Replaced;
        }
        let tmp = TempFile::new(&self.inst.dir, file)
            .with_context(|| format!("cannot create a temp file in {}", self.inst.dir.display()))?;
        let src = fsutil::open_regular(&base.path)
            .with_context(|| format!("cannot copy {}", base.path.display()))?;
        let method = disk::copy_sparse(&src, tmp.file())
            .with_context(|| format!("cannot copy {}", base.path.display()))?;
        made.method = Some(method.name());
        tmp.persist(&target)
            .with_context(|| format!("cannot move {} into place", target.display()))?;
        touch(&base.path)?;
        Ok(made)
    }

    /// What is at `target` now, compared with the request. Without `--force` a differing disk
    /// is an error.
    fn existing(
        &self,
        target: &Path,
        backend: Backend,
        base: &Base,
        size: u64,
    ) -> Result<Existing> {
        let Some(meta) =
            fsutil::stat(target).with_context(|| format!("cannot stat {}", target.display()))?
        else {
            return Ok(Existing::Absent);
        };
        let file = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let previous = self
            .inst
            .read_record()
            .and_then(|r| r.disks.get(&file).cloned());
        let why = if !meta.is_file() {
            Some("is not a regular file".to_owned())
        } else if let Some(prev) = previous.filter(|p| p.base != base.name) {
            // Name the image first: a disk of another image is the difference that matters.
            let what = |image: &Option<String>, name: &str| match image {
                Some(id) => format!("image {id}"),
                None => name.to_owned(),
            };
            Some(format!(
                "was made from {}, not {}",
                what(&prev.image_id, &prev.base),
                what(&base.image_id, &base.name)
            ))
        } else {
            match backend {
                Backend::Raw => differs_raw(target, meta.len(), size, &self.req.opts.limits)?,
                Backend::Qcow2 | Backend::Rbd => differs_qcow2(target, base, size),
            }
        };
        match why {
            None => Ok(Existing::Matches),
            Some(_) if self.req.force => Ok(Existing::Replaceable),
            Some(why) => Err(Error::Exists {
                path: target.to_owned(),
                why,
            }
            .into()),
        }
    }
}

/// How an existing raw disk differs from a `size`-byte raw disk, if it does.
fn differs_raw(
    target: &Path,
    len: u64,
    size: u64,
    limits: &inspect::Limits,
) -> Result<Option<String>> {
    let detected = inspect::inspect_path_with(target, limits)?;
    Ok(if detected.format != Format::Raw {
        Some(format!("is {}, not raw", detected.format.name()))
    } else if len != size {
        Some(format!("is {len} bytes, not {size}"))
    } else {
        None
    })
}

/// How an existing qcow2 disk differs from a `size`-byte overlay of `base`, if it does.
fn differs_qcow2(target: &Path, base: &Base, size: u64) -> Option<String> {
    match qemu_img::info(target, "qcow2") {
        Err(_) => Some("is not a qcow2 image".to_owned()),
        Ok(info) if info.virtual_size != size => Some(format!(
            "has virtual size {}, not {size}",
            info.virtual_size
        )),
        Ok(info) if info.backing_filename.as_deref().map(Path::new) != Some(&base.path) => {
            Some(format!(
                "is backed by {:?}, not {}",
                info.backing_filename.unwrap_or_default(),
                base.path.display()
            ))
        }
        Ok(_) => None,
    }
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (la, lb) = (fsutil::stat(a)?, fsutil::stat(b)?);
    if la.map(|m| m.len()) != lb.map(|m| m.len()) {
        return Ok(false);
    }
    let digest = |p: &Path| fsutil::open_regular(p).and_then(|f| crate::digest::of_file(&f));
    Ok(digest(a)? == digest(b)?)
}
