//! Which entries instances use, whoever made them: our usage records, the backing chain of
//! every disk matched to entries by identity (name or inode, never by how the path is spelled),
//! Nova's domain XML (libvirt's definitions, or an instance's `libvirt.xml`), the kernel/ramdisk copies of AMI instances, and the kernel and ramdisk
//! an image in use was recorded with. What cannot be read is a doubt, and prune removes nothing
//! on a doubt.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

use super::{EntryType, classify, is_hex40};
use crate::cache::{self, Cache};
use crate::fsutil;
use crate::inspect::{self, qcow2};
use crate::instance;

/// How deep a qcow2 backing chain inside an instance directory is followed.
const MAX_CHAIN: usize = 4;

/// Which entries are in use, and by which instances.
#[derive(Debug, Default)]
pub struct Usage {
    /// Entry name → instance directory names (or `--keep` for kept ids).
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// Instance directories scanned.
    pub instances: usize,
    /// Things that could not be read (reported, never fatal).
    pub warnings: Vec<String>,
    /// Disks whose backing file could not be read at all: what they use is unknown, so prune
    /// removes no entry while there are any (never delete on a doubt).
    pub doubts: Vec<String>,
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

    /// Marks `entry` used by `user`. The original of a resized variant (`<sha1>_<size>`) is
    /// marked too: Nova reads it again on resize and rebuild, and fails if the image has left
    /// Glance meanwhile.
    fn add(&mut self, entry: String, user: &str) {
        if let Some((original, _)) = entry.split_once('_')
            && is_hex40(original)
        {
            self.users
                .entry(original.to_owned())
                .or_default()
                .insert(user.to_owned());
        }
        self.users.entry(entry).or_default().insert(user.to_owned());
    }
}

/// The entries of `_base`, by name, by inode and by size: what a backing file or a copied
/// kernel can be matched against.
#[derive(Debug, Default)]
struct Known {
    names: BTreeSet<String>,
    inodes: BTreeMap<(u64, u64), String>,
    images_by_size: BTreeMap<u64, Vec<String>>,
}

impl Known {
    fn read(cache: &Cache) -> Known {
        let mut known = Known::default();
        for (name, _, meta) in fsutil::list(cache.base_dir()).unwrap_or_default() {
            let Some(kind) = classify(&name) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            known.inodes.insert((meta.dev(), meta.ino()), name.clone());
            if kind == EntryType::Image {
                known
                    .images_by_size
                    .entry(meta.len())
                    .or_default()
                    .push(name.clone());
            }
            known.names.insert(name);
        }
        known
    }

    /// The entry a backing file is, by identity rather than spelling: a name in `_base` (as Nova
    /// matches), an entry name that is one of ours wherever the path says it lives (a symlinked
    /// instances path, a bind mount, kolla's layout), or the same file by device and inode.
    fn place(&self, resolved: &Path, base_dir: &Path) -> Option<String> {
        let name = resolved.file_name()?.to_string_lossy().into_owned();
        if resolved.parent() == Some(base_dir) {
            return Some(name);
        }
        if classify(&name).is_some() && self.names.contains(&name) {
            return Some(name);
        }
        // Metadata only (no open): following a link here reads nothing and cannot block.
        let meta = std::fs::metadata(resolved).ok()?;
        self.inodes.get(&(meta.dev(), meta.ino())).cloned()
    }
}

/// Largest kernel or ramdisk copy compared byte for byte with the cache's images.
const MAX_BOOT_FILE: u64 = 256 << 20;
/// Largest `libvirt.xml` read.
const MAX_DOMAIN_XML: u64 = 4 << 20;

/// Scans every instance directory of the cache, plus the ids to keep.
///
/// What an instance uses is read from everything its directory tells, whoever made it: our
/// usage record, the backing chain of every disk (`disk`, `disk.local`, `disk.swap`,
/// `disk.rescue`, ...) matched to entries by identity, the image `libvirt.xml` names (a Flat
/// instance's disk is a copy that names no backing file), the kernel and ramdisk copies an AMI
/// instance holds (matched by content), and the kernel and ramdisk an image in use was
/// recorded with.
pub fn scan_usage(cache: &Cache, keep_ids: &[String]) -> Result<Usage> {
    let mut usage = Usage::default();
    for id in keep_ids {
        usage.add(cache::entry_name(id), "--keep");
    }
    let root = cache.instances_dir();
    let items = fsutil::list(root).with_context(|| format!("cannot read {}", root.display()))?;
    let base_dir = cache.base_dir();
    let known = Known::read(cache);
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
        for id in domain_images(&path) {
            usage.add(cache::entry_name(&id), &name);
        }
        boot_copies(&path, &name, cache, &known, &mut usage);
        let disks = Disks {
            dir: &path,
            instance: &name,
            base_dir,
            known: &known,
        };
        disks.scan(&raw, &mut usage);
    }
    libvirt_domains(cache, &mut usage);
    recorded_boot_images(cache, &mut usage);
    Ok(usage)
}

/// Image ids named in the instance's `libvirt.xml` (older Nova wrote one there) as Nova writes
/// its metadata: `<nova:root type="image" uuid="..."/>`.
fn domain_images(dir: &Path) -> Vec<String> {
    match fsutil::read_bounded(&dir.join("libvirt.xml"), MAX_DOMAIN_XML) {
        Ok(bytes) => root_images(&String::from_utf8_lossy(&bytes)),
        Err(_) => Vec::new(),
    }
}

/// The `<nova:root type="image" uuid="..."/>` ids of a domain's XML.
fn root_images(text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in text.split("<nova:root").skip(1) {
        let tag = chunk.split('>').next().unwrap_or("");
        if attribute(tag, "type") != Some("image") {
            continue;
        }
        if let Some(id) = attribute(tag, "uuid")
            && cache::validate_id("image id", id).is_ok()
        {
            ids.push(id.to_owned());
        }
    }
    ids
}

/// Where libvirt keeps the definitions of the domains nova-compute defined on this host.
const LIBVIRT_DIR: &str = "/etc/libvirt/qemu";

/// The root image of every libvirt domain whose disks live in one of our instance
/// directories: current Nova writes no `libvirt.xml` into the instance directory, but the
/// domain it defines carries `<nova:root type="image" uuid=…>` — the only record of a Flat
/// instance's image on the host. The directory is matched by identity (device and inode), so a
/// domain that spells the instances path another way still counts. `IMGCACHE_LIBVIRT_DIR`
/// names another definitions directory.
fn libvirt_domains(cache: &Cache, usage: &mut Usage) {
    let dir = std::env::var_os("IMGCACHE_LIBVIRT_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LIBVIRT_DIR));
    for (name, path, meta) in fsutil::list(&dir).unwrap_or_default() {
        if !meta.is_file() || !name.ends_with(".xml") {
            continue;
        }
        let Ok(bytes) = fsutil::read_bounded(&path, MAX_DOMAIN_XML) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let images = root_images(&text);
        if images.is_empty() {
            continue;
        }
        for instance in domain_instances(cache, &text) {
            for id in &images {
                usage.add(cache::entry_name(id), &instance);
            }
        }
    }
}

/// The instance directories (of this cache) holding the disks a domain's XML names.
fn domain_instances(cache: &Cache, text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for chunk in text.split("<source").skip(1) {
        let tag = chunk.split('>').next().unwrap_or("");
        let Some(file) = attribute(tag, "file") else {
            continue;
        };
        let Some(parent) = Path::new(file).parent() else {
            continue;
        };
        let Some(name) = parent.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let ours = cache.instances_dir().join(&name);
        // Metadata only: the same directory, however the domain spells it.
        let same = match (std::fs::metadata(parent), fsutil::stat(&ours)) {
            (Ok(a), Ok(Some(b))) => b.is_dir() && a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            out.insert(name);
        }
    }
    out
}

/// The value of `name="..."` (or `'...'`) in an XML tag's text.
fn attribute<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    for quote in ['"', '\''] {
        let key = format!("{name}={quote}");
        if let Some(at) = tag.find(&key) {
            let rest = &tag[at + key.len()..];
            return rest.split(quote).next();
        }
    }
    None
}

/// An AMI instance's `kernel` and `ramdisk` are copies of cached images: matched by size, then
/// byte for byte.
fn boot_copies(dir: &Path, instance: &str, cache: &Cache, known: &Known, usage: &mut Usage) {
    for file in ["kernel", "ramdisk"] {
        let path = dir.join(file);
        let Ok(Some(meta)) = fsutil::stat(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() > MAX_BOOT_FILE {
            continue;
        }
        for candidate in known.images_by_size.get(&meta.len()).into_iter().flatten() {
            if same_bytes(&path, &cache.entry(candidate).path()) {
                usage.add(candidate.clone(), instance);
            }
        }
    }
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (fsutil::open_regular(a), fsutil::open_regular(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = MAX_BOOT_FILE;
    loop {
        let Ok(n) = fa.read(&mut ba) else {
            return false;
        };
        if n == 0 {
            return matches!(fb.read(&mut bb[..1]), Ok(0));
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
        left = left.saturating_sub(n as u64);
        if left == 0 {
            return false;
        }
    }
}

/// The kernel and ramdisk of every image in use (its record's `kernel_id` / `ramdisk_id`, as
/// Nova's manager counts an instance's kernel and ramdisk).
fn recorded_boot_images(cache: &Cache, usage: &mut Usage) {
    let in_use: Vec<(String, Vec<String>)> = usage
        .users
        .iter()
        .filter(|(name, _)| is_hex40(name))
        .map(|(name, users)| (name.clone(), users.iter().cloned().collect()))
        .collect();
    for (name, users) in in_use {
        let Some(record) = cache.entry(&name).read_record() else {
            continue;
        };
        for key in ["kernel_id", "ramdisk_id"] {
            if let Some(id) = record.properties.get(key).and_then(|v| v.as_str())
                && cache::validate_id("image id", id).is_ok()
            {
                for user in &users {
                    usage.add(cache::entry_name(id), user);
                }
            }
        }
    }
}

/// The disks of one instance directory.
struct Disks<'a> {
    dir: &'a Path,
    instance: &'a str,
    base_dir: &'a Path,
    known: &'a Known,
}

impl Disks<'_> {
    /// Follows the backing chain of every qcow2 in the directory to the entry it ends on.
    fn scan(&self, raw: &BTreeSet<String>, usage: &mut Usage) {
        let Ok(items) = fsutil::list(self.dir) else {
            usage
                .warnings
                .push(format!("cannot read {}", self.dir.display()));
            return;
        };
        for (name, path, meta) in items {
            // A raw disk's first bytes are the guest's: a qcow2 header a guest wrote there
            // names no backing file of ours.
            if raw.contains(&name) || !meta.is_file() {
                continue;
            }
            self.chain(path, usage);
        }
    }

    fn chain(&self, mut disk: PathBuf, usage: &mut Usage) {
        for _ in 0..MAX_CHAIN {
            let Some(backing) = backing_of(&disk, usage) else {
                return;
            };
            let Some(resolved) = resolve(&disk, &backing) else {
                usage.warnings.push(format!(
                    "{}: backing file {backing:?} is not a local path; not followed",
                    disk.display()
                ));
                return;
            };
            if let Some(entry) = self.known.place(&resolved, self.base_dir) {
                usage.add(entry, self.instance);
                return;
            }
            // A chain inside the instance directory (snapshots): follow it.
            if resolved.parent() != Some(self.dir) {
                usage.warnings.push(format!(
                    "{}: backing file {} is not an entry of this cache; not counted",
                    disk.display(),
                    resolved.display()
                ));
                return;
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

/// The backing file named in a regular file's qcow2 header. A disk that cannot be read, or
/// whose qcow2 header cannot be parsed, is a doubt: what it uses is unknown.
fn backing_of(path: &Path, usage: &mut Usage) -> Option<String> {
    if !fsutil::is_regular(path) {
        return None;
    }
    // A disk deleted mid-scan (Nova bug 1261442) is skipped; a FIFO or symlink swapped in
    // meanwhile is refused by the open, never followed or blocked on.
    let file = match fsutil::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(_) if fsutil::stat(path).is_ok_and(|m| m.is_none_or(|m| !m.is_file())) => return None,
        Err(e) => {
            usage
                .doubts
                .push(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    let src = match inspect::Source::new(&file) {
        Ok(src) => src,
        Err(e) => {
            usage
                .doubts
                .push(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    match qcow2::backing_file(&src) {
        Ok(b) => b,
        Err(e) => {
            usage.doubts.push(format!(
                "cannot read the qcow2 header of {}: {e}",
                path.display()
            ));
            None
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nova_domain_metadata_names_the_root_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("libvirt.xml"),
            r#"<domain><metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
            <nova:root type="image" uuid="0b7c6d1e-3e5f-4c3a-9a1b-2f1e0c9d8e7f"/>
            <nova:root type='volume' uuid='v'/></nova:instance></metadata></domain>"#,
        )
        .unwrap();
        assert_eq!(
            domain_images(dir.path()),
            vec!["0b7c6d1e-3e5f-4c3a-9a1b-2f1e0c9d8e7f".to_owned()]
        );
        assert!(domain_images(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn a_resized_variant_in_use_keeps_its_original() {
        let h = "a9993e364706816aba3e25717850c26c9cd0d89d";
        let mut usage = Usage::default();
        usage.add(format!("{h}_10"), "vm1");
        assert!(usage.in_use(h));
        assert!(usage.in_use(&format!("{h}_10")));
        assert!(!usage.in_use("swap_512"));
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
