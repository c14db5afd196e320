//! Renderings kept by (repository, commit, settings): a commit never changes, so neither does
//! its rendering, and every agent following the same project and settings shares one.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// A bounded map from key to an outcome computed once; callers asking for a key being
/// computed wait for that computation and share its outcome.
///
/// A failure the caller marks as lasting (the repository's fault: a timeout, a refusal) is kept
/// for `failure_ttl`, so many streams asking for one rendering that runs into its time limit
/// do not each run it again in turn; any other failure is dropped at once (the next caller
/// tries again). A computation still running is never evicted: evicting it would let a flood
/// of new keys start the same rendering again and again.
#[derive(Debug)]
pub struct RenderCache<K, V, E> {
    capacity: usize,
    failure_ttl: Duration,
    inner: Mutex<Inner<K, V, E>>,
}

type Cell<V, E> = Arc<OnceCell<(Result<V, E>, Instant)>>;

#[derive(Debug)]
struct Inner<K, V, E> {
    cells: HashMap<K, Cell<V, E>>,
    /// Keys oldest first; the oldest finished one is evicted when a new key needs room.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V: Clone, E: Clone> RenderCache<K, V, E> {
    /// Keeps at most `capacity` finished keys (at least one) and lasting failures for
    /// `failure_ttl`.
    pub fn new(capacity: usize, failure_ttl: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            failure_ttl,
            inner: Mutex::new(Inner {
                cells: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// The outcome for `key`, computed by `make` unless kept or being computed; `lasting`
    /// says which failures are kept.
    pub async fn get_or_try_init<F, Fut>(
        &self,
        key: K,
        lasting: impl Fn(&E) -> bool,
        make: F,
    ) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = self.cell(&key);
        let (outcome, _) = cell
            .get_or_init(|| async { (make().await, Instant::now()) })
            .await;
        if let Err(e) = outcome
            && !lasting(e)
        {
            self.forget(&key, &cell);
        }
        outcome.clone()
    }

    fn cell(&self, key: &K) -> Cell<V, E> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cell) = inner.cells.get(key) {
            let expired =
                matches!(cell.get(), Some((Err(_), at)) if at.elapsed() >= self.failure_ttl);
            if !expired {
                return Arc::clone(cell);
            }
            inner.cells.remove(key);
            inner.order.retain(|k| k != key);
        }
        while inner.cells.len() >= self.capacity {
            let Some(i) = inner
                .order
                .iter()
                .position(|k| inner.cells.get(k).is_some_and(|c| c.initialized()))
            else {
                break;
            };
            if let Some(oldest) = inner.order.remove(i) {
                inner.cells.remove(&oldest);
            }
        }
        let cell = Arc::new(OnceCell::new());
        inner.cells.insert(key.clone(), Arc::clone(&cell));
        inner.order.push_back(key.clone());
        cell
    }

    /// Drops `key` if it still holds `cell` (a newer cell for it stays).
    fn forget(&self, key: &K, cell: &Cell<V, E>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.cells.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            inner.cells.remove(key);
            inner.order.retain(|k| k != key);
        }
    }

    /// How many keys are kept (finished or being computed).
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.cells.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn lasting(e: &&str) -> bool {
        *e == "lasting"
    }

    #[tokio::test]
    async fn each_key_is_computed_once_passing_failures_are_retried_and_the_oldest_is_evicted() {
        let cache: RenderCache<u32, u32, &str> = RenderCache::new(2, Duration::from_secs(60));
        let runs = AtomicUsize::new(0);
        let make = |v: u32| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, &str>(v * 10) }
        };
        assert_eq!(cache.get_or_try_init(1, lasting, || make(1)).await, Ok(10));
        assert_eq!(cache.get_or_try_init(1, lasting, || make(1)).await, Ok(10));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let failed = cache
            .get_or_try_init(2, lasting, || async { Err("boom") })
            .await;
        assert_eq!(failed, Err("boom"));
        assert_eq!(cache.get_or_try_init(2, lasting, || make(2)).await, Ok(20));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(cache.get_or_try_init(3, lasting, || make(3)).await, Ok(30));
        assert_eq!(cache.len(), 2);
        // 1 was the oldest: computed again.
        assert_eq!(cache.get_or_try_init(1, lasting, || make(1)).await, Ok(10));
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    /// A rendering that fails through the repository (its time limit) is not run again by
    /// every caller in turn while the failure is fresh; once it is stale, it is.
    #[tokio::test]
    async fn a_lasting_failure_is_kept_until_it_expires() {
        let cache: RenderCache<u32, u32, &str> = RenderCache::new(4, Duration::from_secs(3600));
        let runs = AtomicUsize::new(0);
        let fail = || {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Err::<u32, _>("lasting") }
        };
        for _ in 0..3 {
            assert_eq!(
                cache.get_or_try_init(1, lasting, fail).await,
                Err("lasting")
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let expiring: RenderCache<u32, u32, &str> = RenderCache::new(4, Duration::ZERO);
        for _ in 0..2 {
            assert_eq!(
                expiring.get_or_try_init(1, lasting, fail).await,
                Err("lasting")
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// New keys never evict a rendering still running: the cache grows past its capacity
    /// instead, and evicts finished ones first.
    #[tokio::test]
    async fn a_computation_still_running_is_not_evicted() {
        let cache: Arc<RenderCache<u32, u32, &str>> =
            Arc::new(RenderCache::new(1, Duration::from_secs(60)));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let running = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache
                    .get_or_try_init(1, lasting, || async move {
                        let _ = started_tx.send(());
                        let _ = wait.await;
                        Ok(10)
                    })
                    .await
            })
        };
        started.await.expect("started");
        assert_eq!(
            cache.get_or_try_init(2, lasting, || async { Ok(20) }).await,
            Ok(20)
        );
        assert_eq!(cache.len(), 2, "key 1 is still being computed");
        release.send(()).expect("release");
        assert_eq!(running.await.expect("joined"), Ok(10));
        let runs = AtomicUsize::new(0);
        let again = cache
            .get_or_try_init(1, lasting, || {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok(11) }
            })
            .await;
        assert_eq!(again, Ok(10), "the finished computation was kept");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }
}
