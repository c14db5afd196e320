//! Starting kas as an explicit list of modules — store, limits, registry, sources,
//! configuration, gitops, agent listener (tunnel), internal API, webhooks, Kubernetes API proxy,
//! web UI, observability — each started with its dependencies and stopped in reverse order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use tether_protocol::tunnel::reverse_tunnel_server::ReverseTunnelServer;
use tether_store::Store;
use tether_tunnel_server::{Authenticator, Registry, TunnelService};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::auth::{AdminToken, StoreAuthenticator};
use crate::config::Config;
use crate::connections::{ConnectionCount, Counted};
use crate::limits::Guards;
use crate::listener::ListenerMetrics;
use crate::modules::{Handle, Modules};
use crate::projects::StoredProjects;
use crate::token_use::TokenUse;
use tether_configuration_server::{ConfigService, ConfigStates};
use tether_git_source::Sources;
use tether_gitops_server::{GitOpsDeps, GitOpsModule, GitOpsService};
use tether_notifications::Notifier;

use crate::cluster::{Cluster, ClusterEvent};
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
    /// The web UI, when `web.listen` is configured.
    pub web_addr: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub sources: Arc<Sources>,
    /// The push webhook deliveries the web UI shows.
    pub deliveries: Arc<api::Deliveries>,
    shutdown: CancellationToken,
    /// Cancelled when kas starts stopping: readiness turns false for good.
    draining: CancellationToken,
    modules: Modules,
}

impl Running {
    /// Asks every part to stop.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// The first step of stopping: not ready from now on, everything still served for
    /// `delay`, so load balancers stop sending new connections before the listeners close
    /// (Kubernetes removes a terminating Pod's endpoints only after it got SIGTERM).
    pub async fn drain(&self, delay: Duration) {
        self.draining.cancel();
        if delay.is_zero() {
            return;
        }
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "Not ready; still serving until the shutdown delay has passed"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// Stops the modules in reverse start order and waits (bounded) for them to finish:
    /// `grace` covers the tunnels' drain (`shutdown_timeout`) plus [`CLOSE_GRACE`].
    pub async fn shutdown(self, grace: Duration) {
        self.modules.shutdown(grace).await;
    }

    /// Resolves when shutdown was requested.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }
}

/// What kas's parts get, beyond `shutdown_timeout`, to close once the tunnels are drained
/// (the store last).
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener to {addr}"))
}

/// What the modules share, filled in as they start.
struct Shared {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    guards: Guards,
    auth: Arc<dyn Authenticator>,
    metrics: MetricsRegistry,
    listener_metrics: ListenerMetrics,
    /// Tells receivers about failed/recovered syncs and refusals (a no-op without receivers).
    notifier: Notifier,
    /// Redis, shared with the other replicas (`redis:`); `None` for a single kas.
    cluster: Option<Cluster>,
    /// Routing to the replica holding an agent's tunnels (`peers:`).
    peers: Option<crate::peers::Peers>,
    /// The stored projects as the mirrors last took them.
    projects: Arc<Mutex<StoredProjects>>,
    /// Bumped at each (re)subscription to Redis: revocations published while this replica
    /// was not subscribed never come, so both token re-checks run at once.
    recheck_now: tokio::sync::watch::Sender<u64>,
}

/// Starts every module of kas, in order, and returns once all listeners are bound.
pub async fn start(cfg: Config) -> Result<Running> {
    // Before anything starts, and before the database is opened and migrated: a kas that
    // refuses to start (its renderers cannot fit its memory) must not leave behind a schema
    // the version it replaced may not open, so that rolling back works.
    check_limits(&cfg);
    let render = render_config(&cfg)?;
    let shutdown = CancellationToken::new();
    let mut modules = Modules::new(shutdown.clone());
    let mut metrics = new_metrics();
    let (store, admin, h) = start_store(&cfg, &mut metrics, modules.handle("store")).await?;
    modules.push(h);
    let (guards, h) = start_limits(&cfg, &mut metrics, modules.handle("limits"));
    modules.push(h);
    let (used, h) = start_token_use(&store, modules.handle("token-use"));
    modules.push(h);
    let auth: Arc<dyn Authenticator> = Arc::new(StoreAuthenticator {
        store: Arc::clone(&store),
        guard: Arc::clone(&guards.agent),
        used,
    });
    let registry = Registry::new().with_max_streams_per_agent(cfg.agent.max_streams_per_agent);
    let (registry, h) = start_registry(
        registry,
        &mut metrics,
        cfg.shutdown_timeout,
        modules.handle("registry"),
    );
    modules.push(h);
    let (notifier, h) =
        start_notifications(&cfg, &store, &mut metrics, modules.handle("notifications"))?;
    modules.push(h);
    let cluster = connect_cluster(&cfg, &mut metrics).await?;
    let (connections, conn_gauge) = connection_count(&mut metrics);
    let listener_metrics = ListenerMetrics::default();
    listener_metrics.register(&mut metrics);
    let h = modules.handle("certificates");
    let task = tokio::spawn(
        listener_metrics
            .certificates
            .clone()
            .run(Modules::shutdown_of(&h)),
    );
    modules.push(h.task(task));
    let mut sh = Shared {
        store,
        registry,
        guards,
        auth,
        metrics,
        listener_metrics,
        notifier,
        cluster,
        peers: None,
        projects: Arc::default(),
        recheck_now: tokio::sync::watch::Sender::new(0),
    };
    let (sources, h) = start_sources(&cfg, &mut sh, modules.handle("sources")).await?;
    modules.push(h);
    let several = cfg.peers.is_some() && sh.cluster.is_some();
    let (config_states, configuration, h) = start_configuration(
        &mut sh,
        (&sources, several, cfg.gitops.manifest_access()),
        modules.handle("configuration"),
    )
    .await?;
    modules.push(h);
    let access = Arc::new(crate::config_in_force::AgentProjects {
        configs: Arc::clone(&config_states),
        store: Arc::clone(&sh.store),
        registry: Arc::clone(&sh.registry),
        several,
        manifest_access: cfg.gitops.manifest_access(),
    });
    let (gitops, h) = start_gitops(
        &cfg,
        render,
        &mut sh,
        (&sources, access),
        modules.handle("gitops"),
    );
    modules.push(h);
    let (sync_states, gitops_controls) = (gitops.reports(), gitops.controls());
    let memory = crate::agent_memory::AgentMemory {
        configs: Arc::clone(&config_states),
        syncs: Arc::clone(&sync_states),
        controls: Arc::clone(&gitops_controls),
        projects: Arc::default(),
    };
    let renderer = gitops.renderer();
    let agent = AgentServices {
        connections: (Arc::clone(&connections), conn_gauge),
        configuration,
        gitops: gitops.service(),
    };
    let (agent_addr, agent_accept, h) =
        start_agent_listener(&cfg, &sh, agent, modules.handle("tunnel")).await?;
    modules.push(h);
    // Shared by the proxy (tracks) and the internal API (revokes).
    let trust = validated_tokens_trust(&cfg, sh.cluster.as_ref());
    let live_user_requests = Arc::new(crate::revocation::LiveUserRequests::new(trust));
    let followed = (&sources, &live_user_requests, &memory);
    let h = follow_cluster_events(&sh, followed, modules.handle("cluster"));
    modules.push(h);
    let h = start_peers(&cfg, &mut sh, modules.handle("peers")).await?;
    modules.push(h);
    let previews = previews(&cfg, &sh, (&sources, &config_states), renderer);
    let deliveries = Arc::new(api::Deliveries::default());
    let state = ApiState {
        store: Arc::clone(&sh.store),
        registry: Arc::clone(&sh.registry),
        admin,
        tunnel_wait: cfg.agent.tunnel_wait_timeout,
        connections,
        sources: Arc::clone(&sources),
        config_states: Arc::clone(&config_states),
        sync_states,
        gitops_controls,
        memory: memory.clone(),
        live_user_requests: Arc::clone(&live_user_requests),
        guards: sh.guards.clone(),
        cluster: sh.cluster.clone(),
        peers: sh.peers.clone(),
        previews: previews.clone(),
        deliveries: Arc::clone(&deliveries),
        manifest_access: cfg.gitops.manifest_access(),
    };
    if let Some(peers) = &sh.peers {
        peers.serve_admin(api::peer_admin_router(state.clone()));
    }
    let (api_addr, h) = start_api(&cfg, &sh, state.clone(), modules.handle("api")).await?;
    modules.push(h);
    let webhooks_addr = match &cfg.webhooks.listen {
        Some(w) => Some(start_webhooks(w, &sh, state.clone(), &mut modules).await?),
        None => None,
    };
    let proxy_deps = (memory, live_user_requests, previews);
    let (kubernetes_api_addr, proxy, h) =
        start_kubeproxy(&cfg, &mut sh, proxy_deps, modules.handle("kubeproxy")).await?;
    modules.push(h);
    let web_addr = match &cfg.web.listen {
        Some(l) => {
            let parts = (state, proxy, agent_addr);
            let (addr, h) = start_web(&cfg, l, &sh, parts, modules.handle("web")).await?;
            modules.push(h);
            Some(addr)
        }
        None => None,
    };
    let draining = CancellationToken::new();
    let checks = (Arc::clone(&sh.store), sh.cluster.clone(), draining.clone());
    let obs_listener = crate::listener::bind_http(
        "observability",
        &cfg.observability.listen,
        crate::config::OBSERVABILITY_LIMITS,
        &sh.listener_metrics,
    )
    .await?;
    let (observability_addr, h) = start_observability(
        obs_listener,
        sh.metrics,
        checks,
        modules.handle("observability"),
    )?;
    modules.push(h);
    agent_accept.open(agent_addr);
    Ok(Running {
        agent_addr,
        api_addr,
        observability_addr,
        kubernetes_api_addr,
        webhooks_addr,
        web_addr,
        registry: sh.registry,
        store: sh.store,
        sources,
        deliveries,
        shutdown,
        draining,
        modules,
    })
}

/// kas's metrics registry, starting with which build runs.
fn new_metrics() -> MetricsRegistry {
    let mut metrics = MetricsRegistry::with_prefix("kas");
    tether_observability::register_build_info(
        &mut metrics,
        tether_build_info::VERSION,
        tether_build_info::COMMIT,
    );
    metrics
}

/// The count of agent connections, and its gauge.
fn connection_count(metrics: &mut MetricsRegistry) -> (Arc<ConnectionCount>, Gauge) {
    let gauge = Gauge::default();
    metrics.register(
        "agent_connections",
        "Open transport connections from agents",
        gauge.clone(),
    );
    (Arc::new(ConnectionCount::default()), gauge)
}

/// The store (its failures counted) and the admin token; the store closes last.
async fn start_store(
    cfg: &Config,
    metrics: &mut MetricsRegistry,
    handle: Handle,
) -> Result<(Arc<dyn Store>, AdminToken, Handle)> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
    let location = cfg.database_location();
    let opened = crate::database::open_followed(cfg, Modules::shutdown_of(&handle))
        .await
        .with_context(|| format!("opening the database {location}"))?;
    let store_metrics = crate::store_metrics::StoreMetrics::default();
    store_metrics.register(metrics);
    let bound = opened.operation_timeout;
    let store = crate::store_metrics::Metered::wrap(opened.store, store_metrics, bound);
    let handle = match opened.follower {
        Some(task) => handle.task(task),
        None => handle,
    };
    let admin_file = cfg.admin_token_file();
    let admin = AdminToken::load_or_create(&admin_file)
        .with_context(|| format!("reading or creating {}", admin_file.display()))?;
    let closing = Arc::clone(&store);
    let handle = handle.on_close(async move { closing.close().await });
    Ok((store, admin, handle))
}

/// When agent tokens were last used, written in batches; stopped after the tunnels (it writes
/// once more then) and before the store.
fn start_token_use(store: &Arc<dyn Store>, handle: Handle) -> (Arc<TokenUse>, Handle) {
    let used = Arc::new(TokenUse::new(Arc::clone(store)));
    let task = tokio::spawn(Arc::clone(&used).run(Modules::shutdown_of(&handle)));
    (used, handle.task(task))
}

/// The limits on failed authentication, and their periodic summary log.
fn start_limits(cfg: &Config, metrics: &mut MetricsRegistry, handle: Handle) -> (Guards, Handle) {
    let guards = Guards::new(&cfg.rate_limits, cfg.redis.is_some(), metrics);
    let task = guards.spawn_summaries(Modules::shutdown_of(&handle));
    (guards, handle.task(task))
}

/// The registry of agents' tunnels. On stop it drains (idle tunnels end, so agents reconnect
/// elsewhere, while requests in flight on busy ones finish) for at most `drain_timeout`, and
/// only then ends what is left: ending every tunnel at once cut the request being served on
/// them with a 502 at every rollout.
fn start_registry(
    registry: Registry,
    metrics: &mut MetricsRegistry,
    drain_timeout: Duration,
    handle: Handle,
) -> (Arc<Registry>, Handle) {
    let registry = Arc::new(registry);
    registry.register_metrics(metrics);
    let stop = Modules::shutdown_of(&handle);
    let draining = Arc::clone(&registry);
    let task = tokio::spawn(async move {
        stop.cancelled().await;
        let drained = tokio::time::timeout(drain_timeout, draining.drained()).await;
        if drained.is_err() {
            tracing::info!(
                open_streams = draining.stats().open_streams,
                "Requests still in flight on agent tunnels at the end of shutdown_timeout (watches, exec, port-forward): ending them"
            );
        }
        draining.shutdown();
    });
    // Drained at the stop signal itself, not when the task gets to run: the streams the
    // other parts end as they stop must see kas stopping (see `Registry::is_shutting_down`).
    let stopping = Arc::clone(&registry);
    let handle = handle.task(task).on_stop(move || stopping.drain());
    (registry, handle)
}

/// Redis, when configured: kas does not start without it (it would miss other replicas'
/// revocations from the first moment).
async fn connect_cluster(cfg: &Config, metrics: &mut MetricsRegistry) -> Result<Option<Cluster>> {
    let Some(redis) = &cfg.redis else {
        return Ok(None);
    };
    let cluster = Cluster::connect(redis)
        .await
        .with_context(|| format!("connecting to Redis at {}", redis.url))?;
    cluster.register_metrics(metrics);
    tracing::info!(url = %redis.url, "Connected to Redis: revocations reach every replica");
    Ok(Some(cluster))
}

/// When the personal access tokens validated lately may be used without asking the database:
/// only while this replica hears of every revocation (see [`crate::validated_tokens`]).
fn validated_tokens_trust(
    cfg: &Config,
    cluster: Option<&Cluster>,
) -> crate::validated_tokens::Trust {
    use crate::validated_tokens::Trust;
    match (cluster, cfg.database_location()) {
        (Some(cluster), _) => Trust::WhileSubscribed(cluster.clone()),
        // A database file of this process's own: no other replica revokes in it.
        (None, crate::config::DatabaseLocation::Sqlite(_)) => Trust::Always,
        (None, crate::config::DatabaseLocation::Postgres(_)) => Trust::Never,
    }
}

/// Applies what replicas publish: revoked tokens' tunnels, streams and people's open requests
/// end here too; a push webhook another replica took makes this one fetch the project too;
/// other replicas' rate-limit counts are added to this one's (and this one's are published);
/// an agent deleted through another replica is forgotten here. Rotated Redis credential files
/// are followed too.
fn follow_cluster_events(
    sh: &Shared,
    (sources, live_user_requests, memory): (
        &Arc<Sources>,
        &Arc<crate::revocation::LiveUserRequests>,
        &crate::agent_memory::AgentMemory,
    ),
    handle: Handle,
) -> Handle {
    let Some(cluster) = sh.cluster.clone() else {
        return handle;
    };
    let (registry, live) = (Arc::clone(&sh.registry), Arc::clone(live_user_requests));
    let (sources, me) = (Arc::clone(sources), cluster.replica());
    let guards = sh.guards.clone();
    let controls = Arc::clone(&memory.controls);
    let suspensions = tokio::spawn(crate::operate::follow_suspensions(
        Arc::clone(&sh.store),
        Arc::clone(&controls),
        Modules::shutdown_of(&handle),
    ));
    let deleted = crate::agent_memory::DeletedAgents {
        memory: memory.clone(),
        store: Arc::clone(&sh.store),
        registry: Arc::clone(&sh.registry),
        auth: Arc::clone(&sh.auth),
    };
    let deleted = tokio::spawn(deleted.follow(Modules::shutdown_of(&handle)));
    let memory = memory.clone();
    let configs = Arc::clone(&memory.configs);
    let store = Arc::clone(&sh.store);
    let projects_changed = Arc::new(tokio::sync::Notify::new());
    let projects = tokio::spawn(follow_projects(
        (
            Arc::clone(&sh.store),
            Arc::clone(&sources),
            Arc::clone(&sh.projects),
        ),
        Arc::clone(&projects_changed),
        Modules::shutdown_of(&handle),
    ));
    let apply = move |event: ClusterEvent| match event {
        ClusterEvent::AgentToken { id } => ended(event, registry.revoke_token(id)),
        ClusterEvent::UserToken { id } => ended(event, live.revoke(id)),
        ClusterEvent::Pushed { project, from } if from != me => {
            if sources.trigger(project) {
                tracing::info!(
                    project_id = project,
                    "Push webhook taken by another replica: fetching now"
                );
            }
        }
        ClusterEvent::Pushed { .. } => {}
        ClusterEvent::Projects { from } if from != me => projects_changed.notify_one(),
        ClusterEvent::Projects { .. } => {}
        ClusterEvent::AgentDeleted { agent_id } => memory.forget(agent_id),
        ClusterEvent::Suspensions { agent_id, from } if from != me => {
            controls.suspensions_changed(agent_id)
        }
        ClusterEvent::Suspensions { .. } => {}
        ClusterEvent::Resync {
            agent_id,
            project_id,
            id,
            from,
        } if from != me => {
            controls.resync(agent_id, project_id, tether_gitops_server::ResyncId(id));
        }
        ClusterEvent::Resync { .. } => {}
        ClusterEvent::ConfigInForce { agent_id, from } if from != me => {
            let (configs, store) = (Arc::clone(&memory.configs), Arc::clone(&store));
            drop(tokio::spawn(async move {
                configs.reload(store.as_ref(), agent_id).await;
            }));
        }
        ClusterEvent::ConfigInForce { .. } => {}
        ClusterEvent::Limits { from, counts } if from != me => guards.apply_shared(&counts),
        ClusterEvent::Limits { .. } => {}
    };
    let stop = Modules::shutdown_of(&handle);
    let sharing = sh.guards.spawn_sharing(cluster.clone(), stop.clone());
    let credentials = tokio::spawn(cluster.clone().follow_credentials(stop.clone()));
    let subscribed = Arc::new(Subscribed::default());
    let configs = (Arc::clone(&configs), Arc::clone(&sh.store));
    let reread = tokio::spawn(reread_configs(
        configs,
        Arc::clone(&subscribed),
        stop.clone(),
    ));
    let recheck_now = sh.recheck_now.clone();
    let resubscribed = move || {
        subscribed.happened();
        recheck_now.send_modify(|n| *n = n.wrapping_add(1));
    };
    let task = tokio::spawn(cluster.follow(apply, resubscribed, stop));
    handle
        .task(task)
        .task(reread)
        .task(sharing)
        .task(projects)
        .task(credentials)
        .task(suspensions)
        .task(deleted)
}

/// How often a replica re-reads the projects even when no replica said they changed.
const PROJECTS_REREAD: Duration = Duration::from_secs(30);

/// Keeps this replica's mirrors on the stored projects: at once when another replica says it
/// changed one, and every [`PROJECTS_REREAD`] (Redis may have dropped the message).
async fn follow_projects(
    (store, sources, seen): (Arc<dyn Store>, Arc<Sources>, Arc<Mutex<StoredProjects>>),
    changed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    crate::modules::every_or_notified(PROJECTS_REREAD, &changed, stop, || {
        crate::projects::follow_store(store.as_ref(), &sources, &seen)
    })
    .await;
}

/// How often a replica re-reads every agent's configuration in force even when it heard of no
/// change: a `ConfigInForce` message is lost when its publish failed, or when it came while
/// this replica's subscription was down unnoticed (a configuration no longer in force, its
/// removed `ci_access` too, kept authorizing here meanwhile).
const CONFIGS_REREAD: Duration = Duration::from_secs(30);

/// Every how many re-reads all records are read, not only those written lately.
const CONFIGS_FULL_REREAD_EVERY: u32 = 10;
/// How far behind this replica's clock another replica's may be: records are stamped with
/// their writer's clock, so a re-read of what changed looks this much further back.
const WRITER_CLOCK_SLACK: i64 = 60;

/// A (re)subscription to the Redis channel: what was published while unsubscribed never
/// comes, so the next re-read reads every record.
#[derive(Debug, Default)]
struct Subscribed {
    wake: tokio::sync::Notify,
    pending: std::sync::atomic::AtomicBool,
}

impl Subscribed {
    fn happened(&self) {
        self.pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn take(&self) -> bool {
        self.pending
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Which records a re-read reads (pure): every one after a (re)subscription, at the first pass
/// and every [`CONFIGS_FULL_REREAD_EVERY`] passes (a writer whose clock is further behind
/// than the slack); otherwise those written since the last successful pass began, less
/// [`WRITER_CLOCK_SLACK`]. Reading every record every 30 s cost each replica a read and a
/// decode of every agent's configuration (both the one in force and the previous one).
#[derive(Debug, Default)]
struct RereadPlan {
    passes: u32,
    last_start: Option<i64>,
}

impl RereadPlan {
    /// `None`: read every record; `Some(t)`: those written at or after `t`.
    fn since(&mut self, resubscribed: bool) -> Option<i64> {
        let periodic_full = self.passes.is_multiple_of(CONFIGS_FULL_REREAD_EVERY);
        self.passes = self.passes.wrapping_add(1);
        match self.last_start {
            Some(t) if !resubscribed && !periodic_full => Some(t - WRITER_CLOCK_SLACK),
            _ => None,
        }
    }

    /// A pass begun at `started` read what it was asked to.
    fn done(&mut self, started: i64) {
        self.last_start = Some(started);
    }
}

/// Re-reads the agents' configurations in force from the store after every subscription to
/// the Redis channel (all of them) and every [`CONFIGS_REREAD`] (see [`RereadPlan`]).
async fn reread_configs(
    (configs, store): (Arc<ConfigStates>, Arc<dyn Store>),
    subscribed: Arc<Subscribed>,
    stop: CancellationToken,
) {
    let plan = Mutex::new(RereadPlan::default());
    crate::modules::every_or_notified(CONFIGS_REREAD, &subscribed.wake, stop, || async {
        let since = lock_plan(&plan).since(subscribed.take());
        let started = unix_now();
        if reread_configs_once(&configs, store.as_ref(), since).await {
            lock_plan(&plan).done(started);
        }
    })
    .await;
}

fn lock_plan(p: &Mutex<RereadPlan>) -> std::sync::MutexGuard<'_, RereadPlan> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One re-read; whether it read what it was asked to.
async fn reread_configs_once(
    configs: &ConfigStates,
    store: &dyn Store,
    since: Option<i64>,
) -> bool {
    match configs.reload_all(store, since).await {
        Ok(changed) => {
            for agent_id in changed {
                // Mostly a new commit another replica serves (no message is sent for those).
                tracing::debug!(
                    agent_id,
                    "Another replica changed the agent's configuration in force; read it from the store"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot re-read the agents' configurations in force from the store; trying again later");
            return false;
        }
    }
    true
}

fn lock_projects(p: &Mutex<StoredProjects>) -> std::sync::MutexGuard<'_, StoredProjects> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Routing between replicas, when `peers` is configured: the private listener other replicas
/// forward requests to, and this replica's entries in the agent directory.
async fn start_peers(cfg: &Config, sh: &mut Shared, handle: Handle) -> Result<Handle> {
    let (Some(pc), Some(cluster)) = (&cfg.peers, sh.cluster.clone()) else {
        return Ok(handle);
    };
    let peers = crate::peers::Peers::new(pc, cluster, Arc::clone(&sh.registry))
        .with_context(|| format!("peers (secret_file {})", pc.secret_file.display()))?;
    let listener = bind("peers", pc.listen).await?;
    tracing::info!(address = %pc.listen, "Peers listener is up: requests for agents on other replicas are routed there");
    let stop = Modules::shutdown_of(&handle);
    let events = Arc::new(sh.listener_metrics.events("peers"));
    let gate = tether_transport::Gate::new(crate::config::peers_limits(pc), events);
    let serve = tokio::spawn(peers.clone().serve(listener, gate, stop.clone()));
    let directory = tokio::spawn(peers.clone().run_directory(stop));
    sh.peers = Some(peers);
    Ok(handle.task(serve).task(directory))
}

/// Logs what a revocation from any replica ended here.
fn ended(event: ClusterEvent, ended: usize) {
    if ended > 0 {
        tracing::info!(event = ?event, ended, "Ended what a revoked token opened on this replica");
    }
}

/// Notifications: the dispatcher sending the outbox's messages runs until kas stops (messages
/// not sent by then stay in the outbox for the next start).
fn start_notifications(
    cfg: &Config,
    store: &Arc<dyn Store>,
    metrics: &mut MetricsRegistry,
    handle: Handle,
) -> Result<(Notifier, Handle)> {
    let (notifier, dispatcher) = tether_notifications::start(&cfg.notifications, Arc::clone(store))
        .context("starting notifications")?;
    let Some(dispatcher) = dispatcher else {
        return Ok((notifier, handle));
    };
    dispatcher.register(metrics);
    let task = tokio::spawn(dispatcher.run(Modules::shutdown_of(&handle)));
    Ok((notifier, handle.task(task)))
}

/// What `kas agent diff` needs, for the internal API and the proxy.
fn previews(
    cfg: &Config,
    sh: &Shared,
    (sources, config_states): (&Arc<Sources>, &Arc<ConfigStates>),
    renderer: Arc<tether_gitops_server::Renderer>,
) -> crate::preview::Previews {
    crate::preview::Previews {
        store: Arc::clone(&sh.store),
        registry: Arc::clone(&sh.registry),
        sources: Arc::clone(sources),
        config_states: Arc::clone(config_states),
        limits: cfg.gitops.limits(),
        renderer,
        fetch_timeout: cfg.git.fetch_timeout,
        tunnel_wait: cfg.agent.tunnel_wait_timeout,
        peers: sh.peers.clone(),
    }
}

/// Git mirrors of every project with a repository, polled in the background.
async fn start_sources(
    cfg: &Config,
    sh: &mut Shared,
    handle: Handle,
) -> Result<(Arc<Sources>, Handle)> {
    let sources = Sources::new(
        cfg.git_cache_dir(),
        cfg.git.poll_interval,
        cfg.git.fetch_timeout,
    );
    sources.metrics().register(&mut sh.metrics);
    let listed = sh.store.list_projects().await.context("listing projects")?;
    let changes = lock_projects(&sh.projects).update(listed);
    // A project that cannot be mirrored is that project's problem, not every agent's.
    for p in changes.set {
        let mirrored = crate::projects::project_spec(&p).and_then(|s| Ok(sources.upsert(s)?));
        if let Err(e) = mirrored {
            tracing::error!(project = %p.path, error = %format!("{e:#}"), "Cannot mirror the project");
        }
    }
    // Mirrors of projects removed (or remotes changed) while kas was down: off the start path.
    let sweeping = Arc::clone(&sources);
    drop(tokio::task::spawn_blocking(move || sweeping.sweep_cache()));
    let stopping = Arc::clone(&sources);
    Ok((sources, handle.on_stop(move || stopping.shutdown())))
}

/// How often, with several replicas, the configurations in force that only other replicas'
/// Pods run are decided again (see `ConfigService::decide_again`): a killed replica's Pods stop
/// counting once its liveness key expires (10 s), and this follows within as long again.
const DECIDE_AGAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The agents' configuration streams: the configurations in force, loaded from the store so
/// kas authorizes requests right after a restart, and the gRPC service.
async fn start_configuration(
    sh: &mut Shared,
    (sources, several, manifest_access): (&Arc<Sources>, bool, tether_agent_config::ManifestAccess),
    handle: Handle,
) -> Result<(Arc<ConfigStates>, ConfigService, Handle)> {
    let config_states = Arc::new(ConfigStates::default());
    config_states.register(&mut sh.metrics);
    // With several replicas, what the agent replicas on the others run (see config_replicas).
    let shared = match (&sh.cluster, several) {
        (Some(cluster), true) => Some(Arc::new(crate::config_replicas::SharedRunning::new(
            cluster.clone(),
        ))),
        _ => None,
    };
    let handle = match &shared {
        Some(shared) => {
            let stop = Modules::shutdown_of(&handle);
            handle.task(tokio::spawn(Arc::clone(shared).refresh(stop)))
        }
        None => handle,
    };
    config_states
        .load(sh.store.as_ref())
        .await
        .context("loading the agents' configurations in force")?;
    let configuration = ConfigService {
        auth: sh.auth.clone(),
        store: Arc::clone(&sh.store),
        sources: Arc::clone(sources),
        registry: Arc::clone(&sh.registry),
        states: Arc::clone(&config_states),
        notifier: sh.notifier.clone(),
        several,
        directory: shared.map(|s| s as Arc<dyn tether_configuration_server::RunningDirectory>),
        manifest_access,
    };
    // Configuration states whose write failed are written again until they are stored.
    let retrying = configuration.clone();
    let retry = crate::modules::every(
        tether_configuration_server::STORE_RETRY,
        Modules::shutdown_of(&handle),
        move || {
            let retrying = retrying.clone();
            async move { retrying.store_again().await }
        },
    );
    let handle = handle.task(tokio::spawn(retry));
    let handle = if configuration.directory.is_some() {
        let (stop, deciding) = (Modules::shutdown_of(&handle), configuration.clone());
        let decide = crate::modules::every(DECIDE_AGAIN, stop, move || {
            let deciding = deciding.clone();
            async move { deciding.decide_again().await }
        });
        handle.task(tokio::spawn(decide))
    } else {
        handle
    };
    Ok((config_states, configuration, handle))
}

/// The renderers' settings, fitted into kas's container memory limit (see
/// [`tether_gitops_server::render::memory`]) and logged as in force.
fn render_config(cfg: &Config) -> Result<tether_gitops_server::RenderConfig> {
    use tether_gitops_server::render::memory;
    let mut render = cfg.gitops.render.config(&cfg.data_dir);
    // Remote bases are fetched as manifest projects are.
    render.remote_bases.fetch_timeout = cfg.git.fetch_timeout;
    let reserve = cfg.gitops.render.memory_reserve;
    let cgroup_limit = memory::cgroup_memory_limit();
    let configured = memory::RenderMemory {
        memory_limit: render.memory_limit,
        max_concurrent: render.max_concurrent,
    };
    let fitted = memory::fit(configured, reserve, cgroup_limit)?;
    if let Some(why) = &fitted.lowered {
        tracing::warn!(
            configured_memory_limit = configured.memory_limit,
            configured_max_concurrent = configured.max_concurrent,
            "{why}"
        );
    }
    render.memory_limit = fitted.effective.memory_limit;
    render.max_concurrent = fitted.effective.max_concurrent;
    tracing::info!(
        memory_limit = render.memory_limit,
        max_concurrent = render.max_concurrent,
        memory_reserve = reserve,
        cgroup_memory_limit = ?cgroup_limit,
        "Renderer memory"
    );
    Ok(render)
}

/// GitOps: the agents' sync reports and the gRPC service that sends them manifests.
fn start_gitops(
    cfg: &Config,
    render: tether_gitops_server::RenderConfig,
    sh: &mut Shared,
    (sources, access): (&Arc<Sources>, Arc<crate::config_in_force::AgentProjects>),
    handle: Handle,
) -> (GitOpsModule, Handle) {
    let gitops = GitOpsModule::new(GitOpsDeps {
        auth: sh.auth.clone(),
        store: Arc::clone(&sh.store),
        sources: Arc::clone(sources),
        registry: Arc::clone(&sh.registry),
        limits: cfg.gitops.limits(),
        renderer: Arc::new(tether_gitops_server::Renderer::new(render)),
        notifier: sh.notifier.clone(),
        access,
    });
    gitops.register(&mut sh.metrics);
    (gitops, handle)
}

/// The gRPC services of the agent listener besides the tunnel, and its connection count.
struct AgentServices {
    connections: (Arc<ConnectionCount>, Gauge),
    configuration: ConfigService,
    gitops: GitOpsServer<GitOpsService>,
}

/// Lets the agent listener accept connections once every other part of kas is up.
///
/// After a restart the whole fleet reconnects at once; accepting while the internal API,
/// the proxy and the health endpoints are still starting makes them wait behind thousands of
/// handshakes (19,000 agents: 5.5 s before the API answered). Until it is opened, connecting
/// agents wait in the kernel's backlog and retry. Dropped unopened (a later part failed to
/// start), the listener never serves.
struct AcceptGate(tokio::sync::oneshot::Sender<()>);

impl AcceptGate {
    fn open(self, addr: SocketAddr) {
        // The receiver is gone only if the listener task already ended (stopping).
        if self.0.send(()).is_ok() {
            tracing::info!(net_address = %addr, "Agent listener is up");
        }
    }
}

/// Agent listener: gRPC over HTTP/2 and over WebSocket on one port, TLS when configured;
/// and the periodic re-check of the tokens of live streams. Bound here (its place in the
/// stop order: after the proxy and the API, which route through its streams), accepting once
/// the returned gate is opened.
async fn start_agent_listener(
    cfg: &Config,
    sh: &Shared,
    services: AgentServices,
    handle: Handle,
) -> Result<(SocketAddr, AcceptGate, Handle)> {
    let l = &cfg.agent.listen;
    let tls = match (&l.certificate_file, &l.key_file) {
        (Some(c), Some(k)) => {
            let (tls, served) = tether_transport::load_served_tls(c, k).with_context(|| {
                format!("loading the agent listener's TLS files {}", c.display())
            })?;
            sh.listener_metrics.certificates.follow("agent", served);
            Some(tls)
        }
        _ => None,
    };
    let listener = bind("agent", l.address()).await?;
    let agent_addr = listener.local_addr()?;
    let (conns, conn_gauge) = services.connections;
    let limits = l.limits(crate::config::AGENT_LIMITS);
    let options = tether_transport::AcceptOptions {
        handshake_timeout: limits.handshake_timeout,
        limits: limits.connections(),
        events: Arc::new(sh.listener_metrics.events("agent")),
        auth_timeout: Some(cfg.agent.authentication_timeout),
        max_age: Some(tether_transport::max_age::MaxAge {
            age: cfg.agent.max_connection_age,
            grace: cfg.agent.max_connection_age_grace,
        }),
    };
    let service = ReverseTunnelServer::new(TunnelService::new(
        Arc::clone(&sh.registry),
        sh.auth.clone(),
    ))
    .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE);
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(tether_transport::STREAM_WINDOW)
        .initial_connection_window_size(tether_transport::CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(cfg.agent.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.agent.keepalive_timeout))
        // The age alone: tonic then sends GOAWAY at it; the grace is kept by the listener
        // (tether_transport::max_age), as tonic given both sends no GOAWAY at all.
        .max_connection_age(cfg.agent.max_connection_age)
        .max_concurrent_streams(cfg.agent.max_streams_per_connection)
        .add_service(service)
        .add_service(services.configuration.into_server())
        .add_service(services.gitops);
    let stop = Modules::shutdown_of(&handle);
    let (open, opened) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(async move {
        tokio::select! {
            r = opened => if r.is_err() { return },
            () = stop.cancelled() => return,
        }
        let incoming = tether_transport::incoming_with(listener, tls, options)
            .map(move |r| r.map(|io| Counted::new(io, Arc::clone(&conns), conn_gauge.clone())));
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "Agent listener failed");
        }
    });
    let recheck = spawn_token_recheck(
        Arc::clone(&sh.registry),
        sh.auth.clone(),
        (cfg.agent.token_recheck_interval, sh.recheck_now.subscribe()),
        Modules::shutdown_of(&handle),
    );
    Ok((
        agent_addr,
        AcceptGate(open),
        handle.task(serving).task(recheck),
    ))
}

/// Re-checks the tokens of live streams every `every`, and at once when `now` changes (a
/// resubscription to Redis): bounds the life of streams of a token revoked elsewhere.
fn spawn_token_recheck(
    reg: Arc<Registry>,
    auth: Arc<dyn Authenticator>,
    (every, mut now): (Duration, tokio::sync::watch::Receiver<u64>),
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while recheck_due(&mut tick, &mut now, &stop).await {
            let ended = reg.recheck_tokens(auth.as_ref()).await;
            if ended > 0 {
                tracing::info!(streams = ended, "Ended streams of revoked tokens");
            }
        }
    })
}

/// Waits for the next token re-check: the interval's tick or a resubscription to Redis;
/// `false` once kas stops.
async fn recheck_due(
    tick: &mut tokio::time::Interval,
    now: &mut tokio::sync::watch::Receiver<u64>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = tick.tick() => true,
        // A sender gone (no Redis) never wakes this again.
        Ok(()) = now.changed() => true,
        () = stop.cancelled() => false,
    }
}

/// The internal API for the admin commands (and the webhooks, unless they have their own
/// listener).
async fn start_api(
    cfg: &Config,
    sh: &Shared,
    state: ApiState,
    handle: Handle,
) -> Result<(SocketAddr, Handle)> {
    use crate::listener::{axum_handler, bind_http, serve_http};
    let l = &cfg.api.listen;
    let api = bind_http("api", l, crate::config::API_LIMITS, &sh.listener_metrics).await?;
    let api_addr = api.listener.local_addr()?;
    if !api_addr.ip().is_loopback() && api.tls.is_none() {
        tracing::warn!(net_address = %api_addr, "The internal API is plain HTTP on a non-loopback address: configure api.listen TLS or keep it on loopback");
    }
    let app = if cfg.separate_webhooks() {
        api::admin_router(state)
    } else {
        api::router(state)
    };
    let task = tokio::spawn(serve_http(
        api,
        axum_handler(app),
        Modules::shutdown_of(&handle),
    ));
    tracing::info!(net_address = %api_addr, "Internal API is up");
    Ok((api_addr, handle.task(task)))
}

/// The webhook listener, when `webhooks.listen` is configured; it joins the module list like
/// the others.
async fn start_webhooks(
    listen: &crate::config::Listen,
    sh: &Shared,
    state: ApiState,
    modules: &mut Modules,
) -> Result<SocketAddr> {
    use crate::listener::{axum_handler, bind_http, serve_http};
    let handle = modules.handle("webhooks");
    let hooks = bind_http(
        "webhooks",
        listen,
        crate::config::WEBHOOKS_LIMITS,
        &sh.listener_metrics,
    )
    .await?;
    let hooks_addr = hooks.listener.local_addr()?;
    let app = axum_handler(api::webhook_router(state));
    let task = tokio::spawn(serve_http(hooks, app, Modules::shutdown_of(&handle)));
    tracing::info!(net_address = %hooks_addr, "Webhook listener is up");
    modules.push(handle.task(task));
    Ok(hooks_addr)
}

/// What the proxy shares with the rest of kas.
type ProxyDeps = (
    crate::agent_memory::AgentMemory,
    Arc<crate::revocation::LiveUserRequests>,
    crate::preview::Previews,
);

/// The Kubernetes API proxy for CI jobs and users.
/// The verifier of CI job ID tokens, with kas's JWKS fetcher and `jwks_max_key_age`.
fn ci_verifier(k: &crate::config::KubernetesApi) -> Result<tether_kubeproxy_server::OidcVerifier> {
    let extra_ca = match &k.jwks_ca_file {
        Some(f) => Some(
            std::fs::read(f)
                .with_context(|| format!("reading kubernetes_api.jwks_ca_file {}", f.display()))?,
        ),
        None => None,
    };
    let fetcher = Arc::new(crate::jwks::HttpJwksFetcher::new(extra_ca.as_deref())?);
    let sources = k
        .ci_issuers
        .iter()
        .map(|i| (i.issuer.clone(), i.jwks.clone()));
    let cache = tether_kubeproxy_server::JwksCache::new(sources, fetcher)
        .with_max_key_age(k.jwks_max_key_age);
    Ok(tether_kubeproxy_server::OidcVerifier::with_cache(
        k.ci_issuers.clone(),
        cache,
    ))
}

async fn start_kubeproxy(
    cfg: &Config,
    sh: &mut Shared,
    (memory, live_user_requests, previews): ProxyDeps,
    handle: Handle,
) -> Result<(SocketAddr, crate::kubeproxy::Proxy, Handle)> {
    let k = &cfg.kubernetes_api;
    let k_listener = crate::listener::bind_http(
        "kubernetes_api",
        &k.listen,
        crate::config::KUBERNETES_API_LIMITS,
        &sh.listener_metrics,
    )
    .await?;
    let kubernetes_api_addr = k_listener.listener.local_addr()?;
    let proxy_metrics = crate::kubeproxy::ProxyMetrics::default();
    proxy_metrics.register(&mut sh.metrics);
    let live_access = Arc::new(crate::live_access::LiveAccess::default());
    let proxy = crate::kubeproxy::Proxy {
        live_access: Arc::clone(&live_access),
        store: Arc::clone(&sh.store),
        registry: Arc::clone(&sh.registry),
        configs: memory.configs,
        verifier: Arc::new(ci_verifier(k)?),
        tunnel_wait: cfg.agent.tunnel_wait_timeout,
        peers: sh.peers.clone(),
        path_prefix: k.path_prefix.clone(),
        metrics: proxy_metrics,
        public_url: k.public_url.clone(),
        ca_pem: match &k.ca_file {
            // Every kubeconfig kas hands out embeds it: refuse to start rather than serve
            // kubeconfigs kubectl cannot use; a renewed file that does not parse keeps the
            // previous CA.
            Some(f) => Some(Arc::new(
                crate::followed::Followed::load(f, "kubernetes_api.ca_file", read_ca_pem)
                    .map_err(|e| anyhow::anyhow!("kubernetes_api.ca_file {}: {e}", f.display()))?,
            )),
            None => None,
        },
        tls: k.listen.certificate_file.is_some(),
        agent_projects: memory.projects,
        live_user_requests,
        previews,
        guard: Arc::clone(&sh.guards.kubernetes_api),
        agents_in_force: Arc::default(),
        caller_slots: Arc::new(crate::caller_slots::CallerSlots::new(
            k.max_requests_per_caller,
            k.max_requests_per_project,
        )),
    };
    let task = tokio::spawn(crate::kubeproxy::serve(
        k_listener,
        proxy.clone(),
        Modules::shutdown_of(&handle),
    ));
    let recheck = tokio::spawn(recheck_user_tokens(
        Arc::clone(&sh.store),
        Arc::clone(&proxy.live_user_requests),
        (cfg.agent.token_recheck_interval, sh.recheck_now.subscribe()),
        Modules::shutdown_of(&handle),
    ));
    let access = tokio::spawn(crate::live_access::follow(
        live_access,
        (
            Arc::clone(&proxy.configs),
            Arc::clone(&sh.store),
            Arc::clone(&sh.registry),
            sh.peers.is_some(),
        ),
        Modules::shutdown_of(&handle),
    ));
    tracing::info!(net_address = %kubernetes_api_addr, "Kubernetes API proxy is up");
    let handle = handle.task(task).task(recheck).task(access);
    Ok((kubernetes_api_addr, proxy, handle))
}

/// Re-checks the personal access tokens of requests open through the proxy (every `every`,
/// and at once at a resubscription to Redis): a watch or an exec ends when its token expires,
/// and a revocation whose Redis message this replica missed still ends it. A store that does
/// not answer ends nothing (warn).
async fn recheck_user_tokens(
    store: Arc<dyn Store>,
    live: Arc<crate::revocation::LiveUserRequests>,
    (every, mut now): (Duration, tokio::sync::watch::Receiver<u64>),
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while recheck_due(&mut tick, &mut now, &stop).await {
        let ids = live.token_ids();
        if ids.is_empty() {
            continue;
        }
        match store.active_user_tokens(&ids).await {
            Ok(active) => {
                for id in live.end_inactive(&ids, &active) {
                    tracing::info!(
                        token_id = id,
                        "Ended the proxied requests of an expired or revoked personal access token"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, tokens = ids.len(), "Cannot re-check personal access tokens; their requests go on until the store answers")
            }
        }
    }
}

/// The web UI on its own listener, over the admin API's state and the proxy's `user_access`
/// path (see [`crate::webui`]).
async fn start_web(
    cfg: &Config,
    listen: &crate::config::Listen,
    sh: &Shared,
    (api, proxy, agent_addr): (ApiState, crate::kubeproxy::Proxy, SocketAddr),
    handle: Handle,
) -> Result<(SocketAddr, Handle)> {
    use crate::listener::{axum_handler, bind_http, serve_http};
    let web = bind_http(
        "web",
        listen,
        crate::config::WEB_LIMITS,
        &sh.listener_metrics,
    )
    .await?;
    let addr = web.listener.local_addr()?;
    let tls = web.tls.is_some();
    if !addr.ip().is_loopback() && !tls {
        tracing::warn!(net_address = %addr, "The web UI is plain HTTP on a non-loopback address: its session cookies can be read on the network; configure web.listen TLS");
    }
    let oidc = match &cfg.web.oidc {
        Some(o) => Some(Arc::new(crate::webui::oidc::Provider::new(o.clone())?)),
        None => None,
    };
    let sessions = Arc::new(crate::webui::session::Sessions::new(
        Arc::clone(&sh.store),
        api.admin.clone(),
        cfg.web.session_ttl,
        cfg.web.oidc.clone(),
    ));
    let state = crate::webui::WebState {
        api_router: api::in_process_router(api.clone()),
        api,
        sessions,
        oidc,
        tls,
        agent_address: cfg
            .web
            .agent_address
            .clone()
            .unwrap_or_else(|| format!("grpc://{agent_addr}")),
        once: Arc::default(),
        proxy: Some(proxy),
    };
    let app = axum_handler(crate::webui::router(state));
    let task = tokio::spawn(serve_http(web, app, Modules::shutdown_of(&handle)));
    tracing::info!(net_address = %addr, "Web UI is up");
    Ok((addr, handle.task(task)))
}

/// The observability endpoint: metrics of every module, readiness (whether the database
/// answers; see [`crate::database::spawn_readiness`]). Served with the same caps and timeouts
/// as the other listeners: it is often bound beyond loopback (the chart binds it for the
/// kubelet's probes and Prometheus), where any client could otherwise hold connections.
fn start_observability(
    obs_listener: crate::listener::HttpListener,
    metrics: MetricsRegistry,
    (store, cluster, draining): (Arc<dyn Store>, Option<Cluster>, CancellationToken),
    handle: Handle,
) -> Result<(SocketAddr, Handle)> {
    let observability_addr = obs_listener.listener.local_addr()?;
    // Ready from the start: the database was just opened, or kas would not be starting.
    let (ready_tx, ready) = watch::channel(true);
    let checks = crate::database::spawn_readiness(
        store,
        cluster,
        (ready_tx, draining),
        Modules::shutdown_of(&handle),
    );
    let handle = handle.task(checks);
    let metrics = Arc::new(Mutex::new(metrics));
    let ep = tether_observability::Endpoint { metrics, ready };
    let app = crate::listener::axum_handler(tether_observability::endpoint::router(ep));
    let stop = Modules::shutdown_of(&handle);
    let task = tokio::spawn(crate::listener::serve_http(obs_listener, app, stop));
    tracing::info!(
        net_network = "tcp",
        net_address = %observability_addr,
        "Observability endpoint is up"
    );
    Ok((observability_addr, handle.task(task)))
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
    if let Some(w) = &cfg.web.listen {
        total = total.saturating_add(w.limits(crate::config::WEB_LIMITS).max_connections);
    }
    let observability = cfg
        .observability
        .listen
        .limits(crate::config::OBSERVABILITY_LIMITS);
    total = total.saturating_add(observability.max_connections);
    if let Some(pc) = &cfg.peers {
        total = total.saturating_add(crate::config::peers_limits(pc).max_connections);
    }
    crate::listener::check_descriptor_budget(total);
    if let Some(why) = cfg.per_caller_unreachable() {
        tracing::warn!("{why}");
    }
    for why in crate::config_durations::warnings(&crate::config_durations::bounds(cfg)) {
        tracing::warn!("{why}");
    }
}

/// A CA file for kubeconfigs: PEM that kubectl can use.
fn read_ca_pem(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("reading it: {e}"))?;
    tether_kubeproxy_server::check_ca_pem(&pem).map_err(|e| e.to_string())?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first pass, one after a (re)subscription and every tenth read every record; the
    /// others read what was written since the last successful pass began, less the slack for
    /// other writers' clocks, and a failed pass leaves that point where it was.
    #[test]
    fn a_reread_reads_every_record_only_when_it_must() {
        let mut plan = RereadPlan::default();
        assert_eq!(plan.since(false), None, "first pass");
        plan.done(1_000);
        assert_eq!(plan.since(false), Some(1_000 - WRITER_CLOCK_SLACK));
        // That pass failed: the next one looks as far back.
        assert_eq!(plan.since(false), Some(1_000 - WRITER_CLOCK_SLACK));
        plan.done(1_060);
        assert_eq!(plan.since(true), None, "after a resubscription");
        plan.done(1_090);
        let mut full = Vec::new();
        for pass in 4..24 {
            if plan.since(false).is_none() {
                full.push(pass);
            }
            plan.done(1_100 + i64::from(pass));
        }
        assert_eq!(full, [10, 20], "every tenth pass reads every record");
    }
}
