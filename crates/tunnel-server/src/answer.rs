//! The agent's answer to a request, checked on the first read.
//!
//! kas sends a request's first bytes right after its `RequestInfo` when the agent takes them
//! (`Descriptor.data_with_request`), so the agent's `ResponseHeader` or `Error` arrives as the
//! first frame of the data phase rather than before it. [`AnswerFirst`] passes the agent's
//! frames on without that header; an `Error` (a refusal) goes on as it is, and the byte reader
//! fails on it with the agent's reason. A `CloseUnused` (the agent ended the stream without
//! reading the request) fails the read too, and [`AnswerWatch`] tells it apart, so that the
//! request can be sent again on another stream ([`crate::Resending`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::Stream;
use tether_protocol::tunnel::{AgentFrame, agent_frame};
use tonic::Status;

/// What the first frame of the data phase means.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The agent accepted the request: the frame carries no bytes and is dropped.
    Accepted,
    /// The agent refused: the byte reader fails on the frame with the agent's reason.
    Refused,
    /// The agent ended the stream without reading the request (`CloseUnused`).
    NotTaken,
    /// Anything else breaks the protocol (names the frame).
    Invalid(&'static str),
}

/// The meaning of the first frame the agent sent after the request (pure).
fn answer(frame: &AgentFrame) -> Answer {
    match &frame.frame {
        Some(agent_frame::Frame::Header(_)) => Answer::Accepted,
        Some(agent_frame::Frame::Error(_)) => Answer::Refused,
        Some(agent_frame::Frame::CloseUnused(_)) => Answer::NotTaken,
        Some(agent_frame::Frame::Data(_)) => Answer::Invalid("data"),
        Some(agent_frame::Frame::CloseSend(_)) => Answer::Invalid("a close"),
        Some(agent_frame::Frame::Descriptor(_)) => Answer::Invalid("a descriptor"),
        None => Answer::Invalid("an empty frame"),
    }
}

/// How far the agent answered a request, as kas read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// No answer read yet (or the stream ended without one: the request may have been taken).
    Not,
    /// The agent took the request (`ResponseHeader`), or refused it (`Error`).
    Taken,
    /// The agent ended the stream without reading the request (`CloseUnused`): nothing of it
    /// reached a handler, so it may be sent again on another stream.
    NotTaken,
}

/// The agent's answer to one request, shared between the request's byte pipe (which reads it)
/// and whoever may send the request again.
#[derive(Debug, Clone, Default)]
pub struct AnswerWatch(Arc<AtomicU8>);

impl AnswerWatch {
    pub fn get(&self) -> Answered {
        match self.0.load(Ordering::Acquire) {
            1 => Answered::Taken,
            2 => Answered::NotTaken,
            _ => Answered::Not,
        }
    }

    /// Records the answer; public for byte pipes read elsewhere (the hop between kas replicas
    /// tells a holder's refusal apart the same way).
    pub fn set(&self, a: Answered) {
        let v = match a {
            Answered::Not => 0,
            Answered::Taken => 1,
            Answered::NotTaken => 2,
        };
        self.0.store(v, Ordering::Release);
    }
}

/// The message of the read error a `CloseUnused` answer gives.
pub(crate) const NOT_TAKEN: &str = "the agent closed the tunnel stream without taking the request";

/// The agent's frames after its answer to the request.
#[derive(Debug)]
pub struct AnswerFirst<S> {
    inner: S,
    answered: bool,
    watch: AnswerWatch,
}

impl<S> AnswerFirst<S> {
    /// Frames from `inner`; `answered` tells whether the agent's answer was already read.
    /// The answer, once read, goes to `watch`.
    pub(crate) fn new(inner: S, answered: bool, watch: AnswerWatch) -> Self {
        Self {
            inner,
            answered,
            watch,
        }
    }

    /// The agent's frames, for the stream's next request.
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Stream for AnswerFirst<S>
where
    S: Stream<Item = Result<AgentFrame, Status>> + Unpin,
{
    type Item = Result<AgentFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let item = ready!(Pin::new(&mut self.inner).poll_next(cx));
            if self.answered {
                return Poll::Ready(item);
            }
            self.answered = true;
            let Some(Ok(frame)) = item else {
                return Poll::Ready(item); // ended or failed: the reader reports it
            };
            match answer(&frame) {
                Answer::Accepted => self.watch.set(Answered::Taken),
                Answer::Refused => {
                    self.watch.set(Answered::Taken);
                    return Poll::Ready(Some(Ok(frame)));
                }
                Answer::NotTaken => {
                    self.watch.set(Answered::NotTaken);
                    return Poll::Ready(Some(Err(Status::unavailable(NOT_TAKEN))));
                }
                Answer::Invalid(what) => {
                    return Poll::Ready(Some(Err(Status::internal(format!(
                        "the agent sent {what} before answering the request"
                    )))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use bytes::Bytes;
    use futures_util::StreamExt;
    use tether_protocol::frames::{FrameReader, OutFrame};
    use tether_protocol::tunnel::{Error, ResponseHeader};
    use tokio::io::AsyncReadExt;

    use super::*;

    fn header() -> AgentFrame {
        AgentFrame {
            frame: Some(agent_frame::Frame::Header(ResponseHeader::default())),
        }
    }

    fn frames(v: Vec<AgentFrame>) -> impl Stream<Item = Result<AgentFrame, Status>> + Unpin {
        futures_util::stream::iter(v.into_iter().map(Ok))
    }

    #[tokio::test]
    async fn the_header_is_dropped_and_the_bytes_after_it_are_read() {
        let s = frames(vec![
            header(),
            AgentFrame::data(Bytes::from_static(b"hello")),
            AgentFrame::close_send(),
        ]);
        let mut r = FrameReader::new(AnswerFirst::new(s, false, AnswerWatch::default()));
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn a_refusal_fails_the_first_read_with_the_agents_reason() {
        let refusal = AgentFrame {
            frame: Some(agent_frame::Frame::Error(Error {
                code: 12,
                message: "this agent does not serve \"x\"".into(),
            })),
        };
        let mut r = FrameReader::new(AnswerFirst::new(
            frames(vec![refusal]),
            false,
            AnswerWatch::default(),
        ));
        let err = r.read(&mut [0u8; 8]).await.expect_err("refused");
        assert!(err.to_string().contains("does not serve"), "{err}");
    }

    #[tokio::test]
    async fn only_the_first_frame_may_be_the_answer() {
        // A header in the middle of the data is the agent breaking the protocol.
        let mut s = AnswerFirst::new(
            frames(vec![header(), header()]),
            false,
            AnswerWatch::default(),
        );
        let second = s.next().await.expect("a frame").expect("ok");
        assert_eq!(answer(&second), Answer::Accepted);
        // Once answered, nothing more is dropped.
        let mut answered = AnswerFirst::new(frames(vec![header()]), true, AnswerWatch::default());
        assert!(answered.next().await.is_some());
    }

    #[tokio::test]
    async fn data_before_any_answer_breaks_the_protocol() {
        let s = frames(vec![AgentFrame::data(Bytes::from_static(b"x"))]);
        let mut r = FrameReader::new(AnswerFirst::new(s, false, AnswerWatch::default()));
        let err = r.read(&mut [0u8; 1]).await.expect_err("no answer first");
        assert!(err.to_string().contains("data before answering"), "{err}");
    }

    #[tokio::test]
    async fn close_unused_as_the_answer_fails_the_read_and_says_the_request_was_not_taken() {
        let not_taken = AgentFrame {
            frame: Some(agent_frame::Frame::CloseUnused(
                tether_protocol::tunnel::CloseUnused {},
            )),
        };
        let watch = AnswerWatch::default();
        let mut r = FrameReader::new(AnswerFirst::new(
            frames(vec![not_taken]),
            false,
            watch.clone(),
        ));
        assert_eq!(watch.get(), Answered::Not);
        let err = r.read(&mut [0u8; 8]).await.expect_err("not taken");
        assert!(err.to_string().contains(NOT_TAKEN), "{err}");
        assert_eq!(watch.get(), Answered::NotTaken);
        // A header, then the stream ending without close: taken, and so never sent again.
        let watch = AnswerWatch::default();
        let mut r = FrameReader::new(AnswerFirst::new(
            frames(vec![header()]),
            false,
            watch.clone(),
        ));
        r.read_to_end(&mut Vec::new())
            .await
            .expect_err("ended without close");
        assert_eq!(watch.get(), Answered::Taken);
    }
}
