//! The store's error type.

/// Everything a [`Store`](crate::Store) operation can fail with.
///
/// Callers are expected to match on the first three variants (they map to user-facing answers
/// such as HTTP 400/404/409); the last three are operational failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A project path or agent name does not have the required shape.
    #[error("invalid {what}: {reason}")]
    InvalidName {
        /// What was being validated, e.g. "agent name".
        what: &'static str,
        /// Why it was rejected, including the offending value.
        reason: String,
    },
    /// The record the operation refers to does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record with the same unique key already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),

    /// The record is still referenced and cannot be removed.
    #[error("{0}")]
    InUse(String),
    /// The database driver failed (I/O, locking, constraint, ...).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// This kas's earlier writes held the write turn for longer than a write may wait for it
    /// (a database that stopped answering, or a lock another replica does not let go).
    #[error("no turn to write within {} s: earlier writes of this kas are still waiting on the database", .0.as_secs())]
    WriteTurnTimedOut(std::time::Duration),
    /// The database did not answer within the operation timeout (a server that vanished, a
    /// network that drops everything): given up rather than waited on for the kernel's TCP
    /// retransmissions, a quarter of an hour.
    #[error("the database did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// The embedded schema migrations could not be applied.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A copy of a SQLite database (`kas store backup`) failed.
    #[error("database backup failed: {0}")]
    Backup(#[from] crate::backup::BackupError),
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
