//! Sending a request again on another stream when the agent closed the one it went on without
//! taking it.
//!
//! An agent closes idle streams (it stops, or has more idle than it keeps); kas may have chosen
//! one of them for a request at that very moment. The agent then answers `CloseUnused` instead
//! of a header: it read none of the request, so the same bytes can go on another stream, to
//! another replica of the agent or a fresh stream, without the API server seeing the request
//! twice. [`Resending`] is the request's byte pipe that does this underneath whoever writes and
//! reads it (an HTTP/1.1 client): it keeps a copy of the bytes written until the agent answers,
//! and on `CloseUnused` opens another stream, writes them again and goes on there.
//!
//! Only then: an answer (the agent took the request), a stream that ended without one (an
//! agent older than `CloseUnused`, a reset, a lost connection) or a request that wrote more
//! than [`RESEND_MAX_BYTES`] before the answer fails as before, since sending it again could
//! replay a write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::answer::{AnswerWatch, Answered, NOT_TAKEN};
use crate::registry::{MAX_RESENDS, OpenError, Registry};

/// Any byte stream a request goes over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A stream opened for the request, and the answer on it when kas can tell one (the agent's
/// on a tunnel here, another kas replica's on the hop between replicas; `None`: a stream that
/// cannot be resent from here).
pub struct Reopened {
    pub io: Box<dyn Io>,
    pub answer: Option<AnswerWatch>,
}

impl std::fmt::Debug for Reopened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopened")
            .field("answer", &self.answer)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Opens another stream for the request, waiting up to the given time for one (as a fresh
/// request waits); the error says why there was none.
pub type Reopen = Arc<dyn Fn(Duration) -> BoxFuture<Result<Reopened, String>> + Send + Sync>;

/// The most bytes of a request kept to send again: its head and a small body (a `kubectl
/// apply` of a few objects). A request that wrote more before the agent answered is not sent
/// again (a long upload; the agent answers within a round trip, so this is rare).
pub const RESEND_MAX_BYTES: usize = 64 * 1024;

/// A request's byte pipe that goes on another stream when the agent closed its stream without
/// taking it (see the module's documentation).
pub struct Resending {
    io: Option<Box<dyn Io>>,
    answer: Option<AnswerWatch>,
    /// Every byte written, while the agent has not taken the request and they fit in
    /// [`RESEND_MAX_BYTES`]; `None` once it took it or they do not.
    sent: Option<BytesMut>,
    /// This side was shut down (to do again on the next stream).
    shut: bool,
    reopening: Option<BoxFuture<io::Result<Reopened>>>,
    reopen: Reopen,
    deadline: Instant,
    resends: u32,
    resent: Counter,
}

impl std::fmt::Debug for Resending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resending")
            .field("answer", &self.answer)
            .field("resends", &self.resends)
            .finish_non_exhaustive()
    }
}

impl Resending {
    /// The request's pipe over `first`; `reopen` gives the next stream, until `deadline`, and
    /// `resent` counts each time it is used.
    pub fn new(first: Reopened, reopen: Reopen, deadline: Instant, resent: Counter) -> Self {
        let sent = first.answer.as_ref().map(|_| BytesMut::new());
        Self {
            io: Some(first.io),
            answer: first.answer,
            sent,
            shut: false,
            reopening: None,
            reopen,
            deadline,
            resends: 0,
            resent,
        }
    }

    /// How many times the request went on another stream.
    pub fn resends(&self) -> u32 {
        self.resends
    }

    fn not_taken(&self) -> bool {
        self.answer
            .as_ref()
            .is_some_and(|a| a.get() == Answered::NotTaken)
    }

    /// Stops keeping bytes once the agent answered (or the stream cannot tell).
    fn settle(&mut self) {
        let undecided = self
            .answer
            .as_ref()
            .is_some_and(|a| a.get() != Answered::Taken);
        if !undecided {
            self.sent = None;
        }
    }

    fn record(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let Some(sent) = &mut self.sent else { return };
        if sent.len() + n > RESEND_MAX_BYTES {
            self.sent = None;
            return;
        }
        for b in bufs {
            let take = b.len().min(n);
            sent.extend_from_slice(&b[..take]);
            n -= take;
            if n == 0 {
                break;
            }
        }
    }

    /// After `err` on the stream: whether the request goes on another stream (the agent did
    /// not take it, its bytes are all kept, and attempts and time are left). The stream is
    /// then given back and the next one opening.
    fn start_resend(&mut self, err: &io::Error) -> bool {
        if !self.not_taken() {
            return false;
        }
        let cannot = if self.sent.is_none() {
            Some("more of it was written before the agent answered than kas keeps to send again")
        } else if self.resends >= MAX_RESENDS {
            Some("it was sent again on other streams as many times as kas does")
        } else if Instant::now() >= self.deadline {
            Some("its time to wait for a stream is over")
        } else {
            None
        };
        if let Some(why) = cannot {
            tracing::warn!(error = %err, why, "The agent closed the tunnel stream without taking the request, which is not sent again");
            return false;
        }
        let Some(bytes) = self.sent.as_ref().map(|b| b.clone().freeze()) else {
            return false;
        };
        self.resends += 1;
        self.resent.inc();
        tracing::debug!(
            resends = self.resends,
            "The agent closed the tunnel stream without taking the request; sending it on another stream"
        );
        self.io = None;
        let (reopen, shut) = (Arc::clone(&self.reopen), self.shut);
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.reopening = Some(Box::pin(async move {
            let mut next = reopen(left).await.map_err(|e| {
                io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("{NOT_TAKEN}, and no other stream came for it: {e}"),
                )
            })?;
            next.io.write_all(&bytes).await?;
            if shut {
                next.io.shutdown().await?;
            }
            Ok(next)
        }));
        true
    }

    /// Drives the opening of the next stream, if one is opening.
    fn poll_reopening(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(f) = &mut self.reopening {
            let next = ready!(f.as_mut().poll(cx));
            self.reopening = None;
            let next = next?;
            self.io = Some(next.io);
            self.answer = next.answer;
            if self.answer.is_none() {
                self.sent = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn io(&mut self) -> io::Result<Pin<&mut Box<dyn Io>>> {
        self.io
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed"))
    }
}

impl AsyncRead for Resending {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_reopening(cx))?;
            let read = this.io()?.poll_read(cx, buf);
            // The agent's header may have been read even when no byte came yet.
            this.settle();
            match ready!(read) {
                Err(e) if this.start_resend(&e) => {}
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncWrite for Resending {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_reopening(cx))?;
            this.settle();
            match ready!(this.io()?.poll_write_vectored(cx, bufs)) {
                Ok(n) => {
                    this.record(bufs, n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if this.start_resend(&e) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_reopening(cx))?;
        this.io()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_reopening(cx))?;
            match ready!(this.io()?.poll_shutdown(cx)) {
                Ok(()) => {
                    this.shut = true;
                    return Poll::Ready(Ok(()));
                }
                Err(e) if this.start_resend(&e) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Registry {
    /// A request to `service` of agent `agent_id` through one of its tunnels here, sent again
    /// on another if the agent closes the stream without taking it; `timeout` bounds the
    /// waits for a tunnel, all together.
    pub async fn open_resending(
        self: &Arc<Self>,
        agent_id: i64,
        service: &str,
        metadata: std::collections::HashMap<String, String>,
        timeout: Duration,
    ) -> Result<Resending, OpenError> {
        let deadline = Instant::now() + timeout;
        let first = self
            .open_here(agent_id, service, metadata.clone(), timeout)
            .await?;
        Ok(self.resending(first, agent_id, service, metadata, deadline))
    }

    /// The request already sent on `first`, sent again through tunnels here as
    /// [`Registry::open_resending`] does.
    pub fn resending(
        self: &Arc<Self>,
        first: Reopened,
        agent_id: i64,
        service: &str,
        metadata: std::collections::HashMap<String, String>,
        deadline: Instant,
    ) -> Resending {
        let (registry, service) = (Arc::clone(self), service.to_string());
        let reopen: Reopen = Arc::new(move |left| {
            let (registry, service, metadata) =
                (Arc::clone(&registry), service.clone(), metadata.clone());
            Box::pin(async move {
                registry
                    .open_here(agent_id, &service, metadata, left)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Resending::new(first, reopen, deadline, self.resent_counter())
    }

    /// One tunnel of the agent here carrying the request, and the agent's answer on it.
    pub async fn open_here(
        &self,
        agent_id: i64,
        service: &str,
        metadata: std::collections::HashMap<String, String>,
        wait: Duration,
    ) -> Result<Reopened, OpenError> {
        let tunnel = self.get_tunnel(agent_id, wait).await?;
        let answer = tunnel.answer();
        let conn = tunnel.request(service, metadata).await?;
        Ok(Reopened {
            io: Box::new(conn),
            answer: Some(answer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe(answer: Option<AnswerWatch>) -> Resending {
        let (io, _other) = tokio::io::duplex(64);
        let reopen: Reopen = Arc::new(|_| Box::pin(async { Err("none".to_string()) }));
        let first = Reopened {
            io: Box::new(io),
            answer,
        };
        Resending::new(first, reopen, Instant::now(), Counter::default())
    }

    #[test]
    fn bytes_are_kept_until_the_agent_takes_the_request_and_only_up_to_the_limit() {
        let watch = AnswerWatch::default();
        let mut r = pipe(Some(watch.clone()));
        r.record(
            &[io::IoSlice::new(b"GET / "), io::IoSlice::new(b"HTTP/1.1")],
            10,
        );
        assert_eq!(r.sent.as_deref(), Some(&b"GET / HTTP"[..]));
        r.settle();
        assert!(r.sent.is_some(), "no answer yet");
        watch.set(Answered::Taken);
        r.settle();
        assert!(r.sent.is_none(), "taken: nothing to keep");

        let mut big = pipe(Some(AnswerWatch::default()));
        let chunk = vec![0u8; RESEND_MAX_BYTES];
        big.record(&[io::IoSlice::new(&chunk)], chunk.len());
        assert!(big.sent.is_some(), "exactly the limit is kept");
        big.record(&[io::IoSlice::new(b"x")], 1);
        assert!(big.sent.is_none(), "over the limit: not sent again");
    }

    #[test]
    fn only_a_request_the_agent_said_it_did_not_take_goes_on_another_stream() {
        let err = io::Error::other("tunnel stream failed");
        // A stream read through another replica: kas cannot tell, so never.
        assert!(!pipe(None).start_resend(&err));
        let watch = AnswerWatch::default();
        let mut r = pipe(Some(watch.clone()));
        // Ended without an answer (reset, lost connection, an older agent): maybe taken.
        assert!(!r.start_resend(&err));
        watch.set(Answered::Taken);
        assert!(!r.start_resend(&err));
        watch.set(Answered::NotTaken);
        // Not taken, but the deadline (now) is past.
        assert!(!r.start_resend(&err));
        r.deadline = Instant::now() + Duration::from_secs(10);
        assert!(r.start_resend(&err));
        assert_eq!(r.resends(), 1);
        r.resends = MAX_RESENDS;
        assert!(!r.start_resend(&err), "attempts are bounded");
    }
}
