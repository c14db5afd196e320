//! The `ReverseTunnel` gRPC service: authenticates each stream and parks it in the registry.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tether_guard::{Fingerprint, Limited};
use tether_protocol::metadata;
use tether_protocol::tunnel::reverse_tunnel_server::ReverseTunnel;
use tether_protocol::tunnel::{AgentFrame, ServerFrame, agent_frame};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AgentIdentity, Authenticator};
use crate::registry::{ConnectionInfo, Outgoing, Registry};

/// Reads `authorization: Bearer <token>` and authenticates it, mapping failures to the gRPC
/// codes agents expect: unknown/revoked → Unauthenticated, store trouble → Unavailable, over a
/// limit → ResourceExhausted. Without the client's address only per-token limits apply; prefer
/// [`authenticate_request`].
pub async fn authenticate_metadata(
    auth: &dyn Authenticator,
    md: &tonic::metadata::MetadataMap,
) -> Result<AgentIdentity, Status> {
    authenticate_from(auth, md, None, None).await
}

/// [`authenticate_metadata`] with the client's address from the request's connection, so
/// failures count against the address too.
///
/// Not `async` on purpose: the future keeps only the metadata, so callers holding a request
/// whose body is not `Sync` (a gRPC stream) still get a `Send` future.
pub fn authenticate_request<'a, T>(
    auth: &'a dyn Authenticator,
    request: &'a Request<T>,
) -> impl Future<Output = Result<AgentIdentity, Status>> + Send + 'a {
    let address = tether_transport::remote_addr_of(request).map(|a| a.ip());
    let proof = request
        .extensions()
        .get::<tether_transport::AgentConnectInfo>()
        .cloned();
    let authenticated = authenticate_from(auth, request.metadata(), address, None);
    async move {
        let identity = authenticated.await?;
        // The connection carried accepted credentials: it outlives its authentication
        // deadline.
        if let Some(info) = proof {
            info.proof().mark();
        }
        Ok(identity)
    }
}

/// The bearer token, or why there is none (a metric label and a message).
fn bearer(md: &tonic::metadata::MetadataMap) -> Result<&str, (&'static str, &'static str)> {
    let header = md
        .get(metadata::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(("missing_credentials", "missing authorization metadata"))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or((
            "malformed_credentials",
            "authorization must be a Bearer token",
        ))?;
    Ok(token.trim())
}

/// `known`: the registry whose recently looked-up tokens may skip the store (tunnel streams).
async fn authenticate_from(
    auth: &dyn Authenticator,
    md: &tonic::metadata::MetadataMap,
    address: Option<IpAddr>,
    known: Option<&Registry>,
) -> Result<AgentIdentity, Status> {
    let guard = auth.guard();
    let token = bearer(md);
    // Hashed only when a guard will use it; the token itself is never kept or logged.
    let fingerprint = match (&token, guard) {
        (Ok(t), Some(_)) => Some(Fingerprint::of(t.as_bytes())),
        _ => None,
    };
    // Before the store is asked: a flood of bad tokens must cost a hash, not a look-up.
    if let Some(g) = guard
        && let Err(l) = g.admit(address, fingerprint)
    {
        g.hold().await;
        return Err(exhausted(l));
    }
    let refuse = |reason: &'static str, message: &'static str| {
        if let Some(g) = guard {
            g.refused(address, fingerprint, reason, message);
        }
        Status::unauthenticated(message)
    };
    let token = token.map_err(|(reason, message)| refuse(reason, message))?;
    let digest = known.map(|_| <[u8; 32]>::from(Sha256::digest(token.as_bytes())));
    if let (Some(registry), Some(d)) = (known, &digest)
        && let Some(id) = registry.known_identity(d)
    {
        return Ok(id);
    }
    match auth.authenticate(token).await {
        Ok(Some(id)) => {
            if let (Some(registry), Some(d)) = (known, digest) {
                registry.remember(d, id.clone());
            }
            Ok(id)
        }
        Ok(None) => Err(refuse(
            "invalid_credentials",
            "unknown or revoked agent token",
        )),
        Err(e) => {
            // kas's own trouble, not the client's failure: not counted against it.
            tracing::warn!(error = %e, "Agent token lookup failed");
            Err(Status::unavailable(
                "cannot check the agent token right now",
            ))
        }
    }
}

/// RESOURCE_EXHAUSTED with the wait in the message and in `retry-after` metadata (seconds, as
/// HTTP's header), for clients and people reading logs alike.
fn exhausted(l: Limited) -> Status {
    let mut status = Status::resource_exhausted(l.message());
    if let Ok(v) = l.retry_after_secs().to_string().parse() {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

fn header(md: &tonic::metadata::MetadataMap, key: &str) -> String {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .chars()
        .take(253)
        .collect()
}

/// The gRPC service kas mounts on its agent listener.
#[derive(Clone)]
pub struct TunnelService {
    registry: Arc<Registry>,
    auth: Arc<dyn Authenticator>,
    descriptor_timeout: Duration,
}

impl std::fmt::Debug for TunnelService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelService").finish_non_exhaustive()
    }
}

impl TunnelService {
    pub fn new(registry: Arc<Registry>, auth: Arc<dyn Authenticator>) -> Self {
        Self {
            registry,
            auth,
            descriptor_timeout: Duration::from_secs(10),
        }
    }
}

/// A stream's frames to the agent, as tonic takes them: the registry sends them boxed (see
/// [`Outgoing`]).
#[derive(Debug)]
pub struct Outbound(mpsc::Receiver<Outgoing>);

impl futures_util::Stream for Outbound {
    type Item = Result<ServerFrame, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|item| item.map(|boxed| *boxed))
    }
}

#[tonic::async_trait]
impl ReverseTunnel for TunnelService {
    type ConnectStream = Outbound;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // Refused before it is answered: an answered stream counts as connected for the agent,
        // which would log a connection that kas ends a moment later.
        if self.registry.is_shutting_down() {
            return Err(Status::unavailable("kas is shutting down"));
        }
        // Each request takes a stream and the agent opens the next: its token was most
        // likely looked up a moment ago.
        // A connection kas is rotating takes no new idle streams: the agent opens them on its
        // next connection (the GOAWAY has told it).
        let moving = request
            .extensions()
            .get::<tether_transport::AgentConnectInfo>()
            .map(|c| c.moving().clone())
            .unwrap_or_default();
        if moving.is_cancelled() {
            return Err(crate::registry::rotated());
        }
        let remote = tether_transport::remote_addr_of(&request);
        let md = request.metadata();
        let known = Some(self.registry.as_ref());
        let identity =
            authenticate_from(self.auth.as_ref(), md, remote.map(|a| a.ip()), known).await?;
        tether_transport::mark_authenticated(&request);
        let info = ConnectionInfo {
            agent_version: header(md, metadata::AGENT_VERSION),
            pod_name: header(md, metadata::POD_NAME),
            pod_namespace: header(md, metadata::POD_NAMESPACE),
            cluster_id: header(md, metadata::CLUSTER_ID),
            remote_addr: remote.map(|a| a.to_string()).unwrap_or_default(),
            connected_since: std::time::SystemTime::now(),
            streams: 0,
        };
        let mut inbound = request.into_inner();
        // The descriptor comes first; an agent that sends nothing is not parked forever.
        let first = tokio::time::timeout(self.descriptor_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no descriptor received"))??;
        let descriptor = match first.and_then(|f| f.frame) {
            Some(agent_frame::Frame::Descriptor(d)) => d,
            _ => {
                return Err(Status::invalid_argument(
                    "the first frame must be a descriptor",
                ));
            }
        };
        // A small buffer: the data phase relies on HTTP/2 flow control, not on queues here.
        let (tx, rx) = mpsc::channel(2);
        let registry = Arc::clone(&self.registry);
        tokio::spawn(async move {
            let streams = (inbound, tx);
            registry
                .park(identity, info, descriptor, streams, moving)
                .await;
        });
        Ok(Response::new(Outbound(rx)))
    }
}
