//! Rotating agent connections at their maximum age, the way gRPC servers do it: at the age
//! kas sends HTTP/2 GOAWAY (tonic's `max_connection_age`, given the age alone), a moment later
//! it ends the connection's idle tunnel streams so the agent opens new ones, on a new
//! connection, and requests in flight get the grace to finish; then the connection is closed.
//!
//! Why here and not in tonic: tonic 0.14 given a grace as well sends no GOAWAY at all. It
//! closes the connection at age + grace, cutting every request then in flight, and the agent
//! keeps sending new ones over it until that moment, so the grace protected nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// When kas rotates an agent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAge {
    /// GOAWAY at this age (tonic sends it; give tonic the same age).
    pub age: Duration,
    /// Requests in flight at the age have this long before the connection is closed.
    pub grace: Duration,
}

/// How long after the GOAWAY the idle streams end: by then the agent has read the GOAWAY, so
/// the streams it opens in their place go to a new connection, not back to this one.
pub const MOVE_AFTER_GOAWAY: Duration = Duration::from_secs(1);

/// One connection's two moments, checked as the connection is read (HTTP/2 always has a read
/// pending, so the timers' wake-ups reach it).
pub(crate) struct Rotation {
    /// Until the idle streams are told to move (`moving` is cancelled then).
    move_at: Option<Pin<Box<Sleep>>>,
    moving: CancellationToken,
    close_at: Pin<Box<Sleep>>,
    max: MaxAge,
}

impl Rotation {
    /// `started`: when the connection was handed to HTTP/2 (tonic's age counts from there).
    pub(crate) fn new(started: Instant, max: MaxAge, moving: CancellationToken) -> Self {
        let aged = started + max.age;
        Self {
            move_at: Some(Box::pin(tokio::time::sleep_until(aged + MOVE_AFTER_GOAWAY))),
            moving,
            close_at: Box::pin(tokio::time::sleep_until(aged + max.grace)),
            max,
        }
    }

    /// `Ready` with the read error that closes the connection once its grace is over;
    /// `Pending` before (cancelling `moving` on the way, at its moment).
    pub(crate) fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if let Some(sleep) = &mut self.move_at
            && sleep.as_mut().poll(cx).is_ready()
        {
            self.moving.cancel();
            self.move_at = None;
        }
        if self.close_at.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.moving.cancel();
        Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "the connection reached its maximum age ({:?}) and grace ({:?})",
                self.max.age, self.max.grace
            ),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_streams_move_a_moment_after_the_age_and_the_connection_closes_after_the_grace() {
        let max = MaxAge {
            age: Duration::from_secs(60),
            grace: Duration::from_secs(30),
        };
        let moving = CancellationToken::new();
        let mut rotation = Rotation::new(Instant::now(), max, moving.clone());
        let poll = |r: &mut Rotation| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            r.poll_closed(&mut cx).map(|e| e.to_string())
        };
        assert!(poll(&mut rotation).is_pending());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(poll(&mut rotation).is_pending());
        assert!(!moving.is_cancelled(), "not before the GOAWAY is read");
        tokio::time::advance(MOVE_AFTER_GOAWAY).await;
        assert!(poll(&mut rotation).is_pending());
        assert!(moving.is_cancelled());
        tokio::time::advance(Duration::from_secs(29)).await;
        let Poll::Ready(closed) = poll(&mut rotation) else {
            panic!("still open after the grace");
        };
        assert!(
            closed.contains("maximum age (60s) and grace (30s)"),
            "{closed}"
        );
    }
}
