//! kas ⇄ agentk end to end, as real processes on 127.0.0.1: transports, authentication,
//! revocation, restarts, concurrency, flow control and leaks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::{Agent, Kas, KasOptions, Pki, wait_for};

fn payload(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_connects_over_grpc_grpcs_ws_and_wss() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let plain = Kas::start(&dir.path().join("plain"), KasOptions::default()).await;
    let tls = Kas::start(
        &dir.path().join("tls"),
        KasOptions {
            tls: Some((pki.cert.clone(), pki.key.clone())),
            ..KasOptions::default()
        },
    )
    .await;
    for (scheme, kas) in [
        ("grpc", &plain),
        ("ws", &plain),
        ("grpcs", &tls),
        ("wss", &tls),
    ] {
        let t = kas
            .admin
            .register_agent("group/app", &format!("agent-{scheme}"))
            .await
            .unwrap();
        let ca = scheme.ends_with('s').then_some(pki.ca.as_path());
        let mut agent = Agent::start(
            dir.path(),
            &format!("agentk-{scheme}"),
            &kas.url(scheme),
            &t.token,
            ca,
        );
        let view = kas.wait_connected(t.agent_id).await;
        assert_eq!(view.connections.len(), 1, "{scheme}: {view:?}");
        let c = &view.connections[0];
        assert_eq!(c.pod_name, format!("agentk-{scheme}"));
        assert_eq!(c.pod_namespace, "gitlab-agent");
        // With its commit, so `kas agent list` tells agents built from two commits apart.
        assert_eq!(
            c.agent_version,
            format!(
                "{}+{}",
                env!("CARGO_PKG_VERSION"),
                tether_build_info::COMMIT
            )
        );
        assert!(c.remote_addr.starts_with("127.0.0.1:"), "{c:?}");
        // A request really crosses the tunnel and comes back.
        let p = payload(1, 100_000);
        let back = kas.admin.echo(t.agent_id, p.clone()).await.unwrap();
        assert_eq!(back.as_ref(), p.as_slice(), "{scheme}");
        wait_for("readiness", Duration::from_secs(10), || async {
            (agent.probe("/readiness").await == Some(200)).then_some(())
        })
        .await;
        let lines = agent.log_lines();
        assert!(
            lines.iter().any(|l| l["msg"] == "Feature status change"
                && l["feature_name"] == "tunnel"
                && l["mod_name"] == "reverse_tunnel"),
            "{}",
            agent.log()
        );
        assert!(
            lines
                .iter()
                .any(|l| l["msg"] == "Observability endpoint is up")
        );
        agent.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_with_one_clear_log_line_and_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas.admin.register_agent("group/app", "good").await.unwrap();
    let agent = Agent::start(
        dir.path(),
        "bad",
        &kas.url("grpc"),
        "tether_not-a-real-token",
        None,
    );
    let first = Instant::now();
    wait_for(
        "the agent's refusal log line",
        Duration::from_secs(20),
        || async {
            agent
                .log()
                .contains("kas refused the agent token (unauthenticated)")
                .then_some(())
        },
    )
    .await;
    // Retries back off: three failed attempts take at least 0.4 s + 0.64 s (0.5 s and 0.8 s
    // minus 20 % jitter). A lower bound cannot be flaky.
    wait_for("three failed attempts", Duration::from_secs(30), || async {
        (agent.metric("agentk_tunnel_open_failures_total").await? >= 3.0).then_some(())
    })
    .await;
    assert!(
        first.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        first.elapsed()
    );
    let refusals = agent
        .log_lines()
        .iter()
        .filter(|l| l["level"] == "error")
        .count();
    assert_eq!(
        refusals,
        1,
        "one clear error, not one per retry:\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("tether_not-a-real-token"),
        "the token must never be logged"
    );
    assert_eq!(agent.probe("/readiness").await, Some(503));
    assert_eq!(agent.probe("/liveness").await, Some(200));
    assert!(!kas.agent(t.agent_id).await.connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_ends_idle_and_busy_streams() {
    let dir = tempfile::tempdir().unwrap();
    let kas = kas_waiting_a_second(dir.path()).await;
    let t = kas
        .admin
        .register_agent("group/app", "revokee")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "revokee", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;

    // A busy stream: an echo whose request body stays open.
    let (tx, mut resp_body) = busy_echo(&kas, t.agent_id).await;

    let r = kas.admin.revoke_token(t.token_id).await.unwrap();
    assert!(r.was_active);
    assert!(r.streams_ended >= 2, "{r:?}");
    // The busy stream ends (with an error: it was cut, not finished).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = resp_body.frame().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the busy stream did not end after revocation"
    );
    drop(tx);
    kas.wait_disconnected(t.agent_id).await;
    wait_for("the agent's log line", Duration::from_secs(10), || async {
        agent
            .log()
            .contains("kas refused the agent token")
            .then_some(())
    })
    .await;
    let err = kas.admin.echo(t.agent_id, b"x".to_vec()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("agent {} is not connected", t.agent_id)),
        "{err}"
    );
}

/// Token rotation as an operator does it: a new token written to the agent's token file
/// (the Secret updated), then the old one revoked once `kas token list` shows no stream open
/// with it. agentk reads the file again and reopens every stream with the new token (the
/// tunnel's idle streams, the configuration and manifests streams) on its own, so the
/// revocation ends nothing and agentk never hears a refusal. Before, the streams kept the old
/// token until kas's connection age ended them (2 h), and revoking it cut them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_moves_every_stream_to_the_new_token_before_the_old_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas
        .admin
        .register_agent("group/app", "rotating")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "rotating", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    let streams = |id: i64| {
        let admin = kas.admin.clone();
        async move {
            let tokens = admin.list_tokens(t.agent_id).await.unwrap();
            tokens.iter().find(|x| x.id == id).unwrap().open_streams
        }
    };
    assert!(streams(t.token_id).await >= 1, "the agent's streams count");

    let new = kas.admin.create_token(t.agent_id, "rotated").await.unwrap();
    std::fs::write(
        dir.path().join("rotating.token"),
        format!("{}\n", new.token),
    )
    .unwrap();
    let t0 = Instant::now();
    // Both at once: between the old streams ending and the new ones opening, kas counts none
    // on either token for a moment.
    wait_for(
        "no stream left on the old token, and streams on the new one",
        Duration::from_secs(20),
        || async {
            let moved = streams(t.token_id).await == 0 && streams(new.token_id).await >= 1;
            moved.then_some(())
        },
    )
    .await;
    eprintln!(
        "every stream moved {:?} after the file changed",
        t0.elapsed()
    );

    let r = kas.admin.revoke_token(t.token_id).await.unwrap();
    assert_eq!(r.streams_ended, 0, "{r:?}");
    let echoed = kas
        .admin
        .echo(t.agent_id, b"rotated".to_vec())
        .await
        .unwrap();
    assert_eq!(echoed.as_ref(), b"rotated");
    let log = agent.log();
    assert!(log.contains("Agent token file changed"), "{log}");
    assert!(!log.contains("kas refused the agent token"), "{log}");
}

/// Rotating tokens, an operator checks the old one is no longer used before revoking it:
/// `kas token list` says when kas last saw each token in use. The time is written soon after
/// the agent connects, advances at each token re-check while the connection stays open, and
/// outlives a kas restart (so does the agent's `last_seen`); a token never used says `never`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tokens_last_use_is_recorded_and_outlives_a_kas_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = KasOptions {
        token_recheck: "1s",
        ..KasOptions::default()
    };
    let mut kas = Kas::start(dir.path(), opts).await;
    let t = kas.admin.register_agent("group/app", "used").await.unwrap();
    let spare = kas.admin.create_token(t.agent_id, "spare").await.unwrap();
    let mut agent = Agent::start(dir.path(), "used", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    let last_used = |kas: &Kas| {
        let admin = kas.admin.clone();
        async move {
            let tokens = admin.list_tokens(t.agent_id).await.unwrap();
            let of = |id: i64| tokens.iter().find(|x| x.id == id).unwrap().last_used_at;
            (of(t.token_id), of(spare.token_id))
        }
    };
    let first = wait_for(
        "the token's use recorded",
        Duration::from_secs(20),
        || async { last_used(&kas).await.0 },
    )
    .await;
    let later = wait_for(
        "its use recorded again",
        Duration::from_secs(20),
        || async { last_used(&kas).await.0.filter(|at| *at > first) },
    )
    .await;
    assert_eq!(
        last_used(&kas).await.1,
        None,
        "the spare token was never used"
    );

    agent.stop();
    kas.wait_disconnected(t.agent_id).await;
    kas.restart().await;
    let (used, never) = last_used(&kas).await;
    assert!(used >= Some(later), "{used:?} after {later}");
    assert_eq!(never, None);
    // The restarted kas never saw the agent, yet knows when it was last seen connected.
    let seen = kas.agent(t.agent_id).await.last_seen;
    assert!(seen.is_some(), "no last_seen after the restart");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(["token", "list", "--agent-id", &t.agent_id.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = |id: i64| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no row {id}: {table}"))
            .to_owned()
    };
    assert!(
        table.starts_with("ID") && table.contains("LAST USED"),
        "{table}"
    );
    assert!(row(spare.token_id).contains("never"), "{table}");
    assert!(!row(t.token_id).contains("never"), "{table}");
}

/// CA rotation as cert-manager and trust-manager do it: agentk's CA file (a mounted Secret or
/// ConfigMap) first gets the new CA beside the old one, then kas's certificate is renewed from
/// the new CA. agentk used to trust only the CA file it read at start, so it could never
/// reconnect after kas restarted with the new certificate; it now reads the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotated_in_agentks_ca_file_is_trusted_when_kas_reconnects_with_a_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Pki::temporary(), Pki::temporary());
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let (cert, key, ca) = (
        served.join("tls.crt"),
        served.join("tls.key"),
        dir.path().join("agent-ca.pem"),
    );
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    std::fs::copy(&old.ca, &ca).unwrap();
    let mut kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            tls: Some((cert.clone(), key.clone())),
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/app", "rotca")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "rotca", &kas.url("grpcs"), &t.token, Some(&ca));
    kas.wait_connected(t.agent_id).await;

    // The trust bundle gets the new CA first, then kas's certificate comes from it.
    let bundle = [old.ca.as_path(), new.ca.as_path()]
        .map(|p| std::fs::read_to_string(p).unwrap())
        .concat();
    std::fs::write(&ca, bundle).unwrap();
    std::fs::copy(&new.key, &key).unwrap();
    std::fs::copy(&new.cert, &cert).unwrap();
    kas.kill9_restart().await;

    let echoed = wait_for(
        "agentk back over the new certificate",
        Duration::from_secs(30),
        || async { kas.admin.echo(t.agent_id, b"rotated".to_vec()).await.ok() },
    )
    .await;
    assert_eq!(echoed.as_ref(), b"rotated");
    assert!(
        agent.log().contains("CA certificate file changed"),
        "{}",
        agent.log()
    );
}

/// An agentk that does not trust kas's certificate (here signed by another CA of the same
/// name, as after a bad rotation: the signature does not verify) is said on kas's side too: a warning naming the client's alert, and
/// `kas_listener_connections_closed_total{reason="certificate_refused"}`. kas logged such
/// handshakes at debug only, so a rotation that cut every agent showed nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_says_when_agents_refuse_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (served, other) = (Pki::temporary(), Pki::temporary());
    let (kas, t) = tls_kas_with_agent(dir.path(), &served, "distrust").await;
    let url = kas.url("grpcs");
    let _agent = Agent::start(dir.path(), "distrust", &url, &t.token, Some(&other.ca));
    let series =
        r#"kas_listener_connections_closed_total{listener="agent",reason="certificate_refused"}"#;
    wait_for(
        "kas to count the refusal",
        Duration::from_secs(30),
        || async { kas.metric(series).await.filter(|n| *n >= 1.0) },
    )
    .await;
    let log = kas.log();
    assert!(
        log.contains("the client refused kas's certificate")
            && log.contains("received fatal alert"),
        "{log}"
    );
}

/// kas says ahead of time when a certificate it serves expires — a gauge of each listener's
/// `notAfter`, a warning while it is within its warning period, an error once it has expired —
/// and a client refusing the expired certificate of the Kubernetes API listener is counted and
/// said as on the agent listener. (Nothing was said before every client was refused, and
/// refusals were counted on the agent listener only: E14 F2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_says_ahead_when_its_certificates_expire_and_when_clients_refuse_an_expired_one() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let dir = tempfile::tempdir().unwrap();
    let (day, now) = (Duration::from_secs(86_400), SystemTime::now());
    let soon = Pki::temporary_valid(now - 30 * day, now + 2 * day);
    let expired = Pki::temporary_valid(now - 60 * day, now - day);
    let opts = KasOptions {
        tls: Some((soon.cert.clone(), soon.key.clone())),
        k8s_tls: Some((expired.cert.clone(), expired.key.clone())),
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
    let gauge = |listener: &str| {
        format!(r#"kas_tls_certificate_expiry_timestamp_seconds{{listener="{listener}"}}"#)
    };
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as f64;
    assert_eq!(kas.metric(&gauge("agent")).await, Some(secs(now + 2 * day)));
    assert_eq!(
        kas.metric(&gauge("kubernetes_api")).await,
        Some(secs(now - day))
    );
    let text = kas.metrics_text().await.unwrap();
    support::monitoring::assert_area_exported("tunnel.rs", &[&text]);
    let log = kas.log();
    let line = |says: &str| log.lines().find(|l| l.contains(says)).unwrap_or_default();
    let warned = line("The TLS certificate kas serves expires soon");
    assert!(
        warned.contains(r#""level":"warn""#) && warned.contains(r#""listener":"agent""#),
        "{log}"
    );
    let failed = line("The TLS certificate kas serves has expired");
    assert!(
        failed.contains(r#""level":"error""#) && failed.contains(r#""listener":"kubernetes_api""#),
        "{log}"
    );

    let ca = std::fs::read(&expired.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let ring = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(ring)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", kas.k8s_port))
        .await
        .unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    let error = refused.expect_err("the client refuses the expired certificate");
    assert!(error.to_string().contains("expired"), "{error}");
    let series = r#"kas_listener_connections_closed_total{listener="kubernetes_api",reason="certificate_refused"}"#;
    wait_for(
        "kas to count the refusal",
        Duration::from_secs(30),
        || async { kas.metric(series).await.filter(|n| *n >= 1.0) },
    )
    .await;
    assert!(kas.log().contains("the client refused kas's certificate"));
}

/// agentk dialling a TLS listener without TLS (`grpc://`, `ws://`) says to dial `grpcs://` or
/// `wss://`: it said `h2 protocol error: http2 error` and `httparse error: invalid HTTP
/// version`, which name no scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_dialling_a_tls_listener_in_plaintext_says_which_scheme_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::temporary();
    let (kas, t) = tls_kas_with_agent(dir.path(), &pki, "plain").await;
    for scheme in ["grpc", "ws"] {
        let name = format!("plain-{scheme}");
        let agent = Agent::start(dir.path(), &name, &kas.url(scheme), &t.token, None);
        wait_for(
            &format!("agentk over {scheme}:// to say why"),
            Duration::from_secs(20),
            || {
                let said = agent.log().contains("dial it with grpcs:// or wss://");
                async move { said.then_some(()) }
            },
        )
        .await;
    }
}

/// A kas whose agent listener serves `pki`'s certificate, and agent `name` registered there.
async fn tls_kas_with_agent(
    dir: &std::path::Path,
    pki: &Pki,
    name: &str,
) -> (Kas, tether_kas_api::TokenCreated) {
    let kas = Kas::start(
        &dir.join("kas"),
        KasOptions {
            tls: Some((pki.cert.clone(), pki.key.clone())),
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas.admin.register_agent("group/app", name).await.unwrap();
    (kas, t)
}

/// A kas whose requests wait at most a second for a tunnel.
async fn kas_waiting_a_second(dir: &std::path::Path) -> Kas {
    let opts = KasOptions {
        tunnel_wait: "1s",
        ..KasOptions::default()
    };
    Kas::start(dir, opts).await
}

/// An echo that keeps its tunnel stream busy until the returned sender is dropped.
async fn busy_echo(
    kas: &Kas,
    agent_id: i64,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    hyper::body::Incoming,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"busy"))))
        .await
        .unwrap();
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let resp = kas.echo_streaming(agent_id, body).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first.as_ref(), b"busy");
    (tx, body)
}

/// Once a stopping kas closes its listeners (SIGTERM, after `shutdown_delay`), a new client is
/// refused at once even while requests are still in flight on them (they have until
/// `shutdown_timeout`): each connection held the whole listener, so its socket went on
/// accepting into the backlog, answered nothing, and reset every client when kas exited (E9:
/// CI calls hung ~10 s and failed with a bare reset at every rollout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_kas_refuses_new_connections_while_requests_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas
        .admin
        .register_agent("group/app", "stopping")
        .await
        .unwrap();
    let _agent = Agent::start(dir.path(), "stopping", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    let (in_flight, _body) = busy_echo(&kas, t.agent_id).await;
    kas.sigterm();
    let api_port = kas.api_port;
    wait_for(
        "the internal API's listener to refuse connections",
        Duration::from_secs(8),
        || async move {
            let refused = tokio::net::TcpStream::connect(("127.0.0.1", api_port)).await;
            refused
                .err()
                .filter(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    )
    .await;
    assert!(
        kas.running(),
        "kas exited: the request in flight did not hold it"
    );
    drop(in_flight);
}

/// With every tunnel stream agentk may open busy (long watches, exec, port-forward), a new
/// request fails saying so — not "agent N is not connected" while `kas agent list` shows it
/// connected — and both sides say it where operators look (kas's metric, agentk's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_streams_busy_is_told_apart_from_not_connected() {
    let dir = tempfile::tempdir().unwrap();
    let kas = kas_waiting_a_second(dir.path()).await;
    let t = kas
        .admin
        .register_agent("group/app", "capped")
        .await
        .unwrap();
    let extra = ["--tunnel-min-idle=1", "--tunnel-max-streams=2"];
    let agent = Agent::start_with(
        dir.path(),
        "capped",
        &kas.url("grpc"),
        &t.token,
        None,
        &extra,
    );
    kas.wait_connected(t.agent_id).await;
    let (first, _first_body) = busy_echo(&kas, t.agent_id).await;
    let (_second, _second_body) = busy_echo(&kas, t.agent_id).await;

    let err = kas.admin.echo(t.agent_id, b"x".to_vec()).await.unwrap_err();
    assert!(
        err.to_string().contains("all its tunnel streams are busy"),
        "{err}"
    );
    let busy = kas.metric("kas_tunnel_all_streams_busy_total").await;
    assert!(busy >= Some(1.0), "{busy:?}");
    wait_for("agentk's warning", Duration::from_secs(10), || async {
        agent
            .log()
            .contains("All tunnel streams are busy")
            .then_some(())
    })
    .await;

    // A stream freed serves the next request.
    drop(first);
    let echoed = wait_for("a free stream", Duration::from_secs(10), || async {
        kas.admin.echo(t.agent_id, b"free".to_vec()).await.ok()
    })
    .await;
    assert_eq!(echoed.as_ref(), b"free");
}

/// A connection the network drops without a reset (half-open: a load balancer forgot it, a
/// partition) fails no read and no write. Both ends find it by their keep-alive pings (here 1 s
/// + 1 s; 20 s + 10 s by default): kas closes it (the agent shows as not connected unless it is
/// back already), agentk says at warn
/// that the connection went silent — it used to say at info that kas closed it, as at a
/// rotation — and reconnects, and the tunnel serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_without_a_reset_is_found_by_both_ends_and_agentk_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let opts = KasOptions {
        agent_extra: "  keepalive_interval: 1s\n  keepalive_timeout: 1s\n",
        ..KasOptions::default()
    };
    let kas = Kas::start(dir.path(), opts).await;
    let t = kas
        .admin
        .register_agent("group/app", "dropped")
        .await
        .unwrap();
    let relay = tether_test_support::net::SilencingRelay::start(kas.agent_port).await;
    let agent = Agent::start_with(
        dir.path(),
        "dropped",
        &format!("grpc://127.0.0.1:{}", relay.port),
        &t.token,
        None,
        &["--keepalive-interval=1s", "--keepalive-timeout=1s"],
    );
    kas.wait_connected(t.agent_id).await;

    let held = || kas.metric("kas_listener_connections{listener=\"agent\"}");
    assert_eq!(held().await, Some(1.0));
    relay.silence_open_connections();
    let said = wait_for("agentk's warning", Duration::from_secs(30), || async {
        agent
            .log_lines()
            .into_iter()
            .find(|l| l["msg"].as_str().is_some_and(|m| m.contains("went silent")))
    })
    .await;
    assert_eq!(said["level"], "warn", "{said}");
    assert!(
        !agent.log().contains("kas closed the connection"),
        "{}",
        agent.log()
    );
    // Connections opened after the drop are relayed: agentk is back on a new one, and kas
    // closed the dropped one (it would otherwise hold two).
    wait_for(
        "kas to close the dropped connection",
        Duration::from_secs(30),
        || async {
            (held().await == Some(1.0) && kas.agent(t.agent_id).await.connected).then_some(())
        },
    )
    .await;
    let echoed = wait_for("the tunnel again", Duration::from_secs(20), || async {
        kas.admin.echo(t.agent_id, b"back".to_vec()).await.ok()
    })
    .await;
    assert_eq!(echoed.as_ref(), b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_behind_kas_is_noticed_within_the_recheck_interval() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            token_recheck: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/app", "elsewhere")
        .await
        .unwrap();
    let _agent = Agent::start(dir.path(), "elsewhere", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    // An agent whose token stays valid is re-checked in the same batch and kept.
    let k = kas.admin.register_agent("group/app", "kept").await.unwrap();
    let _kept = Agent::start(dir.path(), "kept", &kas.url("grpc"), &k.token, None);
    kas.wait_connected(k.agent_id).await;
    // Another kas replica (here: the store directly) revokes the token.
    use tether_store::Store;
    let store = tether_store::SqliteStore::open(&dir.path().join("data/kas.sqlite"))
        .await
        .unwrap();
    assert!(store.revoke_token(t.token_id).await.unwrap());
    store.close().await;
    let t0 = Instant::now();
    kas.wait_disconnected(t.agent_id).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let echoed = kas.admin.echo(k.agent_id, b"still here".to_vec()).await;
    assert_eq!(echoed.unwrap().as_ref(), b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_reconnects_by_itself_after_a_kas_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas
        .admin
        .register_agent("group/app", "steady")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "steady", &kas.url("ws"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    assert_eq!(
        kas.admin
            .echo(t.agent_id, b"before".to_vec())
            .await
            .unwrap()
            .as_ref(),
        b"before"
    );

    kas.restart().await;
    kas.wait_connected(t.agent_id).await;
    assert_eq!(
        kas.admin
            .echo(t.agent_id, b"after".to_vec())
            .await
            .unwrap()
            .as_ref(),
        b"after"
    );
    let lines = agent.log_lines();
    let changes: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["msg"] == "Feature status change")
        .map(|l| &l["feature_status"])
        .collect();
    // Connected, lost at the restart, connected again (and so it stays). While kas is
    // stopping, a stream agentk opens may be refused a moment after it opened, so the loss can
    // show as a few brief enabled/disabled flaps before the last connection.
    assert_eq!(
        changes.first().copied(),
        Some(&"enabled".into()),
        "{}",
        agent.log()
    );
    assert!(changes.contains(&&"disabled".into()), "{}", agent.log());
    assert_eq!(
        changes.last().copied(),
        Some(&"enabled".into()),
        "{}",
        agent.log()
    );
}

/// kas says at info when an agent arrives and when its last connection ends (a second
/// replica coming and going is neither): operators had no line when an agent dropped off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_logs_when_an_agent_connects_and_when_its_last_connection_ends() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas.admin.register_agent("group/app", "told").await.unwrap();
    let said = |msg: &str| -> Vec<serde_json::Value> {
        kas.log_lines()
            .into_iter()
            .filter(|l| {
                l["msg"].as_str().is_some_and(|m| m.starts_with(msg)) && l["agent_id"] == t.agent_id
            })
            .collect()
    };
    let pods = |a: &kas::api::AgentView| {
        let mut pods: Vec<String> = a.connections.iter().map(|c| c.pod_name.clone()).collect();
        pods.sort();
        pods
    };
    let mut one = Agent::start(dir.path(), "one", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    let connected = said("Agent connected");
    assert_eq!(connected.len(), 1, "{}", kas.log());
    assert_eq!(connected[0]["level"], "info", "{}", connected[0]);
    assert_eq!(connected[0]["pod"], "gitlab-agent/one", "{}", connected[0]);

    // A second replica, then the first one gone: the agent stays connected throughout.
    let mut two = Agent::start(dir.path(), "two", &kas.url("grpc"), &t.token, None);
    wait_for("both replicas", Duration::from_secs(30), || async {
        (pods(&kas.agent(t.agent_id).await) == ["one", "two"]).then_some(())
    })
    .await;
    one.kill9();
    wait_for(
        "the first replica gone",
        Duration::from_secs(30),
        || async { (pods(&kas.agent(t.agent_id).await) == ["two"]).then_some(()) },
    )
    .await;
    two.kill9();
    let gone = wait_for(
        "the disconnection line",
        Duration::from_secs(30),
        || async {
            let lines = said("Agent disconnected");
            (!lines.is_empty()).then_some(lines)
        },
    )
    .await;
    assert_eq!(gone.len(), 1, "{}", kas.log());
    assert_eq!(gone[0]["level"], "info", "{}", gone[0]);
    assert_eq!(gone[0]["pod"], "gitlab-agent/two", "{}", gone[0]);
    assert_eq!(said("Agent connected").len(), 1, "{}", kas.log());
    assert!(!kas.agent(t.agent_id).await.connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_through_one_agent_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            tunnel_wait: "60s",
            // A thousand admin connections at once from one address: above the internal
            // API's default caps (256, 64 per address), which would close the excess.
            api_listen_extra: "    max_connections: 2048\n    max_connections_per_address: 2048\n"
                .into(),
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas.admin.register_agent("group/app", "busy").await.unwrap();
    let _agent = Agent::start(dir.path(), "busy", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    let admin = Arc::new(kas.admin.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let admin = Arc::clone(&admin);
            let id = t.agent_id;
            tokio::spawn(async move {
                let p = payload(i, 512 + (i % 7) * 1000);
                let back = admin.echo(id, p.clone()).await?;
                anyhow::ensure!(
                    back.as_ref() == p.as_slice(),
                    "request {i} came back altered"
                );
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        t.await.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, 1000);
    eprintln!("1000 concurrent echo requests in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_slow_other_requests() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas.admin.register_agent("group/app", "fair").await.unwrap();
    let _agent = Agent::start(dir.path(), "fair", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;

    // Request A uploads up to 256 MiB to the echo service and never reads the echo.
    const TOTAL: usize = 256 * 1024 * 1024;
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&produced);
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let stream = futures_util::stream::iter(0..TOTAL / chunk.len()).map(move |_| {
        counter.fetch_add(chunk.len(), Ordering::Relaxed);
        Ok::<_, std::io::Error>(Frame::data(chunk.clone()))
    });
    let stalled = kas
        .echo_streaming(t.agent_id, StreamBody::new(stream))
        .await;
    assert_eq!(stalled.status(), 200);
    // Wait until A has pushed enough to fill every buffer on its path and stopped.
    let mut last = 0;
    let plateau = wait_for(
        "the stalled upload to stop growing",
        Duration::from_secs(60),
        || {
            let now = produced.load(Ordering::Relaxed);
            let grown = now != last;
            last = now;
            async move {
                if grown || now == 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    None
                } else {
                    Some(now)
                }
            }
        },
    )
    .await;
    assert!(
        plateau < TOTAL / 4,
        "A was not held back: {plateau} bytes produced"
    );

    // Meanwhile, other requests flow normally.
    for i in 0..50 {
        let p = payload(i, 200_000);
        let back = tokio::time::timeout(
            Duration::from_secs(10),
            kas.admin.echo(t.agent_id, p.clone()),
        )
        .await
        .expect("an unrelated request was blocked by the stalled one")
        .unwrap();
        assert_eq!(back.as_ref(), p.as_slice());
    }
    // A is still held where it was: nothing read it.
    assert!(produced.load(Ordering::Relaxed) < TOTAL / 4);
    eprintln!("stalled request held at {plateau} bytes in flight");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_returns_connections_streams_and_tasks_to_baseline() {
    let dir = tempfile::tempdir().unwrap();
    // The admin client keeps idle keep-alive connections, each a task in kas, and opens more
    // when a request starts before the previous connection went back to its pool (under load):
    // a short idle timeout on the internal API closes those, so what is counted is the agents.
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            api_listen_extra: "    idle_timeout: 1s\n".into(),
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/app", "churn")
        .await
        .unwrap();
    let baseline = kas.admin.stats().await.unwrap();
    assert_eq!(baseline.agent_connections, 0);
    let mut peak_tasks = 0;
    for round in 0..12 {
        let url = kas.url(if round % 2 == 0 { "grpc" } else { "ws" });
        let mut agent = Agent::start(dir.path(), &format!("churn-{round}"), &url, &t.token, None);
        kas.wait_connected(t.agent_id).await;
        let p = payload(round, 10_000);
        assert_eq!(
            kas.admin
                .echo(t.agent_id, p.clone())
                .await
                .unwrap()
                .as_ref(),
            p.as_slice()
        );
        peak_tasks = peak_tasks.max(kas.admin.stats().await.unwrap().tasks);
        // Half leave cleanly, half are killed outright.
        if round % 3 == 0 {
            agent.kill9();
        } else {
            agent.stop();
        }
        kas.wait_disconnected(t.agent_id).await;
    }
    let settled = wait_for(
        "kas to return to its baseline",
        Duration::from_secs(30),
        || async {
            let s = kas.admin.stats().await.ok()?;
            (s.agent_connections == 0
                && s.open_streams == 0
                && s.idle_streams == 0
                && s.connected_agents == 0
                && s.tasks <= baseline.tasks + 2)
                .then_some(s)
        },
    )
    .await;
    eprintln!("baseline {baseline:?}; peak tasks {peak_tasks}; after churn {settled:?}");
    assert!(
        peak_tasks > baseline.tasks,
        "the measure saw the agents' tasks"
    );
}

/// A request body that takes about 3 s to send (six chunks of 1,000 bytes, one every 500 ms),
/// and the bytes it carries.
type SlowBody = StreamBody<
    std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>,
    >,
>;
fn slow_upload() -> (SlowBody, Vec<u8>) {
    let chunks: Vec<Bytes> = (0..6).map(|i| Bytes::from(payload(i, 1000))).collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let tick = tokio::time::interval(Duration::from_millis(500));
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), tick),
        |(mut it, mut tick)| async move {
            tick.tick().await;
            let c = it.next()?;
            Some((Ok::<_, std::io::Error>(Frame::data(c)), (it, tick)))
        },
    );
    (StreamBody::new(Box::pin(stream)), expected)
}

/// The listeners' header and idle timeouts bound only the time *between* requests: a request
/// in flight longer than both (a slow streamed upload here, a watch in real life) completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_outlives_the_header_and_idle_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            api_listen_extra: "    header_timeout: 1s\n    idle_timeout: 1s\n".into(),
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas.admin.register_agent("group/app", "slow").await.unwrap();
    let _agent = Agent::start(dir.path(), "slow", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;

    let (body, expected) = slow_upload();
    let started = Instant::now();
    let resp = kas.echo_streaming(t.agent_id, body).await;
    assert_eq!(resp.status(), 200);
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    let took = started.elapsed();
    assert_eq!(back.as_ref(), expected.as_slice());
    assert!(
        took > Duration::from_millis(2400),
        "the request was not slow: {took:?}"
    );
    eprintln!("a {took:?} request completed under 1 s header and idle timeouts");
}

/// kas rotates each agent connection at `max_connection_age` (GOAWAY, the idle streams moved
/// to a new connection, the grace for what is in flight, then the close): a planned rotation
/// agentk follows without a gap. It is never a warning or an error (every 2 h in production,
/// it made each agentk warn "Cannot reach kas", and the configuration stream warn that it
/// ended), and the tunnel keeps working across rotations. A kas that is gone for real still
/// makes agentk warn.
///
/// The grace (2 s) is longer than agentk's keep-alive timeout (1 s) and no ping comes in
/// between (60 s interval): an idle agentk hears nothing before the close for as long as from
/// a connection the network dropped. The close's end of file is what tells them apart (the
/// rotation was logged as "went silent" at warn whenever the quiet was that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rotations_at_max_age_are_not_warnings_but_losing_kas_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(
        dir.path(),
        KasOptions {
            agent_extra: "  max_connection_age: 3s\n  max_connection_age_grace: 2s\n",
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/app", "rotated")
        .await
        .unwrap();
    let agent = Agent::start_with(
        dir.path(),
        "rotated",
        &kas.url("grpc"),
        &t.token,
        None,
        &["--keepalive-interval=60s", "--keepalive-timeout=1s"],
    );
    // Each rotation brings a new connection, from a new port.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    wait_for("two rotations", Duration::from_secs(60), || async {
        let view = kas.agent(t.agent_id).await;
        let mut seen = seen.lock().unwrap();
        seen.extend(view.connections.iter().map(|c| c.remote_addr.clone()));
        (seen.len() >= 3).then_some(())
    })
    .await;
    kas.wait_connected(t.agent_id).await;
    let back = kas.admin.echo(t.agent_id, b"after".to_vec()).await.unwrap();
    assert_eq!(back.as_ref(), b"after");
    let noisy = |agent: &Agent| -> Vec<String> {
        agent
            .log_lines()
            .iter()
            .filter(|l| {
                let level = l["level"].as_str().map(str::to_lowercase);
                matches!(level.as_deref(), Some("warn" | "error"))
            })
            .map(|l| l["msg"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(noisy(&agent), Vec::<String>::new(), "{}", agent.log());
    // The tunnel never went off: its idle streams moved to the next connection after the
    // GOAWAY, before the old one closed (it went off for a moment at every rotation).
    assert!(!tunnel_went_off(&agent), "{}", agent.log());

    kas.kill9();
    wait_for("agentk's warning", Duration::from_secs(20), || async {
        noisy(&agent)
            .iter()
            .any(|m| m == "Cannot reach kas; retrying with backoff")
            .then_some(())
    })
    .await;
}

/// Whether agentk's log says its tunnel went off at some point.
fn tunnel_went_off(agent: &Agent) -> bool {
    agent
        .log_lines()
        .iter()
        .any(|l| l["feature_name"] == "tunnel" && l["feature_status"] == "disabled")
}

/// The grace protects requests: one in flight at the connection's age finishes on it, and one
/// started during the grace goes over the next connection, so the old one closing at the end
/// of the grace cuts neither. (tonic given both age and grace sent no GOAWAY and closed the
/// connection at age + grace, cutting whatever ran on it then, the second request here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_at_a_rotation_and_during_its_grace_are_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            agent_extra: "  max_connection_age: 3s\n  max_connection_age_grace: 3s\n",
            ..KasOptions::default()
        },
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/app", "graced")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "graced", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    let connected = Instant::now();
    // Each request lasts about 3 s (`slow_upload`). The first starts 2.5 s
    // into the connection (before its age, 3 s) and the second 4.5 s in (in its grace, after
    // the idle streams moved at 4 s); the connection closes at 6 s.
    let slow_echo = |start: Duration| {
        let kas = &kas;
        async move {
            tokio::time::sleep_until((connected + start).into()).await;
            let (body, expected) = slow_upload();
            let resp = kas.echo_streaming(t.agent_id, body).await;
            let status = resp.status();
            let back = resp.into_body().collect().await.map(|b| b.to_bytes());
            (
                status,
                back.map(|b| b == expected.as_slice())
                    .map_err(|e| e.to_string()),
            )
        }
    };
    let (at_age, in_grace) = tokio::join!(
        slow_echo(Duration::from_millis(2500)),
        slow_echo(Duration::from_millis(4500))
    );
    assert_eq!(at_age, (http::StatusCode::OK, Ok(true)), "{}", agent.log());
    assert_eq!(
        in_grace,
        (http::StatusCode::OK, Ok(true)),
        "{}",
        agent.log()
    );
    assert!(!tunnel_went_off(&agent), "{}", agent.log());
}

/// The same rotation over TLS, gRPC and WebSocket (as agents run in production): no warning,
/// and the tunnel stays on across rotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rotations_over_tls_and_websocket_are_not_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let kas = Kas::start(
        dir.path(),
        KasOptions {
            tls: Some((pki.cert.clone(), pki.key.clone())),
            agent_extra: "  max_connection_age: 3s\n  max_connection_age_grace: 2s\n",
            ..KasOptions::default()
        },
    )
    .await;
    for scheme in ["grpcs", "wss"] {
        let t = kas
            .admin
            .register_agent("group/app", &format!("rotated-{scheme}"))
            .await
            .unwrap();
        let agent = Agent::start_with(
            dir.path(),
            &format!("rotated-{scheme}"),
            &kas.url(scheme),
            &t.token,
            Some(pki.ca.as_path()),
            &["--keepalive-interval=60s", "--keepalive-timeout=1s"],
        );
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        wait_for("two rotations", Duration::from_secs(60), || async {
            let view = kas.agent(t.agent_id).await;
            let mut seen = seen.lock().unwrap();
            seen.extend(view.connections.iter().map(|c| c.remote_addr.clone()));
            (seen.len() >= 3).then_some(())
        })
        .await;
        let back = kas.admin.echo(t.agent_id, b"after".to_vec()).await.unwrap();
        assert_eq!(back.as_ref(), b"after");
        let noisy: Vec<_> = agent
            .log_lines()
            .into_iter()
            .filter(|l| matches!(l["level"].as_str(), Some("warn" | "error")))
            .collect();
        assert!(noisy.is_empty(), "{scheme}: {noisy:?}");
        assert!(!tunnel_went_off(&agent), "{scheme}: {}", agent.log());
    }
}
