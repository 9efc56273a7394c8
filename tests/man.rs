//! The man pages: one per command, each listing the command's own and global options (as its
//! `--help` shows them), its environment, exit status as a list, files and examples; `--out-dir`
//! writes one file per page; every page renders without a warning.

use std::collections::BTreeSet;
use std::path::Path;

use crate::support::{imgcache, run};

/// The commands that must have a page (more may exist).
const COMMANDS: &[&[&str]] = &[
    &[],
    &["fetch"],
    &["create"],
    &["delete"],
    &["prune"],
    &["list"],
    &["verify"],
    &["inspect"],
    &["config"],
    &["config", "show"],
    &["config", "template"],
    &["completions"],
    &["man"],
];

fn page_name(words: &[&str]) -> String {
    std::iter::once("imgcache")
        .chain(words.iter().copied())
        .collect::<Vec<_>>()
        .join("-")
}

/// The long options `imgcache WORDS --help` shows.
fn long_options(words: &[&str]) -> BTreeSet<String> {
    let r = run(imgcache().args(words).arg("--help"));
    r.assert_code(0);
    let mut out = BTreeSet::new();
    for line in r.stdout.lines() {
        let t = line.trim_start();
        if !t.starts_with('-') {
            continue;
        }
        for word in t.split([' ', ',']) {
            if let Some(name) = word.strip_prefix("--") {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

/// A section of a roff page, from its `.SH` line to the next.
fn section<'a>(roff: &'a str, title: &str) -> Option<&'a str> {
    let start = roff
        .find(&format!(".SH {title}\n"))
        .or_else(|| roff.find(&format!(".SH \"{title}\"\n")))?;
    let rest = &roff[start + 4..];
    let end = rest.find("\n.SH ").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

#[test]
fn out_dir_writes_one_page_per_command_with_see_also_naming_real_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let r = run(imgcache().arg("man").arg("--out-dir").arg(&out));
    r.assert_code(0);
    let files: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let printed: BTreeSet<String> = r
        .stdout
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(printed, files, "stdout names every file written");
    for words in COMMANDS {
        assert!(
            files.contains(&format!("{}.1", page_name(words))),
            "{words:?}: {files:?}"
        );
    }
    assert!(!files.contains("imgcache-help.1"), "{files:?}");
    for f in &files {
        let roff = std::fs::read_to_string(out.join(f)).unwrap();
        let see = section(&roff, "SEE ALSO").unwrap_or_else(|| panic!("{f}: no SEE ALSO"));
        let mut named = 0;
        for part in see.split("\\fB").skip(1) {
            let name = part.split("\\fR").next().unwrap().replace("\\-", "-");
            if name.starts_with("imgcache") {
                named += 1;
                assert!(files.contains(&format!("{name}.1")), "{f} names {name}");
            }
        }
        assert!(named >= 1, "{f}: {see}");
    }
}

#[test]
fn every_page_has_its_options_environment_and_exit_status_list() {
    for words in COMMANDS {
        let r = run(imgcache().arg("man").args(*words));
        r.assert_code(0);
        let roff = &r.stdout;
        let name = page_name(words);
        assert!(
            roff.contains(&format!(".TH {} 1", name.to_uppercase())),
            "{name}: {}",
            &roff[..200.min(roff.len())]
        );
        for title in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "ENVIRONMENT",
            "EXIT STATUS",
            "FILES",
        ] {
            assert!(section(roff, title).is_some(), "{name}: no {title}");
        }
        for opt in long_options(words) {
            let escaped = format!("\\-\\-{}", opt.replace('-', "\\-"));
            assert!(roff.contains(&escaped), "{name}: --{opt} missing");
        }
        // One list item per code: `.TP` then the code in bold on its own line.
        let exit = section(roff, "EXIT STATUS").unwrap();
        assert!(exit.contains(".TP\n\\fB0\\fR\n"), "{name}: {exit}");
        assert!(exit.contains(".TP\n\\fB2\\fR\n"), "{name}: {exit}");
        let env = section(roff, "ENVIRONMENT").unwrap();
        assert!(env.contains("IMGCACHE_CONFIG"), "{name}: {env}");
    }
}

#[test]
fn pages_name_the_right_variables_and_codes() {
    let fetch = run(imgcache().args(["man", "fetch"]));
    fetch.assert_code(0);
    let env = section(&fetch.stdout, "ENVIRONMENT").unwrap();
    for var in [
        "OS_IMAGE_URL",
        "OS_AUTH_TOKEN",
        "OS_CLOUD",
        "OS_AUTH_URL",
        "OS_APPLICATION_CREDENTIAL_SECRET",
        "IMGCACHE_INSTANCES_PATH",
        "IMGCACHE_REVALIDATE",
    ] {
        assert!(env.contains(&var.replace('-', "\\-")), "{var}: {env}");
    }
    let exit = section(&fetch.stdout, "EXIT STATUS").unwrap();
    assert!(exit.contains("\\fB8\\fR"), "{exit}");
    assert!(
        !exit.contains("\\fB13\\fR"),
        "prune's code on fetch's page: {exit}"
    );
    // The options keep their value names.
    assert!(
        fetch
            .stdout
            .contains("\\fB\\-\\-instances\\-path\\fR \\fI<DIR>\\fR"),
        "{}",
        fetch.stdout
    );

    let top = run(imgcache().arg("man"));
    top.assert_code(0);
    let exit = section(&top.stdout, "EXIT STATUS").unwrap();
    for code in 0..=16 {
        assert!(
            exit.contains(&format!(".TP\n\\fB{code}\\fR\n")),
            "{code}: {exit}"
        );
    }
    let files = section(&top.stdout, "FILES").unwrap();
    assert!(files.contains("/etc/imgcache/imgcache.toml"), "{files}");
    assert!(files.contains("_base/"), "{files}");

    let inspect = run(imgcache().args(["man", "inspect"]));
    inspect.assert_code(0);
    assert!(
        !inspect.stdout.contains("instances\\-path \\fI"),
        "inspect uses no cache: {}",
        inspect.stdout
    );
    let nested = run(imgcache().args(["man", "config", "show"]));
    nested.assert_code(0);
    let joined = run(imgcache().args(["man", "config-show"]));
    joined.assert_code(0);
    assert_eq!(nested.stdout, joined.stdout);
    assert!(nested.stdout.contains(".TH IMGCACHE-CONFIG-SHOW 1"));

    let bad = run(imgcache().args(["man", "fetchh"]));
    bad.assert_code(2);
    assert!(
        bad.stderr.contains("no man page for \"fetchh\""),
        "{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("imgcache-fetch"), "{}", bad.stderr);
}

#[test]
fn pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    run(imgcache().arg("man").arg("--out-dir").arg(dir.path())).assert_code(0);
    let have_man = std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have_man,
        "man (man-db) is needed: apt-get install man-db groff-base"
    );
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", path.display());
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(warnings.is_empty(), "{}: {warnings}", path.display());
        // man formats for a pager even into a pipe: bold is `X\bX`.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        assert!(text.contains("EXIT STATUS"), "{}: {text}", path.display());
    }
}
