//! Tunnel latency (GET of one ConfigMap at concurrency 1, 16, 128 over `grpc` and `wss`) and
//! throughput (LIST of about 50 MB, median of five runs taken in turns), each next to the direct
//! path in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::servers::{Ctx, Kas, KasOptions, agentk_args};
use crate::util::{HttpsClient, Proc, get, git_init_commit, https_client, spawn};

/// (concurrency, requests)
const LATENCY_RUNS: [(usize, usize); 3] = [(1, 400), (16, 3200), (128, 6400)];

/// p50 and p99 of `n` GETs at `concurrency`, in milliseconds.
pub async fn latency(
    c: &HttpsClient,
    url: &str,
    auth: &str,
    concurrency: usize,
    n: usize,
) -> Result<(f64, f64)> {
    // Warm the connection pool first so both paths are measured with open connections.
    for _ in 0..concurrency.min(32) {
        get(c, url, auth).await?;
    }
    let per = n / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (c, url, auth) = (c.clone(), url.to_string(), auth.to_string());
            tokio::spawn(async move {
                let mut v = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    get(&c, &url, &auth).await?;
                    v.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Ok::<_, anyhow::Error>(v)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

/// LIST runs of each path, taken in turns (direct, kas, direct, …) so that a slow moment of the
/// shared machine hits both: the seconds of each run and the body sizes.
pub const LIST_RUNS: usize = 5;

async fn lists(
    c: &HttpsClient,
    (direct, direct_auth): (&str, &str),
    (kas, kas_auth): (&str, &str),
) -> Result<(Vec<f64>, Vec<f64>, usize, usize)> {
    let (mut d, mut k, mut size, mut ksize) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..LIST_RUNS {
        let t = Instant::now();
        size = get(c, direct, direct_auth).await?;
        d.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        ksize = get(c, kas, kas_auth).await?;
        k.push(t.elapsed().as_secs_f64());
    }
    Ok((d, k, size, ksize))
}

/// The median of `v` (not empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A CI job ID token signed by a key kas trusts (written to `ctx.jwks`).
pub fn ci_job_token(ctx: &Ctx) -> Result<String> {
    let key_pair = rcgen::KeyPair::generate()?;
    let encoding = EncodingKey::from_ec_der(&key_pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)?;
    jwk.common.key_id = Some("bench".into());
    std::fs::write(&ctx.jwks, json!({"keys": [jwk]}).to_string())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    Ok(jsonwebtoken::encode(
        &header,
        &json!({"iss": "https://bench.local", "aud": "kas", "iat": now, "exp": now + 14_400,
                "project_path": "bench/app", "project_id": "1", "job_id": "1", "pipeline_id": "1",
                "namespace_path": "bench"}),
        &encoding,
    )?)
}

/// Runs both transports; returns `{"latency": [...], "throughput": {...}}`.
pub async fn run(ctx: &Ctx) -> Result<Value> {
    let ns = &ctx.ns;
    let jwt = ci_job_token(ctx)?;
    let repo = ci_access_repo(ctx, "config")?;

    // Trust both the cluster's CA (direct path) and the CA of kas's proxy certificate.
    let mut ca_pem = std::fs::read(&ctx.pki.ca_cert)?;
    ca_pem.extend(std::fs::read(&ctx.env.ca_file)?);
    let http = https_client(&ca_pem)?;
    let direct_auth = format!("Bearer {}", ctx.sa_token);
    let direct = |path: &str| format!("{}{path}", ctx.env.server);

    let mut rows = Vec::new();
    let mut throughput = Value::Null;
    for transport in ["grpc", "wss"] {
        let (kas, agent, id) = start_pair(ctx, transport, &repo).await?;
        let kas_auth = format!("Bearer ci:{id}:{jwt}");
        let via = |path: &str| format!("https://localhost:{}{path}", kas.k8s_port);
        let one = format!("/api/v1/namespaces/{ns}/configmaps/one");
        for (c, n) in LATENCY_RUNS {
            let (dp50, dp99) = latency(&http, &direct(&one), &direct_auth, c, n).await?;
            let (kp50, kp99) = latency(&http, &via(&one), &kas_auth, c, n).await?;
            eprintln!(
                "bench: latency {transport} c={c}: direct {dp50:.2}/{dp99:.2} ms, kas {kp50:.2}/{kp99:.2} ms"
            );
            rows.push(json!({"transport": transport, "concurrency": c, "requests": n,
                "direct_p50_ms": dp50, "direct_p99_ms": dp99, "kas_p50_ms": kp50, "kas_p99_ms": kp99}));
        }
        if throughput.is_null() {
            create_big_configmaps(ctx)?;
            let path = format!("/api/v1/namespaces/{ns}/configmaps");
            let (d, k) = (
                (direct(&path), &direct_auth[..]),
                (via(&path), &kas_auth[..]),
            );
            let (druns, kruns, size, ksize) = lists(&http, (&d.0, d.1), (&k.0, k.1)).await?;
            let (dt, kt) = (median(&druns), median(&kruns));
            eprintln!(
                "bench: LIST {:.1} MB, median of {LIST_RUNS}: direct {dt:.2} s, kas {kt:.2} s",
                size as f64 / 1e6
            );
            throughput = json!({"transport": transport, "bytes": size, "direct_seconds": dt,
                "kas_bytes": ksize, "kas_seconds": kt, "direct_runs": druns, "kas_runs": kruns});
        }
        // Let the agent's connections close before the next kas starts.
        drop(agent);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(json!({"latency": rows, "throughput": throughput}))
}

/// An agent configuration project in `ctx.work/name`: CI jobs of `bench/app` may use the agent.
pub fn ci_access_repo(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    let repo = ctx.work.join(name);
    std::fs::create_dir_all(repo.join(".gitlab/agents/bench"))?;
    std::fs::write(
        repo.join(".gitlab/agents/bench/config.yaml"),
        "ci_access:\n  projects:\n  - id: bench/app\n",
    )?;
    git_init_commit(&repo, "bench")?;
    Ok(repo)
}

/// A kas whose agent listener speaks `transport` and an agentk connected to it (configured);
/// returns them and the agent's id.
async fn start_pair(ctx: &Ctx, transport: &str, repo: &Path) -> Result<(Kas, Proc, i64)> {
    let kas = Kas::start(
        ctx,
        &format!("kas-{transport}"),
        &KasOptions {
            agent_tls: transport == "wss",
            git_poll: "1s",
            log_level: "warn",
        },
    )
    .await?;
    kas.add_project("bench/config", repo, None).await?;
    let (id, token_path) = kas.register("bench/config", "bench").await?;
    let address = if transport == "wss" {
        format!("wss://localhost:{}", kas.agent_port)
    } else {
        format!("grpc://127.0.0.1:{}", kas.agent_port)
    };
    let ca = ctx.pki.ca_cert.display().to_string();
    let mut extra = vec!["--log-level", "warn", "--tunnel-min-idle", "16"];
    if transport == "wss" {
        extra.extend(["--ca-cert-file", &ca]);
    }
    let args = agentk_args(ctx, &address, &token_path, &extra)?;
    let agent = spawn(&ctx.agentk_bin, &args, &kas.dir.join("agentk.log"))?;
    kas.wait_configured(id).await?;
    Ok((kas, agent, id))
}

/// About 50 MB to LIST: 5,000 ConfigMaps of 10 KB.
fn create_big_configmaps(ctx: &Ctx) -> Result<()> {
    let big = "x".repeat(10_000);
    for chunk in 0..10 {
        let items: Vec<_> = (0..500)
            .map(|i| json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("big-{}", chunk * 500 + i), "namespace": ctx.ns}, "data": {"v": big}}))
            .collect();
        ctx.env
            .apply_yaml(&json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string())?;
    }
    Ok(())
}
