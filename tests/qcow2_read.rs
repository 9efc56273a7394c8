//! The native qcow2 → raw converter (`imgcache::qcow2_read`) against `qemu-img convert`, over a
//! corpus of layouts: both versions, cluster sizes from 512 B to 2 MiB, zlib- and
//! zstd-compressed clusters, zero clusters and preallocated metadata, clusters written in random
//! order, an L2 table moved after its data by hand, a truncated file, and a fuzzer that mutates
//! the tables. Every answer is either byte-identical to qemu-img's raw image or `Unsupported`
//! (the fetch then converts with qemu-img), never a different image. Also: a conversion that
//! follows a file while another thread is still writing it gives the same bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use imgcache::qcow2_read::{self, Complete, Error, Growing};

use crate::support::qcow2::{alias_cluster, move_first_l2_to_end, to_qcow2};
use crate::support::{Rng, qemu_img, test_bytes};

/// A raw source image: random data with zero stretches and an unaligned tail.
fn source(dir: &Path, len: usize, seed: u64) -> PathBuf {
    let mut data = test_bytes(len, seed);
    let mut rng = Rng::new(seed);
    for _ in 0..len / (256 << 10) {
        let at = rng.below(len);
        let n = rng.below(192 << 10).min(len - at);
        data[at..at + n].fill(0);
    }
    let p = dir.join(format!("src-{seed}.raw"));
    std::fs::write(&p, data).unwrap();
    p
}

/// qemu-img's raw image of `qcow`, or None if qemu-img refuses the file.
fn reference(qcow: &Path) -> Option<Vec<u8>> {
    let out = qcow.with_extension("ref");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow)
        .arg(&out)
        .output()
        .unwrap();
    if !st.status.success() {
        return None;
    }
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    Some(data)
}

/// Our conversion of a complete file, as bytes.
fn ours(qcow: &Path) -> Result<Vec<u8>, Error> {
    let src = File::open(qcow).unwrap();
    let len = src.metadata().unwrap().len();
    convert_with(&src, &Complete(len), qcow)
}

fn convert_with(src: &File, grow: &dyn Growing, qcow: &Path) -> Result<Vec<u8>, Error> {
    // The header from the complete file: `src` may still be growing.
    let mut head = vec![0u8; 112];
    let _ = File::open(qcow).unwrap().read_at(&mut head, 0);
    let virtual_size = qcow2_read::Header::parse(&head)
        .map(|h| h.virtual_size)
        .unwrap_or(0);
    if virtual_size > 1 << 30 {
        // The inspector's ceiling refuses such images before a fetch converts anything.
        return Err(Error::Unsupported("a fuzzed virtual size".into()));
    }
    let out_path = qcow.with_extension("ours");
    let out = File::create(&out_path).unwrap();
    out.set_len(virtual_size).unwrap();
    let done = qcow2_read::convert(src, grow, &out, &|| None);
    let data = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    done.map(|d| {
        assert_eq!(d.virtual_size, virtual_size);
        if let Some(content) = &d.content {
            let mut h = imgcache::digest::ContentHasher::new();
            h.update(&data);
            assert_eq!(content, &h.finish(), "the in-order digest is the content's");
        }
        data
    })
}

/// Identical to qemu-img, or refused as unsupported while qemu-img refuses it or converts it.
#[track_caller]
fn assert_identical_or_unsupported(qcow: &Path, must_convert: bool) {
    let expected = reference(qcow);
    match ours(qcow) {
        Ok(got) => {
            let want = expected.unwrap_or_else(|| {
                panic!(
                    "{}: converted natively, but qemu-img refuses it",
                    qcow.display()
                )
            });
            assert!(
                got == want,
                "{}: differs from qemu-img convert",
                qcow.display()
            );
        }
        Err(Error::Unsupported(why)) => {
            assert!(!must_convert, "{}: unsupported: {why}", qcow.display());
        }
        Err(e) => panic!("{}: {e}", qcow.display()),
    }
}

#[test]
fn every_layout_qemu_img_makes_converts_byte_identically() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), (6 << 20) + 12345, 41);
    let cases: &[(&str, &str, bool)] = &[
        ("v3-64k", "compat=1.1", false),
        ("v2-64k", "compat=0.10", false),
        ("v3-512", "compat=1.1,cluster_size=512", false),
        ("v3-4k", "compat=1.1,cluster_size=4096", false),
        ("v3-2m", "compat=1.1,cluster_size=2M", false),
        ("v3-meta", "compat=1.1,preallocation=metadata", false),
        ("v3-zlib", "compat=1.1", true),
        ("v2-zlib", "compat=0.10", true),
        ("v3-zlib-4k", "compat=1.1,cluster_size=4096", true),
        ("v3-zstd", "compat=1.1,compression_type=zstd", true),
        (
            "v3-zstd-2m",
            "compat=1.1,compression_type=zstd,cluster_size=2M",
            true,
        ),
        ("v3-lazy", "compat=1.1,lazy_refcounts=on", false),
    ];
    for (name, opts, compress) in cases {
        let q = dir.path().join(format!("{name}.qcow2"));
        to_qcow2(&src, &q, opts, *compress);
        assert_identical_or_unsupported(&q, true);
    }
}

/// Writes with qemu-io: clusters allocated in random guest order, zeroed clusters (the zero
/// flag), a discard, data rewritten in place.
#[test]
fn clusters_written_in_random_order_with_zero_flags_convert_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (name, compat) in [("io-v3", "1.1"), ("io-v2", "0.10")] {
        let q = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size=65536"),
            q.to_str().unwrap(),
            "64M",
        ]);
        let mut rng = Rng::new(7);
        let mut cmds = Vec::new();
        for i in 0..60 {
            let at = rng.below(1000) as u64 * 65536;
            let len = (1 + rng.below(4)) * 4096;
            cmds.push(format!("write -P {} {at} {len}", 1 + i % 250));
        }
        cmds.push("write -z 0 1M".into());
        cmds.push("write -P 9 33M 256k".into());
        cmds.push("write -z 33M 64k".into());
        cmds.push("discard 33M 128k".into());
        cmds.push("write -P 5 33M 4k".into());
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for c in &cmds {
            io.args(["-c", c]);
        }
        let out = io.arg(&q).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_identical_or_unsupported(&q, true);
    }
}

#[test]
fn an_l2_table_after_its_data_and_a_truncated_file_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), 3 << 20, 43);
    for (name, cs, compress) in [("moved", "4096", false), ("moved-z", "4096", true)] {
        let q = dir.path().join(format!("{name}.qcow2"));
        to_qcow2(&src, &q, &format!("compat=1.1,cluster_size={cs}"), compress);
        // 4 KiB clusters: an L2 table covers 2 MiB, so the image has two.
        move_first_l2_to_end(&q);
        assert_identical_or_unsupported(&q, true);
    }
    let q = dir.path().join("cut.qcow2");
    to_qcow2(&src, &q, "compat=1.1", false);
    let len = std::fs::metadata(&q).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(len - 100_000).unwrap();
    drop(f);
    assert!(
        matches!(ours(&q), Err(Error::Unsupported(_))),
        "a cluster past the end is not ours to guess"
    );
}

/// A complete file whose converted bytes may all be given back.
struct Releasing(u64);

impl Growing for Releasing {
    fn wait_for(&self, end: u64) -> Result<u64, Error> {
        Ok(end.min(self.0))
    }
    fn releasable(&self) -> std::ops::Range<u64> {
        0..self.0
    }
    fn releasing(&self) -> bool {
        true
    }
}

fn allocated(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512
}

#[test]
fn converted_bytes_given_back_leave_holes_and_a_cluster_named_twice_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), 6 << 20, 46);
    for (name, compress) in [("give-back", false), ("give-back-z", true)] {
        let q = dir.path().join(format!("{name}.qcow2"));
        to_qcow2(&src, &q, "compat=1.1", compress);
        let want = reference(&q).unwrap();
        let before = allocated(&q);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&q)
            .unwrap();
        let got = convert_with(&f, &Releasing(f.metadata().unwrap().len()), &q).unwrap();
        assert!(got == want, "{name}: differs from qemu-img");
        let after = allocated(&q);
        assert!(
            after < before / 4,
            "{name}: {before} bytes allocated before, {after} after"
        );
    }
    // Two L2 entries naming one cluster: qemu-img copies it twice; a conversion that gave it
    // back after the first copy must stop, not copy a hole.
    let q = dir.path().join("aliased.qcow2");
    to_qcow2(&src, &q, "compat=1.1", false);
    alias_cluster(&q, 40);
    assert_identical_or_unsupported(&q, true);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&q)
        .unwrap();
    let len = f.metadata().unwrap().len();
    match convert_with(&f, &Releasing(len), &q) {
        Err(Error::Released(_)) => {}
        other => panic!("expected Released, got {:?}", other.map(|v| v.len())),
    }
}

/// Follows a file another thread is writing in 1 MiB steps, as a download does.
struct Writer {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl Growing for Writer {
    fn wait_for(&self, end: u64) -> Result<u64, Error> {
        let mut s = self.state.lock().unwrap();
        loop {
            if s.0 >= end {
                return Ok(end);
            }
            if s.1 {
                return Ok(s.0);
            }
            s = self.cv.wait_timeout(s, Duration::from_secs(5)).unwrap().0;
        }
    }
}

#[test]
fn a_conversion_following_a_file_being_written_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), 8 << 20, 44);
    for (name, compress) in [("plain", false), ("zlib", true)] {
        let q = dir.path().join(format!("{name}.qcow2"));
        to_qcow2(&src, &q, "compat=1.1", compress);
        let bytes = std::fs::read(&q).unwrap();
        let part = dir.path().join(format!("{name}.part"));
        let file = File::create(&part).unwrap();
        let w = Arc::new(Writer {
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
        });
        let (w2, f2) = (w.clone(), file.try_clone().unwrap());
        let writer = std::thread::spawn(move || {
            for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
                f2.write_all_at(chunk, (i << 20) as u64).unwrap();
                let mut s = w2.state.lock().unwrap();
                s.0 += chunk.len() as u64;
                w2.cv.notify_all();
                drop(s);
                std::thread::sleep(Duration::from_millis(5));
            }
            w2.state.lock().unwrap().1 = true;
            w2.cv.notify_all();
        });
        let reader = File::open(&part).unwrap();
        let got = convert_with(&reader, &*w, &q).unwrap();
        writer.join().unwrap();
        assert!(
            got == reference(&q).unwrap(),
            "{name}: differs from qemu-img"
        );
    }
}

/// Mutates the header and tables of small images and compares with qemu-img each time: the
/// converter must give qemu-img's bytes or refuse, never other bytes, never panic. Runs for
/// IMGCACHE_FUZZ_SECONDS (default 10).
#[test]
fn fuzzed_tables_give_qemu_img_bytes_or_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), 1 << 20, 45);
    let mut seeds = Vec::new();
    for (i, (opts, c)) in [
        ("compat=1.1,cluster_size=4096", false),
        ("compat=1.1,cluster_size=4096", true),
        ("compat=0.10,cluster_size=4096", false),
        ("compat=1.1,cluster_size=4096,compression_type=zstd", true),
    ]
    .iter()
    .enumerate()
    {
        let q = dir.path().join(format!("seed{i}.qcow2"));
        to_qcow2(&src, &q, opts, *c);
        seeds.push(std::fs::read(&q).unwrap());
    }
    let secs: u64 = std::env::var("IMGCACHE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut rng = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let (mut rounds, mut same, mut refused) = (0, 0, 0);
    let q = dir.path().join("fuzz.qcow2");
    while Instant::now() < until {
        let mut img = seeds[rng.below(seeds.len())].clone();
        // The tables of a 4 KiB-cluster image made by convert sit in its first clusters; the
        // rest is cluster data (compressed streams in two seeds: both decoders meet them).
        for _ in 0..1 + rng.below(4) {
            let at = match rng.below(8) {
                0 | 1 => rng.below(112),
                2 => rng.below(img.len()),
                _ => rng.below((64 << 10).min(img.len())),
            };
            img[at] ^= 1 << rng.below(8);
        }
        if rng.below(8) == 0 {
            img.truncate(rng.below(img.len()));
        }
        std::fs::write(&q, &img).unwrap();
        let want = reference(&q);
        let got = std::panic::catch_unwind(|| ours(&q));
        let got = match got {
            Ok(g) => g,
            Err(_) => {
                let keep = std::env::temp_dir().join("imgcache-qcow2-read-panic.qcow2");
                std::fs::write(&keep, &img).unwrap();
                panic!("the converter panicked; input kept in {}", keep.display());
            }
        };
        match (got, want) {
            (Ok(g), Some(w)) => {
                if g != w {
                    let keep = std::env::temp_dir().join("imgcache-qcow2-read-differs.qcow2");
                    std::fs::write(&keep, &img).unwrap();
                    panic!("differs from qemu-img; input kept in {}", keep.display());
                }
                same += 1;
            }
            (Ok(_), None) => {
                // qemu-img refuses what the converter accepted: in a fetch, qemu-img info's
                // second opinion on the complete file decides; only count it.
                refused += 1;
            }
            (Err(_), _) => refused += 1,
        }
        rounds += 1;
    }
    eprintln!("{rounds} rounds: {same} identical, {refused} refused by one side");
    assert!(
        rounds > 0 && same > 0,
        "the fuzzer ran and some inputs converted"
    );
}
