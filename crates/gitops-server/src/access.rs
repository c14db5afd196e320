//! Which manifest projects an agent may read and report on: those its configuration in force
//! lists. An agent token is a secret of one cluster; without this check it read every file of
//! every repository kas mirrors, at any ref, and its reports made kas post commit statuses to
//! any project with kas's forge token.

use tether_agent_config::{EntryRef, ProjectRef};
use tether_store::Project;
use tether_tunnel_server::service_future::BoxFuture;

/// Where kas knows an agent's configuration in force (kas's `config_in_force`).
pub trait ProjectAccess: Send + Sync + 'static {
    /// The manifest project entries (`id` and `name`) listed by the agent's configuration in
    /// force, or `None` when kas knows no configuration of the agent (then it may read
    /// nothing).
    fn listed(&self, agent_id: i64) -> BoxFuture<'_, Option<Vec<EntryRef>>>;

    /// Why the agent may not read manifest project `project_path` although its configuration
    /// lists it (a project of another tenant's group, see [`tether_agent_config::ManifestAccess`]:
    /// a configuration in force from before that rule may list one), or `None`.
    fn outside(&self, agent_id: i64, project_path: &str) -> BoxFuture<'_, Option<String>>;
}

/// Whether one of `listed` is the entry of `project` (by path or by numeric id) named `name`
/// (`None`: the unnamed entry). Pure.
pub fn lists(listed: &[EntryRef], project: &Project, name: Option<&str>) -> bool {
    listed.iter().any(|entry| {
        let same = match &entry.project {
            ProjectRef::Path(path) => *path == project.path,
            ProjectRef::Numeric(n) => *n == project.id,
        };
        same && entry.name.as_deref() == name
    })
}

/// Why an agent may not read or report on `project` (its entry `name`), for its error.
pub(crate) fn denied(project: &Project, name: Option<&str>, known: bool) -> tonic::Status {
    if let (true, Some(name)) = (known, name) {
        tonic::Status::permission_denied(format!(
            "the agent's configuration in force has no entry of manifest project {} named {name:?}",
            project.path
        ))
    } else if known {
        tonic::Status::permission_denied(format!(
            "manifest project {} is not listed in the agent's configuration in force",
            project.path
        ))
    } else {
        tonic::Status::permission_denied(format!(
            "kas knows no configuration in force for the agent, so it may not read manifest project {}",
            project.path
        ))
    }
}

/// A commit id as agents report them: empty (no commit could be named) or hexadecimal of a
/// SHA-1 or SHA-256 object name. Anything else is not a commit and is not passed on to forges.
pub fn is_commit_id(id: &str) -> bool {
    id.is_empty() || (matches!(id.len(), 40 | 64) && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(id: i64, path: &str) -> Project {
        Project {
            id,
            path: path.into(),
            ..Project::default()
        }
    }

    #[test]
    fn a_project_is_listed_by_its_path_or_its_id() {
        let listed = [
            EntryRef::project(ProjectRef::Path("group/app".into())),
            EntryRef::project(ProjectRef::Numeric(9)),
        ];
        assert!(lists(&listed, &project(3, "group/app"), None));
        assert!(lists(&listed, &project(9, "other/thing"), None));
        assert!(!lists(&listed, &project(4, "group/app2"), None));
        assert!(!lists(&[], &project(3, "group/app"), None));
    }

    /// An agent may read a named entry only as the configuration names it: a name no entry
    /// has would store reports that no status row shows.
    #[test]
    fn a_named_entry_is_listed_by_project_and_name() {
        let named = |name: &str| EntryRef {
            project: ProjectRef::Path("group/mono".into()),
            name: Some(name.into()),
        };
        let listed = [named("infra"), named("apps")];
        let mono = project(3, "group/mono");
        assert!(lists(&listed, &mono, Some("apps")));
        assert!(!lists(&listed, &mono, Some("web")));
        assert!(!lists(&listed, &mono, None), "no unnamed entry");
        let unnamed = [EntryRef::project(ProjectRef::Path("group/mono".into()))];
        assert!(!lists(&unnamed, &mono, Some("apps")));
    }

    #[test]
    fn only_hexadecimal_object_names_are_commit_ids() {
        assert!(is_commit_id(""));
        assert!(is_commit_id(&"a".repeat(40)));
        assert!(is_commit_id(&"0123456789abcdef".repeat(4)));
        assert!(!is_commit_id(&"g".repeat(40)));
        assert!(!is_commit_id("abc"));
        assert!(!is_commit_id(&format!("{}/../x", "a".repeat(36))));
    }
}
