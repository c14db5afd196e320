//! Live proxied requests per personal access token, so revoking a token ends them at once.
//!
//! The proxy authenticates a request when it arrives; a watch, a log follow or an exec can then
//! run for hours. Without this, revoking the token stopped new requests only, and its open
//! watches went on receiving events. Agent tokens have the same in the tunnel registry
//! (`Registry::revoke_token`). CI job ID tokens cannot be revoked by kas (their issuer owns
//! them), so their requests are not tracked here: each ends when its token expires (the
//! proxy's `watch_end`).
//!
//! Every revocation this replica hears of passes through [`LiveUserRequests::revoke`], so the
//! tokens validated lately ([`ValidatedTokens`]) are kept here too and forgotten there.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::validated_tokens::{Trust, ValidatedTokens};

/// Live requests by personal access token id, and the tokens validated lately.
#[derive(Debug)]
pub struct LiveUserRequests {
    inner: Mutex<Inner>,
    /// Forgotten at every revocation, with the live requests.
    pub validated: ValidatedTokens,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    live: HashMap<i64, HashMap<u64, CancellationToken>>,
    /// Tokens revoked while kas runs. A request authenticated just before a revocation can
    /// reach [`LiveUserRequests::track`] just after it; remembering the id refuses it there
    /// instead of letting it run untracked. Revoked tokens never come back, and an id costs
    /// eight bytes, so the set is not pruned.
    revoked: HashSet<i64>,
}

/// A tracked request; dropping it (when the response and any upgrade are done) stops tracking.
#[derive(Debug)]
pub struct LiveRequest {
    owner: Arc<LiveUserRequests>,
    token_id: i64,
    id: u64,
    cancel: CancellationToken,
}

impl LiveUserRequests {
    /// None live yet; validated tokens are remembered as `trust` allows.
    pub fn new(trust: Trust) -> Self {
        Self {
            inner: Mutex::default(),
            validated: ValidatedTokens::new(trust),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent across a panic (every update is one insert or remove).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a request made with token `token_id`; `None` if that token was revoked since
    /// kas started (the request must then be refused).
    pub fn track(self: &Arc<Self>, token_id: i64) -> Option<LiveRequest> {
        let mut inner = self.lock();
        if inner.revoked.contains(&token_id) {
            return None;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let cancel = CancellationToken::new();
        inner
            .live
            .entry(token_id)
            .or_default()
            .insert(id, cancel.clone());
        Some(LiveRequest {
            owner: Arc::clone(self),
            token_id,
            id,
            cancel,
        })
    }

    /// Ends every live request of `token_id` and refuses its later ones (forgetting that it
    /// was valid); how many were ended.
    pub fn revoke(&self, token_id: i64) -> usize {
        self.validated.forget(token_id);
        let ended: Vec<CancellationToken> = {
            let mut inner = self.lock();
            inner.revoked.insert(token_id);
            inner
                .live
                .remove(&token_id)
                .map(|m| m.into_values().collect())
                .unwrap_or_default()
        };
        for c in &ended {
            c.cancel();
        }
        ended.len()
    }

    /// The tokens with live requests.
    pub fn token_ids(&self) -> Vec<i64> {
        self.lock().live.keys().copied().collect()
    }

    /// Ends the live requests of every token in `ids` that `active` (the store's answer for
    /// them) does not list: expired, or revoked without this replica hearing of it. Returns
    /// the tokens ended.
    pub fn end_inactive(&self, ids: &[i64], active: &[i64]) -> Vec<i64> {
        let active: HashSet<i64> = active.iter().copied().collect();
        let ended: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !active.contains(id))
            .collect();
        for id in &ended {
            self.revoke(*id);
        }
        ended
    }

    /// How many requests of `token_id` are live.
    pub fn live(&self, token_id: i64) -> usize {
        self.lock().live.get(&token_id).map_or(0, HashMap::len)
    }
}

impl LiveRequest {
    /// Fires when the request's token is revoked.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl Drop for LiveRequest {
    fn drop(&mut self) {
        let mut inner = self.owner.lock();
        if let Some(m) = inner.live.get_mut(&self.token_id) {
            m.remove(&self.id);
            if m.is_empty() {
                inner.live.remove(&self.token_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_ends_that_tokens_requests_only() {
        let reqs = Arc::new(LiveUserRequests::new(Trust::Always));
        let (a1, a2, b) = (reqs.track(1), reqs.track(1), reqs.track(2));
        let (Some(a1), Some(a2), Some(b)) = (a1, a2, b) else {
            panic!("nothing is revoked yet");
        };
        assert_eq!(reqs.live(1), 2);
        assert_eq!(reqs.revoke(1), 2);
        assert!(a1.cancellation().is_cancelled() && a2.cancellation().is_cancelled());
        assert!(!b.cancellation().is_cancelled());
        assert_eq!(reqs.live(1), 0);
        assert_eq!(reqs.live(2), 1);
    }

    #[test]
    fn tokens_the_store_no_longer_lists_are_ended() {
        let reqs = Arc::new(LiveUserRequests::new(Trust::Always));
        let (a, b) = (reqs.track(1).expect("live"), reqs.track(2).expect("live"));
        let mut ids = reqs.token_ids();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        assert_eq!(reqs.end_inactive(&ids, &[2]), [1]);
        assert!(a.cancellation().is_cancelled());
        assert!(!b.cancellation().is_cancelled());
        assert!(
            reqs.track(1).is_none(),
            "an expired token starts nothing either"
        );
    }

    #[test]
    fn a_revoked_token_cannot_start_a_request() {
        let reqs = Arc::new(LiveUserRequests::new(Trust::Always));
        assert_eq!(reqs.revoke(3), 0);
        assert!(reqs.track(3).is_none());
        assert!(reqs.track(4).is_some());
    }

    #[test]
    fn finished_requests_are_forgotten() {
        let reqs = Arc::new(LiveUserRequests::new(Trust::Always));
        let r = reqs.track(5);
        assert_eq!(reqs.live(5), 1);
        drop(r);
        assert_eq!(reqs.live(5), 0);
        assert_eq!(reqs.revoke(5), 0);
    }
}
