//! Keeps a GitOps worker running when it panics.
//!
//! A worker is one project's whole GitOps: a panic in it (a bug, here or in a dependency)
//! would otherwise end that project's synchronization silently while the rest of agentk looks
//! healthy. The worker is started again after a backoff, with an error log each time.

use std::future::Future;

use tether_tunnel_agent::Backoff;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Runs `start(token)` until it returns or `stop` is cancelled, starting it again after each
/// panic (after `backoff`); returns how many times it panicked.
///
/// Each run gets its own child token of `stop`, cancelled when the run ends: what a crashed
/// run left behind (a sync in progress, whose token is a child of the run's) winds down
/// instead of racing the next run. The first delay should exceed that wind-down (2 s).
pub(super) async fn supervise<F, Fut>(
    mut start: F,
    stop: CancellationToken,
    backoff: Backoff,
) -> u32
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut panics = 0u32;
    loop {
        let run = stop.child_token();
        let ended = tokio::spawn(start(run.clone()).in_current_span()).await;
        run.cancel();
        match ended {
            Err(e) if e.is_panic() && !stop.is_cancelled() => {
                panics = panics.saturating_add(1);
                let delay = backoff.delay(panics, rand::random::<f64>());
                tracing::error!(error = %e, panics, restart_in_ms = delay.as_millis() as u64, "The synchronization worker crashed; starting it again");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return panics,
                }
            }
            // Returned (stopped), aborted, or crashed while stopping.
            _ => return panics,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(60),
            factor: 2.0,
            jitter: 0.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_run_is_started_again_after_the_backoff_with_its_token_cancelled() {
        let runs: Arc<Mutex<Vec<(tokio::time::Instant, CancellationToken)>>> = Arc::default();
        let stop = CancellationToken::new();
        let seen = Arc::clone(&runs);
        let supervisor = tokio::spawn(supervise(
            move |token: CancellationToken| {
                let mut r = seen.lock().unwrap();
                r.push((tokio::time::Instant::now(), token.clone()));
                let crash = r.len() <= 2;
                async move {
                    assert!(!crash, "a bug in the worker");
                    token.cancelled().await;
                }
            },
            stop.clone(),
            backoff(),
        ));
        let t0 = tokio::time::Instant::now();
        while runs.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        {
            let r = runs.lock().unwrap();
            // 10 s after the first panic, then 20 s after the second.
            let at: Vec<u64> = r.iter().map(|(t, _)| (*t - t0).as_secs()).collect();
            assert_eq!(at, [0, 10, 30]);
            assert!(r[0].1.is_cancelled() && r[1].1.is_cancelled());
            assert!(!r[2].1.is_cancelled());
        }
        stop.cancel();
        assert_eq!(supervisor.await.unwrap(), 2);
        assert!(runs.lock().unwrap()[2].1.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_returns_is_not_started_again() {
        let count = Arc::new(Mutex::new(0));
        let c = Arc::clone(&count);
        let panics = supervise(
            move |_| {
                *c.lock().unwrap() += 1;
                async {}
            },
            CancellationToken::new(),
            backoff(),
        )
        .await;
        assert_eq!((panics, *count.lock().unwrap()), (0, 1));
    }
}
