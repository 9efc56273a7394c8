//! A hostile host and a lying server: files planted under the instances path (symlinks, FIFOs),
//! an entry that no longer matches its record, redirects, a record for another image, endless
//! or size-less bodies, a device as a direct_url, absurd durations, and a child that would
//! outlive us. Each test reproduces what once went wrong (a followed link, a hang, a full disk,
//! an orphan process) and asserts the refusal, its exit code, and that nothing was touched.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::fault_server::{Action, FaultServer, Image};
use crate::support::{Cache, entry_name, imgcache, make_qcow2, run, run_guarded, test_bytes};

/// Long enough for any of these runs on a loaded machine; only a hang reaches it.
const GUARD: Duration = Duration::from_secs(120);

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A `qemu-img` in `dir` that runs `on_convert` (shell) before a `convert`, then the real one.
fn qemu_img_wrapper(dir: &Path, on_convert: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let wrapper = dir.join("qemu-img");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = convert ]; then {on_convert}; fi\nexec qemu-img \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

fn server(id: &str, seed: u64) -> (FaultServer, Vec<u8>) {
    let data = test_bytes(1 << 20, seed);
    (FaultServer::start(Image::raw(id, data.clone())), data)
}

#[test]
fn a_symlink_planted_at_the_part_file_is_refused_and_its_target_untouched() {
    let cache = Cache::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("precious");
    std::fs::write(&target, b"precious").unwrap();
    std::fs::create_dir_all(cache.base()).unwrap();
    let part = cache.base().join(format!("{}.part", entry_name("img")));
    symlink(&target, &part).unwrap();
    let (srv, _) = server("img", 1);
    let r = run_guarded(cache.fetch(&srv.url).arg("img"), GUARD);
    r.assert_code(15);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    // Not ours: left where it is, and no entry was made.
    assert!(
        std::fs::symlink_metadata(&part)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(!cache.base().join(entry_name("img")).exists());
}

#[test]
fn a_fifo_at_the_part_file_is_refused_without_hanging() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    mkfifo(&cache.base().join(format!("{}.part", entry_name("img"))));
    let (srv, _) = server("img", 2);
    let r = run_guarded(cache.fetch(&srv.url).arg("img"), GUARD);
    r.assert_code(15);
    assert!(r.stderr.contains("a FIFO"), "{}", r.stderr);
}

#[test]
fn a_symlinked_entry_is_never_served_nor_copied_into_a_guest_disk() {
    let cache = Cache::new();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("shadow");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    std::fs::create_dir_all(cache.base()).unwrap();
    let entry = cache.base().join(entry_name("img"));
    symlink(&secret, &entry).unwrap();
    let (srv, _) = server("img", 3);
    let r = run_guarded(cache.fetch(&srv.url).arg("img"), GUARD);
    r.assert_code(15);
    let r = run_guarded(
        cache
            .create(&srv.url, "vm1", "img")
            .args(["--backend", "raw"]),
        GUARD,
    );
    r.assert_code(15);
    assert!(!cache.instances().join("vm1/disk").exists());
    // Nothing of ours replaced it either.
    assert!(
        std::fs::symlink_metadata(&entry)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_symlinked_lock_file_creates_nothing_elsewhere() {
    let cache = Cache::new();
    let outside = tempfile::tempdir().unwrap();
    let nologin = outside.path().join("nologin");
    std::fs::create_dir_all(cache.instances().join("locks")).unwrap();
    let lock = cache
        .instances()
        .join("locks")
        .join(format!("imgcache-{}", entry_name("img")));
    symlink(&nologin, &lock).unwrap();
    let (srv, _) = server("img", 4);
    let r = run_guarded(cache.fetch(&srv.url).arg("img"), GUARD);
    r.assert_code(15);
    assert!(!nologin.exists(), "a file was created through the link");
}

#[test]
fn fifos_and_links_to_devices_never_hang_list_or_prune() {
    let cache = Cache::new();
    let (srv, _) = server("img", 5);
    run(cache.fetch(&srv.url).arg("img")).assert_code(0);
    // The record replaced by a FIFO, one instance's usage record a FIFO, another's a link to
    // /dev/zero.
    let record = cache.base().join(format!("{}.info", entry_name("img")));
    std::fs::remove_file(&record).unwrap();
    mkfifo(&record);
    for vm in ["vm1", "vm2"] {
        std::fs::create_dir_all(cache.instances().join(vm)).unwrap();
    }
    mkfifo(&cache.instances().join("vm1/imgcache.json"));
    symlink("/dev/zero", cache.instances().join("vm2/imgcache.json")).unwrap();
    let instances = cache.instances().to_str().unwrap().to_owned();
    let list = run_guarded(
        imgcache().args(["list", "--json", "--instances-path", &instances]),
        GUARD,
    );
    list.assert_code(0);
    let prune = run_guarded(
        imgcache().args(["prune", "--dry-run", "--instances-path", &instances]),
        GUARD,
    );
    prune.assert_code(0);
    // The entry with a FIFO for its record is not served.
    let r = run_guarded(cache.fetch(&srv.url).arg("img"), GUARD);
    r.assert_code(15);
    assert!(r.stderr.contains(".info is a FIFO"), "{}", r.stderr);
}

#[test]
fn an_entry_that_no_longer_matches_its_record_is_fetched_again() {
    let cache = Cache::new();
    let (srv, data) = server("img", 6);
    run(cache.fetch(&srv.url).arg("img")).assert_code(0);
    let entry = cache.base().join(entry_name("img"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&entry)
        .unwrap();
    f.set_len(data.len() as u64 / 2).unwrap();
    drop(f);
    let r = run(cache.fetch(&srv.url).arg("img"));
    r.assert_code(0);
    assert!(r.stderr.contains("fetching it again"), "{}", r.stderr);
    assert_eq!(std::fs::read(&entry).unwrap(), data);
    assert_eq!(srv.file_requests().len(), 2);
    // A raw disk is then made from the whole image, not the truncated one.
    run(cache
        .create(&srv.url, "vm1", "img")
        .args(["--backend", "raw"]))
    .assert_code(0);
    assert_eq!(
        std::fs::read(cache.instances().join("vm1/disk")).unwrap(),
        data
    );
}

#[test]
fn durations_that_overflow_or_are_zero_are_usage_errors() {
    let cache = Cache::new();
    for (flag, value) in [
        ("--read-timeout", "10000000000000000000"),
        ("--connect-timeout", "10000000000000000000"),
        ("--lock-timeout", "10000000000000000000d"),
        ("--read-timeout", "0"),
    ] {
        let r = run(cache.fetch("http://127.0.0.1:9").args([flag, value, "img"]));
        r.assert_code(2);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert!(r.stderr.contains(flag), "{flag}: {}", r.stderr);
    }
    let instances = cache.instances().to_str().unwrap().to_owned();
    let r = run(imgcache().args([
        "prune",
        "--instances-path",
        &instances,
        "--rbd-timeout",
        "10000000000000000000",
    ]));
    r.assert_code(2);
}

#[test]
fn a_redirect_is_not_followed_and_the_token_goes_nowhere_else() {
    let (elsewhere, _) = server("img", 7);
    let (srv, _) = server("img", 7);
    srv.script([Action::Redirect(format!(
        "{}/v2/images/img/file",
        elsewhere.url
    ))]);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&srv.url)
        .args(["--token", "s3cr3t-token", "--retries", "0", "img"]));
    r.assert_code(7);
    assert!(
        r.stderr.contains("redirects are not followed"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("s3cr3t-token"), "{}", r.stderr);
    assert!(
        elsewhere.requests().is_empty(),
        "{:?}",
        elsewhere.requests()
    );
    assert!(
        srv.requests()
            .iter()
            .all(|s| s.token.as_deref() == Some("s3cr3t-token"))
    );
    cache.assert_clean_or_complete(None);
}

#[test]
fn a_record_for_another_image_is_refused() {
    let mut image = Image::raw("img", test_bytes(1 << 20, 8));
    image.record_id = Some("someone-elses-image".into());
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).arg("img"));
    r.assert_code(6);
    assert!(r.stderr.contains("someone-elses-image"), "{}", r.stderr);
    assert!(srv.file_requests().is_empty());
    cache.assert_clean_or_complete(None);
}

#[test]
fn an_image_without_a_size_stops_at_max_image_size() {
    let data = test_bytes(4 << 20, 9);
    let mut image = Image::raw("img", data.clone());
    image.null_size = true;
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&srv.url)
        .args(["--max-image-size", "1M", "img"]));
    r.assert_code(6);
    assert!(r.stderr.contains("--max-image-size"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
    // Under the ceiling, it is fetched and verified by its hash.
    run(cache.fetch(&srv.url).arg("img")).assert_code(0);
    assert_eq!(
        std::fs::read(cache.base().join(entry_name("img"))).unwrap(),
        data
    );
}

#[test]
fn a_device_as_direct_url_is_never_read_and_the_image_comes_over_http() {
    let mut image = Image::raw("img", test_bytes(1 << 20, 10));
    image.direct_url = Some("file:///dev/zero".into());
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run_guarded(
        cache.fetch(&srv.url).args(["--allow-direct-file", "img"]),
        GUARD,
    );
    // /dev/zero is not a regular file: it is not used; the image comes over HTTP.
    r.assert_code(0);
    assert_eq!(srv.file_requests().len(), 1);
}

#[test]
fn a_conversion_child_dies_with_a_killed_imgcache() {
    let work = tempfile::tempdir().unwrap();
    // A qemu-img whose convert never ends (it becomes `sleep`, keeping the death signal).
    let wrapper = qemu_img_wrapper(work.path(), "exec sleep 300");
    let (_, qcow) = make_qcow2(work.path(), "img", &test_bytes(1 << 20, 11));
    let mut image = Image::raw("img", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let mut child = cache
        .fetch(&srv.url)
        .arg("img")
        .env("IMGCACHE_QEMU_IMG", &wrapper)
        // qemu-img converts after the download (the native converter has no child).
        .env("IMGCACHE_CONVERTER", "qemu-img")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let sleeper = loop {
        if let Some(pid) = descendant_named(child.id(), "sleep") {
            break pid;
        }
        assert!(started.elapsed() < GUARD, "the conversion never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let killed = Instant::now();
    while Path::new(&format!("/proc/{sleeper}")).exists() && !is_zombie(sleeper) {
        assert!(
            killed.elapsed() < GUARD,
            "the qemu-img child {sleeper} outlived imgcache"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child (or grandchild) of `pid` whose command name is `name`.
fn descendant_named(pid: u32, name: &str) -> Option<u32> {
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                if comm.trim() == name {
                    return Some(c);
                }
                todo.push(c);
            }
        }
    }
    None
}

/// Dead but not yet reaped (its parent, init, will reap it).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn create_re_inspects_a_base_with_the_virtual_size_limit_it_was_given() {
    let work = tempfile::tempdir().unwrap();
    let qcow = work.path().join("big.qcow2");
    crate::support::qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "3T"]);
    let mut image = Image::raw("big", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache.create(&srv.url, "vm1", "big").args([
        "--no-force-raw",
        "--max-virtual-size",
        "4T",
    ]));
    r.assert_code(0);
    // The default limit still refuses it.
    let r = run(cache.create(&srv.url, "vm2", "big").arg("--no-force-raw"));
    r.assert_code(5);
}

#[test]
fn a_create_that_fails_after_the_root_disk_leaves_nothing_and_names_the_reference() {
    let mut image = Image::raw("img", test_bytes(1 << 20, 12));
    image
        .properties
        .insert("kernel_id".into(), "no-such-kernel".into());
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache
        .create(&srv.url, "vm1", "img")
        .args(["--backend", "raw"]));
    r.assert_code(3);
    assert!(
        r.stderr
            .contains("the kernel_id of image img is no-such-kernel"),
        "{}",
        r.stderr
    );
    assert!(
        !cache.instances().join("vm1").exists(),
        "the failed create left its disk"
    );
}

#[test]
fn the_root_base_is_recorded_in_use_before_a_slow_kernel_download() {
    let mut image = Image::raw("img", test_bytes(1 << 20, 13));
    // Any id serves the same bytes: the kernel is a second download, which stalls.
    image.any_id = true;
    image.properties.insert("kernel_id".into(), "kernel".into());
    let srv = FaultServer::start(image);
    srv.script([
        Action::Normal,
        Action::StallAfter(0, Duration::from_secs(30)),
    ]);
    let cache = Cache::new();
    let mut child = cache
        .create(&srv.url, "vm1", "img")
        .args(["--read-timeout", "5s", "--retries", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let record = cache.instances().join("vm1/imgcache.json");
    let started = Instant::now();
    let seen = loop {
        if let Ok(text) = std::fs::read_to_string(&record)
            && !text.is_empty()
        {
            break text;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "create ended before recording its root base"
        );
        assert!(
            started.elapsed() < GUARD,
            "no usage record while the kernel downloads"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(seen.contains(&entry_name("img")), "{seen}");
    // The stalled kernel then fails the create, which removes what it made.
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7));
    assert!(!cache.instances().join("vm1").exists());
}

#[test]
fn a_qcow2_header_a_guest_wrote_into_its_raw_disk_pins_no_base() {
    let cache = Cache::new();
    let (srv, _) = server("img", 14);
    run(cache.fetch(&srv.url).arg("img")).assert_code(0);
    let base = cache.base().join(entry_name("img"));
    // The guest of a raw instance writes a qcow2 header naming our base at offset 0 of its disk.
    let vm = cache.instances().join("vm1");
    std::fs::create_dir_all(&vm).unwrap();
    let disk = vm.join("disk");
    crate::support::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        disk.to_str().unwrap(),
        "1G",
    ]);
    let info = serde_json::json!({ disk.to_str().unwrap(): "raw" });
    std::fs::write(vm.join("disk.info"), info.to_string()).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    std::fs::File::open(&base)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let instances = cache.instances().to_str().unwrap().to_owned();
    let r = run(imgcache().args(["prune", "--json", "--instances-path", &instances]));
    r.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let entry = &report["entries"][0];
    assert_eq!(entry["action"], "removed", "{entry}");
    assert!(!base.exists());
}

#[test]
fn a_server_that_drips_its_data_is_given_up_on() {
    // 64 KiB every 300 ms never leaves a silence for --read-timeout, but is far below --min-rate.
    let srv = FaultServer::start(Image::raw("img", test_bytes(4 << 20, 15)));
    srv.pace(Some(Duration::from_millis(300)));
    let cache = Cache::new();
    let r = run_guarded(
        cache.fetch(&srv.url).args([
            "--read-timeout",
            "1s",
            "--min-rate",
            "1M",
            "--retries",
            "1",
            "img",
        ]),
        GUARD,
    );
    r.assert_code(7);
    assert!(r.stderr.contains("too slowly"), "{}", r.stderr);
    // Progress made while dripping does not buy more attempts: the first and one retry.
    assert_eq!(srv.file_requests().len(), 2, "{:?}", srv.file_requests());
    cache.assert_clean_or_complete(None);
}

#[test]
fn a_password_in_the_glance_url_is_never_printed() {
    let (srv, _) = server("img", 16);
    let with_password = srv.url.replacen("http://", "http://user:hunter2@", 1);
    let cache = Cache::new();
    let r = run(cache
        .fetch(&with_password)
        .args(["-vv", "--retries", "0", "no-such-image"]));
    r.assert_code(3);
    assert!(r.stderr.contains("user:***@"), "{}", r.stderr);
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
    let instances = cache.instances().to_str().unwrap().to_owned();
    let shown = run(imgcache()
        .args(["config", "show", "--instances-path", &instances])
        .env("OS_IMAGE_URL", &with_password));
    shown.assert_code(0);
    assert!(!shown.stdout.contains("hunter2"), "{}", shown.stdout);
}

#[test]
fn tenant_chosen_names_cannot_drive_the_terminal() {
    let mut image = Image::raw("img", test_bytes(1 << 20, 17));
    image
        .properties
        .insert("name".into(), "evil\u{1b}[2J\nforged line".into());
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    run(cache.fetch(&srv.url).args(["-v", "img"])).assert_code(0);
    let instances = cache.instances().to_str().unwrap().to_owned();
    let list = run(imgcache().args(["list", "--instances-path", &instances]));
    list.assert_code(0);
    assert!(!list.stdout.contains('\u{1b}'), "{:?}", list.stdout);
    assert!(list.stdout.contains("evil\\u{1b}"), "{}", list.stdout);
    let old = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    std::fs::File::open(cache.base().join(entry_name("img")))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let prune = run(imgcache().args(["prune", "--dry-run", "--instances-path", &instances]));
    prune.assert_code(0);
    assert!(prune.stdout.contains("would remove"), "{}", prune.stdout);
    assert!(!prune.stdout.contains('\u{1b}'), "{:?}", prune.stdout);
    assert!(
        !prune.stdout.contains("\nforged line"),
        "{:?}",
        prune.stdout
    );
}

#[test]
fn a_symlink_swapped_in_while_qemu_img_converts_is_not_written_through_nor_kept() {
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("precious");
    std::fs::write(&outside, b"precious").unwrap();
    // A qemu-img that, just before converting, replaces `.converted` with a link to `outside`
    // (what another account that can write `_base` could do at that moment).
    let wrapper = qemu_img_wrapper(
        work.path(),
        "rm -f \"$SWAP_AT\"; ln -s \"$SWAP_TO\" \"$SWAP_AT\"",
    );
    let (_, qcow) = make_qcow2(work.path(), "img", &test_bytes(1 << 20, 18));
    let mut image = Image::raw("img", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let converted = cache
        .base()
        .join(format!("{}.converted", entry_name("img")));
    let r = run(cache
        .fetch(&srv.url)
        .arg("img")
        .env("IMGCACHE_QEMU_IMG", &wrapper)
        .env("IMGCACHE_CONVERTER", "qemu-img")
        .env("SWAP_AT", &converted)
        .env("SWAP_TO", &outside));
    r.assert_code(15);
    assert!(r.stderr.contains("was replaced"), "{}", r.stderr);
    assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    assert!(!cache.base().join(entry_name("img")).exists());
}

#[test]
fn a_part_file_another_account_made_is_never_resumed() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let name = entry_name("img");
    let part = cache.base().join(format!("{name}.part"));
    std::fs::write(&part, b"someone else's bytes").unwrap();
    std::os::unix::fs::chown(&part, Some(65534), Some(65534)).unwrap();
    let (srv, data) = server("img", 19);
    // While its owner holds Nova's lock it is a download in progress: left alone, we wait.
    {
        let _nova = crate::support::LockfHold::take(
            &cache.instances().join("locks").join(format!("nova-{name}")),
        );
        let r = run(cache.fetch(&srv.url).args(["--lock-timeout", "1s", "img"]));
        r.assert_code(8);
        assert!(r.stderr.contains("possibly nova-compute"), "{}", r.stderr);
        assert_eq!(std::fs::read(&part).unwrap(), b"someone else's bytes");
        assert!(srv.file_requests().is_empty());
    }
    // With both locks free it is a dead download: removed, not resumed; the image comes whole.
    let r = run(cache.fetch(&srv.url).arg("img"));
    r.assert_code(0);
    assert!(
        r.stderr.contains("another user (uid 65534) left"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(cache.base().join(&name)).unwrap(), data);
    assert!(!part.exists());
    let ranged = srv.file_requests().iter().any(|q| q.range.is_some());
    assert!(!ranged, "nothing of the foreign .part was resumed");
}

#[test]
fn a_kernel_id_pointing_at_a_qcow2_disk_image_does_not_poison_its_entry() {
    let work = tempfile::tempdir().unwrap();
    let (_, qcow) = make_qcow2(work.path(), "img", &test_bytes(1 << 20, 20));
    let mut image = Image::raw("root", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    // Every id serves these bytes: the root's kernel_id names another (qcow2) image.
    image.any_id = true;
    image
        .properties
        .insert("kernel_id".into(), "public-disk".into());
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    run(&mut cache.create(&srv.url, "vm1", "root")).assert_code(0);
    // Later, the same image used as a disk: its entry is raw, as a fetch of it makes it.
    let r = run(cache
        .create(&srv.url, "vm2", "public-disk")
        .args(["--backend", "raw"]));
    r.assert_code(0);
    let record = crate::support::record(&cache, "public-disk");
    assert_eq!(record["format"], "raw", "{record}");
}

#[test]
fn a_conversion_that_would_eat_the_reserve_is_stopped() {
    // 48 MiB of one repeated byte compresses to a tiny qcow2: the estimate (twice the
    // download) passes, the output does not fit above a 24 MiB reserve on a 64 MiB filesystem.
    // Both converters: the native one during the download, and qemu-img after it.
    let work = tempfile::tempdir().unwrap();
    let qcow = crate::support::compressed_qcow2(work.path(), "big", 0x5a, 48 << 20);
    let mut image = Image::raw("big", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    for converter in ["native", "qemu-img"] {
        let fs = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(fs.path())
            .status()
            .unwrap();
        assert!(mounted.success(), "mount tmpfs (needs root)");
        let r = run(imgcache()
            .arg("fetch")
            .arg("--instances-path")
            .arg(fs.path())
            .env("IMGCACHE_CONVERTER", converter)
            .args(["--glance-url", &srv.url, "--min-free", "24M", "big"]));
        let files = Cache::files_in(&fs.path().join("_base"));
        let _ = std::process::Command::new("umount").arg(fs.path()).status();
        r.assert_code(9);
        assert!(r.stderr.contains("--min-free"), "{converter}: {}", r.stderr);
        assert!(files.is_empty(), "{converter}: {files:?}");
    }
    // One download each: the native converter's stop is final, not a reason to download again.
    assert_eq!(srv.file_requests().len(), 2);
}

#[test]
fn a_malformed_record_is_a_protocol_error_not_unavailable() {
    let mut image = Image::raw("img", test_bytes(1 << 20, 21));
    image.record_body = Some("<html>a proxy's login page</html>".into());
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    let r = run(cache.fetch(&srv.url).args(["--retries", "0", "img"]));
    r.assert_code(16);
    assert!(r.stderr.contains("cannot be read"), "{}", r.stderr);
    cache.assert_clean_or_complete(None);
}

#[test]
fn configuration_files_are_read_bounded_and_explain_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let instances = dir.path().to_str().unwrap().to_owned();
    // A FIFO named as the configuration file is refused, not waited on.
    let fifo = dir.path().join("imgcache.toml");
    mkfifo(&fifo);
    let r = run_guarded(
        imgcache()
            .arg("--config")
            .arg(&fifo)
            .args(["list", "--instances-path", &instances]),
        GUARD,
    );
    r.assert_code(15);
    assert!(r.stderr.contains("a FIFO"), "{}", r.stderr);
    // A TOML error says why, not only where.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "jobs = [\n").unwrap();
    let r =
        run(imgcache()
            .arg("--config")
            .arg(&bad)
            .args(["list", "--instances-path", &instances]));
    r.assert_code(2);
    assert!(
        r.stderr.contains("line 1, column 9: unclosed array"),
        "{}",
        r.stderr
    );
    // An empty IMGCACHE_CONFIG means unset, not a --config flag without its value.
    let r =
        run(imgcache()
            .env("IMGCACHE_CONFIG", "")
            .args(["list", "--instances-path", &instances]));
    r.assert_code(0);
}

#[test]
fn a_symlinked_base_or_lock_directory_is_not_followed() {
    let (srv, _) = server("img", 22);
    for dir in ["_base", "locks"] {
        let cache = Cache::new();
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), cache.instances().join(dir)).unwrap();
        let r = run(cache.fetch(&srv.url).arg("img"));
        r.assert_code(15);
        assert!(r.stderr.contains("is a symlink"), "{dir}: {}", r.stderr);
        let written: Vec<_> = std::fs::read_dir(elsewhere.path()).unwrap().collect();
        assert!(
            written.is_empty(),
            "{dir}: files were written through the link"
        );
    }
    // The instances path itself may be a link (the operator's choice, e.g. kolla's layout).
    let real = tempfile::tempdir().unwrap();
    let holder = tempfile::tempdir().unwrap();
    let link = holder.path().join("instances");
    symlink(real.path(), &link).unwrap();
    let r = run(imgcache()
        .arg("fetch")
        .arg("--instances-path")
        .arg(&link)
        .args(["--glance-url", &srv.url, "img"]));
    r.assert_code(0);
    assert!(real.path().join("_base").join(entry_name("img")).exists());
}

#[test]
fn an_image_id_reused_in_glance_is_caught_by_revalidate_and_replaced_only_when_unused() {
    let cache = Cache::new();
    let (before, _) = server("img", 23);
    run(cache.fetch(&before.url).arg("img")).assert_code(0);
    // The id purged and reused: same id, other bytes, other hash.
    let (after, new_data) = server("img", 24);
    // By default the cache is served as it is (Glance is not asked).
    run(cache.fetch(&after.url).arg("img")).assert_code(0);
    assert!(after.requests().is_empty());
    let r = run(cache.fetch(&after.url).args(["--revalidate", "img"]));
    r.assert_code(6);
    assert!(
        r.stderr.contains("no longer the cached one"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--replace"), "{}", r.stderr);
    // In use: --replace refuses.
    run(&mut cache.create(&before.url, "vm1", "img")).assert_code(0);
    let r = run(cache.fetch(&after.url).args(["--replace", "img"]));
    r.assert_code(6);
    assert!(r.stderr.contains("in use by vm1"), "{}", r.stderr);
    // Unused: replaced under its lock.
    let instances = cache.instances().to_str().unwrap().to_owned();
    run(imgcache().args(["delete", "vm1", "--instances-path", &instances])).assert_code(0);
    let r = run(cache.fetch(&after.url).args(["--replace", "img"]));
    r.assert_code(0);
    assert_eq!(
        std::fs::read(cache.base().join(entry_name("img"))).unwrap(),
        new_data
    );
    run(cache.fetch(&after.url).args(["--revalidate", "img"])).assert_code(0);
}

#[test]
fn a_tiny_qcow2_declaring_256_gib_is_fetched_and_verified_without_hashing_its_holes() {
    let work = tempfile::tempdir().unwrap();
    let qcow = work.path().join("big.qcow2");
    crate::support::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        qcow.to_str().unwrap(),
        "256G",
    ]);
    let mut image = Image::raw("big", std::fs::read(&qcow).unwrap());
    image.disk_format = "qcow2".into();
    let srv = FaultServer::start(image);
    let cache = Cache::new();
    run_guarded(cache.fetch(&srv.url).arg("big"), GUARD).assert_code(0);
    let record = crate::support::record(&cache, "big");
    assert_eq!(record["entry_size"], 256u64 << 30);
    let digest = record["content_xxh3"].as_str().unwrap().to_owned();
    assert!(digest.starts_with("zb64k:"), "{digest}");
    let instances = cache.instances().to_str().unwrap().to_owned();
    let r = run_guarded(
        imgcache().args(["verify", "--instances-path", &instances]),
        GUARD,
    );
    r.assert_code(0);
    assert!(r.stdout.starts_with("ok"), "{}", r.stdout);
}

#[test]
fn another_accounts_temp_file_is_kept_while_its_nova_lock_is_held_and_removed_when_stale() {
    let cache = Cache::new();
    std::fs::create_dir_all(cache.base()).unwrap();
    let name = entry_name("img");
    let part = cache.base().join(format!("{name}.part"));
    std::fs::write(&part, b"a download another account is making").unwrap();
    std::os::unix::fs::chown(&part, Some(65534), Some(65534)).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    std::fs::File::open(&part)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let instances = cache.instances().to_str().unwrap().to_owned();
    let nova_lock = cache.instances().join("locks").join(format!("nova-{name}"));
    {
        let _nova = crate::support::LockfHold::take(&nova_lock);
        let r = run(imgcache().args(["prune", "--json", "--instances-path", &instances]));
        r.assert_code(0);
        let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(report["temps"][0]["action"], "busy", "{report}");
        assert!(part.exists());
    }
    // Nobody holds either lock now: whoever made it, it is a dead download.
    let r = run(imgcache().args(["prune", "--json", "--instances-path", &instances]));
    r.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["temps"][0]["action"], "removed", "{report}");
    assert!(!part.exists());
    assert!(nova_lock.exists(), "Nova's lock file is never deleted");
}
