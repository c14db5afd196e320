//! Shape checks for names that end up in URLs, Kubernetes objects and log lines.
//!
//! They run before anything touches the database so that malformed input is reported as such
//! (instead of as "not found") and so that stored values can be trusted by other components.

use crate::error::{Error, Result};

/// Longest agent name: the RFC 1123 DNS label limit, because agent names become parts of
/// Kubernetes object names.
pub const MAX_AGENT_NAME_LEN: usize = 63;

/// Longest project path we accept. GitLab's own limit is in this range; anything longer is
/// almost certainly garbage and would only bloat indexes and logs.
pub const MAX_PROJECT_PATH_LEN: usize = 1024;

/// Checks that `name` is an RFC 1123 DNS label: 1 to 63 characters of `[a-z0-9-]`, starting and
/// ending with a letter or digit.
pub fn validate_agent_name(name: &str) -> Result<()> {
    let invalid = |reason: String| Error::InvalidName {
        what: "agent name",
        reason,
    };
    if name.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    // Byte length equals character length once the character check below passes; checking the
    // length first keeps the error about length for very long inputs.
    if name.len() > MAX_AGENT_NAME_LEN {
        return Err(invalid(format!(
            "{name:?} is {} characters long, at most {MAX_AGENT_NAME_LEN} are allowed",
            name.chars().count()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(invalid(format!(
            "{name:?} contains {c:?}; only lowercase letters, digits and '-' are allowed"
        )));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid(format!(
            "{name:?} must start and end with a lowercase letter or digit"
        )));
    }
    Ok(())
}

/// Checks that `path` looks like a GitLab project path: `/`-separated non-empty segments of
/// `[A-Za-z0-9_.-]`, without a leading or trailing slash, and without `.`/`..` segments (which
/// would make paths that alias each other once used in URLs or file names).
pub fn validate_project_path(path: &str) -> Result<()> {
    let invalid = |reason: String| Error::InvalidName {
        what: "project path",
        reason,
    };
    if path.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    if path.len() > MAX_PROJECT_PATH_LEN {
        return Err(invalid(format!(
            "is {} bytes long, at most {MAX_PROJECT_PATH_LEN} are allowed",
            path.len()
        )));
    }
    if path.starts_with('/') || path.ends_with('/') {
        return Err(invalid(format!("{path:?} must not start or end with '/'")));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(invalid(format!("{path:?} contains an empty segment")));
        }
        if segment == "." || segment == ".." {
            return Err(invalid(format!(
                "{path:?} contains the segment {segment:?}"
            )));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(invalid(format!(
                "{path:?} contains {c:?}; segments may contain only letters, digits, '_', '.' and '-'"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names() {
        let long_ok = "a".repeat(63);
        let too_long = "a".repeat(64);
        let cases: &[(&str, bool)] = &[
            ("agent", true),
            ("my-agent-1", true),
            ("a", true),
            ("0", true),
            ("1agent", true),
            (&long_ok, true),
            ("", false),
            (&too_long, false),
            ("Agent", false),
            ("AGENT", false),
            ("-agent", false),
            ("agent-", false),
            ("-", false),
            ("my_agent", false),
            ("my.agent", false),
            ("my agent", false),
            ("agent/x", false),
            ("agént", false),
        ];
        for (name, ok) in cases {
            let got = validate_agent_name(name);
            assert_eq!(got.is_ok(), *ok, "{name:?}: {got:?}");
            if let Err(e) = got {
                assert!(
                    matches!(
                        e,
                        Error::InvalidName {
                            what: "agent name",
                            ..
                        }
                    ),
                    "{e:?}"
                );
            }
        }
    }

    #[test]
    fn project_paths() {
        let too_long = "a/".repeat(MAX_PROJECT_PATH_LEN / 2) + "a";
        let cases: &[(&str, bool)] = &[
            ("name", true),
            ("group/name", true),
            ("group/sub/name", true),
            ("Group_1/sub.group/my-project", true),
            ("a.b", true),
            ("...", true),
            ("", false),
            ("/group/name", false),
            ("group/name/", false),
            ("/", false),
            ("group//name", false),
            ("group/./name", false),
            ("group/../name", false),
            ("..", false),
            ("group/na me", false),
            ("group/näme", false),
            ("group\\name", false),
            ("group/name?x", false),
            (&too_long, false),
        ];
        for (path, ok) in cases {
            let got = validate_project_path(path);
            assert_eq!(got.is_ok(), *ok, "{path:?}: {got:?}");
            if let Err(e) = got {
                assert!(
                    matches!(
                        e,
                        Error::InvalidName {
                            what: "project path",
                            ..
                        }
                    ),
                    "{e:?}"
                );
            }
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        let Err(e) = validate_agent_name("Bad") else {
            panic!("uppercase accepted");
        };
        assert_eq!(
            e.to_string(),
            "invalid agent name: \"Bad\" contains 'B'; only lowercase letters, digits and '-' are allowed"
        );
    }
}
