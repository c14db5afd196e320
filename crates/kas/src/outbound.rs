//! One HTTP/1.1 request to an agent (through its tunnel, or through the replica holding it),
//! driven by the task that waits for it.
//!
//! A hyper client connection is a future of its own, usually spawned as a task: the request
//! and each chunk of the answer then cross between that task and the proxy's, task switches
//! that on a loaded kas cost about as much as the rest of the request's work in kas. Here the
//! proxy's task polls the connection itself, first with the request and then with the answer's
//! body; only an upgrade (exec, port-forward), which outlives the answer, gets a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

/// Any byte stream an agent is reached over.
pub(crate) use tether_tunnel_server::Io;

type Conn<B> = Connection<TokioIo<Box<dyn Io>>, B>;

/// The connection, shareable between threads as response bodies must be: a tunnel stream is
/// not `Sync`, and the mutex is never locked (only reached through `&mut`, by `get_mut`).
type Driving<B> = std::sync::Mutex<Pin<Box<Conn<B>>>>;

/// Why a request to the agent got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("{}", with_causes(.0))]
    Http(#[from] hyper::Error),
    #[error("the credential was revoked")]
    Revoked,
}

/// A request the agent refused fails when kas first reads from the tunnel, and hyper's own
/// message ("connection error") would hide the agent's reason, which is in the cause.
pub(crate) use tether_transport::with_causes;

/// A connection to an agent that carries one request.
pub(crate) struct Outbound<B: Body + 'static> {
    sender: SendRequest<B>,
    conn: Conn<B>,
    /// Ends the connection (and so the agent's request) when the credential is revoked.
    revoked: CancellationToken,
}

impl<B> Outbound<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(crate) async fn handshake(
        io: Box<dyn Io>,
        revoked: CancellationToken,
    ) -> hyper::Result<Self> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        Ok(Self {
            sender,
            conn,
            revoked,
        })
    }

    /// Sends `req`; the answer's body drives the connection from then on. With `upgrade`
    /// the connection runs as its own task instead, so the upgraded stream outlives the body.
    pub(crate) async fn send(
        self,
        req: Request<B>,
        upgrade: bool,
    ) -> Result<Response<Driven<B>>, SendError> {
        let Self {
            mut sender,
            conn,
            revoked,
        } = self;
        if upgrade {
            tokio::spawn(async move {
                tokio::select! {
                    r = conn.with_upgrades() => if let Err(e) = r {
                        tracing::debug!(error = %e, "Tunnelled HTTP connection ended with an error");
                    },
                    () = revoked.cancelled() => {}
                }
            });
            let resp = sender.send_request(req).await?;
            return Ok(resp.map(|inner| Driven::new(inner, None, None)));
        }
        let mut conn = Some(std::sync::Mutex::new(Box::pin(conn)));
        let answer = {
            let mut answer = std::pin::pin!(sender.send_request(req));
            let answered = std::future::poll_fn(|cx| {
                poll_conn(&mut conn, cx);
                answer.as_mut().poll(cx)
            });
            tokio::select! {
                r = answered => r?,
                // Dropping the connection ends the agent's request.
                () = revoked.cancelled() => return Err(SendError::Revoked),
            }
        };
        Ok(answer.map(|inner| Driven::new(inner, conn, Some(sender))))
    }
}

/// Polls the connection while it runs; `None` once it ended (its outcome is the answer's).
fn poll_conn<B>(conn: &mut Option<Driving<B>>, cx: &mut Context<'_>)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(c) = conn
        && let Poll::Ready(r) = c
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
            .poll(cx)
    {
        if let Err(e) = r {
            tracing::debug!(error = %e, "Tunnelled HTTP connection ended with an error");
        }
        *conn = None;
    }
}

/// The agent's answer, whose reading drives the connection it comes over.
pub(crate) struct Driven<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    inner: Incoming,
    conn: Option<Driving<B>>,
    /// Kept until the answer ends: dropping it tells the connection no request follows.
    sender: Option<SendRequest<B>>,
}

impl<B> Driven<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(inner: Incoming, conn: Option<Driving<B>>, sender: Option<SendRequest<B>>) -> Self {
        Self {
            inner,
            conn,
            sender,
        }
    }
}

impl<B> Drop for Driven<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// After a complete answer, what is left of the connection (its clean close, so that the
    /// tunnel stream can carry another request) runs on its own. An answer cut short (its
    /// caller went away, or its access ended) drops the connection here instead: closed
    /// cleanly, kas's half-close would reach agentk mid-response, agentk could not answer
    /// with its own close, and kas kept the stream (and agentk its busy slot) for the whole
    /// wait for that close, 5 s after every cancelled watch or revoked token.
    fn drop(&mut self) {
        let complete = self.sender.is_none() || self.inner.is_end_stream();
        self.sender = None;
        if !complete {
            self.conn = None;
            return;
        }
        if let (Some(conn), Ok(rt)) = (self.conn.take(), tokio::runtime::Handle::try_current()) {
            let conn = conn
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rt.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "Tunnelled HTTP connection ended with an error");
                }
            });
        }
    }
}

impl<B> Body for Driven<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        poll_conn(&mut this.conn, cx);
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        // hyper stops reading a body that says it ended, so its end is seen here either way.
        if frame.is_none() || this.inner.is_end_stream() {
            // The answer is complete: without a sender the connection closes its side cleanly
            // (so the tunnel stream can carry another request), usually within this poll.
            this.sender = None;
            poll_conn(&mut this.conn, cx);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
