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
/// (etcd, kas, agentk and `git daemon` take a fixed address and do not report one they chose).
///
/// Racy by nature: the port is free when this returns, but another program may bind it before
/// the child does. The port is therefore chosen *below* the kernel's ephemeral range: ports in
/// that range are handed out to every outgoing connection on the machine (a busy test run makes
/// thousands), so a port found with `bind(0)` and released was often reused by a connection a
/// moment later. Below the range only programs that bind a chosen port compete, and a random pick
/// among ~20,000 ports (never the same one twice in a process) makes a clash rare; callers that
/// care still detect the child's early exit and retry (see kas's test support).
pub fn unused_port() -> u16 {
    let (lo, hi) = below_ephemeral(&std::fs::read_to_string(EPHEMERAL_RANGE).unwrap_or_default());
    for attempt in 0..200u64 {
        let port = lo + (random(attempt) % u64::from(hi - lo)) as u16;
        if claim(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Everything below the range is taken: fall back to a port the kernel picks.
    listener().1.port()
}

const EPHEMERAL_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The ports to pick from, `[lo, hi)`: from 10,000 (above well-known and most registered
/// services) up to the start of the ephemeral range read from `range` ("32768\t60999"), or up to
/// 32,768 (Linux's default) when it cannot be read or leaves too little room.
fn below_ephemeral(range: &str) -> (u16, u16) {
    const LO: u16 = 10_000;
    let start = range
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<u16>().ok());
    match start {
        Some(s) if s >= LO + 1_000 => (LO, s),
        _ => (LO, 32_768),
    }
}

/// Marks `port` as handed out by this process; false if it already was, so two children
/// started by one test never get the same port even when the first has not bound it yet.
fn claim(port: u16) -> bool {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(port)
}

/// A number that differs between calls and between processes (std's per-process random hash
/// keys, the process id, the clock and a counter), so parallel test processes pick apart.
fn random(attempt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u64(attempt);
    h.write_u32(std::process::id());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.write_u128(now.map(|d| d.as_nanos()).unwrap_or_default());
    h.finish()
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

    #[test]
    fn unused_ports_are_below_the_ephemeral_range_and_never_repeat() {
        let (lo, hi) =
            below_ephemeral(&std::fs::read_to_string(EPHEMERAL_RANGE).unwrap_or_default());
        let ports: Vec<u16> = (0..500).map(|_| unused_port()).collect();
        assert!(ports.iter().all(|p| (lo..hi).contains(p)), "{ports:?}");
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn the_range_ends_where_the_kernel_starts_handing_out_ports() {
        assert_eq!(below_ephemeral("32768\t60999\n"), (10_000, 32_768));
        assert_eq!(below_ephemeral("40000 60999"), (10_000, 40_000));
        // Unreadable, or an ephemeral range starting too low to leave room: Linux's default.
        assert_eq!(below_ephemeral(""), (10_000, 32_768));
        assert_eq!(below_ephemeral("1024 65535"), (10_000, 32_768));
    }
}

/// A TCP relay to a loopback port whose open connections can be made to go silent at once,
/// both ways and without closing anything: what a peer sees when a load balancer or a failover
/// drops a connection's state without a reset (half-open). Connections opened afterwards are
/// relayed normally, as a client reconnecting would find the service again.
#[derive(Debug)]
pub struct SilencingRelay {
    pub port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SilencingRelay {
    /// Relays connections to `127.0.0.1:to` until dropped.
    pub async fn start(to: u16) -> SilencingRelay {
        let (listener, addr) = tokio_listener().await;
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let now = std::sync::Arc::clone(&generation);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let born = now.load(std::sync::atomic::Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(relay_until_silenced(
                    cr,
                    sw,
                    std::sync::Arc::clone(&now),
                    born,
                ));
                tokio::spawn(relay_until_silenced(
                    sr,
                    cw,
                    std::sync::Arc::clone(&now),
                    born,
                ));
            }
        });
        SilencingRelay {
            port: addr.port(),
            generation,
            task,
        }
    }

    /// Every connection open now stops forwarding, for good, and stays open.
    pub fn silence_open_connections(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SilencingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_until_silenced(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if generation.load(std::sync::atomic::Ordering::SeqCst) != born {
            // Silenced: hold both halves open and forward nothing, ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP relay to a loopback port that can be severed: its open connections are closed and new
/// ones closed as soon as accepted, until it is restored — a network partition between a
/// client and a service (the client's connections end, and its reconnects fail until then).
#[derive(Debug)]
pub struct SeveringRelay {
    pub port: u16,
    severed: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl SeveringRelay {
    /// Relays connections to `127.0.0.1:to` until dropped.
    pub async fn start(to: u16) -> SeveringRelay {
        let (listener, addr) = tokio_listener().await;
        let severed = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let state = std::sync::Arc::clone(&severed);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *state.borrow() {
                    continue;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let mut cut = state.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|severed| *severed) => {}
                    }
                });
            }
        });
        SeveringRelay {
            port: addr.port(),
            severed,
            task,
        }
    }

    /// Closes every open connection, and every new one until [`SeveringRelay::restore`].
    pub fn sever(&self) {
        self.severed.send_replace(true);
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.severed.send_replace(false);
    }
}

impl Drop for SeveringRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
