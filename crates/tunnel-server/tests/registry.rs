//! The registry behind the real gRPC service, with a real agent pool connected in-process.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    AGENT_ID, Agent, Script, ScriptedStream, Server, TOKEN_ID, Tokens, echo_through, eventually,
    failed_with, pool_config, try_echo,
};
use tether_protocol::services;
use tether_tunnel_server::{RegistryError, RegistryStats, TunnelError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

#[tokio::test]
async fn an_agent_registers_its_idle_streams_and_unregisters_when_it_stops() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let agent = Agent::start(server.addr, pool_config(2));
    let full = RegistryStats {
        agents: 1,
        open_streams: 2,
        idle_streams: 2,
        waiters: 0,
    };
    eventually("two idle streams", || server.registry.stats() == full).await;
    let connections = server.registry.connections();
    assert_eq!(connections.len(), 1);
    assert_eq!(connections[0].agent_id, AGENT_ID);
    assert_eq!(connections[0].idle_tunnels, 2);
    let conn = &connections[0].connections[0];
    assert_eq!(
        (conn.pod_name.as_str(), conn.pod_namespace.as_str()),
        ("pod-a", "ns")
    );
    assert_eq!(conn.agent_version, "test");
    assert_eq!(conn.streams, 2);

    agent.stop().await;
    eventually("the agent to be forgotten", || {
        server.registry.stats() == RegistryStats::default()
    })
    .await;
    assert!(server.registry.connections().is_empty());
}

/// An agent may have `max_streams_per_agent` tunnel streams open, no more: the one over it is
/// refused (RESOURCE_EXHAUSTED, counted), so a stolen token cannot make kas hold streams
/// without bound; those open keep serving.
#[tokio::test]
async fn streams_over_the_agents_cap_are_refused_and_counted() {
    let registry = tether_tunnel_server::Registry::new().with_max_streams_per_agent(2);
    let server = Server::start_with(Arc::new(Tokens::default()), registry).await;
    let mut metrics = prometheus_client::registry::Registry::default();
    server.registry.register_metrics(&mut metrics);
    let refused = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("tunnel_streams_over_agent_cap_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let agent = Agent::start(server.addr, pool_config(3));
    eventually("a stream refused over the cap", || refused() >= 1.0).await;
    assert_eq!(server.registry.stats().open_streams, 2);
    assert_eq!(server.echo_round(b"still served").await, b"still served");
    agent.stop().await;
}

#[tokio::test]
async fn a_tunnel_carries_a_request_to_the_connected_agent() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let _agent = Agent::start(server.addr, pool_config(1));

    let tunnel = server
        .registry
        .get_tunnel(AGENT_ID, Duration::from_secs(10))
        .await
        .expect("a tunnel to the agent");
    assert_eq!(tunnel.agent_id, AGENT_ID);
    let mut conn = tunnel
        .request(services::ECHO, HashMap::new())
        .await
        .expect("the agent accepts echo");
    conn.write_all(b"through the tunnel").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"through the tunnel");
}

#[tokio::test]
async fn an_agent_that_is_not_connected_gets_no_tunnel() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let err = server
        .registry
        .get_tunnel(AGENT_ID, Duration::from_millis(50))
        .await
        .expect_err("nobody connected");
    assert_eq!(err, RegistryError::AgentNotConnected(AGENT_ID));
    // The waiter it left is cleaned up.
    assert_eq!(server.registry.stats(), RegistryStats::default());
}

/// A request for an agent that is not connected, abandoned by its client before its timeout
/// (kubectl's --request-timeout, a CI job cancelled): nothing of it stays, and the agent is
/// not counted connected. Its waiter used to stay until the agent connected, and with it the
/// agent in `tunnel_connected_agents`.
#[tokio::test]
async fn an_abandoned_request_for_an_agent_not_connected_leaves_nothing_behind() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let mut metrics = prometheus_client::registry::Registry::default();
    server.registry.register_metrics(&mut metrics);
    let waiting = server
        .registry
        .get_tunnel(AGENT_ID, Duration::from_secs(60));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), waiting).await;
    assert!(gave_up.is_err(), "no tunnel can come");
    assert_eq!(server.registry.stats(), RegistryStats::default());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
    assert!(
        text.lines().any(|l| l == "tunnel_connected_agents 0"),
        "{text}"
    );
}

#[tokio::test]
async fn revoking_a_token_ends_its_idle_and_busy_streams() {
    let tokens = Arc::new(Tokens::default());
    let server = Server::start(Arc::clone(&tokens)).await;
    let agent = Agent::start(server.addr, pool_config(2));
    let mut state = agent.pool.state();

    let mut busy = server.echo().await;
    // The pool replaces the stream taken: one busy and two idle.
    eventually("two idle streams beside the busy one", || {
        let s = server.registry.stats();
        s.open_streams == 3 && s.idle_streams == 2
    })
    .await;

    tokens.revoke(TOKEN_ID);
    assert_eq!(server.registry.revoke_token(TOKEN_ID), 3);

    let mut rest = Vec::new();
    let read = busy.read_to_end(&mut rest).await;
    assert!(read.is_err(), "the busy stream must end abruptly: {read:?}");
    failed_with(&mut state, Code::Unauthenticated).await;
    drop(busy);
    eventually("no streams left", || {
        server.registry.stats().open_streams == 0
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_streams_as_unavailable_and_refuses_new_tunnels() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let agent = Agent::start(server.addr, pool_config(2));
    let mut state = agent.pool.state();
    eventually("two idle streams", || {
        server.registry.stats().idle_streams == 2
    })
    .await;

    server.registry.shutdown();
    assert_eq!(server.registry.end_status().code(), Code::Unavailable);
    // The agent hears UNAVAILABLE (reconnect later), not a revocation.
    failed_with(&mut state, Code::Unavailable).await;
    let err = server
        .registry
        .get_tunnel(AGENT_ID, Duration::from_secs(1))
        .await
        .expect_err("shutting down");
    assert_eq!(err, RegistryError::ShuttingDown);
    eventually("no streams left", || {
        server.registry.stats().open_streams == 0
    })
    .await;
}

#[tokio::test]
async fn a_refusal_fails_the_first_read_of_a_request_sent_with_its_bytes() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let _agent = Agent::start(server.addr, pool_config(1));
    let tunnel = server.tunnel().await;
    // The agent takes the bytes with the request: no waiting for its answer here.
    let mut conn = tunnel
        .request("nonexistent", HashMap::new())
        .await
        .expect("sent without waiting for the agent");
    conn.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let err = conn.read(&mut [0u8; 16]).await.expect_err("refused");
    assert!(
        err.to_string().contains("does not serve \"nonexistent\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_confirmed_request_is_refused_before_any_byte_flows() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let _agent = Agent::start(server.addr, pool_config(1));
    let tunnel = server.tunnel().await;
    let err = tunnel
        .request_confirmed("nonexistent", HashMap::new())
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, TunnelError::Refused { code, .. } if *code == Code::Unimplemented as i32),
        "{err}"
    );
}

/// A stream answering as `script` says, idle in kas before the stream of a real agent (kas
/// takes the oldest idle stream first).
async fn scripted_before_agent(script: Script) -> (Server, ScriptedStream, Agent) {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let scripted = ScriptedStream::open(server.addr, script).await;
    eventually("the scripted stream idle in kas", || {
        server.registry.stats().idle_streams == 1
    })
    .await;
    let agent = Agent::start(server.addr, pool_config(1));
    eventually("the agent's stream idle after it", || {
        server.registry.stats().idle_streams == 2
    })
    .await;
    (server, scripted, agent)
}

/// [`scripted_before_agent`], and the resending pipe of an `echo` request sent through them.
async fn scripted_then_agent(
    script: Script,
) -> (
    Server,
    ScriptedStream,
    Agent,
    tether_tunnel_server::Resending,
) {
    let (server, scripted, agent) = scripted_before_agent(script).await;
    let conn = server
        .registry
        .open_resending(
            AGENT_ID,
            services::ECHO,
            HashMap::new(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    (server, scripted, agent, conn)
}

/// The agent closed the stream kas sent a request on without taking it (`CloseUnused` is its
/// answer, as when agentk stops at the moment kas chose the stream): kas sends the request, the
/// same bytes, on another stream, which serves it once.
#[tokio::test]
async fn a_request_the_agent_closed_its_stream_on_unread_goes_on_another_stream() {
    let (server, scripted, _agent, mut conn) = scripted_then_agent(Script::CloseUnused).await;
    let echoed = echo_through(&mut conn, b"sent twice, served once").await;
    assert_eq!(echoed, b"sent twice, served once");
    assert_eq!(conn.resends(), 1);
    assert_eq!(server.registry.resent_counter().get(), 1);
    drop(conn);
    let requests = scripted.task.await.unwrap();
    assert_eq!(requests, 1, "the closing stream got the request once");
}

/// A request the agent took (its header came, then the stream broke) is never sent again, even
/// with another stream idle: the API server may have seen it.
#[tokio::test]
async fn a_request_the_agent_took_is_not_sent_again_when_its_stream_ends() {
    let (server, scripted, agent, mut conn) = scripted_then_agent(Script::TakeAndEnd).await;
    let err = try_echo(&mut conn, b"at most once")
        .await
        .expect_err("the stream ended under the request");
    assert_eq!(conn.resends(), 0, "{err}");
    assert_eq!(server.registry.resent_counter().get(), 0);
    assert_eq!(scripted.task.await.unwrap(), 1);
    let s = agent.pool.stats();
    assert_eq!((s.busy, s.idle), (0, 1), "the other stream served nothing");
}

/// An agent older than `CloseUnused` ends the stream without an answer: kas cannot tell
/// whether it took the request, and fails it as before.
#[tokio::test]
async fn a_stream_ending_without_an_answer_fails_its_request_as_before() {
    let (server, scripted, _agent, mut conn) = scripted_then_agent(Script::EndUnanswered).await;
    try_echo(&mut conn, b"maybe taken")
        .await
        .expect_err("the stream ended under the request");
    assert_eq!(conn.resends(), 0);
    assert_eq!(server.registry.resent_counter().get(), 0);
    assert_eq!(scripted.task.await.unwrap(), 1);
}

/// The holder replica's way (`open_confirmed`): a `CloseUnused` answer takes the next stream
/// before anything but the `RequestInfo` was sent.
#[tokio::test]
async fn a_confirmed_request_the_agent_did_not_take_is_answered_by_another_stream() {
    let (server, scripted, _agent) = scripted_before_agent(Script::CloseUnused).await;
    let conn = server
        .registry
        .open_confirmed(
            AGENT_ID,
            services::ECHO,
            HashMap::new(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(echo_through(conn, b"confirmed").await, b"confirmed");
    assert_eq!(server.registry.resent_counter().get(), 1);
    assert_eq!(scripted.task.await.unwrap(), 1);
}

#[tokio::test]
async fn kas_waits_for_an_older_agents_answer_before_sending_bytes() {
    let server = Server::start(Arc::new(Tokens::default())).await;
    // Refused: kas waited for the answer (it would not know of the refusal yet otherwise).
    let old = common::OldAgentStream::open(server.addr).await;
    let tunnel = server.tunnel().await;
    let err = tunnel
        .request("nonexistent", HashMap::new())
        .await
        .expect_err("the old agent refuses");
    assert!(matches!(err, TunnelError::Refused { .. }), "{err}");
    old.task.await.expect("no frame after the refusal");

    // Accepted: the bytes follow the answer and come back.
    let old = common::OldAgentStream::open(server.addr).await;
    let tunnel = server.tunnel().await;
    let mut conn = tunnel
        .request(services::ECHO, HashMap::new())
        .await
        .expect("echo accepted");
    conn.write_all(b"to an old agent").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"to an old agent");
    drop(conn);
    old.task
        .await
        .expect("the old agent saw its frames in order");
}

#[tokio::test]
async fn new_streams_of_a_token_with_live_streams_skip_the_store() {
    let tokens = Arc::new(Tokens::default());
    let server = Server::start(Arc::clone(&tokens)).await;
    let agent = Agent::start(server.addr, pool_config(1));
    eventually("an idle stream", || {
        server.registry.stats().idle_streams == 1
    })
    .await;
    let looked_up = tokens.lookups.load(Ordering::SeqCst);
    for round in 0..5 {
        let conn = server.echo().await;
        // The agent replaces the stream taken while this one is still open.
        eventually("the replacement stream", || {
            server.registry.stats().idle_streams == 1
        })
        .await;
        assert_eq!(
            common::echo_through(conn, b"ping").await,
            b"ping",
            "round {round}"
        );
    }
    assert_eq!(tokens.lookups.load(Ordering::SeqCst), looked_up);

    // Revoked: forgotten with its streams, so the agent's next stream is looked up and refused.
    let mut state = agent.pool.state();
    tokens.revoke(TOKEN_ID);
    server.registry.revoke_token(TOKEN_ID);
    failed_with(&mut state, Code::Unauthenticated).await;
    eventually("the next stream to be looked up", || {
        tokens.lookups.load(Ordering::SeqCst) > looked_up
    })
    .await;
    eventually("no streams left", || {
        server.registry.stats().open_streams == 0
    })
    .await;
}

#[tokio::test]
async fn a_stream_whose_request_ended_cleanly_carries_the_next_one() {
    let (server, agent, conn) = one_busy_one_idle().await;
    assert_eq!(common::echo_through(conn, b"first").await, b"first");
    // Both sides closed: the stream is idle again instead of closed.
    eventually("the stream back among the idle ones", || {
        server.registry.stats() == streams(2, 2) && agent.pool.stats().idle == 2
    })
    .await;
    for round in 0..3 {
        assert_eq!(server.echo_round(b"again").await, b"again", "round {round}");
    }
}

/// gRPC's buffers keep the size of the longest message a stream carried: after a response in
/// long frames the stream ends instead of idling with them, and the next request gets a fresh
/// one.
#[tokio::test]
async fn a_stream_that_carried_long_frames_is_closed_instead_of_kept() {
    let (server, agent, conn) = one_busy_one_idle().await;
    let long = vec![7u8; 4 * tether_protocol::returning::REUSE_MAX_FRAME];
    assert_eq!(common::echo_through(conn, &long).await, long);
    eventually("only the replacement left, on both sides", || {
        server.registry.stats() == streams(1, 1) && agent.pool.stats().idle == 1
    })
    .await;
    // Short requests still keep their stream.
    assert_eq!(server.echo_round(b"short").await, b"short");
    eventually("the stream back among the idle ones", || {
        server.registry.stats() == streams(2, 2)
    })
    .await;
}

#[tokio::test]
async fn a_stream_whose_request_ended_midway_is_closed() {
    let (server, _agent, mut conn) = one_busy_one_idle().await;
    conn.write_all(b"half").await.unwrap();
    drop(conn); // no close: the agent may still be sending
    eventually("only the replacement left", || {
        server.registry.stats() == streams(1, 1)
    })
    .await;
}

/// A server and an agent keeping one idle stream, with a request holding one stream (`conn`)
/// and the agent's replacement idle.
async fn one_busy_one_idle() -> (Server, Agent, tether_tunnel_server::TunnelConn) {
    let server = Server::start(Arc::new(Tokens::default())).await;
    let agent = Agent::start(server.addr, pool_config(1));
    let conn = server.echo().await;
    eventually("the replacement stream", || {
        server.registry.stats() == streams(2, 1)
    })
    .await;
    (server, agent, conn)
}

/// One connected agent with `open` streams, `idle` of them idle.
fn streams(open: usize, idle: usize) -> RegistryStats {
    RegistryStats {
        agents: 1,
        open_streams: open,
        idle_streams: idle,
        waiters: 0,
    }
}

/// A store that cannot answer.
struct Unanswered;

impl tether_tunnel_server::Authenticator for Unanswered {
    fn authenticate<'a>(
        &'a self,
        _token: &'a str,
    ) -> tether_tunnel_server::service_future::BoxFuture<
        'a,
        Result<Option<tether_tunnel_server::AgentIdentity>, tether_tunnel_server::AuthError>,
    > {
        Box::pin(async { Err(tether_tunnel_server::AuthError("store down".into())) })
    }

    fn active_tokens(
        &self,
        _token_ids: Vec<i64>,
    ) -> tether_tunnel_server::service_future::BoxFuture<
        '_,
        Result<Vec<i64>, tether_tunnel_server::AuthError>,
    > {
        Box::pin(async { Err(tether_tunnel_server::AuthError("store down".into())) })
    }
}

#[tokio::test]
async fn the_recheck_ends_streams_of_revoked_tokens_only_and_none_when_the_store_fails() {
    let tokens = Arc::new(Tokens::default());
    let server = Server::start(Arc::clone(&tokens)).await;
    let _agent = Agent::start(server.addr, pool_config(2));
    eventually("two idle streams", || {
        server.registry.stats().idle_streams == 2
    })
    .await;
    assert_eq!(server.registry.recheck_tokens(tokens.as_ref()).await, 0);
    tokens.revoke(TOKEN_ID);
    // An outage is not a revocation.
    assert_eq!(server.registry.recheck_tokens(&Unanswered).await, 0);
    assert_eq!(server.registry.stats().idle_streams, 2);
    assert_eq!(server.registry.recheck_tokens(tokens.as_ref()).await, 2);
}

/// Draining (kas stopping): the idle stream ends at once as `UNAVAILABLE` and the agent's new
/// ones are refused, so it reconnects elsewhere; the agent is no longer offered to requests,
/// but the request in flight goes on to its end, and only then is the registry drained.
#[tokio::test]
async fn draining_ends_idle_streams_and_lets_the_request_in_flight_finish() {
    let (server, agent, mut busy) = one_busy_one_idle().await;
    let mut state = agent.pool.state();
    let mut presence = server.registry.subscribe_presence();

    server.registry.drain();
    failed_with(&mut state, Code::Unavailable).await;
    eventually("only the busy stream left", || {
        server.registry.stats() == streams(1, 0)
    })
    .await;
    assert!(!server.registry.has_agent(AGENT_ID));
    assert!(server.registry.connected_agents().is_empty());
    let gone = presence.recv().await.unwrap();
    assert_eq!((gone.agent_id, gone.connected), (AGENT_ID, false));

    let drained = server.registry.drained();
    tokio::pin!(drained);
    assert!(
        futures_util::FutureExt::now_or_never(&mut drained).is_none(),
        "a request is in flight"
    );
    busy.write_all(b"still served").await.unwrap();
    busy.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    busy.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"still served");
    drop(busy);
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("drained once the request ended");
    assert_eq!(server.registry.stats().open_streams, 0);
}

/// `stopping` tells a waiter that no stream will come any more, from the first step of
/// stopping (the drain), not only once the streams are cut: a replica waiting for the agent's
/// stream on another's behalf answers it then, rather than dropping it unanswered.
#[tokio::test]
async fn stopping_resolves_when_the_drain_begins() {
    let registry = tether_tunnel_server::Registry::new();
    let stopping = registry.stopping();
    tokio::pin!(stopping);
    assert!(
        futures_util::poll!(stopping.as_mut()).is_pending(),
        "not stopping yet"
    );
    registry.drain();
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stopping resolves once the drain began");
}
