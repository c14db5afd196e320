//! Stopping GitOps workers together.
//!
//! When this replica loses the lease, another one may take it over about 5 s later (lease
//! duration minus renew deadline) and apply the same projects. Stopping the workers one after
//! the other, each allowed its sync's stop grace (2 s), left the last ones applying and
//! pruning for N graces, long after the takeover; cancelled together, they all wind down
//! within one.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Cancels every worker first, then waits for all of them together, up to `within`; returns
/// the keys of the workers that ended. One still running at the deadline is left to finish on
/// its own (it is cancelled, so it starts nothing new): the caller must not wait for ever on a
/// worker stuck in a request while the configuration or the leadership changes again.
pub(super) async fn stop_all<K>(
    workers: Vec<(K, CancellationToken, JoinHandle<()>)>,
    within: Duration,
) -> Vec<K>
where
    K: std::fmt::Display,
{
    for (_, stop, _) in &workers {
        stop.cancel();
    }
    // They wind down side by side, so waiting for each in turn against one deadline takes
    // as long as the slowest, not the sum.
    let deadline = Instant::now() + within;
    let mut ended = Vec::with_capacity(workers.len());
    for (key, _, task) in workers {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(_) => ended.push(key),
            Err(_) => {
                tracing::warn!(project_id = %key, ?within, "The synchronization worker did not stop in time; leaving it to wind down");
            }
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{Arc, Mutex};

    use super::*;

    const GRACE: Duration = Duration::from_secs(2);

    /// A worker that, once cancelled, takes `takes` to wind down (a sync using its whole stop
    /// grace); records when it saw the cancellation.
    fn worker(
        key: usize,
        takes: Duration,
        cancelled_at: &Arc<Mutex<Vec<Instant>>>,
    ) -> (usize, CancellationToken, JoinHandle<()>) {
        let stop = CancellationToken::new();
        let (token, seen) = (stop.clone(), Arc::clone(cancelled_at));
        let task = tokio::spawn(async move {
            token.cancelled().await;
            seen.lock().unwrap().push(Instant::now());
            tokio::time::sleep(takes).await;
        });
        (key, stop, task)
    }

    #[tokio::test(start_paused = true)]
    async fn workers_are_all_cancelled_at_once_and_stop_within_one_grace() {
        let cancelled_at = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..5).map(|k| worker(k, GRACE, &cancelled_at)).collect();
        let t0 = Instant::now();
        let ended = stop_all(workers, GRACE + Duration::from_secs(1)).await;
        // Time is paused and moves only when every task waits: these are exact.
        assert_eq!(Instant::now() - t0, GRACE, "not one grace per worker");
        assert_eq!(ended, [0, 1, 2, 3, 4]);
        let seen = cancelled_at.lock().unwrap();
        assert_eq!(seen.len(), 5);
        assert!(seen.iter().all(|t| *t == t0), "each cancelled at the start");
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_does_not_stop_is_left_at_the_deadline() {
        let cancelled_at = Arc::new(Mutex::new(Vec::new()));
        let workers = vec![
            worker(0, GRACE, &cancelled_at),
            worker(1, Duration::from_secs(3600), &cancelled_at),
            worker(2, Duration::ZERO, &cancelled_at),
        ];
        let within = GRACE + Duration::from_secs(1);
        let t0 = Instant::now();
        let ended = stop_all(workers, within).await;
        assert_eq!(Instant::now() - t0, within);
        assert_eq!(ended, [0, 2]);
    }
}
