//! kas and agentk over time: restarts of kas (SIGTERM and kill -9) and stopping agentk in the
//! middle of its work, as real processes on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Agent, GitRepo, Kas, KasOptions};
use tether_testenv::tmpfs::Tmpfs;

/// Error-level lines of an agentk log.
fn errors(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "error")
        .collect()
}

/// On SIGTERM kas first turns not ready and goes on serving for `shutdown_delay` (the time
/// Kubernetes takes to remove a terminating Pod's endpoints), then stops: requests sent to
/// it meanwhile are answered instead of refused, as during a rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_kas_is_not_ready_but_serves_through_the_shutdown_delay() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(
        dir.path(),
        KasOptions {
            extra_yaml: "shutdown_delay: 5s\n".into(),
            ..KasOptions::default()
        },
    )
    .await;
    assert_eq!(kas.readiness().await, Some(200));
    let asked = Instant::now();
    kas.sigterm();
    support::wait_for("kas not ready", Duration::from_secs(5), || async {
        (kas.readiness().await == Some(503)).then_some(())
    })
    .await;
    // Not ready, still serving: the API answers and the health endpoint is up.
    let agents = kas.admin.list_agents().await;
    assert!(agents.is_ok(), "{agents:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    kas.stop();
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "stopped before the delay: {took:?}"
    );
    assert!(
        kas.log()
            .contains("Not ready; still serving until the shutdown delay has passed"),
        "{}",
        kas.log()
    );
}

/// After each of 20 kas restarts (SIGTERM and kill -9 alternately) agentk's tunnel is back
/// within 2 s of kas answering (p99 = the slowest of 20). It took ~20 s when every refused
/// stream of a burst counted as a failure and the backoff jumped to its ceiling. A normal kas
/// shutdown is not a revoked token: agentk logs no error for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_is_back_within_two_seconds_of_every_kas_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas
        .admin
        .register_agent("group/app", "rollout")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "rollout", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;

    let mut back = Vec::new();
    for round in 0..20 {
        let kill9 = round % 2 == 1;
        kas.restart_by(kill9).await;
        let up = Instant::now();
        kas.wait_connected(t.agent_id).await;
        back.push(up.elapsed());
        assert_eq!(
            kas.admin
                .echo(t.agent_id, format!("round {round}").into_bytes())
                .await
                .unwrap()
                .as_ref(),
            format!("round {round}").as_bytes()
        );
    }
    back.sort();
    let (p50, p99) = (back[back.len() / 2], back[back.len() - 1]);
    eprintln!("reconnect after a kas restart: p50 {p50:?}, p99 {p99:?}");
    assert!(
        p99 <= Duration::from_secs(2),
        "slowest reconnect {p99:?} (all: {back:?})"
    );
    assert_eq!(errors(&agent), Vec::<serde_json::Value>::new());
}

/// A TCP server that accepts connections and never answers: an API server that hangs.
async fn hanging_api_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (port, task)
}

/// agentk stops within 5 s of SIGTERM even while its synchronization waits on an API request
/// that never completes (it took ~60 s, past Kubernetes' 30 s grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_exits_within_five_seconds_of_sigterm_while_a_sync_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let (api_port, _api) = hanging_api_server().await;
    let kubeconfig = dir.path().join("hanging.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: h\n  cluster:\n    server: http://127.0.0.1:{api_port}\n\
users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: h\n  context:\n    cluster: h\n    user: u\ncurrent-context: h\n"
        ),
    )
    .unwrap();
    let config = GitRepo::init(&dir.path().join("config"));
    config.commit(
        &[(
            ".gitlab/agents/stuck/config.yaml",
            Some(b"gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: default\n    paths:\n    - glob: '/*.yaml'\n"),
        )],
        "config",
    );
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    let commit = manifests.commit(
        &[(
            "cm.yaml",
            Some(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stuck\ndata:\n  k: v\n"),
        )],
        "manifests",
    );
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    kas.set_projects(&[("group/config", &config), ("group/manifests", &manifests)])
        .await;
    let t = kas
        .admin
        .register_agent("group/config", "stuck")
        .await
        .unwrap();
    let mut agent = Agent::start_with(
        dir.path(),
        "stuck",
        &kas.url("grpc"),
        &t.token,
        None,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--leader-election=false",
        ],
    );
    agent.wait_log("Synchronizing objects", &commit).await;
    let t0 = Instant::now();
    agent.stop();
    let took = t0.elapsed();
    eprintln!("agentk stopped {took:?} after SIGTERM");
    assert!(
        took < Duration::from_secs(5),
        "agentk took {took:?} to exit:\n{}",
        agent.log()
    );
    assert!(
        agent
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "agentk stopped"),
        "agentk did not stop cleanly:\n{}",
        agent.log()
    );
}

/// With kas's disk full, `kas token create`, `kas user-token create` and `kas token revoke`
/// fail — a non-zero exit, the reason on stderr and in kas's log — instead of printing a token
/// that was never stored (or "revoked" for a token that stays active). Once the disk has room
/// again, writes work without restarting kas, and what they reported survives a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_loudly_and_kas_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(16 * 1024);
    // Only kas's data (its database) lives on the small disk; its log stays readable.
    std::os::unix::fs::symlink(disk.path(), dir.path().join("data")).unwrap();
    let mut kas = Kas::start(dir.path(), KasOptions::default()).await;
    let t = kas.admin.register_agent("group/app", "disk").await.unwrap();
    let agent = t.agent_id.to_string();
    let config = kas.config.clone();
    let cli = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let user_token = [
        "user-token",
        "create",
        "--agent-id",
        &agent,
        "--username=alice",
        "--member=group:group:maintainer",
        "--expires-in=1h",
    ];

    let filler = disk.fill();
    let (ok, out, err) = cli(&["token", "create", "--agent-id", &agent]);
    assert!(!ok, "token create succeeded on a full disk: {out}");
    assert!(!out.contains("token:"), "{out}");
    assert!(!err.is_empty());
    let (ok, out, _) = cli(&user_token);
    assert!(!ok, "user-token create succeeded on a full disk: {out}");
    let (ok, out, _) = cli(&["token", "revoke", &t.token_id.to_string()]);
    assert!(!ok, "revoke reported on a full disk: {out}");
    assert!(
        kas.log().contains("Admin API request failed"),
        "{}",
        kas.log()
    );

    std::fs::remove_file(filler).unwrap();
    let (ok, out, err) = cli(&["token", "create", "--agent-id", &agent]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&user_token);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["token", "revoke", &t.token_id.to_string()]);
    assert!(ok, "{out}{err}");

    kas.kill9_restart().await;
    let tokens = kas.admin.list_tokens(t.agent_id).await.unwrap();
    let states: Vec<(i64, bool)> = tokens
        .iter()
        .map(|t| (t.id, t.revoked_at.is_some()))
        .collect();
    assert_eq!(states, [(t.token_id, true), (t.token_id + 1, false)]);
}

/// A duration out of its range in kas's configuration is refused at start, naming the key and
/// the range, and kas exits non-zero; one legal but costly starts with a warning naming the
/// cost. (`agent.max_connection_age: 0s` started silently and broke every agent's connection
/// every few seconds: E14 F6.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_refuses_an_absurd_duration_and_warns_of_a_costly_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kas.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: {}\nagent:\n  max_connection_age: 0s\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("agent.max_connection_age is 0s: it must be between 1s and 30days"),
        "{stderr}"
    );

    let opts = KasOptions {
        agent_extra: "  max_connection_age: 3s\n",
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("costly"), opts).await;
    let log = kas.log();
    let said = log
        .lines()
        .find(|l| l.contains("agent.max_connection_age is 3s (under 1m): every agent reconnects"))
        .unwrap_or_default();
    assert!(said.contains(r#""level":"warn""#), "{log}");
}

/// `kas agent list | head` must not panic when the reader goes away: the CLI ends quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    for i in 0..50 {
        kas.admin
            .register_agent("group/app", &format!("agent-{i}"))
            .await
            .unwrap();
    }
    let (reader, writer) = std::io::pipe().unwrap();
    // The reader is gone before kas writes a byte: every write fails with EPIPE.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(["agent", "list"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{}: {stderr}", out.status);
}

/// A project whose Git host (HTTP, SSH alike: gix's transports read from them without a way to
/// interrupt the read) accepts the connection and then says nothing: on SIGTERM kas exits
/// promptly, well within `git.fetch_timeout` (10 minutes here), its exit not waiting for the
/// thread blocked in the fetch's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_stops_promptly_while_a_fetch_waits_on_a_silent_remote() {
    let dir = tempfile::tempdir().unwrap();
    let opts = KasOptions {
        git_extra: "  fetch_timeout: 10m\n",
        ..KasOptions::default()
    };
    let mut kas = Kas::start(dir.path(), opts).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    kas.admin
        .set_project(&kas::api::ProjectRequest {
            path: "group/silent".into(),
            remote: Some(format!("http://127.0.0.1:{port}/silent.git")),
            ..kas::api::ProjectRequest::default()
        })
        .await
        .unwrap();
    // The fetch is under way, waiting for an answer that never comes.
    let (_held, _) = tokio::time::timeout(Duration::from_secs(30), silent.accept())
        .await
        .expect("kas fetches the project")
        .unwrap();

    let stopping = Instant::now();
    kas.stop();
    let took = stopping.elapsed();
    eprintln!("kas stopped {took:?} after SIGTERM");
    // Nothing in flight on a tunnel: the modules stop within a second or two.
    assert!(took < Duration::from_secs(10), "{took:?}:\n{}", kas.log());
}
