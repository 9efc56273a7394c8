//! Native qcow2 overlays: the few hundred bytes `qemu-img create -f qcow2 -b BASE -F FMT DISK
//! SIZE` writes, written directly into a file we hold open, without starting a process. The
//! layout is qemu's own (qemu 10, `qcow2_co_create` then the resize): version 3 (compat 1.1),
//! 64 KiB clusters, 16-bit refcounts, no lazy refcounts; cluster 0 holds the header, its
//! extensions (backing format, feature names) and the backing file name; cluster 1 the
//! refcount table, cluster 2 its one refcount block, clusters 3.. the empty L1 table. Anything
//! outside what this writer knows (see [`Layout::new`]) is left to qemu-img.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// 64 KiB clusters, qemu's default.
pub const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// refcount_order 4: 16-bit refcounts, qemu's default.
const REFCOUNT_ORDER: u32 = 4;
/// The header up to and including `compression_type` (byte 104), padded to 8: what qemu writes
/// as `header_length`.
const HEADER_LENGTH: u32 = 112;
/// qemu refuses longer backing file names ("Backing file name too long").
pub const MAX_BACKING_NAME: usize = 1023;
/// qemu's QCOW_MAX_L1_SIZE: an L1 table of at most 32 MiB (a 2 PiB disk at 64 KiB clusters).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Guest sectors: qemu rounds the virtual size up to 512 bytes.
const SECTOR: u64 = 512;
/// Header extension types (docs/interop/qcow2.txt in qemu).
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_NAMES: u32 = 0x6803_F857;

/// The feature name table qemu 10 writes into every new v3 image: (type, bit, name), type 0
/// incompatible, 1 compatible, 2 autoclear. It only names bits for tools; none is set here.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
/// Each feature name entry: type (1), bit (1), name (46, NUL padded).
const FEATURE_ENTRY: usize = 48;

/// Why an overlay is left to qemu-img.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("backing file name of {0} bytes (1..={MAX_BACKING_NAME} are written natively)")]
    BackingName(usize),
    #[error("backing format {0:?} is not a plain format name")]
    BackingFormat(String),
    #[error("virtual size {0} needs an L1 table over qemu's 32 MiB limit")]
    TooLarge(u64),
}

/// Everything of one overlay file, computed before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Cluster 0 up to the end of the backing file name (the rest of the cluster is zeros).
    pub header: Vec<u8>,
    /// The requested size rounded up to 512 bytes, as qemu does.
    pub virtual_size: u64,
    /// L1 entries: one per 512 MiB (an L2 table of 8192 entries × 64 KiB).
    pub l1_entries: u64,
    /// Clusters in use: header, refcount table, refcount block, L1 table.
    pub clusters: u64,
    /// The file's length: the end of the L1 table (qemu does not pad the last cluster).
    pub file_len: u64,
}

impl Layout {
    /// The overlay of `backing` (the name stored in the file, as bytes) in format
    /// `backing_format`, `size` bytes of guest disk.
    pub fn new(backing: &[u8], backing_format: &str, size: u64) -> Result<Layout, Unsupported> {
        if backing.is_empty() || backing.len() > MAX_BACKING_NAME || backing.contains(&0) {
            return Err(Unsupported::BackingName(backing.len()));
        }
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if backing_format.is_empty()
            || backing_format.len() > 32
            || !backing_format.chars().all(plain)
        {
            return Err(Unsupported::BackingFormat(backing_format.to_owned()));
        }
        let too_large = || Unsupported::TooLarge(size);
        let virtual_size = size
            .checked_next_multiple_of(SECTOR)
            .filter(|&v| i64::try_from(v).is_ok())
            .ok_or_else(too_large)?;
        let per_l1_entry = CLUSTER * (CLUSTER / 8);
        let l1_entries = virtual_size.div_ceil(per_l1_entry);
        let l1_bytes = l1_entries * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(too_large());
        }
        let l1_clusters = l1_bytes.div_ceil(CLUSTER);
        let clusters = 3 + l1_clusters;
        let l1_offset = if l1_entries == 0 { 0 } else { 3 * CLUSTER };
        let file_len = 3 * CLUSTER + l1_bytes;
        let mut h = Vec::with_capacity(1024 + backing.len());
        h.extend_from_slice(b"QFI\xfb");
        put32(&mut h, 3); // version
        put64(&mut h, 0); // backing_file_offset, set below
        put32(&mut h, backing.len() as u32); // backing_file_size (<= 1023, checked)
        put32(&mut h, CLUSTER_BITS);
        put64(&mut h, virtual_size);
        put32(&mut h, 0); // crypt_method
        put32(&mut h, l1_entries as u32); // l1_size (<= 4 Mi entries, checked)
        put64(&mut h, l1_offset);
        put64(&mut h, CLUSTER); // refcount_table_offset
        put32(&mut h, 1); // refcount_table_clusters
        put32(&mut h, 0); // nb_snapshots
        put64(&mut h, 0); // snapshots_offset
        put64(&mut h, 0); // incompatible_features
        put64(&mut h, 0); // compatible_features (lazy refcounts off)
        put64(&mut h, 0); // autoclear_features
        put32(&mut h, REFCOUNT_ORDER);
        put32(&mut h, HEADER_LENGTH);
        h.push(0); // compression_type: zlib
        h.resize(HEADER_LENGTH as usize, 0);
        extension(&mut h, EXT_BACKING_FORMAT, backing_format.as_bytes());
        let mut names = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY);
        for (kind, bit, name) in FEATURE_NAMES {
            let start = names.len();
            names.extend_from_slice(&[kind, bit]);
            names.extend_from_slice(name.as_bytes());
            names.resize(start + FEATURE_ENTRY, 0);
        }
        extension(&mut h, EXT_FEATURE_NAMES, &names);
        extension(&mut h, 0, &[]); // end of extensions
        let backing_offset = h.len() as u64;
        h[8..16].copy_from_slice(&backing_offset.to_be_bytes());
        h.extend_from_slice(backing);
        Ok(Layout {
            header: h,
            virtual_size,
            l1_entries,
            clusters,
            file_len,
        })
    }

    /// The refcount block (cluster 2): refcount 1 for every cluster in use.
    pub fn refcount_block(&self) -> Vec<u8> {
        1u16.to_be_bytes().repeat(self.clusters as usize)
    }

    /// Writes the overlay into `file`, which must be new and empty (the L1 table is left as a
    /// hole, which reads as the zeros qemu writes). Not synced: the caller persists the file.
    pub fn write(&self, file: &File) -> io::Result<()> {
        file.write_all_at(&self.header, 0)?;
        // The refcount table's one entry: the refcount block in cluster 2.
        file.write_all_at(&(2 * CLUSTER).to_be_bytes(), CLUSTER)?;
        file.write_all_at(&self.refcount_block(), 2 * CLUSTER)?;
        file.set_len(self.file_len)
    }
}

fn put32(h: &mut Vec<u8>, v: u32) {
    h.extend_from_slice(&v.to_be_bytes());
}

fn put64(h: &mut Vec<u8>, v: u64) {
    h.extend_from_slice(&v.to_be_bytes());
}

/// A header extension: type, length, data padded to 8 bytes.
fn extension(h: &mut Vec<u8>, kind: u32, data: &[u8]) {
    put32(h, kind);
    put32(h, data.len() as u32);
    h.extend_from_slice(data);
    h.resize(h.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(h: &[u8], off: usize) -> u32 {
        u32::from_be_bytes(h[off..off + 4].try_into().unwrap())
    }

    fn be64(h: &[u8], off: usize) -> u64 {
        u64::from_be_bytes(h[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn header_fields_are_qemus() {
        let name = b"/var/lib/nova/instances/_base/0123";
        let l = Layout::new(name, "raw", 20 << 30).unwrap();
        let h = &l.header;
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(be32(h, 4), 3, "version");
        assert_eq!(be64(h, 8), 0x210, "backing_file_offset");
        assert_eq!(be32(h, 16), name.len() as u32, "backing_file_size");
        assert_eq!(be32(h, 20), 16, "cluster_bits");
        assert_eq!(be64(h, 24), 20 << 30, "size");
        assert_eq!(be32(h, 32), 0, "crypt_method");
        assert_eq!(be32(h, 36), 40, "l1_size: 20 GiB / 512 MiB");
        assert_eq!(be64(h, 40), 0x30000, "l1_table_offset");
        assert_eq!(be64(h, 48), 0x10000, "refcount_table_offset");
        assert_eq!(be32(h, 56), 1, "refcount_table_clusters");
        assert_eq!(be32(h, 60), 0, "nb_snapshots");
        assert_eq!(be64(h, 64), 0, "snapshots_offset");
        assert_eq!(&h[72..96], &[0u8; 24], "feature bits");
        assert_eq!(be32(h, 96), 4, "refcount_order");
        assert_eq!(be32(h, 100), 112, "header_length");
        assert_eq!(&h[104..112], &[0u8; 8], "compression_type zlib + padding");
        // Backing format extension, padded to 8.
        assert_eq!(be32(h, 112), 0xE279_2ACA);
        assert_eq!(be32(h, 116), 3);
        assert_eq!(&h[120..128], b"raw\0\0\0\0\0");
        // Feature name table: 8 entries of 48 bytes.
        assert_eq!(be32(h, 128), 0x6803_F857);
        assert_eq!(be32(h, 132), 384);
        assert_eq!(&h[136..138], &[0, 0]);
        assert_eq!(&h[138..147], b"dirty bit");
        assert_eq!(&h[136 + 5 * 48..138 + 5 * 48], &[1, 0], "lazy refcounts");
        // End of extensions, then the name.
        assert_eq!(&h[0x208..0x210], &[0u8; 8]);
        assert_eq!(&h[0x210..], name);
        assert_eq!(l.clusters, 4);
        assert_eq!(l.file_len, 0x30000 + 40 * 8);
        assert_eq!(l.refcount_block(), [0, 1, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn sizes_round_like_qemu() {
        let l1 = |size| {
            let l = Layout::new(b"/b", "raw", size).unwrap();
            (l.virtual_size, l.l1_entries, l.clusters, l.file_len)
        };
        assert_eq!(l1(0), (0, 0, 3, 0x30000));
        assert_eq!(l1(1), (512, 1, 4, 0x30008));
        assert_eq!(l1(513), (1024, 1, 4, 0x30008));
        assert_eq!(l1((1 << 30) + 512), ((1 << 30) + 512, 3, 4, 0x30018));
        assert_eq!(l1(2 << 40), (2 << 40, 4096, 4, 0x38000));
        assert_eq!(l1(16 << 40), (16 << 40, 32768, 7, 0x70000));
        let zero_l1 = Layout::new(b"/b", "raw", 0).unwrap();
        assert_eq!(be64(&zero_l1.header, 40), 0, "no L1 table, no offset");
    }

    #[test]
    fn unusual_inputs_are_left_to_qemu_img() {
        let long = vec![b'a'; 1024];
        assert_eq!(
            Layout::new(&long, "raw", 1 << 30),
            Err(Unsupported::BackingName(1024))
        );
        assert!(Layout::new(&long[..1023], "raw", 1 << 30).is_ok());
        assert_eq!(Layout::new(b"", "raw", 1), Err(Unsupported::BackingName(0)));
        assert!(matches!(
            Layout::new(b"/b", "raw\"", 1),
            Err(Unsupported::BackingFormat(_))
        ));
        assert_eq!(
            Layout::new(b"/b", "raw", u64::MAX),
            Err(Unsupported::TooLarge(u64::MAX))
        );
        // 2 PiB fits qemu's L1 limit exactly; a sector more does not.
        assert!(Layout::new(b"/b", "raw", 2 << 50).is_ok());
        assert!(Layout::new(b"/b", "raw", (2 << 50) + 1).is_err());
    }

    #[test]
    fn written_file_is_as_long_as_qemus_and_holds_the_tables() {
        let f = tempfile::tempfile().unwrap();
        let l = Layout::new(b"/base", "raw", 16 << 40).unwrap();
        l.write(&f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0x70000);
        let mut rt = [0u8; 8];
        f.read_exact_at(&mut rt, 0x10000).unwrap();
        assert_eq!(u64::from_be_bytes(rt), 0x20000);
        let mut rb = [0u8; 16];
        f.read_exact_at(&mut rb, 0x20000).unwrap();
        assert_eq!(rb, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0]);
    }
}
