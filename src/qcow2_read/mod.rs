//! qcow2 → raw, natively, while the qcow2 file is still being written (docs/benchmarks.md,
//! "conversion inside the download").
//!
//! The converter reads the file through a [`Growing`] view: every read waits until the download
//! has reached the end of what it reads. Work is kept in a queue ordered by where it ends in the
//! file — the L1 table, then each L2 table the L1 names, then each data cluster an L2 table
//! names — so the converter follows the stream as it arrives, and anything the stream passed
//! before its table was known is read back from the file (the page cache). Data clusters are
//! written at their guest offsets into an output file already sized to the virtual size; zero,
//! unallocated and all-zero 4 KiB blocks stay holes. Compressed clusters (zlib or zstd) are
//! decompressed the way qemu does it: the whole cluster or an error.
//!
//! The converter handles what qemu-img and image builders produce (v2/v3, 512 B – 2 MiB
//! clusters, compressed, zero and unallocated clusters, tables anywhere in the file). Anything
//! else — a backing or external data file, extended L2 entries, encryption, an unaligned
//! cluster, a table or cluster past the end of the file, a decompression that does not give a
//! whole cluster, more queued work than [`MAX_PENDING`] — is [`Error::Unsupported`]: the caller
//! converts the complete file with `qemu-img convert` instead, so the answer is always either
//! what qemu-img gives or qemu-img itself.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::unix::fs::FileExt;

mod pool;
mod release;

use pool::{Output, Pool};
use release::Released;
pub use release::punch_hole;

/// `QFI\xfb`.
const MAGIC: &[u8] = b"QFI\xfb";

/// Queued reads (L2 tables and data clusters) at most, about 24 bytes each.
pub const MAX_PENDING: usize = 1 << 19;
/// The largest L1 table read (qemu allows 32 MiB; 4 MiB covers 256 TiB at 64 KiB clusters).
const MAX_L1_BYTES: u64 = 4 << 20;
/// How often (bytes written) the caller's stop check runs.
const CHECK_EVERY: u64 = 4 << 20;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
/// Incompatible features: 0 dirty, 1 corrupt, 3 compression type. Bit 2 (external data file)
/// and bit 4 (extended L2) are not handled, nor are unknown ones.
const INCOMPAT_HANDLED: u64 = (1 << 0) | (1 << 1) | (1 << 3);
const INCOMPAT_COMPRESSION: u64 = 1 << 3;

/// A file being written from its start.
pub trait Growing {
    /// Waits until the first `end` bytes of the file are written and returns `end`, or, once
    /// the file is complete, returns how many of them there are (less than `end` past its end).
    /// Bytes below the returned mark read as what was written (a short read means zeros: the
    /// writer leaves holes).
    fn wait_for(&self, end: u64) -> Result<u64, Error>;

    /// Where bytes of the file may be given back to the filesystem (hole-punched) once the
    /// conversion has read them; none by default.
    fn releasable(&self) -> std::ops::Range<u64> {
        0..0
    }

    /// Asked once, before the first bytes are given back; `false` keeps every byte.
    fn releasing(&self) -> bool {
        false
    }

    /// Gives `from..to` back (punches a hole); `Ok(false)` if it may no longer be done (the
    /// file started over: its bytes there are new).
    fn punch(&self, src: &File, from: u64, to: u64) -> Result<bool, Error> {
        release::punch_hole(src, from, to)?;
        Ok(true)
    }
}

/// A complete file of `len` bytes.
pub struct Complete(pub u64);

impl Growing for Complete {
    fn wait_for(&self, end: u64) -> Result<u64, Error> {
        Ok(end.min(self.0))
    }
}

/// Why no raw image came out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a layout this converter handles: convert the complete file another way.
    #[error("{0}")]
    Unsupported(String),
    /// The file stopped growing before it was complete (the download failed or restarted), or
    /// the caller's stop check asked to stop.
    #[error("stopped: {0}")]
    Stopped(String),
    /// The layout needs bytes again that were already given back (see [`Growing::releasable`]):
    /// the file no longer holds the image, so nothing else can convert it either.
    #[error("released: {0}")]
    Released(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported(what.into())
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// Data clusters copied, of them compressed.
    pub clusters: u64,
    pub compressed: u64,
    /// Bytes of the source given back to the filesystem.
    pub released: u64,
    /// The raw image's content digest (`crate::digest`), when every cluster was written in
    /// guest order; `None`: digest the output file.
    pub content: Option<String>,
}

/// The header fields the conversion needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub virtual_size: u64,
    pub cluster_bits: u32,
    l1_size: u64,
    l1_offset: u64,
    zstd: bool,
}

impl Header {
    /// Parses the first bytes of a qcow2 file (at least 104 for v3, 72 for v2).
    pub fn parse(h: &[u8]) -> Result<Header, Error> {
        let be32 = |o: usize| {
            h.get(o..o + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let be64 = |o: usize| {
            h.get(o..o + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let short = || unsupported("qcow2 header truncated");
        if !h.starts_with(MAGIC) {
            return Err(unsupported("not a qcow2 file"));
        }
        let version = be32(4).ok_or_else(short)?;
        if !(2..=3).contains(&version) {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        if be64(8).ok_or_else(short)? != 0 {
            return Err(unsupported("a backing file"));
        }
        let cluster_bits = be32(20).ok_or_else(short)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(unsupported(format!("cluster_bits {cluster_bits}")));
        }
        // qemu counts whole 512-byte sectors of the header's size.
        let virtual_size = be64(24).ok_or_else(short)? & !511;
        if be32(32).ok_or_else(short)? != 0 {
            return Err(unsupported("encryption"));
        }
        let l1_size = u64::from(be32(36).ok_or_else(short)?);
        let l1_offset = be64(40).ok_or_else(short)?;
        let mut zstd = false;
        if version == 3 {
            let incompat = be64(72).ok_or_else(short)?;
            if incompat & !INCOMPAT_HANDLED != 0 {
                return Err(unsupported(format!(
                    "incompatible features {:#x}",
                    incompat & !INCOMPAT_HANDLED
                )));
            }
            if incompat & INCOMPAT_COMPRESSION != 0 {
                let length = be32(100).ok_or_else(short)?;
                let kind = if length > 104 {
                    h.get(104).copied()
                } else {
                    None
                };
                zstd = match kind {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(unsupported("an unknown compression type")),
                };
            }
        }
        Ok(Header {
            virtual_size,
            cluster_bits,
            l1_size,
            l1_offset,
            zstd,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of guest data one L1 entry (one L2 table) covers.
    fn l2_coverage(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }
}

/// One read the conversion waits for, ordered by where it ends in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Item {
    end: u64,
    host: u64,
    guest: u64,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    L2,
    Plain,
    Compressed,
}

/// Converts the qcow2 file `src` (as far as `grow` says it is written) to raw in `out`, which
/// must be empty and sized to the virtual size. `stop` is asked every 4 MiB written (by whichever
/// thread writes) and once at the end whether to stop (e.g. the free space ran low).
pub fn convert(
    src: &File,
    grow: &dyn Growing,
    out: &File,
    stop: &(dyn Fn() -> Option<String> + Sync),
) -> Result<Done, Error> {
    let head = read_exact(src, grow, 0, 112)?;
    let h = Header::parse(&head)?;
    let output = Output::new(out, stop, CHECK_EVERY);
    let cluster_size =
        usize::try_from(h.cluster_size()).map_err(|_| unsupported("cluster size"))?;
    let result: Result<u64, Error> = pool::with_pool(&output, h.zstd, cluster_size, |pool| {
        let mut c = Converter {
            src,
            grow,
            out: &output,
            pool,
            h: h.clone(),
            queue: BinaryHeap::new(),
            buf: Vec::new(),
            released: Released::new(grow.releasable()),
        };
        c.read_l1()?;
        while let Some(Reverse(item)) = c.queue.pop() {
            c.run(item)?;
        }
        c.released.flush(src, grow)?;
        Ok(c.released.total)
    });
    // Every queued cluster is written now; a decompressing thread's failure comes first.
    if let Some(e) = output.take_failure() {
        return Err(e);
    }
    let released = result?;
    // The file at its full size: the last word on the free space.
    if let Some(why) = stop() {
        return Err(Error::Stopped(why));
    }
    let (clusters, compressed) = output.counts();
    Ok(Done {
        virtual_size: h.virtual_size,
        cluster_size: h.cluster_size(),
        clusters,
        compressed,
        released,
        content: output.content_digest(h.virtual_size),
    })
}

/// Reads exactly `len` bytes at `offset` once they are written (zeros where the writer left a
/// hole); past the end of the complete file is unsupported (qemu would read zeros or fail).
fn read_exact(src: &File, grow: &dyn Growing, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    read_into(src, grow, offset, &mut buf)?;
    Ok(buf)
}

fn read_into(src: &File, grow: &dyn Growing, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| unsupported("an offset past 2^64"))?;
    if grow.wait_for(end)? < end {
        return Err(unsupported(format!(
            "bytes {offset}..{end} past the end of the file"
        )));
    }
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

struct Converter<'a> {
    src: &'a File,
    grow: &'a dyn Growing,
    out: &'a Output<'a>,
    pool: &'a Pool,
    h: Header,
    queue: BinaryHeap<Reverse<Item>>,
    /// Read buffer for tables and plain clusters.
    buf: Vec<u8>,
    /// What was given back of the source.
    released: Released,
}

impl Converter<'_> {
    fn push(&mut self, kind: Kind, host: u64, len: u64, guest: u64) -> Result<(), Error> {
        if self.queue.len() >= MAX_PENDING {
            return Err(unsupported(format!(
                "more than {MAX_PENDING} clusters waiting for their bytes"
            )));
        }
        let end = host
            .checked_add(len)
            .ok_or_else(|| unsupported("an offset past 2^64"))?;
        self.queue.push(Reverse(Item {
            end,
            host,
            guest,
            kind,
        }));
        Ok(())
    }

    /// Reads the L1 entries the virtual size needs and queues their L2 tables.
    fn read_l1(&mut self) -> Result<(), Error> {
        let h = self.h.clone();
        let needed = h.virtual_size.div_ceil(h.l2_coverage());
        if needed > h.l1_size {
            return Err(unsupported(format!(
                "an L1 table of {} entries for {needed} needed",
                h.l1_size
            )));
        }
        if needed * 8 > MAX_L1_BYTES {
            return Err(unsupported(format!("an L1 table of {needed} entries")));
        }
        if needed == 0 {
            return Ok(());
        }
        if !h.l1_offset.is_multiple_of(h.cluster_size()) {
            return Err(unsupported("an unaligned L1 table"));
        }
        let l1 = read_exact(self.src, self.grow, h.l1_offset, (needed * 8) as usize)?;
        for (i, e) in l1.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(h.cluster_size()) {
                return Err(unsupported(format!(
                    "L1 entry {i}: unaligned L2 table {off:#x}"
                )));
            }
            self.push(Kind::L2, off, h.cluster_size(), i as u64 * h.l2_coverage())?;
        }
        Ok(())
    }

    fn run(&mut self, item: Item) -> Result<(), Error> {
        let len = usize::try_from(item.end - item.host).map_err(|_| unsupported("a huge read"))?;
        self.released.check(item.host, item.end)?;
        if item.kind == Kind::Compressed {
            let mut input = self.pool.buffer();
            input.resize(len, 0);
            read_into(self.src, self.grow, item.host, &mut input)?;
            // The descriptor counts whole sectors: the last one may hold the next compressed
            // cluster's first bytes, and is kept.
            let kept = item.end.saturating_sub(512);
            self.released
                .release(self.src, self.grow, item.host, kept)?;
            let cs = self.h.cluster_size();
            let out_len = cs.min(self.h.virtual_size - item.guest) as usize;
            self.pool.submit(self.out, input, item.guest, out_len)?;
        } else {
            self.buf.resize(len, 0);
            let mut buf = std::mem::take(&mut self.buf);
            let result = read_into(self.src, self.grow, item.host, &mut buf).and_then(|()| {
                if item.kind == Kind::L2 {
                    self.l2(&buf, item.guest)
                } else {
                    self.released
                        .release(self.src, self.grow, item.host, item.end)?;
                    self.out.write(&buf, item.guest)
                }
            });
            self.buf = buf;
            result?;
        }
        Ok(())
    }

    /// Queues the clusters an L2 table covering guest bytes from `base` names.
    fn l2(&mut self, table: &[u8], base: u64) -> Result<(), Error> {
        let cs = self.h.cluster_size();
        let bits = self.h.cluster_bits;
        // Compressed descriptors: host offset in the low bits, sector count above it.
        let csize_shift = 62 - (bits - 8);
        let csize_mask = (1u64 << (bits - 8)) - 1;
        let offset_mask = (1u64 << csize_shift) - 1;
        for (j, e) in table.chunks_exact(8).enumerate() {
            let guest = base + j as u64 * cs;
            if guest >= self.h.virtual_size {
                break;
            }
            let e = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if e & OFLAG_COMPRESSED != 0 {
                let host = e & offset_mask;
                let sectors = ((e >> csize_shift) & csize_mask) + 1;
                let len = sectors * 512 - (host & 511);
                self.push(Kind::Compressed, host, len, guest)?;
                continue;
            }
            if e & OFLAG_ZERO != 0 {
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if !host.is_multiple_of(cs) {
                return Err(unsupported(format!(
                    "guest cluster at {guest:#x}: unaligned data cluster {host:#x}"
                )));
            }
            let len = cs.min(self.h.virtual_size - guest);
            self.push(Kind::Plain, host, len, guest)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_refuses_what_it_does_not_convert() {
        let mut h = vec![0u8; 112];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        assert!(Header::parse(&h).is_ok());
        let mut extended = h.clone();
        extended[72..80].copy_from_slice(&(1u64 << 4).to_be_bytes());
        assert!(matches!(
            Header::parse(&extended),
            Err(Error::Unsupported(_))
        ));
        let mut zstd = h.clone();
        zstd[72..80].copy_from_slice(&(1u64 << 3).to_be_bytes());
        zstd[104] = 1;
        assert!(Header::parse(&zstd).unwrap().zstd);
        zstd[104] = 7;
        assert!(Header::parse(&zstd).is_err());
        let mut backing = h.clone();
        backing[8..16].copy_from_slice(&512u64.to_be_bytes());
        assert!(Header::parse(&backing).is_err());
        assert!(Header::parse(&h[..50]).is_err());
    }

    #[test]
    fn deflate_clusters_follow_qemus_rule_whichever_decoder_reads_them() {
        use std::io::Write;
        let deflate = |data: &[u8]| {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut d = pool::Decoder::new(false);
        let mut out = vec![0u8; 8192];
        // Exactly one cluster, sector-padded: the fast path.
        let mut exact = deflate(&data[..8192]);
        exact.resize(exact.len().div_ceil(512) * 512, 0xAA);
        assert!(d.cluster(&exact, &mut out));
        assert_eq!(out, data[..8192]);
        // A stream longer than the cluster: qemu keeps the first cluster's worth (zlib's path).
        out.fill(0);
        assert!(d.cluster(&deflate(&data), &mut out));
        assert_eq!(out, data[..8192]);
        // Shorter than the cluster, or garbage: refused, and the decoder still works after.
        assert!(!d.cluster(&deflate(&data[..4096]), &mut out));
        assert!(!d.cluster(b"garbage", &mut out));
        assert!(d.cluster(&exact, &mut out));
        assert_eq!(out, data[..8192]);
    }

    #[test]
    fn a_short_or_bad_compressed_cluster_is_refused() {
        let mut out = vec![0u8; 4096];
        assert!(!pool::zlib_cluster(b"garbage", &mut out));
        assert!(!pool::zstd_cluster(b"garbage", &mut out));
        let data = vec![7u8; 4096];
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let mut padded = z.clone();
        padded.extend_from_slice(&[0xAA; 300]);
        assert!(pool::zstd_cluster(&padded, &mut out));
        assert_eq!(out, data);
        let mut small = vec![0u8; 8192];
        assert!(
            !pool::zstd_cluster(&z, &mut small),
            "half a cluster is not a cluster"
        );
    }
}
