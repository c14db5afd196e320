//! Starting the control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kwok on 127.0.0.1 free ports, plus one fake Node so that Pods really run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

// Ports for components that must be told their address, picked below the ephemeral range (see
// `unused_port`).
use tether_test_support::unused_port;

use crate::supervisor::{Group, requested};
use crate::{Error, Result, io_err, pki};

/// How long the apiserver may take to become ready (2 cores, cold caches).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The fake node kwok keeps Ready.
pub const NODE_NAME: &str = "kwok-node-0";

/// Where to find the programs and where to keep state.
#[derive(Debug, Clone)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Folder for etcd's data; tmpfs is much faster than disk.
    pub etcd_dir: PathBuf,
}

/// Facts a client needs, also written to `cluster.json` in the state directory.
#[derive(Debug, Clone)]
pub struct Info {
    pub server: String,
    pub kubeconfig: PathBuf,
    pub ca_file: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// Waits until `probe` succeeds, failing early if a child exits or shutdown is requested.
fn wait_for(
    what: &str,
    group: &mut Group,
    stop: &AtomicBool,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return Ok(());
        }
        if let Some((name, status, log)) = group.exited() {
            return Err(Error::Other(format!(
                "{name} exited ({status}) while waiting for {what}; see {}:\n{}",
                log.display(),
                tail(&log, 30)
            )));
        }
        if requested(stop) {
            return Err(Error::Other(format!(
                "interrupted while waiting for {what}"
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "timed out after {timeout:?} waiting for {what}"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kubeconfig(server: &str, p: &pki::Pki) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: tether-testenv\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
contexts:\n- name: tether-testenv\n  context:\n    cluster: tether-testenv\n    user: admin\n    namespace: default\n\
current-context: tether-testenv\n",
        p.ca_cert.display(),
        p.admin_cert.display(),
        p.admin_key.display()
    )
}

fn node_manifest() -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok"
            }
        },
        "status": {
            // Room for the benchmark's thousands of Deployments (one Pod each).
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "5000"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "5000"}
        }
    })
    .to_string()
}

/// Starts every component into `group` and returns once the API server is ready and the fake
/// node is Ready. Writes `kubeconfig` and `cluster.json` into the state directory.
pub fn start(opts: &Options, group: &mut Group, stop: &AtomicBool) -> Result<Info> {
    let dir = &opts.state_dir;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io_err("creating the log folder"))?;
    let p = pki::generate(&dir.join("pki"))?;
    check_binaries(opts)?;
    let c = Components { opts, logs: &logs };

    let etcd_url = c.start_etcd(group)?;
    let server = c.start_apiserver(group, &etcd_url, &p)?;
    let kc = dir.join("kubeconfig");
    write(&kc, &kubeconfig(&server, &p))?;
    let kubectl = Kubectl {
        bin: opts.bin_dir.join("kubectl"),
        kubeconfig: kc.clone(),
    };
    wait_for(
        "the API server's /readyz",
        group,
        stop,
        READY_TIMEOUT,
        || kubectl.succeeds(&["get", "--raw=/readyz", "--request-timeout=5s"]),
    )?;
    c.start_controllers(group, &kc, &p)?;
    add_fake_node(dir, &kubectl, group, stop)?;

    let info = serde_json::json!({
        "server": server,
        "etcd": etcd_url,
        "kubeconfig": kc,
        "ca_file": p.ca_cert,
        "bin_dir": opts.bin_dir,
        "logs": logs,
    });
    write(&dir.join("cluster.json"), &format!("{info:#}\n"))?;
    Ok(Info {
        server,
        kubeconfig: kc,
        ca_file: p.ca_cert,
    })
}

/// Fails early, with the fix, when a control-plane program was not built.
fn check_binaries(opts: &Options) -> Result<()> {
    for n in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kwok",
    ] {
        let bin = opts.bin_dir.join(n);
        if !bin.exists() {
            return Err(Error::Other(format!(
                "{} is missing: build the control plane with testenv/build.sh",
                bin.display()
            )));
        }
    }
    Ok(())
}

/// `kubectl --kubeconfig …` for the cluster being started.
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    fn succeeds(&self, args: &[&str]) -> bool {
        self.cmd(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// Where the programs are and where their logs go.
struct Components<'a> {
    opts: &'a Options,
    logs: &'a Path,
}

impl Components<'_> {
    fn bin(&self, name: &str) -> PathBuf {
        self.opts.bin_dir.join(name)
    }

    fn spawn<const N: usize>(
        &self,
        group: &mut Group,
        name: &str,
        args: [String; N],
    ) -> Result<()> {
        group
            .spawn(
                name,
                &self.bin(name),
                args,
                &self.logs.join(format!("{name}.log")),
            )
            .map(|_pid| ())
    }

    /// Starts etcd; returns its client URL.
    fn start_etcd(&self, group: &mut Group) -> Result<String> {
        let (client, peer) = (unused_port(), unused_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        self.spawn(
            group,
            "etcd",
            [
                "--name=tether".to_string(),
                format!("--data-dir={}", self.opts.etcd_dir.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=tether={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        Ok(etcd_url)
    }

    /// Starts kube-apiserver on etcd; returns its URL.
    fn start_apiserver(&self, group: &mut Group, etcd_url: &str, p: &pki::Pki) -> Result<String> {
        let port = unused_port();
        let server = format!("https://127.0.0.1:{port}");
        self.spawn(
            group,
            "kube-apiserver",
            [
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", p.serving_cert.display()),
                format!("--tls-private-key-file={}", p.serving_key.display()),
                format!("--client-ca-file={}", p.ca_cert.display()),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p.sa_pub.display()),
                format!("--service-account-signing-key-file={}", p.sa_key.display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                // The `kubernetes` Service would point at a loopback address, which the API
                // refuses.
                "--endpoint-reconciler-type=none".into(),
                format!(
                    "--cert-dir={}",
                    self.opts.state_dir.join("apiserver-certs").display()
                ),
                "--profiling=false".into(),
            ],
        )?;
        Ok(server)
    }

    /// Controllers (Deployments → ReplicaSets → Pods, namespace deletion, GC, ServiceAccounts),
    /// the scheduler, and kwok playing the kubelet of a fake node.
    fn start_controllers(&self, group: &mut Group, kc: &Path, p: &pki::Pki) -> Result<()> {
        self.spawn(
            group,
            "kube-controller-manager",
            [
                format!("--kubeconfig={}", kc.display()),
                "--leader-elect=false".into(),
                format!("--root-ca-file={}", p.ca_cert.display()),
                format!("--service-account-private-key-file={}", p.sa_key.display()),
                "--use-service-account-credentials=true".into(),
                "--secure-port=0".into(),
                "--concurrent-deployment-syncs=10".into(),
                // The default client limit (20 requests/s) would make the controllers, not the
                // clients under test, the bottleneck of Deployment-heavy runs.
                "--kube-api-qps=100".into(),
                "--kube-api-burst=200".into(),
            ],
        )?;
        self.spawn(
            group,
            "kube-scheduler",
            [
                format!("--kubeconfig={}", kc.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", unused_port()),
            ],
        )?;
        self.spawn(
            group,
            "kwok",
            [
                format!("--kubeconfig={}", kc.display()),
                format!("--config={}", self.bin("kwok-stages.yaml").display()),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                format!("--server-address=127.0.0.1:{}", unused_port()),
                "--cidr=10.244.0.0/16".into(),
                "--node-ip=127.0.0.1".into(),
                // The stages renew the node's status only every 10 min and expect a Lease as
                // its heartbeat; without one the node turns NotReady after the grace period
                // (~50 s) and its Pods lose Ready.
                "--node-lease-duration-seconds=40".into(),
            ],
        )
    }
}

/// Creates the fake node and waits until it is Ready and the default ServiceAccount exists.
fn add_fake_node(
    dir: &Path,
    kubectl: &Kubectl,
    group: &mut Group,
    stop: &AtomicBool,
) -> Result<()> {
    let node = dir.join("node.json");
    write(&node, &node_manifest())?;
    crate::run_output(&mut kubectl.cmd(&["apply", "-f", &node.display().to_string()]))?;
    wait_for(
        "the fake node to become Ready",
        group,
        stop,
        READY_TIMEOUT,
        || {
            kubectl
                .cmd(&[
                    "get",
                    "node",
                    NODE_NAME,
                    "-o=jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .output()
                .map(|o| o.status.success() && o.stdout == b"True")
                .unwrap_or(false)
        },
    )?;
    // Pods need the namespace's default ServiceAccount: wait for the controller to make it, so
    // the first Deployment of a run does not start with admission retries.
    wait_for(
        "the default ServiceAccount",
        group,
        stop,
        READY_TIMEOUT,
        || kubectl.succeeds(&["get", "serviceaccount", "default", "-n", "default"]),
    )
}
