//! Egress through a real HTTP proxy (tinyproxy, a Debian package installed by scripts/setup):
//! grpcs and wss inside `CONNECT`, proxy authentication, `NO_PROXY`, and the errors users see.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Pki, TestServer, ping_pong, scheme_seen};
use tether_transport::{
    ClientOptions, Error, KasAddress, NoProxy, ProxyError, ProxySettings, ProxyUrl, connect,
};

/// A tinyproxy on 127.0.0.1, optionally requiring Basic credentials.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    fn start(basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        // tinyproxy cannot report a port it picked itself, so one is chosen here; the tiny
        // window in which another process could take it only makes this test fail loudly.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("tinyproxy.log");
        // No `ConnectPort` line: CONNECT is allowed to any port (kas's test ports are random).
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nLogLevel Info\n\
             LogFile \"{}\"\nAllow 127.0.0.1\n",
            log.display()
        );
        if let Some((user, password)) = basic_auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed by scripts/setup");
        let proxy = Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        };
        proxy.wait_listening();
        proxy
    }

    /// Polls until the proxy accepts connections (it starts in milliseconds).
    fn wait_listening(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("tinyproxy did not listen on {}", self.port);
    }

    fn url(&self, credentials: Option<&str>) -> ProxyUrl {
        let userinfo = credentials.map(|c| format!("{c}@")).unwrap_or_default();
        format!("http://{userinfo}127.0.0.1:{}", self.port)
            .parse()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let pki = Pki::generate();
    let server = TestServer::start(Some(pki.server_tls())).await;
    let proxy = Tinyproxy::start(None);
    for scheme in ["grpcs", "wss"] {
        let channel = connect(
            &addr(scheme, server.port()),
            &through(&pki, proxy.url(None)),
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
    let pki = Pki::generate();
    let server = TestServer::start(Some(pki.server_tls())).await;
    let proxy = Tinyproxy::start(Some(("agentk", "s3cret")));

    let good = through(&pki, proxy.url(Some("agentk:s3cret")));
    let channel = connect(&addr("wss", server.port()), &good).await.unwrap();
    ping_pong(channel, 3).await;

    for creds in [None, Some("agentk:wrong")] {
        let err = connect(
            &addr("grpcs", server.port()),
            &through(&pki, proxy.url(creds)),
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
    let pki = Pki::generate();
    let server = TestServer::start(Some(pki.server_tls())).await;
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
    let pki = Pki::generate();
    let server = TestServer::start(Some(pki.server_tls())).await;
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
