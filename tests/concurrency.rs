//! Many processes, one image: exactly one download, everyone gets the same entry.

use std::time::Duration;

use crate::support::fault_server::{FaultServer, Image};
use crate::support::{Cache, entry_name, test_bytes};

#[test]
fn eight_processes_fetching_one_image_download_it_once() {
    let data = test_bytes(2 << 20, 11);
    let srv = FaultServer::start(Image::raw("img-herd", data.clone()));
    // Slow enough that all eight start while the first is still downloading.
    srv.pace(Some(Duration::from_millis(15)));
    let cache = Cache::new();
    let children = cache.spawn_fetches(&srv.url, "img-herd", 8);
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let path = cache.base().join(entry_name("img-herd"));
    let expected = format!("img-herd {}\n", path.display());
    let mut waited = 0;
    for o in &outs {
        crate::support::assert_exit_ok(o);
        assert_eq!(String::from_utf8_lossy(&o.stdout), expected);
        if String::from_utf8_lossy(&o.stderr).contains("waiting for the lock") {
            waited += 1;
        }
    }
    assert_eq!(srv.file_requests().len(), 1, "exactly one download");
    assert!(waited >= 1, "at least one process said it was waiting");
    assert!(std::fs::read(&path).unwrap() == data);
    cache.assert_clean_or_complete(Some(&entry_name("img-herd")));
}

#[test]
fn lock_timeout_has_its_own_exit_code() {
    let data = test_bytes(1 << 20, 12);
    let srv = FaultServer::start(Image::raw("img-busy", data));
    let cache = Cache::new();
    let locks = cache.instances().join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let lock_path = locks.join(format!("imgcache-{}", entry_name("img-busy")));
    let holder = std::fs::File::create(&lock_path).unwrap();
    fs2::FileExt::lock_exclusive(&holder).unwrap();
    let r =
        crate::support::run(
            cache
                .fetch(&srv.url)
                .args(["--lock-timeout", "300ms", "img-busy"]),
        );
    r.assert_code(8);
    assert!(
        r.stderr.contains("waiting for the lock on image img-busy"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--lock-timeout"), "{}", r.stderr);
    assert!(srv.file_requests().is_empty());
}

#[test]
fn sixteen_fetchers_one_download_and_four_by_four_four_downloads() {
    let cache = Cache::new();
    let data = test_bytes(1 << 20, 13);
    let one = FaultServer::start(Image::raw("herd16", data.clone()));
    one.pace(Some(Duration::from_millis(10)));
    for c in cache.spawn_fetches(&one.url, "herd16", 16) {
        let o = c.wait_with_output().unwrap();
        crate::support::assert_exit_ok(&o);
    }
    assert_eq!(one.file_requests().len(), 1);

    let servers: Vec<FaultServer> = (0..4)
        .map(|i| {
            let s = FaultServer::start(Image::raw(
                &format!("herd4-{i}"),
                test_bytes(1 << 20, 20 + i),
            ));
            s.pace(Some(Duration::from_millis(10)));
            s
        })
        .collect();
    let children: Vec<_> = servers
        .iter()
        .enumerate()
        .flat_map(|(i, s)| cache.spawn_fetches(&s.url, &format!("herd4-{i}"), 4))
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        crate::support::assert_exit_ok(&o);
    }
    let downloads: usize = servers.iter().map(|s| s.file_requests().len()).sum();
    assert_eq!(downloads, 4);
}

#[test]
fn slow_but_steady_server_never_times_out() {
    // One 64 KiB chunk every 400 ms: the whole transfer takes far longer than the 1 s read
    // timeout, but no single silence does.
    let data = test_bytes(640 << 10, 14);
    let srv = FaultServer::start(Image::raw("steady", data.clone()));
    srv.pace(Some(Duration::from_millis(400)));
    let cache = Cache::new();
    let r = crate::support::run(
        cache
            .fetch(&srv.url)
            .args(["--read-timeout", "1s", "steady"]),
    );
    r.assert_code(0);
    assert_eq!(srv.file_requests().len(), 1, "no retry was needed");
    assert!(std::fs::read(cache.base().join(entry_name("steady"))).unwrap() == data);
}
