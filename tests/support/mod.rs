//! Shared test helpers: running the binary, temp cache dirs, test images, hashing.

pub mod fault_server;
pub mod glance;
pub mod proxy;
pub mod service;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha512};

/// The result of one `imgcache` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code, showing both streams when it differs.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Asserts a child process exited 0, showing its stderr when it did not.
#[track_caller]
pub fn assert_exit_ok(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A command for the built binary with a clean environment (no OS_* leaking in).
pub fn imgcache() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("OS_") || k.starts_with("IMGCACHE_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs the binary to completion.
pub fn run(cmd: &mut Command) -> Run {
    Run::from(cmd.output().expect("run imgcache"))
}

/// A temporary instances path plus the flags pointing the binary at it and at a Glance.
pub struct Cache {
    pub dir: tempfile::TempDir,
}

impl Cache {
    pub fn new() -> Cache {
        Cache {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn instances(&self) -> &Path {
        self.dir.path()
    }

    pub fn base(&self) -> PathBuf {
        self.dir.path().join("_base")
    }

    /// `imgcache fetch` against `url` with fast retries.
    pub fn fetch(&self, url: &str) -> Command {
        let mut cmd = imgcache();
        cmd.arg("fetch")
            .arg("--instances-path")
            .arg(self.instances())
            .args(["--glance-url", url, "--retry-backoff", "50ms"]);
        cmd
    }

    /// Starts `n` concurrent `imgcache fetch ID` processes with captured output.
    pub fn spawn_fetches(&self, url: &str, id: &str, n: usize) -> Vec<std::process::Child> {
        (0..n)
            .map(|_| {
                self.fetch(url)
                    .arg(id)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn imgcache")
            })
            .collect()
    }

    /// `imgcache create INSTANCE --image ID` against `url`.
    pub fn create(&self, url: &str, instance: &str, image: &str) -> Command {
        let mut cmd = imgcache();
        cmd.arg("create")
            .arg("--instances-path")
            .arg(self.instances())
            .args([
                "--glance-url",
                url,
                "--retry-backoff",
                "50ms",
                instance,
                "--image",
                image,
            ]);
        cmd
    }

    /// Names of the files in `dir`, sorted (empty if it does not exist).
    pub fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Names of the files in `_base`, sorted.
    pub fn base_files(&self) -> Vec<String> {
        Self::files_in(&self.base())
    }

    /// Asserts `_base` holds exactly `entry` and its record, or nothing at all if `None`.
    #[track_caller]
    pub fn assert_clean_or_complete(&self, entry: Option<&str>) {
        let files = self.base_files();
        match entry {
            None => assert!(files.is_empty(), "_base should be empty: {files:?}"),
            Some(e) => assert_eq!(files, vec![e.to_owned(), format!("{e}.info")]),
        }
    }
}

/// Hex SHA-1 of an image id: the entry name.
pub fn entry_name(id: &str) -> String {
    use sha1::Sha1;
    hex::encode(Sha1::digest(id.as_bytes()))
}

/// Hex SHA-512.
pub fn sha512_hex(data: &[u8]) -> String {
    hex::encode(Sha512::digest(data))
}

/// Hex XXH3-128, the content digest the cache record keeps.
pub fn xxh3_hex(data: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(data))
}

/// The JSON record beside an entry.
pub fn record(cache: &Cache, id: &str) -> serde_json::Value {
    let path = cache.base().join(format!("{}.info", entry_name(id)));
    serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("record json")
}

/// Hex MD5.
pub fn md5_hex(data: &[u8]) -> String {
    hex::encode(md5::Md5::digest(data))
}

/// Deterministic pseudo-random bytes (xorshift), with a zero run in the middle so images have
/// both data and holes.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    let (a, b) = (len / 3, len / 2);
    v[a..b].fill(0);
    v
}

/// `qemu-img info --output=json -f <fmt> <path>` as JSON.
pub fn qemu_info(path: &Path, fmt: &str) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        fmt,
        path.to_str().expect("utf8"),
    ]);
    serde_json::from_slice(&out).expect("qemu-img json")
}

/// Runs qemu-img, panicking with its stderr on failure.
pub fn qemu_img(args: &[&str]) -> Vec<u8> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes `raw` to `dir/name.raw` and converts it to `dir/name.qcow2`; returns both paths.
pub fn make_qcow2(dir: &Path, name: &str, raw: &[u8]) -> (PathBuf, PathBuf) {
    let raw_path = dir.join(format!("{name}.raw"));
    let qcow_path = dir.join(format!("{name}.qcow2"));
    std::fs::write(&raw_path, raw).expect("write raw");
    raw_to_qcow2(&raw_path, &qcow_path);
    (raw_path, qcow_path)
}

/// `qemu-img convert -f raw -O qcow2 SRC DST`.
pub fn raw_to_qcow2(src: &Path, dst: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().expect("utf8"),
        dst.to_str().expect("utf8"),
    ]);
}
