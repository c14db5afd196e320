//! kas's internal HTTP API, used by the admin commands (`kas agent …`, `kas token …`).
//!
//! Every route needs `Authorization: Bearer <admin token>`. Agent tokens appear in exactly one
//! response: the one that creates them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use tether_store::Store;
use tether_tunnel_server::{Registry, RegistryError};
use tokio::io::AsyncWriteExt;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::AdminToken;
use crate::connections::ConnectionCount;
use crate::limits::{HttpGuard, guard_http};
use tether_configuration_server::{ConfigState, ConfigStates};
// The routes' request and response types live in their own crate, shared with the clients.
use tether_git_source::{Delivery, Sources};
pub use tether_kas_api::{
    AgentView, ConfigView, ConnectionView, CreateTokenRequest, EarlierView, ObjectView,
    ProjectRequest, ProjectView, RefusalView, RegisterRequest, ReportedOutcome, ReportedStatus,
    Revoked, Stats, SupersedesRequest, SyncView, TokenCreated, TokenView, UserTokenCreated,
    UserTokenRequest,
};

#[derive(Clone, Debug)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub admin: AdminToken,
    pub tunnel_wait: Duration,
    pub connections: Arc<ConnectionCount>,
    pub sources: Arc<Sources>,
    pub config_states: Arc<ConfigStates>,
    pub sync_states: Arc<tether_gitops_server::SyncStates>,
    /// Re-sync requests and suspension changes to the agents' GitOps streams.
    pub gitops_controls: Arc<tether_gitops_server::Controls>,
    /// All this replica remembers per agent (the three above and the proxy's project cache).
    pub memory: crate::agent_memory::AgentMemory,
    /// The proxy's live requests per personal access token (ended on revocation).
    pub live_user_requests: Arc<crate::revocation::LiveUserRequests>,
    /// Limits on failed authentication (admin token, webhook secrets).
    pub guards: crate::limits::Guards,
    /// `kas agent diff`.
    pub previews: crate::preview::Previews,
    /// Redis shared with the other replicas: revocations are published there.
    pub cluster: Option<crate::cluster::Cluster>,
    /// The other replicas, when routing between them is configured: requests about an agent
    /// held elsewhere are forwarded there (see [`crate::api_routing`]).
    pub peers: Option<crate::peers::Peers>,
    /// The last push webhook deliveries of each project (shown by the web UI).
    pub deliveries: Arc<Deliveries>,
    /// Which manifest projects an agent's configuration may list.
    pub manifest_access: tether_agent_config::ManifestAccess,
}

/// When the other replicas learn what an event would have told them, had it reached them
/// (logged with a failed publication, so the operator knows what is late and for how long).
fn catch_up(event: &crate::cluster::ClusterEvent) -> &'static str {
    use crate::cluster::ClusterEvent as E;
    match event {
        E::AgentToken { .. } | E::UserToken { .. } => {
            "as soon as they are subscribed to Redis again (they re-check every live token \
             then), or at their next token re-check (agent.token_recheck_interval)"
        }
        E::Pushed { .. } => "at their next poll (git.poll_interval)",
        E::Projects { .. } => "within 30 s (they re-read the projects)",
        E::Suspensions { .. } => "within 10 s (they re-read the suspensions)",
        E::AgentDeleted { .. } => "within 10 s (they look for deleted agents they remember)",
        E::Resync { .. } => {
            "never: an agent held by another replica does not re-sync now; ask again"
        }
        E::Limits { .. } => "at the next share of the counts",
        E::ConfigInForce { .. } => {
            "those serving the agent's other replicas: when one of them reconnects, or the next configuration is sent"
        }
    }
}

/// How many deliveries are kept per project.
const DELIVERIES_KEPT: usize = 5;
/// How many projects' deliveries are kept; past it, the project that heard from its Git host
/// longest ago is forgotten first. Far above the projects one kas serves, so only a flood of
/// deliveries to projects deleted meanwhile can reach it.
const DELIVERY_PROJECTS_KEPT: usize = 10_000;

/// The last few push webhook deliveries of each project, in this kas's memory.
///
/// Only projects kas has get a history (the webhook handler records after looking the project
/// up: anyone can post to any project id), a deleted project's history goes with it, and the
/// number of projects kept is capped: memory stays bounded whatever is posted.
#[derive(Debug)]
pub struct Deliveries {
    history: std::sync::Mutex<History>,
    max_projects: usize,
}

#[derive(Debug, Default)]
struct History {
    /// Increases with every delivery: the least recent project is the one to forget.
    sequence: u64,
    projects: HashMap<i64, ProjectDeliveries>,
}

#[derive(Debug, Default)]
struct ProjectDeliveries {
    last: u64,
    /// Newest first: (RFC 3339 time, outcome).
    list: std::collections::VecDeque<(String, Delivery)>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries::with_max_projects(DELIVERY_PROJECTS_KEPT)
    }
}

impl Deliveries {
    /// A history of at most `max_projects` projects.
    pub fn with_max_projects(max_projects: usize) -> Self {
        Deliveries {
            history: std::sync::Mutex::default(),
            max_projects,
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a delivery to `project_id`, a project kas has.
    pub fn record(&self, project_id: i64, outcome: Delivery) {
        let mut history = self.history();
        history.sequence += 1;
        let sequence = history.sequence;
        if !history.projects.contains_key(&project_id) {
            history.make_room(self.max_projects.saturating_sub(1));
        }
        let entry = history.projects.entry(project_id).or_default();
        entry.last = sequence;
        entry
            .list
            .push_front((rfc3339(std::time::SystemTime::now()), outcome));
        entry.list.truncate(DELIVERIES_KEPT);
    }

    /// Drops the history of a deleted project.
    pub fn forget(&self, project_id: i64) {
        self.history().projects.remove(&project_id);
    }

    /// How many projects have a history.
    pub fn projects(&self) -> usize {
        self.history().projects.len()
    }

    /// Newest first: (RFC 3339 time, outcome).
    pub fn of(&self, project_id: i64) -> Vec<(String, &'static str)> {
        self.history()
            .projects
            .get(&project_id)
            .map(|p| {
                p.list
                    .iter()
                    .map(|(at, d)| {
                        let word = match d {
                            Delivery::Accepted => "accepted",
                            Delivery::Refused => "refused",
                            Delivery::Failed => "failed",
                        };
                        (at.clone(), word)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl History {
    /// Forgets the least recently delivered projects until at most `keep` remain. A scan: it
    /// runs only once the cap is reached, and then once per new project.
    fn make_room(&mut self, keep: usize) {
        while self.projects.len() > keep {
            let Some(oldest) = self
                .projects
                .iter()
                .min_by_key(|(_, p)| p.last)
                .map(|(id, _)| *id)
            else {
                return;
            };
            self.projects.remove(&oldest);
        }
    }
}

impl ApiState {
    /// This replica's peers address, naming it to operators; empty without peers.
    pub fn own_address(&self) -> &str {
        self.peers.as_ref().map_or("", crate::peers::Peers::address)
    }

    /// Where the agents' configurations in force are read, as the proxy decides: the stored
    /// one when another replica may hold the agent.
    pub fn in_force(&self) -> crate::config_in_force::InForce<'_> {
        crate::config_in_force::InForce {
            configs: &self.config_states,
            store: self.store.as_ref(),
            registry: &self.registry,
            several: self.peers.is_some(),
        }
    }

    /// Tells the other replicas about `event`: to end what a revoked token opened there (this
    /// one ended it already; without Redis, or when publishing fails, they notice at their next
    /// token re-check), or to fetch a pushed project (or at their next poll).
    /// Tells the other replicas to re-read the projects (one was set or removed here).
    async fn projects_changed(&self) {
        if let Some(cluster) = &self.cluster {
            let from = cluster.replica();
            self.publish_event(crate::cluster::ClusterEvent::Projects { from })
                .await;
        }
    }

    /// Forgets what this kas keeps in memory about an agent by its id: its configuration state
    /// and configuration in force, the progress of its syncs, its GitOps directives, its
    /// configuration project. Done when the agent is deleted (other replicas are told), and
    /// again when one is registered, so that whatever the store's ids, a new agent never starts
    /// with a deleted one's configuration (it authorized CI jobs and people for the new agent).
    pub(crate) fn forget_agent(&self, agent_id: i64) {
        self.memory.forget(agent_id);
    }

    pub async fn publish_event(&self, event: crate::cluster::ClusterEvent) {
        let _ = self.tell_replicas(event).await;
    }

    /// Tells every replica about `event`; when Redis did not take it, says so (warn) and
    /// returns when the other replicas learn it anyway, for an answer to say.
    pub async fn tell_replicas(&self, event: crate::cluster::ClusterEvent) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        let e = cluster.publish(event.clone()).await.err()?;
        let catch_up = catch_up(&event);
        tracing::warn!(event = ?event, error = %e, catch_up, "Cannot tell the other replicas");
        Some(format!(
            "the other kas replicas could not be told now (Redis: {e}); they learn it {catch_up}"
        ))
    }
}

/// An error response: `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl ApiError {
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        ApiError(code, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A failure of kas itself (the database, above all) must show in kas's log, not only
        // in the one CLI that happened to ask.
        if self.0.is_server_error() {
            tracing::error!(code = self.0.as_u16(), error = %self.1, "Admin API request failed");
        }
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<tether_store::Error> for ApiError {
    fn from(e: tether_store::Error) -> Self {
        ApiError(store_error_code(&e), e.to_string())
    }
}

/// The status of a store error: the request's fault (4xx), the database not answering or
/// refusing writes (503: a dependency down, worth retrying — the CLI rides it out as it rides
/// out kas restarting, and the proxy answers 503 for the same cause), or kas's own (500).
fn store_error_code(e: &tether_store::Error) -> StatusCode {
    use tether_store::Error as E;
    match e {
        E::InvalidName { .. } => StatusCode::BAD_REQUEST,
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::AlreadyExists(_) | E::InUse(_) => StatusCode::CONFLICT,
        E::Database(_) | E::TimedOut(_) | E::WriteTurnTimedOut(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        E::Migrate(_) | E::Backup(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The answer to a revocation the database did not store, although its live requests ended:
/// the operator must know the token still authenticates wherever the store is read (after a
/// restart, on replicas that missed the event) until the revocation is run again.
fn revocation_not_stored(e: tether_store::Error, ended: usize, what: &str) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the revocation was not stored ({e}): its {ended} live {what} on this kas were \
             ended (and the other replicas' were asked to end theirs), but the token stays \
             valid in the database, where a replica reads it after a restart: run the \
             revocation again once the database answers"
        ),
    )
}

fn config_view(s: ConfigState) -> ConfigView {
    ConfigView {
        commit: s.commit,
        file: s.file,
        error: s.error,
        error_commit: s.error_commit,
        updated_at: s.updated_at,
        unstored: None,
    }
}

/// How long the agent list waits for the stored commits of the agents whose configuration in
/// force this replica failed to store: about one read's timeout (a database down makes each
/// read wait 5 s for a connection), however many agents there are. One read after another,
/// a list of 20 such agents took 100 s during an outage.
const STORED_COMMITS_DEADLINE: Duration = Duration::from_secs(6);

/// How many of those stored commits are read at once (each takes a database connection).
const STORED_COMMITS_AT_ONCE: usize = 4;

/// Says, in the views of agents whose configuration in force this replica failed to store,
/// what the stored record holds (read for those agents only): the other replicas authorize
/// with it meanwhile, which is why they disagree with this one. A commit not read within
/// [`STORED_COMMITS_DEADLINE`] (or whose read failed) is unknown (`None`), which the CLI and
/// the web UI say.
async fn add_unstored(st: &ApiState, views: &mut [AgentView]) {
    let unstored: Vec<i64> = views
        .iter()
        .filter(|v| v.config.is_some() && st.config_states.unstored_write(v.id).is_some())
        .map(|v| v.id)
        .collect();
    let limits = (STORED_COMMITS_AT_ONCE, STORED_COMMITS_DEADLINE);
    let stored = read_each_within(&unstored, limits, |agent_id| async move {
        let read = st.config_states.stored_commit(st.store.as_ref(), agent_id);
        // A store refusing writes may still answer reads.
        read.await.ok().map(Option::unwrap_or_default)
    })
    .await;
    for view in views {
        let Some(failed) = st.config_states.unstored_write(view.id) else {
            continue;
        };
        let Some(config) = view.config.as_mut() else {
            continue;
        };
        config.unstored = Some(tether_kas_api::UnstoredView {
            since: failed.since,
            error: failed.error,
            stored_commit: stored.get(&view.id).cloned(),
        });
    }
}

/// Runs `read` for each of `ids`, `at_once` at a time, for at most `deadline` in all: the
/// values read by then (a read answering `None` gives none).
async fn read_each_within<T, Fut>(
    ids: &[i64],
    (at_once, deadline): (usize, Duration),
    read: impl Fn(i64) -> Fut,
) -> HashMap<i64, T>
where
    Fut: std::future::Future<Output = Option<T>>,
{
    use futures_util::StreamExt;
    let mut got = HashMap::new();
    let reads = futures_util::stream::iter(ids.iter().copied())
        .map(|id| {
            let value = read(id);
            async move { (id, value.await) }
        })
        .buffer_unordered(at_once.max(1));
    let all = reads.for_each(|(id, value)| {
        if let Some(value) = value {
            got.insert(id, value);
        }
        std::future::ready(())
    });
    // Those still unread are unknown.
    let _ = tokio::time::timeout(deadline, all).await;
    got
}

pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

async fn require_admin(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| st.admin.matches(t.trim()));
    if !ok {
        return ApiError(StatusCode::UNAUTHORIZED, "admin token required".into()).into_response();
    }
    next.run(req).await
}

pub(crate) async fn list_agents(
    State(st): State<ApiState>,
    from_peer: Option<axum::Extension<crate::api_routing::FromPeer>>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    let local = local_agents(&st).await?;
    match (&st.peers, from_peer) {
        (Some(peers), None) => {
            let others = crate::api_routing::other_replicas_agents(peers).await;
            Ok(Json(crate::api_routing::merge_agents(local, others)))
        }
        _ => Ok(Json(local)),
    }
}

/// The agents with this replica's connections to them.
async fn local_agents(st: &ApiState) -> Result<Vec<AgentView>, ApiError> {
    let rows = st.store.list_agents().await?;
    let mut suspensions = crate::operate::suspension_views(st, None).await?;
    let projects: HashMap<String, i64> = st
        .store
        .list_projects()
        .await?
        .into_iter()
        .map(|p| (p.path, p.id))
        .collect();
    let live: HashMap<i64, _> = st
        .registry
        .connections()
        .into_iter()
        .map(|c| (c.agent_id, c))
        .collect();
    let mut out: Vec<AgentView> = rows
        .into_iter()
        .map(|r| {
            let c = live.get(&r.id);
            let connections: Vec<ConnectionView> = c
                .map(|c| {
                    c.connections
                        .iter()
                        .map(|x| ConnectionView {
                            connected_since: rfc3339(x.connected_since),
                            agent_version: x.agent_version.clone(),
                            pod_name: x.pod_name.clone(),
                            pod_namespace: x.pod_namespace.clone(),
                            cluster_id: x.cluster_id.clone(),
                            remote_addr: x.remote_addr.clone(),
                            streams: x.streams,
                            replica: st.own_address().to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let config_fetch_error = projects
                .get(&r.project_path)
                .and_then(|id| st.sources.head(*id).error);
            AgentView {
                id: r.id,
                project: r.project_path,
                name: r.name,
                connected: !connections.is_empty(),
                idle_tunnels: c.map_or(0, |c| c.idle_tunnels),
                connections,
                config: st.config_states.get(r.id).map(config_view),
                suspensions: suspensions.remove(&r.id).unwrap_or_default(),
                unreachable_replicas: Vec::new(),
                last_seen: last_seen(st.registry.last_seen(r.id), r.last_used_at),
                config_fetch_error,
            }
        })
        .collect();
    add_unstored(st, &mut out).await;
    Ok(out)
}

/// When the agent was last seen connected: the end of its last connection here, or the last
/// time a replica noted one of its tokens in use (kept across restarts), whichever is later.
fn last_seen(ended_here: Option<SystemTime>, token_used: Option<i64>) -> Option<String> {
    let stored = token_used
        .and_then(|s| u64::try_from(s).ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s));
    ended_here.max(stored).map(rfc3339)
}

pub(crate) async fn register_agent(
    State(st): State<ApiState>,
    Json(req): Json<RegisterRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let agent = st.store.register_agent(&req.project, &req.name).await?;
    st.forget_agent(agent.id);
    let (info, token) = st.store.create_token(agent.id, &req.description).await?;
    tracing::info!(agent_id = agent.id, project = %req.project, agent_name = %req.name, "Agent registered");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            agent_id: agent.id,
            token_id: info.id,
            token: token.expose().to_string(),
        }),
    ))
}

async fn create_token(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    body: Option<Json<CreateTokenRequest>>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let description = body.map(|b| b.0.description).unwrap_or_default();
    let (info, token) = st.store.create_token(agent_id, &description).await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            agent_id,
            token_id: info.id,
            token: token.expose().to_string(),
        }),
    ))
}

pub(crate) async fn list_tokens(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    from_peer: Option<axum::Extension<crate::api_routing::FromPeer>>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let local = local_tokens(&st, agent_id).await?;
    match (&st.peers, from_peer) {
        (Some(peers), None) => {
            let others = crate::api_routing::other_replicas_tokens(peers, agent_id).await;
            Ok(Json(crate::api_routing::merge_tokens(local, others)))
        }
        _ => Ok(Json(local)),
    }
}

/// The agent's tokens with the streams open with each on this replica.
async fn local_tokens(st: &ApiState, agent_id: i64) -> Result<Vec<TokenView>, ApiError> {
    let tokens = st.store.list_tokens(agent_id).await?;
    Ok(tokens
        .into_iter()
        .map(|t| TokenView {
            id: t.id,
            agent_id: t.agent_id,
            description: t.description,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
            last_used_at: t.last_used_at,
            open_streams: st.registry.streams_of(t.id),
            streams_unknown_on: Vec::new(),
        })
        .collect())
}

async fn create_user_token(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(body): Json<serde_json::Value>,
) -> Result<(StatusCode, Json<UserTokenCreated>), ApiError> {
    // Decoded here rather than by the extractor, so a typo in a membership is a 400 that says
    // where it is, not a bare 422.
    let req: UserTokenRequest = serde_path_to_error::deserialize(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let ttl = req.expires_in_seconds.unwrap_or(30 * 86_400);
    if !(1..=366 * 86_400).contains(&ttl) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "expires_in_seconds must be between 1 and one year".into(),
        ));
    }
    let json = tether_kubeproxy_server::memberships_to_json(&req.memberships);
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0);
    let (info, token) = st
        .store
        .create_user_token(agent_id, &req.username, &json, now + ttl)
        .await?;
    tracing::info!(agent_id, username = %info.username, token_id = info.id, "Personal access token created");
    Ok((
        StatusCode::CREATED,
        Json(UserTokenCreated {
            token_id: info.id,
            agent_id,
            username: info.username,
            token: token.expose().to_string(),
            expires_at: info.expires_at,
            warnings: tether_kubeproxy_server::membership_warnings(&req.memberships),
        }),
    ))
}

async fn revoke_user_token(
    State(st): State<ApiState>,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let stored = match st.store.revoke_user_token(id).await {
        Err(e) if !store_error_code(&e).is_server_error() => return Err(e.into()),
        stored => stored,
    };
    // Stored first, so a request authenticating from now on is refused; then the live ones
    // (watches, exec sessions) end, and any authenticated a moment ago is refused when it
    // starts (see `LiveUserRequests`). A revocation the database refused ends them all the
    // same: whoever revokes a token fears it is in the wrong hands, and its sessions must not
    // outlive the database's outage.
    let requests_ended = st.live_user_requests.revoke(id);
    let not_told = st
        .tell_replicas(crate::cluster::ClusterEvent::UserToken { id })
        .await;
    let was_active = stored.map_err(|e| revocation_not_stored(e, requests_ended, "requests"))?;
    tracing::info!(
        token_id = id,
        requests_ended,
        "Personal access token revoked"
    );
    let mut answer = serde_json::json!({"token_id": id, "was_active": was_active, "requests_ended": requests_ended});
    if let Some(note) = not_told {
        answer["replicas_not_told"] = note.into();
    }
    Ok(Json(answer))
}

pub(crate) async fn revoke_token(
    State(st): State<ApiState>,
    Path(token_id): Path<i64>,
) -> Result<Json<Revoked>, ApiError> {
    let stored = match st.store.revoke_token(token_id).await {
        Err(e) if !store_error_code(&e).is_server_error() => return Err(e.into()),
        stored => stored,
    };
    // End this kas's live streams now, and the other replicas' through Redis (without it,
    // they notice at their next re-check) — even when the database refused the revocation,
    // as for personal access tokens.
    let streams_ended = st.registry.revoke_token(token_id);
    let replicas_not_told = st
        .tell_replicas(crate::cluster::ClusterEvent::AgentToken { id: token_id })
        .await;
    let was_active =
        stored.map_err(|e| revocation_not_stored(e, streams_ended, "tunnel streams"))?;
    tracing::info!(token_id, streams_ended, "Agent token revoked");
    Ok(Json(Revoked {
        token_id,
        was_active,
        streams_ended,
        replicas_not_told,
    }))
}

/// Streams the request body through the agent's `echo` service and back: proves the whole
/// path (kas → tunnel → agentk → tunnel → kas) and measures it.
async fn echo(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    body: Body,
) -> Result<Response, ApiError> {
    let tunnel = st
        .registry
        .get_tunnel(agent_id, st.tunnel_wait)
        .await
        .map_err(|e| match e {
            RegistryError::AgentNotConnected(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            RegistryError::AllStreamsBusy { .. } => {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            RegistryError::ShuttingDown => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        })?;
    let conn = tunnel
        .request_confirmed(tether_protocol::services::ECHO, HashMap::new())
        .await
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let (reader, mut writer) = tokio::io::split(conn);
    tokio::spawn(async move {
        let mut body = StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
        if tokio::io::copy(&mut body, &mut writer).await.is_ok() {
            let _ = writer.shutdown().await;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(ReaderStream::new(reader)))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn project_view(st: &ApiState, p: tether_store::Project) -> ProjectView {
    let head = st.sources.head(p.id);
    ProjectView {
        id: p.id,
        webhooks: p.webhook_secret_file.is_some(),
        path: p.path,
        remote: p.remote,
        commit: head.commit.map(|c| c.to_hex()),
        last_fetch: head.succeeded_at.map(rfc3339),
        fetch_error: head.error,
        fetches: head.fetches,
        fetch_failures: head.failures,
        refusal: head.refusal.map(|r| RefusalView {
            commit: r.commit.to_hex(),
            signer: r.signer,
            reason: r.reason,
        }),
    }
}

pub(crate) async fn list_projects(
    State(st): State<ApiState>,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    let projects = st.store.list_projects().await?;
    Ok(Json(
        projects.into_iter().map(|p| project_view(&st, p)).collect(),
    ))
}

/// Adds a project or changes where its repository is.
async fn put_project(
    State(st): State<ApiState>,
    Json(req): Json<ProjectRequest>,
) -> Result<Json<ProjectView>, ApiError> {
    // Check everything before storing, so a bad remote is refused rather than stored broken.
    if let Some(r) = &req.remote {
        let remote = tether_git_source::Remote::parse(r)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("remote {r}: {e}")))?;
        // A network remote may be down for now, but a local one missing on kas's host is a
        // typo: refused, rather than stored and failing every fetch.
        if let Some(dir) = remote.local_path()
            && !dir.is_dir()
        {
            let m = format!("remote {r}: no such directory on kas's host");
            return Err(ApiError(StatusCode::BAD_REQUEST, m));
        }
    }
    for f in [
        &req.credentials_file,
        &req.webhook_secret_file,
        &req.ssh_key_file,
        &req.known_hosts_file,
        &req.verify_allowed_signers_file,
        &req.verify_gpg_keyring_file,
    ]
    .into_iter()
    .flatten()
    {
        if !std::path::Path::new(f).is_absolute() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{f}: secret files must be given as absolute paths"),
            ));
        }
    }
    let source = tether_store::ProjectSource {
        remote: req.remote,
        credentials_file: req.credentials_file,
        webhook_secret_file: req.webhook_secret_file,
        ssh_key_file: req.ssh_key_file,
        known_hosts_file: req.known_hosts_file,
        verify_allowed_signers_file: req.verify_allowed_signers_file,
        verify_gpg_keyring_file: req.verify_gpg_keyring_file,
    };
    let spec_check = tether_store::Project {
        id: 0,
        path: req.path.clone(),
        created_at: 0,
        remote: source.remote.clone(),
        credentials_file: source.credentials_file.clone(),
        webhook_secret_file: source.webhook_secret_file.clone(),
        ssh_key_file: source.ssh_key_file.clone(),
        known_hosts_file: source.known_hosts_file.clone(),
        verify_allowed_signers_file: source.verify_allowed_signers_file.clone(),
        verify_gpg_keyring_file: source.verify_gpg_keyring_file.clone(),
    };
    crate::projects::project_spec(&spec_check)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    // Fetches read it each time; here it is checked once so a typo is refused at once.
    if let Some(file) = &source.credentials_file {
        tether_git_source::Credentials::from_file(file).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("project {}: {e}", req.path),
            )
        })?;
    }
    let p = st.store.set_project_source(&req.path, &source).await?;
    let spec = crate::projects::project_spec(&p)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    st.sources
        .upsert(spec)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tracing::info!(project = %p.path, remote = p.remote.as_deref().unwrap_or(""), "Project source set");
    st.projects_changed().await;
    Ok(Json(project_view(&st, p)))
}

async fn delete_project(
    State(st): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    let path = q
        .get("path")
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "path is required".into()))?;
    let id = st.store.get_project_by_path(path).await?.map(|p| p.id);
    if st.store.remove_project(path).await? {
        if let Some(id) = id {
            st.sources.remove(id);
            st.deliveries.forget(id);
        }
        st.projects_changed().await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("project {path} not found"),
        ))
    }
}

/// A push webhook: checked against the project's secret, then an immediate fetch.
async fn webhook(
    State(st): State<ApiState>,
    Path(project_id): Path<i64>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (known, received) = match st.store.get_project(project_id).await {
        Ok(Some(project)) => (
            Some(project.id),
            receive_webhook(&st, &project, &headers, &body).await,
        ),
        // The same answer as a wrong secret: which project ids exist is not for strangers.
        Ok(None) => (None, Err(webhook_unauthorized())),
        Err(e) => (None, Err(e.into())),
    };
    // Every delivery is counted, so a sender with a wrong secret shows up on a dashboard.
    let outcome = match &received {
        Ok(_) => Delivery::Accepted,
        Err(e) if e.0 == StatusCode::UNAUTHORIZED => Delivery::Refused,
        Err(_) => Delivery::Failed,
    };
    st.sources.metrics().delivery(outcome);
    // Only projects kas has get a history: the id in the URL is anyone's choice.
    if let Some(id) = known {
        st.deliveries.record(id, outcome);
    }
    received
}

fn webhook_unauthorized() -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, "webhook not authorized".into())
}

async fn receive_webhook(
    st: &ApiState,
    project: &tether_store::Project,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<Json<serde_json::Value>, ApiError> {
    let unauthorized = webhook_unauthorized;
    let secret_file = project
        .webhook_secret_file
        .as_ref()
        .ok_or_else(unauthorized)?;
    let secret = std::fs::read_to_string(secret_file).map_err(|e| {
        tracing::error!(project = %project.path, error = %e, "Cannot read the webhook secret file");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "webhook secret unavailable".into(),
        )
    })?;
    let kind = tether_git_source::verify_webhook(headers, body, secret.trim().as_bytes()).map_err(
        |e| {
            // Debug only: the guard logs refusals with the client address, sampled.
            tracing::debug!(project = %project.path, error = %e, "Webhook refused");
            unauthorized()
        },
    )?;
    let event = tether_git_source::PushEvent::from_body(body);
    let triggered = st.sources.trigger(project.id);
    if let Some(cluster) = &st.cluster {
        let from = cluster.replica();
        st.publish_event(crate::cluster::ClusterEvent::Pushed {
            project: project.id,
            from,
        })
        .await;
    }
    tracing::info!(project = %project.path, kind = ?kind, git_ref = event.as_ref().map(|e| e.git_ref.clone()).unwrap_or_default(), "Push webhook: fetching now");
    Ok(Json(
        serde_json::json!({"project": project.path, "fetching": triggered}),
    ))
}

async fn agent_gitops(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
) -> Result<Json<Vec<SyncView>>, ApiError> {
    // A project dropped from the configuration in force keeps its last report in the store
    // (it says where its inventory was), but it is no longer the agent's status.
    let listed: Option<HashMap<String, tether_agent_config::ManifestProject>> =
        st.in_force().now(agent_id).await.map(|c| {
            c.gitops
                .manifest_projects
                .iter()
                .map(|p| (p.entry_key(), p.clone()))
                .collect()
        });
    let mut views: Vec<SyncView> = st
        .sync_states
        .for_agent(agent_id)
        .await?
        .into_iter()
        .filter(|r| {
            listed
                .as_ref()
                .is_none_or(|l| l.contains_key(&r.project_id))
        })
        .map(sync_view)
        .collect();
    let suspensions = st.store.suspensions(Some(agent_id)).await?;
    let sole = sole_holder(&st, agent_id).await;
    for v in &mut views {
        let project = v
            .project_id
            .split_once('#')
            .map_or(v.project_id.as_str(), |(p, _)| p);
        // Kas does not know the project: its entry has no report then, see `unreported`.
        let Some(found) = crate::operate::find_project(&st, project).await? else {
            continue;
        };
        // A report alone read as current while every push since stayed unfetched.
        v.fetch_error = st.sources.head(found.id).error.unwrap_or_default();
        v.suspended = suspensions.iter().any(|s| s.scope.holds(found.id));
        // None here with peers, unless this replica holds every connection of the agent: the
        // leader's stream may be on another replica.
        let here = st.gitops_controls.streams(agent_id, found.id);
        v.streams = (here > 0 || sole).then_some(here);
        let entry = listed.as_ref().and_then(|l| l.get(&v.project_id));
        if let Some((commit, since)) = newer(&st, found.id, entry, &v.commit_id) {
            v.newer_commit = commit;
            v.newer_since = since.map(rfc3339);
        }
    }
    Ok(Json(views))
}

/// Whether this replica's count of the agent's GitOps streams is the whole count: it is the
/// only replica, or the agent is connected here and the directory names no other replica
/// holding it. With replicas the count was never given, so an agent with no GitOps stream
/// (its ServiceAccount token expired: no replica leads) read `succeeded`, exit 0 (E14 F23).
async fn sole_holder(st: &ApiState, agent_id: i64) -> bool {
    let Some(peers) = &st.peers else {
        return true;
    };
    st.registry.has_agent(agent_id) && peers.holders(agent_id).await.is_ok_and(|h| h.is_empty())
}
/// The commit kas has for `entry` (of project `project_id`) when it is not `reported`, and
/// since when kas has had it ([`tether_git_source::Sources::ref_since`]).
fn newer(
    st: &ApiState,
    project_id: i64,
    entry: Option<&tether_agent_config::ManifestProject>,
    reported: &str,
) -> Option<(String, Option<SystemTime>)> {
    let (commit, since) = match &entry?.git_ref {
        None => {
            let head = st.sources.head(project_id);
            (head.commit?, head.commit_since)
        }
        Some(r) => {
            let r = crate::operate::source_ref(r);
            let commit = st.sources.mirror(project_id)?.resolve(&r).ok()?;
            let since = st.sources.ref_since(project_id, &r, &commit);
            (commit, since)
        }
    };
    let commit = commit.to_hex();
    (commit != reported).then_some((commit, since))
}

fn sync_view(r: tether_protocol::gitops::SyncReport) -> SyncView {
    SyncView {
        outcome: r.sync_outcome().into(),
        project_id: r.project_id,
        commit_id: r.commit_id,
        error: r.error,
        finished_at: rfc3339(
            UNIX_EPOCH + Duration::from_secs(u64::try_from(r.finished_at).unwrap_or(0)),
        ),
        dry_run: r.dry_run,
        warnings: r.warnings,
        resync_id: r.resync_id,
        chart_version: r.chart_version,
        fetch_error: String::new(),
        newer_commit: String::new(),
        newer_since: None,
        suspended: false,
        streams: None,
        earlier: r.earlier.into_iter().map(earlier_view).collect(),
        objects: r.objects.into_iter().map(object_view).collect(),
    }
}

/// An object's status as the agent reported it.
pub(crate) fn object_view(o: tether_protocol::gitops::ObjectStatus) -> ObjectView {
    ObjectView {
        status: o.state().into(),
        group: o.group,
        kind: o.kind,
        namespace: o.namespace,
        name: o.name,
        not_applied: o.not_applied,
        message: o.message,
    }
}

fn earlier_view(e: tether_protocol::gitops::EarlierSync) -> EarlierView {
    EarlierView {
        outcome: e.sync_outcome().into(),
        commit_id: e.commit_id,
        error: e.error,
        finished_at: rfc3339(
            UNIX_EPOCH + Duration::from_secs(u64::try_from(e.finished_at).unwrap_or(0)),
        ),
        resync_id: e.resync_id,
        current: e.current,
        not_current: e.not_current,
        not_applied: e.not_applied,
        pruned: e.pruned,
        left_in_place: e.left_in_place,
    }
}

fn rss_bytes() -> u64 {
    // /proc/self/statm: sizes in pages; the second field is resident.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

async fn stats(State(st): State<ApiState>) -> Json<Stats> {
    let r = st.registry.stats();
    Json(Stats {
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        agent_connections: st.connections.get(),
        open_streams: r.open_streams,
        idle_streams: r.idle_streams,
        connected_agents: r.agents,
        rss_bytes: rss_bytes(),
        remembered_agents: st.memory.remembered().len(),
    })
}

/// The admin API and the webhooks on one listener (when no `webhooks.listen` is configured).
pub fn router(state: ApiState) -> Router {
    admin_router(state.clone()).merge(webhook_router(state))
}

/// The admin API alone: every route needs the admin token. With several replicas a request
/// about an agent held by another one is forwarded there (after the admin check).
pub fn admin_router(state: ApiState) -> Router {
    admin_routes()
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::api_routing::to_holder,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), require_admin))
        // Outside the admin check, so a client over its failure limit is refused before it.
        .layer(middleware::from_fn_with_state(
            HttpGuard {
                guard: Arc::clone(&state.guards.admin),
                credential: crate::limits::bearer_credential,
            },
            guard_http,
        ))
        .with_state(state)
}

/// The admin API as other replicas reach it over the peers listener: they checked the admin
/// token, the signed preamble proves they are replicas; never forwarded again.
pub fn peer_admin_router(state: ApiState) -> Router {
    admin_routes()
        .layer(axum::Extension(crate::api_routing::FromPeer))
        .with_state(state)
}

/// The admin API's routes for kas's own web UI, in process: with the replica routing (a
/// request about an agent held by another replica is served there) and without the admin
/// token, for which the UI's sessions, roles and CSRF checks stand. Never bound to a listener.
pub fn in_process_router(state: ApiState) -> Router {
    admin_routes()
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::api_routing::to_holder,
        ))
        .with_state(state)
}

fn admin_routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/agents", get(list_agents).post(register_agent))
        .route(
            "/api/v1/agents/{id}/tokens",
            get(list_tokens).post(create_token),
        )
        .route("/api/v1/agents/{id}/echo", post(echo))
        .route("/api/v1/agents/{id}/gitops", get(agent_gitops))
        .route(
            "/api/v1/agents/{id}/gitops/unreported",
            get(crate::unreported::agent_unreported),
        )
        .route("/api/v1/agents/{id}/diff", post(crate::preview::diff))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route("/api/v1/agents/{id}/user-tokens", post(create_user_token))
        .route("/api/v1/user-tokens/{id}", delete(revoke_user_token))
        .route("/api/v1/debug/stats", get(stats))
        .merge(crate::operate::routes())
        .route(
            "/api/v1/projects",
            get(list_projects).put(put_project).delete(delete_project),
        )
}

/// The push webhooks alone. They come from Git servers: they carry the project's secret, not
/// the admin token.
pub fn webhook_router(state: ApiState) -> Router {
    Router::new()
        .route("/webhooks/projects/{id}", post(webhook))
        // Read before the secret is checked: bounded in time as well as in size.
        .layer(middleware::map_request(crate::listener::bound_body))
        .layer(middleware::from_fn_with_state(
            HttpGuard {
                guard: Arc::clone(&state.guards.webhooks),
                credential: crate::limits::webhook_credential,
            },
            guard_http,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database down or refusing writes is a dependency outage (503, retried by the CLI),
    /// not a failure of kas (500) and not the request's fault.
    #[test]
    fn a_database_outage_is_unavailable_not_an_internal_error() {
        use tether_store::Error as E;
        let code = |e: E| store_error_code(&e);
        assert_eq!(
            code(E::Database(sqlx::Error::PoolTimedOut)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            code(E::TimedOut(Duration::from_secs(5))),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(E::NotFound("agent 1".into())), StatusCode::NOT_FOUND);
        assert_eq!(code(E::InUse("project 1".into())), StatusCode::CONFLICT);
    }

    #[test]
    fn the_last_deliveries_of_each_project_are_kept_newest_first() {
        let d = Deliveries::default();
        d.record(1, Delivery::Refused);
        for _ in 0..DELIVERIES_KEPT {
            d.record(1, Delivery::Accepted);
        }
        d.record(2, Delivery::Failed);
        let one = d.of(1);
        assert_eq!(one.len(), DELIVERIES_KEPT);
        assert!(
            one.iter().all(|(_, o)| *o == "accepted"),
            "the oldest went first"
        );
        assert_eq!(d.of(2)[0].1, "failed");
        assert!(d.of(3).is_empty());
    }

    /// 20 reads of 5 s each (a database down), 4 at a time: the answer comes at the 6 s
    /// deadline with the 4 read by then, the others unknown (one after another: 100 s).
    #[tokio::test(start_paused = true)]
    async fn slow_reads_run_a_few_at_once_and_stop_at_the_deadline() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let ids: Vec<i64> = (1..=20).collect();
        let start = tokio::time::Instant::now();
        let got = read_each_within(&ids, (4, Duration::from_secs(6)), |id| {
            let (running, most) = (&running, &most);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Some(format!("commit-{id}"))
            }
        })
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(6));
        assert_eq!(most.load(Ordering::SeqCst), 4);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.iter().all(|(id, c)| *c == format!("commit-{id}")));
    }

    #[tokio::test(start_paused = true)]
    async fn quick_reads_are_all_kept_and_a_failed_one_is_unknown() {
        let ids: Vec<i64> = (1..=10).collect();
        let start = tokio::time::Instant::now();
        let got = read_each_within(&ids, (4, Duration::from_secs(6)), |id| async move {
            (id != 3).then(|| id.to_string())
        })
        .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(got.len(), 9);
        assert_eq!(got.get(&3), None);
        assert_eq!(got.get(&10).map(String::as_str), Some("10"));
    }

    #[test]
    fn past_the_cap_the_least_recently_delivered_project_is_forgotten() {
        let d = Deliveries::with_max_projects(3);
        for id in 1..=3 {
            d.record(id, Delivery::Accepted);
        }
        // Project 1 heard from its host again, so 2 is now the least recent.
        d.record(1, Delivery::Refused);
        d.record(4, Delivery::Failed);
        assert_eq!(d.projects(), 3);
        assert!(d.of(2).is_empty());
        assert_eq!(d.of(1).len(), 2);
        assert_eq!(d.of(4).len(), 1);
        d.forget(1);
        assert!(d.of(1).is_empty());
        assert_eq!(d.projects(), 2);
    }
}
