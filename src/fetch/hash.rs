//! The hash pipeline of a download: Glance's hash (libcrypto) and the record's content digest
//! (see `crate::digest`), computed on their own thread from the buffers the writer has just written, through
//! a bounded queue of recycled buffers, so hashing overlaps network and disk I/O and the peak
//! memory stays a few MiB.

use std::sync::mpsc;
use std::thread;

use crate::digest::ContentHasher;
use anyhow::{Context, Result};
use openssl::hash::{Hasher, MessageDigest};

/// Chunk size of the download pipeline: large enough for few syscalls, small enough that the
/// few chunks in flight keep the peak RSS low.
pub const CHUNK: usize = 1 << 20;
/// Chunks queued between the writer and the hasher.
const QUEUE: usize = 4;

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

/// The hash a signature was made over (`img_signature_hash_method`).
struct SignedHash {
    md: MessageDigest,
    hasher: Hasher,
}

impl SignedHash {
    fn new(md: MessageDigest) -> Result<SignedHash, openssl::error::ErrorStack> {
        Ok(SignedHash {
            md,
            hasher: Hasher::new(md)?,
        })
    }
}

/// Message from the writer to the hashing thread.
pub enum ToHasher {
    Data(Vec<u8>),
    /// The download starts over from byte 0.
    Reset,
}

/// Glance's hash of a whole file, read from its start through our descriptor.
pub fn hash_file(file: &std::fs::File, algo: &str) -> Result<String> {
    use std::os::unix::fs::FileExt;
    let mut h = GlanceHash::new(algo).ok_or_else(|| anyhow::anyhow!("unsupported hash {algo}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = file.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n])?;
        off += n as u64;
    }
    Ok(h.finish_hex()?)
}

/// The digests of a download: Glance's algorithm, the content digest the record keeps, and
/// (with `--verify-signatures`) the digest the image's signature was made over.
pub struct Digests {
    pub glance: String,
    pub content: String,
    pub signed: Option<Vec<u8>>,
}

/// Hashes on its own thread what the writer sends.
pub struct HashThread {
    tx: Option<mpsc::SyncSender<ToHasher>>,
    free: mpsc::Receiver<Vec<u8>>,
    handle: Option<thread::JoinHandle<Result<Digests, openssl::error::ErrorStack>>>,
}

impl HashThread {
    /// Starts the thread for Glance's algorithm `algo` and, when `signed` is given, the
    /// signature's hash too: both see every buffer, so the data is read once.
    pub fn start_signed(algo: &str, signed: Option<MessageDigest>) -> Result<HashThread> {
        let mut hasher = GlanceHash::new(algo).context("unsupported hash algorithm")?;
        let mut signed = match signed {
            Some(md) => Some(SignedHash::new(md)?),
            None => None,
        };
        let (tx, rx) = mpsc::sync_channel::<ToHasher>(QUEUE);
        let (free_tx, free) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("hash".into())
            .spawn(move || {
                // The content digest costs ~1/20 of sha512; the record keeps it for `verify`.
                let mut content = ContentHasher::new();
                for msg in rx {
                    match msg {
                        ToHasher::Data(buf) => {
                            hasher.update(&buf)?;
                            content.update(&buf);
                            if let Some(s) = signed.as_mut() {
                                s.hasher.update(&buf)?;
                            }
                            let _ = free_tx.send(buf);
                        }
                        ToHasher::Reset => {
                            hasher.reset()?;
                            content = ContentHasher::new();
                            if let Some(s) = signed.as_mut() {
                                *s = SignedHash::new(s.md)?;
                            }
                        }
                    }
                }
                Ok(Digests {
                    glance: hasher.finish_hex()?,
                    content: content.finish(),
                    signed: match signed {
                        Some(mut s) => Some(s.hasher.finish()?.to_vec()),
                        None => None,
                    },
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
    pub fn buffer(&self) -> Vec<u8> {
        let mut buf = self.free.try_recv().unwrap_or_default();
        buf.clear();
        buf.reserve(CHUNK);
        buf
    }

    /// Hands the thread a buffer (or a reset). Fails only if the thread has stopped.
    pub fn send(&self, msg: ToHasher) -> Result<()> {
        self.tx
            .as_ref()
            .context("hashing thread already finished")?
            .send(msg)
            .map_err(|_| anyhow::anyhow!("the hashing thread stopped"))
    }

    /// Waits for the thread and returns the digests of everything sent since the last reset.
    pub fn finish(mut self) -> Result<Digests> {
        drop(self.tx.take());
        self.handle
            .take()
            .context("hashing thread already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("the hashing thread panicked"))?
            .context("hashing failed in libcrypto")
    }
}
