//! `GET /api/v1/agents/{id}/gitops/unreported`: each entry of the agent's configuration in
//! force that has no synchronization report, with why. Reports alone leave `kas agent status`
//! silent about a first sync still running, a project whose fetches fail (kas knows why, the
//! agent never hears of it) and a project not registered in kas (only agentk's log said so).

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Path, State};
use tether_kas_api::{EntryState, UnreportedView};

use tether_store::SuspensionScope;

use crate::api::{ApiError, ApiState};

/// What kas knows of the project an entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectFacts {
    /// No project of that path or id is registered.
    Unregistered,
    Registered {
        /// Its path in kas (the entry may name it by id).
        path: String,
        /// Whether it has a repository to fetch.
        remote: bool,
        /// The default branch's commit kas has, if any.
        commit: Option<String>,
        /// Why its last fetch failed (`None` after a success, or before the first ended).
        fetch_error: Option<String>,
        /// Suspended in kas (the whole agent, or this project): by whom and why.
        suspended: Option<Suspended>,
        /// Why the agent may not read it: outside its group, not shared (see
        /// [`tether_agent_config::ManifestAccess`]).
        outside: Option<String>,
    },
}

/// A suspension that holds an entry, as `kas agent suspend` recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspended {
    pub by: String,
    pub reason: String,
    /// The whole agent rather than the project: resumed without `--project`.
    pub whole_agent: bool,
}

/// One entry of the configuration in force, with what kas knows of its project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFacts {
    /// The entry's key (`group/app`, `group/app#name`), as reports name it.
    pub key: String,
    /// Its `id` as written in config.yaml.
    pub project: String,
    pub facts: ProjectFacts,
}

/// The entries without a report among `entries` (in their order in config.yaml), each with
/// its state and reason. Pure.
pub fn unreported(entries: Vec<EntryFacts>, reported: &HashSet<String>) -> Vec<UnreportedView> {
    entries
        .into_iter()
        .filter(|e| !reported.contains(&e.key))
        .map(|e| {
            let (state, reason) = state_of(&e.project, e.facts);
            UnreportedView {
                project_id: e.key,
                state,
                reason,
            }
        })
        .collect()
}

/// The state and reason of an entry without a report, from its project's facts. Pure.
fn state_of(project: &str, facts: ProjectFacts) -> (EntryState, String) {
    match facts {
        ProjectFacts::Unregistered => (EntryState::UnknownProject, unregistered(project)),
        ProjectFacts::Registered {
            outside: Some(why), ..
        } => (EntryState::NotShared, why),
        ProjectFacts::Registered { path, remote, .. } if !remote => (
            EntryState::FetchFailing,
            format!(
                "project {path} has no repository to fetch (kas project add --path {path} --remote <repository>)"
            ),
        ),
        ProjectFacts::Registered {
            fetch_error: Some(e),
            ..
        } => (EntryState::FetchFailing, e),
        // Deliberate, and why nothing comes: said before "pending", which it would look like.
        ProjectFacts::Registered {
            suspended: Some(s),
            path,
            ..
        } => (EntryState::Suspended, suspended(&s, &path)),
        ProjectFacts::Registered { commit: None, .. } => (
            EntryState::Pending,
            "first fetch of the project not finished yet".to_owned(),
        ),
        ProjectFacts::Registered { .. } => (
            EntryState::Pending,
            "first sync not reported yet".to_owned(),
        ),
    }
}

/// Who suspended the entry, why, and the command that resumes it. Pure.
fn suspended(s: &Suspended, path: &str) -> String {
    let why = if s.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", s.reason)
    };
    let resume = if s.whole_agent {
        "kas agent resume <agent>".to_owned()
    } else {
        format!("kas agent resume <agent> --project {path}")
    };
    format!(
        "suspended by {}{why}; nothing is applied until it is resumed ({resume})",
        s.by
    )
}

/// Why an entry naming `project` (as written) never synchronizes, and what fixes it: kas
/// assigns ids itself, so a numeric id can only be looked up, a path can be added. Pure.
fn unregistered(project: &str) -> String {
    if project.bytes().all(|b| b.is_ascii_digit()) {
        format!(
            "project id {project} is not registered in kas (kas project list shows the ids it has)"
        )
    } else {
        format!(
            "{project:?} is not registered in kas (kas project add --path {project} --remote <repository>)"
        )
    }
}

/// The handler. An agent with no configuration in force known has no entries to show.
pub async fn agent_unreported(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
) -> Result<Json<Vec<UnreportedView>>, ApiError> {
    // As `GET …/gitops` decides which reports are shown, so the two never disagree.
    let Some(config) = st.in_force().now(agent_id).await else {
        return Ok(Json(Vec::new()));
    };
    let reported: HashSet<String> = st
        .sync_states
        .for_agent(agent_id)
        .await?
        .into_iter()
        .map(|r| r.project_id)
        .collect();
    let suspensions = st.store.suspensions(Some(agent_id)).await?;
    let held = |project_id: i64| {
        let s = suspensions.iter().find(|s| s.scope.holds(project_id))?;
        Some(Suspended {
            by: s.suspended_by.clone(),
            reason: s.reason.clone(),
            whole_agent: s.scope == SuspensionScope::Agent,
        })
    };
    // The agent's configuration project, whose group its entries may read.
    let own_project = match st.store.get_agent(agent_id).await? {
        Some(agent) => st
            .store
            .get_project(agent.project_id)
            .await?
            .map(|p| p.path),
        None => None,
    };
    let mut entries = Vec::new();
    for p in &config.gitops.manifest_projects {
        let key = p.entry_key();
        if reported.contains(&key) {
            continue;
        }
        let project = p.id.to_string();
        let facts = match crate::operate::find_project(&st, &project).await? {
            None => ProjectFacts::Unregistered,
            Some(found) => {
                let head = st.sources.head(found.id);
                let outside = own_project
                    .as_deref()
                    .filter(|own| !st.manifest_access.allows(own, &found.path))
                    .map(|own| tether_agent_config::ManifestAccess::refusal(own, &found.path));
                ProjectFacts::Registered {
                    outside,
                    path: found.path,
                    remote: found.remote.is_some(),
                    commit: head.commit.map(|c| c.to_hex()),
                    fetch_error: head.error,
                    suspended: held(found.id),
                }
            }
        };
        entries.push(EntryFacts {
            key,
            project,
            facts,
        });
    }
    Ok(Json(unreported(entries, &reported)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, facts: ProjectFacts) -> EntryFacts {
        EntryFacts {
            key: key.into(),
            project: key.split('#').next().unwrap_or(key).into(),
            facts,
        }
    }

    fn registered(commit: Option<&str>, fetch_error: Option<&str>) -> ProjectFacts {
        ProjectFacts::Registered {
            path: "g/app".into(),
            remote: true,
            commit: commit.map(str::to_owned),
            fetch_error: fetch_error.map(str::to_owned),
            suspended: None,
            outside: None,
        }
    }

    fn states(rows: &[UnreportedView]) -> Vec<(&str, EntryState)> {
        rows.iter()
            .map(|r| (r.project_id.as_str(), r.state))
            .collect()
    }

    #[test]
    fn entries_with_a_report_are_left_out_and_the_others_keep_their_order() {
        let entries = vec![
            entry("g/z", registered(Some("c1"), None)),
            entry("g/app#infra", registered(Some("c1"), None)),
            entry("g/app#apps", registered(Some("c1"), None)),
        ];
        let reported = HashSet::from(["g/app#infra".to_owned()]);
        let rows = unreported(entries, &reported);
        assert_eq!(
            states(&rows),
            [
                ("g/z", EntryState::Pending),
                ("g/app#apps", EntryState::Pending)
            ]
        );
        assert_eq!(rows[0].reason, "first sync not reported yet");
    }

    #[test]
    fn an_unregistered_project_is_an_unknown_project_naming_the_command_that_adds_it() {
        let rows = unreported(
            vec![entry("group/ghost", ProjectFacts::Unregistered)],
            &HashSet::new(),
        );
        assert_eq!(states(&rows), [("group/ghost", EntryState::UnknownProject)]);
        assert!(
            rows[0]
                .reason
                .starts_with("\"group/ghost\" is not registered in kas (kas project add"),
            "{}",
            rows[0].reason
        );
        assert!(rows[0].state.is_unhealthy());
        let by_id = unreported(
            vec![entry("42", ProjectFacts::Unregistered)],
            &HashSet::new(),
        );
        assert!(
            by_id[0]
                .reason
                .starts_with("project id 42 is not registered"),
            "{}",
            by_id[0].reason
        );
    }

    #[test]
    fn a_failing_fetch_is_kas_s_error_even_with_an_older_commit() {
        for commit in [None, Some("c0")] {
            let rows = unreported(
                vec![entry(
                    "g/app",
                    registered(commit, Some("authentication failed")),
                )],
                &HashSet::new(),
            );
            assert_eq!(states(&rows), [("g/app", EntryState::FetchFailing)]);
            assert_eq!(rows[0].reason, "authentication failed");
            assert!(rows[0].state.is_unhealthy());
        }
    }

    /// A configuration in force from before the group rule lists another group's project: its
    /// stream is refused, and the entry says so rather than "pending" for good.
    #[test]
    fn a_project_outside_the_agents_group_is_not_shared_and_unhealthy() {
        let why = tether_agent_config::ManifestAccess::refusal("t1/config", "t2/app");
        let facts = ProjectFacts::Registered {
            path: "t2/app".into(),
            remote: true,
            commit: Some("c1".into()),
            fetch_error: None,
            suspended: None,
            outside: Some(why.clone()),
        };
        let rows = unreported(vec![entry("t2/app", facts)], &HashSet::new());
        assert_eq!(states(&rows), [("t2/app", EntryState::NotShared)]);
        assert_eq!(rows[0].reason, why);
        assert!(rows[0].state.is_unhealthy());
    }

    #[test]
    fn a_project_without_repository_is_fetch_failing() {
        let facts = ProjectFacts::Registered {
            path: "g/app".into(),
            remote: false,
            commit: None,
            fetch_error: None,
            suspended: None,
            outside: None,
        };
        let rows = unreported(vec![entry("g/app", facts)], &HashSet::new());
        assert_eq!(states(&rows), [("g/app", EntryState::FetchFailing)]);
        assert!(
            rows[0].reason.contains("no repository"),
            "{}",
            rows[0].reason
        );
    }

    #[test]
    fn a_suspended_entry_says_who_why_and_how_to_resume_not_pending() {
        let held = |whole_agent| ProjectFacts::Registered {
            path: "g/app".into(),
            remote: true,
            commit: Some("c1".into()),
            fetch_error: None,
            suspended: Some(Suspended {
                by: "admin".into(),
                reason: "freeze".into(),
                whole_agent,
            }),
            outside: None,
        };
        let rows = unreported(vec![entry("g/app", held(false))], &HashSet::new());
        assert_eq!(states(&rows), [("g/app", EntryState::Suspended)]);
        assert_eq!(
            rows[0].reason,
            "suspended by admin: freeze; nothing is applied until it is resumed (kas agent resume <agent> --project g/app)"
        );
        assert!(!rows[0].state.is_unhealthy(), "deliberate");
        let rows = unreported(vec![entry("g/app", held(true))], &HashSet::new());
        assert!(
            rows[0].reason.ends_with("(kas agent resume <agent>)"),
            "{}",
            rows[0].reason
        );
    }

    #[test]
    fn pending_says_whether_the_first_fetch_or_the_first_sync_is_awaited() {
        let rows = unreported(
            vec![entry("g/app", registered(None, None))],
            &HashSet::new(),
        );
        assert_eq!(states(&rows), [("g/app", EntryState::Pending)]);
        assert_eq!(
            rows[0].reason,
            "first fetch of the project not finished yet"
        );
        assert!(!rows[0].state.is_unhealthy());
    }
}
