//! From a verified `.part` to a cache entry: inspect it (native inspector first, qemu-img's
//! opinion second), convert it to raw if asked, then write the record and rename the entry into
//! place — record first, so a crash never leaves an entry without its record.

use std::fs::File;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::stream::{Failed, Stream};
use super::verify::{check_space, hash_value, second_opinion, space_watch};
use super::{Build, Error};
use crate::cache::Record;
use crate::fsutil;
use crate::inspect::{self, Format};
use crate::qemu_img;
use crate::units;

/// What becomes the entry: the open file, where it is, its format and its content digest.
struct Made<'f> {
    file: MadeFile<'f>,
    path: PathBuf,
    format: String,
    content: String,
}

/// The verified `.part` itself, or the conversion's output.
enum MadeFile<'f> {
    Part(&'f File),
    Converted(File),
}

impl MadeFile<'_> {
    fn get(&self) -> &File {
        match self {
            MadeFile::Part(f) => f,
            MadeFile::Converted(f) => f,
        }
    }
}

impl Build<'_> {
    /// Inspects the verified `.part` (through the descriptor the download wrote, so what was
    /// verified is what is inspected and kept), converts it if asked, and persists entry and
    /// record.
    pub(super) fn inspect_and_persist(
        &self,
        part_file: &File,
        algo: &str,
        size: u64,
        content_digest: &str,
        stream: Option<Stream>,
    ) -> Result<Record> {
        let part = self.entry.part_path();
        self.bar.stage("inspecting");
        let (report, info) = self.inspect(part_file)?;
        let convert = self.opts.force_raw && report.format.qemu_name() != "raw";
        let made = if convert {
            match self.streamed(stream, &info)? {
                Some(made) => made,
                None => self.convert(part_file, size, &report, &info)?,
            }
        } else {
            drop(stream);
            Made {
                file: MadeFile::Part(part_file),
                path: part.clone(),
                format: report.format.qemu_name().to_owned(),
                content: content_digest.to_owned(),
            }
        };
        let entry_size = made
            .file
            .get()
            .metadata()
            .with_context(|| format!("cannot stat {}", made.path.display()))?
            .len();
        let (now, stamp) = units::now_stamp();
        let image = self.image;
        let record = Record {
            image_id: image.id.clone(),
            name: image.name.clone(),
            disk_format: image.disk_format.clone(),
            container_format: image.container_format.clone(),
            source_format: report.format.name().to_owned(),
            format: made.format,
            source_size: size,
            hash_algo: algo.to_owned(),
            hash_value: hash_value(image).unwrap_or_default().to_ascii_lowercase(),
            virtual_size: info.virtual_size,
            entry_size,
            content_xxh3: made.content,
            fetched_at: stamp,
            fetched_at_unix: now,
            properties: image.properties(),
            signature_certificate: self.signature_certificate(),
        };
        // Record first, entry second: a crash in between leaves a record without an entry,
        // which is ignored and overwritten, never an entry without its record.
        self.entry.write_record(&record)?;
        fsutil::persist(made.file.get(), &made.path, &self.entry.path())
            .with_context(|| format!("cannot move {} into place", made.path.display()))?;
        if convert {
            fsutil::remove_own(&part)
                .with_context(|| format!("cannot remove {}", part.display()))?;
        }
        Ok(record)
    }

    /// The inspector's verdict on the `.part`, with qemu-img's agreement.
    fn inspect(&self, part_file: &File) -> Result<(inspect::Report, qemu_img::Info)> {
        let part = self.entry.part_path();
        let declared =
            Format::from_disk_format(self.image.disk_format.as_deref().unwrap_or("raw"))?;
        let report = inspect::inspect_file(part_file, &part, &self.opts.limits)?;
        inspect::check_declared(declared, report.format)?;
        let info = qemu_img::info_file(part_file, &part, report.format.qemu_name())?;
        second_opinion(&report, &info)?;
        self.rep.debug(&format!(
            "image {}: inspected as {}, virtual size {} bytes; qemu-img agrees",
            self.image.id,
            report.format.name(),
            info.virtual_size
        ));
        Ok((report, info))
    }

    /// The conversion made during the download, if it saw the whole `.part` and agrees with
    /// qemu-img on the virtual size; `None` (nothing left of it) sends the `.part` to
    /// [`Self::convert`].
    fn streamed(&self, stream: Option<Stream>, info: &qemu_img::Info) -> Result<Option<Made<'_>>> {
        let Some(stream) = stream else {
            return Ok(None);
        };
        let id = self.image.id.as_str();
        self.bar.stage("converting");
        let made = match stream.finish() {
            Ok(made) => made,
            Err(Failed {
                why,
                no_space: true,
                ..
            }) => return Err(Error::ConversionStopped { id: id.into(), why }.into()),
            Err(Failed {
                why,
                released: true,
                ..
            }) => return Err(Error::Redownload { id: id.into(), why }.into()),
            Err(Failed { why, .. }) => {
                self.rep
                    .debug(&format!("image {id}: converting after the download: {why}"));
                return Ok(None);
            }
        };
        if made.virtual_size != info.virtual_size {
            fsutil::remove_own(&made.path)
                .with_context(|| format!("cannot remove {}", made.path.display()))?;
            let why = format!(
                "converted to {} bytes, qemu-img says {}",
                made.virtual_size, info.virtual_size
            );
            if made.done.released > 0 {
                return Err(Error::Redownload { id: id.into(), why }.into());
            }
            self.rep
                .debug(&format!("image {id}: {why}; converting again"));
            return Ok(None);
        }
        self.rep.debug(&format!(
            "image {id}: converted qcow2 to raw during the download ({} clusters, {} compressed, {} MiB of the download given back; done {:.2}s after it started)",
            made.done.clusters,
            made.done.compressed,
            made.done.released >> 20,
            made.secs
        ));
        Ok(Some(Made {
            file: MadeFile::Converted(made.file),
            path: made.path,
            format: "raw".to_owned(),
            content: made.content,
        }))
    }

    /// Converts the `.part` to raw into a new `.converted` and checks the result. qemu-img
    /// reads and writes our descriptors, never the paths.
    fn convert<'f>(
        &self,
        part_file: &'f File,
        size: u64,
        report: &inspect::Report,
        info: &qemu_img::Info,
    ) -> Result<Made<'f>> {
        let id = self.image.id.as_str();
        let base_dir = self.cache.base_dir();
        self.bar.stage("converting");
        let dst = self.entry.converted_path();
        let reserve = check_space(id, base_dir, size, info.virtual_size, self.opts.min_free)?;
        let direct_io = fsutil::direct_io_works(base_dir);
        let out =
            fsutil::create_new(&dst).with_context(|| format!("cannot create {}", dst.display()))?;
        out.set_len(info.virtual_size)
            .with_context(|| format!("cannot size {}", dst.display()))?;
        let started = std::time::Instant::now();
        let from = report.format.qemu_name();
        let watch = space_watch(base_dir, reserve);
        qemu_img::convert_to_raw(part_file, from, &out, &dst, direct_io, &watch)?;
        self.rep.debug(&format!(
            "image {id}: converted {} to raw (-t {}) in {:.2}s",
            report.format.name(),
            if direct_io { "none" } else { "writeback" },
            started.elapsed().as_secs_f64()
        ));
        let converted = qemu_img::info_file(&out, &dst, "raw")?;
        if converted.virtual_size != info.virtual_size {
            return Err(Error::ConvertedSize {
                id: id.to_owned(),
                expected: info.virtual_size,
                got: converted.virtual_size,
            }
            .into());
        }
        let content = crate::digest::of_file(&out)
            .with_context(|| format!("cannot read {}", dst.display()))?;
        Ok(Made {
            file: MadeFile::Converted(out),
            path: dst,
            format: "raw".to_owned(),
            content,
        })
    }
}
