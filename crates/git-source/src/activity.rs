//! How a fetch's deadline tells a slow fetch from a stuck one.
//!
//! `git.fetch_timeout` used to bound a whole fetch, gix's indexing of the received pack
//! included: a large repository (or a slow link) never finished its first fetch, and the error
//! said "no answer". The deadline is now one of inactivity: gix reports its work (bytes read,
//! objects indexed and resolved, the server's own progress lines) through [`Tracker`], a
//! progress sink whose counters [`Activity`] sums, and a fetch fails only when that sum has not
//! moved for the timeout ([`Stall`]). A hard cap of [`CAP_FACTOR`] times the timeout still ends
//! a server that trickles a byte now and then forever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gix::progress::{Count, Id, MessageLevel, NestedProgress, Progress, Step, StepShared, Unit};

/// The longest a fetch may run, in multiples of its inactivity timeout (30 min for the default
/// 2 min): long enough for any repository a kas should mirror on a slow link, short enough that
/// a trickling server does not hold a project's fetches for good.
pub const CAP_FACTOR: u32 = 15;

/// The progress of the fetches of one mirror. Shared by the fetch (which reports into it) and
/// whoever waits for it, including a fetch queued behind it: the running fetch's progress
/// keeps the queued one's deadline away, as the queue moves.
#[derive(Clone, Default)]
pub(crate) struct Activity {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The counters gix handed out in the current fetch; it increments some directly.
    counters: Mutex<Vec<StepShared>>,
    /// Everything else gix reports (a new phase, a message, a counter reset).
    events: AtomicUsize,
}

impl Activity {
    /// A progress sink for a new fetch. The counters of the previous fetch are dropped (an
    /// event, so the change counts as activity), which bounds the list to one fetch's phases.
    pub(crate) fn start(&self) -> Tracker {
        self.counters().clear();
        self.bump();
        self.tracker()
    }

    /// A number that changes whenever gix reports anything. Compared, never interpreted.
    pub(crate) fn fingerprint(&self) -> usize {
        let counters = self
            .counters()
            .iter()
            .fold(0usize, |sum, c| sum.wrapping_add(c.load(Ordering::Relaxed)));
        counters.wrapping_add(self.inner.events.load(Ordering::Relaxed))
    }

    fn tracker(&self) -> Tracker {
        let counter = StepShared::default();
        self.counters().push(counter.clone());
        Tracker {
            activity: self.clone(),
            counter,
        }
    }

    fn bump(&self) {
        self.inner.events.fetch_add(1, Ordering::Relaxed);
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Vec<StepShared>> {
        // A panic elsewhere with the lock held leaves a list that is still a list.
        self.inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// gix's progress for one phase of a fetch: counts into [`Activity`], shows nothing.
pub(crate) struct Tracker {
    activity: Activity,
    counter: StepShared,
}

impl Count for Tracker {
    fn set(&self, step: Step) {
        self.counter.store(step, Ordering::Relaxed);
        self.activity.bump();
    }

    fn step(&self) -> Step {
        self.counter.load(Ordering::Relaxed)
    }

    fn inc_by(&self, step: Step) {
        self.counter.fetch_add(step, Ordering::Relaxed);
    }

    fn counter(&self) -> StepShared {
        self.counter.clone()
    }
}

impl Progress for Tracker {
    fn init(&mut self, _max: Option<Step>, _unit: Option<Unit>) {
        self.activity.bump();
    }

    fn set_name(&mut self, _name: String) {}

    fn name(&self) -> Option<String> {
        None
    }

    fn id(&self) -> Id {
        gix::progress::UNKNOWN
    }

    fn message(&self, _level: MessageLevel, _message: String) {
        self.activity.bump();
    }
}

impl NestedProgress for Tracker {
    type SubProgress = Tracker;

    fn add_child(&mut self, _name: impl Into<String>) -> Tracker {
        self.activity.tracker()
    }

    fn add_child_with_id(&mut self, _name: impl Into<String>, _id: Id) -> Tracker {
        self.activity.tracker()
    }
}

/// Why a fetch, or the wait for one, was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// Nothing was received or indexed for the timeout.
    Silent(Duration),
    /// Progressing, but running past the cap.
    TooLong(Duration),
}

/// The deadline of one fetch, from the fingerprints of its [`Activity`] seen over time. Pure:
/// the caller brings the clock.
#[derive(Debug)]
pub(crate) struct Stall {
    idle: Duration,
    cap: Duration,
    started: Instant,
    last_change: Instant,
    last_seen: usize,
}

impl Stall {
    pub(crate) fn new(idle: Duration, cap: Duration, now: Instant, fingerprint: usize) -> Stall {
        Stall {
            idle,
            cap,
            started: now,
            last_change: now,
            last_seen: fingerprint,
        }
    }

    /// Records what the fetch's activity reads `now`; `Some` once the fetch must end.
    pub(crate) fn observe(&mut self, now: Instant, fingerprint: usize) -> Option<GaveUp> {
        if fingerprint != self.last_seen {
            self.last_seen = fingerprint;
            self.last_change = now;
        }
        if now.duration_since(self.started) >= self.cap {
            return Some(GaveUp::TooLong(self.cap));
        }
        (now.duration_since(self.last_change) >= self.idle).then_some(GaveUp::Silent(self.idle))
    }

    /// How often to look: often enough that a stuck fetch ends within a tenth of its timeout
    /// past it, rarely enough to cost nothing (at most every 2 s).
    pub(crate) fn check_every(&self) -> Duration {
        (self.idle / 10).clamp(Duration::from_millis(10), Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_fetch_that_keeps_progressing_is_not_given_up_before_the_cap() {
        let t0 = Instant::now();
        let mut stall = Stall::new(T, T * CAP_FACTOR, t0, 0);
        // Progress every 9 s, far past one timeout in total.
        for i in 1..16u32 {
            let now = t0 + Duration::from_secs(9) * i;
            assert_eq!(stall.observe(now, i as usize), None, "at {i}");
        }
        let cap = t0 + T * CAP_FACTOR;
        assert_eq!(
            stall.observe(cap, 99),
            Some(GaveUp::TooLong(T * CAP_FACTOR))
        );
    }

    #[test]
    fn a_fetch_whose_activity_stops_is_given_up_one_timeout_after_its_last_change() {
        let t0 = Instant::now();
        let mut stall = Stall::new(T, T * CAP_FACTOR, t0, 5);
        assert_eq!(stall.observe(t0 + Duration::from_secs(4), 6), None);
        // Unchanged since 4 s: 13.9 s is within the timeout, 14 s is not.
        assert_eq!(stall.observe(t0 + Duration::from_millis(13_900), 6), None);
        assert_eq!(
            stall.observe(t0 + Duration::from_secs(14), 6),
            Some(GaveUp::Silent(T))
        );
    }

    #[test]
    fn a_silent_fetch_is_given_up_at_its_timeout() {
        let t0 = Instant::now();
        let mut stall = Stall::new(T, T * CAP_FACTOR, t0, 3);
        assert_eq!(stall.observe(t0 + T, 3), Some(GaveUp::Silent(T)));
    }

    #[test]
    fn counters_gix_increments_directly_and_events_both_change_the_fingerprint() {
        let activity = Activity::default();
        let mut root = activity.start();
        let before = activity.fingerprint();
        // gix's pack reader holds the counter and adds to it without calling the sink.
        let bytes = root.add_child("read pack").counter();
        bytes.fetch_add(4096, Ordering::Relaxed);
        let after_bytes = activity.fingerprint();
        assert_ne!(before, after_bytes);
        root.message(MessageLevel::Info, "done".into());
        assert_ne!(after_bytes, activity.fingerprint());
    }

    #[test]
    fn a_new_fetch_drops_the_counters_of_the_last_one_and_counts_as_activity() {
        let activity = Activity::default();
        let mut first = activity.start();
        let _ = first.add_child("a");
        let _ = first.add_child("b");
        let before = activity.fingerprint();
        let _second = activity.start();
        assert_eq!(activity.counters().len(), 1);
        assert_ne!(before, activity.fingerprint());
    }

    #[test]
    fn checks_are_frequent_for_short_timeouts_and_bounded_for_long_ones() {
        let t0 = Instant::now();
        let check = |idle| Stall::new(idle, idle, t0, 0).check_every();
        assert_eq!(check(Duration::from_millis(500)), Duration::from_millis(50));
        assert_eq!(check(Duration::from_secs(120)), Duration::from_secs(2));
        assert_eq!(check(Duration::from_millis(20)), Duration::from_millis(10));
    }
}
