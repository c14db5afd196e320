//! Admin commands that need no running kas.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Agent, GitRepo, Kas, KasOptions, wait_for};

fn validate(yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| {
        String::from_utf8(b)
            .unwrap()
            .replace(file.to_str().unwrap(), "FILE")
    };
    (out.status.success(), text(out.stdout), text(out.stderr))
}

#[test]
fn config_validate_accepts_a_valid_agent_configuration_and_says_what_is_in_it() {
    let (ok, stdout, stderr) = validate(
        "gitops:\n  manifest_projects:\n  - id: group/app\n    paths:\n    - glob: 'manifests/**/*.yaml'\n\
         ci_access:\n  projects:\n  - id: group/app\n",
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "FILE: valid (1 manifest project(s), 1 CI access project(s) and group(s), user access off)"
    );
}

#[test]
fn config_validate_refuses_what_kas_would_refuse_naming_file_key_and_line() {
    let (ok, _, stderr) =
        validate("gitops:\n  manifest_projects:\n  - id: group/app\n    pathz: []\n");
    assert!(!ok);
    assert!(
        stderr.contains("FILE: gitops.manifest_projects[0].pathz"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown key \"pathz\""), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    let (ok, _, stderr) = validate("observability:\n  logging:\n    level: loud\n");
    assert!(!ok);
    assert!(stderr.contains("observability.logging.level"), "{stderr}");
}

#[test]
fn config_validate_checks_kustomize_and_helm_entries() {
    let (ok, stdout, stderr) = validate(
        "gitops:\n  manifest_projects:\n  - id: group/app\n    kustomize:\n      path: overlays/prod\n\
         \x20 - id: group/chart\n    helm:\n      chart: charts/app\n      release_name: app\n      values: {replicas: 2}\n",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 manifest project(s)"), "{stdout}");
    let (ok, _, stderr) = validate(
        "gitops:\n  manifest_projects:\n  - id: group/app\n    helm:\n      chart: charts/app\n      release_name: App\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("FILE: gitops.manifest_projects[0].helm.release_name: \"App\" is not a valid release name"),
        "{stderr}"
    );
    assert!(stderr.contains("line 6"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_named_as_in_kubeconfig_contexts_or_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas
        .admin
        .register_agent("group/app", "named")
        .await
        .unwrap();
    let cli = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&kas.config)
            .args(args)
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (o.status.success(), text(o.stdout), text(o.stderr))
    };
    let (ok, out, err) = cli(&["agent", "status", "group/app:named"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "agent {} has reported no synchronization yet",
            t.agent_id
        )),
        "{out}"
    );
    let (ok, out, err) = cli(&[
        "token",
        "create",
        "--agent",
        "group/app:named",
        "--description",
        "rotation",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("token: "), "{out}");
    let by_name = cli(&["token", "list", "--agent-id", "group/app:named"]);
    let by_id = cli(&["token", "list", "--agent-id", &t.agent_id.to_string()]);
    assert!(by_name.0 && by_name.1.contains("rotation"), "{by_name:?}");
    assert_eq!(by_name.1, by_id.1);
    let (ok, _, err) = cli(&["agent", "ping", "group/app:nope"]);
    assert!(!ok);
    assert!(err.contains("no agent group/app:nope"), "{err}");
    let (ok, _, err) = cli(&["agent", "status", "group/app"]);
    assert!(!ok);
    assert!(err.contains("<project path>:<agent name>"), "{err}");
}

#[test]
fn shell_completions_are_valid_scripts_that_know_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for word in ["register", "validate", "user-token", "--output-manifests"] {
        assert!(script.contains(word), "{word} missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kas.bash");
    std::fs::write(&file, &script).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
}

/// `kas completions bash | head -1` ends quietly: it panicked with "failed to write
/// completion file" (exit 101) when the reader went away.
#[test]
fn shell_completions_end_quietly_when_their_reader_goes_away() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["completions", "bash"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{}: {stderr}", out.status);
}

/// A mistyped id is an error naming it, as for `kas token revoke`; before, it printed
/// `{"was_active":false,…}` and exited 0, as if the token had been revoked already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_token_revoke_of_an_unknown_id_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas.admin.register_agent("group/app", "pats").await.unwrap();
    let req = kas::api::UserTokenRequest {
        username: "alice".into(),
        memberships: Vec::new(),
        expires_in_seconds: Some(3600),
    };
    let pat = kas.admin.create_user_token(t.agent_id, &req).await.unwrap();
    let revoke = |id: i64| {
        Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&kas.config)
            .args(["user-token", "revoke", &id.to_string()])
            .output()
            .unwrap()
    };
    let unknown = pat.token_id + 1000;
    let o = revoke(unknown);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("personal access token {unknown} not found")),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    let o = revoke(pat.token_id);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // In words, as `kas token revoke` says it (it printed the API's JSON).
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.trim(),
        format!(
            "personal access token {} revoked (was active: true, requests ended: 0)",
            pat.token_id
        )
    );
}

/// `kas project add` with a local remote that does not exist on kas's host (a typo) fails
/// naming it, and nothing is stored; before, it exited 0 and every fetch then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_add_of_a_missing_local_repository_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let missing = dir.path().join("no-such-repository");
    let o = Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(["project", "add", "--path", "group/typo", "--remote"])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "remote {}: no such directory on kas's host",
            missing.display()
        )),
        "{stderr}"
    );
    let stored = kas.admin.list_projects().await.unwrap();
    assert!(stored.iter().all(|p| p.path != "group/typo"), "{stored:?}");
}

/// A project whose remote is a local bare repository with an object missing: `kas project
/// list` shows the fetch error with what `git upload-pack` said (gix's file transport dropped
/// upload-pack's stderr, leaving "failed to fill whole buffer" as the only reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_local_repository_shows_what_upload_pack_said_in_project_list() {
    let dir = tempfile::tempdir().unwrap();
    let work = GitRepo::init(&dir.path().join("work"));
    work.commit(
        &[(
            "manifests/cm.yaml",
            Some(
                b"kind: ConfigMap
",
            ),
        )],
        "one",
    );
    let bare = dir.path().join("corrupt.git");
    let target = bare.to_str().unwrap();
    work.git(&["clone", "-q", "--bare", "--no-hardlinks", ".", target]);
    let blob = work.git(&["rev-parse", "HEAD:manifests/cm.yaml"]);
    let blob = blob.trim();
    std::fs::remove_file(bare.join("objects").join(&blob[..2]).join(&blob[2..])).unwrap();
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
    kas.set_projects(&[("group/corrupt", &GitRepo { dir: bare })])
        .await;
    wait_for("the fetch to fail", Duration::from_secs(30), || async {
        let projects = kas.admin.list_projects().await.ok()?;
        projects.into_iter().find_map(|p| p.fetch_error)
    })
    .await;
    let o = kas.cli().args(["project", "list"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}");
    assert!(
        stdout.contains("group/corrupt: fetch error: ")
            && stdout.contains("(git upload-pack said: error: git upload-pack: git-pack-objects died with error.; fatal: git upload-pack: aborting due to possible repository corruption on the remote side.)"),
        "{stdout}"
    );
}

/// After a broken config.yaml is pushed, `kas agent status` says the agent is connected, which
/// commit is in force and that the newest was refused and why, in the table and in `-o json`,
/// and exits 5. Before, it showed the old successful syncs only and exited 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_names_a_refused_configuration_and_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo"));
    let good = repo.commit(&[(".gitlab/agents/gamma/config.yaml", Some(b""))], "empty");
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
    kas.set_projects(&[("group/strict", &repo)]).await;
    let t = kas
        .admin
        .register_agent("group/strict", "gamma")
        .await
        .unwrap();
    let _agent = Agent::start(dir.path(), "gamma", &kas.url("grpc"), &t.token, None);
    let bad_yaml = b"gitops:\n  manifest_projects:\n  - id: group/m\n    pathz: []\n";
    let bad = repo.commit(
        &[(".gitlab/agents/gamma/config.yaml", Some(bad_yaml))],
        "typo",
    );
    wait_for(
        "kas to refuse the pushed configuration",
        Duration::from_secs(20),
        || async {
            let a = kas.agent(t.agent_id).await;
            let refused = a.config?.error_commit.as_deref() == Some(bad.as_str());
            (refused && a.connected).then_some(())
        },
    )
    .await;
    let status = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&kas.config)
            .args(["agent", "status", "group/strict:gamma", "-o", format])
            .output()
            .unwrap()
    };
    let o = status("table");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(5), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("agent {}: connected", t.agent_id)),
        "{stdout}"
    );
    let refusal = format!("configuration refused at commit {}: ", &bad[..12]);
    assert!(stdout.contains(&format!("REFUSED: {refusal}")), "{stdout}");
    assert!(stdout.contains("pathz"), "{stdout}");
    assert!(
        stdout.contains(&format!("commit {} stays in force", &good[..12])),
        "{stdout}"
    );
    assert!(stderr.contains(&refusal), "{stderr}");

    let o = status("json");
    assert_eq!(o.status.code(), Some(5));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["connected"], true, "{json}");
    assert_eq!(json["config"]["commit"], good.as_str(), "{json}");
    assert_eq!(json["config"]["error_commit"], bad.as_str(), "{json}");
    assert!(
        json["config"]["error"].as_str().unwrap().contains("pathz"),
        "{json}"
    );
    assert!(json["syncs"].is_array(), "{json}");
}

/// One agent token installed in two clusters (here: agentk running as two ServiceAccounts, as
/// it would in two clusters) is shown: kas logs a warning and counts it, `kas agent list`
/// names both ServiceAccount UIDs and `kas agent status` exits 6. Replicas of one agent (one
/// ServiceAccount) are not reported; once one cluster's agentk is gone, status exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_token_used_from_two_clusters_is_reported_and_status_exits_6() {
    let env = tether_testenv::TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("shared-token").unwrap();
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: cluster-a\n  namespace: {ns}\n---\n\
apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: cluster-b\n  namespace: {ns}\n"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = |sa: &str| {
        let path = dir.path().join(format!("{sa}.kubeconfig"));
        env.write_service_account_kubeconfig(&ns, sa, "1h", &path)
            .unwrap();
        path.display().to_string()
    };
    let (a, b) = (kubeconfig("cluster-a"), kubeconfig("cluster-b"));
    let repo = GitRepo::init(&dir.path().join("repo"));
    repo.commit(&[(".gitlab/agents/twice/config.yaml", Some(b""))], "empty");
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    kas.set_projects(&[("group/twice", &repo)]).await;
    let t = kas
        .admin
        .register_agent("group/twice", "twice")
        .await
        .unwrap();
    let start = |name: &str, kubeconfig: &str| {
        let args = ["--kubeconfig", kubeconfig, "--leader-election=false"];
        Agent::start_with(dir.path(), name, &kas.url("grpc"), &t.token, None, &args)
    };
    let _a1 = start("a1", &a);
    let _a2 = start("a2", &a);
    let connections = |n: usize| {
        let kas = &kas;
        async move {
            let agent = kas.agent(t.agent_id).await;
            (agent.connections.len() == n).then_some(agent)
        }
    };
    wait_for("two replicas in cluster a", Duration::from_secs(30), || {
        connections(2)
    })
    .await;
    let status = || {
        Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&kas.config)
            .args(["agent", "status", "group/twice:twice"])
            .output()
            .unwrap()
    };
    assert_eq!(status().status.code(), Some(0), "replicas share a cluster");

    let mut b1 = start("b1", &b);
    let agent = wait_for(
        "the agent in cluster b too",
        Duration::from_secs(30),
        || connections(3),
    )
    .await;
    let clusters = agent.clusters_sharing_token();
    assert_eq!(clusters.len(), 2, "{:?}", agent.connections);
    let o = status();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("connected from 2 clusters"), "{stderr}");
    assert!(
        stderr.contains(clusters[0]) && stderr.contains(clusters[1]),
        "{stderr}"
    );
    let list = Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(["agent", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("WARNING: connected from 2 clusters"),
        "{listed}"
    );
    assert!(
        kas.log()
            .contains("The agent is connected from two clusters")
    );
    let shared = kas
        .metric("kas_tunnel_agent_token_shared_by_clusters_total")
        .await
        .unwrap_or(0.0);
    assert!(shared >= 1.0, "counted: {shared}");

    b1.stop();
    wait_for("cluster b's agentk gone", Duration::from_secs(30), || {
        connections(2)
    })
    .await;
    assert_eq!(status().status.code(), Some(0));
}

/// The agent's ServiceAccount deleted and created again (a Helm reinstall, a namespace restored)
/// has a new UID, and the kubelet rewrites the running Pods' token files with tokens of the new
/// one. A running agentk reads its cluster id from that file again and tells kas, so a replica
/// started afterwards is one cluster with it, not the critical "token in two clusters" (it
/// kept the UID read at start: `kas agent status` exited 6 until the old Pods were gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_created_again_is_still_one_cluster() {
    let env = tether_testenv::TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("sa-again").unwrap();
    let sa = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: agentk\n  namespace: {ns}\n"
    );
    env.apply_yaml(&sa).unwrap();
    let uid = || {
        let out = tether_testenv::run_output(env.kubectl().args([
            "get",
            "sa",
            "agentk",
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ]))
        .unwrap();
        String::from_utf8(out).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("kube.token");
    // Replaced atomically, as the kubelet does.
    let write_token = || {
        let out = tether_testenv::run_output(env.kubectl().args([
            "create",
            "token",
            "agentk",
            "-n",
            &ns,
            "--duration=1h",
        ]))
        .unwrap();
        let tmp = dir.path().join("kube.token.tmp");
        std::fs::write(&tmp, out).unwrap();
        std::fs::rename(&tmp, &token_file).unwrap();
    };
    write_token();
    let kubeconfig = dir.path().join("agentk.kubeconfig");
    let with_file = env.token_kubeconfig("unused").replace(
        "token: unused",
        &format!("tokenFile: {}", token_file.display()),
    );
    std::fs::write(&kubeconfig, with_file).unwrap();
    let kubeconfig = kubeconfig.display().to_string();

    let repo = GitRepo::init(&dir.path().join("repo"));
    repo.commit(&[(".gitlab/agents/again/config.yaml", Some(b""))], "empty");
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    kas.set_projects(&[("group/again", &repo)]).await;
    let t = kas
        .admin
        .register_agent("group/again", "again")
        .await
        .unwrap();
    let start = |name: &str| {
        let args = [
            "--kubeconfig",
            kubeconfig.as_str(),
            "--leader-election=false",
        ];
        Agent::start_with(dir.path(), name, &kas.url("grpc"), &t.token, None, &args)
    };
    let clusters_of = |n: usize, id: String| {
        let kas = &kas;
        async move {
            let agent = kas.agent(t.agent_id).await;
            let told = agent
                .connections
                .iter()
                .filter(|c| c.cluster_id == id)
                .count();
            (agent.connections.len() == n && told == n).then_some(agent)
        }
    };
    let r1 = start("r1");
    let first = uid();
    wait_for(
        "r1 connected from the first ServiceAccount",
        Duration::from_secs(30),
        || clusters_of(1, first.clone()),
    )
    .await;

    run_kubectl(&env, &["delete", "sa", "agentk", "-n", &ns, "--wait"]);
    env.apply_yaml(&sa).unwrap();
    let second = uid();
    assert_ne!(first, second, "a new ServiceAccount");
    write_token();
    wait_for(
        "r1 telling the new ServiceAccount",
        Duration::from_secs(30),
        || clusters_of(1, second.clone()),
    )
    .await;
    assert!(r1.log().contains("has a new UID"), "{}", r1.log());

    let _r2 = start("r2");
    let agent = wait_for(
        "both replicas in one cluster",
        Duration::from_secs(30),
        || clusters_of(2, second.clone()),
    )
    .await;
    assert!(
        agent.clusters_sharing_token().is_empty(),
        "{:?}",
        agent.connections
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(["agent", "status", "group/again:again"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        !kas.log().contains("connected from two clusters"),
        "{}",
        kas.log()
    );
    let shared = kas
        .metric("kas_tunnel_agent_token_shared_by_clusters_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(shared, 0.0);
}

fn run_kubectl(env: &tether_testenv::TestEnv, args: &[&str]) {
    tether_testenv::run_output(env.kubectl().args(args)).unwrap();
}
