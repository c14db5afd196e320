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
use std::time::Duration;

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
    timeouts: Timeouts,
    token: Option<String>,
    token_file: Option<String>,
    /// One warning per minute about failing API server requests (an outage fails them all).
    failures: tether_transport::LogThrottle,
}

/// How long a tunnelled request waits on the Kubernetes API server before agentk answers it
/// with 504 itself. Without them a blackholed API server address, or a pooled connection that
/// died silently, held a CI job's request (and its tunnel stream) forever.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    pub connect: Duration,
    /// From sending the request until its response headers arrive. The body is not timed: a
    /// watch, `logs -f`, exec or port-forward lasts as long as it wants once its headers (or
    /// its 101) came. The API server answers non-long-running requests within its own 60 s
    /// request timeout, so this stays well above that and fires only when nothing answers.
    pub response_headers: Duration,
}

/// TCP keepalive on connections to the API server: an idle pooled connection (or a quiet watch)
/// whose peer vanished is found dead within about a minute (30 s idle, then 3 probes 10 s
/// apart) instead of the kernel's two hours. The client speaks HTTP/1.1 only (kube's connector
/// offers no h2 in ALPN), so there are no HTTP/2 pings to set.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

impl std::fmt::Debug for KubeApiHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiHandler")
            .field("base", &self.0.base)
            .finish_non_exhaustive()
    }
}

impl KubeApiHandler {
    pub fn new(config: &kube::Config, timeouts: Timeouts) -> anyhow::Result<Self> {
        use secrecy::ExposeSecret;
        // No Nagle delay on small API requests (watch events, exec frames).
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.set_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL));
        http.set_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
        let connector = config.rustls_https_connector_with_connector(http)?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self(Arc::new(Inner {
            base: config.cluster_url.clone(),
            client,
            timeouts,
            token: config
                .auth_info
                .token
                .as_ref()
                .map(|t| t.expose_secret().to_string()),
            token_file: config.auth_info.token_file.clone(),
            failures: tether_transport::LogThrottle::new(Duration::from_secs(60)),
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
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
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
    let mut resp = send(h, out, declared).await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        return Err(own_credentials_refused(h));
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        join_upgrades(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The API server's default limit on a request body (its `MaxRequestBodyBytes`, 3 MiB): a
/// larger one is answered 413 and the connection closed while it is being sent.
const API_SERVER_BODY_LIMIT: u64 = 3 * 1024 * 1024;

/// Sends `out` (of `declared` body bytes, when said) to the API server and waits for its
/// response headers, at most `timeouts.response_headers`; a timeout is answered 504 naming the
/// API server (and logged at warn: a CI job sees it as its own failure otherwise); a body the
/// API server cut ([`body_cut`]) 413 when it is over the API server's default limit; any other
/// failure 502.
async fn send(
    h: &Inner,
    out: Request<Body>,
    declared: Option<u64>,
) -> Result<Response<Incoming>, Refusal> {
    let timeouts = h.timeouts;
    // A GET has none: an API server closing its connection then did not cut a body.
    let has_body = declared.map_or(!hyper::body::Body::is_end_stream(out.body()), |n| n > 0);
    let started = tokio::time::Instant::now();
    let refusal = match tokio::time::timeout(timeouts.response_headers, h.client.request(out)).await
    {
        Ok(Ok(resp)) => return Ok(resp),
        Ok(Err(e)) if e.is_connect() && is_timeout(&e) => Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!(
                "the agent could not connect to the Kubernetes API server at {} within {:?}",
                h.base, timeouts.connect
            ),
        ),
        Ok(Err(e)) => failed(&h.base, &e, (has_body, declared), started.elapsed()),
        Err(_) => Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!(
                "the Kubernetes API server at {} sent no response headers within {:?}",
                h.base, timeouts.response_headers
            ),
        ),
    };
    // A user's oversized request is theirs to fix, not the operator's: said to them only.
    if refusal.code != StatusCode::PAYLOAD_TOO_LARGE
        && let Some(suppressed) = h.failures.admit("api_server", std::time::Instant::now())
    {
        tracing::warn!(api_server = %h.base, status = refusal.code.as_u16(), suppressed, "A request to the Kubernetes API server failed: {}", refusal.message);
    }
    Err(refusal)
}

/// A 401 from the API server: every request goes with agentk's own credentials (the caller's
/// identity is impersonated, which is refused with 403), so its token was refused — an expired
/// or deleted ServiceAccount's. Passed through, it told people and CI jobs to log in (E12).
fn own_credentials_refused(h: &Inner) -> Refusal {
    let what = format!(
        "the Kubernetes API server at {} refused the agent's own credentials (401): its ServiceAccount token is invalid or expired (was the ServiceAccount deleted?); your credentials are fine",
        h.base
    );
    if let Some(suppressed) = h
        .failures
        .admit("own_credentials", std::time::Instant::now())
    {
        tracing::error!(api_server = %h.base, suppressed, "{what}");
    }
    Refusal::new(StatusCode::BAD_GATEWAY, "ServiceUnavailable", what)
}

/// The answer to a request the API server did not answer (pure): 413 for a body over its
/// limit that it cut; 502 for a body it cut otherwise, or a connection it closed at once; 504
/// when it closed the connection without an answer after a while (it timed the request out:
/// it may still complete it, as its own 504 says); 502 naming the cause chain otherwise (its
/// address refusing connections: "Connection refused" was lost under "client error (Connect)").
fn failed(
    base: &Uri,
    e: &(dyn std::error::Error + 'static),
    (has_body, declared): (bool, Option<u64>),
    elapsed: Duration,
) -> Refusal {
    let causes = tether_transport::with_causes(e);
    let bad_gateway =
        |what: String| Refusal::new(StatusCode::BAD_GATEWAY, "ServiceUnavailable", what);
    if !body_cut(e) {
        return bad_gateway(format!(
            "the agent cannot reach the Kubernetes API server at {base}: {causes}"
        ));
    }
    // The API server answers 413 and closes the connection when a body is over its limit;
    // when the close comes before hyper has read that answer, the write fails. It was
    // answered 502 "cannot reach the Kubernetes API" — an outage to an operator's alert, for
    // a user's oversized request (E9).
    if has_body && declared.is_some_and(|n| n > API_SERVER_BODY_LIMIT) {
        return Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!(
                "the request body ({} bytes) is over the Kubernetes API server's limit (3 MiB by default): it closed the connection while the agent sent it",
                declared.unwrap_or_default()
            ),
        );
    }
    if has_body {
        return bad_gateway(format!(
            "the Kubernetes API server at {base} closed the connection while the agent sent the request body: {causes}"
        ));
    }
    if elapsed >= TIMED_OUT_AFTER {
        return Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!(
                "the Kubernetes API server at {base} closed the connection after {}s without an answer: it timed the request out and may still be processing it (etcd not answering?): {causes}",
                elapsed.as_secs()
            ),
        );
    }
    bad_gateway(format!(
        "the Kubernetes API server at {base} closed the connection without an answer: {causes}"
    ))
}

/// A connection the API server closes this long after a request without answering it was a
/// request it timed out (its own timeout is 60 s), not one it refused.
const TIMED_OUT_AFTER: Duration = Duration::from_secs(10);

/// Whether the request failed because the API server closed the connection while its body was
/// being sent: a broken pipe or reset on the write, or the connection closed before the
/// answer was whole.
fn body_cut(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        }) || c
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether an error's cause is an I/O timeout (the connector's connect timeout).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
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
        api_server_answering(StatusCode::OK).await
    }

    /// As [`recording_api_server`], answering every request with `code`.
    async fn api_server_answering(code: StatusCode) -> (Uri, Arc<Mutex<Vec<String>>>) {
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
                    async move {
                        let mut resp = Response::new(Empty::<Bytes>::new());
                        *resp.status_mut() = code;
                        Ok::<_, std::convert::Infallible>(resp)
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

    /// What a request the API server did not answer gets depends on what was cut: a body
    /// (413 over its limit, else 502), nothing after a while (504: it timed the request out,
    /// as it says directly; it was a 502 blaming a request body a GET does not have), nothing
    /// at once (502); a refused connection names the address and the cause (it read "client
    /// error (Connect)").
    #[test]
    fn an_unanswered_request_is_told_by_what_the_api_server_cut() {
        let base: Uri = "https://10.0.0.1:6443".parse().unwrap();
        let cut = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let at_once = Duration::from_millis(5);
        let minute = Duration::from_secs(60);

        let r = failed(&base, &refused, (false, None), at_once);
        assert_eq!(r.code, StatusCode::BAD_GATEWAY);
        assert_eq!(
            r.message,
            "the agent cannot reach the Kubernetes API server at https://10.0.0.1:6443/: Connection refused (os error 111)"
        );
        let r = failed(&base, &cut, (true, Some(4 * 1024 * 1024)), at_once);
        assert_eq!(r.code, StatusCode::PAYLOAD_TOO_LARGE);
        let r = failed(&base, &cut, (true, Some(100)), at_once);
        assert_eq!(r.code, StatusCode::BAD_GATEWAY);
        assert!(
            r.message.contains("while the agent sent the request body"),
            "{}",
            r.message
        );
        let r = failed(&base, &cut, (false, None), minute);
        assert_eq!((r.code, r.reason), (StatusCode::GATEWAY_TIMEOUT, "Timeout"));
        assert!(r.message.contains("after 60s without an answer: it timed the request out and may still be processing it"), "{}", r.message);
        let r = failed(&base, &cut, (false, None), at_once);
        assert_eq!(r.code, StatusCode::BAD_GATEWAY);
        assert!(
            r.message
                .contains("closed the connection without an answer"),
            "{}",
            r.message
        );
    }

    /// The API server refusing agentk's own token is said as that (502), not passed through
    /// as a 401 that tells the caller to log in (E12).
    #[tokio::test]
    async fn the_api_server_refusing_the_agents_own_credentials_is_not_the_callers_401() {
        let (base, seen) = api_server_answering(StatusCode::UNAUTHORIZED).await;
        let (code, body) = get_through_agent(&base, &valid_metadata()).await;
        assert_eq!(code, 502, "{body}");
        assert!(
            body.contains("refused the agent's own credentials (401)"),
            "{body}"
        );
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "the request reached the API server"
        );
    }

    fn valid_metadata() -> HashMap<String, String> {
        RoutedRequest {
            access_as: AccessAs::CiJob,
            context: RequestContext {
                agent_id: 1,
                ci_job: Some(CiJobContext {
                    job_id: 777,
                    pipeline_id: 5,
                    project_id: Some(42),
                    ..CiJobContext::default()
                }),
                ..RequestContext::default()
            },
        }
        .encode()
        .unwrap()
    }

    /// Test timeouts: long enough never to fire unless a test means them to.
    const PATIENT: Timeouts = Timeouts {
        connect: Duration::from_secs(30),
        response_headers: Duration::from_secs(30),
    };

    /// Sends one GET through the handler as kas would, with `metadata`; returns status and body.
    async fn get_through_agent(base: &Uri, metadata: &HashMap<String, String>) -> (u16, String) {
        get_through(base, PATIENT, metadata).await
    }

    async fn get_through(
        base: &Uri,
        timeouts: Timeouts,
        metadata: &HashMap<String, String>,
    ) -> (u16, String) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let handler = KubeApiHandler::new(&kube::Config::new(base.clone()), timeouts).unwrap();
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

    /// Sends a request through the agent to `base` and expects agentk's own 504, a Kubernetes
    /// `Status` naming the API server and saying `what`, in well under 10 s; returns how long
    /// it took.
    async fn expect_504(base: &Uri, timeouts: Timeouts, what: &str) -> Duration {
        let started = std::time::Instant::now();
        let (code, body) = get_through(base, timeouts, &valid_metadata()).await;
        let took = started.elapsed();
        assert_eq!(code, 504, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(v["kind"], "Status", "{body}");
        assert_eq!(v["reason"], "Timeout", "{body}");
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains(&base.to_string()), "{message}");
        assert!(message.contains(what), "{message}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        took
    }

    /// Log lines written while the guard lives, on this thread (a current-thread test runtime
    /// runs every task here).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || SharedWriter(Arc::clone(&sink)))
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    struct SharedWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_api_server_that_accepts_and_never_answers_gets_a_504_at_the_header_timeout() {
        let (logs, _guard) = capture_logs();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}", l.local_addr().unwrap())
            .parse()
            .unwrap();
        // Accepts, reads the request and never answers: a hung API server, or a connection
        // whose peer went away without a reset.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = l.accept().await {
                held.push(tcp);
            }
        });
        let timeouts = Timeouts {
            response_headers: Duration::from_millis(300),
            ..PATIENT
        };
        let took = expect_504(&base, timeouts, "sent no response headers within 300ms").await;
        assert!(took >= timeouts.response_headers, "{took:?}");
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(
            logs.lines()
                .any(|l| l.contains("WARN") && l.contains("no response headers within 300ms")),
            "{logs}"
        );
    }

    /// A listener whose accept queue is full: Linux drops further SYNs, so a connect to it
    /// hangs as to a blackholed address, without sending anything off this machine.
    async fn unconnectable_address() -> (Uri, Vec<tokio::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut filling = Vec::new();
        for _ in 0..16 {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok(tcp)) => filling.push(tcp),
                Ok(Err(e)) => panic!("filling the accept queue: {e}"),
                Err(_) => {
                    // Kept alive with the connections that fill its queue.
                    std::mem::forget(listener);
                    let uri = format!("http://{addr}").parse().unwrap();
                    return (uri, filling);
                }
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn an_api_server_address_that_cannot_be_connected_gets_a_504_at_the_connect_timeout() {
        let (base, _filling) = unconnectable_address().await;
        let timeouts = Timeouts {
            connect: Duration::from_millis(300),
            ..PATIENT
        };
        let took = expect_504(&base, timeouts, "could not connect").await;
        assert!(took >= timeouts.connect, "{took:?}");
    }

    #[tokio::test]
    async fn a_stream_lasts_past_the_header_timeout_once_its_headers_came() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}", l.local_addr().unwrap())
            .parse()
            .unwrap();
        // A watch: headers at once, then an event every 200 ms, the last one well past the
        // header timeout.
        tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await.unwrap();
            tcp.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            for i in 0..4 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let event = format!("event{i}\n");
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                tcp.write_all(chunk.as_bytes()).await.unwrap();
            }
            tcp.write_all(b"0\r\n\r\n").await.unwrap();
        });
        let timeouts = Timeouts {
            response_headers: Duration::from_millis(300),
            ..PATIENT
        };
        let (code, body) = get_through(&base, timeouts, &valid_metadata()).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body, "event0\nevent1\nevent2\nevent3\n");
    }
}
