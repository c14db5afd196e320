//! kas's side: accepting agents on one port that serves both gRPC and WebSocket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::Stream;
use http::header::SEC_WEBSOCKET_PROTOCOL;
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::auth_deadline::{AuthDeadline, AuthProof};
use crate::gate::{Admission, Gate};
use crate::limits::{CloseReason, ConnectionLimits, ListenerEvents, NoEvents};
use crate::max_age::{MaxAge, Rotation};
use crate::ws::{WS_SUBPROTOCOL, WsIo, ws_config};
use crate::{BoxIo, Error, Result, Scheme, ServerTls};

/// Default for how long a new connection may take for TLS, protocol detection and the
/// WebSocket upgrade.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections still in their handshake at once; beyond this we stop accepting for a moment
/// rather than let a flood of idle sockets eat memory and file descriptors.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Who is on the other end of an [`AgentIo`]. tonic puts it into every request's extensions:
/// `request.extensions().get::<AgentConnectInfo>()` (or [`remote_addr_of`]).
#[derive(Debug, Clone)]
pub struct AgentConnectInfo {
    remote_addr: SocketAddr,
    scheme: Scheme,
    proof: Arc<AuthProof>,
    /// Cancelled when kas rotates the connection ([`crate::max_age`]).
    moving: CancellationToken,
}

impl AgentConnectInfo {
    fn new(remote_addr: SocketAddr, scheme: Scheme) -> Self {
        Self {
            remote_addr,
            scheme,
            proof: Arc::default(),
            moving: CancellationToken::new(),
        }
    }

    /// Cancelled a moment after kas sent the connection's GOAWAY at its maximum age: its idle
    /// tunnel streams end then, so the agent opens new ones on a new connection. Never
    /// cancelled on a listener without a maximum age.
    pub fn moving(&self) -> &CancellationToken {
        &self.moving
    }

    /// Whether the connection authenticated; see [`crate::mark_authenticated`].
    pub fn proof(&self) -> &AuthProof {
        &self.proof
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// How the agent connected, as it would be written in its kas address.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }
}

/// The agent's address for a request served over [`incoming`]. tonic's own
/// `Request::remote_addr()` only knows its built-in connection types, so it returns `None`
/// there; this falls back to it for requests served otherwise.
pub fn remote_addr_of<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<AgentConnectInfo>()
        .map(AgentConnectInfo::remote_addr)
        .or_else(|| request.remote_addr())
}

/// One accepted agent connection, ready for HTTP/2: TCP or TLS, directly or inside a WebSocket.
pub struct AgentIo {
    io: BoxIo,
    info: AgentConnectInfo,
    /// The connection's slot under the listener's caps, freed when the connection ends.
    admission: Option<Admission>,
    /// Until the connection authenticated, when it must have.
    deadline: Option<AuthDeadline>,
    rotation: Option<Rotation>,
}

impl std::fmt::Debug for AgentIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIo").field("info", &self.info).finish()
    }
}

impl AgentIo {
    pub fn remote_addr(&self) -> SocketAddr {
        self.info.remote_addr
    }

    pub fn scheme(&self) -> Scheme {
        self.info.scheme
    }
}

impl Connected for AgentIo {
    type ConnectInfo = AgentConnectInfo;

    fn connect_info(&self) -> AgentConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline
            && let Poll::Ready(expired) =
                deadline.poll_expired(cx, &this.info.proof, this.info.remote_addr)
        {
            expired?;
            this.deadline = None;
        }
        if let Some(rotation) = &mut this.rotation
            && let Poll::Ready(closed) = rotation.poll_closed(cx)
        {
            return Poll::Ready(Err(closed));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The stream [`incoming`] returns. Never yields an error: failed handshakes and accept errors
/// are logged, because an `Err` item would make tonic stop serving. Dropping it stops
/// accepting and closes the listener.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<AgentIo>,
    accept_task: AbortHandle,
}

impl Stream for Incoming {
    type Item = io::Result<AgentIo>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx).map(|io| io.map(Ok))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Accepts agents on `listener` for `Server::builder()...serve_with_incoming(_shutdown)`.
///
/// Each connection gets its TLS handshake (if `tls` is set) and protocol detection in its own
/// task with a timeout, so one slow client never holds up others: a connection starting with
/// the HTTP/2 preface is gRPC; anything else must be a WebSocket upgrade offering the
/// `ws-tunnel` subprotocol (otherwise it is refused with 400), after which HTTP/2 runs inside
/// the WebSocket.
///
/// Must be called within a tokio runtime.
pub fn incoming(listener: TcpListener, tls: Option<ServerTls>) -> Incoming {
    incoming_with(listener, tls, AcceptOptions::default())
}

/// Limits and reporting for [`incoming_with`].
#[derive(Clone)]
pub struct AcceptOptions {
    /// Longest a new connection may take for TLS, protocol detection and WebSocket upgrade.
    pub handshake_timeout: Duration,
    pub limits: ConnectionLimits,
    pub events: Arc<dyn ListenerEvents>,
    /// Longest a connection may go from its accept to its first authenticated request (see
    /// [`crate::mark_authenticated`]); `None`: no limit.
    pub auth_timeout: Option<Duration>,
    /// When connections are rotated ([`crate::max_age`]); `None`: never.
    pub max_age: Option<MaxAge>,
}

impl std::fmt::Debug for AcceptOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptOptions")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("limits", &self.limits)
            .field("auth_timeout", &self.auth_timeout)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl Default for AcceptOptions {
    /// The historical behaviour: a 10 s handshake limit and no connection caps.
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            limits: ConnectionLimits {
                max_connections: usize::MAX,
                max_connections_per_address: usize::MAX,
            },
            events: Arc::new(NoEvents),
            auth_timeout: None,
            max_age: None,
        }
    }
}

/// [`incoming`] with configurable handshake timeout, connection caps and event reporting.
pub fn incoming_with(
    listener: TcpListener,
    tls: Option<ServerTls>,
    options: AcceptOptions,
) -> Incoming {
    // Small: connections wait here only until tonic picks them up, which it does eagerly.
    let (tx, rx) = mpsc::channel(32);
    let acceptor = tls.map(TlsAcceptor::from);
    let task = tokio::spawn(accept_loop(listener, acceptor, tx, options));
    Incoming {
        rx,
        accept_task: task.abort_handle(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    tx: mpsc::Sender<AgentIo>,
    options: AcceptOptions,
) {
    let gate = Gate::new(options.limits, Arc::clone(&options.events));
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = Arc::clone(&pending).acquire_owned() => match permit {
                Ok(p) => p,
                // Only happens if the semaphore is closed, which we never do.
                Err(_) => return,
            },
        };
        let (tcp, remote_addr, admission) = tokio::select! {
            () = tx.closed() => return,
            accepted = gate.accept(&listener) => accepted,
        };
        let tx = tx.clone();
        let tls = tls.clone();
        let events = Arc::clone(&options.events);
        let limit = options.handshake_timeout;
        let (auth_timeout, max_age) = (options.auth_timeout, options.max_age);
        tokio::spawn(async move {
            let accepted = tokio::time::Instant::now();
            let result = tokio::time::timeout(limit, handshake(tcp, remote_addr, tls)).await;
            drop(permit);
            match result {
                Ok(Ok(mut io)) => {
                    io.admission = Some(admission);
                    io.deadline =
                        auth_timeout.map(|t| AuthDeadline::new(accepted, t, Arc::clone(&events)));
                    io.rotation = max_age.map(|m| {
                        let moving = io.info.moving.clone();
                        Rotation::new(tokio::time::Instant::now(), m, moving)
                    });
                    // Fails only when the server stopped; the connection is dropped with it.
                    let _ = tx.send(io).await;
                }
                Ok(Err(e)) if refused_certificate(&e) => {
                    events.certificate_refused(remote_addr, &format!("{e:#}"));
                }
                Ok(Err(e)) => {
                    tracing::debug!(remote_addr = %remote_addr, error = %e, "agent handshake failed");
                }
                Err(_) => events.closed(CloseReason::HandshakeTimeout, remote_addr),
            }
        });
    }
}

/// Whether a failed handshake is the client refusing kas's certificate (its fatal alert):
/// unlike a scanner's or a health check's connection dropped before its hello, that is an
/// operator's problem — after a bad certificate rotation every agent fails this way.
fn refused_certificate(e: &Error) -> bool {
    let Error::TlsHandshake(io) = e else {
        return false;
    };
    client_refused_certificate(io)
}

/// Whether a TLS handshake's failure `io` (as tokio-rustls returns it) is the client refusing
/// kas's certificate, for every TLS listener of kas.
pub fn client_refused_certificate(io: &io::Error) -> bool {
    use rustls::AlertDescription as A;
    let alert = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    matches!(
        alert,
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                // What rustls clients send for a certificate whose signature does not verify
                // (a CA of the same name but another key).
                | A::DecryptError
        ))
    )
}

async fn handshake(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
) -> Result<AgentIo> {
    // gRPC frames are small and latency-sensitive; Nagle would delay them.
    tcp.set_nodelay(true).map_err(Error::HandshakeIo)?;
    match tls {
        None => detect(tcp, remote_addr, false).await,
        Some(acceptor) => {
            let stream = acceptor.accept(tcp).await.map_err(Error::TlsHandshake)?;
            detect(stream, remote_addr, true).await
        }
    }
}

/// Tells gRPC from WebSocket by the first bytes and finishes the WebSocket upgrade if needed.
async fn detect<S>(mut stream: S, remote_addr: SocketAddr, tls: bool) -> Result<AgentIo>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Read only as far as the bytes still match the preface: an HTTP/1.1 request differs
    // within its first bytes, and reading a fixed 24 could wait on a short request forever.
    let mut head = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < head.len() && H2_PREFACE.starts_with(&head[..filled]) {
        let n = stream
            .read(&mut head[filled..])
            .await
            .map_err(Error::HandshakeIo)?;
        if n == 0 {
            return Err(Error::ClosedDuringHandshake);
        }
        filled += n;
    }
    let is_h2 = head[..filled] == *H2_PREFACE;
    // The bytes read belong to the protocol: replay them to whoever reads next.
    let stream = Rewind {
        prefix: Bytes::copy_from_slice(&head[..filled]),
        inner: stream,
    };

    if is_h2 {
        let scheme = if tls { Scheme::Grpcs } else { Scheme::Grpc };
        return Ok(AgentIo {
            io: Box::new(stream),
            info: AgentConnectInfo::new(remote_addr, scheme),
            admission: None,
            deadline: None,
            rotation: None,
        });
    }

    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        select_subprotocol,
        Some(ws_config()),
    )
    .await
    .map_err(|e| Error::WebSocketHandshake(Box::new(e)))?;
    let scheme = if tls { Scheme::Wss } else { Scheme::Ws };
    Ok(AgentIo {
        io: Box::new(WsIo::new(ws)),
        info: AgentConnectInfo::new(remote_addr, scheme),
        admission: None,
        deadline: None,
        rotation: None,
    })
}

/// Accepts the upgrade only if the client offers `ws-tunnel`, and says so in the response (RFC
/// 6455 requires echoing exactly one offered subprotocol).
// The signature is tungstenite's callback type; the large error is its HTTP response.
#[allow(clippy::result_large_err)]
fn select_subprotocol(
    request: &Request,
    mut response: Response,
) -> std::result::Result<Response, ErrorResponse> {
    let offered = request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == WS_SUBPROTOCOL);
    if !offered {
        let mut refusal = ErrorResponse::new(Some(format!(
            "the {WS_SUBPROTOCOL} WebSocket subprotocol is required\n"
        )));
        *refusal.status_mut() = StatusCode::BAD_REQUEST;
        return Err(refusal);
    }
    response.headers_mut().insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    Ok(response)
}

/// A stream that first returns `prefix`, then reads from `inner`.
#[derive(Debug)]
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

crate::forward_async_write!(Rewind, inner);
