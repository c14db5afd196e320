//! kas's database: opening the configured one (SQLite or PostgreSQL), the commands that work on
//! it without serving (`kas store migrate`, `kas store copy`, `kas store backup`), and readiness,
//! which follows whether the database answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tether_store::copy::TableCount;
use tether_store::{PgStore, SqliteStore, Store};
use tether_transport::Outage;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseLocation;

/// How often readiness asks the database whether it answers.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// How long one readiness check may take before it counts as "not answering". Below the
/// interval, so checks never pile up.
const READINESS_TIMEOUT: Duration = Duration::from_millis(1500);

/// While a check keeps failing, how often the log says so again.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);

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

/// The database kas serves from: the store, how long one of its operations may take (see
/// [`PgStore::operation_timeout`]; `None` for SQLite, on local disk), and the task following
/// `database.url_file`, if any.
#[derive(Debug)]
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub operation_timeout: Option<Duration>,
    pub follower: Option<tokio::task::JoinHandle<()>>,
}

/// Opens the configured database and, when its URL came from `database.url_file`, follows that
/// file until `stop` (see [`follow_url`]).
pub async fn open_followed(cfg: &crate::config::Config, stop: CancellationToken) -> Result<Opened> {
    let location = cfg.database_location();
    let DatabaseLocation::Postgres(url) = &location else {
        let store = open(&location).await?;
        return Ok(Opened {
            store,
            operation_timeout: None,
            follower: None,
        });
    };
    let timeout = cfg.database.statement_timeout;
    let pg = PgStore::connect_with_timeout(url, timeout).await?;
    let follower = cfg
        .database
        .url_read_from
        .as_ref()
        .map(|file| tokio::spawn(follow_url(pg.clone(), file.clone(), url.clone(), stop)));
    Ok(Opened {
        operation_timeout: pg.operation_timeout(),
        store: Arc::new(pg),
        follower,
    })
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
/// Returns what it did, and the versions of migrations the database has that this kas does
/// not know (a newer kas applied them), which the command must not call "up to date".
pub async fn migrate(location: &DatabaseLocation) -> Result<tether_store::Migrated> {
    let context = || format!("migrating the database {location}");
    let (store, migrated): (Arc<dyn Store>, _) = match location {
        DatabaseLocation::Sqlite(path) => {
            let s = SqliteStore::open(path).await.with_context(context)?;
            let migrated = s.migrated().clone();
            (Arc::new(s), migrated)
        }
        DatabaseLocation::Postgres(url) => {
            let s = PgStore::connect(url).await.with_context(context)?;
            let migrated = s.migrated().clone();
            (Arc::new(s), migrated)
        }
    };
    store.close().await;
    Ok(migrated)
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
    // A snapshot of the file is brought up to date and read, never the file itself: `--from`
    // is often a backup or the database of the kas being replaced, which must stay a way back
    // (migrated in place, the older kas could no longer start on it).
    let snapshot =
        std::env::temp_dir().join(format!("kas-store-copy-{}.sqlite", std::process::id()));
    let _ = std::fs::remove_file(&snapshot);
    let copied = copy_snapshot(path, &snapshot, url).await;
    for leftover in [snapshot.clone(), snapshot.with_extension("sqlite-journal")] {
        let _ = std::fs::remove_file(leftover);
    }
    copied.with_context(|| format!("copying {from} to {to}"))
}

/// [`copy`] through `snapshot`, a copy of the SQLite file at `path` made first.
async fn copy_snapshot(path: &Path, snapshot: &Path, url: &str) -> Result<Vec<TableCount>> {
    tether_store::backup::sqlite_snapshot(path, snapshot)
        .await
        .with_context(|| format!("taking a snapshot of {}", path.display()))?;
    let source = SqliteStore::open(snapshot)
        .await
        .context("opening the snapshot")?;
    let target = PgStore::connect(url).await.context("opening the target")?;
    let copied = tether_store::copy::sqlite_to_postgres(&source, &target).await;
    source.close().await;
    target.close().await;
    Ok(copied?)
}

/// What `kas store backup` wrote.
#[derive(Debug)]
pub struct BackupDone {
    /// The backup's size.
    pub bytes: u64,
    /// How long the copy took (kas's commits wait at most for one of its steps).
    pub took: Duration,
}

/// `kas store backup`: a consistent copy of the SQLite database at `to`, taken while kas runs.
/// An existing `to` is refused unless `force`. The copy is written next to `to` and moved there
/// only once complete and on disk, so a failed backup never leaves a truncated file where a
/// restore would look for one, nor destroys the previous backup.
pub async fn backup(location: &DatabaseLocation, to: &Path, force: bool) -> Result<BackupDone> {
    let DatabaseLocation::Sqlite(path) = location else {
        bail!(
            "kas store backup copies the embedded SQLite database; this kas uses PostgreSQL \
             ({location}). Back it up with pg_dump, which takes a consistent snapshot while kas \
             runs and is restored with pg_restore: pg_dump --format=custom --file=kas.dump <database.url>"
        );
    };
    // Opening would create an empty database: a mistyped path must not "back up" nothing.
    if !path.is_file() {
        bail!("{location}: no such database file");
    }
    if !force && to.symlink_metadata().is_ok() {
        bail!(
            "{} exists; choose another file or pass --force to replace it",
            to.display()
        );
    }
    let partial = partial_path(to)?;
    create_partial(&partial)?;
    let written = write_snapshot(path, &partial).await;
    let placed = written.and_then(|took| place(&partial, to, force).map(|()| took));
    if placed.is_err() {
        // Ours (created just above); what failed is the error to report, not this removal.
        let _ = std::fs::remove_file(&partial);
    }
    let took = placed?;
    let bytes = std::fs::metadata(to)
        .with_context(|| format!("reading {}", to.display()))?
        .len();
    Ok(BackupDone { bytes, took })
}

/// The file the backup is written to before it is complete: hidden, beside `to` (so the final
/// rename stays within one filesystem), named by this process.
fn partial_path(to: &Path) -> Result<PathBuf> {
    let Some(name) = to.file_name() else {
        bail!("{}: not a file name", to.display());
    };
    let mut partial = std::ffi::OsString::from(".");
    partial.push(name);
    partial.push(format!(".partial-{}", std::process::id()));
    Ok(to.with_file_name(partial))
}

/// Creates the empty `partial`, owner-only: the backup holds token digests (SQLite writes into
/// an empty file and keeps its mode).
fn create_partial(partial: &Path) -> Result<()> {
    std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new().write(true).create_new(true),
        0o600,
    )
    .open(partial)
    .with_context(|| format!("creating {} to write the backup into", partial.display()))?;
    Ok(())
}

/// `kas store restore`: replaces the stopped kas's SQLite database with a copy of `from` whose
/// id counters continue after the largest ids the replaced database ever gave; says what the
/// restore undoes (revocations, suspensions). The replaced database stays whole until the
/// copy is complete. `kas_running`: whether kas answers on its internal API (then nothing is
/// touched: replacing a database under a running kas loses its writes).
pub async fn restore(
    location: &DatabaseLocation,
    from: &Path,
    kas_running: Option<std::net::SocketAddr>,
) -> Result<tether_store::restore::RestoreReport> {
    let DatabaseLocation::Sqlite(path) = location else {
        bail!(
            "kas store restore replaces the embedded SQLite database; this kas uses PostgreSQL \
             ({location}): restore with pg_restore, then raise the id sequences past the largest \
             ids given since the dump (see kas-configuration.md, Backup and restore)"
        );
    };
    if let Some(api) = kas_running {
        bail!("kas answers on its internal API ({api}): stop it before restoring its database");
    }
    if !from.is_file() {
        bail!("{}: no such backup file", from.display());
    }
    let partial = partial_path(path)?;
    create_partial(&partial)?;
    let copied = restore_copy(from, path, &partial).await;
    let placed = copied.and_then(|report| place(&partial, path, true).map(|()| report));
    if placed.is_err() {
        // Ours (created just above); what failed is the error to report, not this removal.
        let _ = std::fs::remove_file(&partial);
    }
    let report = placed?;
    // The replaced file's rollback journal belongs to it, not to the restored one.
    let mut journal = path.as_os_str().to_owned();
    journal.push("-journal");
    match std::fs::remove_file(&journal) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", journal.to_string_lossy()));
        }
        _ => {}
    }
    Ok(report)
}

/// Copies the backup `from` into `partial` and adjusts it against the database at `db`.
async fn restore_copy(
    from: &Path,
    db: &Path,
    partial: &Path,
) -> Result<tether_store::restore::RestoreReport> {
    let (from, db, partial) = (from.to_owned(), db.to_owned(), partial.to_owned());
    tokio::task::spawn_blocking(move || {
        std::fs::copy(&from, &partial)
            .with_context(|| format!("copying {} to {}", from.display(), partial.display()))?;
        let current = db.is_file().then_some(db.as_path());
        let report = tether_store::restore::adjust_restored_copy(&partial, current)
            .with_context(|| format!("{}", from.display()))?;
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", partial.display()))?;
        Ok(report)
    })
    .await?
}

/// Fills `partial` with the snapshot and flushes it to disk; returns how long the copy took.
async fn write_snapshot(db: &Path, partial: &Path) -> Result<Duration> {
    let started = Instant::now();
    tether_store::backup::sqlite_snapshot(db, partial)
        .await
        .with_context(|| format!("copying sqlite:{} to {}", db.display(), partial.display()))?;
    let took = started.elapsed();
    std::fs::File::open(partial)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", partial.display()))?;
    Ok(took)
}

/// Moves the complete backup to `to`. Without `force` a hard link, which fails rather than
/// replace a file that appeared since the check; with it a rename, which replaces atomically.
fn place(partial: &Path, to: &Path, force: bool) -> Result<()> {
    if force {
        std::fs::rename(partial, to)
            .with_context(|| format!("moving the backup to {}", to.display()))?;
    } else {
        match std::fs::hard_link(partial, to) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!(
                    "{} exists; choose another file or pass --force to replace it",
                    to.display()
                )
            }
            other => other.with_context(|| format!("moving the backup to {}", to.display()))?,
        }
        std::fs::remove_file(partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    // The new directory entry must survive a crash too, not only the file's content.
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing {}", dir.display()))?;
    }
    Ok(())
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
        let (mut database, mut redis_outage) = (Checked::new("Database"), Checked::new("Redis"));
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
            let mut answered = database.record(answers(store.check()).await);
            if let Some(r) = &redis {
                answered &= redis_outage.record(answers(r.check()).await);
            }
            let was = ready.send_replace(answered);
            if answered && !was {
                // Named as configured: "and Redis" on a kas without Redis sent operators to
                // look for one.
                let what = if redis.is_some() {
                    "Database and Redis answer"
                } else {
                    "Database answers"
                };
                tracing::info!("{what} again: ready");
            }
        }
    })
}

/// One dependency readiness checks, and how its failures are logged: at once, then once a
/// minute while they last (not every 2 s), then its recovery.
struct Checked {
    what: &'static str,
    outage: Outage,
}

impl Checked {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            outage: Outage::new(OUTAGE_REMINDER),
        }
    }

    /// Logs what `answer` calls for; whether it answered.
    fn record(&mut self, answer: Result<(), String>) -> bool {
        let what = self.what;
        match answer {
            Ok(()) => {
                self.outage.info_recovered(&format!("{what} answers again"));
                true
            }
            Err(error) => {
                self.outage
                    .warn_failed(&format!("{what} check failed: not ready"), &error);
                false
            }
        }
    }
}

/// Whether a check answered within [`READINESS_TIMEOUT`]; why not.
async fn answers<E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(READINESS_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            READINESS_TIMEOUT.as_millis()
        )),
    }
}
