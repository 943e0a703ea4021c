//! Wall-clock helpers. Leases of a running server use the monotonic clock (tokio's `Instant`);
//! the wall clock is only used where a value must outlive the process (the journal, the index
//! start, the SOA serial).

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

/// Longest duration any flag takes (30 days).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// The one duration syntax of every flag and query parameter: a number (fractions allowed)
/// and a unit `ms`, `s`, `m`, `h` or `d`; a bare number is seconds (`0` is zero). Negative,
/// non-finite and longer than [`MAX_DURATION`] are refused with a sentence.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let secs = parse_secs(s)?;
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("{s:?} is longer than 30 days"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// [`parse_duration`] without the upper bound, in seconds (for waits that are capped, not
/// refused, when too long).
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration: use e.g. 500ms, 30s, 2m, 1h or 1d");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        u => {
            return Err(format!(
                "{s:?} has an unknown unit {u:?}: use ms, s, m, h or d (e.g. 30s)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad());
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn one_syntax_for_every_duration() {
        for (s, d) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(172_800)),
            ("15", Duration::from_secs(15)),
            ("0", Duration::ZERO),
            (" 6s ", Duration::from_secs(6)),
        ] {
            assert_eq!(parse_duration(s).unwrap(), d, "{s}");
        }
        for bad in ["abc", "", "10x", "-1s", "s", "1e9999", "31d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
    }
}
