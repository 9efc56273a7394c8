//! Reading the state of a cache: what is in `_base` (entries by type, temp files, records,
//! orphan records) and which entries instances use — whoever made them: from the usage records
//! `create` writes, the backing file of every qcow2 in every instance directory (read natively
//! from the header, no `qemu-img info` process per disk as Nova runs) matched to entries by
//! identity, Nova's `libvirt.xml`, and the kernel/ramdisk copies of AMI instances.

mod usage;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Serialize;

pub use usage::{Usage, scan_usage};

use crate::cache::{self, Cache, Record};
use crate::fsutil;

/// Largest `--keep-from` list read (a million ids).
const MAX_KEEP_FILE: u64 = 64 << 20;

/// What a `_base` file is, from its name (Nova's naming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Image,
    Resized,
    Kernel,
    Ramdisk,
    Ephemeral,
    Swap,
}

impl EntryType {
    /// Name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            EntryType::Image => "image",
            EntryType::Resized => "resized",
            EntryType::Kernel => "kernel",
            EntryType::Ramdisk => "ramdisk",
            EntryType::Ephemeral => "ephemeral",
            EntryType::Swap => "swap",
        }
    }
}

/// One cache entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: EntryType,
    pub path: PathBuf,
    pub size: u64,
    pub allocated: u64,
    pub mtime: SystemTime,
    pub record: Option<Record>,
}

/// A temp file (`.part`, `.converted`, record temp) and the entry it belongs to.
#[derive(Debug, Clone)]
pub struct Temp {
    pub file: String,
    pub entry: String,
    pub path: PathBuf,
    pub size: u64,
    pub allocated: u64,
    pub mtime: SystemTime,
}

/// The contents of `_base`.
#[derive(Debug, Default)]
pub struct Base {
    pub entries: Vec<Entry>,
    pub temps: Vec<Temp>,
    /// Records (`<entry>.info`) whose entry is gone: left when another cache manager (Nova's)
    /// deleted the entry, or written by Nova itself up to Mitaka.
    pub orphans: Vec<Temp>,
}

fn is_hex40(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Classifies a `_base` file name; `None` for records, temps and foreign files.
pub fn classify(name: &str) -> Option<EntryType> {
    if is_hex40(name) {
        return Some(EntryType::Image);
    }
    if let Some((head, tail)) = name.split_once('_') {
        if is_hex40(head)
            && (tail == "sm" || (!tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit())))
        {
            return Some(EntryType::Resized);
        }
        if head == "swap" && !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) {
            return Some(EntryType::Swap);
        }
        if head == "ephemeral"
            && let Some((gib, hash)) = tail.split_once('_')
            && !gib.is_empty()
            && gib.bytes().all(|b| b.is_ascii_digit())
            && hash.len() == 7
            && hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Some(EntryType::Ephemeral);
        }
    }
    None
}

/// The entry a temp file belongs to, if `name` is one of ours: `<entry>.part`,
/// `<entry>.converted`, or a hidden atomic-write temp `.<entry>.info.tmp-<random>`.
fn temp_owner(name: &str) -> Option<&str> {
    let hidden_record = name
        .strip_prefix('.')
        .and_then(|n| n.split_once(".tmp-"))
        .and_then(|(file, _)| file.strip_suffix(cache::RECORD_SUFFIX));
    let entry = hidden_record.or_else(|| {
        [cache::PART_SUFFIX, cache::CONVERTED_SUFFIX]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
    })?;
    classify(entry).is_some().then_some(entry)
}

/// Lists `_base`. Files that vanish mid-scan are skipped; symlinks and other non-files are
/// ignored, never followed.
pub fn scan_base(cache: &Cache) -> Result<Base> {
    let mut base = Base::default();
    let items = fsutil::list(cache.base_dir())
        .with_context(|| format!("cannot read {}", cache.base_dir().display()))?;
    let files: BTreeSet<&str> = items
        .iter()
        .filter(|(_, _, m)| m.is_file())
        .map(|(n, _, _)| n.as_str())
        .collect();
    let orphan_of = |name: &str| {
        name.strip_suffix(cache::RECORD_SUFFIX)
            .filter(|stem| classify(stem).is_some() && !files.contains(stem))
            .map(str::to_owned)
    };
    let mut orphans = Vec::new();
    for (name, path, meta) in &items {
        let (name, path) = (name.clone(), path.clone());
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(mut kind) = classify(&name) {
            let record = if kind == EntryType::Image {
                cache.entry(&name).read_record()
            } else {
                None
            };
            match record.as_ref().and_then(|r| r.disk_format.as_deref()) {
                Some("aki") => kind = EntryType::Kernel,
                Some("ari") => kind = EntryType::Ramdisk,
                _ => {}
            }
            base.entries.push(Entry {
                name,
                kind,
                path,
                size: meta.len(),
                allocated: meta.blocks() * 512,
                mtime,
                record,
            });
        } else if let Some(owner) = temp_owner(&name) {
            base.temps.push(Temp {
                entry: owner.to_owned(),
                file: name.clone(),
                path,
                size: meta.len(),
                allocated: meta.blocks() * 512,
                mtime,
            });
        } else if let Some(owner) = orphan_of(&name) {
            orphans.push(Temp {
                entry: owner,
                file: name.clone(),
                path,
                size: meta.len(),
                allocated: meta.blocks() * 512,
                mtime,
            });
        }
    }
    base.orphans = orphans;
    base.orphans.sort_by(|a, b| a.file.cmp(&b.file));
    base.entries.sort_by(|a, b| a.name.cmp(&b.name));
    base.temps.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(base)
}

/// Reads ids to keep from a file (`-` = stdin): one per line, `#` comments and blanks ignored.
pub fn read_keep_file(path: &str) -> Result<Vec<String>> {
    // The operator's own file (or a pipe: `--keep-from <(...)`), so it may be a link or a FIFO;
    // only its size is bounded.
    let mut bytes = Vec::new();
    if path == "-" {
        std::io::stdin()
            .take(MAX_KEEP_FILE)
            .read_to_end(&mut bytes)
            .context("cannot read ids from stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_KEEP_FILE).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read --keep-from file {path}"))?;
    }
    let text = String::from_utf8_lossy(&bytes);
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for id in &ids {
        cache::validate_id("image id in --keep-from", id)?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified_like_nova() {
        let h = "a9993e364706816aba3e25717850c26c9cd0d89d";
        assert_eq!(classify(h), Some(EntryType::Image));
        assert_eq!(
            classify(&format!("{h}_21474836480")),
            Some(EntryType::Resized)
        );
        assert_eq!(classify(&format!("{h}_sm")), Some(EntryType::Resized));
        assert_eq!(classify("swap_512"), Some(EntryType::Swap));
        assert_eq!(classify("ephemeral_10_0a931c2"), Some(EntryType::Ephemeral));
        for other in [
            &format!("{h}.info"),
            &format!("{h}.part"),
            "swap_",
            "notes.txt",
            &h[..39],
            &h.to_uppercase(),
        ] {
            assert_eq!(classify(other), None, "{other}");
        }
        assert_eq!(temp_owner(&format!("{h}.part")), Some(h));
        assert_eq!(temp_owner(&format!("{h}.converted")), Some(h));
        assert_eq!(temp_owner("swap_64.part"), Some("swap_64"));
        assert_eq!(temp_owner("random.part"), None);
        assert_eq!(temp_owner(&format!(".{h}.info.tmp-0123abcd")), Some(h));
        assert_eq!(temp_owner(".notes.info.tmp-0123abcd"), None);
    }
}
