//! What the replicas (Pods) of an agent run, across kas replicas.
//!
//! Each kas replica knows what the agent replicas whose configuration stream it serves run.
//! With several kas replicas, one agent's Pods may be connected to different kas replicas; a
//! decision about the configuration in force taken on what one kas replica knows alone went
//! wrong: a Pod of an older agentk refusing the newest configuration took it out of force on
//! its kas replica (and, through the store, for every replica) although another Pod, on another
//! kas replica, ran it. A [`RunningDirectory`] (kas keeps one in Redis) tells each kas replica
//! what the others' Pods run; the decisions read the union ([`union`]).

use tether_tunnel_server::service_future::BoxFuture;

/// What one replica (Pod) of an agent runs, as the kas replica serving its configuration
/// stream tells the others.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRuns {
    /// The Pod agentk names on its streams (`namespace/name`).
    pub replica: String,
    /// The commit it runs.
    pub commit: String,
    /// Unix milliseconds when its kas replica learned it: a Pod that moved between kas
    /// replicas may be listed by both for a moment, and the later one is true.
    pub at: u64,
}

/// Why the directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirectoryError(pub String);

/// Where kas replicas tell each other what the agent replicas whose streams they serve run.
/// Entries of a kas replica that stopped (killed, or cut off) must stop counting by
/// themselves: they live only while that kas replica refreshes them.
pub trait RunningDirectory: Send + Sync + std::fmt::Debug {
    /// Records that this kas replica's stream `stream` of the agent runs `runs` (replacing
    /// what that stream ran).
    fn publish(
        &self,
        agent_id: i64,
        stream: u64,
        runs: ReplicaRuns,
    ) -> BoxFuture<'_, Result<(), DirectoryError>>;

    /// Stream `stream` of the agent ended.
    fn withdraw(&self, agent_id: i64, stream: u64) -> BoxFuture<'_, Result<(), DirectoryError>>;

    /// What the agent's replicas connected to the other live kas replicas run.
    fn elsewhere(&self, agent_id: i64) -> BoxFuture<'_, Result<Vec<ReplicaRuns>, DirectoryError>>;

    /// Removes the agent's entries of kas replicas no longer alive (killed: they withdrew
    /// nothing); true when this call removed some, so that one kas replica decides again
    /// once per death. A Pod reconnecting withdraws its entry before its new stream
    /// publishes one, so an entry merely missing says nothing.
    fn departed(&self, agent_id: i64) -> BoxFuture<'_, Result<bool, DirectoryError>>;

    /// This kas replica put another configuration in force for the agent (and stored it): the
    /// others, whose memory may hold the agent's former one, read the store again.
    fn in_force_changed(&self, agent_id: i64) -> BoxFuture<'_, Result<(), DirectoryError>>;
}

/// The agent's replicas as this kas replica's and the others' entries tell, each Pod once —
/// its latest entry (pure).
pub fn union(entries: impl IntoIterator<Item = ReplicaRuns>) -> Vec<ReplicaRuns> {
    let mut out: Vec<ReplicaRuns> = Vec::new();
    for e in entries {
        match out.iter_mut().find(|o| o.replica == e.replica) {
            Some(o) if o.at <= e.at => *o = e,
            Some(_) => {}
            None => out.push(e),
        }
    }
    out
}

/// Whether a replica other than `replica` runs `commit` (pure). Replicas are told apart by
/// Pod: an agent reopening its own stream is the same replica, wherever kas sees it.
pub fn runs_elsewhere(replicas: &[ReplicaRuns], replica: &str, commit: &str) -> bool {
    replicas
        .iter()
        .any(|r| r.replica != replica && r.commit == commit)
}

/// The commit every replica in `replicas` runs, when they agree on one other than `in_force`
/// (pure): no replica runs the configuration in force any more, so the one they run is.
pub fn agreed<'a>(replicas: &'a [ReplicaRuns], in_force: &str) -> Option<&'a ReplicaRuns> {
    let first = replicas.first()?;
    let all = replicas.iter().all(|r| r.commit == first.commit);
    (all && first.commit != in_force).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(replica: &str, commit: &str, at: u64) -> ReplicaRuns {
        ReplicaRuns {
            replica: replica.into(),
            commit: commit.into(),
            at,
        }
    }

    #[test]
    fn a_pod_listed_by_two_kas_replicas_counts_once_with_its_latest_commit() {
        let all = union([
            runs("ns/a", "c1", 10),
            runs("ns/b", "c2", 11),
            runs("ns/a", "c2", 12),
            runs("ns/b", "c1", 5),
        ]);
        assert_eq!(all, vec![runs("ns/a", "c2", 12), runs("ns/b", "c2", 11)]);
    }

    #[test]
    fn a_commit_runs_elsewhere_only_on_another_pod() {
        let all = [runs("ns/new", "c2", 1), runs("ns/old", "c1", 2)];
        assert!(runs_elsewhere(&all, "ns/old", "c2"));
        assert!(!runs_elsewhere(&all, "ns/new", "c2"), "not the asking pod");
        assert!(!runs_elsewhere(&all, "ns/new", "c3"));
    }

    #[test]
    fn replicas_left_agreeing_on_another_commit_than_the_one_in_force_put_theirs_in_force() {
        let agree = [runs("ns/a", "c1", 1), runs("ns/b", "c1", 2)];
        assert_eq!(agreed(&agree, "c2").map(|r| r.commit.as_str()), Some("c1"));
        assert!(agreed(&agree, "c1").is_none(), "already in force");
        let disagree = [runs("ns/a", "c1", 1), runs("ns/b", "c3", 2)];
        assert!(agreed(&disagree, "c2").is_none());
        assert!(agreed(&[], "c2").is_none(), "no replica left");
    }
}
