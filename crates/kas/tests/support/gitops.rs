//! A GitOps rig: kas, an agent and two repositories (configuration, manifests) against the
//! real control plane, with helpers to write manifests and read objects back.

use std::time::Duration;

use kas::api::ProjectRequest;
use serde_json::Value;
use tether_testenv::{TestEnv, run_output};

use super::{Agent, GitRepo, Kas, KasOptions, wait_for};

pub fn deployment(name: &str, ns: &str, replicas: u32) -> Vec<u8> {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n"
    )
    .into_bytes()
}

pub fn is_event(l: &Value, event: &str, kind: &str, ns: &str, name: &str) -> bool {
    l["eventType"] == event && l["kind"] == kind && l["namespace"] == ns && l["name"] == name
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
    /// The first agent's command line after its address and token.
    pub agent_args: Vec<String>,
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
    let args = RigArgs {
        env,
        agent_ns,
        rbac,
        project_extra,
        initial,
        agent_args,
    };
    let opts = KasOptions {
        git_poll: "300ms",
        extra_yaml: kas_yaml,
        ..KasOptions::default()
    };
    rig_opts(args, opts).await
}

/// What [`rig_opts`] sets up, as [`rig`] takes it.
pub struct RigArgs<'a> {
    pub env: TestEnv,
    /// The agent's namespace (its ServiceAccount, its Lease).
    pub agent_ns: String,
    /// YAML giving the agent's ServiceAccount its rights.
    pub rbac: &'a str,
    /// Appended to the manifest project's entry in config.yaml (at the file's end).
    pub project_extra: &'a str,
    /// The manifests' first commit.
    pub initial: &'a [(&'a str, Option<&'a [u8]>)],
    /// More agentk arguments.
    pub agent_args: &'a [&'a str],
}

/// As [`rig`], with kas started with `opts`.
pub async fn rig_opts(args: RigArgs<'_>, opts: KasOptions) -> (Rig, String) {
    let entry = "    paths:\n    - glob: '/manifests/*.{yaml,yml,json}'\n";
    rig_entry(args, entry, opts).await
}

/// As [`rig_opts`], with the manifest project's entry after `id` and `default_namespace` given
/// (lines indented by four spaces; `project_extra` follows it) instead of the seed's `paths`.
pub async fn rig_entry(args: RigArgs<'_>, entry: &str, opts: KasOptions) -> (Rig, String) {
    let default_namespace = args.agent_ns.clone();
    rig_entry_in(args, &default_namespace, entry, opts).await
}

/// As [`rig_entry`], with the manifest project's `default_namespace` given rather than the
/// agent's namespace (one that does not exist yet, say).
pub async fn rig_entry_in(
    args: RigArgs<'_>,
    default_namespace: &str,
    entry: &str,
    opts: KasOptions,
) -> (Rig, String) {
    let (env, agent_ns) = (args.env, args.agent_ns);
    env.apply_yaml(args.rbac).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("agent.kubeconfig");
    env.write_service_account_kubeconfig(&agent_ns, "gitlab-agent", "2h", &kubeconfig)
        .unwrap();
    let config_repo = GitRepo::init(&dir.path().join("config"));
    config_repo.commit(
        &[(
            ".gitlab/agents/seed/config.yaml",
            Some(
                format!(
                    "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {default_namespace}\n{entry}{extra}",
                    extra = args.project_extra
                )
                .as_bytes(),
            ),
        )],
        "agent config",
    );
    let manifests = GitRepo::init(&dir.path().join("manifests"));
    let c1 = manifests.commit(args.initial, "initial manifests");
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
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
    let command_line: Vec<String> = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--gitops-retry-interval",
        "2s",
        "--leader-election-namespace",
        &agent_ns,
    ]
    .into_iter()
    .chain(args.agent_args.iter().copied())
    .map(str::to_owned)
    .collect();
    let args_ref: Vec<&str> = command_line.iter().map(String::as_str).collect();
    let agent = Agent::start_with(
        dir.path(),
        "seed",
        &kas.url("grpc"),
        &t.token,
        None,
        &args_ref,
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
            agent_args: command_line,
            _dir: dir,
        },
        c1,
    )
}

impl Rig {
    /// Waits until kas has fetched the manifest project `more` more times than now.
    pub async fn wait_fetches(&self, more: u64) {
        let fetches = || async {
            let projects = self.kas.admin.list_projects().await.ok()?;
            let p = projects.into_iter().find(|p| p.path == "group/manifests")?;
            Some(p.fetches)
        };
        let before = wait_for("a fetch count", Duration::from_secs(10), fetches).await;
        wait_for(
            &format!("{more} more fetches"),
            Duration::from_secs(60),
            || async { fetches().await.filter(|n| *n >= before + more) },
        )
        .await;
    }

    /// How many times the agent logged a failed synchronization of `commit`.
    pub fn sync_failures(&self, commit: &str) -> usize {
        self.agent
            .log_lines()
            .into_iter()
            .filter(|l| l["msg"] == "Synchronization failed" && l["commit_id"] == commit)
            .count()
    }

    /// `kas agent status` of the rig's agent, in `format` (`table`, `json`, `yaml`).
    pub fn agent_status(&self, format: &str) -> std::process::Output {
        self.kas
            .cli()
            .args(["agent", "status", "group/config:seed", "-o", format])
            .output()
            .unwrap()
    }

    /// Starts another agentk process as the first one was started (a restart, or a replica).
    pub fn start_agent(&self, name: &str) -> Agent {
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let (url, dir) = (self.kas.url("grpc"), self._dir.path());
        Agent::start_with(dir, name, &url, &self.token, None, &args)
    }

    /// Sets the manifest project's settings (its path and remote filled in).
    pub async fn set_manifests_project(&self, settings: ProjectRequest) -> kas::api::ProjectView {
        let request = ProjectRequest {
            path: "group/manifests".into(),
            remote: Some(self.manifests.dir.display().to_string()),
            ..settings
        };
        self.kas.admin.set_project(&request).await.unwrap()
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
    pub async fn report(
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
