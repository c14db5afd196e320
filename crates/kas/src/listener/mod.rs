//! kas's HTTP/1.1 listeners (Kubernetes API proxy, internal API, webhooks) with the same
//! abuse limits: connection caps (global and per client address), a TLS handshake timeout, a
//! request-header timeout (slowloris) and an idle keep-alive timeout. The agent listener gets
//! its caps and handshake timeout from [`tether_transport::incoming_with`].

mod body_deadline;
pub mod certificates;
mod clock;
mod linger;
mod metrics;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tether_transport::{Admission, CloseReason, Gate, ListenerEvents, ServerTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use body_deadline::{BODY_TIMEOUT, bound_body};
pub use clock::{Phase, Timeouts};
pub use metrics::{Events, LOG_INTERVAL, ListenerMetrics};

/// One bound HTTP listener with its limits.
pub struct HttpListener {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub handshake_timeout: Duration,
    pub timeouts: Timeouts,
    pub gate: Gate,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .field("timeouts", &self.timeouts)
            .field("gate", &self.gate)
            .finish()
    }
}

/// A TLS acceptor offering only HTTP/1.1: these listeners do not speak h2, and a client that
/// negotiated it would speak a protocol the server does not (upgrades need HTTP/1.1 anyway).
pub fn http1_tls(tls: ServerTls) -> TlsAcceptor {
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(cfg))
}

/// What each connection of a listener needs of it: not the socket, which closes when
/// [`serve_http`] returns.
struct PerConnection {
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    timeouts: Timeouts,
    events: Arc<dyn ListenerEvents>,
}

/// Serves `handler` on `l` until `shutdown`, then closes the listening socket (connections
/// already open finish on their own). Every request carries the client's address as an
/// `axum::extract::ConnectInfo<SocketAddr>` extension.
pub async fn serve_http<F, Fut, B, E>(l: HttpListener, handler: F, shutdown: CancellationToken)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    // Connections hold only what they need: one holding the whole listener (a watch open
    // for minutes) kept the socket listening after shutdown, so new clients were accepted by
    // the kernel, never answered, and reset when kas exited — instead of refused at once.
    let HttpListener {
        listener,
        tls,
        handshake_timeout,
        timeouts,
        gate,
    } = l;
    let each = Arc::new(PerConnection {
        tls,
        handshake_timeout,
        timeouts,
        events: Arc::clone(gate.events()),
    });
    loop {
        let (tcp, peer, admission) = tokio::select! {
            a = gate.accept(&listener) => a,
            () = shutdown.cancelled() => return,
        };
        // Small request/response exchanges; Nagle would delay them.
        let _ = tcp.set_nodelay(true);
        let (l, handler) = (Arc::clone(&each), handler.clone());
        tokio::spawn(async move {
            let events = &l.events;
            let Some(tls) = &l.tls else {
                return serve_io(tcp, admission, peer, &l, events, handler).await;
            };
            match tokio::time::timeout(l.handshake_timeout, tls.accept(tcp)).await {
                Ok(Ok(s)) => serve_io(s, admission, peer, &l, events, handler).await,
                Ok(Err(e)) if tether_transport::client_refused_certificate(&e) => {
                    events.certificate_refused(peer, &e.to_string());
                }
                Ok(Err(e)) => {
                    tracing::debug!(remote_addr = %peer, error = %e, "TLS handshake failed")
                }
                Err(_) => events.closed(CloseReason::HandshakeTimeout, peer),
            }
        });
    }
}

/// Largest request head (request line and headers) read: more is answered 431 at once. hyper's
/// default (about 400 KiB) let a head just under it wait for the header timeout and close
/// without an answer; Kubernetes clients send a few KB (a CI job's ID token is the largest).
const MAX_HEAD_BYTES: usize = 128 * 1024;

/// One connection: hyper's HTTP/1.1 server raced against the connection's deadline.
async fn serve_io<S, F, Fut, B, E>(
    io: S,
    admission: Admission,
    peer: SocketAddr,
    l: &PerConnection,
    events: &Arc<dyn ListenerEvents>,
    handler: F,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let clock = Arc::new(Clock::new());
    let io = Watched {
        inner: io,
        clock: Arc::clone(&clock),
        _admission: admission,
    };
    let c = Arc::clone(&clock);
    let cut = CutConnection(CancellationToken::new());
    let cut_requested = cut.0.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(cut.clone());
        let guard = InFlight::start(Arc::clone(&c));
        let response = handler(req);
        async move {
            let r = response.await?;
            Ok::<_, E>(r.map(|inner| Tracked {
                inner,
                _guard: guard,
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(linger::Lingering::new(io)), service)
        .with_upgrades();
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(remote_addr = %peer, error = %e, "HTTP connection ended with an error");
        },
        // Dropping the connection closes the socket; no request is in flight at a deadline.
        reason = clock.expired(l.timeouts) => events.closed(reason, peer),
        // A request whose access ended while its client was not reading (see CutConnection).
        () = cut_requested.cancelled() => events.closed(CloseReason::AccessEnded, peer),
    }
}

/// Cuts the connection a request arrived on (a request extension). A response body that fails
/// (a revoked watch) makes hyper close the connection only when hyper next polls the body, and
/// it polls only while the client reads: a client that stopped reading would keep a revoked
/// request, its tunnel slot and its tracking alive for as long as it likes. This ends it from
/// outside. HTTP/1.1 carries one request at a time, so only that request is cut.
#[derive(Debug, Clone)]
pub struct CutConnection(CancellationToken);

impl CutConnection {
    pub fn cut(&self) {
        self.0.cancel();
    }
}

/// A connection's [`Phase`], shared by its I/O, its requests and its watchdog.
#[derive(Debug)]
struct Clock {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Clock {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::new(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Phase) -> bool) {
        // A phase is two words updated in one statement: still valid after a panic elsewhere.
        let changed = f(&mut self.phase.lock().unwrap_or_else(PoisonError::into_inner));
        if changed {
            self.changed.notify_waiters();
        }
    }

    fn deadline(&self, t: &Timeouts) -> Option<(Instant, CloseReason)> {
        self.phase
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline(t)
    }

    /// Resolves with the reason once the connection's current deadline passes.
    async fn expired(&self, t: Timeouts) -> CloseReason {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before reading the phase, so a change in between is not missed.
            changed.as_mut().enable();
            match self.deadline(&t) {
                None => changed.await,
                Some((at, reason)) if at <= Instant::now() => return reason,
                Some((at, _)) => tokio::select! {
                    () = &mut changed => {}
                    () = tokio::time::sleep_until(at.into()) => {}
                },
            }
        }
    }
}

/// Marks a request in flight until its response body is finished or dropped.
#[derive(Debug)]
struct InFlight(Arc<Clock>);

impl InFlight {
    fn start(clock: Arc<Clock>) -> Self {
        clock.update(|p| {
            p.request_started();
            true
        });
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|p| {
            p.request_ended(Instant::now());
            true
        });
    }
}

/// A response body that keeps its request [`InFlight`].
#[derive(Debug)]
struct Tracked<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's byte stream: tells the clock when bytes arrive, and holds the
/// connection's slot under the caps for as long as the stream lives, including after an
/// upgrade hands it to an exec or port-forward session.
struct Watched<S> {
    inner: S,
    clock: Arc<Clock>,
    _admission: Admission,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.update(|p| p.on_read(Instant::now()));
        }
        r
    }
}

tether_transport::forward_async_write!(Watched, inner);

/// What an axum router answers a request with.
pub type AxumResponse =
    Pin<Box<dyn Future<Output = Result<Response<axum::body::Body>, Infallible>> + Send>>;

/// An axum router as a [`serve_http`] handler.
pub fn axum_handler(
    router: axum::Router,
) -> impl Fn(Request<Incoming>) -> AxumResponse + Clone + Send + Sync + 'static {
    move |req| {
        use tower::Service as _;
        // A Router is always ready, so calling without poll_ready is allowed.
        let mut router = router.clone();
        Box::pin(async move { router.call(req).await })
    }
}

/// Binds an HTTP listener as configured (`name` labels its metrics and logs).
pub async fn bind_http(
    name: &'static str,
    listen: &crate::config::Listen,
    defaults: crate::config::ListenLimits,
    metrics: &ListenerMetrics,
) -> anyhow::Result<HttpListener> {
    use anyhow::Context as _;
    let limits = listen.limits(defaults);
    let tls = match (&listen.certificate_file, &listen.key_file) {
        (Some(c), Some(k)) => {
            let (tls, served) = tether_transport::load_served_tls(c, k)
                .with_context(|| format!("loading the {name} listener's TLS files"))?;
            metrics.certificates.follow(name, served);
            Some(http1_tls(tls))
        }
        _ => None,
    };
    let listener = TcpListener::bind(listen.address())
        .await
        .with_context(|| format!("binding the {name} listener to {}", listen.address()))?;
    Ok(HttpListener {
        listener,
        tls,
        handshake_timeout: limits.handshake_timeout,
        timeouts: Timeouts {
            header: limits.header_timeout,
            idle: limits.idle_timeout,
        },
        gate: Gate::new(limits.connections(), Arc::new(metrics.events(name))),
    })
}

/// Warns when the caps of all listeners together exceed the process's file-descriptor limit:
/// then the caps no longer protect one listener (e.g. agents) from a flood on another.
pub fn check_descriptor_budget(total_caps: usize) {
    let Some(soft) = soft_nofile_limit() else {
        return;
    };
    // Descriptors for the database, Git, logs and outgoing connections.
    const RESERVE: usize = 256;
    if total_caps.saturating_add(RESERVE) > soft {
        tracing::warn!(
            total_caps,
            nofile_limit = soft,
            "The listeners' max_connections together exceed the open-files limit; raise the limit (ulimit -n) or lower the caps"
        );
    }
}

/// The soft RLIMIT_NOFILE, read from /proc (Linux) to avoid unsafe FFI.
fn soft_nofile_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
