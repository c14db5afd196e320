//! The admin API's day-to-day commands: reconcile now, suspend and resume GitOps, delete an
//! agent, list personal access tokens. The decisions (which projects, who, what a suspension
//! covers) are pure functions below the handlers.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tether_agent_config::AgentConfig;
use tether_configuration_server::ConfigState;
use tether_kas_api::{
    AgentDeleted, ProgressView, ReconcileRequest, ReconcileStarted, ReconcileTarget, Resumed,
    SupersedesRequest, SupersedesView, SuspendRequest, SuspensionView, UserTokenView,
};
use tether_store::{Project, Suspension, SuspensionScope};
use tokio::time::Instant;

use crate::api::{ApiError, ApiState, rfc3339};
use crate::cluster::ClusterEvent;
use tether_git_source::GaveUp;
use tether_gitops_server::ResyncId;

/// How long a reconcile waits past a fetch's own deadline for the fetch it asked for: the
/// margin covers publishing its result.
const FETCH_WAIT_MARGIN: Duration = Duration::from_secs(5);

/// Longest reason kept (a sentence or a ticket link, not a document).
const MAX_REASON: usize = 1024;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/agents/{id}", delete(delete_agent))
        .route("/api/v1/agents/{id}/reconcile", post(reconcile))
        .route("/api/v1/agents/{id}/reconcile/supersedes", post(supersedes))
        .route("/api/v1/agents/{id}/suspend", post(suspend))
        .route("/api/v1/agents/{id}/resume", post(resume))
        .route("/api/v1/user-tokens", get(list_user_tokens))
        .route("/api/v1/agents/{id}/gitops/progress", get(progress))
        .route("/api/v1/agents/{id}/gitops/resync", post(resync_here))
}

/// A re-sync delivered by the replica a reconcile reached, to the agent's streams here
/// (between replicas: see [`resync_on_holders`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResyncHere {
    resync_id: u64,
    projects: Vec<i64>,
}

/// Asks the agent's GitOps streams here of each project to re-sync; how many heard it, by
/// project.
async fn resync_here(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(req): Json<ResyncHere>,
) -> Json<HashMap<i64, usize>> {
    let id = ResyncId(req.resync_id);
    let heard = req.projects.into_iter().map(|project_id| {
        let streams = st.gitops_controls.resync(agent_id, project_id, id);
        (project_id, streams)
    });
    Json(heard.collect())
}

/// Asks the agent's GitOps streams of `projects` to re-sync, here and on the other replicas;
/// how many streams heard it, by project.
async fn deliver_resync(
    st: &ApiState,
    agent_id: i64,
    projects: Vec<i64>,
    id: ResyncId,
) -> HashMap<i64, usize> {
    let mut streams: HashMap<i64, usize> = projects
        .into_iter()
        .map(|p| (p, resync_everywhere(st, agent_id, p, id)))
        .collect();
    let unheard: Vec<i64> = streams
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| *p)
        .collect();
    if !unheard.is_empty() {
        for (project_id, n) in resync_on_holders(st, agent_id, unheard, id).await {
            *streams.entry(project_id).or_default() += n;
        }
    }
    streams
}

/// Delivers the re-sync to the agent's GitOps streams on the other replicas holding its
/// tunnels, and counts them by project. A follower Pod's tunnels may be here while the leading
/// Pod's stream is on another replica: the Redis event reaches it too, but says nothing back,
/// and the reconcile said "no GitOps stream". A replica that does not answer counts none.
async fn resync_on_holders(
    st: &ApiState,
    agent_id: i64,
    projects: Vec<i64>,
    id: ResyncId,
) -> HashMap<i64, usize> {
    let mut heard = HashMap::new();
    let Some(peers) = &st.peers else {
        return heard;
    };
    let holders = match peers.holders(agent_id).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(agent_id, error = %e, "Cannot read the replicas' agent directory; a reconcile counts this replica's GitOps streams only");
            return heard;
        }
    };
    let request = ResyncHere {
        resync_id: id.0,
        projects,
    };
    let body = bytes::Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
    let (parts, ()) = axum::http::Request::post(format!("/api/v1/agents/{agent_id}/gitops/resync"))
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(())
        .unwrap_or_default()
        .into_parts();
    for address in holders {
        let answer = crate::api_routing::ask(peers, &address, &parts, body.clone()).await;
        match answer {
            Ok(counts) => {
                let counts: HashMap<i64, usize> = counts;
                for (project_id, n) in counts {
                    *heard.entry(project_id).or_default() += n;
                }
            }
            Err(e) => {
                tracing::warn!(agent_id, replica = %address, error = %e, "A replica holding the agent did not take a reconcile");
            }
        }
    }
    heard
}

fn err(code: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(code, message.into())
}

/// Whether `wanted` (a path or an id, as the user typed it, or an entry key `project#name`)
/// names the entry known to the configuration as `key`, of `project`: a project names all its
/// entries, an entry key only that one.
fn names(wanted: &str, key: &str, project: Option<&Project>) -> bool {
    let (entry_project, entry_name) = tether_agent_config::split_entry_key(key);
    let (wanted_project, wanted_name) = tether_agent_config::split_entry_key(wanted);
    if wanted_name.is_some_and(|n| Some(n) != entry_name) {
        return false;
    }
    wanted_project == entry_project
        || project.is_some_and(|p| p.path == wanted_project || p.id.to_string() == wanted_project)
}

/// "admin", or "admin (NAME)" with the name the CLI reported, kept printable and short: it is
/// shown, never trusted.
pub fn suspended_by(requested_by: Option<&str>) -> String {
    let name: String = requested_by
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    let name = name.trim();
    if name.is_empty() {
        "admin".to_owned()
    } else {
        format!("admin ({name})")
    }
}

fn check_reason(reason: &str) -> Result<(), ApiError> {
    if reason.len() > MAX_REASON || reason.chars().any(|c| c.is_control() && c != '\t') {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("the reason must be at most {MAX_REASON} bytes of printable text"),
        ));
    }
    Ok(())
}

pub(crate) async fn find_project(st: &ApiState, text: &str) -> Result<Option<Project>, ApiError> {
    Ok(match text.parse::<i64>() {
        Ok(id) => st.store.get_project(id).await?,
        Err(_) => st.store.get_project_by_path(text).await?,
    })
}

/// The agent's manifest projects in its configuration in force (`wanted`: only that one),
/// with kas's record of each (`None`: not known to kas).
async fn manifest_projects(
    st: &ApiState,
    config: &AgentConfig,
    wanted: Option<&str>,
) -> Result<Vec<(String, Option<Project>)>, ApiError> {
    let mut out = Vec::new();
    for p in &config.gitops.manifest_projects {
        let key = p.entry_key();
        let project = find_project(st, &p.id.to_string()).await?;
        if wanted.is_none_or(|w| names(w, &key, project.as_ref())) {
            out.push((key, project));
        }
    }
    match (wanted, out.is_empty()) {
        (Some(w), true) => Err(err(
            StatusCode::NOT_FOUND,
            format!("{w} is not a manifest project of the agent's configuration in force"),
        )),
        (None, true) => Err(err(
            StatusCode::CONFLICT,
            "the agent's configuration in force lists no manifest project",
        )),
        _ => Ok(out),
    }
}

async fn agent_config(
    st: &ApiState,
    agent_id: i64,
) -> Result<std::sync::Arc<AgentConfig>, ApiError> {
    if st.store.get_agent(agent_id).await?.is_none() {
        return Err(err(StatusCode::NOT_FOUND, format!("no agent {agent_id}")));
    }
    st.config_states.config(agent_id).ok_or_else(|| {
        err(
            StatusCode::CONFLICT,
            format!("agent {agent_id} has no configuration in force yet (has it connected?)"),
        )
    })
}

/// Fetches the projects now and waits (bounded) until each fetch ended, well or not. Returns
/// why, for each project whose fetch did not end in time: its head is then the one from
/// before, and saying nothing would pass the old commit off as fetched.
async fn fetch_now(st: &ApiState, ids: &[i64]) -> HashMap<i64, String> {
    // A fetch already running must end first, then the asked one runs: each ends once it has
    // made no progress for `git.fetch_timeout`, or at its cap. The wait follows the mirror's
    // progress the same way, so a slow but moving fetch is waited for, not reported failed.
    let timeout = st.sources.fetch_timeout();
    let idle = timeout + FETCH_WAIT_MARGIN;
    let cap = timeout.saturating_mul(tether_git_source::CAP_FACTOR) * 2 + FETCH_WAIT_MARGIN;
    let waits = ids.iter().map(|&id| {
        let mirror = st.sources.mirror(id);
        let mut heads = st.sources.watch(id);
        // A fetch that started before this request may have read the remote before the push
        // being reconciled: only one that starts after it answers.
        let asked = st.sources.request_fetch(id);
        async move {
            let (Some(asked), Some(mirror)) = (asked, mirror) else {
                return Some((id, "the project has no repository to fetch".to_owned()));
            };
            let done = heads.wait_for(|h| h.served >= asked);
            match mirror.while_progressing(idle, cap, done).await {
                Ok(Ok(_)) => None,
                Ok(Err(_)) => Some((id, "its mirror was removed while fetching".to_owned())),
                Err(GaveUp::Silent(idle)) => Some((
                    id,
                    format!("the fetch made no progress for {}s", idle.as_secs()),
                )),
                Err(GaveUp::TooLong(cap)) => Some((
                    id,
                    format!("the fetch did not finish within {}s", cap.as_secs()),
                )),
            }
        }
    });
    let unfinished = futures_util::future::join_all(waits).await;
    unfinished.into_iter().flatten().collect()
}

/// Who suspended GitOps and why, in words.
fn suspension_words(s: &Suspension) -> String {
    let reason = if s.reason.is_empty() {
        "none"
    } else {
        &s.reason
    };
    format!("suspended (by {}, reason: {reason})", s.suspended_by)
}

/// The suspended projects a reconcile skips, by project id, with who suspended them and why.
/// A reconcile naming one project (`named`), or of an agent suspended as a whole, is refused
/// instead: the user must resume, not be told it synced. A reconcile of the whole agent
/// synchronizes the others: one project held during an incident must not block the rest.
fn suspended_skipped(
    suspensions: &[Suspension],
    projects: &[(String, Option<Project>)],
    named: bool,
) -> Result<HashMap<i64, String>, ApiError> {
    let refuse = |what: &str, s: &Suspension| {
        Err(err(
            StatusCode::CONFLICT,
            format!("{what} is {}: resume it first", suspension_words(s)),
        ))
    };
    if let Some(all) = suspensions
        .iter()
        .find(|s| s.scope == SuspensionScope::Agent)
    {
        return refuse("the whole agent", all);
    }
    let mut skipped = HashMap::new();
    for (key, project) in projects {
        let Some(p) = project else { continue };
        if let Some(s) = tether_gitops_server::control::suspension_for(suspensions, p.id) {
            if named {
                return refuse(key, s);
            }
            skipped.insert(p.id, suspension_words(s));
        }
    }
    Ok(skipped)
}

/// Whether kas has read the configuration at `commit`: put it in force, or refused it.
fn config_read(state: Option<&ConfigState>, commit: &str) -> bool {
    state.is_some_and(|s| s.commit == commit || s.error_commit.as_deref() == Some(commit))
}

/// The agent's configuration in force once kas has read the configuration project's newest
/// commit, waiting for that until `deadline`; with the newest commit when kas has not read it
/// by then (the agent's configuration stream is down: only it reads the file). A reconcile
/// right after a push of `config.yaml` named an entry just added as unknown, and waited for
/// one just removed until its timeout.
async fn config_caught_up(
    st: &ApiState,
    agent_id: i64,
    config_project: i64,
    deadline: Instant,
) -> (Option<std::sync::Arc<AgentConfig>>, Option<String>) {
    let newest = st.sources.head(config_project).commit.map(|c| c.to_hex());
    loop {
        // Another replica may serve the agent's configuration stream: the store then has it.
        if st.peers.is_some() {
            st.config_states.refresh(st.store.as_ref(), agent_id).await;
        }
        let config = st.config_states.config(agent_id);
        let state = st.config_states.get(agent_id);
        let read = newest
            .as_deref()
            .is_none_or(|c| config_read(state.as_ref(), c));
        if (read && config.is_some()) || Instant::now() >= deadline {
            return (config, newest.filter(|_| !read));
        }
        // Woken when a configuration is recorded here; the poll covers the store's.
        let _ = tokio::time::timeout_at(
            deadline.min(Instant::now() + WAIT_POLL),
            st.config_states.changed(),
        )
        .await;
    }
}

/// The sentence saying kas has not read the configuration at `commit`, if any.
fn unread_note(unread: Option<&str>) -> String {
    unread.map_or_else(String::new, |c| {
        format!(
            "; kas has not read commit {} of the agent's configuration project yet (is the agent's configuration stream connected?)",
            &c[..c.len().min(12)]
        )
    })
}

fn no_config(agent_id: i64, unread: Option<&str>) -> ApiError {
    err(
        StatusCode::CONFLICT,
        format!(
            "agent {agent_id} has no configuration in force yet (has it connected?){}",
            unread_note(unread)
        ),
    )
}

/// An entry not found in a configuration kas is behind on may be in the newest one: said.
fn with_unread_config(e: ApiError, unread: Option<&str>) -> ApiError {
    ApiError(e.0, format!("{}{}", e.1, unread_note(unread)))
}

/// Delivers the re-sync, then, until `deadline`, again to each project no stream heard: the
/// agent restarts the worker of an entry whose settings changed (and starts one for a new
/// entry), so its stream is briefly absent right after a configuration change. A stream
/// opened later still gets the re-sync (it reads its project's directives when it starts).
async fn deliver_waiting(
    st: &ApiState,
    agent_id: i64,
    projects: Vec<i64>,
    id: ResyncId,
    deadline: Instant,
) -> HashMap<i64, usize> {
    let mut streams = deliver_resync(st, agent_id, projects, id).await;
    loop {
        let unheard: Vec<i64> = streams
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(p, _)| *p)
            .collect();
        if unheard.is_empty() || Instant::now() >= deadline {
            return streams;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + WAIT_POLL)).await;
        streams.extend(deliver_resync(st, agent_id, unheard, id).await);
    }
}

/// How often a reconcile looks again at the configuration in force or the agent's streams
/// while it waits for them (both are local reads, or one small store read).
const WAIT_POLL: Duration = Duration::from_millis(200);

async fn reconcile(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(req): Json<ReconcileRequest>,
) -> Result<Json<ReconcileStarted>, ApiError> {
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms.unwrap_or(0));
    let Some(agent) = st.store.get_agent(agent_id).await? else {
        return Err(err(StatusCode::NOT_FOUND, format!("no agent {agent_id}")));
    };
    // The configuration project first: an entry just added or removed is only known once kas
    // has read its newest commit, and the entries say which projects to fetch.
    fetch_now(&st, &[agent.project_id]).await;
    let (config, unread) = config_caught_up(&st, agent_id, agent.project_id, deadline).await;
    let config = config.ok_or_else(|| no_config(agent_id, unread.as_deref()))?;
    let projects = manifest_projects(&st, &config, req.project.as_deref())
        .await
        .map_err(|e| with_unread_config(e, unread.as_deref()))?;
    let skipped = suspended_skipped(
        &st.store.suspensions(Some(agent_id)).await?,
        &projects,
        req.project.is_some(),
    )?;
    let ids: Vec<i64> = projects
        .iter()
        .filter_map(|(_, p)| p.as_ref())
        .map(|p| p.id)
        .filter(|id| !skipped.contains_key(id))
        .collect();
    let unfinished = fetch_now(&st, &ids).await;
    // Past every stored answer: the clock may have stepped back since (see the function).
    let answered = st.sync_states.for_agent(agent_id).await?;
    let answered = answered.iter().map(|r| r.resync_id).max().unwrap_or(0);
    let resync = st.gitops_controls.next_resync_id_after(ResyncId(answered));
    let streams = deliver_waiting(&st, agent_id, ids, resync, deadline).await;
    let targets: Vec<ReconcileTarget> = projects
        .into_iter()
        .map(|(key, project)| match project {
            None => ReconcileTarget {
                project: key,
                commit: None,
                fetch_error: Some("not a project known to kas".into()),
                streams: 0,
                suspended: None,
            },
            Some(p) => {
                let head = st.sources.head(p.id);
                // The newest commit, also when its signature was refused (`head.commit` is then
                // the last verified one): that is the one the reconcile is about.
                let newest = head.refusal.as_ref().map(|r| r.commit).or(head.commit);
                let commit = followed_commit(&st, &config, &key, &p, newest);
                ReconcileTarget {
                    project: key,
                    commit,
                    // A fetch that did not end in time leaves an older error or none.
                    fetch_error: unfinished.get(&p.id).cloned().or(head.error),
                    streams: streams.get(&p.id).copied().unwrap_or_default(),
                    suspended: skipped.get(&p.id).cloned(),
                }
            }
        })
        .collect();
    tracing::info!(
        agent_id,
        resync_id = resync.0,
        projects = targets.len(),
        "Reconcile requested"
    );
    Ok(Json(ReconcileStarted {
        resync_id: resync.0,
        projects: targets,
    }))
}

/// How far back a reported commit's history is searched for the fetched one.
const SUPERSEDES_LIMIT: usize = 10_000;

/// Whether the commit the agent reported for a reconcile was pushed after the one the
/// reconcile fetched, on top of it: then the fetched commit is applied too (`kas agent
/// reconcile --wait` failed when someone pushed while it waited).
async fn supersedes(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(req): Json<SupersedesRequest>,
) -> Result<Json<SupersedesView>, ApiError> {
    let parse = |hex: &str| {
        tether_git_source::CommitId::from_hex(hex).map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                format!("{hex:?} is not a commit id"),
            )
        })
    };
    let (fetched, reported) = (parse(&req.fetched)?, parse(&req.reported)?);
    let config = agent_config(&st, agent_id).await?;
    let projects = manifest_projects(&st, &config, Some(&req.project)).await?;
    let mirror = projects
        .into_iter()
        .find_map(|(_, p)| p)
        .and_then(|p| st.sources.mirror(p.id));
    let Some(mirror) = mirror.filter(|_| fetched != reported) else {
        return Ok(Json(SupersedesView { supersedes: false }));
    };
    let walk = tokio::task::spawn_blocking(move || {
        mirror.in_history(&fetched, &reported, SUPERSEDES_LIMIT)
    });
    let supersedes = matches!(walk.await, Ok(Ok(true)));
    Ok(Json(SupersedesView { supersedes }))
}

/// The commit, after the fetch, of the ref the agent follows in `key` (its default branch's is
/// the head; a branch, tag or commit of its own is read from the mirror), so that `kas agent
/// reconcile --wait` can tell whether the agent applied it.
fn followed_commit(
    st: &ApiState,
    config: &AgentConfig,
    key: &str,
    project: &Project,
    head: Option<tether_git_source::CommitId>,
) -> Option<String> {
    let entry = config
        .gitops
        .manifest_projects
        .iter()
        .find(|m| m.entry_key() == key);
    let Some(git_ref) = entry.and_then(|m| m.git_ref.as_ref()) else {
        return head.map(|c| c.to_hex());
    };
    let mirror = st.sources.mirror(project.id)?;
    mirror
        .resolve(&source_ref(git_ref))
        .ok()
        .map(|c| c.to_hex())
}

/// The ref an entry's `ref:` names, as the mirror resolves it.
pub(crate) fn source_ref(r: &tether_agent_config::GitRef) -> tether_git_source::GitRef {
    use tether_agent_config::GitRef as ConfigRef;
    use tether_git_source::GitRef;
    match r {
        ConfigRef::Branch(b) => GitRef::Branch(b.clone()),
        ConfigRef::Tag(t) => GitRef::Tag(t.clone()),
        ConfigRef::Commit(c) => GitRef::Commit(c.clone()),
    }
}

/// How far the agent's syncs under way for a reconcile got (kept in memory by this kas).
async fn progress(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
) -> Json<Vec<ProgressView>> {
    let unrecorded = st.sync_states.unrecorded(agent_id);
    // An outcome kas could not record ends its sync's progress: shown instead of it.
    let running = st
        .sync_states
        .progress(agent_id)
        .into_iter()
        .filter(|r| {
            !unrecorded
                .iter()
                .any(|u| u.report.project_id == r.project_id)
        })
        .map(|r| progress_view(r, None))
        .collect::<Vec<_>>();
    let failed = unrecorded
        .into_iter()
        .map(|u| progress_view(u.report, Some(u.error)));
    Json(running.into_iter().chain(failed).collect())
}

/// A progress report, or an outcome kas could not record (`unrecorded`: the store's error).
fn progress_view(
    r: tether_protocol::gitops::SyncReport,
    unrecorded: Option<String>,
) -> ProgressView {
    let p = r.progress.unwrap_or_default();
    ProgressView {
        project_id: r.project_id,
        commit_id: r.commit_id,
        resync_id: r.resync_id,
        objects: p.objects,
        current: p.current,
        failed: p.failed,
        pending: p.pending.map(crate::api::object_view),
        unrecorded,
    }
}

/// Tells the agent's GitOps streams here and on every other replica (the leader's stream
/// may be on any of them) that its suspensions changed.
async fn suspensions_changed(st: &ApiState, agent_id: i64) {
    st.gitops_controls.suspensions_changed(agent_id);
    if let Some(cluster) = &st.cluster {
        let from = cluster.replica();
        st.publish_event(ClusterEvent::Suspensions { agent_id, from })
            .await;
    }
}

/// Asks the agent's streams of a project to re-sync, here and (in the background) on the
/// other replicas; how many streams on this replica heard it.
fn resync_everywhere(st: &ApiState, agent_id: i64, project_id: i64, id: ResyncId) -> usize {
    if let Some(cluster) = &st.cluster {
        let (st, from) = (st.clone(), cluster.replica());
        tokio::spawn(async move {
            let event = ClusterEvent::Resync {
                agent_id,
                project_id,
                id: id.0,
                from,
            };
            st.publish_event(event).await;
        });
    }
    st.gitops_controls.resync(agent_id, project_id, id)
}

/// What `req.project` makes a suspension cover.
async fn scope_of(
    st: &ApiState,
    agent_id: i64,
    project: Option<&str>,
) -> Result<SuspensionScope, ApiError> {
    let Some(text) = project else {
        return Ok(SuspensionScope::Agent);
    };
    // kas holds a project's commits, for all its entries alike: an entry key (`project#name`,
    // as status rows show) suspends its whole project.
    let (text, _) = tether_agent_config::split_entry_key(text);
    let p = find_project(st, text)
        .await?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no project {text}")))?;
    // Suspending a project the agent does not sync would silently do nothing.
    if let Some(config) = st.config_states.config(agent_id) {
        manifest_projects(st, &config, Some(&p.path)).await?;
    }
    Ok(SuspensionScope::Project(p.id))
}

async fn suspend(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(req): Json<SuspendRequest>,
) -> Result<Json<SuspensionView>, ApiError> {
    check_reason(&req.reason)?;
    let scope = scope_of(&st, agent_id, req.project.as_deref()).await?;
    let who = suspended_by(req.requested_by.as_deref());
    let s = st.store.suspend(agent_id, scope, &req.reason, &who).await?;
    suspensions_changed(&st, agent_id).await;
    tracing::info!(agent_id, scope = ?scope, reason = %req.reason, suspended_by = %who, "GitOps suspended");
    let paths = project_paths(&st).await?;
    let mut answer = view(&s, &paths);
    if let (SuspensionScope::Project(id), Some(config)) = (scope, st.config_states.config(agent_id))
        && let Some(project) = st.store.get_project(id).await?
    {
        answer.entries = held_entries(&config, &project);
    }
    Ok(Json(answer))
}

async fn resume(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(req): Json<SuspendRequest>,
) -> Result<Json<Resumed>, ApiError> {
    let scope = scope_of(&st, agent_id, req.project.as_deref()).await?;
    let existing = st.store.suspensions(Some(agent_id)).await?;
    if let (SuspensionScope::Project(_), Some(all)) = (
        scope,
        existing.iter().find(|s| s.scope == SuspensionScope::Agent),
    ) {
        return Err(err(
            StatusCode::CONFLICT,
            format!(
                "the whole agent is suspended (by {}): resume it without --project",
                all.suspended_by
            ),
        ));
    }
    let resumed = st.store.resume(agent_id, scope).await?;
    if resumed == 0 {
        return Err(err(StatusCode::CONFLICT, "nothing of that is suspended"));
    }
    suspensions_changed(&st, agent_id).await;
    tracing::info!(agent_id, scope = ?scope, resumed, "GitOps resumed");
    Ok(Json(Resumed { resumed }))
}

async fn project_paths(st: &ApiState) -> Result<HashMap<i64, String>, ApiError> {
    Ok(st
        .store
        .list_projects()
        .await?
        .into_iter()
        .map(|p| (p.id, p.path))
        .collect())
}

fn view(s: &Suspension, paths: &HashMap<i64, String>) -> SuspensionView {
    SuspensionView {
        project: match s.scope {
            SuspensionScope::Agent => None,
            SuspensionScope::Project(id) => {
                Some(paths.get(&id).cloned().unwrap_or_else(|| id.to_string()))
            }
        },
        reason: s.reason.clone(),
        suspended_by: s.suspended_by.clone(),
        suspended_at: rfc3339(
            UNIX_EPOCH + Duration::from_secs(u64::try_from(s.suspended_at).unwrap_or(0)),
        ),
        entries: Vec::new(),
    }
}

/// The entries of the agent's configuration in force that a suspension of `project` (by its
/// path or id) holds: every entry of the project. Pure.
fn held_entries(config: &AgentConfig, project: &Project) -> Vec<String> {
    let id = project.id.to_string();
    config
        .gitops
        .manifest_projects
        .iter()
        .map(tether_agent_config::ManifestProject::entry_key)
        .filter(|key| {
            let (of, _) = tether_agent_config::split_entry_key(key);
            of == project.path || of == id
        })
        .collect()
}

/// The suspensions of one agent or all, by agent, for listings.
pub async fn suspension_views(
    st: &ApiState,
    agent_id: Option<i64>,
) -> Result<HashMap<i64, Vec<SuspensionView>>, ApiError> {
    let all = st.store.suspensions(agent_id).await?;
    if all.is_empty() {
        return Ok(HashMap::new());
    }
    let paths = project_paths(st).await?;
    let mut out: HashMap<i64, Vec<SuspensionView>> = HashMap::new();
    for s in &all {
        out.entry(s.agent_id).or_default().push(view(s, &paths));
    }
    Ok(out)
}

/// Removes the agent's records, then ends what its tokens opened: its tunnel and GitOps and
/// configuration streams, and people's requests through it, and forgets what kas kept of it in
/// memory, on this replica and (told through Redis) the others. Stored first, so nothing
/// authenticates as the agent from then on.
async fn delete_agent(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
) -> Result<Json<AgentDeleted>, ApiError> {
    let tokens = st.store.list_tokens(agent_id).await?;
    let user_tokens = st.store.list_user_tokens(Some(agent_id)).await?;
    if !st.store.delete_agent(agent_id).await? {
        return Err(err(StatusCode::NOT_FOUND, format!("no agent {agent_id}")));
    }
    let streams_ended = tokens.iter().map(|t| st.registry.revoke_token(t.id)).sum();
    let user_requests_ended = user_tokens
        .iter()
        .map(|t| st.live_user_requests.revoke(t.id))
        .sum();
    st.forget_agent(agent_id);
    for t in &tokens {
        let revoked = crate::cluster::ClusterEvent::AgentToken { id: t.id };
        st.publish_event(revoked).await;
    }
    for t in &user_tokens {
        let revoked = crate::cluster::ClusterEvent::UserToken { id: t.id };
        st.publish_event(revoked).await;
    }
    st.publish_event(crate::cluster::ClusterEvent::AgentDeleted { agent_id })
        .await;
    let tokens_revoked = tokens.iter().filter(|t| t.is_active()).count();
    tracing::info!(
        agent_id,
        tokens_revoked,
        streams_ended,
        user_requests_ended,
        "Agent deleted"
    );
    Ok(Json(AgentDeleted {
        agent_id,
        tokens_revoked,
        streams_ended,
        user_requests_ended,
    }))
}

async fn list_user_tokens(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<UserTokenView>>, ApiError> {
    let agent_id = q
        .get("agent_id")
        .map(|a| a.parse::<i64>())
        .transpose()
        .map_err(|_| err(StatusCode::BAD_REQUEST, "agent_id must be a number"))?;
    let rows = st.store.list_user_tokens(agent_id).await?;
    let views = rows
        .into_iter()
        .map(|t| {
            let memberships = tether_kubeproxy_server::memberships_from_json(&t.memberships)
                .map_err(|e| {
                    err(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("personal access token {}: stored memberships: {e}", t.id),
                    )
                })?;
            // By kas's clock, as a request with the token is judged: a CLI run elsewhere
            // judged by its own and listed active a token kas refused (E14).
            let state = match t.revoked_at {
                Some(_) => "revoked",
                None if !crate::validated_tokens::unexpired(&t, std::time::SystemTime::now()) => {
                    "expired"
                }
                None => "active",
            };
            Ok(UserTokenView {
                id: t.id,
                agent_id: t.agent_id,
                username: t.username,
                memberships,
                created_at: t.created_at,
                expires_at: t.expires_at,
                revoked_at: t.revoked_at,
                state: Some(state.to_owned()),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(Json(views))
}

/// How often a replica re-reads the suspensions even when no replica said they changed.
const SUSPENSIONS_REREAD: Duration = Duration::from_secs(10);

/// Tells this replica's GitOps streams of every agent whose suspensions changed in the store
/// since the last look, every [`SUSPENSIONS_REREAD`]. Other replicas announce a change on
/// Redis, but that message is lost when the subscription is down at that moment: the leader's
/// stream would go on applying commits of a suspended agent (or hold a resumed one) until it
/// reconnected, hours later. One query per replica, whatever the number of streams.
pub async fn follow_suspensions(
    store: std::sync::Arc<dyn tether_store::Store>,
    controls: std::sync::Arc<tether_gitops_server::Controls>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(SUSPENSIONS_REREAD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: Option<HashMap<i64, Vec<Suspension>>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        // A failed read is the readiness check's to report; the next tick tries again.
        let Ok(all) = store.suspensions(None).await else {
            continue;
        };
        let now = by_agent(all);
        if let Some(before) = &known {
            for agent_id in changed_agents(before, &now) {
                controls.suspensions_changed(agent_id);
            }
        }
        known = Some(now);
    }
}

fn by_agent(all: Vec<Suspension>) -> HashMap<i64, Vec<Suspension>> {
    let mut out: HashMap<i64, Vec<Suspension>> = HashMap::new();
    for s in all {
        out.entry(s.agent_id).or_default().push(s);
    }
    out
}

/// The agents whose suspensions differ between two readings (pure).
fn changed_agents(
    before: &HashMap<i64, Vec<Suspension>>,
    now: &HashMap<i64, Vec<Suspension>>,
) -> Vec<i64> {
    let mut out: Vec<i64> = before
        .keys()
        .chain(now.keys())
        .filter(|id| before.get(id) != now.get(id))
        .copied()
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reconcile waits for kas to read the configuration project's newest commit; a refusal
    /// of it counts as read (the one in force stays, and is what the entries are looked up in).
    #[test]
    fn a_configuration_commit_put_in_force_or_refused_is_read_and_another_is_not() {
        let state = ConfigState {
            commit: "aaa".into(),
            error_commit: Some("bbb".into()),
            ..ConfigState::default()
        };
        assert!(config_read(Some(&state), "aaa"));
        assert!(config_read(Some(&state), "bbb"));
        assert!(!config_read(Some(&state), "ccc"));
        assert!(!config_read(None, "aaa"));
        assert_eq!(
            unread_note(Some("0123456789abcdef")),
            "; kas has not read commit 0123456789ab of the agent's configuration project yet (is the agent's configuration stream connected?)"
        );
        assert_eq!(unread_note(None), "");
    }

    fn suspension(agent_id: i64, reason: &str) -> Suspension {
        Suspension {
            agent_id,
            scope: SuspensionScope::Agent,
            reason: reason.into(),
            suspended_by: "admin".into(),
            suspended_at: 1,
        }
    }

    /// A reconcile of the whole agent skips a suspended project; one naming it, or of an agent
    /// suspended as a whole, is refused with who suspended it and why.
    #[test]
    fn a_suspended_project_is_skipped_by_a_whole_agent_reconcile_and_refused_when_named() {
        let project = |id: i64, path: &str| {
            let p = Project {
                id,
                path: path.into(),
                ..Project::default()
            };
            (path.to_owned(), Some(p))
        };
        let projects = [project(7, "group/a"), project(8, "group/b")];
        let held = Suspension {
            scope: SuspensionScope::Project(8),
            ..suspension(1, "incident 9")
        };
        let skipped = suspended_skipped(std::slice::from_ref(&held), &projects, false).unwrap();
        assert_eq!(
            skipped,
            HashMap::from([(8, "suspended (by admin, reason: incident 9)".to_owned())])
        );
        let named = suspended_skipped(std::slice::from_ref(&held), &projects[1..], true);
        assert_eq!(
            named.expect_err("named").1,
            "group/b is suspended (by admin, reason: incident 9): resume it first"
        );
        let all = suspended_skipped(&[suspension(1, "")], &projects, false);
        assert_eq!(
            all.expect_err("all").1,
            "the whole agent is suspended (by admin, reason: none): resume it first"
        );
        assert!(suspended_skipped(&[], &projects, true).unwrap().is_empty());
    }

    #[test]
    fn agents_whose_suspensions_appeared_went_or_changed_are_told() {
        let before = by_agent(vec![
            suspension(1, "a"),
            suspension(2, "b"),
            suspension(4, "d"),
        ]);
        let now = by_agent(vec![
            suspension(2, "b2"),
            suspension(3, "c"),
            suspension(4, "d"),
        ]);
        assert_eq!(changed_agents(&before, &now), vec![1, 2, 3]);
        assert!(changed_agents(&now, &now).is_empty());
    }

    #[test]
    fn who_suspended_is_admin_with_the_reported_name_kept_printable() {
        assert_eq!(suspended_by(None), "admin");
        assert_eq!(suspended_by(Some("  ")), "admin");
        assert_eq!(suspended_by(Some("alice")), "admin (alice)");
        assert_eq!(suspended_by(Some("ev\x1b[31mil")), "admin (ev[31mil)");
        assert_eq!(
            suspended_by(Some(&"x".repeat(200))).len(),
            "admin ()".len() + 64
        );
    }

    #[test]
    fn a_reason_is_printable_and_bounded() {
        assert!(check_reason("incident 42: https://status.example.com\tsee log").is_ok());
        assert!(check_reason("two\nlines").is_err());
        assert!(check_reason(&"r".repeat(MAX_REASON + 1)).is_err());
    }

    #[test]
    fn a_project_is_named_by_its_key_path_or_id() {
        let p = Project {
            id: 7,
            path: "group/manifests".into(),
            ..Project::default()
        };
        assert!(names("7", "group/manifests", Some(&p)));
        assert!(names("group/manifests", "7", Some(&p)));
        assert!(names("group/manifests", "group/manifests", None));
        assert!(!names("group/other", "group/manifests", Some(&p)));
    }

    /// `kas agent reconcile --project group/manifests` reconciles every entry of the project;
    /// `group/manifests#apps` only that entry.
    #[test]
    fn a_project_names_all_its_entries_and_an_entry_key_only_its_entry() {
        let p = Project {
            id: 7,
            path: "group/manifests".into(),
            ..Project::default()
        };
        assert!(names("group/manifests", "group/manifests#apps", Some(&p)));
        assert!(names("7", "group/manifests#apps", Some(&p)));
        assert!(names("group/manifests#apps", "group/manifests#apps", None));
        assert!(names("7#apps", "group/manifests#apps", Some(&p)));
        assert!(!names(
            "group/manifests#infra",
            "group/manifests#apps",
            Some(&p)
        ));
        assert!(!names("group/manifests#apps", "group/manifests", Some(&p)));
    }
}
