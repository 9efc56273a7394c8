//! Shared test helpers: running the binary, temp cache dirs, test images, hashing.

pub mod fault_server;
pub mod glance;
pub mod nova;
pub mod proxy;
pub mod qcow2;
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

/// Runs the binary to completion, killing it and failing the test if it is still running after
/// `guard` (for runs that once hung forever on a FIFO: a hang must fail, not stall the suite).
#[track_caller]
pub fn run_guarded(cmd: &mut Command, guard: std::time::Duration) -> Run {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn imgcache");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(guard) {
        Ok(out) => Run::from(out.expect("wait imgcache")),
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("imgcache still running after {guard:?}: it hung");
        }
    }
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

/// The content digest a record keeps (`zb64k:`: XXH3-128 over 64 KiB blocks, runs of all-zero
/// blocks hashed as their count, then the tail and the length), computed here independently of
/// `src/digest.rs`.
pub fn content_digest_hex(data: &[u8]) -> String {
    const BLOCK: usize = 64 << 10;
    fn flush(h: &mut xxhash_rust::xxh3::Xxh3, run: &mut u64) {
        if *run > 0 {
            h.update(b"Z");
            h.update(&run.to_le_bytes());
            *run = 0;
        }
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut run = 0u64;
    let whole = data.len() / BLOCK * BLOCK;
    for block in data[..whole].chunks(BLOCK) {
        if block.iter().all(|&b| b == 0) {
            run += 1;
            continue;
        }
        flush(&mut h, &mut run);
        h.update(b"D");
        h.update(block);
    }
    flush(&mut h, &mut run);
    h.update(b"T");
    h.update(&data[whole..]);
    h.update(b"E");
    h.update(&(data.len() as u64).to_le_bytes());
    format!("zb64k:{:032x}", h.digest128())
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

/// A seeded xorshift64 generator (shifts 13, 7, 17): the same seed gives the same sequence, so
/// test images are stable and a random campaign can be replayed from its printed seed.
pub struct Rng(u64);

impl Rng {
    /// Panics on 0, the one state xorshift never leaves.
    pub fn new(seed: u64) -> Rng {
        assert_ne!(seed, 0, "xorshift needs a non-zero seed");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Fills `buf` with the little-endian bytes of successive numbers (the last one cut short).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

/// Deterministic pseudo-random bytes ([`Rng`] seeded with `seed | 1`), with a zero run in the
/// middle so images have both data and holes.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    Rng::new(seed | 1).fill(&mut v);
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
    qcow2::to_qcow2(src, dst, "", false);
}

/// `qemu-img convert -f qcow2 -O raw src dst`: what a converted entry must equal.
pub fn qcow2_to_raw(src: &Path, dst: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        src.to_str().expect("utf8"),
        dst.to_str().expect("utf8"),
    ]);
}

/// A compressed qcow2 `<dir>/<name>.qcow2` of `len` bytes all `byte`: small to download, large
/// once converted (for tests of space running out during the conversion).
pub fn compressed_qcow2(dir: &Path, name: &str, byte: u8, len: usize) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, vec![byte; len]).expect("write raw");
    let qcow = dir.join(format!("{name}.qcow2"));
    qcow2::to_qcow2(&raw, &qcow, "", true);
    qcow
}

impl Cache {
    /// A fetch of `id` that succeeded: its one stdout line names the entry, the entry holds
    /// exactly `data`, and nothing else of it is left behind.
    pub fn assert_fetched(&self, id: &str, data: &[u8], r: &Run) {
        r.assert_code(0);
        let name = entry_name(id);
        let path = self.base().join(&name);
        assert_eq!(r.stdout, format!("{id} {}\n", path.display()));
        assert!(
            std::fs::read(&path).expect("entry") == data,
            "entry differs from the image"
        );
        self.assert_clean_or_complete(Some(&name));
    }
}

/// Images (and the hashes tests compare) depend on these exact bytes.
#[test]
fn test_bytes_and_rng_are_stable() {
    let mut rng = Rng::new(1);
    assert_eq!(
        [rng.next_u64(), rng.next_u64(), rng.next_u64()],
        [0x4082_2041, 0x1000_4106_0c01_1441, 0x9b1e_842f_6e86_2629]
    );
    for (len, seed, sha512) in [
        (
            13,
            3,
            "e3731800ae09564f416eefa3128ba7b261663a0d054843bc9421194f9b076f6cfbce6be223c265f1cc06e0706cb5b32268281a453c43097fb11bf3508c984f15",
        ),
        (
            1000,
            0,
            "7ba8ae1a79816e32d17932394a3873dcc254b0cb3424c1e384a8e851514694c81341f0c0911a14cec2a44d8cc94159ca0f996f1c93e94a23cf303580b66153e8",
        ),
        (
            300_000,
            46,
            "8b83195cc08d637ec7c2198e57e4d28356e3a6aaf8792dfe4ef819b799e2aa669452116252892f832c1359fa41983e1240bfa4894bc86193879f031b782f17d4",
        ),
        (
            1 << 20,
            21,
            "e91a9ef7963fb278ae9336f200dc172f9999ceb03ffffa79f66a7b6fc39849e5c00c0d559470a35d535200b45c186d0c090d779426822ac4d8a76e3e0183b44b",
        ),
    ] {
        assert_eq!(sha512_hex(&test_bytes(len, seed)), sha512, "{len} {seed}");
    }
}

/// A POSIX record lock on the whole file, taken the way Nova's lock library takes
/// `locks/nova-<name>` (`fcntl.lockf(LOCK_EX)`: `F_SETLK`, owned by this process). Released
/// when dropped.
pub struct LockfHold {
    _file: std::fs::File,
}

impl LockfHold {
    pub fn take(path: &Path) -> LockfHold {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        // SAFETY: a zeroed flock is valid: whole file from offset 0.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: fcntl on our own descriptor with a valid flock.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) };
        assert_eq!(
            r,
            0,
            "lockf {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        LockfHold { _file: file }
    }
}
