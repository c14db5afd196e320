//! agentk behind a corporate proxy: it reaches kas through a real HTTP proxy (tinyproxy) with
//! `CONNECT`, with proxy credentials, and says clearly when the proxy refuses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Agent, Kas, KasOptions, Pki, agentk_bin, wait_for};
use tether_testenv::proxy::Tinyproxy;

/// `host:port` of a kas URL, as the proxy sees it in `CONNECT`.
fn authority(url: &str) -> &str {
    url.split_once("://").unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_reaches_kas_through_an_authenticating_proxy_over_grpc_and_wss() {
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
    let proxy = Tinyproxy::start(Some(("agentk", "pr0xy"))).unwrap();
    let proxy_url = proxy.url(Some("agentk:pr0xy"));
    for (scheme, kas) in [("grpc", &plain), ("wss", &tls)] {
        let t = kas
            .admin
            .register_agent("group/app", &format!("behind-proxy-{scheme}"))
            .await
            .unwrap();
        let ca = scheme.ends_with('s').then_some(pki.ca.as_path());
        let agent = Agent::start_with(
            dir.path(),
            &format!("agentk-{scheme}"),
            &kas.url(scheme),
            &t.token,
            ca,
            &["--proxy-url", &proxy_url],
        );
        kas.wait_connected(t.agent_id).await;
        let back = kas
            .admin
            .echo(t.agent_id, b"through".to_vec())
            .await
            .unwrap();
        assert_eq!(back.as_ref(), b"through");
        let url = kas.url(scheme);
        assert!(
            proxy.connects_to(authority(&url)) >= 1,
            "{scheme}: the connection did not go through the proxy:\n{}",
            proxy.log()
        );
        let log = agent.log();
        assert!(
            log.contains("Connecting to kas through an HTTP proxy"),
            "{log}"
        );
        assert!(
            !log.contains("pr0xy"),
            "the proxy password is logged:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refusal_is_logged_and_the_agent_stays_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    let proxy = Tinyproxy::start(Some(("agentk", "pr0xy"))).unwrap();
    let t = kas
        .admin
        .register_agent("group/app", "wrong-proxy-password")
        .await
        .unwrap();
    let agent = Agent::start_with(
        dir.path(),
        "agentk",
        &kas.url("grpc"),
        &t.token,
        None,
        &["--proxy-url", &proxy.url(Some("agentk:wrong"))],
    );
    let line = wait_for(
        "the refusal in agentk's log",
        Duration::from_secs(20),
        || async {
            agent
                .log_lines()
                .into_iter()
                .find(|l| l.to_string().contains("refused CONNECT"))
        },
    )
    .await;
    let text = line.to_string();
    assert!(text.contains("needs credentials"), "{text}");
    assert!(
        !agent.log().contains("wrong"),
        "the proxy password is logged"
    );
    assert!(!kas.agent(t.agent_id).await.connected);
}

#[test]
fn an_invalid_proxy_url_stops_agentk_with_a_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let out = Command::new(agentk_bin())
        .args(["--kas-address", "grpc://127.0.0.1:1", "--token-file"])
        .arg(&token)
        .args(["--proxy-url", "socks5://user:secret@proxy:1080"])
        .args(["--observability-listen-address", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--proxy-url"), "{stderr}");
    assert!(stderr.contains("only http:// proxies"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}
