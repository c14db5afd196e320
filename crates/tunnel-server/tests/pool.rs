//! The agent's stream pool (`tether-tunnel-agent`) against the real tunnel service in-process:
//! how many streams it keeps idle, and how it reconnects when kas goes away and comes back.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Agent, Server, Tokens, eventually, failed_with, pool_config};
use tether_protocol::tunnel::reverse_tunnel_server::{ReverseTunnel, ReverseTunnelServer};
use tether_tunnel_agent::{ConnState, PoolConfig};
use tonic::Code;

#[tokio::test]
async fn the_pool_keeps_min_idle_streams_and_closes_the_surplus_after_idle_timeout() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let cfg = PoolConfig {
        scale_up_step: 3,
        idle_timeout: Duration::from_secs(1),
        ..pool_config(1)
    };
    let agent = Agent::start(server.addr, cfg);
    eventually("one idle stream", || agent.pool.stats().idle == 1).await;

    // Taking the idle stream makes the pool scale up by a step of three.
    let conn = server.echo().await;
    eventually("a step of three idle streams", || {
        let s = agent.pool.stats();
        s.busy == 1 && s.idle == 3
    })
    .await;

    // Above min_idle, idle streams close after idle_timeout, on both sides.
    eventually("the surplus to close", || {
        agent.pool.stats().idle == 1 && server.registry.stats().idle_streams == 1
    })
    .await;
    drop(conn);
    eventually("the busy stream to end", || agent.pool.stats().busy == 0).await;
}

/// agentk's defaults: two idle streams and a step of ten. Connecting, and reconnecting after kas
/// comes back, opens the two and stops there; the step is for requests taking idle streams.
#[tokio::test]
async fn connecting_and_reconnecting_open_min_idle_streams_not_a_step() {
    let tokens = Arc::new(Tokens::default());
    let server = Server::start(Arc::clone(&tokens)).await;
    let addr = server.addr;
    let cfg = PoolConfig {
        scale_up_step: PoolConfig::default().scale_up_step,
        ..pool_config(PoolConfig::default().min_idle)
    };
    assert_eq!((cfg.min_idle, cfg.scale_up_step), (2, 10));
    let agent = Agent::start(addr, cfg);
    let settled = |pool: &tether_tunnel_agent::Pool| {
        let s = pool.stats();
        s.connected && s.idle == 2 && s.opening == 0
    };
    eventually("two idle streams, none opening", || settled(&agent.pool)).await;
    eventually("kas to hold them", || {
        server.registry.stats().idle_streams == 2
    })
    .await;

    server.stop().await;
    eventually("the streams to end", || agent.pool.stats().idle == 0).await;
    let server = Server::restart_on(addr, tokens).await;
    eventually("two idle streams again, none opening", || {
        settled(&agent.pool)
    })
    .await;
    eventually("kas to hold them", || {
        server.registry.stats().idle_streams == 2
    })
    .await;
    assert_eq!(agent.pool.stats().busy, 0);
}

#[tokio::test]
async fn the_pool_backs_off_while_kas_is_down_and_reconnects_when_it_is_back() {
    let tokens = Arc::new(Tokens::default());
    let server = Server::start(Arc::clone(&tokens)).await;
    let addr = server.addr;
    let agent = Agent::start(addr, pool_config(2));
    let mut state = agent.pool.state();
    eventually("two idle streams", || {
        server.registry.stats().idle_streams == 2
    })
    .await;

    server.stop().await;
    failed_with(&mut state, Code::Unavailable).await;
    // Several failed attempts, each a single probe stream, not a burst.
    eventually("repeated failed attempts", || {
        let s = agent.pool.stats();
        // Once an attempt failed, the pool probes with one stream at a time.
        assert!(s.failures == 0 || s.opening <= 1, "{s:?}");
        s.failures >= 3 && !s.connected && s.idle == 0
    })
    .await;

    let server = Server::restart_on(addr, tokens).await;
    state
        .wait_for(|s| *s == ConnState::Connected)
        .await
        .unwrap();
    eventually("two idle streams again", || {
        agent.pool.stats().idle == 2 && server.registry.stats().idle_streams == 2
    })
    .await;
    assert_eq!(agent.pool.stats().failures, 0);
}

/// A kas that answers every `Connect` and ends it at once, as one does that began to stop
/// between checking and answering: each stream is a refusal, and the pool backs off as for any
/// refused attempt instead of retrying at once, over and over (it counted each answer as a
/// working connection, which reset its backoff).
#[tokio::test]
async fn streams_ended_right_after_opening_are_retried_with_backoff() {
    let (listener, _) = tether_test_support::tokio_listener().await;
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let kas = EndsEveryStream {
        answered: Arc::clone(&answered),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReverseTunnelServer::new(kas))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let agent = Agent::start(addr, pool_config(2));
    eventually("four failed attempts in a row", || {
        agent.pool.stats().failures >= 4
    })
    .await;
    let stats = agent.pool.stats();
    let answered = answered.load(std::sync::atomic::Ordering::SeqCst);
    // One probe stream per attempt, each a failure: the backoff grew at every one.
    assert!(
        answered <= u64::from(stats.failures) + 1,
        "{answered} streams answered for {stats:?}"
    );
    assert!(!stats.connected, "{stats:?}");
    agent.stop().await;
    server.abort();
}

struct EndsEveryStream {
    answered: Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl ReverseTunnel for EndsEveryStream {
    type ConnectStream = futures_util::stream::Once<
        std::future::Ready<Result<tether_protocol::tunnel::ServerFrame, tonic::Status>>,
    >;

    async fn connect(
        &self,
        _request: tonic::Request<tonic::Streaming<tether_protocol::tunnel::AgentFrame>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        self.answered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let end = Err(tonic::Status::unavailable("kas is shutting down"));
        Ok(tonic::Response::new(futures_util::stream::once(
            std::future::ready(end),
        )))
    }
}
