//! The agent's configuration from Git, end to end: real repositories (one served by
//! `git daemon` over git://), real kas and agentk processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use kas::api::ProjectRequest;
use support::{
    Agent, GitDaemon, GitRepo, Kas, KasOptions, config_stream, config_stream_from, wait_for,
};
use tether_testenv::postgres::Postgres;

const APPLIED: &str = "Agent configuration applied";
const REFUSED: &str = "kas refused the agent configuration at this commit; the last good configuration stays in force";

fn config(level: &str) -> Vec<u8> {
    format!(
        "gitops:\n  manifest_projects:\n  - id: group/manifests\n    paths:\n    - glob: '/manifests/*.{{yaml,yml,json}}'\nobservability:\n  logging:\n    level: {level}\n"
    )
    .into_bytes()
}

/// Just the id, where a test reads `t.agent_id`.
struct AgentId {
    agent_id: i64,
}

async fn project(kas: &Kas, path: &str, remote: &str, secret: Option<&std::path::Path>) -> i64 {
    kas.admin
        .set_project(&ProjectRequest {
            path: path.into(),
            remote: Some(remote.into()),
            credentials_file: None,
            webhook_secret_file: secret.map(|p| p.display().to_string()),
            ..ProjectRequest::default()
        })
        .await
        .unwrap()
        .id
}

/// Project `project` of `repo` and its agent `name`, whose agentk (logging next to kas's
/// directory) has applied `commit`.
async fn applied_agent(
    kas: &Kas,
    (project_path, name): (&str, &str),
    repo: &GitRepo,
    commit: &str,
) -> (tether_kas_api::TokenCreated, Agent) {
    project(kas, project_path, &repo.dir.display().to_string(), None).await;
    let t = kas.admin.register_agent(project_path, name).await.unwrap();
    let dir = kas.dir.parent().unwrap();
    let agent = Agent::start(dir, name, &kas.url("grpc"), &t.token, None);
    agent.wait_log(APPLIED, commit).await;
    (t, agent)
}

/// A configuration repository served by `git daemon`, a kas polling it, and one agent that
/// has applied the first commit.
struct DaemonRig {
    repo: GitRepo,
    daemon: Option<GitDaemon>,
    kas: Kas,
    agent: Agent,
    agent_id: i64,
    c1: String,
    _dir: tempfile::TempDir,
}

async fn daemon_rig(agent_name: &str, project_path: &str, poll: &'static str) -> DaemonRig {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("git/config.git"));
    let c1 = repo.commit(
        &[(
            &format!(".gitlab/agents/{agent_name}/config.yaml"),
            Some(&config("info")),
        )],
        "agent config",
    );
    let daemon = GitDaemon::start(&dir.path().join("git"));
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: poll,
            ..KasOptions::default()
        },
    )
    .await;
    let remote = format!("git://127.0.0.1:{}/config.git", daemon.port);
    project(&kas, project_path, &remote, None).await;
    let t = kas
        .admin
        .register_agent(project_path, agent_name)
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), agent_name, &kas.url("grpc"), &t.token, None);
    DaemonRig {
        repo,
        daemon: Some(daemon),
        kas,
        agent,
        agent_id: t.agent_id,
        c1,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_change_reaches_the_agent_within_a_poll_interval_over_git_daemon() {
    let rig = daemon_rig("alpha", "group/config", "1s").await;
    let DaemonRig {
        repo,
        kas,
        agent,
        c1,
        ..
    } = &rig;
    let t = AgentId {
        agent_id: rig.agent_id,
    };
    let applied = agent.wait_log(APPLIED, c1).await;
    assert_eq!(applied["log_level"], "info");
    assert_eq!(
        applied["agent_id"], t.agent_id,
        "agent_id is a context field"
    );
    assert_eq!(applied["mod_name"], "agent_configuration");
    // At info, the debug line with the full configuration is not written.
    assert!(!agent.log().contains("Agent configuration in force"));

    // Change the log level in Git: the agent has it within one poll interval (1 s) plus the
    // fetch and the stream, and logs at debug from then on.
    let c2 = repo.commit(
        &[(".gitlab/agents/alpha/config.yaml", Some(&config("debug")))],
        "debug logs",
    );
    let t0 = Instant::now();
    let applied = agent.wait_log(APPLIED, &c2).await;
    let took = t0.elapsed();
    // One poll interval plus fetch, stream and apply; generous so a loaded CI machine passes,
    // while the 20 s default interval would still fail it.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(applied["log_level"], "debug");
    agent.wait_log("Agent configuration in force", &c2).await;

    let view = kas.agent(t.agent_id).await;
    let state = view.config.expect("config state");
    assert_eq!(state.commit, c2);
    assert_eq!(state.file, ".gitlab/agents/alpha/config.yaml");
    assert_eq!(state.error, None);
    let projects = kas.admin.list_projects().await.unwrap();
    assert_eq!(projects[0].commit.as_deref(), Some(c2.as_str()));
    eprintln!("config change reached the agent in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_fetch_at_once_and_a_wrong_secret_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo"));
    // The seed's form of the path: .gitlab/agent/<name>/config.yaml.
    let c1 = repo.commit(
        &[(".gitlab/agent/beta/config.yaml", Some(&config("info")))],
        "agent config",
    );
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, "s3cret-hook\n").unwrap();
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "1h",
            ..KasOptions::default()
        },
    )
    .await;
    let pid = project(
        &kas,
        "group/hooked",
        &repo.dir.display().to_string(),
        Some(&secret),
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/hooked", "beta")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "beta", &kas.url("ws"), &t.token, None);
    let applied = agent.wait_log(APPLIED, &c1).await;
    assert_eq!(applied["file"], ".gitlab/agent/beta/config.yaml");

    let c2 = repo.commit(
        &[(".gitlab/agent/beta/config.yaml", Some(&config("debug")))],
        "debug",
    );
    let fetches = kas.admin.list_projects().await.unwrap()[0].fetches;
    // Wrong and missing secrets: 401, nothing fetched.
    let wrong = kas
        .webhook(pid, &[("x-gitlab-token", "guess".into())], b"{}")
        .await;
    assert_eq!(wrong, 401);
    assert_eq!(kas.webhook(pid, &[], b"{}").await, 401);
    let body = br#"{"ref":"refs/heads/main","after":"0"}"#;
    let bad_sig = kas
        .webhook(
            pid,
            &[("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))],
            body,
        )
        .await;
    assert_eq!(bad_sig, 401);
    let p = &kas.admin.list_projects().await.unwrap()[0];
    assert_eq!(p.fetches, fetches, "a refused webhook must not fetch");
    assert_eq!(p.commit.as_deref(), Some(c1.as_str()));

    // The right GitLab token: fetched at once.
    let t0 = Instant::now();
    let ok = kas
        .webhook(
            pid,
            &[
                ("x-gitlab-token", "s3cret-hook".into()),
                ("x-gitlab-event", "Push Hook".into()),
            ],
            body,
        )
        .await;
    assert_eq!(ok, 200);
    // With a one-hour poll interval, arriving at all proves the webhook made kas fetch.
    agent.wait_log(APPLIED, &c2).await;
    let took = t0.elapsed();

    // A GitHub-style HMAC signature works too.
    let c3 = repo.commit(
        &[(".gitlab/agent/beta/config.yaml", Some(&config("info")))],
        "info",
    );
    let sig = hmac_sha256_hex(b"s3cret-hook", body);
    let ok = kas
        .webhook(
            pid,
            &[("x-hub-signature-256", format!("sha256={sig}"))],
            body,
        )
        .await;
    assert_eq!(ok, 200);
    agent.wait_log(APPLIED, &c3).await;
    eprintln!("webhook to applied config in {took:?}");
}

/// HMAC-SHA256 written out from its definition, independent of the code under test.
fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    let outer = Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configurations_are_refused_and_the_last_good_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo"));
    // An empty file is a valid, empty configuration.
    let good = repo.commit(&[(".gitlab/agents/gamma/config.yaml", Some(b""))], "empty");
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    let (t, agent) = applied_agent(&kas, ("group/strict", "gamma"), &repo, &good).await;

    let oversize = {
        let mut v = b"# padding\n".repeat(13_200);
        v.extend_from_slice(b"gitops: {}\n");
        v
    };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> =
        vec![
        ("invalid YAML", b"gitops:\n  manifest_projects: [\n".to_vec(), vec!["line"]),
        (
            "unknown key",
            b"gitops:\n  manifest_projects:\n  - id: group/m\n    pathz: []\n".to_vec(),
            vec!["gitops.manifest_projects[0]", "pathz", "line 4"],
        ),
        (
            "bad enum",
            b"gitops:\n  manifest_projects:\n  - id: group/m\n    dry_run_strategy: sometimes\n"
                .to_vec(),
            vec!["dry_run_strategy", "sometimes", "line 4"],
        ),
        ("over 128 KiB", oversize, vec!["128 KiB"]),
    ];
    for (what, content, expected) in cases {
        let bad = repo.commit(
            &[(".gitlab/agents/gamma/config.yaml", Some(&content))],
            what,
        );
        let line = agent.wait_log(REFUSED, &bad).await;
        let error = line["error"].as_str().unwrap().to_string();
        for e in &expected {
            assert!(error.contains(e), "{what}: {error:?} should mention {e:?}");
        }
        assert!(
            error.contains(".gitlab/agents/gamma/config.yaml"),
            "{what}: {error}"
        );
        // kas shows the refusal, and the good commit is still the one in force.
        let state = wait_for(
            "kas to record the refusal",
            Duration::from_secs(10),
            || async {
                let s = kas.agent(t.agent_id).await.config?;
                (s.error_commit.as_deref() == Some(bad.as_str())).then_some(s)
            },
        )
        .await;
        assert_eq!(state.commit, good, "{what}");
        assert!(state.error.unwrap().contains(expected[0]));
        assert!(
            !agent
                .log_lines()
                .iter()
                .any(|l| l["msg"] == APPLIED && l["commit_id"] == bad.as_str()),
            "{what} must not be applied"
        );
        assert!(kas.log().contains("Agent configuration refused"));
    }

    // Deleting the file (an agent folder renamed by mistake) is refused too: it used to put
    // the empty default in force, dropping every access rule and manifest project silently.
    let deleted = repo.commit(&[(".gitlab/agents/gamma/config.yaml", None)], "deleted");
    let line = agent.wait_log(REFUSED, &deleted).await;
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains(".gitlab/agents/gamma/config.yaml: the file is not in this commit"),
        "{error}"
    );
    let state = wait_for("kas to record it", Duration::from_secs(10), || async {
        let s = kas.agent(t.agent_id).await.config?;
        (s.error_commit.as_deref() == Some(deleted.as_str())).then_some(s)
    })
    .await;
    assert_eq!(state.commit, good);
    assert_eq!(state.file, ".gitlab/agents/gamma/config.yaml");

    // Fixing it in a later commit recovers.
    let fixed = repo.commit(
        &[(".gitlab/agents/gamma/config.yaml", Some(&config("info")))],
        "fixed",
    );
    agent.wait_log(APPLIED, &fixed).await;
    let state = kas.agent(t.agent_id).await.config.unwrap();
    assert_eq!(state.commit, fixed);
    assert_eq!(state.error, None);
}

/// A configuration repository whose first commit holds `name`'s configuration, a kas polling it
/// every 300 ms, and the agent registered (no agentk: tests speak for it with [`config_stream`]).
struct StreamRig {
    repo: GitRepo,
    kas: Kas,
    token: String,
    agent_id: i64,
    /// The agent's configuration file.
    path: String,
    c1: String,
    _dir: tempfile::TempDir,
}

async fn stream_rig(name: &str, level: &str) -> StreamRig {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo"));
    let path = format!(".gitlab/agents/{name}/config.yaml");
    let c1 = repo.commit(&[(&path, Some(&config(level)))], "first");
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    let project_path = format!("group/{name}");
    project(&kas, &project_path, &repo.dir.display().to_string(), None).await;
    let t = kas.admin.register_agent(&project_path, name).await.unwrap();
    StreamRig {
        repo,
        kas,
        token: t.token,
        agent_id: t.agent_id,
        path,
        c1,
        _dir: dir,
    }
}

/// An agent that refuses a configuration kas accepted (an older agentk not knowing a new
/// field) tells kas: `kas agent status` shows the refusal and the commit the agent really runs,
/// and kas does not send that commit again (it used to record it as in force, and authorize
/// requests by a configuration the agent did not run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_the_agent_refuses_is_shown_and_not_in_force() {
    let r = stream_rig("old", "info").await;
    let (repo, kas, path, c1) = (&r.repo, &r.kas, r.path.as_str(), r.c1.clone());
    let t = AgentId {
        agent_id: r.agent_id,
    };
    let mut first = config_stream(kas, &r.token, ("", "", "")).await;
    assert_eq!(first.message().await.unwrap().unwrap().commit_id, c1);
    let c2 = repo.commit(&[(path, Some(&config("debug")))], "second");
    assert_eq!(first.message().await.unwrap().unwrap().commit_id, c2);
    drop(first);

    // The agent applied c1, refused c2, and reopens saying so.
    let why = "unknown field `new_feature`";
    let mut again = config_stream(kas, &r.token, (&c1, &c2, why)).await;
    let state = kas.agent(t.agent_id).await.config.unwrap();
    assert_eq!(state.commit, c1, "the agent's commit is in force");
    assert_eq!(state.error_commit.as_deref(), Some(c2.as_str()));
    assert_eq!(
        state.error.as_deref(),
        Some(format!("refused by the agent: {why}").as_str())
    );
    assert!(kas.log().contains("The agent refused its configuration"));
    // c2 is not sent again: the next message is the next commit.
    let c3 = repo.commit(&[(path, Some(&config("warn")))], "third");
    assert_eq!(again.message().await.unwrap().unwrap().commit_id, c3);
    let state = kas.agent(t.agent_id).await.config.unwrap();
    assert_eq!((state.commit, state.error), (c3, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_failure_keeps_the_last_good_commit_and_is_reported() {
    let mut rig = daemon_rig("delta", "group/flaky", "300ms").await;
    let (kas, agent, c1) = (&rig.kas, &rig.agent, rig.c1.clone());
    let t = AgentId {
        agent_id: rig.agent_id,
    };
    agent.wait_log(APPLIED, &c1).await;
    drop(rig.daemon.take()); // the Git server goes away
    let p = wait_for(
        "the fetch error to be reported",
        Duration::from_secs(15),
        || async {
            let p = kas.admin.list_projects().await.ok()?.pop()?;
            p.fetch_error.is_some().then_some(p)
        },
    )
    .await;
    assert_eq!(
        p.commit.as_deref(),
        Some(c1.as_str()),
        "the last good commit stays"
    );
    assert!(kas.log().contains("Fetching the project failed"));
    assert_eq!(kas.agent(t.agent_id).await.config.unwrap().commit, c1);
}

/// One manifest project listed twice — by path and by numeric id — is refused, naming both
/// entries: accepted, it gave two workers applying and pruning the same objects against each
/// other, and a stale inventory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_listed_by_path_and_by_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo"));
    let good = repo.commit(&[(".gitlab/agents/delta/config.yaml", Some(b""))], "empty");
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    manifests.commit(&[("m.yaml", Some(b""))], "manifests");
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    project(&kas, "group/twice", &repo.dir.display().to_string(), None).await;
    let id = project(
        &kas,
        "group/manifests",
        &manifests.dir.display().to_string(),
        None,
    )
    .await;
    let t = kas
        .admin
        .register_agent("group/twice", "delta")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "delta", &kas.url("grpc"), &t.token, None);
    agent.wait_log(APPLIED, &good).await;

    let twice = format!("gitops:\n  manifest_projects:\n  - id: group/manifests\n  - id: {id}\n");
    let bad = repo.commit(
        &[(".gitlab/agents/delta/config.yaml", Some(twice.as_bytes()))],
        "one project twice",
    );
    let line = agent.wait_log(REFUSED, &bad).await;
    let error = line["error"].as_str().unwrap();
    for part in [
        ".gitlab/agents/delta/config.yaml",
        "gitops.manifest_projects[1].id",
        "group/manifests",
        "already listed as gitops.manifest_projects[0]",
    ] {
        assert!(error.contains(part), "{error:?} should mention {part:?}");
    }
    let state = kas.agent(t.agent_id).await.config.unwrap();
    assert_eq!(state.commit, good);
    assert_eq!(state.error_commit.as_deref(), Some(bad.as_str()));
}

/// A project whose credentials file is missing when kas starts (a Secret not mounted yet, a
/// mistake) is that project's problem: kas starts and serves every other project, and the
/// project's status names the file. The file is read at each fetch, so it is used as soon as
/// it appears (and a rotated token at the next fetch) without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_credentials_file_fails_its_project_not_kas() {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo"));
    let c1 = repo.commit(
        &[(".gitlab/agents/alpha/config.yaml", Some(&config("info")))],
        "agent config",
    );
    let mut kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    project(&kas, "group/app", &repo.dir.display().to_string(), None).await;
    let creds = dir.path().join("git-token");
    std::fs::write(&creds, "glpat-not-a-real-token\n").unwrap();
    kas.admin
        .set_project(&ProjectRequest {
            path: "group/private".into(),
            remote: Some("https://127.0.0.1:9/group/private.git".into()),
            credentials_file: Some(creds.display().to_string()),
            ..ProjectRequest::default()
        })
        .await
        .unwrap();
    let t = kas
        .admin
        .register_agent("group/app", "alpha")
        .await
        .unwrap();

    std::fs::remove_file(&creds).unwrap();
    kas.restart().await;
    let agent = Agent::start(dir.path(), "alpha", &kas.url("grpc"), &t.token, None);
    agent.wait_log(APPLIED, &c1).await;
    let error = wait_for(
        "the project's fetch error",
        Duration::from_secs(20),
        || async {
            let projects = kas.admin.list_projects().await.ok()?;
            let private = projects.into_iter().find(|p| p.path == "group/private")?;
            private.fetch_error
        },
    )
    .await;
    assert!(
        error.contains("cannot read credentials file") && error.contains("git-token"),
        "{error}"
    );
    assert!(!kas.log().contains("glpat-not-a-real-token"));
}

/// A request carrying `token`, as an agent sends it.
fn as_agent<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        tether_protocol::metadata::AUTHORIZATION,
        tether_protocol::metadata::bearer(token).unwrap(),
    );
    req
}

/// An agent token reads and reports on only the manifest projects the agent's configuration in
/// force lists: with any token, any repository kas mirrored could be read at any ref, and a
/// report made kas post a commit status to any project with its forge token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reads_and_reports_only_the_manifest_projects_its_configuration_lists() {
    use tether_protocol::gitops::git_ops_client::GitOpsClient;
    use tether_protocol::gitops::{ObjectsRequest, SyncReport};
    let dir = tempfile::tempdir().unwrap();
    let config_repo = GitRepo::init(&dir.path().join("config"));
    let c1 = config_repo.commit(
        &[(".gitlab/agents/lister/config.yaml", Some(&config("info")))],
        "config",
    );
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    manifests.commit(&[("manifests/a.yaml", Some(b"kind: ConfigMap\n"))], "m");
    let secret = GitRepo::init(&dir.path().join("secret"));
    let secret_commit = secret.commit(&[("manifests/s.yaml", Some(b"password: x\n"))], "s");
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    for (path, repo) in [
        ("group/config", &config_repo),
        ("group/manifests", &manifests),
        ("other/secret", &secret),
    ] {
        project(&kas, path, &repo.dir.display().to_string(), None).await;
    }
    let t = kas
        .admin
        .register_agent("group/config", "lister")
        .await
        .unwrap();
    let mut config_stream = config_stream(&kas, &t.token, ("", "", "")).await;
    assert_eq!(
        config_stream.message().await.unwrap().unwrap().commit_id,
        c1
    );

    let address = tether_transport::KasAddress::parse(&kas.url("grpc")).unwrap();
    let channel = tether_transport::connect_lazy(&address, &Default::default()).unwrap();
    let mut client = GitOpsClient::new(channel);
    let objects = |project: &str| ObjectsRequest {
        project_id: project.into(),
        globs: vec!["**".into()],
        ..ObjectsRequest::default()
    };
    let listed = client
        .get_objects_to_synchronize(as_agent(&t.token, objects("group/manifests")))
        .await;
    assert!(listed.is_ok(), "{listed:?}");
    let unlisted = client
        .get_objects_to_synchronize(as_agent(&t.token, objects("other/secret")))
        .await
        .unwrap_err();
    assert_eq!(
        unlisted.code(),
        tonic::Code::PermissionDenied,
        "{unlisted:?}"
    );
    assert!(
        unlisted
            .message()
            .contains("not listed in the agent's configuration"),
        "{unlisted:?}"
    );

    let report = |project: &str, commit: &str| SyncReport {
        project_id: project.into(),
        commit_id: commit.into(),
        ..SyncReport::default()
    };
    let refused = client
        .report_sync(as_agent(&t.token, report("other/secret", &secret_commit)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let not_a_commit = client
        .report_sync(as_agent(&t.token, report("group/manifests", "../../x")))
        .await
        .unwrap_err();
    assert_eq!(not_a_commit.code(), tonic::Code::InvalidArgument);
    let stored = kas.admin.gitops_status(t.agent_id).await.unwrap();
    assert!(stored.is_empty(), "no report was stored: {stored:?}");
}

/// An agent started since the newest configuration commit was refused (a node drain, an OOM
/// kill) is sent the configuration in force, then the refusal: told only the refusal, it ran
/// no GitOps at all while `kas agent status` said the last good configuration was in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_gets_the_configuration_in_force_while_the_newest_is_refused() {
    let r = stream_rig("fresh", "debug").await;
    let (kas, c1) = (&r.kas, r.c1.as_str());
    let mut first = config_stream(kas, &r.token, ("", "", "")).await;
    assert_eq!(first.message().await.unwrap().unwrap().commit_id, c1);
    let c2 = r
        .repo
        .commit(&[(&r.path, Some(b"gitops: [broken\n"))], "broken");
    let refusal = first.message().await.unwrap().unwrap();
    assert_eq!(refusal.commit_id, c2);
    assert!(!refusal.error.is_empty());
    drop(first);

    // A new agent process: nothing in force.
    let mut fresh = config_stream(kas, &r.token, ("", "", "")).await;
    let in_force = fresh.message().await.unwrap().unwrap();
    assert_eq!(
        (in_force.commit_id.as_str(), in_force.error.as_str()),
        (c1, "")
    );
    assert!(
        in_force.config_json.contains("group/manifests"),
        "{in_force:?}"
    );
    let refusal = fresh.message().await.unwrap().unwrap();
    assert_eq!(refusal.commit_id, c2);
    assert!(!refusal.error.is_empty());
    let state = kas.agent(r.agent_id).await.config.unwrap();
    assert_eq!(state.commit, c1);
    assert_eq!(state.error_commit.as_deref(), Some(c2.as_str()));
}

/// A freshly started agent that refuses the newest configuration (an older agentk, after a node
/// drain) gets the one in force before it, even across a kas restart: kas records a
/// configuration as in force when it sends it, and used to be left — and leave the agent —
/// with none at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_agent_refusing_the_newest_configuration_gets_the_previous_one() {
    let mut r = stream_rig("older", "info").await;
    let c1 = r.c1.clone();
    let mut first = config_stream(&r.kas, &r.token, ("", "", "")).await;
    assert_eq!(first.message().await.unwrap().unwrap().commit_id, c1);
    let c2 = r
        .repo
        .commit(&[(&r.path, Some(&config("debug")))], "second");
    assert_eq!(first.message().await.unwrap().unwrap().commit_id, c2);
    drop(first);
    let why = "unknown field `new_feature`";
    drop(config_stream(&r.kas, &r.token, (&c1, &c2, why)).await);

    // The agent restarts with nothing in force: kas sends the newest commit again.
    let mut fresh = config_stream(&r.kas, &r.token, ("", "", "")).await;
    assert_eq!(fresh.message().await.unwrap().unwrap().commit_id, c2);
    drop(fresh);
    assert_eq!(r.kas.agent(r.agent_id).await.config.unwrap().commit, c2);
    r.kas.restart().await;

    let mut refused = config_stream(&r.kas, &r.token, ("", &c2, why)).await;
    let in_force = tokio::time::timeout(Duration::from_secs(10), refused.message())
        .await
        .expect("kas sends the configuration in force before c2")
        .unwrap()
        .unwrap();
    assert_eq!(
        (in_force.commit_id.as_str(), in_force.error.as_str()),
        (c1.as_str(), "")
    );
    assert!(
        in_force.config_json.contains("group/manifests"),
        "{in_force:?}"
    );
    let state = r.kas.agent(r.agent_id).await.config.unwrap();
    assert_eq!(state.commit, c1);
    assert_eq!(state.error_commit.as_deref(), Some(c2.as_str()));
    // The agent now runs c1; the next commit is sent as usual.
    let c3 = r.repo.commit(&[(&r.path, Some(&config("warn")))], "third");
    assert_eq!(refused.message().await.unwrap().unwrap().commit_id, c3);
}

/// During a rollout with mixed agentk versions, a replica refusing the newest configuration
/// (the older agentk) does not take it out of force while another replica runs it: kas went
/// back to the older commit with each reconnect of the old replica, and forward with each of
/// the new one's. A fresh old replica still gets the configuration in force before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refusing_what_another_replica_runs_does_not_take_it_out_of_force() {
    let r = stream_rig("mixed", "info").await;
    let (kas, c1) = (&r.kas, r.c1.clone());
    let mut newer = config_stream_from(kas, &r.token, "agentk-new", ("", "", "")).await;
    let mut older = config_stream_from(kas, &r.token, "agentk-old", ("", "", "")).await;
    assert_eq!(newer.message().await.unwrap().unwrap().commit_id, c1);
    assert_eq!(older.message().await.unwrap().unwrap().commit_id, c1);
    let c2 = r
        .repo
        .commit(&[(&r.path, Some(&config("debug")))], "second");
    assert_eq!(newer.message().await.unwrap().unwrap().commit_id, c2);
    assert_eq!(older.message().await.unwrap().unwrap().commit_id, c2);
    drop(older);

    let why = "unknown field `new_feature`";
    let _older = config_stream_from(kas, &r.token, "agentk-old", (&c1, &c2, why)).await;
    let state = kas.agent(r.agent_id).await.config.unwrap();
    assert_eq!(state.commit, c2, "the newer replica runs c2");
    assert_eq!(
        state.error_commit.as_deref(),
        Some(c2.as_str()),
        "the refusal shows"
    );
    assert!(
        kas.log()
            .contains("another replica was sent it and has not refused it, so it stays in force")
    );

    // Another old replica starting now gets c1, and c2 stays in force.
    let mut fresh = config_stream_from(kas, &r.token, "agentk-old-2", ("", "", "")).await;
    assert_eq!(fresh.message().await.unwrap().unwrap().commit_id, c2);
    drop(fresh);
    let mut fresh = config_stream_from(kas, &r.token, "agentk-old-2", ("", &c2, why)).await;
    let in_force = tokio::time::timeout(Duration::from_secs(10), fresh.message())
        .await
        .expect("kas sends the configuration before c2")
        .unwrap()
        .unwrap();
    assert_eq!(in_force.commit_id, c1);
    assert_eq!(kas.agent(r.agent_id).await.config.unwrap().commit, c2);

    // Once no replica runs c2 any more (the rollout rolled back), the commit the replicas
    // left run is in force again, without waiting for one of them to reconnect.
    drop((newer, fresh));
    wait_for("c1 in force", Duration::from_secs(10), || async {
        (kas.agent(r.agent_id).await.config?.commit == c1).then_some(())
    })
    .await;
    assert!(
        kas.log()
            .contains("Every replica of the agent still connected runs this configuration")
    );
}

/// An agent token alone cannot put a commit in force that kas did not send and the default
/// branch does not reach (a side branch granting `ci_access`, say), by claiming to run it and
/// to refuse the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_put_a_commit_of_another_branch_in_force() {
    let r = stream_rig("pin", "info").await;
    let (kas, repo, path, c1) = (&r.kas, &r.repo, r.path.as_str(), r.c1.as_str());
    repo.git(&["checkout", "-q", "-b", "side"]);
    let side = repo.commit(&[(path, Some(&config("debug")))], "side");
    repo.git(&["checkout", "-q", "-"]);
    let mut first = config_stream(kas, &r.token, ("", "", "")).await;
    assert_eq!(first.message().await.unwrap().unwrap().commit_id, c1);
    drop(first);

    let _pinned = config_stream(kas, &r.token, (&side, c1, "unknown field")).await;
    let state = kas.agent(r.agent_id).await.config.unwrap();
    assert_ne!(
        state.commit, side,
        "the side branch's commit is not in force"
    );
    assert!(
        kas.log()
            .contains("kas has not sent it and the default branch does not reach")
    );

    // The branch's own history is still taken: an agent that refused the head keeps c1.
    let c2 = repo.commit(&[(path, Some(&config("warn")))], "newer");
    let _newer = config_stream(kas, &r.token, ("", "", "")).await;
    wait_for("c2 to be sent", Duration::from_secs(30), || async {
        (kas.agent(r.agent_id).await.config?.commit == c2).then_some(())
    })
    .await;
    // The same agent (pod) reopening its stream: kas may see it before the old one end.
    let _refused = config_stream(kas, &r.token, (c1, &c2, "unknown field")).await;
    let state = kas.agent(r.agent_id).await.config.unwrap();
    assert_eq!(state.commit, c1);
}

/// A configuration commit fetched while kas's database is down — kas cannot look up the
/// manifest project the file lists — is not refused: the agent's stream ends `UNAVAILABLE`,
/// and the agent runs the commit once the database is back. It was sent as a refusal (agentk
/// logged "kas refused the agent configuration") and never sent again on that stream, which
/// sends a commit only when the head changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_kas_cannot_read_in_a_database_outage_reaches_the_agent_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("kas").unwrap();
    let repo = GitRepo::init(&dir.path().join("config"));
    let file = ".gitlab/agents/alpha/config.yaml";
    let c1 = repo.commit(&[(file, Some(&config("info")))], "c1");
    let options = KasOptions {
        git_poll: "1s",
        extra_yaml: format!("database:\n  url: {url}\n"),
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), options).await;
    let (_, agent) = applied_agent(&kas, ("group/config", "alpha"), &repo, &c1).await;

    pg.stop().unwrap();
    let c2 = repo.commit(&[(file, Some(&config("debug")))], "c2");
    wait_for(
        "kas to fail reading c2",
        Duration::from_secs(30),
        || async {
            let log = kas.log();
            (log.contains("Reading the agent configuration failed") && log.contains(&c2))
                .then_some(())
        },
    )
    .await;
    pg.restart().unwrap();
    agent.wait_log(APPLIED, &c2).await;
    assert!(!agent.log().contains(REFUSED), "{}", agent.log());
}

/// On a kas shared by teams, a configuration may list only manifest projects of its own
/// top-level group, or ones kas shares with every agent (`gitops.shared_manifest_projects`):
/// any configuration could list any project, and a tenant read another's private manifests
/// (E13). Listing another group's project is refused naming the entry; shared, it is read. A
/// configuration in force from before (here: kas restarted without sharing the project)
/// reads nothing of it either: the stream is refused naming the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_lists_only_its_groups_manifest_projects_or_shared_ones() {
    use tether_protocol::gitops::ObjectsRequest;
    use tether_protocol::gitops::git_ops_client::GitOpsClient;
    let dir = tempfile::tempdir().unwrap();
    let config_repo = GitRepo::init(&dir.path().join("config"));
    let file = ".gitlab/agents/tenant/config.yaml";
    let listing = |project: &str| {
        format!("gitops:\n  manifest_projects:\n  - id: {project}\n    paths:\n    - glob: '/**'\n")
    };
    let own = config_repo.commit(&[(file, Some(listing("t1/manifests").as_bytes()))], "own");
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    manifests.commit(&[("a.yaml", Some(b"kind: ConfigMap\n"))], "m");
    let shared = "gitops:\n  shared_manifest_projects: ['t2/*']\n";
    let opts = KasOptions {
        extra_yaml: shared.to_owned(),
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let mut kas = Kas::start(&dir.path().join("kas"), opts).await;
    for (path, repo) in [
        ("t1/config", &config_repo),
        ("t1/manifests", &manifests),
        ("t2/manifests", &manifests),
        ("t3/secret", &manifests),
    ] {
        project(&kas, path, &repo.dir.display().to_string(), None).await;
    }
    let t = kas
        .admin
        .register_agent("t1/config", "tenant")
        .await
        .unwrap();
    let mut stream = config_stream(&kas, &t.token, ("", "", "")).await;
    assert_eq!(stream.message().await.unwrap().unwrap().commit_id, own);

    let other = config_repo.commit(&[(file, Some(listing("t3/secret").as_bytes()))], "other");
    let status = wait_for("the refusal", Duration::from_secs(20), || async {
        let a = kas.agent(t.agent_id).await;
        let c = a.config?;
        (c.error_commit.as_deref() == Some(other.as_str())).then_some(c)
    })
    .await;
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains("gitops.manifest_projects[0].id: project \"t3/secret\" is outside this agent's group \"t1\""),
        "{error}"
    );
    assert_eq!(status.commit, own, "the last good configuration stays");

    let sharing = config_repo.commit(
        &[(file, Some(listing("t2/manifests").as_bytes()))],
        "shared",
    );
    wait_for(
        "the shared project accepted",
        Duration::from_secs(20),
        || async {
            let c = kas.agent(t.agent_id).await.config?;
            (c.commit == sharing).then_some(())
        },
    )
    .await;
    let token = t.token.as_str();
    let read = |kas_url: String| async move {
        let address = tether_transport::KasAddress::parse(&kas_url).unwrap();
        let channel = tether_transport::connect_lazy(&address, &Default::default()).unwrap();
        let request = ObjectsRequest {
            project_id: "t2/manifests".into(),
            globs: vec!["**".into()],
            ..ObjectsRequest::default()
        };
        GitOpsClient::new(channel)
            .get_objects_to_synchronize(as_agent(token, request))
            .await
    };
    assert!(
        read(kas.url("grpc")).await.is_ok(),
        "a shared project is read"
    );

    // kas no longer shares it: the configuration in force (stored) still lists it.
    drop(stream);
    let conf = std::fs::read_to_string(&kas.config).unwrap();
    std::fs::write(&kas.config, conf.replace("['t2/*']", "[]")).unwrap();
    kas.restart().await;
    let refused = read(kas.url("grpc")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("outside this agent's group \"t1\""),
        "{refused:?}"
    );
    // And `kas agent status` says why the entry never synchronizes, not "pending".
    let unreported = kas.admin.gitops_unreported(t.agent_id).await.unwrap();
    assert_eq!(unreported.len(), 1, "{unreported:?}");
    assert_eq!(unreported[0].state, tether_kas_api::EntryState::NotShared);
    assert!(unreported[0].state.is_unhealthy());
}
