//! The entries of an agent's configuration in force that have no synchronization report yet,
//! and why (`GET /api/v1/agents/{id}/gitops/unreported`): without them `kas agent status` was
//! silent about a first sync still running, a project kas cannot fetch, or one it does not
//! have at all.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an entry of the configuration in force has no synchronization report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Its project is fetched (or its first fetch is under way) and the agent has not reported
    /// a synchronization yet: a first sync is running, or about to.
    Pending,
    /// Its project's fetches fail (or it has no repository): no commit reaches the agent until
    /// one succeeds.
    FetchFailing,
    /// No project of that path or id is registered in kas: the entry never synchronizes.
    UnknownProject,
    /// Suspended in kas (`kas agent suspend`) before its first sync: nothing is applied until
    /// it is resumed. Deliberate, so not unhealthy.
    Suspended,
    /// Its project is outside the agent's group and kas does not share it
    /// (`gitops.shared_manifest_projects`): the agent may not read it.
    NotShared,
    /// A word this build does not know (a newer kas).
    #[serde(other)]
    Unknown,
}

impl EntryState {
    /// The words users see: `pending`, `fetch failing`, `unknown project`, `suspended`,
    /// `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::FetchFailing => "fetch failing",
            Self::UnknownProject => "unknown project",
            Self::Suspended => "suspended",
            Self::NotShared => "not shared",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the entry cannot synchronize until someone acts (registers the project, fixes
    /// its remote or credentials); a pending one only needs time.
    pub fn is_unhealthy(self) -> bool {
        matches!(
            self,
            Self::FetchFailing | Self::UnknownProject | Self::NotShared
        )
    }
}

impl fmt::Display for EntryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the configuration in force without a synchronization report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreportedView {
    /// The entry's key, as reports name it: `group/app`, or `group/app#name` for a named entry.
    pub project_id: String,
    pub state: EntryState,
    /// Why, in words: for `fetch_failing` kas's last fetch error.
    pub reason: String,
}
