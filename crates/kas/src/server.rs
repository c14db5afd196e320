//! Starting kas: store, registry, the agent listener (gRPC and WebSocket on one port), the
//! internal API and the observability endpoint; and stopping it cleanly.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use tether_protocol::tunnel::reverse_tunnel_server::ReverseTunnelServer;
use tether_store::{SqliteStore, Store};
use tether_transport::{AgentConnectInfo, AgentIo};
use tether_tunnel_server::{Registry, TunnelService};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::api::{self, ApiState};
use crate::auth::{AdminToken, StoreAuthenticator};
use crate::config::Config;
use crate::gitops::{GitOpsService, SyncStates};
use tether_configuration_server::{ConfigService, ConfigStates};
use tether_git_source::{ProjectSpec, Sources};
use tether_protocol::agent_configuration::agent_configuration_server::AgentConfigurationServer;
use tether_protocol::gitops::git_ops_server::GitOpsServer;

/// A running kas.
#[derive(Debug)]
pub struct Running {
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub observability_addr: SocketAddr,
    pub kubernetes_api_addr: SocketAddr,
    /// The webhook listener, when `webhooks.listen` is configured.
    pub webhooks_addr: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub sources: Arc<Sources>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Asks every part to stop.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Stops and waits (bounded) for the parts to finish.
    pub async fn shutdown(self, grace: Duration) {
        self.registry.shutdown();
        self.sources.shutdown();
        self.shutdown.cancel();
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("Some listeners did not stop within the grace period");
        }
        self.store.close().await;
    }

    /// Resolves when shutdown was requested.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }
}

/// Live transport connections from agents, for metrics and leak checks.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// An agent connection that keeps [`ConnectionCount`] right however it ends.
struct Counted {
    io: AgentIo,
    count: Arc<ConnectionCount>,
    gauge: Gauge,
}

impl Counted {
    fn new(io: AgentIo, count: Arc<ConnectionCount>, gauge: Gauge) -> Self {
        count.0.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        Self { io, count, gauge }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count.0.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

impl Connected for Counted {
    type ConnectInfo = AgentConnectInfo;
    fn connect_info(&self) -> AgentConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener to {addr}"))
}

/// Starts every part of kas and returns once all listeners are bound.
pub async fn start(cfg: Config) -> Result<Running> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
    let sqlite = cfg.sqlite_path();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&sqlite)
            .await
            .with_context(|| format!("opening the database {}", sqlite.display()))?,
    );
    let admin_file = cfg.admin_token_file();
    let admin = AdminToken::load_or_create(&admin_file)
        .with_context(|| format!("reading or creating {}", admin_file.display()))?;

    let shutdown = CancellationToken::new();
    let registry = Arc::new(Registry::new());
    let connections = Arc::new(ConnectionCount::default());
    let conn_gauge = Gauge::default();
    let mut metrics = MetricsRegistry::with_prefix("kas");
    let guards = crate::limits::Guards::new(&cfg.rate_limits, &mut metrics);
    let auth = Arc::new(StoreAuthenticator {
        store: Arc::clone(&store),
        guard: Arc::clone(&guards.agent),
    });
    registry.register_metrics(&mut metrics);
    metrics.register(
        "agent_connections",
        "Open transport connections from agents",
        conn_gauge.clone(),
    );
    let listener_metrics = crate::listener::ListenerMetrics::default();
    listener_metrics.register(&mut metrics);
    let metrics = Arc::new(Mutex::new(metrics));
    let mut tasks = vec![guards.spawn_summaries(shutdown.clone())];
    check_limits(&cfg);

    // Git mirrors of every project with a repository.
    let sources = Sources::new(
        cfg.git_cache_dir(),
        cfg.git.poll_interval,
        cfg.git.fetch_timeout,
    );
    for p in store.list_projects().await.context("listing projects")? {
        if let Err(e) = sources.upsert(project_spec(&p)?) {
            tracing::error!(project = %p.path, error = %e, "Cannot mirror the project");
        }
    }
    let config_states = Arc::new(ConfigStates::default());
    let sync_states = Arc::new(SyncStates::new(Arc::clone(&store)));
    config_states
        .load(store.as_ref())
        .await
        .context("loading the agents' configurations in force")?;

    // Agent listener: gRPC over HTTP/2 and over WebSocket on one port, TLS when configured.
    let l = &cfg.agent.listen;
    let tls = match (&l.certificate_file, &l.key_file) {
        (Some(c), Some(k)) => {
            Some(tether_transport::load_server_tls(c, k).with_context(|| {
                format!("loading the agent listener's TLS files {}", c.display())
            })?)
        }
        _ => None,
    };
    let listener = bind("agent", l.address).await?;
    let agent_addr = listener.local_addr()?;
    let conns = Arc::clone(&connections);
    let limits = l.limits(crate::config::AGENT_LIMITS);
    let options = tether_transport::AcceptOptions {
        handshake_timeout: limits.handshake_timeout,
        limits: limits.connections(),
        events: Arc::new(listener_metrics.events("agent")),
    };
    let incoming = tether_transport::incoming_with(listener, tls, options)
        .map(move |r| r.map(|io| Counted::new(io, Arc::clone(&conns), conn_gauge.clone())));
    let service = ReverseTunnelServer::new(TunnelService::new(Arc::clone(&registry), auth.clone()))
        .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE);
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(tether_transport::STREAM_WINDOW)
        .initial_connection_window_size(tether_transport::CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(cfg.agent.keepalive_interval))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_connection_age(cfg.agent.max_connection_age)
        .max_connection_age_grace(cfg.agent.max_connection_age_grace)
        .add_service(service)
        .add_service(AgentConfigurationServer::new(ConfigService {
            auth: auth.clone(),
            store: Arc::clone(&store),
            sources: Arc::clone(&sources),
            registry: Arc::clone(&registry),
            states: Arc::clone(&config_states),
        }))
        .add_service(
            GitOpsServer::new(GitOpsService {
                auth: auth.clone(),
                store: Arc::clone(&store),
                sources: Arc::clone(&sources),
                registry: Arc::clone(&registry),
                limits: cfg.gitops.limits(),
                reports: Arc::clone(&sync_states),
            })
            .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE),
        );
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "Agent listener failed");
        }
    }));
    tracing::info!(net_address = %agent_addr, "Agent listener is up");

    // Re-check tokens of live streams: bounds the life of streams of a token revoked elsewhere.
    let (reg, a, stop, every) = (
        Arc::clone(&registry),
        auth.clone(),
        shutdown.clone(),
        cfg.agent.token_recheck_interval,
    );
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let ended = reg.recheck_tokens(a.as_ref()).await;
                    if ended > 0 {
                        tracing::info!(streams = ended, "Ended streams of revoked tokens");
                    }
                }
                () = stop.cancelled() => break,
            }
        }
    }));

    // Shared by the proxy (tracks) and the internal API (revokes).
    let live_user_requests = Arc::new(crate::revocation::LiveUserRequests::default());

    // Internal API for the admin commands, and the webhooks on it or on their own listener.
    let state = ApiState {
        store: Arc::clone(&store),
        registry: Arc::clone(&registry),
        admin,
        tunnel_wait: cfg.agent.tunnel_wait_timeout,
        connections: Arc::clone(&connections),
        sources: Arc::clone(&sources),
        config_states: Arc::clone(&config_states),
        sync_states: Arc::clone(&sync_states),
        live_user_requests: Arc::clone(&live_user_requests),
        guards: guards.clone(),
    };
    let (api_addr, webhooks_addr) =
        start_api(&cfg, state, &listener_metrics, &shutdown, &mut tasks).await?;

    // Kubernetes API proxy for CI jobs (and later users).
    let k = &cfg.kubernetes_api;
    let k_listener = crate::listener::bind_http(
        "kubernetes_api",
        &k.listen,
        crate::config::KUBERNETES_API_LIMITS,
        &listener_metrics,
    )
    .await?;
    let kubernetes_api_addr = k_listener.listener.local_addr()?;
    let proxy_metrics = crate::kubeproxy::ProxyMetrics::default();
    if let Ok(mut m) = metrics.lock() {
        proxy_metrics.register(&mut m);
    }
    let proxy = crate::kubeproxy::Proxy {
        store: Arc::clone(&store),
        registry: Arc::clone(&registry),
        configs: Arc::clone(&config_states),
        verifier: Arc::new(tether_kubeproxy_server::OidcVerifier::new(
            k.ci_issuers.clone(),
            Arc::new(crate::jwks::HttpJwksFetcher::new(
                match &k.jwks_ca_file {
                    Some(f) => Some(std::fs::read(f).with_context(|| {
                        format!("reading kubernetes_api.jwks_ca_file {}", f.display())
                    })?),
                    None => None,
                }
                .as_deref(),
            )?),
        )),
        tunnel_wait: cfg.agent.tunnel_wait_timeout,
        path_prefix: k.path_prefix.clone(),
        metrics: proxy_metrics,
        public_url: k.public_url.clone(),
        ca_pem: match &k.ca_file {
            Some(f) => {
                let pem = std::fs::read(f)
                    .with_context(|| format!("reading kubernetes_api.ca_file {}", f.display()))?;
                // Every kubeconfig kas hands out embeds it: refuse to start rather than serve
                // kubeconfigs kubectl cannot use.
                tether_kubeproxy_server::check_ca_pem(&pem)
                    .with_context(|| format!("kubernetes_api.ca_file {}", f.display()))?;
                Some(pem)
            }
            None => None,
        },
        tls: k.listen.certificate_file.is_some(),
        agent_projects: Arc::default(),
        live_user_requests,
        guard: Arc::clone(&guards.kubernetes_api),
    };
    tasks.push(tokio::spawn(crate::kubeproxy::serve(
        k_listener,
        proxy,
        shutdown.clone(),
    )));
    tracing::info!(net_address = %kubernetes_api_addr, "Kubernetes API proxy is up");

    // Observability.
    let obs_listener = bind("observability", cfg.observability.listen.address).await?;
    let observability_addr = obs_listener.local_addr()?;
    let (_ready_tx, ready) = watch::channel(true);
    let ep = tether_observability::Endpoint { metrics, ready };
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = tether_observability::serve(obs_listener, ep, stop).await {
            tracing::error!(error = %e, "Observability endpoint failed");
        }
    }));

    Ok(Running {
        agent_addr,
        api_addr,
        observability_addr,
        kubernetes_api_addr,
        webhooks_addr,
        registry,
        store,
        sources,
        shutdown,
        tasks,
    })
}

/// Serves the internal API (admin commands; webhooks too unless they have their own
/// listener) and the webhook listener if configured; returns their addresses.
async fn start_api(
    cfg: &Config,
    state: ApiState,
    metrics: &crate::listener::ListenerMetrics,
    shutdown: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(SocketAddr, Option<SocketAddr>)> {
    use crate::listener::{axum_handler, bind_http, serve_http};
    let l = &cfg.api.listen;
    let api = bind_http("api", l, crate::config::API_LIMITS, metrics).await?;
    let api_addr = api.listener.local_addr()?;
    if !api_addr.ip().is_loopback() && api.tls.is_none() {
        tracing::warn!(net_address = %api_addr, "The internal API is plain HTTP on a non-loopback address: configure api.listen TLS or keep it on loopback");
    }
    let app = if cfg.separate_webhooks() {
        api::admin_router(state.clone())
    } else {
        api::router(state.clone())
    };
    tasks.push(tokio::spawn(serve_http(
        api,
        axum_handler(app),
        shutdown.clone(),
    )));
    tracing::info!(net_address = %api_addr, "Internal API is up");
    let Some(w) = &cfg.webhooks.listen else {
        return Ok((api_addr, None));
    };
    let hooks = bind_http("webhooks", w, crate::config::WEBHOOKS_LIMITS, metrics).await?;
    let hooks_addr = hooks.listener.local_addr()?;
    let app = axum_handler(api::webhook_router(state));
    tasks.push(tokio::spawn(serve_http(hooks, app, shutdown.clone())));
    tracing::info!(net_address = %hooks_addr, "Webhook listener is up");
    Ok((api_addr, Some(hooks_addr)))
}

/// Warns if the listeners' caps together could exhaust the process's file descriptors.
fn check_limits(cfg: &Config) {
    use crate::config::{AGENT_LIMITS, API_LIMITS, KUBERNETES_API_LIMITS, WEBHOOKS_LIMITS};
    let mut total = [
        cfg.agent.listen.limits(AGENT_LIMITS),
        cfg.kubernetes_api.listen.limits(KUBERNETES_API_LIMITS),
        cfg.api.listen.limits(API_LIMITS),
    ]
    .iter()
    .fold(0usize, |sum, l| sum.saturating_add(l.max_connections));
    if let Some(w) = &cfg.webhooks.listen {
        total = total.saturating_add(w.limits(WEBHOOKS_LIMITS).max_connections);
    }
    crate::listener::check_descriptor_budget(total);
}

/// What the mirrors need to know of a stored project.
pub fn project_spec(p: &tether_store::Project) -> Result<ProjectSpec> {
    let remote = match &p.remote {
        None => None,
        Some(r) => {
            let mut remote = tether_git_source::Remote::parse(r)
                .with_context(|| format!("project {}: remote {r}", p.path))?;
            if let Some(file) = &p.credentials_file {
                let creds = tether_git_source::Credentials::from_file(file)
                    .with_context(|| format!("project {}: credentials file {file}", p.path))?;
                remote = remote
                    .with_credentials(creds)
                    .with_context(|| format!("project {}: credentials", p.path))?;
            }
            Some(remote)
        }
    };
    Ok(ProjectSpec {
        id: p.id,
        path: p.path.clone(),
        remote,
    })
}
