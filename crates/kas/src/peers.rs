//! kas-to-kas routing: a request for an agent whose tunnels are on another replica is carried
//! there over a private listener between replicas.
//!
//! - **Directory** (Redis): `tether:agent:<id>` is a hash of the replicas holding the agent's
//!   tunnels (field: replica id, value: until when, Unix seconds), written when the agent's
//!   first tunnel arrives, removed when its last one leaves (a failed removal is made again at
//!   each liveness tick until Redis answers), refreshed every 4 minutes with a
//!   5-minute expiry (GitLab's figures: idle agents cost few Redis operations). Whether a replica
//!   is alive is a separate key, `tether:replica:<id>` → its private address, refreshed every
//!   3 s with a 10 s expiry: a dead replica's entries stop being used within 10 s, and at once
//!   when connecting to it fails (the next holder is tried). A holder that answers `ERR` (it lost
//!   the agent; its entry not removed yet) took nothing of the request: it is sent again to the
//!   next holder, and that holder is tried last for [`REFUSED_MEMORY`].
//! - **Private listener** (`peers.listen`): a forwarded request is one TCP connection: a line
//!   with the hex HMAC-SHA256 of the next line under the shared secret, a JSON line naming the
//!   agent, the service and the routing metadata kas decided (with a timestamp, refused when
//!   more than 30 s off), then `OK\n` or `ERR …\n` from the holder, then raw bytes both ways
//!   into one of the agent's tunnel streams there. Streaming, watches and upgrades (exec,
//!   port-forward) pass as bytes. The forwarder sends the request right after the preamble and
//!   checks the holder's answer on its first read ([`OkFirst`]), and keeps two spare
//!   connections open to each holder it used, so a routed request costs neither a handshake
//!   nor a round trip before its bytes flow.
//! - **Admin requests** travel the same way with the service [`ADMIN_SERVICE`]: after `OK` the
//!   connection carries one HTTP/1.1 exchange with the holder's admin API (see
//!   [`crate::api_routing`]), which trusts the signed preamble instead of an admin token (the
//!   replica that forwarded it checked the caller's).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use tether_transport::{Gate, LogThrottle};
use tether_tunnel_server::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::peer_stream::{OkFirst, PeerStream};

/// How long an agent's directory entry lives without a refresh, and the refresh period.
const AGENT_TTL: u64 = 300;
const AGENT_REFRESH: Duration = Duration::from_secs(240);
/// How long a replica counts as alive without a refresh, and the refresh period.
const REPLICA_TTL: u64 = 10;
const REPLICA_REFRESH: Duration = Duration::from_secs(3);
/// A forwarded request's preamble: size and time limits, clock skew allowed.
const MAX_PREAMBLE: usize = 64 * 1024;
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_SKEW: u64 = 30;
/// The service name of a forwarded admin API request.
pub const ADMIN_SERVICE: &str = "tether.admin";

/// How long a replica reuses what the directory said about an agent's holders: every routed
/// request would otherwise cost two Redis round trips. Short, because a holder that left is
/// noticed when connecting to it fails (the cache is dropped and the directory read again).
const HOLDERS_CACHE: Duration = Duration::from_secs(1);

/// Spare connections kept open to each holder a request was routed to, so the next request
/// does not wait for a TCP handshake; used while younger than [`SPARE_MAX_AGE`], well within
/// the holder's [`PREAMBLE_TIMEOUT`] (after which it closes a connection that sent nothing).
const SPARES_PER_PEER: usize = 2;
const SPARE_MAX_AGE: Duration = Duration::from_secs(3);

/// How long a holder waits for one of the agent's tunnel streams.
const HOLDER_TUNNEL_WAIT: Duration = Duration::from_secs(2);

/// How long a holder that refused a request for an agent (it lost the agent, its directory
/// entry not removed yet) is tried after the agent's other holders: each request sent to it
/// first would wait [`HOLDER_TUNNEL_WAIT`] before going to the next.
const REFUSED_MEMORY: Duration = Duration::from_secs(10);

/// `peers:` in kas's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// The private listener other replicas forward requests to (never exposed to agents or
    /// clients: put it on the replicas' private network).
    pub listen: std::net::SocketAddr,
    /// How the other replicas reach it (default: `listen`; when that is `0.0.0.0`, the
    /// environment's `POD_IP` with its port, as a Pod gets it from the downward API).
    pub advertise_address: Option<String>,
    /// The secret every replica shares (HMAC key of forwarded requests).
    pub secret_file: std::path::PathBuf,
    /// Connections the listener holds at once (default [`crate::config::PEERS_LIMITS`]); more
    /// are closed on arrival and counted.
    pub max_connections: Option<std::num::NonZeroUsize>,
    /// Mutual TLS on the hop. Without it the hop is plain TCP: authenticated (HMAC) but not
    /// encrypted, so what crosses it (Kubernetes API requests and answers, Secrets included)
    /// can be read by whoever can see the replicas' network.
    pub tls: Option<PeersTls>,
}

/// `peers.tls`: every replica presents its certificate (as server and as client) and accepts
/// only the others' signed by `ca_file`. The files are read again when they change.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeersTls {
    pub certificate_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    pub ca_file: std::path::PathBuf,
    /// The name checked in the other replicas' certificates (default: the host of their
    /// advertised address). One name all of them carry is simplest, as Pod addresses change.
    pub server_name: Option<String>,
}

/// The TLS of the hop, loaded from [`PeersTls`].
#[derive(Debug)]
struct HopTls {
    tls: tether_transport::MutualTls,
    server_name: Option<String>,
}

impl HopTls {
    fn load(cfg: &PeersTls) -> Result<HopTls, tether_transport::Error> {
        let files = tether_transport::MutualTlsFiles {
            cert_file: cfg.certificate_file.clone(),
            key_file: cfg.key_file.clone(),
            ca_file: cfg.ca_file.clone(),
        };
        if let Some(name) = &cfg.server_name {
            tether_transport::peer_server_name(Some(name), "")?;
        }
        Ok(HopTls {
            tls: tether_transport::MutualTls::load(files)?,
            server_name: cfg.server_name.clone(),
        })
    }
}

/// What a forwarded request asks of the holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Forwarded {
    agent_id: i64,
    service: String,
    metadata: BTreeMap<String, String>,
    /// Unix seconds when it was sent.
    at: u64,
    /// Random per preamble: a holder accepts each once (a preamble captured on the private
    /// network cannot be replayed). Absent from older replicas' preambles, which are still
    /// accepted during a rolling upgrade: none is made after it, and each expires in
    /// [`MAX_SKEW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<u64>,
    /// The holder's advertised address it is signed for: another replica refuses it, so a
    /// preamble captured on its way to one replica cannot be replayed to another (each
    /// remembers only the nonces it accepted). Absent from older replicas' preambles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
}

impl Forwarded {
    /// The same request, signed for the holder at `address`.
    fn to(&self, address: &str) -> Forwarded {
        Forwarded {
            to: Some(address.to_owned()),
            ..self.clone()
        }
    }
}

/// The nonces of preambles accepted lately (pure but for the map).
#[derive(Debug, Default)]
struct Replays {
    seen: HashMap<u64, u64>,
}

/// Past this many remembered nonces, those too old to be accepted again are dropped.
const REPLAYS_PRUNE_AT: usize = 4096;

impl Replays {
    /// Accepts `f` once (its `at` already checked against [`MAX_SKEW`]).
    fn admit(&mut self, f: &Forwarded, now: u64) -> Result<(), &'static str> {
        let Some(nonce) = f.nonce else {
            return Ok(());
        };
        if self.seen.len() >= REPLAYS_PRUNE_AT {
            // A preamble older than MAX_SKEW is refused as stale anyway.
            self.seen.retain(|_, at| at.abs_diff(now) <= MAX_SKEW);
        }
        if self.seen.insert(nonce, f.at).is_some() {
            return Err("replayed request");
        }
        Ok(())
    }
}

/// Why a preamble too far from this replica's time is refused (see [`MAX_SKEW`]).
const STALE: &str = "stale request: more than 30 s from this replica's time (the replicas' clocks, corrected by Redis's, disagree)";

fn mac(secret: &[u8], line: &[u8]) -> Option<hmac::Hmac<sha2::Sha256>> {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).ok()?;
    m.update(line);
    Some(m)
}

/// The two preamble lines for `f` (pure).
fn preamble(secret: &[u8], f: &Forwarded) -> Vec<u8> {
    let body = serde_json::to_string(f).unwrap_or_default();
    let tag = mac(secret, body.as_bytes())
        .map(|m| hex::encode(m.finalize().into_bytes()))
        .unwrap_or_default();
    format!("{tag}\n{body}\n").into_bytes()
}

/// Checks a received preamble (pure): the MAC in constant time, then the age and that it was
/// signed for this replica (`me`, its advertised address).
fn verify(
    secret: &[u8],
    me: &str,
    tag: &str,
    body: &str,
    now: u64,
) -> Result<Forwarded, &'static str> {
    let tag = hex::decode(tag.trim()).map_err(|_| "malformed signature")?;
    let m = mac(secret, body.trim_end().as_bytes()).ok_or("no key")?;
    m.verify_slice(&tag).map_err(|_| "bad signature")?;
    let f: Forwarded = serde_json::from_str(body.trim_end()).map_err(|_| "malformed request")?;
    if f.at.abs_diff(now) > MAX_SKEW {
        return Err(STALE);
    }
    if f.to.as_deref().is_some_and(|to| to != me) {
        return Err("request signed for another replica");
    }
    Ok(f)
}

/// Spare connections by holder address, with when each was opened.
type Spares = HashMap<String, Vec<(std::time::Instant, PeerStream)>>;

/// Holders read from the directory, by agent, with when they were read.
type HoldersCache = HashMap<i64, (std::time::Instant, Vec<String>)>;

/// Holders that refused a request for an agent lately, by agent and address, with when.
type Refused = HashMap<(i64, String), std::time::Instant>;

/// `holders` with those that refused lately last, in their order otherwise (pure).
fn refused_last(
    agent_id: i64,
    mut holders: Vec<String>,
    refused: &Refused,
    now: std::time::Instant,
) -> Vec<String> {
    let lately = |address: &String| {
        refused
            .get(&(agent_id, address.clone()))
            .is_some_and(|at| now.saturating_duration_since(*at) < REFUSED_MEMORY)
    };
    holders.sort_by_key(lately);
    holders
}

/// Agents whose directory entry this replica failed to remove (Redis unreachable as their
/// last tunnel left): removed again at each liveness tick until it works, since another
/// replica would otherwise route to this one for the entry's remaining life (pure).
#[derive(Debug, Default)]
struct Unreleased(std::collections::BTreeSet<i64>);

impl Unreleased {
    fn failed(&mut self, agent_id: i64) {
        self.0.insert(agent_id);
    }

    /// The agent's tunnels are here again: its entry is written, not removed.
    fn held(&mut self, agent_id: i64) {
        self.0.remove(&agent_id);
    }

    /// The entries to remove now: those of agents without tunnels here (`held`).
    fn due(&self, held: &[i64]) -> Vec<i64> {
        self.0
            .iter()
            .filter(|id| !held.contains(id))
            .copied()
            .collect()
    }

    fn done(&mut self, agent_id: i64) {
        self.0.remove(&agent_id);
    }
}

/// This replica's part in routing between replicas; cheap to clone.
#[derive(Clone)]
pub struct Peers {
    cluster: Cluster,
    secret: Arc<Vec<u8>>,
    /// Mutual TLS on the hop, when configured.
    tls: Option<Arc<HopTls>>,
    address: String,
    registry: Arc<Registry>,
    /// The admin API served to other replicas, once the API module built it.
    admin: Arc<OnceLock<axum::Router>>,
    /// Holders recently read from the directory, by agent (see [`HOLDERS_CACHE`]).
    holders_cache: Arc<std::sync::Mutex<HoldersCache>>,
    /// Connections opened ahead of need, by holder address (see [`SPARES_PER_PEER`]).
    spares: Arc<std::sync::Mutex<Spares>>,
    /// Nonces of the preambles this holder accepted lately.
    replays: Arc<std::sync::Mutex<Replays>>,
    /// Holders that refused requests lately (see [`REFUSED_MEMORY`]).
    refused: Arc<std::sync::Mutex<Refused>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The address other replicas use (pure): the configured one, else the listener's, else —
/// for an unspecified listen address — `POD_IP` with the listener's port.
fn advertised(cfg: &PeersConfig, pod_ip: Option<&str>) -> Option<String> {
    if let Some(a) = &cfg.advertise_address {
        return Some(a.clone());
    }
    if !cfg.listen.ip().is_unspecified() {
        return Some(cfg.listen.to_string());
    }
    let ip: std::net::IpAddr = pod_ip?.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, cfg.listen.port()).to_string())
}

fn agent_key(agent_id: i64) -> String {
    format!("tether:agent:{agent_id}")
}

pub(crate) fn replica_key(replica: u64) -> String {
    format!("tether:replica:{replica}")
}

impl Peers {
    pub fn new(
        cfg: &PeersConfig,
        cluster: Cluster,
        registry: Arc<Registry>,
    ) -> std::io::Result<Peers> {
        let secret = std::fs::read_to_string(&cfg.secret_file)?
            .trim()
            .as_bytes()
            .to_vec();
        let tls = match &cfg.tls {
            Some(t) => {
                Some(Arc::new(HopTls::load(t).map_err(|e| {
                    std::io::Error::other(format!("peers.tls: {e}"))
                })?))
            }
            None => None,
        };
        let pod_ip = std::env::var("POD_IP").ok();
        let address = advertised(cfg, pod_ip.as_deref()).ok_or_else(|| {
            std::io::Error::other(
                "peers.listen is 0.0.0.0: set peers.advertise_address (or POD_IP) so the other replicas can reach this one",
            )
        })?;
        Ok(Peers {
            cluster,
            secret: Arc::new(secret),
            tls,
            address,
            registry,
            admin: Arc::new(OnceLock::new()),
            holders_cache: Arc::default(),
            spares: Arc::default(),
            replays: Arc::default(),
            refused: Arc::default(),
        })
    }

    /// The admin API other replicas' requests are served by (set once, by the API module).
    pub fn serve_admin(&self, router: axum::Router) {
        let _ = self.admin.set(router);
    }

    /// This replica's advertised address: how the others reach it, and how it is named to
    /// operators (which replica holds an agent's connection).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether this replica holds tunnels of `agent_id`.
    pub fn holds(&self, agent_id: i64) -> bool {
        self.registry.connected_agents().contains(&agent_id)
    }

    fn me(&self) -> u64 {
        self.cluster.replica()
    }

    /// Keeps this replica's directory entries true until `stop`: its liveness key, and an
    /// entry per agent whose tunnels are here. A failed write is logged and retried at the next
    /// tick (routing to this replica then waits for Redis; local requests never do).
    pub async fn run_directory(self, stop: CancellationToken) {
        let mut presence = self.registry.subscribe_presence();
        let mut alive = tokio::time::interval(REPLICA_REFRESH);
        let mut refresh = tokio::time::interval(AGENT_REFRESH);
        // Whether the entries may be missing from Redis: a write failed, or Redis lost its data
        // (flushed, restarted without persistence, failed over to a replica that had not
        // caught up), which this replica's own liveness key being gone tells. They are all
        // written again at the next liveness tick rather than at the next full refresh,
        // minutes later, while requests through other replicas found no holder.
        let mut stale = false;
        let mut unreleased = Unreleased::default();
        loop {
            let written = tokio::select! {
                () = stop.cancelled() => break,
                _ = alive.tick() => match self.announce_and_repair(&mut stale).await {
                    Ok(()) => self.release_again(&mut unreleased).await,
                    Err(e) => Err(e),
                },
                _ = refresh.tick() => self.refresh_all().await,
                p = presence.recv() => match p {
                    Ok(p) => self.presence_changed(p, &mut unreleased).await,
                    // Missed some: write every agent here again.
                    Err(_) => self.refresh_all().await,
                },
            };
            if let Err(e) = written {
                stale = true;
                tracing::warn!(error = %e, "Cannot update the replicas' agent directory in Redis");
            }
        }
        // Leaving: the others stop routing here at once rather than after the expiry.
        let mut conn = self.cluster.connection();
        let _ = redis::cmd("DEL")
            .arg(replica_key(self.me()))
            .query_async::<i64>(&mut conn)
            .await;
    }

    /// Refreshes this replica's liveness key; writes every agent entry again when they may
    /// be missing (`stale`, or the key was gone: Redis lost its data).
    async fn announce_and_repair(&self, stale: &mut bool) -> redis::RedisResult<()> {
        let key = replica_key(self.me());
        let mut pipe = redis::pipe();
        pipe.exists(&key)
            .cmd("SET")
            .arg(&key)
            .arg(&self.address)
            .arg("EX")
            .arg(REPLICA_TTL)
            .ignore();
        let (was_there,): (bool,) = pipe.query_async(&mut self.cluster.connection()).await?;
        // Every liveness tick: the shared time follows this node's clock being corrected.
        self.cluster.measure_clock().await?;
        if *stale || !was_there {
            self.refresh_all().await?;
            *stale = false;
        }
        Ok(())
    }

    async fn refresh_all(&self) -> redis::RedisResult<()> {
        self.hold(&self.registry.connected_agents()).await
    }

    async fn hold(&self, agents: &[i64]) -> redis::RedisResult<()> {
        if agents.is_empty() {
            return Ok(());
        }
        // In the replicas' shared time: a reader whose clock is minutes off still sees it.
        let until = self.cluster.now_secs() + AGENT_TTL;
        let mut pipe = redis::pipe();
        for id in agents {
            pipe.hset(agent_key(*id), self.me(), until).ignore();
            pipe.expire(agent_key(*id), AGENT_TTL as i64).ignore();
        }
        pipe.query_async::<()>(&mut self.cluster.connection()).await
    }

    /// Writes the entry of an agent whose first tunnel arrived here, removes that of one
    /// whose last tunnel left (a failed removal is made again at the next liveness tick).
    async fn presence_changed(
        &self,
        p: tether_tunnel_server::Presence,
        unreleased: &mut Unreleased,
    ) -> redis::RedisResult<()> {
        if p.connected {
            unreleased.held(p.agent_id);
            return self.hold(&[p.agent_id]).await;
        }
        if let Err(e) = self.release(p.agent_id).await {
            unreleased.failed(p.agent_id);
            tracing::warn!(agent_id = p.agent_id, error = %e, "Cannot remove an agent whose tunnels left from the replicas' directory in Redis; trying again every 3 s");
        }
        Ok(())
    }

    /// Removes the entries whose removal failed, of agents still without tunnels here.
    async fn release_again(&self, unreleased: &mut Unreleased) -> redis::RedisResult<()> {
        for agent_id in unreleased.due(&self.registry.connected_agents()) {
            self.release(agent_id).await?;
            unreleased.done(agent_id);
        }
        Ok(())
    }

    async fn release(&self, agent_id: i64) -> redis::RedisResult<()> {
        let mut conn = self.cluster.connection();
        redis::cmd("HDEL")
            .arg(agent_key(agent_id))
            .arg(self.me())
            .query_async::<i64>(&mut conn)
            .await
            .map(drop)
    }

    /// The private addresses of the live replicas (not this one) holding the agent's tunnels,
    /// from the cache when it is fresh; an empty answer is not cached (the agent may connect any
    /// moment).
    pub async fn holders(&self, agent_id: i64) -> redis::RedisResult<Vec<String>> {
        if let Some(cached) = self.cached_holders(agent_id) {
            return Ok(cached);
        }
        let read = self.read_holders(agent_id).await?;
        if !read.is_empty() {
            let mut cache = self
                .holders_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Bounded by the agents routed to within HOLDERS_CACHE, pruned as it grows.
            if cache.len() > 10_000 {
                cache.retain(|_, (at, _)| at.elapsed() < HOLDERS_CACHE);
            }
            cache.insert(agent_id, (std::time::Instant::now(), read.clone()));
        }
        Ok(read)
    }

    fn cached_holders(&self, agent_id: i64) -> Option<Vec<String>> {
        let cache = self
            .holders_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (at, holders) = cache.get(&agent_id)?;
        (at.elapsed() < HOLDERS_CACHE).then(|| holders.clone())
    }

    fn forget_holders(&self, agent_id: i64) {
        self.holders_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&agent_id);
    }

    async fn read_holders(&self, agent_id: i64) -> redis::RedisResult<Vec<String>> {
        let mut conn = self.cluster.connection();
        let entries: HashMap<u64, u64> = redis::cmd("HGETALL")
            .arg(agent_key(agent_id))
            .query_async(&mut conn)
            .await?;
        let now = self.cluster.now_secs();
        let replicas: Vec<u64> = entries
            .into_iter()
            .filter(|(replica, until)| *replica != self.me() && *until > now)
            .map(|(replica, _)| replica)
            .collect();
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = replicas.iter().map(|r| replica_key(*r)).collect();
        let addresses: Vec<Option<String>> =
            redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        Ok(addresses.into_iter().flatten().collect())
    }
}

/// Why a request could not be carried to another replica.
impl Peers {
    /// The other live replicas' private addresses (a few keys: `SCAN` is cheap enough for the
    /// listing it serves).
    pub async fn other_replicas(&self) -> redis::RedisResult<Vec<String>> {
        let mut conn = self.cluster.connection();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("tether:replica:*")
                .arg("COUNT")
                .arg(100)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch.into_iter().filter(|k| *k != replica_key(self.me())));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let addresses: Vec<Option<String>> =
            redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        Ok(addresses.into_iter().flatten().collect())
    }

    /// A connection to `address`'s admin API (after the signed preamble), ready for one
    /// HTTP/1.1 exchange.
    pub async fn open_admin(&self, address: &str) -> std::io::Result<PeerStream> {
        let request = Forwarded {
            agent_id: 0,
            service: ADMIN_SERVICE.to_owned(),
            metadata: BTreeMap::new(),
            at: self.cluster.now_secs(),
            nonce: Some(rand::random()),
            to: Some(address.to_owned()),
        };
        let preamble = preamble(&self.secret, &request);
        let tls = self.tls.as_deref();
        tokio::time::timeout(PREAMBLE_TIMEOUT, forward_to(tls, address, &preamble))
            .await
            .map_err(|_| std::io::Error::other("no answer"))?
    }

    /// Serves one forwarded admin request on `stream`.
    async fn carry_admin(&self, mut stream: BufReader<PeerStream>) {
        let Some(router) = self.admin.get().cloned() else {
            let _ = stream
                .get_mut()
                .write_all(b"ERR the admin API is not up yet\n")
                .await;
            return;
        };
        if stream.get_mut().write_all(b"OK\n").await.is_err() {
            return;
        }
        let service = hyper_util::service::TowerToHyperService::new(router);
        let served = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let served = tokio::select! {
            r = served => r,
            () = self.registry.ended() => return,
        };
        if let Err(e) = served {
            tracing::debug!(error = %e, "A forwarded admin request ended early");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("the replicas' agent directory in Redis cannot be read: {0}")]
    Directory(#[from] redis::RedisError),
    #[error("no replica holding agent {agent_id} answered: {errors}")]
    Holders { agent_id: i64, errors: String },
}

impl Peers {
    /// A byte stream to the agent's `service` through a replica that holds its tunnels, or
    /// `None` when no other replica does. Holders are tried in turn; one that does not accept
    /// the connection (dead, its entries not expired yet) is skipped. The request may be
    /// written at once: the holder's answer is checked on the first read ([`OkFirst`]).
    pub async fn open(
        &self,
        agent_id: i64,
        service: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<Option<OkFirst<PeerStream>>, RouteError> {
        self.open_with(agent_id, service, metadata, false).await
    }

    /// `confirm`: wait for the holder's `OK` before returning (a holder that lost the agent is
    /// then skipped too).
    async fn open_with(
        &self,
        agent_id: i64,
        service: &str,
        metadata: &HashMap<String, String>,
        confirm: bool,
    ) -> Result<Option<OkFirst<PeerStream>>, RouteError> {
        let holders = self.refused_last(agent_id, self.holders(agent_id).await?);
        if holders.is_empty() {
            return Ok(None);
        }
        let request = Forwarded {
            agent_id,
            service: service.to_owned(),
            metadata: metadata.clone().into_iter().collect(),
            at: self.cluster.now_secs(),
            nonce: Some(rand::random()),
            to: None,
        };
        let mut errors = Vec::new();
        if let Some(stream) = try_holders(self, &holders, &request, confirm, &mut errors).await {
            return Ok(Some(stream));
        }
        // What was cached may be out of date: read the directory again, once.
        self.forget_holders(agent_id);
        let fresh = self.refused_last(agent_id, self.read_holders(agent_id).await?);
        // A new nonce: a holder that took the first preamble would refuse it again.
        let request = Forwarded {
            nonce: Some(rand::random()),
            at: self.cluster.now_secs(),
            ..request
        };
        if !fresh.is_empty()
            && fresh != holders
            && let Some(stream) = try_holders(self, &fresh, &request, confirm, &mut errors).await
        {
            return Ok(Some(stream));
        }
        Err(RouteError::Holders {
            agent_id,
            errors: errors.join("; "),
        })
    }

    /// A stream to the agent through whichever other replica gets its tunnels first, checking
    /// the directory twice a second; pending until one does (callers race it with a local
    /// wait and its deadline).
    pub async fn wait_holder(
        &self,
        agent_id: i64,
        service: &str,
        metadata: &HashMap<String, String>,
    ) -> OkFirst<PeerStream> {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(Some(stream)) = self.open_with(agent_id, service, metadata, true).await {
                return stream;
            }
        }
    }

    /// Serves forwarded requests on the private listener until `stop`, admitting connections
    /// through `gate` (its caps, counted in the listener metrics as `peers`): any pod that can
    /// reach the port could otherwise take all of kas's file descriptors.
    pub async fn serve(self, listener: TcpListener, gate: Gate, stop: CancellationToken) {
        let refusals = Arc::new(LogThrottle::new(crate::listener::LOG_INTERVAL));
        loop {
            let (stream, from, admission) = tokio::select! {
                () = stop.cancelled() => return,
                a = gate.accept(&listener) => a,
            };
            if let Err(e) = probe_dead_peer(&stream) {
                tracing::warn!(error = %e, "Cannot set keepalive on a peers connection");
            }
            let this = self.clone();
            let refusals = Arc::clone(&refusals);
            tokio::spawn(async move {
                let _admission = admission;
                let accepted = tokio::select! {
                    s = this.accept(stream, from, &refusals) => s,
                    () = this.registry.ended() => None,
                };
                if let Some(stream) = accepted {
                    this.carry(stream, from, &refusals).await;
                }
            });
        }
    }

    /// The connection after its TLS handshake, when the hop has TLS (within
    /// [`PREAMBLE_TIMEOUT`]); `None`, logged (throttled), when the other end is not a replica
    /// with a certificate of the hop's CA.
    async fn accept(
        &self,
        stream: TcpStream,
        from: std::net::SocketAddr,
        refusals: &LogThrottle,
    ) -> Option<PeerStream> {
        let Some(tls) = &self.tls else {
            return Some(Box::new(stream));
        };
        let why = match tokio::time::timeout(PREAMBLE_TIMEOUT, accept_tls(tls, stream)).await {
            Ok(Ok(s)) => return Some(s),
            Ok(Err(e)) => e,
            Err(_) => "no TLS handshake in time".to_owned(),
        };
        if let Some(suppressed) = refusals.admit("handshake", std::time::Instant::now()) {
            tracing::warn!(peer = %from, why, suppressed, "Refused a connection on the peers listener: its TLS handshake failed");
        }
        None
    }

    /// One forwarded request: check it, take one of the agent's tunnel streams here, pipe.
    ///
    /// Every connection that may carry a request is answered before it is closed: one dropped
    /// unanswered reads as "maybe taken" to the other replica, which cannot send the request
    /// elsewhere and fails it with a 502. So a connection still waiting for its request when
    /// this replica starts stopping (a spare) is answered `ERR` at once (the other replica
    /// then sees it closed, or sends its request elsewhere), and only a request answered `OK`
    /// ends with the tunnels, once drained ([`Registry::ended`]).
    async fn carry(&self, stream: PeerStream, from: std::net::SocketAddr, refusals: &LogThrottle) {
        let Some(mut stream) = request_arrived(BufReader::new(stream), &self.registry).await else {
            return;
        };
        let read = tokio::time::timeout(PREAMBLE_TIMEOUT, read_preamble(&mut stream)).await;
        let checked = match read {
            Ok(Ok((tag, _))) if tag.is_empty() => return,
            Ok(Ok((tag, body))) => {
                let now = self.cluster.now_secs();
                verify(&self.secret, &self.address, &tag, &body, now).and_then(|f| {
                    let mut replays = self.replays.lock().unwrap_or_else(PoisonError::into_inner);
                    replays.admit(&f, now)?;
                    Ok(f)
                })
            }
            _ => Err("incomplete request"),
        };
        let request = match checked {
            Ok(r) => r,
            Err(why) => {
                // Throttled: a flood of bad preambles must not fill the disk with lines.
                if let Some(suppressed) = refusals.admit("refused", std::time::Instant::now()) {
                    tracing::warn!(peer = %from, why, suppressed, "Refused a request on the peers listener");
                }
                // The reason goes back: a forwarder told only "refused" cannot tell a clock
                // off by a minute from a wrong secret.
                let answer = format!("ERR refused: {why}\n");
                let _ = stream.get_mut().write_all(answer.as_bytes()).await;
                return;
            }
        };
        if request.service == ADMIN_SERVICE {
            return self.carry_admin(stream).await;
        }
        // Draining: the agent's tunnels here take no new request; the other replica waits
        // for the agent to reconnect elsewhere rather than for this one's tunnel wait.
        if self.registry.is_shutting_down() {
            return refuse_stopping(stream).await;
        }
        // A stream the agent closes without taking the request is replaced by another here:
        // nothing of the request was read from the other replica yet.
        let opened = self.registry.open_confirmed(
            request.agent_id,
            &request.service,
            request.metadata.into_iter().collect(),
            HOLDER_TUNNEL_WAIT,
        );
        let conn = tokio::select! {
            c = opened => c.map_err(|e| e.to_string()),
            // Stopping while it waits for a stream here: none will come, and the connection
            // dropped at the end of the drain, unanswered, read as "maybe taken" to the other
            // replica, which could not send the request elsewhere (a 502 in a rollout).
            () = self.registry.stopping() => Err("kas is shutting down".to_owned()),
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                let _ = stream
                    .get_mut()
                    .write_all(format!("ERR {e}\n").as_bytes())
                    .await;
                return;
            }
        };
        if stream.get_mut().write_all(b"OK\n").await.is_err() {
            return;
        }
        // A request carried when kas starts stopping is served to its end, as one from this
        // replica's own proxy: it ends with the tunnels, once drained.
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut stream, &mut conn) => {}
            () = self.registry.ended() => {}
        }
    }
}

/// The connection once its first bytes arrived. `None` when it ended or timed out before any
/// (a spare connection another replica did not need, closed or aged out: nothing to report;
/// over TLS it ends without close_notify, an error), or when this replica started stopping
/// first: then it was answered `ERR`, so the other replica sees it closed or sends its request
/// elsewhere.
async fn request_arrived(
    mut stream: BufReader<PeerStream>,
    registry: &Registry,
) -> Option<BufReader<PeerStream>> {
    let first = tokio::select! {
        r = tokio::time::timeout(PREAMBLE_TIMEOUT, stream.fill_buf()) => {
            r.map(|read| read.map(<[u8]>::is_empty))
        }
        () = registry.stopping() => {
            refuse_stopping(stream).await;
            return None;
        }
    };
    matches!(first, Ok(Ok(false))).then_some(stream)
}

/// Tells the other replica this one is stopping: its request was not taken.
async fn refuse_stopping(mut stream: BufReader<PeerStream>) {
    let _ = stream
        .get_mut()
        .write_all(b"ERR kas is shutting down\n")
        .await;
}

impl Peers {
    fn refused_last(&self, agent_id: i64, holders: Vec<String>) -> Vec<String> {
        let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        refused_last(agent_id, holders, &refused, std::time::Instant::now())
    }

    /// Remembers that `address` refused a request for the agent (see [`REFUSED_MEMORY`]), and
    /// drops the cached holders: the directory may have changed since.
    fn refused_by(&self, agent_id: i64, address: String) {
        self.forget_holders(agent_id);
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if refused.len() > 10_000 {
            refused.retain(|_, at| now.saturating_duration_since(*at) < REFUSED_MEMORY);
        }
        refused.insert((agent_id, address), now);
    }
}

/// The first of `holders` that takes the request; what the others answered goes to `errors`.
/// With `confirm`, each is waited for until it answers `OK`; else the first that accepts the
/// connection is returned, and its refusal, read later, is remembered (the request is then
/// sent again, to the next holder first).
async fn try_holders(
    peers: &Peers,
    holders: &[String],
    request: &Forwarded,
    confirm: bool,
    errors: &mut Vec<String>,
) -> Option<OkFirst<PeerStream>> {
    let tls = peers.tls.as_deref();
    for address in holders {
        let preamble = &preamble(&peers.secret, &request.to(address));
        let attempt = async {
            if confirm {
                forward_to(tls, address, preamble)
                    .await
                    .map(OkFirst::answered)
            } else {
                let mut stream = match peers.take_spare(address) {
                    Some(s) => s,
                    None => connect(tls, address).await?,
                };
                peers.replenish(address);
                stream.write_all(preamble).await?;
                let (peers, agent_id, address) = (peers.clone(), request.agent_id, address.clone());
                Ok(OkFirst::new(stream).on_refusal(move || peers.refused_by(agent_id, address)))
            }
        };
        match tokio::time::timeout(PREAMBLE_TIMEOUT, attempt).await {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(e)) => errors.push(format!("{address}: {e}")),
            Err(_) => errors.push(format!("{address}: no answer")),
        }
    }
    None
}

/// The hop's TLS handshake on an accepted connection, and with `peers.tls.server_name` the
/// check that the other replica's certificate was made for it (the CA may sign others).
async fn accept_tls(tls: &HopTls, stream: TcpStream) -> Result<PeerStream, String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.tls.current().server);
    let stream = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
    if let Some(name) = &tls.server_name {
        let name = tether_transport::peer_server_name(Some(name), "").map_err(|e| e.to_string())?;
        let presented = stream.get_ref().1.peer_certificates();
        tether_transport::check_client_name(presented, &name).map_err(|e| e.to_string())?;
    }
    Ok(Box::new(stream))
}

/// A connection to the replica at `address`, with the hop's TLS handshake done when it has
/// TLS (so spare connections carry a request without waiting for one).
async fn connect(tls: Option<&HopTls>, address: &str) -> std::io::Result<PeerStream> {
    let stream = connect_tcp(address).await?;
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let name = tether_transport::peer_server_name(tls.server_name.as_deref(), address)
        .map_err(std::io::Error::other)?;
    let connector = tokio_rustls::TlsConnector::from(tls.tls.current().client);
    Ok(Box::new(connector.connect(name, stream).await?))
}

async fn connect_tcp(address: &str) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    probe_dead_peer(&stream)?;
    Ok(stream)
}

/// Keepalive probes and a bound on unacknowledged data, on both ends of the hop between
/// replicas. It carries raw bytes (no HTTP/2 pings as on agent connections), and a quiet
/// watch, exec or port-forward may cross it: when the other replica's node dies without
/// closing its sockets, the kernel now ends the connection within about half a minute, so
/// kubectl's request ends and the holder frees the agent's tunnel stream, instead of both
/// waiting for the system's two-hour keepalive.
fn probe_dead_peer(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(&dead_peer_keepalive())?;
    socket.set_tcp_user_timeout(Some(DEAD_PEER_TIMEOUT))
}

/// Keepalive probes that find a vanished peer within about half a minute (15 s of silence,
/// then 3 probes 5 s apart), for kas's raw TCP connections: the hop between replicas, Redis.
pub(crate) fn dead_peer_keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3)
}

/// Longest data may stay unacknowledged on those connections (`TCP_USER_TIMEOUT`).
pub(crate) const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

impl Peers {
    /// A spare connection to `address` that is young and still open (the holder may have
    /// restarted: a closed one reads EOF at once and is dropped).
    fn take_spare(&self, address: &str) -> Option<PeerStream> {
        let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        let list = spares.get_mut(address)?;
        while let Some((at, stream)) = list.pop() {
            if at.elapsed() < SPARE_MAX_AGE && still_open(stream.tcp()) {
                return Some(stream);
            }
        }
        None
    }

    /// Opens spare connections to `address` in the background, up to [`SPARES_PER_PEER`].
    fn replenish(&self, address: &str) {
        let spares = Arc::clone(&self.spares);
        let tls = self.tls.clone();
        let address = address.to_owned();
        tokio::spawn(async move {
            let missing = {
                let mut map = spares.lock().unwrap_or_else(PoisonError::into_inner);
                let list = map.entry(address.clone()).or_default();
                list.retain(|(at, _)| at.elapsed() < SPARE_MAX_AGE);
                SPARES_PER_PEER.saturating_sub(list.len())
            };
            for _ in 0..missing {
                let Ok(stream) = connect(tls.as_deref(), &address).await else {
                    return;
                };
                let mut map = spares.lock().unwrap_or_else(PoisonError::into_inner);
                let list = map.entry(address.clone()).or_default();
                if list.len() < SPARES_PER_PEER {
                    list.push((std::time::Instant::now(), stream));
                }
            }
        });
    }
}

/// Whether a spare connection is still open: the holder sends nothing on it before a request
/// (the hop's TLS sends no session tickets), so end of stream or an error means it closed.
/// Peeked, not read: bytes taken from beneath TLS would break it.
fn still_open(tcp: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let peeked = socket2::SockRef::from(tcp).peek(&mut probe);
    matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn forward_to(
    tls: Option<&HopTls>,
    address: &str,
    preamble: &[u8],
) -> std::io::Result<PeerStream> {
    let mut stream = connect(tls, address).await?;
    stream.write_all(preamble).await?;
    // `OK\n` in one read (the holder sends nothing after it before this side speaks); an error
    // line is read on byte by byte, so nothing after the answer line is swallowed by a buffer.
    let mut line = vec![0u8; 3];
    stream.read_exact(&mut line).await?;
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") && line.len() < 1024 {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before answering"));
        }
        line.push(byte[0]);
    }
    match line.strip_prefix(b"OK\n") {
        Some(_) => Ok(stream),
        None => Err(std::io::Error::other(
            String::from_utf8_lossy(&line).trim().to_owned(),
        )),
    }
}

async fn read_preamble(stream: &mut BufReader<PeerStream>) -> std::io::Result<(String, String)> {
    let mut limited = (&mut *stream).take(MAX_PREAMBLE as u64);
    let (mut tag, mut body) = (String::new(), String::new());
    limited.read_line(&mut tag).await?;
    limited.read_line(&mut body).await?;
    Ok((tag, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_of_the_hop_probe_for_a_dead_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let dialed = connect(None, &address).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        probe_dead_peer(&accepted).unwrap();
        for stream in [dialed.tcp(), &accepted] {
            let socket = socket2::SockRef::from(stream);
            assert!(socket.keepalive().unwrap());
            assert_eq!(
                socket.tcp_keepalive_time().unwrap(),
                Duration::from_secs(15)
            );
            assert_eq!(
                socket.tcp_user_timeout().unwrap(),
                Some(Duration::from_secs(30))
            );
        }
    }

    /// A connection still waiting for its request (a spare) when the replica starts stopping
    /// is answered `ERR` at once: the other replica then sees it closed, or reads the refusal
    /// and sends its request elsewhere. It was dropped unanswered when the drain ended, and a
    /// request written on it at that moment failed 502 ("closed before answering").
    #[tokio::test]
    async fn a_connection_waiting_for_its_request_is_refused_when_stopping_begins() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mut spare = connect(None, &address).await.unwrap();
        let (held, _) = listener.accept().await.unwrap();
        let registry = Arc::new(Registry::new());
        let waiting = {
            let registry = Arc::clone(&registry);
            let held: PeerStream = Box::new(held);
            tokio::spawn(async move { request_arrived(BufReader::new(held), &registry).await })
        };
        registry.drain();
        let mut answer = String::new();
        BufReader::new(&mut spare)
            .read_line(&mut answer)
            .await
            .unwrap();
        assert_eq!(answer, "ERR kas is shutting down\n");
        assert!(waiting.await.unwrap().is_none());
    }

    /// A connection whose request arrives is handed on; one closed before any byte is not.
    #[tokio::test]
    async fn a_request_is_handed_on_and_a_spare_closed_unused_is_dropped_silently() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let registry = Registry::new();
        for (request, handed_on) in [(&b"tag\n"[..], true), (&b""[..], false)] {
            let mut dialed = connect(None, &address).await.unwrap();
            let (held, _) = listener.accept().await.unwrap();
            dialed.write_all(request).await.unwrap();
            drop(dialed);
            let held: PeerStream = Box::new(held);
            let arrived = request_arrived(BufReader::new(held), &registry).await;
            assert_eq!(arrived.is_some(), handed_on, "{request:?}");
        }
    }

    /// Over the hop's TLS, a spare connection is seen open while its holder keeps it, and closed
    /// once the holder closed it (a closed one used for a request fails it with a 502): TLS
    /// session tickets left unread on its socket made a closed one look open, or — judged
    /// strictly — every open one look closed.
    #[tokio::test]
    async fn a_spare_is_seen_open_until_its_holder_closes_it_under_tls() {
        let pki = tether_test_support::Pki::temporary();
        let tls = HopTls::load(&PeersTls {
            certificate_file: pki.cert.clone(),
            key_file: pki.key.clone(),
            ca_file: pki.ca.clone(),
            server_name: Some("localhost".into()),
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.tls.current().server);
        let (accepted, kept) = tokio::sync::oneshot::channel();
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let stream = acceptor.accept(tcp).await.unwrap();
            accepted.send(()).unwrap();
            let _ = closing.await;
            drop(stream);
        });
        let spare = connect(Some(&tls), &address).await.unwrap();
        kept.await.unwrap();
        assert!(still_open(spare.tcp()), "kept by its holder");
        close.send(()).unwrap();
        holder.await.unwrap();
        spare.tcp().readable().await.unwrap();
        assert!(!still_open(spare.tcp()), "closed by its holder");
    }

    /// With `peers.tls.server_name`, a client whose certificate the hop's CA signed but not
    /// for that name (another workload's, from a cluster-wide issuer) is refused.
    #[tokio::test]
    async fn a_client_certificate_not_made_for_the_hops_name_is_refused() {
        let pki = tether_test_support::Pki::temporary();
        let hop = |name: &str| {
            let files = PeersTls {
                certificate_file: pki.cert.clone(),
                key_file: pki.key.clone(),
                ca_file: pki.ca.clone(),
                server_name: Some(name.into()),
            };
            HopTls::load(&files).unwrap()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let dialer = hop("localhost");
        for (holder_name, taken) in [("localhost", true), ("kas-peers", false)] {
            let holder = hop(holder_name);
            let dial = connect(Some(&dialer), &address);
            let (accepted, _) = tokio::join!(
                async { accept_tls(&holder, listener.accept().await.unwrap().0).await },
                dial
            );
            assert_eq!(
                accepted.is_ok(),
                taken,
                "{holder_name}: {:?}",
                accepted.err()
            );
        }
    }

    fn request(at: u64) -> Forwarded {
        Forwarded {
            agent_id: 7,
            service: "kubernetes_api".into(),
            metadata: [("access_as".to_owned(), "{}".to_owned())].into(),
            at,
            nonce: Some(at * 7),
            to: Some("10.0.0.5:8156".into()),
        }
    }

    const ME: &str = "10.0.0.5:8156";

    #[test]
    fn a_failed_removal_is_due_until_done_unless_the_agent_came_back() {
        let mut u = Unreleased::default();
        u.failed(7);
        u.failed(8);
        assert_eq!(u.due(&[]), vec![7, 8]);
        assert_eq!(u.due(&[8]), vec![7], "held here again: not removed");
        u.done(7);
        u.held(8);
        assert!(u.due(&[]).is_empty());
    }

    #[test]
    fn holders_that_refused_lately_are_tried_last() {
        let now = std::time::Instant::now();
        let holders = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let mut refused = Refused::new();
        refused.insert((7, "a".to_owned()), now);
        refused.insert((8, "b".to_owned()), now);
        assert_eq!(
            refused_last(7, holders.clone(), &refused, now),
            ["b", "c", "a"]
        );
        let later = now + REFUSED_MEMORY;
        assert_eq!(
            refused_last(7, holders.clone(), &refused, later),
            holders,
            "forgotten after a while"
        );
    }

    #[test]
    fn a_preamble_is_accepted_once_and_old_nonces_are_forgotten() {
        let mut r = Replays::default();
        assert_eq!(r.admit(&request(1000), 1000), Ok(()));
        assert_eq!(r.admit(&request(1000), 1001), Err("replayed request"));
        assert_eq!(r.admit(&request(1001), 1001), Ok(()), "another nonce");
        let legacy = Forwarded {
            nonce: None,
            ..request(1000)
        };
        assert_eq!(r.admit(&legacy, 1000), Ok(()));
        assert_eq!(r.admit(&legacy, 1000), Ok(()), "older replicas send none");
        for at in 2000..2000 + REPLAYS_PRUNE_AT as u64 {
            r.admit(&request(at), 2000).unwrap();
        }
        r.admit(&request(9999), 2000).unwrap();
        assert!(
            !r.seen.contains_key(&7000),
            "a nonce too old to be accepted again is forgotten"
        );
        assert!(r.seen.len() <= REPLAYS_PRUNE_AT + 1);
    }

    fn lines(p: &[u8]) -> (String, String) {
        let text = String::from_utf8(p.to_vec()).unwrap();
        let (tag, body) = text.split_once('\n').unwrap();
        (tag.to_owned(), body.to_owned())
    }

    #[test]
    fn the_advertised_address_falls_back_to_the_pods_ip() {
        let cfg = |listen: &str, advertise: Option<&str>| PeersConfig {
            max_connections: None,
            tls: None,
            listen: listen.parse().unwrap(),
            advertise_address: advertise.map(str::to_owned),
            secret_file: "/s".into(),
        };
        assert_eq!(
            advertised(&cfg("10.0.0.5:8156", None), None).unwrap(),
            "10.0.0.5:8156"
        );
        assert_eq!(
            advertised(&cfg("0.0.0.0:8156", Some("kas-0:8156")), None).unwrap(),
            "kas-0:8156"
        );
        assert_eq!(
            advertised(&cfg("0.0.0.0:8156", None), Some("10.1.2.3")).unwrap(),
            "10.1.2.3:8156"
        );
        assert_eq!(advertised(&cfg("0.0.0.0:8156", None), None), None);
    }

    #[test]
    fn a_signed_fresh_request_is_taken() {
        let (tag, body) = lines(&preamble(b"shared", &request(1000)));
        assert_eq!(verify(b"shared", ME, &tag, &body, 1010), Ok(request(1000)));
        let legacy = Forwarded {
            to: None,
            ..request(1000)
        };
        let (tag, body) = lines(&preamble(b"shared", &legacy));
        assert_eq!(
            verify(b"shared", ME, &tag, &body, 1000),
            Ok(legacy),
            "older replicas sign for no one in particular"
        );
    }

    /// Each replica remembers only the nonces it accepted: a preamble captured on its way to
    /// one replica, replayed to another within its 30 s, is refused there by its address.
    #[test]
    fn a_request_signed_for_another_replica_is_refused() {
        let (tag, body) = lines(&preamble(b"shared", &request(1000)));
        assert_eq!(
            verify(b"shared", "10.0.0.6:8156", &tag, &body, 1000),
            Err("request signed for another replica")
        );
        let changed = body.replace("10.0.0.5", "10.0.0.6");
        assert_eq!(
            verify(b"shared", "10.0.0.6:8156", &tag, &changed, 1000),
            Err("bad signature"),
            "the address is signed"
        );
    }

    #[test]
    fn another_key_a_changed_body_or_an_old_request_is_refused() {
        let (tag, body) = lines(&preamble(b"shared", &request(1000)));
        assert_eq!(
            verify(b"other", ME, &tag, &body, 1000),
            Err("bad signature")
        );
        let changed = body.replace("\"agent_id\":7", "\"agent_id\":8");
        assert_eq!(
            verify(b"shared", ME, &tag, &changed, 1000),
            Err("bad signature")
        );
        assert_eq!(verify(b"shared", ME, &tag, &body, 1100), Err(STALE));
        assert_eq!(
            verify(b"shared", ME, "zz", &body, 1000),
            Err("malformed signature")
        );
    }
}
