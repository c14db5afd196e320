//! Egress through a real HTTP proxy (tinyproxy, a Debian package installed by scripts/setup):
//! grpcs and wss inside `CONNECT`, proxy authentication, `NO_PROXY`, and the errors users see.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Pki, TestServer, ping_pong, scheme_seen, server_tls};
use tether_testenv::proxy::Tinyproxy;
use tether_transport::{
    ClientOptions, Error, KasAddress, NoProxy, ProxyError, ProxySettings, ProxyUrl, connect,
};

fn through(pki: &Pki, proxy: ProxyUrl) -> ClientOptions {
    ClientOptions {
        ca_cert_file: Some(pki.ca.clone()),
        proxy: ProxySettings::all(proxy, NoProxy::default()),
        ..ClientOptions::default()
    }
}

fn addr(scheme: &str, port: u16) -> KasAddress {
    KasAddress::parse(&format!("{scheme}://127.0.0.1:{port}")).unwrap()
}

#[tokio::test]
async fn grpcs_and_wss_reach_kas_through_the_proxy() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let proxy = Tinyproxy::start(None).unwrap();
    for scheme in ["grpcs", "wss"] {
        let channel = connect(
            &addr(scheme, server.port()),
            &through(&pki, proxy.url(None).parse().unwrap()),
        )
        .await
        .unwrap();
        let metadata = ping_pong(channel, 5).await;
        assert_eq!(scheme_seen(&metadata), scheme);
    }
    let log = proxy.log();
    let tunnels = log
        .matches(&format!("CONNECT 127.0.0.1:{}", server.port()))
        .count();
    assert_eq!(
        tunnels, 2,
        "both connections went through the proxy:\n{log}"
    );
    server.stop().await;
}

#[tokio::test]
async fn proxy_credentials_are_sent_and_wrong_ones_are_a_clear_error() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let proxy = Tinyproxy::start(Some(("agentk", "s3cret"))).unwrap();

    let good = through(&pki, proxy.url(Some("agentk:s3cret")).parse().unwrap());
    let channel = connect(&addr("wss", server.port()), &good).await.unwrap();
    ping_pong(channel, 3).await;

    for creds in [None, Some("agentk:wrong")] {
        let err = connect(
            &addr("grpcs", server.port()),
            &through(&pki, proxy.url(creds).parse().unwrap()),
        )
        .await
        .unwrap_err();
        let found = Error::find_in(&err).expect("a transport error");
        match found {
            Error::Proxy(ProxyError::Refused { status, .. }) => {
                // 407 by the standard; tinyproxy says 401.
                assert!(
                    status.contains(" 407 ") || status.contains(" 401 "),
                    "{status}"
                );
                assert!(status.contains("needs credentials"), "{status}");
            }
            other => panic!("expected a proxy refusal, got {other:?}"),
        }
        assert!(
            !found.to_string().contains("wrong"),
            "credentials echoed: {found}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn no_proxy_hosts_are_dialed_directly() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    // A proxy address where nothing listens: using it would fail.
    let dead: ProxyUrl = "http://127.0.0.1:1".parse().unwrap();
    let opts = ClientOptions {
        ca_cert_file: Some(pki.ca.clone()),
        proxy: ProxySettings::all(dead, NoProxy::parse("localhost,127.0.0.0/8")),
        ..ClientOptions::default()
    };
    let channel = connect(&addr("grpcs", server.port()), &opts).await.unwrap();
    ping_pong(channel, 3).await;
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_proxy_is_named_in_the_error() {
    let pki = Pki::temporary();
    let server = TestServer::start(Some(server_tls(&pki))).await;
    let dead: ProxyUrl = "http://127.0.0.1:1".parse().unwrap();
    let err = connect(&addr("wss", server.port()), &through(&pki, dead))
        .await
        .unwrap_err();
    let found = Error::find_in(&err).expect("a transport error");
    assert!(
        matches!(found, Error::Proxy(ProxyError::Connect { .. })),
        "{found:?}"
    );
    assert!(
        found
            .to_string()
            .contains("connecting to the proxy 127.0.0.1:1"),
        "{found}"
    );
    server.stop().await;
}
