//! Image format detection and safety checks, run on the downloaded bytes before qemu-img sees
//! them. Reads only bounded regions of the file. One file per format with deep checks; formats
//! that are only recognised by their magic live here.

use std::path::Path;

use std::fs::File;

use crate::error::Kind;
use crate::fsutil;

pub mod gpt;
pub mod iso;
pub mod luks;
pub mod qcow2;
mod source;
pub mod vdi;
pub mod vhd;
pub mod vmdk;

pub use source::Source;

/// Default ceiling on an image's virtual size: 2 TiB. A larger one is more likely a header
/// crafted to exhaust the disk on conversion than a real root disk.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 2 << 40;

/// A disk image format as detected from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    /// A raw disk that starts with an MBR or GPT partition table.
    Gpt,
    Qcow2,
    Qed,
    Vmdk,
    Vhd,
    Vhdx,
    Vdi,
    Iso,
    Luks,
}

impl Format {
    /// The name imgcache prints and records.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Gpt => "gpt",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Iso => "iso",
            Format::Luks => "luks",
        }
    }

    /// The name qemu-img's `-f` takes for this format.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw | Format::Gpt | Format::Iso => "raw",
            Format::Vhd => "vpc",
            other => other.name(),
        }
    }

    /// The format a Glance `disk_format` promises, or an error for formats imgcache does not take.
    pub fn from_disk_format(disk_format: &str) -> Result<Format, Error> {
        Ok(match disk_format {
            "raw" | "aki" | "ari" | "ami" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vhd" => Format::Vhd,
            "vhdx" => Format::Vhdx,
            "vdi" => Format::Vdi,
            "iso" => Format::Iso,
            other => {
                return Err(Error::UnsupportedDiskFormat {
                    disk_format: other.to_owned(),
                });
            }
        })
    }

    /// Parses a format name as `imgcache inspect --declared` takes it (Glance's names).
    pub fn parse(name: &str) -> Option<Format> {
        Some(match name {
            "gpt" => Format::Gpt,
            "qed" => Format::Qed,
            "luks" => Format::Luks,
            "vpc" => Format::Vhd,
            other => Format::from_disk_format(other).ok()?,
        })
    }
}

/// Why an image was refused. Each check has its own variant and names the offset it read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("cannot read the image: {0}")]
    Io(String),
    #[error(
        "Glance disk_format {disk_format:?} is not supported; convert the image to raw or qcow2 and upload it again"
    )]
    UnsupportedDiskFormat { disk_format: String },
    #[error(
        "format mismatch: declared disk_format={declared} but the bytes are {detected}; refusing it (a qcow2 declared as raw is the classic attack, Nova bug 2071734)"
    )]
    Mismatch {
        declared: &'static str,
        detected: &'static str,
    },
    #[error("the bytes match several formats ({0}); polyglot images are refused")]
    Polyglot(String),
    #[error(
        "qed images are refused: the format is deprecated and its backing-file handling is unsafe"
    )]
    Qed,
    #[error(
        "virtual size {size} bytes (from the {format} header) exceeds the limit of {limit} bytes; raise --max-virtual-size if this image is genuine"
    )]
    TooLarge {
        format: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("qcow2: {0}")]
    Qcow2(qcow2::Error),
    #[error("vmdk: {0}")]
    Vmdk(vmdk::Error),
    #[error("vhd: {0}")]
    Vhd(vhd::Error),
    #[error("vdi: {0}")]
    Vdi(vdi::Error),
    #[error("luks: {0}")]
    Luks(luks::Error),
    #[error("qemu-img disagrees with the inspector: {0}")]
    QemuDisagrees(String),
}

// The format errors are wrapped without being a `source()`, so the printed chain names each
// check once.
macro_rules! wrap {
    ($($variant:ident($module:ident)),*) => {
        $(impl From<$module::Error> for Error {
            fn from(e: $module::Error) -> Error {
                Error::$variant(e)
            }
        })*
    };
}
wrap!(Qcow2(qcow2), Vmdk(vmdk), Vhd(vhd), Vdi(vdi), Luks(luks));

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Io(_) => Kind::Other,
            _ => Kind::Refused,
        }
    }
}

/// What the inspector may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_virtual_size: u64,
    pub allow_luks: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
            allow_luks: false,
        }
    }
}

/// What the inspector found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub format: Format,
    /// Virtual size from the header, where the format has one (file length for raw).
    pub virtual_size: Option<u64>,
}

/// Detects the format of `path` and runs its safety checks with the default limits.
pub fn inspect_path(path: &Path) -> Result<Report, Error> {
    inspect_path_with(path, &Limits::default())
}

/// Detects the format of `path` and runs its safety checks.
pub fn inspect_path_with(path: &Path, limits: &Limits) -> Result<Report, Error> {
    // Cache files are never followed or blocked on (a symlink or FIFO planted at a `.part`).
    let file =
        fsutil::open_regular(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    inspect_file(&file, path, limits)
}

/// Detects the format of a file we hold open and runs its safety checks; `shown` names it.
pub fn inspect_file(file: &File, shown: &Path, limits: &Limits) -> Result<Report, Error> {
    let src = Source::new(file).map_err(|e| Error::Io(format!("{}: {e}", shown.display())))?;
    inspect(&src, limits)
}

/// The formats whose signatures the bytes carry (before any deeper check).
pub fn signatures(src: &Source<'_>) -> Result<Vec<Format>, Error> {
    let head = src.read(0, 0x50)?;
    let mut found = Vec::new();
    if head.starts_with(qcow2::MAGIC) {
        found.push(Format::Qcow2);
    }
    if head.starts_with(b"QED\0") {
        found.push(Format::Qed);
    }
    if head.starts_with(vmdk::SPARSE_MAGIC)
        || head.starts_with(vmdk::TEXT_MAGIC)
        || vmdk::looks_like_text_descriptor(&src.read(0, 4096)?)
    {
        found.push(Format::Vmdk);
    }
    if head.starts_with(luks::MAGIC) {
        found.push(Format::Luks);
    }
    if head.starts_with(b"vhdxfile") {
        found.push(Format::Vhdx);
    }
    if head.get(0x40..0x44) == Some(&vdi::SIGNATURE[..]) {
        found.push(Format::Vdi);
    }
    if head.starts_with(vhd::MAGIC) {
        found.push(Format::Vhd);
    }
    if iso::detect(src)? {
        found.push(Format::Iso);
    }
    if gpt::detect(src)? {
        found.push(Format::Gpt);
    }
    Ok(found)
}

/// Detects the format and runs its safety checks.
pub fn inspect(src: &Source<'_>, limits: &Limits) -> Result<Report, Error> {
    let mut found = signatures(src)?;
    // A bootable ISO carries a partition table for USB boot: that pair is an ISO (as
    // oslo.utils' inspector decides). Any other pair is a polyglot.
    if found == [Format::Iso, Format::Gpt] {
        found = vec![Format::Iso];
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|f| f.name()).collect();
        return Err(Error::Polyglot(names.join(" + ")));
    }
    let format = found.first().copied().unwrap_or(Format::Raw);
    let virtual_size = match format {
        Format::Qcow2 => Some(qcow2::check(src)?.virtual_size),
        Format::Qed => return Err(Error::Qed),
        Format::Vmdk => Some(vmdk::check(src)?.virtual_size),
        Format::Luks => {
            luks::check(src, limits.allow_luks)?;
            None
        }
        Format::Vhd => Some(vhd::check(src)?),
        Format::Vdi => Some(vdi::check(src)?),
        Format::Vhdx => None,
        Format::Raw | Format::Gpt | Format::Iso => Some(src.len()),
    };
    if let Some(size) = virtual_size
        && size > limits.max_virtual_size
    {
        return Err(Error::TooLarge {
            format: format.name(),
            size,
            limit: limits.max_virtual_size,
        });
    }
    Ok(Report {
        format,
        virtual_size,
    })
}

/// Checks that the detected format is what Glance declared.
pub fn check_declared(declared: Format, detected: Format) -> Result<(), Error> {
    if declared == detected || (declared == Format::Raw && detected == Format::Gpt) {
        return Ok(());
    }
    Err(Error::Mismatch {
        declared: declared.name(),
        detected: detected.name(),
    })
}

/// Big-endian u32 at `off`, if the slice is long enough.
pub(crate) fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

/// Big-endian u64 at `off`.
pub(crate) fn be64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_be_bytes(s.try_into().ok()?))
}

/// Little-endian u64 at `off`.
pub(crate) fn le64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// Little-endian u32 at `off`.
pub(crate) fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect_bytes(bytes: &[u8]) -> Result<Report, Error> {
        inspect(&Source::from_bytes(bytes), &Limits::default())
    }

    #[test]
    fn plain_bytes_are_raw() {
        let r = inspect_bytes(&[7u8; 4096]).unwrap();
        assert_eq!(r.format, Format::Raw);
        assert_eq!(r.virtual_size, Some(4096));
    }

    #[test]
    fn qed_and_luks_are_banned() {
        let mut qed = b"QED\0".to_vec();
        qed.resize(1024, 0);
        assert_eq!(inspect_bytes(&qed), Err(Error::Qed));
        let mut luks = b"LUKS\xba\xbe\0\x01".to_vec();
        luks.resize(1024, 0);
        assert_eq!(
            inspect_bytes(&luks),
            Err(Error::Luks(luks::Error::NotAllowed))
        );
        let allowed = Limits {
            allow_luks: true,
            ..Limits::default()
        };
        assert_eq!(
            inspect(&Source::from_bytes(&luks), &allowed)
                .unwrap()
                .format,
            Format::Luks
        );
        luks[7] = 2;
        assert_eq!(
            inspect(&Source::from_bytes(&luks), &allowed),
            Err(Error::Luks(luks::Error::Version(2)))
        );
    }

    #[test]
    fn iso_is_detected() {
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(inspect_bytes(&iso).unwrap().format, Format::Iso);
    }

    fn mbr(entries: &[(u8, u8)]) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[510] = 0x55;
        d[511] = 0xAA;
        for (i, (flag, kind)) in entries.iter().enumerate() {
            d[446 + 16 * i] = *flag;
            d[446 + 16 * i + 4] = *kind;
        }
        d
    }

    #[test]
    fn partition_tables() {
        assert_eq!(
            inspect_bytes(&mbr(&[(0x80, 0x83)])).unwrap().format,
            Format::Gpt
        );
        assert_eq!(
            inspect_bytes(&mbr(&[(0, 0xEE)])).unwrap().format,
            Format::Gpt
        );
        // Bad boot flag or a protective entry that is not alone: not a partition table.
        assert_eq!(
            inspect_bytes(&mbr(&[(0x12, 0x83)])).unwrap().format,
            Format::Raw
        );
        assert_eq!(
            inspect_bytes(&mbr(&[(0, 0xEE), (0, 0x83)])).unwrap().format,
            Format::Raw
        );
        assert!(check_declared(Format::Raw, Format::Gpt).is_ok());
        assert!(check_declared(Format::Qcow2, Format::Gpt).is_err());
    }

    #[test]
    fn polyglots_are_refused_except_bootable_iso() {
        let mut iso = mbr(&[(0x80, 0x17)]);
        iso.resize(0x9000, 0);
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(inspect_bytes(&iso).unwrap().format, Format::Iso);
        iso[0..4].copy_from_slice(qcow2::MAGIC);
        let e = inspect_bytes(&iso).unwrap_err();
        assert!(
            matches!(e, Error::Polyglot(ref s) if s.contains("qcow2") && s.contains("iso")),
            "{e}"
        );
    }

    #[test]
    fn virtual_size_ceiling() {
        let limits = Limits {
            max_virtual_size: 1000,
            ..Limits::default()
        };
        assert!(matches!(
            inspect(&Source::from_bytes(&[1u8; 2000]), &limits),
            Err(Error::TooLarge {
                size: 2000,
                limit: 1000,
                ..
            })
        ));
    }

    #[test]
    fn vhd_differencing_and_vdi_diff_are_refused() {
        let mut vhd = vec![0u8; 2048];
        vhd[..8].copy_from_slice(vhd::MAGIC);
        vhd[60..64].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            inspect_bytes(&vhd),
            Err(Error::Vhd(vhd::Error::Differencing))
        );
        vhd[60..64].copy_from_slice(&2u32.to_be_bytes());
        vhd[48..56].copy_from_slice(&(1u64 << 20).to_be_bytes());
        assert_eq!(inspect_bytes(&vhd).unwrap().virtual_size, Some(1 << 20));
        let mut vdi = vec![0u8; 4096];
        vdi[0x40..0x44].copy_from_slice(&vdi::SIGNATURE);
        vdi[0x4c..0x50].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(
            inspect_bytes(&vdi),
            Err(Error::Vdi(vdi::Error::ImageType(4)))
        );
        vdi[0x4c..0x50].copy_from_slice(&1u32.to_le_bytes());
        vdi[0x154..0x158].copy_from_slice(&0x10000u32.to_le_bytes());
        assert!(matches!(
            inspect_bytes(&vdi),
            Err(Error::Vdi(vdi::Error::OutOfFile { .. }))
        ));
    }

    #[test]
    fn reads_are_bounded_on_a_huge_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 30).unwrap();
        let src = Source::new(&f).unwrap();
        inspect(&src, &Limits::default()).unwrap();
        assert!(
            src.bytes_read() <= 64 << 10,
            "read {} bytes",
            src.bytes_read()
        );
    }

    #[test]
    fn declared_must_match() {
        assert!(check_declared(Format::Raw, Format::Raw).is_ok());
        let e = check_declared(Format::Raw, Format::Qcow2).unwrap_err();
        assert_eq!(
            e,
            Error::Mismatch {
                declared: "raw",
                detected: "qcow2"
            }
        );
        assert!(e.to_string().contains("disk_format=raw"));
        assert!(Format::from_disk_format("ploop").is_err());
        assert_eq!(Format::from_disk_format("aki").unwrap(), Format::Raw);
    }

    #[test]
    fn short_reads_never_panic() {
        assert!(be32(&[1, 2, 3], 0).is_none());
        assert!(be64(&[0; 8], usize::MAX).is_none());
        assert_eq!(le32(&[1, 0, 0, 0], 0), Some(1));
    }
}
