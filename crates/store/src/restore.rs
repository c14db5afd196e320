//! Restoring a SQLite backup over the database kas used since (`kas store restore`).
//!
//! A backup is the database as of one moment; restored as it is, it brings back that moment's
//! id counters, revocations and suspensions. Ids given since would be given again: an agent
//! registered after the backup and still running in a cluster (its inventories and Lease are
//! named by its id) would share its id with the next one registered, and `kas token revoke 3`
//! in a runbook would name another token. So the restored copy keeps the larger of each
//! counter, and what the restore undoes — revocations and suspensions made since — is said.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// What restoring a backup over the current database changed or brought back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Tables whose id counter was raised past the backup's (table, next id after).
    pub counters_kept: Vec<(String, i64)>,
    /// Agent tokens revoked since the backup, active again.
    pub revived_tokens: Vec<i64>,
    /// Personal access tokens revoked since the backup, active again.
    pub revived_user_tokens: Vec<i64>,
    /// Suspensions made since the backup, gone (agent id, project id, by, reason).
    pub lost_suspensions: Vec<(i64, i64, String, String)>,
}

/// Why a restore could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The file is a SQLite database, but not kas's.
    #[error("the backup holds no kas database (no agents table)")]
    NotKas,
}

/// What the database used since the backup knows that the backup must not undo silently.
#[derive(Debug, Default)]
struct Since {
    counters: Vec<(String, i64)>,
    revoked_tokens: Vec<i64>,
    revoked_user_tokens: Vec<i64>,
    suspensions: Vec<(i64, i64, String, String)>,
}

/// Adjusts `copy`, a copy of the backup about to replace `current` (the database kas used
/// since, if there is one): its id counters continue after every id `current` ever gave, and
/// the report says which revocations and suspensions the restore undoes. Blocking.
pub fn adjust_restored_copy(
    copy: &Path,
    current: Option<&Path>,
) -> Result<RestoreReport, RestoreError> {
    let restored = Connection::open(copy)?;
    let is_kas: Option<String> = restored
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'agents'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if is_kas.is_none() {
        return Err(RestoreError::NotKas);
    }
    let Some(current) = current else {
        return Ok(RestoreReport::default());
    };
    let since = read_since(current)?;
    let mut report = RestoreReport::default();
    for (table, seq) in &since.counters {
        let restored_seq: i64 = restored
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        if *seq > restored_seq {
            restored.execute("DELETE FROM sqlite_sequence WHERE name = ?1", [table])?;
            restored.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?1, ?2)",
                rusqlite::params![table, seq],
            )?;
            report.counters_kept.push((table.clone(), *seq));
        }
    }
    report.revived_tokens = still_active(&restored, "agent_tokens", &since.revoked_tokens)?;
    report.revived_user_tokens =
        still_active(&restored, "user_tokens", &since.revoked_user_tokens)?;
    for s in since.suspensions {
        let kept: Option<i64> = restored
            .query_row(
                "SELECT 1 FROM gitops_suspensions WHERE agent_id = ?1 AND project_id = ?2",
                [s.0, s.1],
                |r| r.get(0),
            )
            .optional()?;
        if kept.is_none() {
            report.lost_suspensions.push(s);
        }
    }
    Ok(report)
}

/// The counters, revocations and suspensions of the database used since the backup (opened
/// read-only: a failed restore leaves it as it was).
fn read_since(current: &Path) -> Result<Since, rusqlite::Error> {
    let db = Connection::open_with_flags(current, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut since = Since::default();
    let mut q = db.prepare("SELECT name, seq FROM sqlite_sequence ORDER BY name")?;
    since.counters = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    since.revoked_tokens = ids(
        &db,
        "SELECT id FROM agent_tokens WHERE revoked_at IS NOT NULL",
    )?;
    since.revoked_user_tokens = ids(
        &db,
        "SELECT id FROM user_tokens WHERE revoked_at IS NOT NULL",
    )?;
    let mut q = db.prepare(
        "SELECT agent_id, project_id, suspended_by, reason FROM gitops_suspensions ORDER BY agent_id, project_id",
    )?;
    since.suspensions = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    Ok(since)
}

fn ids(db: &Connection, sql: &str) -> Result<Vec<i64>, rusqlite::Error> {
    let mut q = db.prepare(sql)?;
    q.query_map([], |r| r.get(0))?.collect()
}

/// Those of `revoked` that `table` of the restored copy has, not revoked.
fn still_active(
    restored: &Connection,
    table: &str,
    revoked: &[i64],
) -> Result<Vec<i64>, rusqlite::Error> {
    let sql = format!("SELECT 1 FROM {table} WHERE id = ?1 AND revoked_at IS NULL");
    let mut q = restored.prepare(&sql)?;
    let mut out = Vec::new();
    for id in revoked {
        if q.exists([id])? {
            out.push(*id);
        }
    }
    Ok(out)
}
