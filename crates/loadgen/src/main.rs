//! `loadgen`: what one connected agent costs kas, and how long a fleet takes to come back after
//! kas restarts.
//!
//! It starts a real kas (the release binary, as a separate process so the numbers are kas's
//! alone), registers N agents through the admin API and connects N fake agents from this one
//! process. Each fake agent is a real agent connection: its own TCP/HTTP/2 connection, its own
//! token, the real tunnel pool (`tether_tunnel_agent::Pool`, echo service only) and optionally
//! the configuration stream. It then measures kas's RSS and CPU, restarts kas and times the
//! reconnect storm, prints a table and, last, one JSON line for scripts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_kas_api::AdminClient;
use tether_kas_api::Stats;
use tether_transport::KasAddress;
use tokio_util::sync::CancellationToken;

mod fleet;
mod kas_proc;
mod probe;
mod replicas;

use fleet::{Fleet, FleetOptions};
use kas_proc::{Kas, KasSetup};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "Connects N fake agents to a kas it starts itself; measures kas's memory and CPU per \
             connected agent and the time for all agents to reconnect after a kas restart",
    long_about = None,
    after_help = "\
Phases: start kas (temp data dir, free 127.0.0.1 ports, git.poll_interval 1h) → register N \
agents → baseline RSS → connect N agents (each its own TCP connection and token, tunnel pool \
with --min-idle idle streams) → RSS with N connected → idle for --idle-seconds (kas CPU) → \
restart kas (SIGTERM, wait, start again on the same ports and data) and time until all N are \
back → stop everything.

Output: progress on stderr, a table on stdout, then one JSON line (the last line of stdout).

Needs about N + 200 open files in loadgen and again in kas (kas inherits loadgen's limit): \
check `ulimit -n`. kas is started through `setpriv --pdeathsig KILL`, so it dies with loadgen."
)]
struct Cli {
    /// Number of fake agents.
    #[arg(short = 'n', long, default_value_t = 100)]
    agents: usize,
    /// kas binary (default: `kas` next to this program, e.g. target/release/kas).
    #[arg(long)]
    kas_bin: Option<PathBuf>,
    /// Seconds the connected agents sit idle while kas's CPU time is measured.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Idle tunnel streams each agent keeps open (default: agentk's, so kas's memory per agent
    /// is what a fleet of agentk with default settings costs).
    #[arg(long, default_value_t = tether_tunnel_agent::PoolConfig::default().min_idle)]
    min_idle: usize,
    /// Also open each agent's configuration stream, as agentk does (one more long-lived
    /// stream per agent).
    #[arg(long)]
    config_stream: bool,
    /// kas's agent listener speaks TLS (a throwaway CA; agents dial `grpcs://`), as agents in
    /// production do.
    #[arg(long)]
    tls: bool,
    /// Skip the reconnect storm (kas restart).
    #[arg(long)]
    no_storm: bool,
    /// Agents started per second; 0 starts them all at once (the worst case for kas).
    #[arg(long, default_value_t = 0)]
    start_rate: u32,
    /// Concurrent admin API calls while registering the agents.
    #[arg(long, default_value_t = 8)]
    register_concurrency: usize,
    /// Seconds to let kas settle before reading its RSS.
    #[arg(long, default_value_t = 3)]
    settle_seconds: u64,
    /// Longest wait for all agents to connect (each phase), in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Log level of kas (its log is `kas.log` in the work dir).
    #[arg(long, default_value = "info")]
    kas_log_level: String,
    /// Spread the agents over this many kas replicas sharing PostgreSQL and Redis (started by
    /// loadgen), then kill one and time the failover, instead of the one-kas run.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Internal (`--replicas` starts these): run only a TCP balancer on 127.0.0.1:PORT in front
    /// of the comma-separated backend ports, until killed.
    #[arg(long, hide = true, value_name = "PORT:BACKENDS")]
    balance: Option<String>,
    /// Keep kas's configuration, data and log in this folder (default: a temporary folder,
    /// removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Dropping `run` on Ctrl-C drops the kas child (kill_on_drop) and the temp dir.
    let result = tokio::select! {
        r = run(cli) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

const PROJECT: &str = "loadgen/fleet";

async fn run(cli: Cli) -> Result<()> {
    if let Some(spec) = &cli.balance {
        return replicas::serve_balancer(spec).await;
    }
    let n = cli.agents;
    if n == 0 {
        bail!("--agents must be at least 1");
    }
    let min_idle = cli.min_idle.max(1);
    let kas_bin = kas_binary(&cli)?;
    check_open_files(n)?;
    let (dir, _temp) = work_dir(&cli)?;
    if cli.replicas > 1 {
        return run_replicas(&cli, kas_bin, dir).await;
    }
    let pki = cli.tls.then(tether_test_support::Pki::temporary);
    let setup = KasSetup::write(&kas_bin, &dir, &cli.kas_log_level, pki.as_ref())?;
    eprintln!(
        "loadgen: starting {} (work dir {}, agents on 127.0.0.1:{})",
        kas_bin.display(),
        dir.display(),
        setup.agent_port
    );
    let mut kas = setup.start().await?;
    let mut report = Report {
        n,
        min_idle,
        config_stream: cli.config_stream,
        tls: cli.tls,
        ..Report::default()
    };

    // Registration.
    let t = Instant::now();
    let tokens = register(&kas.admin, n, cli.register_concurrency).await?;
    report.register = t.elapsed();
    eprintln!(
        "loadgen: registered {n} agents in {:.1} s",
        report.register.as_secs_f64()
    );

    // Baseline: kas with N registered agents, none connected.
    let settle = Duration::from_secs(cli.settle_seconds);
    tokio::time::sleep(settle).await;
    report.base = Some(kas.admin.stats().await?);
    let cpu_base = kas.cpu_seconds()?;
    let own_rss_base = kas_proc::rss_bytes("/proc/self/status").unwrap_or(0);

    // Connect.
    let goal = Goal {
        min_idle,
        config_stream: cli.config_stream,
        timeout: Duration::from_secs(cli.timeout),
    };
    let ca = pki.as_ref().map(|p| p.ca.clone());
    let (fleet, connect) = connect(&cli, (&setup, ca), &kas, tokens, &goal).await?;
    report.cpu_connect = kas.cpu_seconds()? - cpu_base;
    tokio::time::sleep(settle).await;
    report.connected = Some(kas.admin.stats().await?);
    report.fds = kas.open_fds();
    let own_rss_connected = kas_proc::rss_bytes("/proc/self/status").unwrap_or(0);
    report.own_rss_per_agent = (own_rss_connected as f64 - own_rss_base as f64) / n as f64;
    eprintln!(
        "loadgen: {n} agents connected in {:.2} s; idling {} s",
        connect.total.as_secs_f64(),
        cli.idle_seconds
    );
    report.connect = connect;

    idle(&kas, Duration::from_secs(cli.idle_seconds), &mut report).await?;
    if !cli.no_storm {
        report.storm = Some(storm(&setup, &mut kas, &fleet, &goal, settle).await?);
    }

    // Clean shutdown: agents first (so they do not retry against a stopping kas), then kas.
    fleet.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kas.stop(Duration::from_secs(60)).await?;
    report.print();
    Ok(())
}

/// `--replicas`: see [`replicas`]. Prints the table, then the JSON line.
async fn run_replicas(cli: &Cli, kas_bin: PathBuf, dir: PathBuf) -> Result<()> {
    let o = replicas::Options {
        n: cli.agents,
        replicas: cli.replicas,
        min_idle: cli.min_idle.max(1),
        config_stream: cli.config_stream,
        idle: Duration::from_secs(cli.idle_seconds),
        settle: Duration::from_secs(cli.settle_seconds),
        timeout: Duration::from_secs(cli.timeout),
        log_level: cli.kas_log_level.clone(),
        register_concurrency: cli.register_concurrency,
        kas_bin,
        dir,
    };
    let report = replicas::run(&o).await?;
    println!("{report}");
    Ok(())
}

/// The kas binary to run: `--kas-bin`, else the one next to loadgen.
fn kas_binary(cli: &Cli) -> Result<PathBuf> {
    let kas_bin = match &cli.kas_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the folder of the loadgen binary")?
            .join("kas"),
    };
    if !kas_bin.is_file() {
        bail!(
            "no kas binary at {} (build it with `cargo build --release -p kas` or pass --kas-bin)",
            kas_bin.display()
        );
    }
    Ok(kas_bin)
}

/// Refuses to start when `n` agents would run out of file descriptors.
fn check_open_files(n: usize) -> Result<()> {
    // One fd per agent connection on each side, plus sockets, files and epoll of the runtime.
    let need = u64::try_from(n).unwrap_or(u64::MAX).saturating_add(200);
    if let Some(limit) = kas_proc::open_files_limit()
        && limit < need
    {
        bail!(
            "{n} agents need about {need} open files in loadgen and in kas, but the limit is \
             {limit}: raise it (`ulimit -n {need}`, or `prlimit --nofile={need}:{need} -- loadgen …`)"
        );
    }
    Ok(())
}

/// kas's folder: `--work-dir`, else a temporary one (removed when the guard drops).
fn work_dir(cli: &Cli) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match &cli.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Ok((d.clone(), None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("tether-loadgen-")
                .tempdir()?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

/// Starts the fleet, one agent per token, and waits until every agent is ready.
async fn connect(
    cli: &Cli,
    (setup, ca_cert_file): (&KasSetup, Option<PathBuf>),
    kas: &Kas,
    tokens: Vec<String>,
    goal: &Goal,
) -> Result<(Fleet, Phase)> {
    let addr = match ca_cert_file {
        Some(_) => format!("grpcs://localhost:{}", setup.agent_port),
        None => format!("grpc://127.0.0.1:{}", setup.agent_port),
    };
    let addr = KasAddress::parse(&addr)?;
    let opts = FleetOptions {
        min_idle: goal.min_idle,
        config_stream: cli.config_stream,
        start_rate: cli.start_rate,
        ca_cert_file,
    };
    let t = Instant::now();
    let fleet = Fleet::start(std::slice::from_ref(&addr), tokens, &opts).await?;
    let connect = wait_connected(&kas.admin, &fleet, goal, t, None, "connect").await?;
    Ok((fleet, connect))
}

/// Idle: N connections with their idle streams and nothing else (HTTP/2 keepalive pings
/// every 50–55 s each way are the only traffic).
async fn idle(kas: &Kas, duration: Duration, report: &mut Report) -> Result<()> {
    let own_cpu_a = kas_proc::cpu_seconds("/proc/self/stat")?;
    let cpu_a = kas.cpu_seconds()?;
    let t = Instant::now();
    tokio::time::sleep(duration).await;
    report.idle_wall = t.elapsed();
    report.cpu_idle = kas.cpu_seconds()? - cpu_a;
    report.own_cpu_idle = kas_proc::cpu_seconds("/proc/self/stat")? - own_cpu_a;
    report.after_idle = Some(kas.admin.stats().await?);
    Ok(())
}

/// The reconnect storm: stops kas, waits for the agents to notice, restarts it and times
/// every agent's return.
async fn storm(
    setup: &KasSetup,
    kas: &mut Kas,
    fleet: &Fleet,
    goal: &Goal,
    settle: Duration,
) -> Result<Storm> {
    let n = fleet.len();
    let t_term = Instant::now();
    let stop = kas.stop(Duration::from_secs(60)).await?;
    eprintln!(
        "loadgen: kas stopped in {:.2} s; waiting for the agents to notice",
        stop.as_secs_f64()
    );
    let noticed = wait_down(fleet, Duration::from_secs(30)).await;
    let down = Instant::now();
    let probing = CancellationToken::new();
    let probes = tokio::spawn(probe::liveness(setup.observability_port, probing.clone()));
    *kas = setup.start().await?;
    let api_up = Instant::now();
    eprintln!(
        "loadgen: kas restarted ({:.2} s to its API); waiting for {n} agents",
        kas.startup.as_secs_f64()
    );
    let back = wait_connected(&kas.admin, fleet, goal, down, Some(api_up), "reconnect").await?;
    let from_sigterm = t_term.elapsed();
    probing.cancel();
    let liveness = probes.await.context("the liveness prober panicked")?;
    let cpu = kas.cpu_seconds()?;
    tokio::time::sleep(settle).await;
    let stats = kas.admin.stats().await?;
    Ok(Storm {
        stop,
        noticed,
        startup: kas.startup,
        back,
        from_sigterm,
        cpu,
        stats,
        liveness,
    })
}

/// Registers `n` agents in one project; returns their tokens.
async fn register(admin: &AdminClient, n: usize, concurrency: usize) -> Result<Vec<String>> {
    let width = n.to_string().len();
    let mut calls = futures_util::stream::iter(1..=n)
        .map(|i| {
            let admin = admin.clone();
            async move {
                admin
                    .register_agent(PROJECT, &format!("agent-{i:0width$}"))
                    .await
                    .with_context(|| format!("registering agent {i}"))
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut tokens = Vec::with_capacity(n);
    while let Some(created) = calls.next().await {
        tokens.push(created?.token);
        if tokens.len() % 1000 == 0 {
            eprintln!("loadgen: registered {}/{n}", tokens.len());
        }
    }
    Ok(tokens)
}

/// How long a phase took until kas counted every agent, and when each agent saw itself ready.
#[derive(Debug, Default)]
struct Phase {
    total: Duration,
    /// Per agent, sorted, as each agent saw itself connect.
    ready: Vec<Duration>,
}

impl Phase {
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.ready.is_empty() {
            return 0.0;
        }
        let i = ((self.ready.len() - 1) as f64 * q).round() as usize;
        self.ready.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }

    /// `p50 / p99 / max ms`, as the table shows them.
    fn quantiles(&self) -> String {
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(1.0)
        )
    }

    fn json(&self) -> Value {
        json!({
            "p50": round(self.quantile_ms(0.5), 0),
            "p90": round(self.quantile_ms(0.9), 0),
            "p99": round(self.quantile_ms(0.99), 0),
            "max": round(self.quantile_ms(1.0), 0),
        })
    }
}

/// When a phase is done: kas counts every agent's connection and `min_idle` streams each.
#[derive(Debug, Clone, Copy)]
struct Goal {
    min_idle: usize,
    config_stream: bool,
    /// Longest wait.
    timeout: Duration,
}

const POLL: Duration = Duration::from_millis(100);

/// Waits until kas counts every agent's connection and idle streams (the measure), and with
/// `config_stream` until every agent has its configuration stream open again. Per-agent
/// times are from `origin` (or each agent's start) to its latest connection after `since`.
async fn wait_connected(
    admin: &AdminClient,
    fleet: &Fleet,
    goal: &Goal,
    since: Instant,
    origin: Option<Instant>,
    what: &str,
) -> Result<Phase> {
    let n = fleet.len();
    let Goal {
        min_idle,
        config_stream,
        timeout,
    } = *goal;
    let mut last_progress = Instant::now();
    let mut last_stats: Option<Stats> = None;
    loop {
        // kas may be too busy to answer quickly during a storm; that is not a failure.
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), admin.stats()).await {
            last_stats = Some(s);
            // kas counts no configuration streams; loadgen's agents count theirs.
            if s.agent_connections == n
                && s.open_streams >= n * min_idle
                && (!config_stream || fleet.config_streams() == n)
            {
                break;
            }
        }
        let now = since.elapsed();
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            let f = fleet.snapshot();
            eprintln!(
                "loadgen: {what} {:>6.1} s: kas connections {}/{n}, streams {}; agents ready {}, failing {:?}{}",
                now.as_secs_f64(),
                last_stats.map_or(0, |s| s.agent_connections),
                last_stats.map_or(0, |s| s.open_streams),
                f.ready,
                f.failing,
                if f.config_streams > 0 {
                    format!(", config streams {}", f.config_streams)
                } else {
                    String::new()
                }
            );
        }
        if now > timeout {
            bail!(
                "{what}: not all {n} agents connected within {} s (kas: {last_stats:?})",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let total = origin.unwrap_or(since).elapsed();
    let (ready, missing) = fleet.connect_times(origin, since);
    if missing > 0 {
        // kas counts them, so they did connect; their pool just never left `Connected`.
        eprintln!("loadgen: {what}: {missing} agents reconnected without a state change");
    }
    Ok(Phase { total, ready })
}

/// Waits until no agent has a tunnel stream left (they saw kas go); returns how long it took.
async fn wait_down(fleet: &Fleet, timeout: Duration) -> Duration {
    let t = Instant::now();
    while t.elapsed() < timeout && (0..fleet.len()).any(|i| !fleet.is_down(i)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

#[derive(Debug)]
struct Storm {
    /// SIGTERM to exit.
    stop: Duration,
    /// Exit until every agent had lost its streams.
    noticed: Duration,
    /// Spawn of the new kas to its API answering.
    startup: Duration,
    /// From the new kas's API answering until it counted every agent again.
    back: Phase,
    from_sigterm: Duration,
    /// CPU of the new kas from its start until all agents were back.
    cpu: f64,
    stats: Stats,
    /// kas's `/liveness` from the new kas's spawn until all agents were back.
    liveness: probe::Probes,
}

#[derive(Debug, Default)]
struct Report {
    n: usize,
    min_idle: usize,
    config_stream: bool,
    tls: bool,
    register: Duration,
    base: Option<Stats>,
    connected: Option<Stats>,
    after_idle: Option<Stats>,
    fds: Option<usize>,
    connect: Phase,
    cpu_connect: f64,
    cpu_idle: f64,
    idle_wall: Duration,
    own_cpu_idle: f64,
    own_rss_per_agent: f64,
    storm: Option<Storm>,
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn rss(s: &Option<Stats>) -> u64 {
    s.map_or(0, |s| s.rss_bytes)
}

fn tasks(s: &Option<Stats>) -> usize {
    s.map_or(0, |s| s.tasks)
}

/// One line of the table.
fn row(k: &str, v: String) {
    println!("  {k:<44} {v:>22}");
}

/// The table of the reconnect storm.
fn print_storm(s: &Storm) {
    println!("reconnect storm (kas restarted with N agents connected)");
    row(
        "kas stop (SIGTERM to exit)",
        format!("{:.2} s", s.stop.as_secs_f64()),
    );
    row(
        "agents all noticed",
        format!("{:.2} s", s.noticed.as_secs_f64()),
    );
    row(
        "new kas start (to its API answering)",
        format!("{:.2} s", s.startup.as_secs_f64()),
    );
    row(
        "all N back (from the new kas's API up)",
        format!("{:.2} s", s.back.total.as_secs_f64()),
    );
    row("  per agent p50 / p99 / max", s.back.quantiles());
    row(
        "all N back (from SIGTERM)",
        format!("{:.2} s", s.from_sigterm.as_secs_f64()),
    );
    row("new kas CPU until all back", format!("{:.2} s", s.cpu));
    let l = &s.liveness;
    row(
        "new kas /liveness: first answer after spawn",
        l.first_answer
            .map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64())),
    );
    row(
        "  then in time (1 s) / slowest",
        format!(
            "{}/{} / {:.0} ms",
            l.in_time,
            l.after_up,
            l.slowest.as_secs_f64() * 1000.0
        ),
    );
    row("new kas RSS with N back", mib(s.stats.rss_bytes));
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

impl Report {
    fn print(&self) {
        self.print_footprint();
        if let Some(s) = &self.storm {
            print_storm(s);
        }
        println!();
        println!("{}", self.json());
    }

    /// kas's RSS per connected agent, in bytes.
    fn per_agent(&self) -> f64 {
        (rss(&self.connected) as f64 - rss(&self.base) as f64) / self.n as f64
    }

    /// kas's CPU while idle, in percent of one core.
    fn cpu_pct(&self) -> f64 {
        let idle_s = self.idle_wall.as_secs_f64();
        if idle_s > 0.0 {
            100.0 * self.cpu_idle / idle_s
        } else {
            0.0
        }
    }

    /// The table of kas's footprint.
    fn print_footprint(&self) {
        let per_agent = self.per_agent();
        let idle_s = self.idle_wall.as_secs_f64();
        let cpu_pct = self.cpu_pct();
        println!();
        println!(
            "kas footprint: {} agents{}, {} idle tunnel stream(s) each{}",
            self.n,
            if self.tls { " over TLS" } else { "" },
            self.min_idle,
            if self.config_stream {
                " + configuration stream"
            } else {
                ""
            }
        );
        row(
            "register N agents (admin API)",
            format!("{:.1} s", self.register.as_secs_f64()),
        );
        row("kas RSS, no agent connected", mib(rss(&self.base)));
        row("kas RSS, N connected", mib(rss(&self.connected)));
        row("kas RSS, after the idle period", mib(rss(&self.after_idle)));
        row("kas RSS per connected agent", format!("{per_agent:.0} B"));
        row(
            "kas tokio tasks, none / N connected",
            format!("{} / {}", tasks(&self.base), tasks(&self.connected)),
        );
        if let Some(fds) = self.fds {
            row("kas open fds, N connected", fds.to_string());
        }
        row(
            "connect all N (until kas counts them)",
            format!("{:.2} s", self.connect.total.as_secs_f64()),
        );
        row("  per agent p50 / p99 / max", self.connect.quantiles());
        row(
            "kas CPU to accept N agents",
            format!("{:.2} s", self.cpu_connect),
        );
        row(
            &format!("kas CPU while idle ({idle_s:.0} s)"),
            format!("{:.2} s ({cpu_pct:.2} %)", self.cpu_idle),
        );
        row(
            "loadgen RSS per agent / CPU while idle",
            format!(
                "{:.0} B / {:.2} s",
                self.own_rss_per_agent, self.own_cpu_idle
            ),
        );
    }

    /// The report as one JSON line, for scripts.
    fn json(&self) -> Value {
        let idle_s = self.idle_wall.as_secs_f64();
        let (per_agent, cpu_pct) = (self.per_agent(), self.cpu_pct());
        let storm = self.storm.as_ref().map(|s| {
            json!({
                "kas_stop_seconds": round(s.stop.as_secs_f64(), 3),
                "agents_noticed_seconds": round(s.noticed.as_secs_f64(), 3),
                "kas_start_seconds": round(s.startup.as_secs_f64(), 3),
                "reconnect_seconds": round(s.back.total.as_secs_f64(), 3),
                "reconnect_ms": s.back.json(),
                "reconnect_from_sigterm_seconds": round(s.from_sigterm.as_secs_f64(), 3),
                "kas_cpu_seconds": round(s.cpu, 3),
                "kas_rss_bytes": s.stats.rss_bytes,
                "liveness": {
                    "first_answer_seconds": s.liveness.first_answer.map(|d| round(d.as_secs_f64(), 3)),
                    "probes": s.liveness.after_up,
                    "in_time": s.liveness.in_time,
                    "slowest_ms": round(s.liveness.slowest.as_secs_f64() * 1000.0, 1),
                },
            })
        });
        json!({
            "agents": self.n,
            "min_idle": self.min_idle,
            "config_stream": self.config_stream,
            "tls": self.tls,
            "register_seconds": round(self.register.as_secs_f64(), 3),
            "kas_rss_baseline_bytes": rss(&self.base),
            "kas_rss_connected_bytes": rss(&self.connected),
            "kas_rss_after_idle_bytes": rss(&self.after_idle),
            "kas_bytes_per_agent": round(per_agent, 0),
            "kas_tasks_baseline": tasks(&self.base),
            "kas_tasks_connected": tasks(&self.connected),
            "kas_open_fds_connected": self.fds,
            "connect_seconds": round(self.connect.total.as_secs_f64(), 3),
            "connect_ms": self.connect.json(),
            "kas_cpu_connect_seconds": round(self.cpu_connect, 3),
            "idle_seconds": round(idle_s, 3),
            "kas_cpu_idle_seconds": round(self.cpu_idle, 3),
            "kas_cpu_idle_percent": round(cpu_pct, 3),
            "loadgen_rss_bytes_per_agent": round(self.own_rss_per_agent, 0),
            "loadgen_cpu_idle_seconds": round(self.own_cpu_idle, 3),
            "storm": storm,
        })
    }
}
