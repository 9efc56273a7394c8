//! `imgcache create --config-drive`: drives in both formats made against a real Glance and read
//! back with cloud-init's own reader (on the extracted tree, and through its device detection
//! on a loop device), re-runs, and every bad input.

use std::path::Path;
use std::process::Command;

use base64_decode::b64;
use serde_json::{Value, json};

use crate::support::glance::real;
use crate::support::{Cache, imgcache, run, test_bytes};

/// A small raw image in the real Glance, uploaded once.
fn image() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("cd-root");
        std::fs::write(&f, test_bytes(1 << 20, 77)).unwrap();
        real().upload("cd-root", "raw", &f)
    })
}

/// The operator's input files for one drive.
struct Inputs {
    dir: tempfile::TempDir,
}

const USER_DATA: &str = "#cloud-config\nhostname: from-user-data\n";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnWbRwKJbdLxIeDk8Hr2Qm5BX0vO6M9xk9gJGYHQAA1 op@host";

impl Inputs {
    fn new() -> Inputs {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, data: &[u8]| std::fs::write(dir.path().join(name), data).unwrap();
        w("user-data", USER_DATA.as_bytes());
        w(
            "meta.json",
            br#"{"project_id": "p-1", "extra": {"a": [1, 2]}}"#,
        );
        w(
            "net.json",
            br#"{"links": [{"id": "eth0", "type": "phy", "ethernet_mac_address": "fa:16:3e:00:00:01"}], "networks": [], "services": []}"#,
        );
        w("vendor.json", br##"{"cloud-init": "#cloud-config\n{}"}"##);
        w("key.pub", format!("{KEY}\n").as_bytes());
        w("motd", b"hello from the config drive\n");
        w("bin", &test_bytes(70_000, 5));
        Inputs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// Every content flag.
    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["--config-drive", "--hostname", "web-1.example.org"]
            .map(String::from)
            .to_vec();
        for (flag, file) in [
            ("--user-data", "user-data"),
            ("--meta-data", "meta.json"),
            ("--network-data", "net.json"),
            ("--vendor-data", "vendor.json"),
        ] {
            a.extend([flag.to_owned(), self.path(file)]);
        }
        a.extend([
            "--ssh-key".into(),
            format!("mykey={}", self.path("key.pub")),
            "--meta".into(),
            "role=web".into(),
            "--meta".into(),
            "tier=1".into(),
            "--file".into(),
            format!("/etc/motd={}", self.path("motd")),
            "--file".into(),
            format!("/opt/data/blob.bin={}", self.path("bin")),
        ]);
        a
    }
}

/// `blkid -o value -s TAG FILE`.
fn blkid(file: &Path, tag: &str) -> String {
    let o = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(file)
        .output()
        .unwrap();
    assert!(o.status.success(), "blkid {}: {o:?}", file.display());
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Copies the drive's files out without mounting it.
fn extract(drive: &Path, format: &str, out: &Path) {
    let mut cmd = if format == "iso9660" {
        let mut c = Command::new("xorriso");
        c.args(["-osirrox", "on", "-indev"])
            .arg(drive)
            .args(["-extract", "/"])
            .arg(out);
        c
    } else {
        let mut c = Command::new("mcopy");
        c.args(["-s", "-n", "-i"]).arg(drive).arg("::*").arg(out);
        c
    };
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "extract {}: {o:?}", drive.display());
}

/// cloud-init's reader on `mode` (`tree DIR` or `device DEV`), as JSON.
fn cloud_init(mode: &str, arg: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/cloudinit_read.py");
    let o = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(mode)
        .arg(arg)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cloud-init reader ({mode}): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Asserts what cloud-init read is what was given.
fn assert_read_back(r: &Value, inputs: &Inputs, instance: &str) {
    let md = &r["metadata"];
    assert_eq!(md["uuid"], instance);
    assert_eq!(md["name"], instance);
    assert_eq!(md["hostname"], "web-1.example.org");
    assert_eq!(md["launch_index"], 0);
    assert_eq!(md["project_id"], "p-1");
    assert_eq!(md["extra"], json!({"a": [1, 2]}));
    assert_eq!(md["meta"], json!({"role": "web", "tier": "1"}));
    assert_eq!(md["public_keys"], json!({"mykey": KEY}));
    assert_eq!(b64(&md["random_seed"]).len(), 512);
    assert_eq!(b64(&r["userdata"]), USER_DATA.as_bytes());
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(inputs.dir.path().join(name)).unwrap()).unwrap()
    };
    assert_eq!(r["networkdata"], read("net.json"));
    assert_eq!(r["vendordata"], read("vendor.json"));
    assert_eq!(
        b64(&r["files"]["/etc/motd"]),
        b"hello from the config drive\n"
    );
    assert_eq!(
        b64(&r["files"]["/opt/data/blob.bin"]),
        std::fs::read(inputs.dir.path().join("bin")).unwrap()
    );
    assert_eq!(
        r["ec2-metadata"]["public-keys"]["0"]["openssh-key"], KEY,
        "{}",
        r["ec2-metadata"]
    );
}

/// A read-only loop device of `file`, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let o = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn config_drives_in_both_formats_are_read_by_cloud_init() {
    let g = real();
    let cache = Cache::new();
    let inputs = Inputs::new();
    let private = inputs.dir.path().join("tmpdir");
    std::fs::create_dir(&private).unwrap();
    for format in ["iso9660", "vfat"] {
        let inst = format!("vm-cd-{format}");
        let r = run(cache
            .create(&g.url, &inst, image())
            .args(inputs.args())
            .args(["--config-drive-format", format])
            .env("TMPDIR", &private));
        r.assert_code(0);
        assert!(
            Cache::files_in(&private).is_empty(),
            "build tree left behind"
        );
        let dir = cache.instances().join(&inst);
        let drive = dir.join("disk.config");
        assert!(r.stdout.contains(drive.to_str().unwrap()), "{}", r.stdout);
        let disk_info: Value =
            serde_json::from_slice(&std::fs::read(dir.join("disk.info")).unwrap()).unwrap();
        assert_eq!(disk_info[drive.to_str().unwrap()], "raw", "{disk_info}");
        assert_eq!(blkid(&drive, "LABEL"), "config-2");
        assert_eq!(blkid(&drive, "TYPE"), format);
        if format == "vfat" {
            assert_eq!(std::fs::metadata(&drive).unwrap().len(), 64 << 20);
        } else {
            // Nova's ISO: Rock Ridge and Joliet directory records.
            let o = Command::new("isoinfo")
                .arg("-d")
                .arg("-i")
                .arg(&drive)
                .output();
            let d = String::from_utf8_lossy(&o.unwrap().stdout).into_owned();
            assert!(d.contains("Volume id: config-2"), "{d}");
            assert!(d.contains("Joliet with UCS level"), "{d}");
            assert!(d.contains("Rock Ridge signatures"), "{d}");
        }
        let out = tempfile::tempdir().unwrap();
        extract(&drive, format, out.path());
        for v in ["2012-08-10", "2018-08-27", "latest"] {
            let p = out.path().join("openstack").join(v).join("meta_data.json");
            assert!(p.is_file(), "{}", p.display());
        }
        let read = cloud_init("tree", out.path());
        assert_read_back(&read, &inputs, &inst);
        // DataSourceConfigDrive's own detection (blkid LABEL=config-2 / TYPE=iso9660|vfat)
        // must pick the drive as a block device, where loop devices are available. (Mounting
        // it needs the filesystem in the kernel, which a container may lack: the tree read
        // above is cloud-init's reader on the same files.)
        match Loop::attach(&drive) {
            Some(dev) => {
                let found = cloud_init("device", Path::new(&dev.0));
                assert!(
                    found["candidates"]
                        .as_array()
                        .unwrap()
                        .contains(&json!(dev.0))
                );
            }
            None => eprintln!("no loop device: cloud-init's device detection not exercised"),
        }
        assert_eq!(
            Cache::files_in(&dir),
            [
                "disk",
                "disk.config",
                "disk.config.info",
                "disk.info",
                "imgcache.json"
            ]
        );
    }
}

fn statuses(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout).unwrap();
    let drive = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["role"] == "config-drive")
        .cloned();
    drive.map(|d| d["status"].clone()).unwrap_or(Value::Null)
}

#[test]
fn config_drive_reruns_are_idempotent_and_conflicts_need_force() {
    let g = real();
    let cache = Cache::new();
    let inputs = Inputs::new();
    let create = |extra: &[&str]| {
        let mut cmd = cache.create(&g.url, "vm-cd-rerun", image());
        cmd.args(inputs.args()).arg("--json").args(extra);
        run(&mut cmd)
    };
    let drive = cache.instances().join("vm-cd-rerun/disk.config");
    let r = create(&[]);
    r.assert_code(0);
    assert_eq!(statuses(&r.stdout), "created");
    let before = std::fs::read(&drive).unwrap();
    let r = create(&[]);
    r.assert_code(0);
    assert_eq!(statuses(&r.stdout), "exists");
    assert_eq!(std::fs::read(&drive).unwrap(), before, "drive rewritten");
    // Other inputs: a conflict, nothing changed.
    let r = create(&["--meta", "extra=1"]);
    r.assert_code(12);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(std::fs::read(&drive).unwrap(), before);
    let r = create(&["--config-drive-format", "vfat"]);
    r.assert_code(12);
    // --force replaces it; the same inputs then match again.
    let r = create(&["--meta", "extra=1", "--force"]);
    r.assert_code(0);
    assert_eq!(statuses(&r.stdout), "replaced");
    let r = create(&["--meta", "extra=1"]);
    r.assert_code(0);
    assert_eq!(statuses(&r.stdout), "exists");
    // A drive changed behind our back no longer matches its record.
    let mut bytes = std::fs::read(&drive).unwrap();
    bytes[40_000] ^= 0xff;
    std::fs::write(&drive, &bytes).unwrap();
    create(&["--meta", "extra=1"]).assert_code(12);
    // Without --config-drive the drive stays, and stays listed.
    let r = run(&mut cache.create(&g.url, "vm-cd-rerun", image()));
    r.assert_code(0);
    let info = std::fs::read_to_string(cache.instances().join("vm-cd-rerun/disk.info")).unwrap();
    assert!(info.contains("disk.config"), "{info}");
    let files = Cache::files_in(&cache.instances().join("vm-cd-rerun"));
    assert!(!files.iter().any(|f| f.contains(".tmp-")), "{files:?}");
}

#[test]
fn bad_config_drive_inputs_are_usage_errors_naming_the_flag() {
    let cache = Cache::new();
    let inputs = Inputs::new();
    let w = |name: &str, data: &[u8]| {
        std::fs::write(inputs.dir.path().join(name), data).unwrap();
        inputs.path(name)
    };
    let not_json = w("bad.json", b"{\"a\": ");
    let array = w("array.json", b"[1, 2]");
    let big = w("big", &vec![b'x'; 49_150]);
    let limit = w("limit", &vec![b'x'; 49_149]);
    let missing = inputs.path("nope");
    let motd = inputs.path("motd");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--meta-data".into(), not_json.clone()], "--meta-data"),
        (vec!["--meta-data".into(), array], "--meta-data"),
        (
            vec!["--network-data".into(), not_json.clone()],
            "--network-data",
        ),
        (vec!["--vendor-data".into(), not_json], "--vendor-data"),
        (vec!["--user-data".into(), big], "--user-data"),
        (vec!["--user-data".into(), missing.clone()], "--user-data"),
        (
            vec!["--ssh-key".into(), format!("k={missing}")],
            "--ssh-key",
        ),
        (vec!["--ssh-key".into(), "nokeyfile".into()], "--ssh-key"),
        (vec!["--file".into(), format!("etc/motd={motd}")], "--file"),
        (
            vec!["--file".into(), format!("/etc/../motd={motd}")],
            "--file",
        ),
        (vec!["--file".into(), format!("/etc/x={missing}")], "--file"),
        (vec!["--meta".into(), "novalue".into()], "--meta"),
        (vec!["--hostname".into(), "bad_host!".into()], "--hostname"),
        (vec!["--hostname=-x".into()], "--hostname"),
    ];
    // The inputs are checked before anything is fetched: an unreachable Glance is never asked.
    let create = || {
        let mut c = imgcache();
        c.arg("create")
            .arg("--instances-path")
            .arg(cache.instances())
            .args([
                "--glance-url",
                "http://127.0.0.1:9",
                "vm-bad",
                "--image",
                "x",
            ]);
        c
    };
    for (args, flag) in cases {
        let r = run(create().arg("--config-drive").args(&args));
        r.assert_code(2);
        assert!(r.stderr.contains(flag), "{args:?}: {}", r.stderr);
        assert!(!cache.instances().join("vm-bad").exists(), "{args:?}");
    }
    // Non-UTF-8 hostname.
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"h\xffst");
        let r = run(create().args(["--config-drive", "--hostname"]).arg(bad));
        r.assert_code(2);
        assert!(r.stderr.contains("--hostname"), "{}", r.stderr);
    }
    // A content flag without --config-drive names the flag it needs.
    let r = run(create().args(["--user-data", &limit]));
    r.assert_code(2);
    assert!(
        r.stderr.contains("required arguments were not provided")
            && r.stderr.contains("--config-drive"),
        "{}",
        r.stderr
    );
    // User data at exactly the limit passes the checks (and then fails on Glance, exit 7).
    let r = run(create().args(["--config-drive", "--user-data", &limit, "--retries", "0"]));
    r.assert_code(7);
    assert_eq!(Cache::files_in(cache.instances()), ["_base", "locks"]);
}

#[test]
fn a_failed_config_drive_leaves_nothing_behind() {
    let g = real();
    let cache = Cache::new();
    let tmp = tempfile::tempdir().unwrap();
    // Four 16 MiB files do not fit a 64 MiB vfat drive: mcopy fails.
    let f = tmp.path().join("big");
    std::fs::write(&f, vec![7u8; 16 << 20]).unwrap();
    let mut cmd = cache.create(&g.url, "vm-cd-full", image());
    cmd.args(["--config-drive", "--config-drive-format", "vfat"]);
    for i in 0..4 {
        cmd.arg("--file").arg(format!("/big{i}={}", f.display()));
    }
    let private = tmp.path().join("tmpdir");
    std::fs::create_dir(&private).unwrap();
    cmd.env("TMPDIR", &private);
    let r = run(&mut cmd);
    r.assert_code(11);
    assert!(r.stderr.contains("mcopy"), "{}", r.stderr);
    assert!(!cache.instances().join("vm-cd-full").exists());
    assert!(
        Cache::files_in(&private).is_empty(),
        "build tree left behind"
    );
}

mod base64_decode {
    use serde_json::Value;

    /// The bytes of a `{"b64": ...}` or plain string value from the reader.
    pub fn b64(v: &Value) -> Vec<u8> {
        match v {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Object(o) => decode(o["b64"].as_str().unwrap()),
            other => panic!("not bytes: {other}"),
        }
    }

    fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64"),
        };
        let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &v)| n | (v as u32) << (18 - 6 * i));
            out.extend(&n.to_be_bytes()[1..chunk.len()]);
        }
        out
    }
}

#[test]
fn config_drive_format_comes_from_the_configuration_file_unless_flagged() {
    let g = real();
    let cache = Cache::new();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("imgcache.toml");
    std::fs::write(&cfg, "config_drive_format = \"vfat\"\n").unwrap();
    for (inst, flag, want) in [
        ("vm-cd-file", None, "vfat"),
        ("vm-cd-flag", Some("iso9660"), "iso9660"),
    ] {
        // The global --config goes before the subcommand.
        let create = cache.create(&g.url, inst, image());
        let args: Vec<_> = create.get_args().map(|a| a.to_owned()).collect();
        let mut cmd = imgcache();
        cmd.arg("--config")
            .arg(&cfg)
            .args(args)
            .arg("--config-drive");
        if let Some(f) = flag {
            cmd.args(["--config-drive-format", f]);
        }
        run(&mut cmd).assert_code(0);
        let drive = cache.instances().join(inst).join("disk.config");
        assert_eq!(blkid(&drive, "TYPE"), want, "{inst}");
    }
}
