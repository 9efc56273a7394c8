//! imgcache beside a real nova-compute on the same instances path: Nova's own lock
//! (`locks/nova-<name>`, taken through oslo.concurrency/fasteners with `fcntl.lockf`), Nova's own
//! image cache manager over trees imgcache helped make, imgcache prune over instances Nova made,
//! and Nova's `fetch_to_raw` racing `imgcache fetch` for one image. Nova runs from the venv of
//! `scripts/nova/install` (tests/support/nova.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::support::fault_server::{FaultServer, Image};
use crate::support::glance::real;
use crate::support::nova::{self, NovaFetch, NovaLock};
use crate::support::proxy::Proxy;
use crate::support::{
    Cache, assert_exit_ok, entry_name, imgcache, make_qcow2, qemu_img, run_guarded, test_bytes,
};

const DAY: u64 = 86_400;
const GUARD: Duration = Duration::from_secs(60);
const WAITING: &str = "held by another process, possibly nova-compute";

/// Nova's ephemeral template for a flavor with `gb` of ephemeral disk and the defaults
/// (no `virt_mkfs`, no `default_ephemeral_format`): `ephemeral_<GB>_<md5("vfat")[:7]>`.
fn nova_ephemeral(gb: u64) -> String {
    format!("ephemeral_{gb}_{}", &crate::support::md5_hex(b"vfat")[..7])
}

fn age(path: &Path, secs: u64) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// A file of `len` test bytes in `_base`, aged `secs`.
fn base_file(cache: &Cache, name: &str, len: usize, secs: u64) -> PathBuf {
    std::fs::create_dir_all(cache.base()).unwrap();
    let p = cache.base().join(name);
    std::fs::write(&p, test_bytes(len, len as u64 ^ 7)).unwrap();
    age(&p, secs);
    p
}

/// `qemu-img create -f qcow2 -F raw -b BACKING DISK` (the size is the backing file's).
fn overlay(disk: &Path, backing: &Path) {
    crate::support::qcow2::overlay_of(disk, backing.to_str().unwrap(), "raw", "");
}

/// An instance directory the way Nova's Qcow2 backend leaves it: `disk` (and optionally
/// `disk.local`, `disk.swap`) as qcow2 overlays on the given backing paths, plus `disk.info`.
fn nova_instance(root: &Path, uuid: &str, disks: &[(&str, &Path)]) -> PathBuf {
    let dir = root.join(uuid);
    std::fs::create_dir_all(&dir).unwrap();
    let mut info = serde_json::Map::new();
    for (name, backing) in disks {
        let disk = dir.join(name);
        overlay(&disk, backing);
        info.insert(disk.to_str().unwrap().to_owned(), "qcow2".into());
    }
    std::fs::write(
        dir.join("disk.info"),
        serde_json::Value::Object(info).to_string(),
    )
    .unwrap();
    dir
}

/// `mount --bind SRC` on a fresh temp dir, unmounted on drop (tests run as root, as CI does).
struct BindMount {
    dir: Option<tempfile::TempDir>,
}

impl BindMount {
    #[track_caller]
    fn new(src: &Path) -> BindMount {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(src)
            .arg(dir.path())
            .status()
            .expect("mount (tests need root)");
        assert!(st.success(), "mount --bind failed: these tests need root");
        BindMount { dir: Some(dir) }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap()
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Never let TempDir's removal walk into a still-mounted instances path.
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

fn lock_file(cache: &Cache, prefix: &str, name: &str) -> PathBuf {
    cache
        .instances()
        .join("locks")
        .join(format!("{prefix}{name}"))
}

fn prune_json(cache: &Cache, extra: &[&str]) -> (crate::support::Run, serde_json::Value) {
    let r = run_guarded(
        imgcache()
            .arg("prune")
            .arg("--instances-path")
            .arg(cache.instances())
            .args(["--json", "--min-age", "0s", "--min-age-resized", "0s"])
            .args(["--temp-age", "0s"])
            .args(extra),
        GUARD,
    );
    let v = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("prune --json ({e}): {}\n--- stderr\n{}", r.stdout, r.stderr));
    (r, v)
}

/// The action prune reported for the item named `name` in `list` ("entries" or "temps").
#[track_caller]
fn action<'a>(v: &'a serde_json::Value, list: &str, name: &str) -> &'a str {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {v}"))
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not among the {list} of {v}"))["action"]
        .as_str()
        .unwrap()
}

/// Waits up to 10 s for `path` to exist.
#[track_caller]
fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- the harness: Nova's lock and Nova's fetch_to_raw on their own ---------------------------

#[test]
fn novas_lock_is_a_posix_lockf_lock_on_locks_nova_name() {
    let cache = Cache::new();
    let name = entry_name("nova-lock-itself");
    let path = lock_file(&cache, "nova-", &name);
    let held = NovaLock::hold(cache.instances(), &name);
    assert!(!nova::try_lock(cache.instances(), &name));
    // A POSIX record lock (fcntl.lockf) names its holder's pid; OFD locks conflict with it.
    match nova::ofd_conflict(&path).unwrap() {
        Some((t, pid, 0, 0)) => assert!(t == libc::F_WRLCK && pid > 0, "{t} {pid}"),
        other => panic!("no whole-file lock on {}: {other:?}", path.display()),
    }
    held.release();
    assert_eq!(nova::ofd_conflict(&path).unwrap(), None);
    assert!(nova::try_lock(cache.instances(), &name));
}

#[test]
fn novas_fetch_to_raw_alone_makes_the_entry_once() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let raw = test_bytes(1 << 20, 83);
    let (_, qcow) = make_qcow2(tmp.path(), "alone", &raw);
    let id = g.upload("nova-alone-qcow2", "qcow2", &qcow);
    let proxy = Proxy::start(&g.url, Duration::ZERO, None);
    let cache = Cache::new();
    for expect_download in [true, false] {
        let (code, downloaded, err) = NovaFetch::ready(cache.instances(), &proxy.url, &id).wait();
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(downloaded, Some(expect_download), "{err}");
    }
    assert_eq!(file_gets(&proxy), 1);
    let entry = cache.base().join(entry_name(&id));
    assert!(
        std::fs::read(&entry).unwrap() == raw,
        "Nova converted it to raw"
    );
    assert_eq!(cache.base_files(), vec![entry_name(&id)]);
    assert!(lock_file(&cache, "nova-", &entry_name(&id)).exists());
}

// ---- 1. the lock protocol -------------------------------------------------------------------

#[test]
fn fetch_waits_for_novas_lock_and_times_out_with_exit_8() {
    let id = "nova-lock-fetch";
    let data = test_bytes(256 << 10, 61);
    let srv = FaultServer::start(Image::raw(id, data.clone()));
    let cache = Cache::new();
    let name = entry_name(id);
    // A download Nova (or a killed imgcache) left half done: not to be resumed under Nova's lock.
    let part = base_file(&cache, &format!("{name}.part"), 0, 0);
    std::fs::write(&part, &data[..64 << 10]).unwrap();
    let part_mtime = mtime(&part);
    let held = NovaLock::hold(cache.instances(), &name);
    let r = run_guarded(
        cache.fetch(&srv.url).args(["--lock-timeout", "500ms", id]),
        GUARD,
    );
    r.assert_code(8);
    assert!(r.stderr.contains("waiting for the lock on"), "{}", r.stderr);
    assert_eq!(r.stderr.matches(WAITING).count(), 1, "{}", r.stderr);
    assert!(
        srv.file_requests().is_empty(),
        "nothing is downloaded while Nova holds the lock"
    );
    assert!(!cache.base().join(&name).exists());
    assert!(
        std::fs::read(&part).unwrap() == data[..64 << 10] && mtime(&part) == part_mtime,
        "the .part under Nova's lock was touched"
    );
    held.release();

    let r = run_guarded(cache.fetch(&srv.url).arg(id), GUARD);
    r.assert_code(0);
    assert!(!r.stderr.contains("waiting for the lock"), "{}", r.stderr);
    assert!(
        lock_file(&cache, "nova-", &name).exists(),
        "imgcache never deletes Nova's lock files"
    );
}

#[test]
fn nova_cannot_take_the_lock_while_imgcache_fetches() {
    let id = "nova-lock-reverse";
    let srv = FaultServer::start(Image::raw(id, test_bytes(4 << 20, 62)));
    // 64 chunks of 64 KiB, one per 60 ms: the fetch takes about 4 s, longer than the probes
    // (a Python start each) on a busy machine.
    srv.pace(Some(Duration::from_millis(60)));
    let cache = Cache::new();
    let name = entry_name(id);
    let child = cache
        .fetch(&srv.url)
        .arg(id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&cache.base().join(format!("{name}.part")));

    let free = nova::try_lock(cache.instances(), &name);
    let nova_lock = lock_file(&cache, "nova-", &name);
    let ofd = nova::ofd_conflict(&nova_lock);
    let own = nova::flock_held(&lock_file(&cache, "imgcache-", &name));
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the fetch ended before the probes did: slow the server down further"
    );
    let out = child.wait_with_output().unwrap();
    assert_exit_ok(&out);
    assert!(
        !free,
        "Nova's non-blocking acquire of {} succeeded while imgcache was fetching",
        nova_lock.display()
    );
    let ofd = ofd.unwrap_or_else(|e| panic!("{}: {e}", nova_lock.display()));
    assert_eq!(
        ofd,
        Some((libc::F_WRLCK, -1, 0, 0)),
        "an exclusive open-file-description lock over the whole file"
    );
    assert!(own, "imgcache holds its own lock as well");

    assert!(
        nova::try_lock(cache.instances(), &name),
        "Nova gets the lock once imgcache is done"
    );
    assert!(
        nova_lock.exists(),
        "imgcache never deletes Nova's lock files"
    );
}

#[test]
fn prune_reports_entries_and_temps_novas_lock_holds_as_busy() {
    let cache = Cache::new();
    let held_entry = entry_name("nova-busy-entry");
    let free_entry = entry_name("nova-free-entry");
    let held_part = entry_name("nova-busy-part");
    let held_converted = entry_name("nova-busy-converted");
    let free_part = entry_name("nova-free-part");
    base_file(&cache, &held_entry, 4096, 3 * DAY);
    base_file(&cache, &free_entry, 4096, 3 * DAY);
    base_file(&cache, &format!("{held_part}.part"), 4096, 3 * DAY);
    base_file(
        &cache,
        &format!("{held_converted}.converted"),
        4096,
        3 * DAY,
    );
    base_file(&cache, &format!("{free_part}.part"), 4096, 3 * DAY);
    // Nova leaves its lock file behind a base it made.
    std::fs::create_dir_all(cache.instances().join("locks")).unwrap();
    std::fs::write(lock_file(&cache, "nova-", &free_entry), b"").unwrap();
    let holders =
        [&held_entry, &held_part, &held_converted].map(|n| NovaLock::hold(cache.instances(), n));

    let (r, v) = prune_json(&cache, &[]);
    r.assert_code(0);
    assert_eq!(action(&v, "entries", &held_entry), "busy");
    assert_eq!(action(&v, "entries", &free_entry), "removed");
    assert_eq!(action(&v, "temps", &format!("{held_part}.part")), "busy");
    assert_eq!(
        action(&v, "temps", &format!("{held_converted}.converted")),
        "busy"
    );
    assert_eq!(action(&v, "temps", &format!("{free_part}.part")), "removed");
    for kept in [
        held_entry.clone(),
        format!("{held_part}.part"),
        format!("{held_converted}.converted"),
    ] {
        assert!(cache.base().join(&kept).exists(), "{kept} was removed");
    }
    drop(holders);
    for n in [&held_entry, &free_entry, &held_part, &held_converted] {
        assert!(
            lock_file(&cache, "nova-", n).exists(),
            "prune removed Nova's lock file of {n}"
        );
    }

    // Released: the next prune removes them.
    let (r, v) = prune_json(&cache, &[]);
    r.assert_code(0);
    assert_eq!(action(&v, "entries", &held_entry), "removed");
    assert!(!cache.base().join(&held_entry).exists());
}

#[test]
fn templates_wait_for_novas_lock() {
    let id = "nova-lock-templates";
    let srv = FaultServer::start(Image::raw(id, test_bytes(1 << 20, 63)));
    // imgcache's own template name for a 1 GiB ext4 ephemeral disk, from a scratch cache.
    let scratch = Cache::new();
    run_guarded(
        scratch
            .create(&srv.url, "vm-scratch", id)
            .args(["--ephemeral", "1G"]),
        GUARD,
    )
    .assert_code(0);
    let eph = scratch
        .base_files()
        .into_iter()
        .find(|f| f.starts_with("ephemeral_1_"))
        .expect("an ephemeral template");

    let cache = Cache::new();
    run_guarded(cache.fetch(&srv.url).arg(id), GUARD).assert_code(0);
    for (name, flags) in [
        (eph.as_str(), ["--ephemeral", "1G"]),
        ("swap_64", ["--swap", "64M"]),
    ] {
        let held = NovaLock::hold(cache.instances(), name);
        let r = run_guarded(
            cache
                .create(&srv.url, &format!("vm-{name}"), id)
                .args(flags)
                .args(["--lock-timeout", "500ms"]),
            GUARD,
        );
        r.assert_code(8);
        assert_eq!(r.stderr.matches(WAITING).count(), 1, "{}", r.stderr);
        assert!(
            !cache.base().join(name).exists(),
            "{name} was built under Nova's lock"
        );
        held.release();
        assert!(lock_file(&cache, "nova-", name).exists());
    }
}

// ---- 2. Nova's own image cache manager ------------------------------------------------------

/// An instances path holding bases `imgcache fetch` made from the real Glance (with their
/// records and lock files), Nova-style instances on them, Nova-named templates, one unused base.
struct Tree {
    cache: Cache,
    /// Image ids: raw (used by instance A), qcow2 (used by B), raw (unused), raw (used by an
    /// instance imgcache made, not in Nova's database), kernel and ramdisk (of A).
    raw: String,
    qcow: String,
    unused: String,
    by_imgcache: String,
    kernel: String,
    ramdisk: String,
    db: serde_json::Value,
}

fn tree(tag: &str) -> Tree {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let upload = |name: &str, format: &str, seed: u64| {
        let f = tmp.path().join(format!("{name}.{format}"));
        std::fs::write(&f, test_bytes(1 << 20, seed)).unwrap();
        g.upload(&format!("{tag}-{name}"), format, &f)
    };
    let raw = upload("raw", "raw", 71);
    let unused = upload("unused", "raw", 72);
    let by_imgcache = upload("by-imgcache", "raw", 73);
    let kernel = upload("kernel", "aki", 75);
    let ramdisk = upload("ramdisk", "ari", 76);
    let (_, q) = make_qcow2(tmp.path(), "qcow", &test_bytes(2 << 20, 74));
    let qcow = g.upload(&format!("{tag}-qcow"), "qcow2", &q);

    let cache = Cache::new();
    run_guarded(
        cache
            .fetch(&g.url)
            .args([&raw, &qcow, &unused, &by_imgcache, &kernel, &ramdisk]),
        GUARD,
    )
    .assert_code(0);
    run_guarded(
        cache.create(&g.url, "vm-by-imgcache", &by_imgcache).args([
            "--ephemeral",
            "1G",
            "--swap",
            "32M",
        ]),
        GUARD,
    )
    .assert_code(0);

    let base = cache.base();
    let eph = base.join(nova_ephemeral(1));
    let swap = base.join("swap_64");
    // Sparse stand-ins for Nova's mkfs/mkswap output: its cache manager goes by names and mtimes.
    for (t, len) in [(&eph, 1u64 << 30), (&swap, 64 << 20)] {
        std::fs::File::create(t).unwrap().set_len(len).unwrap();
    }
    let a = "0d6a3b0c-0000-4000-8000-00000000000a";
    let b = "0d6a3b0c-0000-4000-8000-00000000000b";
    let dir_a = nova_instance(
        cache.instances(),
        a,
        &[("disk", &base.join(entry_name(&raw)))],
    );
    // Nova copies the kernel and ramdisk into the instance directory.
    std::fs::copy(base.join(entry_name(&kernel)), dir_a.join("kernel")).unwrap();
    std::fs::copy(base.join(entry_name(&ramdisk)), dir_a.join("ramdisk")).unwrap();
    nova_instance(
        cache.instances(),
        b,
        &[
            ("disk", &base.join(entry_name(&qcow))),
            ("disk.local", &eph),
            ("disk.swap", &swap),
        ],
    );
    // Everything is old: only being in use keeps it.
    for f in cache.base_files() {
        age(&base.join(f), 3 * DAY);
    }
    let db = serde_json::json!([
        {"uuid": a, "image_ref": raw, "kernel_id": kernel, "ramdisk_id": ramdisk,
         "os_type": "linux"},
        {"uuid": b, "image_ref": qcow, "os_type": "linux", "ephemeral_gb": 1, "swap_mb": 64},
    ]);
    Tree {
        cache,
        raw,
        qcow,
        unused,
        by_imgcache,
        kernel,
        ramdisk,
        db,
    }
}

#[test]
fn novas_cache_manager_removes_the_unused_base_and_nothing_in_use() {
    let t = tree("nova-manager");
    let base = t.cache.base();
    let locks_before = Cache::files_in(&t.cache.instances().join("locks"));
    let v = nova::cache_manager(t.cache.instances(), &t.db, &[]);

    let removed: Vec<String> = serde_json::from_value(v["removed"].clone()).unwrap();
    assert!(
        removed.contains(&entry_name(&t.unused)),
        "Nova removes the unused old base: {v}"
    );
    for used in [
        entry_name(&t.raw),
        entry_name(&t.qcow),
        entry_name(&t.kernel),
        entry_name(&t.ramdisk),
        nova_ephemeral(1),
        "swap_64".to_owned(),
    ] {
        assert!(!removed.contains(&used), "Nova removed {used}: {v}");
        assert!(base.join(&used).exists());
        assert!(
            SystemTime::now()
                .duration_since(mtime(&base.join(&used)))
                .unwrap()
                < Duration::from_secs(DAY),
            "Nova touches what is in use: {used}"
        );
    }
    assert_eq!(
        v["used_ephemeral_images"],
        serde_json::json!([nova_ephemeral(1)])
    );
    assert_eq!(v["used_swap_images"], serde_json::json!(["swap_64"]));
    // imgcache's records and locks are not Nova's business: left alone, and no crash over them.
    for id in [&t.raw, &t.qcow, &t.unused, &t.by_imgcache] {
        assert!(base.join(format!("{}.info", entry_name(id))).exists());
    }
    let locks_after = Cache::files_in(&t.cache.instances().join("locks"));
    for l in locks_before.iter().filter(|l| l.starts_with("imgcache-")) {
        assert!(locks_after.contains(l), "Nova removed {l}");
    }
    // Nothing else but what only imgcache's own instance uses: Nova does not know about that
    // instance (not in its database), which is why operators who prune with imgcache set
    // [image_cache] remove_unused_base_images = False (the next test).
    for f in &removed {
        assert!(
            *f == entry_name(&t.unused)
                || *f == entry_name(&t.by_imgcache)
                || (f.starts_with("ephemeral_1_") && *f != nova_ephemeral(1))
                || f == "swap_32",
            "Nova removed {f}: {v}"
        );
    }
}

#[test]
fn novas_cache_manager_removes_nothing_with_remove_unused_base_images_false() {
    let t = tree("nova-manager-off");
    let v = nova::cache_manager(
        t.cache.instances(),
        &t.db,
        &["image_cache.remove_unused_base_images=False"],
    );
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert_eq!(v["locks_removed"], serde_json::json!([]), "{v}");
    assert!(t.cache.base().join(entry_name(&t.by_imgcache)).exists());
    assert!(t.cache.base().join(entry_name(&t.unused)).exists());
    // imgcache's instance still reads: its disk's backing chain is whole.
    let disk = t.cache.instances().join("vm-by-imgcache/disk");
    qemu_img(&["check", "-q", "-f", "qcow2", disk.to_str().unwrap()]);
}

// ---- 2c. imgcache prune over instances Nova made --------------------------------------------

#[test]
fn prune_keeps_what_nova_made_instances_use() {
    let cache = Cache::new();
    let inst = cache.instances().to_owned();
    // Another path to the same instances directory, as `instances_path` may be configured
    // through a symlink (`/tmp/x/link` -> the instances path).
    let root = tempfile::tempdir().unwrap();
    let alias = root.path().join("link");
    std::os::unix::fs::symlink(&inst, &alias).unwrap();

    let ids = [
        "nova-made-symlinked",
        "nova-made-dotted",
        "nova-made-bind",
        "nova-made-flat",
        "nova-made-resized",
        "nova-made-unused",
    ];
    let [symlinked, dotted, bound, flat, resized, unused] = ids.map(entry_name);
    let mib = 1 << 20;
    for n in [&symlinked, &dotted, &bound, &flat, &resized, &unused] {
        base_file(&cache, n, mib, 3 * DAY);
    }
    let resized_variant = format!("{resized}_20");
    base_file(&cache, &resized_variant, mib, 3 * DAY);
    let eph = base_file(&cache, &nova_ephemeral(1), mib, 3 * DAY);
    let swap = base_file(&cache, "swap_64", mib, 3 * DAY);
    let orphan_record = cache
        .base()
        .join(format!("{}.info", entry_name("nova-made-orphan")));
    std::fs::write(&orphan_record, b"{}").unwrap();
    age(&orphan_record, 3 * DAY);

    // qcow2 instance whose backing file is spelled through a symlink to the instances path.
    nova_instance(
        &inst,
        "i-symlinked",
        &[("disk", &alias.join("_base").join(&symlinked))],
    );
    // One whose backing path is another spelling of the same file.
    nova_instance(
        &inst,
        "i-dotted",
        &[("disk", &inst.join("_base/../_base/.").join(&dotted))],
    );
    // One made while the instances path was reached through a bind mount.
    let bind = BindMount::new(&inst);
    nova_instance(
        &inst,
        "i-bind",
        &[("disk", &bind.path().join("_base").join(&bound))],
    );
    // Flat (raw copy) instance: nothing links the disk to its base but the domain's metadata.
    let flat_dir = inst.join("i-flat");
    std::fs::create_dir_all(&flat_dir).unwrap();
    std::fs::copy(cache.base().join(&flat), flat_dir.join("disk")).unwrap();
    std::fs::write(
        flat_dir.join("disk.info"),
        serde_json::json!({ flat_dir.join("disk").to_str().unwrap(): "raw" }).to_string(),
    )
    .unwrap();
    std::fs::write(
        flat_dir.join("libvirt.xml"),
        format!(
            r#"<domain type="kvm">
  <uuid>0d6a3b0c-0000-4000-8000-0000000000f1</uuid>
  <name>instance-000000f1</name>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="34.0.0"/>
      <nova:name>flat</nova:name>
      <nova:image uuid="{}"><nova:diskFormat>raw</nova:diskFormat><nova:properties/></nova:image>
      <nova:root type="image" uuid="{}"/>
    </nova:instance>
  </metadata>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw" cache="none"/>
      <source file="{}"/>
      <target bus="virtio" dev="vda"/>
    </disk>
  </devices>
</domain>
"#,
            ids[3],
            ids[3],
            flat_dir.join("disk").display()
        ),
    )
    .unwrap();
    // Ephemeral and swap overlays on Nova-named templates.
    nova_instance(
        &inst,
        "i-templates",
        &[
            ("disk", &cache.base().join(&resized_variant)),
            ("disk.local", &eph),
            ("disk.swap", &swap),
        ],
    );

    let (r, v) = prune_json(&cache, &[]);
    r.assert_code(0);
    // Every miss is listed, not only the first.
    let mut wrong = Vec::new();
    for (what, name) in [
        ("backing file spelled through a symlink", symlinked.clone()),
        ("backing file spelled with ./..", dotted.clone()),
        ("backing file spelled through a bind mount", bound.clone()),
        ("Flat instance named in libvirt.xml", flat.clone()),
        ("resized legacy base in use", resized_variant.clone()),
        ("original of a resized base in use", resized.clone()),
        ("Nova's ephemeral template", nova_ephemeral(1)),
        ("Nova's swap template", "swap_64".to_owned()),
    ] {
        if !cache.base().join(&name).exists() {
            wrong.push(format!("removed {name} ({what})"));
        }
    }
    if cache.base().join(&unused).exists() {
        wrong.push(format!("kept the unused {unused}"));
    }
    if orphan_record.exists() {
        wrong.push("kept a record whose entry is gone".to_owned());
    }
    assert!(wrong.is_empty(), "prune {wrong:?}: {v}");
    for d in ["i-symlinked", "i-dotted", "i-bind", "i-templates"] {
        let disk = inst.join(d).join("disk");
        qemu_img(&["check", "-q", "-f", "qcow2", disk.to_str().unwrap()]);
    }
}

// ---- 3. Nova's fetch_to_raw racing imgcache fetch -------------------------------------------

fn file_gets(p: &Proxy) -> usize {
    p.statuses()
        .iter()
        .filter(|(line, _)| line.starts_with("GET ") && line.contains("/file"))
        .count()
}

#[test]
fn nova_fetch_to_raw_and_imgcache_fetch_download_an_image_once() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let raw_data = test_bytes(4 << 20, 81);
    let raw_file = tmp.path().join("race.raw");
    std::fs::write(&raw_file, &raw_data).unwrap();
    let raw_id = g.upload("nova-race-raw", "raw", &raw_file);
    let qcow_data = test_bytes(4 << 20, 82);
    let (_, qcow_file) = make_qcow2(tmp.path(), "race", &qcow_data);
    let qcow_id = g.upload("nova-race-qcow2", "qcow2", &qcow_file);
    // 64 chunks, 5 ms apart: each download takes a third of a second, long enough to overlap.
    let proxy = Proxy::start(&g.url, Duration::from_millis(5), None);

    for round in 0..4 {
        let (id, data) = if round % 2 == 0 {
            (&raw_id, &raw_data)
        } else {
            (&qcow_id, &qcow_data)
        };
        let cache = Cache::new();
        let before = file_gets(&proxy);
        let mut nova_fetch = NovaFetch::ready(cache.instances(), &proxy.url, id);
        let mut ours: Command = cache.fetch(&proxy.url);
        ours.arg(id).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Alternate who starts first.
        let child = if round < 2 {
            nova_fetch.go();
            ours.spawn().unwrap()
        } else {
            let c = ours.spawn().unwrap();
            nova_fetch.go();
            c
        };
        let out = child.wait_with_output().unwrap();
        let (code, downloaded, nova_err) = nova_fetch.wait();
        assert_exit_ok(&out);
        assert_eq!(code, Some(0), "fetch_to_raw.py:\n{nova_err}");
        assert!(downloaded.is_some(), "fetch_to_raw.py:\n{nova_err}");
        assert_eq!(
            file_gets(&proxy) - before,
            1,
            "round {round}: exactly one download (Nova downloaded: {downloaded:?})\n--- \
             imgcache\n{}\n--- nova\n{nova_err}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entry = cache.base().join(entry_name(id));
        assert!(
            std::fs::read(&entry).unwrap() == *data,
            "round {round}: {} is not the image's raw bytes",
            entry.display()
        );
        let temps: Vec<String> = cache
            .base_files()
            .into_iter()
            .filter(|f| f.ends_with(".part") || f.ends_with(".converted"))
            .collect();
        assert!(temps.is_empty(), "round {round}: temps left: {temps:?}");
    }
}

/// Nova's cache manager deletes `locks/nova-<name>` after removing a base; a Nova download that
/// comes later locks a new file. A fetch holding the old inode notices before it commits,
/// takes the new lock (waiting for that Nova), and re-reads its `.part` from disk.
#[test]
fn a_nova_lock_file_replaced_mid_fetch_is_retaken_and_the_download_re_read() {
    for disturbed in [false, true] {
        let id = format!("nova-lock-replaced-{disturbed}");
        let data = test_bytes(2 << 20, 63);
        let srv = FaultServer::start(Image::raw(&id, data.clone()));
        srv.pace(Some(Duration::from_millis(40)));
        let cache = Cache::new();
        let name = entry_name(&id);
        let part = cache.base().join(format!("{name}.part"));
        let child = cache
            .fetch(&srv.url)
            .arg(&id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&part);
        let start = Instant::now();
        while std::fs::metadata(&part).map_or(0, |m| m.len()) < 256 << 10 {
            assert!(start.elapsed() < Duration::from_secs(20), "no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        let lock = lock_file(&cache, "nova-", &name);
        // What `lockutils.remove_external_lock_file` does, then a later Nova on a new file.
        // (The later Nova's lockf is taken in this process: it must follow the removal at once.)
        std::fs::remove_file(&lock).unwrap();
        let nova = crate::support::LockfHold::take(&lock);
        if disturbed {
            // Nova's `open(part, 'wb')`: its own bytes where imgcache's download is.
            std::fs::write(&part, b"nova's download").unwrap();
        }
        std::thread::sleep(Duration::from_millis(500));
        drop(nova);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let entry = cache.base().join(&name);
        if disturbed {
            assert_eq!(out.status.code(), Some(6), "{stderr}");
            assert!(
                !entry.exists(),
                "a disturbed download never becomes the entry"
            );
            assert!(!part.exists());
        } else {
            assert_exit_ok(&out);
            assert_eq!(std::fs::read(&entry).unwrap(), data);
        }
        assert!(
            stderr.contains("was replaced while it was held"),
            "{stderr}"
        );
    }
}
