//! Bringing a database's schema up to date, shared by both backends.
//!
//! Migrations the database has that this binary does not know are left alone, with a warning
//! naming them: a newer kas applied them, and this one is an older kas rolled back to, or an
//! old replica restarting in the middle of a rollout. sqlx refuses such a database by default
//! (`VersionMissing`), which would keep kas from starting at all; since migrations only ever add
//! (tables, nullable or defaulted columns, indexes), the older SQL still works against the newer
//! schema.

use sqlx::migrate::{Migrate, Migrator};

use crate::error::Result;

/// sqlx's bookkeeping table: its default name, which kas never changes.
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// `migrator` (the migrations compiled into the binary), tolerating newer migrations.
pub(crate) fn tolerant(mut migrator: Migrator) -> Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// The versions of the migrations the database has (none for a new database); call it before
/// migrating, for [`report`].
pub(crate) async fn applied<C: Migrate>(conn: &mut C) -> Result<Vec<i64>> {
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    Ok(applied.iter().map(|m| m.version).collect())
}

/// What opening a database did to its schema.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// The schema's version now (its newest migration).
    pub schema_version: i64,
    /// The version before; `None` for a database created now.
    pub from_version: Option<i64>,
    /// The migrations applied now, as "12 ids never reused".
    pub applied: Vec<String>,
    /// Versions of migrations the database has that this binary does not know (a newer kas
    /// applied them).
    pub newer: Vec<i64>,
}

/// Says what migrating did, given the versions the database had `before`: an info line with the
/// schema's version, and when migrations were applied, which (the point after which an older
/// kas may not start on this database: an operator reads from the log when it was passed).
/// Warns of migrations the database has that `migrator` does not know.
pub(crate) async fn report<C: Migrate>(
    migrator: &Migrator,
    conn: &mut C,
    before: &[i64],
) -> Result<Migrated> {
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    let version = applied.iter().map(|m| m.version).max().unwrap_or(0);
    let added = added_names(migrator, before, applied.iter().map(|m| m.version));
    let from = before.iter().copied().max();
    if added.is_empty() {
        tracing::info!(schema_version = version, "Database schema is up to date");
    } else if before.is_empty() {
        tracing::info!(schema_version = version, "Database schema created");
    } else {
        tracing::info!(
            schema_version = version,
            from_version = from.unwrap_or(0),
            applied = %added.join(", "),
            "Database schema migrated: a kas that does not know these migrations may refuse to \
             start on this database (roll back by restoring the backup taken before)"
        );
    }
    Ok(Migrated {
        schema_version: version,
        from_version: from,
        applied: added,
        newer: warn_of_unknown(migrator, &applied)?,
    })
}

/// "12 ids never reused" for each version applied since `before` (pure).
fn added_names(migrator: &Migrator, before: &[i64], now: impl Iterator<Item = i64>) -> Vec<String> {
    now.filter(|v| !before.contains(v))
        .map(|v| {
            let name = migrator
                .iter()
                .find(|m| m.version == v)
                .map_or(String::new(), |m| format!(" {}", m.description));
            format!("{v}{name}")
        })
        .collect()
}

/// Warns if the database has migrations `migrator` does not know, and returns their versions.
fn warn_of_unknown(
    migrator: &Migrator,
    applied: &[sqlx::migrate::AppliedMigration],
) -> Result<Vec<i64>> {
    let unknown: Vec<i64> = applied
        .iter()
        .map(|m| m.version)
        .filter(|v| !migrator.version_exists(*v))
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(
            versions = ?unknown,
            "The database has schema migrations this kas does not know (a newer kas applied \
             them); carrying on, which works as long as they only added to the schema"
        );
    }
    Ok(unknown)
}
