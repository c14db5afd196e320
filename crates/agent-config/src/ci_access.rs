//! `ci_access:` — which projects' and groups' CI jobs may use the agent, and as whom.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::check::{
    check_full_path, check_namespace, check_non_empty, null_as_default, one_of_error,
};

/// The `ci_access` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiAccess {
    /// Projects whose CI jobs may use the agent.
    #[serde(default, deserialize_with = "null_as_default")]
    pub projects: Vec<CiAccessEntry>,
    /// Groups whose projects' CI jobs may use the agent.
    #[serde(default, deserialize_with = "null_as_default")]
    pub groups: Vec<CiAccessEntry>,
    /// Whether CI jobs of the agent's own configuration project may use the agent without a
    /// `projects` entry — as the agent itself (its ServiceAccount's rights), in any
    /// environment. `true` by default, as with GitLab's agent, where this access is implicit.
    /// `false` treats the configuration project like any other project: it needs a `projects`
    /// entry, or a `groups` entry holding it. A boolean and nothing else (`null` or `"no"` are
    /// errors), since the safe reading of a typo here is not obvious.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub configuration_project: bool,
}

impl Default for CiAccess {
    fn default() -> Self {
        Self {
            projects: Vec::new(),
            groups: Vec::new(),
            configuration_project: true,
        }
    }
}

fn yes() -> bool {
    true
}

// Serde's `skip_serializing_if` passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_yes(b: &bool) -> bool {
    *b
}

/// One `ci_access.projects[]` or `ci_access.groups[]` entry (both have the same keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiAccessEntry {
    /// Full path of the project or group.
    pub id: String,
    /// Namespace put in the generated kubeconfig context; `None` leaves it unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_namespace: Option<String>,
    /// Environments (names or wildcards) whose jobs may use the agent; empty means all.
    #[serde(default, deserialize_with = "null_as_default")]
    pub environments: Vec<String>,
    /// Identity the agent uses against the Kubernetes API for these jobs.
    #[serde(default)]
    pub access_as: CiAccessAs,
}

impl CiAccessEntry {
    /// An entry for `id` with the defaults (no namespace, all environments, as the agent).
    pub fn new(id: impl Into<String>) -> Self {
        CiAccessEntry {
            id: id.into(),
            default_namespace: None,
            environments: Vec::new(),
            access_as: CiAccessAs::default(),
        }
    }
}

/// `access_as` for CI jobs: exactly one of `agent: {}`, `impersonate: {...}`, `ci_job: {}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawCiAccessAs")]
pub enum CiAccessAs {
    /// Use the agent's own ServiceAccount.
    Agent(AsAgent),
    /// Impersonate a fixed identity.
    Impersonate(Impersonate),
    /// Impersonate an identity derived from the CI job.
    CiJob(AsCiJob),
}

impl Default for CiAccessAs {
    fn default() -> Self {
        CiAccessAs::Agent(AsAgent {})
    }
}

/// `agent: {}` — takes no options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsAgent {}

/// `ci_job: {}` — takes no options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsCiJob {}

/// `impersonate: {...}` — the Kubernetes identity to impersonate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impersonate {
    /// User name (`Impersonate-User`).
    pub username: String,
    /// Groups (`Impersonate-Group`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub groups: Vec<String>,
    /// UID (`Impersonate-Uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Extra fields (`Impersonate-Extra-<key>`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub extra: Vec<ExtraKeyVal>,
}

/// One `extra[]` entry of `impersonate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraKeyVal {
    /// Extra key.
    pub key: String,
    /// Its values.
    #[serde(default, deserialize_with = "null_as_default")]
    pub val: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCiAccessAs {
    agent: Option<AsAgent>,
    impersonate: Option<Impersonate>,
    ci_job: Option<AsCiJob>,
}

impl TryFrom<RawCiAccessAs> for CiAccessAs {
    type Error = String;

    fn try_from(raw: RawCiAccessAs) -> Result<Self, String> {
        match (raw.agent, raw.impersonate, raw.ci_job) {
            (Some(a), None, None) => Ok(CiAccessAs::Agent(a)),
            (None, Some(i), None) => Ok(CiAccessAs::Impersonate(i)),
            (None, None, Some(c)) => Ok(CiAccessAs::CiJob(c)),
            (a, i, c) => {
                let set: Vec<&str> = [
                    ("agent", a.is_some()),
                    ("impersonate", i.is_some()),
                    ("ci_job", c.is_some()),
                ]
                .into_iter()
                .filter_map(|(name, is_set)| is_set.then_some(name))
                .collect();
                Err(one_of_error(&["agent", "impersonate", "ci_job"], &set))
            }
        }
    }
}

impl CiAccess {
    /// Checks paths, namespaces, impersonation settings and duplicate ids.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_entries("ci_access.projects", "project", &self.projects)?;
        validate_entries("ci_access.groups", "group", &self.groups)
    }
}

fn validate_entries(list: &str, what: &str, entries: &[CiAccessEntry]) -> Result<(), ConfigError> {
    // Paths are case-insensitive in GitLab, so duplicates are compared that way.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let base = format!("{list}[{i}]");
        entry.validate(&base, what)?;
        if let Some(first) = seen.insert(entry.id.to_ascii_lowercase(), i) {
            return Err(ConfigError::invalid(
                format!("{base}.id"),
                format!(
                    "duplicate {what} id {:?}, already used by {list}[{first}]",
                    entry.id
                ),
            ));
        }
    }
    Ok(())
}

impl CiAccessEntry {
    fn validate(&self, base: &str, what: &str) -> Result<(), ConfigError> {
        check_full_path(&format!("{base}.id"), what, &self.id)?;
        if let Some(ns) = &self.default_namespace {
            check_namespace(&format!("{base}.default_namespace"), ns)?;
        }
        for (j, env) in self.environments.iter().enumerate() {
            check_non_empty(&format!("{base}.environments[{j}]"), env)?;
        }
        if let CiAccessAs::Impersonate(imp) = &self.access_as {
            imp.validate(&format!("{base}.access_as.impersonate"))?;
        }
        Ok(())
    }
}

impl Impersonate {
    fn validate(&self, base: &str) -> Result<(), ConfigError> {
        check_non_empty(&format!("{base}.username"), &self.username)?;
        for (j, group) in self.groups.iter().enumerate() {
            check_non_empty(&format!("{base}.groups[{j}]"), group)?;
        }
        if let Some(uid) = &self.uid {
            check_non_empty(&format!("{base}.uid"), uid)?;
        }
        for (j, extra) in self.extra.iter().enumerate() {
            check_non_empty(&format!("{base}.extra[{j}].key"), &extra.key)?;
        }
        Ok(())
    }
}
