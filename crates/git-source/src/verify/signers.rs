//! An allowed-signers file judged at kas's clock.
//!
//! Git checks an allowed signer's `valid-after`/`valid-before` against the commit's committer
//! date, which whoever signs chooses: a key retired with `valid-before` still had its commits
//! used once they were backdated (E14). Before each check kas writes a copy of the project's
//! file in which a line whose validity does not cover kas's current time is left out and the
//! validity options of the others are dropped, so the key's validity is judged at the moment
//! kas decides, as for an expired OpenPGP key.

use std::time::SystemTime;

/// The file as judged at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Judged {
    /// The lines valid now, without their validity options.
    pub text: String,
    /// The lines left out, as "principal (valid before T)", for the refusal's message.
    pub out_of_date: Vec<String>,
}

/// Judges the allowed-signers `text` at `now`. A line kas cannot read is kept as written (git
/// judges it, and refuses what it cannot read).
pub(crate) fn judge(text: &str, now: SystemTime) -> Judged {
    let mut judged = Judged {
        text: String::new(),
        out_of_date: Vec::new(),
    };
    for line in text.lines() {
        match judge_line(line, now) {
            Line::Keep(kept) => {
                judged.text.push_str(&kept);
                judged.text.push('\n');
            }
            Line::OutOfDate(why) => judged.out_of_date.push(why),
        }
    }
    judged
}

enum Line {
    Keep(String),
    OutOfDate(String),
}

fn judge_line(line: &str, now: SystemTime) -> Line {
    let keep = || Line::Keep(line.to_owned());
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return keep();
    }
    let tokens = split_outside_quotes(trimmed, |c| c == ' ' || c == '\t');
    let [principals, options, rest @ ..] = tokens.as_slice() else {
        return keep();
    };
    // Without options the second field is the key's type.
    if rest.is_empty() || is_key_type(options) {
        return keep();
    }
    let mut kept_options = Vec::new();
    for option in split_outside_quotes(options, |c| c == ',') {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), v.trim_matches('"').to_owned()),
            None => (option.to_ascii_lowercase(), String::new()),
        };
        let bound = match name.as_str() {
            "valid-after" | "valid-before" => match parse_time(&value) {
                Some(t) => t,
                None => return keep(),
            },
            _ => {
                kept_options.push(option);
                continue;
            }
        };
        let outside = if name == "valid-after" {
            now < bound
        } else {
            now >= bound
        };
        if outside {
            let when = humantime::format_rfc3339_seconds(bound);
            let which = if name == "valid-after" {
                "after"
            } else {
                "before"
            };
            return Line::OutOfDate(format!("{principals} (valid {which} {when})"));
        }
    }
    let mut fields = vec![principals.clone()];
    if !kept_options.is_empty() {
        fields.push(kept_options.join(","));
    }
    fields.extend(rest.iter().cloned());
    Line::Keep(fields.join(" "))
}

fn is_key_type(field: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-", "rsa-sha2-"]
        .iter()
        .any(|p| field.starts_with(p))
}

/// `s` split at each `sep` outside double quotes, empty pieces dropped.
fn split_outside_quotes(s: &str, sep: impl Fn(char) -> bool) -> Vec<String> {
    let (mut out, mut current, mut quoted) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && sep(c) {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// `YYYYMMDD[HHMM[SS]][Z]`, as ssh-keygen reads it; taken as UTC with or without the `Z`
/// (ssh-keygen reads a time without it in the system's zone, which is UTC where kas runs).
fn parse_time(s: &str) -> Option<SystemTime> {
    let digits = s.strip_suffix(['Z', 'z']).unwrap_or(s);
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let part = |r: std::ops::Range<usize>| digits.get(r).unwrap_or("00");
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        part(0..4),
        part(4..6),
        part(6..8),
        part(8..10),
        part(10..12),
        part(12..14)
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOV_1: u64 = 1_793_491_200; // 2026-11-01T00:00:00Z
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample";

    #[test]
    fn a_line_is_kept_without_its_validity_while_valid_and_left_out_otherwise() {
        let text = format!(
            "# team keys\nold@example.com valid-before=\"20261101000000Z\" {KEY} old\nnew@example.com namespaces=\"git\",valid-after=\"20261101\" {KEY}\nplain@example.com {KEY}\n"
        );
        let before = judge(&text, at(NOV_1 - 1));
        assert_eq!(
            before.text,
            format!("# team keys\nold@example.com {KEY} old\nplain@example.com {KEY}\n")
        );
        assert_eq!(
            before.out_of_date,
            ["new@example.com (valid after 2026-11-01T00:00:00Z)"]
        );
        let after = judge(&text, at(NOV_1));
        assert_eq!(
            after.text,
            format!(
                "# team keys\nnew@example.com namespaces=\"git\" {KEY}\nplain@example.com {KEY}\n"
            )
        );
        assert_eq!(
            after.out_of_date,
            ["old@example.com (valid before 2026-11-01T00:00:00Z)"]
        );
    }

    #[test]
    fn lines_kas_cannot_read_are_left_to_git() {
        let text = format!("x@example.com valid-before=\"tomorrow\" {KEY}\nlonely\n");
        assert_eq!(judge(&text, at(NOV_1)).text, text);
    }

    #[test]
    fn times_are_read_as_ssh_keygen_writes_them() {
        assert_eq!(parse_time("20261101"), Some(at(NOV_1)));
        assert_eq!(parse_time("202611010130"), Some(at(NOV_1 + 5400)));
        assert_eq!(parse_time("20261101013005Z"), Some(at(NOV_1 + 5405)));
        assert_eq!(parse_time("2026110"), None);
        assert_eq!(parse_time("20261301"), None);
    }
}
