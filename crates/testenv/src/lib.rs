//! A real Kubernetes control plane as local processes, for tests and demos.
//!
//! The programs (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok) are
//! built from Go modules by `testenv/build.sh` into a cache outside the repository. [`cluster`]
//! starts them on 127.0.0.1 with generated PKI and RBAC, [`supervisor`] keeps them tied to one
//! parent so nothing outlives a run, and [`TestEnv`] is what test code uses to reach the cluster.
//!
//! # Restarting a component
//!
//! A running supervisor takes requests on `control.sock` in its state directory (see
//! [`control`]) to stop one component and start it again with the same flags, hence the same
//! ports, PKI and etcd data, so the product can be tested across restarts of its dependencies:
//!
//! - from a test: [`TestEnv::restart_component`] (`"kube-apiserver"`, `"etcd"`, …) with
//!   [`StopSignal::Term`] or [`StopSignal::Kill`], or [`TestEnv::stop_component`] then
//!   [`TestEnv::start_component`]; each start returns once the component is healthy again
//!   (`/readyz` for the apiserver, `/health` for etcd);
//! - from a shell: `testenv restart kube-apiserver --signal KILL`, `testenv stop etcd`,
//!   `testenv start etcd`, `testenv status` (state directory from `--state-dir`,
//!   `TETHER_TESTENV_DIR` or `TETHER_TESTENV_STATE`).
//!
//! A deliberately stopped component is not an error. A component that exits on its own still
//! tears the whole control plane down (see `watch` in `main.rs` for why). Restart
//! components only on a control plane of your own (`testenv up` into a temporary state
//! directory, as `tests/restart.rs` does): the one `testenv run` gives a test run is shared by
//! every test running in parallel.

pub mod cluster;
pub mod control;
mod health;
pub mod pki;
pub mod postgres;
pub mod proxy;
pub mod redis;
pub mod signing;
pub mod sshd;
pub mod supervisor;
pub mod tmpfs;

pub use health::HEALTHY_TIMEOUT;
pub use supervisor::StopSignal;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Environment variable naming the state directory of a running control plane.
pub const ENV_DIR: &str = "TETHER_TESTENV_DIR";

/// Errors of the test environment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no control plane: {ENV_DIR} is not set. Run the tests through `scripts/test` \
         (or `testenv run -- cargo test`), or export the variables `testenv up` prints"
    )]
    NotRunning,
    #[error("control plane state in {dir} is incomplete: {what}")]
    BadState { dir: PathBuf, what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A free port on 127.0.0.1 for a program that cannot report one it picked itself; the short
/// window in which another process could take it makes the program's start fail loudly, not
/// wrong.
pub(crate) fn pick_local_port(program: &str) -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err(format!("picking a port for {program}")))
}

/// Polls until `program` accepts connections on 127.0.0.1:`port` (such servers start in
/// milliseconds); `log` explains a failure.
pub(crate) fn wait_local_port(program: &str, port: u16, log: impl Fn() -> String) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    Err(Error::Other(format!(
        "{program} did not listen on {port}: {}",
        log()
    )))
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs a command to completion, failing with its stderr when it exits non-zero.
pub fn run_output(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(io_err(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// A running control plane, as seen by a test or a tool.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub dir: PathBuf,
    /// Admin (system:masters) kubeconfig.
    pub kubeconfig: PathBuf,
    /// Folder with kubectl and the other control-plane programs.
    pub bin_dir: PathBuf,
    /// `https://127.0.0.1:PORT` of the kube-apiserver.
    pub server: String,
    /// PEM file of the cluster CA.
    pub ca_file: PathBuf,
    /// `http://127.0.0.1:PORT` of etcd (absent in state written by an older `testenv`).
    pub etcd_url: Option<String>,
}

impl TestEnv {
    /// The control plane named by `TETHER_TESTENV_DIR`. Fails (never skips) when none runs, so
    /// a test that needs the cluster cannot pass without one.
    pub fn from_env() -> Result<Self> {
        let dir = std::env::var_os(ENV_DIR).ok_or(Error::NotRunning)?;
        Self::open(Path::new(&dir))
    }

    /// Reads the state a supervisor wrote in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let info = std::fs::read_to_string(dir.join("cluster.json"))
            .map_err(io_err(format!("reading {}/cluster.json", dir.display())))?;
        let v: serde_json::Value = serde_json::from_str(&info).map_err(|e| Error::BadState {
            dir: dir.to_path_buf(),
            what: e.to_string(),
        })?;
        let field = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(|s| s.as_str())
                .map(str::to_owned)
                .ok_or_else(|| Error::BadState {
                    dir: dir.to_path_buf(),
                    what: format!("missing {k}"),
                })
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            kubeconfig: PathBuf::from(field("kubeconfig")?),
            bin_dir: PathBuf::from(field("bin_dir")?),
            server: field("server")?,
            ca_file: PathBuf::from(field("ca_file")?),
            etcd_url: field("etcd").ok(),
        })
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// `kubectl` talking to the cluster as the holder of a bearer token, with nothing else.
    pub fn kubectl_with_token(&self, token: &str) -> Command {
        let mut c = Command::new(self.bin_dir.join("kubectl"));
        c.arg("--kubeconfig=/dev/null")
            .arg(format!("--server={}", self.server))
            .arg(format!(
                "--certificate-authority={}",
                self.ca_file.display()
            ))
            .arg(format!("--token={token}"));
        c
    }

    /// A kubeconfig (YAML text) that authenticates with a bearer token and nothing else.
    pub fn token_kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
users:\n- name: u\n  user:\n    token: {token}\n\
contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
            self.server,
            self.ca_file.display()
        )
    }

    /// Writes at `path` a kubeconfig for ServiceAccount `sa` of `namespace`, with a token valid
    /// for `duration` (like `2h`): how agentk sees the cluster with only that account's rights.
    pub fn write_service_account_kubeconfig(
        &self,
        namespace: &str,
        sa: &str,
        duration: &str,
        path: &Path,
    ) -> Result<()> {
        let token = run_output(self.kubectl().args([
            "create",
            "token",
            sa,
            "-n",
            namespace,
            &format!("--duration={duration}"),
        ]))?;
        let token = String::from_utf8_lossy(&token);
        std::fs::write(path, self.token_kubeconfig(token.trim()))
            .map_err(io_err("writing a ServiceAccount kubeconfig"))
    }

    /// Applies YAML given on standard input with the admin kubeconfig.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args(["apply", "--server-side", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(io_err("starting kubectl apply"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(yaml.as_bytes())
                .map_err(io_err("writing to kubectl apply"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(io_err("waiting for kubectl apply"))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: "kubectl apply".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Creates a namespace with a name unique to this test run and process, labelled so that a
    /// person can find (and clean up) what tests made on a long-lived cluster.
    pub fn create_namespace(&self, prefix: &str) -> Result<String> {
        let name = unique_name(prefix);
        self.apply_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    tether.test/namespace: \"true\"\n"
        ))?;
        Ok(name)
    }
}

/// A DNS-label name unique within this process and very likely across processes and runs.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut name = format!(
        "{}-{:x}{:x}{:x}",
        prefix,
        std::process::id() & 0xffff,
        nanos & 0xfff,
        n
    );
    name.make_ascii_lowercase();
    name.truncate(63);
    name
}

/// RBAC for an agent exactly like the seed's: everything in its own namespace and in `dude`,
/// ConfigMaps cluster-wide (its inventories), nothing anywhere else (so nothing in `naww`).
pub fn seed_agent_rbac(agent_ns: &str, sa: &str, dude_ns: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {agent_ns}\n"
    );
    for ns in [agent_ns, dude_ns] {
        y.push_str(&format!(
            "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {sa}-write\n  namespace: {ns}\n\
rules:\n- apiGroups: [\"*\"]\n  resources: [\"*\"]\n  verbs: [\"*\"]\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {sa}-write\n  namespace: {ns}\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {sa}-write\n\
subjects:\n- kind: ServiceAccount\n  name: {sa}\n  namespace: {agent_ns}\n"
        ));
    }
    y.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {agent_ns}-{sa}-configmaps\n\
rules:\n- apiGroups: [\"\"]\n  resources: [\"configmaps\"]\n  verbs: [\"*\"]\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {agent_ns}-{sa}-configmaps\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {agent_ns}-{sa}-configmaps\n\
subjects:\n- kind: ServiceAccount\n  name: {sa}\n  namespace: {agent_ns}\n"
    ));
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_dns_labels_and_differ() {
        let a = unique_name("Dude");
        let b = unique_name("Dude");
        assert_ne!(a, b);
        for n in [&a, &b] {
            assert!(n.len() <= 63);
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
        }
    }

    #[test]
    fn the_missing_cluster_error_says_how_to_run_tests() {
        let e = Error::NotRunning.to_string();
        assert!(e.contains("scripts/test"), "{e}");
    }
}
