//! The leader election as Prometheus metrics, so that "no replica leads" can be seen and
//! alerted on: it stops GitOps for the whole agent while every replica's tunnel, and so its
//! readiness, looks fine, and a follower's GitOps series are gone.
//!
//! Labelled by the Lease's name (`agent-<id>-lock`, one per agent): replicas of one agent
//! export the same label, so a rule can ask whether any of them leads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabel {
    lease: String,
}

/// The election's metrics; cheap to clone (the series are shared).
#[derive(Clone, Debug, Default)]
pub struct ElectionMetrics {
    leader: Family<LeaseLabel, Gauge>,
    failures: Family<LeaseLabel, Counter>,
}

impl ElectionMetrics {
    /// Registers the series (names get the registry's prefix, e.g. `agentk_`).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "leader",
            "Whether this replica holds the agent's leader Lease and applies GitOps (1) or not (0)",
            self.leader.clone(),
        );
        reg.register(
            "leader_election_failures",
            "Rounds of the leader election that failed: the Lease could not be read or written (refused, or no answer within the renew deadline)",
            self.failures.clone(),
        );
    }

    /// The election for `lease` starts: both series exist from now on (0, not absent, so a
    /// replica that never leads is counted as one that does not).
    pub(super) fn started(&self, lease: &str) {
        self.leading(lease, false);
        let _ = self.failures.get_or_create(&label(lease));
    }

    /// There is no election (`--leader-election=false`, or no namespace for the Lease): this
    /// replica applies unconditionally, so it is exported as a leader, under the empty Lease
    /// name (Prometheus stores the series without the label). Absent instead, dashboards and
    /// `TetherAgentNoLeader` could not tell an agent that applies from one that never started
    /// its election.
    pub fn unconditional(&self) {
        self.leading("", true);
    }

    pub(super) fn leading(&self, lease: &str, lead: bool) {
        self.leader
            .get_or_create(&label(lease))
            .set(i64::from(lead));
    }

    pub(super) fn failed(&self, lease: &str) {
        self.failures.get_or_create(&label(lease)).inc();
    }
}

fn label(lease: &str) -> LeaseLabel {
    LeaseLabel {
        lease: lease.to_owned(),
    }
}
