//! Units as operators write them and read them: sizes (`20G`, `512MiB`, binary like qemu-img and
//! Nova's flavors), durations (`90s`, `10m`, `2h`, clap value parsers), idle times (`3d 4h`), and
//! wall-clock time (unix seconds, RFC 3339). Ground floor: only [`crate::error`] below it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::UsageError;

/// Parses `N`, `N[KMGT]`, or `N[KMGT]iB` into bytes.
pub fn parse_size(what: &str, s: &str) -> Result<u64, UsageError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = |why: &str| {
        UsageError(format!(
            "invalid {what} {s:?}: {why}; use bytes or a binary unit, e.g. 512M, 20G, 20GiB"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad("no number"))?;
    if unit.starts_with(['.', ',']) {
        return Err(bad(
            "sizes are whole numbers (1.5G is not one; write 1536M)",
        ));
    }
    let shift = match unit {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        "KB" | "MB" | "GB" | "TB" => return Err(bad("decimal units are ambiguous")),
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| bad("too large"))
}

/// Space to keep free on a filesystem: bytes, or a percentage of its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Bytes(u64),
    Percent(u64),
}

impl Reserve {
    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => (total as u128 * p as u128 / 100) as u64,
        }
    }
}

/// Parses `5%` or a size (`20G`).
pub fn parse_reserve(what: &str, s: &str) -> Result<Reserve, UsageError> {
    let t = s.trim();
    match t.strip_suffix('%') {
        Some(p) => match p.trim().parse::<u64>() {
            Ok(p) if p <= 100 => Ok(Reserve::Percent(p)),
            _ => Err(UsageError(format!(
                "invalid {what} {s:?}: a percentage is a whole number from 0 to 100, e.g. 5%"
            ))),
        },
        None => parse_size(what, t).map(Reserve::Bytes),
    }
}

/// Formats bytes for people: `20 GiB`, `512 MiB`, `1.5 GiB`, `123 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Parses `90`, `90s`, `500ms`, `10m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 30s, 10m, 2h"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(secs)
        .filter(|&total| total <= MAX_DURATION_SECS)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long; the most is 100 years"))
}

/// Longest duration accepted: deadlines are computed as now + duration, which must not overflow.
const MAX_DURATION_SECS: u64 = 100 * 366 * 86_400;

/// Like [`parse_duration`], but zero is refused (a timeout of 0 would fail every request).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: a timeout must be longer than 0"));
    }
    Ok(d)
}

/// `3d 4h`, `2h 10m`, `45s`.
pub fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A waited time as people read it: `250ms`, `2.0s`, `1m 30s` (never `2.000168618s`).
pub fn round_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", d.as_secs_f64()),
        _ => {
            let s = d.as_secs();
            if s < 3600 {
                format!("{}m {}s", s / 60, s % 60)
            } else {
                ago(d)
            }
        }
    }
}

/// Seconds since the epoch, now (0 on a clock before 1970).
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// Seconds since the epoch of `t` (0 before 1970).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Time elapsed from `then` to `now` (zero if `then` is in the future).
pub fn idle(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

/// Now as seconds since the epoch and as an RFC 3339 UTC string.
pub fn now_stamp() -> (u64, String) {
    let secs = unix_now();
    (secs, rfc3339(secs))
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), as in Howard Hinnant's date algorithms.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flavor_sizes() {
        assert_eq!(parse_size("size", "0").unwrap(), 0);
        assert_eq!(parse_size("size", "4096").unwrap(), 4096);
        assert_eq!(parse_size("size", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("size", "20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("size", "20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("size", "1T").unwrap(), 1 << 40);
    }

    #[test]
    fn rejects_bad_sizes() {
        let e = parse_size("--size", "1.5G").unwrap_err().0;
        assert!(e.contains("whole numbers") && e.contains("1536M"), "{e}");
        for s in ["", "G", "-1G", "1.5G", "20GB", "3X", "99999999999T"] {
            let e = parse_size("size", s).unwrap_err().to_string();
            assert!(e.starts_with("invalid size"), "{s}: {e}");
        }
    }

    #[test]
    fn reserves() {
        assert_eq!(parse_reserve("r", "5%").unwrap().of(1000), 50);
        assert_eq!(parse_reserve("r", "1M").unwrap().of(10), 1 << 20);
        assert!(parse_reserve("r", "101%").is_err());
        assert!(parse_reserve("r", "x%").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(123), "123 B");
        assert_eq!(human(20 << 30), "20 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("10000000000000000000").is_err());
        assert!(parse_duration("36600d").is_ok());
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("0s").unwrap_err().contains("longer than 0"));
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_307_045), "2026-11-22T00:24:05Z");
    }

    #[test]
    fn waits_are_rounded() {
        assert_eq!(round_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(round_duration(Duration::from_nanos(2_000_168_618)), "2.0s");
        assert_eq!(round_duration(Duration::from_secs(90)), "1m 30s");
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(ago(Duration::from_secs(45)), "45s");
        assert_eq!(ago(Duration::from_secs(600)), "10m");
        assert_eq!(ago(Duration::from_secs(3 * 3600 + 60)), "3h 1m");
        assert_eq!(ago(Duration::from_secs(2 * 86_400 + 7200)), "2d 2h");
    }
}
