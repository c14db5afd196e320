//! Agent half of Kubernetes API access: serves the `kubernetes_api` tunnel service. Each tunnel
//! carries one HTTP/1.1 connection from kas; every request on it is replayed against the
//! kube-apiserver with the agent's ServiceAccount and the impersonation its `access_as` asks for.
//! Bodies stream both ways without buffering, and upgrades (exec, attach, port-forward over
//! WebSocket or SPDY) pass through as raw bytes.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::client::ConfigExt;
use tether_kubeproxy_agent::{
    AccessAs, RequestContext, impersonation_headers, sanitize_request_headers,
};
use tether_protocol::tunnel::RequestInfo;
use tether_tunnel_agent::{AgentConn, BoxFuture, Handler};

/// Metadata keys kas sets on a `kubernetes_api` tunnel request.
pub const META_ACCESS_AS: &str = "access_as";
pub const META_CONTEXT: &str = "context";

type Body = BoxBody<Bytes, hyper::Error>;

/// Replays requests against the kube-apiserver (cheap to clone).
#[derive(Clone)]
pub struct KubeApiHandler(Arc<Inner>);

struct Inner {
    base: Uri,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
    token: Option<String>,
    token_file: Option<String>,
}

impl std::fmt::Debug for KubeApiHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiHandler")
            .field("base", &self.0.base)
            .finish_non_exhaustive()
    }
}

impl KubeApiHandler {
    pub fn new(config: &kube::Config) -> anyhow::Result<Self> {
        use secrecy::ExposeSecret;
        // No Nagle delay on small API requests (watch events, exec frames).
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = config.rustls_https_connector_with_connector(http)?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self(Arc::new(Inner {
            base: config.cluster_url.clone(),
            client,
            token: config
                .auth_info
                .token
                .as_ref()
                .map(|t| t.expose_secret().to_string()),
            token_file: config.auth_info.token_file.clone(),
        })))
    }
}

impl Inner {
    /// The ServiceAccount token: re-read from its file (projected tokens rotate) or static.
    fn bearer(&self) -> Option<String> {
        if let Some(f) = &self.token_file
            && let Ok(t) = std::fs::read_to_string(f)
        {
            return Some(t.trim().to_string());
        }
        self.token.clone()
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = tether_kubeproxy_agent::status_json(code, reason, message);
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn forward(
    h: Arc<Inner>,
    access: Arc<AccessAs>,
    ctx: Arc<RequestContext>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    let mut headers = match sanitize_request_headers(req.headers()) {
        Ok(h) => h,
        Err(e) => return Ok(status(StatusCode::FORBIDDEN, "Forbidden", &e.to_string())),
    };
    let imp = match impersonation_headers(&access, &ctx) {
        Ok(v) => v,
        Err(e) => return Ok(status(StatusCode::FORBIDDEN, "Forbidden", &e.to_string())),
    };
    for (k, v) in imp {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            headers.append(name, value);
        }
    }
    if let Some(t) = h.bearer()
        && let Ok(mut v) = HeaderValue::try_from(format!("Bearer {t}"))
    {
        v.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let base = h.base.to_string();
    let uri: Uri = match format!("{}{}", base.trim_end_matches('/'), path).parse() {
        Ok(u) => u,
        Err(e) => {
            return Ok(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &e.to_string(),
            ));
        }
    };
    let upgrade = headers.contains_key(header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut out = Request::builder()
        .method(parts.method)
        .uri(uri)
        .version(http::Version::HTTP_11);
    if let Some(hm) = out.headers_mut() {
        *hm = headers;
    }
    let out = match out.body(body.boxed()) {
        Ok(r) => r,
        Err(e) => {
            return Ok(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &e.to_string(),
            ));
        }
    };
    let mut resp = match h.client.request(out).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(status(
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                &format!("the agent cannot reach the Kubernetes API: {e}"),
            ));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        // exec/attach/port-forward: join the two upgraded connections byte for byte.
        let server_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, server_upgrade) {
                Ok((c, s)) => {
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
                Err(e) => tracing::debug!(error = %e, "Upgrade failed"),
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, body.boxed()))
}

impl Handler for KubeApiHandler {
    fn serve(
        &self,
        request: RequestInfo,
        conn: AgentConn,
    ) -> BoxFuture<'static, std::io::Result<()>> {
        let h = Arc::clone(&self.0);
        Box::pin(async move {
            let access: AccessAs = request
                .metadata
                .get(META_ACCESS_AS)
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or(AccessAs::Agent);
            let ctx: RequestContext = request
                .metadata
                .get(META_CONTEXT)
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            let (access, ctx) = (Arc::new(access), Arc::new(ctx));
            let service = hyper::service::service_fn(move |req| {
                forward(Arc::clone(&h), Arc::clone(&access), Arc::clone(&ctx), req)
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .with_upgrades()
                .await
                .map_err(std::io::Error::other)
        })
    }
}
