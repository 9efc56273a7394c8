//! `imgcache create INSTANCE --image ID`: the disks of one instance, made from cached bases —
//! root disk (raw copy or qcow2 overlay, extended to the flavor size, or an RBD clone), kernel
//! and ramdisk, ephemeral and swap disks from templates, then `disk.info` and the usage record.
//! [`job`] holds what the parts share, [`local`] the file disks, [`rbd`] the Ceph root disk.

mod job;
mod local;
mod rbd;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::Outcome;
use crate::cache;
use crate::configdrive;
use crate::fsutil;
use crate::glance;
use crate::instance::{self, DiskRecord, Instance};
use crate::openstack;
use crate::progress::{self, Render, Reporter};
use crate::templates;
use crate::units;
pub use job::{Backend, Error, Request};
use job::{Base, Job, Made, Status, check_size};

/// Runs the command.
pub fn run(req: Request, rep: &dyn Reporter) -> Result<Outcome> {
    cache::validate_id("image id", &req.image)?;
    let inst = Instance::resolve(&req.cache, &req.instance)?;
    let (settings, key_manager) = openstack::connect(&req.access)?;
    let client = glance::Client::new(&settings)?;
    let req = Request {
        opts: req.opts.with_key_manager(key_manager),
        ..req
    };
    req.cache.ensure_dirs()?;
    let _instance_lock = inst.lock(req.opts.lock_timeout, rep)?;
    let created_dir = inst.ensure_dir()?;
    // Under the instance lock no other create runs here: temp files are a killed run's.
    inst.remove_stale_temps();
    let job = Job {
        req: &req,
        client: &client,
        inst: &inst,
        rep,
    };
    let mut disks = Vec::new();
    if let Err(e) = job.build(&mut disks) {
        job.undo(&disks, created_dir);
        return Err(e);
    }
    let report = Report {
        instance: &inst.name,
        dir: &inst.dir,
        disks: &disks,
    };
    progress::print(&report, req.json)?;
    Ok(Outcome::Success)
}

#[derive(Serialize)]
struct Report<'a> {
    instance: &'a str,
    dir: &'a Path,
    disks: &'a [Made],
}

impl Render for Report<'_> {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for d in self.disks {
            writeln!(out, "{}", d.path.display())?;
        }
        Ok(())
    }
}

impl Job<'_> {
    /// Makes every disk into `made`, then `disk.info` and the usage record. The usage record is
    /// written as soon as the root disk exists too, so a prune while a kernel or template is
    /// still being fetched sees the root's base in use.
    fn build(&self, made: &mut Vec<Made>) -> Result<()> {
        // Ephemeral and swap disks stay local files with the rbd backend (qcow2 overlays).
        let backend = match self.req.backend {
            Backend::Rbd => Backend::Qcow2,
            other => other,
        };
        let mut records = BTreeMap::new();
        let root = if self.req.backend == Backend::Rbd {
            let (root, disk) = rbd::root_disk(self, &mut records)?;
            made.push(disk);
            root
        } else {
            let root = self.image_base(&self.req.image, &self.req.opts)?;
            let size = check_size(self.req.root_size, root.virtual_size)?;
            made.push(self.disk(("root", "disk"), &root, backend, size, &mut records)?);
            root
        };
        // Slow steps follow (a kernel or ramdisk to fetch, a template to build): the root's
        // base is recorded in use first.
        let more = ["kernel_id", "ramdisk_id"]
            .iter()
            .any(|p| root.properties.contains_key(*p))
            || self.req.ephemeral_gib.is_some()
            || self.req.swap_mib.is_some();
        if more {
            self.record_usage(records.clone(), true)?;
        }
        self.kernel_and_ramdisk(&root, &mut records, made)?;
        self.ephemeral_and_swap(backend, &mut records, made)?;
        let mut info = records.clone();
        if let Some(size) = self.config_drive(made)? {
            // Listed in disk.info (raw, as Nova's), not in the usage record: it has no base.
            info.insert(configdrive::FILE.into(), config_drive_record(size));
        }
        self.inst.write_disk_info(&info)?;
        self.record_usage(records, false)
    }

    /// `disk.config` when asked for (see [`configdrive::make`]); without `--config-drive` a
    /// drive an earlier run made stays, and stays listed. Returns its size, if there is one.
    fn config_drive(&self, made: &mut Vec<Made>) -> Result<Option<u64>> {
        let path = self.inst.file(configdrive::FILE);
        let Some(spec) = &self.req.config_drive else {
            return Ok(fsutil::open_regular(&path)
                .and_then(|f| f.metadata())
                .ok()
                .map(|m| m.len()));
        };
        let (outcome, size) = configdrive::make(&self.inst.dir, spec, self.req.force)?;
        made.push(Made {
            role: "config-drive",
            path,
            format: "raw".into(),
            size,
            base: Default::default(),
            status: match outcome {
                configdrive::Outcome::Created => Status::Created,
                configdrive::Outcome::Replaced => Status::Replaced,
                configdrive::Outcome::Exists => Status::Exists,
            },
            method: None,
        });
        Ok(Some(size))
    }

    /// Writes `imgcache.json` for these disks; `merge` keeps what the record already lists (an
    /// early write must not drop bases of disks an earlier run made).
    fn record_usage(&self, mut disks: BTreeMap<String, DiskRecord>, merge: bool) -> Result<()> {
        if merge && let Some(old) = self.inst.read_record() {
            for (file, d) in old.disks {
                disks.entry(file).or_insert(d);
            }
        }
        let mut bases: Vec<String> = disks.values().map(|d| d.base.clone()).collect();
        bases.sort();
        bases.dedup();
        self.inst.write_record(&instance::Record {
            instance: self.inst.name.clone(),
            bases,
            disks,
            updated_at: units::now_stamp().1,
        })
    }

    /// After a failure: removes the disks this run created (never one it found or replaced),
    /// and the directory with its records if this run created it.
    fn undo(&self, made: &[Made], created_dir: bool) {
        for m in made.iter().filter(|m| m.status == Status::Created) {
            if m.format == "rbd" {
                let disk = m.path.to_string_lossy();
                let disk = disk.trim_start_matches("rbd:");
                let _ = self.req.cluster.rbd.remove(disk);
            } else {
                let _ = fsutil::remove_own(&m.path);
                if m.role == "config-drive" {
                    let _ = fsutil::remove_own(&self.inst.file(configdrive::INFO_FILE));
                }
            }
        }
        if created_dir {
            for file in [instance::RECORD_FILE, instance::DISK_INFO_FILE] {
                let _ = fsutil::remove_own(&self.inst.file(file));
            }
            // Only if empty: nothing of anyone else's is touched.
            self.inst.remove_if_empty();
        }
    }

    /// The root image's `kernel_id` / `ramdisk_id` images, used as they are (never converted).
    fn kernel_and_ramdisk(
        &self,
        root: &Base,
        records: &mut BTreeMap<String, DiskRecord>,
        made: &mut Vec<Made>,
    ) -> Result<()> {
        // Fetched exactly as a disk image would be: the entry of an image id is the same
        // whoever asks for it, so a kernel_id pointing at a disk image cannot leave that
        // image's entry unconverted.
        for (prop, file) in [("kernel_id", "kernel"), ("ramdisk_id", "ramdisk")] {
            let Some(id) = root.properties.get(prop).and_then(|v| v.as_str()) else {
                continue;
            };
            let base = self
                .image_base(id, &self.req.opts)
                .with_context(|| format!("the {prop} of image {} is {id}", self.req.image))?;
            made.push(self.plain_copy((file, file), &base, records)?);
        }
        Ok(())
    }

    /// `disk.local` and `disk.swap` from their templates.
    fn ephemeral_and_swap(
        &self,
        backend: Backend,
        records: &mut BTreeMap<String, DiskRecord>,
        made: &mut Vec<Made>,
    ) -> Result<()> {
        let (cache, timeout) = (self.cache(), self.req.opts.lock_timeout);
        if let Some(gib) = self.req.ephemeral_gib {
            let fs = self.req.ephemeral_fs;
            let path = templates::ephemeral(cache, gib, fs, timeout, self.rep)?;
            let base = Base::template(path, gib << 30)?;
            let role = ("ephemeral", "disk.local");
            made.push(self.disk(role, &base, backend, gib << 30, records)?);
        }
        if let Some(mib) = self.req.swap_mib {
            let path = templates::swap(cache, mib, timeout, self.rep)?;
            let base = Base::template(path, mib << 20)?;
            made.push(self.disk(("swap", "disk.swap"), &base, backend, mib << 20, records)?);
        }
        Ok(())
    }
}

/// The config drive as a `disk.info` entry.
fn config_drive_record(size: u64) -> DiskRecord {
    DiskRecord {
        format: "raw".into(),
        size,
        base: String::new(),
        image_id: None,
        rbd: None,
    }
}
