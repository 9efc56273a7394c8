//! Size arguments as operators write them for flavors: `20G`, `20GiB`, `512M`, `1T`, bytes.
//! Units are binary (like qemu-img and Nova's flavor GiB/MiB).

use crate::error::UsageError;

/// Parses `N`, `N[KMGT]`, or `N[KMGT]iB` into bytes.
pub fn parse(what: &str, s: &str) -> Result<u64, UsageError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = |why: &str| {
        UsageError(format!(
            "invalid {what} {s:?}: {why}; use bytes or a binary unit, e.g. 512M, 20G, 20GiB"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad("no number"))?;
    let shift = match unit {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        "KB" | "MB" | "GB" | "TB" => return Err(bad("decimal units are ambiguous")),
        _ => return Err(bad("unknown unit")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| bad("too large"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flavor_sizes() {
        assert_eq!(parse("size", "0").unwrap(), 0);
        assert_eq!(parse("size", "4096").unwrap(), 4096);
        assert_eq!(parse("size", "512M").unwrap(), 512 << 20);
        assert_eq!(parse("size", "20G").unwrap(), 20 << 30);
        assert_eq!(parse("size", "20GiB").unwrap(), 20 << 30);
        assert_eq!(parse("size", "1T").unwrap(), 1 << 40);
    }

    #[test]
    fn rejects_bad_sizes() {
        for s in ["", "G", "-1G", "1.5G", "20GB", "3X", "99999999999T"] {
            let e = parse("size", s).unwrap_err().to_string();
            assert!(e.starts_with("invalid size"), "{s}: {e}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(123), "123 B");
        assert_eq!(human(20 << 30), "20 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
