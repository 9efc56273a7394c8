//! Prune's pass over the images pool: imported images (`imgcache-*`) with no clones, idle
//! longer than `--min-age`, are unprotected, their snapshot purged, and removed; images with
//! clones are never touched (and `snap unprotect` refuses with EBUSY if a clone appeared
//! meanwhile). Temporary imports of killed runs are removed after `--temp-age`.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::report::{Action, Item};
use crate::rbd::{self, Cluster, Rbd};
use crate::units::{ago, unix_now};

/// The pass; adds what it frees (or would) to `freed`.
pub fn pass(
    cluster: &Cluster,
    (min_age, temp_age): (Duration, Duration),
    dry_run: bool,
    freed: &mut u64,
) -> Result<Vec<Item>> {
    let rbd = &cluster.rbd;
    let pool = &cluster.images_pool;
    let mut items = Vec::new();
    for name in rbd.ls(pool)? {
        if !name.starts_with(rbd::IMAGE_PREFIX) {
            continue;
        }
        let image = format!("{pool}/{name}");
        let tmp = name.contains(rbd::TMP_INFIX);
        let mut it = describe(rbd, &image, tmp)?;
        let threshold = if tmp { temp_age } else { min_age };
        let idle = it.idle_seconds;
        if !it.reason.is_empty() {
            // Clones, or no last-use record: kept with the reason `describe` gave.
        } else if Duration::from_secs(idle) < threshold {
            it.reason = format!(
                "unused for {}, younger than {}",
                ago(Duration::from_secs(idle)),
                ago(threshold)
            );
        } else if dry_run {
            it.action = Action::WouldRemove;
            it.reason = format!("no clones, unused for {}", ago(Duration::from_secs(idle)));
            *freed += it.size;
        } else {
            remove(rbd, &image, &mut it, freed)?;
        }
        items.push(it);
    }
    Ok(items)
}

/// An item for one image: size, idle time, clones. `reason` is set when the image must stay
/// whatever its age (clones, no last-use record).
fn describe(rbd: &Rbd, image: &str, tmp: bool) -> Result<Item> {
    let info = rbd.info(image)?.unwrap_or(Value::Null);
    let size = info.get("size").and_then(Value::as_u64).unwrap_or(0);
    // A temporary import killed before its metadata was set is aged by its creation time.
    let idle = match rbd.idle_seconds(image)? {
        Some(i) => Some(i),
        None if tmp => info
            .get("create_timestamp")
            .and_then(Value::as_str)
            .and_then(rbd::parse_ctime)
            .map(|t| unix_now().saturating_sub(t)),
        None => None,
    };
    let children = if tmp {
        Vec::new()
    } else {
        rbd.children(&format!("{image}@{}", rbd::SNAP))?
    };
    let reason = match (children.first(), idle) {
        (Some(first), _) => format!("{} clone(s), e.g. {first}", children.len()),
        (None, None) => "no last-use record".into(),
        (None, Some(_)) => String::new(),
    };
    Ok(Item {
        name: format!("rbd:{image}"),
        kind: if tmp { "rbd-temp" } else { "rbd" },
        image_id: None,
        image_name: None,
        size,
        allocated: size,
        idle_seconds: idle.unwrap_or(0),
        users: children.len(),
        action: Action::Kept,
        reason,
    })
}

/// Removes the image; a clone that appeared meanwhile makes it busy, not an error.
fn remove(rbd: &Rbd, image: &str, it: &mut Item, freed: &mut u64) -> Result<()> {
    match rbd.remove_image(image) {
        Ok(()) => {
            it.action = Action::Removed;
            it.reason = format!(
                "no clones, unused for {}",
                ago(Duration::from_secs(it.idle_seconds))
            );
            *freed += it.size;
        }
        Err(e) if e.code() == Some(rbd::EBUSY) => {
            it.action = Action::Busy;
            it.reason = "a clone appeared meanwhile".into();
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
