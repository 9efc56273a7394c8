//! `imgcache fetch` against a real Glance: raw and qcow2 images, no-op refetch, 404, queued,
//! a format mismatch Glance itself accepts, direct_url, several ids at once.

use crate::support::glance::real;
use crate::support::{
    Cache, content_digest_hex, entry_name, make_qcow2, qemu_img, record, run, sha512_hex,
    test_bytes,
};

#[test]
fn raw_image_is_fetched_verified_and_recorded() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let data = test_bytes(3 << 20, 21);
    let file = tmp.path().join("disk.raw");
    std::fs::write(&file, &data).unwrap();
    let id = g.upload("raw-image", "raw", &file);

    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).arg(&id));
    r.assert_code(0);
    let name = entry_name(&id);
    let path = cache.base().join(&name);
    assert_eq!(r.stdout, format!("{id} {}\n", path.display()));
    assert!(std::fs::read(&path).unwrap() == data);
    cache.assert_clean_or_complete(Some(&name));

    let record = record(&cache, &id);
    assert_eq!(record["image_id"], id.as_str());
    assert_eq!(record["content_xxh3"], content_digest_hex(&data));
    assert_eq!(record["name"], "raw-image");
    assert_eq!(record["hash_algo"], "sha512");
    assert_eq!(record["hash_value"], sha512_hex(&data));
    assert_eq!(record["entry_size"], data.len() as u64);
    assert_eq!(record["source_format"], "raw");

    // Second fetch: a no-op that reports the same path and touches nothing.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let again = run(cache.fetch(&g.url).arg("--json").arg(&id));
    again.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(v["images"][0]["status"], "cached");
    assert_eq!(v["images"][0]["path"], path.to_str().unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
}

#[test]
fn qcow2_image_is_converted_to_the_same_raw_qemu_img_gives() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let raw = test_bytes(5 << 20, 22);
    let (_, qcow) = make_qcow2(tmp.path(), "src", &raw);
    let id = g.upload("qcow2-image", "qcow2", &qcow);

    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).args(["--json", &id]));
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["images"][0]["status"], "fetched");
    assert_eq!(v["images"][0]["format"], "raw");
    assert_eq!(v["images"][0]["source_format"], "qcow2");
    let path = cache.base().join(entry_name(&id));
    // What `qemu-img convert` of the original gives, compared by qemu-img and by bytes.
    let expected = tmp.path().join("expected.raw");
    crate::support::qcow2_to_raw(&qcow, &expected);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path.to_str().unwrap(),
        expected.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&path).unwrap() == raw);
    let rec = record(&cache, &id);
    assert_eq!(
        rec["content_xxh3"],
        content_digest_hex(&raw),
        "digest of the converted entry"
    );
    assert_eq!(
        rec["hash_value"],
        sha512_hex(&std::fs::read(&qcow).unwrap())
    );
    let info: serde_json::Value = serde_json::from_slice(&qemu_img(&[
        "info",
        "--output=json",
        "-f",
        "raw",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["virtual-size"], raw.len() as u64);
    cache.assert_clean_or_complete(Some(&entry_name(&id)));
}

#[test]
fn no_force_raw_keeps_the_qcow2_as_uploaded() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let (_, qcow) = make_qcow2(tmp.path(), "keep", &test_bytes(2 << 20, 23));
    let id = g.upload("qcow2-keep", "qcow2", &qcow);
    let cache = Cache::new();
    run(cache.fetch(&g.url).args(["--no-force-raw", &id])).assert_code(0);
    let path = cache.base().join(entry_name(&id));
    assert!(std::fs::read(&path).unwrap() == std::fs::read(&qcow).unwrap());
}

#[test]
fn unknown_id_is_not_found() {
    let g = real();
    let cache = Cache::new();
    let r = run(cache
        .fetch(&g.url)
        .arg("00000000-0000-0000-0000-000000000000"));
    r.assert_code(3);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert_eq!(r.stdout, "");
}

#[test]
fn queued_image_is_not_usable_and_says_its_status() {
    let g = real();
    let id = g.create("never-uploaded", "raw");
    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).arg(&id));
    r.assert_code(4);
    assert!(r.stderr.contains("queued"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn qcow2_bytes_declared_raw_are_refused() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let (_, qcow) = make_qcow2(tmp.path(), "liar", &test_bytes(1 << 20, 24));
    // Glance 33 accepts this upload; the client must refuse it (Nova bug 2071734).
    let id = g.upload("qcow2-as-raw", "raw", &qcow);
    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).arg(&id));
    r.assert_code(5);
    assert!(r.stderr.contains("disk_format=raw"), "{}", r.stderr);
    assert!(r.stderr.contains("qcow2"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn several_ids_succeed_or_fail_on_their_own() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let f = tmp.path().join(format!("m{i}"));
        std::fs::write(&f, test_bytes(1 << 20, 30 + i)).unwrap();
        ids.push(g.upload(&format!("multi-{i}"), "raw", &f));
    }
    let missing = "11111111-2222-3333-4444-555555555555".to_owned();
    let cache = Cache::new();
    let r = run(cache
        .fetch(&g.url)
        .args(["--jobs", "2", &ids[0], &missing, &ids[1], &ids[2]]));
    r.assert_code(3);
    // One line per image that made it, printed as each is ready (with --jobs 2, in the order
    // they finish).
    let mut got: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.split_once(" /").map(|(id, _)| id))
        .collect();
    got.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(got, want, "{}", r.stdout);
    assert_eq!(r.stdout.lines().count(), 3, "{}", r.stdout);
    assert!(r.stderr.contains(&missing), "{}", r.stderr);
}

#[test]
fn direct_url_file_is_read_when_allowed() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let data = test_bytes(2 << 20, 25);
    let f = tmp.path().join("direct.raw");
    std::fs::write(&f, &data).unwrap();
    let id = g.upload("direct", "raw", &f);
    let direct = g.show(&id)["direct_url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        direct.starts_with("file://"),
        "Glance should show direct_url: {direct}"
    );
    let cache = Cache::new();
    let r = run(cache.fetch(&g.url).args(["--allow-direct-file", "-v", &id]));
    r.assert_code(0);
    assert!(r.stderr.contains("directly"), "{}", r.stderr);
    assert!(std::fs::read(cache.base().join(entry_name(&id))).unwrap() == data);
}

#[test]
fn eight_processes_against_real_glance_share_one_entry() {
    let g = real();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("herd.raw");
    std::fs::write(&f, test_bytes(8 << 20, 26)).unwrap();
    let id = g.upload("herd", "raw", &f);
    let cache = Cache::new();
    let children = cache.spawn_fetches(&g.url, &id, 8);
    let expected = format!("{id} {}\n", cache.base().join(entry_name(&id)).display());
    for c in children {
        let o = c.wait_with_output().unwrap();
        crate::support::assert_exit_ok(&o);
        assert_eq!(String::from_utf8_lossy(&o.stdout), expected);
    }
    cache.assert_clean_or_complete(Some(&entry_name(&id)));
}
