//! A Kubernetes client whose requests go through an agent's tunnel: how kas itself reads and
//! dry-runs against a cluster (`kas agent diff`).
//!
//! Each request takes one tunnel stream (like a proxied request; through the replica holding the
//! agent when another one does), carries the routing metadata kas decided (the agent's own ServiceAccount, or a CI job's or a person's impersonation) and
//! is replayed by agentk's `kubernetes_api` service.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, header};
use hyper_util::rt::TokioIo;
use tether_kubeproxy_agent::{MetadataError, RoutedRequest};
use tether_tunnel_server::{Registry, RegistryError, Reopen, Reopened, Resending, TunnelError};

use crate::outbound::Io;
use crate::peers::{Peers, RouteError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How kas reaches agents' `kubernetes_api` service: through one of the agent's tunnels here,
/// or — with several replicas — through the replica holding them (`peers`).
#[derive(Clone, Debug)]
pub struct Reach {
    pub registry: Arc<Registry>,
    pub peers: Option<Peers>,
    /// How long a request waits for a tunnel of the agent.
    pub wait: Duration,
}

/// Why no stream to the agent could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ReachError {
    /// The replica holding the agent could not be found or reached.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// No tunnel of the agent came, here or on another replica, in time.
    #[error(transparent)]
    NoTunnel(#[from] RegistryError),
    /// A tunnel was taken but did not carry the request.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl ReachError {
    /// The HTTP status a client gets: the agent unavailable (503), or a tunnel that failed
    /// under the request (502).
    pub fn status(&self) -> http::StatusCode {
        match self {
            ReachError::Route(_) | ReachError::NoTunnel(_) => http::StatusCode::SERVICE_UNAVAILABLE,
            ReachError::Tunnel(_) => http::StatusCode::BAD_GATEWAY,
        }
    }
}

impl Reach {
    /// A byte stream to agent `agent_id`'s `kubernetes_api` service carrying `meta`: through
    /// the replica holding its tunnels when this one holds none, else through one here; while
    /// it has none anywhere, through whichever replica gets one first, within [`Reach::wait`].
    /// A request on a tunnel here that the agent closes without taking it (agentk stopping, or
    /// closing a surplus idle stream, as kas chose that stream) goes the same way again, as
    /// long as that time allows (`Resending`): the replica holding the tunnels does the same
    /// for the requests it carries, and a request such a replica refused (it lost the agent
    /// and its directory entry is not gone yet) goes to the agent's next holder likewise.
    pub(crate) async fn open(
        &self,
        agent_id: i64,
        meta: Arc<HashMap<String, String>>,
    ) -> Result<Box<dyn Io>, ReachError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let first = self.open_once(agent_id, &meta, self.wait).await?;
        if first.answer.is_none() {
            return Ok(first.io);
        }
        let reach = self.clone();
        let reopen: Reopen = Arc::new(move |left| {
            let (reach, meta) = (reach.clone(), Arc::clone(&meta));
            Box::pin(async move {
                reach
                    .open_once(agent_id, &meta, left)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        let resent = self.registry.resent_counter();
        Ok(Box::new(Resending::new(first, reopen, deadline, resent)))
    }

    /// One stream for the request, waiting up to `wait` for it; with the agent's answer when
    /// it is a tunnel here.
    async fn open_once(
        &self,
        agent_id: i64,
        meta: &HashMap<String, String>,
        wait: Duration,
    ) -> Result<Reopened, ReachError> {
        // The holder's refusal (it lost the agent) is an answer too: the request goes to the
        // next holder rather than failing.
        let through = |s: crate::peer_stream::OkFirst<crate::peer_stream::PeerStream>| Reopened {
            answer: Some(s.answer()),
            io: Box::new(s),
        };
        let mut unanswered = None;
        if let Some(peers) = self
            .peers
            .as_ref()
            .filter(|_| !self.registry.has_agent(agent_id))
        {
            match peers.open(agent_id, KUBERNETES_API, meta).await {
                Ok(Some(stream)) => return Ok(through(stream)),
                Ok(None) => {}
                // The holders are gone (one stopping in a rollout, its entry still read): the
                // agent comes back to another replica within a second, so the request waits
                // for it as when none held it. It failed 503 at once.
                Err(e @ RouteError::Holders { .. }) => unanswered = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        let waited = self.registry.get_tunnel(agent_id, wait);
        let waited = match &self.peers {
            None => waited.await,
            // The agent may come back to another replica (a rollout): whichever is first.
            Some(peers) => tokio::select! {
                t = waited => t,
                s = peers.wait_holder(agent_id, KUBERNETES_API, meta) => return Ok(through(s)),
            },
        };
        // Not back in time: the holders' failure says more than the wait's.
        let tunnel = waited.map_err(|e| unanswered.map_or(e.into(), ReachError::Route))?;
        let answer = tunnel.answer();
        Ok(Reopened {
            io: Box::new(tunnel.request(KUBERNETES_API, meta.clone()).await?),
            answer: Some(answer),
        })
    }
}

const KUBERNETES_API: &str = tether_protocol::services::KUBERNETES_API;

/// A `kube::Client` reaching agent `agent_id`'s cluster as `routed` says (the agent's
/// ServiceAccount, or the impersonation kas decided for a CI job or a person), each request
/// through a stream `reach` opens (so through the replica holding the agent, if another does).
pub fn client(
    reach: Reach,
    agent_id: i64,
    routed: &RoutedRequest,
) -> Result<kube::Client, MetadataError> {
    let meta = routed.encode()?;
    let through = ThroughTunnel {
        reach,
        agent_id,
        meta: Arc::new(meta),
    };
    Ok(kube::Client::new(through, "default"))
}

/// The transport of [`client`].
#[derive(Clone)]
struct ThroughTunnel {
    reach: Reach,
    agent_id: i64,
    meta: Arc<HashMap<String, String>>,
}

impl ThroughTunnel {
    async fn send(
        self,
        mut req: Request<kube::client::Body>,
    ) -> Result<Response<hyper::body::Incoming>, BoxError> {
        let conn = self.reach.open(self.agent_id, self.meta).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
        // Ends once the response is read and the sender dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "Tunnelled Kubernetes API connection ended with an error");
            }
        });
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("kubernetes"));
        Ok(sender.send_request(req).await?)
    }
}

impl tower::Service<Request<kube::client::Body>> for ThroughTunnel {
    type Response = Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}
