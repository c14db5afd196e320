//! Whether a verified CI job or user may use an agent, and as whom — pure functions over the
//! agent's `ci_access` / `user_access` configuration.
//!
//! # CI jobs ([`authorize_ci`]), as upstream GitLab decides
//!
//! Exactly one authorization applies to a job, the most specific one:
//!
//! 1. a `ci_access.projects` entry naming the job's project;
//! 2. otherwise, when the job runs in the agent's own configuration project, an implicit
//!    authorization: `access_as: agent`, no default namespace, all environments (GitLab lets the
//!    configuration project's pipelines use its agents without listing it; listing it anyway
//!    is how to give those jobs another `access_as` or environment filter). With
//!    `ci_access.configuration_project: false` there is none, and the configuration project
//!    goes on to step 3 like any other project;
//! 3. otherwise the innermost `ci_access.groups` entry holding the project (`a/b` beats `a`).
//!
//! The environment filter is applied to that one authorization only: if its `environments` do
//! not admit the job, the job is denied even when an outer group would have admitted it
//! (GitLab picks the closest authorization first and filters afterwards).
//!
//! As upstream, only projects in the same top-level namespace as the configuration project can
//! be authorized, so an agent config cannot reach into another organisation's projects.
//!
//! Paths compare case-insensitively, as GitLab paths do. Environment patterns match the whole
//! name with `*` standing for any run of characters (`review/*`); upstream turns the pattern
//! into an unanchored regular expression, which also lets `review/*` match `old-review/x` and
//! treats `.` as any character — tether matches the whole name and takes other characters
//! literally.
//!
//! # Users ([`authorize_user`])
//!
//! A personal access token names its user and the agent it was issued for. The agent must have
//! a `user_access` section, and the user must be at least a Developer of a listed project, or of
//! a listed group (membership of an ancestor group counts, as GitLab's membership inheritance
//! does).

use std::fmt;

use serde::{Deserialize, Serialize};
use tether_agent_config::{CiAccess, CiAccessAs, CiAccessEntry, UserAccess, UserAccessAs};

use crate::CiIdentity;
use crate::gitlab::roles_up_to;

/// Which configuration entry authorized a CI job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    /// A `ci_access.projects` entry (its `id`).
    Project(String),
    /// The implicit authorization of the agent's configuration project (its path).
    ConfigProject(String),
    /// A `ci_access.groups` entry (its `id`).
    Group(String),
}

impl fmt::Display for MatchedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatchedBy::Project(id) => write!(f, "ci_access.projects entry {id:?}"),
            MatchedBy::ConfigProject(path) => {
                write!(f, "the agent's configuration project {path:?}")
            }
            MatchedBy::Group(id) => write!(f, "ci_access.groups entry {id:?}"),
        }
    }
}

/// A CI job may use the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// Identity for the job's requests to the Kubernetes API.
    pub access_as: CiAccessAs,
    /// Namespace for the generated kubeconfig context.
    pub default_namespace: Option<String>,
    /// The entry that decided.
    pub matched: MatchedBy,
}

/// Why a request may not use the agent (HTTP 403). Messages are meant for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The job's project is neither listed nor inside a listed group.
    #[error(
        "project {project:?} is not authorized to use this agent: it is not in ci_access.projects \
         nor inside a group in ci_access.groups"
    )]
    NotAuthorized {
        /// The job's project path.
        project: String,
    },
    /// The job runs in the agent's configuration project, whose implicit access is turned
    /// off, and no entry lists it.
    #[error(
        "project {project:?} is this agent's configuration project, and ci_access.configuration_project \
         is false: it needs a ci_access.projects entry or a group in ci_access.groups"
    )]
    ConfigurationProjectOptedOut {
        /// The job's project path.
        project: String,
    },
    /// The job's project is in another top-level namespace than the configuration project.
    #[error(
        "project {project:?} cannot use this agent: only projects under {root:?}, the agent's \
         top-level namespace, can be authorized"
    )]
    OutsideHierarchy {
        /// The job's project path.
        project: String,
        /// The configuration project's top-level namespace.
        root: String,
    },
    /// The deciding entry's `environments` do not admit the job's environment.
    #[error("{} does not allow {}", .matched, match .environment {
        Some(env) => format!("environment {env:?}"),
        None => "jobs without an environment".to_owned(),
    })]
    EnvironmentNotAllowed {
        /// The job's environment.
        environment: Option<String>,
        /// The entry whose filter refused it.
        matched: MatchedBy,
    },
    /// The agent has no `user_access` section.
    #[error("this agent does not allow user access (no user_access in its configuration)")]
    UserAccessNotConfigured,
    /// The personal token was issued for another agent.
    #[error("the token was issued for agent {token_agent_id}, not agent {agent_id}")]
    WrongAgent {
        /// The agent the request asks for.
        agent_id: i64,
        /// The agent the token is for.
        token_agent_id: i64,
    },
    /// The user is not a Developer (or higher) of any listed project or group.
    #[error(
        "user {username:?} needs the Developer role or higher in a project or group listed in \
         the agent's user_access"
    )]
    NotAMember {
        /// The user.
        username: String,
    },
}

impl Denied {
    /// The status the proxy answers with.
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::FORBIDDEN
    }
}

/// Decides whether the verified CI job `job` may use the agent whose configuration project is
/// `config_project_path` and whose `ci_access` section is `ci_access`.
pub fn authorize_ci(
    ci_access: &CiAccess,
    config_project_path: &str,
    job: &CiIdentity,
) -> Result<Authorized, Denied> {
    let project = job.project_path.as_str();
    let root = top_level(config_project_path);
    if !top_level(project).eq_ignore_ascii_case(root) {
        return Err(Denied::OutsideHierarchy {
            project: project.to_owned(),
            root: root.to_owned(),
        });
    }

    let (entry, matched): (Option<&CiAccessEntry>, MatchedBy) = if let Some(entry) = ci_access
        .projects
        .iter()
        .find(|e| e.id.eq_ignore_ascii_case(project))
    {
        (Some(entry), MatchedBy::Project(entry.id.clone()))
    } else if ci_access.configuration_project && project.eq_ignore_ascii_case(config_project_path) {
        (
            None,
            MatchedBy::ConfigProject(config_project_path.to_owned()),
        )
    } else if let Some(entry) = ci_access
        .groups
        .iter()
        .filter(|e| is_inside(project, &e.id))
        .max_by_key(|e| e.id.len())
    {
        (Some(entry), MatchedBy::Group(entry.id.clone()))
    } else if project.eq_ignore_ascii_case(config_project_path) {
        return Err(Denied::ConfigurationProjectOptedOut {
            project: project.to_owned(),
        });
    } else {
        return Err(Denied::NotAuthorized {
            project: project.to_owned(),
        });
    };

    let Some(entry) = entry else {
        return Ok(Authorized {
            access_as: CiAccessAs::default(),
            default_namespace: None,
            matched,
        });
    };
    let admitted = entry.environments.is_empty()
        || job.environment.as_deref().is_some_and(|env| {
            entry
                .environments
                .iter()
                .any(|pattern| environment_matches(pattern, env))
        });
    if !admitted {
        return Err(Denied::EnvironmentNotAllowed {
            environment: job.environment.clone(),
            matched,
        });
    }
    Ok(Authorized {
        access_as: entry.access_as.clone(),
        default_namespace: entry.default_namespace.clone(),
        matched,
    })
}

/// Whether environment `name` matches `pattern`: equal, or equal with each `*` in the pattern
/// standing for any (possibly empty) run of characters. Case-sensitive, as GitLab environment
/// names are. An empty pattern matches nothing.
pub fn environment_matches(pattern: &str, name: &str) -> bool {
    if pattern.is_empty() {
        return false;
    }
    // Greedy wildcard matching with backtracking to the last `*` only: linear in practice and
    // never exponential, whatever the pattern.
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((star_pi, star_ni)) = star {
            pi = star_pi + 1;
            ni = star_ni + 1;
            star = Some((star_pi, star_ni + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// The first path segment (the top-level group or user namespace).
fn top_level(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

/// Whether `path` lies strictly below namespace `ancestor` (case-insensitive).
fn is_inside(path: &str, ancestor: &str) -> bool {
    path.len() > ancestor.len()
        && path.as_bytes()[ancestor.len()] == b'/'
        && path
            .get(..ancestor.len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(ancestor))
}

/// A GitLab role, ordered by power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLevel {
    /// Guest (10).
    Guest,
    /// Planner (15).
    Planner,
    /// Reporter (20).
    Reporter,
    /// Developer (30): the least needed for user access.
    Developer,
    /// Maintainer (40).
    Maintainer,
    /// Owner (50).
    Owner,
}

impl AccessLevel {
    /// Every level, lowest first.
    pub const ALL: [AccessLevel; 6] = [
        AccessLevel::Guest,
        AccessLevel::Planner,
        AccessLevel::Reporter,
        AccessLevel::Developer,
        AccessLevel::Maintainer,
        AccessLevel::Owner,
    ];

    /// GitLab's name for the role, as used in impersonated group names.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLevel::Guest => "guest",
            AccessLevel::Planner => "planner",
            AccessLevel::Reporter => "reporter",
            AccessLevel::Developer => "developer",
            AccessLevel::Maintainer => "maintainer",
            AccessLevel::Owner => "owner",
        }
    }
}

/// Whether a membership is of a project or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipKind {
    /// Direct membership of a project.
    Project,
    /// Membership of a group (inherited by its subgroups and projects).
    Group,
}

/// One of the user's memberships, as kas's user store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Project or group.
    pub kind: MembershipKind,
    /// Full path of the project or group.
    pub path: String,
    /// Its numeric id, when known.
    pub id: Option<i64>,
    /// The user's role there.
    pub access_level: AccessLevel,
}

/// The owner of a personal access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIdentity {
    /// GitLab username.
    pub username: String,
    /// The agent the token was issued for.
    pub token_agent_id: i64,
    /// The user's memberships.
    pub memberships: Vec<Membership>,
}

/// The roles a user holds in one authorized project or group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleGrant {
    /// The `user_access` entry's path.
    pub path: String,
    /// Its numeric id, when a membership names it (needed for the impersonated group names).
    pub id: Option<i64>,
    /// Role names from `guest` up to the user's level.
    pub roles: Vec<String>,
}

/// A user may use the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAuthorized {
    /// Identity for the user's requests.
    pub access_as: UserAccessAs,
    /// Roles in each authorized `user_access.projects` entry.
    pub project_roles: Vec<RoleGrant>,
    /// Roles in each authorized `user_access.groups` entry.
    pub group_roles: Vec<RoleGrant>,
}

/// Decides whether `user` (the owner of a personal access token) may use agent `agent_id`,
/// whose configuration has `user_access` (or none).
pub fn authorize_user(
    user_access: Option<&UserAccess>,
    agent_id: i64,
    user: &UserIdentity,
) -> Result<UserAuthorized, Denied> {
    // A token is scoped to one agent, so a leaked token for a sandbox agent cannot reach
    // production through another.
    if user.token_agent_id != agent_id {
        return Err(Denied::WrongAgent {
            agent_id,
            token_agent_id: user.token_agent_id,
        });
    }
    let user_access = user_access.ok_or(Denied::UserAccessNotConfigured)?;

    let project_roles: Vec<RoleGrant> = user_access
        .projects
        .iter()
        .filter_map(|entry| {
            grant(user, &entry.id, |m| match m.kind {
                MembershipKind::Project => m.path.eq_ignore_ascii_case(&entry.id),
                MembershipKind::Group => is_inside(&entry.id, &m.path),
            })
        })
        .collect();
    let group_roles: Vec<RoleGrant> = user_access
        .groups
        .iter()
        .filter_map(|entry| {
            grant(user, &entry.id, |m| {
                m.kind == MembershipKind::Group
                    && (m.path.eq_ignore_ascii_case(&entry.id) || is_inside(&entry.id, &m.path))
            })
        })
        .collect();
    if project_roles.is_empty() && group_roles.is_empty() {
        return Err(Denied::NotAMember {
            username: user.username.clone(),
        });
    }
    Ok(UserAuthorized {
        access_as: user_access.access_as.clone(),
        project_roles,
        group_roles,
    })
}

/// The user's roles in the entry at `path`, from the highest membership that `applies`;
/// `None` below Developer.
fn grant(
    user: &UserIdentity,
    path: &str,
    applies: impl Fn(&Membership) -> bool,
) -> Option<RoleGrant> {
    let memberships: Vec<&Membership> = user.memberships.iter().filter(|m| applies(m)).collect();
    let level = memberships.iter().map(|m| m.access_level).max()?;
    if level < AccessLevel::Developer {
        return None;
    }
    // Only a membership of the entry itself tells its id; inherited ones are of an ancestor.
    let id = memberships
        .iter()
        .find(|m| m.path.eq_ignore_ascii_case(path))
        .and_then(|m| m.id);
    Some(RoleGrant {
        path: path.to_owned(),
        id,
        roles: roles_up_to(level).into_iter().map(str::to_owned).collect(),
    })
}
