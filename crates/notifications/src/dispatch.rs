//! The sending side: claims due messages from the outbox, POSTs them, and records the outcome
//! (delivered, retried later with backoff, or given up), so a kas restart or a receiver that is
//! down loses nothing and sends nothing twice.

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
    sends: Family<OutcomeLabel, Counter>,
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
    ) -> Self {
        Self {
            shared,
            clients,
            max_attempts,
            timeout,
            sends: Family::default(),
        }
    }

    /// Registers `notifications_total{outcome}` (delivered, failed, given_up).
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "notifications",
            "Notification sends, by outcome (delivered, failed and retried, given_up)",
            self.sends.clone(),
        );
    }

    pub async fn run(self, stop: CancellationToken) {
        let lease = i64::try_from(self.timeout.as_secs()).unwrap_or(60) * 2 + 5;
        loop {
            let claimed = match self.shared.store.claim_notifications(BATCH, lease).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the notification outbox; retrying");
                    Vec::new()
                }
            };
            let full = i64::try_from(claimed.len()).unwrap_or(0) == BATCH;
            for n in claimed {
                self.deliver(n).await;
            }
            if full {
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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}
