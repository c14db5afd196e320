//! A GCRA rate limiter (the token bucket written as one timestamp per key) with bounded memory.
//!
//! GCRA keeps, per key, the *theoretical arrival time* (TAT) of the next event that conforms to
//! the rate. An event at `now` conforms when `TAT - now <= tolerance`, where the tolerance is
//! `(burst - 1)` emission intervals; a conforming event moves TAT one interval later. That is a
//! bucket of `burst` tokens refilled at `per_minute`, in 16 bytes of state and O(1) per event.
//!
//! Memory is bounded by keeping keys in two generations: new and updated keys go into `current`;
//! when it holds half the allowed keys it becomes `previous` and the old `previous` is dropped.
//! A key used in the last generation survives; a flood of distinct keys only cycles
//! generations (O(1) amortised per event, never a scan), so it cannot grow memory. The price: a
//! flood of more than `max_keys / 2` distinct keys can make a limited key forget its penalty,
//! which needs that many distinct client addresses (IPv6 is keyed by /64, see
//! [`crate::address_key`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How many events a key may have: `burst` at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_minute: u32, burst: u32) -> Self {
        Self { per_minute, burst }
    }

    /// Time between two events at the sustained rate (a zero rate is treated as one a minute,
    /// so a misconfiguration limits hard rather than dividing by zero).
    fn interval(self) -> Duration {
        Duration::from_secs(60) / self.per_minute.max(1)
    }
}

#[derive(Debug)]
struct Generations<K> {
    current: HashMap<K, Instant>,
    previous: HashMap<K, Instant>,
}

/// A rate limiter over keys `K` (client addresses, credential fingerprints).
///
/// Pure: every method takes the current time, so tests drive the clock.
#[derive(Debug)]
pub struct RateLimiter<K> {
    interval: Duration,
    tolerance: Duration,
    /// Keys kept per generation; two generations at most.
    generation_size: usize,
    state: Mutex<Generations<K>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter remembering at most `max_keys` keys (at least 2).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let interval = rate.interval();
        Self {
            interval,
            tolerance: interval * rate.burst.max(1).saturating_sub(1),
            generation_size: (max_keys / 2).max(1),
            state: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Generations<K>> {
        // The state is a cache of timestamps; one left half-updated by a panic is still valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether one more event of `key` would conform; `Err(retry_after)` if not. Consumes
    /// nothing: for limits on failures, which are recorded only once they happened.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let g = self.lock();
        let tat = g.current.get(key).or_else(|| g.previous.get(key)).copied();
        self.conforms(tat, now)
    }

    /// Takes one event for `key` if it conforms; `Err(retry_after)` (and nothing taken) if not.
    pub fn acquire(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut g = self.lock();
        let tat = g.current.get(key).or_else(|| g.previous.get(key)).copied();
        self.conforms(tat, now)?;
        let next = tat.map_or(now, |t| t.max(now)) + self.interval;
        self.store(&mut g, key, next);
        Ok(())
    }

    /// Counts one event for `key` whether or not it conformed (a failure that already happened).
    /// The debt is capped at one interval beyond the burst, so a key is never refused for longer
    /// than the sustained rate implies, however many events raced in at once.
    pub fn record(&self, key: &K, now: Instant) {
        let mut g = self.lock();
        let tat = g.current.get(key).or_else(|| g.previous.get(key)).copied();
        let cap = now + self.tolerance + self.interval;
        let next = (tat.map_or(now, |t| t.max(now)) + self.interval).min(cap);
        self.store(&mut g, key, next);
    }

    /// Counts `n` events for `key` at once (another replica's), with [`RateLimiter::record`]'s
    /// cap on the debt.
    pub fn record_n(&self, key: &K, n: u32, now: Instant) {
        if n == 0 {
            return;
        }
        let mut g = self.lock();
        let tat = g.current.get(key).or_else(|| g.previous.get(key)).copied();
        let cap = now + self.tolerance + self.interval;
        let next = tat
            .map_or(now, |t| t.max(now))
            .checked_add(self.interval.saturating_mul(n))
            .map_or(cap, |t| t.min(cap));
        self.store(&mut g, key, next);
    }

    fn conforms(&self, tat: Option<Instant>, now: Instant) -> Result<(), Duration> {
        let ahead = tat.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        if ahead > self.tolerance {
            Err(ahead - self.tolerance)
        } else {
            Ok(())
        }
    }

    fn store(&self, g: &mut Generations<K>, key: &K, tat: Instant) {
        g.previous.remove(key);
        if !g.current.contains_key(key) && g.current.len() >= self.generation_size {
            g.previous = std::mem::take(&mut g.current);
        }
        g.current.insert(key.clone(), tat);
    }

    /// Keys remembered now (both generations).
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.current.len() + g.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_is_allowed_then_one_event_per_interval() {
        // 60/min = one a second, burst 3.
        let l = RateLimiter::new(Rate::new(60, 3), 100);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.acquire(&"k", t0), Ok(()), "event {i} of the burst");
        }
        assert_eq!(l.acquire(&"k", t0), Err(Duration::from_secs(1)));
        // Half a second later, still half a second to wait.
        assert_eq!(l.acquire(&"k", t0 + ms(500)), Err(ms(500)));
        assert_eq!(l.acquire(&"k", t0 + ms(1000)), Ok(()));
        assert!(l.acquire(&"k", t0 + ms(1000)).is_err());
        // After a long pause the whole burst is back.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.acquire(&"k", later), Ok(()));
        }
        assert!(l.acquire(&"k", later).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let l = RateLimiter::new(Rate::new(60, 1), 100);
        let t0 = Instant::now();
        assert_eq!(l.acquire(&1, t0), Ok(()));
        assert!(l.acquire(&1, t0).is_err());
        assert_eq!(l.acquire(&2, t0), Ok(()));
    }

    #[test]
    fn check_consumes_nothing_and_record_counts_past_the_limit_with_a_capped_debt() {
        let l = RateLimiter::new(Rate::new(60, 2), 100);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.check(&"k", t0), Ok(()));
        }
        // Ten failures raced in at once: limited, but only for one interval, not ten.
        for _ in 0..10 {
            l.record(&"k", t0);
        }
        assert_eq!(l.check(&"k", t0), Err(Duration::from_secs(1)));
        assert_eq!(l.check(&"k", t0 + ms(999)), Err(ms(1)));
        assert_eq!(l.check(&"k", t0 + ms(1000)), Ok(()));
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_max_keys_and_recent_keys_survive() {
        let l = RateLimiter::new(Rate::new(1, 1), 1000);
        let t0 = Instant::now();
        assert_eq!(l.acquire(&u64::MAX, t0), Ok(()));
        for k in 0..100_000u64 {
            let _ = l.acquire(&k, t0);
            // Keep the interesting key in use, as an attacker's limited address would be.
            if k % 400 == 0 {
                let _ = l.check(&u64::MAX, t0);
                l.record(&u64::MAX, t0);
            }
            assert!(l.len() <= 1000, "{} keys after {k}", l.len());
        }
        assert!(l.acquire(&u64::MAX, t0).is_err(), "penalty kept");
    }

    #[test]
    fn record_n_counts_like_n_records() {
        let (a, b) = (
            RateLimiter::new(Rate::new(60, 5), 100),
            RateLimiter::new(Rate::new(60, 5), 100),
        );
        let t0 = Instant::now();
        for n in [0, 1, 4, 5, 7, 1000] {
            for _ in 0..n {
                a.record(&n, t0);
            }
            b.record_n(&n, n, t0);
            assert_eq!(a.check(&n, t0), b.check(&n, t0), "{n} events");
        }
    }

    #[test]
    fn a_zero_rate_limits_instead_of_panicking() {
        let l = RateLimiter::new(Rate::new(0, 0), 0);
        let t0 = Instant::now();
        assert_eq!(l.acquire(&"k", t0), Ok(()));
        assert_eq!(l.acquire(&"k", t0), Err(Duration::from_secs(60)));
    }
}
