//! Verification of a download and of what is made from it: Glance's size and hash, qemu-img's
//! second opinion on the inspector's verdict, and the free-space check before a conversion.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::Error;
use super::hash::GlanceHash;
use crate::glance::Image;
use crate::inspect::{self, Format};
use crate::qemu_img;
use crate::units::Reserve;

/// The received size and Glance-hash digest must be Glance's.
pub fn verify(image: &Image, size: u64, algo: &str, expected: &str, digest: &str) -> Result<()> {
    if let Some(want) = image.size
        && want != size
    {
        return Err(Error::Size {
            id: image.id.clone(),
            expected: want,
            got: size,
        }
        .into());
    }
    if digest != expected {
        return Err(Error::Hash {
            id: image.id.clone(),
            algo: algo.to_owned(),
            expected: expected.to_owned(),
            got: digest.to_owned(),
        }
        .into());
    }
    Ok(())
}

/// Glance's hash value as the record keeps it: os_hash when there is one, else `checksum`.
pub fn hash_value(image: &Image) -> Option<&str> {
    match (&image.os_hash_algo, &image.os_hash_value) {
        (Some(_), Some(v)) => Some(v),
        _ => image.checksum.as_deref(),
    }
}

/// The algorithm and expected hex value to verify: os_hash when present, else MD5 `checksum`.
pub fn hash_spec(image: &Image) -> Result<(String, String)> {
    let id = image.id.clone();
    match (&image.os_hash_algo, &image.os_hash_value, &image.checksum) {
        (Some(a), Some(v), _) if !a.is_empty() && !v.is_empty() => {
            GlanceHash::new(a).ok_or(Error::UnsupportedHash {
                id,
                algo: a.clone(),
            })?;
            Ok((a.to_ascii_lowercase(), v.to_ascii_lowercase()))
        }
        (_, _, Some(md5)) if !md5.is_empty() => Ok(("md5".into(), md5.to_ascii_lowercase())),
        _ => Err(Error::NoHash { id }.into()),
    }
}

/// qemu-img must agree with the inspector and find nothing the inspector refused.
pub fn second_opinion(
    report: &inspect::Report,
    info: &qemu_img::Info,
) -> Result<(), inspect::Error> {
    let disagree = |what: String| Err(inspect::Error::QemuDisagrees(what));
    if info.format != report.format.qemu_name() {
        return disagree(format!(
            "qemu-img reads the file as {}, the inspector as {}",
            info.format,
            report.format.name()
        ));
    }
    if let Some(b) = &info.backing_filename {
        return disagree(format!("qemu-img sees a backing file {b:?}"));
    }
    if let Some(d) = info.data_file() {
        return disagree(format!("qemu-img sees an external data file {d:?}"));
    }
    if let Some(t) = info.create_type()
        && !["monolithicSparse", "streamOptimized"].contains(&t)
    {
        return disagree(format!("qemu-img sees VMDK create-type {t:?}"));
    }
    // Formats whose header size qemu reads the same way (vpc may round to its CHS geometry).
    let comparable = matches!(report.format, Format::Qcow2 | Format::Vmdk | Format::Vdi);
    if let Some(v) = report.virtual_size
        && comparable
        && v != info.virtual_size
    {
        return disagree(format!(
            "virtual size {} in the header, {} per qemu-img",
            v, info.virtual_size
        ));
    }
    Ok(())
}

/// Converting writes at most the virtual size, usually far less (zeros stay holes). Like
/// Ironic, expect the smaller of the virtual size and twice the downloaded size, and require it
/// on top of the `--min-free` reserve. Returns the reserve in bytes (the conversion is stopped
/// if the free space falls to it: a small compressed image can expand far past the estimate).
pub fn check_space(
    id: &str,
    dir: &Path,
    size: u64,
    virtual_size: u64,
    min_free: Reserve,
) -> Result<u64> {
    let need = virtual_size.min(size.saturating_mul(2));
    let read =
        |e| anyhow::Error::new(e).context(format!("cannot read free space of {}", dir.display()));
    let available = fs2::available_space(dir).map_err(read)?;
    let reserve = min_free.of(fs2::total_space(dir).map_err(read)?);
    if available < need.saturating_add(reserve) {
        return Err(Error::NoSpace {
            id: id.to_owned(),
            dir: PathBuf::from(dir),
            need,
            reserve,
            available,
        }
        .into());
    }
    Ok(reserve)
}

/// The watch of a running conversion: stop once the free space is down to `reserve`.
pub fn space_watch(dir: &Path, reserve: u64) -> impl Fn() -> Option<String> + '_ {
    move || match fs2::available_space(dir) {
        Ok(free) if free <= reserve => Some(format!(
            "the free space in {} fell to {free} bytes, the --min-free reserve is {reserve}; nothing was kept",
            dir.display()
        )),
        _ => None,
    }
}
