#![allow(clippy::unwrap_used)]

use tether_transport::{KasAddress, Scheme};

#[test]
fn parses_valid_addresses() {
    let cases: &[(&str, Scheme, &str, u16, &str, &str)] = &[
        // input, scheme, host, port, path, displayed
        (
            "grpc://kas:8150",
            Scheme::Grpc,
            "kas",
            8150,
            "/",
            "grpc://kas:8150",
        ),
        (
            "grpcs://kas.example.com:443",
            Scheme::Grpcs,
            "kas.example.com",
            443,
            "/",
            "grpcs://kas.example.com:443",
        ),
        (
            "grpc://kas:8150/",
            Scheme::Grpc,
            "kas",
            8150,
            "/",
            "grpc://kas:8150",
        ),
        (
            "GRPCS://10.0.0.1:8150",
            Scheme::Grpcs,
            "10.0.0.1",
            8150,
            "/",
            "grpcs://10.0.0.1:8150",
        ),
        (
            "grpc://[::1]:8150",
            Scheme::Grpc,
            "::1",
            8150,
            "/",
            "grpc://[::1]:8150",
        ),
        ("ws://kas", Scheme::Ws, "kas", 80, "/", "ws://kas:80/"),
        ("wss://kas", Scheme::Wss, "kas", 443, "/", "wss://kas:443/"),
        (
            "wss://gitlab.example.com/-/kubernetes-agent/",
            Scheme::Wss,
            "gitlab.example.com",
            443,
            "/-/kubernetes-agent/",
            "wss://gitlab.example.com:443/-/kubernetes-agent/",
        ),
        (
            "ws://kas:8080/tunnel",
            Scheme::Ws,
            "kas",
            8080,
            "/tunnel",
            "ws://kas:8080/tunnel",
        ),
        (
            "ws://kas:8080?x=1",
            Scheme::Ws,
            "kas",
            8080,
            "/?x=1",
            "ws://kas:8080/?x=1",
        ),
        (
            "wss://[2001:db8::1]/agent",
            Scheme::Wss,
            "2001:db8::1",
            443,
            "/agent",
            "wss://[2001:db8::1]:443/agent",
        ),
    ];
    for &(input, scheme, host, port, path, displayed) in cases {
        let a: KasAddress = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(a.scheme(), scheme, "{input}");
        assert_eq!(a.host(), host, "{input}");
        assert_eq!(a.port(), port, "{input}");
        assert_eq!(a.path(), path, "{input}");
        assert_eq!(a.to_string(), displayed, "{input}");
        // Display round-trips.
        assert_eq!(KasAddress::parse(&a.to_string()).unwrap(), a, "{input}");
    }
}

#[test]
fn rejects_invalid_addresses() {
    let cases: &[(&str, &str)] = &[
        // input, part of the expected message
        ("kas:8150", "expected SCHEME://HOST:PORT"),
        ("http://kas:8150", "unsupported scheme \"http\""),
        ("https://kas", "unsupported scheme"),
        ("grpc://kas", "missing port"),
        (
            "grpcs://kas.example.com",
            "missing port (expected grpcs://HOST:PORT)",
        ),
        ("grpc://:8150", "missing host"),
        ("wss://", "missing host"),
        ("grpc://kas:0", "invalid port"),
        ("grpc://kas:65536", "invalid port"),
        ("grpc://kas:http", "invalid port"),
        ("ws://kas:", "invalid port"),
        ("grpc://kas:8150/prefix", "take no path"),
        ("grpc://::1:8150", "brackets"),
        ("grpc://[::1:8150", "unterminated"),
        ("grpc://[::1]x:8150", "after ']'"),
        ("wss://user:pw@kas/", "user information"),
    ];
    for &(input, expected) in cases {
        let err = KasAddress::parse(input).expect_err(input).to_string();
        assert!(
            err.contains(expected),
            "{input}: {err:?} lacks {expected:?}"
        );
        assert!(
            err.contains(input),
            "{input}: {err:?} does not name the input"
        );
    }
}

#[test]
fn scheme_properties() {
    assert!(!Scheme::Grpc.is_tls() && !Scheme::Grpc.is_websocket());
    assert!(Scheme::Grpcs.is_tls() && !Scheme::Grpcs.is_websocket());
    assert!(!Scheme::Ws.is_tls() && Scheme::Ws.is_websocket());
    assert!(Scheme::Wss.is_tls() && Scheme::Wss.is_websocket());
}
