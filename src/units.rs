//! Sizes (`512MiB`, `1.5GB`) and durations (`1h30m`, `7d`) as people
//! write them in config files, flags and filters: one grammar, so that every
//! setting reads them alike. Plain functions of text; the checkpoint filter
//! reuses the scanners to point at the column of a bad value.

use std::time::Duration;

/// The most digits after a decimal point in a size: enough for any real
/// input, and few enough that the exact arithmetic fits in a u128.
const MAX_FRACTION_DIGITS: usize = 18;

const SIZE_UNITS: &str = "B, KB, MB, GB or TB (or KiB, MiB, GiB, TiB)";
const DURATION_UNITS: &str = "w, d, h, m or s";

/// A problem in a size or duration, at a character offset into its text.
pub(crate) struct ValueError {
    pub(crate) offset: usize,
    pub(crate) message: String,
}

impl ValueError {
    fn at(offset: usize, message: String) -> ValueError {
        ValueError { offset, message }
    }
}

fn describe_text(chars: &[char]) -> String {
    if chars.is_empty() {
        "end of input".to_owned()
    } else {
        format!("{:?}", chars.iter().collect::<String>())
    }
}

/// 1.5 MB, 320 B: powers of 1024, one decimal.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses sizes such as `512`, `10KB`, `100MB`, `1.5GB`, `2TiB`. Units are
/// powers of 1024 whatever their spelling (`G`, `GB` and `GiB` alike, as
/// every size setting and flag reads them), case-insensitive; a fraction is rounded
/// down to whole bytes. Surrounding white space is ignored.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let chars: Vec<char> = text.trim().chars().collect();
    scan_size(&chars).map_err(|e| format!("invalid size {text:?}: {}", e.message))
}

/// Parses durations such as `90s`, `30m`, `24h`, `7d`, `2w` and
/// combinations from the largest unit down (`1h30m`, `1w2d`), in whole
/// seconds. Zero (`0s`) is accepted; callers that need more say so.
/// Surrounding white space is ignored.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let chars: Vec<char> = text.trim().chars().collect();
    scan_duration(&chars)
        .map(Duration::from_secs)
        .map_err(|e| format!("invalid duration {text:?}: {}", e.message))
}

fn count_digits(chars: &[char]) -> usize {
    chars.iter().take_while(|c| c.is_ascii_digit()).count()
}

/// [`parse_size`] of untrimmed characters, the error at an offset into them.
pub(crate) fn scan_size(chars: &[char]) -> Result<u64, ValueError> {
    let text = describe_text(chars);
    let too_large = || {
        ValueError::at(
            0,
            format!("expected a size of at most {} bytes (16EiB), found {text}", u64::MAX),
        )
    };
    let int_len = count_digits(chars);
    if int_len == 0 {
        return Err(ValueError::at(
            0,
            format!("expected a size such as 100MB, found {text}"),
        ));
    }
    let mut pos = int_len;
    let mut fraction: &[char] = &[];
    if chars.get(pos) == Some(&'.') {
        let start = pos + 1;
        let len = count_digits(&chars[start..]);
        if len == 0 {
            return Err(ValueError::at(
                start,
                format!("expected a digit after '.', found {}", describe_text(&chars[start..])),
            ));
        }
        if len > MAX_FRACTION_DIGITS {
            return Err(ValueError::at(
                start,
                format!("expected at most {MAX_FRACTION_DIGITS} digits after '.', found {len}"),
            ));
        }
        fraction = &chars[start..start + len];
        pos = start + len;
    }
    let unit: String = chars[pos..].iter().collect();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(ValueError::at(
                pos,
                format!("expected a unit {SIZE_UNITS}, found {unit:?}"),
            ))
        }
    };
    if shift == 0 && fraction.iter().any(|&c| c != '0') {
        return Err(ValueError::at(
            0,
            format!("expected a whole number of bytes, found {text}"),
        ));
    }
    // Exact in integers: (int * 10^k + fraction) * 2^shift / 10^k. The
    // digits are ASCII digits, so to_digit cannot fail.
    let mut scaled: u128 = 0;
    for c in chars[..int_len].iter().chain(fraction) {
        scaled = scaled
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(c.to_digit(10).unwrap_or(0))))
            .ok_or_else(too_large)?;
    }
    let denominator = 10u128.pow(fraction.len() as u32);
    let bytes = scaled.checked_mul(1u128 << shift).ok_or_else(too_large)? / denominator;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// [`parse_duration`] of untrimmed characters, the error at an offset into them.
pub(crate) fn scan_duration(chars: &[char]) -> Result<u64, ValueError> {
    let text = describe_text(chars);
    let too_large = || ValueError::at(0, format!("expected a duration of at most {}s, found {text}", u64::MAX));
    if count_digits(chars) == 0 {
        return Err(ValueError::at(
            0,
            format!("expected a duration such as 24h or 1h30m, found {text}"),
        ));
    }
    let mut total: u64 = 0;
    let mut previous: Option<(u64, String)> = None;
    let mut pos = 0;
    // Each round reads one `<digits><unit>`; the unit runs up to the next
    // digit, so every round after the first starts on a digit.
    while pos < chars.len() {
        let digits = &chars[pos..pos + count_digits(&chars[pos..])];
        let number = digits
            .iter()
            .try_fold(0u64, |n, c| n.checked_mul(10)?.checked_add(u64::from(c.to_digit(10)?)))
            .ok_or_else(too_large)?;
        let number_text: String = digits.iter().collect();
        pos += digits.len();
        let unit_start = pos;
        while chars.get(pos).is_some_and(|c| !c.is_ascii_digit()) {
            pos += 1;
        }
        let unit: String = chars[unit_start..pos].iter().collect();
        let unit_secs = match unit.to_ascii_lowercase().as_str() {
            "w" => 604_800,
            "d" => 86_400,
            "h" => 3_600,
            "m" => 60,
            "s" => 1,
            "" => {
                return Err(ValueError::at(
                    unit_start,
                    format!("expected a unit ({DURATION_UNITS}) after {number_text}, found end of input"),
                ))
            }
            _ if unit.starts_with('.') => {
                return Err(ValueError::at(
                    unit_start,
                    format!(
                        "expected a unit ({DURATION_UNITS}) after {number_text}, found '.'; \
                         fractions are not supported, write 1h30m rather than 1.5h"
                    ),
                ))
            }
            _ => {
                return Err(ValueError::at(
                    unit_start,
                    format!("expected a unit ({DURATION_UNITS}) after {number_text}, found {unit:?}"),
                ))
            }
        };
        if let Some((previous_secs, previous_unit)) = &previous {
            if unit_secs >= *previous_secs {
                return Err(ValueError::at(
                    unit_start,
                    format!(
                        "expected units from largest to smallest, each at most once, found {unit:?} after {previous_unit:?}"
                    ),
                ));
            }
        }
        total = number
            .checked_mul(unit_secs)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(too_large)?;
        previous = Some((unit_secs, unit));
    }
    Ok(total)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_units_and_fractions() {
        for (text, bytes) in [
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("10KB", 10 << 10),
            ("10kb", 10 << 10),
            ("10K", 10 << 10),
            ("100MB", 100 << 20),
            ("100MiB", 100 << 20),
            ("1.5GB", 3 << 29),
            ("1.5gib", 3 << 29),
            ("2TB", 2 << 40),
            ("2TiB", 2 << 40),
            ("0.5KB", 512),
            ("0.1KB", 102),
            ("1.0B", 1),
            (" 4GB ", 4 << 30),
            ("18446744073709551615", u64::MAX),
            ("16777215TB", 16_777_215 << 40),
            ("0.000000000000000001TB", 0),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn parse_size_refuses_nonsense_and_overflow() {
        for (text, reason) in [
            ("", "found end of input"),
            ("MB", "expected a size such as 100MB"),
            ("-1", "expected a size such as 100MB"),
            ("1.", "expected a digit after '.'"),
            (".5GB", "expected a size such as 100MB"),
            ("1.5", "whole number of bytes"),
            ("1 GB", "found \" GB\""),
            ("10XB", "found \"XB\""),
            ("1PB", "found \"PB\""),
            ("1.2.3GB", "found \".3GB\""),
            ("18446744073709551616", "at most 18446744073709551615 bytes"),
            ("16777216TB", "at most"),
            ("99999999999999999999999999999999999999999999999999", "at most"),
            ("1.0000000000000000001KB", "at most 18 digits after '.'"),
        ] {
            let err = parse_size(text).expect_err(text);
            assert!(err.starts_with(&format!("invalid size {text:?}: ")), "{err}");
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn parse_duration_accepts_units_and_combinations() {
        for (text, secs) in [
            ("0s", 0),
            ("90s", 90),
            ("30m", 1800),
            ("24h", 86_400),
            ("24H", 86_400),
            ("7d", 604_800),
            ("2w", 1_209_600),
            ("1h30m", 5400),
            ("1w2d3h4m5s", 604_800 + 2 * 86_400 + 3 * 3600 + 4 * 60 + 5),
            ("1d1s", 86_401),
            ("100m", 6000),
            (" 5m ", 300),
            ("18446744073709551615s", u64::MAX),
        ] {
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(secs)), "{text}");
        }
    }

    #[test]
    fn parse_duration_refuses_nonsense_and_overflow() {
        for (text, reason) in [
            ("", "found end of input"),
            ("24", "after 24, found end of input"),
            ("h", "such as 24h"),
            ("-1h", "such as 24h"),
            ("1y", "found \"y\""),
            ("1ms", "found \"ms\""),
            ("1h 30m", "found \"h \""),
            ("1.5h", "rather than 1.5h"),
            ("30m1h", "largest to smallest"),
            ("1h1h", "largest to smallest"),
            ("18446744073709551616s", "at most 18446744073709551615s"),
            ("30500568904944w", "at most"),
            ("30500568904943w6d", "at most"),
            ("99999999999999999999999999999999999999999999w", "at most"),
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.starts_with(&format!("invalid duration {text:?}: ")), "{err}");
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }
}
