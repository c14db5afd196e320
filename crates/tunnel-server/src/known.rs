//! Agent tokens that have a live stream here, remembered by their SHA-256.
//!
//! Each tunnel stream carries one request, and the agent opens a new stream for the next one:
//! without this, every request through the tunnel cost a store look-up of the agent's token.
//! An entry grants nothing new: it is used only while its token still has a live stream on this
//! kas (which revoking the token ends, forgetting the entry at the same time) and for at most
//! [`KNOWN_FOR`], so a token revoked where this kas did not hear of it is refused to new
//! streams within that time. Entries go when their token's last stream closes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::auth::AgentIdentity;

/// How long a looked-up token is trusted for new streams without asking the store again.
pub(crate) const KNOWN_FOR: Duration = Duration::from_secs(10);

/// A token's SHA-256.
pub(crate) type Digest = [u8; 32];

#[derive(Debug, Default)]
pub(crate) struct KnownTokens {
    entries: HashMap<Digest, (AgentIdentity, Instant)>,
    /// A token id has one digest: forgetting a token costs one look-up, not a scan.
    digests: HashMap<i64, Digest>,
}

impl KnownTokens {
    /// Who `digest` belongs to, if it was looked up less than [`KNOWN_FOR`] before `now` and
    /// its token has a live stream (`live`).
    pub(crate) fn get(
        &self,
        digest: &Digest,
        now: Instant,
        live: impl Fn(i64) -> bool,
    ) -> Option<AgentIdentity> {
        let (identity, since) = self.entries.get(digest)?;
        let fresh = now.saturating_duration_since(*since) < KNOWN_FOR;
        (fresh && live(identity.token_id)).then(|| identity.clone())
    }

    pub(crate) fn insert(&mut self, digest: Digest, identity: AgentIdentity, now: Instant) {
        if let Some(old) = self.digests.insert(identity.token_id, digest) {
            self.entries.remove(&old);
        }
        self.entries.insert(digest, (identity, now));
    }

    /// Forgets `token_id` (revoked, or its last stream closed).
    pub(crate) fn forget(&mut self, token_id: i64) {
        if let Some(digest) = self.digests.remove(&token_id) {
            self.entries.remove(&digest);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(token_id: i64) -> AgentIdentity {
        AgentIdentity {
            agent_id: 1,
            agent_name: "a".into(),
            project_path: "g/p".into(),
            token_id,
        }
    }

    #[test]
    fn a_token_is_known_while_fresh_and_live() {
        let (t0, mut known) = (Instant::now(), KnownTokens::default());
        known.insert([1; 32], identity(5), t0);
        let live = |t: i64| t == 5;
        assert_eq!(known.get(&[1; 32], t0, live), Some(identity(5)));
        assert_eq!(known.get(&[2; 32], t0, live), None, "another token");
        let later = t0 + KNOWN_FOR;
        assert_eq!(known.get(&[1; 32], later, live), None, "expired");
        assert_eq!(known.get(&[1; 32], t0, |_| false), None, "no live stream");
    }

    #[test]
    fn forgetting_a_token_drops_its_entries_only() {
        let (t0, mut known) = (Instant::now(), KnownTokens::default());
        known.insert([1; 32], identity(5), t0);
        known.insert([2; 32], identity(6), t0);
        known.forget(5);
        assert_eq!(known.len(), 1);
        assert_eq!(known.get(&[2; 32], t0, |_| true), Some(identity(6)));
    }
}
