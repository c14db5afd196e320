//! The pool of tunnel streams and the dispatch of routed requests to handlers.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use tether_protocol::frames::{FrameReader, FrameWriter, Pipe};
use tether_protocol::metadata;
use tether_protocol::returning::{Ended, Returning};
use tether_protocol::tunnel::reverse_tunnel_client::ReverseTunnelClient;
use tether_protocol::tunnel::{
    AgentFrame, CloseUnused, Descriptor, RequestInfo, ResponseHeader, ServerFrame, agent_frame,
    server_frame,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tracing::Instrument;

use crate::Backoff;

/// Pool sizing; defaults follow GitLab's agent.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Idle streams kept open, ready for requests.
    pub min_idle: usize,
    /// Upper bound on open streams (idle and busy).
    pub max_streams: usize,
    /// Streams opened at once when the idle ones run low.
    pub scale_up_step: usize,
    /// Idle streams above `min_idle` are closed after this long.
    pub idle_timeout: Duration,
    /// On stop, how long requests being served get to finish (a CI job's `kubectl apply`
    /// during an agentk rollout) before they are cut.
    pub drain_timeout: Duration,
    pub backoff: Backoff,
    /// When the channel's connection last received bytes: a connection that ended after
    /// this long a silence was dropped by the network (said at warn), not closed by kas.
    pub quiet: Option<QuietWatch>,
}

/// How the pool tells a connection the network dropped from one kas closed.
#[derive(Debug, Clone)]
pub struct QuietWatch {
    pub activity: tether_transport::ReadActivity,
    /// The keep-alive timeout: kas closing a connection is read (its end of file, its reset)
    /// right before the streams end; a dropped one is silent at least this long by then.
    pub after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_idle: 2,
            max_streams: 500,
            scale_up_step: 10,
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            // A first retry after 0.5 s brings agents back within about a second of a kas
            // restart (a rollout); growth by 1.6 up to 20 s still spares a kas that stays down.
            backoff: Backoff {
                initial: Duration::from_millis(500),
                ..Backoff::default()
            },
            quiet: None,
        }
    }
}

/// Who this agent is, sent on every RPC so kas can show it.
#[derive(Clone, Default)]
pub struct AgentMeta {
    pub token: crate::AgentToken,
    pub version: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// Which cluster the agent runs in (see `metadata::CLUSTER_ID`); empty when unknown.
    pub cluster_id: crate::ClusterId,
}

impl std::fmt::Debug for AgentMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("AgentMeta")
            .field("version", &self.version)
            .field("pod_name", &self.pod_name)
            .field("pod_namespace", &self.pod_namespace)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Serves one kind of routed request (`RequestInfo::service`).
pub trait Handler: Send + Sync + 'static {
    fn serve(&self, request: RequestInfo, conn: AgentConn) -> BoxFuture<'static, io::Result<()>>;
}

/// The connection state the agent reports (readiness, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    /// The last attempt failed; carries the gRPC code and message.
    Failed {
        code: Code,
        message: String,
    },
}

/// Current counts, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub opening: usize,
    pub idle: usize,
    pub busy: usize,
    /// Streams the agent closes without serving a request on them, until kas has ended them
    /// (it has then read their `CloseUnused`).
    pub closing: usize,
    pub failures: u32,
    /// The last attempt to open a stream succeeded.
    pub connected: bool,
    /// Attempts (batches of streams opened together) made so far.
    pub attempts: u64,
    /// The last attempt that has counted a failure: a batch of ten streams refused at once is
    /// one failed attempt, not ten (counting each jumped the backoff to its ceiling, so every
    /// kas restart cost each agent ~20 s of tunnel access).
    pub failed_attempt: u64,
    /// The last attempt that opened a stream, and the failures counted before it: opening
    /// resets `failures`, and a stream kas ends right after opening takes them back, plus one.
    pub failures_before: (u64, u32),
}

#[derive(Debug, Default, Clone)]
struct Metrics {
    idle: Gauge,
    busy: Gauge,
    served: Counter,
    open_failures: Counter,
}

struct Shared {
    cfg: PoolConfig,
    client: ReverseTunnelClient<Channel>,
    meta: AgentMeta,
    services: Vec<String>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    counts: Mutex<PoolStats>,
    wake: Notify,
    state: watch::Sender<ConnState>,
    /// The working connection ended, logged at info only, after this many attempts had begun
    /// (see [`failure_log`]).
    lost_at: Mutex<Option<u64>>,
    metrics: Metrics,
}

impl Shared {
    fn counts(&self) -> MutexGuard<'_, PoolStats> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long the connection had been silent, when that is long enough to mean the network
    /// dropped it ([`QuietWatch`]).
    fn silent_for(&self) -> Option<Duration> {
        let watch = self.cfg.quiet.as_ref()?;
        watch
            .activity
            .quiet_for()
            .filter(|quiet| *quiet >= watch.after)
    }

    fn update(&self, f: impl FnOnce(&mut PoolStats)) {
        let snapshot = {
            let mut c = self.counts();
            f(&mut c);
            *c
        };
        self.metrics
            .idle
            .set(i64::try_from(snapshot.idle).unwrap_or(i64::MAX));
        self.metrics
            .busy
            .set(i64::try_from(snapshot.busy).unwrap_or(i64::MAX));
        self.wake.notify_one();
    }

    /// Publishes the connection state and logs its changes: one line per change, not one per
    /// stream or retry. `cause` says how a failure came about (ignored for `Connected`).
    fn set_state(&self, new: ConnState, cause: Cause) {
        let attempts = self.counts().attempts;
        let mut lost_at = self
            .lost_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.state.send_if_modified(|s| {
            match &new {
                ConnState::Connected => {
                    *lost_at = None;
                    if *s != ConnState::Connected {
                        tracing::info!(
                            feature_name = "tunnel",
                            feature_status = "enabled",
                            "Feature status change"
                        );
                    }
                }
                ConnState::Failed { code, message } => {
                    if *s == ConnState::Connected {
                        tracing::info!(
                            feature_name = "tunnel",
                            feature_status = "disabled",
                            "Feature status change"
                        );
                    }
                    match failure_log(s, (*code, message), cause, *lost_at) {
                        FailureLog::Silent => {}
                        FailureLog::Reconnecting => {
                            log_reconnecting((*code, message), cause);
                            *lost_at = Some(attempts);
                        }
                        FailureLog::Failure => {
                            log_failure(*code, message);
                            *lost_at = None;
                        }
                    }
                }
                ConnState::Connecting => {}
            }
            if *s == new {
                return false;
            }
            *s = new;
            true
        });
    }
}

/// How the pool's state came to be a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Opening a stream of this attempt failed, or kas ended one right after opening it.
    OpenFailed { attempt: u64 },
    /// A stream of a working connection ended: the network lost it, or kas restarted. Which
    /// one only the reconnect tells.
    Lost,
    /// As `Lost`, the stream ended by kas closing its connection under it: at the end of the
    /// grace after its maximum age (a request still in flight) or as kas exited, the two alike to
    /// agentk ([`closed_under`]).
    Closed,
    /// As `Lost`, after nothing came from kas for this long: the network or a load balancer
    /// dropped the connection without a reset, and the keep-alive pings found it.
    Silent(Duration),
}

/// What a failure is logged as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureLog {
    Silent,
    /// At info: a working connection ended and agentk reconnects; normal every
    /// `max_connection_age` (2 h), so no warning unless the reconnect fails too.
    Reconnecting,
    /// [`log_failure`]: a warning, or an error for a refused token.
    Failure,
}

/// Decides how a failure with `code` and `cause` is logged after the state `old` (pure).
/// `lost_at`: the working connection ended and was logged at info only, when this many
/// attempts had begun. Failures of those attempts (streams opening on the connection that
/// ended) are part of that loss, and so are those of the next one: the probe sent at once
/// after the loss can still go to the connection that ended (the channel has not noticed yet)
/// and fail with `Cancelled` or an h2 error. A later attempt (after a backoff step) that
/// fails is a real failure to reach kas and warns, whatever its code. The same failure again
/// is quiet; one with another message is not (a certificate fixed for its name and now
/// expired fails with `Unavailable` both times: the operator must see the second cause).
/// Whether two messages differ only in their numbers: an expired certificate's error carries
/// the time of the check and "N seconds ago", new at every retry, and was warned of at each
/// one — about 180 lines an hour for as long as the certificate stayed expired (E14).
fn same_but_numbers(a: &str, b: &str) -> bool {
    let shape = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if !c.is_ascii_digit() {
                out.push(c);
            } else if !out.ends_with('#') {
                out.push('#');
            }
        }
        out
    };
    a == b || shape(a) == shape(b)
}

fn failure_log(
    old: &ConnState,
    (code, message): (Code, &str),
    cause: Cause,
    lost_at: Option<u64>,
) -> FailureLog {
    let same = matches!(old, ConnState::Failed { code: c, message: m } if *c == code && same_but_numbers(m, message));
    if is_refusal(code) {
        return if same {
            FailureLog::Silent
        } else {
            FailureLog::Failure
        };
    }
    let part_of_the_loss = match (cause, lost_at) {
        (_, None) => false,
        (Cause::Lost | Cause::Closed | Cause::Silent(_), Some(_)) => true,
        (Cause::OpenFailed { attempt }, Some(lost_at)) => attempt <= lost_at.saturating_add(1),
    };
    if part_of_the_loss {
        FailureLog::Silent
    } else if *old == ConnState::Connected {
        FailureLog::Reconnecting
    } else if same && lost_at.is_none() {
        // Same failure again (each retry): stay quiet, the first line said it.
        FailureLog::Silent
    } else {
        FailureLog::Failure
    }
}

/// What kas says when it ends an agent's streams as it stops (the tunnel registry's status).
const KAS_STOPPING: &str = "kas is shutting down";

/// The info line for a working connection that ended (pure). kas stopping says so in its
/// status; `closed` (kas closed the connection: [`closed_under`]) is a rotation at the maximum
/// age or kas exiting without a word, which the streams cannot tell apart (both end as
/// `Unknown` "h2 protocol error: error reading a body from connection", the connection closed
/// under them); anything else is the connection failing (reset, keep-alive timeout).
fn reconnecting_message(code: Code, message: &str, closed: bool) -> &'static str {
    if code == Code::Unavailable && message.contains(KAS_STOPPING) {
        "kas is shutting down (a restart or a rollout); reconnecting"
    } else if closed {
        "kas closed the connection (it does at the connection's maximum age, or it exited); reconnecting"
    } else {
        "The connection to kas failed; reconnecting"
    }
}

/// The line of a working connection that ended: at info when kas ended it, at warn when the
/// network dropped it (kas may never have seen the agent go).
fn log_reconnecting((code, message): (Code, &str), cause: Cause) {
    if let Cause::Silent(quiet) = cause {
        tracing::warn!(
            code = ?code,
            error = message,
            silent_for = ?quiet,
            "The connection to kas went silent: nothing came back, not even answers to keep-alive pings (a load balancer or the network dropped it); reconnecting"
        );
    } else {
        let line = reconnecting_message(code, message, cause == Cause::Closed);
        tracing::info!(code = ?code, error = message, "{line}");
    }
}

/// Whether `status` is its stream's connection closed under it: h2 ends the streams of a
/// connection that reached its end of file with a broken pipe ("stream closed because of a
/// broken pipe"); over TLS, kas's end of file (no TLS close_notify before it) reads as an
/// unexpected end of file. A reset or a keep-alive timeout fails them otherwise.
fn closed_under(status: &tonic::Status) -> bool {
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        let io = e
            .downcast_ref::<h2::Error>()
            .and_then(h2::Error::get_io)
            .or_else(|| e.downcast_ref::<std::io::Error>());
        if io.is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
            )
        }) {
            return true;
        }
        next = e.source();
    }
    false
}

/// A failed call's message, with its root cause when tonic says only "transport error" (a
/// connection that failed: the cause, such as a TLS listener dialled without TLS, is the
/// operator's lead).
pub fn status_text(status: &tonic::Status) -> String {
    let message = status.message();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut root = None;
    while let Some(e) = cause {
        root = Some(e);
        cause = e.source();
    }
    match root.map(ToString::to_string) {
        Some(r) if message == "transport error" && !r.is_empty() && r != message => {
            format!("{message}: {r}")
        }
        _ => message.to_owned(),
    }
}

/// Whether kas ended a stream because it refuses the agent (a revoked or unknown token), as
/// opposed to the stream's connection ending (kas rotating it at its maximum age, restarting,
/// the network): a refusal is logged as an error at once, an ended connection only when
/// reconnecting fails too.
pub fn is_refusal(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

fn log_failure(code: Code, message: &str) {
    match code {
        Code::Unauthenticated => tracing::error!(
            error = message,
            "kas refused the agent token (unauthenticated): check the token file and that the token was not revoked"
        ),
        Code::PermissionDenied => {
            tracing::error!(error = message, "kas denied the agent (permission denied)");
        }
        _ => {
            tracing::warn!(code = ?code, error = message, "Cannot reach kas; retrying with backoff")
        }
    }
}

/// The agent's pool of tunnel streams.
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool over `channel` (a lazily connecting channel to kas) serving `handlers`.
    pub fn new(
        cfg: PoolConfig,
        channel: Channel,
        meta: AgentMeta,
        handlers: HashMap<String, Arc<dyn Handler>>,
    ) -> Self {
        let client = ReverseTunnelClient::new(channel)
            .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE);
        let mut services: Vec<String> = handlers.keys().cloned().collect();
        services.sort();
        let (state, _) = watch::channel(ConnState::Connecting);
        Self {
            shared: Arc::new(Shared {
                cfg,
                client,
                meta,
                services,
                handlers,
                counts: Mutex::new(PoolStats::default()),
                wake: Notify::new(),
                state,
                lost_at: Mutex::new(None),
                metrics: Metrics::default(),
            }),
        }
    }

    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.shared.metrics;
        reg.register("tunnel_idle_streams", "Idle tunnel streams", m.idle.clone());
        reg.register(
            "tunnel_busy_streams",
            "Tunnel streams serving a request",
            m.busy.clone(),
        );
        reg.register(
            "tunnel_requests_served",
            "Requests served through the tunnel",
            m.served.clone(),
        );
        reg.register(
            "tunnel_open_failures",
            "Failed attempts to open a tunnel stream",
            m.open_failures.clone(),
        );
    }

    /// Follows the connection state (readiness is `Connected`).
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.shared.state.subscribe()
    }

    pub fn stats(&self) -> PoolStats {
        *self.shared.counts()
    }

    /// Keeps the pool at its target size until `shutdown` fires, then drains it: idle streams
    /// close at once (kas routes new requests to other replicas), and requests being served get
    /// up to `drain_timeout` to finish. Cutting them instead gave CI jobs a 502 for every
    /// request in flight during an agentk rollout.
    pub async fn run(&self, shutdown: CancellationToken) {
        self.keep_open(&shutdown).await;
        self.let_requests_finish(self.shared.cfg.drain_timeout)
            .await;
    }

    /// Waits until no stream is busy, or `timeout`; what still runs then (a watch, an exec
    /// session) is cut when agentk exits.
    async fn let_requests_finish(&self, timeout: Duration) {
        let busy = self.stats().busy;
        if busy > 0 {
            tracing::info!(
                requests = busy,
                timeout = ?timeout,
                "Stopping: waiting for tunnelled requests to finish"
            );
        }
        // Every stream, not only the busy ones: an idle stream may take a request kas sent
        // just before the stop, and turn busy after a count of busy ones said none.
        // And the streams closing: kas must read their `CloseUnused` before agentk exits, or
        // a request it sent on one at the last moment fails instead of going elsewhere.
        let open = |c: &PoolStats| c.opening + c.idle + c.busy + c.closing;
        let shared = &self.shared;
        let idle = async {
            loop {
                let woken = shared.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if open(&shared.counts()) == 0 {
                    return;
                }
                woken.await;
            }
        };
        if tokio::time::timeout(timeout, idle).await.is_err() {
            tracing::warn!(
                requests = self.stats().busy,
                timeout = ?timeout,
                "Tunnelled requests still running at the drain deadline are cut (long-lived watches, exec or port-forward sessions)"
            );
        }
    }

    async fn keep_open(&self, shutdown: &CancellationToken) {
        let shared = &self.shared;
        let mut at_cap = false;
        loop {
            let failures = shared.counts().failures;
            if failures > 0 {
                let delay = shared.cfg.backoff.delay(failures, rand::random::<f64>());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            let to_open = {
                let mut c = shared.counts();
                warn_at_capacity(&c, &shared.cfg, &mut at_cap);
                let n = streams_to_open(&c, &shared.cfg);
                c.opening += n;
                if n > 0 {
                    c.attempts += 1;
                }
                (n, c.attempts)
            };
            let (to_open, attempt) = to_open;
            for _ in 0..to_open {
                tokio::spawn(
                    stream_task(Arc::clone(shared), attempt, shutdown.clone())
                        .instrument(tracing::Span::current()),
                );
            }
            tokio::select! {
                () = shared.wake.notified() => {}
                () = shutdown.cancelled() => break,
            }
        }
    }
}

/// How many streams to open now, given the pool's counts: none while enough are idle or on
/// their way; a single probe until a stream gets through (a refused token or an unreachable kas
/// then costs one attempt per backoff step); otherwise the idle ones missing, or a whole
/// `scale_up_step` when requests took them (some are busy). Never beyond `max_streams`.
///
/// Without requests there is no burst: a connect or reconnect opens `min_idle` streams, not
/// `1 + scale_up_step` per agent (a fleet reconnecting after a kas restart made kas hold eleven
/// streams per agent, about three times its memory, until the surplus idled out).
fn streams_to_open(c: &PoolStats, cfg: &PoolConfig) -> usize {
    let want = cfg.min_idle.max(1);
    let ready = c.opening + c.idle;
    let n = if ready >= want {
        0
    } else if c.failures > 0 || !c.connected {
        usize::from(c.opening == 0)
    } else if c.busy > 0 {
        (want - ready).max(cfg.scale_up_step)
    } else {
        want - ready
    };
    let room = cfg.max_streams.saturating_sub(ready + c.busy);
    n.min(room)
}

/// Every stream the pool may open carries a request: kas's next requests wait, and fail after
/// its tunnel wait timeout. Said once when it starts and once when it ends, so the user sees
/// the limit rather than a connection problem.
fn warn_at_capacity(c: &PoolStats, cfg: &PoolConfig, at_cap: &mut bool) {
    let full = c.idle == 0 && c.opening == 0 && c.busy >= cfg.max_streams;
    if full && !*at_cap {
        tracing::warn!(
            max_streams = cfg.max_streams,
            "All tunnel streams are busy (--tunnel-max-streams): kas's next requests wait and fail after its tunnel wait timeout; raise the limit or end long-lived requests (watches, exec, port-forward)"
        );
    } else if !full && *at_cap {
        tracing::info!("A tunnel stream is free again");
    }
    *at_cap = full;
}

/// Opens one stream, waits idle for a request and serves it; again on the same stream while
/// requests end cleanly on both sides (kas then reuses it), else ends.
async fn stream_task(shared: Arc<Shared>, attempt: u64, shutdown: CancellationToken) {
    // Seen before the token is read: a change racing the open reopens the stream once more
    // rather than leaving it on the old token.
    let mut rotations = shared.meta.token.changes();
    rotations.borrow_and_update();
    let Some((mut inbound, mut tx)) = open_stream(&shared, attempt, &shutdown).await else {
        return;
    };
    shared.update(|c| {
        c.opening -= 1;
        c.idle += 1;
        if c.failures_before.0 != attempt {
            c.failures_before = (attempt, c.failures);
        }
        c.failures = 0;
        c.connected = true;
    });
    shared.set_state(ConnState::Connected, Cause::Lost);
    let opened = Opened {
        attempt,
        at: Instant::now(),
    };
    let mut fresh = Some(opened);
    loop {
        let waited = wait_for_request(&shared, inbound, fresh, &mut rotations, &shutdown).await;
        let (request, frames) = match waited {
            Idle::Request(request, frames) => (request, frames),
            Idle::Close(inbound) => {
                close_unused(inbound, tx).await;
                shared.update(|c| c.closing -= 1);
                return;
            }
            Idle::Ended => return,
        };
        fresh = None;
        shared.update(|c| {
            c.idle -= 1;
            c.busy += 1;
        });
        shared.metrics.served.inc();
        let reuse = serve(&shared, request, frames, tx).await;
        if shutdown.is_cancelled() {
            // Stopping: the stream closes rather than waits for the next request, and stays
            // counted busy until kas has it all (a reset would discard the response's tail).
            // kas may have parked it for its next request already: it learns that this one
            // was not taken.
            if let Some((inbound, tx)) = reuse {
                close_unused(inbound, tx).await;
            }
            shared.update(|c| c.busy -= 1);
            return;
        }
        shared.update(|c| {
            c.busy -= 1;
            c.idle += usize::from(reuse.is_some());
        });
        let Some((i, t)) = reuse else { return };
        (inbound, tx) = (i, t);
    }
}

/// Sends the descriptor and opens the `Connect` stream: kas's frames and the sender of ours.
/// `None` when it did not open; the stream's `opening` count is then already taken back.
///
/// Tried a second time, at once, when the first never left agentk (`Cancelled`: the channel's
/// connection was going away, as after kas's GOAWAY at the connection's maximum age): the
/// channel opens a new connection for the second. kas ends its idle streams a moment after
/// that GOAWAY, and each opened again hit the old connection once, turning the tunnel off for
/// a backoff step at every rotation.
async fn open_stream(
    shared: &Shared,
    attempt: u64,
    shutdown: &CancellationToken,
) -> Option<(Streaming<ServerFrame>, mpsc::Sender<AgentFrame>)> {
    let mut status = None;
    for _ in 0..2 {
        match try_open_stream(shared, shutdown).await {
            Opening::Opened(stream) => return Some(*stream),
            Opening::Stopped => {
                shared.update(|c| c.opening -= 1);
                return None;
            }
            Opening::Failed(s) if s.code() == Code::Cancelled && status.is_none() => {
                tracing::debug!(error = %status_text(&s), "A tunnel stream did not leave on a closing connection; opening it again");
                status = Some(s);
            }
            Opening::Failed(s) => {
                status = Some(s);
                break;
            }
        }
    }
    if let Some(status) = status {
        open_failed(shared, attempt, &status);
    }
    None
}

/// How one try to open a stream ended.
enum Opening {
    Opened(Box<(Streaming<ServerFrame>, mpsc::Sender<AgentFrame>)>),
    Failed(tonic::Status),
    /// agentk is stopping.
    Stopped,
}

async fn try_open_stream(shared: &Shared, shutdown: &CancellationToken) -> Opening {
    let (tx, rx) = mpsc::channel::<AgentFrame>(2);
    let descriptor = AgentFrame {
        frame: Some(agent_frame::Frame::Descriptor(Descriptor {
            services: shared.services.clone(),
            // `serve` answers before it writes any byte and reads kas's bytes only after.
            data_with_request: true,
            reusable: true,
        })),
    };
    if tx.send(descriptor).await.is_err() {
        return Opening::Stopped;
    }
    let req = connect_request(&shared.meta, ReceiverStream::new(rx));
    let mut client = shared.client.clone();
    tokio::select! {
        r = client.connect(req) => match r {
            Ok(resp) => Opening::Opened(Box::new((resp.into_inner(), tx))),
            Err(status) => Opening::Failed(status),
        },
        () = shutdown.cancelled() => Opening::Stopped,
    }
}

/// When and in which attempt a stream opened, while it has not served a request yet.
#[derive(Debug, Clone, Copy)]
struct Opened {
    attempt: u64,
    at: Instant,
}

/// A stream kas ends this soon after opening it, before any request, was refused rather than
/// lost: a kas that answers and then ends every stream (it began to stop between the two) would
/// otherwise be retried at once, again and again, as if each stream had been a connection.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// Whether a lost stream counts as a failed attempt (the backoff grows) rather than as the
/// loss of a working connection (the pool probes again at once).
fn refused_after_opening(opened: Option<Opened>, now: Instant) -> Option<u64> {
    let o = opened?;
    (now.saturating_duration_since(o.at) < REFUSED_WITHIN).then_some(o.attempt)
}

/// Counts one failure per attempt (batch), however many of its streams fail.
fn count_failed_attempt(c: &mut PoolStats, attempt: u64) {
    if c.failed_attempt != attempt {
        c.failed_attempt = attempt;
        c.failures = c.failures.saturating_add(1);
    }
}

/// The `Connect` request: our frames plus who we are (token, version, pod) as metadata.
fn connect_request<T>(meta: &AgentMeta, frames: T) -> tonic::Request<T> {
    meta.request(frames)
}

impl AgentMeta {
    /// A request carrying `message` and who we are as metadata: the token as it is now (a
    /// token metadata cannot carry goes without, and kas answers UNAUTHENTICATED), the
    /// version and the pod (which tells kas apart the agent's replicas).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        let md = req.metadata_mut();
        if let Ok(v) = metadata::bearer(&self.token.current()) {
            md.insert(metadata::AUTHORIZATION, v);
        }
        let cluster_id = self.cluster_id.current();
        for (k, v) in [
            (metadata::AGENT_VERSION, &self.version),
            (metadata::POD_NAME, &self.pod_name),
            (metadata::POD_NAMESPACE, &self.pod_namespace),
            (metadata::CLUSTER_ID, &cluster_id),
        ] {
            if let Ok(v) = AsciiMetadataValue::try_from(v.as_str()) {
                md.insert(k, v);
            }
        }
        req
    }
}

/// Counts a refused or failed `Connect`: once per attempt (batch), so the backoff grows by one
/// step however many streams of the batch fail.
fn open_failed(shared: &Shared, attempt: u64, status: &tonic::Status) {
    shared.metrics.open_failures.inc();
    shared.update(|c| {
        c.opening -= 1;
        count_failed_attempt(c, attempt);
        c.connected = false;
    });
    shared.set_state(
        ConnState::Failed {
            code: status.code(),
            message: status_text(status),
        },
        Cause::OpenFailed { attempt },
    );
}

/// How an idle stream's wait ended.
enum Idle {
    /// kas routed a request to the stream.
    Request(RequestInfo, Streaming<ServerFrame>),
    /// The agent closes the stream without a request (it stops, or the stream idled out
    /// above `min_idle`): counted `closing`, see [`close_unused`].
    Close(Streaming<ServerFrame>),
    /// The stream ended: kas closed it, or it failed.
    Ended,
}

/// Keeps the stream idle until kas routes a request to it, or the stream ends or is to close
/// first; the stream's `idle` count is then already taken back. `fresh` is set until the
/// stream serves a request. A stream opened before the token changed closes instead of
/// waiting (the pool opens one with the new token), so the old token can be revoked without
/// cutting anything but requests that were being served with it.
async fn wait_for_request(
    shared: &Shared,
    mut inbound: Streaming<ServerFrame>,
    fresh: Option<Opened>,
    rotations: &mut watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> Idle {
    if rotations.has_changed().unwrap_or(false) {
        return close_for_new_token(shared, inbound);
    }
    loop {
        // Biased: a request kas already sent is served, not dropped by a stop arriving with
        // it (kas does not send a request again once a stream took it).
        tokio::select! {
            biased;
            msg = inbound.message() => match msg {
                Ok(Some(ServerFrame { frame: Some(server_frame::Frame::Request(info)) })) => {
                    return Idle::Request(info, inbound);
                }
                Ok(other) => {
                    // kas closed the stream (shutdown, connection age) or sent nonsense.
                    if let Some(f) = other {
                        tracing::warn!(frame = ?f, "Unexpected frame on an idle tunnel stream");
                    }
                    shared.update(|c| c.idle -= 1);
                    return Idle::Ended;
                }
                Err(status) => {
                    let refused = refused_after_opening(fresh, Instant::now());
                    idle_stream_failed(shared, &status, refused);
                    return Idle::Ended;
                }
            },
            () = tokio::time::sleep(shared.cfg.idle_timeout) => {
                if release_surplus_idle(shared) {
                    return Idle::Close(inbound);
                }
            }
            Ok(()) = rotations.changed() => return close_for_new_token(shared, inbound),
            () = shutdown.cancelled() => {
                shared.update(|c| {
                    c.idle -= 1;
                    c.closing += 1;
                });
                return Idle::Close(inbound);
            }
        }
    }
}

/// An idle stream opened with the previous token closes (counted `closing`).
fn close_for_new_token(shared: &Shared, inbound: Streaming<ServerFrame>) -> Idle {
    shared.update(|c| {
        c.idle -= 1;
        c.closing += 1;
    });
    tracing::debug!("An idle tunnel stream opened with the previous agent token closes");
    Idle::Close(inbound)
}

/// An idle stream ended with an error: unless we cancelled it, kas went away, so the pool
/// probes with one stream before opening a burst. `refused` names the attempt of a stream
/// ended right after opening, which counts as that attempt failing (see [`REFUSED_WITHIN`]).
fn idle_stream_failed(shared: &Shared, status: &tonic::Status, refused: Option<u64>) {
    let lost = status.code() != Code::Cancelled;
    shared.update(|c| {
        c.idle -= 1;
        if lost {
            c.connected = false;
            if let Some(attempt) = refused {
                shared.metrics.open_failures.inc();
                if c.failures_before.0 == attempt {
                    c.failures = c.failures.max(c.failures_before.1);
                }
                count_failed_attempt(c, attempt);
            }
        }
    });
    if lost {
        let cause = match (refused, shared.silent_for()) {
            (Some(attempt), _) => Cause::OpenFailed { attempt },
            (None, Some(quiet)) => Cause::Silent(quiet),
            (None, None) if closed_under(status) => Cause::Closed,
            (None, None) => Cause::Lost,
        };
        shared.set_state(
            ConnState::Failed {
                code: status.code(),
                message: status_text(status),
            },
            cause,
        );
    }
}

/// After `idle_timeout`: true (and the stream counted `closing` instead of idle) if there are
/// more idle streams than `min_idle`, so this one closes.
fn release_surplus_idle(shared: &Shared) -> bool {
    let mut c = shared.counts();
    if c.idle <= shared.cfg.min_idle {
        return false;
    }
    c.idle -= 1;
    c.closing += 1;
    drop(c);
    shared.update(|_| {});
    true
}

/// Serves one request; the stream back if the request ended cleanly on both sides (it may
/// carry the next one), else `None` once the stream is drained.
async fn serve(
    shared: &Shared,
    request: RequestInfo,
    inbound: Streaming<ServerFrame>,
    tx: mpsc::Sender<AgentFrame>,
) -> Option<(Streaming<ServerFrame>, mpsc::Sender<AgentFrame>)> {
    let Some(handler) = shared.handlers.get(&request.service).cloned() else {
        let refuse = AgentFrame {
            frame: Some(agent_frame::Frame::Error(tether_protocol::tunnel::Error {
                code: Code::Unimplemented as i32,
                message: format!("this agent does not serve {:?}", request.service),
            })),
        };
        if tx.send(refuse).await.is_ok() {
            drain(inbound, &request.service).await;
        }
        return None;
    };
    let accept = AgentFrame {
        frame: Some(agent_frame::Frame::Header(ResponseHeader {
            metadata: HashMap::new(),
        })),
    };
    tx.send(accept).await.ok()?;
    let service = request.service.clone();
    let (back, returned) = oneshot::channel();
    let pipe = Pipe {
        reader: FrameReader::new(inbound),
        writer: FrameWriter::plain(tx),
        extra: (),
    };
    if let Err(e) = handler.serve(request, Returning::new(pipe, back)).await {
        tracing::debug!(service, error = %e, "Tunnelled request ended with an error");
    }
    // The connection may outlive the handler (an upgraded exec session keeps reading); the
    // stream comes back when the connection is dropped.
    let ended = returned.await.ok()?;
    reusable(ended, &service).await
}

/// The stream back from a request, if kas may send the next one on it: this side ended
/// cleanly and kas's `CloseSend` was read (or is the next frame). Otherwise drains it.
async fn reusable(
    ended: Ended<Streaming<ServerFrame>, AgentFrame>,
    service: &str,
) -> Option<(Streaming<ServerFrame>, mpsc::Sender<AgentFrame>)> {
    let clean = ended.clean();
    let mut frames = ended.frames;
    if clean && !ended.peer_closed {
        // This side closed first (e.g. the API server ended the connection): kas answers
        // with its close unless it still had bytes to send.
        match tokio::time::timeout(DRAIN_TIMEOUT, frames.message()).await {
            Ok(Ok(Some(ServerFrame {
                frame: Some(server_frame::Frame::CloseSend(_)),
            }))) => return Some((frames, ended.sender?)),
            Ok(Ok(None) | Err(_)) | Err(_) => return None,
            Ok(Ok(Some(_))) => {
                // kas had bytes this side did not read, so the stream is not kept; kas,
                // having read this side's close, may park it for its next request: tell it
                // that no request is taken on it any more.
                if let Some(tx) = &ended.sender {
                    let _ = tx.try_send(close_unused_frame());
                }
            }
        }
    } else if clean {
        return Some((frames, ended.sender?));
    }
    if !ended.closed
        && let Some(tx) = &ended.sender
    {
        // This side ended mid-answer (the API server's connection broke under a watch): kas
        // still waits for the rest, and the drain below for kas, until its timeout (a watch
        // through kas stayed open 30 s, its client missing every event). The error tells kas
        // that the answer fails here, after every byte sent before it: kas fails it too (an
        // error, not a clean end its caller could take for a complete answer) and ends the
        // stream, which it never keeps for another request.
        let _ = tx.try_send(cut_short_frame());
    }
    drain(frames, service).await;
    None
}

/// Tells kas that this side of a request failed before its end.
fn cut_short_frame() -> AgentFrame {
    AgentFrame {
        frame: Some(agent_frame::Frame::Error(tether_protocol::tunnel::Error {
            code: Code::Unavailable as i32,
            message: format!(
                "{} (its connection to the Kubernetes API server broke, or it failed)",
                tether_protocol::CUT_SHORT
            ),
        })),
    }
}

/// Ends a stream the agent serves no request on (it stops, the stream idled out, or the
/// stream is not kept after a request). `CloseUnused` goes first: kas may have chosen the
/// stream for a request at this very moment, and learns that the request was not taken, so
/// it sends it on another stream instead of failing it (a 502 for a CI job during an agentk
/// rollout). No request is read after it; the half-close follows, and a drain rather than a
/// reset, which could discard the frame before kas reads it.
async fn close_unused(inbound: Streaming<ServerFrame>, tx: mpsc::Sender<AgentFrame>) {
    // Never waits: a stream between requests has nothing queued, and a full channel means a
    // stuck connection, where the drain's timeout ends it as before.
    if tx.try_send(close_unused_frame()).is_err() {
        tracing::debug!("Could not tell kas that a tunnel stream closes unused");
    }
    drop(tx);
    drain(inbound, "none (closing unused)").await;
}

fn close_unused_frame() -> AgentFrame {
    AgentFrame {
        frame: Some(agent_frame::Frame::CloseUnused(CloseUnused {})),
    }
}

/// Reads, and discards, kas's frames until kas ends the stream. Dropping the stream early
/// would reset the HTTP/2 stream, and a reset discards what kas has not read yet (the tail of
/// a response, or the refusal). A misbehaving peer does not pin the task: it gives up after
/// [`DRAIN_TIMEOUT`].
async fn drain(mut inbound: Streaming<ServerFrame>, service: &str) {
    let until_end = async { while let Ok(Some(_)) = inbound.message().await {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, until_end)
        .await
        .is_err()
    {
        tracing::debug!(service, "kas did not end the tunnel stream in time");
    }
}

/// How long a finished request waits for kas to end its side of the stream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A routed request on the agent side: a bidirectional byte pipe to the caller in kas, read
/// straight from the gRPC stream (no task or channel in between). Dropping it gives the stream
/// back to its task, to carry the next request or be drained.
pub type AgentConn = Returning<Streaming<ServerFrame>, AgentFrame>;

/// The `echo` service: copies every byte back, then closes. Used to check the tunnel end to end.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoHandler;

impl Handler for EchoHandler {
    fn serve(&self, _request: RequestInfo, conn: AgentConn) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let (mut r, mut w) = tokio::io::split(conn);
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(code: Code) -> ConnState {
        ConnState::Failed {
            code,
            message: String::new(),
        }
    }

    /// kas closing the connection at its maximum age ends every stream of a working
    /// connection, and fails the streams opening on it: one info line, no warning, unless a
    /// reconnect begun after it fails too.
    #[test]
    fn a_lost_connection_is_info_and_only_a_failed_reconnect_warns() {
        use FailureLog::{Failure, Reconnecting, Silent};
        let up = ConnState::Connected;
        let open = |attempt| Cause::OpenFailed { attempt };
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert_eq!(
                failure_log(&up, (code, ""), Cause::Lost, None),
                Reconnecting
            );
            // A stream opening on the connection as it closed may fail first: the same loss.
            assert_eq!(failure_log(&up, (code, ""), open(5), None), Reconnecting);
            // Attempts 1..=5 had begun at the loss. The other streams of the connection, and
            // those opening on it, end the same way or otherwise: nothing more.
            let lost = Some(5);
            assert_eq!(
                failure_log(&failed(code), (code, ""), Cause::Lost, lost),
                Silent
            );
            assert_eq!(
                failure_log(&failed(code), (code, ""), open(5), lost),
                Silent
            );
            let other = Code::Cancelled;
            assert_eq!(
                failure_log(&failed(code), (other, ""), open(4), lost),
                Silent
            );
            // The probe sent at once after the loss may still meet the ended connection.
            assert_eq!(
                failure_log(&failed(code), (other, ""), open(6), lost),
                Silent
            );
            // A reconnect after a backoff step fails: kas cannot be reached, whatever code.
            assert_eq!(
                failure_log(&failed(code), (code, ""), open(7), lost),
                Failure
            );
            assert_eq!(
                failure_log(&failed(code), (Code::DeadlineExceeded, ""), open(7), lost),
                Failure
            );
            // ... once: the next retries are quiet, as before.
            assert_eq!(
                failure_log(&failed(code), (code, ""), open(8), None),
                Silent
            );
        }
        // kas unreachable from the start warns at once, as before.
        let connecting = ConnState::Connecting;
        assert_eq!(
            failure_log(&connecting, (Code::Unavailable, ""), open(1), None),
            Failure
        );
        // A revoked token ending the streams of a working connection is an error at once,
        // also right after a loss.
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            assert_eq!(failure_log(&up, (code, ""), Cause::Lost, None), Failure);
            let after_loss = failed(Code::Unknown);
            assert_eq!(
                failure_log(&after_loss, (code, ""), open(3), Some(5)),
                Failure
            );
            assert_eq!(
                failure_log(&failed(code), (code, ""), open(9), None),
                Silent
            );
        }
    }

    /// A retry failing for another reason with the same code is said (the first cause was
    /// fixed, a second one shows); failing again alike is not.
    #[test]
    fn a_new_cause_with_the_same_code_is_said() {
        let unavailable = |message: &str| ConnState::Failed {
            code: Code::Unavailable,
            message: message.into(),
        };
        let (name, expired) = ("certificate not valid for name", "certificate expired");
        let open = Cause::OpenFailed { attempt: 9 };
        let again = failure_log(&unavailable(name), (Code::Unavailable, name), open, None);
        assert_eq!(again, FailureLog::Silent);
        let other = failure_log(&unavailable(name), (Code::Unavailable, expired), open, None);
        assert_eq!(other, FailureLog::Failure);
        // The same cause with the numbers of this attempt: not new.
        let at = |t: u64, ago: u64| {
            format!(
                "certificate expired: verification time {t} (UNIX), but certificate is not valid after 1795978341 ({ago} seconds ago)"
            )
        };
        let later = failure_log(
            &unavailable(&at(1_795_978_362, 21)),
            (Code::Unavailable, &at(1_795_978_390, 49)),
            open,
            None,
        );
        assert_eq!(later, FailureLog::Silent);
        let not_yet = "certificate not valid yet: verification time 1795977511 (UNIX), but certificate is not valid before 1795977806 (295 seconds in future)";
        let changed = failure_log(
            &unavailable(&at(1_795_978_362, 21)),
            (Code::Unavailable, not_yet),
            open,
            None,
        );
        assert_eq!(changed, FailureLog::Failure, "another cause");
    }

    #[test]
    fn a_reconnect_says_kas_is_shutting_down_only_when_kas_said_so() {
        for closed in [false, true] {
            let stopping = reconnecting_message(Code::Unavailable, "kas is shutting down", closed);
            assert!(stopping.starts_with("kas is shutting down"), "{stopping}");
        }
        let body = "h2 protocol error: error reading a body from connection";
        let closed = reconnecting_message(Code::Unknown, body, true);
        assert!(closed.starts_with("kas closed the connection"), "{closed}");
        assert!(closed.contains("maximum age"), "{closed}");
        for (code, message) in [
            (Code::Unknown, body),
            (Code::Unavailable, "connection reset"),
            (Code::Internal, "kas is shutting down"),
        ] {
            let line = reconnecting_message(code, message, false);
            assert_eq!(
                line, "The connection to kas failed; reconnecting",
                "{code:?}"
            );
        }
    }

    /// A status whose error is a broken pipe (h2 wraps it in an `h2::Error`, which only h2
    /// builds: tunnel.rs's rotation test sees that one) is a connection closed under it.
    #[test]
    fn a_connection_closed_under_the_stream_is_told_from_one_failing() {
        let eof = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed");
        assert!(closed_under(&tonic::Status::from_error(Box::new(eof))));
        let tls_eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no close_notify");
        assert!(closed_under(&tonic::Status::from_error(Box::new(tls_eof))));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!closed_under(&tonic::Status::from_error(Box::new(reset))));
        assert!(!closed_under(&tonic::Status::unavailable(
            "kas is shutting down"
        )));
    }

    fn cfg() -> PoolConfig {
        PoolConfig {
            min_idle: 2,
            max_streams: 30,
            scale_up_step: 10,
            ..PoolConfig::default()
        }
    }

    fn counts(opening: usize, idle: usize, busy: usize) -> PoolStats {
        PoolStats {
            opening,
            idle,
            busy,
            connected: true,
            ..PoolStats::default()
        }
    }

    #[test]
    fn a_fresh_pool_probes_with_one_stream() {
        let fresh = PoolStats::default();
        assert_eq!(streams_to_open(&fresh, &cfg()), 1);
        let probing = PoolStats {
            opening: 1,
            ..fresh
        };
        assert_eq!(streams_to_open(&probing, &cfg()), 0);
    }

    #[test]
    fn after_failures_the_pool_probes_one_at_a_time() {
        let failed = PoolStats {
            failures: 3,
            ..counts(0, 0, 0)
        };
        assert_eq!(streams_to_open(&failed, &cfg()), 1);
    }

    #[test]
    fn once_connected_without_requests_only_the_missing_idle_streams_open() {
        // The probe got through: one more makes min_idle, not a step of ten.
        assert_eq!(streams_to_open(&counts(0, 1, 0), &cfg()), 1);
        assert_eq!(streams_to_open(&counts(1, 1, 0), &cfg()), 0);
        assert_eq!(streams_to_open(&counts(0, 2, 0), &cfg()), 0);
    }

    #[test]
    fn requests_taking_idle_streams_scale_up_by_a_step() {
        assert_eq!(streams_to_open(&counts(0, 1, 1), &cfg()), 10);
        assert_eq!(streams_to_open(&counts(0, 0, 5), &cfg()), 10);
        // Idle ones still on their way count.
        assert_eq!(streams_to_open(&counts(10, 0, 1), &cfg()), 0);
    }

    #[test]
    fn a_stream_ended_within_a_second_of_opening_and_before_any_request_was_refused() {
        let at = Instant::now();
        let opened = Some(Opened { attempt: 4, at });
        assert_eq!(refused_after_opening(opened, at), Some(4));
        let soon = at + Duration::from_millis(900);
        assert_eq!(refused_after_opening(opened, soon), Some(4));
        // A stream that lived, or served a request, was a connection: its loss is not a refusal.
        assert_eq!(refused_after_opening(opened, at + REFUSED_WITHIN), None);
        assert_eq!(refused_after_opening(None, at), None);
    }

    #[test]
    fn the_pool_never_opens_beyond_max_streams() {
        assert_eq!(streams_to_open(&counts(0, 0, 25), &cfg()), 5);
        assert_eq!(streams_to_open(&counts(0, 0, 30), &cfg()), 0);
        assert_eq!(streams_to_open(&counts(0, 1, 40), &cfg()), 0);
    }
}
