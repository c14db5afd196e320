//! A Kubernetes client whose requests go through an agent's tunnel: how kas itself reads and
//! dry-runs against a cluster (`kas agent diff`).
//!
//! Each request takes one tunnel stream (like a proxied request), carries the routing metadata
//! kas decided (the agent's own ServiceAccount, or a CI job's or a person's impersonation) and
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
use tether_tunnel_server::Registry;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A `kube::Client` reaching agent `agent_id`'s cluster through its tunnels as `routed` says
/// (the agent's ServiceAccount, or the impersonation kas decided for a CI job or a person),
/// waiting up to `wait` for a tunnel per request.
pub fn client(
    registry: Arc<Registry>,
    agent_id: i64,
    wait: Duration,
    routed: &RoutedRequest,
) -> Result<kube::Client, MetadataError> {
    let meta = routed.encode()?;
    let through = ThroughTunnel {
        registry,
        agent_id,
        wait,
        meta: Arc::new(meta),
    };
    Ok(kube::Client::new(through, "default"))
}

/// The transport of [`client`].
#[derive(Clone)]
struct ThroughTunnel {
    registry: Arc<Registry>,
    agent_id: i64,
    wait: Duration,
    meta: Arc<HashMap<String, String>>,
}

impl ThroughTunnel {
    async fn send(
        self,
        mut req: Request<kube::client::Body>,
    ) -> Result<Response<hyper::body::Incoming>, BoxError> {
        let tunnel = self.registry.get_tunnel(self.agent_id, self.wait).await?;
        let conn = tunnel
            .request(
                tether_protocol::services::KUBERNETES_API,
                (*self.meta).clone(),
            )
            .await?;
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
