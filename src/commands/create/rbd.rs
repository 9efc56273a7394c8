//! `create --backend rbd`: the root disk as an RBD clone.
//!
//! The parent, cheapest first: an image some host already imported (no Glance call); Glance's
//! own `rbd://<fsid>/<pool>/<image>/<snap>` location when the image is raw, in this cluster and
//! its snapshot readable (no download at all); else the image imported now into the images
//! pool as `imgcache-<sha1(id)>@snap`.
//!
//! Importing is safe across hosts sharing the pool: each host imports under a temporary name
//! (`imgcache-<sha1>.tmp-<host>-<pid>`), snapshots and protects it, then `rbd rename`s it into
//! place. Only complete, protected images ever carry the final name; a host whose rename fails
//! because the name exists lost the race, removes its copy and clones from the winner's. A
//! rename can also lose and still exit 0 (see `lost_silently`): after every rename the
//! temporary name is looked up again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::job::{Base, Error, Job, Made, Status, check_size};
use crate::cache::{self, Wait};
use crate::error::UsageError;
use crate::fetch;
use crate::instance::DiskRecord;
use crate::rbd::{self, Rbd, SNAP};
use crate::scan;

/// A parent snapshot spec (`pool/image@snap`) and the base it stands for.
type Parent = (String, Base);

/// Makes `<instances-pool>/<instance>_disk` and returns the root's base (for kernel/ramdisk
/// properties) and what was made.
pub fn root_disk(
    job: &Job<'_>,
    records: &mut BTreeMap<String, DiskRecord>,
) -> Result<(Base, Made)> {
    let inst = &job.inst.name;
    if inst.contains('@') {
        return Err(UsageError(format!(
            "invalid instance name {inst:?} for --backend rbd: RBD image names cannot contain '@'"
        ))
        .into());
    }
    let rbd = &job.req.cluster.rbd;
    let id = &job.req.image;
    let entry = cache::entry_name(id);
    let (parent, base) = match imported_parent(job, &entry)? {
        Some(found) => found,
        None => match direct_parent(job)? {
            Some(found) => found,
            None => import(job, &entry)?,
        },
    };
    let size = check_size(job.req.root_size, base.virtual_size)?;
    let disk = format!("{}/{inst}_disk", job.req.cluster.instances_pool);
    let mut made = Made {
        role: "root",
        path: PathBuf::from(format!("rbd:{disk}")),
        format: "rbd".into(),
        size,
        base: PathBuf::from(format!("rbd:{parent}")),
        status: Status::Created,
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
    if let Some((image, _)) = parent.split_once('@') {
        let _ = rbd.touch(image);
    }
    made.status = clone(job, &parent, &disk, size)?;
    if made.status != Status::Exists
        && size > base.virtual_size
        && let Err(e) = rbd.resize(&disk, size)
    {
        let _ = rbd.remove(&disk);
        return Err(e.into());
    }
    job.rep.debug(&format!(
        "{disk} {} from {parent} through {}",
        if made.status == Status::Exists {
            "found, already cloned"
        } else {
            "cloned"
        },
        rbd.via()
    ));
    Ok((base, made))
}

/// Clones `parent` as `disk`. Clone first; only an existing disk (EEXIST) needs a closer look:
/// kept if it is the same clone, replaced with `--force`, a conflict otherwise.
fn clone(job: &Job<'_>, parent: &str, disk: &str, size: u64) -> Result<Status> {
    let rbd = &job.req.cluster.rbd;
    match rbd.clone_image(parent, disk) {
        Ok(()) => return Ok(Status::Created),
        Err(e) if e.code() == Some(rbd::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let info = rbd.info(disk)?.unwrap_or(Value::Null);
    let p = info.get("parent").cloned().unwrap_or(Value::Null);
    let field = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let same_parent =
        format!("{}/{}@{}", field("pool"), field("image"), field("snapshot")) == parent;
    if same_parent && info.get("size").and_then(Value::as_u64) == Some(size) {
        return Ok(Status::Exists);
    }
    if !job.req.force {
        return Err(Error::Exists {
            path: PathBuf::from(format!("rbd:{disk}")),
            why: format!(
                "is not a {size}-byte clone of {parent} (parent {}, size {})",
                p,
                info.get("size").cloned().unwrap_or(Value::Null)
            ),
        }
        .into());
    }
    rbd.remove(disk)?;
    rbd.clone_image(parent, disk)?;
    Ok(Status::Replaced)
}

/// Glance's `rbd://` location, if the image is raw and lives in this very cluster.
fn direct_parent(job: &Job<'_>) -> Result<Option<Parent>> {
    // A clone reads no byte of the image, so no signature could be checked over it: with
    // --verify-signatures the import path downloads (and verifies) it instead.
    if job.req.opts.signatures.is_some() {
        return Ok(None);
    }
    let rbd = &job.req.cluster.rbd;
    let image = match job.client.show(&job.req.image) {
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
    let Some(size) = rbd.size(&spec)? else {
        job.rep.warn(&format!(
            "{spec} from Glance's location is not readable; importing"
        ));
        return Ok(None);
    };
    let virtual_size = Some(size)
        .filter(|&s| s > 0)
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

/// `pool/imgcache-<entry>` in the images pool.
fn imported_name(job: &Job<'_>, entry: &str) -> String {
    format!("{}/{}", job.req.cluster.images_pool, rbd::image_name(entry))
}

/// The image some host imported into the images pool, if there is one.
fn imported_parent(job: &Job<'_>, entry: &str) -> Result<Option<Parent>> {
    let parent = format!("{}@{SNAP}", imported_name(job, entry));
    let Some(virtual_size) = job.req.cluster.rbd.size(&parent)? else {
        return Ok(None);
    };
    // Properties (kernel_id, ...) come from the local record or Glance.
    let properties = job
        .cache()
        .entry(entry)
        .read_record()
        .map(|r| r.properties)
        .or_else(|| job.client.show(&job.req.image).ok().map(|i| i.properties()))
        .unwrap_or_default();
    Ok(Some((
        parent,
        Base {
            name: entry.to_owned(),
            path: PathBuf::new(),
            format: "raw".into(),
            virtual_size,
            image_id: Some(job.req.image.clone()),
            properties,
        },
    )))
}

/// Fetches the image locally (raw, verified, inspected), imports it under a temporary name,
/// and renames it into place (EEXIST: another host won, ours goes).
fn import(job: &Job<'_>, entry: &str) -> Result<Parent> {
    // Another host may have finished an import while we asked Glance.
    if let Some(found) = imported_parent(job, entry)? {
        return Ok(found);
    }
    let rbd = &job.req.cluster.rbd;
    let image = imported_name(job, entry);
    let opts = fetch::Options {
        force_raw: true,
        ..job.req.opts.clone()
    };
    let base = job.image_base(&job.req.image, &opts)?;
    let lock = job.lock_base(&base)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let tmp = format!("{image}{}{host}-{}", rbd::TMP_INFIX, std::process::id());
    job.rep
        .info(&format!("importing {} into {image}", base.path.display()));
    if let Err(e) = import_as(rbd, &base, &tmp) {
        let _ = rbd.remove_image(&tmp);
        return Err(e).context(format!(
            "cannot import {} into {image}",
            base.path.display()
        ));
    }
    let lost = match rbd.rbd(&["rename", &tmp, &image]) {
        Ok(_) => lost_silently(rbd, &tmp, &image)?,
        Err(e) if e.code() == Some(rbd::EEXIST) => true,
        Err(e) => {
            let _ = rbd.remove_image(&tmp);
            return Err(e.into());
        }
    };
    if lost {
        // Another host finished first: theirs is complete (only complete images are renamed
        // into place), ours is redundant.
        job.rep
            .debug(&format!("{image} was imported by another host meanwhile"));
        rbd.remove_image(&tmp)?;
    }
    drop(lock);
    if !job.req.keep_local_base
        && let Err(e) = remove_local_base(job, &base)
    {
        job.rep.warn(&format!(
            "kept {} after the import: {e:#}",
            base.path.display()
        ));
    }
    Ok((format!("{image}@{SNAP}"), base))
}

/// True if a rename that exited 0 in fact lost the race: `tmp` is still there as an image other
/// than the one now called `image`. librbd (Ceph 16) checks that the new name is free, then
/// creates its id object exclusively, and reports the `EEXIST` of that second step as success
/// (it stands for a journal replay racing itself); a host that passed the check just before
/// another host's rename is told it succeeded while its image keeps the temporary name.
fn lost_silently(rbd: &Rbd, tmp: &str, image: &str) -> Result<bool, rbd::Error> {
    let Some(ours) = rbd.info(tmp)? else {
        return Ok(false);
    };
    let id = |v: &Value| v.get("id").and_then(Value::as_str).map(str::to_owned);
    let theirs = rbd.info(image)?;
    // The same id under both names is a rename whose old id object lingered (librbd only
    // warns when it cannot remove it): ours won, and removing `tmp` would remove it.
    Ok(id(&ours).is_some() && theirs.as_ref().and_then(id) != id(&ours))
}

/// `rbd import` of the base as `tmp`, with its last-use mark and a protected snapshot.
fn import_as(rbd: &Rbd, base: &Base, tmp: &str) -> Result<(), rbd::Error> {
    let path = base.path.to_string_lossy();
    rbd.rbd(&["import", "--no-progress", "--image-format", "2", &path, tmp])?;
    rbd.touch(tmp)?;
    rbd.rbd(&["snap", "create", "--no-progress", &format!("{tmp}@{SNAP}")])?;
    rbd.rbd(&["snap", "protect", &format!("{tmp}@{SNAP}")])?;
    Ok(())
}

/// Removes the local entry after a successful import, unless a local instance uses it.
fn remove_local_base(job: &Job<'_>, base: &Base) -> Result<()> {
    let usage = scan::scan_usage(job.cache(), &[])?;
    if usage.in_use(&base.name) {
        return Ok(());
    }
    job.cache().entry(&base.name).remove_under_lock(
        &format!("base {}", base.name),
        Wait::Up(Duration::from_secs(5), job.rep),
        |_| true,
    )?;
    Ok(())
}
