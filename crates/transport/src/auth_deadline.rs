//! Closing agent connections that never authenticate: past the handshake, an HTTP/2 client
//! that answers pings but sends no authenticated request would otherwise hold its connection
//! slot until the server's maximum connection age (hours), and a few addresses could keep the
//! listener's cap full of them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::limits::{CloseReason, ListenerEvents};

/// Whether a connection has carried a request whose credentials were accepted. Shared by the
/// connection (which checks it at its deadline) and its requests' [`AgentConnectInfo`]
/// (which the server's authentication marks).
///
/// [`AgentConnectInfo`]: crate::AgentConnectInfo
#[derive(Debug, Default)]
pub struct AuthProof(AtomicBool);

impl AuthProof {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_marked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The moment a connection must have authenticated by, checked each time the connection is
/// read (HTTP/2 always has a read pending, so the timer's wake-up reaches it).
pub(crate) struct AuthDeadline {
    sleep: Pin<Box<Sleep>>,
    limit: Duration,
    events: Arc<dyn ListenerEvents>,
}

impl AuthDeadline {
    pub(crate) fn new(started: Instant, limit: Duration, events: Arc<dyn ListenerEvents>) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(started + limit)),
            limit,
            events,
        }
    }

    /// `Ready(Ok)` once it no longer applies (authenticated in time: drop it), `Ready(Err)`
    /// when the connection must close, `Pending` before the deadline.
    pub(crate) fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        proof: &AuthProof,
        peer: SocketAddr,
    ) -> Poll<io::Result<()>> {
        if proof.is_marked() {
            return Poll::Ready(Ok(()));
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if proof.is_marked() {
            return Poll::Ready(Ok(()));
        }
        self.events.closed(CloseReason::NotAuthenticated, peer);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no authenticated request within {:?}", self.limit),
        )))
    }
}

/// Records that `request`'s connection authenticated (its credentials were accepted), so the
/// connection outlives its authentication deadline. Requests not served over
/// [`incoming_with`](crate::incoming_with) carry no proof: nothing to mark.
pub fn mark_authenticated<T>(request: &tonic::Request<T>) {
    if let Some(info) = request.extensions().get::<crate::AgentConnectInfo>() {
        info.proof().mark();
    }
}
