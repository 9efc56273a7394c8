//! A closed stdout (`imgcache ... | head -1`) is not an error: every command that prints data
//! says nothing about it on stderr and exits with the code of its work (0 when all went well).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::{Cache, imgcache};

/// Runs `cmd` with stdout a pipe whose reading end is already closed; returns the exit code
/// and stderr.
fn with_closed_stdout(cmd: &mut Command) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = cmd
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, reads one line of its stdout and closes the pipe, like `| head -1`.
fn with_head(cmd: &mut Command) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut first).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        first,
    )
}

#[test]
fn closed_stdout_is_a_quiet_success() {
    let cache = Cache::new();
    let runs: Vec<Vec<String>> = vec![
        vec!["completions".into(), "bash".into()],
        vec!["completions".into(), "zsh".into()],
        vec!["man".into()],
        vec!["man".into(), "fetch".into()],
        vec!["config".into(), "show".into()],
        vec!["config".into(), "show".into(), "--json".into()],
        vec!["config".into(), "template".into()],
        vec!["--help".into()],
        vec!["fetch".into(), "--help".into()],
        vec!["--version".into()],
        vec![
            "list".into(),
            "--json".into(),
            "--instances-path".into(),
            cache.instances().display().to_string(),
        ],
    ];
    for args in runs {
        let (code, stderr) = with_closed_stdout(imgcache().args(&args));
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
}

#[test]
fn head_of_a_long_listing_is_a_quiet_success() {
    let cache = Cache::new();
    let base = cache.base();
    std::fs::create_dir_all(&base).unwrap();
    // Far more than a pipe holds (64 KiB): the writer is still writing when `head` goes away.
    for i in 0..3000u32 {
        std::fs::write(base.join(format!("{i:040x}")), b"x").unwrap();
    }
    for json in [true, false] {
        let mut cmd = imgcache();
        cmd.arg("list")
            .arg("--instances-path")
            .arg(cache.instances());
        if json {
            cmd.arg("--json");
        }
        let (code, stderr, first) = with_head(&mut cmd);
        assert_eq!(code, Some(0), "json={json}: {stderr}");
        assert_eq!(stderr, "", "json={json}");
        assert!(!first.is_empty(), "json={json}: no first line");
    }
    let (code, stderr, first) = with_head(imgcache().args(["completions", "bash"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "");
    assert!(first.starts_with("_imgcache()"), "{first}");
}

#[test]
fn closed_stdout_keeps_the_exit_code_of_the_work() {
    let cache = Cache::new();
    // A missing entry is exit 6 whether or not anyone reads the report.
    let (code, stderr) = with_closed_stdout(
        imgcache()
            .arg("verify")
            .arg("--instances-path")
            .arg(cache.instances())
            .arg("some-image"),
    );
    assert_eq!(code, Some(6), "{stderr}");
    assert_eq!(stderr, "");
}
