//! MBR / GPT partition tables on raw disks: signature 0x55AA at 510, every boot flag 0x00 or
//! 0x80, and a protective 0xEE entry (GPT) alone. Bytes that have the signature but fail the
//! checks are not a partition table (they are just raw data).

use super::Source;

/// True if the first sector is a sane MBR or GPT protective MBR.
pub fn detect(src: &Source<'_>) -> Result<bool, super::Error> {
    let s = src.read(0, 512)?;
    if s.len() < 512 || s[510..512] != [0x55, 0xAA] {
        return Ok(false);
    }
    let mut used = 0;
    let mut protective = false;
    for i in 0..4 {
        let e = &s[446 + 16 * i..446 + 16 * (i + 1)];
        if e[0] != 0x00 && e[0] != 0x80 {
            return Ok(false);
        }
        if e[4] != 0 {
            used += 1;
        }
        if e[4] == 0xEE {
            protective = true;
        }
    }
    Ok(used > 0 && !(protective && used > 1))
}
