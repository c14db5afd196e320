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
        self.0.push(Module { name, stop, task });
    }

    /// Stops the modules one by one in reverse order of start, each after the later ones have
    /// ended. Whatever still runs at `deadline` is left behind (agentk exits anyway).
    pub async fn stop(self, deadline: Duration) {
        let modules = self.0;
        let stopped = tokio::time::timeout(deadline, async move {
            for m in modules.into_iter().rev() {
                m.stop.cancel();
                if let Err(e) = m.task.await {
                    tracing::warn!(module = m.name, error = %e, "Module task failed");
                }
            }
        })
        .await;
        if stopped.is_err() {
            tracing::warn!(deadline = ?deadline, "Some modules did not stop in time; exiting anyway");
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
}
