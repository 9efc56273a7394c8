//! `create --backend qcow2` writes its overlay natively: for a matrix of virtual sizes and
//! backing names the file must be byte for byte what `qemu-img create` writes for the same
//! inputs, pass `qemu-img check`, read as the base, take guest writes, and pass the native
//! inspector but for its backing file. A backing name qemu refuses goes to qemu-img, which
//! refuses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fault_server::{FaultServer, Image};
use crate::support::{entry_name, imgcache, make_qcow2, qemu_img, qemu_info, run, test_bytes};

const MIB: u64 = 1 << 20;
const BASE_LEN: usize = 1000;

/// The sizes: a byte over the 1000-byte base's 1024 (qemu rounds that base up to a sector, and
/// the overlay to 1536), 64 MiB, 1 GiB and a sector, 2 TiB, 16 TiB.
const SIZES: [u64; 5] = [1025, 64 * MIB, (1 << 30) + 512, 2 << 40, 16 << 40];

/// An instances path under `root` whose base path (`<it>/_base/<40 hex>`) is `total` bytes
/// long, through directories of at most 200 bytes.
fn deep_instances(root: &Path, total: usize) -> PathBuf {
    let want = total - "/_base/".len() - 40;
    let mut p = root.to_path_buf();
    while p.as_os_str().len() < want {
        let left = want - p.as_os_str().len() - 1;
        p.push("d".repeat(left.clamp(1, 200)));
    }
    assert_eq!(p.as_os_str().len(), want);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn create(srv: &FaultServer, instances: &Path, vm: &str, size: u64) -> crate::support::Run {
    create_with(srv, instances, vm, size, &[])
}

fn create_with(
    srv: &FaultServer,
    instances: &Path,
    vm: &str,
    size: u64,
    extra: &[&str],
) -> crate::support::Run {
    run(imgcache()
        .arg("create")
        .arg("--instances-path")
        .arg(instances)
        .args(["--glance-url", &srv.url, "--retry-backoff", "50ms", vm])
        .args(["--image", "overlay-base", "--backend", "qcow2"])
        .args(["--size", &size.to_string()])
        .args(extra))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// `qemu-img check -f qcow2`: exit 0, no errors, no leaks.
fn check_clean(disk: &Path) {
    let out = qemu_img(&["check", "--output=json", "-f", "qcow2", path_str(disk)]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    for field in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(field).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{field} in {}: {v}",
            disk.display()
        );
    }
}

/// The fields of `qemu-img info` that describe what was created (not the file's own name and
/// allocation).
fn described(info: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "virtual-size": info["virtual-size"],
        "cluster-size": info["cluster-size"],
        "format-specific": info["format-specific"],
        "backing-filename": info["backing-filename"],
        "backing-filename-format": info["backing-filename-format"],
    })
}

fn check_one(srv: &FaultServer, instances: &Path, vm: &str, size: u64) {
    check_one_with(srv, instances, vm, size, "raw", &[]);
}

/// [`check_one`] for a base in `base_fmt`, made with `extra` create flags.
fn check_one_with(
    srv: &FaultServer,
    instances: &Path,
    vm: &str,
    size: u64,
    base_fmt: &str,
    extra: &[&str],
) {
    let r = create_with(srv, instances, vm, size, extra);
    r.assert_code(0);
    let disk = instances.join(vm).join("disk");
    let base = instances.join("_base").join(entry_name("overlay-base"));
    let what = format!("{} at size {size}", disk.display());

    // qemu's own overlay of the same base and size.
    let reference = instances.join(format!("{vm}.reference"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        base_fmt,
        path_str(&reference),
        &size.to_string(),
    ]);
    let (ours, theirs) = (qemu_info(&disk, "qcow2"), qemu_info(&reference, "qcow2"));
    assert_eq!(described(&ours), described(&theirs), "{what}");
    assert_eq!(ours["backing-filename"], path_str(&base), "{what}");
    assert_eq!(ours["virtual-size"], size.next_multiple_of(512), "{what}");
    // Content, not allocation: the L1 table qemu writes as zeros is a hole here.
    let (a, b) = (
        std::fs::read(&disk).unwrap(),
        std::fs::read(&reference).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{what}: length");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{what}: first differing byte at {i:#x}");
    }

    check_clean(&disk);
    let compared = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "qcow2",
            "-F",
            base_fmt,
            path_str(&disk),
            path_str(&base),
        ])
        .output()
        .unwrap();
    assert!(
        compared.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&compared.stdout)
    );

    // A guest write: 64 KiB at 1 MiB, or one sector at the start of the smallest disk.
    let (off, len) = if size >= 2 * MIB {
        ("1M", "64k")
    } else {
        ("0", "512")
    };
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0xab {off} {len}"),
            path_str(&disk),
        ])
        .output()
        .unwrap();
    assert!(
        io.status.success() && !String::from_utf8_lossy(&io.stderr).contains("error"),
        "{what}: qemu-io: {}",
        String::from_utf8_lossy(&io.stderr)
    );
    check_clean(&disk);
    let read = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0xab {off} {len}"),
            path_str(&disk),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success() && !said.contains("Pattern verification failed"),
        "{what}: {said}"
    );
}

#[test]
fn native_overlays_match_qemu_img_create_and_pass_its_checks() {
    let srv = FaultServer::start(Image::raw("overlay-base", test_bytes(BASE_LEN, 61)));
    let root = tempfile::tempdir().unwrap();
    let short = root.path().join("short");
    let odd = root.path().join("dir with spaces/ünïcödé ☃ \u{2009}x");
    let deep = deep_instances(&root.path().join("deep"), 1023);
    for instances in [&short, &odd, &deep] {
        std::fs::create_dir_all(instances).unwrap();
        for (i, size) in SIZES.iter().enumerate() {
            check_one(&srv, instances, &format!("vm-{i}"), *size);
        }
    }
    let base = deep.join("_base").join(entry_name("overlay-base"));
    assert_eq!(base.as_os_str().len(), 1023);
}

#[test]
fn a_qcow2_base_kept_with_no_force_raw_is_named_as_qcow2() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, qcow) = make_qcow2(tmp.path(), "base", &test_bytes(MIB as usize, 65));
    let mut img = Image::raw("overlay-base", std::fs::read(&qcow).unwrap());
    img.disk_format = "qcow2".into();
    let srv = FaultServer::start(img);
    let root = tempfile::tempdir().unwrap();
    for (i, size) in [64 * MIB, 16 << 40].into_iter().enumerate() {
        check_one_with(
            &srv,
            root.path(),
            &format!("vm-{i}"),
            size,
            "qcow2",
            &["--no-force-raw"],
        );
    }
}

#[test]
fn native_overlay_passes_the_inspector_but_for_its_backing_file() {
    let srv = FaultServer::start(Image::raw("overlay-base", test_bytes(BASE_LEN, 62)));
    let root = tempfile::tempdir().unwrap();
    create(&srv, root.path(), "vm", 16 << 40).assert_code(0);
    let disk = root.path().join("vm/disk");
    let inspect = |p: &Path| {
        run(imgcache()
            .args(["inspect", "--max-virtual-size", "32T"])
            .arg(p))
    };
    let r = inspect(&disk);
    r.assert_code(5);
    let base = root.path().join("_base").join(entry_name("overlay-base"));
    assert!(
        r.stdout.contains(&format!(
            "has a backing file {:?}",
            base.display().to_string()
        )),
        "{}{}",
        r.stdout,
        r.stderr
    );
    // Without its backing file pointer, every other field and table is accepted.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[8..20].fill(0);
    let detached = root.path().join("detached.qcow2");
    std::fs::write(&detached, &bytes).unwrap();
    let r = inspect(&detached);
    r.assert_code(0);
    assert!(
        r.stdout
            .contains(&format!("ok: qcow2, virtual size {}", 16u64 << 40)),
        "{}",
        r.stdout
    );
}

#[test]
fn backing_names_qemu_refuses_go_to_qemu_img() {
    let srv = FaultServer::start(Image::raw("overlay-base", test_bytes(BASE_LEN, 63)));
    let root = tempfile::tempdir().unwrap();
    let deep = deep_instances(root.path(), 1024);
    let r = create(&srv, &deep, "vm", 64 * MIB);
    r.assert_code(11);
    assert!(r.stderr.contains("qemu-img create"), "{}", r.stderr);
    assert!(
        !deep.join("vm").exists(),
        "nothing left of the failed create"
    );
}

#[test]
fn qemu_img_writer_is_used_when_asked() {
    let srv = FaultServer::start(Image::raw("overlay-base", test_bytes(BASE_LEN, 64)));
    let root = tempfile::tempdir().unwrap();
    let r = run(imgcache()
        .env("IMGCACHE_OVERLAY_WRITER", "qemu-img")
        .arg("-v")
        .arg("create")
        .arg("--instances-path")
        .arg(root.path())
        .args(["--glance-url", &srv.url, "vm", "--image", "overlay-base"])
        .args(["--backend", "qcow2", "--size", "64M"]));
    r.assert_code(0);
    assert!(
        r.stderr.contains("overlay by qemu-img create"),
        "{}",
        r.stderr
    );
    check_clean(&root.path().join("vm/disk"));
}
