//! Bounded reads of an image, from a file or from memory, counting every byte read so tests can
//! prove the inspector never reads more than a fixed amount whatever the image size.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Error;

enum Backing<'a> {
    File(&'a File),
    Mem(&'a [u8]),
}

/// Where the inspector reads from.
pub struct Source<'a> {
    backing: Backing<'a>,
    len: u64,
    read: Cell<u64>,
}

impl<'a> Source<'a> {
    /// Wraps an open file.
    pub fn new(file: &'a File) -> std::io::Result<Source<'a>> {
        Ok(Source {
            len: file.metadata()?.len(),
            backing: Backing::File(file),
            read: Cell::new(0),
        })
    }

    /// Wraps bytes in memory (fuzzing, stream prefixes).
    pub fn from_bytes(bytes: &'a [u8]) -> Source<'a> {
        Source {
            len: bytes.len() as u64,
            backing: Backing::Mem(bytes),
            read: Cell::new(0),
        }
    }

    /// The first bytes of a file of `len` bytes that is still arriving: reads past them come
    /// back empty, as past the end of a file.
    pub fn from_prefix(bytes: &'a [u8], len: u64) -> Source<'a> {
        Source {
            len: len.max(bytes.len() as u64),
            backing: Backing::Mem(bytes),
            read: Cell::new(0),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.get()
    }

    /// Reads up to `n` bytes at `offset`; short at the end, empty past it.
    pub fn read(&self, offset: u64, n: usize) -> Result<Vec<u8>, Error> {
        if offset >= self.len {
            return Ok(Vec::new());
        }
        let n = n.min(usize::try_from(self.len - offset).unwrap_or(usize::MAX));
        let out = match self.backing {
            Backing::Mem(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                b[start..start.saturating_add(n).min(b.len())].to_vec()
            }
            Backing::File(f) => {
                let mut buf = vec![0u8; n];
                let mut done = 0;
                while done < n {
                    match f.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(k) => done += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::Io(e.to_string())),
                    }
                }
                buf.truncate(done);
                buf
            }
        };
        self.read.set(self.read.get() + out.len() as u64);
        Ok(out)
    }
}
