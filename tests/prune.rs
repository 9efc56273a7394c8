//! `imgcache prune`, `list`, `verify`: policies on controlled trees, in-use detection, dry-run,
//! garbage tolerance, and the prune-vs-create race.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::support::glance::real;
use crate::support::qcow2::overlay_of;
use crate::support::{Cache, entry_name, imgcache, run, test_bytes};

const HOUR: u64 = 3600;

fn age(path: &Path, secs: u64) {
    let f = std::fs::File::open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

fn prune(cache: &Cache, extra: &[&str]) -> crate::support::Run {
    run(imgcache()
        .arg("prune")
        .arg("--instances-path")
        .arg(cache.instances())
        .args(extra))
}

/// Writes a fake entry of `len` bytes into `_base`, aged `secs`.
fn entry(cache: &Cache, name: &str, len: usize, secs: u64) -> PathBuf {
    std::fs::create_dir_all(cache.base()).unwrap();
    let p = cache.base().join(name);
    std::fs::write(&p, test_bytes(len, len as u64)).unwrap();
    age(&p, secs);
    p
}

/// Every file under the instances path with its size, mtime and content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, SystemTime, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                out.insert(
                    e.path(),
                    (
                        m.len(),
                        m.modified().unwrap(),
                        crate::support::sha512_hex(&std::fs::read(e.path()).unwrap()),
                    ),
                );
            } else {
                out.insert(e.path(), (0, m.modified().unwrap(), String::new()));
            }
        }
    }
    out
}

fn overlay(disk: &Path, backing: &str) {
    overlay_of(disk, backing, "raw", "64M");
}

#[test]
fn age_policies_per_entry_type() {
    let cache = Cache::new();
    let old_image = entry(&cache, &entry_name("old"), 4096, 25 * HOUR);
    let young_image = entry(&cache, &entry_name("young"), 4096, 2 * HOUR);
    let resized = entry(
        &cache,
        &format!("{}_1073741824", entry_name("young2")),
        4096,
        2 * HOUR,
    );
    let eph = entry(&cache, "ephemeral_1_0a931c2", 4096, 1800);
    let swap = entry(&cache, "swap_64", 4096, 2 * HOUR);
    let foreign = entry(&cache, "notes.txt", 10, 100 * HOUR);
    let r = prune(&cache, &[]);
    r.assert_code(0);
    assert!(!old_image.exists());
    assert!(young_image.exists());
    assert!(!resized.exists(), "resized variants use the 1h threshold");
    assert!(eph.exists(), "30 minutes is younger than 1h");
    assert!(!swap.exists());
    assert!(
        foreign.exists(),
        "files that are not entries are never touched"
    );
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.starts_with("removed "))
            .count(),
        3,
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.lines().last().unwrap().starts_with("freed "),
        "{}",
        r.stdout
    );
    let r = prune(&cache, &["--min-age", "1h", "-q"]);
    r.assert_code(0);
    assert!(!young_image.exists());
}

#[test]
fn in_use_by_records_backing_files_chains_and_keep() {
    let cache = Cache::new();
    let names: Vec<String> = (0..7).map(|i| entry_name(&format!("img-{i}"))).collect();
    let paths: Vec<PathBuf> = names
        .iter()
        .map(|n| entry(&cache, n, 4096, 48 * HOUR))
        .collect();
    let inst = |n: &str| {
        let d = cache.instances().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // 0: usage record (a raw copy has no backing file).
    std::fs::write(
        inst("vm-record").join("imgcache.json"),
        serde_json::json!({"instance": "vm-record", "bases": [names[0]], "disks": {}, "updated_at": ""}).to_string(),
    )
    .unwrap();
    // 1: absolute backing path; 2: relative; 3: chain disk -> disk.snap -> base.
    overlay(&inst("vm-abs").join("disk"), paths[1].to_str().unwrap());
    overlay(
        &inst("vm-rel").join("disk"),
        &format!("../_base/{}", names[2]),
    );
    let chain = inst("vm-chain");
    overlay(&chain.join("disk.snap"), paths[3].to_str().unwrap());
    overlay_of(&chain.join("disk"), "disk.snap", "qcow2", "");
    // 4: --keep; 5: --keep-from; 6: unused.
    let keep_file = cache.instances().join("keep.txt");
    std::fs::write(&keep_file, "# exported from nova\nimg-5\n\n").unwrap();
    let r = prune(
        &cache,
        &[
            "--keep",
            "img-4",
            "--keep-from",
            keep_file.to_str().unwrap(),
        ],
    );
    r.assert_code(0);
    for p in &paths[..6] {
        assert!(p.exists(), "{} should be kept", p.display());
        let idle = SystemTime::now()
            .duration_since(std::fs::metadata(p).unwrap().modified().unwrap())
            .unwrap();
        assert!(
            idle < Duration::from_secs(600),
            "in-use entries are touched"
        );
    }
    assert!(!paths[6].exists());
    let list = run(imgcache()
        .arg("list")
        .arg("--instances-path")
        .arg(cache.instances())
        .arg("--json"));
    list.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let users: BTreeMap<String, u64> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["users"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(users[&names[1]], 1);
    assert_eq!(users[&names[3]], 1);
}

#[test]
fn dry_run_changes_nothing_and_says_what_it_would_do() {
    let cache = Cache::new();
    entry(&cache, &entry_name("a"), 8192, 30 * HOUR);
    entry(
        &cache,
        &format!("{}.part", entry_name("b")),
        8192,
        30 * HOUR,
    );
    std::fs::create_dir_all(cache.instances().join("locks")).unwrap();
    std::fs::write(
        cache
            .instances()
            .join("locks")
            .join(format!("imgcache-{}", entry_name("gone"))),
        b"",
    )
    .unwrap();
    let before = snapshot(cache.instances());
    let r = prune(&cache, &["--dry-run"]);
    r.assert_code(0);
    assert_eq!(
        snapshot(cache.instances()),
        before,
        "dry-run must not change the tree"
    );
    assert!(
        r.stdout
            .contains(&format!("would remove {}", entry_name("a"))),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("would remove {}.part", entry_name("b"))),
        "{}",
        r.stdout
    );
    let r = prune(&cache, &["--json"]);
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["entries"][0]["action"], "removed");
    assert_eq!(v["temps"][0]["action"], "removed");
    assert_eq!(v["lock_files_removed"], 1);
    assert!(cache.base_files().is_empty());
}

#[test]
fn max_size_removes_least_recently_used_first() {
    let cache = Cache::new();
    let a = entry(&cache, &entry_name("a"), 1 << 20, 3 * HOUR);
    let b = entry(&cache, &entry_name("b"), 1 << 20, 2 * HOUR);
    let c = entry(&cache, &entry_name("c"), 1 << 20, HOUR);
    let r = prune(&cache, &["--max-size", "2500K"]);
    r.assert_code(0);
    assert!(!a.exists() && b.exists() && c.exists(), "{}", r.stdout);
    assert!(r.stdout.contains("least recently used"), "{}", r.stdout);

    // Entries in use alone exceed the cap: keep them, say so, distinct exit code.
    let d = cache.instances().join("vm");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("imgcache.json"),
        serde_json::json!({"instance": "vm", "bases": [entry_name("b"), entry_name("c")], "disks": {}, "updated_at": ""}).to_string(),
    )
    .unwrap();
    let r = prune(&cache, &["--max-size", "1M"]);
    r.assert_code(13);
    assert!(b.exists() && c.exists());
    assert!(r.stderr.contains("exceed --max-size"), "{}", r.stderr);
}

#[test]
fn temps_and_lock_files_are_swept_but_not_while_locked() {
    let cache = Cache::new();
    let stale = entry(&cache, &format!("{}.part", entry_name("s")), 100, 30 * HOUR);
    let fresh = entry(&cache, &format!("{}.part", entry_name("f")), 100, 60);
    let busy = entry(
        &cache,
        &format!("{}.converted", entry_name("b")),
        100,
        30 * HOUR,
    );
    let locks = cache.instances().join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let busy_lock =
        std::fs::File::create(locks.join(format!("imgcache-{}", entry_name("b")))).unwrap();
    fs2::FileExt::lock_exclusive(&busy_lock).unwrap();
    let live = entry(&cache, &entry_name("live"), 100, 60);
    std::fs::write(locks.join(format!("imgcache-{}", entry_name("live"))), b"").unwrap();
    std::fs::write(locks.join(format!("imgcache-{}", entry_name("gone"))), b"").unwrap();
    std::fs::write(locks.join("imgcache-instance-deleted-vm"), b"").unwrap();
    let r = prune(&cache, &[]);
    r.assert_code(0);
    assert!(!stale.exists());
    assert!(fresh.exists());
    assert!(
        busy.exists(),
        "a temp whose entry is locked is being written"
    );
    assert!(live.exists());
    let left = Cache::files_in(&locks);
    assert!(left.contains(&format!("imgcache-{}", entry_name("live"))));
    assert!(left.contains(&format!("imgcache-{}", entry_name("b"))));
    assert!(!left.contains(&format!("imgcache-{}", entry_name("gone"))));
    assert!(!left.contains(&"imgcache-instance-deleted-vm".to_owned()));
}

#[test]
fn garbage_never_crashes_prune_and_symlinks_are_not_followed() {
    let cache = Cache::new();
    let used = entry(&cache, &entry_name("used-elsewhere"), 4096, 48 * HOUR);
    let vm = cache.instances().join("vm-garbage");
    std::fs::create_dir_all(&vm).unwrap();
    let mut truncated = b"QFI\xfb\0\0\0\x03".to_vec();
    truncated.extend_from_slice(&[0xff; 5]);
    std::fs::write(vm.join("disk"), &truncated).unwrap();
    std::fs::write(vm.join("console.log"), b"not an image").unwrap();
    std::fs::write(vm.join("imgcache.json"), b"{not json").unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", vm.join("dangling")).unwrap();
    // A qcow2 outside the cache that names the base: reachable only through symlinks, which
    // prune must not follow (not as an instance dir, not as a disk).
    let outside = tempfile::tempdir().unwrap();
    overlay(&outside.path().join("disk"), used.to_str().unwrap());
    std::os::unix::fs::symlink(outside.path().join("disk"), vm.join("disk.link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), cache.instances().join("vm-symlinked")).unwrap();
    std::fs::write(cache.base().join("garbage.bin"), b"x").unwrap();
    let r = prune(&cache, &[]);
    r.assert_code(0);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!used.exists(), "symlinked disks do not keep entries alive");
    assert!(outside.path().join("disk").exists());
    assert!(cache.base().join("garbage.bin").exists());
}

#[test]
fn quiet_prune_prints_nothing_when_nothing_was_done() {
    let cache = Cache::new();
    entry(&cache, &entry_name("young"), 100, 60);
    let r = prune(&cache, &["-q"]);
    r.assert_code(0);
    assert_eq!(r.stdout, "");
    assert_eq!(r.stderr, "");
    let r = prune(&cache, &[]);
    r.assert_code(0);
    assert!(r.stdout.starts_with("nothing to prune"), "{}", r.stdout);
}

#[test]
fn verify_detects_corruption_and_removes_only_when_asked() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("v.raw");
    std::fs::write(&f, test_bytes(1 << 20, 60)).unwrap();
    let id = g.upload("verify-me", "raw", &f);
    let cache = Cache::new();
    run(cache.fetch(&g.url).arg(&id)).assert_code(0);
    let verify = |extra: &[&str]| {
        run(imgcache()
            .arg("verify")
            .arg("--instances-path")
            .arg(cache.instances())
            .args(extra))
    };
    let r = verify(&[]);
    r.assert_code(0);
    assert!(r.stdout.starts_with("ok "), "{}", r.stdout);
    // Flip one byte in the middle of the entry.
    let path = cache.base().join(entry_name(&id));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[500_000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let r = verify(&[&id]);
    r.assert_code(6);
    assert!(r.stdout.starts_with("corrupt "), "{}", r.stdout);
    assert!(path.exists(), "never deleted silently");
    let r = verify(&["--remove-corrupt"]);
    r.assert_code(6);
    assert!(!path.exists());
    run(cache.fetch(&g.url).arg(&id)).assert_code(0);
    verify(&[&id]).assert_code(0);
}

/// The race: 4 provisioning loops create 200 instance disks from 5 images (each keeping one
/// instance alive and deleting the one before, so bases keep becoming unused) while prune runs in a tight loop with
/// a 1 s age threshold. No disk may ever point at a missing base.
#[test]
fn prune_in_a_tight_loop_never_breaks_disks_being_created() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<String> = (0..5u64)
        .map(|i| {
            let f = tmp.path().join(format!("race-{i}"));
            std::fs::write(&f, test_bytes(512 << 10, 70 + i)).unwrap();
            g.upload(&format!("race-{i}"), "raw", &f)
        })
        .collect();
    let cache = Cache::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let broken = std::sync::Mutex::new(Vec::<String>::new());
    let check = |inst: &Path| {
        let disk = inst.join("disk");
        let info = crate::support::qemu_info(&disk, "qcow2");
        let backing = info["backing-filename"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if backing.is_empty() || !Path::new(&backing).exists() {
            broken
                .lock()
                .unwrap()
                .push(format!("{} -> {backing:?}", disk.display()));
        }
    };
    let removed = std::thread::scope(|s| {
        let pruner = s.spawn(|| {
            let mut removed = 0;
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = prune(
                    &cache,
                    &["-q", "--min-age", "1s", "--min-age-resized", "1s"],
                );
                assert_eq!(r.code, 0, "{}", r.stderr);
                removed += r
                    .stdout
                    .lines()
                    .filter(|l| l.starts_with("removed "))
                    .count();
                runs += 1;
            }
            (removed, runs)
        });
        let loops: Vec<_> = (0..4)
            .map(|l| {
                let (cache, g, images, check) = (&cache, &g, &images, &check);
                s.spawn(move || {
                    let delete = |name: &str| {
                        run(imgcache()
                            .arg("delete")
                            .arg("--instances-path")
                            .arg(cache.instances())
                            .arg(name))
                        .assert_code(0);
                    };
                    let mut live: Option<String> = None;
                    for k in 0..50 {
                        let name = format!("race-{l}-{k}");
                        let r = run(&mut cache.create(&g.url, &name, &images[(l * 3 + k) % 5]));
                        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
                        check(&cache.instances().join(&name));
                        // The previous instance lived through many prune runs: check it
                        // again, then delete it so its base can become unused.
                        if let Some(prev) = live.replace(name.clone()) {
                            check(&cache.instances().join(&prev));
                            delete(&prev);
                        }
                        // Now and then keep nothing alive long enough for bases to pass the
                        // 1 s threshold, so prune really removes them between creates.
                        if k % 10 == 9 && k < 49 {
                            std::thread::sleep(Duration::from_millis(1500));
                            check(&cache.instances().join(&name));
                            delete(&name);
                            live = None;
                            std::thread::sleep(Duration::from_millis(1500));
                        }
                    }
                })
            })
            .collect();
        for l in loops {
            l.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        pruner.join().unwrap()
    });
    for inst in std::fs::read_dir(cache.instances()).unwrap().flatten() {
        if inst.file_name().to_string_lossy().starts_with("race-") {
            check(&inst.path());
        }
    }
    let broken = broken.into_inner().unwrap();
    assert!(broken.is_empty(), "disks with a missing base: {broken:?}");
    assert!(
        removed.0 > 0,
        "prune never removed anything ({} runs): the race was not exercised",
        removed.1
    );
}
