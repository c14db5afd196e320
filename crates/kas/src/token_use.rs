//! When each agent token was last in use (`kas token list`'s `LAST USED`): what an operator
//! rotating tokens looks at before revoking the old one.
//!
//! The tokens of connections are noted as agents authenticate and at every token re-check of
//! live streams (`agent.token_recheck_interval`), and written in batches every few seconds: a
//! write per connection would put thousands of writes on the database when a fleet reconnects
//! after a restart. A failed write keeps the tokens for the next one and is said once per
//! outage; it never affects the connections.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tether_store::Store;
use tokio_util::sync::CancellationToken;

/// How often the tokens noted are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Agent tokens seen in use, waiting to be written.
#[derive(Debug)]
pub struct TokenUse {
    store: Arc<dyn Store>,
    pending: Mutex<BTreeSet<i64>>,
}

impl TokenUse {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Mutex::default(),
        }
    }

    /// Notes that these tokens are in use now.
    pub fn note(&self, token_ids: impl IntoIterator<Item = i64>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.extend(token_ids);
    }

    fn take(&self) -> Vec<i64> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *pending).into_iter().collect()
    }

    /// Writes what was noted; on failure keeps it for the next time. Returns whether the
    /// database took it (or there was nothing to write).
    async fn flush(&self) -> Result<(), tether_store::Error> {
        let ids = self.take();
        if ids.is_empty() {
            return Ok(());
        }
        let result = self.store.mark_tokens_used(&ids, unix_now()).await;
        if result.is_err() {
            self.note(ids);
        }
        result
    }

    /// Writes the tokens noted every [`FLUSH_EVERY`] until `stop`, and once more then.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(FLUSH_EVERY) => false,
            };
            match self.flush().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("Recording when agent tokens were last used works again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "Cannot record when agent tokens were last used (kas token list shows older times until the database takes it); retrying every 5 s");
                }
                Err(_) => {}
            }
            if stopping {
                return;
            }
        }
    }
}

fn unix_now() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn noted_tokens_are_written_once_and_kept_when_the_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            tether_store::SqliteStore::open(&dir.path().join("kas.sqlite"))
                .await
                .unwrap(),
        );
        let agent = store.register_agent("group/p", "a").await.unwrap();
        let (token, _) = store.create_token(agent.id, "t").await.unwrap();
        let used = TokenUse::new(Arc::clone(&store));
        used.note([token.id, token.id]);
        used.flush().await.unwrap();
        let listed = store.list_tokens(agent.id).await.unwrap();
        let at = listed[0].last_used_at.expect("written");
        assert!((unix_now() - at).abs() <= 1, "{at}");
        assert!(used.take().is_empty(), "written once");

        // A database that refuses the write: the token waits for the next one.
        store.close().await;
        used.note([token.id]);
        assert!(used.flush().await.is_err());
        assert_eq!(used.take(), [token.id]);
    }
}
