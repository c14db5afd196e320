//! A WebSocket seen as a byte stream, so HTTP/2 (and so gRPC) can run inside it.
//!
//! Some networks between agentk and kas only pass HTTP/1.1 (proxies that do not speak HTTP/2,
//! load balancers that terminate it). There the agent opens a WebSocket and both sides run the
//! very same HTTP/2 connection over it: every write becomes one Binary message and reads
//! concatenate Binary payloads. Message boundaries carry no meaning.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The WebSocket subprotocol both sides require: it tells a kas WebSocket endpoint that the
/// client will speak HTTP/2 inside, and stops an unrelated WebSocket client from being taken
/// for an agent.
pub const WS_SUBPROTOCOL: &str = "ws-tunnel";

/// Largest WebSocket message and frame either side accepts. Writes are split below this, so it
/// only bounds what a misbehaving peer can make us buffer.
pub const WS_MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;

/// The largest payload one write turns into. HTTP/2 writes are normally far smaller; this keeps
/// every message we send under the peer's limit whatever the caller hands us.
const MAX_WRITE_PAYLOAD: usize = 1024 * 1024;

pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_MESSAGE_SIZE))
        .max_frame_size(Some(WS_MAX_MESSAGE_SIZE))
}

/// `AsyncRead + AsyncWrite` over a [`WebSocketStream`], used by both agentk and kas.
///
/// - Writes become Binary messages; `poll_flush` flushes the WebSocket; `poll_shutdown` sends
///   a Close frame.
/// - Reads return Binary payloads, buffering what does not fit the caller's buffer.
/// - Ping and Pong are skipped: tungstenite queues the Pong itself while we poll for reads.
/// - A Text message is a protocol error (nothing in this tunnel sends text); Close is EOF.
#[derive(Debug)]
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last Binary message.
    pending: Bytes,
    /// Set once the peer closed: later reads keep returning EOF instead of polling a finished
    /// stream.
    read_closed: bool,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            read_closed: false,
        }
    }

    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.ws
    }

    pub fn into_inner(self) -> WebSocketStream<S> {
        self.ws
    }
}

/// Errors that only say the WebSocket is already gone read as a clean EOF: the HTTP/2 layer
/// above decides whether the end was premature.
fn is_closed(e: &WsError) -> bool {
    matches!(e, WsError::ConnectionClosed | WsError::AlreadyClosed)
}

fn into_io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, e)
        }
        other => io::Error::other(other),
    }
}

impl<S> AsyncRead for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                // Keepalive traffic of the WebSocket layer itself (tungstenite answers pings).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected text message on a binary WebSocket tunnel",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => this.read_closed = true,
                Some(Err(e)) if is_closed(&e) => this.read_closed = true,
                Some(Err(e)) => return Poll::Ready(Err(into_io_error(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(into_io_error)?;
        let n = buf.len().min(MAX_WRITE_PAYLOAD);
        Pin::new(ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(into_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(into_io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sends Close (once) and flushes; it does not wait for the peer's Close, which arrives
        // through reads like any other message.
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) if is_closed(&e) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(into_io_error(e))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A WsIo (server role) and the raw WebSocket talking to it (client role), in memory.
    async fn pair() -> (WsIo<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(ws_config())).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, Some(ws_config())).await;
        (WsIo::new(server), client)
    }

    #[tokio::test]
    async fn reads_concatenate_binary_messages_and_skip_pings() {
        let (mut io, mut peer) = pair().await;
        peer.send(Message::binary(&b"hello "[..])).await.unwrap();
        peer.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        peer.send(Message::binary(&b"world"[..])).await.unwrap();
        peer.send(Message::Close(None)).await.unwrap();

        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");

        // The ping was answered while we read.
        let pong = peer.next().await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong(Bytes::from_static(b"p")));
    }

    #[tokio::test]
    async fn small_reads_take_a_message_in_parts() {
        let (mut io, mut peer) = pair().await;
        peer.send(Message::binary(&b"abcdef"[..])).await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abcd");
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ef");
    }

    #[tokio::test]
    async fn text_message_is_an_error() {
        let (mut io, mut peer) = pair().await;
        peer.send(Message::text("nope")).await.unwrap();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn writes_become_binary_messages_and_shutdown_sends_close() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"one").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::binary(&b"one"[..])
        );
        io.shutdown().await.unwrap();
        assert!(matches!(
            peer.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
    }
}
