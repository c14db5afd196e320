//! Live proxied requests per agent, authorized again whenever the agent's configuration may
//! have changed.
//!
//! The proxy authorizes a request when it arrives; an exec, a port-forward or a watch can then
//! run for hours. An administrator who removes a project from `ci_access` or a group from
//! `user_access` (after a compromise, say) expects its sessions to end, not to run on until
//! `max_connection_age`. Each tracked request keeps who made it and the identity it runs as;
//! [`LiveAccess::recheck`] ends those the configuration no longer allows, or allows only as
//! another identity. Revoked credentials are [`crate::revocation`]'s business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tether_agent_config::AgentConfig;
use tether_configuration_server::ConfigStates;
use tether_kubeproxy_agent::{AccessAs, RequestContext};
use tether_kubeproxy_server::{
    CiIdentity, UserIdentity, authorize_ci, authorize_user, user_context,
};
use tether_store::Store;
use tether_tunnel_server::Registry;
use tokio_util::sync::CancellationToken;

use crate::config_in_force::InForce;

/// Who made a request, as the proxy authorized it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A CI job; `config_project` is the path of the agent's configuration project.
    CiJob {
        config_project: String,
        job: CiIdentity,
    },
    /// A person with a personal access token.
    Person(UserIdentity),
}

/// The identity a request runs as on the agent: its access mode and the facts kas sent with it
/// (for a person, the roles of each `user_access` entry that let them in, which agentk turns
/// into impersonated groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunsAs {
    /// How agentk authenticates the request.
    pub access_as: AccessAs,
    /// What kas sent with it.
    pub context: RequestContext,
}

/// Whether `config` still lets `caller` reach agent `agent_id` as `runs_as`, exactly: a
/// request allowed only under another identity (another access mode, or a person's roles
/// through fewer `user_access` entries) must end too, or it keeps rights the configuration
/// took away. Pure.
pub fn still_allowed(
    agent_id: i64,
    caller: &Caller,
    runs_as: &RunsAs,
    config: &AgentConfig,
) -> bool {
    match caller {
        // A CI job's context depends on its token only; its access mode on the configuration.
        Caller::CiJob {
            config_project,
            job,
        } => authorize_ci(&config.ci_access, config_project, job)
            .is_ok_and(|ok| AccessAs::from(&ok.access_as) == runs_as.access_as),
        Caller::Person(identity) => authorize_user(config.user_access.as_ref(), agent_id, identity)
            .is_ok_and(|ok| {
                let context = user_context(
                    agent_id,
                    runs_as.context.config_project_id,
                    identity.username.clone(),
                    &ok,
                );
                AccessAs::from(&ok.access_as) == runs_as.access_as && context == runs_as.context
            }),
    }
}

struct Entry {
    caller: Arc<Caller>,
    runs_as: RunsAs,
    end: CancellationToken,
}

/// The live requests of every agent.
#[derive(Default)]
pub struct LiveAccess {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    by_agent: HashMap<i64, HashMap<u64, Entry>>,
}

impl std::fmt::Debug for LiveAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveAccess").finish_non_exhaustive()
    }
}

/// A tracked request; dropping it (the response and any upgrade are done) stops tracking.
#[derive(Debug)]
pub struct LiveGrant {
    owner: Arc<LiveAccess>,
    agent_id: i64,
    id: u64,
}

impl LiveAccess {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is one insert or remove: consistent across a panic.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tracks a request to `agent_id`; `end` fires if a later configuration disallows it.
    pub fn track(
        self: &Arc<Self>,
        agent_id: i64,
        caller: Arc<Caller>,
        runs_as: RunsAs,
        end: CancellationToken,
    ) -> LiveGrant {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let entry = Entry {
            caller,
            runs_as,
            end,
        };
        inner
            .by_agent
            .entry(agent_id)
            .or_default()
            .insert(id, entry);
        LiveGrant {
            owner: Arc::clone(self),
            agent_id,
            id,
        }
    }

    /// The agents with live requests.
    pub fn agents(&self) -> Vec<i64> {
        self.lock().by_agent.keys().copied().collect()
    }

    /// Ends the live requests of `agent_id` that `config` no longer allows as they run; how
    /// many it ended.
    pub fn recheck(&self, agent_id: i64, config: &AgentConfig) -> usize {
        let ended: Vec<CancellationToken> = {
            let mut inner = self.lock();
            let Some(live) = inner.by_agent.get_mut(&agent_id) else {
                return 0;
            };
            let denied: Vec<u64> = live
                .iter()
                .filter(|(_, e)| !still_allowed(agent_id, &e.caller, &e.runs_as, config))
                .map(|(id, _)| *id)
                .collect();
            let ended = denied
                .iter()
                .filter_map(|id| live.remove(id))
                .map(|e| e.end)
                .collect();
            if live.is_empty() {
                inner.by_agent.remove(&agent_id);
            }
            ended
        };
        for end in &ended {
            end.cancel();
        }
        ended.len()
    }
}

/// How often the live requests are re-checked against the stored configurations, for the
/// changes another replica recorded (this replica's own are checked at once).
const RECHECK: Duration = Duration::from_secs(10);

/// Re-checks the live requests until `stop`: when this replica records a configuration, and
/// every [`RECHECK`] against the configuration in force as fresh as this replica can know it
/// ([`InForce`]: the store for an agent another replica may hold). An agent whose configuration
/// cannot be read keeps its requests: the store being down is no reason to cut every session.
pub async fn follow(
    live: Arc<LiveAccess>,
    (configs, store, registry, several): (Arc<ConfigStates>, Arc<dyn Store>, Arc<Registry>, bool),
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = configs.changed() => {}
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let in_force = InForce {
            configs: &configs,
            store: store.as_ref(),
            registry: &registry,
            several,
        };
        for agent_id in live.agents() {
            let Some(config) = in_force.now(agent_id).await else {
                continue;
            };
            let ended = live.recheck(agent_id, &config);
            if ended > 0 {
                tracing::info!(
                    agent_id,
                    ended,
                    "Ended live requests the agent's configuration no longer allows"
                );
            }
        }
    }
}

impl Drop for LiveGrant {
    fn drop(&mut self) {
        let mut inner = self.owner.lock();
        if let Some(live) = inner.by_agent.get_mut(&self.agent_id) {
            live.remove(&self.id);
            if live.is_empty() {
                inner.by_agent.remove(&self.agent_id);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tether_kubeproxy_server::{
        AccessLevel, Membership, MembershipKind, UserAuthorized, ci_job_context,
    };

    fn ci_runs_as(ok_access_as: AccessAs, project: &str) -> RunsAs {
        RunsAs {
            access_as: ok_access_as,
            context: ci_job_context(1, 9, &job(project)),
        }
    }

    fn person_runs_as(ok: &UserAuthorized, username: &str) -> RunsAs {
        RunsAs {
            access_as: AccessAs::from(&ok.access_as),
            context: user_context(1, Some(9), username.into(), ok),
        }
    }

    fn group(path: &str, id: i64) -> Membership {
        Membership {
            kind: MembershipKind::Group,
            path: path.into(),
            id: Some(id),
            access_level: AccessLevel::Developer,
        }
    }

    fn job(project: &str) -> CiIdentity {
        CiIdentity {
            issuer: "https://gitlab.example".into(),
            project_path: project.into(),
            project_id: Some(7),
            job_id: 1,
            pipeline_id: 2,
            environment: None,
            environment_tier: None,
            namespace_path: "group".into(),
            user: Some("alice".into()),
        }
    }

    fn config(yaml: &str) -> AgentConfig {
        tether_agent_config::parse(yaml).unwrap()
    }

    fn ci(project: &str) -> Arc<Caller> {
        Arc::new(Caller::CiJob {
            config_project: "group/agents".into(),
            job: job(project),
        })
    }

    const BOTH: &str = "ci_access:\n  configuration_project: false\n  projects:\n  - id: group/deployer\n  - id: group/other\n";

    #[test]
    fn a_project_removed_from_ci_access_ends_its_requests_and_only_those() {
        let live = Arc::new(LiveAccess::default());
        let before = config(BOTH);
        let access = |p: &str| {
            let ok = authorize_ci(&before.ci_access, "group/agents", &job(p)).unwrap();
            ci_runs_as(AccessAs::from(&ok.access_as), p)
        };
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        let _ga = live.track(1, ci("group/deployer"), access("group/deployer"), a.clone());
        let gb = live.track(1, ci("group/other"), access("group/other"), b.clone());
        assert_eq!(live.recheck(1, &before), 0, "nothing changed");

        let after = config(
            "ci_access:\n  configuration_project: false\n  projects:\n  - id: group/other\n",
        );
        assert_eq!(live.recheck(1, &after), 1);
        assert!(a.is_cancelled() && !b.is_cancelled());
        assert_eq!(live.recheck(1, &after), 0, "ended once");
        assert_eq!(live.recheck(2, &after), 0, "another agent has none");
        drop(gb);
        assert!(live.agents().is_empty(), "finished requests are forgotten");
    }

    #[test]
    fn a_request_allowed_only_as_another_identity_is_ended() {
        let before = config(BOTH);
        let ok = authorize_ci(&before.ci_access, "group/agents", &job("group/deployer")).unwrap();
        let running_as = ci_runs_as(AccessAs::from(&ok.access_as), "group/deployer");
        let caller = ci("group/deployer");
        assert!(still_allowed(1, &caller, &running_as, &before));
        let impersonating = config(
            "ci_access:\n  configuration_project: false\n  projects:\n  - id: group/deployer\n    access_as:\n      impersonate:\n        username: deployer\n",
        );
        assert!(!still_allowed(1, &caller, &running_as, &impersonating));
    }

    #[test]
    fn a_person_whose_group_left_user_access_is_ended() {
        let person = UserIdentity {
            username: "alice".into(),
            token_agent_id: 1,
            memberships: vec![group("people", 3)],
        };
        let with = config("user_access:\n  access_as:\n    agent: {}\n  groups:\n  - id: people\n");
        let ok = authorize_user(with.user_access.as_ref(), 1, &person).unwrap();
        let running_as = person_runs_as(&ok, "alice");
        let caller = Caller::Person(person);
        assert!(still_allowed(1, &caller, &running_as, &with));
        let without =
            config("user_access:\n  access_as:\n    agent: {}\n  groups:\n  - id: others\n");
        assert!(!still_allowed(1, &caller, &running_as, &without));
        assert!(!still_allowed(1, &caller, &running_as, &config("")));
    }

    /// A person in two groups of `user_access` (access as themselves) runs with the roles of
    /// both; once one group leaves `user_access`, the request still authorizes through the
    /// other with the same access mode, but no longer with the removed group's impersonated
    /// role groups, so it must end (and be made again with what is left).
    #[test]
    fn a_person_keeping_access_through_another_group_is_ended_when_one_group_leaves() {
        let person = UserIdentity {
            username: "alice".into(),
            token_agent_id: 1,
            memberships: vec![group("ops", 10), group("people", 20)],
        };
        let both = config(
            "user_access:\n  access_as:\n    user: {}\n  groups:\n  - id: ops\n  - id: people\n",
        );
        let ok = authorize_user(both.user_access.as_ref(), 1, &person).unwrap();
        let running_as = person_runs_as(&ok, "alice");
        let caller = Caller::Person(person);
        assert!(still_allowed(1, &caller, &running_as, &both));
        let one = config("user_access:\n  access_as:\n    user: {}\n  groups:\n  - id: people\n");
        let still = authorize_user(
            one.user_access.as_ref(),
            1,
            match &caller {
                Caller::Person(p) => p,
                Caller::CiJob { .. } => unreachable!(),
            },
        )
        .unwrap();
        assert_eq!(
            AccessAs::from(&still.access_as),
            running_as.access_as,
            "same mode"
        );
        assert!(!still_allowed(1, &caller, &running_as, &one));
    }
}
