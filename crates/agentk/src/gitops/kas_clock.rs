//! kas's clock as agentk last heard it, for the times agentk reports.
//!
//! A sync report's `finished_at` was agentk's own clock, and kas showed it as is: a node two
//! hours behind made `kas agent status` say a sync just done was two hours old, one ahead put
//! syncs in the future and ordered the web UI's events wrongly (E14). Each commit's header
//! carries kas's clock; agentk keeps the offset and stamps its reports (and the last-success
//! gauge) in kas's time, warns when the offset is large, and exports it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

use prometheus_client::metrics::gauge::Gauge;

/// Past this offset agentk warns that its clock or kas's is wrong.
const WARN_MS: i64 = 60_000;

/// kas's clock minus agentk's, as last heard.
#[derive(Debug, Default)]
pub struct KasClock {
    offset_ms: AtomicI64,
    off: AtomicBool,
    gauge: Gauge<f64, AtomicU64>,
}

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl KasClock {
    /// Exported as `gauge` (seconds).
    pub fn new(gauge: Gauge<f64, AtomicU64>) -> Self {
        Self {
            gauge,
            ..Self::default()
        }
    }

    /// kas said its clock read `kas_time_ms` (0: an older kas that does not say).
    pub(super) fn heard(&self, kas_time_ms: i64) {
        if kas_time_ms <= 0 {
            return;
        }
        self.set(kas_time_ms.saturating_sub(local_ms()));
    }

    fn set(&self, offset: i64) {
        self.offset_ms.store(offset, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let seconds = offset as f64 / 1000.0;
        self.gauge.set(seconds);
        let off = offset.abs() > WARN_MS;
        if self.off.swap(off, Ordering::Relaxed) != off {
            if off {
                tracing::warn!(
                    offset_seconds = seconds,
                    "This node's clock differs from kas's by more than a minute: sync times are reported in kas's time, but Kubernetes Events and logs carry this clock; check NTP here and on kas"
                );
            } else {
                tracing::info!(
                    offset_seconds = seconds,
                    "This node's clock agrees with kas's again"
                );
            }
        }
    }

    /// Now in kas's time, Unix seconds.
    pub(super) fn now_secs(&self) -> i64 {
        local_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed)) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_stamped_in_kas_time_once_kas_said_it() {
        let clock = KasClock::default();
        let mine = local_ms() / 1000;
        assert!(
            (clock.now_secs() - mine).abs() <= 1,
            "nothing heard: our clock"
        );
        clock.heard(0);
        assert!(
            (clock.now_secs() - mine).abs() <= 1,
            "an older kas says nothing"
        );
        clock.heard(local_ms() + 7_200_000);
        assert!(
            (clock.now_secs() - (mine + 7200)).abs() <= 1,
            "kas two hours ahead"
        );
        assert!(clock.off.load(Ordering::Relaxed));
        assert!((clock.gauge.get() - 7200.0).abs() < 1.0);
        clock.heard(local_ms());
        assert!(!clock.off.load(Ordering::Relaxed), "agrees again");
    }
}
