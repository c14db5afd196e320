//! Upgraded connections (kubectl exec, attach, port-forward) through kas: a stand-in API server
//! that upgrades and echoes, and a client that upgrades through kas's proxy and checks the
//! bytes come back. kwok's fake pods run nothing, so a real exec cannot be made here.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Empty;

/// A stand-in API server that answers upgrade requests with 101 and then echoes raw bytes, and
/// reports in a response header the impersonated user it was sent.
pub async fn upgrading_server() -> u16 {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|mut req: http::Request<hyper::body::Incoming>| async move {
                    let user = req
                        .headers()
                        .get("impersonate-user")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let protocol = req
                        .headers()
                        .get("upgrade")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let upgraded = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(u) = upgraded.await {
                            let mut io = TokioIo::new(u);
                            let (mut r, mut w) = tokio::io::split(&mut io);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(101)
                            .header("connection", "Upgrade")
                            .header("upgrade", protocol)
                            .header("x-seen-impersonate-user", user)
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

/// A kubeconfig for agentk pointing at [`upgrading_server`] on `port`.
pub fn fake_kubeconfig(dir: &Path, port: u16) -> PathBuf {
    let fake = dir.join("fake.kubeconfig");
    std::fs::write(
        &fake,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: f\n  cluster:\n    server: http://127.0.0.1:{port}\n\
users:\n- name: u\n  user:\n    token: fake\ncontexts:\n- name: f\n  context:\n    cluster: f\n    user: u\ncurrent-context: f\n"
        ),
    )
    .unwrap();
    fake
}

/// An HTTP/1.1 connection to kas's Kubernetes API proxy on `port` over TLS, trusting `ca`.
pub async fn tls_http1(
    port: u16,
    ca: &Path,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let ca = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// A CI job's kubeconfig from kas's proxy on `port` (TLS, trusting `ca`) with its ID token
/// `jwt`: the status and the body.
pub async fn ci_kubeconfig(port: u16, ca: &Path, jwt: &str) -> (u16, String) {
    tls_get(port, ca, "/.tether/kubeconfig", &format!("Bearer {jwt}")).await
}

/// A GET of `path` from kas's proxy on `port` (TLS, trusting `ca`) with the `authorization`
/// header given: the status and the body.
pub async fn tls_get(port: u16, ca: &Path, path: &str, authorization: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut sender = tls_http1(port, ca).await;
    let req = http::Request::get(path)
        .header("host", format!("localhost:{port}"))
        .header("authorization", authorization)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Upgrades `path` with `protocol` (`websocket` or `SPDY/3.1`, as kubectl does), asserts 101,
/// then sends 300 KB and asserts they come back unchanged. Returns the impersonated user the
/// stand-in server was sent.
pub async fn upgrade_and_echo(
    mut sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    authorization: &str,
    protocol: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = http::Request::post(path)
        .header("host", "localhost")
        .header("authorization", authorization)
        .header("connection", "Upgrade")
        .header("upgrade", protocol)
        .header("x-stream-protocol-version", "v4.channel.k8s.io");
    if protocol == "websocket" {
        req = req
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "v5.channel.k8s.io");
    }
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 101, "{protocol}");
    assert_eq!(resp.headers()["upgrade"], protocol);
    let seen = resp.headers()["x-seen-impersonate-user"]
        .to_str()
        .unwrap()
        .to_owned();
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut io);
    let p2 = payload.clone();
    let writer = async move {
        w.write_all(&p2).await.unwrap();
        w.flush().await.unwrap();
    };
    let reader = async move {
        let mut got = vec![0u8; payload.len()];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(got, payload, "bytes came back unchanged");
    };
    tokio::join!(writer, reader);
    seen
}

/// A stand-in API server (point agentk at it with [`fake_kubeconfig`]) whose answer to a GET
/// of a path ending in `/held` the test holds: it reports the request's arrival and answers
/// only once released. Every other request is answered at once with an empty list.
pub struct HeldUpstream {
    pub port: u16,
    arrived: tokio::sync::mpsc::Receiver<()>,
    release: tokio::sync::watch::Sender<bool>,
}

/// What [`HeldUpstream`] answers a held request with, once released.
pub const HELD_BODY: &str = "{\"kind\":\"ConfigMapList\",\"items\":[],\"held\":true}";

impl HeldUpstream {
    pub async fn start() -> HeldUpstream {
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (arrive, arrived) = tokio::sync::mpsc::channel(8);
        let (release, released) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (arrive, released) = (arrive.clone(), released.clone());
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (arrive, mut released) = (arrive.clone(), released.clone());
                    async move {
                        let held = req.uri().path().ends_with("/held");
                        if held {
                            let _ = arrive.send(()).await;
                            let _ = released.wait_for(|r| *r).await;
                        }
                        let body = if held {
                            HELD_BODY
                        } else {
                            "{\"kind\":\"ConfigMapList\",\"items\":[]}"
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        HeldUpstream {
            port,
            arrived,
            release,
        }
    }

    /// Resolves when a held request reached the server.
    pub async fn arrived(&mut self) {
        self.arrived.recv().await.unwrap();
    }

    /// Answers the held requests, and any later one at once.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
}
