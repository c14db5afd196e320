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
//! closes the connection, which makes SQLite discard whatever transaction it still had, and
//! the pool opens a fresh one when needed. Reads run in autocommit mode and are unaffected.

use sqlx::Sqlite;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};

use crate::error::Result;

/// An open write transaction on a connection taken from the pool.
#[derive(Debug)]
pub(crate) struct WriteTxn {
    conn: PoolConnection<Sqlite>,
    committed: bool,
}

impl WriteTxn {
    /// Begins a write transaction, trying up to `attempts` connections.
    ///
    /// A connection opened while the filesystem was read-only stays read-only for its lifetime
    /// (SQLite falls back to opening the file read-only). Such connections are closed as they
    /// are found, so once the filesystem is writable again a fresh connection takes over
    /// without the store being reopened; `attempts` should exceed the pool size for that.
    pub(crate) async fn begin(pool: &SqlitePool, attempts: u32) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let mut conn = pool.acquire().await?;
            match begin_on(&mut conn).await {
                Ok(()) => {
                    return Ok(Self {
                        conn,
                        committed: false,
                    });
                }
                Err(e) => {
                    // Closing only fails for a connection that is broken anyway; the caller
                    // needs BEGIN's error, not that one.
                    let _ = conn.close().await;
                    if !is_read_only(&e) || attempt >= attempts {
                        return Err(e.into());
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// The connection to run the transaction's statements on.
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Commits; on error nothing was written and the connection is discarded.
    pub(crate) async fn commit(mut self) -> Result<()> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for WriteTxn {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

/// Starts a write transaction and checks that the connection can write at all.
async fn begin_on(conn: &mut SqliteConnection) -> std::result::Result<(), sqlx::Error> {
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
