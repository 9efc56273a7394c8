//! `--help`: each command's own options first, the global ones that matter to it under their
//! own heading, only its exit codes; usage lines that never make an optional flag look required.

use crate::support::{imgcache, run};

/// The text between `heading` and the next blank-line-separated heading or the end.
fn after<'a>(text: &'a str, heading: &str) -> &'a str {
    let i = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in\n{text}"));
    &text[i..]
}

#[test]
fn fetch_help_puts_global_options_after_its_own() {
    let r = run(imgcache().args(["fetch", "--help"]));
    r.assert_code(0);
    let h = &r.stdout;
    let own = h.find("\nOptions:\n").expect("Options heading");
    let global = h
        .find("\nGlobal options:\n")
        .expect("Global options heading");
    assert!(own < global, "{h}");
    let (mine, theirs) = h.split_at(global);
    assert!(mine.contains("--glance-url <URL>"), "{h}");
    assert!(mine.contains("--lock-timeout <DURATION>"), "{h}");
    assert!(!mine.contains("--instances-path"), "{h}");
    assert!(theirs.contains("--instances-path <DIR>"), "{h}");
    assert!(theirs.contains("--config <FILE>"), "{h}");
    let codes = after(h, "Exit codes:");
    assert!(codes.contains("8   timed out"), "{codes}");
    assert!(!codes.contains("13  prune"), "{codes}");
    assert!(codes.contains("imgcache --help"), "{codes}");
    assert!(h.contains("Usage: imgcache fetch [OPTIONS] <ID>..."), "{h}");
}

#[test]
fn commands_without_a_cache_do_not_offer_its_options() {
    for words in [
        &["inspect"][..],
        &["completions"],
        &["man"],
        &["config", "template"],
    ] {
        let r = run(imgcache().args(words).arg("--help"));
        r.assert_code(0);
        assert!(
            !r.stdout.contains("--instances-path"),
            "{words:?}: {}",
            r.stdout
        );
        assert!(
            !r.stdout.contains("--base-dir-name"),
            "{words:?}: {}",
            r.stdout
        );
        assert!(
            r.stdout.contains("Global options:"),
            "{words:?}: {}",
            r.stdout
        );
        assert!(!r.stdout.contains("13  prune"), "{words:?}: {}", r.stdout);
    }
    let c = run(imgcache().args(["completions", "--help"]));
    assert!(!c.stdout.contains("Exit codes:"), "{}", c.stdout);
    let i = run(imgcache().args(["inspect", "--help"]));
    let codes = after(&i.stdout, "Exit codes:");
    assert!(codes.contains("5   image refused"), "{codes}");
    assert!(!codes.contains("3   image not found"), "{codes}");
    // Still accepted, so a shared command line keeps working.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.raw");
    std::fs::write(&file, [0u8; 4096]).unwrap();
    let r = run(imgcache()
        .args([
            "inspect",
            "--no-qemu-img",
            "--instances-path",
            "/nonexistent",
        ])
        .arg(&file));
    r.assert_code(0);
}

#[test]
fn usage_in_errors_does_not_make_given_options_look_required() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(imgcache()
        .args([
            "fetch",
            "--glance-url",
            "http://127.0.0.1:9",
            "--instances-path",
        ])
        .arg(dir.path()));
    r.assert_code(2);
    assert!(
        r.stderr.contains("Usage: imgcache fetch [OPTIONS] <ID>..."),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("--glance-url <URL>"), "{}", r.stderr);

    // The same with the options coming from a configuration file.
    let conf = dir.path().join("imgcache.toml");
    std::fs::write(
        &conf,
        format!(
            "glance_url = \"http://127.0.0.1:9\"\ninstances_path = \"{}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let r = run(imgcache().arg("--config").arg(&conf).arg("fetch"));
    r.assert_code(2);
    assert!(
        r.stderr.contains("Usage: imgcache fetch [OPTIONS] <ID>..."),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("--instances-path <DIR>"), "{}", r.stderr);
}
