//! Timestamps as the published formats spell them: RFC 3339 in UTC to the
//! second (`YYYY-MM-DDTHH:MM:SSZ`), as OCI image configs, archives and job
//! records carry them. Base layer: knows nothing else of ours.

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
}
