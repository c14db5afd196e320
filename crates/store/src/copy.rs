//! Moving an installation from SQLite to PostgreSQL (`kas store copy`).
//!
//! Every row of every table is copied with its id, so what refers to ids outside the database
//! (token ids in logs and in `kas agent token revoke`, agent ids in metrics) keeps meaning the
//! same thing. Tokens are copied as their digests, so agents and people keep authenticating with
//! the tokens they have. The source should belong to a stopped kas: a write made during the copy
//! might not be in it.

use sqlx::Row;

use crate::error::{Error, Result};
use crate::txn::WriteTxn;
use crate::{PgStore, SqliteStore};

/// How a column is read from SQLite and bound for PostgreSQL. Every value goes through an
/// `Option`: the target's NOT NULL constraints, identical to the source's, reject what the
/// source could not hold either.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Bytes,
}

/// The tables, parents before children so foreign keys hold row by row, with their columns.
/// A table whose first column is `id` has an identity sequence to move past the copied ids.
const TABLES: &[(&str, &[(&str, Kind)])] = {
    use Kind::{Bytes, Int, Text};
    &[
        (
            "projects",
            &[
                ("id", Int),
                ("path", Text),
                ("created_at", Int),
                ("remote", Text),
                ("credentials_file", Text),
                ("webhook_secret_file", Text),
                ("ssh_key_file", Text),
                ("known_hosts_file", Text),
                ("verify_allowed_signers_file", Text),
                ("verify_gpg_keyring_file", Text),
            ],
        ),
        (
            "agents",
            &[
                ("id", Int),
                ("project_id", Int),
                ("name", Text),
                ("created_at", Int),
            ],
        ),
        (
            "agent_tokens",
            &[
                ("id", Int),
                ("agent_id", Int),
                ("digest", Text),
                ("description", Text),
                ("created_at", Int),
                ("revoked_at", Int),
                ("last_used_at", Int),
            ],
        ),
        (
            "user_tokens",
            &[
                ("id", Int),
                ("agent_id", Int),
                ("username", Text),
                ("digest", Text),
                ("memberships", Text),
                ("created_at", Int),
                ("expires_at", Int),
                ("revoked_at", Int),
            ],
        ),
        (
            "sync_reports",
            &[
                ("agent_id", Int),
                ("project", Text),
                ("report", Bytes),
                ("updated_at", Int),
            ],
        ),
        (
            "config_states",
            &[("agent_id", Int), ("state", Bytes), ("updated_at", Int)],
        ),
        (
            "notifications",
            &[
                ("id", Int),
                ("receiver", Text),
                ("dedup_key", Text),
                ("payload", Bytes),
                ("created_at", Int),
                ("attempts", Int),
                ("next_attempt_at", Int),
                ("claimed_until", Int),
                ("done_at", Int),
                ("outcome", Text),
                ("last_error", Text),
                ("order_key", Text),
            ],
        ),
        (
            "web_sessions",
            &[
                ("id_digest", Text),
                ("role", Text),
                ("subject", Text),
                ("username", Text),
                ("groups", Text),
                ("csrf", Text),
                ("admin_token", Text),
                ("created_at", Int),
                ("expires_at", Int),
            ],
        ),
        (
            "offered_commits",
            &[
                ("agent_id", Int),
                ("project", Text),
                ("commit_id", Text),
                ("updated_at", Int),
            ],
        ),
        (
            "gitops_suspensions",
            &[
                ("agent_id", Int),
                ("project_id", Int),
                ("reason", Text),
                ("suspended_by", Text),
                ("suspended_at", Int),
            ],
        ),
    ]
};

/// Rows copied from one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    pub table: &'static str,
    pub rows: u64,
}

/// Copies every record from `from` into `to`, which must hold none: refused with
/// [`Error::InUse`] otherwise, so a copy never merges two installations (their ids would
/// collide). One PostgreSQL transaction: on error the target is left as it was.
pub async fn sqlite_to_postgres(from: &SqliteStore, to: &PgStore) -> Result<Vec<TableCount>> {
    let mut target = to.write().await?;
    for (table, _) in TABLES {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(target.conn())
                .await?;
        if rows > 0 {
            return Err(Error::InUse(format!(
                "the target database is not empty (table {table} has {rows} rows); \
                 copy into a freshly created database"
            )));
        }
    }
    // One read transaction, so the rows of all tables are from the same moment.
    let mut source = from.pool.begin().await?;
    let mut counts = Vec::with_capacity(TABLES.len());
    for (table, columns) in TABLES {
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let select = format!(
            "SELECT {} FROM {table} ORDER BY {}",
            names.join(", "),
            names[0]
        );
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            placeholders.join(", ")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(select))
            .fetch_all(&mut *source)
            .await?;
        for row in &rows {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
            for (i, (_, kind)) in columns.iter().enumerate() {
                query = match kind {
                    Kind::Int => query.bind(row.try_get::<Option<i64>, _>(i)?),
                    Kind::Text => query.bind(row.try_get::<Option<String>, _>(i)?),
                    Kind::Bytes => query.bind(row.try_get::<Option<Vec<u8>>, _>(i)?),
                };
            }
            query.execute(target.conn()).await?;
        }
        if names[0] == "id" {
            move_sequence_past(&mut source, &mut target, table).await?;
        }
        counts.push(TableCount {
            table,
            rows: u64::try_from(rows.len()).unwrap_or(u64::MAX),
        });
    }
    source.rollback().await?;
    target.commit().await?;
    Ok(counts)
}

/// Ids were inserted explicitly, which does not advance the identity sequence; the next record
/// created on PostgreSQL must not collide with a copied one, nor take the id of one deleted on
/// SQLite (the newest agent, say: its leftovers in a cluster would pass to the new one). SQLite
/// keeps the largest id it gave in `sqlite_sequence`.
async fn move_sequence_past(
    source: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    target: &mut WriteTxn<sqlx::Postgres>,
    table: &str,
) -> Result<()> {
    let given: i64 =
        sqlx::query_scalar("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = $1), 0)")
            .bind(table)
            .fetch_one(&mut **source)
            .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
         GREATEST((SELECT COALESCE(MAX(id), 0) FROM {table}), $1) + 1, false)"
    )))
    .bind(given)
    .execute(target.conn())
    .await?;
    Ok(())
}
