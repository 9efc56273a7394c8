//! Bad input from the command line: clear one-line errors, the documented codes, no panics.

use crate::support::{Cache, imgcache, run};

#[test]
fn bad_image_ids_are_usage_errors_naming_the_id() {
    let cache = Cache::new();
    for (id, why) in [
        ("..", "'.'"),
        ("a/b", "'/'"),
        ("x\u{7}y", "control"),
        ("", "empty"),
    ] {
        let r = run(cache.fetch("http://127.0.0.1:9").arg(id));
        r.assert_code(2);
        assert!(r.stderr.contains("invalid image id"), "{}", r.stderr);
        assert!(r.stderr.contains(why), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"));
    }
    assert!(!cache.base().exists(), "nothing created for bad input");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let r = run(imgcache().args(["fetch", "--no-such-flag", "x"]));
    r.assert_code(2);
    assert!(r.stderr.contains("--no-such-flag"), "{}", r.stderr);
}

#[test]
fn missing_endpoint_says_how_to_set_it() {
    let cache = Cache::new();
    let r = run(imgcache()
        .arg("fetch")
        .arg("--instances-path")
        .arg(cache.instances())
        .arg("some-id"));
    r.assert_code(2);
    assert!(r.stderr.contains("OS_IMAGE_URL"), "{}", r.stderr);
}

#[test]
fn bad_url_scheme_is_a_usage_error() {
    let cache = Cache::new();
    let r = run(cache.fetch("ftp://127.0.0.1/").arg("x"));
    r.assert_code(2);
    assert!(r.stderr.contains("ftp://"), "{}", r.stderr);
}

/// A port nobody listens on: bind a listener, then drop it.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn unreachable_endpoint_is_unavailable_after_retries() {
    let port = dead_port();
    let cache = Cache::new();
    let r = run(cache
        .fetch(&format!("http://127.0.0.1:{port}"))
        .args(["--retries", "1", "img"]));
    r.assert_code(7);
    assert!(r.stderr.contains("cannot reach Glance"), "{}", r.stderr);
    assert!(r.stderr.contains("retry 1/1"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn help_documents_exit_codes() {
    let r = run(imgcache().args(["fetch", "--help"]));
    r.assert_code(0);
    for needle in [
        "Exit codes:",
        "8   timed out waiting for a cache lock",
        "--lock-timeout",
    ] {
        assert!(r.stdout.contains(needle), "{needle}: {}", r.stdout);
    }
}

#[test]
fn token_is_never_printed() {
    let port = dead_port();
    let cache = Cache::new();
    let r = run(cache
        .fetch(&format!("http://127.0.0.1:{port}"))
        .env("OS_AUTH_TOKEN", "s3cr3t-token-value")
        .args(["--retries", "0", "-v", "img"]));
    assert!(!r.stderr.contains("s3cr3t"), "{}", r.stderr);
    r.assert_code(7);
    let h = run(imgcache()
        .args(["fetch", "--help"])
        .env("OS_AUTH_TOKEN", "s3cr3t-token-value"));
    assert!(!h.stdout.contains("s3cr3t"), "{}", h.stdout);
    h.assert_code(0);
}
