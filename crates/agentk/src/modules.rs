//! agentk's modules as an explicit list: started in order, stopped in reverse.
//!
//! Each module gets its own stop token, so stopping is a sequence: the configuration stream ends
//! before GitOps, GitOps before the leader Lease is handed back (nothing applies here any more
//! when another replica takes over), and the tunnel and the observability endpoint (readiness)
//! last.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// One started module.
struct Module {
    name: &'static str,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Time this module may take to stop on top of the shared deadline ([`Modules::allow`]).
    allowance: Duration,
}

/// The started modules, in start order.
#[derive(Default)]
pub struct Modules(Vec<Module>);

impl std::fmt::Debug for Modules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|m| m.name))
            .finish()
    }
}

impl Modules {
    /// Starts module `name`: `run` gets the module's stop token and returns its work, which runs
    /// as a task inside `span`.
    pub fn start<F>(
        &mut self,
        name: &'static str,
        span: tracing::Span,
        run: impl FnOnce(CancellationToken) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()).instrument(span));
        self.adopt(name, stop, task);
    }

    /// Adds a module whose task was spawned elsewhere and stops when `stop` is cancelled.
    pub fn adopt(&mut self, name: &'static str, stop: CancellationToken, task: JoinHandle<()>) {
        self.0.push(Module {
            name,
            stop,
            task,
            allowance: Duration::ZERO,
        });
    }

    /// Gives module `name` `extra` time to stop beyond the shared deadline: the tunnel's drain,
    /// requests in flight finishing, which the other modules' deadline must not eat into nor
    /// be stretched by.
    pub fn allow(&mut self, name: &str, extra: Duration) {
        if let Some(m) = self.0.iter_mut().find(|m| m.name == name) {
            m.allowance = extra;
        }
    }

    /// Stops the modules one by one in reverse order of start, each after the later ones have
    /// ended. Together they get `deadline`, plus each one's allowance from its turn on; a
    /// module still running when its time is up is left behind (agentk exits anyway) and the
    /// next is stopped all the same, so a stuck module neither stretches the stop nor keeps
    /// the tunnel from draining.
    pub async fn stop(self, deadline: Duration) {
        let mut end = tokio::time::Instant::now() + deadline;
        for m in self.0.into_iter().rev() {
            end += m.allowance;
            m.stop.cancel();
            match tokio::time::timeout_at(end, m.task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(module = m.name, error = %e, "Module task failed"),
                Err(_) => tracing::warn!(
                    module = m.name,
                    deadline = ?deadline,
                    "Module did not stop in time; left behind"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn modules_stop_in_reverse_order_of_start() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut modules = Modules::default();
        for name in ["first", "second", "third"] {
            let order = Arc::clone(&order);
            modules.start(name, tracing::Span::none(), move |stop| async move {
                stop.cancelled().await;
                order.lock().expect("lock").push(name);
            });
        }
        assert_eq!(format!("{modules:?}"), r#"["first", "second", "third"]"#);
        modules.stop(Duration::from_secs(5)).await;
        assert_eq!(*order.lock().expect("lock"), ["third", "second", "first"]);
    }

    #[tokio::test]
    async fn a_module_that_does_not_stop_is_left_at_the_deadline() {
        let mut modules = Modules::default();
        modules.start("stuck", tracing::Span::none(), |_stop| {
            std::future::pending::<()>()
        });
        let done = tokio::time::timeout(
            Duration::from_secs(5),
            modules.stop(Duration::from_millis(50)),
        )
        .await;
        assert!(done.is_ok(), "stop must return at its deadline");
    }

    /// A module stuck past the shared deadline is left behind, and the one stopped after it
    /// (the tunnel) still gets its allowance to drain, however long the stuck one took.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_module_is_left_at_the_deadline_and_the_next_gets_its_allowance() {
        let drained = Arc::new(Mutex::new(false));
        let mut modules = Modules::default();
        let d = Arc::clone(&drained);
        modules.start("tunnel", tracing::Span::none(), move |stop| async move {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(8)).await; // requests finishing
            *d.lock().expect("lock") = true;
        });
        modules.allow("tunnel", Duration::from_secs(10));
        modules.start("gitops", tracing::Span::none(), |_stop| {
            std::future::pending::<()>()
        });
        let t0 = tokio::time::Instant::now();
        modules.stop(Duration::from_secs(4)).await;
        assert!(*drained.lock().expect("lock"), "the tunnel drained");
        // 4 s for the stuck module, then the tunnel's 8 s: not 4 s for everything, nor the
        // deadline stretched by the allowance for the stuck module.
        assert_eq!(t0.elapsed(), Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn modules_other_than_the_drain_share_the_deadline() {
        let mut modules = Modules::default();
        modules.start("tunnel", tracing::Span::none(), |stop| async move {
            stop.cancelled().await;
        });
        modules.allow("tunnel", Duration::from_secs(10));
        for name in ["leader_election", "gitops"] {
            modules.start(name, tracing::Span::none(), |stop| async move {
                stop.cancelled().await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            });
        }
        let t0 = tokio::time::Instant::now();
        modules.stop(Duration::from_secs(4)).await;
        // gitops 3 s, then leader election cut at 4 s; the tunnel ends at once.
        assert_eq!(t0.elapsed(), Duration::from_secs(4));
    }
}
