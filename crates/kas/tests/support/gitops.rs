//! A GitOps rig: kas, one agent and two repositories (configuration, manifests) against the
//! real cluster.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tether_testenv::{TestEnv, run_output};

use super::{Agent, GitRepo, Kas, KasOptions, wait_for};

/// `kubectl get … -o json`, `None` when kubectl fails (e.g. not found).
pub fn get_json(env: &TestEnv, args: &[&str]) -> Option<Value> {
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

/// An agent whose ServiceAccount may do anything (to test what the seed's rights forbid).
pub fn admin_rbac(agent_ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: gitlab-agent\n  namespace: {agent_ns}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {agent_ns}-admin\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\n\
subjects:\n- kind: ServiceAccount\n  name: gitlab-agent\n  namespace: {agent_ns}\n"
    )
}

/// kas, an agent and two repositories (configuration, manifests) against the real cluster.
pub struct Rig {
    pub env: TestEnv,
    pub kas: Kas,
    pub agent: Agent,
    pub agent_id: i64,
    pub manifests: GitRepo,
    /// The agent's token and kubeconfig, to start more replicas.
    pub token: String,
    pub kubeconfig: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Rig {
    /// Starts the rig; returns it and the manifests' first commit. `entry` is the manifest
    /// project's entry in config.yaml after `id` and `default_namespace` (lines indented by
    /// four spaces); `rbac` is the YAML giving the agent's ServiceAccount its rights (in
    /// `agent_ns`); `kas_yaml` is appended to kas's configuration.
    pub async fn start(
        env: TestEnv,
        agent_ns: String,
        rbac: &str,
        entry: &str,
        initial: &[(&str, Option<&[u8]>)],
        agent_args: &[&str],
        kas_yaml: String,
    ) -> (Rig, String) {
        env.apply_yaml(rbac).unwrap();
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
        let config_repo = GitRepo::init(&dir.path().join("config"));
        let config = format!(
            "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {agent_ns}\n{entry}"
        );
        config_repo.commit(
            &[(".gitlab/agents/seed/config.yaml", Some(config.as_bytes()))],
            "agent config",
        );
        let manifests = GitRepo::init(&dir.path().join("manifests"));
        let c1 = manifests.commit(initial, "initial manifests");
        let kas = Kas::start(
            &dir.path().join("kas"),
            KasOptions {
                git_poll: "300ms",
                extra_yaml: kas_yaml,
                ..KasOptions::default()
            },
        )
        .await;
        kas.set_projects(&[
            ("group/config", &config_repo),
            ("group/manifests", &manifests),
        ])
        .await;
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
                "--leader-election-namespace",
                &agent_ns,
            ]
            .into_iter()
            .chain(agent_args.iter().copied())
            .collect::<Vec<_>>(),
        );
        let rig = Rig {
            env,
            kas,
            agent,
            agent_id: t.agent_id,
            manifests,
            token: t.token,
            kubeconfig,
            _dir: dir,
        };
        (rig, c1)
    }

    /// Waits until kas shows a finished sync of `commit`.
    pub async fn synced(&self, commit: &str) -> kas::api::SyncView {
        self.report(&format!("the sync of {commit}"), |s| s.commit_id == commit)
            .await
    }

    /// Waits until kas shows a finished sync of `commit` of the manifest project `project`.
    pub async fn synced_in(&self, project: &str, commit: &str) -> kas::api::SyncView {
        self.report(&format!("the sync of {project} at {commit}"), |s| {
            s.project_id == project && s.commit_id == commit
        })
        .await
    }

    /// Waits until kas shows a sync report for which `wanted` holds.
    async fn report(
        &self,
        what: &str,
        wanted: impl Fn(&kas::api::SyncView) -> bool,
    ) -> kas::api::SyncView {
        wait_for(
            &format!("kas to show {what}"),
            Duration::from_secs(90),
            || async {
                self.kas
                    .admin
                    .gitops_status(self.agent_id)
                    .await
                    .ok()?
                    .into_iter()
                    .find(&wanted)
            },
        )
        .await
    }
}
