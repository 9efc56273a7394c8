//! Conversion inside the download, end to end against a real Glance: zlib- and zstd-compressed
//! qcow2 images are converted while they arrive and give qemu-img's raw image; a layout the
//! native converter does not take (a last cluster cut short), parallel ranges, and an image
//! whose header the inspector refuses go the old way or fail as before, leaving no temp behind.

use std::path::Path;

use crate::support::fault_server::{Action, FaultServer, Image};
use crate::support::glance::real;
use crate::support::qcow2::{alias_cluster, done_record, overlay_of, qcow2_of};
use crate::support::{Cache, qcow2_to_raw, run, test_bytes};

/// Half data, half zeros: compressible, with holes in the result.
fn image_bytes(seed: u64) -> Vec<u8> {
    let mut raw = test_bytes(6 << 20, seed);
    raw[(2 << 20)..(4 << 20)].fill(0);
    raw
}

#[test]
fn compressed_qcow2_images_are_converted_during_the_download() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("zlib", "compat=1.1"),
        ("zstd", "compat=1.1,compression_type=zstd"),
        ("plain-v2", "compat=0.10"),
    ] {
        let raw = image_bytes(61);
        let qcow = qcow2_of(tmp.path(), name, &raw, opts, name != "plain-v2");
        let id = g.upload(name, "qcow2", &qcow);
        let cache = Cache::new();
        let r = run(cache.fetch(&g.url).args(["-v", &id]));
        cache.assert_fetched(&id, &raw, &r);
        assert!(
            r.stderr
                .contains("converted qcow2 to raw during the download"),
            "{name}: {}",
            r.stderr
        );
        let expected = tmp.path().join(format!("{name}.expected"));
        qcow2_to_raw(&qcow, &expected);
        assert!(
            std::fs::read(&expected).unwrap() == raw,
            "{name}: qemu-img agrees"
        );
        // The zero half is a hole, as qemu-img convert leaves it.
        let entry = cache.base().join(crate::support::entry_name(&id));
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&entry).unwrap());
        assert!(
            blocks * 512 <= 4 << 20,
            "{name}: {} bytes allocated",
            blocks * 512
        );
    }
}

#[test]
fn what_the_native_converter_does_not_take_is_converted_by_qemu_img() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let raw = image_bytes(62);
    // The last data cluster cut short: qemu reads the missing bytes as zeros; the native
    // converter leaves such a file to it — after one more download, as it had given bytes of
    // the first one back by the time it met the end of the file.
    let qcow = qcow2_of(tmp.path(), "cut", &raw, "compat=1.1", false);
    let len = std::fs::metadata(&qcow).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&qcow)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let expected = tmp.path().join("cut.expected");
    qcow2_to_raw(&qcow, &expected);
    let want = std::fs::read(&expected).unwrap();
    let id = g.upload("cut", "qcow2", &qcow);
    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).args(["-v", &id]));
    cache.assert_fetched(&id, &want, &r);
    assert!(
        r.stderr
            .contains("past the end of the file); downloading again"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("converted qcow2 to raw (-t"),
        "qemu-img converted it: {}",
        r.stderr
    );

    // Parallel ranges fill the .part out of order: no conversion follows it.
    let qcow = qcow2_of(tmp.path(), "ranged", &image_bytes(63), "compat=1.1", true);
    let id = g.upload("ranged", "qcow2", &qcow);
    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).args(["-v", "--connections", "4", &id]));
    cache.assert_fetched(&id, &image_bytes(63), &r);
    assert!(!r.stderr.contains("during the download"), "{}", r.stderr);
}

/// A qcow2 image served by the fault server.
fn served(qcow: &Path, id: &str) -> FaultServer {
    let mut image = Image::raw(id, std::fs::read(qcow).unwrap());
    image.disk_format = "qcow2".into();
    FaultServer::start(image)
}

#[test]
fn a_cut_download_resumes_into_the_same_conversion_and_a_restart_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = image_bytes(64);
    let qcow = qcow2_of(tmp.path(), "faults", &raw, "compat=1.1", true);
    let len = std::fs::metadata(&qcow).unwrap().len();
    // Cut in the middle, resumed with Range: the conversion waits and goes on.
    let srv = served(&qcow, "cut-resumed");
    srv.script([Action::CutAfter(len / 2 + 777)]);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["-v", "cut-resumed"]));
    cache.assert_fetched("cut-resumed", &raw, &r);
    assert!(r.stderr.contains("during the download"), "{}", r.stderr);
    assert!(r.stderr.contains("resuming from byte"), "{}", r.stderr);
    // Cut, then the server ignores the Range: the .part starts over, the conversion stops, and
    // qemu-img converts the complete file.
    let srv = served(&qcow, "restarted");
    srv.script([Action::CutAfter(len / 2), Action::IgnoreRange]);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["-v", "restarted"]));
    cache.assert_fetched("restarted", &raw, &r);
    assert!(
        r.stderr
            .contains("converting after the download: stopped: the download started over"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_cluster_needed_again_after_it_was_given_back_makes_the_fetch_download_again() {
    let tmp = tempfile::tempdir().unwrap();
    let qcow = qcow2_of(
        tmp.path(),
        "aliased",
        &test_bytes(6 << 20, 65),
        "compat=1.1",
        false,
    );
    // Two guest clusters (2.5 MiB in or later) name one cluster's data, past the kept head.
    alias_cluster(&qcow, 40);
    let expected = tmp.path().join("aliased.expected");
    qcow2_to_raw(&qcow, &expected);
    let want = std::fs::read(&expected).unwrap();
    let srv = served(&qcow, "aliased");
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["-v", "aliased"]));
    cache.assert_fetched("aliased", &want, &r);
    assert!(r.stderr.contains("downloading again"), "{}", r.stderr);
    assert_eq!(srv.file_requests().len(), 2, "one download, then one more");
}

#[test]
fn a_header_the_inspector_refuses_fails_the_fetch_with_no_temp_left() {
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("backing.raw");
    std::fs::write(&backing, vec![1u8; 1 << 20]).unwrap();
    let qcow = tmp.path().join("with-backing.qcow2");
    overlay_of(&qcow, backing.to_str().unwrap(), "raw", "1M");
    let srv = served(&qcow, "with-backing");
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["-v", "with-backing"]));
    r.assert_code(5);
    assert!(r.stderr.contains("backing file"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn a_part_killed_after_bytes_were_given_back_is_downloaded_afresh() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = test_bytes(8 << 20, 66);
    let qcow = qcow2_of(tmp.path(), "killed", &raw, "compat=1.1", false);
    let srv = served(&qcow, "killed");
    // 64 KiB every 10 ms: about 1.3 s for the image.
    srv.pace(Some(std::time::Duration::from_millis(10)));
    let cache = Cache::new();
    let part = cache
        .base()
        .join(format!("{}.part", crate::support::entry_name("killed")));
    let mut child = cache
        .fetch(&srv.url)
        .arg("killed")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while done_record(&part).is_none() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed while downloading");
    assert_eq!(
        done_record(&part).as_deref(),
        Some("0"),
        "the .part is marked as not to be resumed before any byte is given back"
    );
    srv.pace(None);
    let r = run(cache.fetch(&srv.url).args(["-v", "killed"]));
    cache.assert_fetched("killed", &raw, &r);
    let reqs = srv.file_requests();
    assert_eq!(reqs.last().and_then(|s| s.range.clone()), None, "{reqs:?}");
    assert!(!r.stderr.contains("resuming"), "{}", r.stderr);
}
