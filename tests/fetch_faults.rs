//! Download faults, injected by the fault server: each leaves the cache complete or clean.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use crate::support::fault_server::{Action, FaultServer, Image};
use crate::support::{Cache, entry_name, run, test_bytes};

const MIB: usize = 1 << 20;

fn server(id: &str, len: usize) -> (FaultServer, Vec<u8>) {
    let data = test_bytes(len, id.len() as u64 + 7);
    (FaultServer::start(Image::raw(id, data.clone())), data)
}

fn fetch_ok(cache: &Cache, srv: &FaultServer, id: &str, data: &[u8], extra: &[&str]) -> String {
    let r = run(cache.fetch(&srv.url).args(extra).arg(id));
    cache.assert_fetched(id, data, &r);
    r.stderr
}

#[test]
fn retries_after_503_then_succeeds() {
    let (srv, data) = server("img-503", MIB);
    srv.script([Action::Status(503), Action::Status(502)]);
    let cache = Cache::new();
    fetch_ok(&cache, &srv, "img-503", &data, &[]);
    let reqs = srv.file_requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 502, 200]
    );
}

#[test]
fn gives_up_after_retries_with_unavailable_code_and_clean_cache() {
    let (srv, _) = server("img-down", MIB);
    srv.script(std::iter::repeat_n(Action::Status(503), 10));
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["--retries", "2", "img-down"]));
    r.assert_code(7);
    assert!(r.stderr.contains("503"), "{}", r.stderr);
    assert_eq!(srv.file_requests().len(), 3);
    cache.assert_clean_or_complete(None);
}

#[test]
fn connection_reset_mid_body_resumes_with_range() {
    let (srv, data) = server("img-cut", 4 * MIB);
    srv.script([Action::CutAfter(MIB as u64 + 12345)]);
    let cache = Cache::new();
    fetch_ok(&cache, &srv, "img-cut", &data, &[]);
    let reqs = srv.file_requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let cut = reqs[0].body_bytes;
    assert_eq!(cut, MIB as u64 + 12345);
    assert_eq!(
        reqs[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert_eq!(reqs[1].status, 206);
    // Only the missing tail was sent again, not the whole image.
    assert_eq!(reqs[1].body_bytes, data.len() as u64 - cut);
}

#[test]
fn ignored_range_restarts_cleanly_from_zero() {
    let (srv, data) = server("img-norange", 3 * MIB);
    srv.script([Action::CutAfter(MIB as u64), Action::IgnoreRange]);
    let cache = Cache::new();
    fetch_ok(&cache, &srv, "img-norange", &data, &[]);
    let reqs = srv.file_requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].range.is_some());
    assert_eq!(reqs[1].status, 200);
    assert_eq!(reqs[1].body_bytes, data.len() as u64);
}

#[test]
fn wrong_hash_is_an_integrity_error_and_leaves_nothing() {
    let data = test_bytes(MIB, 3);
    let mut image = Image::raw("img-badhash", data);
    image.os_hash = Some(("sha512".into(), "ab".repeat(64)));
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).arg("img-badhash"));
    r.assert_code(6);
    assert!(r.stderr.contains("sha512 mismatch"), "{}", r.stderr);
    assert_eq!(r.stdout, "");
    cache.assert_clean_or_complete(None);
}

#[test]
fn body_shorter_than_glance_size_never_becomes_an_entry() {
    let data = test_bytes(MIB, 4);
    let mut image = Image::raw("img-short", data);
    image.size += 1000;
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["--retries", "1", "img-short"]));
    r.assert_code(7);
    assert!(r.stderr.contains("ended early"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn no_content_204_is_not_success() {
    let (srv, _) = server("img-204", MIB);
    srv.script([Action::NoContent]);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).arg("img-204"));
    r.assert_code(4);
    assert!(r.stderr.contains("no data"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn honours_retry_after_on_429() {
    let (srv, data) = server("img-429", MIB);
    srv.script([Action::TooMany(1)]);
    let cache = Cache::new();
    let stderr = fetch_ok(&cache, &srv, "img-429", &data, &[]);
    assert!(stderr.contains("in 1.0s"), "{stderr}");
    assert_eq!(srv.file_requests().len(), 2);
}

#[test]
fn auth_failure_is_not_retried() {
    let (srv, _) = server("img-401", MIB);
    srv.script([Action::Status(401), Action::Normal]);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).arg("img-401"));
    r.assert_code(10);
    assert_eq!(srv.file_requests().len(), 1);
    cache.assert_clean_or_complete(None);
}

#[test]
fn stalled_transfer_times_out_and_resumes() {
    let (srv, data) = server("img-stall", 2 * MIB);
    srv.script([Action::StallAfter(MIB as u64, Duration::from_secs(20))]);
    let cache = Cache::new();
    fetch_ok(&cache, &srv, "img-stall", &data, &["--read-timeout", "1s"]);
    let reqs = srv.file_requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=1048576-"));
}

#[test]
fn md5_checksum_is_used_when_there_is_no_os_hash() {
    let data = test_bytes(MIB, 5);
    let mut image = Image::raw("img-md5", data.clone());
    image.os_hash = None;
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    fetch_ok(&cache, &srv, "img-md5", &data, &[]);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cache.base().join(format!("{}.info", entry_name("img-md5")))).unwrap(),
    )
    .unwrap();
    assert_eq!(record["hash_algo"], "md5");

    let mut bad = Image::raw("img-md5-bad", data);
    bad.os_hash = None;
    bad.checksum = Some("0".repeat(32));
    let srv = FaultServer::start(bad);
    let r = run(cache.fetch(&srv.url).arg("img-md5-bad"));
    r.assert_code(6);
    assert!(r.stderr.contains("md5 mismatch"), "{}", r.stderr);
}

#[test]
fn sigkill_mid_download_then_rerun_resumes_and_verifies() {
    let (srv, data) = server("img-kill", 4 * MIB);
    srv.pace(Some(Duration::from_millis(20)));
    let cache = Cache::new();
    let name = entry_name("img-kill");
    let part = cache.base().join(format!("{name}.part"));
    let mut child = cache.fetch(&srv.url).arg("img-kill").spawn().unwrap();
    let mut waited = 0;
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < MIB as u64 {
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
        assert!(waited < 1500, "download never reached 1 MiB");
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "killed mid-download: {status}"
    );
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < data.len() as u64);
    assert!(!cache.base().join(&name).exists());

    srv.pace(None);
    let stderr = fetch_ok(&cache, &srv, "img-kill", &data, &[]);
    assert!(stderr.contains("resuming"), "{stderr}");
    let reqs = srv.file_requests();
    let last = reqs.last().unwrap();
    assert_eq!(
        last.range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    assert_eq!(last.body_bytes, data.len() as u64 - kept);
}

#[test]
fn stale_part_with_wrong_bytes_is_caught_by_the_hash() {
    let (srv, data) = server("img-stalepart", 2 * MIB);
    let cache = Cache::new();
    let name = entry_name("img-stalepart");
    std::fs::create_dir_all(cache.base()).unwrap();
    // A .part whose bytes are not the image's: the resumed download must fail verification
    // rather than splice garbage, and leave nothing behind; the next run starts clean.
    std::fs::write(cache.base().join(format!("{name}.part")), vec![0xAAu8; MIB]).unwrap();
    let r = run(cache.fetch(&srv.url).arg("img-stalepart"));
    r.assert_code(6);
    cache.assert_clean_or_complete(None);
    fetch_ok(&cache, &srv, "img-stalepart", &data, &[]);
}
