//! The seed walkthrough end to end: a real control plane (controller-manager, scheduler, kwok),
//! real Git repositories, real kas and agentk processes, and an agent whose ServiceAccount has
//! exactly the seed's RBAC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use kas::api::ProjectRequest;
use serde_json::Value;
use support::{Agent, GitRepo, Kas, KasOptions, wait_for};
use tether_testenv::{TestEnv, run_output, seed_agent_rbac};

fn deployment(name: &str, ns: &str, replicas: u32) -> Vec<u8> {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n"
    )
    .into_bytes()
}

fn is_event(l: &Value, event: &str, kind: &str, ns: &str, name: &str) -> bool {
    l["eventType"] == event && l["kind"] == kind && l["namespace"] == ns && l["name"] == name
}

fn get_json(env: &TestEnv, args: &[&str]) -> Option<Value> {
    let out = env
        .kubectl()
        .args(args)
        .args(["-o", "json"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_walkthrough() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("gitlab-k8s-agent").unwrap();
    let dude = env.create_namespace("dude").unwrap();
    let naww = env.create_namespace("naww").unwrap();
    env.apply_yaml(&seed_agent_rbac(&agent_ns, "gitlab-agent", &dude))
        .unwrap();
    let token = run_output(env.kubectl().args([
        "create",
        "token",
        "gitlab-agent",
        "-n",
        &agent_ns,
        "--duration=2h",
    ]))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("agent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        env.token_kubeconfig(String::from_utf8(token).unwrap().trim()),
    )
    .unwrap();

    // The agent's configuration project and the manifest project.
    let config_repo = GitRepo::init(&dir.path().join("config"));
    config_repo.commit(
        &[(
            ".gitlab/agents/seed/config.yaml",
            Some(
                format!(
                    "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {agent_ns}\n    paths:\n    - glob: '/manifests/*.{{yaml,yml,json}}'\n"
                )
                .as_bytes(),
            ),
        )],
        "agent config",
    );
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    let c1 = manifests.commit(
        &[
            ("manifests/dude.yaml", Some(&deployment("nginx", &dude, 1))),
            ("manifests/naww.yaml", Some(&deployment("nginx", &naww, 1))),
        ],
        "two deployments",
    );

    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    for (path, repo) in [
        ("group/config", &config_repo),
        ("group/manifests", &manifests),
    ] {
        kas.admin
            .set_project(&ProjectRequest {
                path: path.into(),
                remote: Some(repo.dir.display().to_string()),
                ..ProjectRequest::default()
            })
            .await
            .unwrap();
    }
    let t = kas
        .admin
        .register_agent("group/config", "seed")
        .await
        .unwrap();
    let agent = Agent::start_with(
        dir.path(),
        "seed",
        &kas.url("grpc"),
        &t.token,
        None,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--gitops-retry-interval",
            "2s",
        ],
    );

    // 1. dude becomes Available and is reported Current; naww fails as forbidden, alone.
    agent
        .wait_line("Starting synchronization worker", |l| {
            l["msg"] == "Starting synchronization worker" && l["project_id"] == "group/manifests"
        })
        .await;
    agent
        .wait_line("Synchronizing objects", |l| {
            l["msg"] == "Synchronizing objects"
                && l["commit_id"] == c1.as_str()
                && l["agent_id"] == t.agent_id
        })
        .await;
    let current = agent
        .wait_line("dude Current", |l| {
            is_event(l, "resourceStatus", "Deployment", &dude, "nginx") && l["status"] == "Current"
        })
        .await;
    assert_eq!(current["message"], "Deployment is available. Replicas: 1");
    assert_eq!(current["group"], "apps");
    assert_eq!(current["type"], "status");
    let d = get_json(
        &env,
        &[
            "get",
            "deployment",
            "nginx",
            "-n",
            &dude,
            "--show-managed-fields",
        ],
    )
    .unwrap();
    assert_eq!(d["status"]["availableReplicas"], 1);
    assert_eq!(
        d["metadata"]["managedFields"][0]["manager"], "agentk",
        "server-side apply with field manager agentk"
    );
    let failed = agent
        .wait_line("naww failed", |l| {
            is_event(l, "resourceFailed", "Deployment", &naww, "nginx")
        })
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("forbidden"),
        "{failed}"
    );
    let summary = agent
        .wait_line("Synchronization failed", |l| {
            l["msg"] == "Synchronization failed" && l["commit_id"] == c1.as_str()
        })
        .await;
    assert_eq!(summary["error"], "1 resources failed");
    let none = get_json(&env, &["get", "deployments", "-n", &naww]).unwrap();
    assert_eq!(none["items"].as_array().unwrap().len(), 0);

    // kas shows the commit applied and every object's last status.
    let status = wait_for("kas to show the sync", Duration::from_secs(30), || async {
        let s = kas.admin.gitops_status(t.agent_id).await.ok()?;
        s.into_iter().find(|s| s.commit_id == c1)
    })
    .await;
    assert_eq!(status.project_id, "group/manifests");
    assert_eq!(status.outcome, "failed");
    let by_ns = |ns: &str| {
        status
            .objects
            .iter()
            .find(|o| o.namespace == ns)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_ns(&dude).status, "Current");
    assert_eq!(by_ns(&naww).status, "Failed");

    // 2. Scale dude to 2 in Git: applied.
    let c2 = manifests.commit(
        &[("manifests/dude.yaml", Some(&deployment("nginx", &dude, 2)))],
        "scale",
    );
    let two = agent
        .wait_line("dude at 2 replicas", |l| {
            is_event(l, "resourceStatus", "Deployment", &dude, "nginx")
                && l["message"] == "Deployment is available. Replicas: 2"
        })
        .await;
    assert_eq!(two["status"], "Current");
    let d = get_json(&env, &["get", "deployment", "nginx", "-n", &dude]).unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    let _ = c2;

    // 3. Remove dude.yaml: pruned.
    let c3 = manifests.commit(&[("manifests/dude.yaml", None)], "remove dude");
    agent
        .wait_line("dude pruned", |l| {
            is_event(l, "resourcePruned", "Deployment", &dude, "nginx")
        })
        .await;
    wait_for(
        "the Deployment to be gone",
        Duration::from_secs(60),
        || async {
            get_json(&env, &["get", "deployments", "-n", &dude])
                .filter(|v| v["items"].as_array().is_some_and(Vec::is_empty))
        },
    )
    .await;
    let _ = c3;

    // 4. Bring dude back, then commit a broken file: nothing is deleted, the error is clear.
    let c4 = manifests.commit(
        &[("manifests/dude.yaml", Some(&deployment("nginx", &dude, 1)))],
        "dude again",
    );
    wait_for(
        "kas to show c4 with dude Current",
        Duration::from_secs(90),
        || async {
            kas.admin
                .gitops_status(t.agent_id)
                .await
                .ok()?
                .into_iter()
                .find(|s| {
                    s.commit_id == c4
                        && s.objects
                            .iter()
                            .any(|o| o.namespace == dude && o.status == "Current")
                })
        },
    )
    .await;
    let c5 = manifests.commit(
        &[(
            "manifests/broken.yaml",
            Some(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n"),
        )],
        "broken",
    );
    let broken = agent
        .wait_line("the broken commit's failure", |l| {
            l["msg"] == "Synchronization failed" && l["commit_id"] == c5.as_str()
        })
        .await;
    let error = broken["error"].as_str().unwrap();
    assert!(error.contains("manifests/broken.yaml"), "{error}");
    assert!(error.contains(":4:") || error.contains("line"), "{error}");
    let d = get_json(&env, &["get", "deployment", "nginx", "-n", &dude]);
    assert!(
        d.is_some(),
        "nothing may be deleted because of a broken file"
    );
    assert!(
        !agent
            .log_lines()
            .iter()
            .any(|l| l["eventType"] == "resourcePruned"
                && l["namespace"] == dude.as_str()
                && l["time"].as_str() > broken["time"].as_str()),
        "no prune after the broken commit"
    );

    // 5. Fix it: recovers.
    let c6 = manifests.commit(
        &[(
            "manifests/broken.yaml",
            Some(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fixed\n"),
        )],
        "fixed",
    );
    let recovered = wait_for(
        "kas to show the fixed commit",
        Duration::from_secs(90),
        || async {
            kas.admin
                .gitops_status(t.agent_id)
                .await
                .ok()?
                .into_iter()
                .find(|s| s.commit_id == c6)
        },
    )
    .await;
    assert_eq!(
        recovered.error, "1 resources failed",
        "only naww fails: {recovered:?}"
    );
    let cm = recovered
        .objects
        .iter()
        .find(|o| o.kind == "ConfigMap" && o.name == "fixed")
        .unwrap();
    assert_eq!(cm.status, "Current");
    assert_eq!(
        cm.namespace, agent_ns,
        "default_namespace applied to the namespaced object"
    );
    assert!(get_json(&env, &["get", "configmap", "fixed", "-n", &agent_ns]).is_some());
}
