//! Server half of Kubernetes API access: an HTTP(S) listener that serves the Kubernetes API to CI
//! jobs (and, later, users). kas authenticates the caller, authorizes it against the agent's
//! `ci_access`, and sends the request through one of the agent's tunnels; agentk replays it with
//! impersonation. Cluster credentials never leave the cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tether_kubeproxy_agent::{AccessAs, RequestContext, RoutedRequest, sanitize_request_headers};
use tether_kubeproxy_server::{
    CiIdentity, Credential, Denied, ExpiringMap, KubeconfigAgent, OidcVerifier, authorize_ci,
    ci_job_context, ci_kubeconfig, mode_name, strip_path_prefix, user_context,
};
use tether_store::Store;
use tether_tunnel_server::Registry;
use tokio_util::sync::CancellationToken;

use crate::listener::CutConnection;
use crate::live_access::{Caller, LiveGrant, RunsAs};
use crate::outbound::{Io, Outbound};
use crate::revocation::{LiveRequest, LiveUserRequests};
use tether_configuration_server::ConfigStates;

type Body = BoxBody<Bytes, BoxError>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub agent_id: i64,
    pub access_as: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// No agent id: a histogram per agent would make 10,000 agents × buckets series.
    pub access_as: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub agent_id: i64,
    pub access_as: String,
    /// `request` (to the cluster) or `response` (from it).
    pub direction: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The proxy's metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub denials: Family<DenialLabels, Counter>,
    /// Seconds until the response headers came back through the tunnel.
    pub latency: Family<ModeLabels, Histogram, fn() -> Histogram>,
    pub bytes: Family<BytesLabels, Counter>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            denials: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            bytes: Family::default(),
        }
    }
}

impl ProxyMetrics {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "k8s_proxy_requests",
            "Requests routed to agents, and the 5xx kas answered itself when it could not reach one, by agent, identity mode and status code",
            self.requests.clone(),
        );
        reg.register(
            "k8s_proxy_denials",
            "Requests refused before reaching an agent, by reason",
            self.denials.clone(),
        );
        reg.register(
            "k8s_proxy_latency_seconds",
            "Time until the response headers came back from the agent",
            self.latency.clone(),
        );
        reg.register(
            "k8s_proxy_bytes",
            "Body bytes carried through agents, by direction",
            self.bytes.clone(),
        );
    }
}

/// What the proxy needs.
#[derive(Clone)]
pub struct Proxy {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub configs: Arc<ConfigStates>,
    pub verifier: Arc<OidcVerifier>,
    pub tunnel_wait: std::time::Duration,
    pub path_prefix: String,
    pub metrics: ProxyMetrics,
    pub public_url: Option<String>,
    /// `kubernetes_api.ca_file`, followed: a renewed CA goes into the next kubeconfigs.
    pub ca_pem: Option<Arc<crate::followed::Followed<Vec<u8>>>>,
    pub tls: bool,
    /// Agent → configuration project, remembered briefly (see [`AgentProjects`]).
    pub agent_projects: Arc<AgentProjects>,
    /// Live requests per personal access token, ended when the token is revoked.
    pub live_user_requests: Arc<LiveUserRequests>,
    /// Live requests per agent, ended when a new configuration no longer allows them.
    pub live_access: Arc<crate::live_access::LiveAccess>,
    /// Limits on failed authentication, and the sampled refusal log.
    pub guard: Arc<tether_guard::AuthGuard>,
    /// Routing to the replica holding an agent's tunnels (several replicas; `peers:`).
    pub peers: Option<crate::peers::Peers>,
    /// `kas agent diff` for CI jobs and people, with their identity.
    pub previews: crate::preview::Previews,
    /// Live requests per caller and agent, bounded (`kubernetes_api.max_requests_per_caller`).
    pub caller_slots: Arc<crate::caller_slots::CallerSlots>,
    /// Every agent with its configuration in force, for CI kubeconfigs: one read at a time,
    /// the jobs that asked while one ran share the next.
    pub agents_in_force: Arc<crate::fresh::Fresh<Vec<AgentInForce>>>,
}

/// Agent id → (configuration project id, path), remembered for [`AGENT_PROJECT_TTL`]: every
/// proxied request needs it, and two SQLite look-ups were a tenth of kas's CPU per request
/// under load. Only found agents are remembered (a new agent works at once). A deleted agent's
/// entry is dropped when this replica hears of the deletion ([`crate::agent_memory`]); one
/// whose message was lost lasts the TTL at most, after which the agent is refused.
#[derive(Debug)]
pub struct AgentProjects(ExpiringMap<i64, (i64, String)>);

/// How long an agent's project is remembered.
pub const AGENT_PROJECT_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl Default for AgentProjects {
    fn default() -> Self {
        Self(ExpiringMap::new(AGENT_PROJECT_TTL, 16_384))
    }
}

impl AgentProjects {
    /// The agent's configuration project (id, path), from memory or the store; `Ok(None)`
    /// when the store has no such agent (or project), an error when it cannot say — an
    /// outage is not a deletion.
    pub async fn get(
        &self,
        store: &dyn Store,
        agent_id: i64,
    ) -> Result<Option<(i64, String)>, tether_store::Error> {
        let now = SystemTime::now();
        if let Some(hit) = self.0.get(&agent_id, now) {
            return Ok(Some(hit));
        }
        let Some(agent) = store.get_agent(agent_id).await? else {
            return Ok(None);
        };
        let Some(project) = store.get_project(agent.project_id).await? else {
            return Ok(None);
        };
        let found = (project.id, project.path);
        self.0.insert(agent_id, found.clone(), now);
        Ok(Some(found))
    }

    /// Drops a deleted agent's entry.
    pub fn forget(&self, agent_id: i64) {
        self.0.remove(&agent_id);
    }
}

/// An agent and its configuration in force (empty when none is known: it allows nothing).
pub type AgentInForce = (
    tether_store::AgentRow,
    Arc<tether_agent_config::AgentConfig>,
);

/// Path (under the prefix) where a CI job gets a kubeconfig for every agent it may use.
pub const KUBECONFIG_PATH: &str = tether_kas_api::PROXY_KUBECONFIG_PATH;

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("path_prefix", &self.path_prefix)
            .finish_non_exhaustive()
    }
}

/// A Kubernetes `Status` error, so kubectl prints the reason well.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = tether_kubeproxy_agent::status_json(code, reason, message);
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Why a request was refused, kept in the response's extensions: [`Proxy::handle`], which knows
/// the client's address, logs it.
#[derive(Debug, Clone)]
struct Denial(String);

/// Marks a refusal of a valid token that counts as a failed authentication although it is a
/// 403: a token of a trusted issuer for a project outside that issuer's namespaces. Each one
/// costs kas a signature check, so their holders are throttled like holders of bad tokens.
#[derive(Debug, Clone, Copy)]
struct NotItsIssuers;

/// The refusal of a CI token the verifier refused.
fn deny_token(p: &Proxy, e: &tether_kubeproxy_server::AuthError) -> Response<Body> {
    let mut r = deny(p, e.status(), auth_reason(e), &e.to_string());
    if matches!(
        e,
        tether_kubeproxy_server::AuthError::OutsideIssuerNamespaces { .. }
    ) {
        r.extensions_mut().insert(NotItsIssuers);
    }
    r
}

/// The Kubernetes `Status` reason (and denial metric label) of a CI token that was refused.
fn auth_reason(e: &tether_kubeproxy_server::AuthError) -> &'static str {
    match e.status() {
        StatusCode::FORBIDDEN => "Forbidden",
        // The issuer's keys cannot be loaded, or are too old: kas's trouble, not the token's,
        // and counted apart so that an alert can tell it from bad tokens.
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "Unauthorized",
    }
}

fn deny(p: &Proxy, code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    p.metrics
        .denials
        .get_or_create(&DenialLabels {
            reason: reason.to_string(),
        })
        .inc();
    let mut r = status(code, reason, message);
    r.extensions_mut().insert(Denial(message.to_string()));
    r
}

/// A failure of kas itself (5xx: the agent unreachable, the store down, …), kept in the
/// response's extensions: [`Proxy::handle`] logs it at warn and counts it in the requests
/// metric, which the 5xx alert watches — kubectl got it, so operators must see it too. (The
/// agent's and API server's own answers are counted by [`Proxy::record`].)
#[derive(Debug, Clone)]
struct Failure {
    /// The agent asked for; 0 when not known yet, or asked for by a caller not authenticated
    /// yet (an id it made up would be a metric series of its own).
    agent_id: i64,
    /// The identity mode decided; `unknown` before authorization.
    access_as: &'static str,
    message: String,
}

/// Whom a failed request was for, as far as kas knew when it failed.
#[derive(Debug, Clone, Copy)]
struct Subject {
    agent_id: i64,
    access_as: &'static str,
}

impl Subject {
    const UNKNOWN: Subject = Subject {
        agent_id: 0,
        access_as: "unknown",
    };

    fn agent(agent_id: i64) -> Subject {
        Subject {
            agent_id,
            ..Subject::UNKNOWN
        }
    }

    fn routed(routed: &Routed) -> Subject {
        Subject {
            agent_id: routed.agent_id,
            access_as: mode_name(&routed.access_as),
        }
    }
}

/// A 5xx answer kas makes itself, marked for [`Proxy::handle`] to log and count.
fn fail(code: StatusCode, subject: Subject, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::INTERNAL_SERVER_ERROR => "InternalError",
        _ => "ServiceUnavailable",
    };
    let mut r = status(code, reason, message);
    r.extensions_mut().insert(Failure {
        agent_id: subject.agent_id,
        access_as: subject.access_as,
        message: message.to_owned(),
    });
    r
}

/// 503 for a personal access token kas could not check (the store down). Counted under agent 0,
/// as unknown: the caller is not authenticated, and counting it under the agent id its header
/// names would let anyone add a metric series per id while the store is down. The id stays in
/// the message, which is logged.
fn tokens_unreadable(agent_id: i64, e: &tether_store::Error) -> Response<Body> {
    let m = format!("reading personal access tokens (for agent {agent_id}): {e}");
    fail(StatusCode::SERVICE_UNAVAILABLE, Subject::UNKNOWN, &m)
}

/// 503 for an agent whose record kas could not read (the store down): a request kas cannot
/// decide on is not refused — a 403 would tell the job the agent is gone, and count as a
/// denial. Counted under agent 0, as [`tokens_unreadable`]: whether the agent exists is what
/// kas could not tell, so the id the caller named is only in the (logged) message.
fn agents_unreadable(agent_id: i64, e: &tether_store::Error) -> Response<Body> {
    let m = format!("reading agent {agent_id}'s record: {e}");
    fail(StatusCode::SERVICE_UNAVAILABLE, Subject::UNKNOWN, &m)
}

/// Logs (warn) and counts in the requests metric a failure of kas itself, if `resp` is one.
fn failed(metrics: &ProxyMetrics, resp: &Response<Body>, address: Option<std::net::IpAddr>) {
    let Some(f) = resp.extensions().get::<Failure>() else {
        return;
    };
    let code = resp.status().as_u16();
    metrics
        .requests
        .get_or_create(&RequestLabels {
            agent_id: f.agent_id,
            access_as: f.access_as.to_owned(),
            code,
        })
        .inc();
    tracing::warn!(
        code,
        agent_id = f.agent_id,
        client_address = %address.map_or_else(|| "unknown".into(), |a| a.to_string()),
        reason = %f.message,
        "Kubernetes API request failed in kas"
    );
}

/// Who the caller is and how its requests run, once authorized.
struct Routed {
    agent_id: i64,
    access_as: AccessAs,
    context: RequestContext,
    /// The personal access token's id, for requests made with one.
    user_token_id: Option<i64>,
    /// Who, for re-authorizing a long request when the configuration changes (`None`: the
    /// web UI's short reads).
    caller: Option<Arc<Caller>>,
    /// When the credential stops being accepted (a CI job's ID token's `exp`, a personal
    /// access token's expiry): a request still running then ends, at that moment.
    valid_until: Option<SystemTime>,
}

/// An authorized request on its way to the agent.
struct Forward {
    routed: Routed,
    /// The path under the proxy's prefix.
    path: String,
    headers: http::HeaderMap,
    live: Arc<Tracked>,
    revoked: CancellationToken,
}

/// What keeps a live request tracked — by its personal access token, if any, and by the
/// configuration that allowed it — until it ends; `end` fires when either ends it.
struct Tracked {
    _user: Option<LiveRequest>,
    _grant: Option<LiveGrant>,
    _slot: Option<crate::caller_slots::CallerSlot>,
    /// Stops the expiry timer and the connection cut, if any, when the request ends first.
    _expiry: Option<tokio_util::sync::DropGuard>,
    end: CancellationToken,
}

/// How long a request whose access ended may take to end by itself (hyper failing its body)
/// before its connection is cut: only a client that stopped reading takes longer.
const CUT_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a request's end at its token's expiry sleeps at most before reading the wall
/// clock again.
const EXPIRY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Returns once the wall clock (`now`) reaches `until`. Timers run on the monotonic clock, so
/// one sleep of `until - now` computed at the start would miss a step of the wall clock (NTP
/// correcting a kas that lagged, a VM resumed): kas would refuse the token at once while its
/// open watch or exec ran on to the old deadline, hours later (E14). Sleeping at most
/// [`EXPIRY_RECHECK`] at a time ends it within a second of the step.
async fn wall_clock_reaches(until: SystemTime, now: impl Fn() -> SystemTime) {
    loop {
        let Ok(left) = until.duration_since(now()) else {
            return;
        };
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(EXPIRY_RECHECK)).await;
    }
}

/// Ends the request (`end`) at `until`, if any, and, once it must end for whatever reason,
/// cuts its connection if it has not ended `CUT_AFTER` later — unless the request ended first
/// (the guard dropped). `None` when there is nothing to watch.
fn watch_end(
    until: Option<SystemTime>,
    end: &CancellationToken,
    cut: Option<CutConnection>,
) -> Option<tokio_util::sync::DropGuard> {
    if until.is_none() && cut.is_none() {
        return None;
    }
    let done = CancellationToken::new();
    let (end, stopped) = (end.clone(), done.clone());
    tokio::spawn(async move {
        let expiry = async {
            match until {
                Some(until) => wall_clock_reaches(until, SystemTime::now).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = expiry => {
                tracing::info!("A request outlived its token (CI job or personal access token); ended");
                end.cancel();
            }
            () = end.cancelled() => {}
            () = stopped.cancelled() => return,
        }
        let Some(cut) = cut else { return };
        tokio::select! {
            () = tokio::time::sleep(CUT_AFTER) => {
                tracing::info!("A request whose access ended was not read by its client; its connection is cut");
                cut.cut();
            }
            () = stopped.cancelled() => {}
        }
    });
    Some(done.drop_guard())
}

/// Why an agent's configuration in force is not known (pure). With several replicas the agent
/// may be connected to another one that has not stored it yet: "has not connected" would be
/// untrue then.
fn config_unknown(agent_id: i64, several: bool) -> String {
    if several {
        format!(
            "agent {agent_id} has no configuration in force known to the kas replicas yet: it \
             has not connected since it was registered, or the replica it just connected to \
             has not stored its configuration yet; retry in a few seconds"
        )
    } else {
        // Connected with every configuration refused (an agentk newer than the file) reads the
        // same: "has not connected" alone sent people looking at the network.
        format!(
            "agent {agent_id} has no configuration in force: it has not connected since kas \
             started, or it refused the configuration kas sent (kas agent status says why)"
        )
    }
}

/// The owner of a personal access token, and the token.
struct TokenUser {
    token_id: i64,
    /// When the token expires: its requests end then.
    expires: SystemTime,
    identity: tether_kubeproxy_server::UserIdentity,
}

impl Proxy {
    /// Where agents' configurations in force are read: memory for agents held here, the
    /// store for agents another replica holds (it stores what is in force; this replica's
    /// memory of them dates from its start).
    pub fn in_force(&self) -> crate::config_in_force::InForce<'_> {
        crate::config_in_force::InForce {
            configs: &self.configs,
            store: self.store.as_ref(),
            registry: &self.registry,
            several: self.peers.is_some(),
        }
    }

    /// The agent's configuration in force, waiting for it as long as for a tunnel. Unknown
    /// after that: 503, never an authorization decision against an empty configuration.
    async fn agent_config(
        &self,
        agent_id: i64,
    ) -> Result<Arc<tether_agent_config::AgentConfig>, Response<Body>> {
        self.in_force()
            .wait(agent_id, self.tunnel_wait)
            .await
            .ok_or_else(|| {
                fail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Subject::agent(agent_id),
                    &config_unknown(agent_id, self.peers.is_some()),
                )
            })
    }

    async fn authorize(&self, req: &Request<Incoming>) -> Result<Routed, Response<Body>> {
        let cred = Credential::from_headers(req.headers())
            .map_err(|e| deny(self, e.status(), "Unauthorized", &e.to_string()))?;
        match cred {
            Credential::CiJob { agent_id, jwt } => self.authorize_ci_job(agent_id, &jwt).await,
            Credential::Personal { agent_id, token } => {
                self.authorize_personal(agent_id, &token).await
            }
        }
    }

    /// The refusal of a request to `agent_id` that its configuration does not allow.
    fn forbidden(&self, agent_id: i64, d: &Denied) -> Response<Body> {
        deny(
            self,
            d.status(),
            "Forbidden",
            &format!("agent {agent_id}: {d}"),
        )
    }

    /// The agent's configuration project (id, path), `None` when the store has no such agent
    /// (never registered, or deleted); 503 when the store cannot be read (see
    /// [`agents_unreadable`]).
    async fn find_agent_project(
        &self,
        agent_id: i64,
    ) -> Result<Option<(i64, String)>, Response<Body>> {
        let found = self.agent_projects.get(self.store.as_ref(), agent_id).await;
        found.map_err(|e| agents_unreadable(agent_id, &e))
    }

    /// [`Proxy::find_agent_project`], with 403 "agent N is not available" for no such agent.
    async fn agent_project(&self, agent_id: i64) -> Result<(i64, String), Response<Body>> {
        self.find_agent_project(agent_id).await?.ok_or_else(|| {
            let m = format!("agent {agent_id} is not available");
            deny(self, StatusCode::FORBIDDEN, "Forbidden", &m)
        })
    }

    /// The refusal of a CI job's request to an agent that does not exist or does not authorize
    /// the job's project at all. Both read the same to the job: any project trusted by an
    /// issuer could otherwise list which agent ids exist and, from "only projects under
    /// \"acme\"", whose they are. kas's log says which it was (`why`).
    fn not_available_to(&self, agent_id: i64, job: &CiIdentity, why: &str) -> Response<Body> {
        let told = format!(
            "agent {agent_id} is not available to project {:?}: there is no such agent, or its \
             ci_access lists neither the project nor a group holding it",
            job.project_path
        );
        let mut r = deny(self, StatusCode::FORBIDDEN, "Forbidden", &told);
        r.extensions_mut()
            .insert(Denial(format!("agent {agent_id}: {why}")));
        r
    }

    /// A CI job's ID token, checked against the agent's `ci_access`.
    async fn authorize_ci_job(&self, agent_id: i64, jwt: &str) -> Result<Routed, Response<Body>> {
        let (job, valid_until) = self
            .verifier
            .verify_until(jwt, SystemTime::now())
            .await
            .map_err(|e| deny_token(self, &e))?;
        let Some((project_id, project_path)) = self.find_agent_project(agent_id).await? else {
            return Err(self.not_available_to(agent_id, &job, "no such agent"));
        };
        let config = self.agent_config(agent_id).await?;
        let ok = authorize_ci(&config.ci_access, &project_path, &job).map_err(|d| match d {
            Denied::NotAuthorized { .. } | Denied::OutsideHierarchy { .. } => {
                self.not_available_to(agent_id, &job, &d.to_string())
            }
            // The job's project is the agent's configuration project or one its ci_access
            // lists: telling it why hides nothing it does not know.
            _ => self.forbidden(agent_id, &d),
        })?;
        let context = ci_job_context(agent_id, project_id, &job);
        Ok(Routed {
            agent_id,
            access_as: AccessAs::from(&ok.access_as),
            context,
            user_token_id: None,
            caller: Some(Arc::new(Caller::CiJob {
                config_project: project_path,
                job,
            })),
            valid_until: Some(valid_until),
        })
    }

    /// A personal access token, checked against the agent's `user_access`.
    async fn authorize_personal(
        &self,
        agent_id: i64,
        token: &str,
    ) -> Result<Routed, Response<Body>> {
        let user = self.user_of(agent_id, token).await?;
        // Checked before waiting for the configuration: it does not need one.
        if user.identity.token_agent_id != agent_id {
            let d = Denied::WrongAgent {
                agent_id,
                token_agent_id: user.identity.token_agent_id,
            };
            return Err(self.forbidden(agent_id, &d));
        }
        let identity = user.identity.clone();
        let mut routed = self
            .authorize_identity(agent_id, user.identity, Some(user.token_id))
            .await?;
        routed.caller = Some(Arc::new(Caller::Person(identity)));
        // A watch or an exec ends at the token's expiry exactly, not at the next re-check.
        routed.valid_until = Some(user.expires);
        Ok(routed)
    }

    /// A person's identity checked against the agent's `user_access`: the owner of a personal
    /// access token (`token_id`), or a person logged in to the web UI.
    async fn authorize_identity(
        &self,
        agent_id: i64,
        identity: tether_kubeproxy_server::UserIdentity,
        token_id: Option<i64>,
    ) -> Result<Routed, Response<Body>> {
        // A deleted agent is refused here, whatever this replica still remembers of its
        // `user_access` (a web UI session has no token whose deletion would stop it).
        let (project_id, _) = self.agent_project(agent_id).await?;
        let config = self.agent_config(agent_id).await?;
        let ok = tether_kubeproxy_server::authorize_user(
            config.user_access.as_ref(),
            agent_id,
            &identity,
        )
        .map_err(|d| self.forbidden(agent_id, &d))?;
        let project_id = Some(project_id);
        Ok(Routed {
            agent_id,
            access_as: AccessAs::from(&ok.access_as),
            user_token_id: token_id,
            context: user_context(agent_id, project_id, identity.username, &ok),
            caller: None,
            // A web UI person's session has no expiry here; a personal access token's caller
            // sets its own.
            valid_until: None,
        })
    }

    /// A read-only GET of `path` (a Kubernetes API path and query) through the agent's tunnel
    /// as `person`, authorized by the agent's `user_access` exactly as a personal access
    /// token's owner: the web UI's cluster pages. The answer's status and body (bounded).
    pub async fn get_as_person(
        &self,
        agent_id: i64,
        person: tether_kubeproxy_server::UserIdentity,
        path: &str,
    ) -> (StatusCode, Bytes) {
        match self.try_get_as_person(agent_id, person, path).await {
            Ok(r) | Err(r) => r,
        }
    }

    async fn try_get_as_person(
        &self,
        agent_id: i64,
        person: tether_kubeproxy_server::UserIdentity,
        path: &str,
    ) -> Result<(StatusCode, Bytes), (StatusCode, Bytes)> {
        const MAX_BODY: usize = 8 * 1024 * 1024;
        let routed = match self.authorize_identity(agent_id, person, None).await {
            Ok(r) => r,
            Err(refusal) => return Err(self.collected(refusal).await),
        };
        let unavailable =
            |e: &dyn std::fmt::Display| (StatusCode::BAD_GATEWAY, Bytes::from(e.to_string()));
        let outbound = match self
            .open_tunnel::<Full<Bytes>>(&routed, CancellationToken::new())
            .await
        {
            Ok(s) => s,
            Err(refusal) => return Err(self.collected(refusal).await),
        };
        let req = Request::get(path)
            .header(header::HOST, "kubernetes")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| unavailable(&e))?;
        let mode = mode_name(&routed.access_as);
        let started = std::time::Instant::now();
        let resp = match outbound.send(req, false).await {
            Ok(r) => r,
            Err(e) => {
                let m = format!("the agent did not answer: {e}");
                let failure = fail(StatusCode::BAD_GATEWAY, Subject::routed(&routed), &m);
                return Err(self.collected(failure).await);
            }
        };
        self.record(&routed, mode, started, resp.status());
        let code = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unavailable(&e))?
            .to_bytes();
        Ok((code, body))
    }

    /// The owner of a personal access token, if it is known, unrevoked and unexpired.
    async fn user_of(&self, agent_id: i64, token: &str) -> Result<TokenUser, Response<Body>> {
        let record = self
            .live_user_requests
            .validated
            .authenticate(self.store.as_ref(), token)
            .await
            .map_err(|e| tokens_unreadable(agent_id, &e))?
            .ok_or_else(|| {
                deny(
                    self,
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "unknown, revoked or expired personal access token",
                )
            })?;
        let memberships = tether_kubeproxy_server::memberships_from_json(&record.memberships)
            .unwrap_or_else(|e| {
                // Written by kas itself, so only a damaged database gets here: the user then
                // has no memberships, which grants nothing.
                tracing::error!(token_id = record.id, error = %e, "Undecodable stored memberships");
                Vec::new()
            });
        Ok(TokenUser {
            token_id: record.id,
            expires: crate::validated_tokens::expiry(&record),
            identity: tether_kubeproxy_server::UserIdentity {
                username: record.username.clone(),
                token_agent_id: record.agent_id,
                memberships,
            },
        })
    }

    /// Serves one request: refused early (429) while the address or credential is
    /// over its failure limit, so a flood costs no JWT check or store look-up; 401s count as
    /// failures and are logged sampled; other refusals (403, ...) come from authenticated callers
    /// and are logged each, with the address.
    async fn handle(self, req: Request<Incoming>) -> Result<Response<Body>, hyper::Error> {
        // The listener puts the client's address into every request.
        let address = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let credential = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| tether_guard::Fingerprint::of(v.as_bytes()));
        if let Err(l) = self.guard.admit(address, credential) {
            self.guard.hold().await;
            let mut r = status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                &l.message(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(l.retry_after_secs()));
            return Ok(r);
        }
        let guard = Arc::clone(&self.guard);
        let metrics = self.metrics.clone();
        let resp = self.route(req).await?;
        failed(&metrics, &resp, address);
        if let Some(Denial(message)) = resp.extensions().get::<Denial>() {
            if resp.extensions().get::<NotItsIssuers>().is_some() {
                guard.refused(address, credential, "issuer_not_allowed", message);
            } else if resp.status() == StatusCode::UNAUTHORIZED {
                let reason = if credential.is_some() {
                    "invalid_credentials"
                } else {
                    "missing_credentials"
                };
                guard.refused(address, credential, reason, message);
            } else {
                tracing::info!(
                    code = resp.status().as_u16(),
                    client_address = %address.map_or_else(|| "unknown".into(), |a| a.to_string()),
                    message = %message,
                    "Kubernetes API request refused"
                );
            }
        }
        Ok(resp)
    }

    async fn route(self, req: Request<Incoming>) -> Result<Response<Body>, hyper::Error> {
        let Some(rest) = strip_path_prefix(&self.path_prefix, req.uri().path()).map(str::to_owned)
        else {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "not under the proxy's path prefix",
            ));
        };
        if rest == KUBECONFIG_PATH {
            return Ok(self.kubeconfig(&req).await);
        }
        let routed = match self.authorize(&req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        // The caller's own credentials and any attempt to pick an identity stop here: the
        // request must reach the agent with nothing but what kas decided.
        let headers = match sanitize_request_headers(req.headers()) {
            Ok(h) => h,
            Err(e) => return Ok(deny(&self, e.status(), e.reason(), &e.to_string())),
        };
        // Tracked until the response and any upgrade end, so revoking the credential ends it.
        let cut = req.extensions().get::<CutConnection>().cloned();
        let (live, revoked) = match self.track(&routed, cut) {
            Ok(l) => l,
            Err(resp) => return Ok(resp),
        };
        if rest == tether_kas_api::PROXY_DIFF_PATH {
            let _live = live;
            return Ok(self.preview(req, routed, revoked).await);
        }
        let outbound = match self.open_tunnel(&routed, revoked.clone()).await {
            Ok(o) => o,
            Err(resp) => return Ok(resp),
        };
        let forward = Forward {
            routed,
            path: rest,
            headers,
            live,
            revoked,
        };
        Ok(self.forward(req, forward, outbound).await)
    }

    /// Sends the request through the tunnel and streams the answer back, counting bytes,
    /// latency and outcome; an upgrade (exec, port-forward) is spliced through until it ends
    /// or the credential is revoked.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        f: Forward,
        outbound: Outbound<Body>,
    ) -> Response<Body> {
        let mode = mode_name(&f.routed.access_as);
        let client_upgrade = f
            .headers
            .contains_key(header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let query = req.uri().query().map(str::to_owned);
        let out = match self.outgoing(req, &f, mode) {
            Ok(r) => r,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let started = std::time::Instant::now();
        let upgrade = client_upgrade.is_some();
        let mut resp = match outbound.send(out, upgrade).await {
            Ok(r) => r,
            Err(e) => {
                let m = format!("the agent did not answer: {e}");
                return fail(StatusCode::BAD_GATEWAY, Subject::routed(&f.routed), &m);
            }
        };
        self.record(&f.routed, mode, started, resp.status());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let agent_upgrade = hyper::upgrade::on(&mut resp);
            let (revoked, live) = (f.revoked.clone(), f.live.clone());
            tokio::spawn(async move {
                let _live = live;
                if let Ok((c, a)) = tokio::try_join!(client_upgrade, agent_upgrade) {
                    let (mut c, mut a) = (TokioIo::new(c), TokioIo::new(a));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut a) => {}
                        () = revoked.cancelled() => {}
                    }
                }
            });
        }
        let down = self.bytes(&f.routed, mode, "response");
        let (parts, body) = resp.into_parts();
        let json_watch = is_json_watch(query.as_deref(), parts.headers.get(header::CONTENT_TYPE));
        let body = body
            .map_frame(move |frame| {
                if let Some(d) = frame.data_ref() {
                    down.inc_by(d.len() as u64);
                }
                frame
            })
            .map_err(BoxError::from);
        let registry = Arc::clone(&self.registry);
        let body = Revocable::new(body, f.live, json_watch, registry).boxed();
        Response::from_parts(parts, body)
    }

    /// The request as agentk gets it: HTTP/1.1, the path under the prefix, the sanitized
    /// headers, and a body whose bytes are counted.
    fn outgoing(
        &self,
        req: Request<Incoming>,
        f: &Forward,
        mode: &str,
    ) -> Result<Request<Body>, http::Error> {
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let (parts, body) = req.into_parts();
        let mut out = Request::builder()
            .method(parts.method)
            .uri(format!("{}{query}", f.path))
            .version(http::Version::HTTP_11);
        if let Some(h) = out.headers_mut() {
            *h = f.headers.clone();
            h.insert(header::HOST, HeaderValue::from_static("kubernetes"));
        }
        let up = self.bytes(&f.routed, mode, "request");
        let body = body
            .map_frame(move |frame| {
                if let Some(d) = frame.data_ref() {
                    up.inc_by(d.len() as u64);
                }
                frame
            })
            .map_err(BoxError::from)
            .boxed();
        out.body(body)
    }

    /// The byte counter of one direction of the agent's traffic in this mode.
    fn bytes(&self, routed: &Routed, mode: &str, direction: &str) -> Counter {
        self.metrics
            .bytes
            .get_or_create(&BytesLabels {
                agent_id: routed.agent_id,
                access_as: mode.to_string(),
                direction: direction.to_string(),
            })
            .clone()
    }

    /// Latency and outcome of a forwarded request.
    fn record(&self, routed: &Routed, mode: &str, started: std::time::Instant, code: StatusCode) {
        self.metrics
            .latency
            .get_or_create(&ModeLabels {
                access_as: mode.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                agent_id: routed.agent_id,
                access_as: mode.to_string(),
                code: code.as_u16(),
            })
            .inc();
    }

    /// Starts tracking a request: by its personal access token (revoking the token ends it;
    /// CI job tokens cannot be revoked by kas) and by the configuration that allowed it (a
    /// configuration that no longer does ends it). The tracking handle, to keep until the
    /// request ends, and the token that fires when the request must end.
    /// The caller's slot for this request (none for a web UI person: read-only GETs), or the
    /// 429 of a caller holding all of theirs.
    // The error is the refusal response itself, built once on a rare path: boxing buys nothing.
    #[allow(clippy::result_large_err)]
    fn caller_slot(
        &self,
        routed: &Routed,
    ) -> Result<Option<crate::caller_slots::CallerSlot>, Response<Body>> {
        use crate::caller_slots::CallerKey;
        let key = match routed.caller.as_deref() {
            Some(Caller::Person(identity)) => CallerKey::Person(identity.username.clone()),
            Some(Caller::CiJob { job, .. }) => CallerKey::CiJob {
                issuer: job.issuer.clone(),
                job_id: job.job_id,
                project: job.project_path.to_lowercase(),
            },
            None => return Ok(None),
        };
        let over = match self.caller_slots.take(routed.agent_id, key.clone()) {
            Ok(slot) => return Ok(Some(slot)),
            Err(over) => over,
        };
        Err(self.over_cap(routed, &key, over))
    }

    /// The 429 of a caller over a cap: with `Retry-After` (client-go retries only such 429s),
    /// counted by agent like every answer, logged once per cap and minute naming the agent and
    /// the caller (a caller retrying in a loop was thousands of lines a second, none naming
    /// either).
    fn over_cap(
        &self,
        routed: &Routed,
        key: &crate::caller_slots::CallerKey,
        over: crate::caller_slots::Over,
    ) -> Response<Body> {
        use crate::caller_slots::Over;
        let (agent, n) = (routed.agent_id, over.max());
        let m = match over {
            Over::Caller(_) => format!(
                "this caller already has {n} requests open through agent {agent} \
                 (kubernetes_api.max_requests_per_caller): end some first"
            ),
            Over::Project(_) => format!(
                "the CI jobs of this project already have {n} requests open through agent \
                 {agent} (kubernetes_api.max_requests_per_project): end some first"
            ),
            Over::People(_) => format!(
                "the people using agent {agent} with personal access tokens already have {n} \
                 requests open through it together (kubernetes_api.max_requests_per_project, \
                 which they share as one project does): end some first"
            ),
        };
        if let Some(unlogged) = self.caller_slots.log_refusal(over) {
            tracing::info!(
                agent_id = agent,
                caller = %key,
                cap = over.name(),
                refused_without_a_line = unlogged,
                "{m}"
            );
        }
        let mut r = deny(self, StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", &m);
        // Logged above, sampled; not once per request as other refusals.
        r.extensions_mut().remove::<Denial>();
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        let mode = mode_name(&routed.access_as);
        self.record(routed, mode, std::time::Instant::now(), r.status());
        r
    }

    // The error is the refusal response itself, built once on a rare path: boxing buys nothing.
    #[allow(clippy::result_large_err)]
    fn track(
        &self,
        routed: &Routed,
        cut: Option<CutConnection>,
    ) -> Result<(Arc<Tracked>, CancellationToken), Response<Body>> {
        let slot = self.caller_slot(routed)?;
        let (user, end) = match routed.user_token_id {
            None => (None, CancellationToken::new()),
            Some(token_id) => match self.live_user_requests.track(token_id) {
                Some(live) => {
                    let end = live.cancellation();
                    (Some(live), end)
                }
                // Revoked between authentication and now.
                None => {
                    return Err(deny(
                        self,
                        StatusCode::UNAUTHORIZED,
                        "Unauthorized",
                        "unknown, revoked or expired personal access token",
                    ));
                }
            },
        };
        let grant = routed.caller.as_ref().map(|caller| {
            let runs_as = RunsAs {
                access_as: routed.access_as.clone(),
                context: routed.context.clone(),
            };
            self.live_access
                .track(routed.agent_id, Arc::clone(caller), runs_as, end.clone())
        });
        let tracked = Tracked {
            _user: user,
            _grant: grant,
            _slot: slot,
            _expiry: watch_end(routed.valid_until, &end, cut),
            end: end.clone(),
        };
        Ok((Arc::new(tracked), end))
    }

    /// How requests reach agents: their tunnels here, or the replica holding them.
    fn reach(&self) -> crate::agent_kube::Reach {
        crate::agent_kube::Reach {
            registry: Arc::clone(&self.registry),
            peers: self.peers.clone(),
            wait: self.tunnel_wait,
        }
    }

    /// An HTTP/1.1 connection to agentk's `kubernetes_api` service through one of the agent's
    /// tunnels, carrying what kas decided about the request. The connection (and so the
    /// tunnel stream, and agentk's request to the API server) is dropped when `revoked` fires.
    async fn open_tunnel<B>(
        &self,
        routed: &Routed,
        revoked: CancellationToken,
    ) -> Result<Outbound<B>, Response<Body>>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let subject = Subject::routed(routed);
        // An empty value here once made agentk fall back to the agent's rights; now both
        // sides use one contract, and an encoding failure stops the request.
        let meta = RoutedRequest {
            access_as: routed.access_as.clone(),
            context: routed.context.clone(),
        }
        .encode()
        .map_err(|e| {
            let m = format!("encoding the request for the agent: {e}");
            fail(StatusCode::INTERNAL_SERVER_ERROR, subject, &m)
        })?;
        let conn = self
            .reach()
            .open(routed.agent_id, Arc::new(meta))
            .await
            .map_err(|e| fail(e.status(), subject, &e.to_string()))?;
        http_over(conn, revoked, subject).await
    }
}

impl Proxy {
    /// A refusal's status and body (a Kubernetes `Status` naming why), a failure of kas
    /// logged and counted as [`Proxy::handle`] does.
    async fn collected(&self, r: Response<Body>) -> (StatusCode, Bytes) {
        failed(&self.metrics, &r, None);
        let code = r.status();
        let body = r.into_body().collect().await.map(|b| b.to_bytes());
        (code, body.unwrap_or_default())
    }
}

/// An HTTP/1.1 client connection over `io` (a tunnel stream here, or a connection to the
/// replica holding the agent's tunnels), dropped when `revoked` fires.
async fn http_over<B>(
    io: Box<dyn Io>,
    revoked: CancellationToken,
    subject: Subject,
) -> Result<Outbound<B>, Response<Body>>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Outbound::handshake(io, revoked).await.map_err(|e| {
        let m = format!("no HTTP connection to the agent: {e}");
        fail(StatusCode::BAD_GATEWAY, subject, &m)
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body that fails as soon as its request must end (its credential revoked or
/// expired, or the configuration no longer allowing it): hyper then closes the client's
/// connection, which ends a watch or a log follow mid-stream. A JSON watch between two events
/// ends instead with a watch `ERROR` event carrying a `Status` (as the API server ends one),
/// also when the agent's side of it fails: kubectl and client-go then say why, where a cut
/// stream ended `kubectl get -w` with exit 0 and nothing said. It holds the request's
/// tracking handle, so tracking ends with the body.
struct Revocable<B> {
    inner: B,
    revoked: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    _live: Arc<Tracked>,
    /// Tells whether kas is stopping when the agent's side fails: what the client is told.
    registry: Arc<Registry>,
    /// A JSON watch (events one per line) and whether the bytes so far end an event.
    watch: Option<WatchEnd>,
    /// The closing event was sent: the body is over.
    ended: bool,
}

/// Where a JSON watch's stream stands.
#[derive(Debug, Clone, Copy)]
struct WatchEnd {
    between_events: bool,
}

impl<B> Revocable<B> {
    fn new(inner: B, live: Arc<Tracked>, json_watch: bool, registry: Arc<Registry>) -> Self {
        Self {
            inner,
            revoked: Box::pin(live.end.clone().cancelled_owned()),
            _live: live,
            registry,
            watch: json_watch.then_some(WatchEnd {
                between_events: true,
            }),
            ended: false,
        }
    }

    /// The closing `ERROR` event, if the stream is a JSON watch between two events.
    fn closing_event(&mut self, code: StatusCode, reason: &str, message: &str) -> Option<Bytes> {
        let at_boundary = self.watch.is_some_and(|w| w.between_events);
        if !at_boundary {
            return None;
        }
        self.ended = true;
        Some(watch_error_event(code, reason, message))
    }
}

/// Whether a request and its answer are a JSON watch (pure): `watch=true` (or `1`) asked for,
/// answered as JSON (a protobuf watch's frames cannot take a JSON event).
fn is_json_watch(query: Option<&str>, content_type: Option<&http::HeaderValue>) -> bool {
    let asked = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    });
    let json = content_type
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    asked && json
}

/// A watch `ERROR` event with a `Status`, one line, as the API server writes it (pure).
fn watch_error_event(code: StatusCode, reason: &str, message: &str) -> Bytes {
    let status = tether_kubeproxy_agent::status_json(code, reason, message);
    Bytes::from(format!("{{\"type\":\"ERROR\",\"object\":{status}}}\n"))
}

/// What a watch's client is told when the agent's side of it fails (pure): why, as far as kas
/// knows, and what to do — it said "the watch through the agent's tunnel failed" whatever
/// ended it, a kas rollout included.
fn cut_watch_message(kas_stopping: bool, e: &BoxError) -> String {
    let causes = tether_transport::with_causes(e.as_ref());
    if kas_stopping {
        "kas is shutting down (a rollout or a restart): watch again, another replica or this one once restarted answers".to_owned()
    } else if causes.contains(tether_protocol::CUT_SHORT) {
        // agentk said so: the API server's side broke, agentk and its tunnel are fine (it was
        // told as agentk stopping, sending the operator to the wrong component: E12).
        "the Kubernetes API server ended the watch under the agent (its connection from agentk broke: an API server restart or outage); the agent and its tunnel are fine: watch again".to_owned()
    } else {
        format!(
            "the agent's side of the watch ended ({causes}): agentk restarted or stopped, or its connection to kas was lost; watch again once the agent is connected"
        )
    }
}

/// What a watch's client is told when its access ends.
const ACCESS_ENDED: &str = "access ended: the credential was revoked or expired, or the agent's configuration no longer allows it";

impl<B> hyper::body::Body for Revocable<B>
where
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.revoked.as_mut().poll(cx).is_ready() {
            let event = self.closing_event(StatusCode::UNAUTHORIZED, "Unauthorized", ACCESS_ENDED);
            return Poll::Ready(Some(match event {
                Some(e) => Ok(hyper::body::Frame::data(e)),
                None => Err(ACCESS_ENDED.into()),
            }));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(w), Some(d)) = (self.watch.as_mut(), frame.data_ref())
                    && let Some(last) = d.last()
                {
                    w.between_events = *last == b'\n';
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let message = cut_watch_message(self.registry.is_shutting_down(), &e);
                let event = self.closing_event(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &message,
                );
                Poll::Ready(Some(match event {
                    Some(ev) => Ok(hyper::body::Frame::data(ev)),
                    None => Err(e),
                }))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Largest `kas agent diff` request body (a ref and a project path).
const DIFF_REQUEST_LIMIT: usize = 64 * 1024;

impl Proxy {
    /// `kas agent diff` of a CI job or a person (already authorized for the agent): previewed
    /// through the tunnel with the identity kas decided for them, as their kubectl would be.
    /// A revoked personal access token ends it (`revoked`).
    async fn preview(
        &self,
        req: Request<Incoming>,
        routed: Routed,
        revoked: CancellationToken,
    ) -> Response<Body> {
        if req.method() != http::Method::POST {
            let m = "POST a diff request";
            return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", m);
        }
        let body = http_body_util::Limited::new(req.into_body(), DIFF_REQUEST_LIMIT);
        let diff_req = match body.collect().await.map(|b| b.to_bytes()) {
            Ok(bytes) => serde_json::from_slice::<tether_kas_api::DiffRequest>(&bytes)
                .map_err(|e| format!("the diff request: {e}")),
            Err(e) => Err(format!("reading the diff request: {e}")),
        };
        let diff_req = match diff_req {
            Ok(r) => r,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let subject = Subject::routed(&routed);
        let caller = RoutedRequest {
            access_as: routed.access_as,
            context: routed.context,
        };
        let previewed = tokio::select! {
            r = self.previews.diff(routed.agent_id, caller, &diff_req) => r,
            () = revoked.cancelled() => {
                let m = "the credential was revoked";
                return status(StatusCode::UNAUTHORIZED, "Unauthorized", m);
            }
        };
        let (code, body, failure) = match previewed {
            Ok(view) => (StatusCode::OK, serde_json::to_vec(&view), None),
            Err(r) => (
                r.code,
                serde_json::to_vec(&serde_json::json!({"error": r.message})),
                r.code.is_server_error().then(|| Failure {
                    agent_id: subject.agent_id,
                    access_as: subject.access_as,
                    message: format!("previewing a diff: {}", r.message),
                }),
            ),
        };
        let body = body.unwrap_or_default();
        let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
        *r.status_mut() = code;
        if let Some(f) = failure {
            r.extensions_mut().insert(f);
        }
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    /// A kubeconfig with one context per agent the CI job (plain `Bearer <ID token>`) may use,
    /// named `<config project path>:<agent name>`, namespace = the entry's `default_namespace`.
    async fn kubeconfig(&self, req: &Request<Incoming>) -> Response<Body> {
        let Some(jwt) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return deny(
                self,
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a CI job ID token is required",
            );
        };
        let job = match self.verifier.verify(jwt.trim(), SystemTime::now()).await {
            Ok(j) => j,
            Err(e) => return deny_token(self, &e),
        };
        let agents = self.agents_in_force.get(|| self.read_agents_in_force());
        let agents = match agents.await {
            Ok(a) => a,
            Err(e) => {
                let m = format!("reading the agents and their configurations: {e}");
                return fail(StatusCode::SERVICE_UNAVAILABLE, Subject::UNKNOWN, &m);
            }
        };
        let server = self.public_url.clone().unwrap_or_else(|| {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            let scheme = if self.tls { "https" } else { "http" };
            format!(
                "{scheme}://{host}{}",
                self.path_prefix.trim_end_matches('/')
            )
        });
        let body = match self.ci_kubeconfig(&server, jwt.trim(), &job, agents.as_slice()) {
            Ok(Some(body)) => body,
            Ok(None) => {
                return deny(
                    self,
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    "this job may use no agent",
                );
            }
            Err(e) => {
                let m = format!("building the job's kubeconfig: {e}");
                return fail(StatusCode::INTERNAL_SERVER_ERROR, Subject::UNKNOWN, &m);
            }
        };
        let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    /// Every agent with its configuration in force (as fresh as the request path's: a
    /// `ci_access` changed while another replica holds the agent counts at once), read anew:
    /// callers go through `agents_in_force`.
    async fn read_agents_in_force(&self) -> Result<Vec<AgentInForce>, tether_store::Error> {
        let agents = self.store.list_agents().await?;
        let ids: Vec<i64> = agents.iter().map(|a| a.id).collect();
        let mut configs = self.in_force().all(&ids).await?;
        let with_config = agents.into_iter().map(|a| {
            let config = configs.remove(&a.id).unwrap_or_default();
            (a, config)
        });
        Ok(with_config.collect())
    }

    /// The kubeconfig (JSON) with a context for each of `agents` the job may use; `None` when
    /// it may use none.
    fn ci_kubeconfig(
        &self,
        server: &str,
        jwt: &str,
        job: &tether_kubeproxy_server::CiIdentity,
        agents: &[AgentInForce],
    ) -> Result<Option<String>, tether_kubeproxy_server::KubeconfigError> {
        let entries = agents.iter().map(|(a, c)| KubeconfigAgent {
            id: a.id,
            project_path: &a.project_path,
            name: &a.name,
            ci_access: &c.ci_access,
        });
        let ca = self.ca_pem.as_ref().map(|f| f.current());
        ci_kubeconfig(server, ca.as_deref().map(Vec::as_slice), jwt, job, entries)
    }
}

/// Serves the proxy on `listener` (with its TLS and limits) until `shutdown`. HTTP/1.1 only:
/// upgrades (exec, attach, port-forward) need it, and kubectl speaks it. Each request carries
/// the client's address as an `axum::extract::ConnectInfo<SocketAddr>` extension.
pub async fn serve(
    listener: crate::listener::HttpListener,
    proxy: Proxy,
    shutdown: CancellationToken,
) {
    let handler = move |req| proxy.clone().handle(req);
    crate::listener::serve_http(listener, handler, shutdown).await;
}

#[allow(dead_code)]
fn _executor() -> TokioExecutor {
    TokioExecutor::new()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A request's end at its token's expiry follows the wall clock: stepped forward a day past
    /// the expiry, the end comes within a second, not at the old deadline hours later.
    #[tokio::test(start_paused = true)]
    async fn an_expiry_ends_within_a_second_of_a_wall_clock_step_past_it() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let start = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let stepped = Arc::new(AtomicU64::new(0));
        let clock = {
            let stepped = Arc::clone(&stepped);
            let begun = tokio::time::Instant::now();
            move || {
                start
                    + begun.elapsed()
                    + std::time::Duration::from_secs(stepped.load(Ordering::SeqCst))
            }
        };
        let until = start + std::time::Duration::from_secs(2 * 3600);
        let ended = tokio::spawn(wall_clock_reaches(until, clock));
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(!ended.is_finished(), "two hours left: still open");
        stepped.store(86_400, Ordering::SeqCst);
        let began = tokio::time::Instant::now();
        ended.await.unwrap();
        let after = began.elapsed();
        assert!(after <= EXPIRY_RECHECK, "ended {after:?} after the step");
    }

    /// Without a step, it ends at the expiry itself, not a recheck later or earlier.
    #[tokio::test(start_paused = true)]
    async fn an_expiry_ends_at_its_moment_when_the_clock_is_steady() {
        let begun = tokio::time::Instant::now();
        let start = SystemTime::now();
        let clock = move || start + begun.elapsed();
        let until = start + std::time::Duration::from_millis(3_500);
        wall_clock_reaches(until, clock).await;
        assert_eq!(begun.elapsed(), std::time::Duration::from_millis(3_500));
    }

    /// A connected agent that refused every configuration kas sent has none in force either:
    /// the answer does not say only that it has not connected.
    #[test]
    fn an_unknown_configuration_names_a_refusal_as_a_cause() {
        let one = config_unknown(7, false);
        assert!(
            one.starts_with("agent 7 has no configuration in force"),
            "{one}"
        );
        assert!(
            one.contains("or it refused the configuration kas sent"),
            "{one}"
        );
    }

    /// Only a JSON watch takes the closing event: a protobuf watch's frames, or a plain
    /// answer, cannot.
    #[test]
    fn only_json_watches_end_with_an_error_event() {
        let json = http::HeaderValue::from_static("application/json");
        let proto =
            http::HeaderValue::from_static("application/vnd.kubernetes.protobuf;stream=watch");
        assert!(is_json_watch(
            Some("watch=true&resourceVersion=5"),
            Some(&json)
        ));
        assert!(is_json_watch(Some("labelSelector=a&watch=1"), Some(&json)));
        assert!(!is_json_watch(Some("watch=true"), Some(&proto)));
        assert!(!is_json_watch(Some("limit=500"), Some(&json)));
        assert!(!is_json_watch(None, Some(&json)));
        assert!(!is_json_watch(Some("watch=false"), Some(&json)));
    }

    #[test]
    fn the_error_event_is_one_line_with_a_status() {
        let e = watch_error_event(StatusCode::UNAUTHORIZED, "Unauthorized", ACCESS_ENDED);
        let text = std::str::from_utf8(&e).unwrap();
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["type"], "ERROR");
        assert_eq!(v["object"]["kind"], "Status");
        assert_eq!(v["object"]["code"], 401);
        assert_eq!(v["object"]["reason"], "Unauthorized");
    }

    /// While the store is down, failed personal-access-token checks claiming any number of
    /// agent ids are counted in one series, agent 0 with `access_as="unknown"`, so an
    /// unauthenticated flood cannot grow the metric without bound.
    #[test]
    fn token_checks_the_store_failed_are_counted_under_agent_0_whatever_id_they_claim() {
        let metrics = ProxyMetrics::default();
        let down = tether_store::Error::InUse("the database is down".into());
        for claimed in 1..=50 {
            let resp = tokens_unreadable(claimed, &down);
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            failed(&metrics, &resp, None);
        }
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("k8s_proxy_requests_total{"))
            .collect();
        assert_eq!(
            series,
            ["k8s_proxy_requests_total{agent_id=\"0\",access_as=\"unknown\",code=\"503\"} 50"],
            "{text}"
        );
    }
}
