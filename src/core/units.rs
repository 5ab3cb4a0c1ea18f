//! Durations and sizes as people write them in config files ("24h", "1MiB").

use std::time::Duration;

/// The longest duration a config may give: a hundred years. Record times are milliseconds
/// since 1970 in an `i64`; a longer TTL would overflow them.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000); // 100 × 365.25 days

/// Parses a duration such as `30s`, `24h`, `1h 30m` or `500ms`, at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"24h\""))?;
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is longer than 100 years"));
    }
    Ok(d)
}

/// Parses a size such as `1MiB`, `512KiB`, `10MB` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => {
            return Err(format!("invalid size {s:?}; write e.g. \"1MiB\", \"64KiB\" or a number of bytes"));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_bytes))
        .ok_or_else(|| format!("invalid size {s:?}; write e.g. \"1MiB\", \"64KiB\" or a number of bytes"))
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("24x").unwrap_err().contains("24x"));
        assert!(parse_duration("100y").is_ok());
        assert!(parse_duration("9000y").unwrap_err().contains("longer than 100 years"), "a fuzz finding");
        assert!(parse_duration("300000000y").is_err(), "a fuzz finding");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64 KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
