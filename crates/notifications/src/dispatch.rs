//! The sending side: claims due messages from the outbox, POSTs them, and records the outcome
//! (delivered, retried later with backoff, or given up), so a kas restart or a receiver that is
//! down loses nothing and sends nothing twice. It also deletes finished messages once they are
//! older than the retention, so the outbox does not keep every message ever sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tether_store::{NotificationResult, PendingNotification};
use tether_transport::Outage;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::Message;
use crate::notifier::Shared;
use crate::render::{Request, request};

pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Messages claimed per round (few: a message claimed by a replica that dies waits for its
/// claim to expire).
const BATCH: i64 = 4;
/// Longest wait between two sends of one message.
const MAX_BACKOFF: i64 = 300;

/// How far ahead of now the outbox ever stores a retry time or a claim (`lease`), with a
/// minute's margin: a time further ahead was written by a clock that has since stepped back,
/// and the store takes it as passed. A `sync_failed` queued while kas's clock ran a day ahead
/// waited that day after NTP stepped it back, then reached its receiver after the
/// `sync_recovered` queued since (E14).
fn horizon(lease: i64) -> i64 {
    lease.max(MAX_BACKOFF) + 60
}
/// Finished messages deleted per statement: each delete is one short write, so sends and
/// other writers (which take turns with it) wait little behind a large backlog.
const CLEANUP_BATCH: i64 = 1000;
/// How often finished messages past the retention are looked for, and how long after a
/// failed cleanup it is tried again.
const CLEANUP_PERIOD: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Runs until stopped; see the module documentation.
pub struct Dispatcher {
    pub(crate) shared: Arc<Shared>,
    pub(crate) clients: HashMap<String, HttpClient>,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Duration,
    /// Finished messages older than this are deleted.
    pub(crate) retention: Duration,
    sends: Family<OutcomeLabel, Counter>,
    /// Failures to read or write the outbox: the dispatcher tries every second, so an outage
    /// would log a line a second; it logs its start, once a minute, and its end.
    outbox: Outage,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// How one send went.
enum Sent {
    Ok,
    /// Worth trying again (network error, 5xx, 408, 429).
    Transient(String),
    /// The receiver refused it for good (other 4xx), or it cannot be rendered.
    Permanent(String),
}

impl Dispatcher {
    pub(crate) fn new(
        shared: Arc<Shared>,
        clients: HashMap<String, HttpClient>,
        max_attempts: u32,
        timeout: Duration,
        retention: Duration,
    ) -> Self {
        Self {
            shared,
            clients,
            max_attempts,
            timeout,
            retention,
            sends: Family::default(),
            outbox: Outage::new(Duration::from_secs(60)),
        }
    }

    /// Registers `notifications_total{outcome}` (delivered, failed, given_up, dropped) and
    /// `notifications_lost_total`.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "notifications",
            "Notification sends, by outcome (delivered, failed and retried, given_up, dropped: a newer status of the commit replaced it)",
            self.sends.clone(),
        );
        reg.register(
            "notifications_lost",
            "Notifications of a commit sent or refused, or a configuration refused, lost before the outbox: the records they need unreadable, or the outbox refusing them (logged at error; a sync report's are stored with it, never lost)",
            self.shared.lost.clone(),
        );
    }

    /// Each round cleans up (when due) and sends what is due. Every round does some work
    /// before it looks at `stop`, so a run with `stop` already cancelled is exactly one round.
    pub async fn run(mut self, stop: CancellationToken) {
        let lease = i64::try_from(self.timeout.as_secs()).unwrap_or(60) * 2 + 5;
        // At start: a backlog (the first start of a kas that never deleted) goes at once.
        let mut next_cleanup = Instant::now();
        loop {
            let mut more = false;
            if Instant::now() >= next_cleanup {
                let wait = self.clean_up().await;
                more = wait.is_zero();
                next_cleanup = Instant::now() + wait;
            }
            more |= self.send_due(lease).await;
            if more && !stop.is_cancelled() {
                continue;
            }
            // Retries fall due and other replicas queue messages: look again every second.
            tokio::select! {
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Sends one batch of due messages; true when the batch was full (more may be due).
    async fn send_due(&mut self, lease: i64) -> bool {
        let dropped = self.drop_replaced(horizon(lease)).await;
        let horizon = horizon(lease);
        let claimed = match self
            .shared
            .store
            .claim_notifications(BATCH, lease, horizon)
            .await
        {
            Ok(c) => {
                if dropped {
                    self.outbox
                        .info_recovered("The notification outbox answers again");
                }
                c
            }
            Err(e) => {
                self.outbox
                    .warn_failed("Cannot read the notification outbox; retrying", &e);
                Vec::new()
            }
        };
        let full = i64::try_from(claimed.len()).unwrap_or(0) == BATCH;
        for n in claimed {
            self.deliver(n).await;
        }
        full
    }

    /// Ends the messages a newer one of their ordering key replaces (a commit's `pending`
    /// waiting for a retry when its `success` is queued): sent later, they would be the
    /// commit's last status on the forge. The claim never takes them anyway; a failure only
    /// leaves them in the outbox until the next round. Whether the store answered.
    async fn drop_replaced(&mut self, horizon: i64) -> bool {
        match self.shared.store.drop_replaced_notifications(horizon).await {
            Ok(0) => true,
            Ok(n) => {
                tracing::info!(
                    dropped = n,
                    "Dropped notifications a newer status of their commit replaces"
                );
                let dropped = self
                    .sends
                    .get_or_create(&OutcomeLabel { outcome: "dropped" });
                dropped.inc_by(n);
                true
            }
            Err(e) => {
                self.outbox
                    .warn_failed("Cannot drop replaced notifications; trying again later", &e);
                false
            }
        }
    }

    /// Deletes one batch of finished messages older than the retention; how long until the
    /// next batch. A failure is not fatal: the outbox only grows until the next period.
    async fn clean_up(&self) -> Duration {
        let before = cleanup_cutoff(unix_now(), self.retention);
        let store = &self.shared.store;
        let deleted = match store
            .delete_finished_notifications(before, CLEANUP_BATCH)
            .await
        {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(deleted = n, before, "Deleted finished notifications");
                }
                Some(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot delete finished notifications; trying again later");
                None
            }
        };
        cleanup_wait(deleted)
    }

    async fn deliver(&self, n: PendingNotification) {
        let sent = self.send(&n).await;
        let attempt = n.attempts + 1;
        let result = match sent {
            Sent::Ok => {
                tracing::info!(receiver = %n.receiver, key = %n.dedup_key, attempt, "Notification delivered");
                NotificationResult::Delivered
            }
            Sent::Transient(error) if attempt < i64::from(self.max_attempts) => {
                tracing::warn!(receiver = %n.receiver, key = %n.dedup_key, attempt, error, "Sending a notification failed; retrying");
                let at = unix_now() + (1_i64 << attempt.min(9)).min(MAX_BACKOFF);
                NotificationResult::Retry { at, error }
            }
            Sent::Transient(error) | Sent::Permanent(error) => {
                tracing::error!(receiver = %n.receiver, key = %n.dedup_key, attempt, error, "Gave up sending a notification");
                NotificationResult::GaveUp { error }
            }
        };
        let outcome = match &result {
            NotificationResult::Delivered => "delivered",
            NotificationResult::Retry { .. } => "failed",
            NotificationResult::GaveUp { .. } => "given_up",
        };
        self.sends.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Err(e) = self.shared.store.finish_notification(n.id, &result).await {
            // The claim expires and the message is sent again: at least once, never lost.
            tracing::warn!(receiver = %n.receiver, key = %n.dedup_key, error = %e, "Cannot record a notification's outcome; it may be sent again");
        }
    }

    async fn send(&self, n: &PendingNotification) -> Sent {
        let Some(receiver) = self.shared.receivers.iter().find(|r| r.name == n.receiver) else {
            return Sent::Permanent(format!("receiver {} is no longer configured", n.receiver));
        };
        let message: Message = match serde_json::from_slice(&n.payload) {
            Ok(m) => m,
            Err(e) => return Sent::Permanent(format!("unreadable message: {e}")),
        };
        let req = match request(receiver, &message, &n.dedup_key) {
            Ok(r) => r,
            Err(e) => return Sent::Permanent(e.to_string()),
        };
        let Some(client) = self.clients.get(&receiver.name) else {
            return Sent::Permanent(format!("no HTTP client for {}", receiver.name));
        };
        match tokio::time::timeout(self.timeout, post(client, req)).await {
            Ok(sent) => sent,
            Err(_) => Sent::Transient(format!("no answer within {:?}", self.timeout)),
        }
    }
}

async fn post(client: &HttpClient, req: Request) -> Sent {
    let mut builder = http::Request::post(&req.url);
    for (name, value) in &req.headers {
        builder = builder.header(*name, value);
    }
    let built = match builder.body(Full::new(Bytes::from(req.body))) {
        Ok(r) => r,
        Err(e) => return Sent::Permanent(format!("invalid request: {e}")),
    };
    let resp = match client.request(built).await {
        Ok(r) => r,
        Err(e) => return Sent::Transient(format!("sending: {e}")),
    };
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let said: String = String::from_utf8_lossy(&body).chars().take(200).collect();
    match status.as_u16() {
        200..=299 => Sent::Ok,
        408 | 429 | 500..=599 => Sent::Transient(format!("HTTP {status}: {said}")),
        _ => Sent::Permanent(format!("HTTP {status}: {said}")),
    }
}

/// Messages finished before this (Unix seconds) are past the retention.
fn cleanup_cutoff(now: i64, retention: Duration) -> i64 {
    now.saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX))
}

/// When to clean up again after a batch deleted `deleted` rows (`None`: it failed): at once
/// after a full batch, as a backlog is left; otherwise a period later.
fn cleanup_wait(deleted: Option<u64>) -> Duration {
    match deleted {
        Some(n) if i64::try_from(n).is_ok_and(|n| n >= CLEANUP_BATCH) => Duration::ZERO,
        _ => CLEANUP_PERIOD,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use tether_store::{SqliteStore, Store};

    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn the_cutoff_is_the_retention_before_now() {
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(cleanup_cutoff(1_000_000, week), 1_000_000 - 7 * DAY);
        assert_eq!(cleanup_cutoff(0, Duration::MAX), -i64::MAX, "saturates");
    }

    #[test]
    fn a_full_batch_cleans_again_at_once_anything_else_a_period_later() {
        assert_eq!(cleanup_wait(Some(1000)), Duration::ZERO);
        assert_eq!(cleanup_wait(Some(999)), CLEANUP_PERIOD);
        assert_eq!(cleanup_wait(Some(0)), CLEANUP_PERIOD);
        assert_eq!(cleanup_wait(None), CLEANUP_PERIOD, "a failure waits too");
    }

    fn dispatcher(store: Arc<dyn Store>) -> Dispatcher {
        let shared = Arc::new(Shared {
            store,
            receivers: Vec::new(),
            wake: tokio::sync::Notify::new(),
            lost: Default::default(),
        });
        let (timeout, week) = (Duration::from_secs(10), Duration::from_secs(7 * 86_400));
        Dispatcher::new(shared, HashMap::new(), 10, timeout, week)
    }

    /// Moves a message's creation and finish back by `secs`, as if it had happened then (the
    /// store stamps them with its own clock).
    async fn backdate(db: &Path, key: &str, secs: i64) {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let sql = "UPDATE notifications SET created_at = created_at - $1, \
                   done_at = done_at - $1 WHERE dedup_key = $2";
        let query = sqlx::query(sql).bind(secs).bind(key);
        assert_eq!(query.execute(&pool).await.unwrap().rows_affected(), 1);
        pool.close().await;
    }

    async fn keys(db: &Path) -> Vec<String> {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let sql = "SELECT dedup_key FROM notifications ORDER BY id";
        let keys = sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        keys
    }

    /// The dispatcher's loop deletes what is finished and older than the retention (a week
    /// here), and leaves a recent delivery and messages still to send, however old.
    #[tokio::test]
    async fn a_round_deletes_finished_messages_past_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kas.db");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.unwrap());
        for key in ["old", "recent", "retrying", "claimed"] {
            store
                .enqueue_notification("ops", key, None, b"{}")
                .await
                .unwrap();
        }
        let claimed = store.claim_notifications(10, 60, 600).await.unwrap();
        let (delivered, retry) = (
            NotificationResult::Delivered,
            NotificationResult::Retry {
                at: unix_now() + 300,
                error: "503".into(),
            },
        );
        store
            .finish_notification(claimed[0].id, &delivered)
            .await
            .unwrap();
        store
            .finish_notification(claimed[1].id, &delivered)
            .await
            .unwrap();
        store
            .finish_notification(claimed[2].id, &retry)
            .await
            .unwrap();
        for key in ["old", "retrying", "claimed"] {
            backdate(&db, key, 8 * DAY).await;
        }

        // Already stopped: exactly one round.
        let stop = CancellationToken::new();
        stop.cancel();
        dispatcher(Arc::clone(&store)).run(stop).await;
        assert_eq!(keys(&db).await, ["recent", "retrying", "claimed"]);
    }

    /// A cleanup the store refuses is logged and tried again a period later; the dispatcher
    /// goes on.
    #[tokio::test]
    async fn a_failed_cleanup_is_tried_again_a_period_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kas.db")).await.unwrap();
        store.close().await;
        let dispatcher = dispatcher(Arc::new(store));
        assert_eq!(dispatcher.clean_up().await, CLEANUP_PERIOD);
        let stop = CancellationToken::new();
        stop.cancel();
        dispatcher.run(stop).await;
    }
}
