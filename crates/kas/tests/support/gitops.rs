//! A GitOps rig shared by the tests that need a synced agent: kas, an agent and two
//! repositories (configuration, manifests) against the real cluster.

use std::time::Duration;

use serde_json::Value;
use tether_testenv::{TestEnv, run_output};

use super::{Agent, GitRepo, Kas, KasOptions, wait_for};

pub fn deployment(name: &str, ns: &str, replicas: u32) -> Vec<u8> {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n"
    )
    .into_bytes()
}

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

/// kas, an agent and two repositories (configuration, manifests) against the real cluster.
pub struct Rig {
    pub env: TestEnv,
    pub kas: Kas,
    pub agent: Agent,
    pub agent_id: i64,
    pub manifests: GitRepo,
    /// The agent's configuration project (`.gitlab/agents/seed/config.yaml`).
    pub config: GitRepo,
    /// The agent's token and kubeconfig, to start more replicas.
    pub token: String,
    pub kubeconfig: std::path::PathBuf,
    pub _dir: tempfile::TempDir,
}

/// `project_extra` is appended to the manifest project's entry in config.yaml; `rbac` is the
/// YAML giving the agent's ServiceAccount its rights (in `agent_ns`).
pub async fn rig(
    env: TestEnv,
    agent_ns: String,
    rbac: &str,
    project_extra: &str,
    initial: &[(&str, Option<&[u8]>)],
    agent_args: &[&str],
) -> (Rig, String) {
    let kas_yaml = String::new();
    rig_with(
        env,
        agent_ns,
        rbac,
        project_extra,
        initial,
        agent_args,
        kas_yaml,
    )
    .await
}

/// [`rig`] with `kas_yaml` appended to kas's configuration.
pub async fn rig_with(
    env: TestEnv,
    agent_ns: String,
    rbac: &str,
    project_extra: &str,
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
    config_repo.commit(
        &[(
            ".gitlab/agents/seed/config.yaml",
            Some(
                format!(
                    "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {agent_ns}\n    paths:\n    - glob: '/manifests/*.{{yaml,yml,json}}'\n{project_extra}"
                )
                .as_bytes(),
            ),
        )],
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
    (
        Rig {
            env,
            kas,
            agent,
            agent_id: t.agent_id,
            manifests,
            config: config_repo,
            token: t.token,
            kubeconfig,
            _dir: dir,
        },
        c1,
    )
}

impl Rig {
    /// Sets the manifest project's settings (its path and remote filled in).
    pub async fn set_manifests_project(
        &self,
        settings: kas::api::ProjectRequest,
    ) -> kas::api::ProjectView {
        let request = kas::api::ProjectRequest {
            path: "group/manifests".into(),
            remote: Some(self.manifests.dir.display().to_string()),
            ..settings
        };
        self.kas.admin.set_project(&request).await.unwrap()
    }

    /// Waits until kas shows a finished sync of `commit`.
    pub async fn synced(&self, commit: &str) -> kas::api::SyncView {
        wait_for(
            &format!("kas to show the sync of {commit}"),
            Duration::from_secs(90),
            || async {
                self.kas
                    .admin
                    .gitops_status(self.agent_id)
                    .await
                    .ok()?
                    .into_iter()
                    .find(|s| s.commit_id == commit)
            },
        )
        .await
    }
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

pub fn configmap(name: &str, ns: &str, value: &str) -> Vec<u8> {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n").into_bytes()
}
