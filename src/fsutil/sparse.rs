//! Sparse writes: an all-zero filesystem block (ext4, XFS: 4 KiB) of what is written into a
//! range that holds nothing yet is left unwritten, a hole that reads as the zeros it stands for.
//! Used by the download's sink and parallel chunks, and by the qcow2 converter's output.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The filesystem block: the unit holes are left in, aligned to the file's offsets.
pub const BLOCK: u64 = 4096;

static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// True if every byte of `b` (at most a block) is zero: one `memcmp` against zeros, which
/// stops at the first data byte and runs at memory speed in every build.
pub fn is_zero_block(b: &[u8]) -> bool {
    ZEROS.get(..b.len()).is_some_and(|z| z == b)
}

/// Writes `buf` at `pos` with positional writes (the cursor is not used, so several threads
/// can share the descriptor), leaving its all-zero blocks unwritten: the range must hold
/// nothing yet. Runs of data blocks are one write.
pub fn write_sparse_at(file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        let at = pos + i as u64;
        let end = (i + (BLOCK - at % BLOCK) as usize).min(buf.len());
        let zero = is_zero_block(&buf[i..end]);
        match (run, zero) {
            (None, false) => run = Some(i),
            (Some(from), true) => {
                file.write_all_at(&buf[from..i], pos + from as u64)?;
                run = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(from) = run {
        file.write_all_at(&buf[from..], pos + from as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn positional_writes_in_any_order_leave_zero_blocks_as_holes() {
        let mut data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
        data[(1 << 20)..(2 << 20) + 100].fill(0);
        let f = tempfile::tempfile().unwrap();
        f.set_len(data.len() as u64).unwrap();
        // Unaligned pieces, last first.
        let cuts = [0usize, 5000, (1 << 20) + 17, (2 << 20) + 4099, data.len()];
        for w in cuts.windows(2).rev() {
            write_sparse_at(&f, &data[w[0]..w[1]], w[0] as u64).unwrap();
        }
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        assert!(f.metadata().unwrap().blocks() * 512 <= (2 << 20) + (64 << 10));
    }

    #[test]
    fn is_zero_sees_a_single_byte_anywhere() {
        let mut b = vec![0u8; 4096];
        assert!(is_zero_block(&b));
        for at in [0, 63, 64, 4095] {
            b[at] = 1;
            assert!(!is_zero_block(&b), "{at}");
            b[at] = 0;
        }
        assert!(is_zero_block(&[]));
    }
}
