//! What a person reads: one clear line naming the thing and the fix, in words (not a raw error
//! chain), with units that are rounded and counted the way people count.

use crate::support::fault_server::{FaultServer, Image};
use crate::support::{Cache, entry_name, imgcache, run, test_bytes};

#[test]
fn a_decimal_size_says_sizes_are_whole_numbers() {
    let cache = Cache::new();
    let r = run(cache
        .create("http://127.0.0.1:9", "vm1", "img")
        .args(["--size", "1.5G"]));
    r.assert_code(2);
    assert!(
        r.stderr.contains("--size")
            && r.stderr.contains("whole numbers")
            && r.stderr.contains("1536M"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_lock_timeout_is_rounded_and_names_who_may_hold_it() {
    let cache = Cache::new();
    let name = entry_name("img");
    let _nova = crate::support::LockfHold::take(
        &cache.instances().join("locks").join(format!("nova-{name}")),
    );
    let srv = FaultServer::start(Image::raw("img", test_bytes(4096, 1)));
    let r = run(cache.fetch(&srv.url).args(["--lock-timeout", "1s", "img"]));
    r.assert_code(8);
    assert!(r.stderr.contains("timed out after 1.0s"), "{}", r.stderr);
    assert!(r.stderr.contains("possibly nova-compute"), "{}", r.stderr);
    assert!(
        r.stderr.contains("pid "),
        "the holder's pid is named: {}",
        r.stderr
    );
}

#[test]
fn an_instance_name_that_is_a_path_speaks_of_instances() {
    let cache = Cache::new();
    let r = run(imgcache()
        .args(["delete", "--instances-path"])
        .arg(cache.instances())
        .arg("../ops"));
    r.assert_code(2);
    assert!(r.stderr.contains("invalid instance name"), "{}", r.stderr);
    assert!(!r.stderr.contains("image id"), "{}", r.stderr);
    assert!(!r.stderr.contains("Glance"), "{}", r.stderr);
}

#[test]
fn glance_refusing_a_request_without_a_token_says_none_was_sent() {
    let srv = FaultServer::start(Image::raw("img", test_bytes(4096, 2)));
    srv.script([crate::support::fault_server::Action::Status(401)]);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).arg("img").env_remove("OS_AUTH_TOKEN"));
    r.assert_code(10);
    assert!(r.stderr.contains("no token was sent"), "{}", r.stderr);
}

#[test]
fn a_refused_connection_is_said_in_plain_words_with_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let cache = Cache::new();
    let url = format!("http://127.0.0.1:{port}");
    let r = run(cache.fetch(&url).args(["--retries", "0", "img"]));
    r.assert_code(7);
    assert!(r.stderr.contains(&url), "{}", r.stderr);
    assert!(r.stderr.contains("connection refused"), "{}", r.stderr);
    assert!(!r.stderr.contains("client error (Connect)"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn list_counts_like_people_and_keeps_its_columns_around_long_names() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let name = entry_name("a");
    std::fs::write(cache.base().join(&name), test_bytes(4096, 3)).unwrap();
    std::fs::write(cache.base().join(format!("{name}.part")), b"partial").unwrap();
    let r = run(imgcache()
        .args(["list", "--instances-path"])
        .arg(cache.instances()));
    r.assert_code(0);
    assert!(r.stdout.contains("1 entry, 1 temp file"), "{}", r.stdout);
    assert!(r.stdout.contains("0 instances"), "{}", r.stdout);
    // Every row has its IMAGE ID column where the header has it.
    let lines: Vec<&str> = r.stdout.lines().collect();
    let col = lines[0].find("IMAGE ID").unwrap();
    for l in &lines[1..lines.len() - 1] {
        assert_eq!(&l[col - 1..col], " ", "{l:?}");
        assert_ne!(&l[col..col + 1], " ", "{l:?}");
    }
}

#[test]
fn verify_says_so_when_there_is_nothing_to_verify() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let r = run(imgcache()
        .args(["verify", "--instances-path"])
        .arg(cache.instances()));
    r.assert_code(0);
    assert_eq!(
        r.stdout.trim(),
        "nothing to verify: the cache has no entries"
    );
    let r = run(imgcache()
        .args(["verify", "--json", "--instances-path"])
        .arg(cache.instances()));
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["checked"], 0, "{v}");
}

#[test]
fn prune_dry_run_json_says_what_it_would_remove() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.instances().join("locks")).unwrap();
    std::fs::write(cache.instances().join("locks/imgcache-gone"), b"").unwrap();
    let r = run(imgcache()
        .args(["prune", "--dry-run", "--json", "--instances-path"])
        .arg(cache.instances()));
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["lock_files_would_remove"], 1, "{v}");
    assert!(v.get("lock_files_removed").is_none(), "{v}");
}

#[test]
fn a_disk_of_another_image_is_named_by_its_image() {
    let srv = FaultServer::start({
        let mut i = Image::raw("one", test_bytes(1 << 20, 4));
        i.any_id = true;
        i
    });
    let cache = Cache::new();
    run(&mut cache.create(&srv.url, "vm1", "one")).assert_code(0);
    let r = run(&mut cache.create(&srv.url, "vm1", "other"));
    r.assert_code(12);
    assert!(
        r.stderr
            .contains("was made from image one, not image other"),
        "{}",
        r.stderr
    );
}
