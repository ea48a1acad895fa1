//! Times as the published formats spell them: RFC 3339 in UTC to the
//! second (`YYYY-MM-DDTHH:MM:SSZ`), as OCI image configs, archives and job
//! records carry them, and durations as Go's `time.Duration.String()`
//! writes them (`8.72416ms`, `512.3µs`, `2m3.5s`), as the seamless-commit
//! reference's REST answers, metrics and CLI output do. Base layer: knows
//! nothing else of ours.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second RFC 3339's four-digit year can spell.
const LAST: Duration = Duration::from_secs(253_402_300_799);

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`; times before 1970 or past 9999 are
/// clamped to those bounds.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default().min(LAST);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + since).to_string()
}

/// [`rfc3339`] of Unix seconds `unix`.
pub fn rfc3339_of_unix(unix: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64))
}

/// Unix seconds of an RFC 3339 UTC time (what [`rfc3339`] writes; a
/// fraction of a second is dropped); None for any other text.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()
}

/// `d` as Go's `time.Duration.String()` writes it, to the nanosecond:
/// `0s`, `250ns`, `512.3µs`, `8.72416ms`, `1.5s`, `2m3.5s`, `1h0m0s`.
/// Durations past Go's range (about 292 years) keep counting hours.
pub fn go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        // Under a second: the largest unit that keeps an integer part.
        let (unit, scale) = match nanos {
            n if n < 1_000 => return format!("{n}ns"),
            n if n < 1_000_000 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        return format!("{}{unit}", decimal(nanos / scale, nanos % scale, scale));
    }
    let secs = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    let seconds = decimal(secs % 60, frac, 1_000_000_000);
    let minutes = secs / 60;
    if minutes == 0 {
        return format!("{seconds}s");
    }
    if minutes < 60 {
        return format!("{minutes}m{seconds}s");
    }
    format!("{}h{}m{seconds}s", minutes / 60, minutes % 60)
}

/// `whole.fraction` with the fraction (of `scale`) to its last non-zero
/// digit, or `whole` alone.
fn decimal(whole: u128, fraction: u128, scale: u128) -> String {
    if fraction == 0 {
        return whole.to_string();
    }
    let width = scale.ilog10() as usize;
    let digits = format!("{fraction:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Parses a duration as Go's `time.ParseDuration` reads one: a sequence of
/// decimal numbers, each with an optional fraction and a unit (`ns`, `us`,
/// `µs`, `μs`, `ms`, `s`, `m`, `h`), such as `8.72416ms` or `1h2m3.5s`;
/// `0` alone is zero. Negative durations and other text are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 8.72416ms or 2m3.5s");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(bad)?;
        // Each fraction digit is a tenth of the one before; digits past the
        // nanosecond are dropped, as Go does.
        let mut place = scale;
        for digit in fraction.chars() {
            let digit = digit.to_digit(10).ok_or_else(bad)? as u128;
            place /= 10;
            part += digit * place;
        }
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_seconds_round_trip() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_440_645)),
            "2026-11-23T13:30:45Z"
        );
        for unix in [0, 951_868_799, 951_868_800, 1_764_583_872, 4_107_542_400] {
            assert_eq!(parse_rfc3339(&rfc3339_of_unix(unix)), Some(unix), "{unix}");
        }
    }

    #[test]
    fn out_of_range_times_are_clamped_and_other_text_refused() {
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_of_unix(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-12-01 00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn durations_are_written_as_go_writes_them() {
        let ns = Duration::from_nanos;
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (ns(1), "1ns"),
            (ns(999), "999ns"),
            (ns(1_000), "1µs"),
            (ns(512_300), "512.3µs"),
            (ns(22_500), "22.5µs"),
            (ns(8_724_160), "8.72416ms"),
            (ns(22_802_283), "22.802283ms"),
            (ns(1_000_000), "1ms"),
            (ns(1_500_000_000), "1.5s"),
            (Duration::from_millis(58_700), "58.7s"),
            (ns(123_500_000_001), "2m3.500000001s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3600 * 30 + 61), "30h1m1s"),
        ] {
            assert_eq!(go_duration(d), text, "{d:?}");
            assert_eq!(parse_go_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn go_durations_parse_like_go_and_other_text_is_refused() {
        let ns = Duration::from_nanos;
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("1h2m3s4ms5us6ns"), Ok(ns(3_723_004_005_006)));
        assert_eq!(parse_go_duration("512.3μs"), Ok(ns(512_300)), "Greek mu");
        assert_eq!(parse_go_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("+1.0000000019s"), Ok(ns(1_000_000_001)));
        for bad in [
            "",
            "5",
            "-1s",
            "1d",
            "1.2.3s",
            "s",
            ".s",
            "1 s",
            "99999999999999999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
    }
}
