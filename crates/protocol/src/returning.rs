//! A tunnel's byte pipe that gives its stream back when dropped.
//!
//! A request that ended cleanly on both sides (each sent `CloseSend`) leaves its gRPC stream
//! quiet, so the stream can carry the next request instead of being closed and replaced: that
//! spares, per request, opening a stream (headers both ways, authentication, a task on each
//! side) and ending one. The owner of the stream gets it back in an [`Ended`] and decides.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::frames::Pipe;

/// How a request's exchange ended, with what is left of its stream.
#[derive(Debug)]
pub struct Ended<S, T> {
    /// The frames from the other side (to read its close from, or to drain).
    pub frames: S,
    /// This side's frame channel, unless its other end is gone.
    pub sender: Option<mpsc::Sender<T>>,
    /// The other side sent `CloseSend`.
    pub peer_closed: bool,
    /// This side sent `CloseSend`.
    pub closed: bool,
    /// The longest `Data` frame either side sent on this request, in bytes.
    pub largest_frame: usize,
}

/// Streams whose frames stayed within this many bytes may carry another request. gRPC's
/// encode and decode buffers grow to the longest message of an RPC and keep that size for its
/// life, so a stream that carried a 64 KiB frame (any response over 16 KiB, a LIST) would hold
/// 64 KiB or more on each side for as long as it sits idle; kas ends such a stream instead, and
/// the agent opens a fresh one, which costs far less than the transfer that grew it.
pub const REUSE_MAX_FRAME: usize = 16 * 1024;

impl<S, T> Ended<S, T> {
    /// Whether the stream's buffers stayed small enough to keep it for another request
    /// ([`REUSE_MAX_FRAME`]).
    pub fn small(&self) -> bool {
        self.largest_frame <= REUSE_MAX_FRAME
    }

    /// Whether this side ended cleanly, so the stream may carry another request once the
    /// other side's `CloseSend` is read too (pure).
    pub fn clean(&self) -> bool {
        self.closed && self.sender.is_some()
    }
}

/// A [`Pipe`] that sends its parts back through `back` when dropped.
pub struct Returning<S, T: Send + 'static> {
    pipe: Option<Pipe<S, T>>,
    back: Option<oneshot::Sender<Ended<S, T>>>,
}

impl<S, T: Send + 'static> std::fmt::Debug for Returning<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Returning").finish_non_exhaustive()
    }
}

impl<S, T: Send + 'static> Returning<S, T> {
    pub fn new(pipe: Pipe<S, T>, back: oneshot::Sender<Ended<S, T>>) -> Self {
        Self {
            pipe: Some(pipe),
            back: Some(back),
        }
    }

    /// The pipe (always there until drop, which is the only place it is taken).
    fn pipe(&mut self) -> io::Result<&mut Pipe<S, T>> {
        self.pipe
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel given back"))
    }
}

impl<S, T: Send + 'static> Drop for Returning<S, T> {
    fn drop(&mut self) {
        if let (Some(pipe), Some(back)) = (self.pipe.take(), self.back.take()) {
            let (peer_closed, closed) = (pipe.reader.closed_by_peer(), pipe.writer.is_closed());
            let largest_frame = pipe.reader.largest_frame().max(pipe.writer.largest_frame());
            let _ = back.send(Ended {
                frames: pipe.reader.into_inner(),
                sender: pipe.writer.into_sender(),
                peer_closed,
                closed,
                largest_frame,
            });
        }
    }
}

impl<S: Unpin, T: Send + 'static> AsyncRead for Returning<S, T>
where
    Pipe<S, T>: AsyncRead,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let pipe = self.get_mut().pipe()?;
        Pin::new(pipe).poll_read(cx, buf)
    }
}

impl<S: Unpin, T: Send + 'static> AsyncWrite for Returning<S, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().pipe()?).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().pipe()?).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().pipe()?).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().pipe()?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::frames::{FrameReader, FrameWriter, OutFrame};
    use crate::tunnel::{AgentFrame, ServerFrame};

    type Frames =
        Pin<Box<dyn futures_util::Stream<Item = Result<ServerFrame, String>> + Send + Unpin>>;

    /// A returning pipe, the other side's sender into it and where it comes back to.
    struct Harness {
        conn: Returning<Frames, AgentFrame>,
        peer: mpsc::Sender<Result<ServerFrame, String>>,
        _out: mpsc::Receiver<AgentFrame>,
        returned: oneshot::Receiver<Ended<Frames, AgentFrame>>,
    }

    fn pipe() -> Harness {
        let (peer, in_rx) = mpsc::channel(4);
        let (out_tx, _out) = mpsc::channel(4);
        let (back, returned) = oneshot::channel();
        let p = Pipe {
            reader: FrameReader::new(frames(in_rx)),
            writer: FrameWriter::plain(out_tx),
            extra: (),
        };
        Harness {
            conn: Returning::new(p, back),
            peer,
            _out,
            returned,
        }
    }

    fn frames(mut rx: mpsc::Receiver<Result<ServerFrame, String>>) -> Frames {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    #[tokio::test]
    async fn a_pipe_closed_on_both_sides_comes_back_clean() {
        let Harness {
            mut conn,
            peer,
            returned,
            _out: _frames_sent,
        } = pipe();
        peer.send(Ok(ServerFrame::close_send())).await.unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        conn.shutdown().await.unwrap();
        drop(conn);
        let ended = returned.await.expect("given back");
        assert!(ended.peer_closed && ended.closed && ended.clean());
    }

    #[tokio::test]
    async fn a_pipe_dropped_midway_comes_back_unclean() {
        let Harness {
            mut conn,
            returned,
            _out: _frames_sent,
            peer: _peer,
        } = pipe();
        conn.write_all(b"half").await.unwrap();
        drop(conn);
        let ended = returned.await.expect("given back");
        assert!(!ended.peer_closed && !ended.closed && !ended.clean());
    }
}
