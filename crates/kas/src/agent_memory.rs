//! What a replica keeps in memory about agents, and forgetting deleted ones on every replica.
//!
//! Each replica remembers agents' configuration in force (it authorizes CI jobs and people by
//! `ci_access` and `user_access`), their syncs under way, their GitOps directives and their
//! configuration projects. Deleting an agent forgets it on the replica asked at once, and that
//! replica publishes [`crate::cluster::ClusterEvent::AgentDeleted`] so the others forget it
//! within a second. A message lost (the subscription was down) is made up for by
//! [`DeletedAgents::follow`]: every replica compares the agents it remembers with the store
//! every [`DELETED_RECHECK`]. Meanwhile the proxy does not authorize from that memory: it finds
//! the agent's configuration project in the store (remembered for 5 s at most) and, for an
//! agent another replica holds, its configuration there too (see
//! [`crate::config_in_force::InForce`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tether_configuration_server::ConfigStates;
use tether_gitops_server::{Controls, SyncStates};
use tether_store::Store;
use tether_tunnel_server::{Authenticator, Registry};
use tokio_util::sync::CancellationToken;

use crate::kubeproxy::AgentProjects;

/// How often a replica looks for deleted agents it still remembers.
pub const DELETED_RECHECK: Duration = Duration::from_secs(10);

/// Everything a replica remembers per agent; cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentMemory {
    pub configs: Arc<ConfigStates>,
    pub syncs: Arc<SyncStates>,
    pub controls: Arc<Controls>,
    pub projects: Arc<AgentProjects>,
}

impl AgentMemory {
    /// Forgets what this replica keeps about the agent.
    pub fn forget(&self, agent_id: i64) {
        self.configs.forget(agent_id);
        self.syncs.forget(agent_id);
        self.controls.forget(agent_id);
        self.projects.forget(agent_id);
    }

    /// The agents this replica keeps something about (the project cache expires by itself).
    pub fn remembered(&self) -> HashSet<i64> {
        let mut ids = self.configs.agent_ids();
        ids.extend(self.syncs.agent_ids());
        ids.extend(self.controls.agent_ids());
        ids
    }
}

/// What looking for deleted agents needs.
pub struct DeletedAgents {
    pub memory: AgentMemory,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub auth: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for DeletedAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeletedAgents")
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl DeletedAgents {
    /// Forgets, every [`DELETED_RECHECK`] until `stop`, the agents this replica remembers that
    /// the store no longer has: deleted through another replica whose message did not arrive,
    /// or behind kas's back. One query per replica, whatever the number of agents.
    pub async fn follow(self, stop: CancellationToken) {
        crate::modules::every(DELETED_RECHECK, stop, || async {
            self.forget_deleted().await;
        })
        .await;
    }

    /// One look for deleted agents; which were forgotten.
    pub async fn forget_deleted(&self) -> Vec<i64> {
        // Taken before reading the store: an agent registered after that read and remembered
        // since is not in this snapshot, so it cannot be mistaken for a deleted one.
        let remembered = self.memory.remembered();
        if remembered.is_empty() {
            return Vec::new();
        }
        // A failed read is the readiness check's to report; the next tick tries again.
        let Ok(agents) = self.store.list_agents().await else {
            return Vec::new();
        };
        let stored: HashSet<i64> = agents.iter().map(|a| a.id).collect();
        let gone = deleted(&remembered, &stored);
        if gone.is_empty() {
            return gone;
        }
        // The revocation of the agent's tokens was not heard of either: their streams here
        // (tunnels, configuration, GitOps) would carry requests to the cluster and record the
        // agent again until the token re-check. Ended first, then forgotten.
        let streams_ended = self.registry.recheck_tokens(self.auth.as_ref()).await;
        for &agent_id in &gone {
            self.memory.forget(agent_id);
        }
        tracing::info!(agents = ?gone, streams_ended, "Forgot deleted agents (their deletion was not heard of here)");
        gone
    }
}

/// The remembered agents the store no longer has, in id order (pure).
fn deleted(remembered: &HashSet<i64>, stored: &HashSet<i64>) -> Vec<i64> {
    let mut gone: Vec<i64> = remembered.difference(stored).copied().collect();
    gone.sort_unstable();
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_agents_missing_from_the_store_are_deleted_ones() {
        let remembered: HashSet<i64> = [1, 2, 5].into();
        let stored: HashSet<i64> = [2, 3, 4].into();
        assert_eq!(deleted(&remembered, &stored), vec![1, 5]);
        assert!(deleted(&stored, &stored).is_empty());
        assert!(deleted(&HashSet::new(), &stored).is_empty());
    }
}
