//! Getting one image into the cache: look it up in Glance, lock its entry, stream it to
//! `<entry>.part` while hashing on a second thread, verify, inspect, convert to raw, persist.
//! Used by `imgcache fetch` and by every command that needs a base.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use openssl::hash::{Hasher, MessageDigest};
use xxhash_rust::xxh3::Xxh3;

use crate::cache::{self, Cache, Record};
use crate::error::Kind;
use crate::glance::{self, Client, Data, Image};
use crate::inspect::{self, Format};
use crate::progress::{Reporter, Transfer};
use crate::qemu_img;

/// Chunk size of the download pipeline: large enough for few syscalls, small enough that the
/// few chunks in flight keep the peak RSS low.
const CHUNK: usize = 1 << 20;
/// Chunks queued between the writer and the hasher.
const QUEUE: usize = 4;
/// Longest `Retry-After` honoured; beyond it the server is treated as unavailable.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Fetch failures that are not Glance's, qemu-img's or the inspector's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "image {id} is {status} in Glance, not active; wait until it is active or pick another image"
    )]
    NotActive { id: String, status: String },
    #[error(
        "image {id}: size mismatch: Glance says {expected} bytes, received {got}; the download was discarded, run the command again"
    )]
    Size { id: String, expected: u64, got: u64 },
    #[error(
        "image {id}: {algo} mismatch: Glance says {expected}, the data hashes to {got}; the download was discarded — the image in Glance may be corrupt"
    )]
    Hash {
        id: String,
        algo: String,
        expected: String,
        got: String,
    },
    #[error(
        "image {id} has no checksum or os_hash in Glance, so it cannot be verified; refusing to cache it"
    )]
    NoHash { id: String },
    #[error(
        "image {id}: hash algorithm {algo:?} is not supported (sha256, sha384, sha512, md5 are)"
    )]
    UnsupportedHash { id: String, algo: String },
    #[error(
        "not enough space in {dir} to convert image {id}: need about {need} bytes, {available} available; free space or use --no-force-raw"
    )]
    NoSpace {
        id: String,
        dir: PathBuf,
        need: u64,
        available: u64,
    },
    #[error(
        "image {id}: conversion produced {got} bytes of virtual size, expected {expected}; discarded"
    )]
    ConvertedSize { id: String, expected: u64, got: u64 },
}

impl Error {
    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::NotActive { .. } => Kind::NotUsable,
            Error::Size { .. } | Error::Hash { .. } | Error::ConvertedSize { .. } => {
                Kind::Integrity
            }
            Error::NoHash { .. } | Error::UnsupportedHash { .. } => Kind::Integrity,
            Error::NoSpace { .. } => Kind::NoSpace,
        }
    }
}

/// Settings of one fetch.
#[derive(Debug, Clone)]
pub struct Options {
    pub lock_timeout: Duration,
    /// Attempts after the first for failures that made no progress.
    pub retries: u32,
    /// First backoff; doubles per attempt up to 30 s.
    pub retry_backoff: Duration,
    /// Convert non-raw images to raw (Nova's `force_raw_images`).
    pub force_raw: bool,
    /// Read `file://` `direct_url`s directly (a Glance file store mounted here).
    pub allow_direct_file: bool,
    /// What the inspector accepts.
    pub limits: inspect::Limits,
}

/// A cache entry ready to use.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub id: String,
    pub path: PathBuf,
    /// False when the entry was already there.
    pub downloaded: bool,
    pub record: Option<Record>,
}

/// Makes sure the image is in the cache and returns its entry.
///
/// A cached entry is returned without contacting Glance. Otherwise the entry's lock is taken
/// (waiting with a notice), the cache is re-checked under the lock, the image must be `active`,
/// and it is downloaded (resuming a `.part` left by an earlier run), verified against Glance's
/// size and hash, inspected, converted to raw if asked, and persisted atomically with its record.
/// On failure no entry and no temp file is left; only a killed process leaves a `.part`, which
/// the next run resumes.
pub fn ensure(
    cache: &Cache,
    glance: &Client,
    id: &str,
    opts: &Options,
    rep: &dyn Reporter,
) -> Result<Fetched> {
    cache::validate_id("image id", id)?;
    let name = cache::entry_name(id);
    let path = cache.entry_path(&name);
    if path.is_file() {
        rep.debug(&format!("image {id}: already cached as {}", path.display()));
        return Ok(cached(cache, id, &name, path, rep));
    }
    // Lock first, then ask Glance: in a herd only the holder talks to Glance, and the waiters
    // find the entry when they get the lock (16 concurrent fetches: 1.09x one fetch instead of
    // 1.42x, docs/benchmarks.md).
    cache.ensure_dirs()?;
    let _lock = cache.lock(&name, &format!("image {id}"), opts.lock_timeout, &|what| {
        rep.info(&format!(
            "waiting for the lock on {what} (another imgcache is fetching it)"
        ))
    })?;
    // Re-check under the lock: whoever held it may have just finished this very image.
    if path.is_file() {
        return Ok(cached(cache, id, &name, path, rep));
    }
    rep.debug(&format!(
        "image {id}: not cached; asking Glance for its record"
    ));
    let image = with_retries(opts, rep, &format!("image {id}"), || glance.show(id))?;
    rep.debug(&format!(
        "image {id}: {} {} bytes, disk_format {}, status {}",
        image.name.as_deref().unwrap_or("(no name)"),
        image.size.map_or("?".into(), |s| s.to_string()),
        image.disk_format.as_deref().unwrap_or("?"),
        image.status
    ));
    if image.status != "active" {
        return Err(Error::NotActive {
            id: id.to_owned(),
            status: image.status,
        }
        .into());
    }
    let converted = cache.converted_path(&name);
    remove_if_exists(&converted)?;
    let bar = rep.transfer(id);
    let part = cache.part_path(&name);
    let build = Build {
        cache,
        image: &image,
        name: &name,
        part: &part,
        opts,
        rep,
        bar: bar.as_ref(),
    };
    let result = build.entry(glance);
    if result.is_err() {
        let _ = fs::remove_file(&converted);
    }
    let record = result?;
    Ok(Fetched {
        id: id.to_owned(),
        path,
        downloaded: true,
        record: Some(record),
    })
}

fn cached(cache: &Cache, id: &str, name: &str, path: PathBuf, rep: &dyn Reporter) -> Fetched {
    let record = cache.read_record(name);
    match &record {
        None => rep.warn(&format!(
            "{} has no imgcache record (made by another tool?); using it as it is",
            path.display()
        )),
        Some(r) if fs::metadata(&path).map(|m| m.len()).ok() != Some(r.entry_size) => {
            rep.warn(&format!(
                "{} does not match its record (size changed); run `imgcache verify`",
                path.display()
            ))
        }
        Some(_) => {}
    }
    Fetched {
        id: id.to_owned(),
        path,
        downloaded: false,
        record,
    }
}

/// One entry being built under its lock.
struct Build<'a> {
    cache: &'a Cache,
    image: &'a Image,
    name: &'a str,
    part: &'a Path,
    opts: &'a Options,
    rep: &'a dyn Reporter,
    bar: &'a dyn Transfer,
}

impl Build<'_> {
    /// Downloads, verifies, inspects, converts and persists the entry.
    fn entry(&self, glance: &Client) -> Result<Record> {
        let Build {
            cache,
            image,
            name,
            part,
            opts,
            rep,
            bar,
        } = *self;
        let id = image.id.as_str();
        let (algo, expected) = hash_spec(image)?;
        bar.set_length(image.size);
        bar.stage("downloading");
        let direct = direct_file(image, opts, rep);
        let started = std::time::Instant::now();
        let received = match direct {
            Some(src) => download_direct(&src, part, &algo, rep, bar),
            None => download(glance, image, part, &algo, opts, rep, bar),
        };
        if let Ok((bytes, _)) = &received {
            let secs = started.elapsed().as_secs_f64();
            rep.debug(&format!(
            "image {id}: {bytes} bytes downloaded and hashed ({algo}) in {secs:.2}s ({:.0} MB/s)",
            *bytes as f64 / secs.max(1e-9) / 1e6
        ));
        }
        let (size, digest) = match received {
            Ok(v) => v,
            Err(e) => {
                // Within a run, retries already resume; a failed run leaves no temp file behind.
                // Only a killed process leaves a `.part`, and the next run resumes it.
                let _ = fs::remove_file(part);
                return Err(e);
            }
        };
        let verified = verify(image, size, &algo, &expected, &digest.glance)
            .and_then(|()| self.inspect_and_persist(&algo, size, &digest.content));
        if verified.is_err() {
            let _ = fs::remove_file(part);
        }
        let record = verified?;
        rep.debug(&format!(
            "image {id}: cached as {}",
            cache.entry_path(name).display()
        ));
        Ok(record)
    }

    /// Inspects the verified `.part`, converts it if asked, and persists entry and record.
    fn inspect_and_persist(&self, algo: &str, size: u64, content_digest: &str) -> Result<Record> {
        let Build {
            cache,
            image,
            name,
            part,
            opts,
            rep,
            bar,
        } = *self;
        let id = image.id.as_str();
        bar.stage("inspecting");
        let declared = Format::from_disk_format(image.disk_format.as_deref().unwrap_or("raw"))?;
        let report = inspect::inspect_path_with(part, &opts.limits)?;
        inspect::check_declared(declared, report.format)?;
        let info = qemu_img::info(part, report.format.qemu_name())?;
        second_opinion(&report, &info)?;
        rep.debug(&format!(
            "image {id}: inspected as {}, virtual size {} bytes; qemu-img agrees",
            report.format.name(),
            info.virtual_size
        ));
        let entry = cache.entry_path(name);
        let convert = opts.force_raw && report.format.qemu_name() != "raw";
        let (final_tmp, format, content) = if convert {
            bar.stage("converting");
            let dst = cache.converted_path(name);
            check_space(id, cache.base_dir(), size, info.virtual_size)?;
            let direct_io = direct_io_works(cache.base_dir());
            let started = std::time::Instant::now();
            qemu_img::convert_to_raw(part, report.format.qemu_name(), &dst, direct_io)?;
            rep.debug(&format!(
                "image {id}: converted {} to raw (-t {}) in {:.2}s",
                report.format.name(),
                if direct_io { "none" } else { "writeback" },
                started.elapsed().as_secs_f64()
            ));
            let out = qemu_img::info(&dst, "raw")?;
            if out.virtual_size != info.virtual_size {
                return Err(Error::ConvertedSize {
                    id: id.to_owned(),
                    expected: info.virtual_size,
                    got: out.virtual_size,
                }
                .into());
            }
            let digest = cache::content_digest(&dst)
                .with_context(|| format!("cannot read {}", dst.display()))?;
            (dst, "raw".to_owned(), digest)
        } else {
            (
                part.to_owned(),
                report.format.qemu_name().to_owned(),
                content_digest.to_owned(),
            )
        };
        let entry_size = fs::metadata(&final_tmp)
            .with_context(|| format!("cannot stat {}", final_tmp.display()))?
            .len();
        let (now, stamp) = cache::now_stamp();
        let record = Record {
            image_id: id.to_owned(),
            name: image.name.clone(),
            disk_format: image.disk_format.clone(),
            container_format: image.container_format.clone(),
            source_format: report.format.name().to_owned(),
            format,
            source_size: size,
            hash_algo: algo.to_owned(),
            hash_value: hash_value(image).unwrap_or_default().to_ascii_lowercase(),
            virtual_size: info.virtual_size,
            entry_size,
            content_xxh3: content,
            fetched_at: stamp,
            fetched_at_unix: now,
            properties: image.properties(),
        };
        // Record first, entry second: a crash in between leaves a record without an entry, which
        // is ignored and overwritten, never an entry without its record.
        cache.write_record(name, &record)?;
        cache::persist(&final_tmp, &entry)
            .with_context(|| format!("cannot move {} into place", final_tmp.display()))?;
        if convert {
            remove_if_exists(part)?;
        }
        Ok(record)
    }
}

/// qemu-img must agree with the inspector and find nothing the inspector refused.
pub fn second_opinion(
    report: &inspect::Report,
    info: &qemu_img::Info,
) -> Result<(), inspect::Error> {
    let disagree = |what: String| Err(inspect::Error::QemuDisagrees(what));
    if info.format != report.format.qemu_name() {
        return disagree(format!(
            "qemu-img reads the file as {}, the inspector as {}",
            info.format,
            report.format.name()
        ));
    }
    if let Some(b) = &info.backing_filename {
        return disagree(format!("qemu-img sees a backing file {b:?}"));
    }
    if let Some(d) = info.data_file() {
        return disagree(format!("qemu-img sees an external data file {d:?}"));
    }
    if let Some(t) = info.create_type()
        && !["monolithicSparse", "streamOptimized"].contains(&t)
    {
        return disagree(format!("qemu-img sees VMDK create-type {t:?}"));
    }
    // Formats whose header size qemu reads the same way (vpc may round to its CHS geometry).
    let comparable = matches!(report.format, Format::Qcow2 | Format::Vmdk | Format::Vdi);
    if let Some(v) = report.virtual_size
        && comparable
        && v != info.virtual_size
    {
        return disagree(format!(
            "virtual size {} in the header, {} per qemu-img",
            v, info.virtual_size
        ));
    }
    Ok(())
}

/// Converting writes at most the virtual size, usually far less (zeros stay holes). Like
/// Ironic, require the smaller of the virtual size and twice the downloaded size.
fn check_space(id: &str, dir: &Path, size: u64, virtual_size: u64) -> Result<()> {
    let need = virtual_size.min(size.saturating_mul(2));
    let available = fs2::available_space(dir)
        .with_context(|| format!("cannot read free space of {}", dir.display()))?;
    if available < need {
        return Err(Error::NoSpace {
            id: id.to_owned(),
            dir: dir.to_owned(),
            need,
            available,
        }
        .into());
    }
    Ok(())
}

/// True if files in `dir` can be opened with O_DIRECT (so `qemu-img convert -t none` works).
fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(format!(".imgcache-odirect-{}", std::process::id()));
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

fn hash_value(image: &Image) -> Option<&str> {
    match (&image.os_hash_algo, &image.os_hash_value) {
        (Some(_), Some(v)) => Some(v),
        _ => image.checksum.as_deref(),
    }
}

/// The algorithm and expected hex value to verify: os_hash when present, else MD5 `checksum`.
fn hash_spec(image: &Image) -> Result<(String, String)> {
    let id = image.id.clone();
    match (&image.os_hash_algo, &image.os_hash_value, &image.checksum) {
        (Some(a), Some(v), _) if !a.is_empty() && !v.is_empty() => {
            GlanceHash::new(a).ok_or(Error::UnsupportedHash {
                id,
                algo: a.clone(),
            })?;
            Ok((a.to_ascii_lowercase(), v.to_ascii_lowercase()))
        }
        (_, _, Some(md5)) if !md5.is_empty() => Ok(("md5".into(), md5.to_ascii_lowercase())),
        _ => Err(Error::NoHash { id }.into()),
    }
}

/// Glance's hash of the data, computed with OpenSSL's libcrypto: its SHA-512 runs about 1.35×
/// faster here than the pure-Rust `sha2` crate (docs/benchmarks.md), and the hash is what bounds
/// a verified fetch.
pub struct GlanceHash {
    md: MessageDigest,
    hasher: Hasher,
}

impl GlanceHash {
    /// A hasher for a hashlib algorithm name (`sha256`, `sha384`, `sha512`, `sha224`, `md5`).
    pub fn new(algo: &str) -> Option<GlanceHash> {
        let md = match algo.to_ascii_lowercase().as_str() {
            "sha256" => MessageDigest::sha256(),
            "sha384" => MessageDigest::sha384(),
            "sha512" => MessageDigest::sha512(),
            "sha224" => MessageDigest::sha224(),
            "md5" => MessageDigest::md5(),
            _ => return None,
        };
        Some(GlanceHash {
            md,
            hasher: Hasher::new(md).ok()?,
        })
    }

    fn update(&mut self, data: &[u8]) -> Result<(), openssl::error::ErrorStack> {
        self.hasher.update(data)
    }

    fn reset(&mut self) -> Result<(), openssl::error::ErrorStack> {
        self.hasher = Hasher::new(self.md)?;
        Ok(())
    }

    /// The hex digest.
    pub fn finish_hex(mut self) -> Result<String, openssl::error::ErrorStack> {
        Ok(hex::encode(self.hasher.finish()?))
    }
}

fn verify(image: &Image, size: u64, algo: &str, expected: &str, digest: &str) -> Result<()> {
    if let Some(want) = image.size
        && want != size
    {
        return Err(Error::Size {
            id: image.id.clone(),
            expected: want,
            got: size,
        }
        .into());
    }
    if digest != expected {
        return Err(Error::Hash {
            id: image.id.clone(),
            algo: algo.to_owned(),
            expected: expected.to_owned(),
            got: digest.to_owned(),
        }
        .into());
    }
    Ok(())
}

/// Runs `f` until it succeeds, fails for good, or the retries are spent.
fn with_retries<T>(
    opts: &Options,
    rep: &dyn Reporter,
    what: &str,
    mut f: impl FnMut() -> Result<T, glance::Error>,
) -> Result<T, glance::Error> {
    let mut attempt = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && attempt < opts.retries => {
                attempt += 1;
                let wait = backoff(opts, attempt, &e)?;
                rep.warn(&format!(
                    "{what}: {e}; retry {attempt}/{} in {:.1}s",
                    opts.retries,
                    wait.as_secs_f64()
                ));
                thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Exponential backoff from `retry_backoff`, or the server's `Retry-After` when it sent one.
fn backoff(opts: &Options, attempt: u32, e: &glance::Error) -> Result<Duration, glance::Error> {
    if let Some(after) = e.retry_after() {
        if after > MAX_RETRY_AFTER {
            return Err(glance::Error::Status {
                url: String::new(),
                status: 429,
                body: format!(
                    "server asks to retry after {after:?}, longer than {MAX_RETRY_AFTER:?}"
                ),
                retry_after: None,
            });
        }
        return Ok(after);
    }
    let factor = 1u32 << (attempt - 1).min(16);
    Ok(opts.retry_backoff.saturating_mul(factor).min(MAX_BACKOFF))
}

/// Message from the writer to the hashing thread.
enum ToHasher {
    Data(Vec<u8>),
    Reset,
}

/// Hashes on its own thread what the writer sends, so hashing overlaps network and disk I/O.
struct HashThread {
    tx: Option<mpsc::SyncSender<ToHasher>>,
    free: mpsc::Receiver<Vec<u8>>,
    handle: Option<thread::JoinHandle<Result<Digests, openssl::error::ErrorStack>>>,
}

/// The digests of a download: Glance's algorithm, and the content digest the record keeps.
struct Digests {
    glance: String,
    content: String,
}

impl HashThread {
    fn start(algo: &str) -> Result<HashThread> {
        let mut hasher = GlanceHash::new(algo).context("unsupported hash algorithm")?;
        let (tx, rx) = mpsc::sync_channel::<ToHasher>(QUEUE);
        let (free_tx, free) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("hash".into())
            .spawn(move || {
                // The content digest costs ~1/20 of sha512; the record keeps it for `verify`.
                let mut content = Xxh3::new();
                for msg in rx {
                    match msg {
                        ToHasher::Data(buf) => {
                            hasher.update(&buf)?;
                            content.update(&buf);
                            let _ = free_tx.send(buf);
                        }
                        ToHasher::Reset => {
                            hasher.reset()?;
                            content.reset();
                        }
                    }
                }
                Ok(Digests {
                    glance: hasher.finish_hex()?,
                    content: cache::content_hex(&content),
                })
            })
            .context("cannot start the hashing thread")?;
        Ok(HashThread {
            tx: Some(tx),
            free,
            handle: Some(handle),
        })
    }

    /// A buffer to fill: a recycled one, or a new one while few are in flight.
    fn buffer(&self) -> Vec<u8> {
        let mut buf = self.free.try_recv().unwrap_or_default();
        buf.clear();
        buf.reserve(CHUNK);
        buf
    }

    fn send(&self, msg: ToHasher) -> Result<()> {
        self.tx
            .as_ref()
            .context("hashing thread already finished")?
            .send(msg)
            .map_err(|_| anyhow::anyhow!("the hashing thread stopped"))
    }

    fn finish(mut self) -> Result<Digests> {
        drop(self.tx.take());
        self.handle
            .take()
            .context("hashing thread already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("the hashing thread panicked"))?
            .context("hashing failed in libcrypto")
    }
}

/// Reads `src` to its end, appending to `file` and feeding the hasher. Returns bytes copied.
/// A read error is returned as `Err(Left(io))`, a write error as `Err(Right(io))`.
fn pump(
    src: &mut dyn Read,
    file: &mut File,
    hasher: &HashThread,
    mut pos: u64,
    bar: &dyn Transfer,
) -> Result<u64, PumpError> {
    let start = pos;
    loop {
        let mut buf = hasher.buffer();
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        let mut eof = false;
        let mut read_err = None;
        while filled < CHUNK {
            match src.read(&mut buf[filled..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    read_err = Some(e);
                    break;
                }
            }
        }
        buf.truncate(filled);
        if filled > 0 {
            file.write_all(&buf).map_err(PumpError::Write)?;
            hasher
                .send(ToHasher::Data(buf))
                .map_err(|e| PumpError::Write(std::io::Error::other(e.to_string())))?;
            pos += filled as u64;
            bar.set_position(pos);
        }
        if let Some(e) = read_err {
            return Err(PumpError::Read(e, pos - start));
        }
        if eof {
            return Ok(pos - start);
        }
    }
}

enum PumpError {
    /// Reading the source failed after `.1` bytes were copied.
    Read(std::io::Error, u64),
    Write(std::io::Error),
}

/// Downloads over HTTP into `part`, resuming from its current length. Returns size and digest.
#[allow(clippy::too_many_arguments)]
fn download(
    glance: &Client,
    image: &Image,
    part: &Path,
    algo: &str,
    opts: &Options,
    rep: &dyn Reporter,
    bar: &dyn Transfer,
) -> Result<(u64, Digests)> {
    let id = image.id.as_str();
    let mut file = open_part(part)?;
    let hasher = HashThread::start(algo)?;
    let existing = file
        .metadata()
        .with_context(|| format!("cannot stat {}", part.display()))?
        .len();
    let mut pos = existing;
    if pos > 0 && image.size.is_some_and(|s| pos > s) {
        pos = 0;
    }
    if pos > 0 {
        rep.info(&format!(
            "image {id}: resuming {} from byte {pos} (re-hashing what is there)",
            part.display()
        ));
        rehash(&mut file, pos, &hasher, part)?;
    } else if existing > 0 {
        // Only truncate what has bytes: truncating a new empty file makes ext4 (auto_da_alloc)
        // flush it on close, which then makes unlinking a converted image's .part slow.
        truncate(&mut file, part)?;
    }
    bar.set_position(pos);
    let mut failures = 0;
    // Only bytes beyond the furthest point reached count as progress, so a server that keeps
    // restarting or ending early cannot keep us looping.
    let mut furthest = pos;
    loop {
        let complete = image.size.is_some_and(|s| pos == s);
        if complete {
            break;
        }
        rep.trace(&format!(
            "GET /v2/images/{id}/file{}",
            if pos > 0 {
                format!(" with Range: bytes={pos}-")
            } else {
                String::new()
            }
        ));
        let attempt = glance.open_data(id, pos).and_then(|data| {
            let mut body = match data {
                Data::Full { body, len } => {
                    rep.trace(&format!(
                        "image {id}: 200, {} bytes",
                        len.map_or("?".into(), |l| l.to_string())
                    ));
                    if pos > 0 {
                        rep.info(&format!(
                            "image {id}: the server ignored the range request; starting over"
                        ));
                        truncate(&mut file, part).map_err(|e| glance::Error::Transport {
                            url: part.display().to_string(),
                            detail: e.to_string(),
                        })?;
                        hasher
                            .send(ToHasher::Reset)
                            .map_err(|e| glance::Error::Transport {
                                url: String::new(),
                                detail: e.to_string(),
                            })?;
                        pos = 0;
                    }
                    if image.size.is_none() {
                        bar.set_length(len);
                    }
                    body
                }
                Data::Partial { body } => {
                    rep.trace(&format!("image {id}: 206 from byte {pos}"));
                    body
                }
            };
            Ok(pump(&mut body, &mut file, &hasher, pos, bar))
        });
        let (copied, failure) = match attempt {
            Ok(Ok(n)) => (n, None),
            Ok(Err(PumpError::Read(e, n))) => (
                n,
                Some(glance::Error::Transport {
                    url: format!("image {id} data"),
                    detail: format!("connection lost after {} bytes: {e}", pos + n),
                }),
            ),
            Ok(Err(PumpError::Write(e))) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot write {}", part.display()))
                );
            }
            Err(e) => (0, Some(e)),
        };
        pos += copied;
        let failure = match failure {
            Some(e) => e,
            None => match image.size {
                Some(s) if pos < s => glance::Error::Transport {
                    url: format!("image {id} data"),
                    detail: format!("body ended early at {pos} of {s} bytes"),
                },
                _ => break,
            },
        };
        if pos > furthest {
            furthest = pos;
        } else {
            failures += 1;
        }
        if !failure.retryable() || failures > opts.retries {
            drop(file);
            let _ = hasher.finish();
            return Err(failure.into());
        }
        let wait = backoff(opts, failures.max(1), &failure)?;
        rep.warn(&format!(
            "image {id}: {failure}; resuming from byte {pos} in {:.1}s",
            wait.as_secs_f64()
        ));
        thread::sleep(wait);
    }
    // No fsync here: a raw .part is fsynced by `persist` when it becomes the entry, and a .part
    // that is converted is deleted (the converted file is what gets fsynced).
    Ok((pos, hasher.finish()?))
}

/// Copies a `file://` direct_url into `part`, hashing the same way.
fn download_direct(
    src: &Path,
    part: &Path,
    algo: &str,
    rep: &dyn Reporter,
    bar: &dyn Transfer,
) -> Result<(u64, Digests)> {
    rep.debug(&format!("reading {} directly", src.display()));
    let mut input =
        File::open(src).with_context(|| format!("cannot open direct_url {}", src.display()))?;
    let mut file = open_part(part)?;
    if file.metadata().map(|m| m.len()).unwrap_or(1) > 0 {
        truncate(&mut file, part)?;
    }
    let hasher = HashThread::start(algo)?;
    let n = match pump(&mut input, &mut file, &hasher, 0, bar) {
        Ok(n) => n,
        Err(PumpError::Read(e, _)) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read {}", src.display())));
        }
        Err(PumpError::Write(e)) => {
            return Err(anyhow::Error::new(e).context(format!("cannot write {}", part.display())));
        }
    };
    Ok((n, hasher.finish()?))
}

/// The local path of a `file://` direct_url, if allowed and readable.
fn direct_file(image: &Image, opts: &Options, rep: &dyn Reporter) -> Option<PathBuf> {
    if !opts.allow_direct_file {
        return None;
    }
    let url = image.direct_url.as_deref()?;
    let path = PathBuf::from(url.strip_prefix("file://")?);
    if path.is_file() {
        Some(path)
    } else {
        rep.warn(&format!(
            "image {}: direct_url {} is not readable here; downloading over HTTP",
            image.id, url
        ));
        None
    }
}

fn open_part(part: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)
        .with_context(|| format!("cannot open {}", part.display()))
}

fn truncate(file: &mut File, part: &Path) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))
        .map(drop)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", part.display())))
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

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot remove {}", path.display()))),
    }
}
