//! Authentication against a real Keystone 30 and a real Glance 33 behind keystonemiddleware's
//! authtoken, both started by scripts/keystone/stack-up: openrc (password), clouds.yaml +
//! --os-cloud, application credential, region and interface selection, wrong password, a revoked
//! token, a token that expires mid-download, and secrets never printed even with -vv.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::support::proxy::Proxy;
use crate::support::service::{Service, Started};
use crate::support::{Cache, entry_name, imgcache, make_qcow2, run, test_bytes};

/// A running Keystone + Glance stack.
pub struct Stack {
    pub dir: PathBuf,
    pub keystone: String,
    pub glance: String,
}

static STACK: Service<Stack> = Service::new(
    "keystone",
    "stack-up",
    "stack-down",
    "imgcache-ks-",
    "scripts/keystone/install and scripts/glance/install",
    Stack::ready,
);

/// The shared stack, started on first use.
#[track_caller]
pub(crate) fn stack() -> &'static Stack {
    STACK.shared()
}

impl Stack {
    /// From stack-up's JSON line.
    fn ready(s: &Started) -> Result<Stack, String> {
        Ok(Stack {
            keystone: s.json_str("keystone")?,
            glance: s.json_str("glance")?,
            dir: s.dir.clone(),
        })
    }

    /// `KEY=value` pairs from an env file written by setup-cloud (openrc or app-cred.env).
    pub(crate) fn env_file(&self, name: &str) -> BTreeMap<String, String> {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export ").or(Some(l.trim())))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_owned(),
                    v.trim_matches('\'').trim_matches('"').to_owned(),
                )
            })
            .collect()
    }

    fn setup(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("setup.json")).unwrap()).unwrap()
    }

    /// A project-scoped token for the demo user.
    pub(crate) fn demo_token(&self) -> String {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{}/auth/tokens", self.keystone))
            .header("Content-Type", "application/json")
            .body(
                serde_json::json!({"auth": {
                    "identity": {"methods": ["password"], "password": {"user": {
                        "name": "demo", "domain": {"name": "Default"}, "password": "demo-secret"}}},
                    "scope": {"project": {"name": "demo", "domain": {"name": "Default"}}}}})
                .to_string(),
            )
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        resp.headers()["X-Subject-Token"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// Uploads a file as the demo user; returns the image id.
    pub(crate) fn upload(&self, name: &str, disk_format: &str, file: &Path) -> String {
        // Glance on sqlite fails concurrent uploads now and then (500, "database is locked"),
        // as with the plain real Glance (support::glance): tests upload one at a time.
        static UPLOADS: Mutex<()> = Mutex::new(());
        let _one_at_a_time = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
        // Setup, not what is under test: a failed upload (a 500 under load) is tried again.
        let mut last = String::new();
        for attempt in 1..=3 {
            let out =
                Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/glance/upload"))
                    .args([&self.glance, name])
                    .arg(file)
                    .arg(disk_format)
                    .env("IMGCACHE_GLANCE_TOKEN", self.demo_token())
                    .output()
                    .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(500 * attempt));
        }
        panic!(
            "upload of {name} failed three times (logs: {}): {last}",
            self.dir.display()
        )
    }

    fn image(&self, name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let data = test_bytes(len, seed);
        let f = tmp.path().join(name);
        std::fs::write(&f, &data).unwrap();
        (self.upload(name, "raw", &f), data)
    }
}

/// `imgcache fetch` with exactly the given OS_* environment (nothing inherited).
fn fetch(
    cache: &Cache,
    env: &BTreeMap<String, String>,
    extra: &[&str],
    id: &str,
) -> crate::support::Run {
    let mut cmd = imgcache();
    cmd.arg("fetch")
        .arg("--instances-path")
        .arg(cache.instances())
        .args(["--retry-backoff", "50ms"])
        .args(extra)
        .arg(id);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

#[test]
fn password_auth_from_an_openrc_finds_glance_in_the_catalog() {
    let s = stack();
    let (id, data) = s.image("ks-openrc", 1 << 20, 101);
    let cache = Cache::new();
    let r = fetch(&cache, &s.env_file("openrc"), &[], &id);
    r.assert_code(0);
    assert!(std::fs::read(cache.base().join(entry_name(&id))).unwrap() == data);
}

#[test]
fn vv_shows_every_request_keystone_included_and_the_endpoint_chosen() {
    let s = stack();
    let (id, _) = s.image("ks-vv", 1 << 20, 109);
    let cache = Cache::new();
    let mut cmd = imgcache();
    cmd.args(["-vv", "fetch", "--instances-path"])
        .arg(cache.instances())
        .arg(&id);
    for (k, v) in s.env_file("openrc") {
        cmd.env(k, v);
    }
    let r = run(&mut cmd);
    r.assert_code(0);
    for needle in [
        "POST ".to_owned() + &s.keystone,
        "/auth/tokens → 201".to_owned(),
        "image endpoint from the catalog:".to_owned(),
        format!("/v2/images/{id} → 200"),
        format!("/v2/images/{id}/file → 200"),
    ] {
        assert!(
            r.stderr.contains(&needle),
            "{needle:?} not in\n{}",
            r.stderr
        );
    }
    assert!(!r.stderr.contains("demo-secret"), "{}", r.stderr);
}

#[test]
fn clouds_yaml_with_os_cloud() {
    let s = stack();
    let (id, _) = s.image("ks-clouds", 1 << 20, 102);
    let cache = Cache::new();
    // clouds.yaml and secure.yaml are found in the working directory.
    let r = run(imgcache()
        .current_dir(&s.dir)
        .arg("fetch")
        .arg("--instances-path")
        .arg(cache.instances())
        .args(["--os-cloud", "imgcache-test", &id]));
    r.assert_code(0);
    // The same through OS_CLOUD and the application-credential cloud.
    let cache = Cache::new();
    let r = run(imgcache()
        .current_dir(&s.dir)
        .env("OS_CLOUD", "imgcache-test-appcred")
        .arg("fetch")
        .arg("--instances-path")
        .arg(cache.instances())
        .arg(&id));
    r.assert_code(0);
}

#[test]
fn application_credential_from_the_environment() {
    let s = stack();
    let (id, _) = s.image("ks-appcred", 1 << 20, 103);
    let cache = Cache::new();
    let env = s.env_file("app-cred.env");
    assert_eq!(env["OS_AUTH_TYPE"], "v3applicationcredential");
    fetch(&cache, &env, &[], &id).assert_code(0);
}

#[test]
fn region_and_interface_choose_the_endpoint() {
    let s = stack();
    let (id, _) = s.image("ks-region", 1 << 20, 104);
    let mut env = s.env_file("openrc");
    env.insert("OS_INTERFACE".into(), "internal".into());
    fetch(&Cache::new(), &env, &[], &id).assert_code(0);
    // RegionTwo's image endpoint is a dead port: choosing it must really change the URL.
    env.insert("OS_REGION_NAME".into(), "RegionTwo".into());
    env.insert("OS_INTERFACE".into(), "public".into());
    let r = fetch(&Cache::new(), &env, &["--retries", "0"], &id);
    r.assert_code(7);
    assert!(r.stderr.contains("127.0.0.1:9"), "{}", r.stderr);
    let r = fetch(&Cache::new(), &env, &["--os-region-name", "RegionOne"], &id);
    r.assert_code(0);
    env.insert("OS_INTERFACE".into(), "nope".into());
    let r = fetch(&Cache::new(), &env, &[], &id);
    r.assert_code(2);
    assert!(r.stderr.contains("no image endpoint"), "{}", r.stderr);
}

#[test]
fn wrong_password_is_one_clear_error_with_the_auth_code() {
    let s = stack();
    let mut env = s.env_file("openrc");
    env.insert("OS_PASSWORD".into(), "not-the-password".into());
    let r = fetch(&Cache::new(), &env, &[], "any-image");
    r.assert_code(10);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("refused the credentials"), "{}", r.stderr);
    assert!(!r.stderr.contains("not-the-password"));
    assert!(!r.stderr.contains("retry"), "no retry storm: {}", r.stderr);
}

#[test]
fn revoked_token_is_a_clear_error() {
    let s = stack();
    let (id, _) = s.image("ks-revoked", 1 << 20, 105);
    let token = s.demo_token();
    let http = reqwest::blocking::Client::new();
    let revoke = http
        .delete(format!("{}/auth/tokens", s.keystone))
        .header("X-Auth-Token", &token)
        .header("X-Subject-Token", &token)
        .send()
        .unwrap();
    assert_eq!(revoke.status().as_u16(), 204);
    let env = BTreeMap::from([("OS_AUTH_TOKEN".to_owned(), token.clone())]);
    let r = fetch(&Cache::new(), &env, &["--glance-url", &s.glance], &id);
    r.assert_code(10);
    assert!(r.stderr.contains("401"), "{}", r.stderr);
    assert!(!r.stderr.contains(&token), "the token is never printed");
}

#[test]
fn token_expiring_during_a_slow_fetch_is_renewed_and_the_download_resumes() {
    // A stack whose tokens live 20 s, and a proxy that makes the download take longer and cuts
    // it once: the resume request carries the expired token, Glance answers 401, imgcache logs in
    // again and resumes.
    let s = STACK.start(&[("IMGCACHE_KEYSTONE_TOKEN_EXPIRATION", "20")]);
    let tmp = tempfile::tempdir().unwrap();
    let data = test_bytes(6 << 20, 106);
    let f = tmp.path().join("slow");
    std::fs::write(&f, &data).unwrap();
    let id = s.upload("ks-slow", "raw", &f);
    // 96 chunks of 64 KiB at 280 ms each ≈ 27 s; cut after 5.5 MiB (88 chunks ≈ 24.6 s), well
    // after the 20 s token has expired, so the resume request must renew it.
    let proxy = Proxy::start(&s.glance, Duration::from_millis(280), Some(11 << 19));
    let mut env = s.env_file("openrc");
    env.insert("OS_IMAGE_URL".into(), proxy.url.clone());
    let cache = Cache::new();
    let r = fetch(&cache, &env, &["-v"], &id);
    r.assert_code(0);
    assert!(std::fs::read(cache.base().join(entry_name(&id))).unwrap() == data);
    let statuses: Vec<u16> = proxy
        .statuses()
        .iter()
        .filter(|(l, _)| l.contains("/file"))
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(statuses, vec![200, 401, 206], "{:?}", proxy.statuses());
}

#[test]
fn secrets_never_appear_in_any_output_even_with_vv() {
    let s = stack();
    let (id, _) = s.image("ks-secrets", 1 << 20, 107);
    let setup = s.setup();
    let app_secret = setup["application_credential"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = s.demo_token();
    let secrets = ["demo-secret".to_owned(), app_secret.clone(), token.clone()];
    let cache = Cache::new();
    let tmp = tempfile::tempdir().unwrap();
    let (_, qcow) = make_qcow2(tmp.path(), "s", &test_bytes(1 << 20, 108));
    let openrc = s.env_file("openrc");
    let appcred = s.env_file("app-cred.env");
    let mut bad = openrc.clone();
    bad.insert("OS_PASSWORD".into(), "demo-secret-but-wrong".into());
    // Each run with the exit code it must give: a run that fails early proves nothing.
    let runs: Vec<(BTreeMap<String, String>, Vec<String>, i32)> = vec![
        (openrc.clone(), vec!["fetch".into(), id.clone()], 0),
        (appcred.clone(), vec!["fetch".into(), id.clone()], 0),
        (bad.clone(), vec!["fetch".into(), id.clone()], 10),
        (
            BTreeMap::from([("OS_AUTH_TOKEN".to_owned(), token.clone())]),
            vec![
                "fetch".into(),
                "--glance-url".into(),
                s.glance.clone(),
                id.clone(),
            ],
            0,
        ),
        (
            openrc.clone(),
            vec!["create".into(), "vm-s".into(), "--image".into(), id.clone()],
            0,
        ),
        (openrc.clone(), vec!["prune".into(), "--dry-run".into()], 0),
        (openrc.clone(), vec!["list".into()], 0),
        (openrc.clone(), vec!["verify".into()], 0),
        (openrc.clone(), vec!["config".into(), "show".into()], 0),
        (
            appcred.clone(),
            vec!["config".into(), "show".into(), "--json".into()],
            0,
        ),
        (
            openrc.clone(),
            vec!["inspect".into(), qcow.display().to_string()],
            0,
        ),
        (openrc.clone(), vec!["fetch".into(), "--help".into()], 0),
    ];
    for (env, args, code) in runs {
        let mut cmd = imgcache();
        cmd.arg("-vv")
            .args(&args)
            .arg("--instances-path")
            .arg(cache.instances());
        if args.first().map(String::as_str) == Some("inspect")
            || args.contains(&"--help".to_owned())
        {
            cmd = imgcache();
            cmd.arg("-vv").args(&args);
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let r = run(&mut cmd);
        for secret in &secrets {
            assert!(
                !r.stdout.contains(secret.as_str()) && !r.stderr.contains(secret.as_str()),
                "{args:?} printed a secret:\n{}\n{}",
                r.stdout,
                r.stderr
            );
        }
        assert_eq!(
            r.code, code,
            "{args:?}: exit code\n--- stdout\n{}\n--- stderr\n{}",
            r.stdout, r.stderr
        );
    }
}
