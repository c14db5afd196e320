//! The PostgreSQL backend, for kas installations that outgrow one machine: the same records and
//! the same SQL as [`SqliteStore`](crate::SqliteStore) (see [`crate::backend`]), on a server
//! several kas replicas can share.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::error::{Error, Result};
use crate::txn::WriteTxn;

/// Schema migrations compiled into the binary; newer ones already applied are tolerated (see
/// [`crate::migrate`]). sqlx's migrator holds a PostgreSQL advisory lock while it runs, so
/// replicas starting together apply them once.
fn migrator() -> sqlx::migrate::Migrator {
    crate::migrate::tolerant(sqlx::migrate!("./migrations/postgres"))
}

/// Brings the schema up to date on `conn`, saying what it did (see [`crate::migrate::report`]).
async fn migrate(
    migrator: &sqlx::migrate::Migrator,
    conn: &mut PgConnection,
) -> Result<crate::migrate::Migrated> {
    let before = crate::migrate::applied(conn).await?;
    migrator.run(&mut *conn).await?;
    crate::migrate::report(migrator, conn, &before).await
}

/// Connections per kas process. Reads are many and short (token checks, listings); writes queue
/// on one lock anyway (see [`WriteTxn::begin`]), so more would mostly sit idle on the server.
const MAX_CONNECTIONS: u32 = 8;

/// How long an operation waits for a connection before failing. Short enough that a database
/// that cannot be reached shows up as an error (and kas as not ready) within seconds instead of
/// sqlx's default 30 s, long enough to ride out a busy moment.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a write waits for this process's turn to write: the server's `lock_timeout` (see
/// [`SESSION_SETTINGS`]), so a write fails after about as long whether it queues here or on
/// the server.
const WRITE_TURN_WAIT: Duration = Duration::from_secs(30);

/// The default of [`PgStore::connect_with_timeout`]'s `statement_timeout`: far above what any
/// of kas's statements takes, and above `lock_timeout` (a write waiting for the lock reports
/// that, not this).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How much longer than the server's `statement_timeout` a client waits for an answer (see
/// [`PgStore::operation_timeout`]): the server's own cancellation, a clearer error, comes
/// first whenever the server is there to send it.
const CLIENT_MARGIN: Duration = Duration::from_secs(5);

/// [`Store`](crate::Store) backed by a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    /// Writers of this process take turns here before taking a connection (see
    /// [`PgStore::write`]).
    writer: Arc<tokio::sync::Mutex<()>>,
    /// The server's `statement_timeout` on every session.
    statement_timeout: Duration,
    /// What opening it did to the schema.
    migrated: crate::migrate::Migrated,
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database[?sslmode=…]`) and
    /// brings the schema up to date. Fails if the server cannot be reached now; once running,
    /// the pool reconnects by itself and each operation reports the outage as an error.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_timeout(url, DEFAULT_STATEMENT_TIMEOUT).await
    }

    /// As [`PgStore::connect`], the server cancelling any statement running longer than
    /// `statement_timeout` (rounded to milliseconds; zero: none).
    pub async fn connect_with_timeout(url: &str, statement_timeout: Duration) -> Result<Self> {
        let options = connect_options(url, statement_timeout)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        // On a connection of its own without `lock_timeout` nor `statement_timeout`: the
        // migrator waits on an advisory lock while another replica (or `kas store migrate`)
        // migrates, however long that takes, and a migration may rewrite a large table.
        let unbounded = options.options([("lock_timeout", "0"), ("statement_timeout", "0")]);
        let mut conn = <PgConnection as sqlx::Connection>::connect_with(&unbounded).await?;
        let migrator = migrator();
        let migrated = migrate(&migrator, &mut conn).await;
        let _ = sqlx::Connection::close(conn).await;
        Ok(Self {
            pool,
            writer: Arc::default(),
            statement_timeout,
            migrated: migrated?,
        })
    }

    /// Versions of the migrations the database had at open that this binary does not know (a
    /// newer kas applied them); empty when its schema is this binary's.
    pub fn newer_migrations(&self) -> &[i64] {
        &self.migrated.newer
    }

    /// What opening the database did to its schema (created, migrated, or found up to date).
    pub fn migrated(&self) -> &crate::migrate::Migrated {
        &self.migrated
    }

    /// How long a client should wait for one operation before giving up on the server: its
    /// `statement_timeout` and a margin (`None` without one). Neither sqlx nor the kernel
    /// bounds a query whose server vanished (no reset, no answer) before TCP gives up, about
    /// 15 minutes, and the server's timeout cannot end what it never hears of.
    pub fn operation_timeout(&self) -> Option<Duration> {
        (!self.statement_timeout.is_zero()).then(|| self.statement_timeout + CLIENT_MARGIN)
    }

    /// Makes the pool's new connections use `url` (a rotated password), once one connection
    /// with it has worked: credentials the server does not take yet keep the pool on the
    /// working ones. Open connections stay (PostgreSQL keeps a session whose role's password
    /// changed); they are replaced as they close.
    pub async fn switch_url(&self, url: &str) -> Result<()> {
        let options = connect_options(url, self.statement_timeout)?;
        let probe = <PgConnection as sqlx::Connection>::connect_with(&options);
        let conn = tokio::time::timeout(ACQUIRE_TIMEOUT, probe)
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        // Closing is a courtesy to the server; the switch does not depend on it.
        let _ = sqlx::Connection::close(conn).await;
        self.pool.set_connect_options(options);
        Ok(())
    }

    /// Begins a write; see [`WriteTxn`].
    ///
    /// Writes run one at a time anyway (they queue on the lock of [`WriteTxn::begin`]), but a
    /// writer waiting for that lock holds one of the pool's few connections. When the database
    /// was slow, or another replica held the lock, queued writers took every connection and
    /// reads (token checks, readiness) failed to get one: a slow write starved the whole
    /// replica. Writers of this process therefore queue here first, without a connection, for
    /// at most as long as the server lets a write wait for its lock.
    pub(crate) async fn write(&self) -> Result<WriteTxn<sqlx::Postgres>> {
        let turn = tokio::time::timeout(WRITE_TURN_WAIT, Arc::clone(&self.writer).lock_owned())
            .await
            .map_err(|_| Error::WriteTurnTimedOut(WRITE_TURN_WAIT))?;
        WriteTxn::<sqlx::Postgres>::begin(&self.pool, turn).await
    }
}

/// Settings of every session kas opens, so that the server frees what a vanished kas held.
///
/// Every write holds one lock shared by all replicas ([`WriteTxn::begin`]); a replica whose
/// node died, or whose connection a network drop left half-open, in the middle of a write
/// would otherwise keep it until the server's TCP keepalive noticed (about two hours on
/// Linux), and every replica's writes would queue behind it. The server ends a session idle
/// inside a transaction after `idle_in_transaction_session_timeout` (kas's transactions never
/// wait on anything but the database, so they are idle for microseconds) and probes a silent
/// client after `tcp_keepalives_*`; a write waiting longer than `lock_timeout` for the lock
/// fails, reported, instead of hanging. The server's NOTICEs ("relation … already exists,
/// skipping" from the migrator) stay out of kas's log; warnings and errors still come through.
const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("client_min_messages", "warning"),
    ("idle_in_transaction_session_timeout", "15s"),
    ("lock_timeout", "30s"),
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
];

/// The options a URL gives, with [`SESSION_SETTINGS`] and the server cancelling statements
/// running longer than `statement_timeout` (a query left running by a client that gave up).
fn connect_options(url: &str, statement_timeout: Duration) -> Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse()?;
    let millis = statement_timeout.as_millis().to_string();
    Ok(options
        .options(SESSION_SETTINGS)
        .options([("statement_timeout", millis.as_str())]))
}

crate::backend::impl_store!(PgStore, PgConnection);
