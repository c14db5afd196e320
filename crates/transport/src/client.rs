//! agentk's side: dialing kas.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use http::header::SEC_WEBSOCKET_PROTOCOL;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::transport::{Channel, Endpoint};

use crate::proxy::{ProxySettings, ProxyUrl, connect_via};
use crate::tls::{ALPN_H2, ALPN_HTTP11, ClientTls};
use crate::watched::{ReadActivity, Watched};
use crate::ws::{WS_SUBPROTOCOL, WsIo, ws_config};
use crate::{BoxIo, Error, KasAddress, Result, Scheme};

/// How agentk connects to kas.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// PEM file of the CA(s) that signed kas's certificate. When set, only it is trusted;
    /// otherwise the system's root certificates are.
    pub ca_cert_file: Option<PathBuf>,
    /// Name to verify kas's certificate against (and send as SNI) instead of the address's host,
    /// e.g. when dialing an IP address or through a tunnel.
    pub tls_server_name: Option<String>,
    /// HTTP/2 PING interval after the last frame received, also while idle: keeps NAT and
    /// proxy state alive and finds connections dropped without a reset, within this plus
    /// `keepalive_timeout`. Well below typical 60 s idle timeouts of load balancers.
    pub keepalive_interval: Duration,
    /// How long to wait for a PING acknowledgement before dropping the connection.
    pub keepalive_timeout: Duration,
    /// Limit for TCP connect plus TLS and WebSocket handshakes; also for kas's first bytes
    /// (its HTTP/2 settings) on a new connection.
    pub connect_timeout: Duration,
    /// HTTP proxies to reach kas through (`CONNECT`); empty means direct.
    pub proxy: ProxySettings,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            ca_cert_file: None,
            tls_server_name: None,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            proxy: ProxySettings::default(),
        }
    }
}

/// Connects to kas now and returns a channel for any gRPC client (`XxxClient::new(channel)`).
///
/// Fails if the first connection cannot be made; use [`Error::find_in`] on the error to see why
/// (e.g. [`Error::TlsHandshake`]). The channel reconnects by itself after later failures.
pub async fn connect(addr: &KasAddress, opts: &ClientOptions) -> Result<Channel> {
    let (endpoint, dialer) = prepare(addr, opts)?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_uri: http::Uri| {
            let dialer = Arc::clone(&dialer);
            async move { dialer.dial().await }
        }))
        .await?;
    Ok(channel)
}

/// Like [`connect`] but dials on first use; configuration errors (CA file, address) still
/// surface here.
pub fn connect_lazy(addr: &KasAddress, opts: &ClientOptions) -> Result<Channel> {
    Ok(connect_lazy_watched(addr, opts)?.0)
}

/// [`connect_lazy`], with when its connection last received bytes: a connection that ended
/// after a long silence was dropped by the network, not closed by kas.
pub fn connect_lazy_watched(
    addr: &KasAddress,
    opts: &ClientOptions,
) -> Result<(Channel, ReadActivity)> {
    let (endpoint, dialer) = prepare(addr, opts)?;
    let activity = dialer.activity.clone();
    let channel =
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri: http::Uri| {
            let dialer = Arc::clone(&dialer);
            async move { dialer.dial().await }
        }));
    Ok((channel, activity))
}

fn prepare(addr: &KasAddress, opts: &ClientOptions) -> Result<(Endpoint, Arc<Dialer>)> {
    let tls = if addr.scheme().is_tls() {
        // The WebSocket handshake is HTTP/1.1, so wss must not offer h2: a server picking h2
        // would then expect the HTTP/2 preface instead of an upgrade request.
        let alpn = if addr.scheme().is_websocket() {
            ALPN_HTTP11
        } else {
            ALPN_H2
        };
        let config = ClientTls::load(opts.ca_cert_file.as_deref(), alpn)?;
        let name = opts
            .tls_server_name
            .clone()
            .unwrap_or_else(|| addr.host().to_owned());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| Error::InvalidServerName(name.clone()))?;
        Some((config, server_name))
    } else {
        None
    };

    // The URI only satisfies tonic: our connector ignores it and dials `addr`. Plain `http`
    // keeps tonic from attempting TLS itself (TLS, if any, is done by the connector).
    let endpoint = Endpoint::from_static("http://kas.invalid")
        .initial_stream_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_while_idle(true)
        .keep_alive_timeout(opts.keepalive_timeout)
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true);

    Ok((
        endpoint,
        Arc::new(Dialer {
            addr: addr.clone(),
            proxy: opts
                .proxy
                .for_host(addr.host(), addr.scheme().is_tls())
                .cloned(),
            tls,
            connect_timeout: opts.connect_timeout,
            activity: ReadActivity::default(),
        }),
    ))
}

struct Dialer {
    addr: KasAddress,
    proxy: Option<ProxyUrl>,
    tls: Option<(ClientTls, ServerName<'static>)>,
    connect_timeout: Duration,
    activity: ReadActivity,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("addr", &self.addr)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl Dialer {
    async fn dial(&self) -> Result<TokioIo<BoxIo>> {
        // tonic also applies connect_timeout; this covers the whole dial even if used
        // elsewhere and reports which limit struck.
        let io = tokio::time::timeout(self.connect_timeout, self.dial_inner())
            .await
            .map_err(|_| Error::Timeout(self.connect_timeout))??;
        let watched: BoxIo = Box::new(Watched::new(
            io,
            self.activity.clone(),
            self.connect_timeout,
        ));
        Ok(TokioIo::new(watched))
    }

    async fn dial_inner(&self) -> Result<BoxIo> {
        let tcp = match &self.proxy {
            // TLS and the WebSocket handshake run inside the tunnel, end to end with kas.
            Some(proxy) => connect_via(proxy, self.addr.host(), self.addr.port()).await?,
            None => TcpStream::connect((self.addr.host(), self.addr.port()))
                .await
                .map_err(|source| Error::Connect {
                    address: self.addr.authority(),
                    source,
                })?,
        };
        // gRPC frames are small and latency-sensitive; Nagle would delay them.
        tcp.set_nodelay(true).map_err(Error::HandshakeIo)?;

        match &self.tls {
            None => self.finish(crate::sniff::SniffTls::new(tcp)).await,
            Some((config, name)) => {
                let tls = TlsConnector::from(config.current())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(Error::TlsHandshake)?;
                self.finish(tls).await
            }
        }
    }

    async fn finish<S>(&self, stream: S) -> Result<BoxIo>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        if !self.addr.scheme().is_websocket() {
            return Ok(Box::new(stream));
        }
        let scheme = match self.addr.scheme() {
            Scheme::Wss => "wss",
            _ => "ws",
        };
        let url = format!("{scheme}://{}{}", self.addr.authority(), self.addr.path());
        let mut request = url
            .into_client_request()
            .map_err(|e| Error::WebSocketHandshake(Box::new(e)))?;
        request.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(WS_SUBPROTOCOL),
        );
        let (ws, response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
                .await
                .map_err(|e| Error::WebSocketHandshake(Box::new(e)))?;
        // tungstenite already rejects a subprotocol we did not offer; this also rejects a
        // server that ignored the header and would then not speak HTTP/2 inside.
        let selected = response
            .headers()
            .get(SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok());
        if selected != Some(WS_SUBPROTOCOL) {
            return Err(Error::SubprotocolNotSelected);
        }
        Ok(Box::new(WsIo::new(ws)))
    }
}
