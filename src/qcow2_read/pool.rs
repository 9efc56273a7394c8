//! The writing side of a conversion: the output file (all-zero blocks left as holes, writeback
//! started as it fills, so the fsync before the rename has little left), and the threads that
//! decompress compressed clusters — inflating is the slowest step of converting a compressed
//! image (about 120–180 MB/s of output per core on the project's test machine), so it runs on up
//! to [`MAX_WORKERS`] threads while the converter's own thread follows the download.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;

use super::Error;
use crate::digest::ContentHasher;
use crate::fsutil;

/// Writeback of the output is started every this many bytes written.
const WINDOW: u64 = 16 << 20;
/// Decompressing threads at most.
pub const MAX_WORKERS: usize = 4;
/// Compressed clusters queued for the decompressing threads, in bytes of output (each holds
/// its compressed bytes: the queue is most of the converter's memory).
const QUEUED: u64 = 2 << 20;

/// The output file and what was written to it, shared by the converter and its threads.
pub struct Output<'a> {
    file: &'a File,
    stop: &'a (dyn Fn() -> Option<String> + Sync),
    check_every: u64,
    next_check: AtomicU64,
    written: AtomicU64,
    kicked: AtomicU64,
    clusters: AtomicU64,
    compressed: AtomicU64,
    failed: Mutex<Option<Error>>,
    /// The content digest, while clusters arrive in guest order (`None` once one does not).
    digest: Mutex<Option<InOrder>>,
}

impl<'a> Output<'a> {
    /// `stop` is asked every `check_every` bytes written whether to stop.
    pub fn new(
        file: &'a File,
        stop: &'a (dyn Fn() -> Option<String> + Sync),
        check_every: u64,
    ) -> Output<'a> {
        Output {
            file,
            stop,
            check_every,
            next_check: AtomicU64::new(check_every),
            written: AtomicU64::new(0),
            kicked: AtomicU64::new(0),
            clusters: AtomicU64::new(0),
            compressed: AtomicU64::new(0),
            failed: Mutex::new(None),
            digest: Mutex::new(Some(InOrder {
                hasher: ContentHasher::new(),
                next: 0,
            })),
        }
    }

    /// Data clusters written, and how many of them were compressed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.clusters.load(Ordering::Relaxed),
            self.compressed.load(Ordering::Relaxed),
        )
    }

    /// The first failure of a decompressing thread, if any.
    pub fn take_failure(&self) -> Option<Error> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn fail(&self, e: Error) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    }

    fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Writes a cluster's bytes at `guest`, leaving all-zero blocks as holes (the output is new
    /// and sized, so they read as zeros; see `fsutil::write_sparse_at`).
    pub fn write(&self, data: &[u8], guest: u64) -> Result<(), Error> {
        fsutil::write_sparse_at(self.file, data, guest)?;
        self.digest_in_order(data, guest);
        self.clusters.fetch_add(1, Ordering::Relaxed);
        let total =
            self.written.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
        let kicked = self.kicked.load(Ordering::Relaxed);
        if total - kicked >= WINDOW
            && self
                .kicked
                .compare_exchange(kicked, total, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Start writeback of what is dirty (the whole file: clusters land anywhere); it
            // guarantees nothing, the fsync before the rename does.
            // SAFETY: sync_file_range on a descriptor we hold; no memory is passed.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
        let next = self.next_check.load(Ordering::Relaxed);
        if total >= next
            && self
                .next_check
                .compare_exchange(
                    next,
                    total + self.check_every,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
            && let Some(why) = (self.stop)()
        {
            return Err(Error::Stopped(why));
        }
        Ok(())
    }
}

impl Output<'_> {
    /// Feeds the digest while the clusters come in guest order (holes between them as zeros);
    /// the first one out of order ends it, and the caller digests the file instead.
    fn digest_in_order(&self, data: &[u8], guest: u64) {
        let mut d = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        let Some(order) = d.as_mut() else {
            return;
        };
        if guest < order.next {
            *d = None;
            return;
        }
        order.hasher.zeros(guest - order.next);
        order.hasher.update(data);
        order.next = guest + data.len() as u64;
    }

    /// Ends the in-order digest: the decompressing threads finish clusters in any order.
    fn end_digest(&self) -> &Self {
        let mut d = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_some() {
            *d = None;
        }
        self
    }

    /// The content digest of an image of `virtual_size` bytes, if every cluster came in order.
    pub fn content_digest(&self, virtual_size: u64) -> Option<String> {
        let mut d = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        let mut order = d.take()?;
        order.hasher.zeros(virtual_size.checked_sub(order.next)?);
        Some(order.hasher.finish())
    }
}

/// The digest of what was written so far, and where the next cluster must start.
struct InOrder {
    hasher: ContentHasher,
    next: u64,
}

/// One compressed cluster: its bytes, where it goes, how many bytes of it are the image's.
struct Job {
    input: Vec<u8>,
    guest: u64,
    len: usize,
}

/// Hands compressed clusters to the decompressing threads.
pub struct Pool {
    tx: mpsc::SyncSender<Job>,
    free: mpsc::Receiver<Vec<u8>>,
}

impl Pool {
    /// A buffer for the next compressed cluster's bytes (one a thread is done with, if any).
    pub fn buffer(&self) -> Vec<u8> {
        self.free.try_recv().unwrap_or_default()
    }

    /// Queues a compressed cluster; fails with the first failure of a thread.
    pub fn submit(
        &self,
        out: &Output<'_>,
        input: Vec<u8>,
        guest: u64,
        len: usize,
    ) -> Result<(), Error> {
        if let Some(e) = out.take_failure() {
            return Err(e);
        }
        self.tx
            .send(Job { input, guest, len })
            .map_err(|_| Error::Stopped("the decompressing threads ended".into()))
    }
}

/// Runs `f` with a pool of decompressing threads writing into `out`; returns once `f` returned
/// and every queued cluster is written. A thread's failure is left in `out` (see
/// [`Output::take_failure`]).
pub fn with_pool<R>(
    out: &Output<'_>,
    zstd: bool,
    cluster_size: usize,
    f: impl FnOnce(&Pool) -> R,
) -> R {
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS);
    let depth = usize::try_from((QUEUED / cluster_size as u64).max(2)).unwrap_or(2);
    let (tx, rx) = mpsc::sync_channel::<Job>(depth);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    let rx = Mutex::new(rx);
    thread::scope(|s| {
        for _ in 0..workers {
            let (rx, free_tx) = (&rx, free_tx.clone());
            s.spawn(move || work(rx, &free_tx, out, zstd, cluster_size));
        }
        let pool = Pool { tx, free: free_rx };
        let r = f(&pool);
        drop(pool);
        r
    })
}

fn work(
    rx: &Mutex<mpsc::Receiver<Job>>,
    free: &mpsc::Sender<Vec<u8>>,
    out: &Output<'_>,
    zstd: bool,
    cluster_size: usize,
) {
    let mut cluster = vec![0u8; cluster_size];
    let mut decoder = Decoder::new(zstd);
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if !out.has_failed() {
            if !decoder.cluster(&job.input, &mut cluster) {
                out.fail(Error::Unsupported(format!(
                    "guest cluster at {:#x}: compressed data that does not decompress to a whole cluster",
                    job.guest
                )));
            } else if let Err(e) = out.end_digest().write(&cluster[..job.len], job.guest) {
                out.fail(e);
            } else {
                out.compressed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = free.send(job.input);
    }
}

/// A thread's decompressor, reused from cluster to cluster.
pub enum Decoder {
    /// libdeflate first (a whole buffer at once, about 1.5x zlib's speed); zlib decides every
    /// cluster libdeflate does not decode to exactly a full cluster.
    Zlib(Box<libdeflater::Decompressor>, flate2::Decompress),
    Zstd(Option<zstd::stream::raw::Decoder<'static>>),
}

impl Decoder {
    pub fn new(zstd: bool) -> Decoder {
        if zstd {
            Decoder::Zstd(zstd::stream::raw::Decoder::new().ok())
        } else {
            Decoder::Zlib(
                Box::new(libdeflater::Decompressor::new()),
                flate2::Decompress::new(false),
            )
        }
    }

    /// Decompresses one cluster into `out` (its full size); false if the data is not one.
    pub fn cluster(&mut self, input: &[u8], out: &mut [u8]) -> bool {
        match self {
            Decoder::Zlib(fast, d) => {
                // A stream that ends exactly at the cluster's end decodes to the same bytes in
                // both (and zlib too would stop there: qemu's rule is met). Anything else — a
                // stream longer than the cluster (qemu takes its first cluster's worth), shorter,
                // or one libdeflate refuses — is zlib's to judge, as qemu does with zlib.
                if fast
                    .deflate_decompress(input, out)
                    .is_ok_and(|n| n == out.len())
                {
                    return true;
                }
                d.reset(false);
                inflate(d, input, out)
            }
            Decoder::Zstd(Some(d)) => {
                zstd::stream::raw::Operation::reinit(d).is_ok() && unzstd(d, input, out)
            }
            Decoder::Zstd(None) => false,
        }
    }
}

/// Raw deflate (qcow2 writes it with window bits -12; a larger window reads it too), qemu's
/// rule: the stream must fill the whole cluster; bytes after it are ignored.
#[cfg(test)]
pub fn zlib_cluster(input: &[u8], out: &mut [u8]) -> bool {
    inflate(&mut flate2::Decompress::new(false), input, out)
}

fn inflate(d: &mut flate2::Decompress, input: &[u8], out: &mut [u8]) -> bool {
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) | Ok(flate2::Status::BufError) | Ok(flate2::Status::Ok) => {
            d.total_out() == out.len() as u64
        }
        Err(_) => false,
    }
}

/// One zstd frame, streamed until the cluster is full (qemu stops there too).
#[cfg(test)]
pub fn zstd_cluster(input: &[u8], out: &mut [u8]) -> bool {
    zstd::stream::raw::Decoder::new().is_ok_and(|mut d| unzstd(&mut d, input, out))
}

fn unzstd(d: &mut zstd::stream::raw::Decoder<'_>, input: &[u8], out: &mut [u8]) -> bool {
    let mut inb = zstd::stream::raw::InBuffer::around(input);
    let mut outb = zstd::stream::raw::OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        if zstd::stream::raw::Operation::run(d, &mut inb, &mut outb).is_err() {
            return false;
        }
        if outb.pos() == outb.capacity() {
            return true;
        }
        if (inb.pos(), outb.pos()) == before || inb.pos() == input.len() {
            return false;
        }
    }
}
