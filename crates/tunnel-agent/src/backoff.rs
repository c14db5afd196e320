//! Exponential backoff with jitter (pure; the caller sleeps).

use std::time::Duration;

/// Delays of 1 s × 1.6ⁿ up to 20 s, each ± 20 % (GitLab's agent uses the same numbers for its
/// tunnel; jitter keeps a fleet of agents from reconnecting in lockstep after a kas restart).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(20),
            factor: 1.6,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before attempt number `failures` (1 = after the first failure), given a
    /// uniform random number `r` in [0, 1).
    pub fn delay(&self, failures: u32, r: f64) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exp = self
            .factor
            .powi(i32::try_from(failures - 1).unwrap_or(i32::MAX));
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter * (2.0 * r.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((base * spread).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_the_factor_and_stops_at_the_max() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.5), Duration::ZERO);
        assert_eq!(b.delay(1, 0.5), Duration::from_secs(1));
        assert!((b.delay(2, 0.5).as_secs_f64() - 1.6).abs() < 1e-9);
        assert!((b.delay(3, 0.5).as_secs_f64() - 2.56).abs() < 1e-9);
        assert_eq!(b.delay(30, 0.5), Duration::from_secs(20));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_secs(20));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let b = Backoff::default();
        assert!((b.delay(30, 0.0).as_secs_f64() - 16.0).abs() < 1e-9);
        assert!((b.delay(30, 0.999_999).as_secs_f64() - 24.0).abs() < 1e-3);
    }
}
