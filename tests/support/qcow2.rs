//! qcow2 files for the conversion tests: made by `qemu-img convert`, and edited by hand where a
//! layout is one qemu-img never writes (an L2 table after its data, two entries naming one
//! cluster). Also the `.part`'s `user.imgcache.done` record, as the fetch keeps it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::qemu_img;

/// `qemu-img convert -f raw -O qcow2 [-o OPTS] [-c] SRC DST` (no `-o` for empty OPTS).
pub fn to_qcow2(src: &Path, dst: &Path, opts: &str, compress: bool) {
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if compress {
        args.push("-c");
    }
    args.push(src.to_str().expect("utf8"));
    args.push(dst.to_str().expect("utf8"));
    qemu_img(&args);
}

/// `<dir>/<name>.qcow2` holding `raw` (written to `<dir>/<name>.raw` first).
pub fn qcow2_of(dir: &Path, name: &str, raw: &[u8], opts: &str, compress: bool) -> PathBuf {
    let src = dir.join(format!("{name}.raw"));
    std::fs::write(&src, raw).expect("write raw");
    let dst = dir.join(format!("{name}.qcow2"));
    to_qcow2(&src, &dst, opts, compress);
    dst
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The file opened for writing, its cluster size, its L1 table's offset and L1 entry 0.
fn tables(qcow: &Path) -> (File, u64, u64, u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(qcow)
        .expect("open qcow2");
    let mut h = [0u8; 48];
    f.read_exact_at(&mut h, 0).expect("header");
    let cs = 1u64 << u32::from_be_bytes(h[20..24].try_into().expect("4 bytes"));
    let l1 = u64::from_be_bytes(h[40..48].try_into().expect("8 bytes"));
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1).expect("L1 entry 0");
    (f, cs, l1, u64::from_be_bytes(e))
}

/// Makes the L2 entry after the first allocated one at or past `from` (in the first L2 table)
/// name the same host cluster.
pub fn alias_cluster(qcow: &Path, from: u64) {
    let (f, cs, _, l1e) = tables(qcow);
    let l2 = l1e & OFFSET_MASK;
    let mut e = [0u8; 8];
    for j in from..cs / 8 - 1 {
        f.read_exact_at(&mut e, l2 + j * 8).expect("L2 entry");
        if u64::from_be_bytes(e) != 0 {
            f.write_all_at(&e, l2 + (j + 1) * 8)
                .expect("write L2 entry");
            return;
        }
    }
    panic!("no allocated cluster past {from}");
}

/// Points L1 entry 0 at a copy of its L2 table appended at the end of the file (after every
/// data cluster); the old table stays behind as garbage.
pub fn move_first_l2_to_end(qcow: &Path) {
    let (f, cs, l1, entry) = tables(qcow);
    let old = entry & OFFSET_MASK;
    assert_ne!(old, 0, "L1 entry 0 has a table");
    let mut table = vec![0u8; cs as usize];
    f.read_exact_at(&mut table, old).expect("L2 table");
    let new = f.metadata().expect("stat").len().div_ceil(cs) * cs;
    f.write_all_at(&table, new).expect("append L2");
    let moved = (entry & !OFFSET_MASK) | new;
    f.write_all_at(&moved.to_be_bytes(), l1)
        .expect("write L1 entry");
}

/// The `user.imgcache.done` record of a `.part` (its complete prefix), if it has one.
pub fn done_record(part: &Path) -> Option<String> {
    let path = std::ffi::CString::new(part.as_os_str().as_encoded_bytes()).ok()?;
    let mut buf = [0u8; 32];
    // SAFETY: NUL-terminated path and name; the buffer is ours, of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.imgcache.done".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT DISK [SIZE]` (no size: the backing file's).
pub fn overlay_of(disk: &Path, backing: &str, backing_fmt: &str, size: &str) {
    let disk = disk.to_str().unwrap();
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
        disk,
    ];
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img(&args);
}
