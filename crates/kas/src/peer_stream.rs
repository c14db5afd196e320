//! The forwarding side of a request carried to another replica, without waiting for the
//! holder's answer line before sending: the request's bytes follow the signed preamble at
//! once, and the holder's `OK\n` (or `ERR …\n`) is checked on the first read. That saves one
//! round trip between replicas per request; a holder that cannot take the request answers
//! `ERR`, which the first read turns into an error naming the holder's reason.
//!
//! A holder answers `ERR` before handing any byte to the agent, so the request was not taken:
//! [`OkFirst::answer`] says so ([`Answered::NotTaken`]), and the request goes to another holder
//! ([`tether_tunnel_server::Resending`]) instead of failing with a 502.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tether_tunnel_server::{AnswerWatch, Answered};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection on the hop between replicas: plain TCP, or TLS over it (`peers.tls`).
pub trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The TCP connection beneath (to check a spare is still open without reading from it).
    fn tcp(&self) -> &tokio::net::TcpStream;
}

pub type PeerStream = Box<dyn PeerIo>;

impl PeerIo for tokio::net::TcpStream {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self
    }
}

impl PeerIo for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

impl PeerIo for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

/// Longest answer line accepted.
const MAX_LINE: usize = 1024;

/// Called once when the holder refuses the request.
type OnRefusal = Box<dyn FnOnce() + Send + Sync>;

/// A stream whose first bytes from the peer must be `OK\n`.
pub struct OkFirst<S> {
    inner: S,
    /// Bytes read while looking for the answer line; after it, what followed it.
    pending: Vec<u8>,
    /// Whether the answer line was read and was `OK`.
    answered: bool,
    /// The holder's answer as read so far (shared with whoever may send the request again).
    answer: AnswerWatch,
    on_refusal: Option<OnRefusal>,
}

impl<S> std::fmt::Debug for OkFirst<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OkFirst")
            .field("answered", &self.answered)
            .field("answer", &self.answer)
            .finish_non_exhaustive()
    }
}

impl<S> OkFirst<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            answered: false,
            answer: AnswerWatch::default(),
            on_refusal: None,
        }
    }

    /// A stream whose `OK` was already read.
    pub fn answered(inner: S) -> Self {
        let answer = AnswerWatch::default();
        answer.set(Answered::Taken);
        Self {
            inner,
            pending: Vec::new(),
            answered: true,
            answer,
            on_refusal: None,
        }
    }

    /// Runs `f` once if the holder refuses the request (its `ERR` line is read).
    pub fn on_refusal(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_refusal = Some(Box::new(f));
        self
    }

    /// The holder's answer: taken once `OK` is read, not taken once `ERR` is.
    pub fn answer(&self) -> AnswerWatch {
        self.answer.clone()
    }
}

/// What the answer so far says (pure): `Some(Ok(rest))` once `OK\n` arrived (with the bytes
/// after it), `Some(Err)` for another line, `None` while the line is incomplete.
fn answer(read: &[u8]) -> Option<io::Result<&[u8]>> {
    match read.iter().position(|b| *b == b'\n') {
        Some(end) if &read[..end] == b"OK" => Some(Ok(&read[end + 1..])),
        Some(end) => Some(Err(io::Error::other(format!(
            "the replica holding the agent refused: {}",
            String::from_utf8_lossy(&read[..end]).trim()
        )))),
        None if read.len() >= MAX_LINE => Some(Err(io::Error::other(
            "the replica holding the agent answered garbage",
        ))),
        None => None,
    }
}

impl<S: AsyncRead + Unpin> OkFirst<S> {
    /// Reads until the answer line is complete; `Ready(Ok)` once it was `OK`.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match answer(&self.pending) {
                Some(Ok(rest)) => {
                    self.pending = rest.to_vec();
                    self.answered = true;
                    self.answer.set(Answered::Taken);
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => {
                    // Only an answer line: a holder that closed or sent garbage may have
                    // passed the request on.
                    if self.pending.contains(&b'\n') {
                        self.answer.set(Answered::NotTaken);
                        if let Some(f) = self.on_refusal.take() {
                            f();
                        }
                    }
                    return Poll::Ready(Err(e));
                }
                None => {}
            }
            let mut chunk = [0u8; 512];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the replica holding the agent closed before answering",
                    )));
                }
                Poll::Ready(Ok(())) => self.pending.extend_from_slice(buf.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OkFirst<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.answered {
            match this.poll_answer(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OkFirst<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_answer_line_decides() {
        assert!(answer(b"O").is_none());
        assert_eq!(answer(b"OK\nHTTP/1.1").unwrap().unwrap(), b"HTTP/1.1");
        let e = answer(b"ERR no tunnel\n").unwrap().unwrap_err();
        assert!(e.to_string().contains("refused: ERR no tunnel"), "{e}");
        assert!(answer(&[b'x'; MAX_LINE]).unwrap().is_err());
    }

    #[tokio::test]
    async fn bytes_after_ok_reach_the_reader_and_writes_pass_before_the_answer() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut s = OkFirst::new(near);
        s.write_all(b"GET /").await.unwrap();
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET /");
        far.write_all(b"OK\nHTTP/1.1 200").await.unwrap();
        drop(far);
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert_eq!(body, "HTTP/1.1 200");
    }

    #[tokio::test]
    async fn an_err_line_is_a_read_error() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut s = OkFirst::new(near);
        far.write_all(b"ERR agent 7 has no tunnel\n").await.unwrap();
        let e = s.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(e.to_string().contains("agent 7 has no tunnel"), "{e}");
    }

    #[tokio::test]
    async fn a_refusal_says_the_request_was_not_taken_and_an_ok_that_it_was() {
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (near, mut far) = tokio::io::duplex(64);
        let flag = std::sync::Arc::clone(&refused);
        let mut s = OkFirst::new(near).on_refusal(move || flag.store(true, Ordering::SeqCst));
        assert_eq!(s.answer().get(), Answered::Not);
        far.write_all(b"ERR agent 7 is not connected\n")
            .await
            .unwrap();
        s.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(s.answer().get(), Answered::NotTaken);
        assert!(refused.load(Ordering::SeqCst));

        let (near, mut far) = tokio::io::duplex(64);
        let mut s = OkFirst::new(near);
        far.write_all(b"OK\nx").await.unwrap();
        assert_eq!(s.read(&mut [0u8; 8]).await.unwrap(), 1);
        assert_eq!(s.answer().get(), Answered::Taken);

        let (near, far) = tokio::io::duplex(64);
        let mut s = OkFirst::new(near);
        drop(far);
        s.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(
            s.answer().get(),
            Answered::Not,
            "closed without answering: maybe passed on"
        );
    }
}
