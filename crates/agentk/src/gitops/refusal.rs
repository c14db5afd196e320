//! The newest commit kas offered that cannot be applied (kas refused it, or so did agentk), and
//! what that makes of the reports of the last good commit's re-syncs. Pure.
//!
//! While such a refusal stands, the worker keeps re-applying the last good commit (drift
//! correction), but a report of that re-sync must not say "succeeded": the project is not at
//! its newest commit, and a success would replace the failure in `kas agent status`, tell
//! receivers it recovered, and keep the GitOps alerts quiet.

use tether_protocol::gitops::{self as wire, SyncReport};

/// A commit refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    /// Empty when kas could not even name one (the ref does not resolve).
    pub commit_id: String,
    pub message: String,
}

impl Refusal {
    /// The same refusal told again: the same commit, or, when none could be named, the same
    /// reason (a refusal's message may differ between tellings, e.g. by a work folder's name).
    pub(super) fn same_commit(&self, other: &Refusal) -> bool {
        if self.commit_id.is_empty() && other.commit_id.is_empty() {
            return self.message == other.message;
        }
        self.commit_id == other.commit_id
    }
}

/// The report of a sync of an earlier commit made while `refusal` stands: a failure of the
/// refused commit, with its reason, showing the objects as the re-sync left them (said to be
/// of the commit applied). A failure of the re-sync itself is added to the reason.
pub(super) fn carry(mut report: SyncReport, refusal: &Refusal) -> SyncReport {
    let applied = std::mem::take(&mut report.commit_id);
    report.error = if report.error.is_empty() {
        refusal.message.clone()
    } else {
        format!(
            "{}; re-applying commit {applied} failed too: {}",
            refusal.message, report.error
        )
    };
    report.commit_id = if refusal.commit_id.is_empty() {
        applied.clone()
    } else {
        refusal.commit_id.clone()
    };
    report.set_sync_outcome(wire::SyncOutcome::Failed);
    // The applied commit's own selection warnings are not the refused commit's.
    report.warnings = vec![format!(
        "{} {applied}",
        tether_protocol::report::OBJECTS_AS_OF
    )];
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::gitops::ObjectStatus;

    fn resync_of(commit: &str, outcome: wire::SyncOutcome, error: &str) -> SyncReport {
        let mut r = SyncReport {
            project_id: "group/manifests".into(),
            commit_id: commit.into(),
            error: error.into(),
            objects: vec![ObjectStatus {
                kind: "ConfigMap".into(),
                name: "app".into(),
                ..ObjectStatus::default()
            }],
            warnings: vec!["c1's own warning".into()],
            resync_id: 7,
            inventory_namespace: "apps".into(),
            ..SyncReport::default()
        };
        r.set_sync_outcome(outcome);
        r
    }

    /// The re-sync of `c1` (ending as `outcome` with `error`) while `refused` stands.
    fn carried(outcome: wire::SyncOutcome, error: &str, refused: &str) -> SyncReport {
        let refusal = Refusal {
            commit_id: refused.into(),
            message: "a.yaml is matched by two globs".into(),
        };
        carry(resync_of("c1", outcome, error), &refusal)
    }

    #[test]
    fn a_successful_resync_of_the_last_good_commit_reports_the_refused_one_failed() {
        let r = carried(wire::SyncOutcome::Succeeded, "", "c2");
        assert_eq!(r.commit_id, "c2");
        assert_eq!(r.sync_outcome(), wire::SyncOutcome::Failed);
        assert_eq!(r.error, "a.yaml is matched by two globs");
        assert_eq!(
            r.warnings,
            ["nothing was applied at this commit; the objects are as of commit c1"]
        );
        // What the re-sync found and answered stays.
        assert_eq!(r.objects.len(), 1);
        assert_eq!((r.resync_id, r.inventory_namespace.as_str()), (7, "apps"));
    }

    #[test]
    fn a_failed_resync_adds_its_own_error_to_the_reason() {
        let r = carried(wire::SyncOutcome::Failed, "1 resources failed", "c2");
        assert_eq!(
            r.error,
            "a.yaml is matched by two globs; re-applying commit c1 failed too: 1 resources failed"
        );
    }

    #[test]
    fn a_refusal_told_again_is_recognised_by_its_commit() {
        let r = |commit: &str, message: &str| Refusal {
            commit_id: commit.into(),
            message: message.into(),
        };
        assert!(r("c2", "in /tmp/a: failed").same_commit(&r("c2", "in /tmp/b: failed")));
        assert!(!r("c2", "failed").same_commit(&r("c3", "failed")));
        assert!(r("", "branch gone").same_commit(&r("", "branch gone")));
        assert!(!r("", "branch gone").same_commit(&r("", "tag gone")));
    }

    #[test]
    fn a_refusal_naming_no_commit_keeps_the_applied_one() {
        let r = carried(wire::SyncOutcome::Succeeded, "", "");
        assert_eq!(r.commit_id, "c1");
        assert_eq!(r.sync_outcome(), wire::SyncOutcome::Failed);
    }
}
