//! Which of the client's request headers may reach the kube-apiserver.
//!
//! - `Impersonate-*` from the client is refused: agentk talks to the API server as its own
//!   ServiceAccount, so honouring them would let any caller become anyone the agent may
//!   impersonate. Upstream refuses them too ("nested impersonation is not supported"), and
//!   the answer is 403 as the API server's own for an impersonation its caller may not do.
//! - Hop-by-hop headers (RFC 9110 §7.6.1) describe the client's connection to kas, not agentk's
//!   to the API server: `Connection` and every header it names, `Keep-Alive`, `Proxy-*`, `TE`,
//!   `Trailer`, `Transfer-Encoding`, `Upgrade`. An upgrade request (exec, attach, port-forward
//!   over WebSocket or SPDY) is the exception: its `Connection: Upgrade` and `Upgrade` must
//!   travel on, or the API server answers it as a plain request.
//! - Credentials meant for kas never reach the API server: `Authorization`, and bearer tokens
//!   smuggled in `Sec-WebSocket-Protocol` (`base64url.bearer.authorization.k8s.io.<token>`,
//!   which browsers use because they cannot set `Authorization` on a WebSocket). The API server
//!   would try to authenticate with them, and logging or a compromised webhook could leak them.
//! - `Host` names kas; the HTTP client sets the API server's own (hyper would otherwise send
//!   the client's value verbatim, unlike Go's reverse proxy upstream uses).

use http::header::{AUTHORIZATION, CONNECTION, HOST, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{HeaderMap, HeaderValue};

/// Hop-by-hop headers removed from every request (beyond those `Connection` names, and the
/// `proxy-` prefix).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Subprotocol prefix Kubernetes reads a bearer token from.
const WEBSOCKET_BEARER_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// A request that must not be forwarded ([`Refused::status`] says with what).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The client sent an `Impersonate-*` header.
    #[error("nested impersonation is not supported (the request has a {header} header)")]
    NestedImpersonation {
        /// The offending header's name.
        header: String,
    },
    /// A header whose value must be read is not visible ASCII.
    #[error("the {header} header is not visible ASCII")]
    InvalidHeader {
        /// The header's name.
        header: String,
    },
}

impl Refused {
    /// The status kas and agentk answer with. Picking an identity is a well-formed request the
    /// caller is not allowed to make, which Kubernetes answers with 403 (the API server refuses
    /// an impersonation its caller may not do with 403 Forbidden, not 400); a header that is
    /// not ASCII is malformed: 400.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refused::NestedImpersonation { .. } => http::StatusCode::FORBIDDEN,
            Refused::InvalidHeader { .. } => http::StatusCode::BAD_REQUEST,
        }
    }

    /// The Kubernetes `Status` reason matching [`Refused::status`].
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::NestedImpersonation { .. } => "Forbidden",
            Refused::InvalidHeader { .. } => "BadRequest",
        }
    }
}

/// The headers to send to the API server for a client request with `headers`.
pub fn sanitize_request_headers(headers: &HeaderMap) -> Result<HeaderMap, Refused> {
    if let Some(name) = headers
        .keys()
        .find(|name| name.as_str().starts_with("impersonate-"))
    {
        return Err(Refused::NestedImpersonation {
            header: name.as_str().to_owned(),
        });
    }

    // Tokens of all `Connection` headers, lowercased (header field names are case-insensitive).
    let mut connection_tokens: Vec<String> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let value = ascii(CONNECTION.as_str(), value)?;
        connection_tokens.extend(
            value
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty()),
        );
    }
    let is_upgrade =
        connection_tokens.iter().any(|t| t == "upgrade") && headers.contains_key(UPGRADE);

    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        let hop_by_hop = HOP_BY_HOP.contains(&n)
            || n.starts_with("proxy-")
            || connection_tokens.iter().any(|t| t == n);
        if hop_by_hop || *name == AUTHORIZATION || *name == HOST || *name == SEC_WEBSOCKET_PROTOCOL
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }

    if is_upgrade {
        out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        for value in headers.get_all(UPGRADE) {
            out.append(UPGRADE, value.clone());
        }
    }

    if let Some(protocols) = websocket_protocols(headers)? {
        out.insert(SEC_WEBSOCKET_PROTOCOL, protocols);
    }
    Ok(out)
}

/// `Sec-WebSocket-Protocol` without bearer-token entries; `None` when nothing is left.
fn websocket_protocols(headers: &HeaderMap) -> Result<Option<HeaderValue>, Refused> {
    let mut kept: Vec<&str> = Vec::new();
    let mut any = false;
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        any = true;
        let value = ascii(SEC_WEBSOCKET_PROTOCOL.as_str(), value)?;
        kept.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty() && !p.starts_with(WEBSOCKET_BEARER_PREFIX)),
        );
    }
    if !any || kept.is_empty() {
        return Ok(None);
    }
    // Built from parts of a valid header value joined by ", ", so it is valid too; refuse
    // rather than panic should that ever not hold.
    HeaderValue::from_str(&kept.join(", "))
        .map(Some)
        .map_err(|_| Refused::InvalidHeader {
            header: SEC_WEBSOCKET_PROTOCOL.as_str().to_owned(),
        })
}

fn ascii<'a>(name: &str, value: &'a HeaderValue) -> Result<&'a str, Refused> {
    value.to_str().map_err(|_| Refused::InvalidHeader {
        header: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(list: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in list {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value).expect("valid value"),
            );
        }
        headers
    }

    /// Sorted (name, value) pairs, for order-insensitive comparison.
    fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().expect("ascii").to_owned()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            input: &'static [(&'static str, &'static str)],
            want: &'static [(&'static str, &'static str)],
        }
        let cases = [
            Case {
                name: "plain request keeps end-to-end headers",
                input: &[
                    ("accept", "application/json"),
                    ("user-agent", "kubectl/v1.34.0"),
                    ("content-type", "application/json"),
                    ("x-custom", "a"),
                    ("x-custom", "b"),
                ],
                want: &[
                    ("accept", "application/json"),
                    ("content-type", "application/json"),
                    ("user-agent", "kubectl/v1.34.0"),
                    ("x-custom", "a"),
                    ("x-custom", "b"),
                ],
            },
            Case {
                name: "authorization is kas's, never the API server's; so is Host",
                input: &[
                    ("authorization", "Bearer ci:1:secret"),
                    ("host", "kas.example.com"),
                    ("accept", "*/*"),
                ],
                want: &[("accept", "*/*")],
            },
            Case {
                name: "standard hop-by-hop headers go",
                input: &[
                    ("connection", "keep-alive"),
                    ("keep-alive", "timeout=5"),
                    ("te", "trailers"),
                    ("trailer", "x-checksum"),
                    ("transfer-encoding", "chunked"),
                    ("proxy-authorization", "Basic abc"),
                    ("proxy-connection", "keep-alive"),
                    ("accept", "*/*"),
                ],
                want: &[("accept", "*/*")],
            },
            Case {
                name: "headers named by Connection go",
                input: &[
                    ("connection", "X-Hop, close"),
                    ("connection", " x-other "),
                    ("x-hop", "1"),
                    ("x-other", "2"),
                    ("x-end", "3"),
                ],
                want: &[("x-end", "3")],
            },
            Case {
                name: "Upgrade without Connection: Upgrade is not an upgrade",
                input: &[("upgrade", "websocket"), ("accept", "*/*")],
                want: &[("accept", "*/*")],
            },
            Case {
                name: "Connection: Upgrade without Upgrade is not an upgrade",
                input: &[("connection", "Upgrade"), ("accept", "*/*")],
                want: &[("accept", "*/*")],
            },
            Case {
                name: "WebSocket exec keeps the upgrade, drops the bearer subprotocol",
                input: &[
                    ("connection", "keep-alive, Upgrade"),
                    ("keep-alive", "timeout=5"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("sec-websocket-version", "13"),
                    (
                        "sec-websocket-protocol",
                        "v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.c2VjcmV0",
                    ),
                    ("sec-websocket-protocol", "v4.channel.k8s.io"),
                ],
                want: &[
                    ("connection", "Upgrade"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    (
                        "sec-websocket-protocol",
                        "v5.channel.k8s.io, v4.channel.k8s.io",
                    ),
                    ("sec-websocket-version", "13"),
                    ("upgrade", "websocket"),
                ],
            },
            Case {
                name: "SPDY port-forward keeps the upgrade",
                input: &[
                    ("connection", "upgrade"),
                    ("upgrade", "SPDY/3.1"),
                    ("x-stream-protocol-version", "portforward.k8s.io"),
                    ("authorization", "Bearer pat:1:secret"),
                ],
                want: &[
                    ("connection", "Upgrade"),
                    ("upgrade", "SPDY/3.1"),
                    ("x-stream-protocol-version", "portforward.k8s.io"),
                ],
            },
            Case {
                name: "only a bearer subprotocol: the header goes",
                input: &[
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                    (
                        "sec-websocket-protocol",
                        "base64url.bearer.authorization.k8s.io.c2VjcmV0",
                    ),
                ],
                want: &[("connection", "Upgrade"), ("upgrade", "websocket")],
            },
        ];
        for case in cases {
            let got = sanitize_request_headers(&map(case.input))
                .unwrap_or_else(|err| panic!("{}: refused: {err}", case.name));
            let mut want: Vec<(String, String)> = case
                .want
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            want.sort();
            assert_eq!(pairs(&got), want, "{}", case.name);
        }
    }

    #[test]
    fn refusals() {
        let cases: [(&[(&str, &str)], Refused); 4] = [
            (
                &[("impersonate-user", "admin")],
                Refused::NestedImpersonation {
                    header: "impersonate-user".into(),
                },
            ),
            (
                &[("Impersonate-Group", "system:masters")],
                Refused::NestedImpersonation {
                    header: "impersonate-group".into(),
                },
            ),
            (
                &[("impersonate-extra-scopes", "x"), ("accept", "*/*")],
                Refused::NestedImpersonation {
                    header: "impersonate-extra-scopes".into(),
                },
            ),
            (
                &[("impersonate-uid", "1")],
                Refused::NestedImpersonation {
                    header: "impersonate-uid".into(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize_request_headers(&map(input)), Err(want.clone()));
            // Kubernetes answers a forbidden impersonation with 403; so do kas and agentk.
            assert_eq!(want.status(), http::StatusCode::FORBIDDEN);
            assert_eq!(want.reason(), "Forbidden");
        }
        assert!(
            Refused::NestedImpersonation {
                header: "impersonate-user".into()
            }
            .to_string()
            .contains("nested impersonation is not supported")
        );

        let mut headers = HeaderMap::new();
        headers.insert(
            CONNECTION,
            HeaderValue::from_bytes(b"x-\xff").expect("obs-text is a valid value"),
        );
        assert_eq!(
            sanitize_request_headers(&headers),
            Err(Refused::InvalidHeader {
                header: "connection".into()
            })
        );
        let malformed = Refused::InvalidHeader {
            header: "connection".into(),
        };
        assert_eq!(malformed.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(malformed.reason(), "BadRequest");
    }
}

/// A Kubernetes `Status` failure object as JSON text, so kubectl prints the reason well. Used by
/// both kas's proxy and agentk for the errors they answer themselves.
pub fn status_json(code: http::StatusCode, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
    .to_string()
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn status_json_is_a_kubernetes_failure_status() {
        let v: serde_json::Value =
            serde_json::from_str(&status_json(http::StatusCode::FORBIDDEN, "Forbidden", "no"))
                .expect("JSON");
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["code"], 403);
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(v["message"], "no");
    }
}
