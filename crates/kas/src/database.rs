//! kas's database: opening the configured one (SQLite or PostgreSQL), the commands that work on
//! it without serving (`kas store migrate`, `kas store copy`), and readiness, which follows
//! whether the database answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tether_store::copy::TableCount;
use tether_store::{PgStore, SqliteStore, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseLocation;

/// How often readiness asks the database whether it answers.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// How long one readiness check may take before it counts as "not answering". Below the
/// interval, so checks never pile up.
const READINESS_TIMEOUT: Duration = Duration::from_millis(1500);

/// Opens the database and brings its schema up to date (both backends migrate on open).
pub async fn open(location: &DatabaseLocation) -> Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match location {
        DatabaseLocation::Sqlite(path) => Arc::new(SqliteStore::open(path).await?),
        DatabaseLocation::Postgres(url) => Arc::new(PgStore::connect(url).await?),
    };
    Ok(store)
}

/// How often the file of `database.url_file` is looked at.
const URL_RECHECK: Duration = Duration::from_secs(10);

/// Opens the configured database and, when its URL came from `database.url_file`, follows that
/// file until `stop` (see [`follow_url`]).
pub async fn open_followed(
    cfg: &crate::config::Config,
    stop: CancellationToken,
) -> Result<(Arc<dyn Store>, Option<tokio::task::JoinHandle<()>>)> {
    let location = cfg.database_location();
    let (DatabaseLocation::Postgres(url), Some(file)) = (&location, &cfg.database.url_read_from)
    else {
        return Ok((open(&location).await?, None));
    };
    let pg = PgStore::connect(url).await?;
    let follower = tokio::spawn(follow_url(pg.clone(), file.clone(), url.clone(), stop));
    Ok((Arc::new(pg), Some(follower)))
}

/// Follows the file holding the PostgreSQL URL: when it changes (a Secret with a rotated
/// password), new connections use the new URL once one connection with it works. Without this
/// kas would go on opening connections with the withdrawn password, and fail at the first
/// one it needs after the rotation. A URL the server does not take yet (the Secret changed
/// before the database) keeps the working one, warned once, and is tried at every check.
async fn follow_url(pg: PgStore, file: PathBuf, mut in_use: String, stop: CancellationToken) {
    let mut tick = tokio::time::interval(URL_RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Unknown at first: the file may have changed since it was read at start (migrations ran
    // in between), so the first check compares its URL with the one in use.
    let mut seen = None;
    let mut warned = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = crate::followed::stamp(&file);
        if now == seen {
            continue;
        }
        let tried = match read_url(&file) {
            Ok(url) if url == in_use => Ok(None),
            Ok(url) => pg
                .switch_url(&url)
                .await
                .map(|()| Some(url))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match tried {
            Ok(switched) => {
                if let Some(url) = switched {
                    in_use = url;
                    tracing::info!(file = %file.display(), "Database URL file changed: new connections use it");
                }
                seen = now;
                warned = None;
            }
            Err(error) if warned != Some(now) => {
                warned = Some(now);
                tracing::warn!(file = %file.display(), error, "Database URL file changed but does not connect; new connections keep the previous URL, trying again");
            }
            Err(_) => {}
        }
    }
}

/// The URL in `file`, checked to be PostgreSQL's. Errors never carry the URL (its password).
fn read_url(file: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let url = text.trim();
    match DatabaseLocation::parse(url) {
        Ok(DatabaseLocation::Postgres(url)) => Ok(url),
        _ => Err("not a postgres:// URL".to_owned()),
    }
}

/// `kas store migrate`: applies the schema migrations the database lacks, then closes it.
pub async fn migrate(location: &DatabaseLocation) -> Result<()> {
    let store = open(location)
        .await
        .with_context(|| format!("migrating the database {location}"))?;
    store.close().await;
    Ok(())
}

/// `kas store copy`: every record of a SQLite database (of a stopped kas) into an empty
/// PostgreSQL database. Returns the rows copied per table.
pub async fn copy(from: &DatabaseLocation, to: &DatabaseLocation) -> Result<Vec<TableCount>> {
    let (DatabaseLocation::Sqlite(path), DatabaseLocation::Postgres(url)) = (from, to) else {
        bail!("kas store copy copies from sqlite:PATH to a postgres:// URL (got {from} to {to})");
    };
    // Opening would create an empty database: a mistyped path must not "copy" nothing.
    if !path.is_file() {
        bail!("{from}: no such database file");
    }
    let source = SqliteStore::open(path)
        .await
        .with_context(|| format!("opening {from}"))?;
    let target = PgStore::connect(url)
        .await
        .with_context(|| format!("opening {to}"))?;
    let copied = tether_store::copy::sqlite_to_postgres(&source, &target)
        .await
        .with_context(|| format!("copying {from} to {to}"));
    source.close().await;
    target.close().await;
    copied
}

/// Keeps `ready` equal to "the database (and Redis, when configured) answered its last
/// check" until `stop`. A replica that cannot reach its database would fail every request that
/// needs a record, and one that cannot reach Redis would miss other replicas' revocations, so
/// it should leave the load balancer's rotation rather than take traffic.
pub fn spawn_readiness(
    store: Arc<dyn Store>,
    redis: Option<crate::cluster::Cluster>,
    (ready, draining): (watch::Sender<bool>, CancellationToken),
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(READINESS_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                // Stopping: not ready for good, so load balancers take this replica out
                // while it still serves what reaches it.
                () = draining.cancelled() => {
                    ready.send_replace(false);
                    return;
                }
                _ = ticks.tick() => {}
            }
            let mut answered = answers("Database", store.check()).await;
            if let Some(r) = &redis {
                answered &= answers("Redis", r.check()).await;
            }
            let was = ready.send_replace(answered);
            if answered && !was {
                tracing::info!("Database and Redis answer again: ready");
            }
        }
    })
}

/// Whether a check answered within [`READINESS_TIMEOUT`]; says why not.
async fn answers<E: std::fmt::Display>(
    what: &str,
    check: impl std::future::Future<Output = Result<(), E>>,
) -> bool {
    match tokio::time::timeout(READINESS_TIMEOUT, check).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{what} check failed: not ready");
            false
        }
        Err(_) => {
            tracing::warn!("{what} did not answer in time: not ready");
            false
        }
    }
}
