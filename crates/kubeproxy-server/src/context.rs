//! What kas sends with a routed request: the [`RequestContext`] built from the caller's verified
//! identity and the authorization decision, and the metric label of its access mode. Pure, so
//! the contract with agentk is tested without a listener or a tunnel.

use tether_agent_config::CiAccess;
use tether_kubeproxy_agent::{
    AccessAs, CiJobContext, EnvironmentContext, RequestContext, Roles, UserContext,
};

use crate::{CiIdentity, Kubeconfig, KubeconfigError, RoleGrant, UserAuthorized};
use crate::{authorize_ci, environment_slug};

/// The context of a CI job's request to agent `agent_id`, whose configuration project is
/// `config_project_id`.
pub fn ci_job_context(agent_id: i64, config_project_id: i64, job: &CiIdentity) -> RequestContext {
    RequestContext {
        agent_id,
        config_project_id: Some(config_project_id),
        ci_job: Some(CiJobContext {
            job_id: job.job_id,
            pipeline_id: job.pipeline_id,
            // Unknown stays unknown: agentk then impersonates no project (IDENTITIES.md).
            project_id: job.project_id,
            group_ids: Vec::new(),
            username: job.user.clone(),
            environment: job.environment.as_ref().map(|e| EnvironmentContext {
                slug: environment_slug(e),
                tier: job.environment_tier.clone(),
            }),
        }),
        user: None,
    }
}

/// The context of a request made with a personal access token of `username`, authorized as
/// `ok`. Only grants whose entry has a numeric id become roles: agentk names impersonated
/// groups by id.
pub fn user_context(
    agent_id: i64,
    config_project_id: Option<i64>,
    username: String,
    ok: &UserAuthorized,
) -> RequestContext {
    let roles = |grants: &[RoleGrant]| {
        grants
            .iter()
            .filter_map(|g| {
                Some(Roles {
                    id: g.id?,
                    roles: g.roles.clone(),
                })
            })
            .collect::<Vec<_>>()
    };
    RequestContext {
        agent_id,
        config_project_id,
        ci_job: None,
        user: Some(UserContext {
            username,
            project_roles: roles(&ok.project_roles),
            group_roles: roles(&ok.group_roles),
            access_type: Some("personal_access_token".into()),
        }),
    }
}

/// The `access_as` label of the proxy's metrics.
pub fn mode_name(access_as: &AccessAs) -> &'static str {
    match access_as {
        AccessAs::Agent => "agent",
        AccessAs::Impersonate(_) => "impersonate",
        AccessAs::CiJob => "ci_job",
        AccessAs::User => "user",
    }
}

/// An agent as the CI kubeconfig needs it.
#[derive(Debug, Clone, Copy)]
pub struct KubeconfigAgent<'a> {
    pub id: i64,
    pub project_path: &'a str,
    pub name: &'a str,
    /// The agent's `ci_access` in force (empty when its configuration is not known).
    pub ci_access: &'a CiAccess,
}

/// The kubeconfig (JSON) for CI job `job` presenting `jwt`: one context per agent it may use,
/// named `<config project path>:<agent name>`, namespace = the entry's `default_namespace`;
/// `None` when it may use none.
pub fn ci_kubeconfig<'a>(
    server: &str,
    ca_pem: Option<&[u8]>,
    jwt: &str,
    job: &CiIdentity,
    agents: impl IntoIterator<Item = KubeconfigAgent<'a>>,
) -> Result<Option<String>, KubeconfigError> {
    let mut kc = Kubeconfig::new(server, ca_pem)?;
    let mut any = false;
    for a in agents {
        let Ok(ok) = authorize_ci(a.ci_access, a.project_path, job) else {
            continue;
        };
        let name = format!("{}:{}", a.project_path, a.name);
        kc.add_context(
            &name,
            &format!("ci:{}:{jwt}", a.id),
            ok.default_namespace.as_deref(),
        )?;
        any = true;
    }
    if any {
        kc.to_json().map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> CiIdentity {
        CiIdentity {
            issuer: "https://gitlab.example".into(),
            project_path: "group/app".into(),
            project_id: Some(7),
            job_id: 11,
            pipeline_id: 5,
            environment: Some("review/feature-x".into()),
            environment_tier: Some("development".into()),
            namespace_path: "group".into(),
            user: Some("alice".into()),
        }
    }

    #[test]
    fn ci_job_context_carries_the_job_and_its_environment() {
        let c = ci_job_context(3, 9, &job());
        assert_eq!(c.agent_id, 3);
        assert_eq!(c.config_project_id, Some(9));
        assert!(c.user.is_none());
        let ci = c.ci_job.expect("ci job context");
        assert_eq!((ci.job_id, ci.pipeline_id, ci.project_id), (11, 5, Some(7)));
        assert_eq!(ci.username.as_deref(), Some("alice"));
        let env = ci.environment.expect("environment");
        assert_eq!(env.slug, environment_slug("review/feature-x"));
        assert_eq!(env.tier.as_deref(), Some("development"));
    }

    /// An issuer without a project id claim: the context says so instead of sending project 0,
    /// which every such job of every project would share.
    #[test]
    fn ci_job_context_leaves_an_unknown_project_id_out() {
        let job = CiIdentity {
            project_id: None,
            ..job()
        };
        let ci = ci_job_context(3, 9, &job).ci_job.expect("ci job context");
        assert_eq!(ci.project_id, None);
    }

    #[test]
    fn user_context_keeps_only_grants_with_an_id() {
        let ok = UserAuthorized {
            access_as: tether_agent_config::UserAccessAs::User(Default::default()),
            project_roles: vec![
                RoleGrant {
                    path: "group/app".into(),
                    id: Some(42),
                    roles: vec!["guest".into(), "developer".into()],
                },
                RoleGrant {
                    path: "group/other".into(),
                    id: None,
                    roles: vec!["guest".into()],
                },
            ],
            group_roles: Vec::new(),
        };
        let c = user_context(3, None, "bob".into(), &ok);
        assert!(c.ci_job.is_none());
        let u = c.user.expect("user context");
        assert_eq!(u.username, "bob");
        assert_eq!(
            u.project_roles,
            vec![Roles {
                id: 42,
                roles: vec!["guest".into(), "developer".into()]
            }]
        );
        assert!(u.group_roles.is_empty());
        assert_eq!(u.access_type.as_deref(), Some("personal_access_token"));
    }

    #[test]
    fn mode_names_are_the_metric_labels() {
        assert_eq!(mode_name(&AccessAs::Agent), "agent");
        assert_eq!(mode_name(&AccessAs::CiJob), "ci_job");
        assert_eq!(mode_name(&AccessAs::User), "user");
    }

    #[test]
    fn no_agent_means_no_kubeconfig() {
        let kc = ci_kubeconfig("https://kas", None, "jwt", &job(), []).expect("kubeconfig");
        assert_eq!(kc, None);
    }
}
