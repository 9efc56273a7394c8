//! Reading the state of a cache: what is in `_base` (entries by type, temp files, records) and
//! which entries instances use — from the usage records `create` writes and from the backing
//! file of every qcow2 in every instance directory, read natively from the header (no
//! `qemu-img info` process per disk, as Nova runs).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cache::{self, Cache, Record};
use crate::fsutil;
use crate::inspect::{self, qcow2};
use crate::instance;

/// Largest `--keep-from` list read (a million ids).
const MAX_KEEP_FILE: u64 = 64 << 20;

/// How deep a qcow2 backing chain inside an instance directory is followed.
const MAX_CHAIN: usize = 4;

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
    for (name, path, meta) in items {
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
        }
    }
    base.entries.sort_by(|a, b| a.name.cmp(&b.name));
    base.temps.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(base)
}

/// Which entries are in use, and by which instances.
#[derive(Debug, Default)]
pub struct Usage {
    /// Entry name → instance directory names (or `--keep` for kept ids).
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// Instance directories scanned.
    pub instances: usize,
    /// Things that could not be read (reported, never fatal).
    pub warnings: Vec<String>,
}

impl Usage {
    /// True if some instance (or `--keep`) uses the entry. Resized variants of an image in use
    /// are in use too, as in Nova.
    pub fn in_use(&self, entry: &str) -> bool {
        if self.users.contains_key(entry) {
            return true;
        }
        match entry.split_once('_') {
            Some((original, _)) if is_hex40(original) => self.users.contains_key(original),
            _ => false,
        }
    }

    /// Number of users of an entry.
    pub fn count(&self, entry: &str) -> usize {
        self.users.get(entry).map_or(0, BTreeSet::len)
    }

    fn add(&mut self, entry: String, user: &str) {
        self.users.entry(entry).or_default().insert(user.to_owned());
    }
}

/// Scans every instance directory of the cache, plus the ids to keep.
pub fn scan_usage(cache: &Cache, keep_ids: &[String]) -> Result<Usage> {
    let mut usage = Usage::default();
    for id in keep_ids {
        usage.add(cache::entry_name(id), "--keep");
    }
    let root = cache.instances_dir();
    let items = fsutil::list(root).with_context(|| format!("cannot read {}", root.display()))?;
    let base_dir = cache.base_dir();
    for (name, path, meta) in items {
        // Real directories only: a symlinked instance dir is never followed.
        if path == base_dir || path == cache.locks_dir() || !meta.is_dir() {
            continue;
        }
        usage.instances += 1;
        let record = instance::read_record(&path);
        let mut raw = declared_raw(&path);
        if let Some(record) = record {
            raw.extend(
                record
                    .disks
                    .iter()
                    .filter(|(_, d)| d.format == "raw" || d.format == "file")
                    .map(|(file, _)| file.clone()),
            );
            for b in record.bases {
                usage.add(b, &name);
            }
        }
        scan_instance_disks(&path, &name, base_dir, &raw, &mut usage);
    }
    Ok(usage)
}

/// Reads the backing file of every qcow2 in an instance directory.
fn scan_instance_disks(
    dir: &Path,
    instance: &str,
    base_dir: &Path,
    raw: &BTreeSet<String>,
    usage: &mut Usage,
) {
    let Ok(items) = fsutil::list(dir) else {
        usage
            .warnings
            .push(format!("cannot read {}", dir.display()));
        return;
    };
    for (name, path, _) in items {
        // A raw disk's first bytes are the guest's: a qcow2 header a guest wrote there names no
        // backing file of ours.
        if raw.contains(&name) {
            continue;
        }
        let mut disk = path;
        for _ in 0..MAX_CHAIN {
            let Some(backing) = backing_of(&disk, usage) else {
                break;
            };
            let Some(resolved) = resolve(&disk, &backing) else {
                usage.warnings.push(format!(
                    "{}: backing file {backing:?} is not a local path; not followed",
                    disk.display()
                ));
                break;
            };
            if resolved.parent() == Some(base_dir) {
                if let Some(n) = resolved.file_name() {
                    usage.add(n.to_string_lossy().into_owned(), instance);
                }
                break;
            }
            // A chain inside the instance directory (snapshots): follow it, nothing elsewhere.
            if resolved.parent() != Some(dir) {
                break;
            }
            disk = resolved;
        }
    }
}

/// Files Nova's `disk.info` (`{"<path>": "raw"|"qcow2"|...}`) says are not qcow2, by name.
fn declared_raw(dir: &Path) -> BTreeSet<String> {
    let info: Option<BTreeMap<String, String>> =
        fsutil::read_json(&dir.join(instance::DISK_INFO_FILE));
    info.into_iter()
        .flatten()
        .filter(|(_, format)| format != "qcow2")
        .filter_map(|(path, _)| {
            Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect()
}

/// The backing file named in a regular file's qcow2 header.
fn backing_of(path: &Path, usage: &mut Usage) -> Option<String> {
    if !fsutil::is_regular(path) {
        return None;
    }
    // A disk deleted mid-scan (Nova bug 1261442) or unreadable is skipped, not fatal; a FIFO
    // or symlink swapped in meanwhile is refused by the open, never followed or blocked on.
    let file = match fsutil::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            usage
                .warnings
                .push(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    let src = inspect::Source::new(&file).ok()?;
    qcow2::backing_file(&src).ok().flatten()
}

/// Resolves a backing name against the disk's directory, lexically (no symlinks followed).
/// `None` for protocol names (`json:{...}`, `nbd:`...).
fn resolve(disk: &Path, backing: &str) -> Option<PathBuf> {
    if backing.starts_with("json:") || (backing.contains(':') && !backing.starts_with('/')) {
        return None;
    }
    let joined = disk.parent()?.join(backing);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
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

    #[test]
    fn backing_names_resolve_lexically() {
        let disk = Path::new("/i/vm1/disk");
        assert_eq!(
            resolve(disk, "/i/_base/x"),
            Some(PathBuf::from("/i/_base/x"))
        );
        assert_eq!(
            resolve(disk, "../_base/x"),
            Some(PathBuf::from("/i/_base/x"))
        );
        assert_eq!(
            resolve(disk, "disk.snap"),
            Some(PathBuf::from("/i/vm1/disk.snap"))
        );
        assert_eq!(resolve(disk, "json:{\"file\":{}}"), None);
        assert_eq!(resolve(disk, "nbd://h/x"), None);
    }
}
