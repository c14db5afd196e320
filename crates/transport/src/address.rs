//! Where kas listens, as given to agentk (`--kas-address`).

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// How agentk talks to kas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// gRPC over plain-text HTTP/2.
    Grpc,
    /// gRPC over HTTP/2 over TLS (ALPN `h2`).
    Grpcs,
    /// gRPC's HTTP/2 carried inside a plain-text WebSocket.
    Ws,
    /// gRPC's HTTP/2 carried inside a WebSocket over TLS.
    Wss,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Grpc => "grpc",
            Scheme::Grpcs => "grpcs",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Grpcs | Scheme::Wss)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed kas address: `grpc://HOST:PORT`, `grpcs://HOST:PORT`, `ws://HOST[:PORT][/PATH]` or
/// `wss://HOST[:PORT][/PATH]`.
///
/// gRPC addresses need an explicit port because there is no conventional one; WebSocket
/// addresses default to 80/443 like any web URL. IPv6 hosts are written in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KasAddress {
    scheme: Scheme,
    /// Without brackets for IPv6, ready for DNS resolution and as a TLS server name.
    host: String,
    port: u16,
    /// Always starts with `/`; `/` for the gRPC schemes. May include a query string.
    path: String,
}

impl KasAddress {
    pub fn parse(s: &str) -> Result<Self, Error> {
        s.parse()
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP path of the WebSocket endpoint (`/` for gRPC schemes).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host:port`, with brackets around an IPv6 host, as used in URLs and `Host` headers.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for KasAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority())?;
        if self.scheme.is_websocket() {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

impl FromStr for KasAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        parse_address(s).map_err(|reason| Error::InvalidAddress {
            address: s.to_owned(),
            reason,
        })
    }
}

/// The address, or why it is invalid.
fn parse_address(s: &str) -> Result<KasAddress, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| "expected SCHEME://HOST:PORT".to_owned())?;
    let scheme = parse_scheme(scheme)?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("user information is not supported".into());
    }
    let (host, port) = split_authority(authority)?;
    Ok(KasAddress {
        scheme,
        host: host.to_owned(),
        port: parse_port(port, scheme)?,
        path: normalize_path(path, scheme)?,
    })
}

fn parse_scheme(scheme: &str) -> Result<Scheme, String> {
    match scheme.to_ascii_lowercase().as_str() {
        "grpc" => Ok(Scheme::Grpc),
        "grpcs" => Ok(Scheme::Grpcs),
        "ws" => Ok(Scheme::Ws),
        "wss" => Ok(Scheme::Wss),
        other => Err(format!(
            "unsupported scheme {other:?} (expected grpc, grpcs, ws or wss)"
        )),
    }
}

/// `host[:port]` → host (without brackets) and the port as written, if any.
fn split_authority(authority: &str) -> Result<(&str, Option<&str>), String> {
    // An IPv6 literal is bracketed, so its colons are not mistaken for the port separator.
    let (host, port) = if let Some(after_bracket) = authority.strip_prefix('[') {
        let (host, after) = after_bracket
            .split_once(']')
            .ok_or_else(|| "unterminated '[' in host".to_owned())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "unexpected characters after ']'".to_owned())?,
            ),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if host.contains([':']) && !authority.starts_with('[') {
        return Err("IPv6 addresses must be written in brackets".into());
    }
    Ok((host, port))
}

/// The port as written, else the WebSocket default; gRPC has no conventional port.
fn parse_port(port: Option<&str>, scheme: Scheme) -> Result<u16, String> {
    match port {
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("invalid port {p:?}")),
            Ok(p) => Ok(p),
        },
        None => match scheme {
            Scheme::Ws => Ok(80),
            Scheme::Wss => Ok(443),
            Scheme::Grpc | Scheme::Grpcs => {
                Err(format!("missing port (expected {scheme}://HOST:PORT)"))
            }
        },
    }
}

/// The WebSocket endpoint's path (with any query), always starting with `/`; `/` for gRPC.
fn normalize_path(path: &str, scheme: Scheme) -> Result<String, String> {
    if scheme.is_websocket() {
        Ok(if path.is_empty() {
            "/".to_owned()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        })
    } else if !path.is_empty() && path != "/" {
        // gRPC paths are /package.Service/Method: a prefix here would be silently ignored.
        Err(format!("{scheme} addresses take no path"))
    } else {
        Ok("/".to_owned())
    }
}
