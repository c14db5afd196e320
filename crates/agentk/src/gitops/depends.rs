//! `depends_on` (Flux's `dependsOn`): whether a worker may apply, given how the workers of the
//! entries it depends on stand. Pure: each worker publishes its [`Readiness`] on a board (one
//! watch channel shared by the workers, which wakes the waiting ones when anything changes);
//! the rules are here.
//!
//! A dependency is ready when its last synchronization was of its newest commit, succeeded,
//! and left every object Current, and it is neither suspended, refused, waiting itself nor
//! dry-run only. Flux's rule for a Kustomization's `Ready` condition, with "the newest
//! commit" standing for Flux's check that the source's revision is the one applied.

use std::collections::HashMap;

use tether_agent_config::EntryRef;
use tether_gitops_agent::Status;
use tether_gitops_agent::sync::{ObjectState, SyncOutcome};

/// How a worker stands for its dependants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Readiness {
    Ready,
    /// Ready, at this commit of this source (the project and ref its worker follows): an
    /// entry of the same source waits until its dependency is ready at the commit it is about
    /// to apply (the streams of two entries get a new commit at slightly different moments).
    ReadyAt {
        source: String,
        commit: String,
    },
    /// Why not, as a clause following "waiting for dependency X: ".
    NotReady(String),
}

/// Every running worker's readiness, by [`EntryRef::identity`] of its entry (the project's
/// identity, plus `#name` for a named entry).
pub(super) type Board = HashMap<String, Readiness>;

/// The readiness of a worker just started: nothing known yet.
pub(super) fn not_synchronized() -> Readiness {
    Readiness::NotReady("it has not synchronized yet".to_owned())
}

/// Objects named in a "not Current" reason; the rest are counted.
const NAMED_OBJECTS: usize = 3;

/// The last finished synchronization, as far as readiness goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LastSync {
    pub commit: String,
    pub error: Option<String>,
    /// `Kind namespace/name (Status)` of each object left neither Current nor pruned.
    pub not_current: Vec<String>,
    pub dry_run: bool,
}

impl LastSync {
    pub(super) fn of(outcome: &SyncOutcome) -> Self {
        let not_current = outcome
            .objects
            .iter()
            .filter_map(|o| match o.status {
                ObjectState::Live(Status::Current)
                | ObjectState::Pruned
                | ObjectState::PruneSkipped => None,
                ObjectState::Live(status) => {
                    let name = match &o.obj.namespace {
                        Some(ns) => format!("{ns}/{}", o.obj.name),
                        None => o.obj.name.clone(),
                    };
                    Some(format!("{} {name} ({status:?})", o.obj.kind))
                }
            })
            .collect();
        LastSync {
            commit: outcome.commit_id.clone(),
            // Superseded is no failure: its objects not yet Current say why it is not ready.
            error: outcome
                .error
                .as_ref()
                .filter(|_| !outcome.superseded())
                .map(ToString::to_string),
            not_current,
            dry_run: outcome.dry_run,
        }
    }
}

/// What a worker knows of itself that its readiness follows from.
#[derive(Debug, Default)]
pub(super) struct Facts<'a> {
    pub suspended: bool,
    /// The newest commit offered could not be applied: its id and why.
    pub refused: Option<(&'a str, &'a str)>,
    /// Its own wait for its dependencies ("waiting for dependency ...").
    pub waiting: Option<&'a str>,
    /// The newest complete commit.
    pub newest: Option<&'a str>,
    pub last: Option<&'a LastSync>,
    /// A synchronization is under way.
    pub running: bool,
    /// The project and ref the worker follows (see [`Readiness::ReadyAt`]).
    pub source: Option<&'a str>,
}

fn short(commit: &str) -> &str {
    commit.get(..8).unwrap_or(commit)
}

/// A worker's readiness: the first reason it is not ready, in the order a user fixes them.
pub(super) fn readiness(f: &Facts<'_>) -> Readiness {
    let not = |why: String| Readiness::NotReady(why);
    if f.suspended {
        return not("it is suspended in kas (kas agent resume)".to_owned());
    }
    if let Some((commit, why)) = f.refused {
        return not(format!(
            "its newest commit {} cannot be applied: {why}",
            short(commit)
        ));
    }
    if let Some(waiting) = f.waiting {
        return not(format!("it is {waiting}"));
    }
    let Some(newest) = f.newest else {
        return not("it has no commit yet".to_owned());
    };
    let last = f.last.filter(|l| l.commit == newest);
    let Some(last) = last else {
        return not(if f.running {
            format!(
                "its synchronization of commit {} is under way",
                short(newest)
            )
        } else {
            format!("it has not synchronized commit {} yet", short(newest))
        });
    };
    let at = short(&last.commit);
    if let Some(error) = &last.error {
        return not(format!(
            "its last synchronization (commit {at}) failed: {error}"
        ));
    }
    if last.dry_run {
        return not(
            "it only dry-runs (dry_run_strategy), so none of its objects are in the cluster"
                .to_owned(),
        );
    }
    if !last.not_current.is_empty() {
        let named = last.not_current.iter().take(NAMED_OBJECTS);
        let more = last.not_current.len().saturating_sub(NAMED_OBJECTS);
        let mut list = named.cloned().collect::<Vec<_>>().join(", ");
        if more > 0 {
            list.push_str(&format!(" and {more} more"));
        }
        return not(format!("objects of commit {at} are not Current: {list}"));
    }
    match f.source {
        Some(source) => Readiness::ReadyAt {
            source: source.to_owned(),
            commit: newest.to_owned(),
        },
        None => Readiness::Ready,
    }
}

/// Why an entry depending on `depends_on` may not apply now (the first dependency not ready,
/// named as the configuration writes it); `None` when all are ready. `mine` is the source and
/// commit the entry is about to apply: a dependency following the same source must be ready
/// at that commit (a monorepo commit reaching the dependant's stream first was applied before
/// the dependency had even seen it).
pub(super) fn blocker(
    depends_on: &[EntryRef],
    board: &Board,
    mine: Option<(&str, &str)>,
) -> Option<String> {
    depends_on.iter().find_map(|dep| {
        let behind;
        let why = match board.get(&dep.identity()) {
            Some(Readiness::ReadyAt { source, commit }) => match mine {
                Some((s, c)) if s == source && c != commit => {
                    behind = format!(
                        "it is ready at commit {}, not yet at commit {} (both follow the same ref)",
                        short(commit),
                        short(c)
                    );
                    behind.as_str()
                }
                _ => return None,
            },
            Some(Readiness::Ready) => return None,
            Some(Readiness::NotReady(why)) => why.as_str(),
            // Validation refuses such an id; this covers a worker not (yet) running.
            None => "it is not running (not an entry of the configuration in force)",
        };
        Some(format!("waiting for dependency {dep}: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use tether_gitops_agent::object_ref::ObjRef;
    use tether_gitops_agent::sync::{ObjectOutcome, SyncError};

    use tether_agent_config::ProjectRef;

    use super::*;

    const C1: &str = "1111111111111111111111111111111111111111";
    const C2: &str = "2222222222222222222222222222222222222222";

    fn synced(commit: &str) -> LastSync {
        LastSync {
            commit: commit.to_owned(),
            error: None,
            not_current: Vec::new(),
            dry_run: false,
        }
    }

    fn facts<'a>(last: &'a LastSync) -> Facts<'a> {
        Facts {
            newest: Some(C1),
            last: Some(last),
            ..Facts::default()
        }
    }

    fn why(r: Readiness) -> String {
        match r {
            Readiness::Ready | Readiness::ReadyAt { .. } => "ready".to_owned(),
            Readiness::NotReady(why) => why,
        }
    }

    #[test]
    fn ready_once_the_newest_commit_synchronized_with_every_object_current() {
        let last = synced(C1);
        assert_eq!(readiness(&facts(&last)), Readiness::Ready);
        // A re-sync of the same commit under way (drift correction) keeps it ready.
        let resyncing = Facts {
            running: true,
            ..facts(&last)
        };
        assert_eq!(readiness(&resyncing), Readiness::Ready);
    }

    #[test]
    fn a_newer_commit_not_yet_synchronized_is_not_ready() {
        let last = synced(C1);
        let cases = [
            (
                Facts {
                    newest: Some(C2),
                    running: true,
                    ..facts(&last)
                },
                "its synchronization of commit 22222222 is under way",
            ),
            (
                Facts {
                    newest: Some(C2),
                    ..facts(&last)
                },
                "it has not synchronized commit 22222222 yet",
            ),
            (Facts::default(), "it has no commit yet"),
            (
                Facts {
                    newest: Some(C1),
                    ..Facts::default()
                },
                "it has not synchronized commit 11111111 yet",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(why(readiness(&f)), want, "{f:?}");
        }
    }

    #[test]
    fn failing_suspended_refused_waiting_or_dry_run_dependencies_say_why() {
        let (last, failed, dry) = (
            synced(C1),
            LastSync {
                error: Some("1 objects failed".to_owned()),
                ..synced(C1)
            },
            LastSync {
                dry_run: true,
                ..synced(C1)
            },
        );
        let cases = [
            (
                facts(&failed),
                "its last synchronization (commit 11111111) failed: 1 objects failed",
            ),
            (
                Facts {
                    suspended: true,
                    ..facts(&last)
                },
                "it is suspended in kas (kas agent resume)",
            ),
            (
                Facts {
                    refused: Some((C2, "unsigned")),
                    ..facts(&last)
                },
                "its newest commit 22222222 cannot be applied: unsigned",
            ),
            (
                Facts {
                    waiting: Some("waiting for dependency g/crds: it has no commit yet"),
                    ..facts(&last)
                },
                "it is waiting for dependency g/crds: it has no commit yet",
            ),
            (
                facts(&dry),
                "it only dry-runs (dry_run_strategy), so none of its objects are in the cluster",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(why(readiness(&f)), want, "{f:?}");
        }
    }

    #[test]
    fn objects_not_current_are_named_up_to_three() {
        let obj = |name: &str, status: ObjectState| ObjectOutcome {
            obj: ObjRef {
                group: "apps".to_owned(),
                kind: "Deployment".to_owned(),
                namespace: Some("infra".to_owned()),
                name: name.to_owned(),
            },
            status,
            message: String::new(),
            not_applied: false,
        };
        let outcome = SyncOutcome {
            commit_id: C1.to_owned(),
            error: Some(SyncError::ResourcesFailed(4)),
            objects: vec![
                obj("a", ObjectState::Live(Status::InProgress)),
                obj("b", ObjectState::Live(Status::Current)),
                obj("c", ObjectState::Pruned),
                obj("d", ObjectState::Live(Status::Failed)),
                obj("e", ObjectState::Live(Status::Unknown)),
                obj("f", ObjectState::Live(Status::NotFound)),
            ],
            writes: 0,
            dry_run: false,
            watched_statuses: 0,
            taken_over: 0,
            warnings: Vec::new(),
        };
        let last = LastSync::of(&outcome);
        assert_eq!(last.not_current.len(), 4);
        let ok_but_not_current = LastSync {
            error: None,
            ..last
        };
        assert_eq!(
            why(readiness(&facts(&ok_but_not_current))),
            "objects of commit 11111111 are not Current: Deployment infra/a (InProgress), \
             Deployment infra/d (Failed), Deployment infra/e (Unknown) and 1 more"
        );
    }

    #[test]
    fn the_first_dependency_not_ready_blocks_named_as_written() {
        let deps = [
            EntryRef::project(ProjectRef::Path("Group/CRDs".to_owned())),
            EntryRef::project(ProjectRef::Numeric(42)),
        ];
        let mut board = Board::new();
        board.insert("group/crds".to_owned(), Readiness::Ready);
        board.insert("42".to_owned(), not_synchronized());
        assert_eq!(
            blocker(&deps, &board, None).as_deref(),
            Some("waiting for dependency 42: it has not synchronized yet")
        );
        board.insert("42".to_owned(), Readiness::Ready);
        assert_eq!(blocker(&deps, &board, None), None);
        board.remove("group/crds");
        assert_eq!(
            blocker(&deps, &board, None).as_deref(),
            Some(
                "waiting for dependency Group/CRDs: it is not running (not an entry of the \
                 configuration in force)"
            )
        );
        assert_eq!(blocker(&[], &board, None), None);
    }

    /// Two entries of one project are told apart by name: the named one's readiness is its
    /// own, not the project's unnamed entry's.
    #[test]
    fn a_named_dependency_is_matched_by_project_and_name() {
        let infra = EntryRef {
            project: ProjectRef::Path("Group/Fleet".to_owned()),
            name: Some("infra".to_owned()),
        };
        let mut board = Board::new();
        board.insert("group/fleet".to_owned(), Readiness::Ready);
        board.insert("group/fleet#apps".to_owned(), Readiness::Ready);
        board.insert("group/fleet#infra".to_owned(), not_synchronized());
        assert_eq!(
            blocker(std::slice::from_ref(&infra), &board, None).as_deref(),
            Some("waiting for dependency Group/Fleet#infra: it has not synchronized yet")
        );
        board.insert("group/fleet#infra".to_owned(), Readiness::Ready);
        assert_eq!(blocker(&[infra], &board, None), None);
    }

    /// A commit of a project both entries follow reaches the dependant's stream first: the
    /// dependency, ready at the commit before, is not ready for this one. One following
    /// another source (another project, another ref) is ready at whatever commit.
    #[test]
    fn a_dependency_of_the_same_source_must_be_ready_at_the_commit_to_apply() {
        let infra = EntryRef {
            project: ProjectRef::Path("group/fleet".to_owned()),
            name: Some("infra".to_owned()),
        };
        let ready_at = |source: &str, commit: &str| Readiness::ReadyAt {
            source: source.to_owned(),
            commit: commit.to_owned(),
        };
        let mut board = Board::new();
        board.insert("group/fleet#infra".to_owned(), ready_at("fleet@main", C1));
        let deps = std::slice::from_ref(&infra);
        assert_eq!(
            blocker(deps, &board, Some(("fleet@main", C2))).as_deref(),
            Some(
                "waiting for dependency group/fleet#infra: it is ready at commit 11111111, not yet \
                 at commit 22222222 (both follow the same ref)"
            )
        );
        assert_eq!(blocker(deps, &board, Some(("fleet@main", C1))), None);
        assert_eq!(blocker(deps, &board, Some(("fleet@v1", C2))), None);
        assert_eq!(blocker(deps, &board, None), None);

        let facts = Facts {
            newest: Some(C2),
            source: Some("fleet@main"),
            ..Facts::default()
        };
        let last = LastSync {
            commit: C2.to_owned(),
            error: None,
            not_current: Vec::new(),
            dry_run: false,
        };
        let facts = Facts {
            last: Some(&last),
            ..facts
        };
        assert_eq!(readiness(&facts), ready_at("fleet@main", C2));
    }
}
