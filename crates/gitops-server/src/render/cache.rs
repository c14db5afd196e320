//! Renderings kept by (commit, settings): a commit never changes, so neither does its
//! rendering, and every agent following the same project and settings shares one.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OnceCell;

/// A bounded map from key to a value computed once. Failures are not kept (the next caller
/// tries again); callers asking for a key being computed wait for that computation.
#[derive(Debug)]
pub struct RenderCache<K, V> {
    capacity: usize,
    inner: Mutex<Inner<K, V>>,
}

#[derive(Debug)]
struct Inner<K, V> {
    cells: HashMap<K, Arc<OnceCell<V>>>,
    /// Keys oldest first; the first is evicted when a new key needs room.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V: Clone> RenderCache<K, V> {
    /// Keeps at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                cells: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// The value for `key`, computed by `make` unless kept or being computed.
    pub async fn get_or_try_init<E, F, Fut>(&self, key: K, make: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = self.cell(key);
        cell.get_or_try_init(make).await.cloned()
    }

    fn cell(&self, key: K) -> Arc<OnceCell<V>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cell) = inner.cells.get(&key) {
            return Arc::clone(cell);
        }
        while inner.cells.len() >= self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.cells.remove(&oldest);
        }
        let cell = Arc::new(OnceCell::new());
        inner.cells.insert(key.clone(), Arc::clone(&cell));
        inner.order.push_back(key);
        cell
    }

    /// How many keys are kept.
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

    #[tokio::test]
    async fn each_key_is_computed_once_failures_are_retried_and_the_oldest_is_evicted() {
        let cache: RenderCache<u32, u32> = RenderCache::new(2);
        let runs = AtomicUsize::new(0);
        let make = |v: u32| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, ()>(v * 10) }
        };
        assert_eq!(cache.get_or_try_init(1, || make(1)).await, Ok(10));
        assert_eq!(cache.get_or_try_init(1, || make(1)).await, Ok(10));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let failed: Result<u32, &str> = cache.get_or_try_init(2, || async { Err("boom") }).await;
        assert_eq!(failed, Err("boom"));
        assert_eq!(cache.get_or_try_init(2, || make(2)).await, Ok(20));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(cache.get_or_try_init(3, || make(3)).await, Ok(30));
        assert_eq!(cache.len(), 2);
        // 1 was the oldest: computed again.
        assert_eq!(cache.get_or_try_init(1, || make(1)).await, Ok(10));
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }
}
