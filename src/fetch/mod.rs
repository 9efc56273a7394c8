//! Getting one image into the cache, split by job: [`download`] (the loop into `.part`, resume,
//! retries), [`sink`] (zero blocks as holes, early writeback), [`hash`] (the hash pipeline),
//! [`retry`] (the policy), [`verify`] (size, hash, qemu-img's second opinion, free space) and
//! [`persist`] (inspect, convert, record, rename).
//! This file holds the protocol around them: lock, re-check, ask Glance, build, clean up. Used
//! by `imgcache fetch` and by every command that needs a base.

pub mod download;
mod hash;
mod persist;
mod prefix;
mod ranges;
mod retry;
mod signed;
mod sink;
mod stream;
mod verify;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

pub use hash::GlanceHash;
pub use signed::{Policy as SignaturePolicy, Trusted};
pub use verify::second_opinion;

use crate::cache::{Cache, Entry, Record};
use crate::error::Kind;
use crate::fsutil;
use crate::glance::{Client, Image};
use crate::inspect;
use crate::progress::{Reporter, Transfer, printable};

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
        "image {id}: Glance sends more than the {expected} bytes its record says; the download was stopped there and discarded — the image in Glance may be corrupt"
    )]
    TooLong { id: String, expected: u64 },
    #[error(
        "image {id} has no size in its Glance record and its data goes past --max-image-size ({limit} bytes); the download was stopped there and discarded — raise --max-image-size if the image is genuine"
    )]
    NoSizeTooLarge { id: String, limit: u64 },
    /// The conversion during the download gave bytes of the `.part` back and then could not
    /// finish: the fetch downloads the image again and converts it after the download.
    #[error(
        "image {id}: the conversion during the download stopped after it had given downloaded bytes back ({why}); downloading again"
    )]
    Redownload { id: String, why: String },
    #[error("image {id}: the conversion to raw during the download was stopped: {why}")]
    ConversionStopped { id: String, why: String },
    #[error(
        "image {id} is no longer the cached one: the entry has {algo} {cached}, Glance now says {now} (an id purged and reused?); when no instance uses it, replace it with `imgcache fetch --replace {id}`"
    )]
    Changed {
        id: String,
        algo: String,
        cached: String,
        now: String,
    },
    #[error(
        "image {id} changed in Glance but its entry is in use by {users}; it is not replaced — move those instances to another image first"
    )]
    ChangedInUse { id: String, users: String },
    #[error(
        "image {id} has no checksum or os_hash in Glance, so it cannot be verified; refusing to cache it"
    )]
    NoHash { id: String },
    #[error(
        "image {id}: hash algorithm {algo:?} is not supported (sha256, sha384, sha512, md5 are)"
    )]
    UnsupportedHash { id: String, algo: String },
    #[error(
        "not enough space in {dir} to convert image {id}: need about {need} bytes and {reserve} kept free (--min-free), {available} available; free space, lower --min-free or use --no-force-raw"
    )]
    NoSpace {
        id: String,
        dir: PathBuf,
        need: u64,
        reserve: u64,
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
            Error::Redownload { .. } => Kind::Other,
            Error::Size { .. }
            | Error::TooLong { .. }
            | Error::NoSizeTooLarge { .. }
            | Error::Changed { .. }
            | Error::ChangedInUse { .. }
            | Error::Hash { .. }
            | Error::ConvertedSize { .. } => Kind::Integrity,
            Error::NoHash { .. } | Error::UnsupportedHash { .. } => Kind::Integrity,
            Error::NoSpace { .. } | Error::ConversionStopped { .. } => Kind::NoSpace,
        }
    }
}

/// Settings of one fetch.
#[derive(Debug, Clone)]
pub struct Options {
    pub lock_timeout: Duration,
    /// Attempts after the first for failures that made no progress.
    pub retries: u32,
    /// Ranged requests in flight for a large image (`--connections`); 1 = one stream.
    pub connections: u32,
    /// First backoff; doubles per attempt up to 30 s.
    pub retry_backoff: Duration,
    /// Convert non-raw images to raw (Nova's `force_raw_images`).
    pub force_raw: bool,
    /// Read `file://` `direct_url`s directly (a Glance file store mounted here).
    pub allow_direct_file: bool,
    /// What the inspector accepts.
    pub limits: inspect::Limits,
    /// Most bytes read for an image whose record has no `size` (and from a `file://` location).
    pub max_image_size: u64,
    /// The slowest data transfer accepted before the attempt is given up.
    pub min_rate: download::MinRate,
    /// Free space a conversion must leave on the cache's filesystem (`--min-free`).
    pub min_free: crate::units::Reserve,
    /// Check a cached entry's hash against Glance's record before serving it.
    pub revalidate: bool,
    /// Replace a cached entry whose image changed in Glance, if no instance uses it.
    pub replace: bool,
    /// `--verify-signatures`: where certificates come from; `None` when off.
    pub signatures: Option<signed::Policy>,
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
    let entry = cache.image(id)?;
    if let Some(found) = cached(id, &entry, rep)? {
        rep.debug(&format!(
            "image {id}: already cached as {}",
            entry.path().display()
        ));
        if !opts.revalidate || still_the_image(cache, glance, &entry, &found, opts, rep)? {
            return Ok(found);
        }
    }
    // Lock first, then ask Glance: in a herd only the holder talks to Glance, and the waiters
    // find the entry when they get the lock (16 concurrent fetches: 1.09x one fetch instead of
    // 1.42x, docs/benchmarks.md).
    cache.ensure_dirs()?;
    let lock =
        std::cell::RefCell::new(entry.lock(&format!("image {id}"), opts.lock_timeout, rep)?);
    // Re-check under the lock: whoever held it may have just finished this very image.
    if let Some(found) = cached(id, &entry, rep)? {
        return Ok(found);
    }
    if entry.exists() {
        rep.warn(&format!(
            "{} does not match its record (size changed); fetching it again",
            entry.path().display()
        ));
    }
    rep.debug(&format!(
        "image {id}: not cached; asking Glance for its record"
    ));
    let image = retry::with_retries(opts, rep, &format!("image {id}"), || glance.show(id))?;
    rep.debug(&format!(
        "image {id}: {} {} bytes, disk_format {}, status {}",
        image.name.as_deref().map_or("(no name)".into(), printable),
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
    clear_dead_temps(id, &entry, rep)?;
    let converted = entry.converted_path();
    let bar = rep.transfer(id);
    let build = Build {
        cache,
        lock: &lock,
        entry: &entry,
        image: &image,
        opts,
        rep,
        bar: bar.as_ref(),
    };
    let result = build.entry(glance);
    if result.is_err() {
        let _ = fsutil::remove_own(&converted);
    }
    Ok(Fetched {
        id: id.to_owned(),
        path: entry.path(),
        downloaded: true,
        record: Some(result?),
    })
}

/// The entry, if it is in the cache and usable: a regular file whose size is its record's (an
/// entry without a record, made by another tool, is used as it is, with a warning). `None` when
/// it is absent or no longer matches its record (fetched again under the lock). Anything but a
/// regular file at the entry's path is refused, never served and never replaced.
fn cached(id: &str, entry: &Entry<'_>, rep: &dyn Reporter) -> Result<Option<Fetched>> {
    let path = entry.path();
    let Some(meta) = fsutil::stat(&path)? else {
        return Ok(None);
    };
    if !meta.is_file() {
        fsutil::check_not_foreign(&path).with_context(|| format!("image {id}"))?;
    }
    // A record that is not a regular file is refused too, not read as "no record".
    fsutil::check_not_foreign(&entry.record_path()).with_context(|| format!("image {id}"))?;
    let record = entry.read_record();
    match &record {
        None => rep.warn(&format!(
            "{} has no imgcache record (made by another tool?); using it as it is",
            path.display()
        )),
        Some(r) if meta.len() != r.entry_size => return Ok(None),
        Some(_) => {}
    }
    Ok(Some(Fetched {
        id: id.to_owned(),
        path,
        downloaded: false,
        record,
    }))
}

/// `--revalidate`: true if Glance's hash of the image is still the one the entry was made
/// from. If it changed: an error, or with `--replace` the entry is removed under its lock when
/// no instance uses it (false: fetch it anew).
fn still_the_image(
    cache: &Cache,
    glance: &Client,
    entry: &Entry<'_>,
    found: &Fetched,
    opts: &Options,
    rep: &dyn Reporter,
) -> Result<bool> {
    let id = found.id.as_str();
    let Some(record) = &found.record else {
        rep.warn(&format!(
            "image {id}: the entry has no record to revalidate against; using it as it is"
        ));
        return Ok(true);
    };
    let image = retry::with_retries(opts, rep, &format!("image {id}"), || glance.show(id))?;
    let now = verify::hash_value(&image)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if now == record.hash_value {
        return Ok(true);
    }
    if !opts.replace {
        return Err(Error::Changed {
            id: id.to_owned(),
            algo: record.hash_algo.clone(),
            cached: record.hash_value.clone(),
            now,
        }
        .into());
    }
    let usage = crate::scan::scan_usage(cache, &[])?;
    if usage.in_use(entry.name()) {
        let users = usage
            .users
            .get(entry.name())
            .map(|u| u.iter().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "an image resized from it".into());
        return Err(Error::ChangedInUse {
            id: id.to_owned(),
            users,
        }
        .into());
    }
    rep.info(&format!(
        "image {id} changed in Glance ({} {} → {now}); replacing its entry",
        record.hash_algo, record.hash_value
    ));
    let size = record.entry_size;
    entry.remove_under_lock(
        &format!("image {id}"),
        crate::cache::Wait::Up(opts.lock_timeout, rep),
        |m| m.len() == size,
    )?;
    Ok(false)
}

/// Under the entry's locks: the entry's own files are ours, anything else at their paths is
/// refused before a byte is written (never followed, never removed). Nobody that follows either
/// lock protocol is writing them now: a `.converted` is a killed run's and is never resumed; a
/// `.part` another account left (a killed nova-compute's) is removed rather than resumed — its
/// owner could still write into what would become our entry.
fn clear_dead_temps(id: &str, entry: &Entry<'_>, rep: &dyn Reporter) -> Result<()> {
    for path in [
        entry.part_path(),
        entry.converted_path(),
        entry.record_path(),
    ] {
        fsutil::check_not_foreign(&path).with_context(|| format!("image {id}"))?;
    }
    remove(&entry.converted_path())?;
    remove_foreign_part(&entry.part_path(), rep)
}

/// Removes a stale `.part` that belongs to another account (call under the entry's locks).
fn remove_foreign_part(part: &std::path::Path, rep: &dyn Reporter) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(meta) = fsutil::stat(part)? else {
        return Ok(());
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    if meta.is_file() && meta.uid() != unsafe { libc::geteuid() } {
        rep.info(&format!(
            "removing {}: a download another user (uid {}) left and no one is writing (its locks are free)",
            part.display(),
            meta.uid()
        ));
        remove(part)?;
    }
    Ok(())
}

fn remove(path: &std::path::Path) -> Result<()> {
    fsutil::remove_file(path)
        .map(drop)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot remove {}", path.display())))
}

/// One entry being built under its lock.
struct Build<'a> {
    cache: &'a Cache,
    lock: &'a std::cell::RefCell<crate::cache::EntryLock>,
    entry: &'a Entry<'a>,
    image: &'a Image,
    opts: &'a Options,
    rep: &'a dyn Reporter,
    bar: &'a dyn Transfer,
}

impl Build<'_> {
    /// If Nova's lock file was replaced while we downloaded (nova-compute's cache manager
    /// deletes it after removing a base, so a later Nova download locks a new file), take the
    /// new one and re-read the `.part` from disk: a Nova that wrote the same `.part` meanwhile
    /// makes its bytes differ from the stream we hashed. Costs one re-read, only then.
    fn still_undisturbed(
        &self,
        file: &std::fs::File,
        algo: &str,
        expected: &str,
        streaming: bool,
    ) -> Result<()> {
        if self.lock.borrow().nova_is_current() {
            return Ok(());
        }
        let id = self.image.id.as_str();
        if streaming {
            // The conversion during the download may be giving the `.part`'s bytes back: what
            // is on disk cannot be re-read as the stream. Download again, converting after.
            return Err(Error::Redownload {
                id: id.into(),
                why: "Nova's lock file was replaced meanwhile".into(),
            }
            .into());
        }
        self.rep.warn(&format!(
            "image {id}: Nova's lock file {} was replaced while it was held (nova-compute's cache manager removes it); taking the new one and re-reading the download",
            self.lock.borrow().nova_path().display()
        ));
        self.lock.borrow_mut().retake_nova(
            &format!("image {id}"),
            self.opts.lock_timeout,
            self.rep,
        )?;
        let got = hash::hash_file(file, algo)?;
        if got != expected {
            return Err(Error::Hash {
                id: id.to_owned(),
                algo: algo.to_owned(),
                expected: expected.to_owned(),
                got,
            }
            .into());
        }
        Ok(())
    }

    /// Downloads, verifies, inspects, converts and persists the entry. On failure the `.part`
    /// is removed: within a run retries already resume, and only a killed process leaves a
    /// `.part`, which the next run resumes.
    fn entry(&self, glance: &Client) -> Result<Record> {
        match self.entry_with(glance, true) {
            Err(e) if matches!(e.downcast_ref::<Error>(), Some(Error::Redownload { .. })) => {
                self.rep.warn(&format!("{e:#}"));
                self.entry_with(glance, false)
            }
            r => r,
        }
    }

    /// [`Self::entry`], with or without the conversion during the download.
    fn entry_with(&self, glance: &Client, streaming: bool) -> Result<Record> {
        let id = self.image.id.as_str();
        let part = self.entry.part_path();
        let (algo, expected) = verify::hash_spec(self.image)?;
        let check = self.signature_check()?;
        let signed = check.as_ref().map(signed::Check::digest);
        self.bar.set_length(self.image.size);
        self.bar.stage("downloading");
        let started = std::time::Instant::now();
        let mut stream = None;
        let received = match download::direct_file(self.image, self.opts, self.rep) {
            Some(src) => {
                let limit = self.image.size.unwrap_or(self.opts.max_image_size);
                download::download_direct(&src, &part, (&algo, signed), limit, self.rep, self.bar)
            }
            None => download::open_part(&part).and_then(|file| {
                stream = streaming
                    .then(|| stream::Stream::start(self, &file))
                    .flatten();
                download::Download {
                    glance,
                    image: self.image,
                    part: &part,
                    opts: self.opts,
                    rep: self.rep,
                    bar: self.bar,
                    signed,
                    follow: stream.as_ref().map(stream::Stream::mark),
                }
                .run(file, &algo)
            }),
        };
        let (size, digest, file) = match received {
            Ok(v) => v,
            Err(e) => {
                drop(stream);
                let _ = fsutil::remove_own(&part);
                return Err(e);
            }
        };
        if let Some(s) = &stream {
            s.mark().complete();
        }
        let secs = started.elapsed().as_secs_f64();
        self.rep.debug(&format!(
            "image {id}: {size} bytes downloaded and hashed ({algo}) in {secs:.2}s ({:.0} MiB/s)",
            size as f64 / secs.max(1e-9) / f64::from(1u32 << 20)
        ));
        let verified = verify::verify(self.image, size, &algo, &expected, &digest.glance)
            .and_then(|()| self.still_undisturbed(&file, &algo, &expected, stream.is_some()))
            .and_then(|()| check.map_or(Ok(()), |c| c.verify(id, &digest)))
            .and_then(|()| self.inspect_and_persist(&file, &algo, size, &digest.content, stream));
        if verified.is_err() {
            let _ = fsutil::remove_own(&part);
        }
        let record = verified?;
        self.rep.debug(&format!(
            "image {id}: cached as {}",
            self.entry.path().display()
        ));
        Ok(record)
    }
}

impl Build<'_> {
    /// `--verify-signatures`: the image's signature properties and certificate, checked before
    /// the download. Any failure here removes a `.part` a killed run left too: the cache keeps
    /// nothing of an image it could not verify.
    fn signature_check(&self) -> Result<Option<signed::Check>> {
        let Some(policy) = &self.opts.signatures else {
            return Ok(None);
        };
        signed::Check::prepare(self.image, policy, self.rep)
            .map(Some)
            .inspect_err(|_| {
                let _ = fsutil::remove_own(&self.entry.part_path());
            })
    }
}
