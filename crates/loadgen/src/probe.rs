//! kas's liveness endpoint probed the way a kubelet probes it, while the fleet reconnects: a
//! kas that cannot answer its probe within the kubelet's default 1 s during a reconnect storm
//! gets restarted by Kubernetes, which starts the storm again.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The kubelet's default probe timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often to probe (kubelets probe every 10–20 s; denser here to see the worst moment).
const EVERY: Duration = Duration::from_millis(100);
/// A probe still unanswered after this is recorded as failed.
const GIVE_UP: Duration = Duration::from_secs(5);

/// What the probes saw.
#[derive(Debug, Default, Clone)]
pub struct Probes {
    /// From the start of probing to the first `200` answer.
    pub first_answer: Option<Duration>,
    /// Probes sent after the first answer.
    pub after_up: usize,
    /// Of those, answered `200` within [`PROBE_TIMEOUT`].
    pub in_time: usize,
    /// Slowest answer (or [`GIVE_UP`] for none) after the first answer.
    pub slowest: Duration,
}

impl Probes {
    fn record(&mut self, started: Instant, sent: Instant, answer: Option<Duration>) {
        match (self.first_answer, answer) {
            (None, Some(_)) => self.first_answer = Some(sent.duration_since(started)),
            (None, None) => {}
            (Some(_), a) => {
                let took = a.unwrap_or(GIVE_UP);
                self.after_up += 1;
                if a.is_some() && took <= PROBE_TIMEOUT {
                    self.in_time += 1;
                }
                self.slowest = self.slowest.max(took);
            }
        }
    }
}

/// Probes `GET /liveness` on `127.0.0.1:port` until `stop`; returns what it saw.
pub async fn liveness(port: u16, stop: CancellationToken) -> Probes {
    let started = Instant::now();
    let mut seen = Probes::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return seen,
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(GIVE_UP, get_ok(port, "/liveness"))
            .await
            .ok()
            .and_then(|ok| ok.then(|| sent.elapsed()));
        seen.record(started, sent, answer);
    }
}

/// One HTTP/1.1 GET on a new connection, as a kubelet sends it; true when the answer is 200.
async fn get_ok(port: u16, path: &str) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if conn.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await.is_ok() && head.ends_with(b" 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_before_the_first_answer_are_not_counted_as_failures() {
        let t0 = Instant::now();
        let mut p = Probes::default();
        p.record(t0, t0, None);
        p.record(
            t0,
            t0 + Duration::from_millis(300),
            Some(Duration::from_millis(4)),
        );
        p.record(t0, t0, Some(Duration::from_millis(20)));
        p.record(t0, t0, Some(Duration::from_millis(1500)));
        p.record(t0, t0, None);
        assert_eq!(p.first_answer, Some(Duration::from_millis(300)));
        assert_eq!((p.after_up, p.in_time), (3, 1));
        assert_eq!(p.slowest, GIVE_UP);
    }
}
