//! Which cluster the agent runs in, as it tells kas on every stream (`metadata::CLUSTER_ID`),
//! followed over time: the id is derived from the Kubernetes API token agentk uses (the
//! ServiceAccount's UID), and a ServiceAccount deleted and created again (a Helm reinstall, a
//! namespace restored from backup) has a new UID. A running agentk that kept the UID it read
//! at start made kas see one cluster as two the moment a new replica started with the new
//! UID: the critical "token installed in two clusters" warning, `kas agent status` exit 6,
//! until the old Pods were gone.
//!
//! A change is announced through the agent token's changes ([`AgentToken::changes`]): every
//! long-lived stream to kas reopens, and carries the new id, exactly as after a token rotation.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::AgentToken;

/// Reads the cluster id now; `None` when it cannot be read (the last good one stays).
type Reader = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The cluster id streams carry; cheap to clone. Empty when unknown.
#[derive(Clone)]
pub struct ClusterId(Arc<Inner>);

struct Inner {
    value: Mutex<String>,
    /// `None`: the id never changes.
    read: Option<Reader>,
    /// Told when the id changes, so streams reopen with it.
    streams: Option<AgentToken>,
}

impl Default for ClusterId {
    fn default() -> Self {
        ClusterId::fixed(String::new())
    }
}

impl std::fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClusterId").field(&self.current()).finish()
    }
}

impl ClusterId {
    /// An id that never changes (no token file to follow, tests, load generators).
    pub fn fixed(id: impl Into<String>) -> Self {
        ClusterId(Arc::new(Inner {
            value: Mutex::new(id.into()),
            read: None,
            streams: None,
        }))
    }

    /// An id `read` gives now and again at each [`ClusterId::refresh`]; a change reopens the
    /// streams that present `streams`.
    pub fn following(
        read: impl Fn() -> Option<String> + Send + Sync + 'static,
        streams: &AgentToken,
    ) -> Self {
        let first = read().unwrap_or_default();
        ClusterId(Arc::new(Inner {
            value: Mutex::new(first),
            read: Some(Box::new(read)),
            streams: Some(streams.clone()),
        }))
    }

    /// The id to send now (the last one read; reading is [`ClusterId::refresh`]'s, so that
    /// opening a stream never reads a file).
    pub fn current(&self) -> String {
        self.0
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the id again; true when it changed (then announced and logged). An id that
    /// cannot be read keeps the last one: a token file being rewritten is not a new cluster.
    pub fn refresh(&self) -> bool {
        let Some(new) = self.0.read.as_ref().and_then(|read| read()) else {
            return false;
        };
        let old = {
            let mut value = self.0.value.lock().unwrap_or_else(PoisonError::into_inner);
            if *value == new {
                return false;
            }
            std::mem::replace(&mut *value, new.clone())
        };
        tracing::info!(
            old_cluster_id = %old,
            cluster_id = %new,
            "The ServiceAccount agentk runs as has a new UID (it was created again): streams to kas reopen to tell it"
        );
        if let Some(streams) = &self.0.streams {
            streams.announce_change();
        }
        true
    }

    /// Reads the id every `every` until `stop`.
    pub async fn follow(&self, every: Duration, stop: CancellationToken) {
        if self.0.read.is_none() {
            return;
        }
        crate::token::repeat(every, &stop, || {
            self.refresh();
        })
        .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_new_id_is_sent_from_then_on_and_reopens_the_streams() {
        let answers = ["uid-1", "", "uid-1", "uid-2"];
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let read = move || {
            let a = answers[c.fetch_add(1, Ordering::SeqCst).min(answers.len() - 1)];
            (!a.is_empty()).then(|| a.to_string())
        };
        let token = AgentToken::fixed("t");
        let id = ClusterId::following(read, &token);
        let changes = token.changes();
        assert_eq!(id.current(), "uid-1");
        assert!(!id.refresh(), "an unreadable id keeps the last one");
        assert_eq!(id.current(), "uid-1");
        assert!(!id.refresh(), "the same id is no change");
        assert!(!changes.has_changed().unwrap(), "nothing announced yet");
        assert!(id.refresh(), "a new UID is a change");
        assert_eq!(id.clone().current(), "uid-2");
        assert!(changes.has_changed().unwrap(), "the streams are told");
    }

    #[test]
    fn a_fixed_id_never_changes() {
        let id = ClusterId::fixed("uid");
        assert!(!id.refresh());
        assert_eq!(id.current(), "uid");
        assert_eq!(ClusterId::default().current(), "");
    }
}
