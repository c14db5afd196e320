//! A deadline on reading a request's body, for routes that read it before they know who sent
//! it (push webhooks check a signature over the body; the web UI's login form carries the
//! token). The listeners' header timeout stops at the end of the headers: without this, a
//! client sending its body a byte at a time held a connection, and its slot under the caps,
//! for as long as it liked.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::Request;
use hyper::body::{Frame, SizeHint};
use tokio::time::Sleep;

/// How long a body may take to arrive once its headers did.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request with its body bounded by [`BODY_TIMEOUT`] (an `axum::middleware::map_request`).
pub async fn bound_body(req: Request<Body>) -> Request<Body> {
    req.map(|body| Body::new(DeadlineBody::new(body, BODY_TIMEOUT)))
}

/// A body that fails once `limit` has passed since it was made and it has not ended.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    limit: Duration,
}

impl DeadlineBody {
    fn new(inner: Body, limit: Duration) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep(limit)),
            limit,
        }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            let why = format!("the request body did not arrive within {:?}", this.limit);
            return Poll::Ready(Some(Err(why.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_fails_at_its_deadline() {
        let stalled = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        let body = Body::from_stream(stalled);
        let got = DeadlineBody::new(body, Duration::from_secs(10))
            .collect()
            .await;
        let e = got.err().unwrap().to_string();
        assert!(e.contains("did not arrive within 10s"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_body_in_time_is_read() {
        let body = Body::from("payload");
        let got = DeadlineBody::new(body, Duration::from_secs(10))
            .collect()
            .await;
        assert_eq!(got.unwrap().to_bytes(), Bytes::from("payload"));
    }
}
