//! Valid proxied requests alone and during a flood of bad credentials.
//!
//! One kas (grpc agent, CI job through the Kubernetes API proxy, as in the tunnel section). The
//! valid client sends sequential GETs of one ConfigMap from 127.0.0.1: first alone, then while
//! six flooders on 127.0.0.2 send bad credentials as fast as they can: three send CI job tokens
//! with a forged signature to the proxy (each costs kas an ES256 verification unless refused
//! first), three send wrong agent tokens of the right shape to the agent listener (each a store
//! look-up). The median of the valid requests during the flood over the median alone is the
//! number to read; it is measured twice in the same run, with kas's default `rate_limits` and
//! with limits so high they never act (kas without rate limiting).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tether_protocol::metadata;
use tether_protocol::tunnel::reverse_tunnel_client::ReverseTunnelClient;

use crate::servers::{Ctx, Kas, KasOptions, agentk_args};
use crate::tunnel::{ci_access_repo, ci_job_token};
use crate::util::{HttpsClient, get, https_client, spawn};

/// Valid requests measured per phase.
const REQUESTS: usize = 400;
/// Flooders per target (proxy, agent listener).
const WAYS_EACH: usize = 3;
/// The valid client measures for at least this long during the flood: past the flood's first
/// burst, into its steady state.
const FLOOD_TIME: Duration = Duration::from_secs(3);
const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Limits no flood reaches: kas as it was before rate limiting.
const NO_LIMITS: &str = "rate_limits:\n  failed_auth_per_address: {per_minute: 100000000, burst: 100000000}\n  failed_auth_per_credential: {per_minute: 100000000, burst: 100000000}\n";

/// Median of sequential GETs (at least `REQUESTS`, for at least `min_time`), in milliseconds.
async fn median(c: &HttpsClient, url: &str, auth: &str, min_time: Duration) -> Result<f64> {
    let mut v = Vec::with_capacity(REQUESTS);
    let started = Instant::now();
    while v.len() < REQUESTS || started.elapsed() < min_time {
        let t = Instant::now();
        get(c, url, auth).await?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// CI job tokens for the right issuer and key id but signed by another key.
fn forged_tokens(n: usize) -> Result<Vec<String>> {
    let pair = rcgen::KeyPair::generate()?;
    let key = EncodingKey::from_ec_der(&pair.serialize_der());
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    (0..n)
        .map(|i| {
            let claims = json!({"iss": "https://bench.local", "aud": "kas", "iat": now,
                "exp": now + 3600, "project_path": "bench/app", "project_id": "1",
                "job_id": i.to_string(), "pipeline_id": "1", "namespace_path": "bench"});
            Ok(jsonwebtoken::encode(&header, &claims, &key)?)
        })
        .collect()
}

/// What the flooders got.
#[derive(Debug, Default)]
struct FloodCounts {
    refused: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
}

impl FloodCounts {
    fn total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
            + self.limited.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }

    fn count(&self, refused: bool, limited: bool) {
        let c = match (refused, limited) {
            (true, _) => &self.refused,
            (_, true) => &self.limited,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// An HTTPS client whose connections come from [`FLOODER`].
fn flooder_https(ca_pem: &[u8]) -> Result<HttpsClient> {
    let tls = crate::util::tls_trusting(ca_pem)?;
    let mut http = HttpConnector::new();
    http.set_local_address(Some(FLOODER));
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Forged CI tokens at the proxy until `stop`.
async fn flood_proxy(c: HttpsClient, url: String, tokens: Arc<Vec<String>>, s: Arc<Stop>) {
    let mut i = 0;
    while !s.stop.load(Ordering::Relaxed) {
        let auth = format!("Bearer {}", tokens[i % tokens.len()]);
        i += 1;
        let Ok(req) = http::Request::get(&url)
            .header(http::header::AUTHORIZATION, auth)
            .body(Empty::<Bytes>::new())
        else {
            return;
        };
        match c.request(req).await {
            Ok(resp) => {
                let code = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                s.counts.count(code == 401, code == 429);
            }
            Err(_) => s.counts.count(false, false),
        }
    }
}

/// Wrong agent tokens at the agent listener until `stop`.
async fn flood_agent(channel: tonic::transport::Channel, tokens: Arc<Vec<String>>, s: Arc<Stop>) {
    let mut i = 0;
    while !s.stop.load(Ordering::Relaxed) {
        let mut client = ReverseTunnelClient::new(channel.clone());
        let mut req = tonic::Request::new(futures_util::stream::pending());
        if let Ok(v) = metadata::bearer(&tokens[i % tokens.len()]) {
            req.metadata_mut().insert(metadata::AUTHORIZATION, v);
        }
        i += 1;
        let code = client.connect(req).await.err().map(|e| e.code());
        s.counts.count(
            code == Some(tonic::Code::Unauthenticated),
            code == Some(tonic::Code::ResourceExhausted),
        );
    }
}

struct Stop {
    stop: AtomicBool,
    counts: FloodCounts,
}

/// Where the flood goes and with what.
struct Target {
    proxy_url: String,
    agent_port: u16,
    ca_pem: Vec<u8>,
    forged: Arc<Vec<String>>,
    wrong_agent_tokens: Arc<Vec<String>>,
}

/// Runs the six flooders on their own threads and runtime (as if on another machine: the
/// valid client's runtime is not the one kept busy), until `stop` is set.
fn spawn_flood(t: Target, stop: Arc<Stop>) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            for task in start_flood(&t, &stop).await? {
                task.await?;
            }
            Ok(())
        })
    })
}

/// Starts the six flooders; they run until `stop` is set.
async fn start_flood(t: &Target, stop: &Arc<Stop>) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let https = flooder_https(&t.ca_pem)?;
    let mut agent_conn = HttpConnector::new();
    agent_conn.set_local_address(Some(FLOODER));
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", t.agent_port))?
            .connect_with_connector(agent_conn)
            .await?;
    let mut tasks = Vec::new();
    for _ in 0..WAYS_EACH {
        let (c, url, f) = (https.clone(), t.proxy_url.clone(), Arc::clone(&t.forged));
        tasks.push(tokio::spawn(flood_proxy(c, url, f, Arc::clone(stop))));
        let (ch, w) = (channel.clone(), Arc::clone(&t.wrong_agent_tokens));
        tasks.push(tokio::spawn(flood_agent(ch, w, Arc::clone(stop))));
    }
    Ok(tasks)
}

/// Median alone, median during the flood, and what the flood got.
async fn measure(http: &HttpsClient, url: &str, auth: &str, t: Target) -> Result<Value> {
    // Warm: connections open, the CI token verified and remembered.
    for _ in 0..20 {
        get(http, url, auth).await?;
    }
    let alone = median(http, url, auth, Duration::ZERO).await?;
    let stop = Arc::new(Stop {
        stop: AtomicBool::new(false),
        counts: FloodCounts::default(),
    });
    let flood = spawn_flood(t, Arc::clone(&stop));
    // The flood under way before measuring, so no valid request runs before it starts.
    while stop.counts.total() < 100 && !flood.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let during = median(http, url, auth, FLOOD_TIME).await;
    stop.stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    flood
        .join()
        .map_err(|_| anyhow::anyhow!("a flooder panicked"))??;
    let during = during?;
    let c = &stop.counts;
    let (refused, limited, other) = (
        c.refused.load(Ordering::Relaxed),
        c.limited.load(Ordering::Relaxed),
        c.other.load(Ordering::Relaxed),
    );
    eprintln!(
        "bench: flood: alone {alone:.2} ms, during {during:.2} ms over {seconds:.1} s; flood refused {refused}, limited {limited}, other {other}"
    );
    Ok(
        json!({"alone_p50_ms": alone, "flood_p50_ms": during, "ratio": during / alone,
        "flood_seconds": seconds, "flood_refused": refused, "flood_limited": limited,
        "flood_other": other}),
    )
}

/// Runs the flood with kas's default limits and with none; `{"limited": {...}, "unlimited": {...}}`.
pub async fn run(ctx: &Ctx) -> Result<Value> {
    let jwt = ci_job_token(ctx)?;
    let repo = ci_access_repo(ctx, "flood-config")?;
    let ca_pem = std::fs::read(&ctx.pki.ca_cert)?;
    let http = https_client(&ca_pem)?;
    let forged = Arc::new(forged_tokens(64)?);
    let mut out = json!({});
    for (name, yaml) in [("limited", ""), ("unlimited", NO_LIMITS)] {
        let o = KasOptions {
            agent_tls: false,
            git_poll: "1s",
            log_level: "warn",
        };
        let kas = Kas::start_with_yaml(ctx, &format!("kas-flood-{name}"), &o, yaml).await?;
        kas.add_project("bench/config", &repo, None).await?;
        let (id, token_path) = kas.register("bench/config", "bench").await?;
        let address = format!("grpc://127.0.0.1:{}", kas.agent_port);
        let args = agentk_args(ctx, &address, &token_path, &["--log-level", "warn"])?;
        let _agent = spawn(&ctx.agentk_bin, &args, &kas.dir.join("agentk.log"))?;
        kas.wait_configured(id).await?;
        let token = std::fs::read_to_string(&token_path)?;
        let stem = &token.trim()[..token.trim().len() - 8];
        let target = Target {
            proxy_url: format!("https://localhost:{}/version", kas.k8s_port),
            agent_port: kas.agent_port,
            ca_pem: ca_pem.clone(),
            forged: Arc::clone(&forged),
            wrong_agent_tokens: Arc::new((0..64).map(|i| format!("{stem}{i:08}")).collect()),
        };
        let url = format!(
            "https://localhost:{}/api/v1/namespaces/{}/configmaps/one",
            kas.k8s_port, ctx.ns
        );
        out[name] = measure(&http, &url, &format!("Bearer ci:{id}:{jwt}"), target).await?;
    }
    Ok(out)
}

/// Target: valid requests during the flood at most this many times slower than alone.
pub const FLOOD_RATIO: f64 = 2.0;

/// The section's table.
pub fn table(out: &mut String, c: &Value) {
    use std::fmt::Write as _;
    out.push_str("Median of sequential valid GETs of one ConfigMap through kas (CI job token, `grpc` tunnel) from 127.0.0.1: 400 alone, then at least 400 and for at least 3 s while six flooders on 127.0.0.2 (their own threads and runtime) send bad credentials as fast as kas answers them (three: CI job tokens with a forged ES256 signature to the proxy; three: wrong agent tokens of the right shape to the agent listener). With kas's default `rate_limits` (rate-limited answers held 1 s), and with limits so high they never act (kas before rate limiting). Each flooder waits for its answer, like the flood that found the problem; a flood over many more connections is bounded by the listeners' connection caps instead.\n\n");
    out.push_str("| limits | alone p50 ms | during flood p50 ms | **ratio** | flood requests | refused (401 / UNAUTHENTICATED) | rate-limited (429 / RESOURCE_EXHAUSTED) |\n|---|---|---|---|---|---|---|\n");
    for (name, label) in [("limited", "default"), ("unlimited", "none")] {
        let r = &c["flood"][name];
        if r.is_null() {
            continue;
        }
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {label} | {:.2} | {:.2} | **{:.2}×** | {} | {} | {} |",
            r["alone_p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["flood_p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["ratio"].as_f64().unwrap_or(f64::NAN),
            n("flood_refused") + n("flood_limited") + n("flood_other"),
            n("flood_refused"),
            n("flood_limited"),
        );
    }
    out.push('\n');
}

/// The ratio with kas's default limits, for the targets.
pub fn ratio(c: &Value) -> Option<f64> {
    c["flood"]["limited"]["ratio"].as_f64()
}
