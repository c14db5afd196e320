//! Accept-side limits shared by every kas listener: caps on concurrent connections (global and
//! per client address), why a connection was refused or closed, and a log throttle so a flood
//! of refusals cannot fill the disk.
//!
//! The accounting here is pure (no sockets, time passed in), so it is unit-tested on its own;
//! [`Gate`](crate::Gate) applies it to a real listener.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Caps on connections held open at once by one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// All clients together.
    pub max_connections: usize,
    /// One client address (IPv6: one /64, since a single host commonly owns a whole /64).
    pub max_connections_per_address: usize,
}

/// Why a connection was refused right after it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The listener already holds `max_connections`.
    MaxConnections,
    /// The client's address already holds `max_connections_per_address`.
    MaxConnectionsPerAddress,
}

impl Refusal {
    /// Stable name for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerAddress => "max_connections_per_address",
        }
    }
}

/// Why an accepted connection was closed by the server before the client was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// TLS (and, on the agent listener, protocol detection and WebSocket upgrade) took too long.
    HandshakeTimeout,
    /// A request's headers took too long (slowloris).
    HeaderTimeout,
    /// A keep-alive connection stayed without a request for too long.
    IdleTimeout,
    /// An agent connection carried no authenticated request within its deadline.
    NotAuthenticated,
    /// The request in flight had to end (its credential revoked or expired, or the
    /// configuration no longer allowing it) but its client had stopped reading, so the
    /// response could not carry the error: the connection was cut.
    AccessEnded,
    /// The client ended the TLS handshake refusing kas's certificate (expired, not valid for
    /// the name it dialled, signed by a CA it does not trust).
    CertificateRefused,
}

impl CloseReason {
    /// Stable name for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::NotAuthenticated => "not_authenticated",
            CloseReason::AccessEnded => "access_ended",
            CloseReason::CertificateRefused => "certificate_refused",
        }
    }
}

/// What a listener reports, so the server can count (metrics) and log it without this crate
/// depending on a metrics library.
pub trait ListenerEvents: Send + Sync + 'static {
    /// A connection was closed at once because a cap was reached.
    fn refused(&self, reason: Refusal, peer: SocketAddr);
    /// A connection was closed because a timeout expired.
    fn closed(&self, reason: CloseReason, peer: SocketAddr);
    /// A TLS handshake failed because the client refused kas's certificate; `error` is the
    /// handshake's error (the client's alert).
    fn certificate_refused(&self, peer: SocketAddr, error: &str) {
        let _ = error;
        self.closed(CloseReason::CertificateRefused, peer);
    }
    /// A connection was admitted (it holds a slot until [`ListenerEvents::released`]).
    fn admitted(&self) {}
    /// An admitted connection ended, however it ended.
    fn released(&self) {}
}

/// Events nobody listens to (tests and callers that need no metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl ListenerEvents for NoEvents {
    fn refused(&self, _: Refusal, _: SocketAddr) {}
    fn closed(&self, _: CloseReason, _: SocketAddr) {}
}

/// The key a client is counted under: its address, or its /64 for IPv6 (an attacker with one
/// IPv6 host usually has 2^64 addresses). IPv4-mapped IPv6 counts as the IPv4 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// Counts a listener's open connections and says whether one more may be admitted.
#[derive(Debug)]
pub struct ConnectionTracker {
    limits: ConnectionLimits,
    counts: Mutex<Counts>,
}

impl ConnectionTracker {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Admits a connection from `ip` if both caps allow; the slot is held until the returned
    /// permit is dropped.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let key = address_key(ip);
        // The counts stay consistent even if a holder panicked: every update is one statement.
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= self.limits.max_connections {
            return Err(Refusal::MaxConnections);
        }
        let from_ip = c.per_address.entry(key).or_insert(0);
        if *from_ip >= self.limits.max_connections_per_address {
            return Err(Refusal::MaxConnectionsPerAddress);
        }
        *from_ip += 1;
        c.total += 1;
        Ok(ConnectionPermit {
            tracker: Arc::clone(self),
            key,
        })
    }

    /// Connections admitted and not yet released.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    /// Open connections counted under `ip`'s key.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .per_address
            .get(&address_key(ip))
            .copied()
            .unwrap_or(0)
    }

    fn release(&self, key: IpAddr) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&key) {
            *n = n.saturating_sub(1);
            // Forget addresses with nothing open, or the map grows with every client ever seen.
            if *n == 0 {
                c.per_address.remove(&key);
            }
        }
    }
}

/// One admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionPermit {
    tracker: Arc<ConnectionTracker>,
    key: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.tracker.release(self.key);
    }
}

/// Lets one log line per key through per interval and counts the rest, so a flood of
/// refusals costs one line per interval, which still says how many were suppressed.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` if a line for `key` should be logged now (`suppressed` lines were
    /// dropped since the last one), `None` if this one should be dropped.
    pub fn admit(&self, key: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last.get_mut(key) {
            Some((at, suppressed)) if now.saturating_duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// How a dependency that is checked over and over (a database, an outbox) is logged while it
/// fails: its first failure at once, then one reminder per interval saying how many failures
/// were not logged, and its recovery once. Logging every failed attempt would write a line
/// every second or two for as long as an outage lasts, burying everything else in the log.
#[derive(Debug)]
pub struct Outage {
    reminder: Duration,
    /// Since when it fails, when it was last logged, and the failures not logged since.
    failing: Option<(Instant, Instant, u64)>,
}

/// What to log about a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageLog {
    /// The first failure after a success (or ever).
    Started,
    /// Still failing: how long for, and how many failures were not logged since the last line.
    Continuing { since: Duration, unlogged: u64 },
}

impl Outage {
    pub fn new(reminder: Duration) -> Self {
        Self {
            reminder,
            failing: None,
        }
    }

    /// An attempt failed at `now`; `Some` if a line should be logged for it.
    pub fn failed(&mut self, now: Instant) -> Option<OutageLog> {
        let Some((start, logged, unlogged)) = &mut self.failing else {
            self.failing = Some((now, now, 0));
            return Some(OutageLog::Started);
        };
        if now.saturating_duration_since(*logged) < self.reminder {
            *unlogged += 1;
            return None;
        }
        let line = OutageLog::Continuing {
            since: now.saturating_duration_since(*start),
            unlogged: *unlogged,
        };
        *logged = now;
        *unlogged = 0;
        Some(line)
    }

    /// Logs a failed attempt at warn if [`Outage::failed`] calls for a line: `what` says what
    /// failed and what happens next.
    pub fn warn_failed(&mut self, what: &str, error: &dyn std::fmt::Display) {
        match self.failed(Instant::now()) {
            Some(OutageLog::Started) => tracing::warn!(%error, "{what}"),
            Some(OutageLog::Continuing { since, unlogged }) => tracing::warn!(
                %error,
                failing_seconds = since.as_secs(),
                failures_not_logged = unlogged,
                "{what}"
            ),
            None => {}
        }
    }

    /// Logs at info that `what` answers again, if it was failing.
    pub fn info_recovered(&mut self, what: &str) {
        if let Some(lasted) = self.succeeded(Instant::now()) {
            tracing::info!(lasted_seconds = lasted.as_secs(), "{what}");
        }
    }

    /// An attempt succeeded at `now`; how long the outage it ends lasted, if there was one.
    pub fn succeeded(&mut self, now: Instant) -> Option<Duration> {
        self.failing
            .take()
            .map(|(start, _, _)| now.saturating_duration_since(start))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn an_outage_logs_its_start_one_reminder_per_interval_and_its_end() {
        let t0 = Instant::now();
        let mut o = Outage::new(Duration::from_secs(60));
        assert_eq!(o.succeeded(t0), None, "no outage yet");
        assert_eq!(o.failed(t0), Some(OutageLog::Started));
        for s in 1..30 {
            assert_eq!(o.failed(t0 + Duration::from_secs(2 * s)), None);
        }
        assert_eq!(
            o.failed(t0 + Duration::from_secs(60)),
            Some(OutageLog::Continuing {
                since: Duration::from_secs(60),
                unlogged: 29
            })
        );
        assert_eq!(o.failed(t0 + Duration::from_secs(62)), None);
        assert_eq!(
            o.succeeded(t0 + Duration::from_secs(64)),
            Some(Duration::from_secs(64))
        );
        assert_eq!(
            o.succeeded(t0 + Duration::from_secs(66)),
            None,
            "ended once"
        );
        assert_eq!(
            o.failed(t0 + Duration::from_secs(68)),
            Some(OutageLog::Started),
            "a new outage is logged at once"
        );
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn the_per_address_cap_refuses_only_that_address() {
        let t = ConnectionTracker::new(ConnectionLimits {
            max_connections: 10,
            max_connections_per_address: 2,
        });
        let _a = t.try_acquire(v4(1)).unwrap();
        let _b = t.try_acquire(v4(1)).unwrap();
        assert_eq!(
            t.try_acquire(v4(1)).unwrap_err(),
            Refusal::MaxConnectionsPerAddress
        );
        let _c = t.try_acquire(v4(2)).unwrap();
        assert_eq!(
            (t.open(), t.open_from(v4(1)), t.open_from(v4(2))),
            (3, 2, 1)
        );
    }

    #[test]
    fn the_global_cap_refuses_every_address() {
        let t = ConnectionTracker::new(ConnectionLimits {
            max_connections: 2,
            max_connections_per_address: 5,
        });
        let _a = t.try_acquire(v4(1)).unwrap();
        let _b = t.try_acquire(v4(2)).unwrap();
        assert_eq!(t.try_acquire(v4(3)).unwrap_err(), Refusal::MaxConnections);
    }

    #[test]
    fn dropping_a_permit_frees_its_slot_and_forgets_the_address() {
        let t = ConnectionTracker::new(ConnectionLimits {
            max_connections: 1,
            max_connections_per_address: 1,
        });
        let a = t.try_acquire(v4(1)).unwrap();
        assert!(t.try_acquire(v4(1)).is_err());
        drop(a);
        assert_eq!(t.open(), 0);
        assert!(t.counts.lock().unwrap().per_address.is_empty());
        let _again = t.try_acquire(v4(1)).unwrap();
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(other));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(address_key(mapped), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            address_key(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn the_log_throttle_lets_one_line_per_interval_and_counts_the_rest() {
        let th = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(th.admit("a", t0), Some(0));
        assert_eq!(th.admit("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(th.admit("a", t0 + Duration::from_secs(2)), None);
        // Another reason has its own budget.
        assert_eq!(th.admit("b", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(th.admit("a", t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(th.admit("a", t0 + Duration::from_secs(11)), None);
    }
}
