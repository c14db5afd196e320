//! A lingering close (as web servers do): once hyper is done with a connection, what the client
//! still sends is read and dropped for a moment before the socket closes. Closing a socket with
//! unread data makes the kernel send a reset, which can destroy the answer already sent: a
//! client still sending a body kas answered early (a 413 for a body over the API server's
//! limit) saw `write: broken pipe` instead of the answer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// How long a closed connection's input is still read.
const LINGER_FOR: Duration = Duration::from_secs(2);

/// How much of it at most: past that the client is sending for nothing, and gets the reset.
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A connection's stream that lingers when dropped ([`linger`]), on the current runtime.
pub(super) struct Lingering<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(Option<S>);

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Lingering<S> {
    pub(super) fn new(inner: S) -> Self {
        Self(Some(inner))
    }

    fn inner(&mut self) -> io::Result<Pin<&mut S>> {
        self.0
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Drop for Lingering<S> {
    fn drop(&mut self) {
        if let (Some(s), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(linger(s));
        }
    }
}

/// Ends our side of `s` (a FIN, and TLS's close_notify) and reads what the client still sends,
/// at most [`LINGER_BYTES`] within [`LINGER_FOR`], so that it reads our last answer.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let _ = tokio::time::timeout(LINGER_FOR, async {
        let _ = s.shutdown().await;
        // Small: each connection a flood made kas close lingers with one (up to the caps).
        let mut buf = vec![0u8; 4 * 1024];
        let mut read = 0;
        while read < LINGER_BYTES {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().inner() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
