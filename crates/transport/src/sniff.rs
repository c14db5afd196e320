//! A plaintext dial (`grpc://`, `ws://`) that meets a TLS listener fails in the next layer
//! with words that do not say so (`h2 protocol error: http2 error`, `httparse error: invalid
//! HTTP version`). The server's first bytes tell: a TLS record (an alert or a handshake) opens
//! with its content type and version 3. Those are turned into an error that says what to dial.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// What a plaintext client is told when the server speaks TLS.
pub(crate) const TLS_ANSWER: &str =
    "kas answered in TLS: this listener uses TLS, dial it with grpcs:// or wss://";

/// Whether the first bytes a server sent open a TLS record (pure): content type alert (21) or
/// handshake (22), then major version 3. An HTTP/2 frame opens with its length (a zero byte
/// for any SETTINGS frame), an HTTP/1.1 answer with `H`.
pub(crate) fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [21 | 22, 3, ..])
}

/// A stream whose first bytes from the server are checked by [`looks_like_tls`].
pub(crate) struct SniffTls<S> {
    inner: S,
    checked: bool,
}

impl<S> SniffTls<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            checked: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SniffTls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (polled, new) = crate::poll_read_counting(&mut self.inner, cx, buf);
        if self.checked || !matches!(polled, Poll::Ready(Ok(()))) {
            return polled;
        }
        // The first read decides (a TLS record's first two bytes arrive together).
        self.checked = true;
        let filled = buf.filled();
        if looks_like_tls(&filled[filled.len() - new..]) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, TLS_ANSWER)));
        }
        polled
    }
}

crate::forward_async_write!(SniffTls, inner);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn tls_records_are_told_from_http() {
        assert!(looks_like_tls(&[21, 3, 3, 0, 2, 2, 70]), "an alert");
        assert!(looks_like_tls(&[22, 3, 1]), "a handshake");
        assert!(
            !looks_like_tls(&[0, 0, 18, 4, 0]),
            "an HTTP/2 SETTINGS frame"
        );
        assert!(!looks_like_tls(b"HTTP/1.1 101"), "an HTTP/1.1 answer");
        assert!(!looks_like_tls(&[]));
    }

    #[tokio::test]
    async fn a_tls_answer_is_an_error_that_says_what_to_dial_and_http_passes() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut sniffed = SniffTls::new(client);
        server.write_all(&[21, 3, 3, 0, 2, 2, 70]).await.unwrap();
        let mut buf = [0u8; 16];
        let e = sniffed.read(&mut buf).await.unwrap_err();
        assert_eq!(e.to_string(), TLS_ANSWER);

        let (client, mut server) = tokio::io::duplex(64);
        let mut sniffed = SniffTls::new(client);
        server.write_all(b"HTTP/1.1 101 OK").await.unwrap();
        let n = sniffed.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 101 OK");
    }
}
