//! Whether this replica may apply GitOps, as the leader election says.
//!
//! The election publishes on a watch channel. Its sender goes away when the election task
//! ends: normally only at shutdown (after GitOps stopped), otherwise abnormally (a panic). The
//! last value seen then was most likely `true`, and keeping it would leave a replica applying
//! that nobody elects any more while another takes the lease: an ended election means not
//! leading. "No election at all" (turned off, or no namespace for the Lease) is a case of its
//! own, not a channel whose sender is simply gone.

use tether_gitops_agent::lease::LeaseCheck;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Leadership {
    /// `None`: no election, this replica always applies.
    election: Option<watch::Receiver<bool>>,
    /// The election's sender was seen gone.
    ended: bool,
    /// Until when the last renewal holds, checked by the syncs as they write.
    lease: LeaseCheck,
}

impl Leadership {
    /// No election: this replica applies unconditionally.
    pub fn unconditional() -> Self {
        Self {
            election: None,
            ended: false,
            lease: LeaseCheck::always(),
        }
    }

    /// Follows the election publishing on `leading`, and until when its last renewal holds
    /// on `until`.
    pub fn elected(
        leading: watch::Receiver<bool>,
        until: watch::Receiver<Option<tokio::time::Instant>>,
    ) -> Self {
        Self {
            election: Some(leading),
            ended: false,
            lease: LeaseCheck::until(until),
        }
    }

    /// What the syncs check before they write.
    pub(super) fn lease(&self) -> LeaseCheck {
        self.lease.clone()
    }

    /// Whether this replica leads now; marks the current value seen.
    pub(super) fn leads(&mut self) -> bool {
        let Some(leading) = self.election.as_mut() else {
            return true;
        };
        self.ended = leading.has_changed().is_err();
        !self.ended && *leading.borrow_and_update()
    }

    /// Resolves when [`Self::leads`] may answer differently: the election published, or just
    /// ended. Never without an election or once it was seen ended.
    pub(super) async fn changed(&mut self) {
        match self.election.as_mut() {
            Some(leading) if !self.ended => {
                // An error is the sender going away: `leads` now says no.
                let _ = leading.changed().await;
            }
            _ => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `changed` resolves within a minute (time is paused: no real wait).
    async fn changes(l: &mut Leadership) -> bool {
        tokio::time::timeout(Duration::from_secs(60), l.changed())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_election_this_replica_always_leads() {
        let mut l = Leadership::unconditional();
        assert!(l.leads());
        assert!(!changes(&mut l).await);
        assert!(l.leads());
    }

    #[tokio::test(start_paused = true)]
    async fn the_election_is_followed_both_ways() {
        let (tx, rx) = watch::channel(false);
        let mut l = Leadership::elected(rx, watch::channel(None).1);
        assert!(!l.leads());
        tx.send_replace(true);
        assert!(changes(&mut l).await);
        assert!(l.leads());
        tx.send_replace(false);
        assert!(changes(&mut l).await);
        assert!(!l.leads());
    }

    #[tokio::test(start_paused = true)]
    async fn an_election_that_ends_while_leading_means_not_leading() {
        let (tx, rx) = watch::channel(false);
        let mut l = Leadership::elected(rx, watch::channel(None).1);
        tx.send_replace(true);
        assert!(l.leads());
        // The election task ends without saying so first (a panic drops its sender).
        drop(tx);
        assert!(changes(&mut l).await, "the end is a change");
        assert!(!l.leads(), "an ended election does not lead");
        // And nothing more happens: no busy loop on a closed channel.
        assert!(!changes(&mut l).await);
        assert!(!l.leads());
    }

    #[tokio::test(start_paused = true)]
    async fn an_election_that_ended_unseen_is_noticed_at_the_next_look() {
        let (tx, rx) = watch::channel(true);
        let mut l = Leadership::elected(rx, watch::channel(None).1);
        drop(tx);
        assert!(!l.leads());
    }
}
