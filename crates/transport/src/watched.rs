//! What agentk's connection to kas reads, watched: when bytes last came ([`ReadActivity`]), and
//! that the first ones come at all.
//!
//! A connection a load balancer or the network dropped without a reset (half-open) fails no
//! read and no write: HTTP/2 pings find it after the keep-alive interval and timeout, and then
//! its streams end exactly as when kas closes the connection. How long nothing came tells the
//! two apart. A new connection into such a path (a proxy that accepts and forwards nothing)
//! was worse: TCP connected, agentk sent its HTTP/2 preface and waited for an answer up to the
//! keep-alive's whole round (75 s), past the dial's own timeout. kas sends its HTTP/2 settings
//! as soon as a connection is up, so their absence within the dial timeout is a failure.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// When the latest connection to kas last received bytes (shared by the dialer, which records,
/// and whoever asks).
#[derive(Debug, Clone)]
pub struct ReadActivity(Arc<Activity>);

#[derive(Debug)]
struct Activity {
    base: Instant,
    /// Milliseconds after `base` of the last read, plus one; 0 before any.
    last: AtomicU64,
}

impl Default for ReadActivity {
    fn default() -> Self {
        ReadActivity(Arc::new(Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }))
    }
}

impl ReadActivity {
    /// How long nothing came from kas; `None` before anything came.
    pub fn quiet_for(&self) -> Option<Duration> {
        self.quiet_at(Instant::now())
    }

    fn quiet_at(&self, now: Instant) -> Option<Duration> {
        let last = self.0.last.load(Ordering::Relaxed).checked_sub(1)?;
        let since = now.saturating_duration_since(self.0.base);
        Some(since.saturating_sub(Duration::from_millis(last)))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.0.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.0.last.store(ms + 1, Ordering::Relaxed);
    }
}

/// A dialled connection whose reads are recorded in a [`ReadActivity`], and which fails its
/// reads when kas sent nothing within `first_within` of it opening.
pub(crate) struct Watched<S> {
    inner: S,
    activity: ReadActivity,
    /// Until the first bytes came: when they are overdue.
    first: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
}

impl<S> Watched<S> {
    /// Must be called within a Tokio runtime (it starts the first bytes' timer).
    pub(crate) fn new(inner: S, activity: ReadActivity, first_within: Duration) -> Self {
        Self {
            inner,
            activity,
            first: Some((Box::pin(tokio::time::sleep(first_within)), first_within)),
        }
    }
}

/// The read error of a connection kas sent nothing on.
pub(crate) fn nothing_came(within: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "kas sent nothing within {within:?} of the connection opening (a proxy or load balancer that accepts connections and forwards nothing?)"
        ),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining() > 0;
        let (polled, new) = crate::poll_read_counting(&mut self.inner, cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if new > 0 => {
                self.activity.touch();
                self.first = None;
            }
            // The end of the connection came from its other end: an end of file (kas closing
            // it at its maximum age, however long idle before) or a reset. A connection the
            // network dropped gives neither; the kernel's own timeout is no word from kas.
            Poll::Ready(Ok(())) if room => self.activity.touch(),
            Poll::Ready(Err(e)) if e.kind() != io::ErrorKind::TimedOut => self.activity.touch(),
            Poll::Pending => {
                if let Some((timer, within)) = self.first.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(nothing_came(*within)));
                }
            }
            _ => {}
        }
        polled
    }
}

crate::forward_async_write!(Watched, inner);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_are_recorded_and_a_silent_peer_fails_the_first_read() {
        let activity = ReadActivity::default();
        assert_eq!(activity.quiet_for(), None);
        let (client, mut server) = tokio::io::duplex(64);
        let mut watched = Watched::new(client, activity.clone(), Duration::from_secs(30));
        server.write_all(b"settings").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(watched.read(&mut buf).await.unwrap(), 8);
        assert!(activity.quiet_for().unwrap() < Duration::from_secs(30));

        let (client, _silent) = tokio::io::duplex(64);
        let mut watched = Watched::new(client, activity, Duration::from_millis(20));
        let e = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            e.to_string().contains("kas sent nothing within 20ms"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_end_of_file_after_a_long_quiet_is_heard_from_kas() {
        // The last bytes came 60 s ago.
        let activity = ReadActivity(Arc::new(Activity {
            base: Instant::now() - Duration::from_secs(60),
            last: AtomicU64::new(1),
        }));
        assert!(activity.quiet_for().unwrap() >= Duration::from_secs(59));
        let (client, server) = tokio::io::duplex(64);
        let mut watched = Watched::new(client, activity.clone(), Duration::from_secs(30));
        let mut buf = [0u8; 4];
        drop(server);
        assert_eq!(watched.read(&mut buf).await.unwrap(), 0, "end of file");
        assert!(activity.quiet_for().unwrap() < Duration::from_secs(5));
    }

    #[test]
    fn quiet_time_counts_from_the_last_read() {
        let activity = ReadActivity::default();
        activity.touch();
        let later = Instant::now() + Duration::from_secs(40);
        let quiet = activity.quiet_at(later).unwrap();
        assert!(quiet >= Duration::from_secs(39) && quiet <= Duration::from_secs(41));
    }

    #[tokio::test]
    async fn once_kas_answered_a_quiet_connection_is_not_failed() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut watched = Watched::new(client, ReadActivity::default(), Duration::from_millis(10));
        server.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 4];
        watched.read_exact(&mut buf[..1]).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), watched.read(&mut buf)).await;
        assert!(waited.is_err(), "still waiting, not failed: {waited:?}");
    }
}
