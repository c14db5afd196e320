//! Byte streams over tunnel frames.
//!
//! Once a request is accepted, a tunnel is a plain bidirectional byte pipe, like a TCP
//! connection: each side writes `Data` frames and half-closes with `CloseSend`. These adapters
//! turn the frame channels of either side into tokio `AsyncRead`/`AsyncWrite`, so higher layers
//! (an HTTP/1.1 connection for the Kubernetes API, the echo service) never see frames.
//!
//! Back-pressure: the writer reserves a slot in a bounded channel before each frame, and the
//! reader pulls frames only when read; with one request per gRPC stream, HTTP/2 flow control then
//! applies per request end to end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::DATA_CHUNK;
use crate::tunnel::{AgentFrame, CloseSend, Data, ServerFrame, agent_frame, server_frame};

/// What a frame read from the other side means for the byte stream.
#[derive(Debug)]
pub enum Incoming {
    Data(Bytes),
    /// The other side will send no more bytes.
    CloseSend,
    /// The other side failed; carries a gRPC status code and message.
    Error(i32, String),
    /// A frame that does not belong in the data phase.
    Unexpected(&'static str),
}

/// A frame type that can carry tunnel bytes in one direction.
pub trait OutFrame: Send + 'static {
    fn data(bytes: Bytes) -> Self;
    fn close_send() -> Self;
}

/// A frame type received in the data phase.
pub trait InFrame: Send + 'static {
    fn classify(self) -> Incoming;
}

impl OutFrame for ServerFrame {
    fn data(bytes: Bytes) -> Self {
        ServerFrame {
            frame: Some(server_frame::Frame::Data(Data { data: bytes })),
        }
    }
    fn close_send() -> Self {
        ServerFrame {
            frame: Some(server_frame::Frame::CloseSend(CloseSend {})),
        }
    }
}

impl OutFrame for AgentFrame {
    fn data(bytes: Bytes) -> Self {
        AgentFrame {
            frame: Some(agent_frame::Frame::Data(Data { data: bytes })),
        }
    }
    fn close_send() -> Self {
        AgentFrame {
            frame: Some(agent_frame::Frame::CloseSend(CloseSend {})),
        }
    }
}

impl InFrame for AgentFrame {
    fn classify(self) -> Incoming {
        match self.frame {
            Some(agent_frame::Frame::Data(d)) => Incoming::Data(d.data),
            Some(agent_frame::Frame::CloseSend(_)) => Incoming::CloseSend,
            Some(agent_frame::Frame::Error(e)) => Incoming::Error(e.code, e.message),
            Some(agent_frame::Frame::Descriptor(_)) => Incoming::Unexpected("descriptor"),
            Some(agent_frame::Frame::Header(_)) => Incoming::Unexpected("header"),
            // Only ever an answer to a request, which `tunnel-server` reads before this.
            Some(agent_frame::Frame::CloseUnused(_)) => Incoming::Unexpected("close-unused"),
            None => Incoming::Unexpected("empty frame"),
        }
    }
}

impl InFrame for ServerFrame {
    fn classify(self) -> Incoming {
        match self.frame {
            Some(server_frame::Frame::Data(d)) => Incoming::Data(d.data),
            Some(server_frame::Frame::CloseSend(_)) => Incoming::CloseSend,
            Some(server_frame::Frame::Request(_)) => Incoming::Unexpected("request"),
            None => Incoming::Unexpected("empty frame"),
        }
    }
}

/// Writes bytes as `Data` frames into a bounded channel; shutdown sends `CloseSend`.
///
/// kas's channel item is a boxed `Result<F, E>` because a tonic response stream carries
/// `Result<F, E>` (`E` = `tonic::Status`); the agent side uses `F` directly through
/// [`FrameWriter::plain`].
#[derive(Debug)]
pub struct FrameWriter<T: Send + 'static> {
    tx: PollSender<T>,
    wrap: fn(Bytes, bool) -> T,
    closed: bool,
    /// The longest `Data` frame sent, in bytes (see [`FrameWriter::largest_frame`]).
    largest: usize,
}

impl<F: OutFrame, E: Send + 'static> FrameWriter<Box<Result<F, E>>> {
    /// A writer for a channel of boxed `Result<F, E>` (kas's response stream). Boxed because a
    /// tokio channel allocates room for 32 items when it is made, whatever its capacity: 32
    /// frames of 72 bytes were 2.3 KB held by every idle stream, 32 pointers are 256 bytes.
    pub fn wrapped(tx: mpsc::Sender<Box<Result<F, E>>>) -> Self {
        fn wrap<F: OutFrame, E>(b: Bytes, close: bool) -> Box<Result<F, E>> {
            Box::new(Ok(if close { F::close_send() } else { F::data(b) }))
        }
        Self {
            tx: PollSender::new(tx),
            wrap: wrap::<F, E>,
            closed: false,
            largest: 0,
        }
    }
}

impl<F: OutFrame> FrameWriter<F> {
    /// A writer for a channel of plain frames (agentk's request stream).
    pub fn plain(tx: mpsc::Sender<F>) -> Self {
        fn wrap<F: OutFrame>(b: Bytes, close: bool) -> F {
            if close { F::close_send() } else { F::data(b) }
        }
        Self {
            tx: PollSender::new(tx),
            wrap: wrap::<F>,
            closed: false,
            largest: 0,
        }
    }
}

impl<T: Send + 'static> FrameWriter<T> {
    /// Whether `CloseSend` was sent (this side finished cleanly).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The longest `Data` frame sent. gRPC's encode buffer grows to the longest message of an
    /// RPC and keeps that size for the RPC's life, so a stream that carried long frames should
    /// not be kept idle for later requests.
    pub fn largest_frame(&self) -> usize {
        self.largest
    }

    /// A sender on the channel the frames go to (none once the writer closed it).
    pub fn into_sender(self) -> Option<mpsc::Sender<T>> {
        self.tx.get_ref().cloned()
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed")
}

impl<T: Send + 'static> AsyncWrite for FrameWriter<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(broken()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| broken())?;
        let n = buf.len().min(DATA_CHUNK);
        self.largest = self.largest.max(n);
        let item = (self.wrap)(Bytes::copy_from_slice(&buf[..n]), false);
        self.tx.send_item(item).map_err(|_| broken())?;
        Poll::Ready(Ok(n))
    }

    /// Gathers the slices into one frame (up to [`DATA_CHUNK`]). Being vectored lets hyper
    /// hand over its headers and body chunks as they are instead of first copying them into
    /// one buffer of its own: one copy less per byte on the tunnel's hot path.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(broken()));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| broken())?;
        let n = total.min(DATA_CHUNK);
        let mut frame = bytes::BytesMut::with_capacity(n);
        for b in bufs {
            let take = b.len().min(n - frame.len());
            frame.extend_from_slice(&b[..take]);
            if frame.len() == n {
                break;
            }
        }
        self.largest = self.largest.max(n);
        let item = (self.wrap)(frame.freeze(), false);
        self.tx.send_item(item).map_err(|_| broken())?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are handed to gRPC as soon as they are written; there is no buffer here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| broken())?;
        let item = (self.wrap)(Bytes::new(), true);
        self.tx.send_item(item).map_err(|_| broken())?;
        self.closed = true;
        Poll::Ready(Ok(()))
    }
}

/// Reads the bytes of `Data` frames from a stream of frames until `CloseSend` (EOF).
pub struct FrameReader<S> {
    frames: S,
    buf: Bytes,
    eof: bool,
    /// The other side sent `CloseSend` (a clean end, not a failure).
    closed_by_peer: bool,
    /// The longest `Data` frame read, in bytes.
    largest: usize,
}

impl<S> std::fmt::Debug for FrameReader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.buf.len())
            .field("eof", &self.eof)
            .finish()
    }
}

impl<S> FrameReader<S> {
    pub fn new(frames: S) -> Self {
        Self {
            frames,
            buf: Bytes::new(),
            eof: false,
            closed_by_peer: false,
            largest: 0,
        }
    }

    /// The longest `Data` frame read: gRPC's decode buffer grows to the longest message of an
    /// RPC and keeps that size for the RPC's life (see [`FrameWriter::largest_frame`]).
    pub fn largest_frame(&self) -> usize {
        self.largest
    }

    /// Whether the other side closed cleanly (`CloseSend` read).
    pub fn closed_by_peer(&self) -> bool {
        self.closed_by_peer
    }

    /// The underlying frame stream (e.g. to drain it after EOF).
    pub fn into_inner(self) -> S {
        self.frames
    }
}

impl<S, F, E> AsyncRead for FrameReader<S>
where
    S: Stream<Item = Result<F, E>> + Unpin,
    F: InFrame,
    E: std::fmt::Display,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(out.remaining());
                out.put_slice(&self.buf[..n]);
                self.buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.frames).poll_next(cx)) {
                // The stream ending without CloseSend is an abrupt close, not a clean EOF.
                None => {
                    self.eof = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tunnel stream ended without close",
                    )));
                }
                Some(Err(e)) => {
                    self.eof = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("tunnel stream failed: {e}"),
                    )));
                }
                Some(Ok(frame)) => match frame.classify() {
                    Incoming::Data(b) => {
                        self.largest = self.largest.max(b.len());
                        self.buf = b;
                    }
                    Incoming::CloseSend => {
                        self.eof = true;
                        self.closed_by_peer = true;
                    }
                    Incoming::Error(code, msg) => {
                        self.eof = true;
                        return Poll::Ready(Err(io::Error::other(format!(
                            "the other side failed (code {code}): {msg}"
                        ))));
                    }
                    Incoming::Unexpected(what) => {
                        self.eof = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unexpected {what} frame in the data phase"),
                        )));
                    }
                },
            }
        }
    }
}

/// A tunnel's byte pipe: a [`FrameReader`] and a [`FrameWriter`] as one `AsyncRead +
/// AsyncWrite`, plus `extra` data the owner keeps alive with it (guards, metadata).
pub struct Pipe<S, T: Send + 'static, X = ()> {
    pub reader: FrameReader<S>,
    pub writer: FrameWriter<T>,
    pub extra: X,
}

impl<S, T: Send + 'static, X: std::fmt::Debug> std::fmt::Debug for Pipe<S, T, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("reader", &self.reader)
            .field("extra", &self.extra)
            .finish_non_exhaustive()
    }
}

impl<S, T: Send + 'static, X> Pipe<S, T, X> {
    /// Separate halves, for copying in both directions at once (drops `extra`).
    pub fn into_split(self) -> (FrameReader<S>, FrameWriter<T>) {
        (self.reader, self.writer)
    }
}

impl<S, T: Send + 'static, X: Unpin> AsyncRead for Pipe<S, T, X>
where
    FrameReader<S>: AsyncRead + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl<S: Unpin, T: Send + 'static, X: Unpin> AsyncWrite for Pipe<S, T, X> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.writer.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream_shim::ReceiverStream;

    /// A minimal receiver stream so the tests need no extra crate.
    mod tokio_stream_shim {
        use super::super::*;
        pub struct ReceiverStream<T>(pub mpsc::Receiver<T>);
        impl<T> Stream for ReceiverStream<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
        /// kas's boxed items, unboxed as its response stream hands them to tonic.
        pub struct Unboxed<T>(pub mpsc::Receiver<Box<T>>);
        impl<T> Stream for Unboxed<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx).map(|i| i.map(|b| *b))
            }
        }
    }

    #[tokio::test]
    async fn both_ends_know_the_longest_frame() {
        let (tx, rx) = mpsc::channel::<Box<Result<ServerFrame, String>>>(4);
        let mut w = FrameWriter::wrapped(tx);
        let mut r = FrameReader::new(tokio_stream_shim::Unboxed(rx));
        let writer = tokio::spawn(async move {
            w.write_all(&[1; 10]).await.expect("write");
            w.write_all(&vec![2; DATA_CHUNK + 5]).await.expect("write");
            w.write_all(&[3; 100]).await.expect("write");
            w.shutdown().await.expect("shutdown");
            w.largest_frame()
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), 10 + DATA_CHUNK + 5 + 100);
        // Frames are cut at DATA_CHUNK, so that is the longest either side saw.
        assert_eq!(writer.await.expect("join"), DATA_CHUNK);
        assert_eq!(r.largest_frame(), DATA_CHUNK);
    }

    #[tokio::test]
    async fn bytes_cross_in_chunks_and_close_means_eof() {
        let (tx, rx) = mpsc::channel::<Box<Result<ServerFrame, String>>>(4);
        let mut w = FrameWriter::wrapped(tx);
        let mut r = FrameReader::new(tokio_stream_shim::Unboxed(rx));
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&p2).await.expect("write");
            w.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        writer.await.expect("join");
        assert_eq!(got, payload);
    }

    #[tokio::test]
    async fn writes_are_split_into_data_chunks() {
        let (tx, mut rx) = mpsc::channel::<AgentFrame>(8);
        let mut w = FrameWriter::plain(tx);
        let n = w.write(&vec![7u8; DATA_CHUNK * 3]).await.expect("write");
        assert_eq!(n, DATA_CHUNK);
        match rx.recv().await.map(|f| f.frame) {
            Some(Some(agent_frame::Frame::Data(d))) => assert_eq!(d.data.len(), DATA_CHUNK),
            other => panic!("expected a data frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn vectored_writes_gather_slices_into_one_frame_up_to_a_chunk() {
        use tokio::io::AsyncWriteExt;
        let (tx, mut rx) = mpsc::channel::<AgentFrame>(4);
        let mut w = FrameWriter::plain(tx);
        assert!(w.is_write_vectored());
        let (a, b) = (vec![1u8; 10], vec![2u8; DATA_CHUNK]);
        let n = w
            .write_vectored(&[io::IoSlice::new(&a), io::IoSlice::new(&b)])
            .await
            .expect("write");
        assert_eq!(n, DATA_CHUNK);
        match rx.recv().await.map(|f| f.frame) {
            Some(Some(agent_frame::Frame::Data(d))) => {
                assert_eq!(d.data.len(), DATA_CHUNK);
                assert_eq!(&d.data[..10], &a[..]);
                assert!(d.data[10..].iter().all(|&x| x == 2));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn stream_end_without_close_is_an_error() {
        let (tx, rx) = mpsc::channel::<Result<AgentFrame, String>>(4);
        tx.send(Ok(AgentFrame::data(Bytes::from_static(b"hi"))))
            .await
            .expect("send");
        drop(tx);
        let mut r = FrameReader::new(ReceiverStream(rx));
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.expect_err("abrupt end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"hi");
    }

    #[tokio::test]
    async fn an_error_frame_fails_the_read() {
        let (tx, rx) = mpsc::channel::<Result<AgentFrame, String>>(4);
        let err_frame = AgentFrame {
            frame: Some(agent_frame::Frame::Error(crate::tunnel::Error {
                code: 14,
                message: "apiserver down".into(),
            })),
        };
        tx.send(Ok(err_frame)).await.expect("send");
        let mut r = FrameReader::new(ReceiverStream(rx));
        let mut buf = [0u8; 8];
        let err = r.read(&mut buf).await.expect_err("error frame");
        assert!(err.to_string().contains("apiserver down"));
    }

    #[tokio::test]
    async fn writing_after_the_reader_is_gone_is_broken_pipe() {
        let (tx, rx) = mpsc::channel::<AgentFrame>(1);
        drop(rx);
        let mut w = FrameWriter::plain(tx);
        let err = w.write(b"x").await.expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
