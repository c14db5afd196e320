//! kas's records: projects and where their repositories are, agents, agent tokens and personal
//! access tokens (both stored only as SHA-256 digests), and each agent's last sync reports and
//! configuration state (so `kas agent status` survives a restart).
//!
//! kas holds an `Arc<dyn Store>`: [`SqliteStore`], embedded, is the default; [`PgStore`] keeps
//! the same records on a PostgreSQL server (for several kas replicas). Both run the same SQL
//! (`backend`); [`copy`] moves an installation from the first to the second, [`backup`] takes a
//! consistent copy of the first while kas runs.

mod backend;
pub mod backup;
pub mod copy;
mod error;
mod migrate;
mod model;
mod postgres;
pub mod restore;
mod sqlite;
mod token;
mod txn;
mod validate;

pub use error::{Error, Result};
pub use migrate::Migrated;
pub use model::{
    Agent, AgentRow, AuthenticatedAgent, NotificationResult, OutboxMessage, PendingNotification,
    Project, ProjectSource, Suspension, SuspensionScope, TokenInfo, UserTokenInfo, WebSession,
};
pub use postgres::{DEFAULT_STATEMENT_TIMEOUT, PgStore};
pub use sqlite::SqliteStore;
pub use token::{AgentToken, TOKEN_PREFIX, TOKEN_RANDOM_LEN};
pub use validate::{
    MAX_AGENT_NAME_LEN, MAX_PROJECT_PATH_LEN, validate_agent_name, validate_project_path,
};

/// kas's persistent records.
///
/// Object-safe (through `async_trait`'s boxed futures) so kas can pick the backend at start-up
/// and share it as `Arc<dyn Store>`. Name arguments are validated by every method, so malformed
/// input yields [`Error::InvalidName`] rather than "not found".
///
/// A write that returns `Ok` has been committed; one that returns `Err` has changed nothing.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Returns the project with this path, creating it first if it does not exist.
    async fn ensure_project(&self, path: &str) -> Result<Project>;

    /// Looks a project up by its full path.
    async fn get_project_by_path(&self, path: &str) -> Result<Option<Project>>;

    /// All projects, ordered by path.
    async fn list_projects(&self) -> Result<Vec<Project>>;

    /// A project by numeric id.
    async fn get_project(&self, id: i64) -> Result<Option<Project>>;

    /// Sets where a project's repository is (creating the project if missing).
    async fn set_project_source(&self, path: &str, source: &ProjectSource) -> Result<Project>;

    /// Removes a project; refused (`InUse`) while agents belong to it. `false` if it did not
    /// exist.
    async fn remove_project(&self, path: &str) -> Result<bool>;

    /// Registers a new agent, creating its project if needed.
    /// Fails with [`Error::AlreadyExists`] if the project already has an agent of that name.
    async fn register_agent(&self, project_path: &str, name: &str) -> Result<Agent>;

    /// Looks an agent up by id.
    async fn get_agent(&self, id: i64) -> Result<Option<Agent>>;

    /// Looks an agent up by project path and name.
    async fn find_agent(&self, project_path: &str, name: &str) -> Result<Option<Agent>>;

    /// All agents with their project paths, ordered by project path then name.
    async fn list_agents(&self) -> Result<Vec<AgentRow>>;

    /// Creates a token for the agent. The plaintext is returned here and never again; only its
    /// digest is stored. Fails with [`Error::NotFound`] if the agent does not exist.
    async fn create_token(
        &self,
        agent_id: i64,
        description: &str,
    ) -> Result<(TokenInfo, AgentToken)>;

    /// The agent's tokens (active and revoked), oldest first.
    /// Fails with [`Error::NotFound`] if the agent does not exist.
    async fn list_tokens(&self, agent_id: i64) -> Result<Vec<TokenInfo>>;

    /// Revokes a token. Idempotent: returns `true` if this call revoked it, `false` if it was
    /// already revoked. Fails with [`Error::NotFound`] if there is no such token.
    async fn revoke_token(&self, token_id: i64) -> Result<bool>;

    /// Whether the token exists and is not revoked; kas polls this for long-lived agent streams
    /// so that a revocation also cuts connections that authenticated before it.
    async fn token_active(&self, token_id: i64) -> Result<bool>;

    /// Which of `token_ids` exist and are not revoked, in a few queries for any number of ids:
    /// kas re-checks the tokens of every live stream each minute, and one query per token was
    /// most of an idle kas's CPU with 10,000 agents.
    async fn active_tokens(&self, token_ids: &[i64]) -> Result<Vec<i64>>;

    /// Records that the agent tokens `token_ids` were in use at `at` (Unix seconds), in a few
    /// writes for any number of ids; a token's time never moves back, and unknown ids are
    /// ignored.
    async fn mark_tokens_used(&self, token_ids: &[i64], at: i64) -> Result<()>;

    /// Which of the personal access tokens `token_ids` are neither revoked nor expired now:
    /// kas re-checks those with requests open through its proxy, so a watch or an exec ends
    /// when its token expires, and a revocation another replica's message missed still ends
    /// it.
    async fn active_user_tokens(&self, token_ids: &[i64]) -> Result<Vec<i64>>;

    /// Resolves a presented token to its agent. `Ok(None)` for unknown, malformed or revoked
    /// tokens: callers must not be able to tell those apart, so neither can this API.
    async fn authenticate(&self, token: &str) -> Result<Option<AuthenticatedAgent>>;

    /// Issues a personal access token for `username` on one agent, valid until `expires_at`
    /// (Unix seconds). `memberships` is JSON kept for authorization. Returned once.
    async fn create_user_token(
        &self,
        agent_id: i64,
        username: &str,
        memberships: &str,
        expires_at: i64,
    ) -> Result<(UserTokenInfo, AgentToken)>;

    /// The record of a presented personal access token: `None` if unknown, revoked or expired.
    async fn authenticate_user_token(&self, token: &str) -> Result<Option<UserTokenInfo>>;

    /// Revokes a personal access token. Idempotent: returns `true` if this call revoked it,
    /// `false` if it was already revoked. Fails with [`Error::NotFound`] if there is no such
    /// token.
    async fn revoke_user_token(&self, id: i64) -> Result<bool>;

    /// Records the last sync report of one of the agent's manifest projects, replacing the one
    /// before, and queues `messages` in the notification outbox (as
    /// [`Store::enqueue_notification`] does) in the same write: either the report and its
    /// messages are all recorded or none is, so a report is never stored with its
    /// notifications lost (a retry of a failed write finds the previous report still there and
    /// derives the same messages again). True when a message was added. `project` is the
    /// caller's key for the manifest project; `report` is an opaque encoded record, kept byte
    /// for byte. Fails with [`Error::NotFound`] if the agent does not exist. Reports go away
    /// with their agent.
    async fn put_sync_report(
        &self,
        agent_id: i64,
        project: &str,
        report: &[u8],
        messages: &[OutboxMessage],
    ) -> Result<bool>;

    /// The agent's last sync reports as `(project, report)`, ordered by project (byte order).
    /// Empty if there are none, including for an unknown agent.
    async fn sync_reports(&self, agent_id: i64) -> Result<Vec<(String, Vec<u8>)>>;

    /// The agent's last sync report of `project`, if any: one row, where the hot paths need
    /// one (each stored report, each commit sent). Reading all of an agent's reports there
    /// made a commit of an agent with hundreds of entries read hundreds of rows per entry.
    async fn sync_report(&self, agent_id: i64, project: &str) -> Result<Option<Vec<u8>>>;

    /// Records the agent's configuration state (an opaque encoded record, kept byte for byte),
    /// replacing the one before. Fails with [`Error::NotFound`] if the agent does not exist.
    /// The state goes away with its agent.
    async fn put_config_state(&self, agent_id: i64, state: &[u8]) -> Result<()>;

    /// The agent's configuration state; `None` if none was recorded or the agent is unknown.
    async fn config_state(&self, agent_id: i64) -> Result<Option<Vec<u8>>>;

    /// Every recorded configuration state as `(agent id, state)`, in one read: a replica
    /// building something from all agents' configurations (a CI job's kubeconfig) would
    /// otherwise read them one by one.
    async fn config_states(&self) -> Result<Vec<(i64, Vec<u8>)>>;

    /// The configuration states written at or after `since` (Unix seconds, the writer's clock),
    /// as [`Store::config_states`]: a replica re-reading them every 30 s reads what changed
    /// rather than every agent's record.
    async fn config_states_since(&self, since: i64) -> Result<Vec<(i64, Vec<u8>)>>;

    /// Puts a message for `receiver` in the notification outbox, due now, unless one with the
    /// same `dedup_key` is there for that receiver (still to send, or finished and not yet
    /// deleted by [`Store::delete_finished_notifications`]). True when it was added.
    ///
    /// Messages of a receiver with the same `order_key` replace one another (the states of
    /// one commit's status on a forge, which keeps the last one posted): a message queued later
    /// is newer, whichever replica queued it, since writes are serialized and ids increase.
    async fn enqueue_notification(
        &self,
        receiver: &str,
        dedup_key: &str,
        order_key: Option<&str>,
        payload: &[u8],
    ) -> Result<bool>;

    /// [`Store::enqueue_notification`], except when the receiver's outbox holds a message with
    /// one of the `unless` keys (still to send, or finished and not yet deleted). Checked in
    /// the same write as the insert, so such a message cannot be queued between the two: a
    /// commit's `superseded` is not queued after the agent's report of that commit queued its
    /// outcome, which it would replace on the forge.
    async fn enqueue_notification_unless(
        &self,
        receiver: &str,
        dedup_key: &str,
        order_key: Option<&str>,
        payload: &[u8],
        unless: &[&str],
    ) -> Result<bool>;

    /// Claims up to `limit` due messages for `lease_secs` (another replica does not take them
    /// meanwhile), oldest first. A message with an ordering key is claimed only while it is
    /// the newest of its key and no other of its key is claimed (being sent): so none is ever
    /// delivered after a newer one of its key, and two are never in flight at once, on any
    /// replica. A retry time or claim stored more than `horizon_secs` ahead of now was
    /// written by a clock that has since stepped back (NTP correcting a kas that ran ahead):
    /// it is taken as passed, or the message would wait for as long as the clock was off.
    async fn claim_notifications(
        &self,
        limit: i64,
        lease_secs: i64,
        horizon_secs: i64,
    ) -> Result<Vec<PendingNotification>>;

    /// Finishes, with the outcome `dropped`, the messages still to send (and not being sent)
    /// that a newer message of the same ordering key replaces; how many. They are never
    /// claimed; this ends them, so they leave the outbox with the retention. A claim stored
    /// more than `horizon_secs` ahead is taken as passed (see [`Store::claim_notifications`]).
    async fn drop_replaced_notifications(&self, horizon_secs: i64) -> Result<u64>;

    /// Records `commit` as the last commit of the manifest project `project` (its path) sent to
    /// the agent, whichever stream or replica sends it; returns the one recorded before, if
    /// other. Fails with [`Error::NotFound`] if the agent does not exist; the record goes
    /// away with its agent.
    async fn record_offered_commit(
        &self,
        agent_id: i64,
        project: &str,
        commit: &str,
    ) -> Result<Option<String>>;

    /// Records how sending a claimed message ended.
    async fn finish_notification(&self, id: i64, result: &NotificationResult) -> Result<()>;

    /// Deletes up to `limit` messages finished (delivered or given up) before `done_before`
    /// (Unix seconds), oldest first; how many it deleted. Messages still to send, claimed or
    /// not, are never deleted. Without this the outbox grows by every message ever sent; the
    /// bound keeps each delete a short write, so other writers wait little behind it. A deleted
    /// message's key is forgotten: the same event seen again afterwards is queued again.
    async fn delete_finished_notifications(&self, done_before: i64, limit: i64) -> Result<u64>;

    /// Records a web UI login. Expired sessions are deleted first; then, when the session's
    /// subject has `max_per_subject` live ones, its own soonest-expiring make room (one person
    /// logging in again and again pushes out only their own sessions); then, when
    /// `max_sessions` are still live, the soonest-expiring viewers' sessions make room before
    /// any admin's. So a flood of logins cannot grow the table without bound, nor log the
    /// admins out.
    async fn create_web_session(
        &self,
        session: &WebSession,
        max_sessions: i64,
        max_per_subject: i64,
    ) -> Result<()>;

    /// The session with this id digest, unless it expired.
    async fn web_session(&self, id_digest: &str) -> Result<Option<WebSession>>;

    /// Ends a session (logging out); `false` if there was none.
    async fn delete_web_session(&self, id_digest: &str) -> Result<bool>;

    /// The personal access tokens (active, expired and revoked; never their digests) of one
    /// agent or of all, by id.
    async fn list_user_tokens(&self, agent_id: Option<i64>) -> Result<Vec<UserTokenInfo>>;

    /// Removes an agent and everything that goes with it (tokens, personal access tokens, sync
    /// reports, configuration state, suspensions). `false` if it did not exist. The caller ends
    /// its live streams.
    async fn delete_agent(&self, agent_id: i64) -> Result<bool>;

    /// Suspends GitOps for the agent (`scope`), replacing an earlier suspension of the same
    /// scope. Fails with [`Error::NotFound`] if the agent does not exist.
    async fn suspend(
        &self,
        agent_id: i64,
        scope: SuspensionScope,
        reason: &str,
        suspended_by: &str,
    ) -> Result<Suspension>;

    /// Lifts suspensions: of one project, or with [`SuspensionScope::Agent`] every suspension
    /// of the agent. How many were lifted.
    async fn resume(&self, agent_id: i64, scope: SuspensionScope) -> Result<u64>;

    /// The suspensions of one agent, or of all, ordered by agent then project.
    async fn suspensions(&self, agent_id: Option<i64>) -> Result<Vec<Suspension>>;

    /// Runs a trivial query: `Ok` when the database answers now. kas's readiness uses it, so a
    /// replica that cannot reach its database stops receiving traffic.
    async fn check(&self) -> Result<()>;

    /// Closes the underlying connections; further calls fail. Lets kas flush the database
    /// cleanly on shutdown.
    async fn close(&self);
}
