//! The hostile-image corpus (tests/corpus/generate.py), fetched end to end: each image is
//! served by the real Glance where Glance 33 stores it, else by the Glance-shaped fault server.
//! Hostile ones must be refused with exit code 5 without `qemu-img convert` ever running on
//! them; benign ones must land with the content qemu-img's own conversion gives.

use std::path::Path;

use crate::support::fault_server::{FaultServer, Image};
use crate::support::glance::real;
use crate::support::{Cache, entry_name, qemu_img, run};

fn qemu_format(disk_format: &str) -> &str {
    match disk_format {
        "vhd" => "vpc",
        "iso" => "raw",
        other => other,
    }
}

#[test]
fn hostile_images_are_refused_before_qemu_img_and_benign_ones_land() {
    let g = real();
    let dir = tempfile::tempdir().unwrap();
    let generator = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/generate.py");
    let out = std::process::Command::new("python3")
        .arg(&generator)
        .arg(dir.path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "corpus: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();

    // A qemu-img shim that logs every invocation, then runs the real one.
    let shim = dir.path().join("qemu-img-shim");
    std::fs::write(
        &shim,
        "#!/bin/sh\necho \"$*\" >> \"$IMGCACHE_TEST_QEMU_LOG\"\nexec qemu-img \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let mut failures = Vec::new();
    let (mut hostile, mut via_glance, mut via_fault) = (0, 0, 0);
    for m in &manifest {
        let name = m["name"].as_str().unwrap();
        let file = dir.path().join(m["file"].as_str().unwrap());
        let disk_format = m["disk_format"].as_str().unwrap();
        let expect_ok = m["expect"] == "ok";
        hostile += usize::from(!expect_ok);
        let (url, id, _server) = match g.try_upload(name, disk_format, &file, &[]) {
            Ok(id) => {
                via_glance += 1;
                (g.url.clone(), id, None)
            }
            Err(_) => {
                via_fault += 1;
                let id = format!("corpus-{name}");
                let mut image = Image::raw(&id, std::fs::read(&file).unwrap());
                image.disk_format = disk_format.to_owned();
                let srv = FaultServer::start(image);
                (srv.url.clone(), id, Some(srv))
            }
        };
        let cache = Cache::new();
        let log = dir.path().join(format!("{name}.qemu-log"));
        let r = run(cache
            .fetch(&url)
            .arg(&id)
            .env("IMGCACHE_QEMU_IMG", &shim)
            .env("IMGCACHE_TEST_QEMU_LOG", &log));
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        if expect_ok {
            if r.code != 0 {
                failures.push(format!(
                    "{name}: expected success, got {}: {}",
                    r.code, r.stderr
                ));
                continue;
            }
            let expected = dir.path().join(format!("{name}.expected"));
            qemu_img(&[
                "convert",
                "-f",
                qemu_format(disk_format),
                "-O",
                "raw",
                file.to_str().unwrap(),
                expected.to_str().unwrap(),
            ]);
            let got = std::fs::read(cache.base().join(entry_name(&id))).unwrap();
            if got != std::fs::read(&expected).unwrap() {
                failures.push(format!(
                    "{name}: cached content differs from qemu-img convert"
                ));
            }
        } else {
            if r.code != 5 {
                failures.push(format!(
                    "{name}: expected refusal (5), got {}: {}",
                    r.code, r.stderr
                ));
            }
            if calls.lines().any(|l| l.starts_with("convert")) {
                failures.push(format!(
                    "{name}: qemu-img convert ran on a refused image: {calls}"
                ));
            }
            if !cache.base_files().is_empty() {
                failures.push(format!(
                    "{name}: left files behind: {:?}",
                    cache.base_files()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "corpus failures:\n{}",
        failures.join("\n")
    );
    assert!(hostile >= 15, "only {hostile} hostile images");
    assert!(
        via_glance >= 5 && via_fault >= 3,
        "glance {via_glance}, fault server {via_fault}"
    );
}
