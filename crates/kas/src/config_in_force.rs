//! An agent's configuration in force, as fresh as this replica can know it.
//!
//! The replica serving the agent's configuration stream keeps it in memory and stores it. The
//! other replicas' memory holds what the store had when they started (or last served the
//! agent), so with several replicas an agent held elsewhere is read from the store: otherwise
//! a `ci_access` changed since then would be ignored (a job refused, or its kubeconfig
//! missing the agent).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tether_agent_config::AgentConfig;
use tether_configuration_server::ConfigStates;
use tether_store::Store;
use tether_tunnel_server::Registry;

/// How often a configuration not stored yet is read again while a request waits for it.
const STORED_POLL: Duration = Duration::from_millis(250);

/// Where an agent's configuration in force is known.
#[derive(Debug, Clone, Copy)]
pub struct InForce<'a> {
    pub configs: &'a ConfigStates,
    pub store: &'a dyn Store,
    pub registry: &'a Registry,
    /// Several replicas (`peers:`): an agent may be held by another one.
    pub several: bool,
}

impl InForce<'_> {
    /// Whether the agent's configuration stream may be on another replica.
    fn elsewhere(&self, agent_id: i64) -> bool {
        self.several && !self.registry.has_agent(agent_id)
    }

    /// The agent's configuration in force: from the store when another replica may hold the
    /// agent, else from memory, waiting up to `wait` for it there.
    ///
    /// When another replica may hold the agent and the store has no configuration for it,
    /// there is none: the agent was deleted (its state goes with it), or has never had one.
    /// This replica's memory of it is stale then, and used to authorize CI jobs and people
    /// for a deleted agent until this replica heard of the deletion. Only a store that cannot
    /// answer falls back to memory (an outage is not a deletion).
    ///
    /// A configuration not stored yet is waited for (read again every [`STORED_POLL`], up to
    /// `wait`): an agent that just connected to another replica has its configuration stored
    /// there a moment later, and a request through this replica must not fail meanwhile.
    pub async fn wait(&self, agent_id: i64, wait: Duration) -> Option<Arc<AgentConfig>> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.elsewhere(agent_id) {
            match self.configs.load_agent(self.store, agent_id).await {
                Ok(Some(found)) => return Some(found),
                Ok(None) if tokio::time::Instant::now() >= deadline => return None,
                Ok(None) => {
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + STORED_POLL),
                    )
                    .await
                }
                Err(e) => {
                    tracing::warn!(agent_id, error = %e, "Cannot read the agent's stored configuration; using this replica's memory of it");
                    break;
                }
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.configs.wait_config(agent_id, left).await
    }

    /// As [`InForce::wait`], without waiting.
    pub async fn now(&self, agent_id: i64) -> Option<Arc<AgentConfig>> {
        self.wait(agent_id, Duration::ZERO).await
    }

    /// The configurations in force of `agents`, the stored ones read at once (one query
    /// however many agents there are). An agent with no configuration known is left out.
    pub async fn all(
        &self,
        agents: &[i64],
    ) -> Result<HashMap<i64, Arc<AgentConfig>>, tether_store::Error> {
        let stored = if self.several {
            self.configs.stored_configs(self.store).await?
        } else {
            HashMap::new()
        };
        // As in `wait`: for an agent held elsewhere only the store counts.
        let known = agents.iter().filter_map(|&id| {
            let config = if self.elsewhere(id) {
                stored.get(&id).cloned()
            } else {
                self.configs.config(id)
            }?;
            Some((id, config))
        });
        Ok(known.collect())
    }
}

/// The manifest projects an agent may read and report on, for the GitOps service: those its
/// configuration in force lists ([`InForce`], so with several replicas the stored one).
pub struct AgentProjects {
    pub configs: Arc<ConfigStates>,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub several: bool,
    /// Which manifest projects an agent's configuration may list.
    pub manifest_access: tether_agent_config::ManifestAccess,
}

impl std::fmt::Debug for AgentProjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentProjects")
            .field("several", &self.several)
            .finish_non_exhaustive()
    }
}

/// How long a stream opened right after a kas restart waits for the agent's configuration to
/// be known, as a proxied request does.
const CONFIG_WAIT: Duration = Duration::from_secs(10);

impl tether_gitops_server::ProjectAccess for AgentProjects {
    fn listed(
        &self,
        agent_id: i64,
    ) -> tether_tunnel_server::service_future::BoxFuture<
        '_,
        Option<Vec<tether_agent_config::EntryRef>>,
    > {
        Box::pin(async move {
            let in_force = InForce {
                configs: &self.configs,
                store: self.store.as_ref(),
                registry: &self.registry,
                several: self.several,
            };
            let config = in_force.wait(agent_id, CONFIG_WAIT).await?;
            let ids =
                config
                    .gitops
                    .manifest_projects
                    .iter()
                    .map(|p| tether_agent_config::EntryRef {
                        project: p.id.clone(),
                        name: p.name.clone(),
                    });
            Some(ids.collect())
        })
    }

    fn outside(
        &self,
        agent_id: i64,
        project_path: &str,
    ) -> tether_tunnel_server::service_future::BoxFuture<'_, Option<String>> {
        let project_path = project_path.to_owned();
        Box::pin(async move {
            // Fails closed: an agent or project kas cannot read now is refused, and agentk
            // asks again.
            let config_project = match self.store.get_agent(agent_id).await {
                Ok(Some(agent)) => self.store.get_project(agent.project_id).await,
                Ok(None) => return Some(format!("agent {agent_id} is not registered")),
                Err(e) => Err(e),
            };
            let config_project = match config_project {
                Ok(Some(p)) => p.path,
                Ok(None) => return Some(format!("agent {agent_id} has no configuration project")),
                Err(e) => {
                    return Some(format!(
                        "cannot read the agent's configuration project: {e}"
                    ));
                }
            };
            (!self.manifest_access.allows(&config_project, &project_path)).then(|| {
                tether_agent_config::ManifestAccess::refusal(&config_project, &project_path)
            })
        })
    }
}
