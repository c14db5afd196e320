//! The agent's `config.yaml`: schema, defaults and validation, as pure functions.
//!
//! kas validates a new file before sending it; each agent module validates its own part again.
//!
//! The schema is GitLab's: the same keys, defaults and rules, with unknown keys refused. Every
//! error names the key path and, when it can be found, the line:
//!
//! ```
//! let err = tether_agent_config::parse("gitops:\n  manifest_project: []\n").unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "gitops.manifest_project: unknown key \"manifest_project\", \
//!      expected one of manifest_projects, drift_managers (line 2)"
//! );
//! ```

pub mod chart_repository;
mod check;
mod ci_access;
mod depends;
mod duration;
mod entry;
mod error;
mod gitops;
mod lines;
mod manifest_access;
mod observability;
mod post_build;
mod render;
mod user_access;

use serde::{Deserialize, Serialize};

pub use ci_access::{
    AsAgent, AsCiJob, CiAccess, CiAccessAs, CiAccessEntry, ExtraKeyVal, Impersonate,
};
pub use duration::{format_duration, parse_duration};
pub use entry::{
    ENTRY_NAME_RULE, EntryRef, MAX_ENTRY_NAME, NAME_SEPARATOR, entry_identity, entry_key,
    is_entry_name, split_entry_key,
};
pub use error::ConfigError;
pub use gitops::{
    DEFAULT_DRIFT_MANAGERS, DEFAULT_GLOB, DEFAULT_TIMEOUT, DryRunStrategy, GitRef, Gitops,
    InventoryPolicy, MAX_PATHS_PER_PROJECT, MAX_TIMEOUT, ManifestProject, PathGlob, ProjectRef,
    PrunePropagationPolicy,
};
pub use manifest_access::ManifestAccess;
pub use observability::{LogLevel, Logging, Observability};
pub use post_build::{
    MAX_SUBSTITUTE_FROM, PostBuild, SubstituteFrom, SubstituteKind, VARIABLE_NAME_RULE,
    is_variable_name,
};
pub use render::{
    Helm, HelmHooks, HelmRandom, Kustomize, MAX_API_VERSIONS, MAX_RELEASE_NAME, MAX_VALUES_FILES,
    check_repository_path, is_api_version, is_kube_version,
};
pub use user_access::{AsUser, MAX_USER_ACCESS_ENTRIES, UserAccess, UserAccessAs, UserAccessEntry};

pub use check::check_namespace;
use check::null_as_default;

/// Largest accepted `config.yaml`, as upstream.
pub const MAX_CONFIG_SIZE: usize = 128 * 1024;

/// Namespace used for manifest objects that do not name one, unless configured.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The whole `config.yaml`. `Default` is the empty file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `gitops`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub gitops: Gitops,
    /// `ci_access`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ci_access: CiAccess,
    /// `user_access`; absent means users cannot reach the cluster through this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_access: Option<UserAccess>,
    /// `observability`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub observability: Observability,
}

impl AgentConfig {
    /// Checks every section. Errors carry the key path but no line (the struct has no
    /// positions); [`parse`] adds the line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.gitops.validate()?;
        self.ci_access.validate()?;
        if let Some(user_access) = &self.user_access {
            user_access.validate()?;
        }
        self.observability.validate()
    }
}

/// Parses and validates the file's bytes: enforces [`MAX_CONFIG_SIZE`] and UTF-8, then
/// [`parse`]s.
pub fn parse_bytes(bytes: &[u8]) -> Result<AgentConfig, ConfigError> {
    if bytes.len() > MAX_CONFIG_SIZE {
        return Err(ConfigError::TooLarge {
            size: bytes.len(),
            limit: MAX_CONFIG_SIZE,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    parse(text)
}

/// Parses and validates `config.yaml` text. An empty document (blank, comments only, or
/// `null`) is the empty configuration with all defaults.
pub fn parse(yaml: &str) -> Result<AgentConfig, ConfigError> {
    let config = deserialize(yaml)?;
    config
        .validate()
        .map_err(|e| e.locate(|path| lines::line_of(yaml, path)))?;
    Ok(config)
}

/// Deserializes with key-path tracking, so that every schema error can say where it is.
fn deserialize(yaml: &str) -> Result<AgentConfig, ConfigError> {
    // The deserializer streams, so a schema error early in the file would hide a YAML syntax
    // error further down; the user would fix one and then meet the other. Reading the whole
    // document once without a schema first makes "not YAML at all" win. Only syntax errors
    // are taken from this pass: others (such as duplicate keys) are reported with a key path
    // by the typed pass below.
    if let Err(err) = serde_saphyr::from_str::<serde::de::IgnoredAny>(yaml) {
        let err = error::from_yaml(&err, "");
        if matches!(err, ConfigError::Syntax { .. }) {
            return Err(err);
        }
    }
    let mut failed_at: Option<String> = None;
    let result = serde_saphyr::with_deserializer_from_str(yaml, |de| {
        let mut track = serde_path_to_error::Track::new();
        // `Option` so that an empty or `null` document reads as "no configuration".
        let value = Option::<AgentConfig>::deserialize(serde_path_to_error::Deserializer::new(
            de, &mut track,
        ));
        if value.is_err() {
            let path = track.path().to_string();
            // The library renders the root as "."; an empty path reads better downstream.
            failed_at = Some(if path == "." { String::new() } else { path });
        }
        value
    });
    match result {
        Ok(config) => Ok(config.unwrap_or_default()),
        Err(err) => {
            let path = failed_at.unwrap_or_default();
            Err(error::from_yaml(&err, &path).locate(|path| lines::line_of(yaml, path)))
        }
    }
}
