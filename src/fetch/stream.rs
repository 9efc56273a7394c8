//! Conversion inside the download: for a qcow2 image fetched as raw, a thread converts the
//! `.part` into `<entry>.converted` while the download is still writing it (see
//! `crate::qcow2_read`), so the conversion costs little more than the download.
//!
//! Before the first byte is written, the native inspector gives its verdict on the header the
//! download has brought so far (the rest of the file is not there yet: the complete inspection,
//! qemu-img's second opinion and the hash still run on the complete `.part` before the entry is
//! committed, as for every fetch). The result is used only when the conversion saw the whole
//! file without meeting anything it does not handle; otherwise the `.converted` is removed and
//! `persist` converts the complete `.part` with `qemu-img convert`, as it always did.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use super::Build;
use super::prefix;
use super::verify::{check_space, space_watch};
use crate::fsutil;
use crate::inspect::{self, Format, Source};
use crate::qcow2_read::{self, Growing};

/// How much of the stream the header verdict waits for: the header, its extensions and the
/// backing file name live in the first cluster, 64 KiB by default.
const HEAD: u64 = 64 << 10;
/// The first and last this many bytes of the `.part` are never given back: the complete
/// inspection after the download reads them (the header, and the signatures of other formats
/// at the start and at the end of the file).
const KEEP: u64 = 1 << 20;

/// How far the download has written the `.part`, for a reader that follows it.
#[derive(Default)]
pub struct Watermark {
    state: Mutex<Mark>,
    cv: Condvar,
}

#[derive(Default)]
struct Mark {
    written: u64,
    /// `Some(Ok)` once the download completed, `Some(Err)` once it stopped or restarted.
    end: Option<Result<(), String>>,
    /// The download started the `.part` over: whatever was given back is gone with it.
    restarted: bool,
}

impl Watermark {
    fn lock(&self) -> MutexGuard<'_, Mark> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's bytes before `pos` are in the file.
    pub fn written(&self, pos: u64) {
        let mut m = self.lock();
        m.written = m.written.max(pos);
        self.cv.notify_all();
    }

    /// The download is about to start the `.part` over (truncate it). Once this returns, no
    /// bytes of the `.part` are given back any more (see `Follow::punch`).
    pub fn restart(&self) {
        self.end(Err("the download started over".into()), true);
    }

    /// The file will not grow on from here as one stream (the download failed).
    pub fn stop(&self, why: &str) {
        self.end(Err(why.to_owned()), false);
    }

    /// The download is complete: what is written is the whole file.
    pub fn complete(&self) {
        self.end(Ok(()), false);
    }

    /// The first end wins; waiters wake.
    fn end(&self, end: Result<(), String>, restarted: bool) {
        let mut m = self.lock();
        m.restarted |= restarted;
        m.end.get_or_insert(end);
        self.cv.notify_all();
    }
}

impl Growing for Watermark {
    fn wait_for(&self, end: u64) -> Result<u64, qcow2_read::Error> {
        let mut m = self.lock();
        loop {
            if m.written >= end {
                return Ok(end);
            }
            match &m.end {
                Some(Ok(())) => return Ok(m.written),
                Some(Err(why)) => return Err(qcow2_read::Error::Stopped(why.clone())),
                None => m = self.cv.wait(m).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// What the thread made.
pub(super) struct Streamed {
    pub file: File,
    pub path: PathBuf,
    pub virtual_size: u64,
    pub done: qcow2_read::Done,
    /// The content digest of the raw image (see `crate::digest`).
    pub content: String,
    pub secs: f64,
}

/// Why the thread made nothing; `released`: it had given bytes of the `.part` back, so the
/// `.part` is no longer the image and the fetch must download it again.
pub(super) struct Failed {
    pub why: String,
    pub released: bool,
    /// The free space fell to the `--min-free` reserve: the fetch fails as a conversion by
    /// qemu-img would.
    pub no_space: bool,
}

/// Why the thread stopped.
struct Stop {
    why: String,
    no_space: bool,
}

impl From<String> for Stop {
    fn from(why: String) -> Stop {
        Stop {
            why,
            no_space: false,
        }
    }
}

/// The converting thread of one download.
pub(super) struct Stream {
    mark: Arc<Watermark>,
    released: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Result<Streamed, Stop>>>,
}

/// The `.part` as the converter sees it: growing with the download, and giving converted bytes
/// back (hole-punched) between the kept head and tail — after it is marked as never to be
/// resumed.
struct Follow<'a> {
    mark: &'a Watermark,
    part: &'a File,
    allowed: Range<u64>,
    released: &'a AtomicBool,
}

impl Growing for Follow<'_> {
    fn wait_for(&self, end: u64) -> Result<u64, qcow2_read::Error> {
        self.mark.wait_for(end)
    }

    fn releasable(&self) -> Range<u64> {
        self.allowed.clone()
    }

    /// Under the watermark's lock, and only while the download goes on: a download that starts
    /// over takes that lock first (`Watermark::restart`), so no hole lands in its new bytes.
    fn punch(&self, src: &File, from: u64, to: u64) -> Result<bool, qcow2_read::Error> {
        let m = self.mark.lock();
        if matches!(m.end, Some(Err(_))) {
            return Ok(false);
        }
        qcow2_read::punch_hole(src, from, to)?;
        drop(m);
        Ok(true)
    }

    fn releasing(&self) -> bool {
        // An empty complete prefix (see `prefix`): a run that resumes this `.part` after a kill
        // starts it over instead of trusting bytes that are now holes.
        if prefix::record_prefix(self.part, 0).is_err() {
            return false;
        }
        self.released.store(true, Ordering::SeqCst);
        true
    }
}

/// What the thread needs from the build (owned: the thread outlives no borrow).
struct Job {
    id: String,
    declared_len: u64,
    /// Where converted bytes of the `.part` may be given back.
    releasable: Range<u64>,
    dst: PathBuf,
    base_dir: PathBuf,
    min_free: crate::units::Reserve,
    limits: inspect::Limits,
}

impl Stream {
    /// Starts converting `part` as it is written, when the image is a qcow2 fetched as raw over
    /// one connection (parallel ranges fill the file out of order), unless
    /// `IMGCACHE_CONVERTER=qemu-img` leaves every conversion to qemu-img after the download.
    pub fn start(build: &Build<'_>, part: &File) -> Option<Stream> {
        let image = build.image;
        let qcow2 = image.disk_format.as_deref() == Some("qcow2");
        if !build.opts.force_raw || !qcow2 || build.opts.connections > 1 {
            return None;
        }
        if std::env::var_os("IMGCACHE_CONVERTER").is_some_and(|v| v == "qemu-img") {
            build
                .rep
                .debug("IMGCACHE_CONVERTER=qemu-img: converting after the download");
            return None;
        }
        let part = part.try_clone().ok()?;
        // Only a size Glance states bounds the kept tail.
        let releasable = image
            .size
            .map_or(0..0, |size| KEEP..size.saturating_sub(KEEP));
        let job = Job {
            id: image.id.clone(),
            declared_len: image.size.unwrap_or(build.opts.max_image_size),
            releasable,
            dst: build.entry.converted_path(),
            base_dir: build.cache.base_dir().to_path_buf(),
            min_free: build.opts.min_free,
            limits: build.opts.limits,
        };
        let mark = Arc::new(Watermark::default());
        let released = Arc::new(AtomicBool::new(false));
        let (follow, gave_back) = (mark.clone(), released.clone());
        let handle = thread::Builder::new()
            .name("convert".into())
            .spawn(move || job.run(&part, &follow, &gave_back))
            .ok()?;
        Some(Stream {
            mark,
            released,
            handle: Some(handle),
        })
    }

    /// True once the converter has begun giving bytes of the `.part` back.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    pub fn mark(&self) -> &Watermark {
        &self.mark
    }

    /// Waits for the thread (the download must have completed or stopped). `Err` says why the
    /// conversion did not happen here; nothing of it is left then.
    pub fn finish(mut self) -> Result<Streamed, Failed> {
        let handle = self.handle.take();
        let result = handle.map_or(Err(Stop::from("not started".to_owned())), |h| {
            h.join()
                .unwrap_or_else(|_| Err(Stop::from("the converting thread failed".to_owned())))
        });
        // Bytes given back before the download started over went with the old `.part`.
        let released = self.released() && !self.mark.lock().restarted;
        result.map_err(|stop| Failed {
            why: stop.why,
            released,
            no_space: stop.no_space,
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.mark.stop("the fetch ended");
        if let Some(h) = self.handle.take()
            && let Ok(Ok(made)) = h.join()
        {
            let _ = fsutil::remove_own(&made.path);
        }
    }
}

impl Job {
    fn run(self, part: &File, mark: &Watermark, released: &AtomicBool) -> Result<Streamed, Stop> {
        let started = Instant::now();
        let header = self.verdict(part, mark)?;
        let virtual_size = header.virtual_size;
        let reserve = check_space(
            &self.id,
            &self.base_dir,
            self.declared_len,
            virtual_size,
            self.min_free,
        )
        .map_err(|e| format!("{e:#}"))?;
        let out = fsutil::create_new(&self.dst)
            .map_err(|e| format!("cannot create {}: {e}", self.dst.display()))?;
        let space = space_watch(&self.base_dir, reserve);
        let ran_out = AtomicBool::new(false);
        let watch = || space().inspect(|_| ran_out.store(true, Ordering::SeqCst));
        let converted = out
            .set_len(virtual_size)
            .map_err(qcow2_read::Error::from)
            .and_then(|()| {
                let follow = Follow {
                    mark,
                    part,
                    allowed: self.releasable.clone(),
                    released,
                };
                qcow2_read::convert(part, &follow, &out, &watch)
            });
        // The content digest and the data's way to the disk, here: the fetch's own thread is
        // meanwhile inspecting the complete `.part`.
        let finished = converted.and_then(|done| {
            let content = match &done.content {
                Some(c) => c.clone(),
                None => crate::digest::of_file(&out)?,
            };
            out.sync_data()?;
            Ok((done, content))
        });
        match finished {
            Ok((done, content)) => Ok(Streamed {
                file: out,
                path: self.dst,
                virtual_size,
                done,
                content,
                secs: started.elapsed().as_secs_f64(),
            }),
            Err(e) => {
                drop(out);
                let _ = fsutil::remove_own(&self.dst);
                Err(Stop {
                    why: e.to_string(),
                    no_space: ran_out.load(Ordering::SeqCst),
                })
            }
        }
    }

    /// The native inspector on the first [`HEAD`] bytes, read as the start of a file of the
    /// declared length: it must be a qcow2 the inspector accepts.
    fn verdict(&self, part: &File, mark: &Watermark) -> Result<qcow2_read::Header, String> {
        let want = HEAD.min(self.declared_len);
        let have = mark.wait_for(want).map_err(|e| e.to_string())?;
        let mut head = vec![0u8; usize::try_from(have).map_err(|e| e.to_string())?];
        let n = part.read_at(&mut head, 0).map_err(|e| e.to_string())?;
        // A short read is a hole the download left: zeros.
        head[n..].fill(0);
        let src = Source::from_prefix(&head, self.declared_len);
        let report = inspect::inspect(&src, &self.limits).map_err(|e| e.to_string())?;
        if report.format != Format::Qcow2 {
            return Err(format!("the header reads as {}", report.format.name()));
        }
        qcow2_read::Header::parse(&head).map_err(|e| e.to_string())
    }
}
