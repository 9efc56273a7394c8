//! `imgcache delete INSTANCE`: removes an instance directory (and its RBD clones), never
//! anything outside the instances path, so the bases it used become prunable.

use std::time::Duration;

use anyhow::{Context, Result};

use super::Outcome;
use crate::cache::Cache;
use crate::error::UsageError;
use crate::fsutil;
use crate::instance::{self, Instance};
use crate::progress::Reporter;
use crate::rbd;

/// What to delete.
#[derive(Debug)]
pub struct Request {
    pub cache: Cache,
    pub instance: String,
    /// Delete even a directory that does not look like an instance.
    pub force: bool,
    pub lock_timeout: Duration,
    pub cluster: rbd::Cluster,
}

/// Runs the command.
pub fn run(req: Request, rep: &dyn Reporter) -> Result<Outcome> {
    let inst = Instance::resolve(&req.cache, &req.instance)?;
    let meta =
        fsutil::stat(&inst.dir).with_context(|| format!("cannot stat {}", inst.dir.display()))?;
    let Some(meta) = meta else {
        rep.info(&format!(
            "{} does not exist; nothing to delete",
            inst.dir.display()
        ));
        return Ok(Outcome::Success);
    };
    if !meta.is_dir() {
        return Err(UsageError(format!(
            "{} is not a directory (a symlink or a file); not deleting it",
            inst.dir.display()
        ))
        .into());
    }
    let looks_like_instance = ["disk", instance::DISK_INFO_FILE, instance::RECORD_FILE]
        .iter()
        .any(|f| fsutil::exists(&inst.file(f)));
    if !looks_like_instance && !req.force {
        return Err(UsageError(format!(
            "{} does not look like an instance directory (no disk, disk.info or imgcache.json); pass --force to delete it anyway",
            inst.dir.display()
        ))
        .into());
    }
    req.cache.ensure_dirs()?;
    let _lock = inst.lock(req.lock_timeout, rep)?;
    remove_clones(&req, &inst, rep)?;
    fsutil::remove_tree(&inst.dir)
        .with_context(|| format!("cannot delete {}", inst.dir.display()))?;
    if let Some(parent) = inst.dir.parent() {
        let _ = fsutil::sync_dir(parent);
    }
    rep.info(&format!("deleted {}", inst.dir.display()));
    Ok(Outcome::Success)
}

/// RBD clones first: if Ceph refuses, the directory (and its record of the clone) stays so the
/// delete can be run again.
fn remove_clones(req: &Request, inst: &Instance, rep: &dyn Reporter) -> Result<()> {
    let Some(record) = inst.read_record() else {
        return Ok(());
    };
    for disk in record.disks.values().filter_map(|d| d.rbd.as_deref()) {
        match req.cluster.rbd.remove(disk) {
            Ok(_) => rep.info(&format!("removed rbd clone {disk}")),
            Err(e) if e.code() == Some(rbd::ENOENT) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot remove rbd clone {disk}; {} kept",
                    inst.dir.display()
                )));
            }
        }
    }
    Ok(())
}
