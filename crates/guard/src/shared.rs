//! Limits shared between kas replicas.
//!
//! Behind one address, a client's requests spread over every replica, so limits kept per
//! replica would let it through N times the configured rate. Each guard therefore notes what
//! it counted (failures per address and per credential, uses of a credential's quota) in a
//! [`PendingCounts`]; kas publishes those counts to the other replicas a few times a second and
//! each replica adds the others' counts to its own limiters ([`crate::AuthGuard::apply_shared`]).
//!
//! Why counts exchanged a few times a second rather than a counter in Redis looked up on every
//! request: admission stays a local, synchronous decision (no round trip on the path of every
//! agent RPC or proxied request, nothing to wait for when Redis is slow), and when Redis is
//! down each replica still enforces the limits on what it sees itself. The price is that a
//! client spread over replicas may exceed its burst by what reaches the others within one
//! exchange interval.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::LimitKind;

/// Events one limiter counted for one key since the last exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCount {
    pub kind: LimitKind,
    /// The limiter key: [`crate::address_key`] or a [`crate::Fingerprint`]'s bits.
    pub key: u128,
    pub count: u32,
}

/// Counts waiting for the next exchange, bounded so a flood of distinct keys between two
/// exchanges cannot grow memory (keys beyond the bound are counted locally only).
#[derive(Debug)]
pub struct PendingCounts {
    counts: Mutex<HashMap<(LimitKind, u128), u32>>,
    max_keys: usize,
}

impl PendingCounts {
    pub fn new(max_keys: usize) -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(1),
        }
    }

    /// Notes one event.
    pub fn add(&self, kind: LimitKind, key: u128) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let full = counts.len() >= self.max_keys;
        match counts.get_mut(&(kind, key)) {
            Some(n) => *n = n.saturating_add(1),
            None if !full => {
                counts.insert((kind, key), 1);
            }
            None => {}
        }
    }

    /// Everything noted since the last call.
    pub fn take(&self) -> Vec<SharedCount> {
        let counts =
            std::mem::take(&mut *self.counts.lock().unwrap_or_else(PoisonError::into_inner));
        counts
            .into_iter()
            .map(|((kind, key), count)| SharedCount { kind, key, count })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_limit_and_key_and_are_taken_once() {
        let p = PendingCounts::new(10);
        p.add(LimitKind::FailedPerAddress, 1);
        p.add(LimitKind::FailedPerAddress, 1);
        p.add(LimitKind::FailedPerCredential, 1);
        let mut taken = p.take();
        taken.sort_by_key(|c| c.count);
        assert_eq!(
            taken,
            vec![
                SharedCount {
                    kind: LimitKind::FailedPerCredential,
                    key: 1,
                    count: 1
                },
                SharedCount {
                    kind: LimitKind::FailedPerAddress,
                    key: 1,
                    count: 2
                },
            ]
        );
        assert!(p.take().is_empty());
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded_and_known_keys_still_count() {
        let p = PendingCounts::new(3);
        for k in 0..1000 {
            p.add(LimitKind::FailedPerAddress, k);
        }
        p.add(LimitKind::FailedPerAddress, 0);
        let taken = p.take();
        assert_eq!(taken.len(), 3);
        assert!(taken.iter().any(|c| c.key == 0 && c.count == 2));
    }
}
