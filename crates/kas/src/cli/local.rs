//! Commands that need no running kas: `kas store …`, `kas config validate`.

use anyhow::{Context, Result};
use kas::config::Config;

use super::args::StoreCmd;
use super::output::out;

/// `kas config validate`: the same parsing and validation as kas applies to a configuration
/// project's `config.yaml` (size, UTF-8, schema, every section's rules, lines in messages).
pub fn validate_agent_config(file: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let config = tether_agent_config::parse_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    out!(
        "{}: valid ({} manifest project(s), {} CI access project(s) and group(s), user access {})",
        file.display(),
        config.gitops.manifest_projects.len(),
        config.ci_access.projects.len() + config.ci_access.groups.len(),
        if config.user_access.is_some() {
            "configured"
        } else {
            "off"
        }
    )?;
    Ok(())
}

/// What `kas store migrate` says of a database a newer kas migrated: this kas's migrations are
/// there, but the schema is not this kas's (a rollback, or an old binary).
fn newer_schema_note(location: &impl std::fmt::Display, newer: &[i64]) -> String {
    let versions: Vec<String> = newer.iter().map(i64::to_string).collect();
    format!(
        "{location}: every migration of this kas is applied, but the schema is newer than this \
         kas: migration(s) {} were applied by a newer kas; this kas works with them as long as \
         they only added to the schema (see the upgrade notes), and a newer kas is the one to \
         migrate this database",
        versions.join(", ")
    )
}

/// What a restore changed and undid: counters kept (stdout), revocations and suspensions
/// undone (stderr: each must be done again).
/// "none" for an empty list.
fn or_none(list: &str) -> &str {
    if list.is_empty() { "none" } else { list }
}

fn print_restore_report(r: &tether_store::restore::RestoreReport) -> Result<()> {
    for (table, seq) in &r.counters_kept {
        out!("{table}: ids continue after {seq}, the largest the replaced database gave")?;
    }
    for (table, largest, given) in &r.counters_lost {
        eprintln!(
            "kas: warning: {table}: ids {}–{given}, given after the backup, will be given again: the backup predates ids never being reused (schema migration 12), so its {table} give the largest id plus one; first remove what still uses them (an agent's inventory ConfigMaps and Lease in its cluster, ids in runbooks)",
            largest + 1
        );
    }
    let list = |ids: &[i64]| {
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let back = &r.revived_agents;
    if !back.agents.is_empty() {
        eprintln!(
            "kas: warning: agents deleted after the backup are back: {} (delete them again: kas agent delete ID), with their agent tokens {} and personal access tokens {} active again",
            list(&back.agents),
            or_none(&list(&back.tokens)),
            or_none(&list(&back.user_tokens))
        );
    }
    if !r.revived_tokens.is_empty() {
        eprintln!(
            "kas: warning: agent tokens revoked after the backup are active again: {} (revoke them again: kas token revoke ID)",
            list(&r.revived_tokens)
        );
    }
    if !r.revived_user_tokens.is_empty() {
        eprintln!(
            "kas: warning: personal access tokens revoked after the backup are active again: {} (kas user-token revoke ID)",
            list(&r.revived_user_tokens)
        );
    }
    for (agent, project, by, reason) in &r.lost_suspensions {
        // Stored as project 0 when the whole agent is suspended.
        let (what, again) = match project {
            0 => (
                format!("agent {agent}"),
                format!("kas agent suspend {agent}"),
            ),
            p => (
                format!("agent {agent}'s project {p}"),
                format!("kas agent suspend {agent} --project {p}"),
            ),
        };
        eprintln!(
            "kas: warning: the suspension of {what} by {by} ({reason}) was made after the backup and is gone: GitOps applies there again ({again})"
        );
    }
    Ok(())
}

/// What `kas store migrate` did to the schema, in one line (pure).
fn migrated_line(location: &kas::config::DatabaseLocation, m: &tether_store::Migrated) -> String {
    let version = m.schema_version;
    match (m.from_version, m.applied.is_empty()) {
        (_, true) => format!("{location}: schema up to date (version {version})"),
        (None, false) => format!("{location}: schema created (version {version})"),
        (Some(from), false) => format!(
            "{location}: schema migrated from version {from} to {version} (applied {}); a kas \
             older than these migrations may refuse to start on it: keep the backup taken before",
            m.applied.join(", ")
        ),
    }
}

pub async fn store_cmd(cfg: &Config, cmd: &StoreCmd) -> Result<()> {
    use kas::config::DatabaseLocation;
    match cmd {
        StoreCmd::Migrate => {
            let location = cfg.database_location();
            let migrated = kas::database::migrate(&location).await?;
            // A schema newer than this kas is not "up to date": the note says what it is.
            if migrated.newer.is_empty() || !migrated.applied.is_empty() {
                out!("{}", migrated_line(&location, &migrated))?;
            }
            if !migrated.newer.is_empty() {
                out!("{}", newer_schema_note(&location, &migrated.newer))?;
            }
        }
        StoreCmd::Copy { from, to } => {
            let from = DatabaseLocation::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let to = DatabaseLocation::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            let counts = kas::database::copy(&from, &to).await?;
            for c in &counts {
                out!("{:<16}{:>8}", c.table, c.rows)?;
            }
            let total: u64 = counts.iter().map(|c| c.rows).sum();
            out!("copied {total} records from {from} to {to}")?;
        }
        StoreCmd::Restore { from } => {
            let location = cfg.database_location();
            let api = cfg.api.listen.address();
            let running =
                std::net::TcpStream::connect_timeout(&api, std::time::Duration::from_secs(1))
                    .is_ok()
                    .then_some(api);
            let report = kas::database::restore(&location, from, running).await?;
            out!("restored {location} from {}", from.display())?;
            print_restore_report(&report)?;
        }
        StoreCmd::Backup { to, force } => {
            let location = cfg.database_location();
            let done = kas::database::backup(&location, to, *force).await?;
            out!(
                "backed up {location} to {} ({} bytes in {} ms)",
                to.display(),
                done.bytes,
                done.took.as_millis()
            )?;
        }
    }
    Ok(())
}
