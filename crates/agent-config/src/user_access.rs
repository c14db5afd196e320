//! `user_access:` — which projects' and groups' members may use the agent, and as whom.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::check::{check_full_path, null_as_default, one_of_error};
use crate::ci_access::AsAgent;

/// Upstream's cap on `user_access.projects` plus `user_access.groups`: each entry costs an
/// authorization lookup per proxied request.
pub const MAX_USER_ACCESS_ENTRIES: usize = 500;

/// The `user_access` section. When present, `access_as` is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAccess {
    /// Identity used for users' requests.
    pub access_as: UserAccessAs,
    /// Projects whose members may use the agent.
    #[serde(default, deserialize_with = "null_as_default")]
    pub projects: Vec<UserAccessEntry>,
    /// Groups whose members may use the agent.
    #[serde(default, deserialize_with = "null_as_default")]
    pub groups: Vec<UserAccessEntry>,
}

/// One `user_access.projects[]` or `user_access.groups[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAccessEntry {
    /// Full path of the project or group.
    pub id: String,
}

/// `access_as` for users: exactly one of `agent: {}` or `user: {}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawUserAccessAs")]
pub enum UserAccessAs {
    /// Use the agent's own ServiceAccount.
    Agent(AsAgent),
    /// Impersonate the GitLab user.
    User(AsUser),
}

/// `user: {}` — takes no options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsUser {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserAccessAs {
    agent: Option<AsAgent>,
    user: Option<AsUser>,
}

impl TryFrom<RawUserAccessAs> for UserAccessAs {
    type Error = String;

    fn try_from(raw: RawUserAccessAs) -> Result<Self, String> {
        let names = ["agent", "user"];
        match (raw.agent, raw.user) {
            (Some(a), None) => Ok(UserAccessAs::Agent(a)),
            (None, Some(u)) => Ok(UserAccessAs::User(u)),
            (Some(_), Some(_)) => Err(one_of_error(&names, &names)),
            (None, None) => Err(one_of_error(&names, &[])),
        }
    }
}

impl UserAccess {
    /// Checks paths, the entry limit and duplicate ids.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let total = self.projects.len() + self.groups.len();
        if total > MAX_USER_ACCESS_ENTRIES {
            return Err(ConfigError::invalid(
                "user_access",
                format!(
                    "{total} projects and groups, at most {MAX_USER_ACCESS_ENTRIES} are allowed"
                ),
            ));
        }
        validate_entries("user_access.projects", "project", &self.projects)?;
        validate_entries("user_access.groups", "group", &self.groups)
    }
}

fn validate_entries(
    list: &str,
    what: &str,
    entries: &[UserAccessEntry],
) -> Result<(), ConfigError> {
    // Paths are case-insensitive in GitLab; a repeated entry is almost certainly a mistake.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let path = format!("{list}[{i}].id");
        check_full_path(&path, what, &entry.id)?;
        if let Some(first) = seen.insert(entry.id.to_ascii_lowercase(), i) {
            return Err(ConfigError::invalid(
                path,
                format!(
                    "duplicate {what} id {:?}, already used by {list}[{first}]",
                    entry.id
                ),
            ));
        }
    }
    Ok(())
}
