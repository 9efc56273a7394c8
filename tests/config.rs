//! The configuration file: precedence flags > env > file > defaults, unknown keys, `config show`.

use crate::support::fault_server::{Action, FaultServer, Image};
use crate::support::{Cache, imgcache, run, test_bytes};

fn show(config: &std::path::Path, extra_env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut cmd = imgcache();
    cmd.arg("--config")
        .arg(config)
        .args(["config", "show", "--json"])
        .args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let r = run(&mut cmd);
    r.assert_code(0);
    serde_json::from_str(&r.stdout).unwrap()
}

fn setting<'a>(v: &'a serde_json::Value, key: &str) -> (&'a str, &'a str) {
    let s = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == key)
        .unwrap_or_else(|| panic!("{key} missing"));
    (
        s["value"].as_str().unwrap_or("-"),
        s["source"].as_str().unwrap(),
    )
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("imgcache.toml");
    std::fs::write(
        &cfg,
        "instances_path = \"/from/file\"\nlock_timeout = \"5m\"\n",
    )
    .unwrap();
    let file_src = format!("file:{}", cfg.display());

    let v = show(&cfg, &[], &[]);
    assert_eq!(
        setting(&v, "instances_path"),
        ("/from/file", file_src.as_str())
    );
    assert_eq!(setting(&v, "lock_timeout"), ("5m", file_src.as_str()));
    assert_eq!(setting(&v, "retries"), ("3", "default"));

    let v = show(&cfg, &[("IMGCACHE_INSTANCES_PATH", "/from/env")], &[]);
    assert_eq!(
        setting(&v, "instances_path"),
        ("/from/env", "env:IMGCACHE_INSTANCES_PATH")
    );

    let v = show(
        &cfg,
        &[("IMGCACHE_INSTANCES_PATH", "/from/env")],
        &["--instances-path", "/from/flag"],
    );
    assert_eq!(setting(&v, "instances_path"), ("/from/flag", "flag"));
}

#[test]
fn file_values_reach_the_commands_and_flags_still_win() {
    let data = test_bytes(1 << 20, 80);
    let srv = FaultServer::start(Image::raw("cfg-img", data));
    srv.script(std::iter::repeat_n(Action::Status(503), 10));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("imgcache.toml");
    std::fs::write(&cfg, "retries = 1\nretry_backoff = \"10ms\"\n").unwrap();
    let cache = Cache::new();
    let fetch = |extra: &[&str]| {
        run(imgcache()
            .arg("fetch")
            .arg("--config")
            .arg(&cfg)
            .arg("--instances-path")
            .arg(cache.instances())
            .args(["--glance-url", &srv.url])
            .args(extra)
            .arg("cfg-img"))
    };
    fetch(&[]).assert_code(7);
    assert_eq!(srv.file_requests().len(), 2, "retries = 1 from the file");
    fetch(&["--retries", "0"]).assert_code(7);
    assert_eq!(srv.file_requests().len(), 3, "--retries 0 beats the file");
}

#[test]
fn bad_files_are_usage_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("imgcache.toml");
    for (text, needle) in [
        ("lock_timout = \"5m\"\n", "unknown key \"lock_timout\""),
        ("token = \"abc\"\n", "secret"),
        ("retries = [1]\n", "retries must be"),
        ("lock_timeout = \"soon\"\n", "--lock-timeout"),
        ("this is not toml", "imgcache.toml"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let r = run(imgcache().arg("--config").arg(&cfg).args([
            "fetch",
            "--glance-url",
            "http://127.0.0.1:9",
            "x",
        ]));
        r.assert_code(2);
        assert!(r.stderr.contains(needle), "{text}: {}", r.stderr);
    }
    // A file that cannot be read is an I/O error (1), not a usage error like the ones above.
    let r = run(imgcache().args(["--config", "/nonexistent/imgcache.toml", "list"]));
    r.assert_code(1);
    assert!(
        r.stderr.contains("/nonexistent/imgcache.toml"),
        "{}",
        r.stderr
    );
}
