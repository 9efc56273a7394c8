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

use anyhow::Result;
use serde::Serialize;

use super::Outcome;
use crate::cache;
use crate::fetch;
use crate::glance;
use crate::instance::{self, DiskRecord, Instance};
use crate::openstack;
use crate::progress::{self, Render, Reporter};
use crate::templates;
use crate::units;
pub use job::{Backend, Error, Request};
use job::{Base, Job, Made, check_size};

/// Runs the command.
pub fn run(req: Request, rep: &dyn Reporter) -> Result<Outcome> {
    cache::validate_id("image id", &req.image)?;
    let inst = Instance::resolve(&req.cache, &req.instance)?;
    let client = glance::Client::new(&openstack::glance_settings(&req.access)?)?;
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
    let result = job.build();
    if result.is_err() && created_dir {
        // Everything this run made is gone already (temp files clean themselves up); remove
        // the directory only if it is empty, so nothing of anyone else's is touched.
        inst.remove_if_empty();
    }
    let disks = result?;
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
    /// Makes every disk, then `disk.info` and the usage record.
    fn build(&self) -> Result<Vec<Made>> {
        // Ephemeral and swap disks stay local files with the rbd backend (qcow2 overlays).
        let backend = match self.req.backend {
            Backend::Rbd => Backend::Qcow2,
            other => other,
        };
        let mut made = Vec::new();
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
        made.extend(self.kernel_and_ramdisk(&root, &mut records)?);
        made.extend(self.ephemeral_and_swap(backend, &mut records)?);
        self.inst.write_disk_info(&records)?;
        let mut bases: Vec<String> = records.values().map(|d| d.base.clone()).collect();
        bases.sort();
        bases.dedup();
        self.inst.write_record(&instance::Record {
            instance: self.inst.name.clone(),
            bases,
            disks: records,
            updated_at: units::now_stamp().1,
        })?;
        Ok(made)
    }

    /// The root image's `kernel_id` / `ramdisk_id` images, used as they are (never converted).
    fn kernel_and_ramdisk(
        &self,
        root: &Base,
        records: &mut BTreeMap<String, DiskRecord>,
    ) -> Result<Vec<Made>> {
        let raw_as_is = fetch::Options {
            force_raw: false,
            ..self.req.opts.clone()
        };
        let mut made = Vec::new();
        for (prop, file) in [("kernel_id", "kernel"), ("ramdisk_id", "ramdisk")] {
            let Some(id) = root.properties.get(prop).and_then(|v| v.as_str()) else {
                continue;
            };
            let base = self.image_base(id, &raw_as_is)?;
            made.push(self.plain_copy((file, file), &base, records)?);
        }
        Ok(made)
    }

    /// `disk.local` and `disk.swap` from their templates.
    fn ephemeral_and_swap(
        &self,
        backend: Backend,
        records: &mut BTreeMap<String, DiskRecord>,
    ) -> Result<Vec<Made>> {
        let (cache, timeout) = (self.cache(), self.req.opts.lock_timeout);
        let mut made = Vec::new();
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
        Ok(made)
    }
}
