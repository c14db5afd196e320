//! A consistent copy of a SQLite database while kas runs on it (`kas store backup`).
//!
//! `VACUUM INTO` reads the database inside one read transaction and writes a fresh, compact
//! database file from it: a snapshot as of one moment, never a half-written page, whatever kas
//! writes meanwhile. With kas's rollback journal a reader holds the shared lock for the whole
//! copy, so kas's commits wait for it (its busy timeout is 5 s); kas's databases are a few
//! megabytes, copied in milliseconds.

use std::path::Path;
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::sqlite::SqliteConnectOptions;

use crate::error::Result;

/// How long the copy waits for a writer holding the database to finish (a writer about to
/// commit keeps new readers out). Longer than kas's own: the copy is what the operator asked for.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes a consistent copy of the SQLite database at `source` to `target`, which must not exist
/// or be empty (SQLite refuses anything else). The source is opened read-only and never
/// migrated or created: a backup must not change the database it copies, and a newer CLI must
/// not migrate a database an older kas is running on.
pub async fn sqlite_snapshot(source: &Path, target: &str) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(source)
        .read_only(true)
        .busy_timeout(BUSY_TIMEOUT);
    let mut conn = sqlx::ConnectOptions::connect(&options).await?;
    // A parameter, not text spliced into the statement: any file name is taken as it is.
    let copied = sqlx::query("VACUUM INTO $1")
        .bind(target)
        .execute(&mut conn)
        .await;
    let closed = conn.close().await;
    copied?;
    closed?;
    Ok(())
}
