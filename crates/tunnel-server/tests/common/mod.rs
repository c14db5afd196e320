//! An in-process kas half (the real `TunnelService` and `Registry` on a `:0` listener) and a
//! real agent `Pool` dialling it, for the registry and pool tests. No binaries, no fixed ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_protocol::services;
use tether_protocol::tunnel::reverse_tunnel_server::ReverseTunnelServer;
use tether_tunnel_agent::{AgentMeta, Backoff, ConnState, EchoHandler, Handler, Pool, PoolConfig};
use tether_tunnel_server::service_future::BoxFuture;
use tether_tunnel_server::{AgentIdentity, AuthError, Authenticator, Registry, TunnelService};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Endpoint;

pub const AGENT_ID: i64 = 7;
pub const TOKEN_ID: i64 = 70;
pub const TOKEN: &str = "agent-seven-token";

/// Agent tokens in memory; `revoke` makes a token unknown, as deleting it from kas's store does.
#[derive(Debug, Default)]
pub struct Tokens {
    revoked: Mutex<HashSet<i64>>,
}

impl Tokens {
    pub fn revoke(&self, token_id: i64) {
        self.revoked.lock().unwrap().insert(token_id);
    }

    fn active(&self, token_id: i64) -> bool {
        !self.revoked.lock().unwrap().contains(&token_id)
    }
}

impl Authenticator for Tokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<AgentIdentity>, AuthError>> {
        let identity = (token == TOKEN && self.active(TOKEN_ID)).then(|| AgentIdentity {
            agent_id: AGENT_ID,
            agent_name: "seven".into(),
            project_path: "group/seven".into(),
            token_id: TOKEN_ID,
        });
        Box::pin(async move { Ok(identity) })
    }

    fn token_active(&self, token_id: i64) -> BoxFuture<'_, Result<bool, AuthError>> {
        let active = self.active(token_id);
        Box::pin(async move { Ok(active) })
    }
}

/// The tunnel service of a kas, serving on 127.0.0.1.
pub struct Server {
    pub registry: Arc<Registry>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Server {
    /// On a fresh `:0` port.
    pub async fn start(tokens: Arc<Tokens>) -> Server {
        let (listener, _) = tether_test_support::tokio_listener().await;
        Server::serve(listener, tokens)
    }

    /// On `addr` again (a restarted kas, where the agents still dial the old address).
    pub async fn restart_on(addr: SocketAddr, tokens: Arc<Tokens>) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Server::serve(listener, tokens)
    }

    fn serve(listener: tokio::net::TcpListener, tokens: Arc<Tokens>) -> Server {
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(Registry::new());
        let service = TunnelService::new(Arc::clone(&registry), tokens);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ReverseTunnelServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Server {
            registry,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops as kas does: end every stream (UNAVAILABLE), then the listener and connections.
    pub async fn stop(mut self) {
        self.registry.shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.registry.shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Small, fast settings for tests: retries within tens of milliseconds.
pub fn pool_config(min_idle: usize) -> PoolConfig {
    PoolConfig {
        min_idle,
        scale_up_step: 1,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            ..Backoff::default()
        },
        ..PoolConfig::default()
    }
}

/// An agent's tunnel pool (serving `echo`) running against `addr`; stops when dropped.
pub struct Agent {
    pub pool: Arc<Pool>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Agent {
    pub fn start(addr: SocketAddr, cfg: PoolConfig) -> Agent {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let meta = AgentMeta {
            token: TOKEN.into(),
            version: "test".into(),
            pod_name: "pod-a".into(),
            pod_namespace: "ns".into(),
        };
        let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
        handlers.insert(services::ECHO.into(), Arc::new(EchoHandler));
        let pool = Arc::new(Pool::new(cfg, channel, meta, handlers));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (pool, stop) = (Arc::clone(&pool), stop.clone());
            async move { pool.run(stop).await }
        });
        Agent {
            pool,
            stop,
            task: Some(task),
        }
    }

    /// Stops the pool and waits for its run loop to end.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Waits until the agent's connection state is a failure with `code`.
pub async fn failed_with(state: &mut watch::Receiver<ConnState>, code: Code) {
    state
        .wait_for(|s| matches!(s, ConnState::Failed { code: c, .. } if *c == code))
        .await
        .expect("the pool is running");
}

/// Polls `probe` (a look at counters other tasks update) until it holds; fails the test with
/// `what` after 10 s.
pub async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
