//! `imgcache delete INSTANCE`: removes an instance directory, never anything outside the
//! instances path, so the bases it used become prunable.

use std::fs;

use anyhow::{Context, Result};

use crate::Outcome;
use crate::cache::Cache;
use crate::cli::{DeleteArgs, Global};
use crate::error::UsageError;
use crate::instance::{self, Instance};
use crate::progress::Reporter;

/// Runs the command.
pub fn run(global: &Global, args: DeleteArgs, rep: &dyn Reporter) -> Result<Outcome> {
    let cache = Cache::new(&global.instances_path, &global.base_dir_name)?;
    let inst = Instance::resolve(&cache, &args.instance)?;
    let meta = match fs::symlink_metadata(&inst.dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            rep.info(&format!(
                "{} does not exist; nothing to delete",
                inst.dir.display()
            ));
            return Ok(Outcome::Success);
        }
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("cannot stat {}", inst.dir.display()))
            );
        }
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
        .any(|f| fs::symlink_metadata(inst.file(f)).is_ok());
    if !looks_like_instance && !args.force {
        return Err(UsageError(format!(
            "{} does not look like an instance directory (no disk, disk.info or imgcache.json); pass --force to delete it anyway",
            inst.dir.display()
        ))
        .into());
    }
    cache.ensure_dirs()?;
    let _lock = cache.lock(
        &format!("instance-{}", inst.name),
        &format!("instance {}", inst.name),
        args.lock_timeout,
        &|what| rep.info(&format!("waiting for the lock on {what}")),
    )?;
    // RBD clones first: if Ceph refuses, the directory (and its record of the clone) stays so
    // the delete can be run again.
    if let Some(record) = inst.read_record() {
        let rbd_disks: Vec<String> = record
            .disks
            .values()
            .filter_map(|d| d.rbd.clone())
            .collect();
        if !rbd_disks.is_empty() {
            let rbd = crate::commands::create_rbd::client(&args.rbd);
            for disk in rbd_disks {
                match rbd.rbd(&["rm", "--no-progress", &disk]) {
                    Ok(_) => rep.info(&format!("removed rbd clone {disk}")),
                    Err(e) if e.code() == Some(crate::rbd::ENOENT) => {}
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context(format!(
                            "cannot remove rbd clone {disk}; {} kept",
                            inst.dir.display()
                        )));
                    }
                }
            }
        }
    }
    // remove_dir_all does not follow symlinks inside the tree (CVE-2022-21658 fixed in std).
    fs::remove_dir_all(&inst.dir)
        .with_context(|| format!("cannot delete {}", inst.dir.display()))?;
    if let Some(parent) = inst.dir.parent() {
        let _ = crate::cache::sync_dir(parent);
    }
    rep.info(&format!("deleted {}", inst.dir.display()));
    Ok(Outcome::Success)
}
