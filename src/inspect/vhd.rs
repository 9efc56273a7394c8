//! VHD (qemu's `vpc`): the 512-byte footer copy at offset 0 of dynamic and differencing disks.
//! Differencing disks name a parent (a backing file) and are refused.

use super::{Source, be32, be64};

/// Footer cookie.
pub const MAGIC: &[u8] = b"conectix";
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;

/// Why a VHD was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("footer truncated at offset {have} (need 512 bytes)")]
    Truncated { have: u64 },
    #[error("differencing disk (disk type 4 at offset 60) has a parent image; refused")]
    Differencing,
    #[error("disk type {0} at offset 60 is not fixed (2) or dynamic (3)")]
    DiskType(u32),
    #[error(
        "dynamic header offset {offset:#x} (field at offset 16) is outside the file ({len} bytes)"
    )]
    DataOffset { offset: u64, len: u64 },
}

/// Checks the footer; returns the virtual size (current size, offset 48).
pub fn check(src: &Source<'_>) -> Result<u64, super::Error> {
    let f = src.read(0, 512)?;
    if f.len() < 512 {
        return Err(Error::Truncated {
            have: f.len() as u64,
        }
        .into());
    }
    let field = |off| {
        be64(&f, off).ok_or(Error::Truncated {
            have: f.len() as u64,
        })
    };
    let disk_type = be32(&f, 60).ok_or(Error::Truncated {
        have: f.len() as u64,
    })?;
    match disk_type {
        DISK_DIFFERENCING => return Err(Error::Differencing.into()),
        DISK_FIXED | DISK_DYNAMIC => {}
        other => return Err(Error::DiskType(other).into()),
    }
    let data_offset = field(16)?;
    if disk_type == DISK_DYNAMIC && (data_offset > src.len() || src.len() - data_offset < 1024) {
        return Err(Error::DataOffset {
            offset: data_offset,
            len: src.len(),
        }
        .into());
    }
    Ok(field(48)?)
}
