//! One read of something costly, shared by the callers waiting for it, never older than their
//! question.
//!
//! The CI kubeconfig endpoint needs every agent and its configuration in force: read per call,
//! a runner starting hundreds of jobs (or anyone holding one valid job token, at the proxy's
//! rate limits) made kas read the whole agents table as many times at once. A [`Fresh`] value
//! is read by one caller at a time; the callers that asked meanwhile take the next read, which
//! started after they asked, so none gets an answer older than its request (a `ci_access`
//! changed just before still counts) and at most one read runs at a time. A failed read is
//! given to no one else: the next caller reads again.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A value read anew for each batch of callers.
#[derive(Debug)]
pub struct Fresh<T> {
    // Held across the read: callers arriving meanwhile queue for the next one.
    last: Mutex<Option<(Instant, Arc<T>)>>,
}

impl<T> Default for Fresh<T> {
    fn default() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }
}

impl<T> Fresh<T> {
    /// A value read with `read` since this call began: the one another caller read, if its
    /// read started after this call did, or one read now.
    pub async fn get<E, F, Fut>(&self, read: F) -> Result<Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, value)) = last.as_ref()
            && *started >= asked
        {
            return Ok(Arc::clone(value));
        }
        let started = Instant::now();
        let value = Arc::new(read().await?);
        *last = Some((started, Arc::clone(&value)));
        Ok(value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    type Reads = Arc<AtomicUsize>;

    /// Each read takes 300 ms and returns its number.
    async fn read(reads: Reads) -> Result<usize, ()> {
        let n = reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(n)
    }

    fn callers(
        fresh: &Arc<Fresh<usize>>,
        reads: &Reads,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<usize>> {
        (0..n)
            .map(|_| {
                let (f, r) = (Arc::clone(fresh), Arc::clone(reads));
                tokio::spawn(async move { *f.get(|| read(r)).await.unwrap() })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn callers_share_a_read_started_after_they_asked_and_one_runs_at_a_time() {
        let fresh = Arc::new(Fresh::default());
        let reads = Reads::default();
        let first = callers(&fresh, &reads, 50);
        // Asked while read 0 runs: read 0 began before them, so they share read 1.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = callers(&fresh, &reads, 20);
        for c in first {
            assert_eq!(c.await.unwrap(), 0);
        }
        for c in second {
            assert_eq!(c.await.unwrap(), 1);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        // Asked after every read ended: a read of its own.
        assert_eq!(*fresh.get(|| read(Arc::clone(&reads))).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_read_is_not_kept() {
        let fresh = Fresh::default();
        let failed = fresh.get(|| async { Err::<u32, _>("down") }).await;
        assert_eq!(failed.unwrap_err(), "down");
        let read = fresh.get(|| async { Ok::<_, &str>(7) }).await;
        assert_eq!(*read.unwrap(), 7, "read again at once");
    }
}
