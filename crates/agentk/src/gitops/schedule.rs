//! When a GitOps worker synchronizes, and which `kas agent reconcile` request a sync answers.
//! Pure: the worker passes the time in and does the I/O.

use tokio::time::Instant;

use super::Timing;

/// What a `kas agent reconcile` request makes the worker do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResyncStep {
    /// Asked or answered before (heard again after a reconnect): nothing.
    Seen,
    /// Suspended: remembered; the first sync after resuming answers it.
    Held,
    /// There is no commit to synchronize: remembered; the first commit's sync answers it.
    NoCommit,
    /// Stop any running sync and synchronize now.
    SyncNow,
}

/// The newest complete commit (`C`), when to synchronize it and which re-sync a sync answers.
///
/// Nothing is ever due without a commit: a due time with nothing to synchronize would wake the
/// worker at once, again and again (one core spinning until a commit arrives).
#[derive(Debug)]
pub(super) struct Schedule<C> {
    current: Option<C>,
    /// Set only while there is a commit.
    next_run: Option<Instant>,
    failures: u32,
    /// kas suspended the project: nothing is applied, pruned or drift-corrected.
    suspended: bool,
    /// The newest re-sync id kas asked for, and the one the running sync answers.
    resync_asked: u64,
    resync_running: u64,
    /// The newest re-sync id reported, so a request heard again after a reconnect is not
    /// synced twice.
    resync_answered: u64,
}

impl<C: Clone> Schedule<C> {
    pub(super) fn new() -> Self {
        Self {
            current: None,
            next_run: None,
            failures: 0,
            suspended: false,
            resync_asked: 0,
            resync_running: 0,
            resync_answered: 0,
        }
    }

    /// The newest complete commit.
    pub(super) fn current(&self) -> Option<&C> {
        self.current.as_ref()
    }

    /// The re-sync id the running (or last started) sync answers; 0 for none.
    pub(super) fn resync_running(&self) -> u64 {
        self.resync_running
    }

    /// Schedules a sync now, if there is anything to synchronize.
    fn run_now(&mut self, now: Instant) {
        if self.current.is_some() {
            self.failures = 0;
            self.next_run = Some(now);
        }
    }

    /// A new complete commit: synchronize it now (held while suspended).
    pub(super) fn commit(&mut self, commit: C, now: Instant) {
        self.current = Some(commit);
        self.run_now(now);
    }

    /// kas suspended (`true`) or resumed the project; whether that changed anything.
    /// Resuming synchronizes the commit there is at once.
    pub(super) fn suspend(&mut self, suspended: bool, now: Instant) -> bool {
        if suspended == self.suspended {
            return false;
        }
        self.suspended = suspended;
        if suspended {
            self.next_run = None;
        } else {
            self.run_now(now);
        }
        true
    }

    /// kas asked for a sync now (re-sync `id`).
    pub(super) fn resync(&mut self, id: u64, now: Instant) -> ResyncStep {
        if id <= self.resync_answered || id <= self.resync_asked {
            return ResyncStep::Seen;
        }
        self.resync_asked = id;
        if self.suspended {
            return ResyncStep::Held;
        }
        if self.current.is_none() {
            return ResyncStep::NoCommit;
        }
        self.run_now(now);
        ResyncStep::SyncNow
    }

    /// A report that answers every re-sync asked so far is being sent (a refusal, which needs
    /// no sync); the re-sync id it carries.
    pub(super) fn answer_asked(&mut self) -> u64 {
        self.resync_answered = self.resync_asked;
        self.resync_asked
    }

    /// kas suspended the project.
    pub(super) fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// Whether a sync is due now (`running`: a sync is running already), without taking it:
    /// the worker checks the entry's dependencies first.
    pub(super) fn is_due(&self, now: Instant, running: bool) -> bool {
        !self.suspended
            && !running
            && self.current.is_some()
            && self.next_run.is_some_and(|t| now >= t)
    }

    /// The commit to synchronize now, and the re-sync id its report will answer; `None` when
    /// nothing is due (`running`: a sync is running already).
    pub(super) fn take_due(&mut self, now: Instant, running: bool) -> Option<(C, u64)> {
        if !self.is_due(now, running) {
            return None;
        }
        let commit = self.current.clone()?;
        self.next_run = None;
        self.resync_running = self.resync_asked;
        Some((commit, self.resync_running))
    }

    /// The running sync finished: drift correction after a success, a retry with backoff after
    /// a failure, spread by `r` (uniform in [0, 1)) so agents failing together do not retry
    /// in lockstep. A sync made due while it ran (a newer commit, a re-sync, which supersede
    /// the running one) stays due now. The re-sync id its report answers.
    pub(super) fn finished(
        &mut self,
        succeeded: bool,
        now: Instant,
        (timing, r): (&Timing, f64),
    ) -> u64 {
        self.resync_answered = self.resync_answered.max(self.resync_running);
        if self.next_run.is_some() {
            return self.resync_running;
        }
        let delay = if succeeded {
            self.failures = 0;
            timing.resync_interval
        } else {
            self.failures = self.failures.saturating_add(1);
            timing.retry.delay(self.failures, r)
        };
        self.next_run = Some(now + delay);
        self.resync_running
    }

    /// The running sync panicked: retried like a failure (spread by `r`), answering nothing;
    /// a sync made due while it ran stays due now.
    pub(super) fn crashed(&mut self, now: Instant, timing: &Timing, r: f64) {
        if self.next_run.is_some() {
            return;
        }
        self.failures = self.failures.saturating_add(1);
        self.next_run = Some(now + timing.retry.delay(self.failures, r));
    }

    /// When the worker must wake to synchronize; `None` while suspended (nothing runs, so the
    /// time must not wake it again and again) or with nothing scheduled.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.next_run.filter(|_| !self.suspended)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn later(t: Instant, secs: u64) -> Instant {
        t + Duration::from_secs(secs)
    }

    #[test]
    fn without_a_commit_a_resync_is_remembered_and_nothing_is_due() {
        let t0 = Instant::now();
        let mut s: Schedule<&str> = Schedule::new();
        assert_eq!(s.resync(3, t0), ResyncStep::NoCommit);
        assert_eq!(
            s.wake_at(),
            None,
            "nothing to sync, so nothing may wake the worker"
        );
        assert_eq!(s.take_due(later(t0, 3600), false), None);
        assert_eq!(
            s.resync(3, t0),
            ResyncStep::Seen,
            "heard again after a reconnect"
        );

        // The first commit's sync answers the pending re-sync.
        let t1 = later(t0, 60);
        s.commit("c1", t1);
        assert_eq!(s.wake_at(), Some(t1));
        assert_eq!(s.take_due(t1, false), Some(("c1", 3)));
        assert_eq!(s.finished(true, t1, (&Timing::default(), 0.5)), 3);
    }

    #[test]
    fn resuming_without_a_commit_schedules_nothing() {
        let t0 = Instant::now();
        let mut s: Schedule<&str> = Schedule::new();
        assert!(s.suspend(true, t0));
        assert_eq!(s.resync(1, t0), ResyncStep::Held);
        assert!(s.suspend(false, t0));
        assert_eq!(s.wake_at(), None);
        assert_eq!(s.take_due(later(t0, 3600), false), None);
        s.commit("c1", t0);
        assert_eq!(s.take_due(t0, false), Some(("c1", 1)));
    }

    #[test]
    fn a_resync_with_a_commit_runs_now_and_is_answered_by_that_sync() {
        let t0 = Instant::now();
        let timing = Timing::default();
        let mut s = Schedule::new();
        s.commit("c1", t0);
        assert_eq!(s.take_due(t0, false), Some(("c1", 0)));
        assert_eq!(s.finished(true, t0, (&timing, 0.5)), 0);
        assert_eq!(s.wake_at(), Some(t0 + timing.resync_interval));

        let t1 = later(t0, 10);
        assert_eq!(s.resync(5, t1), ResyncStep::SyncNow);
        assert_eq!(s.wake_at(), Some(t1));
        assert_eq!(s.take_due(t1, true), None, "one sync at a time");
        assert_eq!(s.take_due(t1, false), Some(("c1", 5)));
        assert_eq!(s.finished(false, t1, (&timing, 0.5)), 5);
        assert_eq!(s.resync(5, t1), ResyncStep::Seen, "answered");
    }

    #[test]
    fn what_became_due_while_a_sync_ran_runs_as_soon_as_it_ends() {
        let t0 = Instant::now();
        let timing = Timing::default();
        let mut s = Schedule::new();
        s.commit("c1", t0);
        assert_eq!(s.take_due(t0, false), Some(("c1", 0)));
        // A newer commit supersedes the running sync, which still ends (and fails here).
        let t1 = later(t0, 1);
        s.commit("c2", t1);
        assert_eq!(s.take_due(t1, true), None, "one sync at a time");
        assert_eq!(s.finished(false, later(t0, 2), (&timing, 0.5)), 0);
        assert_eq!(s.wake_at(), Some(t1), "not after a retry delay");
        assert_eq!(s.take_due(later(t0, 2), false), Some(("c2", 0)));
        // A re-sync asked while c2's sync runs: answered by the sync after it, at once.
        let t3 = later(t0, 3);
        assert_eq!(s.resync(7, t3), ResyncStep::SyncNow);
        assert_eq!(s.finished(true, later(t0, 4), (&timing, 0.5)), 0);
        assert_eq!(s.wake_at(), Some(t3), "not after the resync interval");
        assert_eq!(s.take_due(later(t0, 4), false), Some(("c2", 7)));
        assert_eq!(s.finished(true, later(t0, 5), (&timing, 0.5)), 7);
        s.commit("c3", later(t0, 6));
        s.take_due(later(t0, 6), false);
        s.commit("c4", later(t0, 7));
        s.crashed(later(t0, 8), &timing, 0.5);
        assert_eq!(s.wake_at(), Some(later(t0, 7)), "a crash does not delay c4");
    }

    #[test]
    fn a_failed_sync_is_retried_after_a_delay_spread_by_r() {
        let t0 = Instant::now();
        let timing = Timing::default();
        let retry_at = |r: f64| {
            let mut s = Schedule::new();
            s.commit("c1", t0);
            s.take_due(t0, false);
            s.finished(false, t0, (&timing, r));
            s.wake_at()
        };
        assert!(
            retry_at(0.0) < retry_at(0.99),
            "agents failing together spread out"
        );
        assert_eq!(retry_at(0.5), Some(t0 + timing.retry.delay(1, 0.5)));
    }

    #[test]
    fn a_refusal_answers_the_resyncs_asked() {
        let t0 = Instant::now();
        let mut s: Schedule<&str> = Schedule::new();
        assert_eq!(s.resync(2, t0), ResyncStep::NoCommit);
        assert_eq!(s.answer_asked(), 2);
        assert_eq!(s.resync(2, t0), ResyncStep::Seen);
        assert_eq!(s.resync(4, t0), ResyncStep::NoCommit);
    }

    #[test]
    fn is_due_tells_what_take_due_would_take_without_taking_it() {
        let t0 = Instant::now();
        let mut s: Schedule<&str> = Schedule::new();
        s.resync(1, t0);
        assert!(!s.is_due(t0, false), "no commit");
        s.commit("c1", t0);
        assert!(s.is_due(t0, false));
        assert!(!s.is_due(t0, true), "one sync at a time");
        assert!(s.is_due(later(t0, 1), false), "still due, not taken");
        assert_eq!(s.take_due(t0, false), Some(("c1", 1)));
        assert!(!s.is_due(t0, false));
    }

    #[test]
    fn suspended_nothing_is_due_until_resumed() {
        let t0 = Instant::now();
        let mut s = Schedule::new();
        s.commit("c1", t0);
        assert!(!s.is_suspended());
        assert!(s.suspend(true, t0));
        assert!(s.is_suspended());
        assert!(!s.is_due(t0, false));
        assert!(!s.suspend(true, t0), "no change");
        assert_eq!(s.wake_at(), None);
        assert_eq!(s.take_due(later(t0, 3600), false), None);
        let t1 = later(t0, 5);
        assert!(s.suspend(false, t1));
        assert_eq!(s.take_due(t1, false), Some(("c1", 0)));
    }
}
