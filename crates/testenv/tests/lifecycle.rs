//! `testenv up`/`down` and a killed supervisor leave no control-plane process behind.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_testenv::TestEnv;

fn pids(state: &Path) -> Vec<(i32, String)> {
    std::fs::read_to_string(state.join("pids"))
        .expect("pids file")
        .lines()
        .filter_map(|l| {
            let (pid, name) = l.split_once(' ')?;
            Some((pid.parse().ok()?, name.to_string()))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls until every pid is gone (the processes need a moment to exit after the signal).
fn wait_all_gone(pids: &[(i32, String)]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = pids
            .iter()
            .filter(|(p, _)| alive(*p))
            .map(|(p, n)| format!("{n} ({p})"))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn testenv(bin_dir: &Path, state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_testenv"));
    c.arg("--bin-dir").arg(bin_dir);
    c.env("TETHER_TESTENV_STATE", state);
    c
}

/// `testenv up` into `state`, asserting it succeeded.
fn up(env: &TestEnv, state: &Path) -> std::process::Output {
    let up = testenv(&env.bin_dir, state)
        .arg("up")
        .output()
        .expect("testenv up");
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    up
}

#[test]
fn up_then_down_leaves_no_process() {
    let env = TestEnv::from_env().expect("a running control plane (for its programs)");
    let state = tempfile::tempdir().expect("tempdir");
    let up = up(&env, state.path());
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(stdout.contains("export KUBECONFIG="), "{stdout}");
    let running = pids(state.path());
    assert_eq!(running.len(), 5, "{running:?}");
    assert!(running.iter().all(|(p, _)| alive(*p)));

    // The cluster it started answers with the kubeconfig it printed.
    let second = TestEnv::open(state.path()).expect("state");
    let nodes = tether_testenv::run_output(second.kubectl().args(["get", "nodes", "-o", "name"]))
        .expect("kubectl get nodes");
    assert_eq!(String::from_utf8_lossy(&nodes).trim(), "node/kwok-node-0");

    let down = testenv(&env.bin_dir, state.path())
        .arg("down")
        .output()
        .expect("testenv down");
    assert!(down.status.success());
    assert_eq!(wait_all_gone(&running), Vec::<String>::new());
}

#[test]
fn a_killed_supervisor_takes_its_children_with_it() {
    let env = TestEnv::from_env().expect("a running control plane (for its programs)");
    let state = tempfile::tempdir().expect("tempdir");
    up(&env, state.path());
    let running = pids(state.path());
    let sup: i32 = std::fs::read_to_string(state.path().join("supervisor.pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("number");
    let killed = Command::new("kill")
        .args(["-KILL", &sup.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert_eq!(wait_all_gone(&running), Vec::<String>::new());
}

#[test]
fn programs_report_the_pinned_versions() {
    let env = TestEnv::from_env().expect("a running control plane (for its programs)");
    let pins = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testenv/versions.env"),
    )
    .expect("versions.env");
    let pin = |key: &str| {
        pins.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .expect(key)
            .to_string()
    };
    let out = tether_testenv::run_output(
        Command::new(env.bin_dir.join("kube-apiserver")).arg("--version"),
    )
    .expect("kube-apiserver --version");
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        format!("Kubernetes {}", pin("K8S_VERSION"))
    );
    let out = tether_testenv::run_output(Command::new(env.bin_dir.join("etcd")).arg("--version"))
        .expect("etcd --version");
    let etcd = pin("ETCD_VERSION");
    assert!(
        String::from_utf8_lossy(&out).contains(etcd.trim_start_matches('v')),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_component_that_exits_on_its_own_is_logged_and_stops_the_control_plane() {
    let env = TestEnv::from_env().expect("a running control plane (for its programs)");
    let state = tempfile::tempdir().expect("tempdir");
    up(&env, state.path());
    let running = pids(state.path());
    let (scheduler, _) = running
        .iter()
        .find(|(_, n)| n == "kube-scheduler")
        .expect("a kube-scheduler");
    // Killed behind the supervisor's back, not through `testenv stop`: a crash.
    let killed = Command::new("kill")
        .args(["-KILL", &scheduler.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert_eq!(wait_all_gone(&running), Vec::<String>::new());
    let log = std::fs::read_to_string(state.path().join("supervisor.log")).expect("log");
    assert!(
        log.contains("kube-scheduler exited unexpectedly (signal: 9 (SIGKILL))"),
        "{log}"
    );
}
