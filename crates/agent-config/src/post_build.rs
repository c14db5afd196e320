//! `post_build:` in a manifest project entry: variables agentk substitutes into the objects
//! (`${cluster_name}`) before applying them, as Flux's `spec.postBuild` does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::check::check_namespace;

/// Most `substitute_from` references per entry; each is one GET at every sync.
pub const MAX_SUBSTITUTE_FROM: usize = 32;

/// The rule variable names follow, as Flux writes it (and shows it in its errors).
pub const VARIABLE_NAME_RULE: &str = "^[_[:alpha:]][_[:alpha:][:digit:]]*$";

/// `post_build:` — variable substitution in the rendered objects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostBuild {
    /// Variables given in the configuration; they win over those read by `substitute_from`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub substitute: BTreeMap<String, String>,
    /// ConfigMaps and Secrets whose data keys are variables, read by agentk at every sync;
    /// a later reference wins over an earlier one for the same key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substitute_from: Vec<SubstituteFrom>,
    /// A `${var}` without default whose variable is not set fails the sync, instead of
    /// becoming an empty string (Flux's `StrictPostBuildSubstitutions` feature gate).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

/// One `substitute_from[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstituteFrom {
    /// `ConfigMap` or `Secret`.
    pub kind: SubstituteKind,
    /// The object's name.
    pub name: String,
    /// The object's namespace; agentk's own namespace when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Whether a missing object is skipped instead of failing the sync.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// `substitute_from[].kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubstituteKind {
    ConfigMap,
    Secret,
}

impl SubstituteKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            SubstituteKind::ConfigMap => "ConfigMap",
            SubstituteKind::Secret => "Secret",
        }
    }
}

/// Whether `name` is a variable name by [`VARIABLE_NAME_RULE`]: an ASCII letter or `_`, then
/// ASCII letters, digits or `_` (Go's POSIX classes are ASCII only).
pub fn is_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Kubernetes object names of ConfigMaps and Secrets are DNS subdomains: at most 253
/// lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit.
fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes.iter().all(|b| alnum(b) || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
}

impl PostBuild {
    pub(crate) fn validate(&self, base: &str) -> Result<(), ConfigError> {
        for name in self.substitute.keys() {
            if !is_variable_name(name) {
                return Err(ConfigError::invalid(
                    format!("{base}.substitute.{name}"),
                    format!(
                        "{name:?} is not a valid variable name (must match {VARIABLE_NAME_RULE}: \
                         a letter or '_', then letters, digits or '_')"
                    ),
                ));
            }
        }
        if self.substitute_from.len() > MAX_SUBSTITUTE_FROM {
            return Err(ConfigError::invalid(
                format!("{base}.substitute_from"),
                format!(
                    "{} references, at most {MAX_SUBSTITUTE_FROM} are allowed",
                    self.substitute_from.len()
                ),
            ));
        }
        for (i, r) in self.substitute_from.iter().enumerate() {
            let at = format!("{base}.substitute_from[{i}]");
            if !is_dns_subdomain(&r.name) {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!(
                        "{:?} is not a valid {} name (at most 253 lowercase letters, digits, \
                         '-' or '.', starting and ending with a letter or digit)",
                        r.name,
                        r.kind.as_str()
                    ),
                ));
            }
            if let Some(ns) = &r.namespace {
                check_namespace(&format!("{at}.namespace"), ns)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_names_follow_flux_rule() {
        for ok in ["a", "_", "cluster_name", "A1", "_9", "Domain"] {
            assert!(is_variable_name(ok), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a.b", "a b", "é", "${a}"] {
            assert!(!is_variable_name(bad), "{bad}");
        }
    }

    #[test]
    fn object_names_are_dns_subdomains() {
        assert!(is_dns_subdomain("cluster-vars.v1"));
        for bad in ["", "Vars", "-a", "a-", "a_b", &"a".repeat(254)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
