//! A small bounded map whose entries expire: the proxy's memory of recent, costly answers.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// Entries live for `ttl` from their insertion; at `max` entries the expired ones are dropped,
/// and everything when none has expired (a burst of distinct keys must not grow it unbounded).
/// Time is the caller's, so tests can move it.
#[derive(Debug)]
pub struct ExpiringMap<K, V> {
    ttl: Duration,
    max: usize,
    map: Mutex<HashMap<K, (SystemTime, V)>>,
}

impl<K: Eq + Hash, V: Clone> ExpiringMap<K, V> {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (SystemTime, V)>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Younger than the ttl at `now`. An entry from after `now` (the wall clock stepped back)
    /// is expired: counted as fresh, it lived the ttl plus the step, hours for an NTP fix.
    fn fresh(&self, at: SystemTime, now: SystemTime) -> bool {
        now.duration_since(at).is_ok_and(|age| age < self.ttl)
    }

    /// The value stored for `key`, unless it has expired at `now`.
    pub fn get(&self, key: &K, now: SystemTime) -> Option<V> {
        let map = self.lock();
        let (at, v) = map.get(key)?;
        self.fresh(*at, now).then(|| v.clone())
    }

    /// Stores `value` for `key` as of `now`.
    pub fn insert(&self, key: K, value: V, now: SystemTime) {
        let mut map = self.lock();
        if map.len() >= self.max {
            map.retain(|_, (at, _)| self.fresh(*at, now));
            if map.len() >= self.max {
                map.clear();
            }
        }
        map.insert(key, (now, value));
    }

    /// Drops `key`'s value (it no longer holds: a deleted agent's).
    pub fn remove(&self, key: &K) {
        self.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_ttl_and_the_map_stays_bounded() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let m = ExpiringMap::new(Duration::from_secs(10), 2);
        m.insert(1, "a", t0);
        assert_eq!(m.get(&1, t0 + Duration::from_secs(9)), Some("a"));
        assert_eq!(m.get(&1, t0 + Duration::from_secs(10)), None);
        m.insert(2, "b", t0);
        // Full, nothing expired: cleared before the new entry goes in.
        m.insert(3, "c", t0);
        assert_eq!(m.get(&1, t0), None);
        assert_eq!(m.get(&3, t0), Some("c"));
        // Full again, 3 expired at t0 + 20 s: only the expired one goes.
        m.insert(4, "d", t0 + Duration::from_secs(15));
        m.insert(5, "e", t0 + Duration::from_secs(20));
        assert_eq!(m.get(&4, t0 + Duration::from_secs(20)), Some("d"));
        assert_eq!(m.get(&5, t0 + Duration::from_secs(20)), Some("e"));
        m.remove(&5);
        assert_eq!(m.get(&5, t0 + Duration::from_secs(20)), None);
    }

    #[test]
    fn an_entry_read_after_the_clock_stepped_back_is_expired() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let m = ExpiringMap::new(Duration::from_secs(10), 4);
        m.insert(1, "a", t0);
        assert_eq!(m.get(&1, t0 - Duration::from_secs(3600)), None);
    }
}
