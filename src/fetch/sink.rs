//! Writing the download stream into the `.part`: all-zero 4 KiB blocks become holes (a raw
//! image is often mostly zeros, and its entry then costs its data, not its virtual size), and
//! the writeback of what was written starts while the download goes on, so the fsync before
//! the rename has little left to do. The hash thread still sees every byte; only the file is
//! sparse.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use crate::fsutil::{BLOCK, is_zero_block as is_zero};

/// Writeback is started for every 16 MiB written, and waited for one window later.
const WINDOW: u64 = 16 << 20;

/// The writer of one pass over the body (an attempt, or the direct copy).
///
/// It relies on what the download loop guarantees: the file's cursor is at the stream offset
/// `pos`, and the file holds nothing at or after `pos` (it only ever grows at its end, and a
/// restart truncates it), so a skipped block reads as zeros — the bytes it stands for. A
/// `.part` left by a killed run is re-hashed from disk on resume, holes included, and may be
/// shorter than what was streamed before the kill (a skipped tail not yet made part of the
/// length); the resume then starts from its real length.
pub struct Sink {
    /// Start early writeback (not for a `.part` that will be converted and deleted).
    writeback: bool,
    /// Writeback was started up to here.
    started: u64,
    /// Writeback was waited for up to here.
    waited: u64,
}

impl Sink {
    /// A writer starting at stream offset `pos` (the file's cursor).
    pub fn new(pos: u64, writeback: bool) -> Sink {
        Sink {
            writeback,
            started: pos,
            waited: pos,
        }
    }

    /// Writes `buf`, the stream's bytes at `pos`, leaving holes for its all-zero blocks. Runs of
    /// data blocks are one write and runs of zero blocks one seek.
    pub fn write(&mut self, file: &mut File, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut run_start = 0;
        let mut run_zero = None;
        let mut i = 0;
        while i < buf.len() {
            let at = pos + i as u64;
            let to_boundary = (BLOCK - at % BLOCK) as usize;
            let end = (i + to_boundary).min(buf.len());
            let zero = is_zero(&buf[i..end]);
            if run_zero.is_some_and(|z| z != zero) {
                put(file, &buf[run_start..i], run_zero == Some(true))?;
                run_start = i;
            }
            run_zero = Some(zero);
            i = end;
        }
        put(file, &buf[run_start..], run_zero == Some(true))?;
        self.write_back(file, pos + buf.len() as u64);
        Ok(())
    }

    /// Makes the file `pos` bytes long: a body that ends in zeros ends in a hole, which only
    /// the length makes part of the file. Call it whenever the pass stops.
    pub fn finish(&self, file: &File, pos: u64) -> io::Result<()> {
        if file.metadata()?.len() < pos {
            file.set_len(pos)?;
        }
        Ok(())
    }

    /// Starts writeback of the window just written and waits for the one before it. Without
    /// this the kernel keeps the whole image dirty until its thresholds are hit, and the fsync
    /// before the rename then writes most of the image after the download ended; with it the
    /// disk writes while the network and the hash work, dirty memory stays near two windows,
    /// and the final fsync has at most the last ones left. The wait is on a window whose
    /// writeback started one window earlier, so it rarely blocks unless the disk is the
    /// bottleneck (where the fsync would have waited anyway). sync_file_range guarantees
    /// nothing about durability (no metadata, no disk cache flush): the fsync still does; its
    /// errors are therefore ignored here, and a failing disk reports at that fsync.
    fn write_back(&mut self, file: &File, end: u64) {
        if !self.writeback || end - self.started < WINDOW {
            return;
        }
        let fd = file.as_raw_fd();
        let range = |from: u64, to: u64, flags: libc::c_uint| {
            let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
                return;
            };
            // SAFETY: sync_file_range on a descriptor `file` keeps open; no memory is passed.
            unsafe { libc::sync_file_range(fd, off, len, flags) };
        };
        range(self.started, end, libc::SYNC_FILE_RANGE_WRITE);
        if self.waited < self.started {
            range(
                self.waited,
                self.started,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            self.waited = self.started;
        }
        self.started = end;
    }
}

/// Writes `bytes` at the cursor, or moves the cursor over them when they are zeros.
fn put(file: &mut File, bytes: &[u8], zero: bool) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    if zero {
        let n = i64::try_from(bytes.len()).map_err(io::Error::other)?;
        file.seek(SeekFrom::Current(n)).map(drop)
    } else {
        file.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn stream(chunks: &[&[u8]], start: u64) -> (File, Vec<u8>) {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(start).unwrap();
        f.seek(SeekFrom::Start(start)).unwrap();
        let mut sink = Sink::new(start, true);
        let mut pos = start;
        let mut all = vec![0u8; start as usize];
        for c in chunks {
            sink.write(&mut f, c, pos).unwrap();
            pos += c.len() as u64;
            all.extend_from_slice(c);
        }
        sink.finish(&f, pos).unwrap();
        (f, all)
    }

    fn read_all(f: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn zero_blocks_become_holes_and_content_is_unchanged() {
        let mut a = vec![0u8; 1 << 20];
        a[5000] = 1; // block 1
        a[(512 << 10) + 17] = 2;
        let tail = vec![0u8; 3 << 20]; // ends in zeros: only the length keeps them
        let odd = [7u8; 100]; // unaligned data after an unaligned resume point
        let (f, all) = stream(&[&a, &odd, &tail], 0);
        assert_eq!(read_all(&f), all);
        assert!(f.metadata().unwrap().blocks() * 512 <= 64 << 10);
        let (f, all) = stream(&[&odd, &a, &tail, &odd], 12345);
        assert_eq!(read_all(&f), all);
    }

    #[test]
    fn data_runs_are_written_whole() {
        let data: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
        let (f, all) = stream(&[&data[..7], &data[7..]], 0);
        assert_eq!(read_all(&f), all);
        assert!(f.metadata().unwrap().blocks() * 512 >= 40 << 20);
    }
}
