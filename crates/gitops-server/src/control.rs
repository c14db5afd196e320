//! kas's directives to the GitOps streams of agents, beyond new commits: "re-sync now"
//! (`kas agent reconcile`) and "your suspension changed" (`kas agent suspend|resume`).
//!
//! One watch channel per (agent, manifest project): the admin API bumps it, every stream of
//! that pair wakes and acts on the newest value. A watch keeps only the newest value, which is
//! what both directives need: re-sync ids only grow, and a suspension is re-read from the store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tether_store::{Suspension, SuspensionScope};
use tokio::sync::watch;

/// A `kas agent reconcile` request; reports answering it carry it (`SyncReport.resync_id`).
/// Ids grow, also across kas restarts (they start from the clock), so "a report answers this
/// request" is `report.resync_id >= id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ResyncId(pub u64);

/// The newest directives for one (agent, project).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// The newest re-sync asked for (`ResyncId(0)`: none yet).
    pub resync: ResyncId,
    /// Bumped whenever the agent's suspensions change: re-read them.
    pub suspensions: u64,
}

/// The next re-sync id (pure): the clock (`now`, ms), unless it is not past the last id given
/// or the highest one answered.
fn next_id(now: u64, last: u64, answered: u64) -> u64 {
    now.max(last.saturating_add(1))
        .max(answered.saturating_add(1))
}

/// The directives of every (agent, project) streams are open for, or were asked about.
#[derive(Debug, Default)]
pub struct Controls {
    channels: Mutex<HashMap<(i64, i64), watch::Sender<Directives>>>,
    last_resync: AtomicU64,
}

impl Controls {
    fn sender(&self, agent_id: i64, project_id: i64) -> watch::Sender<Directives> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        channels
            .entry((agent_id, project_id))
            .or_insert_with(|| watch::channel(Directives::default()).0)
            .clone()
    }

    /// What a stream of `project_id` for `agent_id` listens to.
    pub fn subscribe(&self, agent_id: i64, project_id: i64) -> watch::Receiver<Directives> {
        self.sender(agent_id, project_id).subscribe()
    }

    /// A new re-sync id, greater than any given before (milliseconds since the epoch, or the
    /// last id plus one).
    pub fn next_resync_id(&self) -> ResyncId {
        self.next_resync_id_after(ResyncId(0))
    }

    /// A new re-sync id, greater than any given before and than `answered` (the highest id
    /// the agent's stored reports carry): after the clock stepped back and kas restarted, an
    /// id from the clock alone would be one the agent already answered, which it ignores, and
    /// whose old report `kas agent reconcile --wait` would take for the answer.
    pub fn next_resync_id_after(&self, answered: ResyncId) -> ResyncId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let previous = self
            .last_resync
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(next_id(now, last, answered.0))
            })
            .unwrap_or_else(|last| last);
        ResyncId(next_id(now, previous, answered.0))
    }

    /// Asks the open streams of (agent, project) to re-sync with `id`; how many streams heard
    /// it (0: the agent has no stream open for the project, it is offline or not leading).
    pub fn resync(&self, agent_id: i64, project_id: i64, id: ResyncId) -> usize {
        let sender = self.sender(agent_id, project_id);
        sender.send_modify(|d| d.resync = d.resync.max(id));
        sender.receiver_count()
    }

    /// How many streams of (agent, project) are open here (0: none, or never asked about).
    pub fn streams(&self, agent_id: i64, project_id: i64) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(agent_id, project_id))
            .map_or(0, watch::Sender::receiver_count)
    }

    /// Tells every stream of the agent that its suspensions changed.
    pub fn suspensions_changed(&self, agent_id: i64) {
        let channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((agent, _), sender) in channels.iter() {
            if *agent == agent_id {
                sender.send_modify(|d| d.suspensions = d.suspensions.wrapping_add(1));
            }
        }
    }

    /// The agents with directive channels here, for finding deleted ones among them.
    pub fn agent_ids(&self) -> Vec<i64> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .map(|(agent, _)| *agent)
            .collect()
    }

    /// Forgets a deleted agent's channels (its streams were ended with its tokens).
    pub fn forget(&self, agent_id: i64) {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(agent, _), _| *agent != agent_id);
    }
}

/// The suspension in force for `project_id` among an agent's suspensions: the project's own,
/// else the agent-wide one.
pub fn suspension_for(suspensions: &[Suspension], project_id: i64) -> Option<&Suspension> {
    suspensions
        .iter()
        .find(|s| s.scope == SuspensionScope::Project(project_id))
        .or_else(|| {
            suspensions
                .iter()
                .find(|s| s.scope == SuspensionScope::Agent)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suspension(scope: SuspensionScope, reason: &str) -> Suspension {
        Suspension {
            agent_id: 1,
            scope,
            reason: reason.into(),
            suspended_by: "admin".into(),
            suspended_at: 0,
        }
    }

    #[test]
    fn a_project_suspension_wins_over_the_agent_wide_one_which_covers_the_rest() {
        let all = [
            suspension(SuspensionScope::Agent, "freeze"),
            suspension(SuspensionScope::Project(7), "incident"),
        ];
        assert_eq!(
            suspension_for(&all, 7).map(|s| &*s.reason),
            Some("incident")
        );
        assert_eq!(suspension_for(&all, 8).map(|s| &*s.reason), Some("freeze"));
        assert_eq!(suspension_for(&all[1..], 8), None);
    }

    #[test]
    fn a_resync_id_passes_the_highest_answered_even_with_the_clock_behind() {
        assert_eq!(next_id(1_000, 0, 0), 1_000, "the clock");
        assert_eq!(next_id(1_000, 1_500, 0), 1_501, "past the last given here");
        assert_eq!(
            next_id(1_000, 0, 2_000),
            2_001,
            "a restarted kas whose clock stepped back"
        );
        let c = Controls::default();
        let far = ResyncId(u64::MAX / 2);
        assert!(c.next_resync_id_after(far) > far);
        assert!(c.next_resync_id() > far, "and after it, here");
    }

    #[test]
    fn resync_ids_grow_and_reach_only_streams_of_their_project() {
        let c = Controls::default();
        let a = c.next_resync_id();
        let b = c.next_resync_id();
        assert!(b > a, "{a:?} {b:?}");
        let mut mine = c.subscribe(1, 7);
        let other = c.subscribe(1, 8);
        assert_eq!(c.resync(1, 7, b), 1);
        assert_eq!(c.resync(2, 7, b), 0, "nobody listens for agent 2");
        // An older id never replaces a newer one.
        c.resync(1, 7, a);
        assert_eq!(mine.borrow_and_update().resync, b);
        assert!(!other.has_changed().unwrap_or(true));
        c.suspensions_changed(1);
        assert!(mine.has_changed().unwrap_or(false));
        assert!(other.has_changed().unwrap_or(false));
    }
}
