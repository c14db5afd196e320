//! Abuse limits of kas's listeners, against a real kas process with raw TCP/TLS clients:
//! slowloris and never-handshaking clients are closed within the configured timeouts,
//! connection caps (per address and global) refuse at once, keep-alive clients still work,
//! and webhooks/admin API are separated (with TLS on both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Kas, KasOptions, Pki, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Slack for scheduling between a deadline and the client seeing the close.
const SLACK: Duration = Duration::from_millis(1500);

/// A connection from `source` (an address in 127/8) to `port` on 127.0.0.1.
async fn connect_from(source: [u8; 4], port: u16) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((source, 0))).unwrap();
    s.connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// Reads until the server closes (EOF or reset); fails the test if it takes over `limit`.
/// Returns whatever the server sent.
async fn wait_closed(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all)
        .await
        .expect("the server did not close the connection in time");
    got
}

/// Sends a header byte every second (slowloris) until the server closes the connection;
/// returns how long the connection lived.
async fn slowloris(port: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let trickle = tokio::spawn(async move {
        let head =
            b"GET /api/v1/debug/stats HTTP/1.1\r\nHost: kas\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for b in head {
            tick.tick().await;
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    trickle.abort();
    assert!(
        closed.is_ok(),
        "a slowloris client on port {port} was not closed within {limit:?}"
    );
    started.elapsed()
}

/// Sends one HTTP/1.1 request on `s` and reads its response; returns the status code.
async fn request(s: &mut TcpStream, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: kas\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before a response; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while got.len() < head_end + len {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn limits(lines: &[&str]) -> String {
    lines.iter().map(|l| format!("    {l}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_closed_within_the_header_timeout_on_every_http_listener() {
    let dir = tempfile::tempdir().unwrap();
    let header = limits(&["header_timeout: 2s"]);
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            k8s_listen_extra: header.clone(),
            api_listen_extra: header.clone(),
            observability_listen_extra: header.clone(),
            webhooks_listen_extra: header,
            ..KasOptions::default()
        },
    )
    .await;
    let timeout = Duration::from_secs(2);
    // Twenty on the proxy (as in the report) and a few on the others, all at once.
    let mut clients = Vec::new();
    for (i, port) in std::iter::repeat_n(kas.k8s_port, 20)
        .chain([kas.api_port, kas.webhook_port, kas.obs_port])
        .enumerate()
    {
        clients.push((i, port, tokio::spawn(slowloris(port, timeout + SLACK))));
    }
    for (i, port, c) in clients {
        let lived = c.await.unwrap();
        eprintln!("slowloris {i} on port {port} closed after {lived:?}");
        assert!(
            lived >= timeout - Duration::from_millis(100),
            "closed too early: {lived:?}"
        );
    }
    let series = r#"kas_listener_connections_closed_total{listener="kubernetes_api",reason="header_timeout"}"#;
    let n = wait_for(
        "the header-timeout metric",
        Duration::from_secs(5),
        || async { kas.metric(series).await.filter(|n| *n >= 20.0) },
    )
    .await;
    assert_eq!(n, 20.0);
}

/// A body sent a byte at a time to a route that reads it before knowing who sends it (a push
/// webhook; the web UI's login form) is cut off once it has taken `BODY_TIMEOUT` (10 s): the
/// header timeout stops at the end of the headers, so it used to hold its connection for as
/// long as it trickled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_read_before_authentication_must_arrive_within_10s() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            webhooks_listener: true,
            extra_yaml: format!(
                "web:\n  listen:\n    address: 127.0.0.1:{}\n",
                support::WEB_PORT
            ),
            ..KasOptions::default()
        },
    )
    .await;
    let routes = [
        (kas.webhook_port, "/webhooks/projects/1", "application/json"),
        (kas.web_port, "/login", "application/x-www-form-urlencoded"),
    ];
    let trickles = routes.map(|(port, path, kind)| async move {
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: kas\r\nContent-Type: {kind}\r\nContent-Length: 1000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let trickle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if w.write_all(b"a").await.is_err() {
                    return;
                }
            }
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10) + SLACK,
            r.read_to_end(&mut answer),
        )
        .await;
        trickle.abort();
        assert!(read.is_ok(), "{path}: still open after {:?}", started.elapsed());
        let lived = started.elapsed();
        assert!(lived >= Duration::from_millis(9900), "{path}: cut too early ({lived:?})");
        let status = String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned();
        assert!(status.starts_with("HTTP/1.1 4"), "{path}: {status:?}");
    });
    futures_util::future::join_all(trickles).await;
}

/// An HTTP/2 client that finishes its handshake but never sends a request with accepted
/// credentials is closed at `agent.authentication_timeout` (it held its slot for the
/// connection's whole age, hours, before); a real agentk, authenticated at once, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connections_that_never_authenticate_are_closed_and_agents_stay() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            agent_extra: "  authentication_timeout: 2s\n",
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/app", "agent")
        .await
        .unwrap();
    let _agent = support::Agent::start(dir.path(), "agentk", &kas.url("grpc"), &t.token, None);
    let before = kas.wait_connected(t.agent_id).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", kas.agent_port))
        .await
        .unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame: a complete handshake, then nothing.
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    wait_closed(&mut silent, Duration::from_secs(2) + SLACK).await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1900),
        "closed too early ({lived:?})"
    );
    let series =
        r#"kas_listener_connections_closed_total{listener="agent",reason="not_authenticated"}"#;
    assert_eq!(kas.metric(series).await, Some(1.0));

    // The agent's connection is older than the deadline and is the same one.
    let after = kas.wait_connected(t.agent_id).await;
    let since = |v: &kas::api::AgentView| -> Vec<String> {
        v.connections
            .iter()
            .map(|c| c.connected_since.clone())
            .collect()
    };
    assert_eq!(since(&after), since(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_send_a_client_hello_are_closed_within_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let pair = (pki.cert.clone(), pki.key.clone());
    let hs = limits(&["handshake_timeout: 1s"]);
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            tls: Some(pair.clone()),
            k8s_tls: Some(pair.clone()),
            webhooks_tls: Some(pair.clone()),
            api_tls: Some((pki.cert.clone(), pki.key.clone(), pki.ca.clone())),
            agent_listen_extra: hs.clone(),
            k8s_listen_extra: hs.clone(),
            api_listen_extra: hs.clone(),
            webhooks_listen_extra: hs,
            ..KasOptions::default()
        },
    )
    .await;
    let timeout = Duration::from_secs(1);
    let ports = [
        ("agent", kas.agent_port),
        ("kubernetes_api", kas.k8s_port),
        ("api", kas.api_port),
        ("webhooks", kas.webhook_port),
    ];
    let mut silent = Vec::new();
    for (name, port) in ports {
        for _ in 0..10 {
            silent.push((name, TcpStream::connect(("127.0.0.1", port)).await.unwrap()));
        }
    }
    let started = Instant::now();
    let waits = silent.into_iter().map(|(name, mut s)| async move {
        let got = wait_closed(&mut s, timeout + SLACK).await;
        assert!(
            got.is_empty(),
            "{name}: the server sent {got:?} before closing"
        );
        (name, started.elapsed())
    });
    for (name, lived) in futures_util::future::join_all(waits).await {
        assert!(
            lived >= timeout - Duration::from_millis(100),
            "{name}: closed too early ({lived:?})"
        );
        eprintln!("{name}: a silent TLS client was closed after {lived:?}");
    }
    for (name, _) in ports {
        let series = format!(
            r#"kas_listener_connections_closed_total{{listener="{name}",reason="handshake_timeout"}}"#
        );
        wait_for(&series, Duration::from_secs(5), || async {
            kas.metric(&series).await.filter(|n| *n >= 10.0)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_per_address_cap_a_connection_is_refused_while_another_address_works() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            k8s_listen_extra: limits(&["max_connections_per_address: 2"]),
            ..KasOptions::default()
        },
    )
    .await;
    let port = kas.k8s_port;
    // A full exchange on each proves both were admitted before the third arrives.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from([127, 0, 0, 1], port).await;
        assert_eq!(request(&mut s, "/version").await, 401);
        held.push(s);
    }
    let mut third = connect_from([127, 0, 0, 1], port).await;
    let started = Instant::now();
    let _ = third
        .write_all(b"GET /version HTTP/1.1\r\nHost: kas\r\n\r\n")
        .await;
    let got = wait_closed(&mut third, Duration::from_secs(1)).await;
    assert!(
        got.is_empty(),
        "a refused connection got an answer: {got:?}"
    );
    eprintln!(
        "the third connection from 127.0.0.1 was closed after {:?}",
        started.elapsed()
    );

    let mut other = connect_from([127, 0, 0, 2], port).await;
    assert_eq!(
        request(&mut other, "/version").await,
        401,
        "127.0.0.2 must still be served"
    );

    let series = r#"kas_listener_connections_refused_total{listener="kubernetes_api",reason="max_connections_per_address"}"#;
    assert_eq!(kas.metric(series).await, Some(1.0));
    support::monitoring::assert_area_exported(
        "listeners.rs",
        &[&kas.metrics_text().await.unwrap()],
    );

    // Closing one frees its slot once kas has noticed the close.
    drop(held.pop());
    wait_for("a freed slot", Duration::from_secs(5), || async {
        let mut s = connect_from([127, 0, 0, 1], port).await;
        s.write_all(b"GET /version HTTP/1.1\r\nHost: kas\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.ok()?;
        buf.starts_with(b"HTTP/1.1 401").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_global_cap_every_address_is_refused_on_the_proxy_and_the_agent_listener() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            k8s_listen_extra: limits(&["max_connections: 2"]),
            agent_listen_extra: limits(&["max_connections: 1"]),
            ..KasOptions::default()
        },
    )
    .await;
    let mut held = Vec::new();
    for source in [[127, 0, 0, 1], [127, 0, 0, 3]] {
        let mut s = connect_from(source, kas.k8s_port).await;
        assert_eq!(request(&mut s, "/version").await, 401);
        held.push(s);
    }
    let mut refused = connect_from([127, 0, 0, 2], kas.k8s_port).await;
    let _ = refused
        .write_all(b"GET /version HTTP/1.1\r\nHost: kas\r\n\r\n")
        .await;
    assert!(
        wait_closed(&mut refused, Duration::from_secs(1))
            .await
            .is_empty()
    );

    // The agent listener: one connection in its handshake holds the only slot.
    let _agent = connect_from([127, 0, 0, 1], kas.agent_port).await;
    wait_for(
        "the agent listener to admit one connection",
        Duration::from_secs(5),
        || async {
            kas.metric(r#"kas_listener_connections{listener="agent"}"#)
                .await
                .filter(|n| *n == 1.0)
        },
    )
    .await;
    let mut second = connect_from([127, 0, 0, 2], kas.agent_port).await;
    assert!(
        wait_closed(&mut second, Duration::from_secs(1))
            .await
            .is_empty()
    );
    for (listener, n) in [("kubernetes_api", 1.0), ("agent", 1.0)] {
        let series = format!(
            r#"kas_listener_connections_refused_total{{listener="{listener}",reason="max_connections"}}"#
        );
        assert_eq!(kas.metric(&series).await, Some(n), "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_may_pause_between_requests_and_idle_ones_close_at_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            k8s_listen_extra: limits(&["header_timeout: 1s", "idle_timeout: 3s"]),
            ..KasOptions::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(("127.0.0.1", kas.k8s_port))
        .await
        .unwrap();
    assert_eq!(request(&mut s, "/version").await, 401);
    // Longer than the header timeout, shorter than the idle timeout: a kubectl-like client
    // reusing its connection after a pause must still be served on it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(request(&mut s, "/api").await, 401);
    let last = Instant::now();
    let got = wait_closed(&mut s, Duration::from_secs(3) + SLACK).await;
    let lived = last.elapsed();
    assert!(got.is_empty());
    assert!(
        lived >= Duration::from_millis(2900),
        "closed before the idle timeout: {lived:?}"
    );
    eprintln!("an idle keep-alive connection was closed {lived:?} after its last response");
    let series =
        r#"kas_listener_connections_closed_total{listener="kubernetes_api",reason="idle_timeout"}"#;
    assert_eq!(kas.metric(series).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_have_their_own_listener_and_the_admin_api_no_longer_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    assert_ne!(kas.webhook_port, kas.api_port);
    // 401: the route exists and refuses an unknown project without saying it is unknown.
    assert_eq!(kas.webhook(42, &[], b"{}").await, 401);
    // With the admin token, so the 404 is about the route (without it, everything on the
    // internal API is 401).
    let token = std::fs::read_to_string(dir.path().join("data/admin-token")).unwrap();
    let mut api = TcpStream::connect(("127.0.0.1", kas.api_port))
        .await
        .unwrap();
    api.write_all(
        format!(
            "POST /webhooks/projects/42 HTTP/1.1\r\nHost: kas\r\nAuthorization: Bearer {}\r\nContent-Length: 2\r\n\r\n{{}}",
            token.trim()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    api.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");
    // And the webhook listener serves nothing of the admin API.
    let mut hooks = TcpStream::connect(("127.0.0.1", kas.webhook_port))
        .await
        .unwrap();
    assert_eq!(request(&mut hooks, "/api/v1/agents").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_webhook_listener_webhooks_stay_on_the_internal_api() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            webhooks_listener: false,
            ..KasOptions::default()
        },
    )
    .await;
    assert_eq!(kas.webhook_port, kas.api_port);
    assert_eq!(kas.webhook(42, &[], b"{}").await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_commands_and_webhooks_work_over_tls_trusting_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            api_tls: Some((pki.cert.clone(), pki.key.clone(), pki.ca.clone())),
            webhooks_tls: Some((pki.cert.clone(), pki.key.clone())),
            ..KasOptions::default()
        },
    )
    .await;
    // The real CLI, with only the configuration file: https and the CA come from it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args([
            "agent",
            "register",
            "--project",
            "group/app",
            "--name",
            "tls",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kas.admin.list_agents().await.unwrap().len(), 1);

    // Plain HTTP to the TLS internal API gets nothing useful.
    let mut plain = TcpStream::connect(("127.0.0.1", kas.api_port))
        .await
        .unwrap();
    let _ = plain
        .write_all(b"GET /api/v1/agents HTTP/1.1\r\nHost: kas\r\n\r\n")
        .await;
    let got = wait_closed(&mut plain, Duration::from_secs(12)).await;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "{got:?}");

    // A webhook over TLS trusting the CA.
    let tls = tether_transport::load_client_tls(Some(&pki.ca)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let tcp = TcpStream::connect(("127.0.0.1", kas.webhook_port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    s.write_all(b"POST /webhooks/projects/42 HTTP/1.1\r\nHost: kas\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .await
        .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

/// What one agent connection and one agent may make kas hold: kas advertises at most
/// `agent.max_streams_per_connection` concurrent streams per connection in its HTTP/2 SETTINGS
/// (a client opening more had each one held until its descriptor timeout: 15,000 streams of a
/// stolen token took 270 MB), and refuses tunnel streams over `agent.max_streams_per_agent`
/// (counted), while the agent's streams within the cap keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connections_and_agents_have_stream_caps() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            agent_extra: "  max_streams_per_connection: 16\n  max_streams_per_agent: 3\n",
            ..KasOptions::default()
        },
    )
    .await;
    let mut raw = TcpStream::connect(("127.0.0.1", kas.agent_port))
        .await
        .unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert_eq!(max_concurrent_streams(&mut raw).await, Some(16));

    let t = kas
        .admin
        .register_agent("group/app", "agent")
        .await
        .unwrap();
    let url = kas.url("grpc");
    let args = ["--tunnel-min-idle", "5"];
    let _agent = support::Agent::start_with(dir.path(), "agentk", &url, &t.token, None, &args);
    kas.wait_connected(t.agent_id).await;
    let series = "kas_tunnel_streams_over_agent_cap_total";
    wait_for(
        "a stream refused over the cap",
        Duration::from_secs(20),
        || async { kas.metric(series).await.filter(|n| *n >= 1.0) },
    )
    .await;
    let echoed = kas
        .admin
        .echo(t.agent_id, b"capped".to_vec())
        .await
        .unwrap();
    assert_eq!(echoed.as_ref(), b"capped");
    assert!(
        kas.log().contains("agent.max_streams_per_agent"),
        "{}",
        kas.log()
    );
}

/// SETTINGS_MAX_CONCURRENT_STREAMS of the server's first SETTINGS frame, if it sets one.
async fn max_concurrent_streams(s: &mut TcpStream) -> Option<u32> {
    let mut header = [0u8; 9];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    payload.chunks_exact(6).find_map(|e| {
        (u16::from_be_bytes([e[0], e[1]]) == 0x3)
            .then(|| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
    })
}

/// A request head over 128 KiB is answered 431 at once on the proxy (and every HTTP listener);
/// hyper's own limit (about 400 KiB) let a 300 KB header wait for the header timeout (10 s)
/// and close without an answer. A 100 KB header is still read (401: no credentials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_request_head_is_answered_431_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    let head = |kb: usize| {
        format!(
            "GET /api HTTP/1.1\r\nHost: kas\r\nX-Big: {}\r\n\r\n",
            "a".repeat(kb * 1000)
        )
    };
    let (status, took) = answer(kas.k8s_port, &head(100)).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let (status, took) = answer(kas.k8s_port, &head(300)).await;
    assert!(
        took < Duration::from_secs(2),
        "answered after {took:?}: {status}"
    );
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
}

/// Sends `request` and reads the first line of the answer (empty if the connection closed
/// without one), with how long it took.
async fn answer(port: u16, request: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut read, mut write) = s.split();
    let send = async {
        // The server may answer and close before it read everything: not an error here.
        let _ = write.write_all(request.as_bytes()).await;
    };
    let mut got = Vec::new();
    let receive = async {
        let mut buf = [0u8; 1024];
        while !got.contains(&b'\n') {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::join!(send, receive);
    let line = String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    (line, started.elapsed())
}
