//! `tether-bench`: what kas and agentk cost, measured against the direct path (tunnel) and
//! against kubectl, the peers' engines and a bare-client floor (GitOps) in the same run on the same machine (absolute times on a shared
//! 2-core machine are noise; ratios are not).
//!
//! `scripts/bench` runs everything and writes `target/bench/report.md`:
//!
//! ```text
//! tether-bench [--out FILE] [--only tunnel|gitops|gitops-agentk|flood|routed]
//!                                        under `testenv run`: tunnel latency and throughput,
//!                                        GitOps sync vs kubectl, write requests, agentk's
//!                                        footprint, valid requests during a flood of bad
//!                                        credentials; results as JSON in FILE
//!                                        (default target/bench/cluster.json)
//! tether-bench report --cluster FILE [--loadgen FILE]... [--elapsed SECONDS] [--out FILE]
//!                                        the Markdown report from those results and the
//!                                        output of `loadgen` runs (last line JSON)
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tether_testenv::{TestEnv, run_output};

mod agent_log;
mod apimetrics;
mod flood;
mod floor;
mod footprint;
mod gitops;
mod kubectl;
mod peers;
mod report;
mod report_peers;
mod routed;
mod servers;
mod tunnel;
mod util;
mod watch;

use servers::Ctx;

const USAGE: &str = "usage: tether-bench [--out FILE] [--only tunnel|gitops|gitops-agentk|flood|routed]\n       tether-bench report --cluster FILE [--loadgen FILE]... [--elapsed SECONDS] [--out FILE]";

fn bin_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("the folder of tether-bench")?
        .to_path_buf())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let mut out = None;
    let mut cluster = None;
    let mut loadgen = Vec::new();
    let mut elapsed = None;
    let mut only = None;
    let report = args.first().is_some_and(|a| a == "report");
    if report {
        it.next();
    }
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--cluster" if report => cluster = Some(PathBuf::from(value()?)),
            "--loadgen" if report => loadgen.push(PathBuf::from(value()?)),
            "--only" if !report => only = Some(value()?.clone()),
            "--elapsed" if report => elapsed = Some(value()?.parse::<f64>()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if report {
        let cluster = cluster.context(USAGE)?;
        write_report(&cluster, &loadgen, elapsed, out.as_deref())
    } else {
        let out = out.unwrap_or_else(|| PathBuf::from("target/bench/cluster.json"));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(&out, only.as_deref()))
    }
}

fn write_report(
    cluster: &std::path::Path,
    loadgen: &[PathBuf],
    elapsed: Option<f64>,
    out: Option<&std::path::Path>,
) -> Result<()> {
    let c: Value = serde_json::from_str(
        &std::fs::read_to_string(cluster)
            .with_context(|| format!("reading {}", cluster.display()))?,
    )?;
    let mut runs = Vec::new();
    for f in loadgen {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("{} is empty", f.display()))?;
        runs.push(
            serde_json::from_str::<Value>(last)
                .with_context(|| format!("the last line of {} is not JSON", f.display()))?,
        );
    }
    let mut h = report::Header::collect(&bin_dir()?.join("kas"));
    h.elapsed_seconds = elapsed;
    let text = report::render(&h, &c, &runs);
    if let Some(out) = out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    print!("{text}");
    Ok(())
}

/// Client and server versions from `kubectl version -o json`.
fn kubectl_versions(env: &TestEnv) -> Result<Value> {
    let v: Value =
        serde_json::from_slice(&run_output(env.kubectl().args(["version", "-o", "json"]))?)?;
    Ok(json!({
        "kubectl": v["clientVersion"]["gitVersion"],
        "server": v["serverVersion"]["gitVersion"],
    }))
}

async fn run(out: &std::path::Path, only: Option<&str>) -> Result<()> {
    if let Some(o) = only
        && !["tunnel", "gitops", "gitops-agentk", "flood", "routed"].contains(&o)
    {
        bail!("--only takes tunnel, gitops, gitops-agentk, flood or routed\n{USAGE}");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let started = Instant::now();
    let env =
        TestEnv::from_env().context("run me through scripts/bench (it starts a control plane)")?;
    let work = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let ctx = prepare(env, &work)?;

    let versions = kubectl_versions(&ctx.env)?;
    let wanted = |section: &str| only.is_none_or(|o| o == section);
    let tunnel = if wanted("tunnel") {
        tunnel::run(&ctx).await?
    } else {
        Value::Null
    };
    let gitops = if wanted("gitops") {
        gitops::run(&ctx, true).await?
    } else if only == Some("gitops-agentk") {
        gitops::run(&ctx, false).await?
    } else {
        Value::Null
    };
    let flood = if wanted("flood") {
        flood::run(&ctx).await?
    } else {
        Value::Null
    };
    let routed = if wanted("routed") {
        routed::run(&ctx).await?
    } else {
        Value::Null
    };
    let results = json!({
        "versions": versions,
        "tunnel": tunnel,
        "gitops": gitops,
        "flood": flood,
        "routed": routed,
        "seconds": started.elapsed().as_secs_f64(),
    });
    write_results(out, &results)?;
    eprintln!(
        "bench: results in {} ({:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    // Keep the GitOps section's logs (agentk's show where sync time goes); drop the rest.
    if let Some(dir) = out.parent()
        && !gitops.is_null()
    {
        keep_logs(&work.join("kas-gitops"), &dir.join("logs"))?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The run's shared setup: an agent identity with cluster-admin (every agentk of the run uses
/// it; the tunnel's direct path too), a ConfigMap to GET, a PKI, and where things live.
fn prepare(env: TestEnv, work: &std::path::Path) -> Result<Ctx> {
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
    let bin_dir = bin_dir()?;
    Ok(Ctx {
        pki: tether_testenv::pki::generate(&work.join("pki"))?,
        env,
        kas_bin: bin_dir.join("kas"),
        agentk_bin: bin_dir.join("agentk"),
        jwks: work.join("jwks.json"),
        work: work.to_path_buf(),
        agent_kubeconfig,
        sa_token,
        ns,
    })
}

fn write_results(out: &std::path::Path, results: &Value) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, format!("{results:#}\n"))
        .with_context(|| format!("writing {}", out.display()))
}

/// Copies the `*.log` files of `from` into `to`.
fn keep_logs(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log")
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, to.join(name))?;
        }
    }
    Ok(())
}
