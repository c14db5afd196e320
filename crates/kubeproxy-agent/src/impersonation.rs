//! Kubernetes impersonation headers for each `access_as`, with GitLab's identity strings kept
//! byte for byte so that RBAC written for GitLab's agent works unchanged (see `IDENTITIES.md`).
//!
//! kas decides *whether* a request may go through and *as what* ([`AccessAs`]) and sends the
//! facts about the caller ([`RequestContext`]) with the tunnelled request; agentk turns them into
//! headers here. Upstream does it the same way round (kas builds an `ImpersonationConfig`, agentk
//! applies it), which keeps agentk free of any knowledge of GitLab's authorization.

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tether_agent_config::{CiAccessAs, ExtraKeyVal, Impersonate, UserAccessAs};

/// `Impersonate-User`.
pub const IMPERSONATE_USER: &str = "Impersonate-User";
/// `Impersonate-Group` (one header per group).
pub const IMPERSONATE_GROUP: &str = "Impersonate-Group";
/// `Impersonate-Uid`.
pub const IMPERSONATE_UID: &str = "Impersonate-Uid";
/// Prefix of `Impersonate-Extra-<key>` (one header per value).
pub const IMPERSONATE_EXTRA_PREFIX: &str = "Impersonate-Extra-";

/// The identity requests are sent as: the union of `ci_access` and `user_access` `access_as`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessAs {
    /// The agent's own ServiceAccount: no impersonation.
    Agent,
    /// A fixed identity from the configuration.
    Impersonate(Impersonate),
    /// The CI job (`gitlab:ci_job:<job id>`).
    CiJob,
    /// The GitLab user (`gitlab:user:<username>`).
    User,
}

impl From<&CiAccessAs> for AccessAs {
    fn from(access: &CiAccessAs) -> Self {
        match access {
            CiAccessAs::Agent(_) => AccessAs::Agent,
            CiAccessAs::Impersonate(imp) => AccessAs::Impersonate(imp.clone()),
            CiAccessAs::CiJob(_) => AccessAs::CiJob,
        }
    }
}

impl From<&UserAccessAs> for AccessAs {
    fn from(access: &UserAccessAs) -> Self {
        match access {
            UserAccessAs::Agent(_) => AccessAs::Agent,
            UserAccessAs::User(_) => AccessAs::User,
        }
    }
}

/// Facts about the caller that kas sends with a tunnelled request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestContext {
    /// The agent's id (`agent.gitlab.com/id`).
    pub agent_id: i64,
    /// The agent's configuration project id (`agent.gitlab.com/config_project_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_project_id: Option<i64>,
    /// Set for CI job requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_job: Option<CiJobContext>,
    /// Set for user requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserContext>,
}

/// The CI job behind a request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiJobContext {
    /// Job id.
    pub job_id: i64,
    /// Pipeline id.
    pub pipeline_id: i64,
    /// The job's project id, when the issuer's token carries one. Left out of the JSON when
    /// unknown: an agentk that requires it (before it was optional) then refuses the request
    /// as malformed, rather than reading a made-up id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<i64>,
    /// Ids of the groups holding the project, outermost first (`gitlab:group:<id>` each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_ids: Vec<i64>,
    /// The user the job runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The environment the job deploys to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<EnvironmentContext>,
}

/// A CI job's environment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentContext {
    /// GitLab's environment slug (not the name).
    pub slug: String,
    /// Tier (`production`, `staging`, `testing`, `development`, `other`); GitLab always has one,
    /// other CI systems may not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// The GitLab user behind a request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserContext {
    /// Username.
    pub username: String,
    /// Roles in authorized projects (`gitlab:project_role:<id>:<role>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub project_roles: Vec<Roles>,
    /// Roles in authorized groups (`gitlab:group_role:<id>:<role>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_roles: Vec<Roles>,
    /// How the user authenticated (`agent.gitlab.com/access_type`), e.g.
    /// `personal_access_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_type: Option<String>,
}

/// A user's roles in one project or group.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Project or group id.
    pub id: i64,
    /// Role names (`developer`, `maintainer`, ...).
    pub roles: Vec<String>,
}

/// Why no impersonation headers could be built. The request must then fail: sending it without
/// them would run it with the agent's own, usually broader, rights.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpersonationError {
    /// `access_as: ci_job` but kas sent no CI job facts.
    #[error("access_as ci_job needs the CI job context, and the request has none")]
    MissingCiJob,
    /// `access_as: user` but kas sent no user facts.
    #[error("access_as user needs the user context, and the request has none")]
    MissingUser,
    /// A username that is empty: Kubernetes needs one to impersonate anything.
    #[error("impersonation needs a non-empty username")]
    EmptyUsername,
    /// An extra key that is empty.
    #[error("impersonation extra keys must not be empty")]
    EmptyExtraKey,
    /// A value that cannot be sent in an HTTP header (control characters, non-ASCII).
    #[error("{header} value {value:?} cannot be sent in an HTTP header")]
    InvalidValue {
        /// Header name.
        header: String,
        /// The value.
        value: String,
    },
}

/// The impersonation headers for `access` (name, value), in a stable order: user, groups, uid,
/// extras. Empty for [`AccessAs::Agent`].
pub fn impersonation_headers(
    access: &AccessAs,
    ctx: &RequestContext,
) -> Result<Vec<(String, String)>, ImpersonationError> {
    let identity = match access {
        AccessAs::Agent => return Ok(Vec::new()),
        AccessAs::Impersonate(imp) => Identity {
            user: imp.username.clone(),
            groups: imp.groups.clone(),
            uid: imp.uid.clone(),
            extra: imp
                .extra
                .iter()
                .map(|ExtraKeyVal { key, val }| (key.clone(), val.clone()))
                .collect(),
        },
        AccessAs::CiJob => ci_job_identity(ctx)?,
        AccessAs::User => user_identity(ctx)?,
    };
    identity.headers()
}

struct Identity {
    user: String,
    groups: Vec<String>,
    uid: Option<String>,
    extra: Vec<(String, Vec<String>)>,
}

impl Identity {
    fn headers(self) -> Result<Vec<(String, String)>, ImpersonationError> {
        if self.user.is_empty() {
            return Err(ImpersonationError::EmptyUsername);
        }
        let mut out = Vec::with_capacity(2 + self.groups.len() + self.extra.len());
        out.push((IMPERSONATE_USER.to_owned(), self.user));
        out.extend(
            self.groups
                .into_iter()
                .map(|g| (IMPERSONATE_GROUP.to_owned(), g)),
        );
        if let Some(uid) = self.uid {
            out.push((IMPERSONATE_UID.to_owned(), uid));
        }
        for (key, values) in self.extra {
            if key.is_empty() {
                return Err(ImpersonationError::EmptyExtraKey);
            }
            let name = format!("{IMPERSONATE_EXTRA_PREFIX}{}", escape_extra_key(&key));
            out.extend(values.into_iter().map(|v| (name.clone(), v)));
        }
        for (name, value) in &out {
            if HeaderValue::from_str(value).is_err() {
                return Err(ImpersonationError::InvalidValue {
                    header: name.clone(),
                    value: value.clone(),
                });
            }
        }
        Ok(out)
    }
}

/// Upstream's `ci_job` identity (kas `constructJobImpersonationConfig`), in its order.
fn ci_job_identity(ctx: &RequestContext) -> Result<Identity, ImpersonationError> {
    let job = ctx
        .ci_job
        .as_ref()
        .ok_or(ImpersonationError::MissingCiJob)?;
    let env = job.environment.as_ref();
    let tier = env.and_then(|e| e.tier.as_deref());

    let mut groups = vec!["gitlab:ci_job".to_owned()];
    for group_id in &job.group_ids {
        groups.push(format!("gitlab:group:{group_id}"));
        if let Some(tier) = tier {
            groups.push(format!("gitlab:group_env_tier:{group_id}:{tier}"));
        }
    }
    // Without the project id there is no project group: a shared stand-in id would give every
    // such job of every project the same project identity.
    if let Some(project_id) = job.project_id {
        groups.push(format!("gitlab:project:{project_id}"));
        if let Some(env) = env {
            groups.push(format!("gitlab:project_env:{project_id}:{}", env.slug));
            if let Some(tier) = tier {
                groups.push(format!("gitlab:project_env_tier:{project_id}:{tier}"));
            }
        }
    }

    let mut extra = vec![(
        "agent.gitlab.com/id".to_owned(),
        vec![ctx.agent_id.to_string()],
    )];
    if let Some(id) = ctx.config_project_id {
        extra.push((
            "agent.gitlab.com/config_project_id".to_owned(),
            vec![id.to_string()],
        ));
    }
    if let Some(project_id) = job.project_id {
        extra.push((
            "agent.gitlab.com/project_id".to_owned(),
            vec![project_id.to_string()],
        ));
    }
    extra.extend([
        (
            "agent.gitlab.com/ci_pipeline_id".to_owned(),
            vec![job.pipeline_id.to_string()],
        ),
        (
            "agent.gitlab.com/ci_job_id".to_owned(),
            vec![job.job_id.to_string()],
        ),
    ]);
    if let Some(username) = &job.username {
        extra.push((
            "agent.gitlab.com/username".to_owned(),
            vec![username.clone()],
        ));
    }
    if let Some(env) = env {
        extra.push((
            "agent.gitlab.com/environment_slug".to_owned(),
            vec![env.slug.clone()],
        ));
        if let Some(tier) = tier {
            extra.push((
                "agent.gitlab.com/environment_tier".to_owned(),
                vec![tier.to_owned()],
            ));
        }
    }
    Ok(Identity {
        user: format!("gitlab:ci_job:{}", job.job_id),
        groups,
        uid: None,
        extra,
    })
}

/// Upstream's `user` identity (kas `constructUserImpersonationConfig`), in its order.
fn user_identity(ctx: &RequestContext) -> Result<Identity, ImpersonationError> {
    let user = ctx.user.as_ref().ok_or(ImpersonationError::MissingUser)?;
    if user.username.is_empty() {
        return Err(ImpersonationError::EmptyUsername);
    }
    let mut groups = vec!["gitlab:user".to_owned()];
    for (kind, grants) in [
        ("project_role", &user.project_roles),
        ("group_role", &user.group_roles),
    ] {
        for grant in grants {
            for role in &grant.roles {
                groups.push(format!("gitlab:{kind}:{}:{role}", grant.id));
            }
        }
    }
    let mut extra = vec![
        (
            "agent.gitlab.com/id".to_owned(),
            vec![ctx.agent_id.to_string()],
        ),
        (
            "agent.gitlab.com/username".to_owned(),
            vec![user.username.clone()],
        ),
    ];
    if let Some(access_type) = &user.access_type {
        extra.push((
            "agent.gitlab.com/access_type".to_owned(),
            vec![access_type.clone()],
        ));
    }
    if let Some(id) = ctx.config_project_id {
        extra.push((
            "agent.gitlab.com/config_project_id".to_owned(),
            vec![id.to_string()],
        ));
    }
    Ok(Identity {
        user: format!("gitlab:user:{}", user.username),
        groups,
        uid: None,
        extra,
    })
}

/// Percent-encodes an extra key for its header name the way client-go does
/// (`headerKeyEscape`): bytes that are not HTTP token characters, and `%` itself, become
/// `%XX` (uppercase hex). The API server decodes them again, so `agent.gitlab.com/id` arrives
/// as written.
pub fn escape_extra_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if is_token_byte(b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ci_ctx(environment: Option<EnvironmentContext>) -> RequestContext {
        RequestContext {
            agent_id: 123,
            config_project_id: Some(5),
            ci_job: Some(CiJobContext {
                job_id: 1,
                pipeline_id: 2,
                project_id: Some(3),
                group_ids: vec![6],
                username: Some("testuser".into()),
                environment,
            }),
            user: None,
        }
    }

    #[test]
    fn agent_sends_nothing() {
        assert_eq!(
            impersonation_headers(&AccessAs::Agent, &RequestContext::default()),
            Ok(vec![])
        );
    }

    #[test]
    fn static_impersonation() {
        let access = AccessAs::Impersonate(Impersonate {
            username: "system:serviceaccount:ci:deployer".into(),
            groups: vec!["deployers".into(), "system:authenticated".into()],
            uid: Some("u-1".into()),
            extra: vec![
                ExtraKeyVal {
                    key: "example.com/team".into(),
                    val: vec!["a".into(), "b".into()],
                },
                ExtraKeyVal {
                    key: "scopes".into(),
                    val: vec![],
                },
            ],
        });
        assert_eq!(
            impersonation_headers(&access, &RequestContext::default()),
            Ok(pairs(&[
                ("Impersonate-User", "system:serviceaccount:ci:deployer"),
                ("Impersonate-Group", "deployers"),
                ("Impersonate-Group", "system:authenticated"),
                ("Impersonate-Uid", "u-1"),
                ("Impersonate-Extra-example.com%2Fteam", "a"),
                ("Impersonate-Extra-example.com%2Fteam", "b"),
            ]))
        );
    }

    #[test]
    fn ci_job_without_environment() {
        // Upstream kas's own expectation (proxy_test.go "impersonate ci job").
        assert_eq!(
            impersonation_headers(&AccessAs::CiJob, &ci_ctx(None)),
            Ok(pairs(&[
                ("Impersonate-User", "gitlab:ci_job:1"),
                ("Impersonate-Group", "gitlab:ci_job"),
                ("Impersonate-Group", "gitlab:group:6"),
                ("Impersonate-Group", "gitlab:project:3"),
                ("Impersonate-Extra-agent.gitlab.com%2Fid", "123"),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Fconfig_project_id",
                    "5"
                ),
                ("Impersonate-Extra-agent.gitlab.com%2Fproject_id", "3"),
                ("Impersonate-Extra-agent.gitlab.com%2Fci_pipeline_id", "2"),
                ("Impersonate-Extra-agent.gitlab.com%2Fci_job_id", "1"),
                ("Impersonate-Extra-agent.gitlab.com%2Fusername", "testuser"),
            ]))
        );
    }

    #[test]
    fn ci_job_with_environment() {
        // Upstream kas's own expectation (proxy_test.go "impersonate ci job prod env").
        let ctx = ci_ctx(Some(EnvironmentContext {
            slug: "prod".into(),
            tier: Some("production".into()),
        }));
        assert_eq!(
            impersonation_headers(&AccessAs::CiJob, &ctx),
            Ok(pairs(&[
                ("Impersonate-User", "gitlab:ci_job:1"),
                ("Impersonate-Group", "gitlab:ci_job"),
                ("Impersonate-Group", "gitlab:group:6"),
                ("Impersonate-Group", "gitlab:group_env_tier:6:production"),
                ("Impersonate-Group", "gitlab:project:3"),
                ("Impersonate-Group", "gitlab:project_env:3:prod"),
                ("Impersonate-Group", "gitlab:project_env_tier:3:production"),
                ("Impersonate-Extra-agent.gitlab.com%2Fid", "123"),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Fconfig_project_id",
                    "5"
                ),
                ("Impersonate-Extra-agent.gitlab.com%2Fproject_id", "3"),
                ("Impersonate-Extra-agent.gitlab.com%2Fci_pipeline_id", "2"),
                ("Impersonate-Extra-agent.gitlab.com%2Fci_job_id", "1"),
                ("Impersonate-Extra-agent.gitlab.com%2Fusername", "testuser"),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Fenvironment_slug",
                    "prod"
                ),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Fenvironment_tier",
                    "production"
                ),
            ]))
        );
    }

    #[test]
    fn ci_job_minimal_context() {
        // A tierless environment (e.g. GitHub Actions), no groups, no username, no config
        // project id: the facts that are known are still sent, the others left out.
        let ctx = RequestContext {
            agent_id: 9,
            config_project_id: None,
            ci_job: Some(CiJobContext {
                job_id: 77,
                pipeline_id: 77,
                project_id: Some(40),
                group_ids: vec![],
                username: None,
                environment: Some(EnvironmentContext {
                    slug: "staging".into(),
                    tier: None,
                }),
            }),
            user: None,
        };
        assert_eq!(
            impersonation_headers(&AccessAs::CiJob, &ctx),
            Ok(pairs(&[
                ("Impersonate-User", "gitlab:ci_job:77"),
                ("Impersonate-Group", "gitlab:ci_job"),
                ("Impersonate-Group", "gitlab:project:40"),
                ("Impersonate-Group", "gitlab:project_env:40:staging"),
                ("Impersonate-Extra-agent.gitlab.com%2Fid", "9"),
                ("Impersonate-Extra-agent.gitlab.com%2Fproject_id", "40"),
                ("Impersonate-Extra-agent.gitlab.com%2Fci_pipeline_id", "77"),
                ("Impersonate-Extra-agent.gitlab.com%2Fci_job_id", "77"),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Fenvironment_slug",
                    "staging"
                ),
            ]))
        );
    }

    #[test]
    fn user() {
        let ctx = RequestContext {
            agent_id: 123,
            config_project_id: Some(5),
            ci_job: None,
            user: Some(UserContext {
                username: "alice".into(),
                project_roles: vec![Roles {
                    id: 3,
                    roles: vec!["developer".into(), "maintainer".into()],
                }],
                group_roles: vec![Roles {
                    id: 6,
                    roles: vec!["reporter".into()],
                }],
                access_type: Some("personal_access_token".into()),
            }),
        };
        assert_eq!(
            impersonation_headers(&AccessAs::User, &ctx),
            Ok(pairs(&[
                ("Impersonate-User", "gitlab:user:alice"),
                ("Impersonate-Group", "gitlab:user"),
                ("Impersonate-Group", "gitlab:project_role:3:developer"),
                ("Impersonate-Group", "gitlab:project_role:3:maintainer"),
                ("Impersonate-Group", "gitlab:group_role:6:reporter"),
                ("Impersonate-Extra-agent.gitlab.com%2Fid", "123"),
                ("Impersonate-Extra-agent.gitlab.com%2Fusername", "alice"),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Faccess_type",
                    "personal_access_token"
                ),
                (
                    "Impersonate-Extra-agent.gitlab.com%2Fconfig_project_id",
                    "5"
                ),
            ]))
        );
    }

    #[test]
    fn errors() {
        let no_ctx = RequestContext::default();
        let imp = |username: &str, key: &str, val: &str| {
            AccessAs::Impersonate(Impersonate {
                username: username.into(),
                groups: vec![],
                uid: None,
                extra: vec![ExtraKeyVal {
                    key: key.into(),
                    val: vec![val.into()],
                }],
            })
        };
        let cases = [
            (AccessAs::CiJob, ImpersonationError::MissingCiJob),
            (AccessAs::User, ImpersonationError::MissingUser),
            (imp("", "k", "v"), ImpersonationError::EmptyUsername),
            (imp("u", "", "v"), ImpersonationError::EmptyExtraKey),
            (
                imp("u", "k", "a\r\nInjected: 1"),
                ImpersonationError::InvalidValue {
                    header: "Impersonate-Extra-k".into(),
                    value: "a\r\nInjected: 1".into(),
                },
            ),
        ];
        for (access, want) in cases {
            assert_eq!(
                impersonation_headers(&access, &no_ctx),
                Err(want),
                "{access:?}"
            );
        }
        let empty_user = RequestContext {
            user: Some(UserContext::default()),
            ..RequestContext::default()
        };
        assert_eq!(
            impersonation_headers(&AccessAs::User, &empty_user),
            Err(ImpersonationError::EmptyUsername)
        );
    }

    #[test]
    fn extra_key_escaping() {
        // client-go's headerKeyEscape cases.
        let cases = [
            ("agent.gitlab.com/id", "agent.gitlab.com%2Fid"),
            ("scopes", "scopes"),
            ("a b", "a%20b"),
            ("100%", "100%25"),
            ("key:with:colons", "key%3Awith%3Acolons"),
            ("ünï", "%C3%BCn%C3%AF"),
            ("!#$&'*+-.^_`|~", "!#$&'*+-.^_`|~"),
        ];
        for (key, want) in cases {
            assert_eq!(escape_extra_key(key), want, "key {key:?}");
            // Always a valid header name.
            let name = format!("{IMPERSONATE_EXTRA_PREFIX}{want}");
            assert!(
                http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
                "{name}"
            );
        }
    }

    /// An issuer without a project id claim: the job keeps its own identity, but no project
    /// group, environment group or `project_id` extra (never `gitlab:project:0`, which every
    /// such job of every project would share).
    #[test]
    fn ci_job_without_a_project_id_has_no_project_identity() {
        let mut ctx = ci_ctx(Some(EnvironmentContext {
            slug: "prod".into(),
            tier: Some("production".into()),
        }));
        let with_project = impersonation_headers(&AccessAs::CiJob, &ctx).expect("headers");
        if let Some(job) = ctx.ci_job.as_mut() {
            job.project_id = None;
        }
        let project_facts = |(name, value): &(String, String)| {
            value.starts_with("gitlab:project") || name.ends_with("%2Fproject_id")
        };
        let expected: Vec<(String, String)> = with_project
            .iter()
            .filter(|h| !project_facts(h))
            .cloned()
            .collect();
        // Three project groups and the project_id extra, and nothing else, are left out.
        assert_eq!(expected.len(), with_project.len() - 4);
        assert_eq!(impersonation_headers(&AccessAs::CiJob, &ctx), Ok(expected));
    }

    /// The wire form with a project id is what agentk has always read; without one, the key is
    /// absent, which an agentk needing it refuses (missing field) instead of misreading.
    #[test]
    fn the_project_id_is_left_out_of_the_json_when_unknown() {
        let known = ci_ctx(None);
        let json = serde_json::to_value(&known).expect("serializes");
        assert_eq!(json["ci_job"]["project_id"], 3);
        let mut unknown = known;
        if let Some(job) = unknown.ci_job.as_mut() {
            job.project_id = None;
        }
        let json = serde_json::to_value(&unknown).expect("serializes");
        assert_eq!(json["ci_job"].get("project_id"), None);
        let back: RequestContext = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, unknown);
    }

    #[test]
    fn access_as_from_config() {
        use tether_agent_config::{AsAgent, AsCiJob, AsUser};
        assert_eq!(
            AccessAs::from(&CiAccessAs::Agent(AsAgent {})),
            AccessAs::Agent
        );
        assert_eq!(
            AccessAs::from(&CiAccessAs::CiJob(AsCiJob {})),
            AccessAs::CiJob
        );
        assert_eq!(
            AccessAs::from(&UserAccessAs::User(AsUser {})),
            AccessAs::User
        );
        assert_eq!(
            AccessAs::from(&UserAccessAs::Agent(AsAgent {})),
            AccessAs::Agent
        );
    }

    #[test]
    fn context_round_trips_through_json() {
        let ctx = ci_ctx(Some(EnvironmentContext {
            slug: "prod".into(),
            tier: Some("production".into()),
        }));
        let json = serde_json::to_string(&ctx).expect("serializes");
        let back: RequestContext = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, ctx);
        let access = AccessAs::CiJob;
        let json = serde_json::to_string(&access).expect("serializes");
        assert_eq!(json, "\"ci_job\"");
    }
}
