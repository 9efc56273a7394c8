//! A structure-aware mutation fuzzer for the inspector, on the stable toolchain: seeds are valid
//! images made by qemu-img (and hand-built headers); each round mutates header fields to
//! boundary values, flips bytes, truncates, and splices other formats' magic, then runs the
//! inspector and checks it returns (an answer or an error) without panicking and without reading
//! more than a bounded number of bytes. Runs for IMGCACHE_FUZZ_SECONDS (default 10; the test
//! script runs 60). A failing input is written to target/fuzz-failures/ and the RNG seed printed,
//! so it can be replayed and turned into a regression test.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use imgcache::inspect::{self, Limits, Source};

use crate::support::{Rng, qemu_img};

/// Upper bound on what one inspection may read, whatever the input (VMDK descriptors are the
/// largest region: 1 MiB, plus headers).
const MAX_READ: u64 = (1 << 20) + (64 << 10);

fn seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let mut data = crate::support::test_bytes(1 << 20, 99);
    data.resize(2 << 20, 0);
    std::fs::write(&raw, &data).unwrap();
    let mut out = vec![data[..64 << 10].to_vec()];
    for (fmt, opts, name) in [
        ("qcow2", "compat=1.1", "a.qcow2"),
        ("qcow2", "compat=0.10", "b.qcow2"),
        ("vmdk", "subformat=monolithicSparse", "c.vmdk"),
        ("vmdk", "subformat=streamOptimized", "d.vmdk"),
        ("vpc", "subformat=dynamic", "e.vhd"),
        ("vhdx", "subformat=dynamic", "f.vhdx"),
        ("vdi", "static=off", "g.vdi"),
        ("qed", "cluster_size=65536", "h.qed"),
    ] {
        let p = dir.path().join(name);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            opts,
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&p).unwrap();
        out.push(bytes[..bytes.len().min(256 << 10)].to_vec());
    }
    let mut iso = vec![0u8; 0x9000];
    iso[0x8000..0x8007].copy_from_slice(b"\x01CD001\x01");
    iso[510] = 0x55;
    iso[511] = 0xAA;
    iso[446] = 0x80;
    iso[450] = 0x17;
    out.push(iso);
    out.push(b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"x.vmdk\"\n".to_vec());
    let mut luks = b"LUKS\xba\xbe\x00\x01".to_vec();
    luks.resize(4096, 0);
    out.push(luks);
    out
}

const MAGICS: &[(usize, &[u8])] = &[
    (0, b"QFI\xfb"),
    (0, b"KDMV"),
    (0, b"QED\0"),
    (0, b"conectix"),
    (0, b"vhdxfile"),
    (0, b"LUKS\xba\xbe"),
    (0, b"# Disk DescriptorFile\n"),
    (0x40, &[0x7f, 0x10, 0xda, 0xbe]),
    (0x8001, b"CD001"),
    (510, &[0x55, 0xAA]),
];

const BOUNDARIES: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    9,
    21,
    22,
    63,
    64,
    511,
    512,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    u64::MAX - 1,
    u64::MAX,
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            // A big-endian or little-endian header field set to a boundary value.
            0 | 1 => {
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let window = d.len().min(0x200);
                if window > width {
                    let off = rng.below(window - width) & !(width - 1);
                    let v = BOUNDARIES[rng.below(BOUNDARIES.len())];
                    let bytes = if rng.below(2) == 0 {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    let take = if bytes[0] == 0 && width == 4 {
                        &bytes[4..]
                    } else {
                        &bytes[8 - width..]
                    };
                    d[off..off + width].copy_from_slice(take);
                }
            }
            2 => {
                if !d.is_empty() {
                    let off = rng.below(d.len().min(4096));
                    d[off] ^= 1 << rng.below(8);
                }
            }
            3 => {
                let len = rng.below(d.len() + 1);
                d.truncate(len);
            }
            4 => {
                let (off, magic) = MAGICS[rng.below(MAGICS.len())];
                if d.len() < off + magic.len() {
                    d.resize(off + magic.len(), 0);
                }
                d[off..off + magic.len()].copy_from_slice(magic);
            }
            5 => {
                // Text mutations for descriptors: paths, types, junk lines.
                let inserts: &[&[u8]] = &[
                    b"\nRW 100 FLAT \"/etc/passwd\" 0\n",
                    b"\ncreateType=\"vmfs\"\n",
                    b"\nparentFileNameHint=\"/x\"\n",
                    b"\n\xff\xfe garbage\n",
                    b"\nRW x SPARSE\n",
                ];
                let ins = inserts[rng.below(inserts.len())];
                let at = rng.below(d.len().min(2048) + 1);
                d.splice(at..at, ins.iter().copied());
            }
            _ => {
                let n = rng.below(64);
                let at = rng.below(d.len().min(1024) + 1);
                let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                d.splice(at..at, junk);
            }
        }
    }
    d
}

#[test]
fn inspector_survives_mutated_headers() {
    let seconds: u64 = std::env::var("IMGCACHE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = std::env::var("IMGCACHE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("inspector fuzz: seed {seed}, {seconds} s (IMGCACHE_FUZZ_SEED replays)");
    let seeds = seeds();
    let mut rng = Rng::new(seed);
    let limits = Limits {
        allow_luks: true,
        ..Limits::default()
    };
    let strict = Limits::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    let mut accepted = 0u64;
    let mut failure = None;
    while Instant::now() < deadline && failure.is_none() {
        let pick = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[pick]);
        for l in [&limits, &strict] {
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let src = Source::from_bytes(&input);
                let r = inspect::inspect(&src, l);
                (r.is_ok(), src.bytes_read())
            }));
            let elapsed = started.elapsed();
            match outcome {
                Ok((ok, read)) => {
                    accepted += u64::from(ok);
                    if read > MAX_READ {
                        failure = Some((input.clone(), format!("read {read} bytes")));
                    } else if elapsed > Duration::from_secs(2) {
                        failure = Some((input.clone(), format!("took {elapsed:?} (hang)")));
                    }
                }
                Err(_) => failure = Some((input.clone(), "panicked".into())),
            }
        }
        runs += 1;
    }
    eprintln!("inspector fuzz: {runs} inputs, {accepted} inspections accepted");
    if let Some((input, why)) = failure {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{seed}.bin"));
        std::fs::write(&path, &input).unwrap();
        panic!(
            "inspector {why} on an input saved as {} (seed {seed})",
            path.display()
        );
    }
    assert!(runs > 1000, "fuzzer made only {runs} runs");
}
