//! The download loop: stream the image into `<entry>.part` (resuming what a killed run left,
//! after re-hashing it), retrying network failures with `Range` resumes, and feeding the hash
//! pipeline. Local failures (writing the `.part`, the hashing thread) end the fetch at once as
//! I/O errors on the cache; only Glance's failures are retried.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openssl::hash::MessageDigest;

use super::hash::{CHUNK, Digests, HashThread, ToHasher};
use super::prefix;
use super::retry;
use super::sink::Sink;
use super::stream::Watermark;
use super::{Error, Options};
use crate::fsutil;
use crate::glance::{self, Client, Data, Image};
use crate::progress::{Reporter, Transfer};

/// One download of `image` into `part`.
pub struct Download<'a> {
    pub glance: &'a Client,
    pub image: &'a Image,
    pub part: &'a Path,
    pub opts: &'a Options,
    pub rep: &'a dyn Reporter,
    pub bar: &'a dyn Transfer,
    /// The hash of the image's signature (`--verify-signatures`), fed the same buffers.
    pub signed: Option<MessageDigest>,
    /// Told how far the `.part` is written, for a conversion that follows it.
    pub follow: Option<&'a Watermark>,
}

impl Download<'_> {
    /// Downloads over HTTP into `file` (the `.part`, see [`open_part`]), resuming from its
    /// current length. Returns the size
    /// received and the digests.
    pub fn run(&self, mut file: File, algo: &str) -> Result<(u64, Digests, File)> {
        let hasher = HashThread::start_signed(algo, self.signed)?;
        let mut pos = self.resume(&mut file, &hasher)?;
        if let Some(end) = self.ranged(&file, &hasher, pos)? {
            pos = end;
        }
        self.followed(pos);
        self.bar.set_position(pos);
        let mut failures = 0;
        // Only bytes beyond the furthest point reached count as progress, so a server that keeps
        // restarting or ending early cannot keep us looping.
        let mut furthest = pos;
        while self.image.size != Some(pos) {
            let Some(failure) = self.attempt(&mut file, &hasher, &mut pos)? else {
                break;
            };
            // A drip-feeding server makes progress every time: being too slow always counts.
            let progressed = pos > furthest;
            furthest = furthest.max(pos);
            if !progressed || matches!(failure, glance::Error::TooSlow { .. }) {
                failures += 1;
            }
            if !failure.retryable() || failures > self.opts.retries {
                drop(file);
                let _ = hasher.finish();
                return Err(failure.into());
            }
            let wait = retry::backoff(self.opts, failures.max(1), &failure)?;
            self.rep.warn(&format!(
                "image {}: {failure}; resuming from byte {pos} in {:.1}s",
                self.image.id,
                wait.as_secs_f64()
            ));
            thread::sleep(wait);
        }
        // No fsync here: a raw .part is fsynced by `persist` when it becomes the entry, and a
        // .part that is converted is deleted (the converted file is what gets fsynced). The
        // open file goes on to inspection and persist: what was verified is what is kept.
        Ok((pos, hasher.finish()?, file))
    }

    /// Where to start: the length of a `.part` a killed run left (re-hashed), or 0.
    fn resume(&self, file: &mut File, hasher: &HashThread) -> Result<u64> {
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", self.part.display()))?;
        // A `.part` another account made (and can still write) is not ours to resume.
        // SAFETY: geteuid has no arguments and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if std::os::unix::fs::MetadataExt::uid(&meta) != euid {
            return Err(crate::error::Untrusted::io(format!(
                "{} belongs to another user (uid {}); it is not ours to resume — remove it if its download is dead",
                self.part.display(),
                std::os::unix::fs::MetadataExt::uid(&meta)
            ))
            .into());
        }
        let existing = prefix::resume_point(file, meta.len())
            .with_context(|| format!("cannot truncate {}", self.part.display()))?;
        if existing > 0 && self.image.size.is_none_or(|s| existing <= s) {
            self.rep.info(&format!(
                "image {}: resuming {} from byte {existing} (re-hashing what is there)",
                self.image.id,
                self.part.display()
            ));
            rehash(file, existing, hasher, self.part)?;
            return Ok(existing);
        }
        if existing > 0 {
            // Only truncate what has bytes: truncating a new empty file makes ext4
            // (auto_da_alloc) flush it on close, which then makes unlinking a converted image's
            // .part slow.
            truncate(file, self.part)?;
        }
        Ok(0)
    }

    /// One request from `pos`. `Ok(None)`: the body ended where the image ends. `Ok(Some(e))`:
    /// a Glance failure, possibly worth another attempt. `Err`: a local failure, final.
    fn attempt(
        &self,
        file: &mut File,
        hasher: &HashThread,
        pos: &mut u64,
    ) -> Result<Option<glance::Error>> {
        let id = self.image.id.as_str();
        let mut body = match self.open_body(file, hasher, pos)? {
            Ok(body) => body,
            Err(e) => return Ok(Some(e)),
        };
        // Never read more than the record promises (one byte more tells a longer body), or than
        // --max-image-size when it promises nothing: an endless body must not fill the disk.
        let limit = self.image.size.unwrap_or(self.opts.max_image_size);
        let cap = limit.saturating_sub(*pos) + 1;
        let mut guarded = RateGuard::new((&mut body).take(cap), self.opts.min_rate);
        let out = Out {
            file,
            hasher,
            bar: self.bar,
            follow: self.follow,
        };
        let pumped = pump(&mut guarded, out, *pos, self.writeback());
        match pumped {
            Ok(n) => *pos += n,
            Err(PumpError::Read(e, n)) => {
                *pos += n;
                return Ok(Some(read_failure(id, *pos, &e)));
            }
            Err(PumpError::Write(e)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot write {}", self.part.display()))
                );
            }
        }
        if self.image.size.is_none() && *pos > limit {
            return Err(Error::NoSizeTooLarge {
                id: id.to_owned(),
                limit,
            }
            .into());
        }
        Ok(match self.image.size {
            Some(s) if *pos > s => return Err(self.too_long(s)),
            Some(s) if *pos < s => Some(glance::Error::Data {
                id: id.to_owned(),
                detail: format!("body ended early at {pos} of {s} bytes"),
            }),
            _ => None,
        })
    }
}

impl Download<'_> {
    /// Sends the data request from `pos` and reads its answer's headers. A full answer to a
    /// resume starts the `.part` and the hashes over (`pos` becomes 0). The inner `Err` is a
    /// Glance failure (retried by the caller); the outer one a local failure.
    fn open_body(
        &self,
        file: &mut File,
        hasher: &HashThread,
        pos: &mut u64,
    ) -> Result<Result<reqwest::blocking::Response, glance::Error>> {
        let id = self.image.id.as_str();
        Ok(Ok(match self.glance.open_data(id, *pos) {
            Err(e) => return Ok(Err(e)),
            Ok(Data::Partial { body }) => {
                self.rep.trace(&format!("image {id}: 206 from byte {pos}"));
                body
            }
            Ok(Data::Full { body, len }) => {
                self.rep.trace(&format!(
                    "image {id}: 200, {} bytes",
                    len.map_or("?".into(), |l| l.to_string())
                ));
                if *pos > 0 {
                    self.rep.info(&format!(
                        "image {id}: the server did not resume at byte {pos} (it ignored the range, sent another one, or refused it); starting over"
                    ));
                    if let Some(f) = self.follow {
                        f.restart();
                    }
                    truncate(file, self.part)?;
                    hasher.send(ToHasher::Reset)?;
                    *pos = 0;
                }
                if self.image.size.is_none() {
                    self.bar.set_length(len);
                }
                if let (Some(size), Some(len)) = (self.image.size, len)
                    && len > size
                {
                    return Err(self.too_long(size));
                }
                body
            }
        }))
    }

    fn followed(&self, pos: u64) {
        if let Some(f) = self.follow {
            f.written(pos);
        }
    }

    /// Early writeback pays only for a `.part` that becomes the entry: one that is converted
    /// to raw is deleted after the conversion, and its dirty pages may never need writing.
    fn writeback(&self) -> bool {
        let raw = self.image.disk_format.as_deref().is_none_or(|f| f == "raw");
        raw || !self.opts.force_raw
    }

    fn too_long(&self, expected: u64) -> anyhow::Error {
        Error::TooLong {
            id: self.image.id.clone(),
            expected,
        }
        .into()
    }
}

/// The slowest transfer accepted: at least `bytes` in every `window`.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    pub bytes: u64,
    pub window: Duration,
}

/// A body that arrives slower than its [`MinRate`]: the read fails with it inside.
#[derive(Debug)]
pub(super) struct TooSlow(String);

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooSlow {}

/// Fails a read when less than the minimum arrived over the last window, so a server that
/// sends one byte now and then (never silent long enough for `--read-timeout`) cannot hold
/// the entry's lock forever.
pub(super) struct RateGuard<R> {
    inner: R,
    min: MinRate,
    since: Instant,
    got: u64,
}

impl<R: Read> RateGuard<R> {
    pub(super) fn new(inner: R, min: MinRate) -> RateGuard<R> {
        RateGuard {
            inner,
            min,
            since: Instant::now(),
            got: 0,
        }
    }
}

impl<R: Read> Read for RateGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.got += n as u64;
        let elapsed = self.since.elapsed();
        if elapsed >= self.min.window {
            if self.got < self.min.bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    TooSlow(format!(
                        "{} bytes in {:.0}s, slower than --min-rate {} bytes/s",
                        self.got,
                        elapsed.as_secs_f64(),
                        self.min.bytes / self.min.window.as_secs().max(1)
                    )),
                ));
            }
            self.since = Instant::now();
            self.got = 0;
        }
        Ok(n)
    }
}

/// Why [`pump`] stopped early.
enum PumpError {
    /// Reading the source failed after `.1` bytes were copied.
    Read(std::io::Error, u64),
    /// Writing the `.part` (or handing a buffer to the hasher) failed.
    Write(std::io::Error),
}

/// Where [`pump`] puts the stream: the `.part`, the hasher, the progress bar, and the
/// conversion that follows the `.part`, if any.
struct Out<'a> {
    file: &'a mut File,
    hasher: &'a HashThread,
    bar: &'a dyn Transfer,
    follow: Option<&'a Watermark>,
}

/// Reads `src` to its end, appending to the file (zero blocks as holes, see [`Sink`]) and
/// feeding the hasher every byte. Returns bytes copied; however it stops, the file is then
/// exactly as long as what it holds of the stream.
fn pump(src: &mut dyn Read, mut out: Out<'_>, pos: u64, writeback: bool) -> Result<u64, PumpError> {
    let mut end = pos;
    let mut sink = Sink::new(pos, writeback);
    let pumped = pump_into(src, &mut out, &mut end, &mut sink);
    // Also after a failed read: the retry resumes from `end`, and a write error is final.
    if !matches!(pumped, Err(PumpError::Write(_))) {
        sink.finish(out.file, end).map_err(PumpError::Write)?;
    }
    pumped.map(|()| end - pos)
}

fn pump_into(
    src: &mut dyn Read,
    out: &mut Out<'_>,
    pos: &mut u64,
    sink: &mut Sink,
) -> Result<(), PumpError> {
    let start = *pos;
    loop {
        let mut buf = out.hasher.buffer();
        buf.resize(CHUNK, 0);
        let (filled, end) = fill(src, &mut buf);
        buf.truncate(filled);
        if filled > 0 {
            sink.write(out.file, &buf, *pos).map_err(PumpError::Write)?;
            out.hasher
                .send(ToHasher::Data(buf))
                .map_err(|e| PumpError::Write(std::io::Error::other(e.to_string())))?;
            *pos += filled as u64;
            if let Some(f) = out.follow {
                f.written(*pos);
            }
            out.bar.set_position(*pos);
        }
        match end {
            Fill::More => {}
            Fill::Eof => return Ok(()),
            Fill::Failed(e) => return Err(PumpError::Read(e, *pos - start)),
        }
    }
}

/// How a [`fill`] ended.
/// What a failed read of the data stream at `pos` was, as a Glance failure worth another
/// attempt: too slow (`--min-rate`), or the connection lost.
pub(super) fn read_failure(id: &str, pos: u64, e: &std::io::Error) -> glance::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<TooSlow>()) {
        return glance::Error::TooSlow {
            id: id.to_owned(),
            detail: e.to_string(),
        };
    }
    glance::Error::Data {
        id: id.to_owned(),
        detail: format!("connection lost after {pos} bytes: {e}"),
    }
}

pub(super) enum Fill {
    /// The buffer is full; there may be more.
    More,
    Eof,
    Failed(std::io::Error),
}

/// Reads into `buf` until it is full, the source ends, or a read fails. Returns bytes read.
pub(super) fn fill(src: &mut dyn Read, buf: &mut [u8]) -> (usize, Fill) {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => return (filled, Fill::Eof),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Fill::Failed(e)),
        }
    }
    (filled, Fill::More)
}

/// Copies a `file://` direct_url into `part`, hashing the same way (Glance's algorithm and the
/// signature's hash, if any). Only a regular file is read, and never past `limit` (the record's
/// size, or `--max-image-size`) plus one byte.
pub fn download_direct(
    src: &Path,
    part: &Path,
    (algo, signed): (&str, Option<MessageDigest>),
    limit: u64,
    rep: &dyn Reporter,
    bar: &dyn Transfer,
) -> Result<(u64, Digests, File)> {
    rep.debug(&format!("reading {} directly", src.display()));
    let input =
        File::open(src).with_context(|| format!("cannot open direct_url {}", src.display()))?;
    if !input.metadata().is_ok_and(|m| m.is_file()) {
        anyhow::bail!(
            "direct_url {} is not a regular file; refusing to read it (drop --allow-direct-file or fix the Glance store)",
            src.display()
        );
    }
    // A longer file is cut here; the size check that follows reports it.
    let mut input = input.take(limit.saturating_add(1));
    let mut file = open_part(part)?;
    if file.metadata().map(|m| m.len()).unwrap_or(1) > 0 {
        truncate(&mut file, part)?;
    }
    let hasher = HashThread::start_signed(algo, signed)?;
    // No early writeback: whether this `.part` is converted (and deleted) is not known here.
    let out = Out {
        file: &mut file,
        hasher: &hasher,
        bar,
        follow: None,
    };
    let n = match pump(&mut input, out, 0, false) {
        Ok(n) => n,
        Err(PumpError::Read(e, _)) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read {}", src.display())));
        }
        Err(PumpError::Write(e)) => {
            return Err(anyhow::Error::new(e).context(format!("cannot write {}", part.display())));
        }
    };
    Ok((n, hasher.finish()?, file))
}

/// The local path of a `file://` direct_url, if allowed and readable.
pub fn direct_file(image: &Image, opts: &Options, rep: &dyn Reporter) -> Option<PathBuf> {
    if !opts.allow_direct_file {
        return None;
    }
    let url = image.direct_url.as_deref()?;
    let path = PathBuf::from(url.strip_prefix("file://")?);
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
        Some(path)
    } else {
        rep.warn(&format!(
            "image {}: direct_url {} is not readable here; downloading over HTTP",
            image.id, url
        ));
        None
    }
}

/// Opens (or creates) the `.part` the download writes.
pub fn open_part(part: &Path) -> Result<File> {
    fsutil::open_or_create(part).with_context(|| format!("cannot open {}", part.display()))
}

/// Empties the `.part` and rewinds it.
fn truncate(file: &mut File, part: &Path) -> Result<()> {
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .with_context(|| format!("cannot truncate {}", part.display()))
}

/// Feeds the first `len` bytes of `file` to the hasher and leaves the cursor at `len`.
fn rehash(file: &mut File, len: u64, hasher: &HashThread, part: &Path) -> Result<()> {
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("cannot read {}", part.display()))?;
    let mut left = len;
    while left > 0 {
        let mut buf = hasher.buffer();
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        buf.resize(want, 0);
        file.read_exact(&mut buf)
            .with_context(|| format!("cannot read {}", part.display()))?;
        left -= want as u64;
        hasher.send(ToHasher::Data(buf))?;
    }
    file.set_len(len)
        .with_context(|| format!("cannot write {}", part.display()))?;
    file.seek(SeekFrom::Start(len))
        .with_context(|| format!("cannot write {}", part.display()))?;
    Ok(())
}
