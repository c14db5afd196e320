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
    /// Look-ups of a token so far (what kas's store would have answered).
    pub lookups: std::sync::atomic::AtomicUsize,
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
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let identity = (token == TOKEN && self.active(TOKEN_ID)).then(|| AgentIdentity {
            agent_id: AGENT_ID,
            agent_name: "seven".into(),
            project_path: "group/seven".into(),
            token_id: TOKEN_ID,
        });
        Box::pin(async move { Ok(identity) })
    }

    fn active_tokens(&self, token_ids: Vec<i64>) -> BoxFuture<'_, Result<Vec<i64>, AuthError>> {
        let active = token_ids.into_iter().filter(|t| self.active(*t)).collect();
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

    /// On a fresh `:0` port, with `registry`'s settings.
    pub async fn start_with(tokens: Arc<Tokens>, registry: Registry) -> Server {
        let (listener, _) = tether_test_support::tokio_listener().await;
        Server::serve_with(listener, tokens, registry)
    }

    fn serve(listener: tokio::net::TcpListener, tokens: Arc<Tokens>) -> Server {
        Server::serve_with(listener, tokens, Registry::new())
    }

    fn serve_with(
        listener: tokio::net::TcpListener,
        tokens: Arc<Tokens>,
        registry: Registry,
    ) -> Server {
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(registry);
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

    /// One of the agent's tunnels (waiting up to 10 s for it).
    pub async fn tunnel(&self) -> tether_tunnel_server::Tunnel {
        self.registry
            .get_tunnel(AGENT_ID, Duration::from_secs(10))
            .await
            .expect("a tunnel to the agent")
    }

    /// A tunnel to the agent's `echo` service.
    pub async fn echo(&self) -> tether_tunnel_server::TunnelConn {
        self.tunnel()
            .await
            .request(services::ECHO, HashMap::new())
            .await
            .expect("the agent accepts echo")
    }

    /// Sends `bytes` through an `echo` tunnel, closes, and reads the answer to the end.
    pub async fn echo_round(&self, bytes: &[u8]) -> Vec<u8> {
        echo_through(self.echo().await, bytes).await
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
            token: tether_tunnel_agent::AgentToken::fixed(TOKEN),
            version: "test".into(),
            pod_name: "pod-a".into(),
            pod_namespace: "ns".into(),
            cluster_id: Default::default(),
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

/// One `Connect` stream of an agent older than `Descriptor.data_with_request`, written out
/// frame by frame: it reads kas's request, then answers `echo` (header, then every byte back)
/// and refuses anything else. Its frames are checked in order, so kas sending bytes before the
/// answer shows as a panic in its task.
pub struct OldAgentStream {
    pub task: JoinHandle<()>,
}

impl OldAgentStream {
    pub async fn open(addr: SocketAddr) -> OldAgentStream {
        let (inbound, tx) = open_stream(addr, false, &[services::ECHO]).await;
        OldAgentStream {
            task: tokio::spawn(old_agent_serves(inbound, tx)),
        }
    }
}

/// Opens one `Connect` stream as the agent (token `TOKEN`, pod `fake`) with a descriptor
/// saying `data_with_request` and serving `services`: kas's frames and the sender of ours.
pub async fn open_stream(
    addr: SocketAddr,
    data_with_request: bool,
    services: &[&str],
) -> (
    tonic::Streaming<tether_protocol::tunnel::ServerFrame>,
    tokio::sync::mpsc::Sender<tether_protocol::tunnel::AgentFrame>,
) {
    use tether_protocol::tunnel::reverse_tunnel_client::ReverseTunnelClient;
    use tether_protocol::tunnel::{AgentFrame, Descriptor, agent_frame};
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentFrame>(8);
    let descriptor = agent_frame::Frame::Descriptor(Descriptor {
        services: services.iter().map(|s| s.to_string()).collect(),
        data_with_request,
        reusable: false,
    });
    tx.send(AgentFrame {
        frame: Some(descriptor),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let bearer = tether_protocol::metadata::bearer(TOKEN).unwrap();
    req.metadata_mut()
        .insert(tether_protocol::metadata::AUTHORIZATION, bearer);
    req.metadata_mut().insert(
        tether_protocol::metadata::POD_NAME,
        tonic::metadata::AsciiMetadataValue::from_static("fake"),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ReverseTunnelClient::new(channel);
    let inbound = client.connect(req).await.unwrap().into_inner();
    (inbound, tx)
}

/// How a [`ScriptedStream`] answers the first request kas sends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// As an agent that closed the stream at the moment kas sent the request: `CloseUnused`
    /// (read nothing of the request), then half-close and read what kas sends until it ends
    /// the stream.
    CloseUnused,
    /// As an agent that took the request and died: `ResponseHeader`, the request's first
    /// bytes read, then the stream ends without a close.
    TakeAndEnd,
    /// As an agent older than `CloseUnused` closing the stream as kas sent the request: no
    /// answer, the stream just ends (kas cannot know whether it took the request).
    EndUnanswered,
}

/// One stream of an agent that says `data_with_request`, answering the first request kas
/// sends on it as its [`Script`] says. Its task ends with the requests it read (each a
/// `RequestInfo` kas sent on it).
pub struct ScriptedStream {
    pub task: JoinHandle<usize>,
}

impl ScriptedStream {
    /// Opened and idle in kas's registry when this returns.
    pub async fn open(addr: SocketAddr, script: Script) -> ScriptedStream {
        let (inbound, tx) = open_stream(addr, true, &[services::ECHO]).await;
        ScriptedStream {
            task: tokio::spawn(scripted_serves(inbound, tx, script)),
        }
    }
}

async fn scripted_serves(
    mut inbound: tonic::Streaming<tether_protocol::tunnel::ServerFrame>,
    tx: tokio::sync::mpsc::Sender<tether_protocol::tunnel::AgentFrame>,
    script: Script,
) -> usize {
    use tether_protocol::tunnel::{
        AgentFrame, CloseUnused, ResponseHeader, agent_frame, server_frame,
    };
    let is_request =
        |f: &Option<server_frame::Frame>| matches!(f, Some(server_frame::Frame::Request(_)));
    let first = inbound.message().await.unwrap().unwrap().frame;
    assert!(
        is_request(&first),
        "the first frame from kas must be the request"
    );
    let answer = match script {
        Script::CloseUnused => agent_frame::Frame::CloseUnused(CloseUnused {}),
        Script::TakeAndEnd => agent_frame::Frame::Header(ResponseHeader::default()),
        Script::EndUnanswered => return 1,
    };
    tx.send(AgentFrame {
        frame: Some(answer),
    })
    .await
    .unwrap();
    if script == Script::TakeAndEnd {
        // The request's bytes reached the agent: it was taken.
        let next = inbound.message().await.unwrap().unwrap().frame;
        assert!(
            matches!(next, Some(server_frame::Frame::Data(_))),
            "{next:?}"
        );
        return 1; // both halves dropped: the stream ends without a close
    }
    drop(tx);
    let mut requests = 1;
    while let Ok(Some(f)) = inbound.message().await {
        requests += usize::from(is_request(&f.frame));
    }
    requests
}

async fn old_agent_serves(
    mut inbound: tonic::Streaming<tether_protocol::tunnel::ServerFrame>,
    tx: tokio::sync::mpsc::Sender<tether_protocol::tunnel::AgentFrame>,
) {
    use tether_protocol::tunnel::{AgentFrame, ResponseHeader, agent_frame, server_frame};
    let Some(server_frame::Frame::Request(info)) = inbound.message().await.unwrap().unwrap().frame
    else {
        panic!("the first frame from kas must be the request");
    };
    let answer = if info.service == services::ECHO {
        agent_frame::Frame::Header(ResponseHeader::default())
    } else {
        agent_frame::Frame::Error(tether_protocol::tunnel::Error {
            code: Code::Unimplemented as i32,
            message: format!("this agent does not serve {:?}", info.service),
        })
    };
    let refused = matches!(answer, agent_frame::Frame::Error(_));
    tx.send(AgentFrame {
        frame: Some(answer),
    })
    .await
    .unwrap();
    while let Ok(Some(f)) = inbound.message().await {
        assert!(!refused, "kas sent {f:?} after the agent refused");
        let closing = matches!(f.frame, Some(server_frame::Frame::CloseSend(_)));
        let echoed = match f.frame {
            Some(server_frame::Frame::Data(d)) => agent_frame::Frame::Data(d),
            Some(server_frame::Frame::CloseSend(c)) => agent_frame::Frame::CloseSend(c),
            other => panic!("unexpected frame from kas: {other:?}"),
        };
        if tx
            .send(AgentFrame {
                frame: Some(echoed),
            })
            .await
            .is_err()
            || closing
        {
            break;
        }
    }
    // Keep our side open until kas ends the stream, as a real agent does.
    while let Ok(Some(_)) = inbound.message().await {}
}

/// Sends `bytes` through an `echo` tunnel, closes its side, and reads the answer to the end.
pub async fn echo_through(
    conn: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    bytes: &[u8],
) -> Vec<u8> {
    try_echo(conn, bytes).await.unwrap()
}

/// [`echo_through`], failing with the first error of the pipe.
pub async fn try_echo(
    mut conn: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    bytes: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(bytes).await?;
    conn.shutdown().await?;
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed).await?;
    Ok(echoed)
}
