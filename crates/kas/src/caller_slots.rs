//! Live proxied requests per caller, per CI project and per agent, bounded.
//!
//! An agent's tunnels are shared by every CI job and person allowed to use it (agentk keeps
//! 500 streams by default). Without a bound, one job or one personal access token opening
//! hundreds of watches takes them all, and every other project's requests wait for a tunnel
//! and fail with 503. Each caller may hold at most `kubernetes_api.max_requests_per_caller`
//! live requests through one agent, and the CI jobs of one project together at most
//! `kubernetes_api.max_requests_per_project` (two jobs of a pipeline at their own cap took the
//! whole pool). A person is one caller whatever number of personal access tokens they use, and
//! the people of an agent together count as one project (four people at their own cap took
//! the whole pool); over any cap, the request is refused with 429 at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Who holds a request's slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// A CI job, by its issuer and job id (one job's token, whatever copies of it run), and
    /// its project's path (lowercase), which its jobs share.
    CiJob {
        issuer: String,
        job_id: i64,
        project: String,
    },
    /// A person (personal access tokens), by username: their tokens share one cap.
    Person(String),
}

/// What a slot counts against, per agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Held {
    Caller(CallerKey),
    /// Every job of a CI project (by issuer and project path).
    Project {
        issuer: String,
        project: String,
    },
    /// Every person using the agent with a personal access token.
    People,
}

impl CallerKey {
    /// The caller and, for a CI job, its project.
    fn held(&self) -> Vec<Held> {
        let group = match self {
            CallerKey::CiJob {
                issuer, project, ..
            } => Held::Project {
                issuer: issuer.clone(),
                project: project.clone(),
            },
            CallerKey::Person(_) => Held::People,
        };
        vec![Held::Caller(self.clone()), group]
    }
}

impl std::fmt::Display for CallerKey {
    /// Who, for the log (never a credential).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallerKey::CiJob {
                job_id, project, ..
            } => write!(f, "CI job {job_id} of {project}"),
            CallerKey::Person(user) => write!(f, "{user} (personal access tokens)"),
        }
    }
}

/// Which cap a refused request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `max_requests_per_caller`, with its value.
    Caller(usize),
    /// `max_requests_per_project`, with its value.
    Project(usize),
    /// `max_requests_per_project` for the people of the agent together, with its value.
    People(usize),
}

impl Over {
    /// The cap's value.
    pub fn max(self) -> usize {
        match self {
            Over::Caller(n) | Over::Project(n) | Over::People(n) => n,
        }
    }

    /// Which cap, as a metric label and a log key.
    pub fn name(self) -> &'static str {
        match self {
            Over::Caller(_) => "caller",
            Over::Project(_) => "project",
            Over::People(_) => "people",
        }
    }
}

/// The live requests of every caller and CI project, per agent.
#[derive(Debug)]
pub struct CallerSlots {
    per_caller: usize,
    per_project: usize,
    live: Mutex<HashMap<(i64, Held), usize>>,
    /// One log line per cap and interval: a caller retrying in a loop refused thousands of
    /// requests a second, each logged.
    refusals: tether_transport::LogThrottle,
}

/// One live request's slot, given back when dropped (the response and any upgrade are done).
#[derive(Debug)]
pub struct CallerSlot {
    owner: Arc<CallerSlots>,
    keys: Vec<(i64, Held)>,
}

impl CallerSlots {
    /// At most `per_caller` live requests per caller and agent, and `per_project` per CI
    /// project and agent.
    pub fn new(per_caller: usize, per_project: usize) -> Self {
        Self {
            per_caller,
            per_project,
            live: Mutex::new(HashMap::new()),
            refusals: tether_transport::LogThrottle::new(crate::listener::LOG_INTERVAL),
        }
    }

    /// Whether a refusal over `over` is logged now: `Some(n)` with the refusals not logged
    /// since the last line of that cap.
    pub fn log_refusal(&self, over: Over) -> Option<u64> {
        self.refusals.admit(over.name(), std::time::Instant::now())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(i64, Held), usize>> {
        // Every update is one insert or remove: consistent across a panic.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cap(&self, held: &Held) -> Over {
        match held {
            Held::Caller(_) => Over::Caller(self.per_caller),
            Held::Project { .. } => Over::Project(self.per_project),
            Held::People => Over::People(self.per_project),
        }
    }

    /// A slot for `caller`'s request through `agent_id`, or the cap it would go over.
    pub fn take(self: &Arc<Self>, agent_id: i64, caller: CallerKey) -> Result<CallerSlot, Over> {
        let keys: Vec<(i64, Held)> = caller.held().into_iter().map(|h| (agent_id, h)).collect();
        let mut live = self.lock();
        for (_, held) in &keys {
            let cap = self.cap(held);
            if live.get(&(agent_id, held.clone())).copied().unwrap_or(0) >= cap.max() {
                return Err(cap);
            }
        }
        for key in &keys {
            *live.entry(key.clone()).or_default() += 1;
        }
        Ok(CallerSlot {
            owner: Arc::clone(self),
            keys,
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut live = self.owner.lock();
        for key in &self.keys {
            if let Some(held) = live.get_mut(key) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    live.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(id: i64, project: &str) -> CallerKey {
        CallerKey::CiJob {
            issuer: "https://gitlab.example".into(),
            job_id: id,
            project: project.into(),
        }
    }

    #[test]
    fn a_caller_holds_at_most_max_per_agent_and_gets_them_back() {
        let slots = Arc::new(CallerSlots::new(2, 10));
        let a = slots.take(1, job(7, "g/app")).unwrap();
        let _b = slots.take(1, job(7, "g/app")).unwrap();
        assert_eq!(
            slots.take(1, job(7, "g/app")).unwrap_err(),
            Over::Caller(2),
            "a third request"
        );
        // Another caller, or the same one through another agent, is not held back.
        assert!(slots.take(1, person("alice")).is_ok());
        assert!(slots.take(2, job(7, "g/app")).is_ok());
        drop(a);
        assert!(slots.take(1, job(7, "g/app")).is_ok(), "a slot given back");
    }

    /// Two jobs of one project each within their own cap still share their project's: the
    /// second gets 429 where their sum would take every tunnel of the agent.
    #[test]
    fn the_jobs_of_one_project_share_its_cap() {
        let slots = Arc::new(CallerSlots::new(2, 3));
        let _a1 = slots.take(1, job(1, "g/app")).unwrap();
        let _a2 = slots.take(1, job(1, "g/app")).unwrap();
        let b1 = slots.take(1, job(2, "g/app")).unwrap();
        assert_eq!(
            slots.take(1, job(2, "g/app")).unwrap_err(),
            Over::Project(3)
        );
        // Another project is not held back; a refused request took nothing.
        assert!(slots.take(1, job(3, "g/other")).is_ok());
        drop(b1);
        assert!(
            slots.take(1, job(2, "g/app")).is_ok(),
            "the project's slot back"
        );
    }

    fn person(user: &str) -> CallerKey {
        CallerKey::Person(user.into())
    }

    /// A person is one caller whatever tokens they use, and the people of an agent together
    /// share one project's cap: four people at their own cap took every tunnel of the agent.
    #[test]
    fn people_share_one_cap_per_person_and_one_for_all_of_them() {
        let slots = Arc::new(CallerSlots::new(2, 3));
        let _a1 = slots.take(1, person("alice")).unwrap();
        let _a2 = slots.take(1, person("alice")).unwrap();
        assert_eq!(
            slots.take(1, person("alice")).unwrap_err(),
            Over::Caller(2),
            "another token of alice's is still alice"
        );
        let b1 = slots.take(1, person("bob")).unwrap();
        assert_eq!(slots.take(1, person("carol")).unwrap_err(), Over::People(3));
        assert!(
            slots.take(1, job(1, "g/app")).is_ok(),
            "CI jobs are not people"
        );
        assert!(slots.take(2, person("carol")).is_ok(), "another agent");
        drop(b1);
        assert!(slots.take(1, person("carol")).is_ok());
        assert_eq!(
            format!("{}", person("carol")),
            "carol (personal access tokens)"
        );
        assert_eq!(format!("{}", job(9, "g/app")), "CI job 9 of g/app");
    }

    #[test]
    fn finished_requests_are_forgotten() {
        let slots = Arc::new(CallerSlots::new(1, 1));
        drop(slots.take(1, person("alice")).unwrap());
        drop(slots.take(1, job(1, "g/app")).unwrap());
        assert!(slots.lock().is_empty());
    }
}
