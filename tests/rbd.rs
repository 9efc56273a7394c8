//! The RBD backend against a real single-node Ceph (scripts/ceph/start: one monitor, one
//! memstore OSD on 127.0.0.1) and a real Glance: import path, clone + resize, content, two
//! "hosts" importing at once, delete + prune leaving the pool clean, prune never touching an image
//! with clones, and the direct-clone path from an `rbd://` location.

use std::path::PathBuf;
use std::process::Command;

use crate::support::fault_server::{FaultServer, Image};
use crate::support::glance::real;
use crate::support::service::{Service, Started};
use crate::support::{Cache, entry_name, imgcache, run, test_bytes};

struct Ceph {
    conf: PathBuf,
    fsid: String,
}

static CEPH: Service<Ceph> = Service::new(
    "ceph",
    "start",
    "stop",
    "imgcache-ceph-",
    "scripts/ceph/install",
    Ceph::ready,
);

/// The shared Ceph cluster, started on first use.
#[track_caller]
fn ceph() -> &'static Ceph {
    CEPH.shared()
}

impl Ceph {
    /// From scripts/ceph/start's JSON line.
    fn ready(s: &Started) -> Result<Ceph, String> {
        Ok(Ceph {
            conf: PathBuf::from(s.json_str("conf")?),
            fsid: s.json_str("fsid")?,
        })
    }

    fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("timeout")
            .arg("60")
            .arg("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_slice(&self.rbd(&a)).unwrap()
    }

    fn ls(&self, pool: &str) -> Vec<String> {
        serde_json::from_value(self.json(&["ls", pool])).unwrap()
    }
}

fn create(
    cache: &Cache,
    url: &str,
    inst: &str,
    image: &str,
    extra: &[&str],
) -> crate::support::Run {
    let c = ceph();
    run(cache
        .create(url, inst, image)
        .args(["--backend", "rbd", "--ceph-conf"])
        .arg(&c.conf)
        .args(extra))
}

/// `imgcache delete VM --ceph-conf CONF` on the cache's instances path.
fn delete(cache: &Cache, vm: &str) -> Command {
    let mut cmd = imgcache();
    cmd.arg("delete")
        .arg("--instances-path")
        .arg(cache.instances())
        .arg("--ceph-conf")
        .arg(&ceph().conf)
        .arg(vm);
    cmd
}

/// The clone reads as the base followed by zeros, `size` bytes in all.
fn assert_clone_content(c: &Ceph, disk: &str, base: &[u8], size: usize) {
    let export = c.rbd(&["export", "--no-progress", disk, "-"]);
    assert_eq!(export.len(), size);
    assert!(
        export[..base.len()] == base[..],
        "clone content equals the base"
    );
    assert!(
        export[base.len()..].iter().all(|&b| b == 0),
        "the extension reads as zeros"
    );
}

fn raw_image(name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let data = test_bytes(len, seed);
    let f = tmp.path().join(name);
    std::fs::write(&f, &data).unwrap();
    (real().upload(name, "raw", &f), data)
}

#[test]
fn import_clone_resize_and_content() {
    let c = ceph();
    let g = real();
    let (id, data) = raw_image("rbd-import", 4 << 20, 201);
    let cache = Cache::new();
    let r = create(&cache, &g.url, "vm-rbd1", &id, &["--size", "16M"]);
    r.assert_code(0);
    assert_eq!(r.stdout.trim(), "rbd:vms/vm-rbd1_disk");
    let info = c.json(&["info", "vms/vm-rbd1_disk"]);
    assert_eq!(info["size"], 16 << 20);
    assert_eq!(info["parent"]["pool"], "images");
    assert_eq!(
        info["parent"]["image"],
        format!("imgcache-{}", entry_name(&id))
    );
    assert_eq!(info["parent"]["snapshot"], "snap");
    assert_clone_content(c, "vms/vm-rbd1_disk", &data, 16 << 20);
    assert!(
        !cache.base().join(entry_name(&id)).exists(),
        "local base removed after import"
    );
    // Idempotent; shrinking refused.
    let again = run(&mut {
        let mut cmd = cache.create(&g.url, "vm-rbd1", &id);
        cmd.args(["--backend", "rbd", "--size", "16M", "--json", "--ceph-conf"])
            .arg(&c.conf);
        cmd
    });
    again.assert_code(0);
    assert!(again.stdout.contains("\"exists\""), "{}", again.stdout);
    create(&cache, &g.url, "vm-rbd-small", &id, &["--size", "1M"]).assert_code(2);
}

#[test]
fn two_hosts_importing_at_once_share_one_image() {
    let c = ceph();
    let g = real();
    let (id, _) = raw_image("rbd-race", 8 << 20, 202);
    let hosts = [Cache::new(), Cache::new()];
    let children: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            h.create(&g.url, &format!("vm-race{i}"), &id)
                .args(["-v", "--backend", "rbd", "--ceph-conf"])
                .arg(&c.conf)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut logs = String::new();
    for ch in children {
        let o = ch.wait_with_output().unwrap();
        crate::support::assert_exit_ok(&o);
        logs.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    let name = format!("imgcache-{}", entry_name(&id));
    let ours: Vec<String> = c
        .ls("images")
        .into_iter()
        .filter(|n| n.starts_with(&name))
        .collect();
    assert_eq!(
        ours,
        vec![name.clone()],
        "exactly one image, no leftover temporary import\n{logs}"
    );
    for i in 0..2 {
        let info = c.json(&["info", &format!("vms/vm-race{i}_disk")]);
        assert_eq!(info["parent"]["image"], name.as_str());
    }
}

#[test]
fn delete_and_prune_leave_the_pool_clean_and_never_touch_images_with_clones() {
    let c = ceph();
    let g = real();
    let (id, _) = raw_image("rbd-prune", 2 << 20, 203);
    let cache = Cache::new();
    create(&cache, &g.url, "vm-p1", &id, &[]).assert_code(0);
    create(&cache, &g.url, "vm-p2", &id, &["--size", "8M"]).assert_code(0);
    let name = format!("imgcache-{}", entry_name(&id));
    let prune = |extra: &[&str]| {
        run(imgcache()
            .arg("prune")
            .arg("--instances-path")
            .arg(cache.instances())
            .arg("--ceph-conf")
            .arg(&c.conf)
            .args(["--min-age", "0s"])
            .args(extra))
    };
    // With clones: never removed, however old.
    let r = prune(&["--json"]);
    r.assert_code(0);
    assert!(c.ls("images").contains(&name));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let item = v["rbd"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == format!("rbd:images/{name}"))
        .unwrap()
        .clone();
    assert_eq!(item["action"], "kept");
    assert_eq!(item["users"], 2);

    for vm in ["vm-p1", "vm-p2"] {
        run(&mut delete(&cache, vm)).assert_code(0);
    }
    let vms = c.ls("vms");
    assert!(
        !vms.contains(&"vm-p1_disk".to_owned()) && !vms.contains(&"vm-p2_disk".to_owned()),
        "{vms:?}"
    );
    let r = prune(&["--dry-run"]);
    r.assert_code(0);
    assert!(c.ls("images").contains(&name), "dry-run removes nothing");
    let r = prune(&[]);
    r.assert_code(0);
    assert!(
        r.stdout.contains(&format!("removed rbd:images/{name}")),
        "{}",
        r.stdout
    );
    assert!(!c.ls("images").contains(&name), "pool clean");
}

#[test]
fn direct_clone_from_a_glance_rbd_location_in_the_same_cluster() {
    let c = ceph();
    let tmp = tempfile::tempdir().unwrap();
    let data = test_bytes(2 << 20, 204);
    let f = tmp.path().join("glance-owned.raw");
    std::fs::write(&f, &data).unwrap();
    // What Glance's rbd store does on upload: import, snapshot "snap", protect.
    c.rbd(&[
        "import",
        "--no-progress",
        "--image-format",
        "2",
        f.to_str().unwrap(),
        "images/glance-owned",
    ]);
    c.rbd(&["snap", "create", "images/glance-owned@snap"]);
    c.rbd(&["snap", "protect", "images/glance-owned@snap"]);
    let mut image = Image::raw("direct-rbd", data.clone());
    image.direct_url = Some(format!("rbd://{}/images/glance-owned/snap", c.fsid));
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    create(
        &cache,
        &srv.url,
        "vm-direct",
        "direct-rbd",
        &["--size", "4M"],
    )
    .assert_code(0);
    let info = c.json(&["info", "vms/vm-direct_disk"]);
    assert_eq!(info["parent"]["image"], "glance-owned");
    assert!(
        srv.file_requests().is_empty(),
        "no download on the direct path"
    );

    // A location in another cluster is not cloned from: the image is downloaded and imported.
    let mut other = Image::raw("other-cluster", data);
    other.direct_url =
        Some("rbd://00000000-0000-0000-0000-000000000000/images/glance-owned/snap".into());
    let srv = FaultServer::start(other);
    create(&cache, &srv.url, "vm-other", "other-cluster", &[]).assert_code(0);
    assert_eq!(srv.file_requests().len(), 1);
    let info = c.json(&["info", "vms/vm-other_disk"]);
    assert_eq!(
        info["parent"]["image"],
        format!("imgcache-{}", entry_name("other-cluster"))
    );
}

/// The fields of `rbd info` that say what a clone is (not its id, name or time).
fn clone_facts(c: &Ceph, disk: &str) -> serde_json::Value {
    let mut info = c.json(&["info", disk]);
    let o = info.as_object_mut().unwrap();
    for k in [
        "name",
        "id",
        "block_name_prefix",
        "create_timestamp",
        "access_timestamp",
        "modify_timestamp",
    ] {
        o.remove(k);
    }
    info
}

#[test]
fn librbd_in_process_and_the_rbd_cli_make_the_same_clone() {
    let c = ceph();
    let g = real();
    let (id, data) = raw_image("rbd-native", 3 << 20, 205);
    let cache = Cache::new();
    // The first create imports through the CLI (`rbd import` stays a process) and clones.
    let native = create(&cache, &g.url, "vm-lib", &id, &["--size", "12M", "-vv"]);
    native.assert_code(0);
    assert!(
        native.stderr.contains("through librbd in process"),
        "{}",
        native.stderr
    );
    let cli = run(cache
        .create(&g.url, "vm-cli", &id)
        .args(["--backend", "rbd", "--size", "12M", "-vv", "--ceph-conf"])
        .arg(&c.conf)
        .env("IMGCACHE_LIBRBD", "off"));
    cli.assert_code(0);
    assert!(cli.stderr.contains("through the rbd CLI"), "{}", cli.stderr);
    let (a, b) = (
        clone_facts(c, "vms/vm-lib_disk"),
        clone_facts(c, "vms/vm-cli_disk"),
    );
    assert_eq!(a, b, "same size, parent, features, object size");
    assert_eq!(a["size"], 12 << 20);
    assert_clone_content(c, "vms/vm-lib_disk", &data, 12 << 20);
    // The parent's last-use mark was set in process too.
    let parent = format!("images/imgcache-{}", entry_name(&id));
    let used: u64 = String::from_utf8(c.rbd(&["image-meta", "get", &parent, "imgcache.last_used"]))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(used > 1_700_000_000, "{used}");
    // An existing clone is found again (EEXIST from librbd), not replaced.
    let again = create(&cache, &g.url, "vm-lib", &id, &["--size", "12M", "--json"]);
    again.assert_code(0);
    assert!(again.stdout.contains("\"exists\""), "{}", again.stdout);
    // Delete removes through either path.
    for (vm, env) in [("vm-lib", "auto"), ("vm-cli", "off")] {
        run(delete(&cache, vm).env("IMGCACHE_LIBRBD", env)).assert_code(0);
    }
    let vms = c.ls("vms");
    assert!(
        !vms.iter().any(|v| v == "vm-lib_disk" || v == "vm-cli_disk"),
        "{vms:?}"
    );
}

#[test]
fn an_unreachable_cluster_is_a_timeout_in_process_too() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("ceph.conf");
    // Nothing listens on port 9 (discard is not served here): the monitor never answers.
    std::fs::write(
        &conf,
        "[global]\nmon_host = v2:127.0.0.1:9\nauth_cluster_required = none\nauth_service_required = none\nauth_client_required = none\n",
    )
    .unwrap();
    let srv = FaultServer::start(Image::raw("unreachable", test_bytes(1 << 20, 206)));
    let cache = Cache::new();
    let r = run(cache
        .create(&srv.url, "vm-x", "unreachable")
        .args(["--backend", "rbd", "--rbd-timeout", "3s", "--ceph-conf"])
        .arg(&conf));
    r.assert_code(7);
    assert!(r.stderr.contains("timed out after 3s"), "{}", r.stderr);
    assert!(!cache.instances().join("vm-x").exists());
}
