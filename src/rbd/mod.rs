//! The Ceph RBD backend, built on the real `rbd` and `ceph` CLIs (ceph-common): every call has a
//! timeout (some commands hang forever without a manager daemon), its stderr goes into the error,
//! and a missing tool names its Debian package. The calls of an instance disk's life (the parent's
//! size, its last-use mark, clone, resize, remove, the fsid) go through librbd in process when it
//! can be loaded ([`native`]): one cluster connection per run instead of one `rbd` process each.
//!
//! Images imported by imgcache are named `imgcache-<sha1(image id)>` in the images pool, with one
//! protected snapshot `snap`; instance disks are clones `<instance>_disk` in the instances pool.

mod native;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;

use crate::error::Kind;
use crate::process;
use crate::units;

/// Snapshot every imported image carries; clones are made from it.
pub const SNAP: &str = "snap";
/// Prefix of the images imgcache imports (prune touches nothing else).
pub const IMAGE_PREFIX: &str = "imgcache-";
/// Infix of an import in progress (renamed into place when complete).
pub const TMP_INFIX: &str = ".tmp-";
/// Image metadata key holding the last time (unix seconds) an instance was cloned from it.
pub const META_LAST_USED: &str = "imgcache.last_used";

/// RBD failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found ({detail}); install it: apt-get install ceph-common")]
    Missing { tool: String, detail: String },
    #[error(
        "`{cmd}` timed out after {secs}s (is the Ceph cluster reachable? see --ceph-conf, --rbd-timeout)"
    )]
    Timeout { cmd: String, secs: u64 },
    #[error("`{cmd}` failed (exit {code}): {stderr}")]
    Failed {
        cmd: String,
        code: i32,
        stderr: String,
    },
    #[error("librbd: {call} failed: {text} (errno {code})")]
    Library {
        call: String,
        code: i32,
        text: String,
    },
}

impl Error {
    fn from_library(f: native::Failure, timeout: Duration) -> Error {
        if f.errno == libc::ETIMEDOUT {
            return Error::Timeout {
                cmd: format!("librbd: {}", f.call),
                secs: timeout.as_secs(),
            };
        }
        Error::Library {
            text: f.text(),
            code: f.errno,
            call: f.call,
        }
    }

    /// The exit-code kind of this error.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Timeout { .. } => Kind::Unavailable,
            _ => Kind::Tool,
        }
    }

    /// The errno a failed command exited with or a library call returned (not for a timeout or
    /// a missing tool).
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Failed { code, .. } | Error::Library { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// errno values the rbd CLI exits with.
pub const ENOENT: i32 = 2;
pub const EEXIST: i32 = 17;
pub const EBUSY: i32 = 16;

/// The Ceph tools' own default configuration when neither `--ceph-conf` nor `CEPH_CONF` is given.
pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";

/// A cluster and the pools imgcache uses in it.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub rbd: Rbd,
    /// Pool holding imported images.
    pub images_pool: String,
    /// Pool holding instance disks (clones).
    pub instances_pool: String,
}

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct Rbd {
    /// `-c FILE`; `None` leaves it to the Ceph tools (`CEPH_CONF`, then /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    pub timeout: Duration,
    /// The in-process connection, made on first use and shared by clones of this value.
    pub native: Native,
}

/// The librbd connection of a run: not tried yet, not available (use the CLI), connected, or
/// failed to connect (every call reports it).
#[derive(Clone, Default)]
pub struct Native(Arc<OnceLock<Connected>>);

/// The outcome of the one connection attempt: `Ok(None)` = no libraries; `Err` = what failed.
type Connected = Result<Option<native::Conn>, native::Failure>;

impl std::fmt::Debug for Native {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0.get() {
            None => "not tried",
            Some(Ok(None)) => "unavailable",
            Some(Ok(Some(_))) => "connected",
            Some(Err(_)) => "failed",
        };
        write!(f, "Native({state})")
    }
}

impl Rbd {
    /// The in-process connection, or `None` to use the CLI.
    fn conn(&self) -> Result<Option<&native::Conn>, Error> {
        if !native::wanted() {
            return Ok(None);
        }
        let state = self.native.0.get_or_init(|| {
            native::Conn::connect(&native::Settings {
                conf: self.conf.as_ref(),
                id: self.id.as_deref(),
                keyring: self.keyring.as_ref(),
                timeout: self.timeout,
            })
        });
        match state {
            Ok(conn) => Ok(conn.as_ref()),
            Err(f) => Err(Error::from_library(f.clone(), self.timeout)),
        }
    }

    /// "librbd" or "the rbd CLI": how this run reaches the cluster (for `-vv`).
    pub fn via(&self) -> &'static str {
        match self.conn() {
            Ok(Some(_)) => "librbd in process",
            _ => "the rbd CLI",
        }
    }

    /// Runs one call through librbd, mapping its failure; `Ok(None)`: use the CLI instead.
    fn in_process<T>(
        &self,
        f: impl FnOnce(&native::Conn) -> Result<T, native::Failure>,
    ) -> Result<Option<T>, Error> {
        let Some(conn) = self.conn()? else {
            return Ok(None);
        };
        f(conn)
            .map(Some)
            .map_err(|e| Error::from_library(e, self.timeout))
    }

    /// Size in bytes of an image or snapshot (`pool/image[@snap]`), `None` if it does not exist.
    pub fn size(&self, spec: &str) -> Result<Option<u64>, Error> {
        if let Some(done) = self.in_process(|c| c.size(spec))? {
            return Ok(done);
        }
        Ok(self
            .info(spec)?
            .map(|v| v.get("size").and_then(Value::as_u64).unwrap_or(0)))
    }

    /// Clones the snapshot `parent` as `child` (EEXIST if `child` exists).
    pub fn clone_image(&self, parent: &str, child: &str) -> Result<(), Error> {
        if let Some(done) = self.in_process(|c| c.clone_image(parent, child))? {
            return Ok(done);
        }
        self.rbd(&["clone", parent, child]).map(drop)
    }

    /// Grows an image to `size` bytes.
    pub fn resize(&self, spec: &str, size: u64) -> Result<(), Error> {
        if let Some(done) = self.in_process(|c| c.resize(spec, size))? {
            return Ok(done);
        }
        self.rbd(&[
            "resize",
            "--no-progress",
            "--size",
            &format!("{size}B"),
            spec,
        ])
        .map(drop)
    }

    /// Removes an image without snapshots (`rbd rm`).
    pub fn remove(&self, spec: &str) -> Result<(), Error> {
        if let Some(done) = self.in_process(|c| c.remove(spec))? {
            return Ok(done);
        }
        self.rbd(&["rm", "--no-progress", spec]).map(drop)
    }

    /// `<tool> -c <conf> [--id ID] [--keyring FILE]`; `IMGCACHE_RBD` / `IMGCACHE_CEPH` name
    /// another binary for the tool (a wrapper, a test double).
    fn command(&self, tool: &str) -> Command {
        let bin = std::env::var_os(format!("IMGCACHE_{}", tool.to_ascii_uppercase()))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(tool));
        let mut cmd = Command::new(bin);
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        if let Some(id) = &self.id {
            cmd.args(["--id", id]);
        }
        if let Some(k) = &self.keyring {
            cmd.arg("--keyring").arg(k);
        }
        cmd
    }

    /// Runs `rbd ARGS`, returning stdout.
    pub fn rbd(&self, args: &[&str]) -> Result<String, Error> {
        self.run("rbd", args)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<String, Error> {
        let mut cmd = self.command(tool);
        cmd.args(args);
        let shown = format!("{tool} {}", args.join(" "));
        let limits = process::Limits {
            timeout: Some(self.timeout),
            ..process::Limits::default()
        };
        let out = process::run(cmd, &shown, &limits).map_err(|e| match e {
            process::Error::Timeout { .. } | process::Error::Stopped { .. } => Error::Timeout {
                cmd: shown.clone(),
                secs: self.timeout.as_secs(),
            },
            process::Error::Spawn { source, .. } => Error::Missing {
                tool: tool.to_owned(),
                detail: source.to_string(),
            },
        })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Failed {
                cmd: shown,
                code: out.code(),
                stderr: out.stderr,
            })
        }
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> Result<String, Error> {
        if let Some(done) = self.in_process(native::Conn::fsid)? {
            return Ok(done);
        }
        Ok(self.run("ceph", &["fsid"])?.trim().to_owned())
    }

    /// `rbd info --format json SPEC`, or `None` if it does not exist.
    pub fn info(&self, spec: &str) -> Result<Option<Value>, Error> {
        match self.rbd(&["info", "--format", "json", spec]) {
            Ok(s) => Ok(serde_json::from_str(&s).ok()),
            Err(e) if e.code() == Some(ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Images in a pool.
    pub fn ls(&self, pool: &str) -> Result<Vec<String>, Error> {
        let s = self.rbd(&["ls", "--format", "json", pool])?;
        Ok(serde_json::from_str::<Vec<String>>(&s).unwrap_or_default())
    }

    /// True if `pool/image` is in its pool's listing.
    fn listed(&self, image_spec: &str) -> Result<bool, Error> {
        let Some((pool, name)) = image_spec.split_once('/') else {
            return Ok(false);
        };
        Ok(self.ls(pool)?.iter().any(|n| n == name))
    }

    /// Clones of a snapshot, as `pool/image`.
    pub fn children(&self, snap_spec: &str) -> Result<Vec<String>, Error> {
        let s = self.rbd(&["children", "--format", "json", snap_spec])?;
        let v: Value = serde_json::from_str(&s).unwrap_or(Value::Null);
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.get("pool").and_then(Value::as_str).unwrap_or(""),
                    c.get("image").and_then(Value::as_str).unwrap_or("")
                )
            })
            .collect())
    }

    /// Records "used now" on an imported image (prune's age).
    pub fn touch(&self, image_spec: &str) -> Result<(), Error> {
        let now = units::unix_now().to_string();
        if let Some(done) = self.in_process(|c| c.metadata_set(image_spec, META_LAST_USED, &now))? {
            return Ok(done);
        }
        self.rbd(&["image-meta", "set", image_spec, META_LAST_USED, &now])
            .map(drop)
    }

    /// Seconds since the image was last used, if recorded.
    pub fn idle_seconds(&self, image_spec: &str) -> Result<Option<u64>, Error> {
        match self.rbd(&["image-meta", "get", image_spec, META_LAST_USED]) {
            Ok(s) => {
                let then: u64 = s.trim().parse().unwrap_or(0);
                Ok(Some(units::unix_now().saturating_sub(then)))
            }
            Err(e) if e.code() == Some(ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes an image with its (possibly protected) snapshot. Fails with EBUSY if it has
    /// clones — never forces.
    pub fn remove_image(&self, image_spec: &str) -> Result<(), Error> {
        let snap = format!("{image_spec}@{SNAP}");
        match self.rbd(&["snap", "unprotect", &snap]) {
            Ok(_) => {}
            // Not protected or no such snapshot: fine, go on.
            Err(e) if matches!(e.code(), Some(ENOENT) | Some(22)) => {}
            Err(e) => return Err(e),
        }
        // `snap purge` exits 0 even when it could not remove a snapshot, and right after a
        // concurrent import the image can still be settling: check, and try a few times.
        let mut last = None;
        for attempt in 0..8 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * attempt));
                let _ = self.rbd(&["snap", "unprotect", &snap]);
            }
            let _ = self.rbd(&["snap", "purge", "--no-progress", image_spec]);
            match self.rbd(&["rm", "--no-progress", image_spec]) {
                Ok(_) => {}
                // Gone as far as its header goes; the pool's directory is checked below.
                Err(e) if e.code() == Some(ENOENT) => {}
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            }
            // Right after a lost rename race the pool can still list the name for a moment:
            // removed means neither readable nor listed.
            if self.info(image_spec)?.is_none() && !self.listed(image_spec)? {
                return Ok(());
            }
        }
        Err(last.unwrap_or_else(|| Error::Failed {
            cmd: format!("rbd rm {image_spec}"),
            code: -1,
            stderr: "the image is still listed after removal".into(),
        }))
    }
}

/// Parses rbd's `create_timestamp` (`Sun Nov 22 04:51:04 2026`, the cluster's local time,
/// treated as UTC) into seconds since the epoch.
pub fn parse_ctime(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut it = s.split_whitespace().skip(1);
    let name = it.next()?;
    let month = MONTHS.iter().position(|m| *m == name)? as i64 + 1;
    let day: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    let year: i64 = it.next()?.parse().ok()?;
    // Days from civil (proleptic Gregorian), inverse of units::rfc3339's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
}

/// The name of an imported image in the images pool.
pub fn image_name(entry_name: &str) -> String {
    format!("{IMAGE_PREFIX}{entry_name}")
}

/// Parses `rbd://<fsid>/<pool>/<image>/<snap>`.
pub fn parse_location(url: &str) -> Option<(String, String, String, String)> {
    let rest = url.strip_prefix("rbd://")?;
    let mut parts = rest.split('/').map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    let (fsid, pool, image, snap) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [&fsid, &pool, &image, &snap].iter().any(|s| s.is_empty()) {
        return None;
    }
    Some((fsid, pool, image, snap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_locations_parse() {
        assert_eq!(
            parse_location("rbd://f00/images/abc-1/snap"),
            Some(("f00".into(), "images".into(), "abc-1".into(), "snap".into()))
        );
        assert_eq!(parse_location("rbd://f00/images/abc"), None);
        assert_eq!(parse_location("file:///x"), None);
        assert_eq!(parse_location("rbd://f00//abc/snap"), None);
    }

    #[test]
    fn ctime_parses() {
        assert_eq!(parse_ctime("Thu Jan  1 00:00:00 1970"), Some(0));
        assert_eq!(parse_ctime("Sun Nov 22 00:24:05 2026"), Some(1_795_307_045));
        assert_eq!(parse_ctime("garbage"), None);
    }

    #[test]
    fn missing_tool_names_the_package() {
        let r = Rbd {
            conf: Some("/nonexistent".into()),
            id: None,
            keyring: None,
            timeout: Duration::from_secs(1),
            native: Native::default(),
        };
        // A tool name that is on no PATH.
        let e = r.run("imgcache-no-such-tool", &["ls"]).unwrap_err();
        assert!(e.to_string().contains("apt-get install ceph-common"), "{e}");
        assert_eq!(e.kind(), Kind::Tool);
    }
}
