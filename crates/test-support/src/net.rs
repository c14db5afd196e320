//! Loopback listeners for tests.
//!
//! In-process servers take the listener itself: the port is bound from the start, so no
//! parallel test can take it. Only child processes that cannot report the port they bound get a
//! number from [`unused_port`].

use std::net::SocketAddr;

/// A listener on an ephemeral loopback port and its address.
pub fn listener() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local address");
    (l, addr)
}

/// A Tokio listener on an ephemeral loopback port and its address.
pub async fn tokio_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local address");
    (l, addr)
}

/// A loopback port nobody listens on right now, for a child process that must be told its port
/// (kas, agentk and `git daemon` take a fixed address and do not report one they chose).
///
/// Racy by nature: the port is free when this returns, but another test may bind it before the
/// child does. Callers that care detect the child's early exit and retry with a new port (see
/// kas's test support); the others accept a rare failed start.
pub fn unused_port() -> u16 {
    listener().1.port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_is_bound_to_the_address_it_reports() {
        let (l, addr) = listener();
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        l.accept().expect("accept");
    }

    #[test]
    fn unused_port_is_not_listening() {
        let port = unused_port();
        assert_ne!(port, 0);
        // Released again, so the child process can bind it.
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("rebind");
    }
}
