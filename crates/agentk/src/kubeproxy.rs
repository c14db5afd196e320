//! Agent half of Kubernetes API access: serves the `kubernetes_api` tunnel service. Each tunnel
//! carries one HTTP/1.1 connection from kas; every request on it is replayed against the
//! kube-apiserver with the agent's ServiceAccount and the impersonation its `access_as` asks for.
//! Bodies stream both ways without buffering, and upgrades (exec, attach, port-forward over
//! WebSocket or SPDY) pass through as raw bytes.
//!
//! Fails closed: a request whose metadata from kas is missing or does not parse is answered
//! with 403 and never reaches the API server. Running it with no impersonation would give the
//! caller the agent's own ServiceAccount rights, usually far broader than kas granted.

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
    MetadataError, RoutedRequest, impersonation_headers, sanitize_request_headers,
};
use tether_protocol::tunnel::RequestInfo;
use tether_tunnel_agent::{AgentConn, BoxFuture, Handler};
use tokio::io::{AsyncRead, AsyncWrite};

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

/// Why a request is answered by the agent itself instead of the Kubernetes API.
struct Refusal {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: StatusCode, reason: &'static str, message: impl ToString) -> Self {
        Self {
            code,
            reason,
            message: message.to_string(),
        }
    }

    fn response(&self) -> Response<Body> {
        status(self.code, self.reason, &self.message)
    }
}

async fn forward(
    h: Arc<Inner>,
    routed: Arc<RoutedRequest>,
    req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    match try_forward(&h, &routed, req).await {
        Ok(resp) => Ok(resp),
        Err(refusal) => Ok(refusal.response()),
    }
}

/// Sends the request to the Kubernetes API as the routed identity; joins upgraded connections.
async fn try_forward(
    h: &Inner,
    routed: &RoutedRequest,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let headers = upstream_headers(h, routed, req.headers())?;
    let uri = upstream_uri(h, req.uri())?;
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
    let out = out
        .body(body.boxed())
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "BadRequest", e))?;
    let mut resp = h.client.request(out).await.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "ServiceUnavailable",
            format!("the agent cannot reach the Kubernetes API: {e}"),
        )
    })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        join_upgrades(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The caller's headers without credentials or hop-by-hop ones, plus impersonation of the
/// routed identity and the agent's own credentials.
fn upstream_headers(
    h: &Inner,
    routed: &RoutedRequest,
    incoming: &http::HeaderMap,
) -> Result<http::HeaderMap, Refusal> {
    let mut headers =
        sanitize_request_headers(incoming).map_err(|e| Refusal::new(e.status(), e.reason(), &e))?;
    let imp = impersonation_headers(&routed.access_as, &routed.context)
        .map_err(|e| Refusal::new(StatusCode::FORBIDDEN, "Forbidden", e))?;
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
    Ok(headers)
}

/// The request's path and query on the Kubernetes API's base URL.
fn upstream_uri(h: &Inner, uri: &Uri) -> Result<Uri, Refusal> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let base = h.base.to_string();
    format!("{}{}", base.trim_end_matches('/'), path)
        .parse()
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "BadRequest", e))
}

/// exec/attach/port-forward: joins the two upgraded connections byte for byte.
fn join_upgrades(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, server) {
            Ok((c, s)) => {
                let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
            }
            Err(e) => tracing::debug!(error = %e, "Upgrade failed"),
        }
    });
}

impl Handler for KubeApiHandler {
    fn serve(
        &self,
        request: RequestInfo,
        conn: AgentConn,
    ) -> BoxFuture<'static, std::io::Result<()>> {
        let routed = RoutedRequest::decode(&request.metadata);
        Box::pin(serve_connection(Arc::clone(&self.0), routed, conn))
    }
}

/// Serves one tunnelled HTTP/1.1 connection: every request on it is replayed as `routed`
/// says, or, when its metadata could not be decoded, refused without reaching the API server.
async fn serve_connection<IO>(
    h: Arc<Inner>,
    routed: Result<RoutedRequest, MetadataError>,
    io: IO,
) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let routed = routed.map(Arc::new).map_err(|e| {
        tracing::warn!(error = %e, "Refusing a Kubernetes API request: its metadata from kas is missing or malformed");
        Arc::new(e)
    });
    let service = hyper::service::service_fn(move |req| {
        let (h, routed) = (Arc::clone(&h), routed.clone());
        async move {
            match routed {
                Ok(r) => forward(h, r, req).await,
                Err(e) => Ok(status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("refused by the agent: {e}"),
                )),
            }
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;
    use std::sync::Mutex;

    use http_body_util::Empty;
    use tether_kubeproxy_agent::{
        AccessAs, CiJobContext, META_ACCESS_AS, META_CONTEXT, RequestContext,
    };

    use super::*;

    /// A stand-in API server that records the `Impersonate-User` of every request reaching it.
    async fn recording_api_server() -> (Uri, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", l.local_addr().unwrap())
            .parse()
            .unwrap();
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let record = Arc::clone(&record);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let user = req
                        .headers()
                        .get("impersonate-user")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("<none>")
                        .to_owned();
                    record.lock().unwrap().push(user);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        (uri, seen)
    }

    fn valid_metadata() -> HashMap<String, String> {
        RoutedRequest {
            access_as: AccessAs::CiJob,
            context: RequestContext {
                agent_id: 1,
                ci_job: Some(CiJobContext {
                    job_id: 777,
                    pipeline_id: 5,
                    project_id: 42,
                    ..CiJobContext::default()
                }),
                ..RequestContext::default()
            },
        }
        .encode()
        .unwrap()
    }

    /// Sends one GET through the handler as kas would, with `metadata`; returns status and body.
    async fn get_through_agent(base: &Uri, metadata: &HashMap<String, String>) -> (u16, String) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let handler = KubeApiHandler::new(&kube::Config::new(base.clone())).unwrap();
        let (kas_side, agent_side) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve_connection(
            Arc::clone(&handler.0),
            RoutedRequest::decode(metadata),
            agent_side,
        ));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(kas_side))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/api/v1/namespaces/default/secrets")
            .header(header::HOST, "kubernetes")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        drop(sender);
        served.await.unwrap().unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn missing_or_malformed_metadata_is_refused_and_never_reaches_the_api_server() {
        let (base, seen) = recording_api_server().await;
        let mut cases: Vec<(&str, HashMap<String, String>)> = vec![("no metadata", HashMap::new())];
        for key in [META_ACCESS_AS, META_CONTEXT] {
            let mut m = valid_metadata();
            m.remove(key);
            cases.push((key, m));
        }
        for (key, value) in [
            (META_ACCESS_AS, "not json"),
            (META_ACCESS_AS, "\"root\""),
            (META_CONTEXT, "{\"agent_id\":"),
            (META_CONTEXT, "{\"agent_id\":1,\"admin\":true}"),
        ] {
            let mut m = valid_metadata();
            m.insert(key.to_owned(), value.to_owned());
            cases.push((value, m));
        }
        for (what, metadata) in &cases {
            let (code, body) = get_through_agent(&base, metadata).await;
            assert_eq!(code, 403, "{what}: {body}");
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(status["kind"], "Status", "{what}");
            assert_eq!(status["reason"], "Forbidden", "{what}");
        }
        assert!(
            seen.lock().unwrap().is_empty(),
            "nothing reached the API server"
        );

        // The same channel carries a well-formed request through, impersonated: the recorder
        // above would have seen the refused ones.
        let (code, body) = get_through_agent(&base, &valid_metadata()).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(*seen.lock().unwrap(), vec!["gitlab:ci_job:777".to_owned()]);
    }
}
