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
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use super::Build;
use super::verify::{check_space, space_watch};
use crate::fsutil;
use crate::inspect::{self, Format, Source};
use crate::qcow2_read::{self, Growing};

/// How much of the stream the header verdict waits for: the header, its extensions and the
/// backing file name live in the first cluster, 64 KiB by default.
const HEAD: u64 = 64 << 10;

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

    /// The download is complete: what is written is the whole file.
    pub fn complete(&self) {
        let mut m = self.lock();
        m.end.get_or_insert(Ok(()));
        self.cv.notify_all();
    }

    /// The file will not grow on from here as one stream (the download failed or started over).
    pub fn stop(&self, why: &str) {
        let mut m = self.lock();
        if m.end.is_none() {
            m.end = Some(Err(why.to_owned()));
        }
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

/// The converting thread of one download.
pub(super) struct Stream {
    mark: Arc<Watermark>,
    handle: Option<thread::JoinHandle<Result<Streamed, String>>>,
}

/// What the thread needs from the build (owned: the thread outlives no borrow).
struct Job {
    id: String,
    declared_len: u64,
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
        let job = Job {
            id: image.id.clone(),
            declared_len: image.size.unwrap_or(build.opts.max_image_size),
            dst: build.entry.converted_path(),
            base_dir: build.cache.base_dir().to_path_buf(),
            min_free: build.opts.min_free,
            limits: build.opts.limits,
        };
        let mark = Arc::new(Watermark::default());
        let follow = mark.clone();
        let handle = thread::Builder::new()
            .name("convert".into())
            .spawn(move || job.run(&part, &follow))
            .ok()?;
        Some(Stream {
            mark,
            handle: Some(handle),
        })
    }

    pub fn mark(&self) -> &Watermark {
        &self.mark
    }

    /// Waits for the thread (the download must have completed or stopped). `Err` says why the
    /// conversion did not happen here; nothing of it is left then.
    pub fn finish(mut self) -> Result<Streamed, String> {
        let handle = self.handle.take();
        handle.map_or(Err("not started".into()), |h| {
            h.join()
                .unwrap_or_else(|_| Err("the converting thread failed".into()))
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
    fn run(self, part: &File, mark: &Watermark) -> Result<Streamed, String> {
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
        let watch = space_watch(&self.base_dir, reserve);
        let converted = out
            .set_len(virtual_size)
            .map_err(qcow2_read::Error::from)
            .and_then(|()| qcow2_read::convert(part, mark, &out, &watch));
        // The content digest and the data's way to the disk, here: the fetch's own thread is
        // meanwhile inspecting the complete `.part`.
        let finished = converted.and_then(|done| {
            let content = crate::digest::of_file(&out)?;
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
                Err(e.to_string())
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
