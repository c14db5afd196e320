//! Applying [`ConnectionLimits`] to a real listener: accepting, refusing over-cap connections at
//! once, and pausing after accept errors such as EMFILE.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::limits::{ConnectionLimits, ConnectionPermit, ConnectionTracker, ListenerEvents};

/// Pause after an accept error such as EMFILE: retrying at once would spin while nothing frees
/// descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// Admits connections of one listener within its caps and reports refusals.
#[derive(Clone)]
pub struct Gate {
    tracker: Arc<ConnectionTracker>,
    events: Arc<dyn ListenerEvents>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("tracker", &self.tracker)
            .finish_non_exhaustive()
    }
}

/// An admitted connection's slot: held as long as the connection lives, released on drop.
pub struct Admission {
    _permit: ConnectionPermit,
    events: Arc<dyn ListenerEvents>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.events.released();
    }
}

impl Gate {
    pub fn new(limits: ConnectionLimits, events: Arc<dyn ListenerEvents>) -> Self {
        Self {
            tracker: ConnectionTracker::new(limits),
            events,
        }
    }

    pub fn events(&self) -> &Arc<dyn ListenerEvents> {
        &self.events
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        self.tracker.open()
    }

    /// Waits for the next connection the caps admit. Connections over a cap are closed as
    /// soon as they are accepted (leaving them in the kernel's backlog would let them pile
    /// up unseen) and reported; errors never end the loop, so cancel it by dropping the future.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Admission) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "accepting a connection failed");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting connections failed; retrying");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            match self.tracker.try_acquire(peer.ip()) {
                Ok(permit) => {
                    self.events.admitted();
                    let admission = Admission {
                        _permit: permit,
                        events: Arc::clone(&self.events),
                    };
                    return (tcp, peer, admission);
                }
                Err(reason) => {
                    drop(tcp);
                    self.events.refused(reason, peer);
                }
            }
        }
    }
}

/// Errors about one connection that was already gone when accepted, not about the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
