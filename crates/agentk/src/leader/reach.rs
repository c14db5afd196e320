//! A leader cut from kas hands the lease to a replica that is not.
//!
//! The lease is decided by the API server alone, so a leader whose path to kas broke (its
//! node's egress, a half-open load balancer) kept it for as long as that lasted: no new commit
//! reached the cluster although another replica was connected and idle. Stepping down on its
//! own would stop drift correction whenever kas itself is down (every replica is cut off then),
//! so the lease carries a handshake instead: a leader cut off for longer than the grace marks
//! the lease; a follower connected to kas that sees the mark asks for the lease; the leader,
//! seeing the request, stops leading and hands the lease over; the asking replica takes it.
//! With nobody connected to ask, the leader keeps the lease and goes on correcting drift.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::Step;

/// On the lease: its holder has not reached kas for longer than the grace.
pub const CUT_OFF: &str = "agentk.tether.dev/kas-unreachable";
/// On the lease: the identity of a replica connected to kas that asks for it.
pub const CANDIDATE: &str = "agentk.tether.dev/candidate";

/// This replica's link to kas, as the election sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Connected,
    /// Not connected, for less than the grace: a kas restart or rollout looks so.
    Lost,
    /// Not connected for longer than the grace.
    CutOff,
}

/// Since when kas has been unreachable; how long counts as cut off.
#[derive(Debug)]
pub struct ReachClock {
    grace: Duration,
    lost_since: Option<Instant>,
}

impl ReachClock {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            lost_since: None,
        }
    }

    /// The reach at `now`, given whether the tunnel to kas is connected.
    pub fn observe(&mut self, connected: bool, now: Instant) -> Reach {
        if connected {
            self.lost_since = None;
            return Reach::Connected;
        }
        let since = *self.lost_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.grace {
            Reach::CutOff
        } else {
            Reach::Lost
        }
    }
}

/// A step of the election with the kas link taken into account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adjusted {
    Step(Step),
    /// We hold the lease, are cut off, and a connected replica asks for it: stop leading, then
    /// give the lease up with its request on it.
    HandOver,
    /// Another replica holds the lease and is cut off; we are connected: ask for it.
    AskFor,
}

/// What to do (pure): `step` as [`super::decide`] says, the lease's `annotations`, and whether
/// the lease has changed within its duration (`fresh`: a request on a lease released long
/// ago no longer reserves it — its candidate may be gone).
pub fn adjust(
    step: Step,
    annotations: &BTreeMap<String, String>,
    me: &str,
    reach: Reach,
    fresh: bool,
) -> Adjusted {
    let candidate = annotations.get(CANDIDATE).filter(|c| c.as_str() != me);
    match step {
        Step::Renew if reach == Reach::CutOff && candidate.is_some() => Adjusted::HandOver,
        Step::Follow { .. } if annotations.contains_key(CUT_OFF) && reach == Reach::Connected => {
            if annotations.get(CANDIDATE).is_some_and(|c| c == me) {
                Adjusted::Step(step)
            } else {
                Adjusted::AskFor
            }
        }
        Step::TakeOver if fresh && reach != Reach::Connected => match candidate {
            Some(c) => Adjusted::Step(Step::Follow { holder: c.clone() }),
            None => Adjusted::Step(step),
        },
        _ => Adjusted::Step(step),
    }
}

/// The annotations of a lease this replica holds from now on (pure): no request stands, and
/// the mark says whether it is cut off.
pub fn mark_held(annotations: &mut BTreeMap<String, String>, reach: Reach) {
    annotations.remove(CANDIDATE);
    if reach == Reach::CutOff {
        annotations.insert(CUT_OFF.to_owned(), "true".to_owned());
    } else {
        annotations.remove(CUT_OFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn follow(holder: &str) -> Step {
        Step::Follow {
            holder: holder.into(),
        }
    }

    #[test]
    fn kas_lost_for_the_grace_is_cut_off_and_connected_again_resets_it() {
        let mut clock = ReachClock::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(clock.observe(false, t0), Reach::Lost);
        assert_eq!(
            clock.observe(false, t0 + Duration::from_secs(29)),
            Reach::Lost
        );
        assert_eq!(
            clock.observe(false, t0 + Duration::from_secs(30)),
            Reach::CutOff
        );
        assert_eq!(
            clock.observe(true, t0 + Duration::from_secs(31)),
            Reach::Connected
        );
        assert_eq!(
            clock.observe(false, t0 + Duration::from_secs(32)),
            Reach::Lost
        );
    }

    #[test]
    fn a_cut_off_leader_hands_over_only_when_a_connected_replica_asks() {
        let asked = notes(&[(CUT_OFF, "true"), (CANDIDATE, "b")]);
        let marked = notes(&[(CUT_OFF, "true")]);
        assert_eq!(
            adjust(Step::Renew, &asked, "a", Reach::CutOff, true),
            Adjusted::HandOver
        );
        // Nobody asks (kas is down for every replica): it keeps correcting drift.
        assert_eq!(
            adjust(Step::Renew, &marked, "a", Reach::CutOff, true),
            Adjusted::Step(Step::Renew)
        );
        // Back within the grace (a kas restart): it keeps the lease.
        assert_eq!(
            adjust(Step::Renew, &asked, "a", Reach::Lost, true),
            Adjusted::Step(Step::Renew)
        );
    }

    #[test]
    fn only_a_connected_follower_asks_and_only_once() {
        let marked = notes(&[(CUT_OFF, "true")]);
        assert_eq!(
            adjust(follow("a"), &marked, "b", Reach::Connected, true),
            Adjusted::AskFor
        );
        assert_eq!(
            adjust(follow("a"), &marked, "b", Reach::Lost, true),
            Adjusted::Step(follow("a"))
        );
        let asked = notes(&[(CUT_OFF, "true"), (CANDIDATE, "b")]);
        assert_eq!(
            adjust(follow("a"), &asked, "b", Reach::Connected, true),
            Adjusted::Step(follow("a"))
        );
        // Not cut off: nothing to ask for.
        assert_eq!(
            adjust(follow("a"), &BTreeMap::new(), "b", Reach::Connected, true),
            Adjusted::Step(follow("a"))
        );
    }

    #[test]
    fn a_handed_over_lease_is_left_to_its_candidate_while_fresh() {
        let asked = notes(&[(CANDIDATE, "b")]);
        // The former leader, still cut off, does not take it back.
        assert_eq!(
            adjust(Step::TakeOver, &asked, "a", Reach::CutOff, true),
            Adjusted::Step(follow("b"))
        );
        assert_eq!(
            adjust(Step::TakeOver, &asked, "b", Reach::Connected, true),
            Adjusted::Step(Step::TakeOver)
        );
        // A candidate gone for a lease duration reserves nothing.
        assert_eq!(
            adjust(Step::TakeOver, &asked, "a", Reach::CutOff, false),
            Adjusted::Step(Step::TakeOver)
        );
    }

    #[test]
    fn a_held_lease_carries_the_mark_only_while_cut_off() {
        let mut n = notes(&[(CANDIDATE, "b")]);
        mark_held(&mut n, Reach::CutOff);
        assert_eq!(n, notes(&[(CUT_OFF, "true")]));
        mark_held(&mut n, Reach::Lost);
        assert!(n.is_empty());
    }
}
