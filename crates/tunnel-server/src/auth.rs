//! Who an agent is and how its token is looked up: the types both the gRPC service (which
//! authenticates streams) and the registry (which re-checks and revokes them) use, kept apart so
//! neither module depends on the other's internals.

use std::future::Future;
use std::pin::Pin;

use tether_guard::AuthGuard;

/// Who an agent token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: i64,
    pub agent_name: String,
    pub project_path: String,
    pub token_id: i64,
}

/// Why authentication could not be decided.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Looks agent tokens up (kas implements it over its store).
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(None)` for an unknown or revoked token.
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<AgentIdentity>, AuthError>>;
    /// Which of `token_ids` are still valid: the tokens of every live stream are re-checked
    /// with this, all at once (kas answers with a few store queries).
    fn active_tokens(&self, token_ids: Vec<i64>) -> BoxFuture<'_, Result<Vec<i64>, AuthError>>;
    /// The agent listener's limits and refusal log; `None`: no limits (tests, tools).
    fn guard(&self) -> Option<&AuthGuard> {
        None
    }
}
