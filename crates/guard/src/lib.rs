//! Abuse limits for kas's listeners.
//!
//! Every listener that authenticates callers (agents, the Kubernetes API proxy, webhooks, the
//! admin API) owns an [`AuthGuard`]. Before doing anything costly with a credential (store
//! look-ups, JWT verification, HMACs) it asks [`AuthGuard::admit`]; after a failed
//! authentication it calls [`AuthGuard::refused`]. The guard
//!
//! - limits **failed** authentications per client address and per credential fingerprint
//!   ([`RateLimiter`], GCRA with bounded memory), so a flood of bad credentials is refused early
//!   while other clients, and good credentials, are never counted;
//! - optionally limits every use of one credential ([`GuardLimits::per_credential`]), the
//!   agent listener's per-token quota;
//! - logs refusals with the client address, sampled by [`RefusalSampler`] so a flood cannot fill
//!   the disk, and never with the credential;
//! - counts refusals and rate-limited requests in [`GuardMetrics`];
//! - holds the answer to a rate-limited request for a moment ([`Tarpit`]) so a client that
//!   ignores `Retry-After` cannot turn cheap refusals into a flood at full speed.

mod keys;
mod limiter;
mod metrics;
mod sampler;
mod shared;
mod tarpit;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use keys::{Fingerprint, address_key};
pub use limiter::{Rate, RateLimiter};
pub use metrics::GuardMetrics;
pub use sampler::{RefusalSampler, Sample, SampleKey, Summary};
pub use shared::{PendingCounts, SharedCount};
pub use tarpit::Tarpit;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// Failed authentications per client address.
    pub failed_per_address: Rate,
    /// Failed authentications per credential.
    pub failed_per_credential: Rate,
    /// Every use of one credential, failed or not (`None`: unlimited).
    pub per_credential: Option<Rate>,
    /// Keys each limiter remembers at most.
    pub max_keys: usize,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    FailedPerAddress,
    FailedPerCredential,
    PerCredential,
}

impl LimitKind {
    /// Its name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::FailedPerAddress => "failed_auth_per_address",
            LimitKind::FailedPerCredential => "failed_auth_per_credential",
            LimitKind::PerCredential => "requests_per_credential",
        }
    }

    /// The kind [`LimitKind::as_str`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            LimitKind::FailedPerAddress,
            LimitKind::FailedPerCredential,
            LimitKind::PerCredential,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// A request refused by a limit, and when the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub kind: LimitKind,
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds for `Retry-After` (rounded up, at least 1: `0` would invite a retry now).
    pub fn retry_after_secs(&self) -> u64 {
        let s = self.retry_after.as_secs();
        let s = if self.retry_after.subsec_nanos() > 0 {
            s + 1
        } else {
            s
        };
        s.max(1)
    }

    /// A sentence for the client.
    pub fn message(&self) -> String {
        let what = match self.kind {
            LimitKind::FailedPerAddress => "too many failed authentications from this address",
            LimitKind::FailedPerCredential => {
                "too many failed authentications with this credential"
            }
            LimitKind::PerCredential => "too many requests with this credential",
        };
        format!("{what}; retry in {} s", self.retry_after_secs())
    }
}

/// What the guards of all listeners share.
#[derive(Debug, Clone)]
pub struct GuardShared {
    pub sampler: Arc<RefusalSampler>,
    pub metrics: GuardMetrics,
    pub tarpit: Tarpit,
    /// Whether guards note their counts for other replicas (see [`shared`]).
    pub share_counts: bool,
}

/// One listener's limits, sampled refusal log and counters.
#[derive(Debug)]
pub struct AuthGuard {
    listener: &'static str,
    failed_by_address: RateLimiter<u128>,
    failed_by_credential: RateLimiter<Fingerprint>,
    by_credential: Option<RateLimiter<Fingerprint>>,
    sampler: Arc<RefusalSampler>,
    metrics: GuardMetrics,
    tarpit: Tarpit,
    /// Counts for the other replicas, when shared.
    pending: Option<PendingCounts>,
}

impl AuthGuard {
    /// `listener` labels this guard in logs and metrics.
    pub fn new(listener: &'static str, limits: GuardLimits, shared: GuardShared) -> Self {
        Self {
            listener,
            failed_by_address: RateLimiter::new(limits.failed_per_address, limits.max_keys),
            failed_by_credential: RateLimiter::new(limits.failed_per_credential, limits.max_keys),
            by_credential: limits
                .per_credential
                .map(|r| RateLimiter::new(r, limits.max_keys)),
            sampler: shared.sampler,
            metrics: shared.metrics,
            tarpit: shared.tarpit,
            pending: shared
                .share_counts
                .then(|| PendingCounts::new(limits.max_keys)),
        }
    }

    /// What this guard counted since the last call, for the other replicas.
    pub fn take_shared(&self) -> Vec<SharedCount> {
        self.pending
            .as_ref()
            .map(PendingCounts::take)
            .unwrap_or_default()
    }

    /// Adds what another replica counted to this guard's limiters.
    pub fn apply_shared(&self, counts: &[SharedCount], now: Instant) {
        for c in counts {
            match c.kind {
                LimitKind::FailedPerAddress => {
                    self.failed_by_address.record_n(&c.key, c.count, now)
                }
                LimitKind::FailedPerCredential => {
                    let f = Fingerprint::from_bits(c.key);
                    self.failed_by_credential.record_n(&f, c.count, now);
                }
                LimitKind::PerCredential => {
                    if let Some(quota) = &self.by_credential {
                        quota.record_n(&Fingerprint::from_bits(c.key), c.count, now);
                    }
                }
            }
        }
    }

    fn note(&self, kind: LimitKind, key: u128) {
        if let Some(p) = &self.pending {
            p.add(kind, key);
        }
    }

    /// Call before answering a request [`AuthGuard::admit`] refused: waits a moment (see
    /// [`Tarpit`]).
    pub async fn hold(&self) {
        self.tarpit.hold().await;
    }

    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// Before authenticating: refuses (and logs, counts) a client or credential over its limit.
    pub fn admit(
        &self,
        address: Option<IpAddr>,
        credential: Option<Fingerprint>,
    ) -> Result<(), Limited> {
        self.admit_at(address, credential, Instant::now())
    }

    /// [`AuthGuard::admit`] at a given time.
    pub fn admit_at(
        &self,
        address: Option<IpAddr>,
        credential: Option<Fingerprint>,
        now: Instant,
    ) -> Result<(), Limited> {
        let result = self.limit(address, credential, now);
        if let Err(l) = result {
            self.metrics.limited(self.listener, l.kind.as_str());
            self.metrics.refused(self.listener, "rate_limited");
            if self.sample(address, now) {
                tracing::warn!(
                    listener = self.listener,
                    client_address = %DisplayAddress(address),
                    limit = l.kind.as_str(),
                    retry_after_seconds = l.retry_after_secs(),
                    "Authentication rate limited"
                );
            }
        }
        result
    }

    fn limit(
        &self,
        address: Option<IpAddr>,
        credential: Option<Fingerprint>,
        now: Instant,
    ) -> Result<(), Limited> {
        let limited = |kind| move |retry_after| Limited { kind, retry_after };
        if let Some(a) = address {
            self.failed_by_address
                .check(&address_key(a), now)
                .map_err(limited(LimitKind::FailedPerAddress))?;
        }
        if let Some(c) = credential {
            self.failed_by_credential
                .check(&c, now)
                .map_err(limited(LimitKind::FailedPerCredential))?;
            // Taken last, so requests refused for failures do not use up the quota.
            if let Some(quota) = &self.by_credential {
                quota
                    .acquire(&c, now)
                    .map_err(limited(LimitKind::PerCredential))?;
                self.note(LimitKind::PerCredential, c.bits());
            }
        }
        Ok(())
    }

    /// After a failed authentication: counts it against the address and the credential, logs
    /// (sampled) and counts it. `reason` is a metric label (`missing_credentials`,
    /// `invalid_credentials`, ...); `detail` is for the log and must not contain the secret.
    pub fn refused(
        &self,
        address: Option<IpAddr>,
        credential: Option<Fingerprint>,
        reason: &'static str,
        detail: &str,
    ) {
        self.refused_at(address, credential, reason, detail, Instant::now());
    }

    /// [`AuthGuard::refused`] at a given time.
    pub fn refused_at(
        &self,
        address: Option<IpAddr>,
        credential: Option<Fingerprint>,
        reason: &'static str,
        detail: &str,
        now: Instant,
    ) {
        if let Some(a) = address {
            self.failed_by_address.record(&address_key(a), now);
            self.note(LimitKind::FailedPerAddress, address_key(a));
        }
        if let Some(c) = credential {
            self.failed_by_credential.record(&c, now);
            self.note(LimitKind::FailedPerCredential, c.bits());
        }
        self.metrics.refused(self.listener, reason);
        if self.sample(address, now) {
            tracing::warn!(
                listener = self.listener,
                client_address = %DisplayAddress(address),
                reason,
                detail,
                "Authentication refused"
            );
        }
    }

    /// Whether to log this refusal now; the line for an ended window also reports its count.
    fn sample(&self, address: Option<IpAddr>, now: Instant) -> bool {
        let key = SampleKey {
            listener: self.listener,
            address,
        };
        match self.sampler.note(key, now) {
            Sample::Log { earlier_suppressed } => {
                if earlier_suppressed > 0 {
                    log_summary(Summary {
                        listener: self.listener,
                        address,
                        suppressed: earlier_suppressed,
                    });
                }
                true
            }
            Sample::Suppress => {
                self.metrics.suppressed(self.listener);
                false
            }
        }
    }
}

/// Logs the summaries of windows that ended; run every [`RefusalSampler::window`].
pub fn log_summaries(sampler: &RefusalSampler, now: Instant) {
    for s in sampler.drain(now) {
        log_summary(s);
    }
}

fn log_summary(s: Summary) {
    let from = match s.address {
        Some(a) => a.to_string(),
        None => "unknown or untracked addresses".to_string(),
    };
    tracing::warn!(
        listener = s.listener,
        client_address = %from,
        refusals = s.suppressed,
        "{} more refusals from {from}",
        s.suppressed
    );
}

struct DisplayAddress(Option<IpAddr>);

impl std::fmt::Display for DisplayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(quota: Option<Rate>) -> AuthGuard {
        AuthGuard::new(
            "test",
            GuardLimits {
                failed_per_address: Rate::new(60, 3),
                failed_per_credential: Rate::new(60, 5),
                per_credential: quota,
                max_keys: 100,
            },
            GuardShared {
                sampler: Arc::new(RefusalSampler::new(Duration::from_secs(60), 100)),
                metrics: GuardMetrics::default(),
                tarpit: Tarpit::new(Duration::ZERO, 1),
                share_counts: true,
            },
        )
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn failures_from_one_address_limit_that_address_only() {
        let g = guard(None);
        let t0 = Instant::now();
        for i in 0..3u8 {
            assert!(g.admit_at(ip(2), None, t0).is_ok());
            g.refused_at(
                ip(2),
                Some(Fingerprint::of(&[i])),
                "invalid_credentials",
                "",
                t0,
            );
        }
        let l = g.admit_at(ip(2), None, t0).expect_err("limited");
        assert_eq!(l.kind, LimitKind::FailedPerAddress);
        assert_eq!(l.retry_after_secs(), 1);
        assert!(g.admit_at(ip(1), None, t0).is_ok(), "another address");
        assert!(g.admit_at(ip(2), None, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn one_bad_credential_from_many_addresses_is_limited_by_its_fingerprint() {
        let g = guard(None);
        let t0 = Instant::now();
        let bad = Some(Fingerprint::of(b"revoked"));
        for i in 0..5u8 {
            assert!(g.admit_at(ip(i), bad, t0).is_ok());
            g.refused_at(ip(i), bad, "invalid_credentials", "", t0);
        }
        let l = g.admit_at(ip(9), bad, t0).expect_err("limited");
        assert_eq!(l.kind, LimitKind::FailedPerCredential);
        let good = Some(Fingerprint::of(b"good"));
        assert!(g.admit_at(ip(9), good, t0).is_ok());
    }

    #[test]
    fn successes_are_never_counted_but_a_quota_counts_every_use() {
        let g = guard(None);
        let t0 = Instant::now();
        let c = Some(Fingerprint::of(b"token"));
        for _ in 0..1000 {
            assert!(g.admit_at(ip(1), c, t0).is_ok());
        }
        let g = guard(Some(Rate::new(60, 10)));
        for _ in 0..10 {
            assert!(g.admit_at(ip(1), c, t0).is_ok());
        }
        let l = g.admit_at(ip(1), c, t0).expect_err("quota");
        assert_eq!(l.kind, LimitKind::PerCredential);
        assert!(l.message().contains("too many requests"), "{}", l.message());
    }

    #[test]
    fn metrics_count_refusals_and_limited_requests() {
        let g = guard(None);
        let t0 = Instant::now();
        for _ in 0..10 {
            if g.admit_at(ip(2), None, t0).is_ok() {
                g.refused_at(ip(2), None, "missing_credentials", "", t0);
            }
        }
        let refusals = |reason: &str| {
            g.metrics
                .refusals
                .get_or_create(&metrics::RefusalLabels {
                    listener: "test".into(),
                    reason: reason.into(),
                })
                .get()
        };
        assert_eq!(refusals("missing_credentials"), 3);
        assert_eq!(refusals("rate_limited"), 7);
        let limited = g
            .metrics
            .rate_limited
            .get_or_create(&metrics::LimitedLabels {
                listener: "test".into(),
                limit: "failed_auth_per_address".into(),
            })
            .get();
        assert_eq!(limited, 7);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let l = |ms| Limited {
            kind: LimitKind::FailedPerAddress,
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(l(1).retry_after_secs(), 1);
        assert_eq!(l(1000).retry_after_secs(), 1);
        assert_eq!(l(1001).retry_after_secs(), 2);
    }

    #[test]
    fn failures_counted_on_another_replica_limit_this_one() {
        let (here, there) = (
            guard(Some(Rate::new(60, 10))),
            guard(Some(Rate::new(60, 10))),
        );
        let t0 = Instant::now();
        let bad = Some(Fingerprint::of(b"stolen"));
        for _ in 0..3 {
            there.refused_at(ip(2), None, "invalid_credentials", "", t0);
        }
        for _ in 0..10 {
            assert!(there.admit_at(ip(3), bad, t0).is_ok());
        }
        assert!(here.admit_at(ip(2), None, t0).is_ok(), "not shared yet");
        here.apply_shared(&there.take_shared(), t0);
        let l = here
            .admit_at(ip(2), None, t0)
            .expect_err("address limited here");
        assert_eq!(l.kind, LimitKind::FailedPerAddress);
        let l = here
            .admit_at(ip(3), bad, t0)
            .expect_err("quota used up there");
        assert_eq!(l.kind, LimitKind::PerCredential);
        assert!(there.take_shared().is_empty(), "taken once");
        assert!(here.admit_at(ip(4), None, t0).is_ok(), "others unaffected");
    }

    #[test]
    fn limit_kinds_round_trip_through_their_names() {
        for k in [
            LimitKind::FailedPerAddress,
            LimitKind::FailedPerCredential,
            LimitKind::PerCredential,
        ] {
            assert_eq!(LimitKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(LimitKind::from_name("other"), None);
    }
}
