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

/// Warns if the database has migrations `migrator` does not know, and returns their versions;
/// call it after migrating.
pub(crate) async fn warn_of_unknown<C: Migrate>(
    migrator: &Migrator,
    conn: &mut C,
) -> Result<Vec<i64>> {
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
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
