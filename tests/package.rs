//! The Debian package (scripts/package/build-deb): what it holds, that its units pass
//! `systemd-analyze verify`, that it installs, works, and removes cleanly (conffiles kept until
//! purge). Also: the shipped configuration file is `imgcache config template`, and every value
//! in it is accepted. The package test installs into the real system (as root, like CI) and
//! purges the package again whatever happens.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Run, imgcache, run};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn template() -> String {
    let r = run(imgcache().args(["config", "template"]));
    r.assert_code(0);
    r.stdout
}

#[test]
fn shipped_configuration_file_is_the_template() {
    let shipped = std::fs::read_to_string(repo().join("scripts/package/imgcache.toml")).unwrap();
    assert_eq!(
        shipped,
        template(),
        "scripts/package/imgcache.toml is stale: imgcache config template > scripts/package/imgcache.toml"
    );
}

#[test]
fn every_default_in_the_template_is_accepted() {
    let text = template();
    let mut keys = 0;
    let mut uncommented = String::new();
    for line in text.lines() {
        match line.strip_prefix('#') {
            // `#key = value`; the explanations are `# ...`.
            Some(l) if l.starts_with(|c: char| c.is_ascii_lowercase()) && !l.contains('<') => {
                keys += 1;
                uncommented.push_str(l);
                uncommented.push('\n');
            }
            _ => {}
        }
    }
    assert!(keys >= 20, "{text}");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("imgcache.toml");
    std::fs::write(&conf, &uncommented).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    // create has the most settings (Glance, fetch, Ceph, keep_local_base): it must get as far
    // as Glance, which is not there (7), not stop at the file (2).
    let r = run(imgcache()
        .arg("--config")
        .arg(&conf)
        .args([
            "create",
            "vm1",
            "--image",
            "img",
            "--retries",
            "0",
            "--glance-url",
            &url,
        ])
        .arg("--instances-path")
        .arg(dir.path()));
    r.assert_code(7);
    let r = run(imgcache()
        .arg("--config")
        .arg(&conf)
        .args(["prune", "--dry-run", "--instances-path"])
        .arg(dir.path()));
    r.assert_code(0);
    let r = run(imgcache()
        .arg("--config")
        .arg(&conf)
        .args(["config", "show"]));
    r.assert_code(0);
    assert!(r.stdout.contains("file:"), "{}", r.stdout);
}

fn sh(cmd: &mut Command) -> Run {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn installed() -> Option<String> {
    let r = sh(Command::new("dpkg-query").args(["-W", "-f", "${db:Status-Abbrev}", "imgcache"]));
    (r.code == 0).then(|| r.stdout.trim().to_owned())
}

/// Purges the package when dropped, so a failed assertion leaves the system as it was.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", "imgcache"]).output();
    }
}

const UNITS: &[&str] = &[
    "/usr/lib/systemd/system/imgcache-prune.service",
    "/usr/lib/systemd/system/imgcache-prune.timer",
    "/usr/lib/systemd/system/imgcache-fetch@.service",
];

#[test]
fn debian_package_installs_works_and_purges_cleanly() {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "installs a package: run as root (CI does)");
    assert!(
        installed().is_none_or(|s| s.starts_with("un")),
        "an imgcache package is installed here; this test would replace it"
    );
    for f in ["/etc/imgcache/imgcache.toml", "/etc/default/imgcache"] {
        assert!(
            !Path::new(f).exists(),
            "{f} exists; purging the test package would remove it"
        );
    }

    let out = tempfile::tempdir().unwrap();
    let r = sh(Command::new(repo().join("scripts/package/build-deb"))
        .env("IMGCACHE_BIN", env!("CARGO_BIN_EXE_imgcache"))
        .env("IMGCACHE_DEB_DIR", out.path()));
    r.assert_code(0);
    let arch = sh(Command::new("dpkg").arg("--print-architecture"));
    let name = format!(
        "imgcache_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.stdout.trim()
    );
    let deb = out.path().join(&name);
    assert_eq!(r.stdout.trim(), deb.display().to_string(), "{}", r.stderr);

    let list = sh(Command::new("dpkg-deb").arg("-c").arg(&deb));
    list.assert_code(0);
    let mut want: Vec<String> = [
        "/usr/bin/imgcache",
        "/usr/share/man/man1/imgcache.1.gz",
        "/usr/share/man/man1/imgcache-fetch.1.gz",
        "/usr/share/man/man1/imgcache-create.1.gz",
        "/usr/share/man/man1/imgcache-prune.1.gz",
        "/usr/share/man/man1/imgcache-config-show.1.gz",
        "/usr/share/bash-completion/completions/imgcache",
        "/usr/share/zsh/vendor-completions/_imgcache",
        "/usr/share/fish/vendor_completions.d/imgcache.fish",
        "/etc/imgcache/imgcache.toml",
        "/etc/default/imgcache",
        "/usr/share/doc/imgcache/copyright",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.extend(UNITS.iter().map(|s| s.to_string()));
    for path in &want {
        assert!(
            list.stdout
                .lines()
                .any(|l| l.ends_with(&format!(".{path}"))),
            "{path} not in the package:\n{}",
            list.stdout
        );
    }
    let conffiles = sh(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&deb)
        .arg("conffiles"));
    conffiles.assert_code(0);
    assert_eq!(
        conffiles.stdout,
        "/etc/imgcache/imgcache.toml\n/etc/default/imgcache\n"
    );

    let _purge = Purge;
    // Slim images exclude /usr/share/man from every package (dpkg.cfg.d path-exclude); a later
    // include wins, so the pages this test looks for are installed there too.
    let i = sh(Command::new("dpkg")
        .arg("--path-include=/usr/share/man/man1/imgcache*")
        .arg("-i")
        .arg(&deb));
    i.assert_code(0);

    let verify = sh(Command::new("systemd-analyze").arg("verify").args(UNITS));
    verify.assert_code(0);
    assert_eq!(verify.stderr, "", "systemd-analyze verify warns");

    let v = sh(Command::new("/usr/bin/imgcache").arg("--version"));
    v.assert_code(0);
    assert_eq!(
        v.stdout.trim(),
        format!("imgcache {}", env!("CARGO_PKG_VERSION"))
    );
    let m = sh(Command::new("man").args(["-w", "imgcache-fetch"]));
    m.assert_code(0);
    assert_eq!(m.stdout.trim(), "/usr/share/man/man1/imgcache-fetch.1.gz");
    assert_eq!(
        std::fs::read_to_string("/etc/imgcache/imgcache.toml").unwrap(),
        template()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/etc/default/imgcache")
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "/etc/default/imgcache may hold credentials"
    );

    let r = sh(Command::new("dpkg").args(["-r", "imgcache"]));
    r.assert_code(0);
    assert!(
        !Path::new("/usr/bin/imgcache").exists(),
        "binary left after remove"
    );
    assert!(!Path::new(UNITS[0]).exists(), "unit left after remove");
    assert!(!Path::new("/usr/share/man/man1/imgcache-fetch.1.gz").exists());
    assert!(
        Path::new("/etc/imgcache/imgcache.toml").exists(),
        "conffile removed before purge"
    );
    assert_eq!(
        installed().as_deref(),
        Some("rc"),
        "removed, config files left"
    );

    let p = sh(Command::new("dpkg").args(["-P", "imgcache"]));
    p.assert_code(0);
    assert!(
        !Path::new("/etc/imgcache").exists(),
        "/etc/imgcache left after purge"
    );
    assert!(!Path::new("/etc/default/imgcache").exists());
    assert!(
        installed().is_none_or(|s| s.starts_with("un")),
        "{:?}",
        installed()
    );
}
