//! When an HTTP/1.1 connection should be closed for slowness: the request-header and idle
//! (keep-alive) deadlines. Pure state (time is passed in) so the rules are unit-tested; the
//! server feeds it reads and request starts/ends and sleeps until [`Phase::deadline`].
//!
//! Like Go's `ReadHeaderTimeout`/`IdleTimeout`: a new connection must deliver its first
//! request's headers within the header timeout; between requests it may stay silent for the
//! idle timeout, and once the next request's first byte arrives its headers must be complete
//! within the header timeout. A request in flight (until its response body is finished or
//! dropped) has no deadline here, so long watches and streamed bodies are never cut.

use std::time::{Duration, Instant};

use tether_transport::CloseReason;

/// Timeouts of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a request's headers to be complete, since `since`.
    Head { since: Instant },
    /// `in_flight` requests are being served (pipelining can make it more than one).
    Busy { in_flight: usize },
    /// Between requests, since `since`.
    Idle { since: Instant },
}

impl Phase {
    /// A freshly accepted (and, with TLS, handshaken) connection.
    pub fn new(now: Instant) -> Self {
        Phase::Head { since: now }
    }

    /// Bytes arrived. Returns whether the deadline changed.
    pub fn on_read(&mut self, now: Instant) -> bool {
        match *self {
            Phase::Idle { .. } => {
                *self = Phase::Head { since: now };
                true
            }
            // Bytes of a request being served (body) or of headers already being timed.
            Phase::Head { .. } | Phase::Busy { .. } => false,
        }
    }

    /// hyper parsed a request's headers and called the service.
    pub fn request_started(&mut self) {
        *self = match *self {
            Phase::Busy { in_flight } => Phase::Busy {
                in_flight: in_flight + 1,
            },
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Busy { in_flight: 1 },
        };
    }

    /// A response body was finished or dropped.
    pub fn request_ended(&mut self, now: Instant) {
        if let Phase::Busy { in_flight } = *self {
            *self = if in_flight > 1 {
                Phase::Busy {
                    in_flight: in_flight - 1,
                }
            } else {
                Phase::Idle { since: now }
            };
        }
    }

    /// When the connection is to be closed, and why; `None` while a request is in flight.
    pub fn deadline(&self, t: &Timeouts) -> Option<(Instant, CloseReason)> {
        match *self {
            Phase::Head { since } => Some((since + t.header, CloseReason::HeaderTimeout)),
            Phase::Idle { since } => Some((since + t.idle, CloseReason::IdleTimeout)),
            Phase::Busy { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(2),
        idle: Duration::from_secs(30),
    };

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_new_connection_gets_the_header_timeout_even_before_its_first_byte() {
        let t0 = Instant::now();
        let mut p = Phase::new(t0);
        assert!(
            !p.on_read(t0 + s(1)),
            "a trickle must not extend the deadline"
        );
        assert_eq!(
            p.deadline(&T),
            Some((t0 + s(2), CloseReason::HeaderTimeout))
        );
    }

    #[test]
    fn a_request_in_flight_has_no_deadline() {
        let t0 = Instant::now();
        let mut p = Phase::new(t0);
        p.request_started();
        p.on_read(t0 + s(100));
        assert_eq!(p.deadline(&T), None);
    }

    #[test]
    fn between_requests_the_idle_timeout_applies_until_the_next_first_byte() {
        let t0 = Instant::now();
        let mut p = Phase::new(t0);
        p.request_started();
        p.request_ended(t0 + s(1));
        assert_eq!(p.deadline(&T), Some((t0 + s(31), CloseReason::IdleTimeout)));
        assert!(p.on_read(t0 + s(10)));
        assert_eq!(
            p.deadline(&T),
            Some((t0 + s(12), CloseReason::HeaderTimeout))
        );
    }

    #[test]
    fn pipelined_requests_keep_the_connection_busy_until_the_last_ends() {
        let t0 = Instant::now();
        let mut p = Phase::new(t0);
        p.request_started();
        p.request_started();
        p.request_ended(t0 + s(1));
        assert_eq!(p.deadline(&T), None);
        p.request_ended(t0 + s(2));
        assert_eq!(p.deadline(&T), Some((t0 + s(32), CloseReason::IdleTimeout)));
    }
}
