//! Counting agent connections: the count the internal API reports and the gauge the metrics
//! show. Its own module so the API and the server wiring both use it without importing each
//! other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use prometheus_client::metrics::gauge::Gauge;
use tether_transport::{AgentConnectInfo, AgentIo};
use tokio::io::{AsyncRead, ReadBuf};
use tonic::transport::server::Connected;

/// Live transport connections from agents, for metrics and leak checks.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// An agent connection that keeps [`ConnectionCount`] right however it ends.
#[derive(Debug)]
pub struct Counted<Io = AgentIo> {
    io: Io,
    count: Arc<ConnectionCount>,
    gauge: Gauge,
}

impl<Io> Counted<Io> {
    pub fn new(io: Io, count: Arc<ConnectionCount>, gauge: Gauge) -> Self {
        count.0.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        Self { io, count, gauge }
    }
}

impl<Io> Drop for Counted<Io> {
    fn drop(&mut self) {
        self.count.0.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

impl Connected for Counted<AgentIo> {
    type ConnectInfo = AgentConnectInfo;
    fn connect_info(&self) -> AgentConnectInfo {
        self.io.connect_info()
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Counted<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

tether_transport::forward_async_write!(Counted, io);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWrite, AsyncWriteExt};

    /// A writer that supports vectored writes and records how it was written to.
    #[derive(Default)]
    struct Recorder {
        vectored_calls: usize,
        written: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.vectored_calls += 1;
            let mut n = 0;
            for b in bufs {
                self.written.extend_from_slice(b);
                n += b.len();
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_reach_the_connection_as_one_call() {
        let count = Arc::new(ConnectionCount::default());
        let mut c = Counted::new(Recorder::default(), Arc::clone(&count), Gauge::default());
        assert!(c.is_write_vectored());
        let bufs = [io::IoSlice::new(b"head"), io::IoSlice::new(b"body")];
        let n = c.write_vectored(&bufs).await.expect("write");
        assert_eq!(n, 8);
        assert_eq!(c.io.vectored_calls, 1);
        assert_eq!(c.io.written, b"headbody");
    }

    #[test]
    fn the_count_follows_the_connection() {
        let count = Arc::new(ConnectionCount::default());
        let gauge = Gauge::default();
        let c = Counted::new(Recorder::default(), Arc::clone(&count), gauge.clone());
        assert_eq!((count.get(), gauge.get()), (1, 1));
        drop(c);
        assert_eq!((count.get(), gauge.get()), (0, 0));
    }
}
