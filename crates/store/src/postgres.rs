//! The PostgreSQL backend, for kas installations that outgrow one machine: the same records and
//! the same SQL as [`SqliteStore`](crate::SqliteStore) (see [`crate::backend`]), on a server
//! several kas replicas can share.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::error::Result;
use crate::txn::WriteTxn;

/// Schema migrations compiled into the binary. sqlx's migrator holds a PostgreSQL advisory lock
/// while it runs, so replicas starting together apply them once.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per kas process. Reads are many and short (token checks, listings); writes queue
/// on one lock anyway (see [`WriteTxn::begin`]), so more would mostly sit idle on the server.
const MAX_CONNECTIONS: u32 = 8;

/// How long an operation waits for a connection before failing. Short enough that a database
/// that cannot be reached shows up as an error (and kas as not ready) within seconds instead of
/// sqlx's default 30 s, long enough to ride out a busy moment.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Store`](crate::Store) backed by a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database[?sslmode=…]`) and
    /// brings the schema up to date. Fails if the server cannot be reached now; once running,
    /// the pool reconnects by itself and each operation reports the outage as an error.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        // The server's NOTICEs ("relation … already exists, skipping" from the migrator) would
        // land in kas's log as noise; warnings and errors still come through.
        let options = options.options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// Begins a write; see [`WriteTxn`].
    async fn write(&self) -> Result<WriteTxn<sqlx::Postgres>> {
        WriteTxn::<sqlx::Postgres>::begin(&self.pool).await
    }
}

crate::backend::impl_store!(PgStore, PgConnection);
