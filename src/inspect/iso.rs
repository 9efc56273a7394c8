//! ISO 9660: the `CD001` volume descriptor identifier at sector 16 (or 17, 18).

use super::Source;

/// True if the image has an ISO 9660 volume descriptor.
pub fn detect(src: &Source<'_>) -> Result<bool, super::Error> {
    for off in [0x8001u64, 0x8801, 0x9001] {
        if src.read(off, 5)? == b"CD001" {
            return Ok(true);
        }
    }
    Ok(false)
}
