//! The agent's stream pool (`tether-tunnel-agent`) against the real tunnel service in-process:
//! how many streams it keeps idle, and how it reconnects when kas goes away and comes back.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Agent, Server, Tokens, echo_through, eventually, failed_with, pool_config};
use tether_protocol::services::ECHO;
use tether_protocol::tunnel::reverse_tunnel_server::{ReverseTunnel, ReverseTunnelServer};
use tether_tunnel_agent::{ConnState, PoolConfig};
use tether_tunnel_server::Reopened;
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

/// Stopping the pool (agentk's SIGTERM) closes its idle streams at once, so kas routes new
/// requests elsewhere, and lets a request being served finish before `run` returns.
#[tokio::test]
async fn a_stopping_pool_closes_idle_streams_and_lets_busy_ones_finish() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let agent = Agent::start(server.addr, pool_config(2));
    eventually("two idle streams", || agent.pool.stats().idle == 2).await;
    let conn = server.echo().await;
    eventually("one busy stream", || agent.pool.stats().busy == 1).await;
    let pool = Arc::clone(&agent.pool);
    let stopping = tokio::spawn(agent.stop());
    eventually("the idle streams to close on both sides", || {
        pool.stats().idle == 0
            && pool.stats().opening == 0
            && server.registry.stats().idle_streams == 0
    })
    .await;
    assert!(!stopping.is_finished(), "run waits for the busy stream");
    assert_eq!(echo_through(conn, b"in flight").await, b"in flight");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("run ends once the request is served")
        .unwrap();
    assert_eq!(pool.stats().busy, 0);
}

/// The window of a stopping agentk: kas chose an idle stream for a request (took the tunnel)
/// just as the pool closed it. The pool says it took nothing (`CloseUnused`), and kas sends
/// the request to another replica of the agent instead of failing it (a CI job's 502).
#[tokio::test]
async fn a_request_sent_on_a_stream_a_stopping_pool_closed_is_served_by_another_replica() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let stopping = Agent::start(server.addr, pool_config(1));
    eventually("one idle stream in kas", || {
        server.registry.stats().idle_streams == 1
    })
    .await;
    let tunnel = server.tunnel().await; // kas chose it; the request is not sent yet
    let pool = Arc::clone(&stopping.pool);
    let stopped = tokio::spawn(stopping.stop());
    eventually("the pool to close the stream unused", || {
        pool.stats().closing == 1
    })
    .await;
    let _other = Agent::start(server.addr, pool_config(1));
    eventually("the other replica's stream in kas", || {
        server.registry.stats().idle_streams == 1
    })
    .await;

    let first = Reopened {
        answer: Some(tunnel.answer()),
        io: Box::new(tunnel.request(ECHO, HashMap::new()).await.unwrap()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut conn =
        server
            .registry
            .resending(first, common::AGENT_ID, ECHO, HashMap::new(), deadline);
    assert_eq!(echo_through(&mut conn, b"not lost").await, b"not lost");
    assert_eq!(conn.resends(), 1);
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the stop ends once kas ended the closed stream")
        .unwrap();
    assert_eq!(pool.stats().closing, 0);
}

/// A request that outlasts the drain timeout (a watch) does not hold the stop: `run` returns at
/// the deadline.
#[tokio::test]
async fn a_stopping_pool_does_not_wait_past_its_drain_timeout() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let cfg = PoolConfig {
        drain_timeout: Duration::from_millis(300),
        ..pool_config(1)
    };
    let agent = Agent::start(server.addr, cfg);
    let _conn = server.echo().await;
    eventually("one busy stream", || agent.pool.stats().busy == 1).await;
    let pool = Arc::clone(&agent.pool);
    tokio::time::timeout(Duration::from_secs(10), agent.stop())
        .await
        .expect("run ends at the drain timeout");
    assert_eq!(pool.stats().busy, 1, "the request was still being served");
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
