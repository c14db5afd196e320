//! The registry behind the real gRPC service, with a real agent pool connected in-process.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{AGENT_ID, Agent, Server, TOKEN_ID, Tokens, eventually, failed_with, pool_config};
use tether_protocol::services;
use tether_tunnel_server::{RegistryError, RegistryStats};
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

#[tokio::test]
async fn revoking_a_token_ends_its_idle_and_busy_streams() {
    let tokens = Arc::new(Tokens::default());
    let server = Server::start(Arc::clone(&tokens)).await;
    let agent = Agent::start(server.addr, pool_config(2));
    let mut state = agent.pool.state();

    let tunnel = server
        .registry
        .get_tunnel(AGENT_ID, Duration::from_secs(10))
        .await
        .expect("a tunnel");
    let mut busy = tunnel
        .request(services::ECHO, HashMap::new())
        .await
        .expect("echo accepted");
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
