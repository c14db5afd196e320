//! Counting the store's operations and failures: `kas_store_operations_total{operation, kind}`
//! and `kas_store_errors_total{operation, kind}`.
//!
//! A write that fails (disk full or read-only, PostgreSQL down or refusing) is logged by
//! whoever asked and answered as an error, but without a counter an operator's alerting cannot
//! see it; the alert `TetherKasStoreWritesFailing` follows this counter. [`Metered`] wraps the
//! store kas serves from, so every caller (admin API, GitOps reports, configuration states,
//! notifications, web sessions) is counted without each counting for itself.
//!
//! Only operational failures count (the database or its migrations failed): a refusal such as
//! "not found" or "already exists" is the store answering, not failing. `operation` is the
//! [`Store`] method's name, a fixed set, so the series stay bounded.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tether_store::{
    Agent, AgentRow, AuthenticatedAgent, Error, NotificationResult, OutboxMessage,
    PendingNotification, Project, ProjectSource, Result, Store, Suspension, SuspensionScope,
    TokenInfo, UserTokenInfo, WebSession,
};

/// Whether an operation reads or writes, the `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
        }
    }
}

/// Every store operation kas counts, named as the [`Store`] method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    EnsureProject,
    GetProjectByPath,
    ListProjects,
    GetProject,
    SetProjectSource,
    RemoveProject,
    RegisterAgent,
    GetAgent,
    FindAgent,
    ListAgents,
    CreateToken,
    ListTokens,
    RevokeToken,
    TokenActive,
    ActiveTokens,
    MarkTokensUsed,
    ActiveUserTokens,
    Authenticate,
    CreateUserToken,
    AuthenticateUserToken,
    RevokeUserToken,
    PutSyncReport,
    SyncReports,
    SyncReport,
    PutConfigState,
    ConfigState,
    ConfigStates,
    EnqueueNotification,
    EnqueueNotificationUnless,
    ClaimNotifications,
    FinishNotification,
    DeleteFinishedNotifications,
    DropReplacedNotifications,
    RecordOfferedCommit,
    CreateWebSession,
    WebSession,
    DeleteWebSession,
    ListUserTokens,
    DeleteAgent,
    Suspend,
    Resume,
    Suspensions,
    Check,
}

impl Operation {
    /// The `operation` label: the method's name.
    pub fn name(self) -> &'static str {
        use Operation as O;
        match self {
            O::EnsureProject => "ensure_project",
            O::GetProjectByPath => "get_project_by_path",
            O::ListProjects => "list_projects",
            O::GetProject => "get_project",
            O::SetProjectSource => "set_project_source",
            O::RemoveProject => "remove_project",
            O::RegisterAgent => "register_agent",
            O::GetAgent => "get_agent",
            O::FindAgent => "find_agent",
            O::ListAgents => "list_agents",
            O::CreateToken => "create_token",
            O::ListTokens => "list_tokens",
            O::RevokeToken => "revoke_token",
            O::TokenActive => "token_active",
            O::ActiveTokens => "active_tokens",
            O::MarkTokensUsed => "mark_tokens_used",
            O::ActiveUserTokens => "active_user_tokens",
            O::Authenticate => "authenticate",
            O::CreateUserToken => "create_user_token",
            O::AuthenticateUserToken => "authenticate_user_token",
            O::RevokeUserToken => "revoke_user_token",
            O::PutSyncReport => "put_sync_report",
            O::SyncReports => "sync_reports",
            O::SyncReport => "sync_report",
            O::PutConfigState => "put_config_state",
            O::ConfigState => "config_state",
            O::ConfigStates => "config_states",
            O::EnqueueNotification => "enqueue_notification",
            O::EnqueueNotificationUnless => "enqueue_notification_unless",
            O::ClaimNotifications => "claim_notifications",
            O::FinishNotification => "finish_notification",
            O::DeleteFinishedNotifications => "delete_finished_notifications",
            O::DropReplacedNotifications => "drop_replaced_notifications",
            O::RecordOfferedCommit => "record_offered_commit",
            O::CreateWebSession => "create_web_session",
            O::WebSession => "web_session",
            O::DeleteWebSession => "delete_web_session",
            O::ListUserTokens => "list_user_tokens",
            O::DeleteAgent => "delete_agent",
            O::Suspend => "suspend",
            O::Resume => "resume",
            O::Suspensions => "suspensions",
            O::Check => "check",
        }
    }

    /// Whether the operation writes (runs a write transaction) or only reads.
    pub fn kind(self) -> Kind {
        use Operation as O;
        match self {
            O::EnsureProject
            | O::SetProjectSource
            | O::RemoveProject
            | O::RegisterAgent
            | O::CreateToken
            | O::RevokeToken
            | O::MarkTokensUsed
            | O::CreateUserToken
            | O::RevokeUserToken
            | O::PutSyncReport
            | O::PutConfigState
            | O::EnqueueNotification
            | O::EnqueueNotificationUnless
            // Claiming leases the messages: an UPDATE.
            | O::ClaimNotifications
            | O::FinishNotification
            | O::DeleteFinishedNotifications
            | O::DropReplacedNotifications
            | O::RecordOfferedCommit
            | O::CreateWebSession
            | O::DeleteWebSession
            | O::DeleteAgent
            | O::Suspend
            | O::Resume => Kind::Write,
            _ => Kind::Read,
        }
    }
}

/// Whether an error is the store failing (counted) rather than answering a refusal.
pub fn is_failure(error: &Error) -> bool {
    match error {
        Error::Database(_)
        | Error::Migrate(_)
        | Error::WriteTurnTimedOut(_)
        | Error::TimedOut(_)
        | Error::Backup(_) => true,
        Error::InvalidName { .. }
        | Error::NotFound(_)
        | Error::AlreadyExists(_)
        | Error::InUse(_) => false,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    operation: &'static str,
    kind: &'static str,
}

/// The store's operation and failure counters.
#[derive(Clone, Debug, Default)]
pub struct StoreMetrics {
    /// Every operation asked of the store, answered or not: what shows a caller asking the
    /// database more than it should (a token looked up per request rather than once).
    operations: Family<ErrorLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

impl StoreMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "store_operations",
            "Store operations asked of the database, by operation and kind (read or write)",
            self.operations.clone(),
        );
        reg.register(
            "store_errors",
            "Store operations that failed in the database (disk full or read-only, database down), by operation and kind (read or write)",
            self.errors.clone(),
        );
    }

    /// Counts `operation`, and `result` if it is a failure; hands `result` back.
    fn seen<T>(&self, operation: Operation, result: Result<T>) -> Result<T> {
        let labels = ErrorLabels {
            operation: operation.name(),
            kind: operation.kind().label(),
        };
        self.operations.get_or_create(&labels).inc();
        if let Err(e) = &result
            && is_failure(e)
        {
            self.errors.get_or_create(&labels).inc();
        }
        result
    }
}

/// A store whose failures are counted in [`StoreMetrics`], each operation given up after
/// `bound` (see [`tether_store::PgStore::operation_timeout`]); otherwise the store it wraps.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: StoreMetrics,
    bound: Option<std::time::Duration>,
}

impl Metered {
    pub fn wrap(
        inner: Arc<dyn Store>,
        metrics: StoreMetrics,
        bound: Option<std::time::Duration>,
    ) -> Arc<dyn Store> {
        Arc::new(Self {
            inner,
            metrics,
            bound,
        })
    }

    /// `operation`, failed with [`Error::TimedOut`] past the bound: a request, a stream, a
    /// background task waiting on a server that vanished gets an error it reports, not a
    /// wait of a quarter of an hour.
    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(bound) = self.bound else {
            return operation.await;
        };
        tokio::time::timeout(bound, operation)
            .await
            .unwrap_or(Err(Error::TimedOut(bound)))
    }
}

mod delegate;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn operations_that_write_are_counted_as_writes() {
        assert_eq!(Operation::RegisterAgent.kind(), Kind::Write);
        assert_eq!(Operation::ClaimNotifications.kind(), Kind::Write);
        assert_eq!(Operation::ListAgents.kind(), Kind::Read);
        assert_eq!(Operation::Authenticate.kind(), Kind::Read);
    }

    fn count(metrics: &StoreMetrics, operation: &'static str, kind: &'static str) -> u64 {
        let labels = ErrorLabels { operation, kind };
        metrics.errors.get_or_create(&labels).get()
    }

    fn asked(metrics: &StoreMetrics, operation: &'static str, kind: &'static str) -> u64 {
        let labels = ErrorLabels { operation, kind };
        metrics.operations.get_or_create(&labels).get()
    }

    /// A real store closed under kas fails every call with a database error: those count,
    /// under their operation and kind; a refusal ("already exists") does not.
    #[tokio::test]
    async fn failures_are_counted_by_operation_and_kind_and_refusals_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = tether_store::SqliteStore::open(&dir.path().join("kas.db"))
            .await
            .unwrap();
        let metrics = StoreMetrics::default();
        let store = Metered::wrap(Arc::new(sqlite), metrics.clone(), None);
        store.register_agent("group/p", "a").await.unwrap();
        let refused = store.register_agent("group/p", "a").await;
        assert!(
            matches!(refused, Err(Error::AlreadyExists(_))),
            "{refused:?}"
        );
        assert_eq!(count(&metrics, "register_agent", "write"), 0);

        store.close().await;
        let failed = store.register_agent("group/p", "b").await;
        assert!(failed.as_ref().is_err_and(is_failure), "{failed:?}");
        assert!(store.list_agents().await.is_err());
        assert!(store.list_agents().await.is_err());
        assert_eq!(count(&metrics, "register_agent", "write"), 1);
        assert_eq!(count(&metrics, "list_agents", "read"), 2);
        // Every operation is counted as asked, failed or not.
        assert_eq!(asked(&metrics, "register_agent", "write"), 3);
        assert_eq!(asked(&metrics, "list_agents", "read"), 2);
    }
}
