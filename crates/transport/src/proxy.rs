//! Egress through an HTTP proxy: agentk often runs where the only way out is a corporate proxy.
//!
//! kas is reached through an HTTP `CONNECT` tunnel; TLS (and the WebSocket handshake) then run
//! end to end inside it, so the proxy sees only the host and port. Settings come from a flag or
//! the usual environment variables (`HTTPS_PROXY` for `grpcs`/`wss`, `HTTP_PROXY` for
//! `grpc`/`ws`, `NO_PROXY`), read the way curl and Go read them.

use std::net::IpAddr;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest proxy answer to `CONNECT` we read before giving up (headers only).
const MAX_RESPONSE: usize = 8 * 1024;

/// Why a proxy setting or a `CONNECT` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("connecting to the proxy {proxy}: {source}")]
    Connect {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy {proxy} refused CONNECT to {target}: {status}")]
    Refused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("the proxy {proxy} sent an invalid answer to CONNECT: {reason}")]
    BadResponse { proxy: String, reason: &'static str },
}

/// An HTTP proxy to dial kas through: `http://[user:password@]host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    host: String,
    port: u16,
    /// `Proxy-Authorization` value (`Basic …`) when the URL carries credentials.
    authorization: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    // Never prints the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .finish()
    }
}

impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", authority(&self.host, self.port))
    }
}

impl std::str::FromStr for ProxyUrl {
    type Err = ProxyError;

    /// Accepts `http://…` and, like curl, a bare `host:port`. `https://` proxies (TLS to the
    /// proxy itself) are refused rather than silently spoken to in plain text.
    fn from_str(url: &str) -> Result<Self, ProxyError> {
        let bad = |reason| ProxyError::InvalidUrl {
            url: redact(url),
            reason,
        };
        let rest = match url.split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some(_) => return Err(bad("only http:// proxies are supported")),
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a proxy URL has no path"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("invalid host or port"))?;
        let authorization = userinfo.map(|u| {
            let creds = percent_decode(u);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        });
        Ok(Self {
            host,
            port: port.unwrap_or(80),
            authorization,
        })
    }
}

/// Which proxy to use for which kas host: a proxy per scheme family and the `NO_PROXY` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    /// For TLS connections (`grpcs`, `wss`).
    pub https: Option<ProxyUrl>,
    /// For plain connections (`grpc`, `ws`).
    pub http: Option<ProxyUrl>,
    /// Hosts reached directly.
    pub no_proxy: NoProxy,
}

impl ProxySettings {
    /// One proxy for every connection (an explicit flag), still honouring `no_proxy`.
    pub fn all(proxy: ProxyUrl, no_proxy: NoProxy) -> Self {
        Self {
            https: Some(proxy.clone()),
            http: Some(proxy),
            no_proxy,
        }
    }

    /// From `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (lower-case spellings win, as in curl).
    /// An invalid URL is an error, not "no proxy": silently going direct would fail later
    /// with a confusing connection error, or leak traffic past a mandatory proxy.
    pub fn from_env() -> Result<Self, ProxyError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any variable source (testable without touching the process).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ProxyError> {
        let var = |lower: &str, upper: &str| {
            get(lower)
                .or_else(|| get(upper))
                .filter(|v| !v.trim().is_empty())
        };
        let parse = |v: Option<String>| v.map(|v| v.trim().parse::<ProxyUrl>()).transpose();
        Ok(Self {
            https: parse(var("https_proxy", "HTTPS_PROXY"))?,
            http: parse(var("http_proxy", "HTTP_PROXY"))?,
            no_proxy: NoProxy::parse(&var("no_proxy", "NO_PROXY").unwrap_or_default()),
        })
    }

    /// The proxy for a connection to `host`, if any.
    pub fn for_host(&self, host: &str, tls: bool) -> Option<&ProxyUrl> {
        let proxy = if tls { &self.https } else { &self.http };
        proxy.as_ref().filter(|_| !self.no_proxy.matches(host))
    }
}

/// `NO_PROXY`: comma-separated host names (matching the name and its subdomains; a leading `.`
/// or `*.` is allowed), IP addresses, CIDR blocks, or `*` for every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<NoProxyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NoProxyEntry {
    All,
    Domain(String),
    Net(IpAddr, u8),
}

impl NoProxy {
    pub fn parse(list: &str) -> Self {
        let entries = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e == "*" {
                    return NoProxyEntry::All;
                }
                if let Some(net) = parse_cidr(e) {
                    return net;
                }
                // A port in an entry is ignored: kas is one address, so per-port rules add
                // nothing but surprises.
                let host = split_host_port(e).map_or_else(|| e.to_owned(), |(h, _)| h);
                let host = host.trim_start_matches("*.").trim_start_matches('.');
                NoProxyEntry::Domain(host.to_ascii_lowercase())
            })
            .collect();
        Self { entries }
    }

    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|e| match e {
            NoProxyEntry::All => true,
            NoProxyEntry::Domain(d) => host == *d || host.ends_with(&format!(".{d}")),
            NoProxyEntry::Net(net, bits) => ip.is_some_and(|ip| in_net(ip, *net, *bits)),
        })
    }
}

/// Opens a TCP connection to `host:port` through `proxy` with `CONNECT`.
pub async fn connect_via(proxy: &ProxyUrl, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| ProxyError::Connect {
            proxy: proxy.to_string(),
            source,
        })?;
    let target = authority(host, port);
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let io_err = |source| ProxyError::Connect {
        proxy: proxy.to_string(),
        source,
    };
    tcp.write_all(request.as_bytes()).await.map_err(io_err)?;
    let head = read_head(&mut tcp).await.map_err(|e| match e {
        HeadError::Io(source) => io_err(source),
        HeadError::Bad(reason) => ProxyError::BadResponse {
            proxy: proxy.to_string(),
            reason,
        },
    })?;
    match connect_status(&head) {
        Ok(()) => Ok(tcp),
        Err(status) => Err(ProxyError::Refused {
            proxy: proxy.to_string(),
            target,
            status,
        }),
    }
}

enum HeadError {
    Io(std::io::Error),
    Bad(&'static str),
}

/// Reads the proxy's answer up to the blank line, one byte at a time: nothing after the
/// headers may be consumed, since the tunnelled bytes (kas's TLS) follow at once.
async fn read_head(tcp: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(256);
    loop {
        let byte = tcp.read_u8().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                HeadError::Bad("connection closed before the end of the headers")
            } else {
                HeadError::Io(e)
            }
        })?;
        head.push(byte);
        if head.ends_with(b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_RESPONSE {
            return Err(HeadError::Bad("headers too long"));
        }
    }
}

/// `Ok` for a 2xx answer; otherwise the status line, for the error message.
fn connect_status(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default().trim().to_owned();
    let code = line.split_whitespace().nth(1).unwrap_or_default();
    if line.starts_with("HTTP/1.") && code.len() == 3 && code.starts_with('2') {
        Ok(())
    } else if code == "407" || code == "401" {
        // 407 is the standard answer; some proxies (tinyproxy) answer CONNECT with 401.
        Err(format!(
            "{line} (the proxy needs credentials: http://user:password@host:port)"
        ))
    } else {
        Err(line)
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (s, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return None;
    }
    let port = port.map(str::parse::<u16>).transpose().ok()?;
    Some((host.to_owned(), port))
}

fn parse_cidr(s: &str) -> Option<NoProxyEntry> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a.parse::<IpAddr>().ok()?, b.parse::<u8>().ok()?),
        None => {
            let ip = s.trim_matches(['[', ']']).parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some(NoProxyEntry::Net(addr, bits))
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let mask = |len: u32| {
        if bits == 0 {
            0
        } else {
            u128::MAX << (len - u32::from(bits))
        }
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = mask(32) as u32;
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = mask(128);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// `%XX` escapes in proxy credentials (a password with `@` or `:` must be escaped in a URL).
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The URL without its credentials, for error messages.
fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, after)) => match before.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…@{after}"),
            None => format!("…@{after}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn proxy_urls_parse_with_and_without_scheme_and_credentials() {
        let p: ProxyUrl = "http://proxy.corp:3128".parse().unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.authorization),
            ("proxy.corp", 3128, None)
        );
        let p: ProxyUrl = "proxy.corp".parse().unwrap();
        assert_eq!(p.port, 80);
        let p: ProxyUrl = "http://[::1]:8888/".parse().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 8888));
        assert_eq!(p.to_string(), "[::1]:8888");
        // "user:p@ss" with the @ escaped.
        let p: ProxyUrl = "http://user:p%40ss@127.0.0.1:3128".parse().unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("user:p@ss");
        assert_eq!(p.authorization, Some(format!("Basic {expected}")));
        assert!(
            !format!("{p:?}").contains(&expected),
            "Debug leaks credentials"
        );
    }

    #[test]
    fn bad_proxy_urls_are_refused_without_echoing_passwords() {
        for url in [
            "https://proxy:443",
            "socks5://proxy:1080",
            "http://proxy:3128/path",
            "http://:3128",
            "http://proxy:99999",
        ] {
            assert!(url.parse::<ProxyUrl>().is_err(), "{url} accepted");
        }
        let err = "https://user:secret@proxy:443"
            .parse::<ProxyUrl>()
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn environment_picks_the_proxy_by_scheme_and_lower_case_wins() {
        let s = ProxySettings::from_lookup(env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("HTTP_PROXY", "http://plain:3"),
        ]))
        .unwrap();
        assert_eq!(s.for_host("kas.example.com", true).unwrap().host, "lower");
        assert_eq!(s.for_host("kas.example.com", false).unwrap().host, "plain");
        let none = ProxySettings::from_lookup(env(&[("HTTPS_PROXY", " ")])).unwrap();
        assert_eq!(none, ProxySettings::default());
        assert!(ProxySettings::from_lookup(env(&[("HTTPS_PROXY", "ftp://x")])).is_err());
    }

    #[test]
    fn no_proxy_matches_domains_subdomains_addresses_and_networks() {
        let n = NoProxy::parse(" example.com, .internal ,*.svc, 10.0.0.0/8, ::1, host:8443");
        for host in [
            "example.com",
            "kas.example.com",
            "a.internal",
            "kas.svc",
            "10.1.2.3",
            "[::1]",
            "HOST",
        ] {
            assert!(n.matches(host), "{host} should go direct");
        }
        for host in [
            "notexample.com",
            "example.com.evil",
            "11.0.0.1",
            "internal.org",
            "::2",
        ] {
            assert!(!n.matches(host), "{host} should use the proxy");
        }
        assert!(NoProxy::parse("*").matches("anything"));
        assert!(!NoProxy::parse("").matches("anything"));
        let s =
            ProxySettings::from_lookup(env(&[("HTTPS_PROXY", "p:1"), ("NO_PROXY", "kas.local")]))
                .unwrap();
        assert!(s.for_host("kas.local", true).is_none());
        assert!(s.for_host("kas.remote", true).is_some());
    }

    #[test]
    fn connect_answers_are_judged_by_their_status_line() {
        assert!(connect_status(b"HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(connect_status(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\n").is_ok());
        let e = connect_status(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").unwrap_err();
        assert!(e.contains("needs credentials"), "{e}");
        assert_eq!(
            connect_status(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap_err(),
            "HTTP/1.1 403 Forbidden"
        );
        assert!(connect_status(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
