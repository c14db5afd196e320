//! Personal access tokens validated lately, so a burst of requests with one token asks the
//! database once rather than once per request.
//!
//! Every proxied request with a personal access token needs its record. Looked up per request,
//! 500 concurrent `kubectl` calls with one token queued 500 look-ups on the database's
//! connections, and kas's readiness check, queued behind them past its timeout, took the
//! replica out of the load balancer's rotation exactly when it was busy. A valid token's
//! record is remembered here, keyed by the token's SHA-256 (never the token), for
//! [`REMEMBERED_FOR`] at most and never past the token's own expiry; concurrent look-ups of
//! one token share a single query.
//!
//! A revocation forgets the token at once: every revocation this replica hears of (its own,
//! or another replica's through Redis) passes through [`crate::revocation::LiveUserRequests`],
//! which forgets it here. Records are therefore used only while this replica hears of every
//! revocation ([`Trust`]): always when it is the only replica (SQLite), while it follows the
//! Redis channel when there is one — a record remembered under an earlier subscription is not
//! used, since a revocation published while the channel was down never arrives — and never
//! for PostgreSQL without Redis, where other replicas may revoke without telling this one.
//!
//! Unknown, revoked or expired tokens are not remembered: a flood of made-up tokens can fill
//! nothing (the proxy's failure limits bound it), and the look-ups in progress (one entry per
//! distinct token being looked up) are bounded by the requests in progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tether_store::{Store, UserTokenInfo};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// How long a validated token is remembered at most: a safety net for a revocation this
/// replica did not hear of; the revocations it hears of forget the token at once.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(10);

/// How many tokens are remembered at most (only valid tokens are, so only their holders can
/// fill it); past it, those no longer fresh are dropped, and all of them if that is not enough.
const MAX_REMEMBERED: usize = 10_000;

/// A token's SHA-256.
type Key = [u8; 32];

/// The answer to a look-up: the token's record, `None` when unknown, revoked or expired.
pub type Lookup = Result<Option<Arc<UserTokenInfo>>, Arc<tether_store::Error>>;

/// When remembered records may be used: only while this replica hears of every revocation.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Never: other replicas may share the database (PostgreSQL) without telling this one of
    /// their revocations (no Redis).
    Never,
    /// Always: this replica is the only one (SQLite), every revocation passes through it.
    Always,
    /// While this replica follows Redis's channel, and only records remembered under the
    /// current subscription.
    WhileSubscribed(crate::cluster::Cluster),
}

impl Trust {
    /// The subscription records may be remembered and used under (`Some(0)`: no Redis needed);
    /// `None` when they may not be used now.
    fn epoch(&self) -> Option<u64> {
        match self {
            Trust::Never => None,
            Trust::Always => Some(0),
            Trust::WhileSubscribed(cluster) => cluster.subscription(),
        }
    }
}

/// Validated personal access tokens, remembered briefly.
#[derive(Debug)]
pub struct ValidatedTokens {
    trust: Trust,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    remembered: HashMap<Key, Remembered>,
    /// Look-ups under way, shared by whoever asks for the same token meanwhile.
    pending: HashMap<Key, Arc<OnceCell<Lookup>>>,
    /// Bumped by every revocation: a look-up begun before one must not remember its answer.
    generation: u64,
}

#[derive(Debug)]
struct Remembered {
    info: Arc<UserTokenInfo>,
    at: Instant,
    /// The Redis subscription it was remembered under (see [`Trust::epoch`]).
    epoch: u64,
}

impl Remembered {
    /// Still usable at `now`: within [`REMEMBERED_FOR`], before the token's expiry, and
    /// under the subscription in force.
    fn usable(&self, now: Instant, epoch: u64) -> bool {
        now.duration_since(self.at) < REMEMBERED_FOR
            && unexpired(&self.info, SystemTime::now())
            && self.epoch == epoch
    }
}

/// Whether the token of `info` is valid at `now`: as the store decides, until the second of
/// its `expires_at`, exactly — and only while `now` is not before the token was made (see
/// [`clock_behind`]).
pub fn unexpired(info: &UserTokenInfo, now: SystemTime) -> bool {
    now < expiry(info) && !clock_behind(info, now)
}

/// How far kas's clock may read before a token's creation (clocks of replicas that made it).
const CREATION_LEEWAY: Duration = Duration::from_secs(300);

/// Whether `now` is more than [`CREATION_LEEWAY`] before `info` was created: kas's clock is
/// behind (an RTC reset at boot before NTP, a step back), and every token expired since then
/// would look valid again — a kas at 2000-01-01 accepted a token that had expired (E14). Such
/// a clock cannot judge expiry: the token is refused (fail closed), and said.
pub fn clock_behind(info: &UserTokenInfo, now: SystemTime) -> bool {
    let created = UNIX_EPOCH + Duration::from_secs(u64::try_from(info.created_at).unwrap_or(0));
    now + CREATION_LEEWAY < created
}

/// When the token of `info` expires.
pub fn expiry(info: &UserTokenInfo) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(info.expires_at).unwrap_or(0))
}

impl ValidatedTokens {
    pub fn new(trust: Trust) -> Self {
        Self {
            trust,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is one insert or remove: consistent across a panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record of `token`: remembered, or looked up in `store` (one query for all who ask
    /// for the same token meanwhile).
    pub async fn authenticate(&self, store: &dyn Store, token: &str) -> Lookup {
        let Some(epoch) = self.trust.epoch() else {
            return look_up(store, token).await;
        };
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let (cell, generation) = {
            let mut inner = self.lock();
            if let Some(r) = inner.remembered.get(&key)
                && r.usable(Instant::now(), epoch)
            {
                return Ok(Some(Arc::clone(&r.info)));
            }
            let cell = Arc::clone(inner.pending.entry(key).or_default());
            (cell, inner.generation)
        };
        let looked = cell.get_or_init(|| look_up(store, token)).await.clone();
        let mut inner = self.lock();
        if inner
            .pending
            .get(&key)
            .is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            inner.pending.remove(&key);
        }
        if let Ok(Some(info)) = &looked
            && inner.generation == generation
        {
            inner.remember(key, Arc::clone(info), epoch);
        }
        looked
    }

    /// Forgets token `token_id` (revoked, or no longer active): its next request asks the
    /// database, and no look-up under way remembers it.
    pub fn forget(&self, token_id: i64) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.remembered.retain(|_, r| r.info.id != token_id);
        // Whoever asks from now on starts a look-up of their own, after the revocation.
        inner.pending.clear();
    }

    /// How many tokens are remembered.
    pub fn len(&self) -> usize {
        self.lock().remembered.len()
    }

    /// Whether no token is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn remember(&mut self, key: Key, info: Arc<UserTokenInfo>, epoch: u64) {
        if self.remembered.len() >= MAX_REMEMBERED {
            let now = Instant::now();
            self.remembered.retain(|_, r| r.usable(now, epoch));
            if self.remembered.len() >= MAX_REMEMBERED {
                self.remembered.clear();
            }
        }
        let at = Instant::now();
        self.remembered.insert(key, Remembered { info, at, epoch });
    }
}

async fn look_up(store: &dyn Store, token: &str) -> Lookup {
    match store.authenticate_user_token(token).await {
        Ok(Some(info)) if clock_behind(&info, SystemTime::now()) => {
            say_clock_behind(&info);
            Ok(None)
        }
        Ok(found) => Ok(found.map(Arc::new)),
        Err(e) => Err(Arc::new(e)),
    }
}

/// Logs, at most once a minute, that a token was refused because kas's clock is behind it.
fn say_clock_behind(info: &UserTokenInfo) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.saturating_sub(LAST.load(Ordering::Relaxed)) >= 60 {
        LAST.store(now, Ordering::Relaxed);
        tracing::error!(
            token_id = info.id,
            created_at = info.created_at,
            "kas's clock reads a time before a personal access token was created: it cannot judge expiry, so the token is refused; check this node's clock (NTP)"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A real store with one agent, and a personal access token of it lasting an hour.
    async fn store_with_token() -> (tempfile::TempDir, Arc<dyn Store>, i64, String) {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = tether_store::SqliteStore::open(&dir.path().join("kas.db"))
            .await
            .unwrap();
        let store: Arc<dyn Store> = Arc::new(sqlite);
        let agent = store.register_agent("group/p", "a").await.unwrap();
        let expires = i64::try_from(now_secs()).unwrap() + 3600;
        let (info, token) = store
            .create_user_token(agent.id, "alice", "[]", expires)
            .await
            .unwrap();
        (dir, store, info.id, token.expose().to_string())
    }

    fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Once validated, a token is answered from memory (the store revoking it behind kas's
    /// back changes nothing) until the revocation is heard of; then the store is asked again.
    #[tokio::test]
    async fn a_validated_token_is_remembered_until_forgotten() {
        let (_dir, store, id, token) = store_with_token().await;
        let validated = ValidatedTokens::new(Trust::Always);
        let found = validated.authenticate(store.as_ref(), &token).await;
        assert_eq!(found.unwrap().unwrap().id, id);
        assert_eq!(validated.len(), 1);
        store.revoke_user_token(id).await.unwrap();
        let remembered = validated.authenticate(store.as_ref(), &token).await;
        assert_eq!(remembered.unwrap().unwrap().id, id, "answered from memory");
        validated.forget(id);
        assert!(validated.is_empty());
        let refused = validated.authenticate(store.as_ref(), &token).await;
        assert!(refused.unwrap().is_none());
        assert!(validated.is_empty(), "a refused token is not remembered");
    }

    /// Without trust (PostgreSQL without Redis), every request asks the store.
    #[tokio::test]
    async fn without_trust_every_request_asks_the_store() {
        let (_dir, store, id, token) = store_with_token().await;
        let validated = ValidatedTokens::new(Trust::Never);
        assert!(
            validated
                .authenticate(store.as_ref(), &token)
                .await
                .unwrap()
                .is_some()
        );
        assert!(validated.is_empty());
        store.revoke_user_token(id).await.unwrap();
        assert!(
            validated
                .authenticate(store.as_ref(), &token)
                .await
                .unwrap()
                .is_none()
        );
    }

    /// Made-up tokens are not remembered, however many.
    #[tokio::test]
    async fn unknown_tokens_are_not_remembered() {
        let (_dir, store, _, token) = store_with_token().await;
        let validated = ValidatedTokens::new(Trust::Always);
        for i in 0..100 {
            let made_up = format!("{}{i:03}", &token[..token.len() - 3]);
            let found = validated.authenticate(store.as_ref(), &made_up).await;
            assert!(found.unwrap().is_none());
        }
        assert!(validated.is_empty());
    }

    /// A token is valid until the second of its `expires_at`, as the store decides.
    #[test]
    fn a_token_expires_at_its_expiry_exactly() {
        let info = UserTokenInfo {
            id: 1,
            agent_id: 1,
            username: "alice".into(),
            memberships: "[]".into(),
            created_at: 0,
            expires_at: 1_000,
            revoked_at: None,
        };
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert!(unexpired(&info, at(999, 999)));
        assert!(!unexpired(&info, at(1_000, 0)));
        assert_eq!(expiry(&info), at(1_000, 0));
    }

    /// A clock reading more than five minutes before a token's creation cannot judge its
    /// expiry: the token is refused, at the look-up (a kas started at 2000-01-01 accepted a
    /// token that had expired: E14) and when remembered.
    #[tokio::test]
    async fn a_token_is_refused_while_the_clock_reads_before_its_creation() {
        let info = UserTokenInfo {
            id: 1,
            agent_id: 1,
            username: "alice".into(),
            memberships: "[]".into(),
            created_at: 10_000,
            expires_at: 20_000,
            revoked_at: None,
        };
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert!(unexpired(&info, at(9_800)), "within the leeway");
        assert!(!unexpired(&info, at(9_000)));
        assert!(!unexpired(&info, at(1)));

        let (dir, store, _, token) = store_with_token().await;
        let validated = ValidatedTokens::new(Trust::Always);
        let db =
            sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("kas.db").display()))
                .await
                .unwrap();
        sqlx::query("UPDATE user_tokens SET created_at = created_at + 86400")
            .execute(&db)
            .await
            .unwrap();
        db.close().await;
        let found = validated
            .authenticate(store.as_ref(), &token)
            .await
            .unwrap();
        assert!(found.is_none(), "made a day after kas's now: {found:?}");
    }
}
