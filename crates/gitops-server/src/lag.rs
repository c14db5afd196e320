//! Reconcile lag: how long from kas first seeing a manifest commit to an agent reporting it
//! applied. Users alert on it ("a push takes more than N minutes to reach the cluster").
//!
//! The moment a commit is "seen" is when a GitOps stream first resolves the agent's ref to it,
//! right after the fetch that brought it (a webhook or a poll). It is kept in memory only: after
//! a kas restart, commits seen before it are not observed (better no figure than a wrong one).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How many commits are remembered; older ones are forgotten first. An agent applies a commit
/// within minutes, and thousands of projects rarely push that many commits in that time.
const REMEMBERED: usize = 4096;

/// First-seen times of recent commits and the lag histogram (no labels: per-agent or
/// per-project labels on a histogram would make thousands of series).
#[derive(Debug)]
pub(crate) struct ReconcileLag {
    seen: Mutex<Seen>,
    histogram: Histogram,
}

#[derive(Debug, Default)]
struct Seen {
    at: HashMap<String, Instant>,
    order: VecDeque<String>,
}

impl Default for ReconcileLag {
    fn default() -> Self {
        Self {
            seen: Mutex::default(),
            // 50 ms to ~14 h: a webhook-driven sync up to a cluster that was away for a night.
            histogram: Histogram::new(exponential_buckets(0.05, 2.0, 20)),
        }
    }
}

impl ReconcileLag {
    pub(crate) fn register(&self, reg: &mut Registry) {
        reg.register(
            "gitops_reconcile_lag_seconds",
            "From kas first seeing a manifest commit to an agent reporting it applied",
            self.histogram.clone(),
        );
    }

    /// Remembers the first time `commit` was seen (later calls keep the first time).
    pub(crate) fn seen(&self, commit: &str) {
        self.seen_at(commit, Instant::now());
    }

    fn seen_at(&self, commit: &str, at: Instant) {
        let Ok(mut s) = self.seen.lock() else { return };
        if s.at.contains_key(commit) {
            return;
        }
        if s.order.len() == REMEMBERED
            && let Some(oldest) = s.order.pop_front()
        {
            s.at.remove(&oldest);
        }
        s.at.insert(commit.to_owned(), at);
        s.order.push_back(commit.to_owned());
    }

    /// An agent applied `commit` (a successful or superseded report — applied and pruned,
    /// not waited for — of a commit it had not reported before).
    pub(crate) fn applied(&self, commit: &str) -> Option<f64> {
        let at = *self.seen.lock().ok()?.at.get(commit)?;
        let lag = at.elapsed().as_secs_f64();
        self.histogram.observe(lag);
        Some(lag)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_sighting_counts() {
        let lag = ReconcileLag::default();
        let earlier = Instant::now() - Duration::from_secs(30);
        lag.seen_at("abc", earlier);
        lag.seen("abc");
        assert!(lag.applied("abc").unwrap() >= 30.0);
    }

    #[test]
    fn unknown_commits_are_not_observed() {
        let lag = ReconcileLag::default();
        assert_eq!(lag.applied("never-seen"), None);
    }

    #[test]
    fn the_oldest_commits_are_forgotten_first() {
        let lag = ReconcileLag::default();
        for n in 0..=REMEMBERED {
            lag.seen(&n.to_string());
        }
        assert_eq!(lag.applied("0"), None);
        assert!(lag.applied("1").is_some());
        assert!(lag.applied(&REMEMBERED.to_string()).is_some());
    }
}
