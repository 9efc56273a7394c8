//! Prune's decisions, as pure functions of what the scan saw and the clock: which age limit an
//! entry has, whether it is old enough, whether it is still old under its lock, and the order of
//! the size pass. No I/O here, so each rule has a unit test.

use std::time::{Duration, SystemTime};

use crate::scan::EntryType;

/// The age limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Ages {
    /// Original images, kernels, ramdisks (`--min-age`).
    pub original: Duration,
    /// Resized variants and templates (`--min-age-resized`).
    pub resized: Duration,
}

impl Ages {
    /// The limit for an entry of this type (Nova's two ages).
    pub fn for_type(&self, kind: EntryType) -> Duration {
        match kind {
            EntryType::Image | EntryType::Kernel | EntryType::Ramdisk => self.original,
            EntryType::Resized | EntryType::Ephemeral | EntryType::Swap => self.resized,
        }
    }
}

/// What the age pass decides for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    InUse,
    /// Unused, but used more recently than the limit.
    TooYoung,
    /// Unused for at least the limit: remove it (if it is still so under its lock).
    Expired,
}

/// The age pass on one entry.
pub fn verdict(in_use: bool, idle: Duration, min_age: Duration) -> Verdict {
    if in_use {
        Verdict::InUse
    } else if idle < min_age {
        Verdict::TooYoung
    } else {
        Verdict::Expired
    }
}

/// Under the entry's lock: it may go only if its mtime is older than *scan start − min age*
/// (and than now). A `create` touches a base after making a disk from it, so a disk the usage
/// scan missed always leaves its base newer than the scan start.
pub fn still_old(
    mtime: SystemTime,
    scan_start: SystemTime,
    now: SystemTime,
    min_age: Duration,
) -> bool {
    let deadline = scan_start
        .checked_sub(min_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    mtime < deadline.min(now)
}

/// One entry left after the age pass, as the size pass sees it.
#[derive(Debug, Clone, Copy)]
pub struct Survivor {
    pub allocated: u64,
    pub mtime: SystemTime,
    pub in_use: bool,
}

/// The size pass's candidates: indices of the unused survivors, least recently used first.
pub fn lru_order(survivors: &[Survivor]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..survivors.len())
        .filter(|&i| !survivors[i].in_use)
        .collect();
    order.sort_by_key(|&i| survivors[i].mtime);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn in_use_wins_over_age() {
        assert_eq!(verdict(true, 100 * H, H), Verdict::InUse);
        assert_eq!(verdict(false, H / 2, H), Verdict::TooYoung);
        assert_eq!(verdict(false, H, H), Verdict::Expired);
    }

    #[test]
    fn templates_and_resized_use_the_short_age() {
        let ages = Ages {
            original: 24 * H,
            resized: H,
        };
        assert_eq!(ages.for_type(EntryType::Image), 24 * H);
        assert_eq!(ages.for_type(EntryType::Kernel), 24 * H);
        assert_eq!(ages.for_type(EntryType::Swap), H);
        assert_eq!(ages.for_type(EntryType::Resized), H);
    }

    #[test]
    fn an_entry_touched_after_the_scan_began_stays() {
        let start = SystemTime::UNIX_EPOCH + 1000 * H;
        let now = start + H;
        assert!(still_old(start - 3 * H, start, now, 2 * H));
        assert!(!still_old(start - H, start, now, 2 * H));
        // Touched after the scan started: never old, even with no minimum age.
        assert!(!still_old(
            start + Duration::from_secs(1),
            start,
            now,
            Duration::ZERO
        ));
        assert!(!still_old(now + H, start, now, Duration::ZERO));
    }

    #[test]
    fn lru_skips_entries_in_use() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let s = [
            Survivor {
                allocated: 1,
                mtime: t(30),
                in_use: false,
            },
            Survivor {
                allocated: 1,
                mtime: t(10),
                in_use: true,
            },
            Survivor {
                allocated: 1,
                mtime: t(20),
                in_use: false,
            },
        ];
        assert_eq!(lru_order(&s), vec![2, 0]);
    }
}
