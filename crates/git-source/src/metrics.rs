//! Git metrics users alert on: how fetches end and how long they take, how many projects' last
//! fetch failed, and how push webhooks were received. No per-project labels: kas may mirror
//! thousands of projects; `kas project list` names the failing ones.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a fetch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Fetched; the new commit (if any) is in force.
    Succeeded,
    /// Fetched, but the new commit was refused (not signed by a trusted key).
    Refused,
    /// The remote could not be fetched; the last good commit stays.
    Failed,
}

impl Ended {
    fn word(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// How a push webhook delivery was received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Authenticated; a fetch was started (or one was already running).
    Accepted,
    /// Not authenticated (unknown project, no secret configured, wrong token or signature).
    Refused,
    /// kas could not check it (the secret file is unreadable, the store failed).
    Failed,
}

impl Delivery {
    fn word(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Shared by every project's poll task; cheap to clone.
#[derive(Clone, Debug)]
pub struct FetchMetrics {
    fetches: Family<OutcomeLabel, Counter>,
    duration: Family<OutcomeLabel, Histogram>,
    webhooks: Family<OutcomeLabel, Counter>,
    /// Projects whose last fetch failed: one project failing among many healthy ones barely
    /// moves the share of failed fetches (it also backs off to minutes between tries).
    failing: Gauge,
}

impl Default for FetchMetrics {
    fn default() -> Self {
        Self {
            fetches: Family::default(),
            // 10 ms to ~5.5 min: a local fetch up to the default 2 min fetch timeout.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 16))
            }),
            webhooks: Family::default(),
            failing: Gauge::default(),
        }
    }
}

impl FetchMetrics {
    /// Registers the series (names get the registry's prefix, e.g. `kas_`).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "git_fetches",
            "Fetches of projects' repositories, by outcome",
            self.fetches.clone(),
        );
        reg.register(
            "git_fetch_duration_seconds",
            "How long fetches took (including signature checks), by outcome",
            self.duration.clone(),
        );
        reg.register(
            "git_projects_failing",
            "Projects whose last fetch failed (kas project list names them)",
            self.failing.clone(),
        );
        reg.register(
            "webhook_deliveries",
            "Push webhook deliveries received, by outcome (accepted, refused, failed)",
            self.webhooks.clone(),
        );
    }

    /// Counts one push webhook delivery.
    pub fn delivery(&self, outcome: Delivery) {
        let label = OutcomeLabel {
            outcome: outcome.word(),
        };
        self.webhooks.get_or_create(&label).inc();
    }

    /// A project's last fetch failed (`is`) where it did not (`was`), or the other way round.
    pub(crate) fn failing(&self, was: bool, is: bool) {
        match (was, is) {
            (false, true) => {
                self.failing.inc();
            }
            (true, false) => {
                self.failing.dec();
            }
            _ => {}
        }
    }

    pub(crate) fn record(&self, outcome: Ended, seconds: f64) {
        let label = OutcomeLabel {
            outcome: outcome.word(),
        };
        self.fetches.get_or_create(&label).inc();
        self.duration.get_or_create(&label).observe(seconds);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fetches_are_counted_and_timed_by_outcome() {
        let m = FetchMetrics::default();
        m.record(Ended::Succeeded, 0.2);
        m.record(Ended::Failed, 2.0);
        m.record(Ended::Failed, 3.0);
        m.delivery(Delivery::Refused);
        m.failing(false, true);
        m.failing(false, true);
        m.failing(true, true);
        m.failing(true, false);
        let mut reg = Registry::with_prefix("kas");
        m.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(r#"kas_git_fetches_total{outcome="succeeded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kas_git_fetches_total{outcome="failed"} 2"#),
            "{text}"
        );
        assert!(text.contains("kas_git_projects_failing 1\n"), "{text}");
        assert!(
            text.contains(r#"kas_git_fetch_duration_seconds_count{outcome="failed"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kas_webhook_deliveries_total{outcome="refused"} 1"#),
            "{text}"
        );
    }
}
