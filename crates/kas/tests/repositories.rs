//! Real repositories as teams host them: reached over SSH with a deploy key and pinned host
//! keys (a real sshd on loopback), with real kas and agentk processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kas::api::ProjectRequest;
use support::{Agent, GitRepo, Kas, KasOptions};
use tether_testenv::sshd::{Sshd, keygen};

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
