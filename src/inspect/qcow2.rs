//! qcow2 (versions 2 and 3) header checks. Refuses a backing file, an external data file
//! (CVE-2024-32498), unknown incompatible features, encryption, and header fields that point
//! outside the file. Every field is range-checked before use.

use super::{Source, be32, be64};

/// `QFI\xfb`.
pub const MAGIC: &[u8] = b"QFI\xfb";

/// Incompatible feature bits qemu defines: 0 dirty, 1 corrupt, 2 external data file,
/// 3 compression type, 4 extended L2 entries.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The bits we accept. Like oslo.utils' format_inspector, anything from bit 4 up is refused.
const INCOMPAT_KNOWN_SAFE: u64 = (1 << 0) | (1 << 1) | (1 << 3);

/// qemu accepts cluster sizes from 512 B (bits 9) to 2 MiB (bits 21).
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;

/// Why a qcow2 header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("header truncated: {have} bytes, need {need} (offset {have})")]
    Truncated { have: u64, need: u64 },
    #[error("version {version} at offset 4 is not 2 or 3")]
    Version { version: u32 },
    #[error("has a backing file {name:?} (offset 8); images with backing files are refused")]
    BackingFile { name: String },
    #[error("cluster_bits {bits} at offset 20 is outside 9..=21")]
    ClusterBits { bits: u32 },
    #[error("encrypted (crypt_method {method} at offset 32); encrypted images are refused")]
    Encrypted { method: u32 },
    #[error(
        "has an external data file (incompatible feature bit 2 at offset 72); refused (CVE-2024-32498)"
    )]
    DataFile,
    #[error("unknown incompatible features {bits:#x} at offset 72; refused")]
    UnknownIncompatible { bits: u64 },
    #[error("header_length {length} at offset 100 is smaller than 104")]
    HeaderLength { length: u32 },
    #[error("{field} at offset {offset} points outside the file ({value:#x} + {len} > {file_len})")]
    OutOfFile {
        field: &'static str,
        offset: u64,
        value: u64,
        len: u64,
        file_len: u64,
    },
}

/// The header fields imgcache uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_bits: u32,
}

/// The backing file name of a qcow2 file, read from its header; `Ok(None)` for a file that is
/// not qcow2 or has no backing file. Reads at most 1 KiB + the name; never follows anything.
pub fn backing_file(src: &Source<'_>) -> Result<Option<String>, super::Error> {
    let h = src.read(0, 20)?;
    if !h.starts_with(MAGIC) {
        return Ok(None);
    }
    let (Some(offset), Some(size)) = (be64(&h, 8), be32(&h, 16)) else {
        return Ok(None);
    };
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    // qemu limits backing file names to 1023 bytes.
    let want = size.min(1023) as usize;
    let name = src.read(offset, want)?;
    if name.len() < want {
        // The header names a backing file the file does not hold (a truncated disk): unknown.
        return Err(Error::Truncated {
            have: src.len(),
            need: offset + want as u64,
        }
        .into());
    }
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

/// Parses and checks the header of a qcow2 file.
pub fn check(src: &Source<'_>) -> Result<Header, super::Error> {
    let h = src.read(0, 104)?;
    Ok(check_header(&h, src)?)
}

fn field32(h: &[u8], off: usize) -> Result<u32, Error> {
    be32(h, off).ok_or(Error::Truncated {
        have: h.len() as u64,
        need: off as u64 + 4,
    })
}

fn field64(h: &[u8], off: usize) -> Result<u64, Error> {
    be64(h, off).ok_or(Error::Truncated {
        have: h.len() as u64,
        need: off as u64 + 8,
    })
}

fn check_header(h: &[u8], src: &Source<'_>) -> Result<Header, Error> {
    let version = field32(h, 4)?;
    if !(2..=3).contains(&version) {
        return Err(Error::Version { version });
    }
    let need = if version == 2 { 72 } else { 104 };
    if (h.len() as u64) < need {
        return Err(Error::Truncated {
            have: h.len() as u64,
            need,
        });
    }
    let backing_offset = field64(h, 8)?;
    if backing_offset != 0 {
        let size = field32(h, 16)?.min(1023) as usize;
        let name = src
            .read(backing_offset, size)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        return Err(Error::BackingFile { name });
    }
    let cluster_bits = field32(h, 20)?;
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(Error::ClusterBits { bits: cluster_bits });
    }
    let virtual_size = field64(h, 24)?;
    let method = field32(h, 32)?;
    if method != 0 {
        return Err(Error::Encrypted { method });
    }
    if version == 3 {
        let incompat = field64(h, 72)?;
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::DataFile);
        }
        let unknown = incompat & !INCOMPAT_KNOWN_SAFE;
        if unknown != 0 {
            return Err(Error::UnknownIncompatible { bits: unknown });
        }
        let length = field32(h, 100)?;
        if length < 104 {
            return Err(Error::HeaderLength { length });
        }
    }
    let file_len = src.len();
    let l1_entries = u64::from(field32(h, 36)?);
    let l1_offset = field64(h, 40)?;
    within(file_len, "l1_table_offset", 40, l1_offset, l1_entries * 8)?;
    let rt_offset = field64(h, 48)?;
    let rt_clusters = u64::from(field32(h, 56)?);
    within(
        file_len,
        "refcount_table_offset",
        48,
        rt_offset,
        rt_clusters << cluster_bits,
    )?;
    Ok(Header {
        version,
        virtual_size,
        cluster_bits,
    })
}

/// Checks `value .. value + len` lies inside the file, by subtraction so nothing overflows.
fn within(
    file_len: u64,
    field: &'static str,
    offset: u64,
    value: u64,
    len: u64,
) -> Result<(), Error> {
    if len == 0 {
        return Ok(());
    }
    if value > file_len || len > file_len - value {
        return Err(Error::OutOfFile {
            field,
            offset,
            value,
            len,
            file_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal valid v3 header: 64 KiB clusters, 1 GiB virtual, tables inside a 4-cluster file.
    fn header() -> Vec<u8> {
        let mut h = vec![0u8; 4 * 65536];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 * 65536).to_be_bytes());
        h[48..56].copy_from_slice(&65536u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    fn run(bytes: &[u8]) -> Result<Header, super::super::Error> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        check(&Source::new(&f).unwrap())
    }

    fn err(bytes: &[u8]) -> Error {
        match run(bytes) {
            Err(super::super::Error::Qcow2(e)) => e,
            other => panic!("expected a qcow2 error, got {other:?}"),
        }
    }

    #[test]
    fn valid_header_passes() {
        let h = run(&header()).unwrap();
        assert_eq!(h.virtual_size, 1 << 30);
        assert_eq!(h.version, 3);
    }

    #[test]
    fn backing_file_is_refused_and_named() {
        let mut h = header();
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        h[512..523].copy_from_slice(b"/etc/passwd");
        assert_eq!(
            err(&h),
            Error::BackingFile {
                name: "/etc/passwd".into()
            }
        );
    }

    #[test]
    fn backing_file_name_is_read_natively() {
        let mut h = header();
        let src = |b: &[u8]| {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(b).unwrap();
            f
        };
        let f = src(&h);
        assert_eq!(backing_file(&Source::new(&f).unwrap()).unwrap(), None);
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&9u32.to_be_bytes());
        h[512..521].copy_from_slice(b"../_base/");
        let f = src(&h);
        assert_eq!(
            backing_file(&Source::new(&f).unwrap()).unwrap().as_deref(),
            Some("../_base/")
        );
        let f = src(&h[..10]);
        assert_eq!(backing_file(&Source::new(&f).unwrap()).unwrap(), None);
    }

    #[test]
    fn data_file_bit_is_refused() {
        let mut h = header();
        h[72..80].copy_from_slice(&4u64.to_be_bytes());
        assert_eq!(err(&h), Error::DataFile);
    }

    #[test]
    fn unknown_incompatible_bit_is_refused() {
        let mut h = header();
        h[72..80].copy_from_slice(&(1u64 << 9 | 1).to_be_bytes());
        assert_eq!(err(&h), Error::UnknownIncompatible { bits: 1 << 9 });
    }

    #[test]
    fn version_4_is_refused() {
        let mut h = header();
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(err(&h), Error::Version { version: 4 });
    }

    #[test]
    fn truncated_header_is_refused() {
        assert_eq!(
            err(&header()[..90]),
            Error::Truncated {
                have: 90,
                need: 104
            }
        );
        assert!(matches!(err(&header()[..6]), Error::Truncated { .. }));
    }

    #[test]
    fn encrypted_is_refused() {
        let mut h = header();
        h[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(err(&h), Error::Encrypted { method: 1 });
    }

    #[test]
    fn l1_table_beyond_eof_is_refused_without_overflow() {
        let mut h = header();
        h[40..48].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            err(&h),
            Error::OutOfFile {
                field: "l1_table_offset",
                ..
            }
        ));
    }

    #[test]
    fn bad_cluster_bits_are_refused() {
        let mut h = header();
        h[20..24].copy_from_slice(&63u32.to_be_bytes());
        assert_eq!(err(&h), Error::ClusterBits { bits: 63 });
    }
}
