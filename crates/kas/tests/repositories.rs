//! Real repositories as teams host them: reached over SSH with a deploy key and pinned host
//! keys (a real sshd on loopback), and signed commits only (real `git commit -S`), with real
//! kas and agentk processes and, for manifests, the real control plane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use kas::api::ProjectRequest;
use support::{Agent, GitRepo, Kas, KasOptions, wait_for};
use tether_gitops_server::ReportedOutcome;
use tether_testenv::signing::Signer;
use tether_testenv::sshd::{Sshd, keygen};
use tether_testenv::{TestEnv, seed_agent_rbac};

const APPLIED: &str = "Agent configuration applied";

fn config(level: &str) -> Vec<u8> {
    format!(
        "gitops:\n  manifest_projects:\n  - id: group/manifests\n    paths:\n    - glob: '/manifests/*.yaml'\nobservability:\n  logging:\n    level: {level}\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_project_is_fetched_over_ssh_with_a_deploy_key() {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("git/config.git"));
    let c1 = repo.commit(
        &[(".gitlab/agents/sshy/config.yaml", Some(&config("info")))],
        "agent config",
    );
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let deploy = keygen(&keys, "deploy").unwrap();
    let sshd = Sshd::start(&[&deploy.public]).unwrap();
    let known_hosts = sshd.write_known_hosts(&keys).unwrap();
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "1s",
            ..KasOptions::default()
        },
    )
    .await;
    kas.admin
        .set_project(&ProjectRequest {
            path: "group/config".into(),
            remote: Some(sshd.url(&repo.dir)),
            ssh_key_file: Some(deploy.private.display().to_string()),
            known_hosts_file: Some(known_hosts.display().to_string()),
            ..ProjectRequest::default()
        })
        .await
        .unwrap();
    let t = kas
        .admin
        .register_agent("group/config", "sshy")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "sshy", &kas.url("grpc"), &t.token, None);
    let applied = agent.wait_log(APPLIED, &c1).await;
    assert_eq!(applied["log_level"], "info");

    // A new commit arrives over SSH too.
    let c2 = repo.commit(
        &[(".gitlab/agents/sshy/config.yaml", Some(&config("debug")))],
        "debug logs",
    );
    let applied = agent.wait_log(APPLIED, &c2).await;
    assert_eq!(applied["log_level"], "debug");
    let projects = kas.admin.list_projects().await.unwrap();
    assert_eq!(projects[0].commit.as_deref(), Some(c2.as_str()));
    assert_eq!(projects[0].fetch_error, None);
    assert!(
        sshd.log().contains("Accepted publickey"),
        "kas logged in with the deploy key: {}",
        sshd.log()
    );
}

fn configmap(ns: &str, value: &str) -> Vec<u8> {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: signed\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n"
    )
    .into_bytes()
}

fn cluster_value(env: &TestEnv, ns: &str) -> String {
    let out = env
        .kubectl()
        .args(["get", "configmap", "signed", "-n", ns])
        .args(["-o", "jsonpath={.data.value}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_manifest_commit_is_not_applied_and_a_signed_one_is() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("signed").unwrap();
    let other = env.create_namespace("signed-other").unwrap();
    env.apply_yaml(&seed_agent_rbac(&ns, "gitlab-agent", &other))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("agent.kubeconfig");
    env.write_service_account_kubeconfig(&ns, "gitlab-agent", "2h", &kubeconfig)
        .unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let alice = Signer::ssh(&keys, "alice", "alice@example.com").unwrap();
    let allowed_signers = alice.write_trust(&keys, "allowed_signers").unwrap();

    let config_repo = GitRepo::init(&dir.path().join("config"));
    config_repo.commit(
        &[(
            ".gitlab/agents/signed/config.yaml",
            Some(
                format!(
                    "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n    paths:\n    - glob: '/manifests/*.yaml'\n"
                )
                .as_bytes(),
            ),
        )],
        "agent config",
    );
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    std::fs::create_dir_all(manifests.dir.join("manifests")).unwrap();
    std::fs::write(
        manifests.dir.join("manifests/cm.yaml"),
        configmap(&ns, "v1"),
    )
    .unwrap();
    let c1 = alice.commit(&manifests.dir, "signed v1").unwrap();

    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    for (path, repo, verify) in [
        ("group/config", &config_repo, None),
        ("group/manifests", &manifests, Some(&allowed_signers)),
    ] {
        kas.admin
            .set_project(&ProjectRequest {
                path: path.into(),
                remote: Some(repo.dir.display().to_string()),
                verify_allowed_signers_file: verify.map(|f| f.display().to_string()),
                ..ProjectRequest::default()
            })
            .await
            .unwrap();
    }
    let t = kas
        .admin
        .register_agent("group/config", "signed")
        .await
        .unwrap();
    let _agent = Agent::start_with(
        dir.path(),
        "signed",
        &kas.url("grpc"),
        &t.token,
        None,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--gitops-retry-interval",
            "2s",
            "--leader-election-namespace",
            &ns,
        ],
    );
    let sync = |commit: String| {
        let kas = &kas;
        let agent_id = t.agent_id;
        async move {
            wait_for(
                &format!("the agent's report on {commit}"),
                Duration::from_secs(90),
                || async {
                    kas.admin
                        .gitops_status(agent_id)
                        .await
                        .ok()?
                        .into_iter()
                        .find(|s| s.commit_id == commit)
                },
            )
            .await
        }
    };
    let s1 = sync(c1.clone()).await;
    assert_eq!(s1.outcome, ReportedOutcome::Succeeded, "{s1:?}");
    assert_eq!(cluster_value(&env, &ns), "v1");

    // Unsigned: refused by kas, nothing applied (and nothing pruned: the ConfigMap stays).
    let c2 = manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap(&ns, "unsigned")))],
        "unsigned v2",
    );
    let s2 = sync(c2.clone()).await;
    assert_eq!(s2.outcome, ReportedOutcome::Failed, "{s2:?}");
    assert!(s2.error.contains("not signed"), "{s2:?}");
    assert_eq!(
        cluster_value(&env, &ns),
        "v1",
        "the unsigned commit was not applied"
    );
    let refusal = wait_for(
        "kas project list to show the refusal",
        Duration::from_secs(30),
        || async {
            kas.admin
                .list_projects()
                .await
                .ok()?
                .into_iter()
                .find(|p| p.path == "group/manifests")?
                .refusal
        },
    )
    .await;
    assert_eq!(refusal.commit, c2);
    assert!(refusal.reason.contains("not signed"), "{refusal:?}");
    let listed = kas.admin.list_projects().await.unwrap();
    let project = listed.iter().find(|p| p.path == "group/manifests").unwrap();
    assert_eq!(
        project.commit.as_deref(),
        Some(c1.as_str()),
        "the last verified commit stays"
    );
    assert!(
        kas.log().contains("Refused a manifest commit"),
        "refusal logged by kas"
    );

    // Signed again: applied.
    std::fs::write(
        manifests.dir.join("manifests/cm.yaml"),
        configmap(&ns, "v3"),
    )
    .unwrap();
    let c3 = alice.commit(&manifests.dir, "signed v3").unwrap();
    let s3 = sync(c3.clone()).await;
    assert_eq!(s3.outcome, ReportedOutcome::Succeeded, "{s3:?}");
    assert_eq!(cluster_value(&env, &ns), "v3");
    let project = kas.admin.list_projects().await.unwrap();
    let project = project
        .iter()
        .find(|p| p.path == "group/manifests")
        .unwrap();
    assert_eq!(project.refusal, None);
}
