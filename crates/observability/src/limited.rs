//! A small HTTP/1.1 server with the limits every listener needs, for agentk's observability
//! endpoint (kas serves its endpoint on its own limited listeners). Scrapers and probes make
//! short requests, so the limits can be tight: a few connections, headers within seconds, and
//! no connection held for long, so nothing that can reach the port can pin agentk's memory or
//! sockets by connecting and sending nothing, or slowly.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The limits of the endpoint's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// A request's headers must arrive within this; it also closes idle keep-alive connections.
    pub header_timeout: Duration,
    /// After this a connection finishes its request and closes.
    pub max_lifetime: Duration,
    /// How long a connection may take to finish once asked to close.
    pub close_grace: Duration,
}

/// Enough for Prometheus, the kubelet's probes and a person with curl.
pub const LIMITS: Limits = Limits {
    max_connections: 32,
    header_timeout: Duration::from_secs(10),
    max_lifetime: Duration::from_secs(60),
    close_grace: Duration::from_secs(10),
};

/// Serves `router` on `listener` under `limits` until `shutdown`.
pub async fn serve_limited(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
            () = shutdown.cancelled() => return,
        };
        let tcp = tokio::select! {
            a = listener.accept() => match a {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        tokio::spawn(serve_connection(tcp, router.clone(), limits, permit));
    }
}

/// Out of descriptors or memory: say so, and give the process a moment instead of spinning.
async fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "Observability endpoint cannot accept a connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// One connection, closed at its header timeout, or gracefully at its lifetime and then for
/// good after the grace period. The permit is its slot under the cap.
async fn serve_connection(
    tcp: TcpStream,
    router: axum::Router,
    limits: Limits,
    _permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return log_end(r),
        () = tokio::time::sleep(limits.max_lifetime) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Ok(r) = tokio::time::timeout(limits.close_grace, conn).await {
        log_end(r);
    }
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "Observability connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_millis(300),
        max_lifetime: Duration::from_secs(30),
        close_grace: Duration::from_secs(1),
    };

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve_limited(l, router, limits, stop.clone()));
        (addr, stop)
    }

    /// Reads until the server closes the connection (fails the test after 10 s).
    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the server did not close the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn request(s: &mut TcpStream) {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_complete_headers_is_closed() {
        let (addr, stop) = start(SHORT).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHo")
            .await
            .expect("write");
        // Both end without an answer (the timeout's 408, if any, is not a 200).
        assert!(!read_to_close(&mut silent).await.contains("200 OK"));
        assert!(!read_to_close(&mut slow).await.contains("200 OK"));
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            ..SHORT
        };
        let (addr, stop) = start(limits).await;
        let mut holders = vec![
            TcpStream::connect(addr).await.expect("connect"),
            TcpStream::connect(addr).await.expect("connect"),
        ];
        let mut third = TcpStream::connect(addr).await.expect("connect");
        request(&mut third).await;
        // Both slots are held (for up to 30 s): no answer yet.
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(500), third.peek(&mut byte)).await;
        assert!(early.is_err(), "answered beyond the cap: {early:?}");
        // A holder leaving frees its slot, and the third connection is served.
        drop(holders.pop());
        let answer = read_to_close(&mut third).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_connection_is_closed_after_its_lifetime_between_requests() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            max_lifetime: Duration::from_millis(300),
            ..SHORT
        };
        let (addr, stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        // Kept alive after the answer, then closed at its lifetime, well before the header
        // timeout of 30 s would have closed it.
        let out = read_to_close(&mut s).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        stop.cancel();
    }
}
