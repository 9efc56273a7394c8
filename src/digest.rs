//! The content digest a record keeps, for `verify` and for comparing copies: XXH3-128 over the
//! content cut into 64 KiB blocks, where a run of all-zero blocks is hashed as its length, not
//! its bytes. A file's holes (SEEK_HOLE) are therefore digested without being read or hashed, so
//! a 200 KB qcow2 that declares 256 GiB costs its data, not 256 GiB of zeros, at fetch and at
//! verify. Written as `zb64k:<32 hex>`; a plain `<32 hex>` is the XXH3-128 of all the bytes,
//! which records written before kept, and is still checked that way.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use xxhash_rust::xxh3::Xxh3;

/// The block the zero-run encoding works on.
pub const BLOCK: usize = 64 << 10;
/// Marks a digest in this module's encoding.
const PREFIX: &str = "zb64k:";

static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// Streams content into the digest (any chunk sizes; blocks are cut here).
pub struct ContentHasher {
    h: Xxh3,
    /// An incomplete block.
    buf: Vec<u8>,
    /// All-zero blocks not hashed yet.
    zero_run: u64,
    total: u64,
}

impl Default for ContentHasher {
    fn default() -> Self {
        ContentHasher::new()
    }
}

impl ContentHasher {
    pub fn new() -> ContentHasher {
        ContentHasher {
            h: Xxh3::new(),
            buf: Vec::with_capacity(BLOCK),
            zero_run: 0,
            total: 0,
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if !self.buf.is_empty() {
            let take = (BLOCK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < BLOCK {
                return;
            }
            let block = std::mem::take(&mut self.buf);
            self.block(&block);
            self.buf = block;
            self.buf.clear();
        }
        let mut blocks = data.chunks_exact(BLOCK);
        for b in blocks.by_ref() {
            self.block(b);
        }
        self.buf.extend_from_slice(blocks.remainder());
    }

    /// Adds `len` zero bytes, without hashing whole zero blocks.
    pub fn zeros(&mut self, mut len: u64) {
        // Up to the next block boundary, as bytes.
        if !self.buf.is_empty() {
            let fill = ((BLOCK - self.buf.len()) as u64).min(len) as usize;
            self.update(&ZEROS[..fill]);
            len -= fill as u64;
        }
        let whole = len / BLOCK as u64;
        self.zero_run += whole;
        self.total += whole * BLOCK as u64;
        self.update(&ZEROS[..(len % BLOCK as u64) as usize]);
    }

    fn block(&mut self, b: &[u8]) {
        if is_zero(b) {
            self.zero_run += 1;
        } else {
            self.flush_run();
            self.h.update(b"D");
            self.h.update(b);
        }
    }

    fn flush_run(&mut self) {
        if self.zero_run > 0 {
            self.h.update(b"Z");
            self.h.update(&self.zero_run.to_le_bytes());
            self.zero_run = 0;
        }
    }

    /// The digest, `zb64k:<32 hex>`.
    pub fn finish(mut self) -> String {
        self.flush_run();
        let tail = std::mem::take(&mut self.buf);
        self.h.update(b"T");
        self.h.update(&tail);
        self.h.update(b"E");
        self.h.update(&self.total.to_le_bytes());
        format!("{PREFIX}{:032x}", self.h.digest128())
    }
}

/// One `memcmp` against zeros (blocks are at most [`BLOCK`]): it stops at the first data byte
/// and runs at memory speed in debug builds too, where a byte loop made a 1 GiB test fetch
/// take seconds.
fn is_zero(b: &[u8]) -> bool {
    ZEROS.get(..b.len()).is_some_and(|z| z == b)
}

/// The digest of a file we hold open, in the format `recorded` is in (this module's, or the
/// plain XXH3-128 older records kept). Reads only the file's data extents.
pub fn of_file_like(file: &File, recorded: &str) -> io::Result<String> {
    if recorded.starts_with(PREFIX) {
        of_file(file)
    } else {
        let h = std::cell::RefCell::new(Xxh3::new());
        walk(
            file,
            &mut |n| feed_zeros(&mut h.borrow_mut(), n),
            &mut |d| h.borrow_mut().update(d),
        )?;
        Ok(format!("{:032x}", h.into_inner().digest128()))
    }
}

/// The digest of a file we hold open (holes are counted, not read).
pub fn of_file(file: &File) -> io::Result<String> {
    let h = std::cell::RefCell::new(ContentHasher::new());
    walk(file, &mut |n| h.borrow_mut().zeros(n), &mut |d| {
        h.borrow_mut().update(d)
    })?;
    Ok(h.into_inner().finish())
}

fn feed_zeros(h: &mut Xxh3, mut n: u64) {
    while n > 0 {
        let k = n.min(BLOCK as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Walks a file's content from the start: `hole(len)` for each hole, `data(bytes)` for the
/// data between (SEEK_DATA / SEEK_HOLE; all data where they are not supported).
fn walk(file: &File, hole: &mut dyn FnMut(u64), data: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    let mut file = file;
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    // lseek(SEEK_DATA / SEEK_HOLE): Ok(offset), or Err(errno).
    let seek = |whence: i32, from: u64| -> Result<u64, i32> {
        let off = i64::try_from(from).map_err(|_| libc::EINVAL)?;
        // SAFETY: lseek on a descriptor that `file` keeps open; no memory is passed.
        let r = unsafe { libc::lseek(fd, off, whence) };
        u64::try_from(r).map_err(|_| io::Error::last_os_error().raw_os_error().unwrap_or(0))
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = match seek(libc::SEEK_DATA, pos) {
            Ok(d) => (d.min(len), seek(libc::SEEK_HOLE, d).unwrap_or(len).min(len)),
            // ENXIO: only a hole from here to the end.
            Err(libc::ENXIO) => (len, len),
            // No SEEK_DATA support here: treat the rest as data.
            Err(_) => (pos, len),
        };
        if start > pos {
            hole(start - pos);
        }
        if start >= len {
            break;
        }
        // SEEK_HOLE always finds a hole after data (at worst the virtual one at EOF).
        let end = end.max(start + 1);
        file.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            data(&buf[..n]);
            left -= n as u64;
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn of_bytes(chunks: &[&[u8]]) -> String {
        let mut h = ContentHasher::new();
        for c in chunks {
            h.update(c);
        }
        h.finish()
    }

    #[test]
    fn chunking_and_zeros_do_not_change_the_digest() {
        let mut data = vec![0u8; 5 * BLOCK + 123];
        data[BLOCK + 7] = 1;
        data[4 * BLOCK + 5] = 9;
        let whole = of_bytes(&[&data]);
        assert_eq!(
            of_bytes(&[
                &data[..1000],
                &data[1000..BLOCK * 3 + 1],
                &data[BLOCK * 3 + 1..]
            ]),
            whole
        );
        let mut h = ContentHasher::new();
        h.update(&data[..BLOCK + 8]);
        h.zeros((3 * BLOCK - 8) as u64 - 3);
        h.update(&data[4 * BLOCK - 3..]);
        assert_eq!(h.finish(), whole);
        assert_ne!(of_bytes(&[&data[..data.len() - 1]]), whole);
        assert!(whole.starts_with(PREFIX));
    }

    #[test]
    fn a_sparse_file_digests_as_its_bytes_and_legacy_digests_still_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"data in the middle").unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(of_file(&f).unwrap(), of_bytes(&[&bytes]));
        let legacy = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes));
        assert_eq!(of_file_like(&f, &legacy).unwrap(), legacy);
    }
}
