//! Components of a running control plane restart with their data: what a ConfigMap written
//! before a restart of kube-apiserver (SIGKILL) or etcd (SIGTERM) reads back as afterwards.
//!
//! The test starts a control plane of its own (restarting the shared one of `testenv run` would
//! break every test running next to it); `TETHER_TESTENV_DIR` only tells it where the programs
//! are, and it fails, never skips, when they are missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tether_testenv::{StopSignal, TestEnv, run_output};

/// A control plane started by `testenv up` into a temporary folder, stopped when dropped (also
/// when the test panics: `up` detaches the supervisor, so nothing else would stop it).
struct Own {
    env: TestEnv,
    bin_dir: PathBuf,
    _state: tempfile::TempDir,
}

fn testenv(bin_dir: &Path, state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_testenv"));
    c.arg("--bin-dir")
        .arg(bin_dir)
        .env("TETHER_TESTENV_STATE", state);
    c
}

impl Own {
    fn up() -> Self {
        // The error says how to run the tests with the programs (never a skip).
        let shared = TestEnv::from_env()
            .unwrap_or_else(|e| panic!("the control-plane programs are needed: {e}"));
        let state = tempfile::tempdir().expect("tempdir");
        let out = testenv(&shared.bin_dir, state.path())
            .arg("up")
            .output()
            .expect("testenv up");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = TestEnv::open(state.path()).expect("state of the new control plane");
        Self {
            env,
            bin_dir: shared.bin_dir,
            _state: state,
        }
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        let _ = testenv(&self.bin_dir, &self.env.dir).arg("down").status();
    }
}

fn pid_of(env: &TestEnv, name: &str) -> u32 {
    env.components()
        .expect("status")
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, pid)| pid)
        .unwrap_or_else(|| panic!("{name} is not running"))
}

fn configmap_value(env: &TestEnv, ns: &str) -> String {
    let out = run_output(env.kubectl().args([
        "get",
        "configmap",
        "survivor",
        "-n",
        ns,
        "-o=jsonpath={.data.answer}",
    ]))
    .expect("read the ConfigMap back");
    String::from_utf8_lossy(&out).into_owned()
}

/// Restarts `name` with `signal`, asserting that a new process replaced the old one and that
/// the ConfigMap reads back unchanged once it is healthy.
fn restart_and_read_back(env: &TestEnv, ns: &str, name: &str, signal: StopSignal) {
    let before = pid_of(env, name);
    let t0 = Instant::now();
    env.restart_component(name, signal)
        .unwrap_or_else(|e| panic!("restart {name}: {e}"));
    eprintln!(
        "{name} restarted ({signal}) and healthy in {:?}",
        t0.elapsed()
    );
    assert_ne!(pid_of(env, name), before, "{name} is a new process");
    assert!(
        !Path::new(&format!("/proc/{before}")).exists(),
        "the old {name} ({before}) is gone"
    );
    // Healthy means the apiserver serves again: this first request after the restart must work.
    env.wait_healthy("kube-apiserver", tether_testenv::HEALTHY_TIMEOUT)
        .expect("kube-apiserver ready");
    assert_eq!(configmap_value(env, ns), "42", "after restarting {name}");
}

#[test]
fn a_configmap_survives_a_killed_apiserver_and_a_restarted_etcd() {
    let own = Own::up();
    let env = &own.env;
    let ns = env.create_namespace("restart").expect("namespace");
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: survivor\n  namespace: {ns}\ndata:\n  answer: \"42\"\n"
    ))
    .expect("create the ConfigMap");
    assert_eq!(configmap_value(env, &ns), "42");

    restart_and_read_back(env, &ns, "kube-apiserver", StopSignal::Kill);
    restart_and_read_back(env, &ns, "etcd", StopSignal::Term);

    // Deliberate restarts are not crashes: the rest of the control plane is still up.
    let components = env.components().expect("status");
    assert_eq!(components.len(), 5, "{components:?}");
    assert!(
        components.iter().all(|(_, pid)| pid.is_some()),
        "{components:?}"
    );
}
