//! The boot test: a real QEMU guest (TCG, Debian's cloud kernel, a busybox initramfs and root
//! disk built by `scripts/boot/build-guest`) boots the disks `imgcache create` made from a real
//! Glance — root disk, kernel and ramdisk from the image's `kernel_id` / `ramdisk_id`, ephemeral
//! and swap disks — and reports on the serial console what it saw. Fails (never skips) when
//! `qemu-system-x86_64` or the guest's inputs are missing: `.ci/run` installs them.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::glance::real;
use crate::support::{Cache, assert_exit_ok, entry_name, qemu_img, qemu_info, run};

const MIB: u64 = 1 << 20;
const QEMU: &str = "qemu-system-x86_64";
/// A boot takes about 5 s under TCG on an idle core; this allows for a loaded machine.
const BOOT_GUARD: Duration = Duration::from_secs(150);

/// The guest's files: vmlinuz, initrd, root.ext4 (built once, cached by the script).
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    root: PathBuf,
}

fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let version = Command::new(QEMU).arg("--version").output();
        match version {
            Ok(o) if o.status.success() => {}
            other => panic!(
                "{QEMU} cannot run ({other:?}): install qemu-system-x86 matching qemu-utils \
                 (from bookworm-backports: .ci/run does)"
            ),
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/boot/build-guest");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/boot/build-guest");
        assert_exit_ok(&out);
        let dir = PathBuf::from(String::from_utf8(out.stdout).expect("utf8").trim());
        Guest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
            root: dir.join("root.ext4"),
        }
    })
}

/// A digest of a file's contents that reads only its data extents (SEEK_DATA / SEEK_HOLE):
/// XXH3-128 over the offset and bytes of every 4 KiB block that is not all zeros, then the
/// length. The 1 GiB sparse ephemeral template costs only its few MiB of metadata, and the
/// digest does not depend on where the holes are (an unwritten extent counts as data once its
/// pages are cached, as after QEMU read it).
fn file_digest(path: &Path) -> String {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 4096;
    let f = std::fs::File::open(path).expect("open for digest");
    let len = f.metadata().expect("stat").len();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let zeros = [0u8; BLOCK as usize];
    let mut done: u64 = 0; // everything below is hashed
    while done < len {
        // SAFETY: lseek(2) on a descriptor this function owns.
        let data = unsafe { libc::lseek(f.as_raw_fd(), done as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE on {}", path.display());
        let start = (data as u64 / BLOCK * BLOCK).max(done);
        let end = (hole as u64).div_ceil(BLOCK).saturating_mul(BLOCK).min(len);
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos)
                .expect("read for digest");
            for (i, block) in buf[..n].chunks(BLOCK as usize).enumerate() {
                if block != &zeros[..block.len()] {
                    h.update(&(pos + i as u64 * BLOCK).to_le_bytes());
                    h.update(block);
                }
            }
            pos += n as u64;
        }
        done = end;
    }
    h.update(&len.to_le_bytes());
    format!("{:032x}", h.digest128())
}

/// Every regular file of `_base` with its digest.
fn base_digests(cache: &Cache) -> BTreeMap<String, String> {
    Cache::files_in(&cache.base())
        .into_iter()
        .filter(|f| !f.ends_with(".info") && cache.base().join(f).is_file())
        .map(|f| {
            let d = file_digest(&cache.base().join(&f));
            (f, d)
        })
        .collect()
}

/// `debugfs -R 'cat PATH'` on an ext4 image: the file's contents, or None if it is not there.
fn ext4_file(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_exit_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") {
        None
    } else {
        Some(text)
    }
}

/// Boots QEMU (TCG) on the instance's kernel, ramdisk and disks; returns the serial console.
/// A guest still running after [`BOOT_GUARD`] is killed and fails the test with its console.
fn boot(inst: &Path, disks: &[(PathBuf, String)], extra: &[PathBuf], log: &Path) -> String {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-no-reboot", "-serial"])
    .arg(format!("file:{}", log.display()))
    .arg("-kernel")
    .arg(inst.join("kernel"))
    .arg("-initrd")
    .arg(inst.join("ramdisk"))
    .args(["-append", "console=ttyS0 panic=-1 root=/dev/vda quiet"]);
    for (path, format) in disks {
        cmd.arg("-drive")
            .arg(format!("file={},format={format},if=virtio", path.display()));
    }
    for path in extra {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            path.display()
        ));
    }
    // A test binary killed mid-boot (a CI timeout) takes its QEMU with it.
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu");
    let console = || std::fs::read_to_string(log).unwrap_or_default();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait qemu") {
            break status;
        }
        if start.elapsed() > BOOT_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{QEMU} still running after {BOOT_GUARD:?}\n--- console\n{}",
                console()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(
        status.code(),
        Some(0),
        "{QEMU} failed\n--- stderr\n{stderr}\n--- console\n{}",
        console()
    );
    console()
}

/// The `KEY k=v ...` lines of the guest's report, by key.
fn report(console: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    console
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (key, rest) = l.split_once(' ').unwrap_or((l, ""));
            let known = [
                "BOOT-OK",
                "ROOT-WRITE",
                "EPHEMERAL",
                "SWAP",
                "CONFIG-2",
                "BOOT-DONE",
                "BOOT-FAIL",
            ];
            known.contains(&key).then(|| {
                let fields = rest
                    .split_whitespace()
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                (key.to_owned(), fields)
            })
        })
        .collect()
}

/// Uploads the guest (kernel `aki`, initramfs `ari`, root disk as `root_format` with
/// `kernel_id`/`ramdisk_id`), runs `imgcache create --backend BACKEND` with ephemeral and swap
/// disks, boots the result and checks every line of the guest's report, that the guest's write
/// reached the instance's disk and that no `_base` file changed.
fn boot_instance(root_format: &str, backend: &str, instance: &str, drive_format: &str) {
    let g = real();
    let guest = guest();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kid = g.upload(&format!("boot-kernel-{backend}"), "aki", &guest.kernel);
    let rid = g.upload(&format!("boot-ramdisk-{backend}"), "ari", &guest.initrd);
    let root_file = if root_format == "qcow2" {
        let q = tmp.path().join("root.qcow2");
        crate::support::raw_to_qcow2(&guest.root, &q);
        q
    } else {
        guest.root.clone()
    };
    let props = [("kernel_id", kid.as_str()), ("ramdisk_id", rid.as_str())];
    let image = g.upload_with(
        &format!("boot-root-{root_format}"),
        root_format,
        &root_file,
        &props,
    );

    let cache = Cache::new();
    let r = run(cache.create(&g.url, instance, &image).args([
        "--backend",
        backend,
        "--size",
        "64M",
        "--ephemeral",
        "1G",
        "--swap",
        "64M",
        "--config-drive",
        "--config-drive-format",
        drive_format,
        "--hostname",
        "boot-test",
    ]));
    r.assert_code(0);
    let inst = cache.instances().join(instance);
    for f in ["disk", "disk.local", "disk.swap", "kernel", "ramdisk"] {
        assert!(inst.join(f).is_file(), "{f} missing: {}", r.stdout);
    }
    let base = cache.base().join(entry_name(&image));
    if backend == "qcow2" {
        let info = qemu_info(&inst.join("disk"), "qcow2");
        assert_eq!(info["backing-filename"], base.to_str().expect("utf8"));
    }
    let (b, root) = (
        base.to_str().expect("utf8"),
        guest.root.to_str().expect("utf8"),
    );
    qemu_img(&["compare", "-q", "-f", "raw", "-F", "raw", b, root]);
    for (f, want) in [("kernel", &guest.kernel), ("ramdisk", &guest.initrd)] {
        let same = std::fs::read(inst.join(f)).expect(f) == std::fs::read(want).expect("guest");
        assert!(same, "{f} differs from {}", want.display());
    }
    let disk_info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(inst.join("disk.info")).expect("disk.info"))
            .expect("disk.info json");
    let disks: Vec<(PathBuf, String)> = ["disk", "disk.local", "disk.swap"]
        .iter()
        .map(|f| {
            let p = inst.join(f);
            let fmt = disk_info[p.to_str().expect("utf8")]
                .as_str()
                .unwrap_or_else(|| panic!("{f} not in disk.info: {disk_info}"))
                .to_owned();
            assert_eq!(fmt, backend, "{f}: {disk_info}");
            (p, fmt)
        })
        .collect();
    let before = base_digests(&cache);
    assert!(before.contains_key(&entry_name(&image)), "{before:?}");
    assert!(
        before.keys().any(|k| k.starts_with("ephemeral_1_")),
        "{before:?}"
    );
    assert!(before.contains_key("swap_64"), "{before:?}");

    // The config drive `create --config-drive` made, listed in disk.info as raw.
    let config = inst.join("disk.config");
    assert_eq!(
        disk_info[config.to_str().expect("utf8")],
        "raw",
        "{disk_info}"
    );

    let console = boot(&inst, &disks, &[config], &tmp.path().join("console.log"));
    let rep = report(&console);
    let get = |key: &str, field: &str| -> String {
        rep.get(key)
            .and_then(|fields| fields.get(field))
            .cloned()
            .unwrap_or_else(|| panic!("no {field}= in a {key} line\n--- console\n{console}"))
    };
    assert!(!rep.contains_key("BOOT-FAIL"), "{console}");
    assert!(
        get("BOOT-OK", "kernel").ends_with("-cloud-amd64"),
        "{console}"
    );
    assert_eq!(get("BOOT-OK", "root"), "/dev/vda", "{console}");
    assert_eq!(get("BOOT-OK", "rootfs"), "ext4", "{console}");
    assert_eq!(get("BOOT-OK", "size"), (64 * MIB).to_string(), "{console}");
    assert_eq!(get("ROOT-WRITE", "file"), "/boot-marker", "{console}");
    assert_eq!(get("EPHEMERAL", "dev"), "/dev/vdb", "{console}");
    assert_eq!(get("EPHEMERAL", "fs"), "ext4", "{console}");
    assert_eq!(
        get("EPHEMERAL", "size"),
        (1u64 << 30).to_string(),
        "{console}"
    );
    assert_eq!(get("EPHEMERAL", "write"), "ok", "{console}");
    assert_eq!(get("SWAP", "dev"), "/dev/vdc", "{console}");
    assert_eq!(get("SWAP", "size"), (64 * MIB).to_string(), "{console}");
    let swap_kib = get("SWAP", "kib");
    assert!(
        swap_kib.parse::<u64>().is_ok_and(|k| k > 60 * 1024),
        "{console}"
    );
    assert_eq!(get("CONFIG-2", "dev"), "/dev/vdd", "{console}");
    assert_eq!(get("CONFIG-2", "fs"), drive_format, "{console}");
    assert_eq!(get("CONFIG-2", "uuid"), instance, "{console}");
    assert!(rep.contains_key("BOOT-DONE"), "{console}");

    // The write is in the instance's disk, and in nothing of the cache.
    let root_raw = if backend == "qcow2" {
        let flat = tmp.path().join("disk.flat");
        crate::support::qcow2_to_raw(&inst.join("disk"), &flat);
        flat
    } else {
        inst.join("disk")
    };
    let marker = ext4_file(&root_raw, "/boot-marker").expect("/boot-marker in the disk");
    assert!(marker.starts_with("written by "), "{marker:?}");
    assert_eq!(ext4_file(&base, "/boot-marker"), None, "base was written");
    assert_eq!(base_digests(&cache), before, "a _base file changed");
}

#[test]
fn guest_boots_a_qcow2_overlay_of_a_qcow2_image() {
    boot_instance(
        "qcow2",
        "qcow2",
        "5b3ad4a4-5a1e-4f0e-9d57-0c1a4e3b7a01",
        "iso9660",
    );
}

#[test]
fn guest_boots_a_raw_copy_of_a_raw_image() {
    boot_instance("raw", "raw", "8e0c2f7d-2b6a-4c39-a1f4-7d9e5b6c3a02", "vfat");
}
