//! Table tests of the documented `config.yaml` schema: defaults, enum values, validation rules,
//! and the shape of error messages (key path and line).

use std::time::Duration;

use tether_agent_config::{
    AgentConfig, AsAgent, AsCiJob, AsUser, CiAccessAs, CiAccessEntry, ConfigError,
    DEFAULT_DRIFT_MANAGERS, DryRunStrategy, EntryRef, ExtraKeyVal, GitRef, Gitops, Impersonate,
    InventoryPolicy, LogLevel, MAX_CONFIG_SIZE, MAX_PATHS_PER_PROJECT, MAX_TIMEOUT,
    MAX_USER_ACCESS_ENTRIES, ManifestProject, PathGlob, ProjectRef, PrunePropagationPolicy,
    UserAccess, UserAccessAs, UserAccessEntry, parse, parse_bytes,
};

fn ok(yaml: &str) -> AgentConfig {
    match parse(yaml) {
        Ok(config) => config,
        Err(e) => panic!("expected {yaml:?} to parse, got: {e}"),
    }
}

fn err(yaml: &str) -> ConfigError {
    match parse(yaml) {
        Ok(config) => panic!("expected {yaml:?} to be refused, got {config:?}"),
        Err(e) => e,
    }
}

/// Wraps one manifest project's extra lines (indented 4 spaces) after `id: a/b`.
fn project(extra: &str) -> String {
    format!("gitops:\n  manifest_projects:\n  - id: a/b\n{extra}")
}

fn only_project(yaml: &str) -> ManifestProject {
    let mut config = ok(yaml);
    assert_eq!(config.gitops.manifest_projects.len(), 1);
    config.gitops.manifest_projects.remove(0)
}

const SEED: &str = "\
gitops:
  manifest_projects:
  - id: group/manifests
    paths:
    - glob: '/manifests/*.{yaml,yml,json}'
";

#[test]
fn empty_documents_are_the_default_config() {
    for yaml in [
        "",
        "\n\n   \n",
        "# just a comment\n# and another\n",
        "null\n",
        "~\n",
        "---\n",
        "gitops:\nci_access:\nobservability:\n",
        "gitops: {}\nci_access: {}\nobservability: {logging: {}}\n",
    ] {
        assert_eq!(ok(yaml), AgentConfig::default(), "{yaml:?}");
    }
    let empty = AgentConfig::default();
    assert!(empty.gitops.manifest_projects.is_empty());
    assert!(empty.ci_access.projects.is_empty());
    assert!(empty.ci_access.groups.is_empty());
    assert_eq!(empty.user_access, None);
    assert_eq!(empty.observability.logging.level, LogLevel::Info);
    assert_eq!(empty.observability.logging.grpc_level, LogLevel::Error);
}

#[test]
fn seed_config_parses_with_defaults() {
    let p = only_project(SEED);
    assert_eq!(p.id, ProjectRef::Path("group/manifests".to_owned()));
    assert_eq!(
        p.paths,
        vec![PathGlob {
            glob: "/manifests/*.{yaml,yml,json}".to_owned()
        }]
    );
    let mut want = ManifestProject::new(ProjectRef::Path("group/manifests".to_owned()));
    want.paths = p.paths.clone();
    assert_eq!(p, want);
}

#[test]
fn manifest_project_defaults() {
    let p = only_project(&project(""));
    assert_eq!(p.default_namespace, "default");
    assert_eq!(
        p.paths,
        vec![PathGlob {
            glob: "**/*.{yaml,yml,json}".to_owned()
        }]
    );
    assert_eq!(p.reconcile_timeout, Duration::from_secs(3600));
    assert_eq!(p.dry_run_strategy, DryRunStrategy::None);
    assert!(p.prune);
    assert_eq!(p.prune_timeout, Duration::from_secs(3600));
    assert_eq!(
        p.prune_propagation_policy,
        PrunePropagationPolicy::Foreground
    );
    assert_eq!(p.inventory_policy, InventoryPolicy::MustMatch);
    assert_eq!(p.git_ref, None);
    assert_eq!(p, ManifestProject::new(ProjectRef::Path("a/b".to_owned())));
    // An empty or null `paths` list gets the default glob too, as upstream.
    for extra in ["    paths: []\n", "    paths:\n", "    ref:\n"] {
        assert_eq!(
            only_project(&project(extra)),
            ManifestProject::new(ProjectRef::Path("a/b".to_owned())),
            "{extra:?}"
        );
    }
}

#[test]
fn manifest_project_explicit_values() {
    let p = only_project(&project(
        "    default_namespace: apps
    paths:
    - glob: 'a/**/*.yaml'
    - glob: b/*.json
    reconcile_timeout: 10m
    dry_run_strategy: server
    prune: false
    prune_timeout: 1h30m
    prune_propagation_policy: orphan
    inventory_policy: adopt_all
    ref:
      tag: v1.2.3
",
    ));
    assert_eq!(p.default_namespace, "apps");
    assert_eq!(p.paths.len(), 2);
    assert_eq!(p.paths[1].glob, "b/*.json");
    assert_eq!(p.reconcile_timeout, Duration::from_secs(600));
    assert_eq!(p.dry_run_strategy, DryRunStrategy::Server);
    assert!(!p.prune);
    assert_eq!(p.prune_timeout, Duration::from_secs(5400));
    assert_eq!(p.prune_propagation_policy, PrunePropagationPolicy::Orphan);
    assert_eq!(p.inventory_policy, InventoryPolicy::AdoptAll);
    assert_eq!(p.git_ref, Some(GitRef::Tag("v1.2.3".to_owned())));
}

#[test]
fn enum_values() {
    for (text, want) in [
        ("none", DryRunStrategy::None),
        ("client", DryRunStrategy::Client),
        ("server", DryRunStrategy::Server),
    ] {
        let p = only_project(&project(&format!("    dry_run_strategy: {text}\n")));
        assert_eq!(p.dry_run_strategy, want);
    }
    for (text, want) in [
        ("orphan", PrunePropagationPolicy::Orphan),
        ("background", PrunePropagationPolicy::Background),
        ("foreground", PrunePropagationPolicy::Foreground),
    ] {
        let p = only_project(&project(&format!("    prune_propagation_policy: {text}\n")));
        assert_eq!(p.prune_propagation_policy, want);
    }
    for (text, want) in [
        ("must_match", InventoryPolicy::MustMatch),
        ("adopt_if_no_inventory", InventoryPolicy::AdoptIfNoInventory),
        ("adopt_all", InventoryPolicy::AdoptAll),
    ] {
        let p = only_project(&project(&format!("    inventory_policy: {text}\n")));
        assert_eq!(p.inventory_policy, want);
    }
    for (text, want) in [
        ("info", LogLevel::Info),
        ("debug", LogLevel::Debug),
        ("warn", LogLevel::Warn),
        ("error", LogLevel::Error),
    ] {
        let c = ok(&format!(
            "observability:\n  logging:\n    level: {text}\n    grpc_level: {text}\n"
        ));
        assert_eq!(c.observability.logging.level, want);
        assert_eq!(c.observability.logging.grpc_level, want);
        assert_eq!(want.as_str(), text);
    }
}

#[test]
fn bad_enum_values_name_path_line_and_choices() {
    let cases = [
        (
            project("    prune: false\n    dry_run_strategy: sometimes\n"),
            "gitops.manifest_projects[0].dry_run_strategy: unknown variant \"sometimes\", \
             expected one of none, client, server (line 5)",
        ),
        (
            project("    prune_propagation_policy: Foreground\n"),
            "gitops.manifest_projects[0].prune_propagation_policy: unknown variant \
             \"Foreground\", expected one of orphan, background, foreground (line 4)",
        ),
        (
            project("    inventory_policy: adopt\n"),
            "gitops.manifest_projects[0].inventory_policy: unknown variant \"adopt\", \
             expected one of must_match, adopt_if_no_inventory, adopt_all (line 4)",
        ),
        (
            "observability:\n  logging:\n    level: trace\n".to_owned(),
            "observability.logging.level: unknown variant \"trace\", \
             expected one of info, debug, warn, error (line 3)",
        ),
        (
            "observability:\n  logging:\n    grpc_level: fatal\n".to_owned(),
            "observability.logging.grpc_level: unknown variant \"fatal\", \
             expected one of info, debug, warn, error (line 3)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(&yaml).to_string(), want);
    }
}

#[test]
fn unknown_keys_are_refused_with_path_and_line() {
    let cases = [
        ("foo: 1\n", "foo", 1),
        ("# header\n\ngitopz: {}\n", "gitopz", 3),
        ("gitops:\n  projects: []\n", "gitops.projects", 2),
        (
            &*project("    pathz: []\n"),
            "gitops.manifest_projects[0].pathz",
            4,
        ),
        (
            &*project("    paths:\n    - glob: x\n      recursive: true\n"),
            "gitops.manifest_projects[0].paths[0].recursive",
            6,
        ),
        (
            &*project("    ref:\n      sha: abc\n"),
            "gitops.manifest_projects[0].ref.sha",
            5,
        ),
        (
            "ci_access:\n  projects:\n  - id: a/b\n    access_as:\n      agent: {x: 1}\n",
            "ci_access.projects[0].access_as.agent.x",
            5,
        ),
        (
            "user_access:\n  access_as: {user: {}}\n  projects:\n  - id: a/b\n    name: b\n",
            "user_access.projects[0].name",
            5,
        ),
        (
            "observability:\n  logging:\n    levle: debug\n",
            "observability.logging.levle",
            3,
        ),
    ];
    for (yaml, path, line) in cases {
        let e = err(yaml);
        assert_eq!(e.path(), Some(path), "{yaml:?}: {e}");
        assert_eq!(e.line(), Some(line), "{yaml:?}: {e}");
        let text = e.to_string();
        assert!(text.starts_with(&format!("{path}: unknown key ")), "{text}");
        assert!(text.ends_with(&format!("(line {line})")), "{text}");
    }
    assert_eq!(
        err("foo: 1\n").to_string(),
        "foo: unknown key \"foo\", expected one of gitops, ci_access, user_access, \
         observability (line 1)"
    );
}

#[test]
fn git_ref() {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    for (yaml, want) in [
        ("branch: main", GitRef::Branch("main".to_owned())),
        ("tag: v1", GitRef::Tag("v1".to_owned())),
        (
            &*format!("commit: {commit}"),
            GitRef::Commit(commit.to_owned()),
        ),
    ] {
        let p = only_project(&project(&format!("    ref:\n      {yaml}\n")));
        assert_eq!(p.git_ref, Some(want));
    }

    let cases = [
        (
            project("    ref: {}\n"),
            "gitops.manifest_projects[0].ref: exactly one of branch, tag, commit must be set, \
             found none (line 4)",
        ),
        (
            project("    ref:\n      branch: main\n      tag: v1\n"),
            "gitops.manifest_projects[0].ref: exactly one of branch, tag, commit must be set, \
             found 2: branch, tag (line 4)",
        ),
        (
            project(&format!(
                "    ref: {{branch: a, tag: b, commit: {commit}}}\n"
            )),
            "gitops.manifest_projects[0].ref: exactly one of branch, tag, commit must be set, \
             found 3: branch, tag, commit (line 4)",
        ),
        (
            project("    ref:\n      commit: abc123\n"),
            "gitops.manifest_projects[0].ref.commit: \"abc123\" is not a commit id \
             (expected 40 hexadecimal digits) (line 5)",
        ),
        (
            project(&format!("    ref:\n      commit: {}z\n", &commit[..39])),
            "gitops.manifest_projects[0].ref.commit: \"0123456789abcdef0123456789abcdef0123456z\" \
             is not a commit id (expected 40 hexadecimal digits) (line 5)",
        ),
        (
            project("    ref:\n      branch: ''\n"),
            "gitops.manifest_projects[0].ref.branch: must not be empty (line 5)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(&yaml).to_string(), want);
    }
}

#[test]
fn project_ids_numeric_and_path() {
    let c = ok("gitops:
  manifest_projects:
  - id: 123
  - id: '456'
  - id: group/sub/name
  - id: top
");
    let ids: Vec<_> = c
        .gitops
        .manifest_projects
        .iter()
        .map(|p| p.id.clone())
        .collect();
    assert_eq!(
        ids,
        vec![
            ProjectRef::Numeric(123),
            ProjectRef::Numeric(456),
            ProjectRef::Path("group/sub/name".to_owned()),
            ProjectRef::Path("top".to_owned()),
        ]
    );
    assert_eq!(ProjectRef::Numeric(7).to_string(), "7");

    let cases = [
        (
            "gitops:\n  manifest_projects:\n  - default_namespace: x\n",
            "gitops.manifest_projects[0]: missing required key \"id\" (line 3)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: -5\n",
            "gitops.manifest_projects[0].id: project id -5 must be positive (line 3)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: 'group//name'\n",
            "gitops.manifest_projects[0].id: \"group//name\" is not a valid project path \
             (expected e.g. \"group/subgroup/name\") (line 3)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: ''\n",
            "gitops.manifest_projects[0].id: \"\" is not a valid project path \
             (expected e.g. \"group/subgroup/name\") (line 3)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml).to_string(), want);
    }
}

#[test]
fn duplicate_ids_are_refused() {
    let cases = [
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n  - id: c/d\n  - id: a/b\n",
            "gitops.manifest_projects[2].id: duplicate project id \"a/b\", \
             already used by gitops.manifest_projects[0] (to list a project more than once, \
             give each of its entries a name); an entry that already synced and gets a name \
             starts with a new, empty inventory: its objects are taken over only with \
             inventory_policy: adopt_all (line 5)",
        ),
        (
            // GitLab paths are case-insensitive.
            "gitops:\n  manifest_projects:\n  - id: Group/App\n  - id: group/app\n",
            "gitops.manifest_projects[1].id: duplicate project id \"group/app\", \
             already used by gitops.manifest_projects[0] (to list a project more than once, \
             give each of its entries a name); an entry that already synced and gets a name \
             starts with a new, empty inventory: its objects are taken over only with \
             inventory_policy: adopt_all (line 4)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: 42\n  - id: '42'\n",
            "gitops.manifest_projects[1].id: duplicate project id \"42\", \
             already used by gitops.manifest_projects[0] (to list a project more than once, \
             give each of its entries a name); an entry that already synced and gets a name \
             starts with a new, empty inventory: its objects are taken over only with \
             inventory_policy: adopt_all (line 4)",
        ),
        (
            "ci_access:\n  projects:\n  - id: a/b\n  - id: a/b\n",
            "ci_access.projects[1].id: duplicate project id \"a/b\", \
             already used by ci_access.projects[0] (line 4)",
        ),
        (
            "ci_access:\n  groups:\n  - id: g\n  - id: h\n  - id: g\n",
            "ci_access.groups[2].id: duplicate group id \"g\", \
             already used by ci_access.groups[0] (line 5)",
        ),
        (
            "user_access:\n  access_as: {agent: {}}\n  groups:\n  - id: g\n  - id: g\n",
            "user_access.groups[1].id: duplicate group id \"g\", \
             already used by user_access.groups[0] (line 5)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml).to_string(), want);
    }
    // The same path as a project and as a group is fine: they are different lists.
    ok("ci_access:\n  projects:\n  - id: a/b\n  groups:\n  - id: a/b\n");
    // Different manifest projects may share nothing but their defaults.
    ok("gitops:\n  manifest_projects:\n  - id: a/b\n  - id: a/c\n");
}

#[test]
fn namespaces_must_be_rfc1123_labels() {
    for good in ["default", "gitlab-agent", "ns1", "a"] {
        let p = only_project(&project(&format!("    default_namespace: {good}\n")));
        assert_eq!(p.default_namespace, good);
    }
    for bad in ["Default", "my_ns", "-ns", "ns-", "a.b", "''"] {
        let e = err(&project(&format!("    default_namespace: {bad}\n")));
        assert_eq!(
            e.path(),
            Some("gitops.manifest_projects[0].default_namespace"),
            "{bad}"
        );
        assert_eq!(e.line(), Some(4), "{bad}");
        assert!(
            e.to_string().contains("is not a valid namespace name"),
            "{e}"
        );
    }
    let long = "a".repeat(64);
    assert!(parse(&project(&format!("    default_namespace: {long}\n"))).is_err());
    let e = err("ci_access:\n  groups:\n  - id: g\n    default_namespace: Bad\n");
    assert_eq!(e.path(), Some("ci_access.groups[0].default_namespace"));
    assert_eq!(e.line(), Some(4));
}

#[test]
fn paths_rules() {
    let e = err(&project("    paths:\n    - glob: '../x/*.yaml'\n"));
    assert_eq!(
        e.to_string(),
        "gitops.manifest_projects[0].paths[0].glob: \"../x/*.yaml\" has a '..' component: globs select files inside the manifest project, from its root (line 5)"
    );
    assert!(parse(&project("    paths:\n    - glob: '/a..b/*.yaml'\n")).is_ok());
    let e = err(&project("    paths:\n    - glob: ''\n"));
    assert_eq!(
        e.to_string(),
        "gitops.manifest_projects[0].paths[0].glob: must not be empty (line 5)"
    );
    let e = err(&project("    paths:\n    - {}\n"));
    assert_eq!(
        e.to_string(),
        "gitops.manifest_projects[0].paths[0]: missing required key \"glob\" (line 5)"
    );

    let list = |n: usize| -> String {
        let mut s = String::from("    paths:\n");
        for i in 0..n {
            s.push_str(&format!("    - glob: 'dir{i}/*.yaml'\n"));
        }
        project(&s)
    };
    assert_eq!(
        only_project(&list(MAX_PATHS_PER_PROJECT)).paths.len(),
        MAX_PATHS_PER_PROJECT
    );
    assert_eq!(
        err(&list(MAX_PATHS_PER_PROJECT + 1)).to_string(),
        "gitops.manifest_projects[0].paths: 101 paths, at most 100 are allowed (line 4)"
    );
}

#[test]
fn durations() {
    for (text, secs) in [
        ("3600s", 3600),
        ("1h", 3600),
        ("10m", 600),
        ("1h30m", 5400),
        ("90s", 90),
        ("'1h 30m'", 5400),
        ("2hours", 7200),
        ("1s", 1),
    ] {
        let p = only_project(&project(&format!(
            "    reconcile_timeout: {text}\n    prune_timeout: {text}\n"
        )));
        assert_eq!(p.reconcile_timeout, Duration::from_secs(secs), "{text}");
        assert_eq!(p.prune_timeout, Duration::from_secs(secs), "{text}");
    }
    let p = only_project(&project("    reconcile_timeout: 1.5s\n"));
    assert_eq!(p.reconcile_timeout, Duration::from_millis(1500));

    for bad in ["forever", "-1h", "3600", "1y2"] {
        let e = err(&project(&format!("    prune_timeout: {bad}\n")));
        assert_eq!(
            e.path(),
            Some("gitops.manifest_projects[0].prune_timeout"),
            "{bad}: {e}"
        );
        assert_eq!(e.line(), Some(4), "{bad}: {e}");
    }
}

/// Timeouts past a week are refused with their key and the limit, up to the largest duration
/// that parses (2^64 - 1 seconds), which agentk's clock arithmetic used to overflow on.
#[test]
fn timeouts_over_a_week_are_refused() {
    let week = only_project(&project(
        "    reconcile_timeout: 168h
    prune_timeout: 168h
",
    ));
    assert_eq!(week.reconcile_timeout, MAX_TIMEOUT);
    assert_eq!(week.prune_timeout, MAX_TIMEOUT);

    for (key, text) in [
        ("reconcile_timeout", "18446744073709551615s"),
        ("prune_timeout", "18446744073709551615s"),
        ("reconcile_timeout", "168h0.001s"),
        ("prune_timeout", "8 days"),
    ] {
        let e = err(&project(&format!("    {key}: {text}\n")));
        assert_eq!(
            e.path(),
            Some(format!("gitops.manifest_projects[0].{key}").as_str()),
            "{text}: {e}"
        );
        assert_eq!(e.line(), Some(4), "{text}: {e}");
        assert!(
            e.to_string().contains("longer than the maximum of 168h"),
            "{text}: {e}"
        );
    }
}

/// Timeouts under a second are refused with their key: `prune_timeout: 0s` passed and failed
/// every prune that worked (E14).
#[test]
fn timeouts_under_a_second_are_refused() {
    for (key, text) in [
        ("reconcile_timeout", "0s"),
        ("prune_timeout", "0s"),
        ("prune_timeout", "500ms"),
    ] {
        let e = err(&project(&format!("    {key}: {text}\n")));
        assert_eq!(
            e.path(),
            Some(format!("gitops.manifest_projects[0].{key}").as_str()),
            "{text}: {e}"
        );
        assert!(
            e.to_string().contains("shorter than the minimum of 1s"),
            "{text}: {e}"
        );
    }
    assert_eq!(
        only_project(&project("    prune_timeout: 1s\n")).prune_timeout,
        std::time::Duration::from_secs(1)
    );
}

#[test]
fn wrong_types_name_path_and_line() {
    let cases = [
        (
            project("    prune: maybe\n"),
            "gitops.manifest_projects[0].prune: invalid value, expected true or false (line 4)",
        ),
        (
            "gitops:\n  manifest_projects: x\n".to_owned(),
            "gitops.manifest_projects: invalid type, expected a list (line 2)",
        ),
        (
            "gitops: 5\n".to_owned(),
            "gitops: invalid type, expected a mapping (key: value) (line 1)",
        ),
        (
            "- a\n- b\n".to_owned(),
            "(top level): invalid type, expected a mapping (key: value) (line 1)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(&yaml).to_string(), want);
    }
}

#[test]
fn yaml_syntax_errors() {
    let e = err("gitops:\n  manifest_projects:\n  - id: a/b\n   bad: indent\n");
    match &e {
        ConfigError::Syntax { line, column, .. } => {
            assert_eq!((*line, *column), (4, 4));
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    assert!(
        e.to_string()
            .starts_with("invalid YAML at line 4, column 4: "),
        "{e}"
    );
    for yaml in [
        "gitops: 'unterminated\n",
        "gitops: {a: 1\n",
        "gitops: [\n",
        "gitops: {}\n---\ngitops: {}\n",
    ] {
        let e = err(yaml);
        assert!(matches!(e, ConfigError::Syntax { .. }), "{yaml:?}: {e:?}");
    }
    let e = err("gitops: {}\ngitops: {}\n");
    assert_eq!(e.to_string(), "gitops: duplicate key \"gitops\" (line 2)");
}

#[test]
fn ci_access_configuration_project() {
    // On unless turned off, as GitLab's implicit access is always on.
    assert!(ok("").ci_access.configuration_project);
    assert!(ok("ci_access: {}\n").ci_access.configuration_project);
    assert!(
        ok("ci_access:\n  configuration_project: true\n")
            .ci_access
            .configuration_project
    );
    let off = ok("ci_access:\n  configuration_project: false\n");
    assert!(!off.ci_access.configuration_project);
    // Only a boolean: a null or a word is an error naming the key, not a silent default.
    for yaml in [
        "ci_access:\n  configuration_project:\n",
        "ci_access:\n  configuration_project: off-please\n",
        "ci_access:\n  configuration_project: 0\n",
        "ci_access:\n  configuration_project: [false]\n",
    ] {
        let e = err(yaml);
        assert_eq!(
            e.path(),
            Some("ci_access.configuration_project"),
            "{yaml:?}: {e}"
        );
    }
    // The default is left out when written back, so existing documents stay as they were.
    let json = serde_json::to_value(&ok("ci_access: {}\n").ci_access).expect("serializes");
    assert_eq!(json, serde_json::json!({"projects": [], "groups": []}));
    let json = serde_json::to_value(&off.ci_access).expect("serializes");
    assert_eq!(json["configuration_project"], false);
}

#[test]
fn ci_access() {
    let c = ok("ci_access:
  projects:
  - id: group/app
  - id: group/other
    default_namespace: other
    environments: [production, review/*]
    access_as:
      ci_job: {}
  groups:
  - id: group
    access_as:
      impersonate:
        username: deployer
        groups: [deployers, gitlab]
        uid: '1234'
        extra:
        - key: reason
          val: [deploy]
        - key: empty
  - id: group/sub
    access_as:
      agent: {}
");
    let mut want_first = CiAccessEntry::new("group/app");
    assert_eq!(c.ci_access.projects[0], want_first);
    assert_eq!(
        c.ci_access.projects[0].access_as,
        CiAccessAs::Agent(AsAgent {})
    );
    assert_eq!(c.ci_access.projects[0].default_namespace, None);
    assert!(c.ci_access.projects[0].environments.is_empty());
    want_first.id = "group/other".to_owned();
    want_first.default_namespace = Some("other".to_owned());
    want_first.environments = vec!["production".to_owned(), "review/*".to_owned()];
    want_first.access_as = CiAccessAs::CiJob(AsCiJob {});
    assert_eq!(c.ci_access.projects[1], want_first);
    assert_eq!(
        c.ci_access.groups[0].access_as,
        CiAccessAs::Impersonate(Impersonate {
            username: "deployer".to_owned(),
            groups: vec!["deployers".to_owned(), "gitlab".to_owned()],
            uid: Some("1234".to_owned()),
            extra: vec![
                ExtraKeyVal {
                    key: "reason".to_owned(),
                    val: vec!["deploy".to_owned()],
                },
                ExtraKeyVal {
                    key: "empty".to_owned(),
                    val: vec![],
                },
            ],
        })
    );
    assert_eq!(
        c.ci_access.groups[1].access_as,
        CiAccessAs::Agent(AsAgent {})
    );

    let cases = [
        (
            "ci_access:\n  projects:\n  - id: a/b\n    access_as:\n      agent: {}\n      ci_job: {}\n",
            "ci_access.projects[0].access_as: exactly one of agent, impersonate, ci_job must \
             be set, found 2: agent, ci_job (line 4)",
        ),
        (
            "ci_access:\n  projects:\n  - id: a/b\n    access_as: {}\n",
            "ci_access.projects[0].access_as: exactly one of agent, impersonate, ci_job must \
             be set, found none (line 4)",
        ),
        (
            "ci_access:\n  groups:\n  - id: g\n    access_as:\n      impersonate:\n        groups: [x]\n",
            "ci_access.groups[0].access_as.impersonate: missing required key \"username\" (line 5)",
        ),
        (
            "ci_access:\n  groups:\n  - id: g\n    access_as:\n      impersonate:\n        username: ''\n",
            "ci_access.groups[0].access_as.impersonate.username: must not be empty (line 6)",
        ),
        (
            "ci_access:\n  projects:\n  - default_namespace: x\n",
            "ci_access.projects[0]: missing required key \"id\" (line 3)",
        ),
        (
            "ci_access:\n  projects:\n  - id: a/b\n    environments: ['']\n",
            "ci_access.projects[0].environments[0]: must not be empty (line 4)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml).to_string(), want);
    }
}

#[test]
fn user_access() {
    let c = ok("user_access:
  access_as:
    user: {}
  projects:
  - id: group/app
  groups:
  - id: group
");
    assert_eq!(
        c.user_access,
        Some(UserAccess {
            access_as: UserAccessAs::User(AsUser {}),
            projects: vec![UserAccessEntry {
                id: "group/app".to_owned()
            }],
            groups: vec![UserAccessEntry {
                id: "group".to_owned()
            }],
        })
    );
    let c = ok("user_access:\n  access_as: {agent: {}}\n");
    assert_eq!(
        c.user_access.map(|u| u.access_as),
        Some(UserAccessAs::Agent(AsAgent {}))
    );

    let cases = [
        (
            "user_access:\n  projects:\n  - id: a/b\n",
            "user_access: missing required key \"access_as\" (line 1)",
        ),
        (
            "user_access:\n  access_as:\n    agent: {}\n    user: {}\n",
            "user_access.access_as: exactly one of agent, user must be set, found 2: agent, user \
             (line 2)",
        ),
        (
            "user_access:\n  access_as: {}\n",
            "user_access.access_as: exactly one of agent, user must be set, found none (line 2)",
        ),
        (
            "user_access:\n  access_as:\n    ci_job: {}\n",
            "user_access.access_as.ci_job: unknown key \"ci_job\", expected one of agent, user \
             (line 3)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml).to_string(), want);
    }

    let entries = |projects: usize, groups: usize| -> String {
        let mut s = String::from("user_access:\n  access_as: {user: {}}\n  projects:\n");
        for i in 0..projects {
            s.push_str(&format!("  - id: p/{i}\n"));
        }
        s.push_str("  groups:\n");
        for i in 0..groups {
            s.push_str(&format!("  - id: g{i}\n"));
        }
        s
    };
    let c = ok(&entries(300, MAX_USER_ACCESS_ENTRIES - 300));
    assert_eq!(c.user_access.map(|u| u.projects.len()), Some(300));
    assert_eq!(
        err(&entries(300, MAX_USER_ACCESS_ENTRIES - 299)).to_string(),
        "user_access: 501 projects and groups, at most 500 are allowed (line 1)"
    );
}

const REALISTIC: &str = "\
# Agent configuration for the production cluster.
gitops:
  manifest_projects:
  - id: platform/manifests
    default_namespace: platform
    paths:
    - glob: 'base/**/*.yaml'
    - glob: 'overlays/prod/*.{yaml,yml}'
    reconcile_timeout: 3600s
    dry_run_strategy: none
    prune: true
    prune_timeout: 360s
    prune_propagation_policy: foreground
    inventory_policy: must_match
    ref:
      branch: production
  - id: 4711
    ref:
      commit: 0123456789abcdef0123456789abcdef01234567
ci_access:
  projects:
  - id: platform/app
    default_namespace: app
    environments:
    - production
    access_as:
      ci_job: {}
  groups:
  - id: platform
    access_as:
      impersonate:
        username: gitlab-ci
        groups: [ci]
user_access:
  access_as:
    user: {}
  groups:
  - id: platform/sre
observability:
  logging:
    level: debug
    grpc_level: warn
";

#[test]
fn realistic_config() {
    let c = ok(REALISTIC);
    assert_eq!(c.gitops.manifest_projects.len(), 2);
    let first = &c.gitops.manifest_projects[0];
    assert_eq!(first.prune_timeout, Duration::from_secs(360));
    assert_eq!(first.git_ref, Some(GitRef::Branch("production".to_owned())));
    let second = &c.gitops.manifest_projects[1];
    assert_eq!(second.id, ProjectRef::Numeric(4711));
    assert_eq!(second.default_namespace, "default");
    assert_eq!(c.ci_access.projects.len(), 1);
    assert_eq!(c.ci_access.groups.len(), 1);
    assert_eq!(c.user_access.as_ref().map(|u| u.groups.len()), Some(1));
    assert_eq!(c.observability.logging.level, LogLevel::Debug);
    assert_eq!(c.observability.logging.grpc_level, LogLevel::Warn);
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.gitops.validate(), Ok(()));
    assert_eq!(c.ci_access.validate(), Ok(()));
    assert_eq!(
        c.user_access.as_ref().map(UserAccess::validate),
        Some(Ok(()))
    );
    assert_eq!(c.observability.validate(), Ok(()));
}

#[test]
fn json_round_trip_for_kas_to_agentk() -> Result<(), serde_json::Error> {
    for yaml in [REALISTIC, SEED, ""] {
        let c = ok(yaml);
        let json = serde_json::to_string(&c)?;
        let back: AgentConfig = serde_json::from_str(&json)?;
        assert_eq!(back, c, "{json}");
    }
    let json = serde_json::to_value(ok(REALISTIC))?;
    let p = &json["gitops"]["manifest_projects"];
    assert_eq!(p[0]["reconcile_timeout"], "3600s");
    assert_eq!(p[0]["ref"], serde_json::json!({"branch": "production"}));
    assert_eq!(p[1]["id"], 4711);
    assert_eq!(
        json["ci_access"]["projects"][0]["access_as"],
        serde_json::json!({"ci_job": {}})
    );
    assert_eq!(
        json["user_access"]["access_as"],
        serde_json::json!({"user": {}})
    );
    Ok(())
}

#[test]
fn validate_on_built_values_names_paths_without_lines() {
    let mut gitops = Gitops::default();
    gitops
        .manifest_projects
        .push(ManifestProject::new(ProjectRef::Path("a/b".to_owned())));
    let mut bad = ManifestProject::new(ProjectRef::Numeric(0));
    bad.default_namespace = "x".to_owned();
    gitops.manifest_projects.push(bad);
    let e = gitops.validate().err();
    assert_eq!(
        e,
        Some(ConfigError::Invalid {
            path: "gitops.manifest_projects[1].id".to_owned(),
            line: None,
            message: "project id 0 must be positive".to_owned(),
        })
    );

    let config = AgentConfig {
        gitops: Gitops::default(),
        user_access: Some(UserAccess {
            access_as: UserAccessAs::Agent(AsAgent {}),
            projects: vec![UserAccessEntry {
                id: "not a path".to_owned(),
            }],
            groups: vec![],
        }),
        ..AgentConfig::default()
    };
    assert_eq!(
        config.validate().map_err(|e| e.to_string()),
        Err(
            "user_access.projects[0].id: \"not a path\" is not a valid project path \
             (expected e.g. \"group/subgroup/name\")"
                .to_owned()
        )
    );
}

#[test]
fn size_limit_and_utf8() {
    assert_eq!(MAX_CONFIG_SIZE, 128 * 1024);
    // Exactly at the limit: a valid document padded with a comment.
    let mut at_limit = SEED.as_bytes().to_vec();
    at_limit.extend_from_slice(b"# ");
    at_limit.resize(MAX_CONFIG_SIZE - 1, b'x');
    at_limit.push(b'\n');
    assert_eq!(at_limit.len(), MAX_CONFIG_SIZE);
    let c = match parse_bytes(&at_limit) {
        Ok(c) => c,
        Err(e) => panic!("a file of exactly the limit must be accepted: {e}"),
    };
    assert_eq!(c.gitops.manifest_projects.len(), 1);

    let mut over = at_limit.clone();
    over.insert(0, b'\n');
    let e = parse_bytes(&over).err();
    assert_eq!(
        e,
        Some(ConfigError::TooLarge {
            size: MAX_CONFIG_SIZE + 1,
            limit: MAX_CONFIG_SIZE,
        })
    );
    assert_eq!(
        e.map(|e| e.to_string()),
        Some("config file is 131073 bytes, over the limit of 131072 bytes".to_owned())
    );

    assert_eq!(
        parse_bytes(b"gitops: \xff\n").err(),
        Some(ConfigError::NotUtf8 { valid_up_to: 8 })
    );
    assert_eq!(parse_bytes(b""), Ok(AgentConfig::default()));
    assert_eq!(parse_bytes(b"# nothing\n"), Ok(AgentConfig::default()));
}

#[test]
fn kustomize_and_helm_entries_parse_with_their_keys() {
    let p = only_project(&project("    kustomize:\n      path: overlays/prod\n"));
    assert_eq!(
        p.kustomize,
        Some(tether_agent_config::Kustomize {
            path: "overlays/prod".into()
        })
    );
    assert_eq!(p.helm, None);
    let p = only_project(&project(
        "    helm:\n      chart: charts/app\n      release_name: app\n      namespace: prod\n      values_files:\n      - charts/app/values-prod.yaml\n      values:\n        replicas: 3\n        image: {tag: v2}\n",
    ));
    let h = p.helm.expect("helm");
    assert_eq!(h.chart, "charts/app");
    assert_eq!(h.namespace.as_deref(), Some("prod"));
    assert_eq!(h.values_files, ["charts/app/values-prod.yaml"]);
    assert_eq!(
        h.values,
        Some(serde_json::json!({"replicas": 3, "image": {"tag": "v2"}}))
    );
}

#[test]
fn rendering_errors_name_the_key_and_line() {
    let both = err(&project(
        "    kustomize: {path: a}\n    helm: {chart: c, release_name: r}\n",
    ));
    assert_eq!(both.path(), Some("gitops.manifest_projects[0].helm"));
    assert!(both.to_string().contains("cannot both be set"), "{both}");
    let with_paths = err(&project(
        "    paths:\n    - glob: 'x/*.yaml'\n    kustomize: {path: a}\n",
    ));
    assert!(
        with_paths.to_string().starts_with(
            "gitops.manifest_projects[0].paths: paths cannot be combined with kustomize"
        ),
        "{with_paths}"
    );
    let escaping = err(&project("    kustomize:\n      path: ../elsewhere\n"));
    assert_eq!(
        escaping.to_string(),
        "gitops.manifest_projects[0].kustomize.path: \"../elsewhere\" must stay inside the \
         repository (no '..') (line 5)"
    );
    let unknown = err(&project("    helm: {chart: c, release: r}\n"));
    assert!(unknown.to_string().contains("release"), "{unknown}");
}

#[test]
fn a_chart_repository_entry_parses_and_its_errors_name_the_key_and_line() {
    let p = only_project(&project(
        "    helm:\n      repository: https://charts.example.com/stable\n      chart: podinfo\n      version: '>=6.0.0 <7'\n      release_name: podinfo\n      values_files: [podinfo/values.yaml]\n",
    ));
    let h = p.helm.expect("helm");
    assert_eq!(
        (
            h.repository.as_deref(),
            h.chart.as_str(),
            h.version.as_deref()
        ),
        (
            Some("https://charts.example.com/stable"),
            "podinfo",
            Some(">=6.0.0 <7")
        )
    );
    let path = err(&project(
        "    helm:\n      repository: https://charts.example.com/stable\n      chart: charts/podinfo\n      release_name: podinfo\n",
    ));
    assert!(
        path.to_string().starts_with(
            "gitops.manifest_projects[0].helm.chart: \"charts/podinfo\" is not a chart name"
        ),
        "{path}"
    );
    assert!(path.to_string().ends_with("(line 6)"), "{path}");
    let url = err(&project(
        "    helm:\n      repository: https://user@charts.example.com/stable\n      chart: podinfo\n      release_name: podinfo\n",
    ));
    assert!(
        url.to_string()
            .starts_with("gitops.manifest_projects[0].helm.repository: "),
        "{url}"
    );
    assert!(url.to_string().ends_with("(line 5)"), "{url}");
    let version = err(&project(
        "    helm:\n      repository: https://charts.example.com/stable\n      chart: podinfo\n      version: '>=banana'\n      release_name: podinfo\n",
    ));
    assert!(
        version.to_string().starts_with(
            "gitops.manifest_projects[0].helm.version: \">=banana\" is not a version constraint"
        ),
        "{version}"
    );
    assert!(version.to_string().ends_with("(line 7)"), "{version}");
    // Absent, the keys stay out of the JSON kas sends (agents older than them refuse them).
    let plain = only_project(&project("    helm: {chart: c, release_name: r}\n"));
    let json = serde_json::to_value(&plain).expect("json");
    assert!(json["helm"].get("repository").is_none(), "{json}");
    assert!(json["helm"].get("version").is_none(), "{json}");
}

/// What kas sends agentk is the parsed configuration as JSON. An agentk that predates a key
/// refuses it (unknown keys are errors), so a key added later must stay out of that JSON
/// while it has its default: `allow_empty` appears only when set.
#[test]
fn keys_added_later_stay_out_of_the_json_while_at_their_default() {
    let p = only_project(&project("    paths:\n    - glob: '*.yaml'\n"));
    let json = serde_json::to_value(&p).expect("json");
    assert!(json.get("allow_empty").is_none(), "{json}");
    let allowed = only_project(&project("    allow_empty: true\n"));
    let json = serde_json::to_value(&allowed).expect("json");
    assert_eq!(json["allow_empty"], true);
    let back: ManifestProject = serde_json::from_value(json).expect("read back");
    assert!(back.allow_empty);
}

#[test]
fn post_build_parses_with_its_keys_and_stays_out_of_the_json_when_absent() {
    use tether_agent_config::{PostBuild, SubstituteFrom, SubstituteKind};
    let p = only_project(&project(
        "    post_build:\n      substitute:\n        cluster_name: prod-eu\n        replicas: '3'\n      substitute_from:\n      - kind: ConfigMap\n        name: cluster-vars\n      - kind: Secret\n        name: cluster-secrets\n        namespace: flux-system\n        optional: true\n      strict: true\n",
    ));
    let expected = PostBuild {
        substitute: [("cluster_name", "prod-eu"), ("replicas", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        substitute_from: vec![
            SubstituteFrom {
                kind: SubstituteKind::ConfigMap,
                name: "cluster-vars".into(),
                namespace: None,
                optional: false,
            },
            SubstituteFrom {
                kind: SubstituteKind::Secret,
                name: "cluster-secrets".into(),
                namespace: Some("flux-system".into()),
                optional: true,
            },
        ],
        strict: true,
    };
    assert_eq!(p.post_build.as_ref(), Some(&expected));
    let back: ManifestProject =
        serde_json::from_value(serde_json::to_value(&p).expect("json")).expect("read back");
    assert_eq!(back, p);
    let plain = only_project(&project("    paths:\n    - glob: '*.yaml'\n"));
    assert_eq!(plain.post_build, None);
    let json = serde_json::to_value(&plain).expect("json");
    assert!(json.get("post_build").is_none(), "{json}");
}

#[test]
fn post_build_errors_name_the_key_and_line() {
    let bad_name = err(&project(
        "    post_build:\n      substitute:\n        cluster-name: x\n",
    ));
    assert_eq!(
        bad_name.to_string(),
        "gitops.manifest_projects[0].post_build.substitute.cluster-name: \"cluster-name\" is not \
         a valid variable name (must match ^[_[:alpha:]][_[:alpha:][:digit:]]*$: a letter or \
         '_', then letters, digits or '_') (line 6)"
    );
    let bad_kind = err(&project(
        "    post_build:\n      substitute_from:\n      - kind: Deployment\n        name: x\n",
    ));
    assert_eq!(
        bad_kind.path(),
        Some("gitops.manifest_projects[0].post_build.substitute_from[0].kind"),
        "{bad_kind}"
    );
    assert!(bad_kind.to_string().contains("ConfigMap"), "{bad_kind}");
    let bad_ref = err(&project(
        "    post_build:\n      substitute_from:\n      - kind: Secret\n        name: Vars\n",
    ));
    assert_eq!(
        bad_ref.path(),
        Some("gitops.manifest_projects[0].post_build.substitute_from[0].name"),
        "{bad_ref}"
    );
    assert_eq!(bad_ref.line(), Some(7), "{bad_ref}");
    let bad_ns = err(&project(
        "    post_build:\n      substitute_from:\n      - {kind: Secret, name: v, namespace: A}\n",
    ));
    assert_eq!(
        bad_ns.path(),
        Some("gitops.manifest_projects[0].post_build.substitute_from[0].namespace"),
        "{bad_ns}"
    );
    let unknown = err(&project("    post_build:\n      substituteFrom: []\n"));
    assert!(unknown.to_string().contains("substitute_from"), "{unknown}");
    let number = err(&project(
        "    post_build:\n      substitute:\n        replicas: [3]\n",
    ));
    assert_eq!(
        number.path(),
        Some("gitops.manifest_projects[0].post_build.substitute.replicas"),
        "{number}"
    );
}

#[test]
fn drift_managers_default_to_kubectl_and_can_be_replaced_or_turned_off() {
    let default = ok(SEED);
    assert_eq!(default.gitops.drift_managers, None);
    let in_force = default.gitops.drift_managers();
    assert_eq!(in_force, DEFAULT_DRIFT_MANAGERS);
    for m in [
        "kubectl-client-side-apply",
        "kubectl-edit",
        "before-first-apply",
    ] {
        assert!(in_force.iter().any(|d| d == m), "{m}");
    }
    // Controllers keep their fields; a rollout restart is not reverted (it would restart again).
    for m in ["kube-controller-manager", "kubectl-rollout"] {
        assert!(!in_force.iter().any(|d| d == m), "{m}");
    }
    // Unset stays out of the JSON kas sends, so an older agentk still reads it.
    let json = serde_json::to_value(&default.gitops).expect("json");
    assert!(json.get("drift_managers").is_none(), "{json}");

    let off = ok("gitops:\n  drift_managers: []\n");
    assert_eq!(off.gitops.drift_managers(), Vec::<String>::new());
    let own = ok("gitops:\n  drift_managers: [kubectl*, my-script]\n");
    assert_eq!(own.gitops.drift_managers(), ["kubectl*", "my-script"]);
}

#[test]
fn drift_managers_that_would_match_controllers_are_refused() {
    for (yaml, want) in [
        (
            "gitops:\n  drift_managers: ['*']\n",
            "gitops.drift_managers[0]: \"*\" would match the field managers of controllers too",
        ),
        (
            "gitops:\n  drift_managers: [kubectl, 'ku*be']\n",
            "gitops.drift_managers[1]: \"ku*be\": '*' may only end",
        ),
        (
            "gitops:\n  drift_managers: ['']\n",
            "gitops.drift_managers[0]",
        ),
    ] {
        let e = err(yaml).to_string();
        assert!(e.starts_with(want), "{yaml:?}: {e}");
    }
}

#[test]
fn depends_on_names_other_entries_as_their_ids_are_matched() {
    let config = ok(
        "gitops:\n  manifest_projects:\n  - id: group/infra\n  - id: 42\n  - id: group/apps\n    depends_on: [Group/Infra, '42']\n",
    );
    let apps = &config.gitops.manifest_projects[2];
    assert_eq!(
        apps.depends_on,
        [
            EntryRef::project(ProjectRef::Path("Group/Infra".to_owned())),
            EntryRef::project(ProjectRef::Numeric(42))
        ]
    );
    assert!(config.gitops.manifest_projects[0].depends_on.is_empty());
    assert_eq!(
        ok("gitops:\n  manifest_projects:\n  - id: a/b\n    depends_on:\n")
            .gitops
            .manifest_projects[0]
            .depends_on,
        []
    );
}

#[test]
fn depends_on_refuses_unknown_ids_itself_repeats_and_cycles() {
    let cases = [
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n    depends_on: [c/d]\n",
            "gitops.manifest_projects[0].depends_on[0]: \"c/d\" is not the id of another \
             gitops.manifest_projects entry (write it as that entry's id is written: a path and \
             a numeric id are not matched) (line 4)",
        ),
        (
            // The project 42 may well be a/b, but only GitLab could say.
            "gitops:\n  manifest_projects:\n  - id: a/b\n  - id: c/d\n    depends_on:\n    - 42\n",
            "gitops.manifest_projects[1].depends_on[0]: \"42\" is not the id of another \
             gitops.manifest_projects entry (write it as that entry's id is written: a path and \
             a numeric id are not matched) (line 6)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n    depends_on: [A/B]\n",
            "gitops.manifest_projects[0].depends_on[0]: an entry cannot depend on itself (line 4)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n  - id: c/d\n    depends_on: [a/b, A/b]\n",
            "gitops.manifest_projects[1].depends_on[1]: \"A/b\" is listed twice (line 5)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n    depends_on: [-1]\n",
            "gitops.manifest_projects[0].depends_on[0]: project id -1 must be positive (line 4)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: g/one\n    depends_on: [g/three]\n  - id: g/two\n    depends_on: [g/one]\n  - id: g/three\n    depends_on: [g/two]\n",
            "gitops.manifest_projects[0].depends_on: dependency cycle: g/one -> g/three -> g/two \
             -> g/one (no entry of it could ever apply) (line 4)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml).to_string(), want, "{yaml}");
    }
}

/// Like `allow_empty`, `depends_on` stays out of the JSON sent to agentk while empty.
#[test]
fn depends_on_stays_out_of_the_json_while_empty() {
    let config =
        ok("gitops:\n  manifest_projects:\n  - id: a/b\n  - id: c/d\n    depends_on: [a/b]\n");
    let json = serde_json::to_value(&config.gitops.manifest_projects).expect("json");
    assert!(json[0].get("depends_on").is_none(), "{json}");
    assert_eq!(json[1]["depends_on"], serde_json::json!(["a/b"]));
    let back: Vec<ManifestProject> = serde_json::from_value(json).expect("read back");
    assert_eq!(back, config.gitops.manifest_projects);
}

/// One monorepo, two folders: the project is listed twice, each entry named, and the apps
/// entry depends on the infrastructure entry by `project#name`.
#[test]
fn a_project_listed_twice_with_names_is_two_entries() {
    let config = ok("gitops:
  manifest_projects:
  - id: Group/Fleet
    name: infra
    paths: [{glob: 'infrastructure/**'}]
  - id: group/fleet
    name: apps
    paths: [{glob: 'apps/**'}]
    depends_on: ['Group/Fleet#infra']
  - id: other/app
    depends_on: [group/fleet#apps]
");
    let [infra, apps, other] = &config.gitops.manifest_projects[..] else {
        panic!("three entries");
    };
    assert_eq!(infra.name.as_deref(), Some("infra"));
    assert_eq!(infra.entry_key(), "Group/Fleet#infra");
    assert_eq!(apps.entry_identity(), "group/fleet#apps");
    assert_eq!(apps.depends_on[0].identity(), "group/fleet#infra");
    // Unnamed: the key it always had, so an upgrade keeps its inventory and reports.
    assert_eq!(other.entry_key(), "other/app");
    assert_eq!(other.name, None);
    let json = serde_json::to_value(&config.gitops.manifest_projects).expect("json");
    assert!(json[2].get("name").is_none(), "left out when unset: {json}");
    assert_eq!(
        json[1]["depends_on"],
        serde_json::json!(["Group/Fleet#infra"])
    );
    let back: Vec<ManifestProject> = serde_json::from_value(json).expect("read back");
    assert_eq!(back, config.gitops.manifest_projects);
}

#[test]
fn names_are_required_on_every_entry_of_a_project_listed_twice_and_unique() {
    let cases = [
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n    name: Infra\n",
            "gitops.manifest_projects[0].name: \"Infra\" is not a valid entry name: expected 1 \
             to 40 lowercase letters, digits or '-', starting and ending with a letter or digit \
             (a DNS label) (line 4)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n    name: x\n  - id: a/b\n",
            "gitops.manifest_projects[1].id: project \"a/b\" is also listed by \
             gitops.manifest_projects[0]: every entry of a project listed more than once needs \
             a name (name: infra, name: apps, ...); an entry that already synced and gets a \
             name starts with a new, empty inventory: its objects are taken over only with \
             inventory_policy: adopt_all (line 5)",
        ),
        (
            // The unnamed entry came first: it is the one said to need a name.
            "gitops:\n  manifest_projects:\n  - id: a/b\n  - id: A/B\n    name: x\n",
            "gitops.manifest_projects[0].id: project \"A/B\" is also listed by \
             gitops.manifest_projects[1]: every entry of a project listed more than once needs \
             a name (name: infra, name: apps, ...); an entry that already synced and gets a \
             name starts with a new, empty inventory: its objects are taken over only with \
             inventory_policy: adopt_all (line 3)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: a/b\n    name: x\n  - id: c/d\n  - id: a/b\n    name: x\n",
            "gitops.manifest_projects[2].name: duplicate name \"x\" for project \"a/b\", \
             already used by gitops.manifest_projects[0] (line 7)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml).to_string(), want, "{yaml}");
    }
}

#[test]
fn depends_on_names_a_named_entry_with_its_name() {
    let two = "gitops:\n  manifest_projects:\n  - id: g/mono\n    name: infra\n  - id: g/mono\n    name: apps\n  - id: g/other\n";
    let cases = [
        (
            format!("{two}    depends_on: [g/mono]\n"),
            "gitops.manifest_projects[2].depends_on[0]: \"g/mono\" is listed only as named \
             entries: write one of \"g/mono#infra\", \"g/mono#apps\" (line 8)",
        ),
        (
            format!("{two}    depends_on: ['g/mono#web']\n"),
            "gitops.manifest_projects[2].depends_on[0]: no entry of project \"g/mono\" is \
             named \"web\": its entries are \"g/mono#infra\", \"g/mono#apps\" (line 8)",
        ),
        (
            format!("{two}    depends_on: ['g/mono#Web']\n"),
            "gitops.manifest_projects[2].depends_on[0]: \"Web\" is not a valid entry name: \
             expected 1 to 40 lowercase letters, digits or '-', starting and ending with a \
             letter or digit (a DNS label) (line 8)",
        ),
        (
            "gitops:\n  manifest_projects:\n  - id: g/mono\n    name: a\n    depends_on: ['g/mono#b']\n  - id: g/mono\n    name: b\n    depends_on: ['g/mono#a']\n".to_owned(),
            "gitops.manifest_projects[0].depends_on: dependency cycle: g/mono#a -> g/mono#b -> \
             g/mono#a (no entry of it could ever apply) (line 5)",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(&yaml).to_string(), want, "{yaml}");
    }
}
