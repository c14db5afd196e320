//! Each agent's share of the renderers: one agent (a stream asking for renderings that run
//! into their time limit, many previews with different values) holds at most a few of kas's
//! turns, so the other agents' renderings still run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The agents' turns: at most `per_agent` renderings of one agent at once.
#[derive(Debug)]
pub struct AgentTurns {
    per_agent: usize,
    agents: Arc<Mutex<HashMap<i64, Arc<Semaphore>>>>,
}

/// One of an agent's turns, given back when dropped.
#[derive(Debug)]
pub struct AgentTurn {
    permit: Option<OwnedSemaphorePermit>,
    agent_id: i64,
    agents: Arc<Mutex<HashMap<i64, Arc<Semaphore>>>>,
}

impl AgentTurns {
    /// At most `per_agent` (at least one) renderings per agent at once.
    pub fn new(per_agent: usize) -> Self {
        Self {
            per_agent: per_agent.max(1),
            agents: Arc::default(),
        }
    }

    /// Waits for one of `agent_id`'s turns.
    pub async fn acquire(&self, agent_id: i64) -> AgentTurn {
        let semaphore = {
            let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                agents
                    .entry(agent_id)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_agent))),
            )
        };
        // The semaphore is never closed, so acquiring only ends with a permit.
        let permit = semaphore.acquire_owned().await.ok();
        AgentTurn {
            permit,
            agent_id,
            agents: Arc::clone(&self.agents),
        }
    }

    /// How many agents have a rendering running or waiting.
    #[cfg(test)]
    pub fn agents(&self) -> usize {
        self.agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for AgentTurn {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map holds it now: no rendering of this agent runs or waits, so its entry
        // goes (the map stays as small as the agents rendering at the moment).
        if agents
            .get(&self.agent_id)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            agents.remove(&self.agent_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_agent_holds_at_most_its_share_and_others_are_not_kept_waiting() {
        let turns = AgentTurns::new(2);
        let a1 = turns.acquire(1).await;
        let a2 = turns.acquire(1).await;
        let third = turns.acquire(1);
        tokio::pin!(third);
        assert!(
            futures_util::FutureExt::now_or_never(third.as_mut()).is_none(),
            "a third turn of agent 1 waits"
        );
        // Agent 2 is not behind agent 1.
        let b = turns.acquire(2).await;
        assert_eq!(turns.agents(), 2);
        drop(a1);
        let a3 = third.await;
        drop((a2, a3, b));
        assert_eq!(turns.agents(), 0, "entries go with the last turn");
    }
}
