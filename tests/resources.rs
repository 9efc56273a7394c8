//! Resource faults: a full filesystem (before and during conversion, and during download), a
//! read-only cache, permission denied, a missing qemu-img. Each is one clear line on stderr with
//! its exit code, nothing partial is left, and existing entries stay intact. Mounts need root
//! (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fault_server::{FaultServer, Image};
use crate::support::{Cache, entry_name, imgcache, make_qcow2, run, test_bytes};

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str, extra: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}{extra}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount (tests need root)");
        assert!(st.success(), "mount tmpfs failed: these tests need root");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn fetch(instances: &Path, url: &str, id: &str) -> crate::support::Run {
    run(crate::support::imgcache()
        .arg("fetch")
        .arg("--instances-path")
        .arg(instances)
        .args(["--glance-url", url, "--retry-backoff", "10ms", id]))
}

fn base_files(instances: &Path) -> Vec<String> {
    Cache::files_in(&instances.join("_base"))
}

#[test]
fn body_longer_than_the_record_stops_at_its_size_not_at_a_full_disk() {
    // The record says 1 MiB; the server sends 64 MiB into a 16 MiB filesystem. Reading on
    // would end in "no space" (exit 9); the cap ends it as an integrity error.
    let fs = Tmpfs::new("16m", "");
    let mut image = Image::raw("long", test_bytes(64 << 20, 92));
    image.size = 1 << 20;
    let srv = FaultServer::start(image);
    let r = fetch(fs.path(), &srv.url, "long");
    r.assert_code(6);
    assert!(
        r.stderr.contains("more than the 1048576 bytes"),
        "{}",
        r.stderr
    );
    assert!(
        base_files(fs.path()).is_empty(),
        "{:?}",
        base_files(fs.path())
    );
}

#[test]
fn a_direct_url_file_longer_than_the_record_is_read_only_to_its_size() {
    // A 64 MiB (sparse) store file for a 1 MiB record, into a 16 MiB filesystem: reading it
    // all would end in "no space"; the cap stops one byte past the record's size.
    let fs = Tmpfs::new("16m", "");
    let store = tempfile::tempdir().unwrap();
    let file = store.path().join("img");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mut image = Image::raw("img", test_bytes(1 << 20, 93));
    image.direct_url = Some(format!("file://{}", file.display()));
    let srv = FaultServer::start(image);
    let r = run(crate::support::imgcache()
        .arg("fetch")
        .arg("--instances-path")
        .arg(fs.path())
        .args(["--glance-url", &srv.url, "--allow-direct-file", "img"]));
    r.assert_code(6);
    assert!(r.stderr.contains("size mismatch"), "{}", r.stderr);
    assert!(
        base_files(fs.path()).is_empty(),
        "{:?}",
        base_files(fs.path())
    );
}

#[test]
fn full_filesystem_during_download_leaves_nothing_and_keeps_entries() {
    let fs = Tmpfs::new("8m", "");
    let small = test_bytes(1 << 20, 90);
    let srv_small = FaultServer::start(Image::raw("small", small.clone()));
    fetch(fs.path(), &srv_small.url, "small").assert_code(0);
    let srv_big = FaultServer::start(Image::raw("big", test_bytes(16 << 20, 91)));
    let r = fetch(fs.path(), &srv_big.url, "big");
    r.assert_code(9);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("No space left"), "{}", r.stderr);
    let name = entry_name("small");
    assert_eq!(
        base_files(fs.path()),
        vec![name.clone(), format!("{name}.info")]
    );
    assert!(std::fs::read(fs.path().join("_base").join(&name)).unwrap() == small);
}

#[test]
fn conversion_that_cannot_fit_is_refused_before_qemu_img_runs() {
    let fs = Tmpfs::new("8m", "");
    let tmp = tempfile::tempdir().unwrap();
    // 5 MiB of data, 64 MiB virtual: needs min(64M, 2 x 5M) = 10 MiB; only ~3 MiB left after the
    // download.
    let mut raw = test_bytes(5 << 20, 92);
    raw.resize(64 << 20, 0);
    let (_, qcow) = make_qcow2(tmp.path(), "big", &raw);
    let mut image = Image::raw("conv", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    let r = fetch(fs.path(), &srv.url, "conv");
    r.assert_code(9);
    assert!(r.stderr.contains("not enough space"), "{}", r.stderr);
    assert!(
        base_files(fs.path()).is_empty(),
        "{:?}",
        base_files(fs.path())
    );
}

#[test]
fn conversion_that_runs_out_anyway_cleans_up() {
    let fs = Tmpfs::new("8m", "");
    let tmp = tempfile::tempdir().unwrap();
    // Compresses to almost nothing but expands to 24 MiB of non-zero data: passes the estimate
    // (twice the download), then fills the disk during qemu-img convert.
    let qcow = crate::support::compressed_qcow2(tmp.path(), "pattern", 0x5a, 24 << 20);
    let mut image = Image::raw("expands", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    let r = fetch(fs.path(), &srv.url, "expands");
    r.assert_code(9);
    // The --min-free watch (default 5 %) stops it, or the filesystem filled first.
    assert!(
        r.stderr.contains("--min-free") || r.stderr.contains("No space left"),
        "{}",
        r.stderr
    );
    assert!(
        base_files(fs.path()).is_empty(),
        "{:?}",
        base_files(fs.path())
    );
}

#[test]
fn read_only_cache_is_a_clear_error() {
    let fs = Tmpfs::new("8m", ",ro");
    let srv = FaultServer::start(Image::raw("ro", test_bytes(1 << 20, 93)));
    let r = fetch(fs.path(), &srv.url, "ro");
    r.assert_code(14);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
}

#[test]
fn create_on_a_read_only_cache_gives_the_same_hint_as_fetch() {
    let fs = Tmpfs::new("8m", "");
    let srv = FaultServer::start(Image::raw("ro", test_bytes(1 << 20, 94)));
    fetch(fs.path(), &srv.url, "ro").assert_code(0);
    // The cache is there; then its filesystem turns read-only (a failing disk, an operator).
    let out = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(fs.path())
        .output()
        .unwrap();
    crate::support::assert_exit_ok(&out);
    let r = run(imgcache()
        .args(["create", "--instances-path"])
        .arg(fs.path())
        .args(["--glance-url", &srv.url, "--image", "ro", "vm1"]));
    r.assert_code(14);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("Read-only file system") && r.stderr.contains("writable"),
        "{}",
        r.stderr
    );
}

#[test]
fn permission_denied_on_base_is_a_clear_error() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    std::fs::create_dir_all(cache.instances().join("locks")).unwrap();
    // World-readable but root-owned: the unprivileged user cannot write.
    for d in [
        cache.instances().to_path_buf(),
        cache.base(),
        cache.instances().join("locks"),
    ] {
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let srv = FaultServer::start(Image::raw("perm", test_bytes(1 << 20, 94)));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_imgcache"));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("fetch")
        .arg("--instances-path")
        .arg(cache.instances())
        .args(["--glance-url", &srv.url, "perm"])
        .env_remove("OS_AUTH_URL")
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(14), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(cache.base_files().is_empty());
}

#[test]
fn missing_qemu_img_names_the_package() {
    let cache = Cache::new();
    let srv = FaultServer::start(Image::raw("noqemu", test_bytes(1 << 20, 95)));
    let r = run(cache
        .fetch(&srv.url)
        .env("IMGCACHE_QEMU_IMG", "/nonexistent/qemu-img")
        .arg("noqemu"));
    r.assert_code(11);
    assert!(
        r.stderr.contains("apt-get install qemu-utils"),
        "{}",
        r.stderr
    );
    cache.assert_clean_or_complete(None);
}
