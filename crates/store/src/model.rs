//! The records the store hands out. Ids are `i64` because that is what both SQLite `INTEGER`
//! and PostgreSQL `BIGINT` map to; timestamps are Unix seconds for the same portability reason.

/// A GitLab-style project, identified by its full path (`group/sub/name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Project {
    pub id: i64,
    pub path: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Git remote (`https://…`, `git://…`, `file://…` or an absolute path); `None` until set.
    pub remote: Option<String>,
    /// File with credentials for an `https://` remote.
    pub credentials_file: Option<String>,
    /// File with the secret push webhooks must present.
    pub webhook_secret_file: Option<String>,
    /// Deploy key (OpenSSH private key) for an SSH remote.
    pub ssh_key_file: Option<String>,
    /// Pinned host keys (`known_hosts` format) of an SSH remote's server.
    pub known_hosts_file: Option<String>,
    /// Trusted SSH signing keys (`git`'s allowed-signers format): set, commits must be signed.
    pub verify_allowed_signers_file: Option<String>,
    /// Trusted OpenPGP keys (an armored keyring): set, commits must be signed.
    pub verify_gpg_keyring_file: Option<String>,
}

/// Where a project's repository is and where its secrets live (see [`Project`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProjectSource {
    pub remote: Option<String>,
    pub credentials_file: Option<String>,
    pub webhook_secret_file: Option<String>,
    /// Deploy key (OpenSSH private key) for an SSH remote.
    pub ssh_key_file: Option<String>,
    /// Pinned host keys (`known_hosts` format) of an SSH remote's server.
    pub known_hosts_file: Option<String>,
    /// Trusted SSH signing keys (`git`'s allowed-signers format): set, commits must be signed.
    pub verify_allowed_signers_file: Option<String>,
    /// Trusted OpenPGP keys (an armored keyring): set, commits must be signed.
    pub verify_gpg_keyring_file: Option<String>,
}

/// An agent registered under a project.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Agent {
    pub id: i64,
    pub project_id: i64,
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// An agent together with its project's path, for listings.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AgentRow {
    pub id: i64,
    pub name: String,
    pub project_id: i64,
    pub project_path: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: the latest time kas saw one of its tokens in use (a connection open);
    /// `None` if never.
    pub last_used_at: Option<i64>,
}

/// Metadata about an agent token. Deliberately carries neither the token nor its digest: the
/// plaintext only exists once, in the [`AgentToken`](crate::AgentToken) returned at creation.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenInfo {
    pub id: i64,
    pub agent_id: i64,
    pub description: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` while the token is usable.
    pub revoked_at: Option<i64>,
    /// Unix seconds: when kas last saw a connection authenticated with it open; `None` if
    /// never.
    pub last_used_at: Option<i64>,
}

impl TokenInfo {
    /// Whether the token can still authenticate.
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

/// Who a successfully authenticated token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedAgent {
    pub agent_id: i64,
    pub agent_name: String,
    pub project_id: i64,
    pub project_path: String,
    /// The token used, so kas can re-check it with [`Store::token_active`](crate::Store::token_active)
    /// while the agent's streams stay open.
    pub token_id: i64,
}

/// A personal access token's record (never the token or its digest).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserTokenInfo {
    pub id: i64,
    pub agent_id: i64,
    pub username: String,
    /// JSON list of memberships, as given at creation.
    pub memberships: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// A web UI login (the session id itself is never stored, only its digest).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WebSession {
    /// Hex SHA-256 of the session id in the cookie.
    pub id_digest: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// The OpenID Connect person; `None` for the admin-token login.
    pub subject: Option<String>,
    pub username: Option<String>,
    /// JSON list of the person's groups.
    pub groups: String,
    pub csrf: String,
    /// The admin-token login: a fingerprint of the token it was opened with.
    pub admin_token: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A message for the notification outbox, queued with the write that records what it tells
/// ([`Store::put_sync_report`](crate::Store::put_sync_report)); see
/// [`Store::enqueue_notification`](crate::Store::enqueue_notification) for the fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The receiver's name in kas's configuration.
    pub receiver: String,
    /// What makes it unique for its receiver: queued again, it is not added twice.
    pub dedup_key: String,
    /// Messages of a receiver with the same ordering key replace one another.
    pub order_key: Option<String>,
    /// The message, as the notifier encoded it.
    pub payload: Vec<u8>,
}

/// A notification waiting in the outbox, claimed for sending.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingNotification {
    pub id: i64,
    /// The receiver's name in kas's configuration.
    pub receiver: String,
    /// What makes it unique for its receiver (the event and its transition).
    pub dedup_key: String,
    /// The message, as the notifier encoded it.
    pub payload: Vec<u8>,
    /// Failed sends so far.
    pub attempts: i64,
}

/// How a send of a [`PendingNotification`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotificationResult {
    Delivered,
    /// Failed; sent again from `at` (Unix seconds).
    Retry {
        at: i64,
        error: String,
    },
    /// Failed for good (too many attempts, or the receiver refused it for good).
    GaveUp {
        error: String,
    },
}

/// What a GitOps suspension covers: one manifest project of the agent, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspensionScope {
    /// Every manifest project of the agent, including ones added to its configuration later.
    Agent,
    /// One manifest project, by kas's project id.
    Project(i64),
}

impl SuspensionScope {
    /// Whether a suspension of this scope holds project `project_id`.
    pub fn holds(self, project_id: i64) -> bool {
        self == Self::Agent || self == Self::Project(project_id)
    }

    /// The stored form: 0 for the whole agent (project ids start at 1).
    pub(crate) fn column(self) -> i64 {
        match self {
            Self::Agent => 0,
            Self::Project(id) => id,
        }
    }

    pub(crate) fn from_column(project_id: i64) -> Self {
        if project_id == 0 {
            Self::Agent
        } else {
            Self::Project(project_id)
        }
    }

    /// Whether a suspension of this scope covers `project_id`.
    pub fn covers(self, project_id: i64) -> bool {
        match self {
            Self::Agent => true,
            Self::Project(id) => id == project_id,
        }
    }
}

/// A stored GitOps suspension (`kas agent suspend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    pub agent_id: i64,
    pub scope: SuspensionScope,
    /// Why, as the operator wrote it (may be empty).
    pub reason: String,
    /// Who: the admin identity that asked.
    pub suspended_by: String,
    /// Unix seconds.
    pub suspended_at: i64,
}

/// A suspension's row as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct SuspensionRow {
    pub(crate) agent_id: i64,
    pub(crate) project_id: i64,
    pub(crate) reason: String,
    pub(crate) suspended_by: String,
    pub(crate) suspended_at: i64,
}

impl From<SuspensionRow> for Suspension {
    fn from(r: SuspensionRow) -> Self {
        Self {
            agent_id: r.agent_id,
            scope: SuspensionScope::from_column(r.project_id),
            reason: r.reason,
            suspended_by: r.suspended_by,
            suspended_at: r.suspended_at,
        }
    }
}
