//! Whether this replica's leadership is still fresh, by the monotonic clock, at the moment it
//! writes.
//!
//! The leader election renews its Lease in rounds and says "no longer the leader" once a
//! round has not succeeded within the renew deadline. A replica paused for longer than the
//! lease (SIGSTOP, a frozen VM, a node's stall) wakes with its workers and its election due at
//! once; a worker that ran first started a sync of the commit it held — older than the one
//! the new leader had applied meanwhile — before the election's next round demoted it (E14).
//! The election publishes until when its last renewal holds; a sync is started, and each of
//! its stages and prune tiers is begun, only while that moment is ahead.

use tokio::sync::watch;
use tokio::time::Instant;

/// Until when this replica's last Lease renewal holds (`None` inside: not leading).
#[derive(Debug, Clone, Default)]
pub struct LeaseCheck(Option<watch::Receiver<Option<Instant>>>);

impl LeaseCheck {
    /// No election: always fresh.
    pub fn always() -> Self {
        Self(None)
    }

    /// Follows the election's `until` (the moment its last renewal stops holding).
    pub fn until(until: watch::Receiver<Option<Instant>>) -> Self {
        Self(Some(until))
    }

    /// Whether this replica may write now: no election, or its last renewal still holds.
    pub fn fresh(&self) -> bool {
        match &self.0 {
            None => true,
            Some(until) => until.borrow().is_some_and(|t| Instant::now() < t),
        }
    }

    /// Resolves when the election publishes again (a renewal, or the end of leading). Never
    /// without an election, or once the election ended.
    pub async fn renewed(&self) {
        let Some(until) = &self.0 else {
            return std::future::pending().await;
        };
        let mut until = until.clone();
        if until.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Not a setting: two settings differing only in their lease are the same settings.
impl PartialEq for LeaseCheck {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_fresh_until_its_renewal_stops_holding_and_again_once_renewed() {
        assert!(LeaseCheck::always().fresh());
        let (tx, rx) = watch::channel(None);
        let lease = LeaseCheck::until(rx);
        assert!(!lease.fresh(), "not leading");
        tx.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        assert!(lease.fresh());
        // Paused past the renew deadline: stale before the election runs again.
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(!lease.fresh());
        let renewed = tokio::spawn({
            let lease = lease.clone();
            async move { lease.renewed().await }
        });
        tokio::task::yield_now().await;
        tx.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        renewed.await.unwrap();
        assert!(lease.fresh());
    }
}
