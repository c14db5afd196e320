//! `kas agent reconcile --wait` riding out kas going away under it (a restart, a rolling
//! restart of replicas): a CI job waiting for a synchronization must not fail because kas was
//! briefly not there. Polls that find no kas are retried with a short backoff until
//! `--timeout`; it is said once when kas goes and once when it is back.

use std::time::Duration;

use tether_kas_api::ClientError;
use tokio::time::Instant;

/// The first retry after a poll found no kas: a restarted kas answers within about a second.
const FIRST_RETRY: Duration = Duration::from_millis(300);

/// The longest pause between retries: a rolling restart is seconds, not minutes.
const LONGEST_RETRY: Duration = Duration::from_secs(2);

/// Whether kas is there, since when not, and what is owed once it is back.
#[derive(Debug)]
pub struct Outage {
    /// The wait's `--timeout`, named when kas goes away.
    timeout: Duration,
    since: Option<Instant>,
    failures: u32,
    /// kas was away since the request was made and may have lost it: ask again once back.
    reask: bool,
    /// Why kas last refused to take the request again, said once.
    refusal: Option<String>,
}

impl Outage {
    /// kas answered the request; `--wait` waits up to `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            since: None,
            failures: 0,
            reask: false,
            refusal: None,
        }
    }

    /// A poll found no kas. The line to print the first time (then it is kept quiet).
    pub fn lost(&mut self, e: &ClientError) -> Option<String> {
        self.reask = true;
        self.went(e, "still waiting for the agent's report")
    }

    /// The reconcile request found no kas: it is asked again. The line to print the first
    /// time.
    pub fn lost_asking(&mut self, e: &ClientError) -> Option<String> {
        self.went(e, "asking again")
    }

    fn went(&mut self, e: &ClientError, doing: &str) -> Option<String> {
        self.failures = self.failures.saturating_add(1);
        if self.since.is_some() {
            return None;
        }
        self.since = Some(Instant::now());
        Some(format!(
            "kas is unreachable ({}); {doing} (until the --timeout of {})",
            chain(e),
            humantime::format_duration(self.timeout)
        ))
    }

    /// A poll was answered. The line to print when kas had been away.
    pub fn answered(&mut self) -> Option<String> {
        let since = self.since.take()?;
        self.failures = 0;
        Some(format!(
            "kas answers again (unreachable for {:.1}s); still waiting",
            since.elapsed().as_secs_f64()
        ))
    }

    /// Whether the last poll found no kas.
    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }

    /// How long kas has been away, if it is.
    pub fn down_for(&self) -> Option<Duration> {
        self.since.map(|s| s.elapsed())
    }

    /// How long to wait before the next poll: `normal` while kas answers, else a backoff from
    /// [`FIRST_RETRY`] doubling up to [`LONGEST_RETRY`].
    pub fn delay(&self, normal: Duration) -> Duration {
        if self.since.is_none() {
            return normal;
        }
        let doublings = self.failures.saturating_sub(1).min(8);
        FIRST_RETRY
            .saturating_mul(1 << doublings)
            .min(LONGEST_RETRY)
    }

    /// Whether kas is back after an outage and the request should be made again.
    pub fn reask_due(&self) -> bool {
        self.reask && self.since.is_none()
    }

    /// The request was made again and heard by every pending project's stream.
    pub fn reasked(&mut self) {
        self.reask = false;
    }

    /// kas refused to take the request again (it is asked again at the next poll). The line to
    /// print when the reason is new.
    pub fn refused(&mut self, why: &str) -> Option<String> {
        if self.refusal.as_deref() == Some(why) {
            return None;
        }
        self.refusal = Some(why.to_owned());
        Some(format!(
            "kas does not take the request again yet ({why}); asking again at the next poll"
        ))
    }
}

/// An error and its causes on one line ("calling kas at …: client error (Connect): …").
fn chain(e: &ClientError) -> String {
    let mut line = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> ClientError {
        ClientError::Status {
            status: http::StatusCode::SERVICE_UNAVAILABLE,
            message: "no replica".into(),
        }
    }

    #[test]
    fn an_outage_is_said_once_when_it_starts_and_once_when_it_ends() {
        let mut o = Outage::new(Duration::from_secs(300));
        assert_eq!(o.answered(), None, "nothing to say while kas answers");
        let first = o.lost(&unreachable());
        assert_eq!(
            first.as_deref(),
            Some(
                "kas is unreachable (kas answered 503 Service Unavailable: no replica); still waiting for the agent's report (until the --timeout of 5m)"
            )
        );
        assert_eq!(o.lost(&unreachable()), None);
        assert!(o.is_down() && !o.reask_due());
        let back = o.answered();
        assert!(
            back.as_deref()
                .is_some_and(|l| l.starts_with("kas answers again (unreachable for ")),
            "{back:?}"
        );
        assert!(!o.is_down() && o.reask_due());
        let why = "agent 1 has no configuration in force yet (has it connected?)";
        assert!(o.refused(why).is_some_and(|l| l.contains(why)));
        assert_eq!(o.refused(why), None, "said once");
        o.reasked();
        assert!(!o.reask_due());
    }

    #[test]
    fn retries_back_off_from_a_short_pause_to_a_bounded_one() {
        let mut o = Outage::new(Duration::from_secs(60));
        let normal = Duration::from_millis(300);
        assert_eq!(o.delay(normal), normal);
        let delays: Vec<Duration> = (0..6)
            .map(|_| {
                o.lost(&unreachable());
                o.delay(normal)
            })
            .collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [300, 600, 1200, 2000, 2000, 2000]);
        o.answered();
        assert_eq!(o.delay(normal), normal);
    }
}
