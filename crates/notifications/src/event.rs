//! What kas tells receivers about, and when (pure).
//!
//! Two kinds of messages:
//! - [`Transition`]s for people (webhooks, chat): a project's syncs start failing, recover, or a
//!   configuration or commit is refused. Said once per change, not once per retry.
//! - [`CommitStatus`]es for forges (GitLab, GitHub, Gitea): each commit an agent is offered is
//!   `pending`, then `success` or `failed` once the agent reports it, or superseded when a newer
//!   commit reaches the agent first (agentk cancels the older sync and never reports it).
//!
//! Each message has a deduplication key: the outbox keeps one message per (receiver, key), so
//! the same event seen again — a report re-sent after a reconnect, a second replica — is not
//! sent twice.

use serde::{Deserialize, Serialize};
use tether_protocol::gitops::{ObjectState, SyncOutcome, SyncReport};

/// The agent an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: i64,
    pub name: String,
    /// Its configuration project's path.
    pub project: String,
}

impl AgentInfo {
    /// `<configuration project>:<agent name>`, the name users know the agent by.
    pub fn display_name(&self) -> String {
        format!("{}:{}", self.project, self.name)
    }
}

/// A change worth telling people about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    SyncFailed,
    SyncRecovered,
    ConfigurationRefused,
    CommitRefused,
}

impl TransitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SyncFailed => "sync_failed",
            Self::SyncRecovered => "sync_recovered",
            Self::ConfigurationRefused => "configuration_refused",
            Self::CommitRefused => "commit_refused",
        }
    }

    /// Every kind, the default filter of a receiver.
    pub const ALL: [TransitionKind; 4] = [
        Self::SyncFailed,
        Self::SyncRecovered,
        Self::ConfigurationRefused,
        Self::CommitRefused,
    ];
}

/// Objects of a sync by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub objects: usize,
    pub current: usize,
    pub in_progress: usize,
    pub failed: usize,
    pub pruned: usize,
}

impl Summary {
    pub fn of(report: &SyncReport) -> Summary {
        let count = |s: ObjectState| report.objects.iter().filter(|o| o.state() == s).count();
        Summary {
            objects: report.objects.len(),
            current: count(ObjectState::Current),
            in_progress: count(ObjectState::InProgress),
            failed: count(ObjectState::Failed),
            pruned: count(ObjectState::Pruned),
        }
    }

    /// `3 objects: 2 Current, 1 Failed` (the non-zero counts).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            (self.current, "Current"),
            (self.in_progress, "InProgress"),
            (self.failed, "Failed"),
            (self.pruned, "Pruned"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, s)| format!("{n} {s}"))
        .collect();
        match parts.is_empty() {
            true => format!("{} objects", self.objects),
            false => format!("{} objects: {}", self.objects, parts.join(", ")),
        }
    }
}

/// A message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub kind: TransitionKind,
    /// `None` for a commit refused for its signature (it is the project's, for every agent).
    pub agent: Option<AgentInfo>,
    /// The manifest project (as the agent's configuration names it) or, for a configuration
    /// refusal, the configuration project.
    pub project: String,
    pub commit: String,
    /// Why it failed or was refused; empty for a recovery.
    pub message: String,
    pub summary: Summary,
    /// `Kind namespace/name: message` of the failed objects (at most 20).
    pub failed_objects: Vec<String>,
    /// Unix seconds.
    pub at: i64,
}

/// The state of a commit for a forge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Success,
    Failed,
    /// A newer commit was sent to the agent before this one's sync finished: its sync was
    /// cancelled and will never be reported. Without it, the commit stayed `pending` for good
    /// (a deploy that looks stuck in merge requests).
    Superseded,
}

/// The description of a commit superseded by `newer` (named by its short id, as forges do).
pub fn superseded_by(newer: &str) -> String {
    let short: String = newer.chars().take(8).collect();
    format!(
        "superseded by {short}: a newer commit reached the agent before this one's sync finished"
    )
}

/// A message for a forge: the state of an agent's sync of a commit of a manifest project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStatus {
    pub state: State,
    pub agent: AgentInfo,
    /// The manifest project's repository path on the forge.
    pub project: String,
    /// The entry's `name` when the agent lists the project more than once: each entry gets a
    /// status (context) of its own, or the last entry to report would hide another's failure.
    /// Absent in messages queued before entries had names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    pub commit: String,
    pub description: String,
}

impl CommitStatus {
    /// The status's context on the forge: `tether/<agent>`, and `#<entry>` for a named entry.
    pub fn context(&self) -> String {
        match &self.entry {
            Some(name) => format!("tether/{}#{name}", self.agent.display_name()),
            None => format!("tether/{}", self.agent.display_name()),
        }
    }
}

/// The name of the entry a report's key (`project` or `project#name`) is of.
pub fn entry_name(key: &str) -> Option<&str> {
    key.split_once('#').map(|(_, name)| name)
}

/// Any message, as kept in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Transition(Transition),
    Status(CommitStatus),
}

impl Message {
    /// The outbox's deduplication key.
    pub fn dedup_key(&self) -> String {
        match self {
            Message::Transition(t) => {
                let agent = t.agent.as_ref().map_or(0, |a| a.id);
                match t.kind {
                    // Once per agent and refused commit, whichever replica or stream saw it.
                    TransitionKind::ConfigurationRefused => {
                        format!("{}:{agent}:{}", t.kind.as_str(), t.commit)
                    }
                    // Once per project and refused commit, for all its agents.
                    TransitionKind::CommitRefused => {
                        format!("{}:{}:{}", t.kind.as_str(), t.project, t.commit)
                    }
                    // A report re-sent after a reconnect has the same finish time.
                    _ => format!(
                        "{}:{agent}:{}:{}:{}",
                        t.kind.as_str(),
                        t.project,
                        t.commit,
                        t.at
                    ),
                }
            }
            Message::Status(s) => status_key(s, s.state),
        }
    }

    /// The outbox's ordering key: messages of one receiver with the same key replace one
    /// another, so only the newest queued is sent and none is sent after a newer one was. A
    /// forge keeps the last status posted for a commit and context (the agent), so a `pending`
    /// retried after the commit's `success` was delivered left it `pending` for good.
    /// Transitions are each news of their own: none.
    pub fn order_key(&self) -> Option<String> {
        match self {
            Message::Transition(_) => None,
            Message::Status(s) => Some(status_order_key(s)),
        }
    }
}

/// The deduplication keys of the agent's outcomes for `status`'s commit (`success`, `failed`).
pub(crate) fn outcome_keys(status: &CommitStatus) -> [String; 2] {
    [State::Success, State::Failed].map(|state| status_key(status, state))
}

/// The deduplication key of `status`'s commit in `state`: its ordering key and the state.
fn status_key(status: &CommitStatus, state: State) -> String {
    format!("{}:{state:?}", status_order_key(status))
}

/// `status:<agent id>:<project>:<commit>` (`<project>#<entry>` for a named entry): one forge
/// status (commit and context). The deduplication key adds the state; migration 0013 derives
/// this from it for queued messages.
fn status_order_key(s: &CommitStatus) -> String {
    let project = match &s.entry {
        Some(name) => format!("{}#{name}", s.project),
        None => s.project.clone(),
    };
    format!("status:{}:{project}:{}", s.agent.id, s.commit)
}

/// What a new sync report changes, compared with the agent's previous report of the project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportChange {
    /// Failing after success (or first report failing), or succeeding after failure.
    pub transition: Option<TransitionKind>,
    /// A new outcome for the commit (new commit, or the same commit with another outcome).
    pub status: Option<State>,
}

/// Compares a report with the one before (pure). A report identical to the previous one (re-sent
/// after a reconnect) changes nothing.
pub fn report_change(previous: Option<&SyncReport>, report: &SyncReport) -> ReportChange {
    // Waiting for `depends_on` applies nothing: the commit stays pending on forges until its
    // sync, and the sync after the wait is compared as if the wait had not been reported. A
    // superseded sync (applied, not waited for) says neither: the forge keeps the
    // `superseded` kas posted when it sent the newer commit, and the next sync decides.
    if !decides(report) {
        return ReportChange {
            transition: None,
            status: None,
        };
    }
    let ok = report.sync_outcome() != SyncOutcome::Failed;
    // Failing or not before: the previous report's outcome, or what an undecided one carried.
    let failing_before = previous
        .map(|p| {
            if decides(p) {
                p.sync_outcome()
            } else {
                p.decided_before()
            }
        })
        .filter(|o| *o != SyncOutcome::Unspecified)
        .map(|o| o != SyncOutcome::Failed);
    let previous = previous.filter(|p| decides(p));
    let was = previous.map(|p| {
        (
            p.commit_id.as_str(),
            p.sync_outcome() != SyncOutcome::Failed,
        )
    });
    if previous
        .is_some_and(|p| p.commit_id == report.commit_id && p.finished_at == report.finished_at)
    {
        return ReportChange {
            transition: None,
            status: None,
        };
    }
    let transition = match (failing_before, ok) {
        (None | Some(true), false) => Some(TransitionKind::SyncFailed),
        (Some(false), true) => Some(TransitionKind::SyncRecovered),
        _ => None,
    };
    let status = (was != Some((report.commit_id.as_str(), ok))).then_some(if ok {
        State::Success
    } else {
        State::Failed
    });
    ReportChange { transition, status }
}

/// Whether a report decides the commit's outcome: not one waiting for `depends_on` (nothing
/// applied) nor a superseded one (applied, not waited for).
pub fn decides(report: &SyncReport) -> bool {
    !matches!(
        report.sync_outcome(),
        SyncOutcome::Waiting | SyncOutcome::Superseded
    )
}

/// `Kind namespace/name: message` of a report's failed objects, at most 20.
pub fn failed_objects(report: &SyncReport) -> Vec<String> {
    report
        .objects
        .iter()
        .filter(|o| o.state() == ObjectState::Failed)
        .take(20)
        .map(|o| {
            let name = match o.namespace.as_str() {
                "" => o.name.clone(),
                ns => format!("{ns}/{}", o.name),
            };
            format!("{} {name}: {}", o.kind, o.message)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tether_protocol::gitops::ObjectStatus;

    fn report(commit: &str, ok: bool, at: i64) -> SyncReport {
        let mut r = SyncReport {
            commit_id: commit.into(),
            finished_at: at,
            ..SyncReport::default()
        };
        r.set_sync_outcome(if ok {
            SyncOutcome::Succeeded
        } else {
            SyncOutcome::Failed
        });
        r
    }

    #[test]
    fn waiting_for_dependencies_changes_nothing_and_the_sync_after_it_is_a_status() {
        let mut waiting = report("a", true, 2);
        waiting.set_sync_outcome(SyncOutcome::Waiting);
        let none = ReportChange {
            transition: None,
            status: None,
        };
        assert_eq!(report_change(None, &waiting), none);
        assert_eq!(report_change(Some(&report("z", true, 1)), &waiting), none);
        let after = report_change(Some(&waiting), &report("a", true, 3));
        assert_eq!(after.status, Some(State::Success), "{after:?}");
        let failed = report_change(Some(&waiting), &report("a", false, 3));
        assert_eq!(failed.transition, Some(TransitionKind::SyncFailed));
    }

    #[test]
    fn a_superseded_sync_changes_nothing_and_a_failure_before_it_is_not_forgotten() {
        let mut superseded = report("b", false, 2);
        superseded.set_sync_outcome(SyncOutcome::Superseded);
        let none = ReportChange {
            transition: None,
            status: None,
        };
        assert_eq!(
            report_change(Some(&report("a", true, 1)), &superseded),
            none
        );
        assert_eq!(
            report_change(Some(&report("a", false, 1)), &superseded),
            none
        );
        let after = report_change(Some(&superseded), &report("c", true, 3));
        assert_eq!(after.status, Some(State::Success), "{after:?}");
        assert_eq!(after.transition, None, "nothing failed before");
        // Stored after a failure, it carries it (kas sets `decided_before`): the success
        // after it is a recovery, and a failure after it no news.
        superseded.set_decided_before(SyncOutcome::Failed);
        let after = report_change(Some(&superseded), &report("c", true, 3));
        assert_eq!(after.transition, Some(TransitionKind::SyncRecovered));
        let after = report_change(Some(&superseded), &report("c", false, 3));
        assert_eq!(after.transition, None, "still failing");
        assert_eq!(after.status, Some(State::Failed), "a new commit's status");
    }

    #[test]
    fn the_first_report_failing_is_a_failure_and_succeeding_is_only_a_status() {
        let c = report_change(None, &report("a", false, 1));
        assert_eq!(c.transition, Some(TransitionKind::SyncFailed));
        assert_eq!(c.status, Some(State::Failed));
        let c = report_change(None, &report("a", true, 1));
        assert_eq!((c.transition, c.status), (None, Some(State::Success)));
    }

    #[test]
    fn failing_again_is_no_transition_but_a_new_commit_gets_its_status() {
        let before = report("a", false, 1);
        let c = report_change(Some(&before), &report("a", false, 2));
        assert_eq!((c.transition, c.status), (None, None));
        let c = report_change(Some(&before), &report("b", false, 3));
        assert_eq!((c.transition, c.status), (None, Some(State::Failed)));
    }

    #[test]
    fn success_after_failure_is_a_recovery() {
        let c = report_change(Some(&report("a", false, 1)), &report("a", true, 2));
        assert_eq!(c.transition, Some(TransitionKind::SyncRecovered));
        assert_eq!(c.status, Some(State::Success));
    }

    #[test]
    fn a_resent_report_changes_nothing() {
        let r = report("a", false, 5);
        let c = report_change(Some(&r), &r.clone());
        assert_eq!((c.transition, c.status), (None, None));
    }

    #[test]
    fn a_resync_of_an_earlier_commit_while_the_newest_is_refused_is_no_recovery() {
        // agentk re-applies the last good commit (c1) on schedule, and its report stays a
        // failure of the refused newest commit (c2): nobody is told c2 recovered.
        let refused = report("c2", false, 1);
        let mut resync = report("c2", false, 300);
        resync
            .warnings
            .push("nothing was applied at this commit; the objects are as of commit c1".into());
        let c = report_change(Some(&refused), &resync);
        assert_eq!((c.transition, c.status), (None, None));
    }

    #[test]
    fn a_periodic_resync_of_a_good_commit_is_silent() {
        let c = report_change(Some(&report("a", true, 1)), &report("a", true, 300));
        assert_eq!((c.transition, c.status), (None, None));
    }

    #[test]
    fn summaries_count_by_status_and_list_failures() {
        let mut r = report("a", false, 1);
        for (name, state) in [("x", ObjectState::Current), ("y", ObjectState::Failed)] {
            let mut o = ObjectStatus {
                kind: "Deployment".into(),
                namespace: "ns".into(),
                name: name.into(),
                message: "forbidden".into(),
                ..ObjectStatus::default()
            };
            o.set_state(state);
            r.objects.push(o);
        }
        assert_eq!(Summary::of(&r).describe(), "2 objects: 1 Current, 1 Failed");
        assert_eq!(failed_objects(&r), ["Deployment ns/y: forbidden"]);
    }

    #[test]
    fn keys_tell_transitions_and_statuses_apart() {
        let agent = AgentInfo {
            id: 7,
            name: "a".into(),
            project: "g/c".into(),
        };
        let status = |state| {
            Message::Status(CommitStatus {
                state,
                agent: agent.clone(),
                project: "g/m".into(),
                entry: None,
                commit: "c1".into(),
                description: String::new(),
            })
        };
        assert_ne!(
            status(State::Pending).dedup_key(),
            status(State::Success).dedup_key()
        );
        let refused = transition(TransitionKind::CommitRefused);
        assert_eq!(refused.dedup_key(), "commit_refused:g/m:c1");
    }

    /// A transition of `g/m` at `c1` about no agent.
    fn transition(kind: TransitionKind) -> Message {
        Message::Transition(Transition {
            kind,
            agent: None,
            project: "g/m".into(),
            commit: "c1".into(),
            message: String::new(),
            summary: Summary::default(),
            failed_objects: Vec::new(),
            at: 1,
        })
    }

    /// Every state of one commit's status for one agent shares an ordering key (the forge
    /// keeps the last one posted), which is the deduplication key without the state, as
    /// migration 0013 derives it; another commit or agent is another status; transitions are
    /// not ordered.
    #[test]
    fn statuses_of_one_commit_and_agent_share_an_ordering_key() {
        let status = |agent: i64, commit: &str, state| {
            Message::Status(CommitStatus {
                state,
                agent: AgentInfo {
                    id: agent,
                    name: "a".into(),
                    project: "g/c".into(),
                },
                project: "g/m".into(),
                entry: None,
                commit: commit.into(),
                description: String::new(),
            })
        };
        let states = [
            State::Pending,
            State::Success,
            State::Failed,
            State::Superseded,
        ];
        for state in states {
            let m = status(7, "c1", state);
            let key = m.order_key().unwrap();
            assert_eq!(key, "status:7:g/m:c1");
            assert_eq!(m.dedup_key(), format!("{key}:{state:?}"));
        }
        assert_ne!(
            status(7, "c1", State::Pending).order_key(),
            status(7, "c2", State::Pending).order_key()
        );
        assert_ne!(
            status(7, "c1", State::Pending).order_key(),
            status(8, "c1", State::Pending).order_key()
        );
        let recovered = transition(TransitionKind::SyncRecovered);
        assert_eq!(recovered.order_key(), None);
    }
}
