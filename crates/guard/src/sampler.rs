//! Sampled refusal logs: the first refusal from a client address in each window is logged in
//! full; the rest are only counted and summarised once the window ends ("N more refusals from
//! X"), so a flood writes a few lines a minute per address instead of one per request.
//!
//! Memory is bounded like the limiters': at most `max_keys` addresses have a window open; refusals
//! from further addresses go into one "other addresses" count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Whose refusals a window counts: one listener, one client address (`None`: unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub listener: &'static str,
    pub address: Option<IpAddr>,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Log it; `earlier_suppressed` refusals of this key were counted but not yet reported.
    Log { earlier_suppressed: u64 },
    /// Count it only.
    Suppress,
}

/// Refusals counted but not logged during a window that has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub listener: &'static str,
    /// `None`: an unknown address, or addresses beyond the tracked maximum.
    pub address: Option<IpAddr>,
    pub suppressed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    suppressed: u64,
}

#[derive(Debug, Default)]
struct State {
    windows: HashMap<SampleKey, Window>,
    /// Refusals from addresses that found the table full, per listener.
    overflow: HashMap<&'static str, u64>,
}

/// Decides which refusals are logged. Pure: callers pass the time.
#[derive(Debug)]
pub struct RefusalSampler {
    window: Duration,
    max_keys: usize,
    state: Mutex<State>,
}

impl RefusalSampler {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// The window length, also how often [`RefusalSampler::drain`] should run.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters only; a panic elsewhere cannot leave them unusable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes one refusal and says whether to log it.
    pub fn note(&self, key: SampleKey, now: Instant) -> Sample {
        let mut s = self.lock();
        let full = s.windows.len() >= self.max_keys;
        match s.windows.get_mut(&key) {
            Some(w) if now.saturating_duration_since(w.started) < self.window => {
                w.suppressed += 1;
                Sample::Suppress
            }
            Some(w) => {
                // The window ended before anyone drained it: report its count with this line.
                let earlier_suppressed = w.suppressed;
                *w = Window {
                    started: now,
                    suppressed: 0,
                };
                Sample::Log { earlier_suppressed }
            }
            None if full => {
                *s.overflow.entry(key.listener).or_default() += 1;
                Sample::Suppress
            }
            None => {
                s.windows.insert(
                    key,
                    Window {
                        started: now,
                        suppressed: 0,
                    },
                );
                Sample::Log {
                    earlier_suppressed: 0,
                }
            }
        }
    }

    /// Ends the windows that are over: returns what they suppressed and forgets them (so the
    /// next refusal from that address is logged again).
    pub fn drain(&self, now: Instant) -> Vec<Summary> {
        let mut s = self.lock();
        let mut out = Vec::new();
        s.windows.retain(|key, w| {
            let over = now.saturating_duration_since(w.started) >= self.window;
            if over && w.suppressed > 0 {
                out.push(Summary {
                    listener: key.listener,
                    address: key.address,
                    suppressed: w.suppressed,
                });
            }
            !over
        });
        for (listener, suppressed) in s.overflow.drain() {
            out.push(Summary {
                listener,
                address: None,
                suppressed,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8) -> SampleKey {
        SampleKey {
            listener: "agent",
            address: Some(IpAddr::from([127, 0, 0, last])),
        }
    }

    #[test]
    fn the_first_refusal_per_address_and_window_is_logged_and_the_rest_summarised() {
        let s = RefusalSampler::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert_eq!(
            s.note(key(1), t0),
            Sample::Log {
                earlier_suppressed: 0
            }
        );
        for _ in 0..1999 {
            assert_eq!(s.note(key(1), t0), Sample::Suppress);
        }
        assert_eq!(
            s.note(key(2), t0),
            Sample::Log {
                earlier_suppressed: 0
            }
        );
        assert!(
            s.drain(t0 + Duration::from_secs(59)).is_empty(),
            "window open"
        );
        let sums = s.drain(t0 + Duration::from_secs(60));
        assert_eq!(
            sums,
            vec![Summary {
                listener: "agent",
                address: key(1).address,
                suppressed: 1999
            }]
        );
        // Forgotten: the next refusal is logged again.
        assert!(matches!(
            s.note(key(1), t0 + Duration::from_secs(61)),
            Sample::Log { .. }
        ));
    }

    #[test]
    fn an_undrained_window_reports_its_count_with_the_next_logged_line() {
        let s = RefusalSampler::new(Duration::from_secs(1), 100);
        let t0 = Instant::now();
        let _ = s.note(key(1), t0);
        let _ = s.note(key(1), t0);
        let _ = s.note(key(1), t0);
        assert_eq!(
            s.note(key(1), t0 + Duration::from_secs(2)),
            Sample::Log {
                earlier_suppressed: 2
            }
        );
    }

    #[test]
    fn addresses_beyond_the_maximum_are_counted_together() {
        let s = RefusalSampler::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let logged = (0..=255u8)
            .filter(|i| matches!(s.note(key(*i), t0), Sample::Log { .. }))
            .count();
        assert_eq!(logged, 10);
        let sums = s.drain(t0 + Duration::from_secs(60));
        assert_eq!(
            sums,
            vec![Summary {
                listener: "agent",
                address: None,
                suppressed: 246
            }]
        );
    }
}
