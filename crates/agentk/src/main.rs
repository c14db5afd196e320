//! agentk, the in-cluster agent: dials out to kas, keeps the reverse tunnel open and serves
//! what kas routes to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tether_gitops_agent::metrics::SyncMetrics;
use tether_transport::{ClientOptions, KasAddress, NoProxy, ProxySettings, ProxyUrl};
use tether_tunnel_agent::{
    AgentMeta, ConnState, EchoHandler, Handler, Pool, PoolConfig, QuietWatch,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod cluster;
mod configuration;
mod gitops;
mod kubeproxy;
mod leader;
mod modules;

use modules::Modules;

#[derive(Parser, Debug)]
#[command(
    name = "agentk",
    version = tether_build_info::LONG_VERSION,
    about = "The agent: connects a Kubernetes cluster to kas"
)]
struct Cli {
    /// kas address: grpc://, grpcs://, ws:// or wss:// HOST:PORT (ws/wss may carry a path).
    #[arg(long, env = "AGENTK_KAS_ADDRESS")]
    kas_address: String,
    /// File with the agent token (a trailing newline is ignored).
    #[arg(long, env = "AGENTK_TOKEN_FILE")]
    token_file: PathBuf,
    /// PEM file of the CA that signed kas's certificate (default: the system's roots).
    #[arg(long)]
    ca_cert_file: Option<PathBuf>,
    /// Server name to verify in kas's certificate, when it differs from the address's host.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// HTTP proxy to reach kas through with CONNECT, `http://[user:password@]host:port`
    /// (default: HTTPS_PROXY for grpcs/wss, HTTP_PROXY for grpc/ws; NO_PROXY is honoured).
    #[arg(long)]
    proxy_url: Option<String>,
    /// Kubeconfig for running outside a cluster (default: in-cluster configuration).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where /metrics, /liveness and /readiness are served.
    #[arg(long, default_value = "[::]:8080")]
    observability_listen_address: SocketAddr,
    /// Log level until the agent configuration sets one: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log lines as `json` (for collectors) or `text` (for reading during local runs).
    #[arg(long, env = "AGENTK_LOG_FORMAT", default_value = "json")]
    log_format: tether_observability::LogFormat,
    /// Idle tunnel streams kept open for kas.
    #[arg(long, default_value_t = 2)]
    tunnel_min_idle: usize,
    /// Most tunnel streams open at once (idle and busy).
    #[arg(long, default_value_t = 500)]
    tunnel_max_streams: usize,
    /// Streams opened at once when the idle ones run out.
    #[arg(long, default_value_t = 10)]
    tunnel_scale_up_step: usize,
    /// Idle streams above the minimum close after this long.
    #[arg(long, default_value = "1m", value_parser = at_least(MS_100))]
    tunnel_idle_timeout: Duration,
    /// On SIGTERM, how long requests being served through the tunnel get to finish. agentk's
    /// stop takes up to this plus 4 s: keep it well inside the Pod's termination grace period.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    tunnel_drain_timeout: Duration,
    /// Re-apply each manifest project's last commit this often, to correct drift.
    #[arg(long, default_value = "5m", value_parser = at_least(SEC))]
    gitops_resync_interval: Duration,
    /// First retry delay of a failed synchronization (doubling up to 1 minute).
    #[arg(long, default_value = "10s", value_parser = at_least(SEC))]
    gitops_retry_interval: Duration,
    /// HTTP/2 pings to kas after this long without a frame from it (well below typical 60 s
    /// load-balancer idle timeouts). A connection dropped without a reset is found within this
    /// plus --keepalive-timeout.
    #[arg(long, default_value = "20s", value_parser = at_least(SEC))]
    keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection counts as dead and agentk
    /// reconnects.
    #[arg(long, default_value = "10s", value_parser = at_least(SEC))]
    keepalive_timeout: Duration,
    /// A tunnelled request whose TCP connection to the Kubernetes API server is not up within
    /// this long is answered 504.
    #[arg(long, default_value = "10s", value_parser = at_least(MS_100))]
    kube_api_connect_timeout: Duration,
    /// A tunnelled request whose response headers the Kubernetes API server has not sent within
    /// this long is answered 504. Above the API server's own 60 s request timeout, so only a
    /// server that does not answer at all hits it; a watch or exec stream is not limited once
    /// its headers came.
    #[arg(long, default_value = "2m", value_parser = at_least(SEC))]
    kube_api_response_header_timeout: Duration,
    /// Elect one replica (a Lease `agent-<id>-lock`) to apply GitOps; all replicas serve tunnels.
    /// Turn off only when exactly one replica can ever run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (default: POD_NAMESPACE, then the in-cluster namespace).
    #[arg(long, env = "AGENTK_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// How long the leader's lease holds without renewal.
    #[arg(long, default_value = "15s", value_parser = at_least(SEC))]
    leader_election_lease_duration: Duration,
    /// A leader that could not renew for this long stops applying (below the lease duration).
    #[arg(long, default_value = "10s", value_parser = at_least(SEC))]
    leader_election_renew_deadline: Duration,
    /// How often replicas try to acquire or renew the lease.
    #[arg(long, default_value = "2s", value_parser = at_least(MS_100))]
    leader_election_retry_period: Duration,
}

/// The HTTP proxy settings: the flag (for every scheme), else the environment. The proxy in use
/// is logged (without credentials) because a wrong one otherwise shows only as connect errors.
fn proxy_settings(flag: Option<&str>, kas: &KasAddress) -> Result<ProxySettings> {
    let settings = match flag {
        Some(url) => {
            let url = url.parse::<ProxyUrl>().context("--proxy-url")?;
            let no_proxy = std::env::var("no_proxy")
                .or_else(|_| std::env::var("NO_PROXY"))
                .unwrap_or_default();
            ProxySettings::all(url, NoProxy::parse(&no_proxy))
        }
        None => ProxySettings::from_env().context("proxy environment variables")?,
    };
    if let Some(proxy) = settings.for_host(kas.host(), kas.scheme().is_tls()) {
        tracing::info!(proxy = %proxy, "Connecting to kas through an HTTP proxy");
    }
    Ok(settings)
}

/// The in-cluster namespace file (a Pod's own namespace).
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Where the leader Lease lives: the flag, else the Pod's namespace. `None` when agentk cannot
/// tell (outside a cluster without either), in which case there is no election.
fn lease_namespace(cli: &Cli) -> Option<String> {
    cli.leader_election_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| std::fs::read_to_string(NAMESPACE_FILE).ok())
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
}

/// Starts the leader election once the agent's id is known (from its first configuration);
/// what it returns says whether this replica applies GitOps.
fn start_election(
    cli: &Cli,
    kube: kube::Client,
    (mut config, kas): (
        watch::Receiver<Option<Arc<configuration::Applied>>>,
        watch::Receiver<bool>,
    ),
    identity: String,
    metrics: leader::ElectionMetrics,
    shutdown: CancellationToken,
) -> Result<(gitops::Leadership, Option<tokio::task::JoinHandle<()>>)> {
    if !cli.leader_election {
        tracing::warn!("Leader election is off: this replica applies GitOps unconditionally");
        return Ok(no_election(&metrics));
    }
    let Some(namespace) = lease_namespace(cli) else {
        tracing::warn!(
            "No namespace for the leader Lease (set POD_NAMESPACE or --leader-election-namespace): this replica applies GitOps unconditionally"
        );
        return Ok(no_election(&metrics));
    };
    let timing = leader::Timing {
        lease_duration: cli.leader_election_lease_duration,
        renew_deadline: cli.leader_election_renew_deadline,
        retry_period: cli.leader_election_retry_period,
    };
    anyhow::ensure!(
        timing.renew_deadline < timing.lease_duration,
        "--leader-election-renew-deadline must be shorter than --leader-election-lease-duration"
    );
    let (tx, rx) = watch::channel(false);
    let (until, until_rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let agent_id = loop {
            // Only agents with something to apply need a leader (and rights on Leases).
            if let Some(applied) = config.borrow_and_update().as_ref()
                && !applied.config.gitops.manifest_projects.is_empty()
            {
                break applied.agent_id;
            }
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        };
        let elector = leader::Elector {
            api: kube::Api::namespaced(kube, &namespace),
            name: format!("agent-{agent_id}-lock"),
            identity,
            timing,
            metrics,
            kas: Some(kas),
            until,
        };
        tracing::info!(lease = %elector.name, namespace, identity = %elector.identity, "Leader election started");
        elector.run(tx, shutdown).await;
    });
    Ok((gitops::Leadership::elected(rx, until_rx), Some(task)))
}

/// Without an election this replica always applies, and its leader gauge says so.
fn no_election(
    metrics: &leader::ElectionMetrics,
) -> (gitops::Leadership, Option<tokio::task::JoinHandle<()>>) {
    metrics.unconditional();
    (gitops::Leadership::unconditional(), None)
}

/// The longest duration a flag takes: a year is beyond any sensible interval or deadline, and
/// keeps agentk's `Instant + flag` (schedules, leader deadlines) from overflowing, which panics.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(365 * 86_400);

const MS_100: Duration = Duration::from_millis(100);
const SEC: Duration = Duration::from_secs(1);

/// [`humantime_duration`] refusing values under `min`: a resync interval of `0s` re-applied
/// every object about 15 times a second, each sync stored by kas; a keep-alive of `1ms` pings
/// kas without pause (E14).
fn at_least(min: Duration) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |s| {
        let d = humantime_duration(s)?;
        if d < min {
            let min = if min < SEC {
                format!("{}ms", min.as_millis())
            } else {
                format!("{}s", min.as_secs())
            };
            return Err(format!("{s} is shorter than the minimum of {min}"));
        }
        Ok(d)
    }
}

/// Durations on the command line read like those in the agent configuration (`30s`, `1m30s`),
/// with the same parser, up to [`MAX_FLAG_DURATION`] (clap names the flag in the error).
fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d = tether_agent_config::parse_duration(s)?;
    if d > MAX_FLAG_DURATION {
        return Err(format!(
            "{s} is longer than the maximum of a year ({}s)",
            MAX_FLAG_DURATION.as_secs()
        ));
    }
    Ok(d)
}

/// Reads the token; a trailing newline (as `echo` or a Secret volume leaves) is not part of it.
/// A Kubernetes client: from `--kubeconfig` when given, else the in-cluster configuration (or
/// `KUBECONFIG` / `~/.kube/config` when not in a cluster).
async fn kube_config(kubeconfig: Option<&Path>) -> Result<kube::Config> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig")?,
    };
    Ok(config)
}

/// jemalloc instead of glibc's allocator: after a sync of thousands of objects glibc kept the
/// freed memory (its arenas only shrink from the top), so agentk stayed at its peak for good;
/// jemalloc hands unused pages back within seconds (background purging threads).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often the token file is looked at. A mounted Secret's update takes up to a minute
/// to reach the Pod anyway; a look is one `stat`.
const TOKEN_FILE_CHECK: Duration = Duration::from_secs(3);

/// Everything agentk does after SIGTERM must fit well inside Kubernetes' default 30 s grace
/// period; the modules get this long to stop together, the tunnel its drain timeout (requests
/// in flight finishing) on top, before agentk exits regardless.
const STOP_DEADLINE: Duration = Duration::from_secs(4);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentk: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agentk failed");
            eprintln!("agentk: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Dropping a runtime waits for blocking tasks without limit; a stuck one (a DNS lookup, a
    // file read) must not keep agentk alive past its grace period.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

async fn run(cli: Cli) -> Result<()> {
    let level = tether_observability::parse_level(&cli.log_level)?;
    let log = tether_observability::init_logging_as(level, cli.log_format);
    // Every module logs inside this span, so `agent_id` appears on every line once kas told us.
    let agent_span = tracing::info_span!("agentk", agent_id = tracing::field::Empty);
    let _ = rustls::crypto::ring::default_provider().install_default();

    // Read again whenever the file changes (the "token" module looks every few seconds): a
    // rotated token is used from the next stream on, and open streams reopen with it.
    let token = tether_tunnel_agent::AgentToken::from_file(&cli.token_file)?;
    let address = KasAddress::parse(&cli.kas_address)?;
    let opts = ClientOptions {
        ca_cert_file: cli.ca_cert_file.clone(),
        tls_server_name: cli.tls_server_name.clone(),
        keepalive_interval: cli.keepalive_interval,
        keepalive_timeout: cli.keepalive_timeout,
        proxy: proxy_settings(cli.proxy_url.as_deref(), &address)?,
        ..ClientOptions::default()
    };
    // One lazily connecting channel (one transport connection) for every module.
    let (channel, activity) = tether_transport::connect_lazy_watched(&address, &opts)?;
    let kube_cfg = kube_config(cli.kubeconfig.as_deref()).await?;
    let cluster_id = cluster::cluster_id(&kube_cfg, &token);
    let meta = AgentMeta {
        token,
        version: tether_build_info::BUILD_VERSION.to_string(),
        pod_name: std::env::var("POD_NAME").unwrap_or_default(),
        pod_namespace: std::env::var("POD_NAMESPACE").unwrap_or_default(),
        cluster_id,
    };
    let pool = tunnel_pool(&cli, (channel.clone(), activity), meta.clone(), &kube_cfg)?;
    let kube =
        kube::Client::try_from(kube_cfg.clone()).context("building the Kubernetes client")?;

    // The module list: started in this order, stopped in reverse.
    let mut modules = Modules::default();
    let sync_metrics = SyncMetrics::default();
    let election_metrics = leader::ElectionMetrics::default();
    let kas_up = kas_connected(&pool);
    start_observability(
        &mut modules,
        &cli,
        (&pool, kas_up.clone()),
        &sync_metrics,
        &election_metrics,
    )
    .await?;
    tracing::info!(
        kas_address = %address,
        kubeconfig = cli.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        version = tether_build_info::LONG_VERSION,
        "agentk is starting"
    );
    let (token, cluster) = (meta.token.clone(), meta.cluster_id.clone());
    modules.start(
        "token",
        tracing::info_span!(parent: &agent_span, "token", mod_name = "token_file"),
        // The agent token and the Kubernetes API token (which names the ServiceAccount, so
        // the cluster) are both files rewritten while agentk runs.
        |stop| async move {
            tokio::join!(
                token.follow_file(TOKEN_FILE_CHECK, stop.clone()),
                cluster.follow(TOKEN_FILE_CHECK, stop)
            );
        },
    );
    let p = Arc::clone(&pool);
    modules.start(
        "tunnel",
        tracing::info_span!(parent: &agent_span, "tunnel", mod_name = "reverse_tunnel"),
        |stop| async move { p.run(stop).await },
    );
    let (config_tx, config_rx) = watch::channel(None);
    // Started before GitOps and stopped after it: the lease is handed back only once nothing
    // applies here any more.
    let leading = start_leader_election(
        &mut modules,
        &cli,
        kube.clone(),
        (config_rx.clone(), kas_up),
        election_metrics,
    )?;
    let (gitops_channel, gitops_meta) = (channel.clone(), meta.clone());
    let instance = match meta.pod_name.as_str() {
        "" => format!("agentk-{}", std::process::id()),
        pod => pod.to_owned(),
    };
    // kube retries a 503 up to 15 times over minutes: an aggregated API whose server is down
    // would hold every sync's discovery that long before it is left out.
    let mut discovery_cfg = kube_cfg.clone();
    discovery_cfg.default_retry = false;
    let discovery = kube::Client::try_from(discovery_cfg)
        .context("building the Kubernetes client for discovery")?;
    let syncer = tether_gitops_agent::sync::Syncer::new(kube.clone()).with_discovery(discovery);
    let engine = gitops::Engine {
        events: tether_gitops_agent::kube_events::Recorder::new(kube, instance),
        syncer: Arc::new(syncer),
        kas_clock: Arc::new(gitops::KasClock::new(sync_metrics.kas_clock_offset.clone())),
        metrics: sync_metrics,
    };
    let timing = gitops_timing(&cli);
    modules.start(
        "gitops",
        tracing::info_span!(parent: &agent_span, "gitops", mod_name = "gitops"),
        |stop| {
            gitops::run(
                gitops_channel,
                gitops_meta,
                engine,
                config_rx,
                leading,
                timing,
                stop,
            )
        },
    );
    let span = agent_span.clone();
    let other_agent = CancellationToken::new();
    let to_stop = (config_tx, other_agent.clone());
    modules.start(
        "configuration",
        tracing::info_span!(parent: &agent_span, "configuration", mod_name = "agent_configuration"),
        |stop| configuration::run(channel, meta, log, to_stop, span, stop),
    );

    let another = tokio::select! {
        r = wait_for_termination() => { r?; false }
        () = other_agent.cancelled() => true,
    };
    tracing::info!("agentk is stopping");
    modules.allow("tunnel", cli.tunnel_drain_timeout);
    modules.stop(STOP_DEADLINE).await;
    tracing::info!("agentk stopped");
    if another {
        anyhow::bail!(
            "the agent token file now holds a token of another agent: start agentk again to run as that agent"
        );
    }
    Ok(())
}

/// The tunnel's stream pool, serving `echo` and the Kubernetes API.
fn tunnel_pool(
    cli: &Cli,
    (channel, activity): (tonic::transport::Channel, tether_transport::ReadActivity),
    meta: AgentMeta,
    kube_cfg: &kube::Config,
) -> Result<Arc<Pool>> {
    let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
    handlers.insert(
        tether_protocol::services::ECHO.to_string(),
        Arc::new(EchoHandler),
    );
    handlers.insert(
        tether_protocol::services::KUBERNETES_API.to_string(),
        Arc::new(kubeproxy::KubeApiHandler::new(
            kube_cfg,
            kubeproxy::Timeouts {
                connect: cli.kube_api_connect_timeout,
                response_headers: cli.kube_api_response_header_timeout,
            },
        )?),
    );
    let cfg = PoolConfig {
        min_idle: cli.tunnel_min_idle,
        max_streams: cli.tunnel_max_streams,
        scale_up_step: cli.tunnel_scale_up_step,
        idle_timeout: cli.tunnel_idle_timeout,
        drain_timeout: cli.tunnel_drain_timeout,
        quiet: Some(QuietWatch {
            activity,
            after: cli.keepalive_timeout,
        }),
        ..PoolConfig::default()
    };
    Ok(Arc::new(Pool::new(cfg, channel, meta, handlers)))
}

/// Whether the tunnel is connected to kas, as it changes.
fn kas_connected(pool: &Pool) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let mut state = pool.state();
    tokio::spawn(async move {
        loop {
            let connected = *state.borrow_and_update() == ConnState::Connected;
            tx.send_replace(connected);
            if state.changed().await.is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts /metrics, /liveness and /readiness; ready only while the tunnel is connected to kas
/// (`ready`).
async fn start_observability(
    modules: &mut Modules,
    cli: &Cli,
    (pool, ready): (&Pool, watch::Receiver<bool>),
    sync_metrics: &SyncMetrics,
    election_metrics: &leader::ElectionMetrics,
) -> Result<()> {
    let mut metrics = prometheus_client::registry::Registry::with_prefix("agentk");
    pool.register_metrics(&mut metrics);
    sync_metrics.register(&mut metrics);
    election_metrics.register(&mut metrics);
    tether_observability::register_build_info(
        &mut metrics,
        tether_build_info::VERSION,
        tether_build_info::COMMIT,
    );
    let listener = tokio::net::TcpListener::bind(cli.observability_listen_address)
        .await
        .with_context(|| format!("binding {}", cli.observability_listen_address))?;
    let ep = tether_observability::Endpoint {
        metrics: Arc::new(Mutex::new(metrics)),
        ready,
    };
    modules.start(
        "observability",
        tracing::info_span!("obs", mod_name = "observability"),
        |stop| async move {
            tether_observability::serve(listener, ep, stop).await;
        },
    );
    Ok(())
}

/// Starts the leader election (when there is one) as a module; what it returns says whether
/// this replica applies GitOps.
fn start_leader_election(
    modules: &mut Modules,
    cli: &Cli,
    kube: kube::Client,
    (config, kas): (
        watch::Receiver<Option<Arc<configuration::Applied>>>,
        watch::Receiver<bool>,
    ),
    metrics: leader::ElectionMetrics,
) -> Result<gitops::Leadership> {
    let identity = replica_identity(
        std::env::var("POD_NAME").ok(),
        std::env::var("HOSTNAME").ok(),
        std::process::id(),
    );
    let stop = CancellationToken::new();
    let (leading, election) =
        start_election(cli, kube, (config, kas), identity, metrics, stop.clone())?;
    if let Some(task) = election {
        modules.adopt("leader_election", stop, task);
    }
    Ok(leading)
}

/// This replica's name in the leader Lease, which must differ between replicas: the pod's
/// name (`POD_NAME` from the downward API, else `HOSTNAME`, which Kubernetes sets to it), and
/// the process id only outside a pod — in a container it is 1 in every replica, and replicas
/// of one name would each take the others' lease for their own.
fn replica_identity(pod_name: Option<String>, hostname: Option<String>, pid: u32) -> String {
    [pod_name, hostname]
        .into_iter()
        .flatten()
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| format!("agentk-{pid}"))
}

fn gitops_timing(cli: &Cli) -> gitops::Timing {
    gitops::Timing {
        resync_interval: cli.gitops_resync_interval,
        retry: tether_tunnel_agent::Backoff {
            initial: cli.gitops_retry_interval,
            max: cli.gitops_retry_interval.max(Duration::from_secs(60)),
            factor: 2.0,
            jitter: 0.1,
        },
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the Pod) or Ctrl-C.
async fn wait_for_termination() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The command line with the required flags and `extra`.
    fn parse_cli(extra: &[&str]) -> Result<Cli, clap::Error> {
        let required = [
            "agentk",
            "--kas-address",
            "grpc://kas:8150",
            "--token-file",
            "t",
        ];
        Cli::try_parse_from(required.iter().chain(extra))
    }

    /// A duration flag past a year is refused before agentk starts, naming the flag, rather
    /// than overflowing the clock arithmetic later.
    #[test]
    fn duration_flags_over_a_year_are_refused_naming_the_flag() {
        let parse = |value: &str| {
            parse_cli(&["--gitops-resync-interval", value]).map(|c| c.gitops_resync_interval)
        };
        assert_eq!(parse("8760h").ok(), Some(MAX_FLAG_DURATION));
        let e = parse("8761h")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--gitops-resync-interval"), "{e}");
        assert!(e.contains("longer than the maximum of a year"), "{e}");
        assert!(parse("18446744073709551615s").is_err());
    }

    /// Intervals and timeouts have a floor, refused naming the flag (E14: `0s` and `1ms`
    /// resyncs were accepted and ran ~15 syncs a second).
    #[test]
    fn duration_flags_under_their_floor_are_refused_naming_the_flag() {
        for (flag, value) in [
            ("--gitops-resync-interval", "0s"),
            ("--gitops-resync-interval", "1ms"),
            ("--gitops-retry-interval", "0s"),
            ("--keepalive-interval", "1ms"),
            ("--keepalive-timeout", "0s"),
        ] {
            let e = parse_cli(&[flag, value])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains(flag) && e.contains("shorter than the minimum of 1s"),
                "{flag} {value}: {e}"
            );
        }
        let c = parse_cli(&[
            "--gitops-resync-interval",
            "1s",
            "--tunnel-drain-timeout",
            "0s",
        ])
        .expect("at the floor, and a drain of 0 s");
        assert_eq!(c.gitops_resync_interval, SEC);
    }

    #[test]
    fn the_lease_identity_is_the_pod_name_then_the_hostname_then_the_pid() {
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            replica_identity(some("agentk-7d9c-x2"), some("host"), 1),
            "agentk-7d9c-x2"
        );
        // Without the downward API, a pod's hostname is its name: not `agentk-1` in every pod.
        assert_eq!(
            replica_identity(None, some("agentk-7d9c-x2"), 1),
            "agentk-7d9c-x2"
        );
        assert_eq!(
            replica_identity(some(""), some("agentk-7d9c-x2"), 1),
            "agentk-7d9c-x2"
        );
        assert_eq!(replica_identity(None, some(""), 42), "agentk-42");
        assert_eq!(replica_identity(None, None, 42), "agentk-42");
    }

    /// Without an election the replica applies unconditionally and is exported as the leader
    /// (`lease=""`), so dashboards and `TetherAgentNoLeader` see one instead of nothing.
    #[tokio::test]
    async fn without_an_election_the_leader_gauge_is_1() {
        let cli = parse_cli(&["--leader-election=false"]).unwrap();
        // Never contacted: without an election nothing reads or writes a Lease.
        let kube = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
            .unwrap();
        let metrics = leader::ElectionMetrics::default();
        let mut reg = prometheus_client::registry::Registry::with_prefix("agentk");
        metrics.register(&mut reg);
        let (_, config) = watch::channel(None);
        let stop = CancellationToken::new();
        let (_, task) = start_election(
            &cli,
            kube,
            (config, watch::channel(true).1),
            "agentk-a".into(),
            metrics,
            stop,
        )
        .unwrap();
        assert!(task.is_none(), "no election runs");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.lines().any(|l| l == r#"agentk_leader{lease=""} 1"#),
            "{text}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(humantime_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(humantime_duration("55s"), Ok(Duration::from_secs(55)));
        assert_eq!(humantime_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(humantime_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(humantime_duration("5 parsecs").is_err());
    }
}
