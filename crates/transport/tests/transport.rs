//! End-to-end tests over real sockets on 127.0.0.1 with real TLS.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Pki, TestServer, close_frame, data_frame, open, ping_pong, scheme_seen, server_tls};
use http::HeaderValue;
use http::header::SEC_WEBSOCKET_PROTOCOL;
use tether_protocol::tunnel::server_frame;
use tether_transport::{ClientOptions, Error, KasAddress, connect, connect_lazy};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn addr(s: &str) -> KasAddress {
    KasAddress::parse(s).unwrap()
}

fn trusting(pki: &Pki) -> ClientOptions {
    ClientOptions {
        ca_cert_file: Some(pki.ca.clone()),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn grpc_round_trip() {
    let server = TestServer::start(None).await;
    // Lazy: the first RPC dials.
    let channel = connect_lazy(
        &addr(&format!("grpc://127.0.0.1:{}", server.port())),
        &ClientOptions::default(),
    )
    .unwrap();
    let metadata = ping_pong(channel, 10).await;
    assert_eq!(scheme_seen(&metadata), "grpc");
    assert_eq!(metadata.get("x-remote-ip").unwrap(), "127.0.0.1");
    server.stop().await;
}

#[tokio::test]
async fn grpcs_round_trip() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let channel = connect(
        &addr(&format!("grpcs://127.0.0.1:{}", server.port())),
        &trusting(&pki),
    )
    .await
    .unwrap();
    assert_eq!(scheme_seen(&ping_pong(channel, 10).await), "grpcs");
    server.stop().await;
}

/// A certificate renewed on disk (cert-manager rewriting the Secret's files) is served to new
/// connections without restarting the listener; until then the old one keeps working.
#[tokio::test]
async fn a_certificate_renewed_on_disk_is_served_without_a_restart() {
    let (old, new) = (Pki::temporary(), Pki::temporary());
    let served = tempfile::tempdir().unwrap();
    let (cert, key) = (served.path().join("tls.crt"), served.path().join("tls.key"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let tls = tether_transport::load_server_tls(&cert, &key).unwrap();
    let server = TestServer::start(Some(tls)).await;
    let url = addr(&format!("grpcs://127.0.0.1:{}", server.port()));
    let channel = connect(&url, &trusting(&old)).await.unwrap();
    assert_eq!(scheme_seen(&ping_pong(channel, 2).await), "grpcs");

    std::fs::copy(&new.key, &key).unwrap();
    std::fs::copy(&new.cert, &cert).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let channel = loop {
        match connect(&url, &trusting(&new)).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the renewed certificate was not served: {e}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    assert_eq!(scheme_seen(&ping_pong(channel, 2).await), "grpcs");
    assert!(
        connect(&url, &trusting(&old)).await.is_err(),
        "the old certificate is no longer served"
    );
    server.stop().await;
}

#[tokio::test]
async fn grpcs_with_tls_server_name_override() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let opts = ClientOptions {
        tls_server_name: Some("localhost".into()),
        ..trusting(&pki)
    };
    let channel = connect(
        &addr(&format!("grpcs://127.0.0.1:{}", server.port())),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(scheme_seen(&ping_pong(channel, 2).await), "grpcs");
    server.stop().await;
}

#[tokio::test]
async fn ws_round_trip() {
    let server = TestServer::start(None).await;
    let channel = connect(
        &addr(&format!("ws://127.0.0.1:{}/agent/tunnel", server.port())),
        &ClientOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(scheme_seen(&ping_pong(channel, 10).await), "ws");
    server.stop().await;
}

#[tokio::test]
async fn wss_round_trip() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let channel = connect(
        &addr(&format!("wss://localhost:{}", server.port())),
        &trusting(&pki),
    )
    .await
    .unwrap();
    assert_eq!(scheme_seen(&ping_pong(channel, 10).await), "wss");
    server.stop().await;
}

/// One TLS listener serves both gRPC and WebSocket clients at the same time.
#[tokio::test]
async fn one_port_serves_grpcs_and_wss() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let opts = trusting(&pki);
    let grpcs = connect(
        &addr(&format!("grpcs://localhost:{}", server.port())),
        &opts,
    )
    .await
    .unwrap();
    let wss = connect(&addr(&format!("wss://localhost:{}", server.port())), &opts)
        .await
        .unwrap();
    let (a, b) = tokio::join!(ping_pong(grpcs, 5), ping_pong(wss, 5));
    assert_eq!(scheme_seen(&a), "grpcs");
    assert_eq!(scheme_seen(&b), "wss");
    server.stop().await;
}

async fn many_concurrent_streams(address: KasAddress, opts: ClientOptions) {
    let channel = connect(&address, &opts).await.unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(ping_pong(channel.clone(), 3)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn many_concurrent_streams_over_one_ws_channel() {
    let server = TestServer::start(None).await;
    many_concurrent_streams(
        addr(&format!("ws://127.0.0.1:{}", server.port())),
        ClientOptions::default(),
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn many_concurrent_streams_over_one_grpcs_channel() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    many_concurrent_streams(
        addr(&format!("grpcs://127.0.0.1:{}", server.port())),
        trusting(&pki),
    )
    .await;
    server.stop().await;
}

/// 5 MB in 32 KiB Data frames, sent while replies are read, arrives intact and in order.
#[tokio::test]
async fn large_payload_over_ws() {
    let server = TestServer::start(None).await;
    let channel = connect(
        &addr(&format!("ws://127.0.0.1:{}", server.port())),
        &ClientOptions::default(),
    )
    .await
    .unwrap();

    // Not a repeating pattern with a 32 KiB period, so reordered frames would be noticed.
    let payload: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let (tx, mut replies, _) = open(channel).await;
    let to_send = payload.clone();
    let sender = tokio::spawn(async move {
        for chunk in to_send.chunks(32 * 1024) {
            tx.send(data_frame(chunk.to_vec())).await.unwrap();
        }
        tx.send(close_frame()).await.unwrap();
        tx
    });

    let mut received = Vec::with_capacity(payload.len());
    loop {
        let frame = replies.message().await.unwrap().unwrap();
        match frame.frame {
            Some(server_frame::Frame::Data(d)) => {
                assert!(d.data.len() <= 32 * 1024);
                received.extend_from_slice(&d.data);
            }
            Some(server_frame::Frame::CloseSend(_)) => break,
            other => panic!("unexpected frame {other:?}"),
        }
    }
    drop(sender.await.unwrap());
    assert!(replies.message().await.unwrap().is_none());
    assert_eq!(received.len(), payload.len());
    assert!(received == payload, "payload corrupted");
    server.stop().await;
}

#[tokio::test]
async fn wss_with_wrong_ca_fails_with_tls_error() {
    let pki = Pki::temporary();
    let other = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let err = connect(
        &addr(&format!("wss://localhost:{}", server.port())),
        &trusting(&other),
    )
    .await
    .unwrap_err();
    match Error::find_in(&err) {
        Some(Error::TlsHandshake(io)) => {
            let rustls_err = io
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .unwrap_or_else(|| panic!("not a rustls error: {io:?}"));
            assert!(
                matches!(rustls_err, rustls::Error::InvalidCertificate(_)),
                "{rustls_err:?}"
            );
        }
        other => panic!("expected a TLS handshake error, got {other:?} from {err:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn grpc_client_to_unused_port_fails_with_connect_error() {
    let port = tether_test_support::unused_port();
    let err = connect(
        &addr(&format!("grpc://127.0.0.1:{port}")),
        &ClientOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(Error::find_in(&err), Some(Error::Connect { .. })),
        "{err:?}"
    );
}

/// A path that accepts the connection and forwards nothing (a proxy or load balancer whose
/// backend vanished): the call fails at the dial's timeout, saying kas sent nothing. agentk
/// used to wait for its keep-alive round (75 s) on each reconnect.
#[tokio::test]
async fn a_connection_kas_sends_nothing_on_fails_at_the_connect_timeout() {
    let (listener, port) = tether_test_support::tokio_listener().await;
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let opts = ClientOptions {
        connect_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let channel = connect_lazy(&addr(&format!("grpc://127.0.0.1:{}", port.port())), &opts).unwrap();
    let mut client =
        tether_protocol::tunnel::reverse_tunnel_client::ReverseTunnelClient::new(channel);
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let call = client.connect(tokio_stream::wrappers::ReceiverStream::new(rx));
    let status = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call should fail at the connect timeout, not hang")
        .unwrap_err();
    let text = tether_transport::with_causes(&status);
    assert!(text.contains("kas sent nothing within 300ms"), "{text}");
    accepted.abort();
}

/// Performs a WebSocket upgrade offering `protocol` (if any) and returns the HTTP status.
async fn upgrade_status(port: u16, protocol: Option<&'static str>) -> u16 {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut request = format!("ws://127.0.0.1:{port}/")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("unexpected handshake error {e:?}"),
    }
}

#[tokio::test]
async fn websocket_without_ws_tunnel_subprotocol_is_refused() {
    let server = TestServer::start(None).await;
    assert_eq!(upgrade_status(server.port(), None).await, 400);
    assert_eq!(upgrade_status(server.port(), Some("chat")).await, 400);
    assert_eq!(
        upgrade_status(server.port(), Some("chat, ws-tunnel")).await,
        101
    );
    // Refused handshakes do not stop the server.
    let channel = connect(
        &addr(&format!("ws://127.0.0.1:{}", server.port())),
        &ClientOptions::default(),
    )
    .await
    .unwrap();
    ping_pong(channel, 1).await;
    server.stop().await;
}

/// Clients stuck in their handshake (silent, or sending garbage) do not hold up others.
#[tokio::test]
async fn stalled_handshakes_do_not_block_other_clients() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let mut garbage = TcpStream::connect(server.addr).await.unwrap();
    garbage.write_all(b"hello\r\n").await.unwrap();
    let channel = connect(
        &addr(&format!("grpcs://localhost:{}", server.port())),
        &trusting(&pki),
    )
    .await
    .unwrap();
    ping_pong(channel, 2).await;
    server.stop().await;
}

/// Handshakes that never finish are dropped after the handshake timeout (virtual time).
#[tokio::test(start_paused = true)]
async fn silent_connection_is_dropped_after_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let server = TestServer::start(None).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 1];
    // With the clock paused, tokio advances time whenever every task is idle, so this read
    // returns once the server's 10 s timeout has fired and closed the socket.
    let n = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf))
        .await
        .expect("server kept a silent connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    server.stop().await;
}
