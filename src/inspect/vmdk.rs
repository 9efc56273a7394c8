//! VMDK checks: only `monolithicSparse` and `streamOptimized`, a descriptor that parses line by
//! line, extents that name no paths, and no parent (delta) link. A flat-extent descriptor reads
//! arbitrary host files through qemu-img (CVE-2022-47951).

use super::{Source, le32, le64};

/// Sparse extent header magic `KDMV`.
pub const SPARSE_MAGIC: &[u8] = b"KDMV";
/// A bare text descriptor starts like this.
pub const TEXT_MAGIC: &[u8] = b"# Disk DescriptorFile";

/// Largest descriptor read, as oslo.utils' inspector.
const MAX_DESCRIPTOR: u64 = 1 << 20;
const SECTOR: u64 = 512;
const ALLOWED_CREATE_TYPES: &[&str] = &["monolithicSparse", "streamOptimized"];
/// `gdOffset` value meaning "grain directory at the end; read the footer".
const GD_AT_END: u64 = u64::MAX;

/// Why a VMDK was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("sparse header truncated at offset {have} (need 64 bytes)")]
    Truncated { have: u64 },
    #[error(
        "a bare text descriptor (no embedded data) is refused: its extents live in other files"
    )]
    TextDescriptor,
    #[error("descriptor at offset {offset} with {size} bytes is outside the file or over 1 MiB")]
    DescriptorBounds { offset: u64, size: u64 },
    #[error("descriptor is not text (line {line})")]
    NotText { line: usize },
    #[error("descriptor line {line} is not a comment, key=value or extent: {text:?}")]
    Grammar { line: usize, text: String },
    #[error("createType {0:?} is not allowed (only monolithicSparse and streamOptimized)")]
    CreateType(String),
    #[error("descriptor has no createType")]
    NoCreateType,
    #[error("extent on line {line} names a path {path:?}; refused (CVE-2022-47951)")]
    ExtentPath { line: usize, path: String },
    #[error("descriptor has no extent")]
    NoExtent,
    #[error("has a parent image ({key} on line {line}); delta disks are refused")]
    Parent { line: usize, key: String },
    #[error("footer at offset {offset} does not match the header")]
    Footer { offset: u64 },
    #[error("sparse header version {0} is not 1, 2 or 3")]
    Version(u32),
    #[error(
        "descriptor at sector {0}, not 1: qemu reads the parent hint at sector 1 whatever the header says; refused"
    )]
    DescriptorOffset(u64),
    #[error("descriptor key {key:?} appears twice (lines {first} and {line}); ambiguous, refused")]
    DuplicateKey {
        key: String,
        first: usize,
        line: usize,
    },
    #[error(
        "descriptor line {line} mentions {key} inside a comment; qemu reads it there too, refused"
    )]
    KeyInComment { line: usize, key: &'static str },
}

/// What the checks found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmdk {
    pub create_type: String,
    pub virtual_size: u64,
}

/// Checks a VMDK file.
pub fn check(src: &Source<'_>) -> Result<Vmdk, super::Error> {
    let head = src.read(0, 64)?;
    if !head.starts_with(SPARSE_MAGIC) {
        // A bare descriptor always points at extents in other files. Report the most specific
        // problem its text has (a host path, a bad createType) before the general refusal.
        let text = src.read(0, MAX_DESCRIPTOR as usize)?;
        check_descriptor(&text)?;
        return Err(Error::TextDescriptor.into());
    }
    let field = |off| {
        le64(&head, off).ok_or(Error::Truncated {
            have: head.len() as u64,
        })
    };
    let version = le32(&head, 4).ok_or(Error::Truncated {
        have: head.len() as u64,
    })?;
    if !(1..=3).contains(&version) {
        return Err(Error::Version(version).into());
    }
    let capacity = field(12)?;
    let desc_offset = field(28)?;
    let desc_size = field(36)?;
    let gd_offset = field(56)?;
    le32(&head, 44).ok_or(Error::Truncated {
        have: head.len() as u64,
    })?;
    if desc_offset != 1 {
        return Err(Error::DescriptorOffset(desc_offset).into());
    }
    let offset = desc_offset.checked_mul(SECTOR);
    let size = desc_size.checked_mul(SECTOR);
    let (offset, size) = match (offset, size) {
        (Some(o), Some(s)) if s <= MAX_DESCRIPTOR && o <= src.len() && s <= src.len() - o => (o, s),
        _ => {
            return Err(Error::DescriptorBounds {
                offset: desc_offset.saturating_mul(SECTOR),
                size: desc_size.saturating_mul(SECTOR),
            }
            .into());
        }
    };
    let text = src.read(offset, size as usize)?;
    let create_type = check_descriptor(&text)?;
    if gd_offset == GD_AT_END {
        // streamOptimized: the real header is a footer 1 KiB before the end-of-stream marker.
        let footer_at = src
            .len()
            .checked_sub(1024)
            .ok_or(Error::Footer { offset: 0 })?;
        let footer = src.read(footer_at, 64)?;
        // Every field but gdOffset must be the header's (oslo's check): version, flags,
        // capacity, grain size, descriptor offset and size, entries per grain table.
        let same = |range: std::ops::Range<usize>| {
            footer.get(range.clone()).is_some() && footer.get(range.clone()) == head.get(range)
        };
        if !footer.starts_with(SPARSE_MAGIC) || !same(4..28) || !same(28..48) {
            return Err(Error::Footer { offset: footer_at }.into());
        }
    }
    Ok(Vmdk {
        create_type,
        virtual_size: capacity.saturating_mul(SECTOR),
    })
}

/// Parses an embedded descriptor and returns its createType.
pub fn check_descriptor(bytes: &[u8]) -> Result<String, Error> {
    // The descriptor area is NUL-padded after the text.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).map_err(|e| Error::NotText {
        line: bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1,
    })?;
    let mut create_type = None;
    let mut extents = 0;
    let mut seen: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.starts_with('#') {
            // qemu finds `parentFileNameHint` and `createType` with strstr over the whole text,
            // comments included: a comment naming them is not harmless.
            for key in ["parentFileNameHint", "createType"] {
                if l.contains(key) {
                    return Err(Error::KeyInComment { line, key });
                }
            }
            continue;
        }
        if l.is_empty() {
            continue;
        }
        let grammar = || Error::Grammar {
            line,
            text: raw.to_owned(),
        };
        if let Some(rest) = ["RW ", "RDONLY ", "NOACCESS "]
            .iter()
            .find_map(|p| l.strip_prefix(p))
        {
            let path = extent_path(rest).ok_or_else(grammar)?;
            if path.contains('/') || path.contains('\\') {
                return Err(Error::ExtentPath {
                    line,
                    path: path.to_owned(),
                });
            }
            extents += 1;
            continue;
        }
        let (key, value) = l.split_once('=').ok_or_else(grammar)?;
        let (key, value) = (key.trim(), value.trim().trim_matches('"'));
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(grammar());
        }
        if let Some(&first) = seen.get(key) {
            return Err(Error::DuplicateKey {
                key: key.to_owned(),
                first,
                line,
            });
        }
        seen.insert(key.to_owned(), line);
        check_key(key, value, line)?;
        if key == "createType" {
            create_type = Some(value.to_owned());
        }
    }
    let create_type = create_type.ok_or(Error::NoCreateType)?;
    if !ALLOWED_CREATE_TYPES.contains(&create_type.as_str()) {
        return Err(Error::CreateType(create_type));
    }
    if extents == 0 {
        return Err(Error::NoExtent);
    }
    Ok(create_type)
}

/// A descriptor key that makes a delta disk (a parent to open) is refused.
fn check_key(key: &str, value: &str, line: usize) -> Result<(), Error> {
    let parent = match key {
        "parentFileNameHint" => true,
        "parentCID" => !value.eq_ignore_ascii_case("ffffffff"),
        _ => false,
    };
    if parent {
        return Err(Error::Parent {
            line,
            key: key.into(),
        });
    }
    Ok(())
}

/// True if `head` reads as a text descriptor the way qemu's probe reads one: after comment
/// and blank lines, a `version=` line (qemu does not need the `# Disk DescriptorFile` line).
pub fn looks_like_text_descriptor(head: &[u8]) -> bool {
    let end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return false;
    };
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with("version="))
}

/// From `<sectors> <type> "<path>" [offset]`, the quoted path.
fn extent_path(rest: &str) -> Option<&str> {
    let mut parts = rest.trim().splitn(3, ' ');
    parts.next()?.parse::<u64>().ok()?;
    parts.next()?;
    let quoted = parts.next()?.trim();
    let inner = quoted.strip_prefix('"')?;
    let close = inner.find('"')?;
    Some(&inner[..close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_qemu_reads_in_comments_and_duplicates_is_refused() {
        let hint = GOOD.replace(
            "version=1",
            "version=1\n# parentFileNameHint=\"/etc/shadow\"",
        );
        assert!(matches!(
            check_descriptor(hint.as_bytes()),
            Err(Error::KeyInComment {
                key: "parentFileNameHint",
                ..
            })
        ));
        let comment = GOOD.replace("version=1", "#createType=\"monolithicFlat\"\nversion=1");
        assert!(matches!(
            check_descriptor(comment.as_bytes()),
            Err(Error::KeyInComment {
                key: "createType",
                ..
            })
        ));
        let twice = GOOD.replace(
            "createType=\"monolithicSparse\"",
            "createType=\"monolithicFlat\"\ncreateType=\"monolithicSparse\"",
        );
        assert!(matches!(
            check_descriptor(twice.as_bytes()),
            Err(Error::DuplicateKey { .. })
        ));
        assert!(looks_like_text_descriptor(b"# x\n\nversion=1\nCID=1\n"));
        assert!(!looks_like_text_descriptor(b"hello\nversion=1\n"));
    }

    const GOOD: &str = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 2048 SPARSE \"disk.vmdk\"\n\nddb.virtualHWVersion = \"4\"\n";

    #[test]
    fn good_descriptor() {
        assert_eq!(
            check_descriptor(GOOD.as_bytes()).unwrap(),
            "monolithicSparse"
        );
    }

    #[test]
    fn flat_extent_naming_host_file_is_refused() {
        let d = GOOD
            .replace("monolithicSparse", "monolithicFlat")
            .replace("SPARSE \"disk.vmdk\"", "FLAT \"/etc/passwd\" 0");
        assert_eq!(
            check_descriptor(d.as_bytes()).unwrap_err(),
            Error::ExtentPath {
                line: 8,
                path: "/etc/passwd".into()
            }
        );
        let d = GOOD.replace("monolithicSparse", "twoGbMaxExtentSparse");
        assert_eq!(
            check_descriptor(d.as_bytes()).unwrap_err(),
            Error::CreateType("twoGbMaxExtentSparse".into())
        );
        let d = GOOD.replace("\"disk.vmdk\"", "\"../../etc/shadow\"");
        assert_eq!(
            check_descriptor(d.as_bytes()).unwrap_err(),
            Error::ExtentPath {
                line: 8,
                path: "../../etc/shadow".into()
            }
        );
    }

    #[test]
    fn grammar_and_parents() {
        let d = GOOD.replace("version=1", "this is not vmdk");
        assert!(matches!(
            check_descriptor(d.as_bytes()),
            Err(Error::Grammar { line: 2, .. })
        ));
        let d = GOOD.replace("parentCID=ffffffff", "parentCID=1234abcd");
        assert!(matches!(
            check_descriptor(d.as_bytes()),
            Err(Error::Parent { .. })
        ));
        let d = GOOD.replace("RW 2048 SPARSE \"disk.vmdk\"", "");
        assert_eq!(check_descriptor(d.as_bytes()).unwrap_err(), Error::NoExtent);
    }
}
