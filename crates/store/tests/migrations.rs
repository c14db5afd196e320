//! Schema migrations applied to a database an earlier kas wrote, rows and all. SQLite only: its
//! migration 0012 rebuilds tables, where PostgreSQL's migrations only ever add.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use tether_store::{Error, SqliteStore, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Every SQLite migration, as kas embeds them.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The schema before ids were kept from being handed out twice (0012).
const BEFORE_IDS_NEVER_REUSED: i64 = 11;

async fn connect(path: &Path) -> Result<SqliteConnection, sqlx::Error> {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .foreign_keys(true)
        .connect()
        .await
}

/// A row of every table an earlier kas had, and then some, with ids as kas gave them.
const ROWS: &str = "
INSERT INTO projects (id, path, created_at, remote, ssh_key_file, verify_gpg_keyring_file)
    VALUES (1, 'group/config', 10, 'git://git.test/config', '/etc/kas/key', NULL),
           (2, 'group/app', 11, NULL, NULL, '/etc/kas/keyring');
INSERT INTO agents (id, project_id, name, created_at)
    VALUES (1, 1, 'seed', 12), (2, 2, 'app', 13), (3, 1, 'newest', 14);
INSERT INTO agent_tokens (id, agent_id, digest, description, created_at, revoked_at)
    VALUES (1, 1, printf('%.64c', 'a'), 'seed', 15, NULL),
           (2, 2, printf('%.64c', 'b'), 'app', 16, 17),
           (3, 3, printf('%.64c', 'c'), 'newest', 18, NULL);
INSERT INTO user_tokens (id, agent_id, username, digest, memberships, created_at, expires_at,
                         revoked_at)
    VALUES (1, 2, 'alice', printf('%.64c', 'd'), '[\"group/app:developer\"]', 19, 4000000000, NULL),
           (2, 3, 'bob', printf('%.64c', 'e'), '[]', 20, 4000000000, 21);
INSERT INTO sync_reports (agent_id, project, report, updated_at)
    VALUES (1, 'group/app', x'00ff10', 22), (3, 'group/app', x'01', 23);
INSERT INTO config_states (agent_id, state, updated_at) VALUES (1, x'7b7d', 24), (3, x'7b7d', 25);
INSERT INTO gitops_suspensions (agent_id, project_id, reason, suspended_by, suspended_at)
    VALUES (2, 0, 'incident', 'admin', 26), (3, 2, 'why', 'admin', 27);
INSERT INTO notifications (receiver, dedup_key, payload, created_at, next_attempt_at)
    VALUES ('hook', 'key', x'01', 28, 28);
INSERT INTO web_sessions (id_digest, role, csrf, created_at, expires_at)
    VALUES (printf('%.64c', 'f'), 'admin', 'csrf', 29, 4000000000);
";

/// Everything about the schema and its rows that a migration must keep, one line each: every
/// table's columns, foreign keys and rows, every index, trigger and view.
async fn snapshot(conn: &mut SqliteConnection) -> Result<Vec<String>, sqlx::Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for table in &tables {
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, type || ' notnull=' || \"notnull\" || ' default=' || \
             coalesce(dflt_value, '') || ' pk=' || pk FROM pragma_table_info($1) ORDER BY cid",
        )
        .bind(table)
        .fetch_all(&mut *conn)
        .await?;
        out.extend(columns.iter().map(|(c, t)| format!("{table}.{c}: {t}")));
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT \"from\" || ' -> ' || \"table\" || '(' || \"to\" || ') on delete ' || \
             on_delete FROM pragma_foreign_key_list($1) ORDER BY id, seq",
        )
        .bind(table)
        .fetch_all(&mut *conn)
        .await?;
        out.extend(keys.iter().map(|k| format!("{table} key {k}")));
        let values: Vec<String> = columns.iter().map(|(c, _)| format!("quote({c})")).collect();
        let select = format!(
            "SELECT {} FROM {table} ORDER BY rowid",
            values.join(" || ', ' || ")
        );
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(select))
            .fetch_all(&mut *conn)
            .await?;
        out.extend(rows.iter().map(|r| format!("{table} row {r}")));
    }
    let others: Vec<String> = sqlx::query_scalar(
        "SELECT type || ' ' || name || ' on ' || tbl_name || ': ' || coalesce(sql, '(constraint)') \
         FROM sqlite_master WHERE type IN ('index', 'trigger', 'view') ORDER BY type, name",
    )
    .fetch_all(&mut *conn)
    .await?;
    out.extend(others);
    Ok(out)
}

/// A snapshot without what migrations after 0012 add (opening the store runs them all).
fn without_later_additions(snapshot: Vec<String>) -> Vec<String> {
    let added = [
        "notifications.order_key:",
        "index notifications_order ",
        "agent_tokens.last_used_at:",
    ];
    snapshot
        .into_iter()
        .filter(|l| !added.iter().any(|a| l.starts_with(a)) && !l.contains("offered_commits"))
        // 0013's and 0014's columns, NULL for the rows of ROWS, close each of their lines.
        .map(|l| {
            for table in ["notifications", "agent_tokens"] {
                let prefix = format!("{table} row ");
                if let Some(row) = l.strip_prefix(&prefix) {
                    return format!("{prefix}{}", row.strip_suffix(", NULL").unwrap_or(row));
                }
            }
            l
        })
        .collect()
}

/// Messages queued before migration 0013 get their ordering key: a commit status's is its
/// deduplication key without the state, whatever the state; other messages have none.
#[tokio::test]
async fn statuses_queued_before_ordering_get_their_ordering_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kas.db");
    let mut conn = connect(&path).await?;
    MIGRATOR.run_to(12, &mut conn).await?;
    let keys = [
        "status:7:g/m:c1:Pending",
        "status:7:g/m:c1:Success",
        "status:7:g/m:c2:Failed",
        "status:7:g/m:c3:Superseded",
        "sync_failed:7:g/m:c2:100",
    ];
    for key in keys {
        sqlx::query(
            "INSERT INTO notifications (receiver, dedup_key, payload, created_at, next_attempt_at) \
             VALUES ('forge', $1, x'01', 1, 1)",
        )
        .bind(key)
        .execute(&mut conn)
        .await?;
    }
    conn.close().await?;
    SqliteStore::open(&path).await?.close().await;
    let mut conn = connect(&path).await?;
    let order: Vec<Option<String>> =
        sqlx::query_scalar("SELECT order_key FROM notifications ORDER BY id")
            .fetch_all(&mut conn)
            .await?;
    let want = [
        Some("status:7:g/m:c1"),
        Some("status:7:g/m:c1"),
        Some("status:7:g/m:c2"),
        Some("status:7:g/m:c3"),
        None,
    ];
    assert_eq!(order, want.map(|k| k.map(str::to_owned)));
    conn.close().await?;
    Ok(())
}

/// A database of the migrations before 0012, with rows in every table, keeps its rows, columns,
/// indexes and foreign keys (cascades included) through it, with no foreign key broken; and
/// from then on a deleted agent's id is not given again.
#[tokio::test]
async fn rows_and_foreign_keys_survive_the_rebuild_that_stops_id_reuse() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kas.db");
    let mut conn = connect(&path).await?;
    MIGRATOR.run_to(BEFORE_IDS_NEVER_REUSED, &mut conn).await?;
    sqlx::raw_sql(ROWS).execute(&mut conn).await?;
    let before = snapshot(&mut conn).await?;
    conn.close().await?;
    let indexed = |line: &&String| line.starts_with("index agent_tokens_agent_id");
    assert!(
        before.iter().any(|l| l.starts_with("agents row")) && before.iter().any(|l| indexed(&l))
    );

    let store = SqliteStore::open(&path).await?;
    let mut conn = connect(&path).await?;
    assert_eq!(without_later_additions(snapshot(&mut conn).await?), before);
    let broken: Vec<(String, i64)> =
        sqlx::query_as("SELECT \"table\", rowid FROM pragma_foreign_key_check")
            .fetch_all(&mut conn)
            .await?;
    assert_eq!(broken, [], "PRAGMA foreign_key_check");
    let short = "INSERT INTO agent_tokens (agent_id, digest, description, created_at) \
                 VALUES (1, 'short', '', 0)";
    let refused = sqlx::query(short).execute(&mut conn).await;
    assert!(refused.is_err(), "the digest's CHECK is kept");

    // Deleting the newest agent takes its rows in every table with it, and its id stays taken.
    assert!(store.delete_agent(3).await?);
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM agent_tokens WHERE agent_id = 3) \
         + (SELECT count(*) FROM user_tokens WHERE agent_id = 3) \
         + (SELECT count(*) FROM sync_reports WHERE agent_id = 3) \
         + (SELECT count(*) FROM config_states WHERE agent_id = 3) \
         + (SELECT count(*) FROM gitops_suspensions WHERE agent_id = 3)",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(left, 0, "rows of the deleted agent");
    conn.close().await?;
    assert_eq!(store.register_agent("group/config", "newer").await?.id, 4);
    // Every connection of the store enforces foreign keys, the one that migrated included.
    for _ in 0..8 {
        let orphan = store.put_config_state(99, b"{}").await;
        assert!(matches!(orphan, Err(Error::NotFound(_))), "{orphan:?}");
    }
    store.close().await;

    let store = SqliteStore::open(&path).await?;
    assert!(store.delete_agent(4).await?);
    assert_eq!(store.register_agent("group/config", "newest").await?.id, 5);
    store.close().await;
    Ok(())
}
