//! Error kinds and the exit codes they map to, I/O error classification and the one error-chain
//! formatter. Ground floor: imports nothing of ours. Library modules keep their own typed errors,
//! each with a `kind()` method; `commands::kind_of` walks a chain to find the first kind it knows.

use std::fmt;

/// What went wrong, as far as the exit code is concerned. The numbers are part of the interface:
/// scripts and cron jobs branch on them (see docs/usage.md and `imgcache --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Anything without a more specific code (an I/O error on the cache, a bug).
    Other,
    /// Bad command line or settings: an invalid image id, an unknown flag, a malformed URL.
    Usage,
    /// Glance answered 404 for the image.
    NotFound,
    /// The image exists but has no usable data: not `active`, or Glance answered 204 "no data".
    NotUsable,
    /// The image failed a safety check and was not handed to qemu-img (or qemu-img disagreed).
    Refused,
    /// The bytes do not match Glance's size or hash.
    Integrity,
    /// Glance could not be reached or kept failing after every retry.
    Unavailable,
    /// Another process held the entry's lock past `--lock-timeout`.
    LockTimeout,
    /// Not enough free space in the cache filesystem.
    NoSpace,
    /// Glance refused the credentials (401/403).
    Auth,
    /// An external tool (qemu-img, mkfs) is missing or failed.
    Tool,
    /// An instance disk already exists and differs from the request (see `--force`).
    Conflict,
    /// The cache (or instance) directory cannot be written: read-only filesystem, permissions.
    NotWritable,
    /// Something that is not ours to trust sits where the cache expects a regular file of its own
    /// (a symlink, FIFO, device or directory): refused, never followed, never deleted.
    Untrusted,
    /// Glance (or Keystone) answered with something that is not its API: a malformed record.
    Protocol,
    /// `--verify-signatures`: the image's signature or its certificate was refused.
    Signature,
    /// `list`, `prune`, `verify`: the instances path does not exist (a typo in a cron line);
    /// `--allow-missing` treats it as empty.
    NoInstancesPath,
}

impl Kind {
    /// The process exit code for this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Other => 1,
            Kind::Usage => 2,
            Kind::NotFound => 3,
            Kind::NotUsable => 4,
            Kind::Refused => 5,
            Kind::Integrity => 6,
            Kind::Unavailable => 7,
            Kind::LockTimeout => 8,
            Kind::NoSpace => 9,
            Kind::Auth => 10,
            Kind::Tool => 11,
            Kind::Conflict => 12,
            Kind::NotWritable => 14,
            Kind::Untrusted => 15,
            Kind::Protocol => 16,
            Kind::Signature => 17,
            Kind::NoInstancesPath => 18,
        }
    }

    /// A short stable name, used in `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Other => "error",
            Kind::Usage => "usage",
            Kind::NotFound => "not-found",
            Kind::NotUsable => "not-usable",
            Kind::Refused => "refused",
            Kind::Integrity => "integrity",
            Kind::Unavailable => "unavailable",
            Kind::LockTimeout => "lock-timeout",
            Kind::NoSpace => "no-space",
            Kind::Auth => "auth",
            Kind::Tool => "tool",
            Kind::Conflict => "conflict",
            Kind::NotWritable => "not-writable",
            Kind::Untrusted => "untrusted",
            Kind::Protocol => "protocol",
            Kind::Signature => "signature",
            Kind::NoInstancesPath => "no-instances-path",
        }
    }
}

/// The table printed at the end of `imgcache --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  1   other error (I/O error on the cache, internal error)
  2   usage: bad arguments, bad image id, bad URL
  3   image not found in Glance (404)
  4   image not usable: not active, or Glance has no data for it (204)
  5   image refused by a safety check (backing file, data file, format mismatch, ...)
  6   integrity: size or hash does not match Glance's record
  7   Glance unavailable after all retries
  8   timed out waiting for a cache lock (--lock-timeout)
  9   no space left in the cache filesystem
  10  Glance refused the credentials (401/403)
  11  qemu-img (or mkfs/mkswap, genisoimage/mcopy) missing or failed
  12  an instance disk exists and differs from the request (use --force)
  13  prune: entries in use alone exceed --max-size
  14  the cache directory is not writable (read-only filesystem, permission denied)
  15  a symlink, FIFO or other non-regular file sits where the cache expects its own file
  16  Glance answered something that is not its API (a malformed image record)
  17  --verify-signatures: the image's signature or its certificate was refused
  18  list/prune/verify: the instances path does not exist (--allow-missing: treat as empty)
With several image ids, the exit code is that of the first failed id in command-line order.";

/// The instances path given to a command that only reads a cache does not exist.
#[derive(Debug)]
pub struct NoInstancesPath(pub String);

impl fmt::Display for NoInstancesPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "instances path {} does not exist; check --instances-path (or IMGCACHE_INSTANCES_PATH, instances_path in the configuration file), or pass --allow-missing if it is a new host",
            self.0
        )
    }
}

impl std::error::Error for NoInstancesPath {}

/// A usage error raised after argument parsing (for example an invalid image id).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The exit-code kind an I/O error on the cache has of its own: a full filesystem or quota, or a
/// directory that cannot be written (read-only filesystem, permissions). `None` for the rest.
pub fn io_kind(e: &std::io::Error) -> Option<Kind> {
    if e.get_ref().is_some_and(|inner| inner.is::<Untrusted>()) {
        return Some(Kind::Untrusted);
    }
    if is_no_space(e) {
        return Some(Kind::NoSpace);
    }
    if matches!(
        e.raw_os_error(),
        Some(libc::EROFS | libc::EACCES | libc::EPERM)
    ) {
        return Some(Kind::NotWritable);
    }
    None
}

/// True for ENOSPC and EDQUOT: the filesystem (or the user's quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
}

/// An error chain on one line, outermost first: `outer: inner: innermost`. The one format every
/// message that carries a chain uses.
pub fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// A file under the cache that is not a regular file of ours (carried inside an `io::Error` of
/// kind `InvalidInput`, so every I/O path reports it with its own exit code).
#[derive(Debug)]
pub struct Untrusted(pub String);

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untrusted {}

impl Untrusted {
    /// As an `io::Error`, for the I/O paths that carry it.
    pub fn io(message: String) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, Untrusted(message))
    }
}

/// An error that arrives with its kind already decided (a token source's failure, handed across
/// a trait boundary that cannot name the source's own error type).
#[derive(Debug)]
pub struct Classified {
    pub kind: Kind,
    pub message: String,
}

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Classified {}
