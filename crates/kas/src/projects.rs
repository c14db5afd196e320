//! Stored projects as the Git mirrors see them.

use anyhow::{Context as _, Result};
use tether_git_source::ProjectSpec;

/// What the mirrors need to know of a stored project.
pub fn project_spec(p: &tether_store::Project) -> Result<ProjectSpec> {
    let remote = match &p.remote {
        None => None,
        Some(r) => {
            let mut remote = tether_git_source::Remote::parse(r)
                .with_context(|| format!("project {}: remote {r}", p.path))?;
            // Read at each fetch, not here: a file missing now fails that project's fetches
            // (shown in its status), never kas's start; a rotated token needs no restart.
            if let Some(file) = &p.credentials_file {
                remote = remote
                    .with_credentials_file(file)
                    .with_context(|| format!("project {}: credentials", p.path))?;
            }
            if p.ssh_key_file.is_some() || p.known_hosts_file.is_some() {
                let ssh = tether_git_source::SshAuth {
                    key_file: p.ssh_key_file.as_ref().map(Into::into),
                    known_hosts_file: p.known_hosts_file.as_ref().map(Into::into),
                };
                remote = remote
                    .with_ssh(ssh)
                    .with_context(|| format!("project {}: SSH keys", p.path))?;
            }
            Some(remote)
        }
    };
    // Signed commits only is a property of the project, not of an agent's configuration: the
    // configuration project itself must be verified before any agent configuration is read
    // from it, and one policy per project means every agent using its manifests gets the same
    // guarantee (a config.yaml cannot turn it off).
    let verify = (p.verify_allowed_signers_file.is_some() || p.verify_gpg_keyring_file.is_some())
        .then(|| tether_git_source::VerifyPolicy {
            allowed_signers_file: p.verify_allowed_signers_file.as_ref().map(Into::into),
            gpg_keyring_file: p.verify_gpg_keyring_file.as_ref().map(Into::into),
        });
    Ok(ProjectSpec {
        id: p.id,
        path: p.path.clone(),
        remote,
        verify,
    })
}

/// The stored projects as this replica last applied them to its mirrors. With several
/// replicas a project is set or removed through one of them; the others learn it from the
/// store (at once when told over Redis, and at every periodic re-read in case they missed
/// it), so every replica mirrors the same remotes under the same signing policy.
#[derive(Debug, Default)]
pub struct StoredProjects {
    rows: std::collections::HashMap<i64, tether_store::Project>,
}

/// What changed in the store since the last read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProjectChanges {
    /// New or changed rows.
    pub set: Vec<tether_store::Project>,
    /// Ids no longer stored.
    pub removed: Vec<i64>,
}

impl StoredProjects {
    /// Takes the store's current list; returns what differs from the previous one.
    pub fn update(&mut self, now: Vec<tether_store::Project>) -> ProjectChanges {
        let mut rows: std::collections::HashMap<i64, tether_store::Project> =
            now.into_iter().map(|p| (p.id, p)).collect();
        let mut removed: Vec<i64> = self
            .rows
            .keys()
            .filter(|id| !rows.contains_key(id))
            .copied()
            .collect();
        removed.sort_unstable();
        let mut set: Vec<tether_store::Project> = rows
            .values()
            .filter(|p| self.rows.get(&p.id) != Some(p))
            .cloned()
            .collect();
        set.sort_by_key(|p| p.id);
        std::mem::swap(&mut self.rows, &mut rows);
        ProjectChanges { set, removed }
    }
}

/// Applies the store's projects to `sources`: what other replicas set or removed.
pub async fn follow_store(
    store: &dyn tether_store::Store,
    sources: &std::sync::Arc<tether_git_source::Sources>,
    seen: &std::sync::Mutex<StoredProjects>,
) {
    let now = match store.list_projects().await {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot re-read the projects from the store; keeping the mirrors as they are");
            return;
        }
    };
    let changes = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .update(now);
    for id in changes.removed {
        tracing::info!(
            project_id = id,
            "Project removed (through another replica): no longer mirrored"
        );
        sources.remove(id);
    }
    for p in changes.set {
        match project_spec(&p).and_then(|spec| Ok(sources.upsert(spec)?)) {
            Ok(()) => tracing::debug!(project = %p.path, "Project source follows the store"),
            Err(e) => {
                tracing::error!(project = %p.path, error = %format!("{e:#}"), "Cannot mirror the project")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn project(id: i64, remote: &str) -> tether_store::Project {
        tether_store::Project {
            id,
            path: format!("group/p{id}"),
            remote: Some(remote.into()),
            ..tether_store::Project::default()
        }
    }

    #[test]
    fn only_new_changed_and_removed_projects_are_reported() {
        let mut seen = StoredProjects::default();
        let first = seen.update(vec![project(1, "/a"), project(2, "/b")]);
        assert_eq!(first.set.len(), 2);
        assert!(first.removed.is_empty());
        assert_eq!(
            seen.update(vec![project(2, "/b"), project(1, "/a")]),
            ProjectChanges::default(),
            "the same list again changes nothing"
        );
        let next = seen.update(vec![project(2, "/b2"), project(3, "/c")]);
        assert_eq!(next.set, vec![project(2, "/b2"), project(3, "/c")]);
        assert_eq!(next.removed, vec![1]);
    }
}
