//! `kas store backup`'s copy ([`tether_store::backup`]) of a real SQLite database that kas's
//! store keeps writing to meanwhile.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tether_store::backup::{Progress, sqlite_snapshot_in_steps};
use tether_store::{SqliteStore, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Pages per step in the test: small, so that the database below takes dozens of steps.
const PAGES_PER_STEP: u32 = 64;

/// Steps at which the test writes while the copy waits (the copy's first steps).
const WRITES: usize = 3;

/// How long the copy waits for the test to have written before going on regardless; a
/// deadline against a hung test, not a synchronisation.
const WRITE_DEADLINE: Duration = Duration::from_secs(60);

/// Grows the database by about 8 MB (2,000 pages of 4 KiB) of rows kas never reads.
fn fill(path: &Path) -> rusqlite::Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "CREATE TABLE filler (b BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO filler SELECT randomblob(3500) FROM n;",
    )
}

/// Writes made through kas's store while a backup is between its steps succeed (the copy holds
/// no lock then, however large the database: a copy holding its read lock throughout makes
/// them fail with "database is locked" after the store's busy timeout), and the copy, which
/// started over after them, is a valid database holding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_during_a_backup_succeed_and_the_copy_is_a_valid_database_holding_them()
-> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kas.db");
    let store = SqliteStore::open(&path).await?;
    store.ensure_project("group/app").await?;
    store.register_agent("group/app", "before").await?;
    fill(&path)?;
    let target = dir.path().join("backup.db");

    let (at_step, mut reached) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let (written, wait_written) = mpsc::channel::<()>();
    let steps = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&steps);
    let backup = tokio::spawn({
        let (path, target) = (path.clone(), target.clone());
        async move {
            sqlite_snapshot_in_steps(&path, &target, PAGES_PER_STEP, move |progress| {
                let mut seen = seen.lock().expect("steps lock");
                seen.push(progress);
                if seen.len() <= WRITES && at_step.send(progress).is_ok() {
                    drop(seen);
                    let _ = wait_written.recv_timeout(WRITE_DEADLINE);
                }
            })
            .await
        }
    });
    for i in 0..WRITES {
        let progress = reached
            .recv()
            .await
            .ok_or("the backup ended before its steps")?;
        assert!(progress.remaining > 0, "{progress:?}");
        store
            .register_agent("group/app", &format!("during-{i}"))
            .await
            .map_err(|e| format!("write during the backup ({progress:?}): {e}"))?;
        written.send(())?;
    }
    backup.await??;

    let steps = steps.lock().map_err(|e| e.to_string())?.clone();
    let first = steps.first().ok_or("no steps")?;
    assert!(
        first.pages > 20 * PAGES_PER_STEP,
        "the database takes few steps: {first:?}"
    );
    let last = steps.last().ok_or("no steps")?;
    assert_eq!(
        last.restarts, WRITES as u32,
        "each write restarts the copy: {last:?}"
    );

    let copy = rusqlite::Connection::open(&target)?;
    let check: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    assert_eq!(check, "ok");
    drop(copy);
    let restored = SqliteStore::open(&target).await?;
    let mut names: Vec<String> = restored
        .list_agents()
        .await?
        .into_iter()
        .map(|a| a.name)
        .collect();
    names.sort();
    assert_eq!(names, ["before", "during-0", "during-1", "during-2"]);
    Ok(())
}
