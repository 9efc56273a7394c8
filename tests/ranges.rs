//! Parallel ranged downloads (`--connections`): a large image arrives over several ranged
//! requests at once, byte-identical and verified; cuts resume per chunk; a server that ignores
//! Range gets one stream; a killed run resumes from its complete prefix.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use crate::support::fault_server::{Action, FaultServer, Image, Seen};
use crate::support::proxy::Proxy;
use crate::support::{Cache, Run, entry_name, run, test_bytes};

const MIB: usize = 1 << 20;
/// The chunk the download hands out (src/fetch/ranges.rs).
const SEGMENT: u64 = 16 << 20;

fn server(id: &str, len: usize) -> (FaultServer, Vec<u8>) {
    let data = test_bytes(len, id.len() as u64 + 11);
    (FaultServer::start(Image::raw(id, data.clone())), data)
}

fn range_start(s: &Seen) -> Option<u64> {
    s.range
        .as_deref()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

/// Runs `cmd` while watching the server: the most `/file` requests seen in flight at once.
fn run_watching(srv: &FaultServer, mut cmd: Command) -> (Run, usize) {
    let worker = std::thread::spawn(move || run(&mut cmd));
    let mut most = 0;
    while !worker.is_finished() {
        let in_flight = srv.file_requests().iter().filter(|s| s.status == 0).count();
        most = most.max(in_flight);
        std::thread::sleep(Duration::from_millis(2));
    }
    (worker.join().unwrap(), most)
}

#[test]
fn large_image_arrives_over_concurrent_ranges() {
    let (srv, data) = server("img-ranges", 96 * MIB);
    // Slow enough per connection that the requests overlap whatever the machine's load.
    srv.pace(Some(Duration::from_millis(2)));
    let cache = Cache::new();
    let mut cmd = cache.fetch(&srv.url);
    cmd.args(["--connections", "4", "img-ranges"]);
    let (r, most) = run_watching(&srv, cmd);
    cache.assert_fetched("img-ranges", &data, &r);
    let reqs = srv.file_requests();
    assert!(
        most >= 2,
        "never more than {most} request in flight: {reqs:?}"
    );
    let ranged = |s: &Seen| (s.range.is_some(), s.status);
    assert_eq!(reqs.iter().filter(|s| ranged(s) == (true, 206)).count(), 5);
    assert_eq!(reqs.iter().filter(|s| ranged(s) == (false, 200)).count(), 1);
    let mut starts: Vec<u64> = reqs.iter().filter_map(range_start).collect();
    starts.sort_unstable();
    let chunks: Vec<u64> = (1..6).map(|k| k * SEGMENT).collect();
    // Chunk 0 goes without Range (from byte 0, no header): the other five are ranged.
    assert_eq!(starts, chunks, "{reqs:?}");
    assert_eq!(reqs.len(), 6, "{reqs:?}");
}

#[test]
fn a_cut_chunk_resumes_on_its_own() {
    let (srv, data) = server("img-ranges-cut", 96 * MIB);
    // The probe, then one more chunk, then a chunk cut 5 MiB in.
    srv.script([
        Action::Normal,
        Action::Normal,
        Action::CutAfter(5 * MIB as u64),
    ]);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&srv.url)
        .args(["--connections", "4", "img-ranges-cut"]));
    cache.assert_fetched("img-ranges-cut", &data, &r);
    let reqs = srv.file_requests();
    let cut = &reqs[2];
    assert_eq!(cut.body_bytes, 5 * MIB as u64, "{reqs:?}");
    let cut_at = range_start(cut).unwrap_or(0) + 5 * MIB as u64;
    // The resume asks for the rest of that chunk only, mid-chunk.
    let resumed: Vec<&Seen> = reqs
        .iter()
        .filter(|s| range_start(s) == Some(cut_at))
        .collect();
    assert_eq!(resumed.len(), 1, "{reqs:?}");
    assert_eq!(resumed[0].status, 206);
    assert_eq!(reqs.len(), 7, "{reqs:?}");
    assert!(r.stderr.contains("resuming from byte"), "{}", r.stderr);
}

#[test]
fn a_server_that_ignores_range_gets_one_stream() {
    let (srv, data) = server("img-ranges-norange", 80 * MIB);
    srv.script([Action::IgnoreRange]);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&srv.url)
        .args(["--connections", "4", "img-ranges-norange"]));
    cache.assert_fetched("img-ranges-norange", &data, &r);
    let reqs = srv.file_requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!((reqs[0].range.is_some(), reqs[0].status), (true, 200));
    assert_eq!((reqs[1].range.as_deref(), reqs[1].status), (None, 200));
    assert_eq!(reqs[1].body_bytes, data.len() as u64);
}

#[test]
fn one_connection_is_one_request() {
    let (srv, data) = server("img-ranges-one", 80 * MIB);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&srv.url)
        .args(["--connections", "1", "img-ranges-one"]));
    cache.assert_fetched("img-ranges-one", &data, &r);
    let reqs = srv.file_requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!((reqs[0].range.as_deref(), reqs[0].status), (None, 200));
}

/// The complete prefix a parallel download recorded on its `.part`.
fn recorded_prefix(part: &std::path::Path) -> Option<u64> {
    crate::support::qcow2::done_record(part)?.parse().ok()
}

#[test]
fn killed_parallel_run_resumes_from_its_complete_prefix() {
    let (srv, data) = server("img-ranges-kill", 96 * MIB);
    srv.pace(Some(Duration::from_millis(3)));
    let cache = Cache::new();
    let name = entry_name("img-ranges-kill");
    let part = cache.base().join(format!("{name}.part"));
    let mut child = cache
        .fetch(&srv.url)
        .args(["--connections", "4", "img-ranges-kill"])
        .spawn()
        .unwrap();
    let mut waited = 0;
    while recorded_prefix(&part).unwrap_or(0) < SEGMENT {
        std::thread::sleep(Duration::from_millis(5));
        waited += 1;
        assert!(waited < 12000, "the first chunk never completed");
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let prefix = recorded_prefix(&part).unwrap();
    assert!(prefix < data.len() as u64, "finished before the kill");
    let before = srv.file_requests().len();

    srv.pace(None);
    let r = run(cache
        .fetch(&srv.url)
        .args(["--connections", "4", "img-ranges-kill"]));
    cache.assert_fetched("img-ranges-kill", &data, &r);
    assert!(
        r.stderr
            .contains(&format!("resuming {} from byte", part.display())),
        "{}",
        r.stderr
    );
    // Nothing before the recorded prefix was asked for again.
    let again = &srv.file_requests()[before..];
    assert!(
        again
            .iter()
            .all(|s| range_start(s).is_some_and(|at| at >= prefix)),
        "{again:?}"
    );
}

#[test]
fn connections_each_capped_bring_the_whole_image() {
    let (srv, data) = server("img-ranges-capped", 72 * MIB);
    // Every connection through the proxy is capped at one 64 KiB chunk per millisecond.
    let proxy = Proxy::start(&srv.url, Duration::from_millis(1), None);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&proxy.url)
        .args(["--connections", "3", "img-ranges-capped"]));
    cache.assert_fetched("img-ranges-capped", &data, &r);
    let files: Vec<_> = proxy
        .statuses()
        .into_iter()
        .filter(|(line, _)| line.contains("/file"))
        .collect();
    assert_eq!(files.len(), 5, "{files:?}");
    // Chunk 0 from byte 0 (a 200), the four others ranged.
    assert_eq!(
        files.iter().filter(|(_, code)| *code == 206).count(),
        4,
        "{files:?}"
    );
    let served: u64 = srv.file_requests().iter().map(|s| s.body_bytes).sum();
    assert!(served >= data.len() as u64, "{served}");
}

#[test]
fn the_real_glance_serves_a_large_image_over_ranges() {
    let g = crate::support::glance::real();
    let data = test_bytes(80 * MIB, 91);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ranged.raw");
    std::fs::write(&src, &data).unwrap();
    let id = g.upload("ranged-raw", "raw", &src);
    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).args(["-v", "--connections", "4", &id]));
    cache.assert_fetched(&id, &data, &r);
    // Glance answered the probe with a 206: the chunks went over parallel requests.
    assert!(
        r.stderr
            .contains("5 chunks of 16777216 bytes over 4 connections"),
        "{}",
        r.stderr
    );
}

#[test]
fn parallel_download_keeps_its_peak_memory_small() {
    let (srv, data) = server("img-ranges-rss", 128 * MIB);
    // Paced so that the download lasts many polls.
    srv.pace(Some(Duration::from_millis(1)));
    let cache = Cache::new();
    let mut child = cache
        .fetch(&srv.url)
        .args(["-q", "--connections", "4", "img-ranges-rss"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The high-water mark of the running binary (rusage of a child would count the pages of
    // this test process it was forked from); it only grows, so the last reading bounds all.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let hwm = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
        peak_kib = peak_kib.max(hwm.unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0), "exit code");
    let path = cache.base().join(entry_name("img-ranges-rss"));
    assert!(std::fs::read(&path).unwrap() == data, "entry differs");
    eprintln!("peak RSS of a 4-connection fetch: {peak_kib} KiB");
    assert!(peak_kib > 0, "never read the peak");
    assert!(peak_kib < 32 << 10, "peak RSS {peak_kib} KiB");
    assert!(srv.file_requests().len() >= 4);
}

#[test]
fn a_chunk_that_keeps_failing_fails_the_fetch_and_leaves_nothing() {
    let (srv, _) = server("img-ranges-down", 80 * MIB);
    // The probe succeeds; every request after it fails.
    srv.script(std::iter::once(Action::Normal).chain(std::iter::repeat_n(Action::Status(503), 40)));
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args([
        "--connections",
        "4",
        "--retries",
        "1",
        "img-ranges-down",
    ]));
    r.assert_code(7);
    assert!(r.stderr.contains("503"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn a_body_longer_than_the_record_is_refused_over_ranges_too() {
    let data = test_bytes(80 * MIB, 93);
    let mut image = Image::raw("img-ranges-long", data);
    image.size -= 1000;
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&srv.url)
        .args(["--connections", "4", "img-ranges-long"]));
    r.assert_code(6);
    assert!(r.stderr.contains("sends more than"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
    assert!(srv.file_requests().len() > 1);
}
