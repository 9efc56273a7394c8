//! What an operator meets first: a mistyped instances path is an error, size caps as operators
//! think of them (`--max-size 80%`), and the usage scan's reading of instance directories it did
//! not make (Nova's): backing files spelled another way, `libvirt.xml`, AMI kernel copies,
//! resized originals, record-less qcow2 bases, orphan records.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::support::fault_server::{FaultServer, Image};
use crate::support::{Cache, entry_name, imgcache, make_qcow2, run, test_bytes};

fn aged(path: &Path, secs: u64) {
    std::fs::File::open(path)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

fn prune_json(instances: &Path, extra: &[&str]) -> serde_json::Value {
    let r = run(imgcache()
        .args(["prune", "--json", "--instances-path"])
        .arg(instances)
        .args(extra));
    r.assert_code(0);
    serde_json::from_str(&r.stdout).unwrap()
}

fn action<'a>(report: &'a serde_json::Value, list: &str, name: &str) -> &'a str {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report}"))["action"]
        .as_str()
        .unwrap()
}

#[test]
fn a_missing_instances_path_is_an_error_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("var/lib/nova/instancse");
    for cmd in ["list", "prune", "verify"] {
        let r = run(imgcache().arg(cmd).arg("--instances-path").arg(&typo));
        r.assert_code(18);
        assert!(
            r.stderr.contains("does not exist") && r.stderr.contains("--allow-missing"),
            "{cmd}: {}",
            r.stderr
        );
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        let r = run(imgcache()
            .arg(cmd)
            .arg("--instances-path")
            .arg(&typo)
            .arg("--allow-missing"));
        r.assert_code(0);
        assert!(!typo.exists(), "{cmd} created nothing");
    }
}

#[test]
fn max_size_as_a_share_of_the_filesystem() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let name = entry_name("a");
    let entry = cache.base().join(&name);
    std::fs::write(&entry, test_bytes(1 << 20, 1)).unwrap();
    // Young (age pass keeps it): only the size pass can remove it.
    let report = prune_json(cache.instances(), &["--max-size", "100%"]);
    assert_eq!(action(&report, "entries", &name), "kept");
    let report = prune_json(cache.instances(), &["--max-size", "0%"]);
    assert_eq!(action(&report, "entries", &name), "removed", "{report}");
    assert_eq!(report["max_size"], 0);
    let r = run(imgcache()
        .args(["prune", "--max-size", "120%", "--instances-path"])
        .arg(cache.instances()));
    r.assert_code(2);
    assert!(r.stderr.contains("--max-size"), "{}", r.stderr);
}

/// A qcow2 overlay `disk` in `dir` backed by `backing` (spelled as given).
fn overlay(dir: &Path, file: &str, backing: &str) {
    std::fs::create_dir_all(dir).unwrap();
    crate::support::qcow2::overlay_of(&dir.join(file), backing, "raw", "64M");
}

#[test]
fn nova_instances_keep_what_they_use_however_their_paths_are_spelled() {
    let cache = Cache::new();
    let inst = cache.instances();
    std::fs::create_dir_all(cache.base()).unwrap();
    let old = 30 * 86_400;
    let mut names = Vec::new();
    for (i, id) in ["via-link", "flat", "kernel", "ramdisk", "resized", "unused"]
        .iter()
        .enumerate()
    {
        let len = if *id == "kernel" || *id == "ramdisk" {
            4096 + i
        } else {
            65536
        };
        let p = cache.base().join(entry_name(id));
        std::fs::write(&p, test_bytes(len, i as u64)).unwrap();
        names.push((id.to_string(), p));
    }
    let resized = cache.base().join(format!("{}_10", entry_name("resized")));
    std::fs::write(&resized, test_bytes(65536, 77)).unwrap();
    // 1. A qcow2 instance whose backing file goes through a symlink to the instances path.
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("nova-instances");
    std::os::unix::fs::symlink(inst, &link).unwrap();
    overlay(
        &inst.join("vm-link"),
        "disk",
        link.join("_base")
            .join(entry_name("via-link"))
            .to_str()
            .unwrap(),
    );
    // 2. A Flat instance: a raw copy, named only by libvirt.xml.
    let flat = inst.join("vm-flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::write(flat.join("disk"), test_bytes(65536, 1)).unwrap();
    std::fs::write(
        flat.join("disk.info"),
        format!(r#"{{"{}": "raw"}}"#, flat.join("disk").display()),
    )
    .unwrap();
    std::fs::write(
        flat.join("libvirt.xml"),
        r#"<domain type="kvm"><metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:root type="image" uuid="flat"/></nova:instance></metadata></domain>"#,
    )
    .unwrap();
    // 3. An AMI instance: kernel and ramdisk copies beside its disk.
    let ami = inst.join("vm-ami");
    std::fs::create_dir_all(&ami).unwrap();
    std::fs::copy(cache.base().join(entry_name("kernel")), ami.join("kernel")).unwrap();
    std::fs::copy(
        cache.base().join(entry_name("ramdisk")),
        ami.join("ramdisk"),
    )
    .unwrap();
    // 4. A disk on a legacy resized base.
    overlay(&inst.join("vm-resized"), "disk", resized.to_str().unwrap());
    for (_, p) in &names {
        aged(p, old);
    }
    aged(&resized, old);

    let report = prune_json(inst, &[]);
    for id in ["via-link", "flat", "kernel", "ramdisk", "resized"] {
        assert_eq!(
            action(&report, "entries", &entry_name(id)),
            "kept",
            "{id}: {report}"
        );
    }
    assert_eq!(action(&report, "entries", &entry_name("unused")), "removed");
    assert!(resized.exists());
    for id in ["via-link", "flat", "kernel", "ramdisk", "resized"] {
        assert!(cache.base().join(entry_name(id)).exists(), "{id}");
    }
}

#[test]
fn an_unreadable_disk_means_nothing_is_removed() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let unused = cache.base().join(entry_name("unused"));
    std::fs::write(&unused, test_bytes(4096, 3)).unwrap();
    aged(&unused, 30 * 86_400);
    // A truncated qcow2: its header names a backing file past the end of what is there, so
    // what it is backed by is unknown.
    let vm = cache.instances().join("vm");
    std::fs::create_dir_all(&vm).unwrap();
    let mut header = b"QFI\xfb".to_vec();
    header.extend_from_slice(&3u32.to_be_bytes());
    header.extend_from_slice(&0x10000u64.to_be_bytes());
    header.extend_from_slice(&16u32.to_be_bytes());
    std::fs::write(vm.join("disk"), &header).unwrap();
    let r = run(imgcache()
        .args(["prune", "--json", "--instances-path"])
        .arg(cache.instances()));
    r.assert_code(0);
    assert!(r.stderr.contains("removing no entry"), "{}", r.stderr);
    assert!(unused.exists());
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(action(&report, "entries", &entry_name("unused")), "kept");
}

#[test]
fn orphan_records_are_pruned_under_the_lock() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let name = entry_name("gone");
    let record = cache.base().join(format!("{name}.info"));
    std::fs::write(&record, br#"{"sha1": "legacy nova record"}"#).unwrap();
    let nova_lock = cache.instances().join("locks").join(format!("nova-{name}"));
    {
        let _nova = crate::support::LockfHold::take(&nova_lock);
        let report = prune_json(cache.instances(), &[]);
        assert_eq!(action(&report, "temps", &format!("{name}.info")), "busy");
        assert!(record.exists());
    }
    let report = prune_json(cache.instances(), &[]);
    assert_eq!(action(&report, "temps", &format!("{name}.info")), "removed");
    assert!(!record.exists());
    assert!(nova_lock.exists());
}

#[test]
fn a_record_less_qcow2_base_is_inspected_not_assumed_raw() {
    let work = tempfile::tempdir().unwrap();
    let data = test_bytes(1 << 20, 5);
    let (_, qcow) = make_qcow2(work.path(), "img", &data);
    // A base Nova made with force_raw_images = False: qcow2, no imgcache record.
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    std::fs::copy(&qcow, cache.base().join(entry_name("img"))).unwrap();
    let srv = FaultServer::start(Image::raw("img", data.clone()));
    let create = |backend: &str| {
        run(imgcache()
            .args(["create", "--instances-path"])
            .arg(cache.instances())
            .args([
                "--glance-url",
                &srv.url,
                "--image",
                "img",
                "--backend",
                backend,
            ])
            .arg(format!("vm-{backend}")))
    };
    let r = create("qcow2");
    r.assert_code(0);
    assert!(r.stderr.contains("is qcow2, not raw"), "{}", r.stderr);
    let info = crate::support::qemu_info(&cache.instances().join("vm-qcow2/disk"), "qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    let r = create("raw");
    r.assert_code(2); // a raw disk is never a verbatim copy of a qcow2 base
    assert!(r.stderr.contains("qcow2"), "{}", r.stderr);
    assert!(!cache.instances().join("vm-raw/disk").exists());
}

#[test]
fn a_flat_nova_instance_is_known_by_the_domain_libvirt_keeps() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let base = cache.base().join(entry_name("flat-image"));
    std::fs::write(&base, test_bytes(65536, 9)).unwrap();
    aged(&base, 30 * 86_400);
    let other = cache.base().join(entry_name("elsewhere"));
    std::fs::write(&other, test_bytes(65536, 10)).unwrap();
    aged(&other, 30 * 86_400);
    // Nova's Flat instance: a raw copy, nothing in its directory names the image.
    let vm = cache
        .instances()
        .join("3f0c9c87-0000-4000-8000-000000000001");
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::write(vm.join("disk"), test_bytes(65536, 9)).unwrap();
    // libvirt's definition of it, spelling the instances path through a link.
    let etc = tempfile::tempdir().unwrap();
    let link = etc.path().join("nova-instances");
    std::os::unix::fs::symlink(cache.instances(), &link).unwrap();
    let domain = format!(
        r#"<domain type="kvm"><name>instance-00000001</name><metadata>
<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
<nova:root type="image" uuid="flat-image"/></nova:instance></metadata>
<devices><disk type="file" device="disk"><driver name="qemu" type="raw"/>
<source file="{}/3f0c9c87-0000-4000-8000-000000000001/disk"/></disk>
<disk type="file"><source file="/var/lib/other-host/x/disk"/></disk></devices></domain>"#,
        link.display()
    );
    let defs = etc.path().join("qemu");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(defs.join("instance-00000001.xml"), domain).unwrap();
    let r = run(imgcache()
        .args(["prune", "--json", "--instances-path"])
        .arg(cache.instances())
        .env("IMGCACHE_LIBVIRT_DIR", &defs));
    r.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        action(&report, "entries", &entry_name("flat-image")),
        "kept"
    );
    assert_eq!(
        action(&report, "entries", &entry_name("elsewhere")),
        "removed"
    );
    assert!(base.exists());
}
