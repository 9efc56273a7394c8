//! VDI (VirtualBox): signature at 0x40; normal and fixed images only (undo and differencing
//! images have parents); block map and data offsets inside the file.

use super::{Source, le32, le64};

/// Signature at offset 0x40, little-endian 0xbeda107f.
pub const SIGNATURE: [u8; 4] = [0x7f, 0x10, 0xda, 0xbe];
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;

/// Why a VDI was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("header truncated at offset {have} (need 0x180 bytes)")]
    Truncated { have: u64 },
    #[error(
        "image type {0} at offset 0x4c is not normal (1) or fixed (2); undo/differencing images have parents"
    )]
    ImageType(u32),
    #[error("{field} {value:#x} at offset {offset:#x} is outside the file ({len} bytes)")]
    OutOfFile {
        field: &'static str,
        offset: u64,
        value: u64,
        len: u64,
    },
}

/// Checks the header; returns the virtual size (offset 0x170).
pub fn check(src: &Source<'_>) -> Result<u64, super::Error> {
    let h = src.read(0, 0x180)?;
    let trunc = || Error::Truncated {
        have: h.len() as u64,
    };
    let image_type = le32(&h, 0x4c).ok_or_else(trunc)?;
    if image_type != TYPE_NORMAL && image_type != TYPE_FIXED {
        return Err(Error::ImageType(image_type).into());
    }
    for (field, offset) in [("blocks offset", 0x154u64), ("data offset", 0x158)] {
        let value = u64::from(le32(&h, offset as usize).ok_or_else(trunc)?);
        if value > src.len() {
            return Err(Error::OutOfFile {
                field,
                offset,
                value,
                len: src.len(),
            }
            .into());
        }
    }
    Ok(le64(&h, 0x170).ok_or_else(trunc)?)
}
