//! `imgcache create --backend rbd`: the root disk as an RBD clone.
//!
//! The parent, cheapest first: Glance's own `rbd://<fsid>/<pool>/<image>/<snap>` location when
//! the image is raw, in this cluster and its snapshot readable (no download at all); else the
//! image imported once into the images pool as `imgcache-<sha1(id)>@snap`.
//!
//! Importing is safe across hosts sharing the pool: each host imports under a temporary name
//! (`imgcache-<sha1>.tmp-<host>-<pid>`), snapshots and protects it, then `rbd rename`s it into
//! place. Only complete, protected images ever carry the final name; a host whose rename fails
//! because the name exists lost the race, removes its copy and clones from the winner's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::create::{Base, Error, Job, Made, check_size};
use crate::cache;
use crate::error::UsageError;
use crate::instance::DiskRecord;
use crate::rbd::{self, Rbd, SNAP};

/// Default Ceph configuration when none is given.
const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";

/// The rbd client from the create arguments.
pub(crate) fn client(args: &crate::cli::RbdArgs) -> Rbd {
    Rbd {
        conf: args
            .ceph_conf
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CEPH_CONF)),
        id: args.ceph_id.clone(),
        keyring: args.ceph_keyring.clone(),
        timeout: args.rbd_timeout,
    }
}

/// Makes `<instances-pool>/<instance>_disk` and returns the root's base (for kernel/ramdisk
/// properties) and what was made.
pub(crate) fn root_disk(
    job: &Job<'_>,
    root_size: u64,
    records: &mut BTreeMap<String, DiskRecord>,
) -> Result<(Base, Made)> {
    let inst = &job.inst.name;
    if inst.contains('@') {
        return Err(UsageError(format!(
            "invalid instance name {inst:?} for --backend rbd: RBD image names cannot contain '@'"
        ))
        .into());
    }
    let rbd = client(&job.args.rbd);
    let pools = &job.args.rbd;
    let id = &job.args.image;
    let entry = cache::entry_name(id);

    // An image already imported needs no Glance call; then Glance's own rbd location; then an
    // import.
    let (parent, base) = match imported_parent(job, &rbd, &entry, false)? {
        Some(found) => found,
        None => match direct_parent(job, &rbd)? {
            Some(found) => found,
            None => imported_parent(job, &rbd, &entry, true)?.context(
                "the imported image vanished right after its import; run the command again",
            )?,
        },
    };
    let size = check_size(root_size, base.virtual_size)?;
    let disk = format!("{}/{inst}_disk", pools.instances_pool);
    let mut made = Made {
        role: "root",
        path: PathBuf::from(format!("rbd:{disk}")),
        format: "rbd".into(),
        size,
        base: PathBuf::from(format!("rbd:{parent}")),
        status: "created",
        method: Some("rbd-clone"),
    };
    records.insert(
        "disk".into(),
        DiskRecord {
            format: "rbd".into(),
            size,
            base: base.name.clone(),
            image_id: Some(id.clone()),
            rbd: Some(disk.clone()),
        },
    );
    // Mark the parent used before cloning, so a prune elsewhere sees it as fresh; a prune that
    // still removes it meanwhile makes the clone fail (no snapshot), never a broken clone.
    touch_parent(&rbd, &parent);
    // Clone first; only an existing disk (EEXIST) needs a closer look.
    match rbd.rbd(&["clone", &parent, &disk]) {
        Ok(_) => {}
        Err(e) if e.code() == Some(rbd::EEXIST) => {
            let info = rbd.info(&disk)?.unwrap_or(Value::Null);
            let p = info.get("parent").cloned().unwrap_or(Value::Null);
            let same_parent = format!(
                "{}/{}@{}",
                p.get("pool").and_then(Value::as_str).unwrap_or(""),
                p.get("image").and_then(Value::as_str).unwrap_or(""),
                p.get("snapshot").and_then(Value::as_str).unwrap_or("")
            ) == parent;
            if same_parent && info.get("size").and_then(Value::as_u64) == Some(size) {
                made.status = "exists";
                return Ok((base, made));
            }
            if !job.args.force {
                return Err(Error::Exists {
                    path: made.path.clone(),
                    why: format!(
                        "is not a {size}-byte clone of {parent} (parent {}, size {})",
                        p,
                        info.get("size").cloned().unwrap_or(Value::Null)
                    ),
                }
                .into());
            }
            rbd.rbd(&["rm", "--no-progress", &disk])?;
            rbd.rbd(&["clone", &parent, &disk])?;
            made.status = "replaced";
        }
        Err(e) => return Err(e.into()),
    }
    if size > base.virtual_size {
        let result = rbd.rbd(&[
            "resize",
            "--no-progress",
            "--size",
            &format!("{size}B"),
            &disk,
        ]);
        if let Err(e) = result {
            let _ = rbd.rbd(&["rm", "--no-progress", &disk]);
            return Err(e.into());
        }
    }
    Ok((base, made))
}

fn touch_parent(rbd: &Rbd, parent: &str) {
    if let Some((image, _)) = parent.split_once('@') {
        let _ = rbd.touch(image);
    }
}

/// Glance's `rbd://` location, if the image is raw and lives in this very cluster.
fn direct_parent(job: &Job<'_>, rbd: &Rbd) -> Result<Option<(String, Base)>> {
    let image = match job.client.show(&job.args.image) {
        Ok(i) => i,
        // Glance unreachable or the record unreadable: the import path decides what to do.
        Err(_) => return Ok(None),
    };
    if image.disk_format.as_deref() != Some("raw") {
        return Ok(None);
    }
    let mut urls: Vec<String> = image.direct_url.iter().cloned().collect();
    if let Some(locs) = image.extra.get("locations").and_then(Value::as_array) {
        urls.extend(
            locs.iter()
                .filter_map(|l| l.get("url").and_then(Value::as_str))
                .map(str::to_owned),
        );
    }
    let Some((fsid, pool, name, snap)) = urls.iter().find_map(|u| rbd::parse_location(u)) else {
        return Ok(None);
    };
    let ours = rbd.fsid()?;
    if fsid != ours {
        job.rep.debug(&format!(
            "image {}: rbd location in cluster {fsid}, this is {ours}; importing",
            image.id
        ));
        return Ok(None);
    }
    let spec = format!("{pool}/{name}@{snap}");
    let Some(info) = rbd.info(&spec)? else {
        job.rep.warn(&format!(
            "{spec} from Glance's location is not readable; importing"
        ));
        return Ok(None);
    };
    let virtual_size = info
        .get("size")
        .and_then(Value::as_u64)
        .or(image.virtual_size)
        .or(image.size)
        .unwrap_or(0);
    job.rep
        .debug(&format!("image {}: cloning directly from {spec}", image.id));
    Ok(Some((
        spec,
        Base {
            name: format!("rbd:{pool}/{name}"),
            path: PathBuf::new(),
            format: "raw".into(),
            virtual_size,
            image_id: Some(image.id.clone()),
            properties: image.properties(),
        },
    )))
}

/// The image imported into the images pool; if no host has imported it yet, `None` unless
/// `import` is set, in which case it is imported now.
fn imported_parent(
    job: &Job<'_>,
    rbd: &Rbd,
    entry: &str,
    import: bool,
) -> Result<Option<(String, Base)>> {
    let pool = &job.args.rbd.images_pool;
    let name = rbd::image_name(entry);
    let image = format!("{pool}/{name}");
    let parent = format!("{image}@{SNAP}");
    if let Some(info) = rbd.info(&parent)? {
        let virtual_size = info.get("size").and_then(Value::as_u64).unwrap_or(0);
        // Properties (kernel_id, ...) come from the local record or Glance.
        let properties = job
            .cache
            .read_record(entry)
            .map(|r| r.properties)
            .or_else(|| {
                job.client
                    .show(&job.args.image)
                    .ok()
                    .map(|i| i.properties())
            })
            .unwrap_or_default();
        return Ok(Some((
            parent,
            Base {
                name: entry.to_owned(),
                path: PathBuf::new(),
                format: "raw".into(),
                virtual_size,
                image_id: Some(job.args.image.clone()),
                properties,
            },
        )));
    }
    if !import {
        return Ok(None);
    }
    // Fetch locally (raw, verified, inspected), then import.
    let opts = crate::fetch::Options {
        force_raw: true,
        ..job.opts.clone()
    };
    let base = job.image_base(&job.args.image, &opts)?;
    let lock = job.lock_base(&base)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let tmp = format!("{image}{}{host}-{}", rbd::TMP_INFIX, std::process::id());
    job.rep
        .info(&format!("importing {} into {image}", base.path.display()));
    let path = base.path.to_string_lossy().into_owned();
    let imported = (|| -> Result<(), rbd::Error> {
        rbd.rbd(&[
            "import",
            "--no-progress",
            "--image-format",
            "2",
            &path,
            &tmp,
        ])?;
        rbd.touch(&tmp)?;
        rbd.rbd(&["snap", "create", "--no-progress", &format!("{tmp}@{SNAP}")])?;
        rbd.rbd(&["snap", "protect", &format!("{tmp}@{SNAP}")])?;
        Ok(())
    })();
    if let Err(e) = imported {
        let _ = rbd.remove_image(&tmp);
        return Err(e).context(format!(
            "cannot import {} into {image}",
            base.path.display()
        ));
    }
    match rbd.rbd(&["rename", &tmp, &image]) {
        Ok(_) => {}
        Err(e) if e.code() == Some(rbd::EEXIST) => {
            // Another host finished first: theirs is complete (only complete images are
            // renamed into place), ours is redundant.
            job.rep
                .debug(&format!("{image} was imported by another host meanwhile"));
            rbd.remove_image(&tmp)?;
        }
        Err(e) => {
            let _ = rbd.remove_image(&tmp);
            return Err(e.into());
        }
    }
    drop(lock);
    if !job.args.keep_local_base
        && let Err(e) = remove_local_base(job, &base)
    {
        job.rep.warn(&format!(
            "kept {} after the import: {e:#}",
            base.path.display()
        ));
    }
    Ok(Some((parent, base)))
}

/// Removes the local entry after a successful import, unless a local instance uses it.
fn remove_local_base(job: &Job<'_>, base: &Base) -> Result<()> {
    let usage = crate::scan::scan_usage(job.cache, &[])?;
    if usage.in_use(&base.name) {
        return Ok(());
    }
    let _lock = job.cache.lock(
        &base.name,
        &format!("base {}", base.name),
        Duration::from_secs(5),
        &|_| {},
    )?;
    let _ = std::fs::remove_file(&base.path);
    let _ = std::fs::remove_file(job.cache.record_path(&base.name));
    cache::sync_dir(job.cache.base_dir())?;
    Ok(())
}
