//! Write transactions that either commit or leave nothing behind.
//!
//! sqlx's `Transaction` tracks nesting in its own counter. When a COMMIT fails (SQLITE_FULL),
//! SQLite has already rolled back, the rollback sqlx then issues fails too, and the counter stays
//! at 1: the connection's next "transaction" becomes a SAVEPOINT, and rolling that back with
//! `ROLLBACK TO` leaves SQLite inside a transaction for good. Every later write on that
//! connection then looks successful yet is never committed, and it holds the write lock.
//!
//! So writes here issue BEGIN/COMMIT themselves, and a connection goes back to the pool only
//! after a COMMIT succeeded. Any other outcome (an error, an early return, a cancelled future)
//! closes the connection, which makes the server (or SQLite) discard whatever transaction it
//! still had, and the pool opens a fresh one when needed. Reads run in autocommit mode and are
//! unaffected. PostgreSQL gets the same treatment: one rule for both engines, and a failed
//! statement there leaves the transaction aborted anyway, so the connection is of no further use
//! to it.

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{Database, Postgres, Sqlite};

use tokio::sync::OwnedMutexGuard;

use crate::error::Result;

/// An open write transaction on a connection taken from the pool.
#[derive(Debug)]
pub(crate) struct WriteTxn<DB: Database> {
    conn: PoolConnection<DB>,
    committed: bool,
    /// This process's turn to write, released after the transaction ended.
    _turn: Option<OwnedMutexGuard<()>>,
}

impl<DB: Database> WriteTxn<DB> {
    /// The connection to run the transaction's statements on.
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

impl<DB: Database> WriteTxn<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    /// Commits; on error nothing was written and the connection is discarded.
    pub(crate) async fn commit(mut self) -> Result<()> {
        sqlx::Executor::execute(&mut *self.conn, "COMMIT").await?;
        self.committed = true;
        Ok(())
    }
}

impl<DB: Database> Drop for WriteTxn<DB> {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

impl WriteTxn<Sqlite> {
    /// Begins a write transaction, trying up to `attempts` connections.
    ///
    /// A connection opened while the filesystem was read-only stays read-only for its lifetime
    /// (SQLite falls back to opening the file read-only). Such connections are closed as they
    /// are found, so once the filesystem is writable again a fresh connection takes over
    /// without the store being reopened; `attempts` should exceed the pool size for that.
    ///
    /// `turn` is this process's write turn: taken first, in arrival order, so writers queue
    /// fairly here instead of polling SQLite's lock with growing sleeps, where under slow disks
    /// (fsync taking hundreds of milliseconds) an unlucky writer outwaited the busy timeout and
    /// an admin request failed with "database is locked". The busy timeout then only covers
    /// other processes and readers.
    pub(crate) async fn begin(
        pool: &SqlitePool,
        attempts: u32,
        turn: OwnedMutexGuard<()>,
    ) -> Result<Self> {
        let mut txn = Self::begin_on_writable_connection(pool, attempts).await?;
        txn._turn = Some(turn);
        Ok(txn)
    }

    async fn begin_on_writable_connection(pool: &SqlitePool, attempts: u32) -> Result<Self> {
        let mut attempt = 1;
        loop {
            // Owned by the transaction before BEGIN is sent: a caller giving up while BEGIN
            // waits for the write lock (an RPC cancelled at its deadline) drops it, and the
            // connection is closed. Left a bare pool connection, it went back to the pool
            // with BEGIN still to run, so later writes on it failed "cannot start a
            // transaction within a transaction" and it held the write lock meanwhile.
            let mut txn = Self {
                conn: pool.acquire().await?,
                committed: false,
                _turn: None,
            };
            match begin_on(txn.conn()).await {
                Ok(()) => return Ok(txn),
                Err(e) => {
                    // Dropping it closes the connection (never returned to the pool inside a
                    // transaction); the caller needs BEGIN's error.
                    drop(txn);
                    if !is_read_only(&e) || attempt >= attempts {
                        return Err(e.into());
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// The advisory lock every PostgreSQL write takes (an arbitrary constant: "tether" in ASCII).
const PG_WRITE_LOCK: i64 = 0x7465_7468_6572;

impl WriteTxn<Postgres> {
    /// Begins a write transaction holding kas's write lock until it commits or rolls back.
    ///
    /// The lock makes writes run one at a time, across every kas replica sharing the database,
    /// just as SQLite's `BEGIN IMMEDIATE` does: the shared SQL checks and then writes in places
    /// (`remove_project` counts agents before deleting, whose cascade would otherwise take an
    /// agent registered in between), which is only correct with a single writer. kas's writes
    /// are a few small rows each, so the queue stays short; reads do not take the lock.
    /// `turn` is this process's write turn (see `PgStore::write`), held until the end.
    pub(crate) async fn begin(pool: &PgPool, turn: OwnedMutexGuard<()>) -> Result<Self> {
        let conn = pool.acquire().await?;
        let mut txn = Self {
            conn,
            committed: false,
            _turn: Some(turn),
        };
        // Dropping `txn` on error closes the connection, which ends the transaction.
        sqlx::query("BEGIN").execute(txn.conn()).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_WRITE_LOCK)
            .execute(txn.conn())
            .await?;
        Ok(txn)
    }
}

/// Starts a write transaction and checks that the connection can write at all.
async fn begin_on(conn: &mut sqlx::SqliteConnection) -> std::result::Result<(), sqlx::Error> {
    // IMMEDIATE takes the write lock up front, waiting up to busy_timeout for it, so a
    // transaction that reads before writing cannot fail half-way with SQLITE_BUSY.
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    // BEGIN IMMEDIATE succeeds even on a connection opened read-only; a write statement, even
    // one matching no row, does not. It touches no page, so it costs nothing on a good one.
    sqlx::query("DELETE FROM projects WHERE false")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether SQLite refused to write because the database (or its connection) is read-only:
/// SQLITE_READONLY and its extended codes, which share the low byte 8.
fn is_read_only(error: &sqlx::Error) -> bool {
    const SQLITE_READONLY: i32 = 8;
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == SQLITE_READONLY)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use sqlx::{ConnectOptions, Connection};
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_given_up_while_waiting_for_the_lock_leaves_no_transaction_behind() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE projects (id INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        // Another process holds the write lock.
        let mut other = options.connect().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        let given_up = tokio::time::timeout(
            Duration::from_millis(300),
            WriteTxn::begin_on_writable_connection(&pool, 1),
        )
        .await;
        assert!(given_up.is_err(), "BEGIN waited for the lock");
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        other.close().await.unwrap();

        let mut txn = WriteTxn::begin_on_writable_connection(&pool, 1)
            .await
            .expect("the next write begins on a connection outside any transaction");
        sqlx::query("INSERT INTO projects VALUES (1)")
            .execute(txn.conn())
            .await
            .unwrap();
        txn.commit().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "committed");
    }
}
