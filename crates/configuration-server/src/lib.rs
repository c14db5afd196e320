//! Server half of agent configuration: reads `.gitlab/agents/<name>/config.yaml` from the agent's
//! configuration project at the default branch's newest commit, validates it, and streams it to
//! the agent whenever that commit changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tether_agent_config::MAX_CONFIG_SIZE;
use tether_git_source::{CommitId, Sources};
use tether_protocol::agent_configuration::agent_configuration_server::{
    AgentConfiguration, AgentConfigurationServer,
};
use tether_protocol::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use tether_store::Store;
use tether_tunnel_server::{AgentIdentity, Authenticator, Registry, authenticate_request};
use tonic::{Request, Response, Status};

pub mod shared;

pub use shared::{DirectoryError, ReplicaRuns, RunningDirectory};

/// Where an agent's configuration file may be, in order (the second form is in the seed).
pub fn config_paths(agent_name: &str) -> [String; 2] {
    [
        format!(".gitlab/agents/{agent_name}/config.yaml"),
        format!(".gitlab/agent/{agent_name}/config.yaml"),
    ]
}

/// What kas knows of an agent's configuration, for the admin commands.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConfigState {
    /// Commit of the configuration in force ("" when none was sent yet).
    pub commit: String,
    /// The file it came from ("" for the empty default).
    pub file: String,
    /// Why the newest commit's file was refused, if it was.
    pub error: Option<String>,
    pub error_commit: Option<String>,
    /// Unix seconds of the last change of this state.
    pub updated_at: u64,
}

/// Per-agent configuration states, and the configuration in force (for authorizing requests
/// of CI jobs and users against `ci_access` / `user_access`).
#[derive(Debug, Default)]
pub struct ConfigStates {
    states: Mutex<HashMap<i64, ConfigState>>,
    in_force: Mutex<HashMap<i64, Arc<tether_agent_config::AgentConfig>>>,
    /// Woken whenever a configuration is recorded (see [`ConfigStates::wait_config`]).
    recorded: tokio::sync::Notify,
    /// Configurations refused since kas started (one per refused commit and agent stream).
    refusals: prometheus_client::metrics::counter::Counter,
    /// The configuration in force before the last one kas sent (see [`Previous`]).
    previous: Mutex<HashMap<i64, Previous>>,
    /// What each replica of an agent runs, as far as its configuration stream on this kas
    /// tells (a few replicas per agent: a list is smaller than a map).
    running: Mutex<HashMap<i64, Vec<Running>>>,
    /// Agents whose state this replica failed to store, written again by
    /// [`ConfigStates::store_again`] until it is stored; their number is a gauge.
    unstored: Mutex<HashMap<i64, UnstoredWrite>>,
    unstored_count: prometheus_client::metrics::gauge::Gauge,
    /// This replica's own changes, so that [`ConfigStates::reload_all`] never puts an older
    /// stored record over one changed (or being written) meanwhile.
    changes: Mutex<LocalChanges>,
}

/// An agent's state this replica failed to store (see [`ConfigStates::unstored_write`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnstoredWrite {
    /// Unix seconds of the first failed write.
    pub since: u64,
    /// Why the last write failed.
    pub error: String,
}

/// Which agents' records this replica changed, and when (in its own count of changes).
#[derive(Debug, Default)]
struct LocalChanges {
    seq: u64,
    last: HashMap<i64, u64>,
    /// Writes of the agent's record under way.
    writing: HashMap<i64, usize>,
}

impl LocalChanges {
    fn touch(&mut self, agent_id: i64) {
        self.seq += 1;
        self.last.insert(agent_id, self.seq);
    }

    fn begin_write(&mut self, agent_id: i64) {
        self.touch(agent_id);
        *self.writing.entry(agent_id).or_default() += 1;
    }

    /// The write's end counts as a change too: a read of the store that started before it
    /// may have missed what it wrote.
    fn end_write(&mut self, agent_id: i64) {
        self.touch(agent_id);
        if let Some(n) = self.writing.get_mut(&agent_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.writing.remove(&agent_id);
            }
        }
    }

    /// Whether the agent's record changed here after change `seq`, or is being written.
    fn since(&self, agent_id: i64, seq: u64) -> bool {
        self.writing.contains_key(&agent_id) || self.last.get(&agent_id).is_some_and(|&s| s > seq)
    }
}

/// How often [`ConfigStates::store_again`] should run: the other kas replicas authorize with
/// the stored configuration, so a failed write is retried within seconds of the database
/// taking writes again.
pub const STORE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// What one replica (Pod) of an agent runs, as its latest configuration stream on this kas
/// tells: the commit sent to it (and not refused) or adopted from it, with its configuration,
/// so that the configuration in force can follow the replicas without reading Git.
#[derive(Debug, Clone)]
struct Running {
    replica: String,
    stream: u64,
    commit: String,
    file: String,
    config: Arc<tether_agent_config::AgentConfig>,
    /// Unix milliseconds when this stream started running it (see [`ReplicaRuns::at`]).
    at: u64,
}

impl Running {
    fn shared(&self) -> ReplicaRuns {
        ReplicaRuns {
            replica: self.replica.clone(),
            commit: self.commit.clone(),
            at: self.at,
        }
    }
}

/// The commit an agent's replicas agree on (see [`ConfigStates::agreed_with`]).
#[derive(Debug)]
enum Agreed {
    /// A stream here runs it: its configuration is at hand.
    Here(Running),
    /// Only replicas on other kas replicas run it: its configuration is read from Git.
    Elsewhere(ReplicaRuns),
}

/// The configuration in force before kas sent the one it now records as in force. kas records
/// a configuration when it sends it, so without this an agent refusing it (an older agentk not
/// knowing a new field) left kas — and a freshly started agent — with no configuration at all.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Previous {
    commit: String,
    file: String,
    config: Arc<tether_agent_config::AgentConfig>,
}

impl ConfigStates {
    /// Registers `configuration_refusals_total` (no per-agent label: `kas agent status` names
    /// the agent and the reason).
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "configuration_refusals",
            "Agent configurations refused (invalid or over the size limit); the last good one stays",
            self.refusals.clone(),
        );
        reg.register(
            "configuration_unstored_agents",
            "Agents whose configuration in force this replica failed to store and retries; the other replicas authorize with the stored one meanwhile",
            self.unstored_count.clone(),
        );
    }

    /// The configuration in force for an agent, waiting up to `timeout` for it to become known.
    ///
    /// Right after a kas restart an agent's tunnels and its configuration stream come back
    /// independently; a request arriving in between must wait for the configuration like it
    /// waits for a tunnel, not be authorized against nothing (and refused).
    pub async fn wait_config(
        &self,
        agent_id: i64,
        timeout: std::time::Duration,
    ) -> Option<Arc<tether_agent_config::AgentConfig>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a configuration recorded in between wakes us.
            let notified = self.recorded.notified();
            if let Some(config) = self.config(agent_id) {
                return Some(config);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The configuration in force for an agent, if one was sent.
    pub fn config(&self, agent_id: i64) -> Option<Arc<tether_agent_config::AgentConfig>> {
        self.in_force
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&agent_id)
            .cloned()
    }

    /// Resolves when a configuration is next recorded, for any agent (a notification sent
    /// while the caller is not waiting is missed: callers also re-check periodically).
    pub async fn changed(&self) {
        self.recorded.notified().await;
    }

    fn set_config(&self, agent_id: i64, config: impl Into<Arc<tether_agent_config::AgentConfig>>) {
        // Counted before it is made, so that a concurrent `reload_all` sees it (see there).
        self.changes().touch(agent_id);
        self.insert_config(agent_id, config.into());
    }

    fn insert_config(&self, agent_id: i64, config: Arc<tether_agent_config::AgentConfig>) {
        self.in_force
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(agent_id, config);
        self.recorded.notify_waiters();
    }

    /// The agent has no configuration in force (it refused the only one sent): requests
    /// needing one wait for it, then fail, rather than being authorized by a configuration
    /// the agent does not run.
    fn clear_config(&self, agent_id: i64) {
        self.changes().touch(agent_id);
        self.in_force
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&agent_id);
    }

    fn changes(&self) -> std::sync::MutexGuard<'_, LocalChanges> {
        self.changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Previous>> {
        self.previous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Vec<Running>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what a replica of the agent runs. A replica's stream is replaced by the one it
    /// reopens, which kas may see first: an older stream never overwrites a newer one.
    fn set_running(&self, agent_id: i64, new: Running) {
        let mut running = self.running();
        let replicas = running.entry(agent_id).or_default();
        match replicas.iter_mut().find(|r| r.replica == new.replica) {
            Some(r) if r.stream <= new.stream => *r = new,
            Some(_) => {}
            None => replicas.push(new),
        }
    }

    /// The replica's stream `stream` ended: it is forgotten (unless it reopened since). If no
    /// replica left runs the configuration in force and those left agree on one, that one is
    /// returned, to be put in force: at the end of a rollout (or its rollback) the configuration
    /// in force is the one every replica runs, not the one the last pod gone ran. This looks
    /// at the streams this kas serves only; see [`ConfigStates::agreed_with`] for the others'.
    fn stream_ended(&self, agent_id: i64, replica: &str, stream: u64) -> Option<Running> {
        {
            let mut running = self.running();
            let replicas = running.get_mut(&agent_id)?;
            replicas.retain(|r| r.replica != replica || r.stream != stream);
            if replicas.is_empty() {
                running.remove(&agent_id);
                return None;
            }
        }
        match self.agreed_with(agent_id, Vec::new())? {
            Agreed::Here(running) => Some(running),
            Agreed::Elsewhere(_) => None,
        }
    }

    /// What the agent's replicas on this kas run, each once (see [`shared::union`]).
    fn local_replicas(&self, agent_id: i64) -> Vec<ReplicaRuns> {
        let running = self.running();
        let replicas = running
            .get(&agent_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        shared::union(replicas.iter().map(Running::shared))
    }

    /// The commit the agent's replicas — on this kas, and `elsewhere` (on the other kas
    /// replicas) — agree on when it is not the one in force.
    fn agreed_with(&self, agent_id: i64, elsewhere: Vec<ReplicaRuns>) -> Option<Agreed> {
        let all = shared::union(self.local_replicas(agent_id).into_iter().chain(elsewhere));
        let in_force = self.get(agent_id).map(|s| s.commit).unwrap_or_default();
        let agreed = shared::agreed(&all, &in_force)?;
        let here = self.running().get(&agent_id).and_then(|replicas| {
            let found = replicas.iter().find(|r| r.commit == agreed.commit);
            found.cloned()
        });
        Some(here.map_or_else(|| Agreed::Elsewhere(agreed.clone()), Agreed::Here))
    }

    /// The agents with replicas connected here none of which runs the configuration in force:
    /// it is in force because replicas on other kas replicas run it (see
    /// [`ConfigService::decide_again`]).
    fn in_force_only_elsewhere(&self) -> Vec<i64> {
        let ids: Vec<i64> = self.running().keys().copied().collect();
        ids.into_iter()
            .filter(|&agent_id| {
                let Some(in_force) = self.get(agent_id).map(|s| s.commit) else {
                    return false;
                };
                let here = self.local_replicas(agent_id);
                !in_force.is_empty()
                    && !here.is_empty()
                    && here.iter().all(|r| r.commit != in_force)
            })
            .collect()
    }

    /// Puts what the replicas left run in force (see [`ConfigStates::stream_ended`]).
    fn follow_replicas(&self, agent_id: i64, running: Running) {
        tracing::info!(agent_id, commit_id = %running.commit, "Every replica of the agent still connected runs this configuration; it is in force");
        self.keep_previous(agent_id, &running.commit);
        self.put_in_force(agent_id, running.commit, running.file, running.config);
    }

    /// Records `config` (of `commit`, from `file`) as the agent's configuration in force.
    fn put_in_force(
        &self,
        agent_id: i64,
        commit: String,
        file: String,
        config: Arc<tether_agent_config::AgentConfig>,
    ) {
        self.set_config(agent_id, config);
        self.update(agent_id, |s| {
            s.commit = commit;
            s.file = file;
        });
    }

    /// Whether another replica of the agent runs `commit` (a newer agentk, mid-rollout): then
    /// a replica's refusal of it, or its reconnecting with an older commit, does not take it
    /// out of force. Replicas are told apart by pod; an agent reopening its own stream (with
    /// the refusal) is the same replica, whichever stream kas sees end first.
    fn runs_elsewhere(&self, agent_id: i64, replica: &str, commit: &str) -> bool {
        shared::runs_elsewhere(&self.local_replicas(agent_id), replica, commit)
    }

    /// As [`ConfigStates::runs_elsewhere`], counting also the agent's replicas connected to
    /// the other kas replicas, as `directory` tells. Those are read only when no replica here
    /// runs `commit`; when they cannot be read, this kas's replicas alone decide (as with one
    /// kas), which is logged.
    async fn runs_anywhere_else(
        &self,
        directory: Option<&dyn RunningDirectory>,
        (agent_id, replica, commit): (i64, &str, &str),
    ) -> bool {
        if self.runs_elsewhere(agent_id, replica, commit) {
            return true;
        }
        let Some(directory) = directory else {
            return false;
        };
        match directory.elsewhere(agent_id).await {
            Ok(others) => {
                let all = shared::union(self.local_replicas(agent_id).into_iter().chain(others));
                shared::runs_elsewhere(&all, replica, commit)
            }
            Err(e) => {
                tracing::warn!(agent_id, error = %e, "Cannot read what the agent's replicas on other kas replicas run; deciding on this replica's alone");
                false
            }
        }
    }

    /// Before `commit` is recorded as in force: keeps what was in force until then, unless it
    /// is `commit` itself (sent again to a new stream) or nothing.
    fn keep_previous(&self, agent_id: i64, commit: &str) {
        let Some(state) = self.get(agent_id) else {
            return;
        };
        if state.commit.is_empty() || state.commit == commit {
            return;
        }
        if let Some(config) = self.config(agent_id) {
            let previous = Previous {
                commit: state.commit,
                file: state.file,
                config,
            };
            self.kept().insert(agent_id, previous);
        }
    }

    /// The configuration in force before `refused`, if kas knows one.
    fn previous_before(&self, agent_id: i64, refused: &str) -> Option<Previous> {
        self.kept()
            .get(&agent_id)
            .filter(|p| p.commit != refused)
            .cloned()
    }

    /// The agent refused the configuration in force and runs nothing else: `previous` (see
    /// [`ConfigStates::previous_before`]) is in force again.
    fn restore(&self, agent_id: i64, previous: Previous) {
        self.put_in_force(agent_id, previous.commit, previous.file, previous.config);
    }

    /// Forgets a deleted agent: its state and its configuration in force. Kept, they outlived
    /// the agent, and a new agent given its id (as SQLite did before its migration 0012) was
    /// authorized by the deleted agent's `ci_access`/`user_access` until its own configuration
    /// was recorded — for ever, if that one was refused.
    pub fn forget(&self, agent_id: i64) {
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&agent_id);
        self.clear_config(agent_id);
        self.kept().remove(&agent_id);
        // Written again, a deleted agent's state would outlive it in the store.
        self.mark_stored(agent_id);
    }

    /// The agents this kas keeps anything about in memory (state, configuration in force, the
    /// one before it, what their replicas run), for finding deleted ones among them.
    pub fn agent_ids(&self) -> std::collections::HashSet<i64> {
        let mut ids: std::collections::HashSet<i64> = self
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        ids.extend(
            self.in_force
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys(),
        );
        ids.extend(self.kept().keys());
        ids.extend(self.running().keys());
        ids
    }

    pub fn get(&self, agent_id: i64) -> Option<ConfigState> {
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&agent_id)
            .cloned()
    }

    fn update(&self, agent_id: i64, f: impl FnOnce(&mut ConfigState)) {
        self.changes().touch(agent_id);
        let mut m = self
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = m.entry(agent_id).or_default();
        f(s);
        s.updated_at = unix_secs();
    }

    /// Loads every agent's stored state and configuration in force, so that kas shows them and
    /// authorizes CI jobs and people right after a restart, before the agent is back.
    pub async fn load(&self, store: &dyn Store) -> Result<(), tether_store::Error> {
        for agent in store.list_agents().await? {
            let Some(bytes) = store.config_state(agent.id).await? else {
                continue;
            };
            match serde_json::from_slice::<Persisted>(&bytes) {
                Ok(p) => self.apply_stored(agent.id, p),
                Err(e) => {
                    tracing::warn!(agent_id = agent.id, error = %e, "Ignoring an undecodable stored configuration state; the agent's next connection replaces it");
                }
            }
        }
        Ok(())
    }

    fn apply_stored(&self, agent_id: i64, p: Persisted) {
        self.changes().touch(agent_id);
        self.write_stored(agent_id, p);
    }

    /// As [`ConfigStates::apply_stored`], not counted as a change (see
    /// [`ConfigStates::reload_all`]).
    fn write_stored(&self, agent_id: i64, p: Persisted) {
        match p.config {
            Some(config) => self.insert_config(agent_id, Arc::new(config)),
            // Taken out of force where it was decided: kept here, its `ci_access` would go on
            // authorizing CI jobs through this replica for good.
            None => {
                self.in_force
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&agent_id);
            }
        }
        match p.previous {
            Some(previous) => self.kept().insert(agent_id, previous),
            None => self.kept().remove(&agent_id),
        };
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(agent_id, p.state);
    }

    /// Reads the agent's whole record from the store again, unless one of its streams is
    /// served here (memory is then the freshest): with several kas replicas, another one may
    /// have served the agent since this one read it, and a stale commit in force here would be
    /// kept as the previous one — and restored, with its older `ci_access`, on a refusal.
    pub async fn refresh(&self, store: &dyn Store, agent_id: i64) {
        if self.running().contains_key(&agent_id) {
            return;
        }
        self.reload(store, agent_id).await;
    }

    /// Reads the agent's whole record from the store again, even while one of its streams is
    /// served here: another kas replica put a configuration in force for it (its replicas
    /// there were the last to run the one in force, see [`RunningDirectory::in_force_changed`]).
    pub async fn reload(&self, store: &dyn Store, agent_id: i64) {
        let stored = match store.config_state(agent_id).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(agent_id, error = %e, "Cannot read the agent's stored configuration state; going on with this replica's");
                return;
            }
        };
        if let Some(p) = stored.and_then(|b| serde_json::from_slice::<Persisted>(&b).ok()) {
            self.apply_stored(agent_id, p);
        }
    }

    /// Reads every agent's record from the store again, even one whose streams are served
    /// here, as [`ConfigStates::reload`] does for one: another kas replica may have put a
    /// configuration in force whose message (`ConfigInForce` on Redis) this one missed — its
    /// subscription was down, or the publish failed. A record this replica changed while
    /// reading, is writing, or failed to store is left alone (memory is newer). With `since`,
    /// only the records written at or after it (Unix seconds, the writers' clocks). Returns the
    /// agents whose commit in force changed.
    pub async fn reload_all(
        &self,
        store: &dyn Store,
        since: Option<i64>,
    ) -> Result<Vec<i64>, tether_store::Error> {
        let before = self.changes().seq;
        let stored = match since {
            Some(t) => store.config_states_since(t).await?,
            None => store.config_states().await?,
        };
        let mut changed = Vec::new();
        for (agent_id, bytes) in stored {
            let Ok(p) = serde_json::from_slice::<Persisted>(&bytes) else {
                continue;
            };
            // Held while the record is written, so a change made meanwhile comes after it.
            let changes = self.changes();
            if changes.since(agent_id, before) || self.unstored().contains_key(&agent_id) {
                continue;
            }
            let was = self.get(agent_id);
            if was.as_ref() == Some(&p.state) {
                continue;
            }
            if was.is_none_or(|w| w.commit != p.state.commit) {
                changed.push(agent_id);
            }
            self.write_stored(agent_id, p);
        }
        Ok(changed)
    }

    /// The commit in force in the agent's stored record (`Ok(None)`: none stored, or not
    /// decodable): what the other kas replicas authorize with.
    pub async fn stored_commit(
        &self,
        store: &dyn Store,
        agent_id: i64,
    ) -> Result<Option<String>, tether_store::Error> {
        let stored = store.config_state(agent_id).await?;
        let decoded = stored.and_then(|b| serde_json::from_slice::<Persisted>(&b).ok());
        Ok(decoded.map(|p| p.state.commit))
    }

    /// Reads the agent's configuration in force from the store (where the replica serving the
    /// agent's configuration stream keeps it), remembering it here; `Ok(None)` if none is
    /// stored (nor a decodable one), an error if the store cannot say.
    pub async fn load_agent(
        &self,
        store: &dyn Store,
        agent_id: i64,
    ) -> Result<Option<Arc<tether_agent_config::AgentConfig>>, tether_store::Error> {
        let Some(bytes) = store.config_state(agent_id).await? else {
            return Ok(None);
        };
        let Some(config) = serde_json::from_slice::<Persisted>(&bytes)
            .ok()
            .and_then(|p| p.config)
        else {
            return Ok(None);
        };
        self.set_config(agent_id, config);
        Ok(self.config(agent_id))
    }

    /// Every agent's configuration in force as stored by the replicas serving the agents'
    /// configuration streams, in one read. Memory is left alone: for an agent whose stream is
    /// here, memory may be newer than the store (its write may be under way).
    pub async fn stored_configs(
        &self,
        store: &dyn Store,
    ) -> Result<HashMap<i64, Arc<tether_agent_config::AgentConfig>>, tether_store::Error> {
        let states = store.config_states().await?;
        let decoded = states.into_iter().filter_map(|(agent_id, bytes)| {
            let config = serde_json::from_slice::<Persisted>(&bytes).ok()?.config?;
            Some((agent_id, Arc::new(config)))
        });
        Ok(decoded.collect())
    }

    /// Stores the agent's state and configuration in force; whether it was stored. A failure
    /// is logged (kas keeps working from memory; the stored copy matters after a restart, and
    /// to other replicas, which read it for an agent this one holds).
    async fn persist(&self, store: &dyn Store, agent_id: i64) -> bool {
        let persisted = Persisted {
            state: self.get(agent_id).unwrap_or_default(),
            config: self.config(agent_id).map(|c| (*c).clone()),
            previous: self.kept().get(&agent_id).cloned(),
        };
        self.changes().begin_write(agent_id);
        let stored = match serde_json::to_vec(&persisted) {
            Ok(bytes) => store
                .put_config_state(agent_id, &bytes)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        self.changes().end_write(agent_id);
        match stored {
            Ok(()) => {
                if self.mark_stored(agent_id) {
                    tracing::info!(agent_id, "The agent's configuration state is stored again");
                }
                true
            }
            Err(e) if self.mark_unstored(agent_id, &e) => {
                tracing::error!(agent_id, error = %e, "Storing the agent's configuration state failed; retried until it is stored (other kas replicas authorize with the stored one meanwhile)");
                false
            }
            Err(e) => {
                tracing::warn!(agent_id, error = %e, "Storing the agent's configuration state failed again");
                false
            }
        }
    }

    fn unstored(&self) -> std::sync::MutexGuard<'_, HashMap<i64, UnstoredWrite>> {
        self.unstored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this replica failed to store the agent's state and still retries, since when
    /// and why: other replicas authorize with the stored one meanwhile (shown by `kas agent
    /// status`, so that operators see why replicas disagree).
    pub fn unstored_write(&self, agent_id: i64) -> Option<UnstoredWrite> {
        self.unstored().get(&agent_id).cloned()
    }

    /// Records a failed write of the agent's state; whether it was stored until then.
    fn mark_unstored(&self, agent_id: i64, error: &str) -> bool {
        let mut unstored = self.unstored();
        let new = !unstored.contains_key(&agent_id);
        let failed = unstored.entry(agent_id).or_insert_with(|| UnstoredWrite {
            since: unix_secs(),
            error: String::new(),
        });
        failed.error = error.to_owned();
        self.unstored_count
            .set(i64::try_from(unstored.len()).unwrap_or(i64::MAX));
        new
    }

    /// Forgets a failed write of the agent's state; whether there was one.
    fn mark_stored(&self, agent_id: i64) -> bool {
        let mut unstored = self.unstored();
        let was = unstored.remove(&agent_id).is_some();
        self.unstored_count
            .set(i64::try_from(unstored.len()).unwrap_or(i64::MAX));
        was
    }

    /// Writes again the states whose write failed (run every [`STORE_RETRY`]): nothing else
    /// would before the agent's configuration changes again, and meanwhile other kas replicas
    /// authorize with the stored one — a removed `ci_access` kept working through them. With
    /// `several` replicas, an agent without a configuration stream here (the decision was
    /// taken as its last one here ended) is written unless the stored record is a later
    /// decision, another replica's, which this one's would overwrite: it was given up at once,
    /// and when no other replica decided anything since, the decision was never stored. Returns
    /// the agents whose state is now stored (see [`ConfigService::store_again`]).
    pub async fn store_again(&self, store: &dyn Store, several: bool) -> Vec<i64> {
        let agents: Vec<i64> = self.unstored().keys().copied().collect();
        let mut stored = Vec::new();
        for agent_id in agents {
            if several && !self.running().contains_key(&agent_id) {
                match self.superseded(store, agent_id).await {
                    Ok(false) => {}
                    Ok(true) => {
                        self.mark_stored(agent_id);
                        tracing::warn!(
                            agent_id,
                            "Not storing the agent's configuration state again: another kas replica stored a later one"
                        );
                        continue;
                    }
                    // The retry's own write would fail as well: tried again at the next run.
                    Err(e) => {
                        let _ = self.mark_unstored(agent_id, &e.to_string());
                        continue;
                    }
                }
            }
            if self.persist(store, agent_id).await {
                stored.push(agent_id);
            }
        }
        stored
    }

    /// Whether the agent's stored record was decided after this replica's state of it.
    async fn superseded(
        &self,
        store: &dyn Store,
        agent_id: i64,
    ) -> Result<bool, tether_store::Error> {
        let stored = store.config_state(agent_id).await?;
        let stored = stored.and_then(|b| serde_json::from_slice::<Persisted>(&b).ok());
        let ours = self.get(agent_id).unwrap_or_default();
        Ok(later_than(stored.as_ref().map(|p| &p.state), &ours))
    }
}

/// Whether `stored` is a later decision than `ours` (by their times of change, in seconds: in
/// the same second, ours is written — losing a decision costs more than redoing one).
fn later_than(stored: Option<&ConfigState>, ours: &ConfigState) -> bool {
    stored.is_some_and(|s| s.updated_at > ours.updated_at)
}

/// An agent's configuration record as stored.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Persisted {
    state: ConfigState,
    config: Option<tether_agent_config::AgentConfig>,
    /// Absent in records written before it existed.
    #[serde(default)]
    previous: Option<Previous>,
}

/// The outcome of reading an agent's file at a commit.
#[derive(Debug)]
pub enum Loaded {
    Valid {
        file: String,
        config: tether_agent_config::AgentConfig,
    },
    Invalid {
        file: String,
        error: String,
    },
}

/// Reads and validates an agent's configuration at `commit`. An absent file is the empty
/// (default) configuration; a file over the size limit or that does not validate is refused.
pub async fn load(
    sources: &Sources,
    project_id: i64,
    commit: &CommitId,
    agent_name: &str,
) -> Result<Loaded, String> {
    let Some(mirror) = sources.mirror(project_id) else {
        return Err("the project has no repository".into());
    };
    let commit = *commit;
    let paths = config_paths(agent_name);
    tokio::task::spawn_blocking(move || {
        for file in paths {
            // One byte over the limit is enough to tell "too large" apart.
            let limit = u64::try_from(MAX_CONFIG_SIZE).unwrap_or(u64::MAX);
            match mirror.read_file(&commit, &file, limit) {
                Ok(None) => continue,
                Ok(Some(bytes)) => {
                    return Ok(match tether_agent_config::parse_bytes(&bytes) {
                        Ok(config) => Loaded::Valid { file, config },
                        Err(e) => Loaded::Invalid {
                            error: format!("{file}: {e}"),
                            file,
                        },
                    });
                }
                Err(tether_git_source::Error::TooLarge { .. }) => {
                    return Ok(Loaded::Invalid {
                        error: format!(
                            "{file}: the file is larger than the {} KiB limit",
                            MAX_CONFIG_SIZE / 1024
                        ),
                        file,
                    });
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(Loaded::Valid {
            file: String::new(),
            config: tether_agent_config::AgentConfig::default(),
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A commit without the agent's configuration file, after a file was in force, is refused
/// rather than taken as the empty default (pure): deleting or moving the file is far likelier a
/// mistake (an agent folder renamed) than a wish to drop every `ci_access`, `user_access` and
/// manifest project — which it silently did, with 403s for every CI job and person. An agent
/// meant to run without a configuration commits an empty file.
fn refuse_deleted(loaded: Loaded, in_force_file: &str) -> Loaded {
    match loaded {
        Loaded::Valid { file, .. } if file.is_empty() && !in_force_file.is_empty() => {
            Loaded::Invalid {
                error: format!(
                    "{in_force_file}: the file is not in this commit (deleted or moved?); the configuration in force stays (to run the agent without a configuration, commit an empty {in_force_file})"
                ),
                file: in_force_file.to_owned(),
            }
        }
        other => other,
    }
}

/// Finds a manifest project listed twice under different names — its path and its numeric id
/// (`id: group/app` and `id: 42`) — without a name on each entry, or twice with one name. The
/// file's own validation cannot see that; accepted, it gave two workers applying and pruning
/// the same objects against each other. Entries of one project with names of their own (one
/// per folder of a monorepo) are distinct entries, with inventories of their own. Projects
/// unknown to kas are left for the GitOps stream to report.
async fn resolved_duplicate(
    store: &dyn Store,
    config: &tether_agent_config::AgentConfig,
) -> Result<Option<String>, String> {
    let mut seen: HashMap<(i64, Option<&str>), usize> = HashMap::new();
    let mut unnamed: HashMap<i64, usize> = HashMap::new();
    for (i, p) in config.gitops.manifest_projects.iter().enumerate() {
        let Some(project) = registered(store, &p.id).await? else {
            continue;
        };
        let name = p.name.as_deref();
        // Unnamed, it may be listed once only; named, it may not share a project with an
        // unnamed entry, nor a name with another entry of the project.
        let first = match name {
            None => seen
                .iter()
                .filter(|((id, _), _)| *id == project.id)
                .map(|(_, &j)| j)
                .min(),
            Some(_) => unnamed.get(&project.id).copied(),
        }
        .or_else(|| seen.get(&(project.id, name)).copied());
        if let Some(first) = first {
            return Ok(Some(format!(
                "gitops.manifest_projects[{i}].id: {:?} is project {} ({}), already listed as gitops.manifest_projects[{first}] (to list a project more than once, give each of its entries a name of its own; an entry that already synced and gets a name starts with a new, empty inventory: its objects are taken over only with inventory_policy: adopt_all)",
                p.id.to_string(),
                project.id,
                project.path
            )));
        }
        seen.insert((project.id, name), i);
        if name.is_none() {
            unnamed.insert(project.id, i);
        }
    }
    Ok(None)
}

/// The project an entry's `id` names, when kas has it (`None` for an unknown project or a path
/// no project could have: the GitOps stream reports those); an error when the store cannot say.
async fn registered(
    store: &dyn Store,
    id: &tether_agent_config::ProjectRef,
) -> Result<Option<tether_store::Project>, String> {
    let found = match id {
        tether_agent_config::ProjectRef::Numeric(n) => store.get_project(*n).await,
        tether_agent_config::ProjectRef::Path(path) => store.get_project_by_path(path).await,
    };
    match found {
        Ok(found) => Ok(found),
        Err(tether_store::Error::InvalidName { .. }) => Ok(None),
        Err(e) => Err(format!("reading kas's project records: {e}")),
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct ConfigService {
    pub auth: Arc<dyn Authenticator>,
    pub store: Arc<dyn Store>,
    pub sources: Arc<Sources>,
    pub registry: Arc<Registry>,
    pub states: Arc<ConfigStates>,
    /// Told when a configuration is refused.
    pub notifier: tether_notifications::Notifier,
    /// Several kas replicas share the store: an agent's record is read again when its stream
    /// opens here (see [`ConfigStates::refresh`]).
    pub several: bool,
    /// With several kas replicas: what the agent replicas connected to the others run (see
    /// [`shared`]); `None` for one kas (no I/O).
    pub directory: Option<Arc<dyn RunningDirectory>>,
    /// Which manifest projects a configuration may list.
    pub manifest_access: tether_agent_config::ManifestAccess,
}

impl ConfigService {
    /// How the module registers itself: the gRPC service to add to the agent listener.
    pub fn into_server(self) -> AgentConfigurationServer<Self> {
        AgentConfigurationServer::new(self)
    }

    /// With several kas replicas, called periodically: for each agent whose configuration in
    /// force none of its replicas here runs (replicas on other kas replicas do) and whose
    /// entries of a dead kas replica this call removed ([`RunningDirectory::departed`]), puts
    /// in force what the replicas left agree on, as when a stream ends
    /// ([`EndedStream::follow`]). A killed kas replica ends no stream: its entries stop
    /// counting when its liveness key expires, and with no stream here opening or ending
    /// nothing decided again, so a configuration only its Pods ran stayed in force for good.
    pub async fn decide_again(&self) {
        let Some(directory) = self.directory.clone() else {
            return;
        };
        for agent_id in self.states.in_force_only_elsewhere() {
            let read = match directory.departed(agent_id).await {
                Ok(false) => continue,
                Ok(true) => directory.elsewhere(agent_id).await,
                Err(e) => Err(e),
            };
            let others = match read {
                Ok(others) => others,
                Err(e) => {
                    tracing::warn!(agent_id, error = %e, "Cannot read what the agent's replicas on other kas replicas run; the configuration in force stays");
                    continue;
                }
            };
            // The replicas here run what they agree on, so its configuration is at hand.
            if let Some(Agreed::Here(running)) = self.states.agreed_with(agent_id, others) {
                self.put_agreed_in_force(directory.as_ref(), agent_id, running)
                    .await;
            }
        }
    }

    /// Writes again the configuration states whose write failed (run every [`STORE_RETRY`],
    /// see [`ConfigStates::store_again`]), and tells the other kas replicas to read each one
    /// stored, as [`ConfigService::put_agreed_in_force`] does once it is stored: a decision
    /// whose write failed was published before it was stored, so the replicas holding the
    /// agent's other Pods read the former record and kept the former configuration (its
    /// `ci_access` too) until their 30 s re-read.
    pub async fn store_again(&self) {
        let stored = self
            .states
            .store_again(self.store.as_ref(), self.several)
            .await;
        let Some(directory) = &self.directory else {
            return;
        };
        for agent_id in stored {
            if let Err(e) = directory.in_force_changed(agent_id).await {
                tracing::warn!(agent_id, error = %e, "Cannot tell the other kas replicas of the configuration state stored at last; they read it at their next re-read of the store");
            }
        }
    }

    /// Puts what the agent's replicas agree on in force, stores it, and tells the other kas
    /// replicas to read it.
    async fn put_agreed_in_force(
        &self,
        directory: &dyn RunningDirectory,
        agent_id: i64,
        running: Running,
    ) {
        self.states.follow_replicas(agent_id, running);
        self.states.persist(self.store.as_ref(), agent_id).await;
        if let Err(e) = directory.in_force_changed(agent_id).await {
            tracing::warn!(agent_id, error = %e, "Cannot tell the other kas replicas of the configuration now in force; they read it from the store when they next need it");
        }
    }
}

impl std::fmt::Debug for ConfigService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigService").finish_non_exhaustive()
    }
}

/// How far back the default branch's history is searched for an agent's commit in force.
const HISTORY_LIMIT: usize = 100_000;

/// Longest refusal reason kept from an agent.
const MAX_REFUSAL_CHARS: usize = 2048;

/// One agent's configuration stream. It is the response stream itself (no task, no channel):
/// tonic polls it when the agent can take a message, and drops it when the agent goes, which
/// keeps an idle stream to a few hundred bytes — it exists once per connected agent.
struct StreamState {
    svc: ConfigService,
    id: AgentIdentity,
    project_id: i64,
    last: String,
    heads: tokio::sync::watch::Receiver<tether_git_source::ProjectHead>,
    lease: tether_tunnel_server::Lease,
    ended: bool,
    /// A message to send before looking at the head again (see [`StreamState::fallback`]), or
    /// the error ending the stream after it (see [`StreamState::unreadable`]).
    queued: Option<Result<ConfigurationResponse, Status>>,
    /// This stream among the agent's, and the replica (pod) it comes from (see
    /// [`ConfigStates::runs_elsewhere`]).
    key: u64,
    replica: String,
    /// What this stream's replica runs, not yet told the other kas replicas.
    unshared: Option<ReplicaRuns>,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        let (states, agent_id) = (&self.svc.states, self.id.agent_id);
        let local = states.stream_ended(agent_id, &self.replica, self.key);
        let rt = tokio::runtime::Handle::try_current().ok();
        let Some(directory) = self.svc.directory.clone() else {
            let Some(running) = local else {
                return;
            };
            states.follow_replicas(agent_id, running);
            // Stored for the next start; a drop cannot wait for it.
            if let Some(rt) = rt {
                let (states, store) = (Arc::clone(states), Arc::clone(&self.svc.store));
                rt.spawn(async move { states.persist(store.as_ref(), agent_id).await });
            }
            return;
        };
        // kas is stopping: its agents' streams come back on the other replicas, and what they
        // run is decided there (this replica's entries stop counting with its liveness key).
        let (Some(rt), false) = (rt, self.svc.registry.is_shutting_down()) else {
            return;
        };
        let ended = EndedStream {
            svc: self.svc.clone(),
            agent_id,
            key: self.key,
            project_id: self.project_id,
            agent_name: self.id.agent_name.clone(),
            local,
        };
        rt.spawn(ended.follow(directory));
    }
}

/// A configuration stream that ended, with several kas replicas (see [`EndedStream::follow`]).
struct EndedStream {
    svc: ConfigService,
    agent_id: i64,
    key: u64,
    project_id: i64,
    agent_name: String,
    /// What this kas's streams alone decided.
    local: Option<Running>,
}

impl EndedStream {
    /// Withdraws the stream's entry, and puts in force what the agent's replicas left — on
    /// every kas replica — agree on, when none of them runs the configuration in force: the
    /// last replica running it may have been the only one on this kas replica, or the only
    /// one left here while another kas replica's still run it. The configuration is read from
    /// Git when no stream here runs it, stored, and the other kas replicas are told to read it.
    async fn follow(self, directory: Arc<dyn RunningDirectory>) {
        let (states, agent_id) = (&self.svc.states, self.agent_id);
        if let Err(e) = directory.withdraw(agent_id, self.key).await {
            tracing::warn!(agent_id, error = %e, "Cannot withdraw an ended configuration stream from the kas replicas' directory yet; the directory tries again");
        }
        let agreed = match directory.elsewhere(agent_id).await {
            Ok(others) => states.agreed_with(agent_id, others),
            Err(e) => {
                tracing::warn!(agent_id, error = %e, "Cannot read what the agent's replicas on other kas replicas run; deciding on this replica's alone");
                self.local.clone().map(Agreed::Here)
            }
        };
        let running = match agreed {
            None => return,
            Some(Agreed::Here(running)) => running,
            Some(Agreed::Elsewhere(runs)) => match self.read(&runs).await {
                Some(running) => running,
                None => return,
            },
        };
        self.svc
            .put_agreed_in_force(directory.as_ref(), agent_id, running)
            .await;
    }

    /// The configuration `runs` names, read from Git, if it still validates.
    async fn read(&self, runs: &ReplicaRuns) -> Option<Running> {
        let agent_id = self.agent_id;
        let commit = CommitId::from_hex(&runs.commit).ok()?;
        let loaded = load_checked(&self.svc, self.project_id, &self.agent_name, &commit).await;
        match loaded {
            Ok(Loaded::Valid { file, config }) => Some(Running {
                replica: runs.replica.clone(),
                stream: 0,
                commit: runs.commit.clone(),
                file,
                config: Arc::new(config),
                at: runs.at,
            }),
            Ok(Loaded::Invalid { error, .. }) => {
                tracing::warn!(agent_id, commit_id = %runs.commit, error = %error, "The configuration the agent's replicas run no longer validates; the one in force stays");
                None
            }
            Err(e) => {
                tracing::warn!(agent_id, commit_id = %runs.commit, error = %e, "Cannot read the configuration the agent's replicas run; the one in force stays");
                None
            }
        }
    }
}

/// Unix seconds now.
fn unix_secs() -> u64 {
    unix_millis() / 1000
}

/// Unix milliseconds now.
fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StreamState {
    /// This stream's replica runs `config` of `commit` (from `file`).
    fn runs(&mut self, commit: &str, file: &str, config: Arc<tether_agent_config::AgentConfig>) {
        let running = Running {
            replica: self.replica.clone(),
            stream: self.key,
            commit: commit.to_owned(),
            file: file.to_owned(),
            config,
            at: unix_millis(),
        };
        if self.svc.directory.is_some() {
            self.unshared = Some(running.shared());
        }
        self.svc.states.set_running(self.id.agent_id, running);
    }

    /// Tells the other kas replicas what this stream's replica runs, if that changed: before
    /// the agent hears of a configuration, so a decision on another kas replica taken after
    /// the agent acted on it (refused it elsewhere, say) counts it.
    async fn share(&mut self) {
        let (Some(directory), Some(runs)) = (&self.svc.directory, self.unshared.take()) else {
            return;
        };
        if let Err(e) = directory.publish(self.id.agent_id, self.key, runs).await {
            tracing::warn!(agent_id = self.id.agent_id, error = %e, "Cannot tell the other kas replicas what the agent's replica runs; they decide without it until the next refresh");
        }
    }
}

/// [`load`], then the checks that need kas's records.
async fn load_checked(
    svc: &ConfigService,
    project_id: i64,
    agent_name: &str,
    commit: &CommitId,
) -> Result<Loaded, String> {
    let loaded = load(&svc.sources, project_id, commit, agent_name).await?;
    let Loaded::Valid { file, config } = loaded else {
        return Ok(loaded);
    };
    let refused = match resolved_duplicate(svc.store.as_ref(), &config).await? {
        Some(error) => Some(error),
        None => outside_its_group(svc, project_id, &config).await?,
    };
    Ok(match refused {
        Some(error) => Loaded::Invalid {
            error: format!("{file}: {error}"),
            file,
        },
        None => Loaded::Valid { file, config },
    })
}

/// The first manifest project entry naming a project outside the agent's group that kas does
/// not share with every agent ([`tether_agent_config::ManifestAccess`]). Projects unknown to
/// kas are left for the GitOps stream to report.
async fn outside_its_group(
    svc: &ConfigService,
    project_id: i64,
    config: &tether_agent_config::AgentConfig,
) -> Result<Option<String>, String> {
    let read = |e: tether_store::Error| format!("reading kas's project records: {e}");
    let Some(own) = svc.store.get_project(project_id).await.map_err(read)? else {
        return Err(format!("project {project_id} is not registered"));
    };
    for (i, p) in config.gitops.manifest_projects.iter().enumerate() {
        let Some(project) = registered(svc.store.as_ref(), &p.id).await? else {
            continue;
        };
        if !svc.manifest_access.allows(&own.path, &project.path) {
            let why = tether_agent_config::ManifestAccess::refusal(&own.path, &project.path);
            return Ok(Some(format!("gitops.manifest_projects[{i}].id: {why}")));
        }
    }
    Ok(None)
}

/// Numbers the configuration streams.
static STREAM_KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl StreamState {
    /// The next message: a configuration (or why there is none) when the head commit changes,
    /// an error when the token is revoked or kas stops, `None` when the stream is over.
    async fn next(&mut self) -> Option<Result<ConfigurationResponse, Status>> {
        if self.ended {
            return None;
        }
        if let Some(queued) = self.queued.take() {
            self.share().await;
            self.ended = queued.is_err();
            return Some(queued);
        }
        loop {
            let head = self.heads.borrow_and_update().clone();
            if let Some(commit) = head.commit
                && commit.to_hex() != self.last
            {
                let response = self.response(&commit).await;
                self.share().await;
                self.ended = response.is_err();
                return Some(response);
            }
            tokio::select! {
                changed = self.heads.changed() => if changed.is_err() { return None },
                () = self.lease.cancelled() => {
                    self.ended = true;
                    return Some(Err(self.lease.end_status()));
                }
            }
        }
    }

    /// See [`load_checked`].
    async fn load(&self, commit: &CommitId) -> Result<Loaded, String> {
        load_checked(&self.svc, self.project_id, &self.id.agent_name, commit).await
    }

    /// Records the configuration the agent says it has in force (the commit it reconnected
    /// with) without sending anything: after a kas restart the agent keeps its configuration and
    /// kas must know it too, or every CI job and person would be refused until the next commit.
    /// When kas cannot read that configuration (an unknown commit, a file that no longer
    /// validates), it forgets the agent's commit so the head's configuration is sent instead —
    /// then the agent and kas agree again.
    async fn adopt_agent_commit(&mut self) {
        let Ok(commit) = CommitId::from_hex(&self.last) else {
            self.last.clear();
            return;
        };
        if !self.may_adopt(&commit).await {
            tracing::warn!(agent_id = self.id.agent_id, commit_id = %commit, "The agent says a commit is in force that kas has not sent it and the default branch does not reach; sending the newest configuration");
            self.last.clear();
            return;
        }
        match self.load(&commit).await {
            Ok(Loaded::Valid { file, config }) => {
                let config = Arc::new(config);
                self.runs(&commit.to_hex(), &file, Arc::clone(&config));
                let (states, id) = (&self.svc.states, &self.id);
                if let Some(in_force) = self.in_force_elsewhere(&commit).await {
                    tracing::info!(agent_id = id.agent_id, commit_id = %commit, in_force = %in_force, "Replicas of the agent run different configurations (agentk versions mixed during a rollout?); the one in force stays");
                    return;
                }
                // Unchanged after a restart (loaded from the store): no write, which keeps a
                // reconnect storm of thousands of agents off the database.
                let known = states
                    .get(id.agent_id)
                    .is_some_and(|s| s.commit == commit.to_hex())
                    && states.config(id.agent_id).is_some_and(|c| *c == *config);
                states.set_config(id.agent_id, config);
                states.update(id.agent_id, |s| {
                    s.commit = commit.to_hex();
                    s.file = file;
                });
                if !known {
                    states.persist(self.svc.store.as_ref(), id.agent_id).await;
                }
                tracing::debug!(agent_id = id.agent_id, commit_id = %commit, "Agent reconnected with its configuration in force");
            }
            Ok(Loaded::Invalid { error, .. }) => {
                tracing::info!(agent_id = self.id.agent_id, commit_id = %commit, error = %error, "The agent's configuration in force no longer validates; sending the newest one");
                self.last.clear();
            }
            Err(e) => {
                tracing::info!(agent_id = self.id.agent_id, commit_id = %commit, error = %e, "Cannot read the agent's configuration in force; sending the newest one");
                self.last.clear();
            }
        }
    }

    /// The commit in force, when it is not `commit` and another replica of the agent runs it
    /// (connected to this kas replica or to another).
    async fn in_force_elsewhere(&self, commit: &CommitId) -> Option<String> {
        let recorded = self.svc.states.get(self.id.agent_id)?.commit;
        if recorded.is_empty() || recorded == commit.to_hex() {
            return None;
        }
        self.runs_elsewhere(&recorded).await.then_some(recorded)
    }

    /// Whether another replica of the agent runs `commit`, here or on another kas replica.
    async fn runs_elsewhere(&self, commit: &str) -> bool {
        let directory = self.svc.directory.as_deref();
        let asked = (self.id.agent_id, self.replica.as_str(), commit);
        self.svc.states.runs_anywhere_else(directory, asked).await
    }

    /// Whether kas may take the agent's word that `commit` is its configuration in force: the
    /// one kas has on record, or one the default branch reaches (kas's record was lost, or
    /// the agent refused a newer one). Taken at its word alone, an agent token could put any
    /// commit of any branch in force, such as a feature branch's granting `ci_access`.
    async fn may_adopt(&self, commit: &CommitId) -> bool {
        let recorded = self.svc.states.get(self.id.agent_id);
        if recorded.is_some_and(|s| s.commit == commit.to_hex()) {
            return true;
        }
        let head = self.heads.borrow().commit;
        let (Some(head), Some(mirror)) = (head, self.svc.sources.mirror(self.project_id)) else {
            return false;
        };
        let commit = *commit;
        let walk =
            tokio::task::spawn_blocking(move || mirror.in_history(&commit, &head, HISTORY_LIMIT));
        matches!(walk.await, Ok(Ok(true)))
    }

    /// The agent refused the configuration at `refused` (its own checks failed: an older agent
    /// not knowing a field, say). kas recorded that commit as in force when it sent it; now
    /// the agent's own commit (adopted from its request) is in force again — or, for an agent
    /// running nothing, the one in force before `refused`, which is sent to it — the refusal
    /// shows in `kas agent status`, and that commit is not sent again.
    async fn agent_refused(&mut self, refused: &str, why: &str) {
        let Ok(commit) = CommitId::from_hex(refused) else {
            tracing::debug!(
                agent_id = self.id.agent_id,
                "Ignoring a refusal of a malformed commit id"
            );
            return;
        };
        let (id, hex) = (self.id.agent_id, commit.to_hex());
        // From the agent, so bounded before it is logged and stored.
        let why: String = why.chars().take(MAX_REFUSAL_CHARS).collect();
        let states = &self.svc.states;
        let new = states
            .get(id)
            .is_none_or(|s| s.error_commit.as_deref() != Some(hex.as_str()));
        // An agent running nothing (it started since) gets the configuration in force before
        // the refused one, if kas knows it, and that is in force again; else none is. Unless
        // another replica of the agent runs the refused one: it stays in force.
        let elsewhere = self.runs_elsewhere(&hex).await;
        let fallback = if self.last.is_empty() {
            states.previous_before(id, &hex)
        } else {
            None
        };
        let restored = fallback.is_some() && !elsewhere;
        let emptied = self.last.is_empty() && fallback.is_none() && !elsewhere;
        if let Some(previous) = fallback.clone().filter(|_| restored) {
            states.restore(id, previous);
        }
        if emptied {
            states.clear_config(id);
        }
        let error = format!("refused by the agent: {why}");
        states.update(id, |s| {
            if emptied {
                s.commit.clear();
                s.file.clear();
            }
            s.error = Some(error.clone());
            s.error_commit = Some(hex.clone());
        });
        if new && elsewhere {
            tracing::warn!(agent_id = id, commit_id = %hex, error = %why, "A replica of the agent refused its configuration; another replica was sent it and has not refused it, so it stays in force");
        } else if new {
            tracing::warn!(agent_id = id, commit_id = %hex, error = %why, "The agent refused its configuration; its previous one stays in force");
        }
        if new {
            states.refusals.inc();
            self.svc
                .notifier
                .configuration_refused(id, &hex, &error)
                .await;
            states.persist(self.svc.store.as_ref(), id).await;
        } else if restored {
            states.persist(self.svc.store.as_ref(), id).await;
        }
        self.last = hex;
        if let Some(p) = fallback {
            self.queued = self.in_force_response(p.commit, p.file, p.config).map(Ok);
        }
    }

    /// The message for the head `commit`: its configuration, or why it is refused. An error
    /// when kas cannot read it (see [`StreamState::unreadable`]).
    async fn response(&mut self, commit: &CommitId) -> Result<ConfigurationResponse, Status> {
        let id = self.id.clone();
        let hex = commit.to_hex();
        let mut resp = ConfigurationResponse {
            agent_id: id.agent_id,
            project_path: id.project_path.clone(),
            commit_id: hex.clone(),
            ..ConfigurationResponse::default()
        };
        let states = Arc::clone(&self.svc.states);
        let loaded = match self.load(commit).await {
            Ok(loaded) => loaded,
            Err(e) => return self.unreadable(&hex, &e),
        };
        let in_force = states.get(id.agent_id).map(|s| s.file).unwrap_or_default();
        match refuse_deleted(loaded, &in_force) {
            Loaded::Valid { file, config } => match serde_json::to_string(&config) {
                Ok(json) => {
                    let config = Arc::new(config);
                    states.keep_previous(id.agent_id, &hex);
                    self.runs(&hex, &file, Arc::clone(&config));
                    states.set_config(id.agent_id, config);
                    resp.file_path = file.clone();
                    resp.config_json = json;
                    states.update(id.agent_id, |s| {
                        s.commit = hex.clone();
                        s.file = file;
                        s.error = None;
                        s.error_commit = None;
                    });
                    tracing::info!(agent_id = id.agent_id, commit_id = %hex, "Sending agent configuration");
                }
                Err(e) => {
                    resp.error = format!("encoding the configuration: {e}");
                }
            },
            Loaded::Invalid { file, error } => {
                tracing::warn!(agent_id = id.agent_id, commit_id = %hex, error = %error, "Agent configuration refused; the last good one stays in force");
                states.refusals.inc();
                self.svc
                    .notifier
                    .configuration_refused(id.agent_id, &hex, &error)
                    .await;
                resp.file_path = file;
                resp.error = error.clone();
                states.update(id.agent_id, |s| {
                    s.error = Some(error);
                    s.error_commit = Some(hex.clone());
                });
            }
        }
        states.persist(self.svc.store.as_ref(), id.agent_id).await;
        let fallback = if resp.error.is_empty() {
            None
        } else {
            self.fallback()
        };
        self.last = hex;
        Ok(match fallback {
            Some(in_force) => {
                self.queued = Some(Ok(resp));
                in_force
            }
            None => resp,
        })
    }

    /// kas cannot read the configuration at `hex` (the database down, the mirror unreadable):
    /// not the user's fault, so not a refusal. The stream ends `UNAVAILABLE` and agentk opens
    /// it again with its backoff, when kas tries again: sent as a refusal, the commit was
    /// never sent again on this stream (it is sent only when the head changes), and agentk
    /// logged that kas refused it. An agent running nothing first gets the configuration in
    /// force, if kas knows one.
    fn unreadable(&mut self, hex: &str, e: &str) -> Result<ConfigurationResponse, Status> {
        tracing::warn!(agent_id = self.id.agent_id, commit_id = %hex, error = %e, "Reading the agent configuration failed; the agent's stream ends and kas reads it again when the agent reopens it");
        let status = Status::unavailable(format!(
            "kas cannot read the agent configuration at {hex} now: {e}"
        ));
        match self.fallback() {
            Some(in_force) => {
                self.queued = Some(Err(status));
                Ok(in_force)
            }
            None => Err(status),
        }
    }

    /// The configuration in force, to send before a refusal of the newest commit when the
    /// agent does not run it: an agent that started since (a node drain, an OOM kill, a
    /// rollout) has no configuration at all, and told only the refusal it ran no GitOps and
    /// kept no logging level while `kas agent status` said the last good one was in force.
    fn fallback(&mut self) -> Option<ConfigurationResponse> {
        let state = self.svc.states.get(self.id.agent_id)?;
        if state.commit.is_empty() || state.commit == self.last {
            return None;
        }
        let config = self.svc.states.config(self.id.agent_id)?;
        self.in_force_response(state.commit, state.file, config)
    }

    /// The message sending `config` (of `commit`, from `file`) as the configuration in force;
    /// this stream then runs it.
    fn in_force_response(
        &mut self,
        commit: String,
        file: String,
        config: Arc<tether_agent_config::AgentConfig>,
    ) -> Option<ConfigurationResponse> {
        let agent_id = self.id.agent_id;
        let config_json = serde_json::to_string(&*config).ok()?;
        tracing::info!(agent_id, commit_id = %commit, "Sending the agent its configuration in force; the newest commit's is refused");
        self.runs(&commit, &file, config);
        Some(ConfigurationResponse {
            agent_id,
            project_path: self.id.project_path.clone(),
            commit_id: commit,
            file_path: file,
            config_json,
            error: String::new(),
        })
    }
}

/// The agent replica a request comes from: its pod's namespace and name as agentk sends them
/// (empty for an agentk outside a Pod, or older than this field: all such are one replica).
fn replica_of(md: &tonic::metadata::MetadataMap) -> String {
    let header = |key| {
        md.get(key)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .chars()
            .take(253)
            .collect::<String>()
    };
    let (namespace, name) = (
        header(tether_protocol::metadata::POD_NAMESPACE),
        header(tether_protocol::metadata::POD_NAME),
    );
    format!("{namespace}/{name}")
}

type ConfigStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<ConfigurationResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl AgentConfiguration for ConfigService {
    type GetConfigurationStream = ConfigStream;

    async fn get_configuration(
        &self,
        request: Request<ConfigurationRequest>,
    ) -> Result<Response<Self::GetConfigurationStream>, Status> {
        let id = authenticate_request(self.auth.as_ref(), &request).await?;
        let project = self
            .store
            .get_project_by_path(&id.project_path)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found("the agent's project is gone"))?;
        if self.several {
            self.states.refresh(self.store.as_ref(), id.agent_id).await;
        }
        let replica = replica_of(request.metadata());
        let mut state = StreamState {
            svc: self.clone(),
            lease: self.registry.lease(id.token_id),
            heads: self.sources.watch(project.id),
            id,
            project_id: project.id,
            last: String::new(),
            ended: false,
            queued: None,
            key: STREAM_KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            replica,
            unshared: None,
        };
        let req = request.into_inner();
        state.last = req.commit_id;
        if !state.last.is_empty() {
            state.adopt_agent_commit().await;
        }
        if !req.refused_commit_id.is_empty() {
            state
                .agent_refused(&req.refused_commit_id, &req.refusal)
                .await;
        }
        // Before the agent hears back: what it runs counts on every kas replica from then on.
        state.share().await;
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            let item = st.next().await?;
            Some((item, st))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_file_is_refused_only_after_a_file_was_in_force() {
        let absent = || Loaded::Valid {
            file: String::new(),
            config: tether_agent_config::AgentConfig::default(),
        };
        let file = ".gitlab/agents/a/config.yaml";
        match refuse_deleted(absent(), file) {
            Loaded::Invalid { file: f, error } => {
                assert_eq!(f, file);
                assert!(
                    error.contains("not in this commit (deleted or moved?)"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        // An agent that never had a file: the empty default, as before.
        assert!(matches!(refuse_deleted(absent(), ""), Loaded::Valid { .. }));
    }

    #[test]
    fn a_change_or_a_write_under_way_since_a_count_is_seen() {
        let mut c = LocalChanges::default();
        c.touch(1);
        let before = c.seq;
        assert!(!c.since(1, before) && !c.since(2, before));
        c.begin_write(2);
        let started = c.seq;
        assert!(c.since(2, started), "under way");
        c.end_write(2);
        assert!(c.since(2, started), "ended after the count");
        assert!(!c.since(2, c.seq), "ended before it");
        c.touch(1);
        assert!(c.since(1, before) && !c.since(1, c.seq));
    }

    /// A record in the store with commit `commit` in force.
    async fn stored(store: &dyn Store, agent_id: i64, commit: &str) {
        let config = Some(tether_agent_config::AgentConfig::default());
        stored_with(store, agent_id, commit, config).await;
    }

    /// A record in the store with commit `commit` and `config` in force.
    async fn stored_with(
        store: &dyn Store,
        agent_id: i64,
        commit: &str,
        config: Option<tether_agent_config::AgentConfig>,
    ) {
        let p = Persisted {
            state: ConfigState {
                commit: commit.into(),
                updated_at: 1,
                ..ConfigState::default()
            },
            config,
            previous: None,
        };
        let bytes = serde_json::to_vec(&p).unwrap();
        store.put_config_state(agent_id, &bytes).await.unwrap();
    }

    /// A store with agents `a` and `b`, both with `commit` in force in memory only.
    async fn two_agents_in_force(
        commit: &str,
    ) -> (
        tempfile::TempDir,
        tether_store::SqliteStore,
        (i64, i64),
        ConfigStates,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = tether_store::SqliteStore::open(&dir.path().join("kas.db"))
            .await
            .unwrap();
        let (a, b) = (
            store.register_agent("g/p", "a").await.unwrap().id,
            store.register_agent("g/p", "b").await.unwrap().id,
        );
        let states = ConfigStates::default();
        for id in [a, b] {
            states.put_in_force(id, commit.into(), String::new(), Arc::default());
        }
        (dir, store, (a, b), states)
    }

    #[test]
    fn only_a_record_changed_in_a_later_second_supersedes_ours() {
        let at = |updated_at| ConfigState {
            updated_at,
            ..ConfigState::default()
        };
        assert!(!later_than(None, &at(5)), "nothing stored");
        assert!(!later_than(Some(&at(4)), &at(5)));
        assert!(!later_than(Some(&at(5)), &at(5)), "the same second: ours");
        assert!(later_than(Some(&at(6)), &at(5)));
    }

    /// With several replicas, a decision taken here as the agent's last stream here ended is
    /// stored by the retry (it was given up at once: no stream here), unless another replica
    /// stored a later one meanwhile.
    #[tokio::test]
    async fn the_retry_stores_a_decision_left_without_streams_unless_a_later_one_was_stored() {
        let (_dir, store, (a, b), states) = two_agents_in_force("decided").await;
        for id in [a, b] {
            states.mark_unstored(id, "disk full");
        }
        stored(&store, a, "former").await;
        let later = Persisted {
            state: ConfigState {
                commit: "later".into(),
                updated_at: u64::MAX,
                ..ConfigState::default()
            },
            config: None,
            previous: None,
        };
        let later = serde_json::to_vec(&later).unwrap();
        store.put_config_state(b, &later).await.unwrap();

        assert_eq!(states.store_again(&store, true).await, vec![a]);
        let commit = |id| states.stored_commit(&store, id);
        assert_eq!(commit(a).await.unwrap().as_deref(), Some("decided"));
        assert_eq!(commit(b).await.unwrap().as_deref(), Some("later"));
        assert_eq!(states.unstored_write(a), None);
        assert_eq!(states.unstored_write(b), None, "given up");
    }

    #[tokio::test]
    async fn reloading_all_takes_other_replicas_records_but_not_over_an_unstored_one() {
        let (_dir, store, (a, b), states) = two_agents_in_force("old").await;
        states.mark_unstored(b, "disk full");
        for id in [a, b] {
            stored(&store, id, "new").await;
        }

        assert_eq!(states.reload_all(&store, None).await.unwrap(), vec![a]);
        assert_eq!(states.get(a).unwrap().commit, "new");
        assert_eq!(states.get(b).unwrap().commit, "old", "memory is newer");
        assert!(
            states.reload_all(&store, None).await.unwrap().is_empty(),
            "once"
        );
        let failed = states.unstored_write(b).unwrap();
        assert_eq!(failed.error, "disk full");
        assert_eq!(
            states.stored_commit(&store, b).await.unwrap().as_deref(),
            Some("new")
        );
    }

    /// Another replica took the agent's configuration out of force (its agent refused the only
    /// one sent): re-reading the record takes it out here too, so its `ci_access` stops
    /// authorizing through this replica.
    #[tokio::test]
    async fn a_configuration_taken_out_of_force_elsewhere_is_out_of_force_here_after_a_reread() {
        let (_dir, store, (a, b), states) = two_agents_in_force("c1").await;
        stored_with(&store, a, "", None).await;
        assert_eq!(states.reload_all(&store, None).await.unwrap(), vec![a]);
        assert!(states.config(a).is_none(), "re-read of every record");
        assert!(states.config(b).is_some(), "nothing stored for b yet");
        stored_with(&store, b, "", None).await;
        states.reload(&store, b).await;
        assert!(states.config(b).is_none(), "re-read of one record");
    }

    /// A project listed by path and by numeric id is one project: refused unless each entry
    /// has a name of its own (then they are a monorepo's entries, with inventories apart).
    #[tokio::test]
    async fn a_project_listed_under_two_spellings_needs_a_name_on_each_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = tether_store::SqliteStore::open(&dir.path().join("kas.db"))
            .await
            .unwrap();
        let source = tether_store::ProjectSource::default();
        let id = store
            .set_project_source("g/mono", &source)
            .await
            .unwrap()
            .id;
        let check = |yaml: String| {
            let config = tether_agent_config::parse(&yaml).unwrap();
            let store = &store;
            async move { resolved_duplicate(store, &config).await.unwrap() }
        };
        let entries = |a: &str, b: &str| {
            format!("gitops:\n  manifest_projects:\n  - id: g/mono\n{a}  - id: {id}\n{b}")
        };
        let (infra, apps) = ("    name: infra\n", "    name: apps\n");
        assert_eq!(check(entries(infra, apps)).await, None);
        let refused = [
            entries("", ""),
            entries(infra, ""),
            entries("", apps),
            entries(apps, apps),
        ];
        for yaml in refused {
            let error = check(yaml.clone()).await;
            let error = error.unwrap_or_else(|| panic!("accepted: {yaml}"));
            assert!(
                error.starts_with("gitops.manifest_projects[1].id: ")
                    && error.contains("already listed as gitops.manifest_projects[0]"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_forgotten_agent_has_no_state_and_no_configuration_in_force() {
        let states = ConfigStates::default();
        for agent in [1, 2] {
            states.set_config(agent, tether_agent_config::AgentConfig::default());
            states.update(agent, |s| s.commit = "c0ffee".into());
        }
        states.forget(1);
        assert_eq!((states.get(1), states.config(1)), (None, None));
        assert!(
            states.get(2).is_some() && states.config(2).is_some(),
            "another agent's"
        );
    }

    fn running(replica: &str, stream: u64, commit: &str) -> Running {
        Running {
            replica: replica.into(),
            stream,
            commit: commit.into(),
            file: String::new(),
            config: Arc::default(),
            at: stream,
        }
    }

    #[test]
    fn a_commit_runs_elsewhere_only_on_another_replica_of_the_same_agent() {
        let states = ConfigStates::default();
        states.set_running(1, running("ns/new", 10, "c2"));
        states.set_running(1, running("ns/old", 11, "c1"));
        states.set_running(2, running("ns/other", 20, "c3"));
        assert!(states.runs_elsewhere(1, "ns/old", "c2"));
        assert!(
            !states.runs_elsewhere(1, "ns/new", "c2"),
            "not the asking replica itself"
        );
        assert!(
            !states.runs_elsewhere(1, "ns/old", "c3"),
            "not another agent's replica"
        );
        // The old replica reopens its stream (12) before kas sees its stream 11 end, and the
        // old stream's late news do not overwrite the new one's.
        states.set_running(1, running("ns/old", 12, "c1"));
        states.set_running(1, running("ns/old", 11, "c0"));
        assert!(states.runs_elsewhere(1, "ns/new", "c1"));
        states.stream_ended(1, "ns/old", 11);
        assert!(
            states.runs_elsewhere(1, "ns/new", "c1"),
            "its newer stream counts"
        );
        states.set_running(1, running("ns/new", 10, "c1"));
        assert!(
            !states.runs_elsewhere(1, "ns/old", "c2"),
            "the replica moved on"
        );
        states.stream_ended(1, "ns/new", 10);
        assert!(!states.runs_elsewhere(1, "ns/old", "c1"));
        states.stream_ended(1, "ns/old", 12);
        assert!(
            !states.running().contains_key(&1),
            "nothing kept for a gone agent"
        );
    }

    #[test]
    fn when_the_last_replica_running_the_commit_in_force_goes_the_others_commit_is_in_force() {
        let states = ConfigStates::default();
        states.update(1, |s| s.commit = "c2".into());
        states.set_running(1, running("ns/new", 10, "c2"));
        states.set_running(1, running("ns/old-a", 11, "c1"));
        states.set_running(1, running("ns/old-b", 12, "c1"));
        let next = states.stream_ended(1, "ns/new", 10).map(|r| r.commit);
        assert_eq!(next.as_deref(), Some("c1"), "the old replicas agree on c1");
        states.follow_replicas(1, running("ns/old-a", 11, "c1"));
        assert_eq!(states.get(1).map(|s| s.commit).as_deref(), Some("c1"));
        assert!(states.config(1).is_some());
        // Replicas that disagree leave the configuration in force as it is.
        states.set_running(1, running("ns/new-2", 13, "c3"));
        states.set_running(1, running("ns/new-3", 14, "c2"));
        assert!(states.stream_ended(1, "ns/old-a", 11).is_none());
        // Nor does a replica running what is in force already.
        states.set_running(1, running("ns/old-a", 15, "c1"));
        assert!(states.stream_ended(1, "ns/new-2", 13).is_none());
    }

    fn elsewhere(replica: &str, commit: &str) -> ReplicaRuns {
        ReplicaRuns {
            replica: replica.into(),
            commit: commit.into(),
            at: 100,
        }
    }

    #[test]
    fn replicas_on_other_kas_replicas_count_when_the_last_one_here_running_the_commit_in_force_goes()
     {
        let states = ConfigStates::default();
        states.update(1, |s| s.commit = "c2".into());
        states.set_running(1, running("ns/new", 10, "c2"));
        states.set_running(1, running("ns/old", 11, "c1"));
        assert!(
            states.stream_ended(1, "ns/new", 10).is_some(),
            "this kas alone would put c1 in force"
        );
        let still = vec![elsewhere("ns/new-2", "c2")];
        assert!(
            states.agreed_with(1, still).is_none(),
            "a replica on another kas runs c2"
        );
        let agreeing = vec![elsewhere("ns/old-2", "c1")];
        match states.agreed_with(1, agreeing) {
            Some(Agreed::Here(r)) => assert_eq!(r.replica, "ns/old", "its configuration is here"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn when_no_replica_is_left_here_the_ones_on_other_kas_replicas_decide() {
        let states = ConfigStates::default();
        states.update(1, |s| s.commit = "c2".into());
        states.set_running(1, running("ns/new", 10, "c2"));
        assert!(states.stream_ended(1, "ns/new", 10).is_none());
        match states.agreed_with(1, vec![elsewhere("ns/old", "c1")]) {
            Some(Agreed::Elsewhere(r)) => assert_eq!(r.commit, "c1", "read from Git"),
            other => panic!("{other:?}"),
        }
        assert!(
            states.agreed_with(1, Vec::new()).is_none(),
            "no replica left at all"
        );
    }

    #[test]
    fn agents_whose_configuration_in_force_runs_only_on_other_kas_replicas_are_decided_again() {
        let states = ConfigStates::default();
        for agent in [1, 2, 3] {
            states.update(agent, |s| s.commit = "c2".into());
        }
        states.set_running(1, running("ns/old", 10, "c1"));
        states.set_running(2, running("ns/old", 20, "c1"));
        states.set_running(2, running("ns/new", 21, "c2"));
        assert_eq!(
            states.in_force_only_elsewhere(),
            [1],
            "2 runs c2 here, 3 has no replica here"
        );
    }

    #[test]
    fn both_config_locations_are_tried_in_order() {
        assert_eq!(
            config_paths("dude"),
            [
                ".gitlab/agents/dude/config.yaml".to_string(),
                ".gitlab/agent/dude/config.yaml".to_string()
            ]
        );
    }
}
