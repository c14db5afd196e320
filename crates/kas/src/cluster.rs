//! Coordination between kas replicas through Redis (`redis:` in the configuration).
//!
//! A revocation — an agent token, a personal access token, a deleted agent — is stored first,
//! then ends what it opened (and a deleted agent's memory) on the replica that took it, and is
//! published on
//! [`CHANNEL`]; every replica follows the channel and ends the streams and requests that token
//! opened there, so a revoke on any replica takes effect on all within a second (without Redis,
//! other replicas notice at their next token re-check). Rate limiters' counts travel on the
//! same channel a few times a second, so a limit holds across replicas (see [`crate::limits`]).
//! Readiness follows Redis too: a replica that cannot reach it would miss revocations.
//! Pub/sub keeps nothing for a subscriber that was away, so after every (re)subscription the
//! follower is told ([`Cluster::follow`]) and reads again from the store what a message would
//! have said (the configurations in force, see `server::follow_cluster_events`). The channel's
//! state is exported: `kas_redis_channel_subscribed`, `kas_redis_channel_losses_total` and
//! `kas_redis_publish_failures_total` (alert `TetherKasRedisChannelDown`).
//!
//! Without `redis`, kas is a single replica and nothing here runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The pub/sub channel replicas tell each other things on.
pub const CHANNEL: &str = "tether:events";

/// `redis:` in kas's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://host:port/db` for TLS (Sentinel is not supported).
    pub url: String,
    /// A file holding the password (Redis `requirepass`, or an ACL user's with `username`).
    pub password_file: Option<PathBuf>,
    /// An ACL user (Redis 6+); default: the default user.
    pub username: Option<String>,
    /// With `rediss://`: the CA (PEM) that signed Redis's certificate; default: the system's
    /// trusted roots.
    pub ca_file: Option<PathBuf>,
    /// With `rediss://`: a client certificate and key (PEM) when Redis asks for one
    /// (`tls-auth-clients yes`).
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl RedisConfig {
    pub fn validate(&self) -> Result<(), String> {
        let tls = self.url.starts_with("rediss://");
        if !tls && !self.url.starts_with("redis://") {
            return Err(format!(
                "redis.url: {} is not a redis:// or rediss:// URL",
                self.url
            ));
        }
        let tls_files =
            self.ca_file.is_some() || self.certificate_file.is_some() || self.key_file.is_some();
        if tls_files && !tls {
            return Err("redis.ca_file, certificate_file and key_file need a rediss:// url".into());
        }
        if self.certificate_file.is_some() != self.key_file.is_some() {
            return Err("redis.certificate_file and redis.key_file go together".into());
        }
        Ok(())
    }

    fn tls(&self) -> Result<Option<redis::TlsCertificates>, ClusterError> {
        if !self.url.starts_with("rediss://") {
            return Ok(None);
        }
        let read = |f: &PathBuf| {
            std::fs::read(f).map_err(|source| ClusterError::File {
                file: f.display().to_string(),
                source,
            })
        };
        let client_tls = match (&self.certificate_file, &self.key_file) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            _ => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert: self.ca_file.as_ref().map(read).transpose()?,
        }))
    }
}

/// What one replica tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ClusterEvent {
    /// An agent token was revoked: end its tunnel, configuration and GitOps streams.
    AgentToken { id: i64 },
    /// A personal access token was revoked: end the requests it has open through the proxy.
    UserToken { id: i64 },
    /// A push webhook for a project reached replica `from`: every other replica fetches it
    /// too (each keeps its own mirror), so agents on any replica get the commit at once.
    Pushed { project: i64, from: u64 },
    /// Replica `from` set or removed a project: every other replica re-reads the projects
    /// from the store (and does so periodically anyway, for an event it missed).
    Projects { from: u64 },
    /// An agent was deleted: every replica forgets what it remembers of it (its configuration
    /// in force authorized CI jobs and people). Its tokens are announced as [`Self::AgentToken`].
    AgentDeleted { agent_id: i64 },
    /// Replica `from` suspended or resumed GitOps of an agent: the agent's GitOps streams on
    /// every replica re-read their suspensions (the leader's may be on any of them).
    Suspensions { agent_id: i64, from: u64 },
    /// Replica `from` asked an agent to re-sync a project (`kas agent reconcile`): the
    /// leader's stream, wherever it is, passes it on.
    Resync {
        agent_id: i64,
        project_id: i64,
        id: u64,
        from: u64,
    },
    /// Replica `from` put another configuration in force for an agent (the last of the
    /// agent's replicas running the one in force went, see [`crate::config_replicas`]): every
    /// other replica reads the agent's stored configuration again, even one serving the
    /// agent's other replicas (whose memory holds the former one).
    ConfigInForce { agent_id: i64, from: u64 },
    /// What replica `from`'s rate limiters counted lately (see [`crate::limits`]).
    Limits {
        from: u64,
        counts: Vec<crate::limits::ListenerCounts>,
    },
}

/// A connection to Redis shared by the replica's modules; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    live: Arc<Mutex<Live>>,
    cfg: Arc<RedisConfig>,
    /// This replica's id in [`ClusterEvent::Pushed`] (random per process).
    replica: u64,
    /// Readiness checks in a row that Redis did not answer, and whether a replacement
    /// connection is being opened (see [`Cluster::check`]).
    silent_checks: Arc<std::sync::atomic::AtomicU32>,
    replacing: Arc<std::sync::atomic::AtomicBool>,
    /// The current subscription to [`CHANNEL`], numbered from 1; 0 while not subscribed (see
    /// [`Cluster::subscription`]).
    subscription: Arc<std::sync::atomic::AtomicU64>,
    metrics: ChannelMetrics,
    /// Redis's clock minus this replica's, in milliseconds (see [`Cluster::now_secs`]).
    clock_offset_ms: Arc<std::sync::atomic::AtomicI64>,
    /// Whether the offset was last said to be too large (said once per crossing).
    clock_off: Arc<std::sync::atomic::AtomicBool>,
}

/// The revocation channel's health, as exported (see [`Cluster::register_metrics`]).
#[derive(Clone, Default)]
struct ChannelMetrics {
    /// 1 while subscribed to [`CHANNEL`].
    subscribed: prometheus_client::metrics::gauge::Gauge,
    /// Subscriptions lost, and attempts to subscribe that failed.
    losses: prometheus_client::metrics::counter::Counter,
    /// Messages that could not be published: the other replicas never hear of them.
    publish_failures: prometheus_client::metrics::counter::Counter,
    /// Redis's clock minus this replica's, in seconds.
    clock_offset: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The client and connection made from the credential files as they were when read.
struct Live {
    client: redis::Client,
    conn: redis::aio::ConnectionManager,
    stamp: CredentialStamp,
}

/// How often the credential files (password, CA, client certificate and key) are checked for
/// a change: a rotated Secret is used within this (the kubelet itself takes up to a minute).
const CREDENTIALS_RECHECK: Duration = Duration::from_secs(10);

/// Longest a connection with new credentials may take before they are tried again later.
const CREDENTIALS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a readiness `PING` waits (below readiness's own timeout, so a silent Redis is
/// counted here rather than cut off there).
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Unanswered readiness checks in a row after which the connection is replaced: a connection
/// left half-open (a failover, or a load balancer that dropped it without a reset) never fails
/// by itself, and the client reconnects only when it fails.
const SILENT_CHECKS_BEFORE_REPLACING: u32 = 2;

/// How often the revocation channel's connection is pinged, and how long the answer may take:
/// a subscription on a half-open connection would otherwise wait for messages forever.
const CHANNEL_PING_INTERVAL: Duration = Duration::from_secs(15);
const CHANNEL_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Size and modification time of each credential file (`None`: not configured or unreadable).
type CredentialStamp = [crate::followed::Stamp; 4];

fn credential_stamp(cfg: &RedisConfig) -> CredentialStamp {
    [
        &cfg.password_file,
        &cfg.ca_file,
        &cfg.certificate_file,
        &cfg.key_file,
    ]
    .map(|f| crate::followed::stamp(f.as_ref()?))
}

/// Keepalive probes and a bound on unacknowledged data, so the kernel ends a connection whose
/// peer vanished (a failover, a dropped load-balancer state) within about half a minute and
/// the client reconnects, instead of after the system's two hours.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(crate::peers::dead_peer_keepalive())
        .set_user_timeout(crate::peers::DEAD_PEER_TIMEOUT)
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// Why kas cannot use Redis.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: reading {file}: {source}")]
    File {
        file: String,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl Cluster {
    /// Connects (kas does not start when Redis is configured but unreachable: it would miss
    /// revocations from the first moment).
    pub async fn connect(cfg: &RedisConfig) -> Result<Cluster, ClusterError> {
        let stamp = credential_stamp(cfg);
        let (client, conn) = Self::open(cfg).await?;
        Ok(Cluster {
            live: Arc::new(Mutex::new(Live {
                client,
                conn,
                stamp,
            })),
            cfg: Arc::new(cfg.clone()),
            replica: rand::random(),
            silent_checks: Arc::default(),
            replacing: Arc::default(),
            subscription: Arc::default(),
            metrics: ChannelMetrics::default(),
            clock_offset_ms: Arc::default(),
            clock_off: Arc::default(),
        })
    }

    /// The time the replicas agree on, Unix seconds: this replica's clock corrected by its
    /// last measured offset from Redis's ([`Cluster::measure_clock`]). The directory's
    /// expiries and the forwarded requests' timestamps are compared between replicas: on
    /// their own clocks, replicas 40 s apart refused each other's requests and one 5 minutes
    /// ahead saw no holder of any agent (E14).
    pub fn now_secs(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        let local = i64::try_from(unix_millis(SystemTime::now())).unwrap_or(i64::MAX);
        u64::try_from(local.saturating_add(offset) / 1000).unwrap_or(0)
    }

    /// Measures this replica's clock against Redis's (`TIME`, read between two readings of
    /// this clock): kept for [`Cluster::now_secs`], exported, and warned of past
    /// [`CLOCK_WARN_SECS`].
    pub async fn measure_clock(&self) -> Result<(), redis::RedisError> {
        use std::sync::atomic::Ordering;
        let before = unix_millis(SystemTime::now());
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.connection())
            .await?;
        let after = unix_millis(SystemTime::now());
        let offset = clock_offset_ms((secs, micros), before, after);
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let seconds = offset as f64 / 1000.0;
        self.metrics.clock_offset.set(seconds);
        let off = offset.unsigned_abs() > CLOCK_WARN_SECS * 1000;
        if self.clock_off.swap(off, Ordering::Relaxed) != off {
            if off {
                tracing::warn!(
                    offset_seconds = seconds,
                    "This replica's clock is off Redis's: replicas route by Redis's time, but tokens, certificates and sync times are judged by this clock; check NTP on this node"
                );
            } else {
                tracing::info!(
                    offset_seconds = seconds,
                    "This replica's clock agrees with Redis's again"
                );
            }
        }
        Ok(())
    }

    /// Registers the revocation channel's series (`redis_channel_subscribed`,
    /// `redis_channel_losses_total`, `redis_publish_failures_total`).
    pub fn register_metrics(&self, reg: &mut prometheus_client::registry::Registry) {
        let m = &self.metrics;
        reg.register(
            "redis_channel_subscribed",
            "1 while this replica follows the Redis channel other replicas publish revocations and configuration changes on",
            m.subscribed.clone(),
        );
        reg.register(
            "redis_channel_losses",
            "Subscriptions to the Redis channel lost, and attempts to subscribe that failed",
            m.losses.clone(),
        );
        reg.register(
            "redis_publish_failures",
            "Messages this replica could not publish on the Redis channel (the other replicas catch up from the store)",
            m.publish_failures.clone(),
        );
        reg.register(
            "redis_clock_offset_seconds",
            "Redis's clock minus this replica's, measured every 3 s with peers: the replicas route by Redis's time; a large offset means this node's clock is wrong",
            m.clock_offset.clone(),
        );
    }

    /// A client and a connection with the credential files as they are now.
    async fn open(
        cfg: &RedisConfig,
    ) -> Result<(redis::Client, redis::aio::ConnectionManager), ClusterError> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())?;
        let mut settings = info.redis_settings().clone();
        if let Some(file) = &cfg.password_file {
            let password = std::fs::read_to_string(file).map_err(|source| ClusterError::File {
                file: file.display().to_string(),
                source,
            })?;
            settings = settings.set_password(password.trim());
        }
        if let Some(user) = &cfg.username {
            settings = settings.set_username(user);
        }
        info = info
            .set_redis_settings(settings)
            .set_tcp_settings(tcp_settings());
        let client = match cfg.tls()? {
            Some(certificates) => redis::Client::build_with_tls(info, certificates)?,
            None => redis::Client::open(info)?,
        };
        let conn = redis::aio::ConnectionManager::new(client.clone()).await?;
        Ok((client, conn))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection for other commands (cheap to clone; reconnects by itself).
    pub fn connection(&self) -> redis::aio::ConnectionManager {
        self.live().conn.clone()
    }

    /// Follows the credential files until `stop`: when one changes (a rotated password or
    /// client certificate), a new connection is made with them and replaces the old one for
    /// every later command. The client reconnects by itself with what it was built with, so
    /// without this a kas would fail at its first reconnect after the old credentials were
    /// withdrawn. New credentials Redis does not take yet (the Secret changed before Redis)
    /// keep the working connection and are tried again at every check.
    pub async fn follow_credentials(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(CREDENTIALS_RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = credential_stamp(&self.cfg);
            if now == self.live().stamp {
                continue;
            }
            let opened = tokio::time::timeout(CREDENTIALS_CONNECT_TIMEOUT, Self::open(&self.cfg));
            match opened.await {
                Ok(Ok((client, conn))) => {
                    *self.live() = Live {
                        client,
                        conn,
                        stamp: now,
                    };
                    warned = None;
                    tracing::info!("Redis credential files changed: connected with them");
                }
                outcome if warned != Some(now) => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no connection within {CREDENTIALS_CONNECT_TIMEOUT:?}"),
                    };
                    warned = Some(now);
                    tracing::warn!(
                        error,
                        "Redis credential files changed but do not connect; still using the previous connection and trying again"
                    );
                }
                _ => {}
            }
        }
    }

    /// This replica's id, for [`ClusterEvent::Pushed`].
    pub fn replica(&self) -> u64 {
        self.replica
    }

    /// Tells every replica (this one too) about `event`.
    pub async fn publish(&self, event: ClusterEvent) -> Result<(), redis::RedisError> {
        let payload = serde_json::to_string(&event).unwrap_or_default();
        let mut conn = self.connection();
        let published = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await;
        if published.is_err() {
            self.metrics.publish_failures.inc();
        }
        published.map(drop)
    }

    /// `PING`: whether Redis answers now (readiness). After
    /// [`SILENT_CHECKS_BEFORE_REPLACING`] unanswered checks in a row, a new connection is
    /// opened in the background and replaces the silent one once it works.
    pub async fn check(&self) -> Result<(), redis::RedisError> {
        use std::sync::atomic::Ordering;
        let mut conn = self.connection();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        let answered = tokio::time::timeout(PING_TIMEOUT, ping)
            .await
            .unwrap_or_else(|_| Err((redis::ErrorKind::Io, "no answer to PING").into()));
        if answered.is_ok() {
            self.silent_checks.store(0, Ordering::Relaxed);
            return Ok(());
        }
        let silent = self.silent_checks.fetch_add(1, Ordering::Relaxed) + 1;
        if silent >= SILENT_CHECKS_BEFORE_REPLACING && !self.replacing.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(self.clone().replace_connection());
        }
        answered.map(drop)
    }

    /// Opens a new connection and makes it the one every later command uses.
    async fn replace_connection(self) {
        // The files as they are now are what the new connection is made with: their stamp,
        // taken first, goes with it (a rotation meanwhile is then still seen as a change).
        let stamp = credential_stamp(&self.cfg);
        let opened = tokio::time::timeout(CREDENTIALS_CONNECT_TIMEOUT, Self::open(&self.cfg));
        match opened.await {
            Ok(Ok((client, conn))) => {
                *self.live() = Live {
                    client,
                    conn,
                    stamp,
                };
                tracing::warn!(
                    "Redis stopped answering on its connection: replaced it with a new one"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis stopped answering and a new connection failed; trying again at the next checks")
            }
            Err(_) => tracing::warn!(
                "Redis stopped answering and a new connection did not open in time; trying again at the next checks"
            ),
        }
        self.replacing
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// The number of the current subscription to [`CHANNEL`], `None` while not subscribed:
    /// what this replica remembers of tokens is used only while it hears of every revocation,
    /// and only under the subscription it was remembered under (a revocation published while
    /// the channel was down never arrives).
    pub fn subscription(&self) -> Option<u64> {
        let n = self.subscription.load(std::sync::atomic::Ordering::Acquire);
        (n > 0).then_some(n)
    }

    /// Applies every revocation published on [`CHANNEL`] until `stop`, resubscribing after a
    /// lost connection (a revocation published meanwhile is caught by the token re-check).
    /// `subscribed` runs after every subscription, the first one too: what was published
    /// while this replica was not subscribed is lost, so the caller reads it again from the
    /// store then.
    pub async fn follow(
        self,
        apply: impl Fn(ClusterEvent) + Send + 'static,
        subscribed: impl Fn() + Send + 'static,
        stop: CancellationToken,
    ) {
        let mut failures = 0u32;
        let handlers = (&apply, &subscribed);
        let mut number = 0u64;
        loop {
            let followed = tokio::select! {
                r = self.follow_once(handlers, (&mut failures, &mut number)) => r,
                () = stop.cancelled() => {
                    self.subscription.store(0, std::sync::atomic::Ordering::Release);
                    return;
                }
            };
            self.subscription
                .store(0, std::sync::atomic::Ordering::Release);
            self.metrics.subscribed.set(0);
            if let Err(e) = followed {
                self.metrics.losses.inc();
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %e, "Lost the Redis revocation channel; resubscribing (other replicas' revocations reach this one at the next token re-check meanwhile)");
                }
            }
            let backoff = Duration::from_millis(250 * u64::from(failures.min(20)));
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn follow_once(
        &self,
        (apply, subscribed): (&(impl Fn(ClusterEvent) + Send), &(impl Fn() + Send)),
        (failures, number): (&mut u32, &mut u64),
    ) -> Result<(), redis::RedisError> {
        let client = self.live().client.clone();
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        *number += 1;
        self.subscription
            .store(*number, std::sync::atomic::Ordering::Release);
        self.metrics.subscribed.set(1);
        if *failures > 0 {
            tracing::info!("Following the Redis revocation channel again");
        }
        *failures = 0;
        subscribed();
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(CHANNEL_PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            let msg = tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                _ = ping.tick() => {
                    let pong = sink.ping::<redis::Value>();
                    if !matches!(tokio::time::timeout(CHANNEL_PING_TIMEOUT, pong).await, Ok(Ok(_))) {
                        return Err((redis::ErrorKind::Io, "no answer to a ping on the revocation channel").into());
                    }
                    continue;
                }
            };
            let payload: String = msg.get_payload()?;
            match serde_json::from_str::<ClusterEvent>(&payload) {
                Ok(r) => apply(r),
                Err(e) => {
                    tracing::warn!(error = %e, "Ignoring an unreadable message on the revocation channel")
                }
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the revocation channel closed",
        )))
    }
}

/// Past this offset from Redis's clock a replica warns that its clock is wrong.
pub const CLOCK_WARN_SECS: u64 = 10;

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Redis's clock minus ours, in ms: Redis's `TIME` (seconds, microseconds) against the middle
/// of our readings before and after it (pure).
fn clock_offset_ms(redis: (u64, u64), before_ms: u64, after_ms: u64) -> i64 {
    let theirs = redis.0.saturating_mul(1000).saturating_add(redis.1 / 1000);
    let ours = before_ms / 2 + after_ms / 2;
    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    signed(theirs).saturating_sub(signed(ours))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Redis's time against the middle of the two readings: ahead, behind, and the same.
    #[test]
    fn the_clock_offset_is_redis_time_minus_the_middle_of_our_readings() {
        let at = 1_800_000_000_u64;
        assert_eq!(clock_offset_ms((at, 0), at * 1000 - 10, at * 1000 + 10), 0);
        assert_eq!(
            clock_offset_ms((at + 40, 500_000), at * 1000, at * 1000 + 2),
            40_499,
            "this replica 40.5 s behind"
        );
        assert_eq!(
            clock_offset_ms((at, 0), (at + 360) * 1000, (at + 360) * 1000),
            -360_000,
            "this replica 6 minutes ahead"
        );
    }

    #[test]
    fn a_change_to_any_credential_file_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, name).unwrap();
            Some(p)
        };
        let cfg = RedisConfig {
            url: "rediss://localhost:6380/0".into(),
            password_file: file("password"),
            username: None,
            ca_file: file("ca.pem"),
            certificate_file: file("client.pem"),
            key_file: file("client-key.pem"),
        };
        let before = credential_stamp(&cfg);
        assert!(before.iter().all(Option::is_some));
        assert_eq!(credential_stamp(&cfg), before);
        for (i, f) in ["password", "ca.pem", "client.pem", "client-key.pem"]
            .iter()
            .enumerate()
        {
            let was = credential_stamp(&cfg);
            std::fs::write(dir.path().join(f), "rotated, longer than before").unwrap();
            let now = credential_stamp(&cfg);
            assert_ne!(now[i], was[i], "{f}");
        }
        std::fs::remove_file(dir.path().join("password")).unwrap();
        assert_eq!(credential_stamp(&cfg)[0], None);
    }

    #[test]
    fn events_travel_as_tagged_json() {
        let r = ClusterEvent::UserToken { id: 7 };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"kind":"user_token","id":7}"#);
        assert_eq!(serde_json::from_str::<ClusterEvent>(&text).unwrap(), r);
        let p = ClusterEvent::Pushed {
            project: 3,
            from: 9,
        };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<ClusterEvent>(&text).unwrap(), p);
        for e in [
            ClusterEvent::Suspensions {
                agent_id: 4,
                from: 9,
            },
            ClusterEvent::Resync {
                agent_id: 4,
                project_id: 5,
                id: 6,
                from: 9,
            },
        ] {
            let text = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<ClusterEvent>(&text).unwrap(), e);
        }
        let projects = ClusterEvent::Projects { from: 9 };
        let text = serde_json::to_string(&projects).unwrap();
        assert_eq!(text, r#"{"kind":"projects","from":9}"#);
        assert_eq!(
            serde_json::from_str::<ClusterEvent>(&text).unwrap(),
            projects
        );
    }

    #[test]
    fn redis_and_rediss_urls_are_taken_with_their_tls_files() {
        let cfg = |url: &str| RedisConfig {
            url: url.into(),
            password_file: None,
            username: None,
            ca_file: None,
            certificate_file: None,
            key_file: None,
        };
        assert!(cfg("redis://127.0.0.1:6379/0").validate().is_ok());
        assert!(cfg("rediss://redis.internal:6380/0").validate().is_ok());
        assert!(
            cfg("http://x")
                .validate()
                .unwrap_err()
                .contains("not a redis://")
        );
        let plain_with_ca = RedisConfig {
            ca_file: Some("/ca.pem".into()),
            ..cfg("redis://x")
        };
        assert!(plain_with_ca.validate().unwrap_err().contains("rediss://"));
        let half_client_cert = RedisConfig {
            certificate_file: Some("/c.pem".into()),
            ..cfg("rediss://x")
        };
        assert!(
            half_client_cert
                .validate()
                .unwrap_err()
                .contains("go together")
        );
    }
}
