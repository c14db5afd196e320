//! The `ReverseTunnel` gRPC service: authenticates each stream and parks it in the registry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tether_protocol::metadata;
use tether_protocol::tunnel::reverse_tunnel_server::ReverseTunnel;
use tether_protocol::tunnel::{AgentFrame, ServerFrame, agent_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::registry::{ConnectionInfo, Registry};

/// Who an agent token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: i64,
    pub agent_name: String,
    pub project_path: String,
    pub token_id: i64,
}

/// Why authentication could not be decided.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Looks agent tokens up (kas implements it over its store).
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(None)` for an unknown or revoked token.
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<AgentIdentity>, AuthError>>;
    /// Whether a token (by id) is still valid; live streams are re-checked with this.
    fn token_active(&self, token_id: i64) -> BoxFuture<'_, Result<bool, AuthError>>;
}

/// Reads `authorization: Bearer <token>` and authenticates it, mapping failures to the gRPC
/// codes agents expect: unknown/revoked → Unauthenticated, store trouble → Unavailable.
pub async fn authenticate_metadata(
    auth: &dyn Authenticator,
    md: &tonic::metadata::MetadataMap,
) -> Result<AgentIdentity, Status> {
    let header = md
        .get(metadata::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be a Bearer token"))?
        .trim();
    match auth.authenticate(token).await {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(Status::unauthenticated("unknown or revoked agent token")),
        Err(e) => {
            tracing::warn!(error = %e, "Agent token lookup failed");
            Err(Status::unavailable(
                "cannot check the agent token right now",
            ))
        }
    }
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

#[tonic::async_trait]
impl ReverseTunnel for TunnelService {
    type ConnectStream = ReceiverStream<Result<ServerFrame, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = authenticate_metadata(self.auth.as_ref(), request.metadata()).await?;
        let md = request.metadata();
        let info = ConnectionInfo {
            agent_version: header(md, metadata::AGENT_VERSION),
            pod_name: header(md, metadata::POD_NAME),
            pod_namespace: header(md, metadata::POD_NAMESPACE),
            remote_addr: tether_transport::remote_addr_of(&request)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            connected_since: std::time::SystemTime::now(),
            streams: 0,
        };
        let mut inbound = request.into_inner();
        // The descriptor comes first; an agent that sends nothing is not parked forever.
        let first = tokio::time::timeout(self.descriptor_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no descriptor received"))??;
        let services = match first.and_then(|f| f.frame) {
            Some(agent_frame::Frame::Descriptor(d)) => d.services,
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
            registry.park(identity, info, services, inbound, tx).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
