//! The parts of a running kas as a list: each started part leaves a [`Handle`] saying how it
//! is asked to stop and what kas waits for; [`Modules::shutdown`] stops them newest first.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type Close = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `f` every `period` (the first time one period from now) until `stop`; a run taking
/// longer than the period delays the next rather than bunching them.
pub async fn every<F, Fut>(period: Duration, stop: CancellationToken, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    every_or_notified(period, &tokio::sync::Notify::new(), stop, f).await;
}

/// As [`every`], and also at once whenever `now` is notified (a notification while `f` runs
/// makes it run again after): for work that a message asks for, which a lost message must not
/// leave undone.
pub async fn every_or_notified<F, Fut>(
    period: Duration,
    now: &tokio::sync::Notify,
    stop: CancellationToken,
    mut f: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tokio::select! {
            () = now.notified() => {}
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        f().await;
    }
}

/// One started part of kas.
pub struct Handle {
    name: &'static str,
    /// Cancelled to stop the part's listeners and background tasks.
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// A stop signal beyond the token (the registry ends its tunnels, the mirrors stop).
    on_stop: Option<Box<dyn FnOnce() + Send>>,
    /// Runs once the part's tasks ended (the store closes its connections).
    on_close: Option<Close>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.name)
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Handle {
    pub fn task(mut self, task: JoinHandle<()>) -> Self {
        self.tasks.push(task);
        self
    }

    pub fn on_stop(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_stop = Some(Box::new(f));
        self
    }

    pub fn on_close(mut self, f: impl Future<Output = ()> + Send + 'static) -> Self {
        self.on_close = Some(Box::pin(f));
        self
    }

    fn stop(&mut self) {
        if let Some(f) = self.on_stop.take() {
            f();
        }
        self.shutdown.cancel();
    }

    /// Waits for the part's tasks until `deadline`; false if some did not end in time.
    async fn join(self, deadline: Instant) -> bool {
        let all = futures_util::future::join_all(self.tasks);
        let ended = tokio::time::timeout_at(deadline, all).await.is_ok();
        if !ended {
            tracing::warn!(
                module = self.name,
                "Some listeners did not stop within the grace period"
            );
        }
        if let Some(close) = self.on_close {
            close.await;
        }
        ended
    }
}

/// The started parts, in start order.
#[derive(Debug)]
pub struct Modules {
    root: CancellationToken,
    started: Vec<Handle>,
}

impl Modules {
    pub fn new(root: CancellationToken) -> Self {
        Self {
            root,
            started: Vec::new(),
        }
    }

    /// The handle of the next part, with its own shutdown token (cancelled with the root's).
    pub fn handle(&self, name: &'static str) -> Handle {
        Handle {
            name,
            shutdown: self.root.child_token(),
            tasks: Vec::new(),
            on_stop: None,
            on_close: None,
        }
    }

    /// The token a part started with `handle` stops on.
    pub fn shutdown_of(handle: &Handle) -> CancellationToken {
        handle.shutdown.clone()
    }

    pub fn push(&mut self, handle: Handle) {
        tracing::debug!(module = handle.name, "Module started");
        self.started.push(handle);
    }

    /// Asks every part to stop, newest first, then waits for them in the same order, all
    /// within one `grace` period: every part is signalled before any is waited for, so a
    /// listener draining its connections sees the registry end the tunnels those carry.
    pub async fn shutdown(mut self, grace: Duration) {
        for m in self.started.iter_mut().rev() {
            m.stop();
        }
        self.root.cancel();
        let deadline = Instant::now() + grace;
        for m in self.started.into_iter().rev() {
            m.join(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn parts_stop_and_close_in_reverse_start_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut modules = Modules::new(CancellationToken::new());
        for name in ["store", "registry", "api"] {
            let (l1, l2) = (Arc::clone(&log), Arc::clone(&log));
            let h = modules.handle(name);
            let stop = Modules::shutdown_of(&h);
            let waited = Arc::clone(&log);
            let h = h
                .task(tokio::spawn(async move {
                    stop.cancelled().await;
                    waited
                        .lock()
                        .expect("log")
                        .push(format!("{name} task ended"));
                }))
                .on_stop(move || l1.lock().expect("log").push(format!("{name} stop")))
                .on_close(async move { l2.lock().expect("log").push(format!("{name} closed")) });
            modules.push(h);
        }
        modules.shutdown(Duration::from_secs(5)).await;
        let log = log.lock().expect("log").clone();
        let stops: Vec<_> = log.iter().filter(|l| l.ends_with("stop")).collect();
        assert_eq!(stops, ["api stop", "registry stop", "store stop"]);
        let closes: Vec<_> = log.iter().filter(|l| l.ends_with("closed")).collect();
        assert_eq!(closes, ["api closed", "registry closed", "store closed"]);
        // Every part was signalled before any was waited for.
        assert_eq!(log.iter().position(|l| l == "store stop"), Some(2));
    }

    #[tokio::test]
    async fn a_part_that_does_not_stop_is_given_up_after_the_grace_period() {
        let mut modules = Modules::new(CancellationToken::new());
        let h = modules.handle("stuck");
        let stuck = tokio::spawn(std::future::pending::<()>());
        let abort = stuck.abort_handle();
        modules.push(h.task(stuck));
        let started = std::time::Instant::now();
        modules.shutdown(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        abort.abort();
    }
}
