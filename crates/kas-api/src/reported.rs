//! The outcome of a sync and the status of each object as users read them (`kas agent status`
//! and its `--json`): the wire's enums, spelled with the words agents have always reported.

use std::fmt;

use serde::{Deserialize, Serialize};
use tether_protocol::gitops::{ObjectState, SyncOutcome};

/// How a synchronization ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedOutcome {
    Succeeded,
    Failed,
    /// Nothing applied yet: the entry waits for its `depends_on` to be ready (the report's
    /// error says which and why).
    Waiting,
    /// Everything was applied and pruned, but another synchronization (of a newer commit, or a
    /// re-sync of the same one) became due before every object was Current (the report's
    /// error says which, and how many were not); the next one reports their status.
    Superseded,
    /// Not said (a report from an older agent), or a word this build does not know.
    #[serde(other)]
    Unknown,
}

impl ReportedOutcome {
    /// Every value, for reading the words back.
    pub const ALL: [Self; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::Waiting,
        Self::Superseded,
        Self::Unknown,
    ];

    /// The word users see: `succeeded`, `failed`, `waiting`, `superseded` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Waiting => "waiting",
            Self::Superseded => "superseded",
            Self::Unknown => "unknown",
        }
    }
}

/// Where a synchronization left an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReportedStatus {
    InProgress,
    Current,
    Failed,
    Terminating,
    NotFound,
    Pruned,
    /// Left Git but left in place (no longer the agent's, or its type is not served).
    PruneSkipped,
    /// Could not be determined, not said (an older agent), or a word this build does not know.
    #[serde(other)]
    Unknown,
}

impl ReportedStatus {
    /// Every value, for reading the words back.
    pub const ALL: [Self; 8] = [
        Self::InProgress,
        Self::Current,
        Self::Failed,
        Self::Terminating,
        Self::NotFound,
        Self::Pruned,
        Self::PruneSkipped,
        Self::Unknown,
    ];

    /// The word users see: kstatus' (`Current`, `InProgress`, ...), `Pruned` or `PruneSkipped`
    /// (cli-utils' word).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "InProgress",
            Self::Current => "Current",
            Self::Failed => "Failed",
            Self::Terminating => "Terminating",
            Self::NotFound => "NotFound",
            Self::Pruned => "Pruned",
            Self::PruneSkipped => "PruneSkipped",
            Self::Unknown => "Unknown",
        }
    }
}

// `pad`, not `write_str`: the CLI lines objects up with `{:<12}`.
impl fmt::Display for ReportedOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Display for ReportedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Reads a word as stored before the enums; anything else is `Unknown`.
fn from_word<T: Copy>(all: &[T], as_str: fn(T) -> &'static str, word: &str, unknown: T) -> T {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == word)
        .unwrap_or(unknown)
}

impl ReportedOutcome {
    /// The value a word of an older report stands for.
    pub fn from_word(word: &str) -> Self {
        from_word(&Self::ALL, Self::as_str, word, Self::Unknown)
    }
}

impl ReportedStatus {
    /// The value a word of an older report stands for.
    pub fn from_word(word: &str) -> Self {
        from_word(&Self::ALL, Self::as_str, word, Self::Unknown)
    }
}

impl From<SyncOutcome> for ReportedOutcome {
    fn from(o: SyncOutcome) -> Self {
        match o {
            SyncOutcome::Succeeded => Self::Succeeded,
            SyncOutcome::Failed => Self::Failed,
            SyncOutcome::Waiting => Self::Waiting,
            SyncOutcome::Superseded => Self::Superseded,
            SyncOutcome::Unspecified => Self::Unknown,
        }
    }
}

impl From<ReportedOutcome> for SyncOutcome {
    fn from(o: ReportedOutcome) -> Self {
        match o {
            ReportedOutcome::Succeeded => Self::Succeeded,
            ReportedOutcome::Failed => Self::Failed,
            ReportedOutcome::Waiting => Self::Waiting,
            ReportedOutcome::Superseded => Self::Superseded,
            ReportedOutcome::Unknown => Self::Unspecified,
        }
    }
}

impl From<ObjectState> for ReportedStatus {
    fn from(s: ObjectState) -> Self {
        match s {
            ObjectState::InProgress => Self::InProgress,
            ObjectState::Current => Self::Current,
            ObjectState::Failed => Self::Failed,
            ObjectState::Terminating => Self::Terminating,
            ObjectState::NotFound => Self::NotFound,
            ObjectState::Pruned => Self::Pruned,
            ObjectState::PruneSkipped => Self::PruneSkipped,
            ObjectState::Unknown | ObjectState::Unspecified => Self::Unknown,
        }
    }
}

impl From<ReportedStatus> for ObjectState {
    fn from(s: ReportedStatus) -> Self {
        match s {
            ReportedStatus::InProgress => Self::InProgress,
            ReportedStatus::Current => Self::Current,
            ReportedStatus::Failed => Self::Failed,
            ReportedStatus::Terminating => Self::Terminating,
            ReportedStatus::NotFound => Self::NotFound,
            ReportedStatus::Pruned => Self::Pruned,
            ReportedStatus::PruneSkipped => Self::PruneSkipped,
            ReportedStatus::Unknown => Self::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_through_display_serde_and_from_word() {
        for o in ReportedOutcome::ALL {
            let json = format!("\"{}\"", o.as_str());
            assert_eq!(serde_json::to_string(&o).expect("json"), json);
            assert_eq!(
                serde_json::from_str::<ReportedOutcome>(&json).expect("json"),
                o
            );
            assert_eq!(ReportedOutcome::from_word(&o.to_string()), o);
        }
        for s in ReportedStatus::ALL {
            let json = format!("\"{}\"", s.as_str());
            assert_eq!(serde_json::to_string(&s).expect("json"), json);
            assert_eq!(
                serde_json::from_str::<ReportedStatus>(&json).expect("json"),
                s
            );
            assert_eq!(ReportedStatus::from_word(&s.to_string()), s);
        }
    }

    #[test]
    fn words_this_build_does_not_know_read_as_unknown() {
        assert_eq!(
            ReportedOutcome::from_word("in_progress"),
            ReportedOutcome::Unknown
        );
        assert_eq!(ReportedStatus::from_word(""), ReportedStatus::Unknown);
        assert_eq!(
            serde_json::from_str::<ReportedStatus>("\"Exploded\"").expect("json"),
            ReportedStatus::Unknown
        );
    }

    #[test]
    fn display_pads_for_the_cli_columns() {
        assert_eq!(format!("{:<12}|", ReportedStatus::Current), "Current     |");
        assert_eq!(format!("{}", ReportedOutcome::Succeeded), "succeeded");
    }

    #[test]
    fn unspecified_on_the_wire_is_unknown() {
        assert_eq!(
            ReportedOutcome::from(SyncOutcome::Unspecified),
            ReportedOutcome::Unknown
        );
        assert_eq!(
            ReportedStatus::from(ObjectState::Unspecified),
            ReportedStatus::Unknown
        );
    }
}
