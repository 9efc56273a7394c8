//! Giving the source's converted bytes back to the filesystem while the conversion runs, so a
//! conversion inside the download needs about the raw image's space, not the qcow2's and the
//! raw's together: once a data cluster (or a compressed cluster's bytes) is read, the whole 4 KiB
//! blocks it covers are punched out of the source file (`FALLOC_FL_PUNCH_HOLE`), within the range
//! the caller allows. Every read checks the released spans first: a layout that needs some bytes
//! twice (two L2 entries naming one cluster, a table inside a data cluster) stops the conversion
//! with [`Error::Released`] instead of reading the zeros the hole now holds.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;

use super::{Error, Growing};

/// Holes are punched in whole filesystem blocks.
const BLOCK: u64 = 4096;
/// Contiguous releases are punched together, at most this much at a time.
const BATCH: u64 = 16 << 20;
/// Past this many separate released spans, nothing more is released (the check stays).
const MAX_SPANS: usize = 1 << 20;

/// What was released, and what may be.
pub struct Released {
    allowed: Range<u64>,
    /// Released spans, start → end, disjoint and merged (the pending one included).
    spans: BTreeMap<u64, u64>,
    /// Recorded, not punched yet.
    pending: Option<(u64, u64)>,
    /// None until the first release asks the caller; then whether it agreed.
    agreed: Option<bool>,
    pub total: u64,
}

impl Released {
    pub fn new(allowed: Range<u64>) -> Released {
        Released {
            allowed,
            spans: BTreeMap::new(),
            pending: None,
            agreed: None,
            total: 0,
        }
    }

    /// True if any byte of `start..end` was released.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.spans
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// Fails a read of `start..end` that needs released bytes.
    pub fn check(&self, start: u64, end: u64) -> Result<(), Error> {
        if self.overlaps(start, end) {
            return Err(Error::Released(format!(
                "bytes {start}..{end} are needed again after they were released"
            )));
        }
        Ok(())
    }

    /// Releases the whole blocks of `start..end` (bytes just read) that lie in the allowed range.
    pub fn release(
        &mut self,
        src: &File,
        grow: &dyn Growing,
        start: u64,
        end: u64,
    ) -> Result<(), Error> {
        let from = start.max(self.allowed.start).div_ceil(BLOCK) * BLOCK;
        let to = end.min(self.allowed.end) / BLOCK * BLOCK;
        if from >= to || self.spans.len() >= MAX_SPANS {
            return Ok(());
        }
        if *self.agreed.get_or_insert_with(|| grow.releasing()) {
            self.record(from, to);
            match &mut self.pending {
                Some((s, e)) if *e == from && to - *s <= BATCH => *e = to,
                _ => {
                    self.flush(src, grow)?;
                    self.pending = Some((from, to));
                }
            }
            if self.pending.is_some_and(|(s, e)| e - s >= BATCH) {
                self.flush(src, grow)?;
            }
        }
        Ok(())
    }

    fn record(&mut self, mut from: u64, mut to: u64) {
        if let Some((&s, &e)) = self.spans.range(..=from).next_back()
            && e >= from
        {
            from = s;
            to = to.max(e);
            self.spans.remove(&s);
        }
        while let Some((&s, &e)) = self.spans.range(from..=to).next() {
            to = to.max(e);
            self.spans.remove(&s);
        }
        self.spans.insert(from, to);
    }

    /// Punches what is pending.
    pub fn flush(&mut self, src: &File, grow: &dyn Growing) -> Result<(), Error> {
        let Some((from, to)) = self.pending.take() else {
            return Ok(());
        };
        if grow.punch(src, from, to)? {
            self.total += to - from;
        }
        Ok(())
    }
}

/// Punches `from..to` out of `src`; a filesystem without holes keeps the bytes (nothing is
/// lost, only space).
pub fn punch_hole(src: &File, from: u64, to: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return Ok(());
    };
    // SAFETY: fallocate on a descriptor we hold; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            src.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Yes;
    impl Growing for Yes {
        fn wait_for(&self, end: u64) -> Result<u64, Error> {
            Ok(end)
        }
        fn releasing(&self) -> bool {
            true
        }
    }

    #[test]
    fn spans_merge_and_overlaps_are_seen() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let mut r = Released::new(4096..(1 << 20));
        // Not whole blocks, or outside the allowed range: nothing released.
        r.release(&f, &Yes, 0, 6000).unwrap();
        assert!(!r.overlaps(0, 8192));
        r.release(&f, &Yes, 8192, 16384).unwrap();
        // Only the whole block 16384..20480 of this one.
        r.release(&f, &Yes, 16384, 20580).unwrap();
        r.release(&f, &Yes, 40960, 45056).unwrap();
        assert!(r.overlaps(8192, 8193));
        assert!(r.overlaps(16000, 16400));
        assert!(!r.overlaps(20480, 40960));
        assert!(r.overlaps(40000, 41000));
        assert!(r.check(20480, 40960).is_ok());
        assert!(matches!(r.check(0, 9000), Err(Error::Released(_))));
        r.release(&f, &Yes, 20480, 40960).unwrap();
        assert_eq!(r.spans.len(), 1, "{:?}", r.spans);
        r.flush(&f, &Yes).unwrap();
        assert!(r.total > 0);
    }
}
