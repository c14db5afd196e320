//! Durations as they appear in `config.yaml`.
//!
//! Upstream the file is converted to protobuf JSON, so durations are written Go-style
//! (`3600s`, `1h30m`, `1.5h`, `300ms`). People also write humantime forms (`1h 30m`, `2 days`),
//! which cost nothing to accept. Serialization always emits the protobuf JSON form (`3600s`),
//! which both agentk and this parser read back.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses a duration written Go-style (`1h30m`, `0.5s`, `300ms`) or in a humantime format.
///
/// Negative durations are refused: every duration in the file is a timeout.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty duration".to_owned());
    }
    if trimmed.starts_with('-') {
        return Err(format!("negative duration {trimmed:?} is not allowed"));
    }
    if let Some(d) = parse_go(trimmed) {
        return Ok(d);
    }
    humantime::parse_duration(trimmed).map_err(|e| {
        format!(
            "invalid duration {trimmed:?} ({e}); use e.g. \"3600s\", \"1h\", \"10m\", \"1h30m\""
        )
    })
}

/// Formats a duration the way protobuf JSON does: seconds with an `s` suffix, with a fraction
/// only when needed (`3600s`, `1.5s`).
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{secs}s")
    } else {
        let frac = format!("{nanos:09}");
        format!("{secs}.{}s", frac.trim_end_matches('0'))
    }
}

/// Go's `time.ParseDuration` grammar without the sign: one or more `<decimal><unit>` groups.
/// A bare `0` is also valid, as in Go. Returns `None` when the text is not in that grammar, so
/// the caller can try humantime.
fn parse_go(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let mut rest = text;
    let mut total_nanos: u128 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(num_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after_unit) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            _ => return None,
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut nanos = whole.checked_mul(unit_nanos)?;
        // Fractions are scaled digit by digit so `0.1h` is exact rather than a float rounding.
        let mut scale = unit_nanos;
        for digit in frac.chars() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            let d = u128::from(digit.to_digit(10)?);
            nanos = nanos.checked_add(d * scale)?;
        }
        total_nanos = total_nanos.checked_add(nanos)?;
        rest = after_unit;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).ok()?;
    let sub = u32::try_from(total_nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

/// `#[serde(with = "crate::duration::serde_go")]` for `Duration` fields.
pub(crate) mod serde_go {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_and_humantime_forms() {
        let cases: &[(&str, Duration)] = &[
            ("3600s", Duration::from_secs(3600)),
            ("1h", Duration::from_secs(3600)),
            ("10m", Duration::from_secs(600)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("0.5s", Duration::from_millis(500)),
            ("300ms", Duration::from_millis(300)),
            ("1m0.25s", Duration::from_millis(60_250)),
            ("10us", Duration::from_micros(10)),
            ("0", Duration::ZERO),
            ("1h 30m", Duration::from_secs(5400)),
            ("2days", Duration::from_secs(2 * 86_400)),
            ("5 minutes", Duration::from_secs(300)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn bad_forms() {
        for text in ["", "abc", "-1h", "1x", "h", "1..5s", "."] {
            assert!(parse_duration(text).is_err(), "{text:?} should be refused");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_secs(3600),
            Duration::from_millis(1500),
            Duration::from_nanos(1),
            Duration::ZERO,
        ] {
            let text = format_duration(d);
            assert_eq!(parse_duration(&text), Ok(d), "{text}");
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "3600s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }
}
