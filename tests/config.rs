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
        ("lock_timeout = \"soon\"\n", "lock_timeout = \"soon\""),
        ("jobs = \"four\"\n", "jobs = \"four\": invalid digit"),
        ("jobs = 0\n", "jobs = \"0\""),
        ("min_free = \"120%\"\n", "min_free = \"120%\""),
        ("max_size = \"lots\"\n", "max_size = \"lots\""),
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
    // Every value is checked whatever the command: `config show` does not print a bad one.
    std::fs::write(&cfg, "jobs = \"four\"\n").unwrap();
    let r = run(imgcache()
        .arg("--config")
        .arg(&cfg)
        .args(["config", "show"]));
    r.assert_code(2);
    assert!(r.stderr.contains("jobs = \"four\""), "{}", r.stderr);
    // A file the operator named that does not exist is a usage error too.
    let r = run(imgcache().args(["--config", "/nonexistent/imgcache.toml", "list"]));
    r.assert_code(2);
    assert!(
        r.stderr.contains("/nonexistent/imgcache.toml") && r.stderr.contains("does not exist"),
        "{}",
        r.stderr
    );
    // One that is not a regular file is refused as such (15), never read.
    let r = run(imgcache().arg("--config").arg(dir.path()).arg("list"));
    r.assert_code(15);
}

#[test]
fn config_show_names_effective_defaults_ceph_sources_and_the_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("imgcache.toml");
    std::fs::write(&cfg, "").unwrap();
    let clean: &[(&str, &str)] = &[];
    let v = show(&cfg, clean, &[]);
    assert_eq!(setting(&v, "os_interface"), ("public", "default"));
    assert_eq!(
        setting(&v, "ceph_conf"),
        ("/etc/ceph/ceph.conf", "default (Ceph's)")
    );
    assert_eq!(setting(&v, "ceph_id"), ("admin", "default (Ceph's)"));
    assert!(v["auth"].as_str().unwrap().starts_with("none"), "{v}");
    let v = show(
        &cfg,
        &[
            ("CEPH_CONF", "/etc/ceph/site.conf"),
            (
                "CEPH_ARGS",
                "--id cinder --keyring=/etc/ceph/cinder.keyring",
            ),
            ("OS_AUTH_URL", "http://keystone:5000/v3"),
            ("OS_USERNAME", "ops"),
            ("OS_PASSWORD", "s3cret-pass"),
            ("OS_PROJECT_NAME", "admin"),
        ],
        &[],
    );
    assert_eq!(
        setting(&v, "ceph_conf"),
        ("/etc/ceph/site.conf", "env:CEPH_CONF")
    );
    assert_eq!(setting(&v, "ceph_id"), ("cinder", "env:CEPH_ARGS"));
    assert_eq!(
        setting(&v, "ceph_keyring"),
        ("/etc/ceph/cinder.keyring", "env:CEPH_ARGS")
    );
    let auth = v["auth"].as_str().unwrap();
    assert!(
        auth.starts_with("Keystone password for user \"ops\", project \"admin\""),
        "{auth}"
    );
    assert!(!v.to_string().contains("s3cret-pass"));
}

#[test]
fn the_ceph_tools_get_ceph_conf_and_ceph_args_when_no_flag_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rbd.log");
    let wrapper = dir.path().join("rbd");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"argv=$* conf=$CEPH_CONF args=$CEPH_ARGS\" >> {}\necho 'rbd: error' >&2\nexit 1\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cache = Cache::new();
    let r = run(imgcache()
        .args(["prune", "--instances-path"])
        .arg(cache.instances())
        .env("IMGCACHE_RBD", &wrapper)
        .env("CEPH_CONF", "/etc/ceph/site.conf")
        .env("CEPH_ARGS", "--id cinder"));
    // The pool pass ran (CEPH_CONF turns it on) and the tool failed: exit 11 naming rbd.
    r.assert_code(11);
    assert!(r.stderr.contains("rbd ls"), "{}", r.stderr);
    let seen = std::fs::read_to_string(&log).unwrap();
    assert!(
        seen.contains("conf=/etc/ceph/site.conf args=--id cinder"),
        "{seen}"
    );
    assert!(!seen.contains(" -c "), "no -c when none was given: {seen}");
}
