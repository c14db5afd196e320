//! Live proxied requests per caller and agent, bounded.
//!
//! An agent's tunnels are shared by every CI job and person allowed to use it (agentk keeps
//! 500 streams by default). Without a bound, one job or one personal access token opening
//! hundreds of watches takes them all, and every other project's requests wait for a tunnel
//! and fail with 503. Each caller may hold at most `kubernetes_api.max_requests_per_caller`
//! live requests through one agent; over it, the request is refused with 429 at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Who holds a request's slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// A CI job, by its issuer and job id (one job's token, whatever copies of it run).
    CiJob { issuer: String, job_id: i64 },
    /// A personal access token, by its id.
    Token(i64),
}

/// The live requests of every caller, per agent.
#[derive(Debug)]
pub struct CallerSlots {
    max: usize,
    live: Mutex<HashMap<(i64, CallerKey), usize>>,
}

/// One live request's slot, given back when dropped (the response and any upgrade are done).
#[derive(Debug)]
pub struct CallerSlot {
    owner: Arc<CallerSlots>,
    key: (i64, CallerKey),
}

impl CallerSlots {
    /// At most `max` live requests per caller and agent.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The most live requests one caller may hold through one agent.
    pub fn max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(i64, CallerKey), usize>> {
        // Every update is one insert or remove: consistent across a panic.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for `caller`'s request through `agent_id`; `None` when it holds `max` already.
    pub fn take(self: &Arc<Self>, agent_id: i64, caller: CallerKey) -> Option<CallerSlot> {
        let key = (agent_id, caller);
        let mut live = self.lock();
        let held = live.entry(key.clone()).or_default();
        if *held >= self.max {
            return None;
        }
        *held += 1;
        Some(CallerSlot {
            owner: Arc::clone(self),
            key,
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut live = self.owner.lock();
        if let Some(held) = live.get_mut(&self.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                live.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_holds_at_most_max_per_agent_and_gets_them_back() {
        let slots = Arc::new(CallerSlots::new(2));
        let job = || CallerKey::CiJob {
            issuer: "https://gitlab.example".into(),
            job_id: 7,
        };
        let a = slots.take(1, job()).unwrap();
        let _b = slots.take(1, job()).unwrap();
        assert!(slots.take(1, job()).is_none(), "a third request");
        // Another caller, or the same one through another agent, is not held back.
        assert!(slots.take(1, CallerKey::Token(7)).is_some());
        assert!(slots.take(2, job()).is_some());
        drop(a);
        assert!(slots.take(1, job()).is_some(), "a slot given back");
    }

    #[test]
    fn finished_requests_are_forgotten() {
        let slots = Arc::new(CallerSlots::new(1));
        drop(slots.take(1, CallerKey::Token(1)).unwrap());
        assert!(slots.lock().is_empty());
    }
}
