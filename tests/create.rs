//! `imgcache create` / `delete` against a real Glance, real qemu-img, real files.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::support::glance::real;
use crate::support::{Cache, entry_name, make_qcow2, qemu_img, qemu_info, run, test_bytes};

const MIB: u64 = 1 << 20;

/// A qcow2 image in Glance whose raw form is `raw`; returns (id, raw bytes).
fn qcow2_image(name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let raw = test_bytes(len, seed);
    let (_, qcow) = make_qcow2(tmp.path(), name, &raw);
    (real().upload(name, "qcow2", &qcow), raw)
}

fn raw_image(name: &str, data: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join(name);
    std::fs::write(&f, data).unwrap();
    real().upload(name, "raw", &f)
}

fn compare(disk: &Path, disk_fmt: &str, base: &Path) {
    // Over the base's length the disk equals the base; the extension must read as zeros
    // (qemu-img compare checks the extra space of the larger image is unallocated or zero).
    qemu_img(&[
        "compare",
        "-f",
        disk_fmt,
        "-F",
        "raw",
        disk.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
}

#[test]
fn qcow2_and_raw_disks_from_qcow2_and_raw_images() {
    let g = real();
    let (qid, _) = qcow2_image("create-q", 3 * MIB as usize, 41);
    let rid = raw_image("create-r", &test_bytes(2 * MIB as usize, 42));
    let cache = Cache::new();
    for (inst, id, backend) in [
        ("vm-qq", &qid, "qcow2"),
        ("vm-qr", &qid, "raw"),
        ("vm-rq", &rid, "qcow2"),
        ("vm-rr", &rid, "raw"),
    ] {
        let r = run(cache
            .create(&g.url, inst, id)
            .args(["--backend", backend, "--size", "64M"]));
        r.assert_code(0);
        let disk = cache.instances().join(inst).join("disk");
        assert_eq!(r.stdout, format!("{}\n", disk.display()));
        let base = cache.base().join(entry_name(id));
        let info = qemu_info(&disk, backend);
        assert_eq!(info["format"], backend);
        assert_eq!(info["virtual-size"], 64 * MIB);
        if backend == "qcow2" {
            assert_eq!(info["backing-filename"], base.to_str().unwrap());
            assert_eq!(info["backing-filename-format"], "raw");
        } else {
            assert!(info.get("backing-filename").is_none());
        }
        compare(&disk, backend, &base);
        let disk_info: serde_json::Value = serde_json::from_slice(
            &std::fs::read(cache.instances().join(inst).join("disk.info")).unwrap(),
        )
        .unwrap();
        assert_eq!(disk_info[disk.to_str().unwrap()], backend);
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(cache.instances().join(inst).join("imgcache.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(record["bases"], serde_json::json!([entry_name(id)]));
    }
}

#[test]
fn raw_copy_of_a_sparse_base_stays_sparse() {
    let g = real();
    // 2 GiB virtual with a few MiB of data: uploaded as a small qcow2, cached as sparse raw.
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let data = test_bytes(4 * MIB as usize, 43);
    let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(700 * MIB)).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    drop(f);
    let qcow = tmp.path().join("big.qcow2");
    crate::support::raw_to_qcow2(&raw, &qcow);
    let id = g.upload("sparse-2g", "qcow2", &qcow);
    let cache = Cache::new();
    run(cache
        .create(&g.url, "vm-sparse", &id)
        .args(["--backend", "raw", "--size", "4G"]))
    .assert_code(0);
    let base = cache.base().join(entry_name(&id));
    let disk = cache.instances().join("vm-sparse/disk");
    let base_alloc = std::fs::metadata(&base).unwrap().blocks() * 512;
    let disk_alloc = std::fs::metadata(&disk).unwrap().blocks() * 512;
    assert!(base_alloc < 16 * MIB, "base allocated {base_alloc}");
    assert!(
        disk_alloc <= base_alloc + 4 * MIB,
        "disk allocated {disk_alloc}, base {base_alloc}"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 4 << 30);
    compare(&disk, "raw", &base);
}

#[test]
fn sizes_shrink_refused_zero_means_image_size() {
    let g = real();
    let id = raw_image("create-size", &test_bytes(8 * MIB as usize, 44));
    let cache = Cache::new();
    let r = run(cache.create(&g.url, "vm-small", &id).args(["--size", "4M"]));
    r.assert_code(2);
    assert!(
        r.stderr.contains("4194304") && r.stderr.contains("8388608"),
        "{}",
        r.stderr
    );
    assert!(
        !cache.instances().join("vm-small").exists(),
        "no instance dir left behind"
    );

    run(cache.create(&g.url, "vm-zero", &id).args(["--size", "0"])).assert_code(0);
    let info = qemu_info(&cache.instances().join("vm-zero/disk"), "qcow2");
    assert_eq!(info["virtual-size"], 8 * MIB);

    for bad in ["12XB", "1.5G", "-3"] {
        let r = run(cache
            .create(&g.url, "vm-bad", &id)
            .arg(format!("--size={bad}")));
        r.assert_code(2);
        assert!(r.stderr.contains("invalid --size"), "{}", r.stderr);
    }
    let r = run(cache
        .create(&g.url, "vm-bad", &id)
        .args(["--ephemeral", "1500M"]));
    r.assert_code(2);
    assert!(r.stderr.contains("whole number of GiB"), "{}", r.stderr);
}

#[test]
fn instance_names_cannot_escape_the_instances_path() {
    let g = real();
    let cache = Cache::new();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), cache.instances().join("linked")).unwrap();
    for name in ["..", "/etc", "a/b", "_base", "locks", "linked"] {
        let r = run(&mut cache.create(&g.url, name, "some-image"));
        r.assert_code(2);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        let r = run(crate::support::imgcache()
            .arg("delete")
            .arg("--instances-path")
            .arg(cache.instances())
            .arg(name));
        assert_eq!(r.code, 2, "delete {name}: {}", r.stderr);
    }
    assert!(crate::support::Cache::files_in(outside.path()).is_empty());
}

#[test]
fn rerun_is_idempotent_and_mismatch_needs_force() {
    let g = real();
    let id = raw_image("create-idem", &test_bytes(MIB as usize, 45));
    let cache = Cache::new();
    run(cache.create(&g.url, "vm-idem", &id).args(["--size", "32M"])).assert_code(0);
    let disk = cache.instances().join("vm-idem/disk");
    let before = std::fs::metadata(&disk).unwrap().ino();
    let r = run(cache
        .create(&g.url, "vm-idem", &id)
        .args(["--size", "32M", "--json"]));
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["disks"][0]["status"], "exists");
    assert_eq!(
        std::fs::metadata(&disk).unwrap().ino(),
        before,
        "left as is"
    );

    let r = run(cache.create(&g.url, "vm-idem", &id).args(["--size", "48M"]));
    r.assert_code(12);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(qemu_info(&disk, "qcow2")["virtual-size"], 32 * MIB);

    let r = run(cache
        .create(&g.url, "vm-idem", &id)
        .args(["--size", "48M", "--force", "--json"]));
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["disks"][0]["status"], "replaced");
    assert_eq!(qemu_info(&disk, "qcow2")["virtual-size"], 48 * MIB);
}

#[test]
fn kernel_and_ramdisk_are_fetched_and_placed() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let kernel = test_bytes(300_000, 46);
    let ramdisk = test_bytes(500_000, 47);
    std::fs::write(tmp.path().join("k"), &kernel).unwrap();
    std::fs::write(tmp.path().join("r"), &ramdisk).unwrap();
    let kid = g.upload("kernel", "aki", &tmp.path().join("k"));
    let rid = g.upload("ramdisk", "ari", &tmp.path().join("r"));
    std::fs::write(tmp.path().join("root"), test_bytes(MIB as usize, 48)).unwrap();
    let root = g.upload_with(
        "ami-root",
        "ami",
        &tmp.path().join("root"),
        &[("kernel_id", &kid), ("ramdisk_id", &rid)],
    );
    let cache = Cache::new();
    let r = run(cache
        .create(&g.url, "vm-ami", &root)
        .args(["--backend", "raw"]));
    r.assert_code(0);
    let dir = cache.instances().join("vm-ami");
    assert!(std::fs::read(dir.join("kernel")).unwrap() == kernel);
    assert!(std::fs::read(dir.join("ramdisk")).unwrap() == ramdisk);
    assert!(cache.base().join(entry_name(&kid)).is_file());
    assert!(cache.base().join(entry_name(&rid)).is_file());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("imgcache.json")).unwrap()).unwrap();
    let bases = record["bases"].as_array().unwrap();
    for id in [&root, &kid, &rid] {
        assert!(
            bases.contains(&serde_json::json!(entry_name(id))),
            "{record}"
        );
    }
}

fn blkid(path: &Path, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-o", "value", "-s", tag])
        .arg(path)
        .output()
        .expect("blkid");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn ephemeral_and_swap_templates_are_real_filesystems() {
    let g = real();
    let id = raw_image("create-eph", &test_bytes(MIB as usize, 49));
    let cache = Cache::new();
    let r = run(cache.create(&g.url, "vm-eph", &id).args([
        "--backend",
        "raw",
        "--ephemeral",
        "1G",
        "--swap",
        "64M",
    ]));
    r.assert_code(0);
    let dir = cache.instances().join("vm-eph");
    assert_eq!(r.stdout.lines().count(), 3, "{}", r.stdout);
    let templates: Vec<String> = cache
        .base_files()
        .into_iter()
        .filter(|f| f.starts_with("ephemeral_") || f.starts_with("swap_"))
        .collect();
    assert_eq!(templates.len(), 2, "{templates:?}");
    assert!(
        templates
            .iter()
            .any(|t| t.starts_with("ephemeral_1_") && t.len() == 19)
    );
    assert!(templates.contains(&"swap_64".to_owned()));
    for f in [dir.join("disk.local"), cache.base().join(&templates[0])] {
        assert_eq!(blkid(&f, "TYPE"), "ext4", "{}", f.display());
        assert_eq!(blkid(&f, "LABEL"), "ephemeral0");
    }
    let dumpe2fs = Command::new("dumpe2fs")
        .arg("-h")
        .arg(dir.join("disk.local"))
        .output()
        .unwrap();
    assert!(dumpe2fs.status.success());
    assert!(String::from_utf8_lossy(&dumpe2fs.stdout).contains("ephemeral0"));
    assert_eq!(blkid(&dir.join("disk.swap"), "TYPE"), "swap");
    assert_eq!(
        std::fs::metadata(dir.join("disk.swap")).unwrap().len(),
        64 * MIB
    );

    // A second instance reuses the templates (built once).
    let before = std::fs::metadata(cache.base().join("swap_64"))
        .unwrap()
        .ino();
    run(cache.create(&g.url, "vm-eph2", &id).args(["--swap", "64M"])).assert_code(0);
    assert_eq!(
        std::fs::metadata(cache.base().join("swap_64"))
            .unwrap()
            .ino(),
        before
    );
    let info = qemu_info(&cache.instances().join("vm-eph2/disk.swap"), "qcow2");
    assert_eq!(
        info["backing-filename"],
        cache.base().join("swap_64").to_str().unwrap()
    );
}

#[test]
fn qemu_img_failing_mid_create_leaves_no_half_disk() {
    let g = real();
    let id = raw_image("create-fail", &test_bytes(MIB as usize, 50));
    let cache = Cache::new();
    // Fetch first with the real qemu-img, then make `create` fail after writing a partial file.
    run(cache.fetch(&g.url).arg(&id)).assert_code(0);
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = tmp.path().join("qemu-img");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nif [ \"$1\" = create ]; then\n  for a; do case \"$a\" in */.disk.tmp-*) echo partial > \"$a\";; esac; done\n  echo 'qemu-img: simulated failure' >&2; exit 1\nfi\nexec qemu-img \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let r = run(cache
        .create(&g.url, "vm-fail", &id)
        .env("IMGCACHE_OVERLAY_WRITER", "qemu-img")
        .env("IMGCACHE_QEMU_IMG", &wrapper));
    r.assert_code(11);
    assert!(r.stderr.contains("simulated failure"), "{}", r.stderr);
    assert!(
        !cache.instances().join("vm-fail").exists(),
        "instance dir removed"
    );

    // In an existing instance directory, only what this run made is removed.
    let dir = cache.instances().join("vm-fail2");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("console.log"), b"keep me").unwrap();
    let r = run(cache
        .create(&g.url, "vm-fail2", &id)
        .env("IMGCACHE_OVERLAY_WRITER", "qemu-img")
        .env("IMGCACHE_QEMU_IMG", &wrapper));
    r.assert_code(11);
    assert_eq!(Cache::files_in(&dir), vec!["console.log".to_owned()]);
}

#[test]
fn delete_removes_the_instance_and_refuses_strangers() {
    let g = real();
    let id = raw_image("create-del", &test_bytes(MIB as usize, 51));
    let cache = Cache::new();
    run(&mut cache.create(&g.url, "vm-del", &id)).assert_code(0);
    let delete = |name: &str, extra: &[&str]| {
        run(crate::support::imgcache()
            .arg("delete")
            .arg("--instances-path")
            .arg(cache.instances())
            .args(extra)
            .arg(name))
    };
    delete("vm-del", &[]).assert_code(0);
    assert!(!cache.instances().join("vm-del").exists());
    assert!(
        cache.base().join(entry_name(&id)).is_file(),
        "the base stays"
    );
    delete("vm-del", &[]).assert_code(0);

    std::fs::create_dir(cache.instances().join("not-a-vm")).unwrap();
    let r = delete("not-a-vm", &[]);
    r.assert_code(2);
    assert!(
        r.stderr.contains("does not look like an instance"),
        "{}",
        r.stderr
    );
    delete("not-a-vm", &["--force"]).assert_code(0);
    assert!(!cache.instances().join("not-a-vm").exists());
}
