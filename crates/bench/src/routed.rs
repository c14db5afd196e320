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
            redis
                .password_file()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
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

/// The `loadgen --replicas` runs: agents spread over replicas, Redis while idle, a replica
/// killed.
pub fn replicas_table(out: &mut String, runs: &[Value]) {
    use std::fmt::Write as _;
    if runs.is_empty() {
        out.push_str("`loadgen --replicas`: not measured.\n\n");
        return;
    }
    out.push_str("`loadgen --replicas R`: N fake agents (their own connection, token, idle tunnel stream and configuration stream each) through a TCP balancer that sends each new connection to the next replica that accepts it, over R kas replicas sharing PostgreSQL and Redis (`peers` configured); then one replica is killed with kill -9 and its agents reconnect through the balancer to the others.\n\n");
    out.push_str("| agents | replicas | agents per replica | kas RSS per agent | connect all | Redis commands/s while idle | kas CPU while idle per replica | agents on the killed replica | all back after the kill | per agent p50 / p99 / max |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let list = |k: &str| {
            r[k].as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default()
        };
        let ms = |k: &str| r["failover_ms"][k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} KiB | {:.2} s | {:.1} | {} % | {} | {:.2} s | {:.0} / {:.0} / {:.0} ms |",
            r["agents"],
            r["replicas"],
            list("agents_per_replica"),
            r["kas_bytes_per_agent"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            r["connect_seconds"].as_f64().unwrap_or(f64::NAN),
            r["redis_commands_per_second_idle"]
                .as_f64()
                .unwrap_or(f64::NAN),
            list("kas_cpu_idle_percent"),
            r["killed_replica_agents"],
            r["failover_seconds"].as_f64().unwrap_or(f64::NAN),
            ms("p50"),
            ms("p99"),
            ms("max"),
        );
    }
    out.push('\n');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_report_shows_the_hop_and_the_replicas_runs() {
        let c = json!({"routed": {"runs": [{"concurrency": 1, "requests": 400,
            "local_p50_ms": 1.0, "local_p99_ms": 2.0, "routed_p50_ms": 1.2, "routed_p99_ms": 2.5}]}});
        let replicas = json!({"mode": "replicas", "agents": 300, "replicas": 3,
            "agents_per_replica": [100, 100, 100], "kas_bytes_per_agent": 40960.0,
            "connect_seconds": 1.2, "redis_commands_per_second_idle": 2.6,
            "kas_cpu_idle_percent": [0.2, 0.2, 0.2], "killed_replica_agents": 100,
            "failover_seconds": 0.7, "failover_ms": {"p50": 146.0, "p99": 183.0, "max": 184.0}});
        let r = crate::report::render(&crate::report::Header::default(), &c, &[replicas]);
        assert!(
            r.contains("adds at most 0.3 ms p50 (concurrency 1): **met**: 0.20 ms"),
            "{r}"
        );
        assert!(
            r.contains("| 300 | 3 | 100 / 100 / 100 | 40.0 KiB |"),
            "{r}"
        );
        assert!(r.contains("| 0.70 s | 146 / 183 / 184 ms |"), "{r}");
        // A replicas run is not a single-kas run.
        assert!(r.contains("## 6.") && r.contains("Not measured."), "{r}");
    }
}
