//! Parallel ranged download of a large image (`--connections N`): the rest of the image is cut
//! into fixed chunks handed out in order to N workers, each fetching its chunk with its own
//! `Range` request (resumed on its own after a cut, under the same retry policy and
//! `--min-rate` guard as one stream) and writing it at its offset of the `.part` with
//! positional writes (zero blocks left as holes). The hash must see the bytes in order: the
//! coordinating thread re-reads each chunk from the page cache once every chunk before it is
//! complete, and feeds it to the hash thread. Memory stays a few buffers per worker.
//!
//! A killed run leaves chunks out of order in the `.part`; the complete prefix is kept in the
//! `.part`'s extended attribute (see [`super::prefix`]), updated as the prefix grows, and a
//! resume truncates the `.part` to it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;

use anyhow::{Context, Result};

use super::download::{Download, Fill, RateGuard, fill, read_failure};
use super::hash::{CHUNK, HashThread, ToHasher};
use super::prefix::{clear_prefix, record_prefix};
use super::retry;
use crate::fsutil;
use crate::glance::{self, Data};

/// Images with at least this much left to download go parallel.
pub const MIN_PARALLEL: u64 = 64 << 20;
/// The unit handed to a worker: one request (more after a cut), hashed as a whole.
const SEGMENT: u64 = 16 << 20;
/// What a worker tells the coordinator.
enum Done {
    /// This chunk is in the `.part`.
    Chunk(usize),
    /// A retry under way, for the reporter.
    Warn(String),
    Failed(anyhow::Error),
}

impl Download<'_> {
    /// Downloads the image from `pos` (hashed so far) to its end in parallel, if it is large,
    /// its size is known and the server honours Range. `Ok(None)`: not done (one stream goes on
    /// from `pos`); `Ok(Some(size))`: all of it is in the `.part` and the hasher.
    pub(super) fn ranged(&self, file: &File, hasher: &HashThread, pos: u64) -> Result<Option<u64>> {
        let Some(size) = self.image.size else {
            return Ok(None);
        };
        let workers = self.opts.connections as usize;
        if workers < 2 || size.saturating_sub(pos) < MIN_PARALLEL {
            return Ok(None);
        }
        let count = usize::try_from((size - pos).div_ceil(SEGMENT))?;
        let id = self.image.id.as_str();
        // The probe: chunk 1's range (chunk 0's after a resume, which starts past byte 0).
        let probe = usize::from(pos == 0);
        let probe_at = pos + probe as u64 * SEGMENT;
        let body = match self.glance.open_data(id, probe_at) {
            Ok(Data::Partial { body }) => body,
            Ok(Data::Full { .. }) => {
                self.rep.debug(&format!(
                    "image {id}: the server ignored a Range request; downloading one stream"
                ));
                return Ok(None);
            }
            Err(e) => {
                self.rep.debug(&format!(
                    "image {id}: ranged request failed ({e}); downloading one stream"
                ));
                return Ok(None);
            }
        };
        // Nothing may be at or after `pos` (skipped zero blocks must read as zeros), and the
        // record must be on the file before the first chunk lands. The full length makes a
        // chunk's unwritten zero tail readable as zeros when it is hashed.
        let recorded = file.set_len(pos).and_then(|()| record_prefix(file, pos));
        if recorded
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTSUP))
        {
            self.rep.debug(&format!(
                "image {id}: {} cannot keep extended attributes (a resume would not know which chunks are complete); downloading one stream",
                self.part.display()
            ));
            return Ok(None);
        }
        recorded
            .and_then(|()| file.set_len(size))
            .with_context(|| format!("cannot write {}", self.part.display()))?;
        self.rep.debug(&format!(
            "image {id}: {count} chunks of {SEGMENT} bytes over {workers} connections from byte {pos}"
        ));
        let job = Job {
            glance: self.glance,
            image: self.image,
            opts: self.opts,
            part: self.part,
            file,
            base: pos,
            size,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            probe: Mutex::new(Some((probe, body))),
        };
        let (tx, rx) = mpsc::channel::<Done>();
        let outcome = thread::scope(|s| {
            for _ in 0..workers.min(count) {
                let tx = tx.clone();
                let job = &job;
                s.spawn(move || job.work(&tx));
            }
            drop(tx);
            let outcome = job.follow(self, &rx, count, hasher);
            job.stop.store(true, Ordering::Relaxed);
            outcome
        });
        outcome?;
        clear_prefix(file).with_context(|| format!("cannot write {}", self.part.display()))?;
        Ok(Some(size))
    }
}

/// One parallel download, shared by its workers.
struct Job<'a> {
    glance: &'a crate::glance::Client,
    image: &'a crate::glance::Image,
    opts: &'a super::Options,
    part: &'a std::path::Path,
    file: &'a File,
    /// Where chunk 0 starts.
    base: u64,
    size: u64,
    /// The next chunk to hand out.
    next: AtomicUsize,
    /// Set when the download failed: workers stop.
    stop: AtomicBool,
    /// The probe's answer, for the worker that takes its chunk.
    probe: Mutex<Option<(usize, reqwest::blocking::Response)>>,
}

impl Job<'_> {
    fn span(&self, k: usize) -> (u64, u64) {
        let start = self.base + k as u64 * SEGMENT;
        (start, (start + SEGMENT).min(self.size))
    }

    /// Hashes the chunks in order as they complete; the first failure ends the download.
    fn follow(
        &self,
        dl: &Download<'_>,
        rx: &mpsc::Receiver<Done>,
        count: usize,
        hasher: &HashThread,
    ) -> Result<()> {
        let mut done = vec![false; count];
        let mut hashed = 0;
        for msg in rx {
            let k = match msg {
                Done::Chunk(k) => k,
                Done::Warn(w) => {
                    dl.rep.warn(&w);
                    continue;
                }
                Done::Failed(e) => {
                    self.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            if let Some(d) = done.get_mut(k) {
                *d = true;
            }
            while done.get(hashed).copied().unwrap_or(false) {
                let (start, end) = self.span(hashed);
                self.hash_range(start, end, hasher).inspect_err(|_| {
                    self.stop.store(true, Ordering::Relaxed);
                })?;
                hashed += 1;
                dl.bar.set_position(end);
                record_prefix(self.file, end)
                    .with_context(|| format!("cannot write {}", self.part.display()))?;
            }
            if hashed == count {
                return Ok(());
            }
        }
        anyhow::bail!("the download threads of {} stopped", self.part.display())
    }

    /// Feeds bytes `start..end` of the `.part` (just written, in the page cache) to the hasher.
    fn hash_range(&self, start: u64, end: u64, hasher: &HashThread) -> Result<()> {
        let mut at = start;
        while at < end {
            let mut buf = hasher.buffer();
            let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            buf.resize(want, 0);
            self.file
                .read_exact_at(&mut buf, at)
                .with_context(|| format!("cannot read {}", self.part.display()))?;
            at += want as u64;
            hasher.send(ToHasher::Data(buf))?;
        }
        Ok(())
    }

    /// A worker: takes the next chunk until none is left or the download failed.
    fn work(&self, tx: &mpsc::Sender<Done>) {
        // A quarter of the pipeline chunk: N of them are in memory at once.
        let mut buf = vec![0u8; CHUNK / 4];
        while !self.stop.load(Ordering::Relaxed) {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            if self.span(k).0 >= self.size {
                return;
            }
            let (msg, failed) = match self.chunk(k, &mut buf, tx) {
                Ok(()) => (Done::Chunk(k), false),
                Err(e) => (Done::Failed(e), true),
            };
            if tx.send(msg).is_err() || failed {
                return;
            }
        }
    }

    /// Downloads chunk `k`, resuming after cuts: the retry loop of one stream, for one chunk.
    fn chunk(&self, k: usize, buf: &mut [u8], tx: &mpsc::Sender<Done>) -> Result<()> {
        let (start, end) = self.span(k);
        let opts = self.opts;
        let id = self.image.id.as_str();
        let mut pos = start;
        let mut furthest = pos;
        let mut failures = 0;
        loop {
            let failure = match self.attempt(k, &mut pos, end, buf)? {
                None => return Ok(()),
                Some(f) => f,
            };
            if self.stop.load(Ordering::Relaxed) {
                return Err(failure.into());
            }
            let progressed = pos > furthest;
            furthest = furthest.max(pos);
            if !progressed || matches!(failure, glance::Error::TooSlow { .. }) {
                failures += 1;
            }
            if !failure.retryable() || failures > opts.retries {
                return Err(failure.into());
            }
            let wait = retry::backoff(opts, failures.max(1), &failure)?;
            let _ = tx.send(Done::Warn(format!(
                "image {id}: {failure}; resuming from byte {pos} in {:.1}s",
                wait.as_secs_f64()
            )));
            // In slices: a failed chunk elsewhere ends the wait.
            let until = std::time::Instant::now() + wait;
            while !self.stop.load(Ordering::Relaxed) {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                thread::sleep(left.min(std::time::Duration::from_millis(100)));
            }
        }
    }

    /// One request for `pos..end`. `Ok(None)`: the chunk is complete; `Ok(Some(e))`: a Glance
    /// failure; `Err`: a local one.
    fn attempt(
        &self,
        k: usize,
        pos: &mut u64,
        end: u64,
        buf: &mut [u8],
    ) -> Result<Option<glance::Error>> {
        let id = self.image.id.as_str();
        let probed = match self.probe.lock() {
            Ok(mut p) if p.as_ref().is_some_and(|(c, _)| *c == k) && *pos == self.span(k).0 => {
                p.take().map(|(_, body)| body)
            }
            _ => None,
        };
        let body = match probed {
            Some(body) => body,
            None => match self.glance.open_data(id, *pos) {
                Ok(Data::Partial { body }) => body,
                // Chunk 0 of a fresh download is asked for without a Range.
                Ok(Data::Full { body, .. }) if *pos == 0 => body,
                Ok(Data::Full { .. }) => {
                    return Ok(Some(glance::Error::Data {
                        id: id.to_owned(),
                        detail: format!("the server did not answer the range from byte {pos}"),
                    }));
                }
                Err(e) => return Ok(Some(e)),
            },
        };
        // The last chunk reads one byte more: a body longer than the record says is refused,
        // as one stream refuses it.
        let extra = u64::from(end == self.size);
        let mut src = RateGuard::new(body.take(end - *pos + extra), self.opts.min_rate);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(Some(glance::Error::Data {
                    id: id.to_owned(),
                    detail: "another chunk failed".into(),
                }));
            }
            let (n, how) = fill(&mut src, buf);
            if *pos + n as u64 > end {
                return Err(super::Error::TooLong {
                    id: id.to_owned(),
                    expected: self.size,
                }
                .into());
            }
            fsutil::write_sparse_at(self.file, &buf[..n], *pos)
                .with_context(|| format!("cannot write {}", self.part.display()))?;
            *pos += n as u64;
            match how {
                Fill::More => {}
                Fill::Eof if *pos == end => return Ok(None),
                Fill::Eof => {
                    return Ok(Some(glance::Error::Data {
                        id: id.to_owned(),
                        detail: format!("body ended early at {pos} of {} bytes", self.size),
                    }));
                }
                Fill::Failed(e) => return Ok(Some(read_failure(id, *pos, &e))),
            }
        }
    }
}
