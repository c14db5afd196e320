//! kas's abuse limits (`rate_limits` in the configuration): one [`AuthGuard`] per listener that
//! authenticates callers, the periodic summary of sampled refusal logs, and the HTTP middleware
//! that puts a guard in front of the admin API and the webhooks.
//!
//! Why these defaults:
//! - **Failed authentications per client address: 300/min, burst 100.** Only failures count, so
//!   a client with good credentials is never slowed, however busy. Once an address is over, every
//!   request from it is refused before its credential is looked at (that is the point: no store
//!   look-up, no JWT check), so the limit must leave room for several broken clients behind one
//!   NAT: an agentk with a revoked token retries each of its streams with backoff capped at
//!   20 s, a few failures a second at worst right after the revocation and well under one a
//!   second after that. A flood (thousands a second) is cut to 5 a second.
//! - **Failed authentications per credential: 60/min, burst 30.** The same wrong credential from
//!   many addresses (a revoked token still deployed in many places).
//! - **Agent RPCs per token: 600,000/min, burst 10,000.** What GitLab counts
//!   (`agent.listen.connections_per_token_per_minute`, every RPC of a token, default 40,000 —
//!   originally 100): here, too, every RPC presenting the token. Each request kas routes to an
//!   agent uses up one idle tunnel stream and agentk opens a new one (the pool scales up 10 at a
//!   time), so an agent's RPC rate *is* its request rate. One agent served 3,200 requests/s in
//!   the tunnel benchmark on 2 cores; GitLab's 40,000/min (667/s) would throttle that. 10,000/s
//!   is 3× that and more than one kas core can route, so a real agentk never meets it; it
//!   bounds a copied or runaway token, while wrong tokens are the failure limits' job.
//! - **Rate-limited answers held 1 s** (at most 1,024 at once): a client that ignores
//!   `Retry-After` then sends about one request a second per connection instead of thousands of
//!   cheap refusals that still cost TLS and parsing; legitimate clients were refused anyway.
//!
//! With several replicas (`redis` configured) the limits hold for kas as a whole: every
//! [`SHARE_INTERVAL`] each replica publishes what its limiters counted and adds what the others
//! published (see [`tether_guard::PendingCounts`] for why counts are exchanged rather than
//! looked up per request). If Redis is down each replica still enforces them on its own traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry as MetricsRegistry;
use serde::Deserialize;
use tether_guard::{
    AuthGuard, Fingerprint, GuardLimits, GuardMetrics, GuardShared, LimitKind, Limited, Rate,
    RefusalSampler, SharedCount, Tarpit,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `rate_limits` in kas's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Failed authentications per client address (IPv6: per /64), on each listener.
    pub failed_auth_per_address: RateConfig,
    /// Failed authentications per credential (by fingerprint), on each listener.
    pub failed_auth_per_credential: RateConfig,
    /// RPCs per agent token on the agent listener, failed or not.
    pub agent_rpcs_per_token: RateConfig,
    /// Addresses or credentials each limiter remembers at most (memory stays bounded).
    pub max_tracked_keys: usize,
    /// One refusal per client address and listener is logged per interval; the rest are
    /// summarised at its end.
    #[serde(with = "humantime_serde")]
    pub refusal_log_interval: Duration,
    /// How long the answer to a rate-limited request is held (zero: answered at once).
    #[serde(with = "humantime_serde")]
    pub limited_response_delay: Duration,
}

/// How often replicas exchange their limiters' counts: a client spread over replicas gets at
/// most what reaches the others within this time beyond its limit, and an idle replica sends
/// nothing (only counts that changed are published).
pub const SHARE_INTERVAL: Duration = Duration::from_millis(250);

/// One listener's counts as they travel between replicas: `(limit, key in hex, count)`. Keys
/// are client addresses and credential fingerprints (128 bits of a SHA-256), never secrets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ListenerCounts {
    pub listener: String,
    pub counts: Vec<(String, String, u32)>,
}

/// Rate-limited requests held at once (see [`tether_guard::Tarpit`]); beyond this they are
/// answered at once, so a flood over many connections cannot pile up sleeping tasks.
const MAX_HELD_REFUSALS: usize = 1024;

/// A rate: `burst` at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub per_minute: u32,
    pub burst: u32,
}

impl RateConfig {
    fn rate(self) -> Rate {
        Rate::new(self.per_minute, self.burst)
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            failed_auth_per_address: RateConfig {
                per_minute: 300,
                burst: 100,
            },
            failed_auth_per_credential: RateConfig {
                per_minute: 60,
                burst: 30,
            },
            agent_rpcs_per_token: RateConfig {
                per_minute: 600_000,
                burst: 10_000,
            },
            max_tracked_keys: 65_536,
            refusal_log_interval: Duration::from_secs(60),
            limited_response_delay: Duration::from_secs(1),
        }
    }
}

impl RateLimits {
    /// Zero rates would lock everyone out; a tiny table would forget limits at once.
    pub fn validate(&self) -> Result<(), String> {
        for (name, r) in [
            ("failed_auth_per_address", self.failed_auth_per_address),
            (
                "failed_auth_per_credential",
                self.failed_auth_per_credential,
            ),
            ("agent_rpcs_per_token", self.agent_rpcs_per_token),
        ] {
            if r.per_minute == 0 || r.burst == 0 {
                return Err(format!(
                    "rate_limits.{name}: per_minute and burst must be positive"
                ));
            }
        }
        if self.max_tracked_keys < 1024 {
            return Err("rate_limits.max_tracked_keys must be at least 1024".into());
        }
        if self.refusal_log_interval.is_zero() {
            return Err("rate_limits.refusal_log_interval must be positive".into());
        }
        Ok(())
    }
}

/// The guards of kas's listeners; they share one refusal sampler and one set of counters.
#[derive(Debug, Clone)]
pub struct Guards {
    pub agent: Arc<AuthGuard>,
    pub kubernetes_api: Arc<AuthGuard>,
    pub admin: Arc<AuthGuard>,
    pub webhooks: Arc<AuthGuard>,
    sampler: Arc<RefusalSampler>,
}

impl Guards {
    /// Builds the guards and registers their metrics.
    /// `share_counts`: note counts for other replicas (see [`Guards::spawn_sharing`]).
    pub fn new(cfg: &RateLimits, share_counts: bool, metrics: &mut MetricsRegistry) -> Self {
        let shared = GuardShared {
            sampler: Arc::new(RefusalSampler::new(
                cfg.refusal_log_interval,
                cfg.max_tracked_keys,
            )),
            metrics: GuardMetrics::default(),
            tarpit: Tarpit::new(cfg.limited_response_delay, MAX_HELD_REFUSALS),
            share_counts,
        };
        shared.metrics.register(metrics);
        let limits = GuardLimits {
            failed_per_address: cfg.failed_auth_per_address.rate(),
            failed_per_credential: cfg.failed_auth_per_credential.rate(),
            per_credential: None,
            max_keys: cfg.max_tracked_keys,
        };
        let guard = |listener, limits| Arc::new(AuthGuard::new(listener, limits, shared.clone()));
        let agent_limits = GuardLimits {
            per_credential: Some(cfg.agent_rpcs_per_token.rate()),
            ..limits
        };
        Self {
            agent: guard("agent", agent_limits),
            kubernetes_api: guard("kubernetes_api", limits),
            admin: guard("admin", limits),
            webhooks: guard("webhook", limits),
            sampler: Arc::clone(&shared.sampler),
        }
    }

    fn all(&self) -> [&Arc<AuthGuard>; 4] {
        [
            &self.agent,
            &self.kubernetes_api,
            &self.admin,
            &self.webhooks,
        ]
    }

    /// What every guard counted since the last call, by listener (listeners with nothing left
    /// out).
    pub fn take_shared(&self) -> Vec<ListenerCounts> {
        self.all()
            .into_iter()
            .filter_map(|g| {
                let counts = g.take_shared();
                (!counts.is_empty()).then(|| ListenerCounts {
                    listener: g.listener().to_string(),
                    counts: counts.iter().map(encode_count).collect(),
                })
            })
            .collect()
    }

    /// Adds another replica's counts to this replica's guards (unknown listeners or limits, from
    /// a newer replica, are skipped).
    pub fn apply_shared(&self, counts: &[ListenerCounts]) {
        let now = Instant::now();
        for lc in counts {
            let Some(g) = self.all().into_iter().find(|g| g.listener() == lc.listener) else {
                continue;
            };
            let decoded: Vec<SharedCount> = lc.counts.iter().filter_map(decode_count).collect();
            g.apply_shared(&decoded, now);
        }
    }

    /// Publishes this replica's counts every [`SHARE_INTERVAL`] until `stop`.
    pub fn spawn_sharing(
        &self,
        cluster: crate::cluster::Cluster,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let guards = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SHARE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => break,
                }
                let counts = guards.take_shared();
                if counts.is_empty() {
                    continue;
                }
                let event = crate::cluster::ClusterEvent::Limits {
                    from: cluster.replica(),
                    counts,
                };
                match cluster.publish(event).await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("Sharing rate-limit counts with other replicas again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "Cannot share rate-limit counts through Redis; each replica limits on its own traffic meanwhile");
                    }
                    Err(_) => {}
                }
            }
        })
    }

    /// Logs "N more refusals from X" for every sampling window that ended, until `stop`.
    pub fn spawn_summaries(&self, stop: CancellationToken) -> JoinHandle<()> {
        let sampler = Arc::clone(&self.sampler);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sampler.window());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => tether_guard::log_summaries(&sampler, Instant::now()),
                    () = stop.cancelled() => break,
                }
            }
        })
    }
}

fn encode_count(c: &SharedCount) -> (String, String, u32) {
    (c.kind.as_str().to_string(), format!("{:x}", c.key), c.count)
}

fn decode_count((kind, key, count): &(String, String, u32)) -> Option<SharedCount> {
    Some(SharedCount {
        kind: LimitKind::from_name(kind)?,
        key: u128::from_str_radix(key, 16).ok()?,
        count: *count,
    })
}

/// A guard in front of HTTP routes, with where their credential is.
#[derive(Clone)]
pub struct HttpGuard {
    pub guard: Arc<AuthGuard>,
    pub credential: fn(&HeaderMap) -> Option<&[u8]>,
}

impl std::fmt::Debug for HttpGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGuard")
            .field("listener", &self.guard.listener())
            .finish_non_exhaustive()
    }
}

/// The admin API's credential: `Authorization: Bearer <admin token>`.
pub fn bearer_credential(h: &HeaderMap) -> Option<&[u8]> {
    let v = h.get(header::AUTHORIZATION)?.as_bytes();
    Some(v.strip_prefix(b"Bearer ").unwrap_or(v))
}

/// A webhook's credential: GitLab's shared secret. Signatures (GitHub, Gitea) change with every
/// body, so only the address counts for them.
pub fn webhook_credential(h: &HeaderMap) -> Option<&[u8]> {
    h.get(tether_git_source::webhook::GITLAB_TOKEN_HEADER)
        .map(HeaderValue::as_bytes)
}

/// Middleware: refuses with 429 a client or credential over its failure limit before the route
/// runs, and counts the route's 401s as failures. The client address comes from axum's
/// `ConnectInfo<SocketAddr>` (the listener must be served with connect info; without it only
/// per-credential limits apply).
pub async fn guard_http(State(g): State<HttpGuard>, req: Request, next: Next) -> Response {
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let credential = (g.credential)(req.headers()).map(Fingerprint::of);
    if let Err(l) = g.guard.admit(address, credential) {
        g.guard.hold().await;
        return too_many_requests(&l);
    }
    let response = next.run(req).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        let reason = if credential.is_some() {
            "invalid_credentials"
        } else {
            "missing_credentials"
        };
        g.guard
            .refused(address, credential, reason, "401 Unauthorized");
    }
    response
}

/// 429 with `Retry-After` and a JSON error like the API's others.
fn too_many_requests(l: &Limited) -> Response {
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(serde_json::json!({"error": l.message()})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(l.retry_after_secs()));
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_zero_rates_do_not() {
        assert_eq!(RateLimits::default().validate(), Ok(()));
        let mut c = RateLimits::default();
        c.agent_rpcs_per_token.burst = 0;
        let e = c.validate().expect_err("zero burst");
        assert!(e.contains("agent_rpcs_per_token"), "{e}");
    }

    #[test]
    fn counts_survive_the_trip_between_replicas() {
        let mut m = MetricsRegistry::default();
        let cfg = RateLimits::default();
        let (here, there) = (
            Guards::new(&cfg, true, &mut m),
            Guards::new(&cfg, true, &mut m),
        );
        let addr = Some("192.0.2.7".parse().unwrap());
        for _ in 0..100 {
            there
                .webhooks
                .refused(addr, None, "invalid_credentials", "");
        }
        let sent = there.take_shared();
        let wire = serde_json::to_string(&crate::cluster::ClusterEvent::Limits {
            from: 1,
            counts: sent,
        })
        .unwrap();
        let Ok(crate::cluster::ClusterEvent::Limits { counts, .. }) = serde_json::from_str(&wire)
        else {
            panic!("{wire}");
        };
        assert!(here.webhooks.admit(addr, None).is_ok());
        here.apply_shared(&counts);
        assert!(
            here.webhooks.admit(addr, None).is_err(),
            "limited after the exchange"
        );
        assert!(here.admin.admit(addr, None).is_ok(), "per listener");
    }

    #[test]
    fn guards_without_sharing_note_nothing() {
        let mut m = MetricsRegistry::default();
        let g = Guards::new(&RateLimits::default(), false, &mut m);
        g.admin
            .refused(None, Some(Fingerprint::of(b"x")), "invalid_credentials", "");
        assert!(g.take_shared().is_empty());
    }

    #[test]
    fn the_bearer_prefix_is_not_part_of_the_credential() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_credential(&h), Some(&b"abc"[..]));
        assert_eq!(webhook_credential(&h), None);
    }
}
