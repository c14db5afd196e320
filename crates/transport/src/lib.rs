//! How agentk reaches kas: gRPC over HTTP/2 (`grpc://`, `grpcs://`) or the same HTTP/2 carried
//! inside a WebSocket (`ws://`, `wss://`) for networks that only pass HTTP/1.1, with TLS.
//!
//! - Client (agentk): [`KasAddress`] + [`ClientOptions`] → [`connect`] → a tonic
//!   [`Channel`](tonic::transport::Channel).
//! - Server (kas): [`incoming`] turns a TCP listener into a stream of [`AgentIo`] for
//!   `tonic::transport::Server::serve_with_incoming*`, serving gRPC and WebSocket on one port.
//!
//! TLS uses rustls with the `ring` provider chosen explicitly, so nothing depends on a
//! process-wide default provider being installed.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

mod address;
mod auth_deadline;
mod client;
mod gate;
pub mod limits;
pub mod max_age;
mod proxy;
mod server;
mod sniff;
mod tls;
mod watched;
mod ws;

pub use address::{KasAddress, Scheme};
pub use auth_deadline::{AuthProof, mark_authenticated};
pub use client::{ClientOptions, connect, connect_lazy, connect_lazy_watched};
pub use gate::{Admission, Gate};
pub use limits::{
    CloseReason, ConnectionLimits, ListenerEvents, LogThrottle, Outage, OutageLog, Refusal,
};
pub use proxy::{NoProxy, ProxyError, ProxySettings, ProxyUrl};
pub use server::{
    AcceptOptions, AgentConnectInfo, AgentIo, DEFAULT_HANDSHAKE_TIMEOUT, Incoming,
    client_refused_certificate, incoming, incoming_with, remote_addr_of,
};
pub use tls::{
    MutualConfigs, MutualTls, MutualTlsFiles, ServedCertificate, ServerTls, Standing, Validity,
    check_client_name, https_connector, load_client_tls, load_served_tls, load_server_tls,
    peer_server_name, validity,
};
pub use watched::ReadActivity;
pub use ws::{WS_MAX_MESSAGE_SIZE, WS_SUBPROTOCOL, WsIo};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// HTTP/2 flow-control window of one stream (one tunnelled request).
///
/// In Rust's h2, bytes a stream has received but nobody has read yet hold *connection* window
/// too. If the connection window were no larger than a stream's, one request whose reader
/// stalls would stop every other request on the connection (head-of-line blocking, the flaw of
/// multiplexed tunnels). So the connection window is many stream windows wide: 128 requests
/// can stall at once before the others feel it.
pub const STREAM_WINDOW: u32 = 512 * 1024;
/// HTTP/2 flow-control window of a whole agent connection; see [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 128 * STREAM_WINDOW;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid kas address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },

    #[error("reading {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no PEM certificates found in {0}")]
    NoCertificates(PathBuf),
    #[error("invalid PEM in {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no usable root certificates in the system store: {0}")]
    NoNativeRoots(String),
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("TLS client certificate verifier: {0}")]
    ClientVerifier(String),

    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake: {0}")]
    TlsHandshake(#[source] io::Error),
    #[error("WebSocket handshake: {0}")]
    WebSocketHandshake(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("the server did not select the {WS_SUBPROTOCOL:?} WebSocket subprotocol")]
    SubprotocolNotSelected,
    #[error("connection closed during the handshake")]
    ClosedDuringHandshake,
    #[error("handshake I/O: {0}")]
    HandshakeIo(#[source] io::Error),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error(transparent)]
    Proxy(#[from] ProxyError),

    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

impl Error {
    /// Finds a transport [`Error`] in the source chain of any error, e.g. the
    /// `tonic::transport::Error` that [`connect`] or an RPC on its channel returns, so callers
    /// can tell a TLS failure from a refused connection.
    pub fn find_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(found) = e.downcast_ref::<Error>() {
                // A `Transport` wrapper may itself wrap the interesting error further down.
                if !matches!(found, Error::Transport(_)) {
                    return Some(found);
                }
            }
            cur = e.source();
        }
        None
    }
}

/// An error and its causes on one line: hyper's own messages ("client error (Connect)",
/// "connection error") hide the reason, which is in the causes.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Any byte stream a connection ends up as (TCP, TLS, WebSocket over either). Boxed so the
/// four transport combinations share one type without generics leaking into callers.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub(crate) type BoxIo = Box<dyn Io>;

/// Reads from `inner` into `buf`, for wrappers that look at what came: the outcome, and how
/// many bytes this read added at the end of `buf.filled()`.
pub(crate) fn poll_read_counting<S: AsyncRead + Unpin>(
    inner: &mut S,
    cx: &mut std::task::Context<'_>,
    buf: &mut tokio::io::ReadBuf<'_>,
) -> (std::task::Poll<io::Result<()>>, usize) {
    let before = buf.filled().len();
    let polled = std::pin::Pin::new(inner).poll_read(cx, buf);
    (polled, buf.filled().len() - before)
}

/// Implements `tokio::io::AsyncWrite` for a wrapper `$wrapper<S>` by forwarding every method to
/// its field `$field`, the vectored ones too: a wrapper that drops them makes hyper write frame
/// headers and bodies one small write (and one TLS record) at a time. For wrappers that only
/// watch reads (idle clocks, connection counts, replayed prefixes).
#[macro_export]
macro_rules! forward_async_write {
    ($wrapper:ident, $field:ident) => {
        impl<S: ::tokio::io::AsyncWrite + Unpin> ::tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }

            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
            }
        }
    };
}
