//! Counting and logging what the listeners refuse and close, without letting a flood of
//! refusals fill the disk.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tether_transport::{CloseReason, ListenerEvents, LogThrottle, Refusal};

/// At most one log line per listener and reason per this interval; the line says how many
/// were suppressed in between. The metrics count every one.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `agent`, `kubernetes_api`, `api` or `webhooks`.
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub listener: String,
    pub reason: String,
}

/// Metrics of every kas listener, by listener name.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    pub refused: Family<ReasonLabels, Counter>,
    pub closed: Family<ReasonLabels, Counter>,
    pub open: Family<ListenerLabels, Gauge>,
    /// The certificates the TLS listeners serve, and when they expire.
    pub certificates: super::certificates::Certificates,
}

impl ListenerMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "listener_connections_refused",
            "Connections closed on arrival because a cap was reached, by listener and cap",
            self.refused.clone(),
        );
        reg.register(
            "listener_connections_closed",
            "Connections closed by a handshake, header or idle timeout, or cut when their request's access ended while the client was not reading, by listener and reason",
            self.closed.clone(),
        );
        reg.register(
            "listener_connections",
            "Open connections admitted by each listener",
            self.open.clone(),
        );
        self.certificates.register(reg);
    }

    /// The event sink of one listener.
    pub fn events(&self, listener: &'static str) -> Events {
        Events {
            listener,
            metrics: self.clone(),
            throttle: LogThrottle::new(LOG_INTERVAL),
        }
    }
}

/// Counts and (throttled) logs one listener's refusals and timeouts.
#[derive(Debug)]
pub struct Events {
    listener: &'static str,
    metrics: ListenerMetrics,
    throttle: LogThrottle,
}

impl Events {
    fn labels(&self, reason: &str) -> ReasonLabels {
        ReasonLabels {
            listener: self.listener.to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn open(&self) -> Gauge {
        self.metrics
            .open
            .get_or_create(&ListenerLabels {
                listener: self.listener.to_owned(),
            })
            .clone()
    }
}

impl Events {
    fn count_closed(&self, reason: CloseReason) {
        self.metrics
            .closed
            .get_or_create(&self.labels(reason.as_str()))
            .inc();
    }
}

impl ListenerEvents for Events {
    fn refused(&self, reason: Refusal, peer: SocketAddr) {
        self.metrics
            .refused
            .get_or_create(&self.labels(reason.as_str()))
            .inc();
        // A cap being hit is what an operator must see (an attack, or a cap set too low).
        if let Some(suppressed) = self.throttle.admit(reason.as_str(), Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                reason = reason.as_str(),
                remote_addr = %peer,
                suppressed,
                "Connection refused: limit reached"
            );
        }
    }

    fn certificate_refused(&self, peer: SocketAddr, error: &str) {
        let reason = CloseReason::CertificateRefused;
        self.count_closed(reason);
        if let Some(suppressed) = self.throttle.admit(reason.as_str(), Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                remote_addr = %peer,
                error,
                suppressed,
                "TLS handshake failed: the client refused kas's certificate (expired — or not valid yet by the client's clock, which sends the same alert when it is behind the certificate's notBefore —, not valid for the name it dialled, or signed by a CA it does not trust); check the listener's certificate_file and the client's clock"
            );
        }
    }

    fn closed(&self, reason: CloseReason, peer: SocketAddr) {
        self.count_closed(reason);
        if reason == CloseReason::IdleTimeout {
            // Ordinary life of keep-alive connections.
            tracing::debug!(listener = self.listener, remote_addr = %peer, "Idle connection closed");
            return;
        }
        if let Some(suppressed) = self.throttle.admit(reason.as_str(), Instant::now()) {
            tracing::info!(
                listener = self.listener,
                reason = reason.as_str(),
                remote_addr = %peer,
                suppressed,
                "{}",
                if reason == CloseReason::AccessEnded {
                    "Connection closed: its request's access ended while the client was not reading"
                } else {
                    "Connection closed: too slow"
                }
            );
        }
    }

    fn admitted(&self) {
        self.open().inc();
    }

    fn released(&self) {
        self.open().dec();
    }
}
