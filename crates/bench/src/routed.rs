//! Routing between kas replicas: GET of one ConfigMap through the replica holding the agent's
//! tunnels and, in the same run, through a second replica that carries it there over the
//! private peers listener (PostgreSQL and Redis shared, as in production).

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tether_testenv::postgres::Postgres;
use tether_testenv::redis::Redis;

use crate::servers::{Ctx, Kas, KasOptions, agentk_args};
use crate::tunnel::{ci_access_repo, ci_job_token, latency};
use crate::util::{free_port, https_client, spawn};

/// (concurrency, requests)
const RUNS: [(usize, usize); 2] = [(1, 400), (16, 3200)];

/// The extra p50 latency a hop between replicas may add at concurrency 1, in milliseconds.
pub const HOP_P50_MS: f64 = 0.3;

/// Runs the comparison; returns `{"runs": [...]}`.
pub async fn run(ctx: &Ctx) -> Result<Value> {
    // Written before kas starts: kas reads the JWKS file when it starts.
    let jwt = ci_job_token(ctx)?;
    let pg = Postgres::start().context("starting PostgreSQL")?;
    let database = pg.create_database("kas")?;
    let redis = Redis::start().context("starting Redis")?;
    let secret = ctx.work.join("peer-secret");
    std::fs::write(&secret, "bench-replicas\n")?;
    let yaml = |port: u16| {
        format!(
            "database:\n  url: {database}\nredis:\n  url: {}\n  password_file: {}\npeers:\n  listen: 127.0.0.1:{port}\n  secret_file: {}\n",
            redis.url(),
            redis.password_file().map(|p| p.display().to_string()).unwrap_or_default(),
            secret.display()
        )
    };
    let opts = KasOptions {
        agent_tls: false,
        git_poll: "1s",
        log_level: "warn",
    };
    let holder = Kas::start_with_yaml(ctx, "kas-holder", &opts, &yaml(free_port()?)).await?;
    let other = Kas::start_with_yaml(ctx, "kas-other", &opts, &yaml(free_port()?)).await?;
    let repo = ci_access_repo(ctx, "routed-config")?;
    holder.add_project("bench/config", &repo, None).await?;
    let (id, token) = holder.register("bench/config", "bench").await?;
    let address = format!("grpc://127.0.0.1:{}", holder.agent_port);
    let extra = ["--log-level", "warn", "--tunnel-min-idle", "16"];
    let args = agentk_args(ctx, &address, &token, &extra)?;
    let _agent = spawn(&ctx.agentk_bin, &args, &holder.dir.join("agentk.log"))?;
    holder.wait_configured(id).await?;

    let http = https_client(&std::fs::read(&ctx.pki.ca_cert)?)?;
    let auth = format!("Bearer ci:{id}:{jwt}");
    let path = format!("/api/v1/namespaces/{}/configmaps/one", ctx.ns);
    let via = |kas: &Kas| format!("https://localhost:{}{path}", kas.k8s_port);
    let mut rows = Vec::new();
    for (c, n) in RUNS {
        let (lp50, lp99) = latency(&http, &via(&holder), &auth, c, n).await?;
        let (rp50, rp99) = latency(&http, &via(&other), &auth, c, n).await?;
        eprintln!(
            "bench: routed c={c}: holder {lp50:.2}/{lp99:.2} ms, through a second replica {rp50:.2}/{rp99:.2} ms"
        );
        rows.push(json!({"concurrency": c, "requests": n,
            "local_p50_ms": lp50, "local_p99_ms": lp99, "routed_p50_ms": rp50, "routed_p99_ms": rp99}));
    }
    Ok(json!({"runs": rows}))
}

/// The extra p50 of the hop at concurrency 1, for the targets.
pub fn hop_p50(c: &Value) -> Option<f64> {
    let run = c["routed"]["runs"]
        .as_array()?
        .iter()
        .find(|r| r["concurrency"] == 1)?;
    Some(run["routed_p50_ms"].as_f64()? - run["local_p50_ms"].as_f64()?)
}

/// The report's table.
pub fn table(out: &mut String, c: &Value) {
    use std::fmt::Write as _;
    out.push_str("Two kas replicas sharing PostgreSQL and Redis, `peers` configured; agentk (`grpc`, 16 idle tunnel streams) connected to the first. The same GET of one ConfigMap with a CI job token, to the replica holding the agent's tunnels (local) and to the second replica, which authorizes it and carries it over the peers listener (a new TCP connection and a signed preamble per request, then raw bytes) to the first.\n\n");
    out.push_str("| concurrency | requests | local p50 / p99 ms | through a second replica p50 / p99 ms | **extra p50 ms** |\n|---|---|---|---|---|\n");
    for r in c["routed"]["runs"].as_array().into_iter().flatten() {
        let v = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} / {:.2} | {:.2} / {:.2} | **{:.2}** |",
            r["concurrency"],
            r["requests"],
            v("local_p50_ms"),
            v("local_p99_ms"),
            v("routed_p50_ms"),
            v("routed_p99_ms"),
            v("routed_p50_ms") - v("local_p50_ms"),
        );
    }
    out.push('\n');
}
