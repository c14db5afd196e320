//! agent id → idle tunnel streams, and the hand-over of one stream to one request.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use tether_protocol::frames::{FrameReader, FrameWriter, Pipe};
use tether_protocol::returning::{Ended, Returning};
use tether_protocol::tunnel::{
    AgentFrame, Descriptor, RequestInfo, ServerFrame, agent_frame, server_frame,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::answer::{AnswerFirst, AnswerWatch, Answered};
use crate::auth::{AgentIdentity, Authenticator};
use crate::known::{Digest, KnownTokens};

/// Why no tunnel could be had.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RegistryError {
    #[error("agent {0} is not connected")]
    AgentNotConnected(i64),
    /// Connected, but every tunnel stream it opened carries a request (long watches, exec,
    /// port-forward) and it may open no more (agentk's `--tunnel-max-streams`).
    #[error(
        "agent {agent_id} is connected but all its tunnel streams are busy: none became free in time (raise agentk's --tunnel-max-streams, or end long-lived requests such as watches, exec and port-forward)"
    )]
    AllStreamsBusy { agent_id: i64 },
    #[error("kas is shutting down")]
    ShuttingDown,
}

/// Why a taken tunnel could not carry the request.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the tunnel closed before the agent answered")]
    Closed,
    #[error("the agent refused the request (code {code}): {message}")]
    Refused { code: i32, message: String },
    /// The agent ended the stream without reading the request (`CloseUnused`): it may be sent
    /// again on another stream.
    #[error("{}", crate::answer::NOT_TAKEN)]
    NotTaken,
    #[error("the agent sent an unexpected frame: {0}")]
    Protocol(String),
    #[error("tunnel stream failed: {0}")]
    Stream(#[from] Status),
}

/// Why a request could not be sent to an agent ([`Registry::open_confirmed`]).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    NoTunnel(#[from] RegistryError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// How many times a request the agent did not take is sent again on another stream: each
/// time is an agent closing a stream at the moment kas chose it. A stopping agentk closes all
/// its idle streams at once, and kas may choose several of them in a row before it hears of
/// the others (3 gave a 502 now and then while one of two agentk replicas stopped under load);
/// more than this means something else is wrong. `tunnel_wait_timeout` bounds them all.
pub const MAX_RESENDS: u32 = 10;

/// One agentk connection as kas sees it (a pod, over one transport connection).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub agent_version: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// Which cluster the agent runs in, as agentk tells it (empty: unknown).
    pub cluster_id: String,
    pub remote_addr: String,
    pub connected_since: SystemTime,
    /// Open tunnel streams (idle and busy) of this connection.
    pub streams: usize,
}

/// Another connection of the agent from a cluster other than `new`'s, when both clusters are
/// known: the agent's token is installed in two clusters. The same Pod telling another id is
/// not another cluster: its ServiceAccount was created again (a new UID), and the Pod's older
/// connection still carries the old one.
fn other_cluster<'a>(
    connections: impl IntoIterator<Item = &'a ConnectionInfo>,
    new: &ConnectionInfo,
) -> Option<ConnectionInfo> {
    if new.cluster_id.is_empty() {
        return None;
    }
    connections
        .into_iter()
        .find(|c| !c.cluster_id.is_empty() && c.cluster_id != new.cluster_id && !same_pod(c, new))
        .cloned()
}

/// Two connections of one Pod (agentk out of a cluster, without a Pod name, is never known
/// to be the same).
fn same_pod(a: &ConnectionInfo, b: &ConnectionInfo) -> bool {
    !a.pod_name.is_empty() && a.pod_name == b.pod_name && a.pod_namespace == b.pod_namespace
}

/// A stream of a connection already known: counted, and a new cluster id it tells (its
/// ServiceAccount created again) replaces the connection's, so that the agent's clusters are
/// its live ones.
fn join_connection(known: &mut ConnectionInfo, new: &ConnectionInfo) {
    known.streams += 1;
    if !new.cluster_id.is_empty() && known.cluster_id != new.cluster_id {
        tracing::info!(
            pod = format!("{}/{}", new.pod_namespace, new.pod_name),
            old_cluster_id = %known.cluster_id,
            cluster_id = %new.cluster_id,
            "An agent's Pod tells a new cluster id (its ServiceAccount was created again)"
        );
        known.cluster_id.clone_from(&new.cluster_id);
    }
}

/// What the admin commands show for an agent.
#[derive(Debug, Clone)]
pub struct AgentConnections {
    pub agent_id: i64,
    pub idle_tunnels: usize,
    pub connections: Vec<ConnectionInfo>,
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub agents: usize,
    pub open_streams: usize,
    pub idle_streams: usize,
    pub waiters: usize,
}

/// A parked stream's way to be claimed: send it a reply channel, it answers with the tunnel.
struct IdleHandle {
    stream_id: u64,
    claim: oneshot::Sender<oneshot::Sender<Tunnel>>,
}

#[derive(Default)]
struct AgentState {
    idle: VecDeque<IdleHandle>,
    waiters: VecDeque<oneshot::Sender<IdleHandle>>,
    connections: HashMap<(String, String), ConnectionInfo>,
    /// A stream over the cap was refused and said (warn) since the agent was last under it.
    over_cap_said: bool,
}

impl AgentState {
    fn streams(&self) -> usize {
        self.connections.values().map(|c| c.streams).sum()
    }
}

/// A request waiting for an idle stream of an agent. However it ends — served, timed out, or
/// dropped because its client went away — its waiter leaves the agent's entry: a dropped one
/// used to stay until the agent connected, and kept a disconnected agent counted as
/// connected (`tunnel_connected_agents`).
struct Waiting<'r> {
    registry: &'r Registry,
    agent_id: i64,
    rx: Option<oneshot::Receiver<IdleHandle>>,
}

impl Waiting<'_> {
    /// The stream given to this request, or `None` at `deadline` or when kas stops.
    async fn until(mut self, deadline: tokio::time::Instant) -> Option<IdleHandle> {
        let rx = self.rx.as_mut()?;
        let handle = tokio::time::timeout_at(deadline, rx).await.ok()?.ok();
        if handle.is_some() {
            // Its waiter was taken off the queue to be answered: nothing to prune.
            self.rx = None;
        }
        handle
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            // Closed first, so the pruning sees this waiter as gone.
            drop(rx);
            self.registry.prune_waiters(self.agent_id);
        }
    }
}

/// Most tunnel streams one agent may have open on one kas by default: agentk opens at most
/// 500 per replica (`--tunnel-max-streams`), so this admits several replicas, and bounds
/// what a stolen token can make kas hold (a few KB per stream).
pub const DEFAULT_MAX_STREAMS_PER_AGENT: usize = 4096;

#[derive(Default)]
struct Inner {
    agents: HashMap<i64, AgentState>,
    /// Cancellation of every live stream, grouped by the token that opened it.
    by_token: HashMap<i64, HashMap<u64, CancellationToken>>,
    open_streams: usize,
    /// Idle streams of all agents, kept as they come and go: summing the agents' lists on
    /// every stream event made connecting a fleet quadratic (19,000 agents took twice the CPU
    /// per agent of 10,000, under this lock).
    idle_streams: usize,
    /// Agents with a connection here, kept as connections come and go: `agents` also holds
    /// requests waiting for an agent that is not connected, which are no connection.
    connected_agents: usize,
    shutting_down: bool,
    /// kas is stopping but lets requests in flight finish (see [`Registry::drain`]).
    draining: bool,
    /// Tokens looked up for a live stream, so the next stream of the token skips the store.
    known: KnownTokens,
    /// When each agent's last connection to this kas ended, for telling a user who asks an
    /// offline agent since when (one entry per agent seen since kas started).
    last_seen: HashMap<i64, std::time::SystemTime>,
}

#[derive(Debug, Default, Clone)]
struct Metrics {
    open_streams: Gauge,
    idle_streams: Gauge,
    connected_agents: Gauge,
    routed: Counter,
    not_connected: Counter,
    streams_busy: Counter,
    revoked: Counter,
    shared_tokens: Counter,
    resent: Counter,
    over_cap: Counter,
}

/// An agent's tunnels came to this kas (`connected`) or all left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub agent_id: i64,
    pub connected: bool,
}

/// The registry of connected agents. Cheap to share behind an `Arc`.
pub struct Registry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    metrics: Metrics,
    /// Most tunnel streams one agent may have open here.
    max_streams_per_agent: usize,
    shutdown: CancellationToken,
    /// Cancelled when kas starts stopping: idle streams end, busy ones finish their request.
    draining: CancellationToken,
    /// Signalled whenever a stream closes, for [`Registry::drained`].
    closed: tokio::sync::Notify,
    /// Presence changes, for the replicas' shared directory of which kas holds which agent.
    presence: tokio::sync::broadcast::Sender<Presence>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            metrics: Metrics::default(),
            max_streams_per_agent: DEFAULT_MAX_STREAMS_PER_AGENT,
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            closed: tokio::sync::Notify::new(),
            presence: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// The same registry admitting at most `n` tunnel streams per agent.
    pub fn with_max_streams_per_agent(mut self, n: usize) -> Self {
        self.max_streams_per_agent = n.max(1);
        self
    }

    /// Follows agents arriving and leaving. A receiver that lags behind gets
    /// `RecvError::Lagged` and should re-read [`Registry::connected_agents`].
    pub fn subscribe_presence(&self) -> tokio::sync::broadcast::Receiver<Presence> {
        self.presence.subscribe()
    }

    /// The agents with at least one tunnel stream here; none once draining (the streams left
    /// only finish their requests: no new request may count on them).
    pub fn connected_agents(&self) -> Vec<i64> {
        let inner = self.lock();
        if inner.draining {
            return Vec::new();
        }
        let mut ids: Vec<i64> = inner
            .agents
            .iter()
            .filter(|(_, a)| !a.connections.is_empty())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// When the agent's last connection to this kas ended, if one did since kas started (it
    /// may have connected again since).
    pub fn last_seen(&self, agent_id: i64) -> Option<std::time::SystemTime> {
        self.lock().last_seen.get(&agent_id).copied()
    }

    /// Whether the agent has a tunnel stream here now that may take a request (none once
    /// draining).
    pub fn has_agent(&self, agent_id: i64) -> bool {
        let inner = self.lock();
        !inner.draining
            && inner
                .agents
                .get(&agent_id)
                .is_some_and(|a| !a.connections.is_empty())
    }

    /// Registers the registry's metrics under `reg` (prefix `tunnel_`).
    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.metrics;
        reg.register(
            "tunnel_open_streams",
            "Tunnel streams open from agents (idle and busy)",
            m.open_streams.clone(),
        );
        reg.register(
            "tunnel_idle_streams",
            "Idle tunnel streams waiting for a request",
            m.idle_streams.clone(),
        );
        reg.register(
            "tunnel_connected_agents",
            "Agents with at least one open tunnel stream",
            m.connected_agents.clone(),
        );
        reg.register(
            "tunnel_requests_routed",
            "Requests handed a tunnel",
            m.routed.clone(),
        );
        reg.register(
            "tunnel_agent_not_connected",
            "Requests that found no tunnel in time",
            m.not_connected.clone(),
        );
        reg.register(
            "tunnel_all_streams_busy",
            "Requests for a connected agent that found every tunnel stream busy in time",
            m.streams_busy.clone(),
        );
        reg.register(
            "tunnel_agent_token_shared_by_clusters",
            "Connections of an agent from a cluster other than one it is connected from already (one token installed in two clusters)",
            m.shared_tokens.clone(),
        );
        reg.register(
            "tunnel_requests_resent",
            "Requests sent again on another stream because the agent closed the one they were sent on without taking them",
            m.resent.clone(),
        );
        reg.register(
            "tunnel_streams_revoked",
            "Streams ended because their token was revoked",
            m.revoked.clone(),
        );
        reg.register(
            "tunnel_streams_over_agent_cap",
            "Tunnel streams refused because their agent had agent.max_streams_per_agent open",
            m.over_cap.clone(),
        );
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the registry, so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refresh_gauges(&self, inner: &Inner) {
        let idle = inner.idle_streams;
        self.metrics
            .open_streams
            .set(i64::try_from(inner.open_streams).unwrap_or(i64::MAX));
        self.metrics
            .idle_streams
            .set(i64::try_from(idle).unwrap_or(i64::MAX));
        self.metrics
            .connected_agents
            .set(i64::try_from(inner.connected_agents).unwrap_or(i64::MAX));
    }

    pub fn stats(&self) -> RegistryStats {
        let inner = self.lock();
        // The running count must equal the lists it stands for (checked in tests' debug builds).
        debug_assert_eq!(
            inner.idle_streams,
            inner.agents.values().map(|a| a.idle.len()).sum::<usize>()
        );
        debug_assert_eq!(
            inner.connected_agents,
            inner
                .agents
                .values()
                .filter(|a| !a.connections.is_empty())
                .count()
        );
        RegistryStats {
            agents: inner.connected_agents,
            open_streams: inner.open_streams,
            idle_streams: inner.idle_streams,
            waiters: inner.agents.values().map(|a| a.waiters.len()).sum(),
        }
    }

    /// Connection state of every connected agent.
    pub fn connections(&self) -> Vec<AgentConnections> {
        let inner = self.lock();
        let mut out: Vec<AgentConnections> = inner
            .agents
            .iter()
            .filter(|(_, a)| !a.connections.is_empty())
            .map(|(id, a)| AgentConnections {
                agent_id: *id,
                idle_tunnels: a.idle.len(),
                connections: a.connections.values().cloned().collect(),
            })
            .collect();
        out.sort_by_key(|a| a.agent_id);
        out
    }

    /// How many streams opened with `token_id` are open here: what revoking it would end.
    pub fn streams_of(&self, token_id: i64) -> usize {
        self.lock().by_token.get(&token_id).map_or(0, |m| m.len())
    }

    /// Ends every stream opened with `token_id` (its token was revoked).
    pub fn revoke_token(&self, token_id: i64) -> usize {
        let cancelled: Vec<CancellationToken> = {
            let mut inner = self.lock();
            inner.known.forget(token_id);
            inner
                .by_token
                .remove(&token_id)
                .map(|m| m.into_values().collect())
                .unwrap_or_default()
        };
        for c in &cancelled {
            c.cancel();
        }
        self.metrics.revoked.inc_by(cancelled.len() as u64);
        cancelled.len()
    }

    /// Checks every token with live streams against `auth` and ends the streams of revoked ones.
    /// Returns how many streams were ended.
    pub async fn recheck_tokens(&self, auth: &dyn Authenticator) -> usize {
        let tokens: Vec<i64> = self.lock().by_token.keys().copied().collect();
        if tokens.is_empty() {
            return 0;
        }
        let active: std::collections::HashSet<i64> = match auth.active_tokens(tokens.clone()).await
        {
            Ok(active) => active.into_iter().collect(),
            // Keep streams when the store cannot answer: an outage is not a revocation.
            Err(e) => {
                tracing::warn!(error = %e, tokens = tokens.len(), "Token re-check failed");
                return 0;
            }
        };
        tokens
            .into_iter()
            .filter(|t| !active.contains(t))
            .map(|t| self.revoke_token(t))
            .sum()
    }

    /// Tracks a long-lived stream of another module (e.g. the configuration stream) so that
    /// revoking its token or stopping kas ends it like a tunnel stream.
    pub fn lease(self: &Arc<Self>, token_id: i64) -> Lease {
        let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.shutdown.child_token();
        self.lock()
            .by_token
            .entry(token_id)
            .or_default()
            .insert(stream_id, cancel.clone());
        Lease {
            registry: Arc::clone(self),
            token_id,
            stream_id,
            cancel,
        }
    }

    fn release(&self, token_id: i64, stream_id: u64) {
        let mut inner = self.lock();
        if let Some(m) = inner.by_token.get_mut(&token_id) {
            m.remove(&stream_id);
            if m.is_empty() {
                inner.by_token.remove(&token_id);
                inner.known.forget(token_id);
            }
        }
    }

    /// The status a stream ends with when it is cancelled: `UNAVAILABLE` while kas stops (the
    /// agent just reconnects, to this kas's successor), `UNAUTHENTICATED` when its token was
    /// revoked (the agent tells its user to check the token). Telling them apart keeps every
    /// normal kas rollout from logging a revocation error on every agent.
    pub fn end_status(&self) -> Status {
        if self.shutdown.is_cancelled() {
            Status::unavailable("kas is shutting down")
        } else {
            Status::unauthenticated("agent token revoked")
        }
    }

    /// Who the token with SHA-256 `digest` belongs to, if it was looked up recently and still
    /// has a live stream here (see [`crate::known`]).
    pub(crate) fn known_identity(&self, digest: &Digest) -> Option<AgentIdentity> {
        let inner = self.lock();
        let live = |token_id| inner.by_token.contains_key(&token_id);
        inner.known.get(digest, std::time::Instant::now(), live)
    }

    /// Remembers a token the store just confirmed.
    pub(crate) fn remember(&self, digest: Digest, identity: AgentIdentity) {
        let now = std::time::Instant::now();
        self.lock().known.insert(digest, identity, now);
    }

    /// Whether kas is stopping (draining or ended): new streams are refused before they are
    /// answered.
    pub fn is_shutting_down(&self) -> bool {
        self.draining.is_cancelled() || self.shutdown.is_cancelled()
    }

    /// The first step of stopping: idle streams end at once with `UNAVAILABLE` (their agents
    /// reconnect, to another replica once this one's listener is closed), new streams are
    /// refused, every agent is announced gone (the replicas' directory stops routing here),
    /// and a stream carrying a request keeps it until it ends: [`Registry::drained`] tells
    /// when none is left, [`Registry::shutdown`] then cuts what remains.
    pub fn drain(&self) {
        let gone: Vec<i64> = {
            let mut inner = self.lock();
            if inner.draining || inner.shutting_down {
                return;
            }
            inner.draining = true;
            inner
                .agents
                .iter()
                .filter(|(_, a)| !a.connections.is_empty())
                .map(|(id, _)| *id)
                .collect()
        };
        self.draining.cancel();
        for agent_id in gone {
            let _ = self.presence.send(Presence {
                agent_id,
                connected: false,
            });
        }
    }

    /// Resolves once no stream is open here any more (after [`Registry::drain`]: the requests
    /// in flight ended).
    pub async fn drained(&self) {
        loop {
            let closed = self.closed.notified();
            if self.lock().open_streams == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Resolves when every stream was ended ([`Registry::shutdown`]).
    pub async fn ended(&self) {
        self.shutdown.cancelled().await;
    }

    /// Resolves once stopping has begun ([`Registry::drain`] or [`Registry::shutdown`]): from
    /// then on no new stream comes, so whoever waits for one here waits in vain.
    pub async fn stopping(&self) {
        tokio::select! {
            () = self.draining.cancelled() => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// Ends every stream and refuses new ones (kas is stopping).
    pub fn shutdown(&self) {
        self.lock().shutting_down = true;
        self.shutdown.cancel();
    }

    /// Takes one idle tunnel of `agent_id`, waiting up to `timeout` for one to appear.
    pub async fn get_tunnel(
        &self,
        agent_id: i64,
        timeout: Duration,
    ) -> Result<Tunnel, RegistryError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiter = {
                let mut inner = self.lock();
                if inner.shutting_down {
                    return Err(RegistryError::ShuttingDown);
                }
                let state = inner.agents.entry(agent_id).or_default();
                let before = state.idle.len();
                let mut found = None;
                while let Some(h) = state.idle.pop_front() {
                    if !h.claim.is_closed() {
                        found = Some(h);
                        break;
                    }
                }
                let taken = before - state.idle.len();
                let res = match found {
                    Some(h) => Ok(h),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        state.waiters.push_back(tx);
                        Err(rx)
                    }
                };
                if state.idle.is_empty() && state.waiters.is_empty() && state.connections.is_empty()
                {
                    inner.agents.remove(&agent_id);
                }
                inner.idle_streams -= taken;
                self.refresh_gauges(&inner);
                res
            };
            let handle = match waiter {
                Ok(h) => h,
                Err(rx) => {
                    let waiting = Waiting {
                        registry: self,
                        agent_id,
                        rx: Some(rx),
                    };
                    match waiting.until(deadline).await {
                        Some(h) => h,
                        // The sender side was dropped (shutdown) or the time is up.
                        None => return Err(self.none_in_time(agent_id)),
                    }
                }
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            if handle.claim.send(reply_tx).is_err() {
                continue; // that stream just ended; try the next one
            }
            if let Ok(t) = reply_rx.await {
                self.metrics.routed.inc();
                return Ok(t);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.none_in_time(agent_id));
            }
        }
    }

    /// Counts a request sent again on another stream (see [`crate::Resending`]).
    pub fn resent_counter(&self) -> Counter {
        self.metrics.resent.clone()
    }

    /// Takes a tunnel of `agent_id` and sends the request on it, waiting for the agent's
    /// answer (as [`Tunnel::request_confirmed`]). A stream the agent closed without taking the
    /// request is replaced by another, as long as `timeout` (for the whole) allows and at most
    /// [`MAX_RESENDS`] times: nothing of the request was sent but its `RequestInfo`.
    pub async fn open_confirmed(
        &self,
        agent_id: i64,
        service: &str,
        metadata: HashMap<String, String>,
        timeout: Duration,
    ) -> Result<TunnelConn, OpenError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut resends = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let tunnel = self.get_tunnel(agent_id, left).await?;
            match tunnel.request_confirmed(service, metadata.clone()).await {
                Err(TunnelError::NotTaken) if resends < MAX_RESENDS => {
                    resends += 1;
                    self.metrics.resent.inc();
                    tracing::debug!(
                        agent_id,
                        service,
                        "The agent closed the tunnel stream without taking the request; sending it on another"
                    );
                }
                r => return Ok(r?),
            }
        }
    }

    /// Why no tunnel came in time: the agent is not connected, or it is and every stream is
    /// busy — told apart, so a user does not chase a connection problem that is a limit.
    fn none_in_time(&self, agent_id: i64) -> RegistryError {
        let inner = self.lock();
        if inner.shutting_down {
            return RegistryError::ShuttingDown;
        }
        let connected = inner
            .agents
            .get(&agent_id)
            .is_some_and(|s| !s.connections.is_empty());
        drop(inner);
        if connected {
            self.metrics.streams_busy.inc();
            RegistryError::AllStreamsBusy { agent_id }
        } else {
            self.metrics.not_connected.inc();
            RegistryError::AgentNotConnected(agent_id)
        }
    }

    /// Drops the waiters whose requests went away, and the agent's entry if nothing else is
    /// left in it.
    fn prune_waiters(&self, agent_id: i64) {
        let mut inner = self.lock();
        if let Some(state) = inner.agents.get_mut(&agent_id) {
            state.waiters.retain(|w| !w.is_closed());
            if state.idle.is_empty() && state.waiters.is_empty() && state.connections.is_empty() {
                inner.agents.remove(&agent_id);
            }
        }
    }

    /// Gives an idle stream to a waiting request, or parks it.
    fn offer(&self, agent_id: i64, mut handle: IdleHandle) {
        let mut inner = self.lock();
        let state = inner.agents.entry(agent_id).or_default();
        while let Some(w) = state.waiters.pop_front() {
            match w.send(handle) {
                Ok(()) => {
                    self.refresh_gauges(&inner);
                    return;
                }
                Err(h) => handle = h, // that waiter gave up; try the next
            }
        }
        state.idle.push_back(handle);
        inner.idle_streams += 1;
        self.refresh_gauges(&inner);
    }

    fn remove_idle(&self, agent_id: i64, stream_id: u64) {
        let mut inner = self.lock();
        if let Some(state) = inner.agents.get_mut(&agent_id) {
            let before = state.idle.len();
            state.idle.retain(|h| h.stream_id != stream_id);
            let removed = before - state.idle.len();
            inner.idle_streams -= removed;
        }
        self.refresh_gauges(&inner);
    }

    /// Counts a new stream of the agent in, or refuses it: kas is stopping, or the agent has
    /// as many streams open here as it may.
    fn stream_opened(
        &self,
        id: &AgentIdentity,
        info: &ConnectionInfo,
        stream_id: u64,
        cancel: CancellationToken,
    ) -> Result<(), Status> {
        let mut inner = self.lock();
        if inner.shutting_down || inner.draining {
            return Err(Status::unavailable("kas is shutting down"));
        }
        let cap = self.max_streams_per_agent;
        if let Some(state) = inner.agents.get_mut(&id.agent_id) {
            let open = state.streams();
            if open >= cap {
                return Err(self.over_cap(id.agent_id, state, cap));
            }
            state.over_cap_said &= open >= cap / 2;
        }
        inner.open_streams += 1;
        inner
            .by_token
            .entry(id.token_id)
            .or_default()
            .insert(stream_id, cancel);
        let state = inner.agents.entry(id.agent_id).or_default();
        let arrived = state.connections.is_empty();
        let key = (info.remote_addr.clone(), info.pod_name.clone());
        let other_cluster = match state.connections.entry(key) {
            Entry::Occupied(mut c) => {
                join_connection(c.get_mut(), info);
                None
            }
            Entry::Vacant(v) => {
                v.insert(ConnectionInfo {
                    streams: 1,
                    ..info.clone()
                });
                other_cluster(state.connections.values(), info)
            }
        };
        inner.connected_agents += usize::from(arrived);
        self.refresh_gauges(&inner);
        drop(inner);
        if let Some(other) = other_cluster {
            self.metrics.shared_tokens.inc();
            tracing::warn!(
                agent_id = id.agent_id,
                cluster_id = %info.cluster_id,
                pod = format!("{}/{}", info.pod_namespace, info.pod_name),
                other_cluster_id = %other.cluster_id,
                other_pod = format!("{}/{}", other.pod_namespace, other.pod_name),
                "The agent is connected from two clusters (two ServiceAccounts): one agent token must serve one cluster — kas routes CI jobs to either, and both apply its GitOps; register an agent per cluster"
            );
        }
        if arrived {
            tracing::info!(agent_id = id.agent_id, pod = format!("{}/{}", info.pod_namespace, info.pod_name), remote_addr = %info.remote_addr, "Agent connected");
            let _ = self.presence.send(Presence {
                agent_id: id.agent_id,
                connected: true,
            });
        }
        Ok(())
    }

    /// The refusal of a stream over the agent's cap, counted, and said once until the agent
    /// is back under half of it (a flood must not flood the log too).
    fn over_cap(&self, agent_id: i64, state: &mut AgentState, cap: usize) -> Status {
        self.metrics.over_cap.inc();
        if !std::mem::replace(&mut state.over_cap_said, true) {
            tracing::warn!(
                agent_id,
                max_streams_per_agent = cap,
                "Refusing tunnel streams of an agent that has as many open as it may (agent.max_streams_per_agent): a misconfigured agentk (--tunnel-max-streams, many replicas) or a stolen token"
            );
        }
        Status::resource_exhausted(format!(
            "agent {agent_id} already has {cap} tunnel streams open on this kas (agent.max_streams_per_agent): stream refused"
        ))
    }

    fn stream_closed(&self, id: &AgentIdentity, info: &ConnectionInfo, stream_id: u64) {
        let mut inner = self.lock();
        inner.open_streams = inner.open_streams.saturating_sub(1);
        if let Some(m) = inner.by_token.get_mut(&id.token_id) {
            m.remove(&stream_id);
            if m.is_empty() {
                inner.by_token.remove(&id.token_id);
                inner.known.forget(id.token_id);
            }
        }
        let draining = inner.draining;
        let mut last_one_gone = false;
        if let Some(state) = inner.agents.get_mut(&id.agent_id) {
            let key = (info.remote_addr.clone(), info.pod_name.clone());
            if let Some(c) = state.connections.get_mut(&key) {
                c.streams = c.streams.saturating_sub(1);
                if c.streams == 0 {
                    state.connections.remove(&key);
                    if state.connections.is_empty() {
                        last_one_gone = true;
                    }
                    // A draining registry announced every agent gone already.
                    if state.connections.is_empty() && !draining {
                        // Said where operators look when an agent drops off (a network cut, a
                        // half-open connection found by the keep-alive): kas said nothing.
                        tracing::info!(
                            agent_id = id.agent_id,
                            pod = format!("{}/{}", info.pod_namespace, info.pod_name),
                            "Agent disconnected: its last connection to this kas ended"
                        );
                        let _ = self.presence.send(Presence {
                            agent_id: id.agent_id,
                            connected: false,
                        });
                    }
                }
            }
            let before = state.idle.len();
            state.idle.retain(|h| h.stream_id != stream_id);
            let removed = before - state.idle.len();
            if state.idle.is_empty() && state.waiters.is_empty() && state.connections.is_empty() {
                inner.agents.remove(&id.agent_id);
            }
            inner.idle_streams -= removed;
        }
        if last_one_gone {
            inner.connected_agents -= 1;
            inner
                .last_seen
                .insert(id.agent_id, std::time::SystemTime::now());
        }
        self.refresh_gauges(&inner);
        drop(inner);
        self.closed.notify_waiters();
    }

    /// Runs one authenticated stream: parks it idle until a request claims it, the agent goes
    /// away, its token is revoked or kas shuts down; after a request that ended cleanly on
    /// both sides (with an agent that said `reusable`), parks it again.
    pub(crate) async fn park(
        self: Arc<Self>,
        identity: AgentIdentity,
        info: ConnectionInfo,
        descriptor: Descriptor,
        (mut inbound, mut tx): (Streaming<AgentFrame>, mpsc::Sender<Outgoing>),
        moving: CancellationToken,
    ) {
        let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.shutdown.child_token();
        if let Err(refused) = self.stream_opened(&identity, &info, stream_id, cancel.clone()) {
            let _ = tx.send(Box::new(Err(refused))).await;
            return;
        }
        // Keeps the accounting right however the stream ends: this task lives as long as it.
        let _guard = StreamGuard {
            registry: Arc::clone(&self),
            identity: identity.clone(),
            info,
            stream_id,
        };
        let agent_id = identity.agent_id;
        loop {
            let Some(reply) = self
                .wait_idle(agent_id, stream_id, (&cancel, &moving), &mut inbound, &tx)
                .await
            else {
                return;
            };
            let (back, returned) = oneshot::channel();
            let weak = tx.downgrade();
            let tunnel = Tunnel {
                agent_id,
                data_with_request: descriptor.data_with_request,
                answer: AnswerWatch::default(),
                tx,
                inbound,
                back,
            };
            // If the caller vanished meanwhile, dropping the tunnel ends the stream and the
            // agent opens a fresh one.
            if reply.send(tunnel).is_err() {
                return;
            }
            // Boxed, as is `reusable` below: both are large and live only while a request
            // runs, and an idle stream's task should not carry room for them (its future was
            // 2,064 bytes, now 1,592).
            let Some(ended) = Box::pin(self.watch_busy(&cancel, returned, weak)).await else {
                return;
            };
            if !descriptor.reusable {
                return;
            }
            let Some((i, t)) = Box::pin(reusable(ended, &cancel)).await else {
                return;
            };
            (inbound, tx) = (i, t);
        }
    }

    /// Offers the stream to requests until one claims it (its reply channel), or `None` when
    /// the stream ends first.
    async fn wait_idle(
        &self,
        agent_id: i64,
        stream_id: u64,
        (cancel, moving): (&CancellationToken, &CancellationToken),
        inbound: &mut Streaming<AgentFrame>,
        tx: &mpsc::Sender<Outgoing>,
    ) -> Option<oneshot::Sender<Tunnel>> {
        // Draining, or the connection rotating: a stream given back after its request is not
        // offered again.
        if self.draining.is_cancelled() {
            let _ = tx.send(Box::new(Err(stopping()))).await;
            return None;
        }
        if moving.is_cancelled() {
            return None;
        }
        let (claim, claimed) = oneshot::channel();
        self.offer(agent_id, IdleHandle { stream_id, claim });
        tokio::select! {
            reply = claimed => return reply.ok(),
            msg = inbound.message() => {
                // Idle streams carry nothing from the agent but its `CloseUnused`; anything
                // else is a broken agent. Either way the stream ends.
                if let Ok(Some(frame)) = msg
                    && !matches!(frame.frame, Some(agent_frame::Frame::CloseUnused(_)))
                {
                    tracing::debug!(agent_id, ?frame, "Unexpected frame on an idle tunnel");
                    let _ = tx.send(Box::new(Err(Status::invalid_argument("unexpected frame on an idle tunnel")))).await;
                }
            }
            () = cancel.cancelled() => {
                let _ = tx.send(Box::new(Err(self.end_status()))).await;
            }
            // Unclaimed at that moment: no request was sent on it, so ending it loses nothing.
            () = self.draining.cancelled() => {
                let _ = tx.send(Box::new(Err(stopping()))).await;
            }
            // The connection is rotating: the stream ends cleanly (agentk opens another in its
            // place, on its next connection, as after any clean end; no failure to report).
            () = moving.cancelled() => {}
            () = tx.closed() => {}
        }
        self.remove_idle(agent_id, stream_id);
        None
    }
}

/// How a stream ends while kas stops: the agent reconnects, to another replica.
fn stopping() -> Status {
    Status::unavailable("kas is shutting down")
}

/// The refusal of a stream opened on a connection kas is rotating at its maximum age
/// ([`tether_transport::max_age`]), which agentk should have left at the GOAWAY: it opens
/// the stream again after a backoff step, on its next connection.
pub(crate) fn rotated() -> Status {
    Status::unavailable(
        "kas is rotating this connection at its maximum age: open streams on a new one",
    )
}

/// How long kas waits, after its side of a request ended, for the agent's `CloseSend` before
/// giving up on reusing the stream.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The stream back from a request, if it may carry another: kas's side ended cleanly and the
/// agent's `CloseSend` was read (or is the next frame), and no frame was longer than
/// [`tether_protocol::returning::REUSE_MAX_FRAME`] (kas decides; the agent keeps any stream
/// kas keeps); `None` ends the stream.
async fn reusable(
    ended: Ended<AnswerFirst<Streaming<AgentFrame>>, Outgoing>,
    cancel: &CancellationToken,
) -> Option<(Streaming<AgentFrame>, mpsc::Sender<Outgoing>)> {
    if !ended.clean() || cancel.is_cancelled() {
        return None;
    }
    let keep = ended.small();
    let mut frames = ended.frames.into_inner();
    if !ended.peer_closed {
        // The agent closes after reading kas's close: usually already on its way.
        let next = tokio::time::timeout(CLOSE_WAIT, frames.message()).await;
        let Ok(Ok(Some(frame))) = next else {
            return None;
        };
        if !matches!(frame.frame, Some(agent_frame::Frame::CloseSend(_))) {
            return None; // bytes kas did not read: the request did not end cleanly
        }
    }
    // After long frames the stream ends here instead of idling with grown buffers; both sides
    // have closed, so ending it loses nothing, and the agent opens a fresh one.
    if !keep {
        return None;
    }
    Some((frames, ended.sender?))
}

impl Registry {
    /// While a stream is busy, revocation or shutdown (`cancel`) still ends it. The stream's
    /// own task watches (no task of its own per request) until the request gives the stream
    /// back, through a weak sender so that it never keeps the stream open.
    async fn watch_busy(
        &self,
        cancel: &CancellationToken,
        returned: oneshot::Receiver<TunnelEnded>,
        weak: mpsc::WeakSender<Outgoing>,
    ) -> Option<TunnelEnded> {
        tokio::select! {
            () = cancel.cancelled() => {
                if let Some(tx) = weak.upgrade() {
                    let _ = tx.send(Box::new(Err(self.end_status()))).await;
                }
                None
            }
            ended = returned => ended.ok(),
        }
    }
}

/// A tracked stream's handle: cancelled when its token is revoked or kas stops.
pub struct Lease {
    registry: Arc<Registry>,
    token_id: i64,
    stream_id: u64,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Resolves when the stream must end.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Why the stream ended, as the status to send the agent (see [`Registry::end_status`]).
    pub fn end_status(&self) -> Status {
        self.registry.end_status()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.registry.release(self.token_id, self.stream_id);
    }
}

/// Keeps the registry's accounting right however a stream ends.
struct StreamGuard {
    registry: Arc<Registry>,
    identity: AgentIdentity,
    info: ConnectionInfo,
    stream_id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.registry
            .stream_closed(&self.identity, &self.info, self.stream_id);
    }
}

/// A tunnel stream taken for one request.
pub struct Tunnel {
    pub agent_id: i64,
    /// The agent takes the request's bytes before it answers (its descriptor said so).
    data_with_request: bool,
    /// The agent's answer to the request, once read.
    answer: AnswerWatch,
    tx: mpsc::Sender<Outgoing>,
    inbound: Streaming<AgentFrame>,
    /// Where the stream goes back to (its task) when the request is done with it.
    back: oneshot::Sender<TunnelEnded>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// The agent's answer to the request this tunnel carries, as it will be read: whoever
    /// holds it learns whether the agent closed the stream without taking the request (see
    /// [`crate::Resending`]).
    pub fn answer(&self) -> AnswerWatch {
        self.answer.clone()
    }

    /// Sends the request to the agent; the result is a byte pipe. An agent that takes the
    /// request's bytes at once gets them without waiting for its answer, which the first read
    /// checks (a refusal fails that read with the agent's reason): one round trip less per
    /// request. With an older agent this waits for the answer, as [`Tunnel::request_confirmed`].
    pub async fn request(
        mut self,
        service: &str,
        metadata: HashMap<String, String>,
    ) -> Result<TunnelConn, TunnelError> {
        if !self.data_with_request {
            return self.request_confirmed(service, metadata).await;
        }
        self.send_request(service, metadata).await?;
        Ok(self.into_conn(false))
    }

    /// Sends the request to the agent and waits for it to accept, so that a refusal is this
    /// call's error (for callers that must answer before any byte flows).
    pub async fn request_confirmed(
        mut self,
        service: &str,
        metadata: HashMap<String, String>,
    ) -> Result<TunnelConn, TunnelError> {
        self.send_request(service, metadata).await?;
        match self.inbound.message().await?.and_then(|f| f.frame) {
            None => Err(TunnelError::Closed),
            Some(agent_frame::Frame::Header(_)) => {
                self.answer.set(Answered::Taken);
                Ok(self.into_conn(true))
            }
            Some(agent_frame::Frame::Error(e)) => {
                self.answer.set(Answered::Taken);
                Err(TunnelError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            Some(agent_frame::Frame::CloseUnused(_)) => {
                self.answer.set(Answered::NotTaken);
                Err(TunnelError::NotTaken)
            }
            Some(other) => Err(TunnelError::Protocol(format!("{other:?}"))),
        }
    }

    async fn send_request(
        &mut self,
        service: &str,
        metadata: HashMap<String, String>,
    ) -> Result<(), TunnelError> {
        let req = ServerFrame {
            frame: Some(server_frame::Frame::Request(RequestInfo {
                service: service.to_string(),
                metadata,
            })),
        };
        self.tx
            .send(Box::new(Ok(req)))
            .await
            .map_err(|_| TunnelError::Closed)
    }

    /// The byte pipe; `answered` tells whether the agent's answer was already read.
    fn into_conn(self, answered: bool) -> TunnelConn {
        let pipe = Pipe {
            reader: FrameReader::new(AnswerFirst::new(self.inbound, answered, self.answer)),
            writer: FrameWriter::wrapped(self.tx),
            extra: (),
        };
        Returning::new(pipe, self.back)
    }
}

/// What kas sends an agent on a stream, boxed (see [`FrameWriter::wrapped`]: an idle stream's
/// channel then holds 256 bytes of slots instead of 2.3 KB).
pub type Outgoing = Box<Result<ServerFrame, Status>>;

/// What a request gives back to its stream's task.
type TunnelEnded = Ended<AnswerFirst<Streaming<AgentFrame>>, Outgoing>;

/// An accepted request: a bidirectional byte pipe to the agent's service. Dropping it ends
/// the request; the stream then ends too, or carries a later request if this one ended
/// cleanly on both sides.
pub type TunnelConn = Returning<AnswerFirst<Streaming<AgentFrame>>, Outgoing>;

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(pod: &str, cluster: &str) -> ConnectionInfo {
        ConnectionInfo {
            agent_version: "v".into(),
            pod_name: pod.into(),
            pod_namespace: "ns".into(),
            cluster_id: cluster.into(),
            remote_addr: String::new(),
            connected_since: SystemTime::UNIX_EPOCH,
            streams: 1,
        }
    }

    #[test]
    fn a_connection_from_another_known_cluster_is_found() {
        let live = [conn("a", "uid-1"), conn("b", "")];
        let same = conn("c", "uid-1");
        assert!(
            other_cluster(&live, &same).is_none(),
            "a replica in the same cluster"
        );
        let unknown = conn("d", "");
        assert!(
            other_cluster(&live, &unknown).is_none(),
            "an agentk not telling"
        );
        let other = other_cluster(&live, &conn("e", "uid-2")).expect("another cluster");
        assert_eq!(other.pod_name, "a");
    }

    #[test]
    fn a_pod_telling_a_new_cluster_id_is_not_a_second_cluster() {
        let live = [conn("a", "uid-old")];
        assert!(
            other_cluster(&live, &conn("a", "uid-new")).is_none(),
            "the same Pod, its ServiceAccount created again"
        );
        let mut out_of_cluster = conn("", "uid-old");
        let other = other_cluster([&out_of_cluster], &conn("", "uid-new"));
        assert!(
            other.is_some(),
            "without Pod names, two ids are two clusters"
        );
        join_connection(&mut out_of_cluster, &conn("", "uid-new"));
        assert_eq!(
            (out_of_cluster.cluster_id.as_str(), out_of_cluster.streams),
            ("uid-new", 2),
            "a connection's new stream tells its id from then on"
        );
        join_connection(&mut out_of_cluster, &conn("", ""));
        assert_eq!(
            out_of_cluster.cluster_id, "uid-new",
            "an unknown id changes nothing"
        );
    }
}
