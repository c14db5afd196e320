//! agentk as it runs in a Pod: its container image (scripts/images, run by a real OCI runtime)
//! with the in-cluster configuration only — a real ServiceAccount token, the cluster CA and the
//! namespace mounted at /var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST
//! and _PORT, POD_NAME and no kubeconfig — connects to kas, applies, elects itself leader in its
//! own namespace and keeps working when the kubelet would rotate the token. And kas's image:
//! read-only root, data on a volume, admin commands inside, the programs SSH remotes and signed
//! commits need, a clean stop on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{Agent, GitRepo, Kas, KasOptions, agentk_bin, free_port, wait_for};
use tether_gitops_server::ReportedOutcome;
use tether_testenv::{TestEnv, run_output, unique_name};

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The agent's ServiceAccount may do anything in its own namespace and nothing elsewhere.
fn namespace_admin(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: agentk\n  namespace: {ns}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: agentk-admin\n  namespace: {ns}\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\n\
subjects:\n- kind: ServiceAccount\n  name: agentk\n  namespace: {ns}\n"
    )
}

/// A ServiceAccount token bound to a Secret: deleting the Secret invalidates the token at once,
/// which is how this test proves that agentk stopped using the old one.
fn bound_token(env: &TestEnv, ns: &str, secret: &str) -> String {
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {secret}\n  namespace: {ns}\ntype: Opaque\n"
    ))
    .unwrap();
    let out = run_output(env.kubectl().args([
        "create",
        "token",
        "agentk",
        "-n",
        ns,
        "--bound-object-kind=Secret",
        &format!("--bound-object-name={secret}"),
        "--duration=1h",
    ]))
    .unwrap();
    String::from_utf8(out).unwrap().trim().to_owned()
}

/// Writes a file the container's non-root user (65532) can read, replacing it atomically like
/// the kubelet's projected volumes do.
fn publish(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn readable_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// The images built from this build's binaries, tagged uniquely for this test run and removed
/// when dropped (every run would otherwise leave ~100 MB behind).
struct Images(Vec<String>);

impl Images {
    fn build(tag: &str) -> Images {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let bin_dir = agentk_bin().parent().unwrap().to_path_buf();
        let out = run_output(
            Command::new(repo.join("scripts/images"))
                .current_dir(&repo)
                .args(["--binaries", bin_dir.to_str().unwrap(), "--tag", tag]),
        )
        .expect("scripts/images");
        Images(
            String::from_utf8(out)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }

    fn agentk(&self) -> &str {
        self.named("agentk")
    }

    fn kas(&self) -> &str {
        self.named("kas")
    }

    fn named(&self, binary: &str) -> &str {
        self.0
            .iter()
            .find(|l| l.contains(&format!("/{binary}:")))
            .expect("an image per binary")
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("podman").args(["rmi", "-f", image]).output();
        }
    }
}

/// A running container, removed when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", &self.0]).output();
    }
}

impl Container {
    fn logs(&self) -> String {
        let out = Command::new("podman")
            .args(["logs", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    }
}

fn image_label(image: &str, label: &str) -> String {
    let out = run_output(Command::new("podman").args([
        "image",
        "inspect",
        image,
        "--format",
        &format!("{{{{index .Config.Labels \"{label}\"}}}}"),
    ]))
    .unwrap();
    String::from_utf8(out).unwrap().trim().to_owned()
}

fn configmap(name: &str, ns: &str) -> Vec<u8> {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  a: b\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agentk_image_runs_in_cluster_mode_and_survives_a_token_rotation() {
    let env = TestEnv::from_env().unwrap();
    let ns = env.create_namespace("incluster").unwrap();
    env.apply_yaml(&namespace_admin(&ns)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    readable_dir(dir.path());

    // What the kubelet mounts into a Pod.
    let sa = readable_dir(&dir.path().join("serviceaccount"));
    let first = bound_token(&env, &ns, "agentk-token-1");
    publish(&sa.join("token"), first.as_bytes());
    publish(&sa.join("ca.crt"), &std::fs::read(&env.ca_file).unwrap());
    publish(&sa.join("namespace"), ns.as_bytes());
    let port = env.server.rsplit(':').next().unwrap().to_owned();

    let config = GitRepo::init(&dir.path().join("config"));
    config.commit(
        &[(
            ".gitlab/agents/pod/config.yaml",
            Some(format!("gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n").as_bytes()),
        )],
        "agent config",
    );
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    let c1 = manifests.commit(&[("one.yaml", Some(&configmap("one", &ns)))], "one");
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
        .register_agent("group/config", "pod")
        .await
        .unwrap();
    let secrets = readable_dir(&dir.path().join("agentk"));
    publish(&secrets.join("token"), t.token.as_bytes());

    let images = Images::build(&unique_name("t"));
    let image = images.agentk().to_owned();
    let commit = image_label(&image, "org.opencontainers.image.revision");
    let version = run_output(Command::new(agentk_bin()).arg("--version")).unwrap();
    assert!(
        String::from_utf8(version)
            .unwrap()
            .contains(&format!("(commit {commit})")),
        "the image's revision label names the binary's commit"
    );

    let name = unique_name("agentk");
    run_output(Command::new("podman").args([
        "--runtime",
        "runc",
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        &format!("{}:{SA_DIR}:ro", sa.display()),
        "-v",
        &format!("{}:/etc/agentk:ro", secrets.display()),
        "-e",
        "KUBERNETES_SERVICE_HOST=127.0.0.1",
        "-e",
        &format!("KUBERNETES_SERVICE_PORT={port}"),
        "-e",
        "POD_NAME=agentk-0",
        &image,
        "--kas-address",
        &kas.url("grpc"),
        "--token-file",
        "/etc/agentk/token",
        "--observability-listen-address",
        "127.0.0.1:0",
        "--gitops-retry-interval",
        "2s",
    ]))
    .expect("podman run");
    let container = Container(name);

    let synced = |commit: String| {
        let kas = &kas;
        let agent_id = t.agent_id;
        async move {
            wait_for(
                &format!("the sync of {commit}"),
                Duration::from_secs(150),
                || {
                    let commit = commit.clone();
                    async move {
                        kas.admin
                            .gitops_status(agent_id)
                            .await
                            .ok()?
                            .into_iter()
                            .find(|s| {
                                s.commit_id == commit && s.outcome == ReportedOutcome::Succeeded
                            })
                    }
                },
            )
            .await
        }
    };
    synced(c1).await;
    let connected = kas.agent(t.agent_id).await;
    let pods: Vec<&str> = connected
        .connections
        .iter()
        .map(|c| c.pod_name.as_str())
        .collect();
    assert_eq!(pods, ["agentk-0"], "{connected:?}");
    // Leader election found its namespace through the in-cluster namespace file.
    let lease = format!("agent-{}-lock", t.agent_id);
    wait_for("the leader Lease", Duration::from_secs(30), || async {
        env.kubectl()
            .args(["get", "lease", &lease, "-n", &ns])
            .output()
            .ok()
            .filter(|o| o.status.success())
    })
    .await;

    // The kubelet rotates the token: a new one appears in the file and the old one stops
    // working (here by deleting the Secret it is bound to).
    let second = bound_token(&env, &ns, "agentk-token-2");
    publish(&sa.join("token"), second.as_bytes());
    run_output(
        env.kubectl()
            .args(["delete", "secret", "agentk-token-1", "-n", &ns]),
    )
    .unwrap();
    wait_for(
        "the old token to be refused",
        Duration::from_secs(30),
        || async {
            let out = env
                .kubectl_with_token(&first)
                .args(["get", "configmaps", "-n", &ns])
                .output()
                .ok()?;
            (!out.status.success()).then_some(())
        },
    )
    .await;
    let c2 = manifests.commit(&[("two.yaml", Some(&configmap("two", &ns)))], "two");
    synced(c2).await;
    let two = env
        .kubectl()
        .args(["get", "configmap", "two", "-n", &ns])
        .output()
        .unwrap();
    assert!(two.status.success(), "{}", container.logs());
}

/// `podman exec` of the kas binary inside the container (the image has no shell).
fn kas_in(container: &str, args: &[&str]) -> String {
    let out = run_output(
        Command::new("podman")
            .args(["exec", container, "/usr/local/bin/kas"])
            .args(args),
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}

/// What SSH remotes and signed commits need runs in the kas container as its user: the shell
/// gix runs `ssh` through, `ssh` itself (OpenSSH refuses a uid without a passwd entry),
/// `ssh-keygen` (SSH signatures) and `gpg`/`gpgconf` (OpenPGP signatures). The image used to
/// have none of them.
fn tools_run_in(container: &str) {
    let probe = "ssh -G git.example.com >/dev/null \
                 && ssh-keygen -q -t ed25519 -N '' -f /tmp/probe && ssh-keygen -l -f /tmp/probe.pub \
                 && gpg --version && gpgconf --list-dirs >/dev/null";
    let out = Command::new("podman")
        .args(["exec", container, "/bin/sh", "-c", probe])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_kas_container(image: &str, name: &str, data: &Path, conf: &Path) {
    run_output(Command::new("podman").args([
        "--runtime",
        "runc",
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        &format!("{}:/var/lib/kas", data.display()),
        "-v",
        &format!("{}:/etc/kas:ro", conf.display()),
        "-e",
        "KAS_CONFIGURATION_FILE=/etc/kas/kas.yaml",
        image,
    ]))
    .expect("podman run kas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kas_image_runs_read_only_with_its_data_on_a_volume_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    readable_dir(dir.path());
    let data = readable_dir(&dir.path().join("data"));
    // The image's user owns the data volume, as an fsGroup or an init step would arrange.
    std::os::unix::fs::chown(&data, Some(65532), Some(65532)).unwrap();
    let conf = readable_dir(&dir.path().join("conf"));
    let agent_port = free_port();
    publish(
        &conf.join("kas.yaml"),
        format!(
            "data_dir: /var/lib/kas\nagent:\n  listen:\n    address: 127.0.0.1:{agent_port}\n\
             api:\n  listen:\n    address: 127.0.0.1:{}\nobservability:\n  listen:\n    address: 127.0.0.1:{}\n\
             kubernetes_api:\n  listen:\n    address: 127.0.0.1:{}\n",
            free_port(),
            free_port(),
            free_port()
        )
        .as_bytes(),
    );
    let images = Images::build(&unique_name("t"));
    let name = unique_name("kas");
    run_kas_container(images.kas(), &name, &data, &conf);
    let container = Container(name.clone());

    // The admin commands work inside the container (the admin token is on the volume).
    let registered = wait_for(
        "kas in the container to answer",
        Duration::from_secs(30),
        || async {
            Command::new("podman")
                .args([
                    "exec",
                    &name,
                    "/usr/local/bin/kas",
                    "agent",
                    "register",
                    "--project",
                    "group/app",
                    "--name",
                    "a",
                    "--json",
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
        },
    )
    .await;
    tools_run_in(&name);
    let t: serde_json::Value = serde_json::from_slice(&registered.stdout).unwrap();
    let agent = Agent::start(
        dir.path(),
        "agentk",
        &format!("grpc://127.0.0.1:{agent_port}"),
        t["token"].as_str().unwrap(),
        None,
    );
    wait_for(
        "the agent connected to the kas container",
        Duration::from_secs(30),
        || async {
            let list = kas_in(&name, &["agent", "list"]);
            list.lines()
                .any(|l| l.contains("group/app") && l.contains("agentk"))
                .then_some(())
        },
    )
    .await;
    drop(agent);

    // SIGTERM (podman stop) ends kas cleanly; its records survive on the volume.
    run_output(Command::new("podman").args(["stop", "-t", "10", &name])).unwrap();
    let code = run_output(Command::new("podman").args([
        "inspect",
        &name,
        "--format",
        "{{.State.ExitCode}}",
    ]))
    .unwrap();
    assert_eq!(
        String::from_utf8(code).unwrap().trim(),
        "0",
        "{}",
        container.logs()
    );
    run_output(Command::new("podman").args(["start", &name])).unwrap();
    let list = wait_for("kas to start again", Duration::from_secs(30), || async {
        Command::new("podman")
            .args(["exec", &name, "/usr/local/bin/kas", "agent", "list"])
            .output()
            .ok()
            .filter(|o| o.status.success())
    })
    .await;
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("group/app"),
        "{}",
        container.logs()
    );
}
