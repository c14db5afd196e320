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
    /// Tables whose ids given since the backup will be given again (table, largest id in the
    /// backup, largest the replaced database gave): the backup predates AUTOINCREMENT on them
    /// (schema migration 12), so its tables give the largest row's id plus one, whatever
    /// counter is stored.
    pub counters_lost: Vec<(String, i64, i64)>,
    /// Agent tokens revoked since the backup, active again.
    pub revived_tokens: Vec<i64>,
    /// Personal access tokens revoked since the backup, active again.
    pub revived_user_tokens: Vec<i64>,
    /// Suspensions made since the backup, gone (agent id, project id, by, reason).
    pub lost_suspensions: Vec<(i64, i64, String, String)>,
    /// Agents deleted since the backup, back with it: their ids, and the ids of their agent
    /// tokens and personal access tokens active again.
    pub revived_agents: RevivedAgents,
}

/// Agents the restore brings back: deleted since the backup (deleting revoked their tokens).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevivedAgents {
    pub agents: Vec<i64>,
    pub tokens: Vec<i64>,
    pub user_tokens: Vec<i64>,
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
    /// The agents the database has.
    agents: Vec<i64>,
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
        match counting(&restored, table)? {
            Counting::Counter => {}
            Counting::Absent => continue,
            Counting::LargestRow(largest) => {
                if *seq > largest {
                    report.counters_lost.push((table.clone(), largest, *seq));
                }
                continue;
            }
        }
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
    report.revived_agents = revived_agents(&restored, &since)?;
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
    since.agents = ids(&db, "SELECT id FROM agents")?;
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

/// How `table` of the restored copy gives new ids.
#[derive(Debug, PartialEq, Eq)]
enum Counting {
    /// After its stored counter (AUTOINCREMENT): raising it keeps ids unique.
    Counter,
    /// After its largest row (no AUTOINCREMENT), which is this.
    LargestRow(i64),
    /// The table is not in the backup (a later migration adds it).
    Absent,
}

fn counting(restored: &Connection, table: &str) -> Result<Counting, rusqlite::Error> {
    let sql: Option<String> = restored
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    let Some(sql) = sql else {
        return Ok(Counting::Absent);
    };
    if sql.to_ascii_uppercase().contains("AUTOINCREMENT") {
        return Ok(Counting::Counter);
    }
    let largest = format!("SELECT COALESCE(MAX(id), 0) FROM \"{table}\"");
    Ok(Counting::LargestRow(restored.query_row(
        &largest,
        [],
        |r| r.get(0),
    )?))
}

/// The agents of the restored copy the database used since gave an id to and deleted (ids are
/// never given twice): with the backup they come back, and their tokens work again.
fn revived_agents(restored: &Connection, since: &Since) -> Result<RevivedAgents, rusqlite::Error> {
    let given = since
        .counters
        .iter()
        .find(|(t, _)| t == "agents")
        .map_or(0, |(_, seq)| *seq);
    let agents: Vec<i64> = ids(restored, "SELECT id FROM agents ORDER BY id")?
        .into_iter()
        .filter(|id| *id <= given && !since.agents.contains(id))
        .collect();
    let active = |table: &str| -> Result<Vec<i64>, rusqlite::Error> {
        let sql = format!(
            "SELECT id FROM {table} WHERE revoked_at IS NULL AND agent_id = ?1 ORDER BY id"
        );
        let mut q = restored.prepare(&sql)?;
        let mut out = Vec::new();
        for agent in &agents {
            for id in q.query_map([agent], |r| r.get(0))? {
                out.push(id?);
            }
        }
        Ok(out)
    };
    Ok(RevivedAgents {
        tokens: active("agent_tokens")?,
        user_tokens: active("user_tokens")?,
        agents,
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TOKENS_AND_SUSPENSIONS: &str = "\
        CREATE TABLE user_tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id INTEGER,
                                  revoked_at INTEGER);
        CREATE TABLE gitops_suspensions (agent_id INTEGER, project_id INTEGER,
                                         suspended_by TEXT, reason TEXT);";

    fn database(path: &Path, schema: &str, rows: &str) {
        let db = Connection::open(path).unwrap();
        db.execute_batch(schema).unwrap();
        db.execute_batch(TOKENS_AND_SUSPENSIONS).unwrap();
        db.execute_batch(rows).unwrap();
    }

    /// A backup from before ids were never reused (its `agents` without AUTOINCREMENT) cannot
    /// keep counting after the ids given since: the report says which ids come back, and no
    /// counter row is written for such a table (one would sit beside the row migration 12
    /// writes when it rebuilds the table). Tables that count keep counting.
    #[test]
    fn a_backup_whose_tables_give_the_largest_row_plus_one_says_which_ids_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (current, copy) = (dir.path().join("current"), dir.path().join("copy"));
        database(
            &current,
            "CREATE TABLE agents (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);
             CREATE TABLE agent_tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id INTEGER, revoked_at INTEGER);",
            "INSERT INTO agents (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd');
             INSERT INTO agent_tokens (id) VALUES (1), (2), (3);",
        );
        database(
            &copy,
            "CREATE TABLE agents (id INTEGER PRIMARY KEY, name TEXT);
             CREATE TABLE agent_tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id INTEGER, revoked_at INTEGER);",
            "INSERT INTO agents (id, name) VALUES (1, 'a'), (2, 'b');
             INSERT INTO agent_tokens (id) VALUES (1);",
        );
        let report = adjust_restored_copy(&copy, Some(&current)).unwrap();
        assert_eq!(report.counters_lost, [("agents".to_owned(), 2, 4)]);
        assert_eq!(report.counters_kept, [("agent_tokens".to_owned(), 3)]);
        let db = Connection::open(&copy).unwrap();
        let rows: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'agents'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0);
    }

    const COUNTING: &str = "\
        CREATE TABLE agents (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);
        CREATE TABLE agent_tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id INTEGER,
                                   revoked_at INTEGER);";

    /// An agent deleted since the backup (deleting revoked its tokens) comes back with it:
    /// the report names it and its tokens active again, as it names revocations made since.
    /// An agent the database used since never had (a backup of more agents restored into a
    /// new installation) is not called deleted.
    #[test]
    fn agents_deleted_since_the_backup_are_named_with_their_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (current, copy) = (dir.path().join("current"), dir.path().join("copy"));
        database(
            &current,
            COUNTING,
            "INSERT INTO agents (id, name) VALUES (2, 'b'), (3, 'c');
             INSERT INTO agent_tokens (id, agent_id) VALUES (1, 2), (2, 3);
             DELETE FROM sqlite_sequence WHERE name = 'agents';
             INSERT INTO sqlite_sequence (name, seq) VALUES ('agents', 3);",
        );
        database(
            &copy,
            COUNTING,
            "INSERT INTO agents (id, name) VALUES (1, 'a'), (2, 'b');
             INSERT INTO agent_tokens (id, agent_id) VALUES (1, 2), (3, 1);
             INSERT INTO user_tokens (id, agent_id) VALUES (5, 1);",
        );
        let report = adjust_restored_copy(&copy, Some(&current)).unwrap();
        let revived = RevivedAgents {
            agents: vec![1],
            tokens: vec![3],
            user_tokens: vec![5],
        };
        assert_eq!(report.revived_agents, revived);

        let new = dir.path().join("new");
        database(&new, COUNTING, "");
        let report = adjust_restored_copy(&copy, Some(&new)).unwrap();
        assert_eq!(report.revived_agents, RevivedAgents::default());
    }
}
