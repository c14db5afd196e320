//! GitLab conventions kas must reproduce exactly, because RBAC rules written for GitLab's agent
//! name the strings they produce.

use sha2::{Digest, Sha256};

use crate::AccessLevel;

/// GitLab's environment slug (`CI_ENVIRONMENT_SLUG`), used in the `ci_job` identity's
/// `gitlab:project_env:<project id>:<slug>` group. ID tokens carry the environment *name*, so kas
/// derives the slug the way GitLab does (`Gitlab::Slug::Environment`):
///
/// - lowercase; every character other than `a-z0-9` becomes `-`;
/// - `env-` is prepended unless it starts with a letter; runs of `-` collapse to one;
/// - if the result differs from the name or is longer than 24 bytes, it is cut to 17 bytes, a
///   `-` is ensured, and a 6-character suffix derived from the name's SHA-256 is appended (so
///   different names that slugify alike stay apart); otherwise a trailing `-` is dropped.
pub fn environment_slug(name: &str) -> String {
    slug_with_suffix(name, || slug_suffix(&hex_sha256(name)))
}

fn slug_with_suffix(name: &str, suffix: impl FnOnce() -> String) -> String {
    let lowered: String = name
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let prefixed = if lowered.starts_with(|c: char| c.is_ascii_lowercase()) {
        lowered
    } else {
        format!("env-{lowered}")
    };
    let mut slug = String::with_capacity(prefixed.len());
    for c in prefixed.chars() {
        if !(c == '-' && slug.ends_with('-')) {
            slug.push(c);
        }
    }
    if slug.len() > 24 || slug != name {
        // Only ASCII is left, so byte slicing is on character boundaries.
        slug.truncate(17);
        if !slug.ends_with('-') {
            slug.push('-');
        }
        slug.push_str(&suffix());
        slug
    } else {
        slug.trim_end_matches('-').to_owned()
    }
}

fn hex_sha256(name: &str) -> String {
    Sha256::digest(name.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The last 6 base-36 digits of a hex number, as Ruby's `hex.to_i(16).to_s(36).last(6)`.
/// Only the value modulo 36⁶ matters, so it is reduced digit by digit instead of with a
/// 256-bit integer.
fn slug_suffix(hex: &str) -> String {
    const MODULUS: u64 = 36u64.pow(6);
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rest: u64 = 0;
    // Saturating copy of the whole value: only needed to know whether it reaches six base-36
    // digits, because Ruby prints no leading zeros for smaller numbers.
    let mut whole: u64 = 0;
    for digit in hex.chars().filter_map(|c| c.to_digit(16)) {
        rest = (rest * 16 + u64::from(digit)) % MODULUS;
        whole = whole.saturating_mul(16).saturating_add(u64::from(digit));
    }
    let width = if whole >= MODULUS { 6 } else { 1 };
    let mut out = String::with_capacity(6);
    let mut v = rest;
    while out.len() < width || v > 0 {
        out.insert(0, char::from(DIGITS[(v % 36) as usize]));
        v /= 36;
    }
    out
}

/// GitLab role names from the lowest up to `level`, as upstream lists a member's roles in
/// `gitlab:project_role:<id>:<role>` / `gitlab:group_role:<id>:<role>`: a maintainer gets
/// `guest`, `planner`, `reporter`, `developer` and `maintainer`, so RBAC can bind the lowest
/// role it wants to admit.
pub fn roles_up_to(level: AccessLevel) -> Vec<&'static str> {
    AccessLevel::ALL
        .iter()
        .filter(|l| **l <= level)
        .map(|l| l.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_matches_ruby() {
        // GitLab's own spec: ('a' * 64).to_i(16).to_s(36).last(6) == 'q517sa'.
        assert_eq!(slug_suffix(&"a".repeat(64)), "q517sa");
        assert_eq!(slug_suffix("0"), "0");
        assert_eq!(slug_suffix("23"), "z"); // 35
        assert_eq!(slug_suffix("24"), "10"); // 36
        assert_eq!(
            environment_slug("PRODUCTION").len(),
            "production-".len() + 6
        );
    }

    #[test]
    fn slug_table() {
        // GitLab's spec table (spec/lib/gitlab/slug/environment_spec.rb), suffix stubbed.
        let cases = [
            ("staging-12345678901234567", "staging-123456789-q517sa"),
            ("9-staging-123456789012345", "env-9-staging-123-q517sa"),
            ("staging-1234567890123456", "staging-1234567890123456"),
            ("staging-1234567890123456-", "staging-123456789-q517sa"),
            ("production", "production"),
            ("PRODUCTION", "production-q517sa"),
            ("review/1-foo", "review-1-foo-q517sa"),
            ("1-foo", "env-1-foo-q517sa"),
            ("1/foo", "env-1-foo-q517sa"),
            ("foo-", "foo"),
            ("foo--bar", "foo-bar-q517sa"),
            ("foo**bar", "foo-bar-q517sa"),
            ("*-foo", "env-foo-q517sa"),
            ("staging-12345678-", "staging-12345678"),
            ("staging-12345678-01234567", "staging-12345678-q517sa"),
            ("", "env-q517sa"),
        ];
        for (name, want) in cases {
            assert_eq!(
                slug_with_suffix(name, || "q517sa".into()),
                want,
                "name {name:?}"
            );
        }
    }

    #[test]
    fn unchanged_names_need_no_hash() {
        for name in ["production", "staging", "review-app-1"] {
            assert_eq!(environment_slug(name), name);
        }
        let slug = environment_slug("review/feature-x");
        assert!(slug.starts_with("review-feature-x-"), "{slug}");
        assert_eq!(slug.len(), "review-feature-x-".len() + 6);
    }

    #[test]
    fn roles() {
        assert_eq!(roles_up_to(AccessLevel::Guest), ["guest"]);
        assert_eq!(
            roles_up_to(AccessLevel::Developer),
            ["guest", "planner", "reporter", "developer"]
        );
        assert_eq!(roles_up_to(AccessLevel::Owner).len(), 6);
    }
}
