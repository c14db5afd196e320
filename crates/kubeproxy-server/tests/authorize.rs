//! Authorization of CI jobs and users against `ci_access` / `user_access`.

use tether_agent_config::{AgentConfig, AsAgent, AsUser, CiAccessAs, UserAccessAs};
use tether_kubeproxy_server::{
    AccessLevel, Authorized, CiIdentity, Denied, MatchedBy, Membership, MembershipKind, RoleGrant,
    UserIdentity, authorize_ci, authorize_user, environment_matches,
};

const CONFIG_PROJECT: &str = "acme/infra/agents";

fn config(yaml: &str) -> AgentConfig {
    tether_agent_config::parse(yaml).unwrap_or_else(|err| panic!("test config: {err}"))
}

fn job(project_path: &str, environment: Option<&str>) -> CiIdentity {
    CiIdentity {
        issuer: "https://gitlab.example.com".into(),
        project_path: project_path.into(),
        project_id: Some(22),
        job_id: 1,
        pipeline_id: 2,
        environment: environment.map(str::to_owned),
        environment_tier: None,
        namespace_path: project_path
            .rsplit_once('/')
            .map(|(ns, _)| ns.to_owned())
            .unwrap_or_default(),
        user: None,
    }
}

fn ci_job() -> CiAccessAs {
    CiAccessAs::CiJob(tether_agent_config::AsCiJob {})
}

fn agent() -> CiAccessAs {
    CiAccessAs::Agent(AsAgent {})
}

fn impersonating(username: &str) -> CiAccessAs {
    CiAccessAs::Impersonate(tether_agent_config::Impersonate {
        username: username.into(),
        groups: vec![],
        uid: None,
        extra: vec![],
    })
}

const CI_CONFIG: &str = r#"
ci_access:
  projects:
    - id: acme/web/shop
      default_namespace: shop
      access_as:
        impersonate:
          username: shop-deployer
    - id: acme/web/restricted
      environments: [production]
    - id: acme/infra/agents
      access_as:
        ci_job: {}
  groups:
    - id: acme
      default_namespace: acme-default
    - id: acme/web
      default_namespace: web
      access_as:
        ci_job: {}
    - id: acme/web/review-apps
      environments: ["review/*", "staging"]
      default_namespace: review
"#;

#[test]
fn ci_precedence_and_environments() {
    let cfg = config(CI_CONFIG);
    let ok = |access_as: CiAccessAs, ns: Option<&str>, matched: MatchedBy| {
        Ok(Authorized {
            access_as,
            default_namespace: ns.map(str::to_owned),
            matched,
        })
    };
    let cases: Vec<(&str, CiIdentity, Result<Authorized, Denied>)> = vec![
        (
            "project entry wins over its groups",
            job("acme/web/shop", None),
            ok(
                impersonating("shop-deployer"),
                Some("shop"),
                MatchedBy::Project("acme/web/shop".into()),
            ),
        ),
        (
            "project paths compare case-insensitively",
            job("ACME/Web/Shop", None),
            ok(
                impersonating("shop-deployer"),
                Some("shop"),
                MatchedBy::Project("acme/web/shop".into()),
            ),
        ),
        (
            "innermost group wins over the outer one",
            job("acme/web/blog", Some("production")),
            ok(ci_job(), Some("web"), MatchedBy::Group("acme/web".into())),
        ),
        (
            "outer group covers projects deep below it",
            job("acme/data/lake/ingest", None),
            ok(
                agent(),
                Some("acme-default"),
                MatchedBy::Group("acme".into()),
            ),
        ),
        (
            "group wildcard environment admits review/x",
            job("acme/web/review-apps/app", Some("review/feature-1")),
            ok(
                agent(),
                Some("review"),
                MatchedBy::Group("acme/web/review-apps".into()),
            ),
        ),
        (
            "exact environment in a list",
            job("acme/web/review-apps/app", Some("staging")),
            ok(
                agent(),
                Some("review"),
                MatchedBy::Group("acme/web/review-apps".into()),
            ),
        ),
        (
            "the deciding entry's environments refuse; outer groups are not consulted",
            job("acme/web/review-apps/app", Some("production")),
            Err(Denied::EnvironmentNotAllowed {
                environment: Some("production".into()),
                matched: MatchedBy::Group("acme/web/review-apps".into()),
            }),
        ),
        (
            "an environment filter refuses jobs without an environment",
            job("acme/web/restricted", None),
            Err(Denied::EnvironmentNotAllowed {
                environment: None,
                matched: MatchedBy::Project("acme/web/restricted".into()),
            }),
        ),
        (
            "project environment filter admits its environment",
            job("acme/web/restricted", Some("production")),
            ok(
                agent(),
                None,
                MatchedBy::Project("acme/web/restricted".into()),
            ),
        ),
        (
            "listing the config project overrides the implicit authorization",
            job("acme/infra/agents", None),
            ok(
                ci_job(),
                None,
                MatchedBy::Project("acme/infra/agents".into()),
            ),
        ),
        (
            "a group prefix must end at a path separator",
            job("acme/webshop/app", None),
            ok(
                agent(),
                Some("acme-default"),
                MatchedBy::Group("acme".into()),
            ),
        ),
        (
            "another top-level namespace is out of reach",
            job("other/web/shop", None),
            Err(Denied::OutsideHierarchy {
                project: "other/web/shop".into(),
                root: "acme".into(),
            }),
        ),
        (
            "a namespace merely starting like ours is another namespace",
            job("acme-evil/app", None),
            Err(Denied::OutsideHierarchy {
                project: "acme-evil/app".into(),
                root: "acme".into(),
            }),
        ),
    ];
    for (name, job, want) in cases {
        assert_eq!(
            authorize_ci(&cfg.ci_access, CONFIG_PROJECT, &job),
            want,
            "{name}"
        );
    }
}

#[test]
fn ci_unlisted_projects_and_the_implicit_config_project() {
    let cfg = config(
        r#"
ci_access:
  projects:
    - id: acme/app
"#,
    );
    assert_eq!(
        authorize_ci(&cfg.ci_access, CONFIG_PROJECT, &job("acme/other", None)),
        Err(Denied::NotAuthorized {
            project: "acme/other".into()
        })
    );
    // The configuration project's own jobs may use the agent without being listed, as the
    // agent itself and with any environment.
    for (project, env) in [
        ("acme/infra/agents", None),
        ("Acme/Infra/Agents", Some("production")),
    ] {
        assert_eq!(
            authorize_ci(&cfg.ci_access, CONFIG_PROJECT, &job(project, env)),
            Ok(Authorized {
                access_as: agent(),
                default_namespace: None,
                matched: MatchedBy::ConfigProject(CONFIG_PROJECT.into()),
            }),
            "{project}"
        );
    }
    // An empty configuration still authorizes the config project, and only it.
    let empty = config("");
    assert!(authorize_ci(&empty.ci_access, CONFIG_PROJECT, &job(CONFIG_PROJECT, None)).is_ok());
    let denied = authorize_ci(&empty.ci_access, CONFIG_PROJECT, &job("acme/app", None))
        .expect_err("unlisted");
    assert_eq!(denied.status(), http::StatusCode::FORBIDDEN);
    assert!(denied.to_string().contains("acme/app"), "{denied}");
}

#[test]
fn the_configuration_project_can_opt_out_of_its_implicit_access() {
    let off = config("ci_access:\n  configuration_project: false\n");
    let denied = authorize_ci(&off.ci_access, CONFIG_PROJECT, &job(CONFIG_PROJECT, None))
        .expect_err("opted out");
    assert_eq!(
        denied,
        Denied::ConfigurationProjectOptedOut {
            project: CONFIG_PROJECT.into()
        }
    );
    assert_eq!(denied.status(), http::StatusCode::FORBIDDEN);
    assert!(
        denied.to_string().contains("configuration_project"),
        "the message names the setting: {denied}"
    );

    // Listed anyway, the entry decides (with its own access_as).
    let listed = config(
        "ci_access:\n  configuration_project: false\n  projects:\n  - id: acme/infra/agents\n    access_as:\n      ci_job: {}\n",
    );
    assert_eq!(
        authorize_ci(
            &listed.ci_access,
            CONFIG_PROJECT,
            &job(CONFIG_PROJECT, None)
        ),
        Ok(Authorized {
            access_as: ci_job(),
            default_namespace: None,
            matched: MatchedBy::Project(CONFIG_PROJECT.into()),
        })
    );
    // A group holding it now applies, like to any other project; with the implicit access on,
    // the implicit access wins over the group (GitLab's order).
    let group = |on: bool| {
        config(&format!(
            "ci_access:\n  configuration_project: {on}\n  groups:\n  - id: acme/infra\n    access_as:\n      ci_job: {{}}\n"
        ))
    };
    let by_group = authorize_ci(
        &group(false).ci_access,
        CONFIG_PROJECT,
        &job(CONFIG_PROJECT, None),
    );
    assert_eq!(
        by_group.map(|a| (a.access_as, a.matched)),
        Ok((ci_job(), MatchedBy::Group("acme/infra".into())))
    );
    let implicit = authorize_ci(
        &group(true).ci_access,
        CONFIG_PROJECT,
        &job(CONFIG_PROJECT, None),
    );
    assert_eq!(
        implicit.map(|a| (a.access_as, a.matched)),
        Ok((agent(), MatchedBy::ConfigProject(CONFIG_PROJECT.into())))
    );
    // Other projects are unaffected.
    assert_eq!(
        authorize_ci(&off.ci_access, CONFIG_PROJECT, &job("acme/app", None)),
        Err(Denied::NotAuthorized {
            project: "acme/app".into()
        })
    );
}

#[test]
fn environment_patterns() {
    let cases = [
        ("production", "production", true),
        ("production", "Production", false),
        ("production", "production-eu", false),
        ("review/*", "review/feature-1", true),
        ("review/*", "review/", true),
        ("review/*", "review/a/b", true),
        ("review/*", "old-review/x", false),
        ("review/*", "review", false),
        ("*", "anything", true),
        ("*", "", true),
        ("*-eu", "prod-eu", true),
        ("*-eu", "prod-us", false),
        ("prod*-*", "prod-1-eu", true),
        ("prod*-*", "production", false),
        ("a*b*c", "aXbYc", true),
        ("a*b*c", "aXbYcZ", false),
        ("a*b*c", "abbbc", true),
        // Other characters are literal, not regular-expression syntax.
        ("prod.eu", "prodXeu", false),
        ("prod.eu", "prod.eu", true),
        ("", "", false),
        ("", "x", false),
    ];
    for (pattern, name, want) in cases {
        assert_eq!(
            environment_matches(pattern, name),
            want,
            "{pattern:?} vs {name:?}"
        );
    }
}

fn member(kind: MembershipKind, path: &str, id: i64, level: AccessLevel) -> Membership {
    Membership {
        kind,
        path: path.into(),
        id: Some(id),
        access_level: level,
    }
}

fn user(memberships: Vec<Membership>) -> UserIdentity {
    UserIdentity {
        username: "alice".into(),
        token_agent_id: 7,
        memberships,
    }
}

fn roles(list: &[&str]) -> Vec<String> {
    list.iter().map(|r| (*r).to_owned()).collect()
}

#[test]
fn users() {
    use AccessLevel::*;
    use MembershipKind::{Group, Project};
    let cfg = config(
        r#"
user_access:
  access_as:
    user: {}
  projects:
    - id: acme/web/shop
  groups:
    - id: acme/ops
"#,
    );
    let ua = cfg.user_access.as_ref();
    let dev = ["guest", "planner", "reporter", "developer"];

    // A developer of the listed project.
    let got = authorize_user(
        ua,
        7,
        &user(vec![member(Project, "acme/web/shop", 22, Developer)]),
    )
    .expect("authorized");
    assert_eq!(got.access_as, UserAccessAs::User(AsUser {}));
    assert_eq!(
        got.project_roles,
        vec![RoleGrant {
            path: "acme/web/shop".into(),
            id: Some(22),
            roles: roles(&dev),
        }]
    );
    assert!(got.group_roles.is_empty());

    // Maintainer of an ancestor group: inherited into the project and the group entry.
    let got = authorize_user(ua, 7, &user(vec![member(Group, "acme", 1, Maintainer)]))
        .expect("authorized");
    let maint = ["guest", "planner", "reporter", "developer", "maintainer"];
    assert_eq!(
        got.project_roles,
        vec![RoleGrant {
            path: "acme/web/shop".into(),
            id: None,
            roles: roles(&maint),
        }]
    );
    assert_eq!(
        got.group_roles,
        vec![RoleGrant {
            path: "acme/ops".into(),
            id: None,
            roles: roles(&maint),
        }]
    );

    // The highest applicable membership counts, and a direct one tells the id.
    let got = authorize_user(
        ua,
        7,
        &user(vec![
            member(Group, "acme/ops", 9, Reporter),
            member(Group, "acme", 1, Owner),
        ]),
    )
    .expect("authorized");
    assert_eq!(got.group_roles.len(), 1);
    assert_eq!(got.group_roles[0].id, Some(9));
    assert_eq!(got.group_roles[0].roles.len(), 6);

    let denied = |memberships| authorize_user(ua, 7, &user(memberships));
    let not_member = Err(Denied::NotAMember {
        username: "alice".into(),
    });
    // Reporter is not enough.
    assert_eq!(
        denied(vec![member(Project, "acme/web/shop", 22, Reporter)]),
        not_member
    );
    // Membership of a sibling project or a subgroup does not reach up.
    assert_eq!(
        denied(vec![
            member(Project, "acme/web/blog", 23, Owner),
            member(Group, "acme/ops/sub", 10, Owner),
            member(Project, "acme/ops", 11, Owner),
        ]),
        not_member
    );
    assert_eq!(denied(vec![]), not_member);

    // The token was issued for another agent.
    assert_eq!(
        authorize_user(
            ua,
            8,
            &user(vec![member(Project, "acme/web/shop", 22, Owner)])
        ),
        Err(Denied::WrongAgent {
            agent_id: 8,
            token_agent_id: 7
        })
    );
    // No user_access at all.
    assert_eq!(
        authorize_user(
            None,
            7,
            &user(vec![member(Project, "acme/web/shop", 22, Owner)])
        ),
        Err(Denied::UserAccessNotConfigured)
    );

    // access_as agent is passed through.
    let cfg = config(
        r#"
user_access:
  access_as:
    agent: {}
  groups:
    - id: acme
"#,
    );
    let got = authorize_user(
        cfg.user_access.as_ref(),
        7,
        &user(vec![member(Group, "acme", 1, Developer)]),
    )
    .expect("authorized");
    assert_eq!(got.access_as, UserAccessAs::Agent(AsAgent {}));
}
