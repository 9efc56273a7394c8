//! LUKS: encrypted images. Refused unless explicitly allowed, and then version 1 only (as
//! oslo.utils' inspector).

use super::Source;

/// `LUKS\xba\xbe`.
pub const MAGIC: &[u8] = b"LUKS\xba\xbe";

/// Why a LUKS image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("encrypted (LUKS) images are refused unless --allow-luks is given")]
    NotAllowed,
    #[error("LUKS version {0} at offset 6 is not 1")]
    Version(u16),
}

/// Checks a LUKS header.
pub fn check(src: &Source<'_>, allowed: bool) -> Result<(), super::Error> {
    if !allowed {
        return Err(Error::NotAllowed.into());
    }
    let h = src.read(0, 8)?;
    let version = match h.get(6..8) {
        Some(&[a, b]) => u16::from_be_bytes([a, b]),
        _ => 0,
    };
    if version != 1 {
        return Err(Error::Version(version).into());
    }
    Ok(())
}
