//! `loadgen --replicas R`: N fake agents spread over R kas replicas sharing PostgreSQL and Redis
//! (both started here, as the tests start them), behind TCP balancers (this program with
//! `--balance`, in processes of their own so their open files do not count against loadgen's)
//! that send each new connection to the next replica that accepts it, as a Service does. Measures
//! each replica's memory per connected agent, Redis commands per second while the fleet idles,
//! then kills one replica (kill -9) and times until every agent it held is back on the others.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tether_kas_api::Stats;
use tether_testenv::postgres::Postgres;
use tether_testenv::redis::Redis;
use tether_transport::KasAddress;

use crate::fleet::{Fleet, FleetOptions};
use crate::kas_proc::{Kas, KasSetup};
use crate::{Goal, POLL, Phase, round};

/// What a replicas run needs from the command line.
#[derive(Debug)]
pub struct Options {
    pub n: usize,
    pub replicas: usize,
    pub min_idle: usize,
    pub config_stream: bool,
    pub idle: Duration,
    pub settle: Duration,
    pub timeout: Duration,
    pub log_level: String,
    pub register_concurrency: usize,
    pub kas_bin: PathBuf,
    pub dir: PathBuf,
}

/// The replicas' shared configuration: database, Redis and the peers listener at `peer_port`.
fn shared_yaml(
    database: &str,
    redis: &Redis,
    secret: &std::path::Path,
    peer_port: u16,
) -> Result<String> {
    Ok(format!(
        "database:\n  url: {database}\nredis:\n  url: {}\n  password_file: {}\npeers:\n  listen: 127.0.0.1:{peer_port}\n  secret_file: {}\n",
        redis.url(),
        redis.password_file()?.display(),
        secret.display()
    ))
}

/// Runs the whole measurement; returns the JSON line.
pub async fn run(o: &Options) -> Result<Value> {
    let pg = Postgres::start().context("starting PostgreSQL")?;
    let database = pg.create_database("kas")?;
    let redis = Redis::start().context("starting Redis")?;
    let secret = o.dir.join("peer-secret");
    std::fs::write(&secret, "loadgen-replicas\n")?;
    let (mut setups, mut kases) = (Vec::new(), Vec::new());
    for i in 0..o.replicas {
        let dir = o.dir.join(format!("kas-{i}"));
        // Ports are picked free, then bound by kas a moment later: in between, a connection
        // of a replica already running (to PostgreSQL, Redis) may take one as its own
        // ephemeral port. Such a start is tried again on new ports.
        let mut attempt = 0;
        let (setup, kas) = loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let extra = shared_yaml(&database, &redis, &secret, port)?;
            let setup = KasSetup::write_with(&o.kas_bin, &dir, &o.log_level, None, &extra)?;
            match setup.start().await {
                Ok(kas) => break (setup, kas),
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    attempt += 1;
                    eprintln!("loadgen: replica {i} found a port taken; trying new ports");
                }
                Err(e) => return Err(e),
            }
        };
        setups.push(setup);
        kases.push(kas);
    }
    let tokens = crate::register(&kases[0].admin, o.n, o.register_concurrency).await?;
    tokio::time::sleep(o.settle).await;
    let base = all_stats(&kases).await?;

    let backends: Vec<u16> = setups.iter().map(|s| s.agent_port).collect();
    let (lbs, _balancers) = balancers(o.n, &backends).await?;
    let addrs = lbs
        .iter()
        .map(|p| KasAddress::parse(&format!("grpc://127.0.0.1:{p}")))
        .collect::<Result<Vec<_>, _>>()?;
    let fleet_opts = FleetOptions {
        min_idle: o.min_idle,
        config_stream: o.config_stream,
        start_rate: 0,
        ca_cert_file: None,
    };
    let goal = Goal {
        min_idle: o.min_idle,
        config_stream: o.config_stream,
        timeout: o.timeout,
    };
    let started = Instant::now();
    let fleet = Fleet::start(&addrs, tokens, &fleet_opts).await?;
    let connect = wait_all(&kases, &fleet, &goal, started, "connect").await?;
    tokio::time::sleep(o.settle).await;
    let connected = all_stats(&kases).await?;

    let (commands, cpu) = idle(&kases, &redis, o.idle).await?;
    let held = connected[0].agent_connections;
    let killed = Instant::now();
    kases[0].kill9().await?;
    let failover = wait_all(&kases[1..], &fleet, &goal, killed, "failover").await?;
    let (back, _) = fleet.connect_times(Some(killed), killed);
    fleet.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in &mut kases[1..] {
        k.stop(Duration::from_secs(60)).await?;
    }
    let report = Report {
        o,
        base,
        connected,
        connect,
        commands,
        cpu,
        held,
        failover,
        back: back.len(),
    };
    report.print();
    Ok(report.json())
}

/// Every replica's stats.
async fn all_stats(kases: &[Kas]) -> Result<Vec<Stats>> {
    let mut out = Vec::new();
    for k in kases {
        out.push(k.admin.stats().await?);
    }
    Ok(out)
}

/// Waits until the replicas together count every agent and its idle streams.
async fn wait_all(
    kases: &[Kas],
    fleet: &Fleet,
    goal: &Goal,
    since: Instant,
    what: &str,
) -> Result<Phase> {
    let n = fleet.len();
    let mut last_progress = Instant::now();
    loop {
        let mut sum = (0, 0);
        for k in kases {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), k.admin.stats()).await {
                sum.0 += s.agent_connections;
                sum.1 += s.open_streams;
            }
        }
        if sum.0 == n
            && sum.1 >= n * goal.min_idle
            && (!goal.config_stream || fleet.config_streams() == n)
        {
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            eprintln!(
                "loadgen: {what} {:>6.1} s: replicas count {}/{n} connections, {} streams",
                since.elapsed().as_secs_f64(),
                sum.0,
                sum.1
            );
        }
        if since.elapsed() > goal.timeout {
            bail!(
                "{what}: not all {n} agents connected within {} s",
                goal.timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let (ready, _) = fleet.connect_times(Some(since), since);
    Ok(Phase {
        total: since.elapsed(),
        ready,
    })
}

/// Redis commands per second and each replica's CPU (percent of a core) over `idle`.
async fn idle(kases: &[Kas], redis: &Redis, idle: Duration) -> Result<(f64, Vec<f64>)> {
    let before = redis.commands_processed()?;
    let cpu_before: Vec<f64> = kases.iter().map(Kas::cpu_seconds).collect::<Result<_>>()?;
    let t = Instant::now();
    tokio::time::sleep(idle).await;
    let wall = t.elapsed().as_secs_f64();
    // INFO itself is one command.
    let commands = redis.commands_processed()?.saturating_sub(before + 1) as f64 / wall;
    let mut cpu = Vec::new();
    for (k, b) in kases.iter().zip(cpu_before) {
        cpu.push(100.0 * (k.cpu_seconds()? - b) / wall);
    }
    Ok((commands, cpu))
}

/// Agents per balancer process: it holds both ends of each connection, so 5,000 agents are
/// 10,000 open files, well inside a common limit of 20,000.
const AGENTS_PER_BALANCER: usize = 5_000;

/// Balancer processes (this program with `--balance`) for `n` agents in front of `backends`:
/// their ports, and the children (killed with loadgen: parent-death signal and drop).
async fn balancers(n: usize, backends: &[u16]) -> Result<(Vec<u16>, Vec<tokio::process::Child>)> {
    let me = std::env::current_exe()?;
    let list: Vec<String> = backends.iter().map(u16::to_string).collect();
    let (mut ports, mut children) = (Vec::new(), Vec::new());
    for _ in 0..n.div_ceil(AGENTS_PER_BALANCER).max(1) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&me)
            .arg("--balance")
            .arg(format!("{port}:{}", list.join(",")))
            .kill_on_drop(true)
            .spawn()
            .context("starting a balancer process")?;
        children.push(child);
        ports.push(port);
    }
    for port in &ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the balancer on port {port} did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok((ports, children))
}

/// `--balance PORT:B1,B2,…`: a TCP balancer on 127.0.0.1:PORT; each connection goes to the
/// next backend in turn, or the one after it when that one refuses (a dead replica). Runs
/// until killed.
pub async fn serve_balancer(spec: &str) -> Result<()> {
    let (port, list) = spec.split_once(':').context("--balance PORT:BACKENDS")?;
    let backends: Vec<u16> = list
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("--balance: backend ports")?;
    if backends.is_empty() {
        bail!("--balance: no backend");
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>()?)).await?;
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (mut down, _) = listener.accept().await?;
        let (backends, next) = (backends.clone(), Arc::clone(&next));
        tokio::spawn(async move {
            let first = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..backends.len() {
                let b = backends[(first + i) % backends.len()];
                if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", b)).await {
                    let _ = up.set_nodelay(true);
                    let _ = down.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    return;
                }
            }
        });
    }
}

struct Report<'a> {
    o: &'a Options,
    base: Vec<Stats>,
    connected: Vec<Stats>,
    connect: Phase,
    commands: f64,
    cpu: Vec<f64>,
    /// Agents on the replica that was killed.
    held: usize,
    failover: Phase,
    /// Agents that reconnected after the kill.
    back: usize,
}

impl Report<'_> {
    fn per_agent(&self) -> f64 {
        let grown: f64 = self
            .connected
            .iter()
            .zip(&self.base)
            .map(|(c, b)| c.rss_bytes as f64 - b.rss_bytes as f64)
            .sum();
        grown / self.o.n as f64
    }

    fn print(&self) {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
        println!();
        println!(
            "{} agents over {} kas replicas (PostgreSQL, Redis, peers)",
            self.o.n, self.o.replicas
        );
        for (i, (b, c)) in self.base.iter().zip(&self.connected).enumerate() {
            crate::row(
                &format!("replica {i}: agents, RSS 0 → connected"),
                format!(
                    "{} , {} → {}",
                    c.agent_connections,
                    mib(b.rss_bytes),
                    mib(c.rss_bytes)
                ),
            );
        }
        crate::row(
            "kas RSS per connected agent",
            format!("{:.0} B", self.per_agent()),
        );
        crate::row(
            "connect all N",
            format!("{:.2} s", self.connect.total.as_secs_f64()),
        );
        crate::row(
            "Redis commands/s while idle",
            format!("{:.2}", self.commands),
        );
        crate::row(
            "kas CPU while idle, per replica",
            format!("{:.2?} %", self.cpu),
        );
        crate::row("agents on the killed replica", self.held.to_string());
        crate::row(
            "all back after kill -9 of that replica",
            format!("{:.2} s", self.failover.total.as_secs_f64()),
        );
        crate::row("  per agent p50 / p99 / max", self.failover.quantiles());
        println!();
    }

    fn json(&self) -> Value {
        json!({
            "mode": "replicas",
            "agents": self.o.n,
            "replicas": self.o.replicas,
            "min_idle": self.o.min_idle,
            "config_stream": self.o.config_stream,
            "agents_per_replica": self.connected.iter().map(|s| s.agent_connections).collect::<Vec<_>>(),
            "kas_rss_baseline_bytes": self.base.iter().map(|s| s.rss_bytes).collect::<Vec<_>>(),
            "kas_rss_connected_bytes": self.connected.iter().map(|s| s.rss_bytes).collect::<Vec<_>>(),
            "kas_bytes_per_agent": round(self.per_agent(), 0),
            "connect_seconds": round(self.connect.total.as_secs_f64(), 3),
            "idle_seconds": self.o.idle.as_secs(),
            "redis_commands_per_second_idle": round(self.commands, 2),
            "kas_cpu_idle_percent": self.cpu.iter().map(|c| round(*c, 3)).collect::<Vec<_>>(),
            "killed_replica_agents": self.held,
            "reconnected_agents": self.back,
            "failover_seconds": round(self.failover.total.as_secs_f64(), 3),
            "failover_ms": self.failover.json(),
        })
    }
}
