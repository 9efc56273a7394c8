//! The crash campaign: fetch (raw and qcow2), create (raw and qcow2) and prune, against the real
//! Glance, are SIGKILLed at random moments, over and over, on one cache. After every kill: `imgcache verify` passes, no
//! instance disk points at a missing base, and rerunning the same command completes. At the end
//! the leftovers (temp files of killed runs) are gone after one prune.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use crate::support::glance::real;
use crate::support::proxy::Proxy;
use crate::support::{Cache, Rng, imgcache, make_qcow2, run, test_bytes};

fn broken_disks(instances: &Path) -> Vec<String> {
    let mut broken = Vec::new();
    for inst in std::fs::read_dir(instances).unwrap().flatten() {
        let name = inst.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vm-") {
            continue;
        }
        let disk = inst.path().join("disk");
        if !disk.exists() {
            continue;
        }
        let file = std::fs::File::open(&disk).unwrap();
        let src = imgcache::inspect::Source::new(&file).unwrap();
        let backing = imgcache::inspect::qcow2::backing_file(&src).unwrap();
        if let Some(backing) = backing {
            if !Path::new(&backing).exists() {
                broken.push(format!("{}: backing {backing:?} missing", disk.display()));
            }
        } else if let Ok(rec) = std::fs::read(inst.path().join("imgcache.json")) {
            let rec: serde_json::Value = serde_json::from_slice(&rec).unwrap();
            for b in rec["bases"].as_array().unwrap() {
                let p = instances.join("_base").join(b.as_str().unwrap());
                if !p.exists() {
                    broken.push(format!("{}: base {} missing", disk.display(), p.display()));
                }
            }
        }
    }
    broken
}

#[test]
fn sigkill_at_random_points_never_corrupts_the_cache() {
    // The real Glance, behind a throttling proxy (64 KiB every 4 ms: ~130 ms per image) so
    // that kills land during the download as well as during conversion and disk creation.
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let raw_file = tmp.path().join("plain.raw");
    std::fs::write(&raw_file, test_bytes(2 << 20, 31)).unwrap();
    let mut disk = test_bytes(2 << 20, 32);
    disk.resize(24 << 20, 0);
    let (_, qcow) = make_qcow2(tmp.path(), "crash", &disk);
    // Every run gets an image of its own, so every fetch really downloads.
    let images: Vec<String> = (0..75)
        .map(|i| match i % 5 {
            0 | 2 => g.upload(&format!("crash-{i}"), "raw", &raw_file),
            1 | 3 => g.upload(&format!("crash-{i}"), "qcow2", &qcow),
            _ => String::new(),
        })
        .collect();
    let proxy = Proxy::start(&g.url, Duration::from_millis(4), None);
    let cache = Cache::new();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash campaign seed {seed}");
    let mut rng = Rng::new(seed);
    let ops = [
        "fetch-raw",
        "fetch-qcow2",
        "create-raw",
        "create-qcow2",
        "prune",
    ];
    let mut landed = [0u32; 5];
    for (i, image) in images.iter().enumerate() {
        let op = i % ops.len();
        let mut cmd = match ops[op] {
            "fetch-raw" | "fetch-qcow2" => {
                let mut c = cache.fetch(&proxy.url);
                c.arg(image);
                c
            }
            "create-raw" => {
                let mut c = cache.create(&proxy.url, &format!("vm-{i}"), image);
                c.args(["--backend", "raw", "--size", "32M"]);
                c
            }
            "create-qcow2" => {
                let mut c = cache.create(&proxy.url, &format!("vm-{i}"), image);
                c.args(["--backend", "qcow2", "--size", "32M"]);
                c
            }
            _ => {
                let mut c = imgcache();
                c.arg("prune")
                    .arg("--instances-path")
                    .arg(cache.instances())
                    .args([
                        "--min-age",
                        "0s",
                        "--min-age-resized",
                        "0s",
                        "--temp-age",
                        "0s",
                        "-q",
                    ]);
                c
            }
        };
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Prune takes milliseconds; everything else a few hundred.
        let window = if ops[op] == "prune" { 25 } else { 200 };
        std::thread::sleep(Duration::from_millis(rng.below(window) as u64));
        let finished = child.try_wait().unwrap();
        if finished.is_none() {
            landed[op] += 1;
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        // Killed, or it had finished (perhaps just before the kill landed): then with 0.
        assert!(
            status.success() || (finished.is_none() && status.signal() == Some(libc::SIGKILL)),
            "{} #{i}: {status}, expected exit 0 or SIGKILL",
            ops[op]
        );

        let v = run(imgcache()
            .arg("verify")
            .arg("--instances-path")
            .arg(cache.instances()));
        assert_eq!(
            v.code, 0,
            "verify after killing {} #{i}: {}{}",
            ops[op], v.stdout, v.stderr
        );
        let broken = broken_disks(cache.instances());
        assert!(
            broken.is_empty(),
            "after killing {} #{i}: {broken:?}",
            ops[op]
        );
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let again = run(&mut cmd);
        assert_eq!(again.code, 0, "rerun of {} #{i}: {}", ops[op], again.stderr);
    }
    eprintln!(
        "kills that landed mid-run: {:?}",
        ops.iter().zip(landed).collect::<Vec<_>>()
    );
    let total: u32 = landed.iter().sum();
    assert!(total >= 50, "only {total} kills landed mid-run: {landed:?}");
    for (op, n) in ops.iter().zip(landed) {
        assert!(n >= 2, "{op}: only {n} kills landed mid-run");
    }
    // Leftovers: one prune sweeps temp files; reruns already removed instance temp files.
    run(imgcache()
        .arg("prune")
        .arg("--instances-path")
        .arg(cache.instances())
        .args(["--temp-age", "0s", "-q"]))
    .assert_code(0);
    let temps: Vec<String> = cache
        .base_files()
        .into_iter()
        .filter(|f| f.ends_with(".part") || f.ends_with(".converted") || f.ends_with(".tmp"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    for inst in std::fs::read_dir(cache.instances()).unwrap().flatten() {
        let left: Vec<String> = Cache::files_in(&inst.path())
            .into_iter()
            .filter(|f| f.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{}: {left:?}", inst.path().display());
    }
}
