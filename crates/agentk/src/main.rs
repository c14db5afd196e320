//! agentk, the in-cluster agent: dials out to kas, keeps the reverse tunnel open and serves
//! what kas routes to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tether_transport::{ClientOptions, KasAddress};
use tether_tunnel_agent::{AgentMeta, ConnState, EchoHandler, Handler, Pool, PoolConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod configuration;
mod gitops;
mod kubeproxy;

#[derive(Parser, Debug)]
#[command(
    name = "agentk",
    version,
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
    /// Kubeconfig for running outside a cluster (default: in-cluster configuration).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where /metrics, /liveness and /readiness are served.
    #[arg(long, default_value = "[::]:8080")]
    observability_listen_address: SocketAddr,
    /// Log level until the agent configuration sets one: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: String,
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
    #[arg(long, default_value = "1m", value_parser = humantime_duration)]
    tunnel_idle_timeout: Duration,
    /// Re-apply each manifest project's last commit this often, to correct drift.
    #[arg(long, default_value = "5m", value_parser = humantime_duration)]
    gitops_resync_interval: Duration,
    /// First retry delay of a failed synchronization (doubling up to 1 minute).
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    gitops_retry_interval: Duration,
    /// Interval of HTTP/2 pings to kas (below typical 60 s load-balancer idle timeouts).
    #[arg(long, default_value = "55s", value_parser = humantime_duration)]
    keepalive_interval: Duration,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 30s, 1m or 500ms"))
}

/// `500ms`, `30s`, `1m`, `2h` (kept tiny to avoid a dependency for one flag type).
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

/// Reads the token; a trailing newline (as `echo` or a Secret volume leaves) is not part of it.
fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim_end_matches(['\n', '\r']).to_string();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token)
}

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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agentk failed");
            eprintln!("agentk: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let level = tether_observability::parse_level(&cli.log_level)?;
    let log = tether_observability::init_logging(level);
    // Every module logs inside this span, so `agent_id` appears on every line once kas told us.
    let agent_span = tracing::info_span!("agentk", agent_id = tracing::field::Empty);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let token = read_token(&cli.token_file)?;
    let address = KasAddress::parse(&cli.kas_address)?;
    let opts = ClientOptions {
        ca_cert_file: cli.ca_cert_file.clone(),
        tls_server_name: cli.tls_server_name.clone(),
        keepalive_interval: cli.keepalive_interval,
        ..ClientOptions::default()
    };
    let channel = tether_transport::connect_lazy(&address, &opts)?;
    let config_channel = channel.clone();
    let gitops_channel = channel.clone();
    let meta = AgentMeta {
        token,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pod_name: std::env::var("POD_NAME").unwrap_or_default(),
        pod_namespace: std::env::var("POD_NAMESPACE").unwrap_or_default(),
    };
    let kube_cfg = kube_config(cli.kubeconfig.as_deref()).await?;
    let config_meta = meta.clone();
    let meta_for_gitops = meta.clone();
    let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
    handlers.insert(
        tether_protocol::services::ECHO.to_string(),
        Arc::new(EchoHandler),
    );
    handlers.insert(
        tether_protocol::services::KUBERNETES_API.to_string(),
        Arc::new(kubeproxy::KubeApiHandler::new(&kube_cfg)?),
    );
    let pool = Arc::new(Pool::new(
        PoolConfig {
            min_idle: cli.tunnel_min_idle,
            max_streams: cli.tunnel_max_streams,
            scale_up_step: cli.tunnel_scale_up_step,
            idle_timeout: cli.tunnel_idle_timeout,
            ..PoolConfig::default()
        },
        channel,
        meta,
        handlers,
    ));

    let mut metrics = prometheus_client::registry::Registry::with_prefix("agentk");
    pool.register_metrics(&mut metrics);
    let shutdown = CancellationToken::new();

    // Ready only while connected to kas.
    let (ready_tx, ready) = watch::channel(false);
    let mut state = pool.state();
    tokio::spawn(async move {
        loop {
            let connected = *state.borrow_and_update() == ConnState::Connected;
            ready_tx.send_replace(connected);
            if state.changed().await.is_err() {
                break;
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(cli.observability_listen_address)
        .await
        .with_context(|| format!("binding {}", cli.observability_listen_address))?;
    let ep = tether_observability::Endpoint {
        metrics: Arc::new(Mutex::new(metrics)),
        ready,
    };
    let obs = tokio::spawn(
        tether_observability::serve(listener, ep, shutdown.clone())
            .instrument(tracing::info_span!("obs", mod_name = "observability")),
    );

    tracing::info!(
        kas_address = %address,
        kubeconfig = cli.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "agentk is starting"
    );
    let p = Arc::clone(&pool);
    let stop = shutdown.clone();
    let tunnel = tokio::spawn(
        async move { p.run(stop).await }.instrument(tracing::info_span!(
            parent: &agent_span,
            "tunnel",
            mod_name = "reverse_tunnel"
        )),
    );
    let (config_tx, config_rx) = watch::channel(None);
    let kube =
        kube::Client::try_from(kube_cfg.clone()).context("building the Kubernetes client")?;
    let syncer = Arc::new(tether_gitops_agent::sync::Syncer::new(kube));
    let timing = gitops::Timing {
        resync_interval: cli.gitops_resync_interval,
        retry: tether_tunnel_agent::Backoff {
            initial: cli.gitops_retry_interval,
            max: cli.gitops_retry_interval.max(Duration::from_secs(60)),
            factor: 2.0,
            jitter: 0.1,
        },
    };
    let gitops_task = tokio::spawn(
        gitops::run(
            gitops_channel,
            meta_for_gitops,
            syncer,
            config_rx,
            timing,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!(
            parent: &agent_span,
            "gitops",
            mod_name = "gitops"
        )),
    );
    let config = tokio::spawn(
        configuration::run(
            config_channel,
            config_meta,
            log.clone(),
            config_tx,
            agent_span.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!(
            parent: &agent_span,
            "configuration",
            mod_name = "agent_configuration"
        )),
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("agentk is stopping");
    shutdown.cancel();
    let _ = tunnel.await;
    let _ = config.await;
    let _ = gitops_task.await;
    let _ = obs.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailing_newline_is_not_part_of_the_token() {
        let dir = std::env::temp_dir().join(format!("agentk-token-{}", std::process::id()));
        std::fs::write(&dir, "tether_abc\n").expect("write");
        assert_eq!(read_token(&dir).expect("token"), "tether_abc");
        std::fs::write(&dir, "tether_abc\r\n").expect("write");
        assert_eq!(read_token(&dir).expect("token"), "tether_abc");
        std::fs::write(&dir, "\n").expect("write");
        assert!(read_token(&dir).is_err());
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("55s"), Some(Duration::from_secs(55)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5 parsecs"), None);
    }
}
