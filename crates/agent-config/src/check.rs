//! Small validation predicates and serde helpers shared by the sections.

use serde::{Deserialize, Deserializer};

use crate::ConfigError;

/// Kubernetes namespace names are RFC 1123 labels: at most 63 characters of lowercase ASCII
/// letters, digits and `-`, starting and ending with a letter or digit.
pub(crate) fn is_rfc1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
}

/// Checks that `namespace` (the value of the key `path`) is a Kubernetes namespace name.
pub fn check_namespace(path: &str, namespace: &str) -> Result<(), ConfigError> {
    if is_rfc1123_label(namespace) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            path,
            format!(
                "{namespace:?} is not a valid namespace name (RFC 1123 label: at most 63 \
                 lowercase letters, digits or '-', starting and ending with a letter or digit)"
            ),
        ))
    }
}

/// A GitLab project or group full path: `/`-separated segments, each made of ASCII letters,
/// digits, `_`, `-` and `.`, not starting with `-`. This is GitLab's own path rule; checking it
/// here turns a typo into a config error instead of a "project not found" at sync time.
pub(crate) fn is_full_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|segment| {
            let mut chars = segment.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        })
}

pub(crate) fn check_full_path(path: &str, what: &str, value: &str) -> Result<(), ConfigError> {
    if is_full_path(value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            path,
            format!("{value:?} is not a valid {what} path (expected e.g. \"group/subgroup/name\")"),
        ))
    }
}

/// A full Git commit id: 40 hexadecimal digits (SHA-1 object ids, as GitLab uses).
pub(crate) fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn check_non_empty(path: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::invalid(path, "must not be empty"))
    } else {
        Ok(())
    }
}

/// `deserialize_with` for sections and lists: a key written with no value (`gitops:`), or an
/// explicit `null`, means "not set" in upstream's protobuf JSON, so it gets the default.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Describes which of a one-of's keys were set, for "exactly one of" errors.
pub(crate) fn one_of_error(names: &[&str], set: &[&str]) -> String {
    let options = names.join(", ");
    if set.is_empty() {
        format!("exactly one of {options} must be set, found none")
    } else {
        format!(
            "exactly one of {options} must be set, found {}: {}",
            set.len(),
            set.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in [
            "default",
            "a",
            "gitlab-agent",
            "ns1",
            "1ns",
            &"a".repeat(63),
        ] {
            assert!(is_rfc1123_label(ok), "{ok}");
        }
        for bad in [
            "",
            "Default",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "ä",
            " a",
            &"a".repeat(64),
        ] {
            assert!(!is_rfc1123_label(bad), "{bad}");
        }
    }

    #[test]
    fn full_paths() {
        for ok in [
            "group/manifests",
            "g/sub/name",
            "a",
            "my.group/_x",
            "G-1/p.q",
        ] {
            assert!(is_full_path(ok), "{ok}");
        }
        for bad in ["", "/a", "a/", "a//b", "a b", "-a/b", "a/-b", "ä/b"] {
            assert!(!is_full_path(bad), "{bad}");
        }
    }

    #[test]
    fn commit_ids() {
        assert!(is_commit_id("0123456789abcdef0123456789ABCDEF01234567"));
        assert!(!is_commit_id("0123456789abcdef"));
        assert!(!is_commit_id("g123456789abcdef0123456789abcdef01234567"));
    }
}
