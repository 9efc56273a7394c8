//! Image format detection and safety checks, run on the downloaded bytes before qemu-img sees
//! them. Reads only bounded regions of the file. One file per format with deep checks; formats
//! that are only recognised by their magic live here.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::Kind;

pub mod qcow2;
pub mod vmdk;

/// A disk image format as detected from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
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
            Format::Raw | Format::Iso => "raw",
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
        "format mismatch: Glance says disk_format={declared} but the bytes are {detected}; refusing it (a qcow2 declared as raw is the classic attack, Nova bug 2071734)"
    )]
    Mismatch {
        declared: &'static str,
        detected: &'static str,
    },
    #[error("{format} images are refused: {why}")]
    Banned {
        format: &'static str,
        why: &'static str,
    },
    #[error("qcow2: {0}")]
    Qcow2(#[from] qcow2::Error),
    #[error("vmdk: {0}")]
    Vmdk(#[from] vmdk::Error),
    #[error("qemu-img disagrees with the inspector: {0}")]
    QemuDisagrees(String),
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Io(_) => Kind::Other,
            _ => Kind::Refused,
        }
    }
}

/// What the inspector found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub format: Format,
    /// Virtual size from the header, where the format has one.
    pub virtual_size: Option<u64>,
}

/// Bounded reads from the image file.
pub struct Source<'a> {
    file: &'a File,
    len: u64,
}

impl<'a> Source<'a> {
    /// Wraps an open file.
    pub fn new(file: &'a File) -> std::io::Result<Source<'a>> {
        Ok(Source {
            len: file.metadata()?.len(),
            file,
        })
    }

    /// File length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads up to `n` bytes at `offset`; short at end of file, empty past it.
    pub fn read(&self, offset: u64, n: usize) -> Result<Vec<u8>, Error> {
        if offset >= self.len {
            return Ok(Vec::new());
        }
        let n = n.min(usize::try_from(self.len - offset).unwrap_or(usize::MAX));
        let mut buf = vec![0u8; n];
        let mut done = 0;
        while done < n {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e.to_string())),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

/// Detects the format of `path` and runs its safety checks.
pub fn inspect_path(path: &Path) -> Result<Report, Error> {
    let file = File::open(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let src = Source::new(&file).map_err(|e| Error::Io(e.to_string()))?;
    inspect(&src)
}

/// Detects the format and runs its safety checks.
pub fn inspect(src: &Source<'_>) -> Result<Report, Error> {
    let head = src.read(0, 512)?;
    if head.starts_with(qcow2::MAGIC) {
        let h = qcow2::check(src)?;
        return Ok(Report {
            format: Format::Qcow2,
            virtual_size: Some(h.virtual_size),
        });
    }
    if head.starts_with(b"QED\0") {
        return Err(Error::Banned {
            format: "qed",
            why: "the format is deprecated and its backing-file handling is unsafe",
        });
    }
    if head.starts_with(vmdk::SPARSE_MAGIC) || head.starts_with(vmdk::TEXT_MAGIC) {
        let v = vmdk::check(src)?;
        return Ok(Report {
            format: Format::Vmdk,
            virtual_size: Some(v.virtual_size),
        });
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        return Err(Error::Banned {
            format: "luks",
            why: "encrypted images cannot be cached unattended",
        });
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(Report {
            format: Format::Vhdx,
            virtual_size: None,
        });
    }
    if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        return Ok(Report {
            format: Format::Vdi,
            virtual_size: None,
        });
    }
    if head.starts_with(b"conectix") || is_vhd_footer(src)? {
        return Ok(Report {
            format: Format::Vhd,
            virtual_size: None,
        });
    }
    for off in [0x8001u64, 0x8801, 0x9001] {
        if src.read(off, 5)? == b"CD001" {
            return Ok(Report {
                format: Format::Iso,
                virtual_size: Some(src.len()),
            });
        }
    }
    Ok(Report {
        format: Format::Raw,
        virtual_size: Some(src.len()),
    })
}

fn is_vhd_footer(src: &Source<'_>) -> Result<bool, Error> {
    if src.len() < 512 {
        return Ok(false);
    }
    Ok(src.read(src.len() - 512, 8)? == b"conectix")
}

/// Checks that the detected format is what Glance declared.
pub fn check_declared(declared: Format, detected: Format) -> Result<(), Error> {
    if declared == detected {
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
    use std::io::Write;

    fn inspect_bytes(bytes: &[u8]) -> Result<Report, Error> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        inspect(&Source::new(&f).unwrap())
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
        assert!(matches!(
            inspect_bytes(&qed),
            Err(Error::Banned { format: "qed", .. })
        ));
        let mut luks = b"LUKS\xba\xbe\0\x01".to_vec();
        luks.resize(1024, 0);
        assert!(matches!(
            inspect_bytes(&luks),
            Err(Error::Banned { format: "luks", .. })
        ));
    }

    #[test]
    fn iso_is_detected() {
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(inspect_bytes(&iso).unwrap().format, Format::Iso);
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
