//! The SQLite backend.
//!
//! The statements are shared with the PostgreSQL backend (see [`crate::backend`]); what is
//! SQLite's own is how the file is opened and how writes begin (see [`crate::txn`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
};

use crate::error::Result;
use crate::txn::WriteTxn;

/// Schema migrations compiled into the binary, so a fresh kas needs no files besides its database;
/// newer ones already applied are tolerated (see [`crate::migrate`]).
fn migrator() -> sqlx::migrate::Migrator {
    crate::migrate::tolerant(sqlx::migrate!("./migrations/sqlite"))
}

/// How long a connection waits for another writer before failing with "database is locked".
/// Writes are tiny, so contention should clear well within this.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite allows a single writer at a time; a few connections are enough for concurrent readers
/// (they share the read lock) without piling up waiters on the write lock.
const MAX_CONNECTIONS: u32 = 4;

/// Connections a write tries before giving up on finding a writable one: one more than the pool
/// holds, so every connection left over from a read-only spell can be replaced (see
/// [`WriteTxn::begin`]).
const WRITE_ATTEMPTS: u32 = MAX_CONNECTIONS + 1;

/// [`Store`](crate::Store) backed by a SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    /// Writers of this process take turns here (see [`WriteTxn::begin`]).
    writer: Arc<tokio::sync::Mutex<()>>,
    /// What opening it did to the schema.
    migrated: crate::migrate::Migrated,
}

impl SqliteStore {
    /// Versions of the migrations the database had at open that this binary does not know (a
    /// newer kas applied them); empty when its schema is this binary's.
    pub fn newer_migrations(&self) -> &[i64] {
        &self.migrated.newer
    }

    /// What opening the database did to its schema (created, migrated, or found up to date).
    pub fn migrated(&self) -> &crate::migrate::Migrated {
        &self.migrated
    }

    /// Opens (creating if missing) the database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            // A rollback journal rather than WAL: WAL's index (`-shm`) is a memory-mapped file,
            // and a mapped page the filesystem cannot back kills the process with SIGBUS, where
            // file writes fail with an error we can report. Readers still share the database;
            // they only wait (busy_timeout) during the few milliseconds a commit holds the
            // exclusive lock. TRUNCATE rather than DELETE: no directory update per commit, and
            // the journal's space is still given back after each one. An existing WAL database
            // is converted on first open.
            .journal_mode(SqliteJournalMode::Truncate)
            // No memory-mapped I/O on the database file either, for the same reason; this is
            // SQLite's default, stated so that no default elsewhere can turn it on.
            .pragma("mmap_size", "0")
            .busy_timeout(BUSY_TIMEOUT)
            // SQLite ignores REFERENCES clauses unless told otherwise, per connection.
            .foreign_keys(true);
        // Migrated on a connection of its own, closed before the pool opens any: a migration
        // that turns foreign keys off to rebuild a table (0012) must not leave a connection
        // without them behind, whatever it ends with.
        let mut conn = sqlx::ConnectOptions::connect(&options).await?;
        let migrator = migrator();
        let before = crate::migrate::applied(&mut conn).await?;
        migrator.run(&mut conn).await?;
        let migrated = crate::migrate::report(&migrator, &mut conn, &before).await?;
        sqlx::Connection::close(conn).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            writer: Arc::default(),
            migrated,
        })
    }

    /// Copies a write-ahead log, if the database still has one, into the main database file and
    /// truncates it. Useful before taking a file-level backup. The store itself no longer uses
    /// WAL, so this is a no-op unless the database was opened elsewhere in WAL mode.
    pub async fn checkpoint(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Begins a write; see [`WriteTxn`] for why writes do not use sqlx's `Transaction`.
    async fn write(&self) -> Result<WriteTxn<sqlx::Sqlite>> {
        let turn = Arc::clone(&self.writer).lock_owned().await;
        WriteTxn::<sqlx::Sqlite>::begin(&self.pool, WRITE_ATTEMPTS, turn).await
    }
}

crate::backend::impl_store!(SqliteStore, SqliteConnection);
