//! Counters of refusals and rate-limited requests, shared by every listener's guard.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub listener: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitedLabels {
    pub listener: String,
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

/// Clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct GuardMetrics {
    pub refusals: Family<RefusalLabels, Counter>,
    pub rate_limited: Family<LimitedLabels, Counter>,
    pub suppressed_log_lines: Family<ListenerLabels, Counter>,
}

impl GuardMetrics {
    /// Registers `auth_refusals_total`, `rate_limited_requests_total` and
    /// `refusal_log_lines_suppressed_total` (under the registry's prefix, `kas_` in kas).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "auth_refusals",
            "Refused authentications, by listener and reason (rate_limited included)",
            self.refusals.clone(),
        );
        reg.register(
            "rate_limited_requests",
            "Requests refused early by a rate limit, by listener and limit",
            self.rate_limited.clone(),
        );
        reg.register(
            "refusal_log_lines_suppressed",
            "Refusals counted in a periodic summary instead of a log line of their own",
            self.suppressed_log_lines.clone(),
        );
    }

    pub(crate) fn refused(&self, listener: &str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn limited(&self, listener: &str, limit: &str) {
        self.rate_limited
            .get_or_create(&LimitedLabels {
                listener: listener.to_string(),
                limit: limit.to_string(),
            })
            .inc();
    }

    pub(crate) fn suppressed(&self, listener: &str) {
        self.suppressed_log_lines
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }
}
