//! `tether-bench`: what the tunnel costs, measured against the direct path in the same run on
//! the same machine (absolute times on a shared 2-core machine are noise; ratios are not).
//!
//! Run it through `scripts/bench`, which builds release binaries and gives it a real control
//! plane. It prints Markdown tables for docs/BENCHMARKS.md.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tether_testenv::{TestEnv, run_output};

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn client(ca_pem: &[u8]) -> Result<HttpsClient> {
    let mut roots = rustls::RootCertStore::empty();
    for c in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
        ca_pem,
    ) {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(https))
}

async fn get(c: &HttpsClient, url: &str, auth: &str) -> Result<usize> {
    let req = http::Request::get(url)
        .header(http::header::AUTHORIZATION, auth)
        .body(Empty::new())?;
    let resp = c.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body.len())
}

/// p50 and p99 of `n` GETs at `concurrency`, in milliseconds.
async fn latency(
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

/// Seconds to LIST (best of 3) and the body size.
async fn list(c: &HttpsClient, url: &str, auth: &str) -> Result<(f64, usize)> {
    let mut best = f64::MAX;
    let mut size = 0;
    for _ in 0..3 {
        let t = Instant::now();
        size = get(c, url, auth).await?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, size))
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    let child = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc(child))
}

async fn wait_until<F, Fut>(what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !probe().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    run_output(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@example.com",
            ])
            .args(args),
    )?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env =
        TestEnv::from_env().context("run me through scripts/bench (it starts a control plane)")?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .to_path_buf();
    let (kas_bin, agentk_bin) = (bin_dir.join("kas"), bin_dir.join("agentk"));
    let work = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    // An agent and a benchmark client, both with cluster-admin through their ServiceAccounts.
    let ns = env.create_namespace("bench")?;
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: bench\n  namespace: {ns}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {ns}-bench\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\n\
subjects:\n- kind: ServiceAccount\n  name: bench\n  namespace: {ns}\n---\n\
apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: one\n  namespace: {ns}\ndata:\n  k: v\n"
    ))?;
    let sa_token = String::from_utf8(run_output(env.kubectl().args([
        "create",
        "token",
        "bench",
        "-n",
        &ns,
        "--duration=4h",
    ]))?)?
    .trim()
    .to_string();
    let agent_kubeconfig = work.join("agent.kubeconfig");
    std::fs::write(&agent_kubeconfig, env.token_kubeconfig(&sa_token))?;

    // kas's proxy gets a certificate from the same throwaway PKI kind as the cluster.
    let pki = tether_testenv::pki::generate(&work.join("pki"))?;
    let key_pair = rcgen::KeyPair::generate()?;
    let encoding = EncodingKey::from_ec_der(&key_pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)?;
    jwk.common.key_id = Some("bench".into());
    std::fs::write(work.join("jwks.json"), json!({"keys": [jwk]}).to_string())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    let jwt = jsonwebtoken::encode(
        &header,
        &json!({"iss": "https://bench.local", "aud": "kas", "iat": now, "exp": now + 14_400,
                "project_path": "bench/app", "project_id": "1", "job_id": "1", "pipeline_id": "1",
                "namespace_path": "bench"}),
        &encoding,
    )?;

    let repo = work.join("config");
    std::fs::create_dir_all(repo.join(".gitlab/agents/bench"))?;
    std::fs::write(
        repo.join(".gitlab/agents/bench/config.yaml"),
        "ci_access:\n  projects:\n  - id: bench/app\n",
    )?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-qm", "bench"])?;

    // Trust both the cluster's CA (direct path) and the CA of kas's proxy certificate.
    let mut ca_pem = std::fs::read(&pki.ca_cert)?;
    ca_pem.extend(std::fs::read(&env.ca_file)?);
    let http = client(&ca_pem)?;
    let direct_auth = format!("Bearer {sa_token}");
    let direct = |path: &str| format!("{}{path}", env.server);

    let mut report = String::new();
    report.push_str("### Tunnel latency (GET one ConfigMap), ms\n\n| transport | concurrency | direct p50 | direct p99 | kas p50 | kas p99 | overhead p50 | ratio p50 |\n|---|---|---|---|---|---|---|---|\n");
    let mut throughput_done = false;
    let mut throughput = String::new();

    for transport in ["grpc", "wss"] {
        let (agent_port, api_port, k8s_port, obs_port) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let tls = if transport == "wss" {
            format!(
                "    certificate_file: {}\n    key_file: {}\n",
                pki.serving_cert.display(),
                pki.serving_key.display()
            )
        } else {
            String::new()
        };
        let dir = work.join(format!("kas-{transport}"));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("kas.yaml");
        std::fs::write(
            &cfg,
            format!(
                concat!(
                    "data_dir: {data}\n",
                    "agent:\n  listen:\n    address: 127.0.0.1:{agent_port}\n{tls}",
                    "api:\n  listen:\n    address: 127.0.0.1:{api_port}\n",
                    "git:\n  poll_interval: 1s\n",
                    "kubernetes_api:\n  listen:\n    address: 127.0.0.1:{k8s_port}\n",
                    "    certificate_file: {cert}\n    key_file: {key}\n",
                    "  ci_issuers:\n  - issuer: https://bench.local\n    audience: kas\n",
                    "    jwks:\n      file: {jwks}\n",
                    "observability:\n  listen:\n    address: 127.0.0.1:{obs_port}\n",
                    "  logging:\n    level: warn\n",
                ),
                agent_port = agent_port,
                tls = tls,
                api_port = api_port,
                k8s_port = k8s_port,
                obs_port = obs_port,
                data = dir.join("data").display(),
                cert = pki.serving_cert.display(),
                key = pki.serving_key.display(),
                jwks = work.join("jwks.json").display(),
            ),
        )?;
        let _kas = spawn(
            &kas_bin,
            &["--configuration-file".into(), cfg.display().to_string()],
            &dir.join("kas.log"),
        )?;
        let api = format!("http://127.0.0.1:{api_port}");
        let token_file = dir.join("data/admin-token");
        let deadline = Instant::now() + Duration::from_secs(60);
        let admin = loop {
            if let Ok(c) = kas::admin::AdminClient::from_token_file(&api, &token_file)
                && c.stats().await.is_ok()
            {
                break c;
            }
            if Instant::now() > deadline {
                bail!("kas did not start; see {}", dir.join("kas.log").display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        admin
            .set_project(&kas::api::ProjectRequest {
                path: "bench/config".into(),
                remote: Some(repo.display().to_string()),
                ..Default::default()
            })
            .await?;
        let t = admin.register_agent("bench/config", "bench").await?;
        let token_path = dir.join("agent.token");
        std::fs::write(&token_path, &t.token)?;
        let address = if transport == "wss" {
            format!("wss://localhost:{agent_port}")
        } else {
            format!("grpc://127.0.0.1:{agent_port}")
        };
        let mut args = vec![
            "--kas-address".to_string(),
            address,
            "--token-file".into(),
            token_path.display().to_string(),
            "--kubeconfig".into(),
            agent_kubeconfig.display().to_string(),
            "--observability-listen-address".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--log-level".into(),
            "warn".into(),
            "--tunnel-min-idle".into(),
            "16".into(),
        ];
        if transport == "wss" {
            args.extend(["--ca-cert-file".into(), pki.ca_cert.display().to_string()]);
        }
        let _agent = spawn(&agentk_bin, &args, &dir.join("agentk.log"))?;
        let id = t.agent_id;
        wait_until("the agent's configuration", || {
            let admin = admin.clone();
            async move {
                admin
                    .list_agents()
                    .await
                    .ok()
                    .and_then(|v| v.into_iter().find(|a| a.id == id))
                    .is_some_and(|a| a.connected && a.config.is_some_and(|c| !c.commit.is_empty()))
            }
        })
        .await?;
        let kas_auth = format!("Bearer ci:{id}:{jwt}");
        let via = |path: &str| format!("https://localhost:{k8s_port}{path}");
        let one = format!("/api/v1/namespaces/{ns}/configmaps/one");
        for (c, n) in [(1usize, 400usize), (16, 3200), (128, 6400)] {
            let (dp50, dp99) = latency(&http, &direct(&one), &direct_auth, c, n).await?;
            let (kp50, kp99) = latency(&http, &via(&one), &kas_auth, c, n).await?;
            report.push_str(&format!(
                "| {transport} | {c} | {dp50:.2} | {dp99:.2} | {kp50:.2} | {kp99:.2} | {:.2} | {:.2} |\n",
                kp50 - dp50,
                kp50 / dp50
            ));
            eprintln!(
                "latency {transport} c={c}: direct {dp50:.2}/{dp99:.2} ms, kas {kp50:.2}/{kp99:.2} ms"
            );
        }
        if !throughput_done {
            // About 50 MB: 5,000 ConfigMaps of 10 KB.
            let big = "x".repeat(10_000);
            for chunk in 0..10 {
                let items: Vec<_> = (0..500)
                    .map(|i| json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": format!("big-{}", chunk * 500 + i), "namespace": ns}, "data": {"v": big}}))
                    .collect();
                env.apply_yaml(
                    &json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
                )?;
            }
            let path = format!("/api/v1/namespaces/{ns}/configmaps");
            let (dt, size) = list(&http, &direct(&path), &direct_auth).await?;
            let (kt, ksize) = list(&http, &via(&path), &kas_auth).await?;
            let (dmb, kmb) = (size as f64 / dt / 1e6, ksize as f64 / kt / 1e6);
            throughput = format!(
                "### Tunnel throughput (LIST of {:.1} MB, best of 3)\n\n| path | seconds | MB/s |\n|---|---|---|\n| direct | {dt:.2} | {dmb:.1} |\n| through kas + agentk ({transport}) | {kt:.2} | {kmb:.1} |\n\nThroughput ratio: {:.0} % of direct.\n",
                size as f64 / 1e6,
                100.0 * kmb / dmb
            );
            eprintln!("{throughput}");
            throughput_done = true;
        }
    }
    println!("{report}\n{throughput}");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
