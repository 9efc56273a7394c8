//! A raw image that is mostly zeros is stored sparse: the `.part` gets holes where the stream
//! has all-zero blocks, so the entry allocates its data, not its size. The hashes are over the
//! whole stream, unchanged; resumes (a cut inside a zero run or inside data, in the same run or
//! from a killed run's `.part`) give the same bytes.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::support::fault_server::{Action, FaultServer, Image};
use crate::support::glance::real;
use crate::support::{Cache, Rng, content_digest_hex, entry_name, record, run};

const MIB: usize = 1 << 20;
static ZEROS: [u8; 4096] = [0; 4096];

/// `len` bytes of zeros holding `extents` runs of `extent` random bytes, spread evenly and
/// placed off the 4 KiB grid, plus a 100-byte island in every gap; returns the bytes and the
/// (start, end) of every run of data.
fn scattered(len: usize, extents: usize, extent: usize, seed: u64) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut v = vec![0u8; len];
    let mut rng = Rng::new(seed);
    let stride = len / extents;
    let mut runs = Vec::new();
    for i in 0..extents {
        let at = i * stride + 1000 + i * 4099 % (stride / 4);
        rng.fill(&mut v[at..at + extent]);
        runs.push((at as u64, (at + extent) as u64));
        let island = at + extent + stride / 3;
        rng.fill(&mut v[island..island + 100]);
        runs.push((island as u64, island as u64 + 100));
    }
    (v, runs)
}

/// A raw image in the fault server, hashed with libcrypto (the debug build's sha2 would take
/// a minute over a GiB).
fn image(id: &str, data: Vec<u8>) -> Image {
    let mut img = Image::raw(id, Vec::new());
    img.os_hash = Some(("sha512".into(), hex::encode(openssl::sha::sha512(&data))));
    img.checksum = None;
    img.size = data.len() as u64;
    img.data = data;
    img
}

/// The entry holds exactly `data` (compared a MiB at a time), its record's content digest is
/// `digest`, `imgcache verify` agrees, and it allocates at most its data plus 5 %.
fn assert_sparse_entry(cache: &Cache, id: &str, data: &[u8], digest: &str, data_bytes: u64) {
    let path = cache.base().join(entry_name(id));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    let mut f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; MIB];
    for (i, want) in data.chunks(MIB).enumerate() {
        f.read_exact(&mut buf[..want.len()]).unwrap();
        assert!(&buf[..want.len()] == want, "entry differs in MiB {i}");
    }
    assert_eq!(record(cache, id)["content_xxh3"], digest);
    let allocated = meta.blocks() * 512;
    assert!(
        allocated <= data_bytes + data_bytes / 20,
        "{} allocates {allocated} bytes for {data_bytes} bytes of data",
        path.display()
    );
    run(crate::support::imgcache()
        .arg("verify")
        .arg("--instances-path")
        .arg(cache.instances()))
    .assert_code(0);
}

/// A `.part` as a run killed after `len` bytes leaves it: the data blocks of `data[..len]`
/// written, the zero blocks never written.
fn killed_part(cache: &Cache, id: &str, data: &[u8], len: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(cache.base()).unwrap();
    let part = cache.base().join(format!("{}.part", entry_name(id)));
    let f = std::fs::File::create(&part).unwrap();
    let mut end = 0;
    for (i, block) in data[..len].chunks(4096).enumerate() {
        if block != &ZEROS[..block.len()] {
            f.write_all_at(block, (i * 4096) as u64).unwrap();
            end = i * 4096 + block.len();
        }
    }
    end as u64
}

fn requests_from(srv: &FaultServer) -> Vec<(Option<String>, u16)> {
    srv.file_requests()
        .into_iter()
        .map(|s| (s.range, s.status))
        .collect()
}

#[test]
fn a_mostly_zero_raw_image_is_stored_sparse_and_resumes_exactly() {
    // 1 GiB holding 64 MiB of data (the fault server serves from memory, and zeros never
    // touched cost no memory), over one stream (the ranged path is tests/ranges.rs).
    let id = "sparse-1g";
    // Made twice rather than cloned: a clone would touch every page of the zeros.
    let (data, runs) = scattered(1 << 30, 64, MIB, 71);
    let srv = FaultServer::start(image(id, scattered(1 << 30, 64, MIB, 71).0));
    let data_bytes: u64 = runs.iter().map(|(a, b)| b - a).sum();

    let cache = Cache::new();
    run(cache.fetch(&srv.url).args(["--connections", "1", id])).assert_code(0);
    // The digest of the stream (the record's), which `verify` checks against the sparse file;
    // every resumed fetch below must arrive at the same one.
    let digest = record(&cache, id)["content_xxh3"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_sparse_entry(&cache, id, &data, &digest, data_bytes);

    // Cut inside a zero run, and inside data: the same run resumes from where it was.
    let mid_hole = (runs[10].1 + 3 * MIB as u64 + 17) as usize;
    let mid_data = (runs[20].0 + 300_001) as usize;
    for cut in [mid_hole, mid_data] {
        let in_data = runs.iter().any(|&(a, b)| (a..b).contains(&(cut as u64)));
        assert_eq!(in_data, cut == mid_data, "cut at {cut}");
        srv.script([Action::CutAfter(cut as u64)]);
        let before = srv.file_requests().len();
        let cache = Cache::new();
        run(cache.fetch(&srv.url).args(["--connections", "1", id])).assert_code(0);
        assert_eq!(
            requests_from(&srv)[before..],
            [(None, 200), (Some(format!("bytes={cut}-")), 206)]
        );
        assert_sparse_entry(&cache, id, &data, &digest, data_bytes);
    }

    // A killed run's `.part`, stopped in a zero run (so it is shorter than what was streamed)
    // or in data: it is re-hashed from disk, holes read as zeros, and resumed from its length.
    for stop in [mid_hole, mid_data] {
        let cache = Cache::new();
        let len = killed_part(&cache, id, &data, stop);
        assert!(len > 0 && len <= stop as u64);
        let before = srv.file_requests().len();
        run(cache.fetch(&srv.url).args(["--connections", "1", id])).assert_code(0);
        assert_eq!(
            requests_from(&srv)[before..],
            [(Some(format!("bytes={len}-")), 206)]
        );
        assert_sparse_entry(&cache, id, &data, &digest, data_bytes);
    }
}

#[test]
fn a_sparse_raw_image_from_the_real_glance_is_stored_sparse() {
    let g = real();
    let (data, runs) = scattered(64 * MIB, 4, MIB, 72);
    let data_bytes: u64 = runs.iter().map(|(a, b)| b - a).sum();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("sparse.raw");
    std::fs::write(&src, &data).unwrap();
    let id = g.upload("sparse-raw", "raw", Path::new(&src));
    let cache = Cache::new();
    run(cache.fetch(&g.url).arg(&id)).assert_code(0);
    assert_sparse_entry(&cache, &id, &data, &content_digest_hex(&data), data_bytes);
}
