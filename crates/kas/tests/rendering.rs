//! Kustomize and Helm rendering in kas, end to end: real kustomize and helm (the pinned builds
//! of testenv/build.sh) in kas's sandbox, a real agent applying the output to the real control
//! plane, and the refusals and limits reported through `kas agent status`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::gitops::{Rig, RigArgs, admin_rbac, get_json, rig_entry};
use support::oidc::SigningKey;
use support::{GitDaemon, GitRepo, KasOptions, wait_for};
use tether_gitops_server::{ReportedOutcome, ReportedStatus};
use tether_testenv::TestEnv;

/// kas's `gitops.render` section pointing at the pinned renderers, plus `extra` keys.
fn render_yaml(env: &TestEnv, extra: &str) -> String {
    format!(
        "gitops:\n  render:\n    kustomize_path: {}\n    helm_path: {}\n{extra}",
        env.bin_dir.join("kustomize").display(),
        env.bin_dir.join("helm").display()
    )
}

fn files(list: &[(String, String)]) -> Vec<(&str, Option<&[u8]>)> {
    list.iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_bytes())))
        .collect()
}

fn owned(list: &[(&str, String)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, t)| ((*p).to_owned(), t.clone()))
        .collect()
}

/// A base (Deployment and a generated ConfigMap) and one overlay per `(name, namespace,
/// replicas)`: its namespace, a replicas patch and a merged generator literal.
fn kustomize_repo(overlays: &[(&str, &str, u32)]) -> Vec<(String, String)> {
    let mut repo = owned(&[
        (
            "base/kustomization.yaml",
            "resources:\n- deployment.yaml\nconfigMapGenerator:\n- name: web-config\n  literals:\n  - greeting=hello\n".into(),
        ),
        (
            "base/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n        envFrom:\n        - configMapRef:\n            name: web-config\n".into(),
        ),
    ]);
    // A file outside every kustomization's directory, used by the overlays as Flux lets them.
    repo.extend(owned(&[(
        "common/team.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: team\ndata:\n  owner: web\n".into(),
    )]));
    for (name, ns, replicas) in overlays {
        repo.extend(owned(&[
            (
                &format!("overlays/{name}/kustomization.yaml"),
                format!("namespace: {ns}\nresources:\n- namespace.yaml\n- ../../base\n- ../../common/team.yaml\npatches:\n- path: replicas.yaml\nconfigMapGenerator:\n- name: web-config\n  behavior: merge\n  literals:\n  - env={name}\n"),
            ),
            (
                &format!("overlays/{name}/namespace.yaml"),
                format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
            ),
            (&format!("overlays/{name}/replicas.yaml"), replicas_patch(*replicas)),
        ]));
    }
    repo
}

fn replicas_patch(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: {replicas}\n"
    )
}

/// A chart whose ConfigMap shows the merged values, and two values files.
fn helm_repo() -> Vec<(String, String)> {
    owned(&[
        ("charts/app/Chart.yaml", "apiVersion: v2\nname: app\nversion: 0.1.0\n".into()),
        ("charts/app/values.yaml", "color: red\nsize: m\nreplicas: 1\n".into()),
        (
            "charts/app/templates/configmap.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n  namespace: {{ .Release.Namespace }}\ndata:\n  color: {{ .Values.color | quote }}\n  size: {{ .Values.size | quote }}\n  greeting: {{ .Values.greeting | default \"none\" | quote }}\n".into(),
        ),
        (
            "charts/app/templates/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}-web\nspec:\n  replicas: {{ .Values.replicas }}\n  selector:\n    matchLabels:\n      app: {{ .Release.Name }}\n  template:\n    metadata:\n      labels:\n        app: {{ .Release.Name }}\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n".into(),
        ),
        ("env/values-a.yaml", "color: blue\nsize: s\n".into()),
        ("env/values-b.yaml", "size: l\nreplicas: 2\n".into()),
    ])
}

const HELM_ENTRY: &str = "    helm:\n      chart: charts/app\n      release_name: shop\n      values_files:\n      - env/values-a.yaml\n      - env/values-b.yaml\n      values:\n        greeting: hi\n";

impl Rig {
    /// A failed report of `commit` whose error contains every one of `words`.
    async fn refused(&self, commit: &str, words: &[&str]) -> String {
        let s = self.synced_in("group/manifests", commit).await;
        assert_eq!(s.outcome, ReportedOutcome::Failed, "{s:?}");
        for w in words {
            assert!(s.error.contains(w), "{w:?} not in {:?}", s.error);
        }
        s.error
    }
}

/// A rig in a fresh namespace (named from `prefix`) with an admin agent whose entry and
/// repository are made from that namespace, once its first commit synced successfully.
async fn rendering_rig(
    prefix: &str,
    entry: impl FnOnce(&str) -> String,
    repo: impl FnOnce(&str) -> Vec<(String, String)>,
    render_extra: &str,
) -> (Rig, String, String) {
    let (rig, c1, ns) = started_rig(prefix, entry, repo, render_extra, "300ms").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    (rig, c1, ns)
}

/// As [`rendering_rig`], kas fetching Git every `git_poll`; whatever came of the first commit.
async fn started_rig(
    prefix: &str,
    entry: impl FnOnce(&str) -> String,
    repo: impl FnOnce(&str) -> Vec<(String, String)>,
    render_extra: &str,
    git_poll: &'static str,
) -> (Rig, String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(prefix).unwrap();
    let kas_yaml = render_yaml(&env, render_extra);
    let (entry, repo) = (entry(&ns), repo(&ns));
    let rbac = admin_rbac(&ns);
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &rbac,
        project_extra: "",
        initial: &files(&repo),
        agent_args: &[],
    };
    let opts = KasOptions {
        git_poll,
        extra_yaml: kas_yaml,
        ..KasOptions::default()
    };
    let (rig, c1) = rig_entry(args, &entry, opts).await;
    (rig, c1, ns)
}

/// Every Deployment, ConfigMap and Namespace `ns` shows, with its resourceVersion: equal
/// before and after means nothing was written, created or deleted.
fn versions(env: &TestEnv, ns: &str) -> Vec<(String, String)> {
    let list = get_json(env, &["get", "deployments,configmaps", "-n", ns]).unwrap();
    let mut out: Vec<(String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    m["name"].as_str().unwrap()
                ),
                m["resourceVersion"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let namespace = get_json(env, &["get", "namespace", ns]).unwrap();
    out.push((
        format!("Namespace/{ns}"),
        namespace["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned(),
    ));
    out.sort();
    out
}

/// The generated `web-config-<hash>` ConfigMap of `ns`, checked against the Deployment that
/// refers to it; returns its data.
fn overlay_objects(env: &TestEnv, ns: &str, replicas: u64) -> Value {
    let d = get_json(env, &["get", "deployment", "web", "-n", ns]).unwrap();
    assert_eq!(d["spec"]["replicas"], replicas, "{ns}");
    let cm_name =
        d["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(cm_name.starts_with("web-config-"), "{cm_name}");
    let cm = get_json(env, &["get", "configmap", &cm_name, "-n", ns]).unwrap();
    cm["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kustomize_overlays_are_applied_and_a_change_in_one_changes_only_its_objects() {
    let staging_entry = |ns: &str| {
        format!(
            "    kustomize:\n      path: overlays/prod\n  - id: group/staging\n    default_namespace: {ns}\n    kustomize:\n      path: overlays/staging\n"
        )
    };
    let overlays = |ns: &str| {
        let (prod, staging) = (format!("{ns}-prod"), format!("{ns}-stg"));
        kustomize_repo(&[("prod", &prod, 3), ("staging", &staging, 2)])
    };
    let (rig, c1, ns) = rendering_rig("kz", staging_entry, overlays, "").await;
    let (prod, staging) = (format!("{ns}-prod"), format!("{ns}-stg"));
    // The same repository is the second manifest project.
    rig.kas
        .set_projects(&[("group/staging", &rig.manifests)])
        .await;
    let s = rig.synced_in("group/staging", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let env = &rig.env;
    assert_eq!(
        overlay_objects(env, &prod, 3),
        serde_json::json!({"greeting": "hello", "env": "prod"})
    );
    assert_eq!(
        overlay_objects(env, &staging, 2),
        serde_json::json!({"greeting": "hello", "env": "staging"})
    );
    // From `../../common/team.yaml`: outside the overlay's directory, inside the repository.
    let team = get_json(env, &["get", "configmap", "team", "-n", &prod]).unwrap();
    assert_eq!(team["data"]["owner"], "web");
    let prod_before = versions(env, &prod);
    let staging_before = versions(env, &staging);

    let patch = replicas_patch(4);
    let c2 = rig.manifests.commit(
        &[("overlays/staging/replicas.yaml", Some(patch.as_bytes()))],
        "staging: 4 replicas",
    );
    for project in ["group/manifests", "group/staging"] {
        let s = rig.synced_in(project, &c2).await;
        assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    }
    overlay_objects(env, &staging, 4);
    assert_eq!(versions(env, &prod), prod_before, "prod was written to");
    let staging_after = versions(env, &staging);
    let changed: Vec<&String> = staging_after
        .iter()
        .filter(|v| !staging_before.contains(v))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(changed, ["Deployment/web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kustomize_refusals_name_the_file_and_change_nothing() {
    let prod_entry = |_: &str| "    kustomize:\n      path: overlays/prod\n".to_owned();
    let overlay = |ns: &str| kustomize_repo(&[("prod", &format!("{ns}-prod"), 3)]);
    let (rig, _, ns) = rendering_rig("kzbad", prod_entry, overlay, "").await;
    let prod = format!("{ns}-prod");
    let repo = overlay(&ns);
    let before = versions(&rig.env, &prod);

    let bad_patch =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: [3\n";
    let c2 = rig.manifests.commit(
        &[("overlays/prod/replicas.yaml", Some(bad_patch.as_bytes()))],
        "a broken patch",
    );
    rig.refused(&c2, &["kustomize failed", "replicas.yaml"])
        .await;
    assert_eq!(versions(&rig.env, &prod), before);

    let good_patch = replicas_patch(3);
    let remote = "resources:\n- github.com/example/infra/base?ref=v1\n";
    let c3 = rig.manifests.commit(
        &[
            ("overlays/prod/replicas.yaml", Some(good_patch.as_bytes())),
            ("base/kustomization.yaml", Some(remote.as_bytes())),
        ],
        "a remote base",
    );
    rig.refused(
        &c3,
        &[
            "base/kustomization.yaml refers to the remote github.com/example/infra/base?ref=v1",
            "without network",
            "gitops.render.remote_bases",
        ],
    )
    .await;
    assert_eq!(versions(&rig.env, &prod), before);

    let base = &repo
        .iter()
        .find(|(p, _)| p == "base/kustomization.yaml")
        .unwrap()
        .1;
    rig.manifests.commit(
        &[("base/kustomization.yaml", Some(base.as_bytes()))],
        "local base",
    );
    // A link out of the repository outside the entry's folder is left out: it fails nothing.
    std::os::unix::fs::symlink("../../../etc/passwd", rig.manifests.dir.join("base/passwd"))
        .unwrap();
    let c4 = rig
        .manifests
        .commit(&[], "a stray link out of the repository");
    let s = rig.synced_in("group/manifests", &c4).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    // In the entry's folder, it refuses the rendering.
    let link = rig.manifests.dir.join("overlays/prod/passwd");
    std::os::unix::fs::symlink("../../../etc/passwd", link).unwrap();
    let c5 = rig.manifests.commit(&[], "a link out of the repository");
    rig.refused(
        &c5,
        &["symbolic link overlays/prod/passwd points to \"../../../etc/passwd\", outside the repository"],
    )
    .await;
    assert_eq!(versions(&rig.env, &prod), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helm_chart_with_two_values_files_is_applied_and_its_errors_change_nothing() {
    let (rig, _, ns) = rendering_rig("helm", |_| HELM_ENTRY.into(), |_| helm_repo(), "").await;
    let cm = get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).unwrap();
    assert_eq!(
        cm["data"],
        serde_json::json!({"color": "blue", "size": "l", "greeting": "hi"})
    );
    let d = get_json(&rig.env, &["get", "deployment", "shop-web", "-n", &ns]).unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    let before = versions(&rig.env, &ns);

    let broken = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: broken\ndata:\n  x: {{ .Values.missing.key }}\n";
    let c2 = rig.manifests.commit(
        &[("charts/app/templates/broken.yaml", Some(broken.as_bytes()))],
        "a template error",
    );
    rig.refused(
        &c2,
        &[
            "helm failed",
            "template: charts/app/templates/broken.yaml:6:",
        ],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);

    let with_dependency = "apiVersion: v2\nname: app\nversion: 0.1.0\ndependencies:\n- name: redis\n  version: 20.0.0\n  repository: https://charts.example.com\n";
    let c3 = rig.manifests.commit(
        &[
            ("charts/app/templates/broken.yaml", None),
            ("charts/app/Chart.yaml", Some(with_dependency.as_bytes())),
        ],
        "a remote dependency",
    );
    rig.refused(&c3, &["chart charts/app depends on redis from https://charts.example.com, which is not vendored"]).await;
    assert_eq!(versions(&rig.env, &ns), before);
}

/// Processes whose command line mentions `dir` (a renderer working in it).
fn processes_in(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renderings_over_their_time_memory_or_output_limit_are_stopped_and_reported() {
    let work = tempfile::tempdir().unwrap();
    let limits = format!(
        "    timeout: 3s\n    memory_limit: 1073741824\n    max_output_size: 1048576\n    work_dir: {}\n",
        work.path().display()
    );
    let (rig, _, ns) =
        rendering_rig("limits", |_| HELM_ENTRY.into(), |_| helm_repo(), &limits).await;
    let before = versions(&rig.env, &ns);
    let cases = [
        (
            "{{- range until 100000 }}{{- range until 100000 }}{{- range until 100000 }}{{- end }}{{- end }}{{- end }}\n",
            "helm did not finish within 3s and was stopped",
        ),
        (
            "{{ $s := repeat 2000000000 \"x\" }}# {{ len $s }}\n",
            "helm ran out of its memory limit of 1073741824 bytes and was stopped",
        ),
        (
            "{{- range until 200000 }}\n# xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n{{- end }}\n",
            "helm wrote more than 1048576 bytes of manifests and was stopped",
        ),
    ];
    for (template, error) in cases {
        let started = Instant::now();
        let c = rig.manifests.commit(
            &[("charts/app/templates/heavy.yaml", Some(template.as_bytes()))],
            error,
        );
        rig.refused(&c, &[error]).await;
        // Generous: the limit is 3 s; this bounds "stopped" rather than measuring it.
        assert!(started.elapsed() < Duration::from_secs(60), "{error}");
        assert_eq!(processes_in(work.path()), Vec::<String>::new(), "{error}");
        let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
        assert!(left.is_empty(), "checkouts left behind: {left:?}");
        assert_eq!(versions(&rig.env, &ns), before, "{error}");
    }
}

/// A helm rig whose renderers' work folder (in the returned directory, `render`) was then
/// replaced by a file, as on a broken disk, and a commit c2 that kas therefore failed to
/// render: (rig, c1, c2, namespace, the directory).
async fn a_commit_kas_cannot_render(
    prefix: &str,
) -> (Rig, String, String, String, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().join("render");
    let extra = format!("    work_dir: {}\n", work_dir.display());
    let (rig, c1, ns) = rendering_rig(prefix, |_| HELM_ENTRY.into(), |_| helm_repo(), &extra).await;
    std::fs::remove_dir_all(&work_dir).unwrap();
    std::fs::write(&work_dir, b"not a folder").unwrap();
    let c2 = rig.manifests.commit(
        &[("env/values-a.yaml", Some(b"color: green\nsize: s\n"))],
        "green",
    );
    rig.refused(&c2, &[]).await;
    (rig, c1, c2, ns, work)
}

/// A rendering that fails on kas's side (its work folder is not a folder, as on a broken or
/// full disk) is tried again at the next fetch: once kas can render, the commit is applied
/// without a new commit (it used to stay failed until the next commit or a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendering_that_failed_on_kas_side_is_tried_again_and_applied() {
    let (rig, _c1, c2, ns, work) = a_commit_kas_cannot_render("retried").await;
    let work_dir = work.path().join("render");
    // Tried again at every fetch, told once.
    rig.wait_fetches(5).await;
    assert_eq!(rig.sync_failures(&c2), 1, "told once");
    std::fs::remove_file(&work_dir).unwrap();
    std::fs::create_dir(&work_dir).unwrap();
    let s = wait_for("the commit applied", Duration::from_secs(60), || async {
        let s = rig.synced_in("group/manifests", &c2).await;
        (s.outcome == ReportedOutcome::Succeeded).then_some(s)
    })
    .await;
    assert!(s.error.is_empty(), "{s:?}");
    let config = get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).unwrap();
    assert_eq!(config["data"]["color"], "green");
}

/// The branch goes back to the commit in force while a newer one stands failed (here kas
/// cannot render it): the agent hears that the failure no longer stands, and its status is
/// the commit in force again, succeeded (the failure used to be reported for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_reset_to_the_commit_in_force_ends_a_standing_failure() {
    let (rig, c1, _c2, _ns, _work) = a_commit_kas_cannot_render("rolledback").await;
    rig.manifests.git(&["reset", "-q", "--hard", &c1]);
    let s = wait_for(
        "the commit in force again",
        Duration::from_secs(60),
        || async {
            let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            let s = syncs
                .into_iter()
                .find(|s| s.project_id == "group/manifests")?;
            (s.commit_id == c1 && s.outcome == ReportedOutcome::Succeeded).then_some(s)
        },
    )
    .await;
    assert!(s.error.is_empty(), "{s:?}");
}

/// The checkouts in `dir`, by name.
fn checkouts_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tether-render-"))
        .collect()
}

/// A helm rig (namespace from `prefix`) with a 10-minute time limit whose newest commit
/// renders far longer than any test runs, once its renderer runs in the returned work folder.
async fn rendering_for_ever(prefix: &str) -> (Rig, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let extra = format!(
        "    timeout: 10m\n    work_dir: {}\n",
        work.path().display()
    );
    let (rig, _, _) = rendering_rig(prefix, |_| HELM_ENTRY.into(), |_| helm_repo(), &extra).await;
    let endless = b"{{- range until 100000 }}{{- range until 100000 }}{{- range until 100000 }}{{- end }}{{- end }}{{- end }}\n";
    rig.manifests.commit(
        &[("charts/app/templates/endless.yaml", Some(endless))],
        "endless",
    );
    wait_for("the renderer to start", Duration::from_secs(60), || async {
        (!processes_in(work.path()).is_empty()).then_some(())
    })
    .await;
    (rig, work)
}

/// kas killed with SIGKILL mid-rendering can neither stop its renderer nor remove its
/// checkout: the kernel stops the renderer with kas, and the next kas deletes the checkout
/// before it renders anything — and nothing else in the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendering_cut_by_kill_9_leaves_no_renderer_and_its_checkout_goes_at_restart() {
    let (mut rig, work) = rendering_for_ever("killed").await;
    let left = checkouts_in(work.path());
    assert_eq!(left.len(), 1, "{left:?}");

    rig.kas.kill9();
    wait_for(
        "the renderer to end with kas",
        Duration::from_secs(10),
        || async { processes_in(work.path()).is_empty().then_some(()) },
    )
    .await;
    assert_eq!(
        checkouts_in(work.path()),
        left,
        "a kill -9 leaves its checkout"
    );
    // Not checkouts: a link named like one (and its target), and another folder.
    let kept = work.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("file"), "x").unwrap();
    std::os::unix::fs::symlink(&kept, work.path().join("tether-render-link")).unwrap();

    rig.kas.kill9_restart().await;
    wait_for(
        "the checkout left by the killed kas to go",
        Duration::from_secs(30),
        || async { (!work.path().join(&left[0]).exists()).then_some(()) },
    )
    .await;
    assert!(work.path().join("tether-render-link").is_symlink());
    assert_eq!(std::fs::read_to_string(kept.join("file")).unwrap(), "x");
}

/// `kas agent diff` of the rig's agent at `git_ref`: its exit code, JSON output and errors.
fn diff_at(rig: &Rig, git_ref: &str) -> (Option<i32>, String, String) {
    let out = rig
        .kas
        .cli()
        .args(["agent", "diff", "group/config:seed", "--ref", git_ref])
        .args(["-o", "json"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_renders_the_overlay_of_a_branch_as_the_agent_would() {
    let prod_entry = |_: &str| "    kustomize:\n      path: overlays/prod\n".to_owned();
    let overlay = |ns: &str| kustomize_repo(&[("prod", &format!("{ns}-prod"), 3)]);
    let (rig, _, ns) = rendering_rig("kzdiff", prod_entry, overlay, "").await;
    let prod = format!("{ns}-prod");
    let before = versions(&rig.env, &prod);
    // A branch in a worktree of its own: the branch the agent follows never moves.
    let dir = rig.manifests.dir.with_file_name("wt-feature");
    rig.manifests.git(&[
        "worktree",
        "add",
        "-q",
        "-b",
        "feature",
        dir.to_str().unwrap(),
    ]);
    let patch = replicas_patch(5);
    support::GitRepo { dir }.commit(
        &[("overlays/prod/replicas.yaml", Some(patch.as_bytes()))],
        "prod: 5 replicas",
    );
    let (code, json, err) = diff_at(&rig, "feature");
    assert_eq!(code, Some(1), "{err}");
    let view: tether_kas_api::DiffView = serde_json::from_str(&json).unwrap();
    let objects = &view.projects[0].objects;
    let changed: Vec<(&str, &str)> = objects
        .iter()
        .filter(|o| o.change != tether_kas_api::DiffChange::Unchanged)
        .map(|o| (o.kind.as_str(), o.name.as_str()))
        .collect();
    assert_eq!(changed, [("Deployment", "web")], "{json}");
    let web = objects.iter().find(|o| o.name == "web").unwrap();
    assert!(
        web.diff.contains("-  replicas: 3") && web.diff.contains("+  replicas: 5"),
        "{}",
        web.diff
    );
    assert!(
        objects.iter().any(|o| o.name.starts_with("web-config-")),
        "{json}"
    );
    assert_eq!(
        versions(&rig.env, &prod),
        before,
        "a preview changes nothing"
    );
}

/// A rendering runs for no one once the agent that asked for it is gone: its renderer is
/// stopped with the agent's stream, not left to run to its time limit (ten minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendering_whose_agent_went_away_is_stopped() {
    let (mut rig, work) = rendering_for_ever("gone").await;
    rig.agent.kill9();
    wait_for(
        "the renderer to stop with the agent's stream",
        Duration::from_secs(30),
        || async { processes_in(work.path()).is_empty().then_some(()) },
    )
    .await;
}

/// A chart shipping its CRD in `crds/` (as kube-prometheus-stack does), a custom resource of
/// it in `templates/`, and a test hook Pod in `templates/tests/`; the CRD's group is made
/// from `ns`, so each test's CRD is its own.
fn chart_with_crds_and_tests(ns: &str) -> Vec<(String, String)> {
    let group = format!("{ns}.example.com");
    owned(&[
        ("charts/app/Chart.yaml", "apiVersion: v2\nname: app\nversion: 0.1.0\n".into()),
        (
            "charts/app/crds/widgets.yaml",
            format!("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  names:\n    kind: Widget\n    plural: widgets\n    singular: widget\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n"),
        ),
        (
            "charts/app/templates/widget.yaml",
            format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: {{{{ .Release.Name }}}}-widget\nspec:\n  size: 3\n"),
        ),
        (
            "charts/app/templates/tests/test-connection.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ .Release.Name }}-test\n  annotations:\n    helm.sh/hook: test\nspec:\n  restartPolicy: Never\n  containers:\n  - name: wget\n    image: busybox\n    command: ['false']\n".into(),
        ),
    ])
}

/// `helm template` leaves out a chart's `crds/` folder unless asked, and prints its test
/// hooks as ordinary objects: the CRD is applied (first) with the custom resource it defines,
/// and the test Pod, which `helm test` alone would run, is not created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charts_crds_folder_is_applied_and_its_test_hooks_are_not() {
    let entry =
        |_: &str| "    helm:\n      chart: charts/app\n      release_name: shop\n".to_owned();
    let (rig, _, ns) = rendering_rig("crds", entry, chart_with_crds_and_tests, "").await;
    let crd = format!("widgets.{ns}.example.com");
    get_json(&rig.env, &["get", "crd", &crd]).expect("the chart's CRD");
    let widget = get_json(&rig.env, &["get", &crd, "shop-widget", "-n", &ns]).expect("a Widget");
    assert_eq!(widget["spec"]["size"], 3);
    let pods = get_json(&rig.env, &["get", "pods", "-n", &ns]).unwrap();
    assert_eq!(
        pods["items"],
        serde_json::json!([]),
        "the test hook was applied"
    );
}

/// `helm.create_namespace`, as Flux's `install.createNamespace`: the release's namespace does
/// not exist and the chart does not make it; kas adds it to the rendering (kept), the chart's
/// objects land in it — the Deployment its template leaves without a namespace too, as
/// `helm install --namespace` puts it (it went to `default_namespace`, splitting the release) —
/// and when the key and the namespace leave the entry, the chart's objects there are pruned
/// but the Namespace stays (`PruneSkipped`), as `helm uninstall` leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_create_namespace_creates_the_releases_namespace_and_never_prunes_it() {
    let entry =
        |ns: &str| format!("{HELM_ENTRY}      namespace: {ns}-rel\n      create_namespace: true\n");
    let (rig, c1, ns) = rendering_rig("createns", entry, |_| helm_repo(), "").await;
    let release_ns = format!("{ns}-rel");
    let namespace = get_json(&rig.env, &["get", "namespace", &release_ns]).expect("created");
    assert_eq!(
        namespace["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "{namespace}"
    );
    get_json(
        &rig.env,
        &["get", "configmap", "shop-config", "-n", &release_ns],
    )
    .expect("the chart's ConfigMap, in the release namespace");
    get_json(
        &rig.env,
        &["get", "deployment", "shop-web", "-n", &release_ns],
    )
    .expect("the Deployment its template leaves without a namespace, there too");
    assert!(get_json(&rig.env, &["get", "deployment", "shop-web", "-n", &ns]).is_none());
    let s = rig.synced_in("group/manifests", &c1).await;
    let ns_seen = s.objects.iter().find(|o| o.kind == "Namespace");
    assert_eq!(
        ns_seen.map(|o| (o.name.as_str(), o.status)),
        Some((release_ns.as_str(), ReportedStatus::Current)),
        "{s:?}"
    );

    let config = |helm_extra: &str| {
        format!(
            "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n{HELM_ENTRY}{helm_extra}"
        )
    };
    let path = ".gitlab/agents/seed/config.yaml";
    // Back to the default namespace: the ConfigMap leaves the release namespace, which stays.
    rig.config
        .commit(&[(path, Some(config("").as_bytes()))], "default namespace");
    let s = rig
        .report("the sync back in the default namespace", |r| {
            r.objects
                .iter()
                .any(|o| o.kind == "Namespace" && o.status != ReportedStatus::Current)
        })
        .await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let pruned = (release_ns.as_str(), ReportedStatus::Pruned);
    assert!(
        s.objects
            .iter()
            .any(|o| o.name == "shop-config" && (o.namespace.as_str(), o.status) == pruned),
        "{s:?}"
    );
    let left = s.objects.iter().find(|o| o.kind == "Namespace");
    assert_eq!(
        left.map(|o| o.status),
        Some(ReportedStatus::PruneSkipped),
        "{s:?}"
    );
    assert!(
        get_json(&rig.env, &["get", "namespace", &release_ns]).is_some(),
        "kept"
    );
    get_json(&rig.env, &["get", "deployment", "shop-web", "-n", &ns])
        .expect("the Deployment, moved with the release to the default namespace");
    assert!(
        get_json(
            &rig.env,
            &["get", "configmap", "shop-config", "-n", &release_ns]
        )
        .is_none(),
        "the chart's object there is pruned"
    );
}

/// A pre-install/pre-upgrade hook Job, as charts run database migrations.
const MIGRATE_HOOK: &str = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {{ .Release.Name }}-migrate\n  annotations:\n    helm.sh/hook: pre-install,pre-upgrade\n    helm.sh/hook-delete-policy: before-hook-creation\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: migrate\n        image: busybox\n        command: ['true']\n";

/// A chart's hook would be applied as a permanent object, never run as Helm runs it: the
/// commit is refused naming the object and its `helm.sh/hook`, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charts_hook_is_refused_naming_the_object_and_the_annotation() {
    let (rig, _, ns) = rendering_rig("hook", |_| HELM_ENTRY.into(), |_| helm_repo(), "").await;
    let before = versions(&rig.env, &ns);
    let c2 = rig.manifests.commit(
        &[(
            "charts/app/templates/migrate.yaml",
            Some(MIGRATE_HOOK.as_bytes()),
        )],
        "a migration hook",
    );
    rig.refused(
        &c2,
        &[
            &format!("batch/Job/{ns}/shop-migrate (helm template charts/app:"),
            "is a Helm hook (helm.sh/hook: pre-install,pre-upgrade)",
            "set helm.hooks: apply",
        ],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);
    assert!(get_json(&rig.env, &["get", "job", "shop-migrate", "-n", &ns]).is_none());
}

/// `helm.hooks: apply` applies a chart's hooks as ordinary objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_hooks_apply_applies_a_charts_hooks_as_ordinary_objects() {
    let entry = |_: &str| format!("{HELM_ENTRY}      hooks: apply\n");
    let repo = |_: &str| {
        let mut repo = helm_repo();
        repo.push((
            "charts/app/templates/migrate.yaml".into(),
            MIGRATE_HOOK.into(),
        ));
        repo
    };
    let (rig, _, ns) = rendering_rig("hookapply", entry, repo, "").await;
    get_json(&rig.env, &["get", "job", "shop-migrate", "-n", &ns]).expect("the hook Job");
}

/// A chart generating its password "once" as charts do (`lookup` of the live Secret, else
/// `randAlphaNum`, in a helper), and a subchart generating a token with `uuidv4` in the release
/// namespace: the password has no `namespace`, so it lands in the project's default one.
fn generating_chart() -> Vec<(String, String)> {
    let mut repo = helm_repo();
    repo.extend(owned(&[
        (
            "charts/app/templates/_helpers.tpl",
            "{{- define \"app.password\" -}}\n{{- $live := lookup \"v1\" \"Secret\" .Release.Namespace (printf \"%s-auth\" .Release.Name) -}}\n{{- if $live }}{{ index $live.data \"password\" | b64dec }}{{ else }}{{ randAlphaNum 16 }}{{ end -}}\n{{- end -}}\n".into(),
        ),
        (
            "charts/app/templates/secret.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-auth\nstringData:\n  password: {{ include \"app.password\" . | quote }}\n".into(),
        ),
        ("charts/app/charts/db/Chart.yaml", "apiVersion: v2\nname: db\nversion: 0.1.0\n".into()),
        (
            "charts/app/charts/db/templates/token.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-db-token\n  namespace: {{ .Release.Namespace }}\nstringData:\n  token: {{ uuidv4 | quote }}\n".into(),
        ),
    ]));
    repo
}

/// `helm template` has no cluster: a chart's `lookup` finds nothing and its generated password
/// is new at every rendering, so applying it would rotate the live Secret at each commit. kas
/// renders the chart twice and refuses the commit, naming each object that differs where it
/// would land, the template that rendered it, the files calling such functions and the way
/// out; nothing changes in the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_generating_values_is_refused_naming_objects_files_and_functions() {
    let (rig, _, ns) = rendering_rig("random", |_| HELM_ENTRY.into(), |_| helm_repo(), "").await;
    let before = versions(&rig.env, &ns);
    let added: Vec<(String, String)> = generating_chart()
        .into_iter()
        .filter(|(p, _)| !helm_repo().iter().any(|(q, _)| q == p))
        .collect();
    let c2 = rig.manifests.commit(&files(&added), "a generated password");
    rig.refused(
        &c2,
        &[
            "helm template charts/app renders differently at every rendering",
            &format!("Secret {ns}/shop-auth (charts/app/templates/secret.yaml)"),
            &format!("Secret {ns}/shop-db-token (charts/app/charts/db/templates/token.yaml)"),
            "the chart calls uuidv4 in charts/app/charts/db/templates/token.yaml; randAlphaNum, lookup in charts/app/templates/_helpers.tpl",
            "refused, nothing was applied",
            "set helm.random: apply",
        ],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);
    assert!(get_json(&rig.env, &["get", "secret", "shop-auth", "-n", &ns]).is_none());
}

/// `helm.random: apply` applies such a chart, and the sync report warns of what it rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_random_apply_applies_a_generating_chart_with_a_warning() {
    let entry = |_: &str| format!("{HELM_ENTRY}      random: apply\n");
    let (rig, c1, ns) = rendering_rig("randomapply", entry, |_| generating_chart(), "").await;
    get_json(&rig.env, &["get", "secret", "shop-auth", "-n", &ns]).expect("the Secret");
    let s = rig.synced_in("group/manifests", &c1).await;
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains(&format!("Secret {ns}/shop-auth"))
                && w.contains("applied anyway (helm.random: apply)")),
        "{:?}",
        s.warnings
    );
}

/// A chart formatting the clock coarsely (`now | date "2006"`) renders alike twice, so it is
/// applied — with a warning naming the file: a rendering at another time (a new year, day or
/// minute, at the next commit or kas restart) changes the object without a commit (E14 F22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_reading_the_clock_coarsely_is_applied_with_a_warning() {
    let clock = |_: &str| {
        let mut repo = helm_repo();
        repo.extend(owned(&[(
            "charts/app/templates/year.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-year\ndata:\n  year: {{ now | date \"2006\" | quote }}\n".into(),
        )]));
        repo
    };
    let (rig, c1, ns) = rendering_rig("clock", |_| HELM_ENTRY.into(), clock, "").await;
    get_json(&rig.env, &["get", "configmap", "shop-year", "-n", &ns]).expect("the ConfigMap");
    let s = rig.synced_in("group/manifests", &c1).await;
    assert!(
        s.warnings
            .iter()
            .any(|w| w.starts_with("charts/app/templates/year.yaml reads the clock (now)")),
        "{:?}",
        s.warnings
    );
}

/// A CRD of kind Widget in the group `<ns>.example.com`, installed and Established.
fn install_widget_crd(env: &TestEnv, ns: &str) {
    let group = format!("{ns}.example.com");
    env.apply_yaml(&format!("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  names:\n    kind: Widget\n    plural: widgets\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n")).unwrap();
    let crd = format!("crd/widgets.{group}");
    let waited = env
        .kubectl()
        .args(["wait", "--for=condition=Established", &crd, "--timeout=60s"])
        .status()
        .unwrap();
    assert!(waited.success());
}

/// A chart gated on the cluster as charts are: a minimum Kubernetes version, a PDB whose
/// API version follows `.Capabilities.KubeVersion`, a Widget only where the cluster serves
/// Widgets (as charts gate ServiceMonitors), a ConfigMap only where `helm.api_versions` adds
/// `extra.example.com/v1/Gadget`, and a ConfigMap showing the version the chart saw.
fn capability_gated_chart(ns: &str) -> Vec<(String, String)> {
    let group = format!("{ns}.example.com");
    owned(&[
        ("charts/app/Chart.yaml", "apiVersion: v2\nname: app\nversion: 0.1.0\nkubeVersion: \">=1.26.0-0\"\n".into()),
        (
            "charts/app/templates/pdb.yaml",
            "{{- if semverCompare \">=1.21-0\" .Capabilities.KubeVersion.Version }}\napiVersion: policy/v1\n{{- else }}\napiVersion: policy/v1beta1\n{{- end }}\nkind: PodDisruptionBudget\nmetadata:\n  name: {{ .Release.Name }}\nspec:\n  maxUnavailable: 1\n  selector:\n    matchLabels:\n      app: {{ .Release.Name }}\n".into(),
        ),
        (
            "charts/app/templates/widget.yaml",
            format!("{{{{- if .Capabilities.APIVersions.Has \"{group}/v1/Widget\" }}}}\napiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: {{{{ .Release.Name }}}}\n{{{{- end }}}}\n"),
        ),
        (
            "charts/app/templates/gadget.yaml",
            "{{- if .Capabilities.APIVersions.Has \"extra.example.com/v1/Gadget\" }}\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-gadget\n{{- end }}\n".into(),
        ),
        (
            "charts/app/templates/version.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-version\ndata:\n  version: {{ .Capabilities.KubeVersion.Version | quote }}\n".into(),
        ),
    ])
}

/// Charts see the agent's cluster, not Helm's defaults (Kubernetes 1.20, no custom API): a
/// chart requiring a recent Kubernetes renders, its PDB is policy/v1, its Widget (the cluster
/// serves Widgets) is applied, and `helm.api_versions` adds to what the cluster serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_sees_the_agents_kubernetes_version_and_apis() {
    let entry = |_: &str| {
        "    helm:\n      chart: charts/app\n      release_name: shop\n      api_versions:\n      - extra.example.com/v1/Gadget\n".to_owned()
    };
    let repo = |ns: &str| {
        // Before the agent starts: it tells kas what its cluster serves when it asks.
        install_widget_crd(&TestEnv::from_env().unwrap(), ns);
        capability_gated_chart(ns)
    };
    let (rig, c1, ns) = rendering_rig("caps", entry, repo, "").await;
    let env = &rig.env;
    let server = get_json(env, &["version"]).unwrap();
    let version = get_json(env, &["get", "configmap", "shop-version", "-n", &ns]).unwrap();
    assert_eq!(
        version["data"]["version"],
        server["serverVersion"]["gitVersion"]
    );
    let pdb = get_json(env, &["get", "pdb", "shop", "-n", &ns]).unwrap();
    assert_eq!(pdb["apiVersion"], "policy/v1");
    let widget = format!("widgets.{ns}.example.com");
    get_json(env, &["get", &widget, "shop", "-n", &ns]).expect("the Widget");
    get_json(env, &["get", "configmap", "shop-gadget", "-n", &ns]).expect("the Gadget's");
    // A preview renders as the sync did: nothing to change (with Helm's defaults it would
    // fail on the chart's kubeVersion).
    let (code, json, err) = diff_at(&rig, &c1);
    assert_eq!(code, Some(0), "{err} {json}");
}

/// Runs the real helm with `home` as its HOME (its registry logins, caches); asserts success.
fn helm(env: &TestEnv, home: &Path, args: &[&str]) {
    let out = std::process::Command::new(env.bin_dir.join("helm"))
        .args(args)
        .env("HOME", home)
        .output()
        .unwrap();
    assert!(out.status.success(), "helm {args:?}: {out:?}");
}

/// Packages the chart `greeter` at `version` (a ConfigMap saying its version) into `out`
/// (`greeter-<version>.tgz`) with the real helm, its sources under `home`; the archive's path.
fn package_greeter(env: &TestEnv, home: &Path, version: &str, out: &Path) -> std::path::PathBuf {
    let src = home.join("src").join(version).join("greeter");
    std::fs::create_dir_all(src.join("templates")).unwrap();
    std::fs::write(
        src.join("Chart.yaml"),
        format!("apiVersion: v2\nname: greeter\nversion: {version}\n"),
    )
    .unwrap();
    std::fs::write(
        src.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeter\n  namespace: {{ .Release.Namespace }}\ndata:\n  version: {{ .Chart.Version | quote }}\n  greeting: {{ .Values.greeting | default \"none\" | quote }}\n  size: {{ .Values.size | default \"none\" | quote }}\n",
    )
    .unwrap();
    std::fs::create_dir_all(out).unwrap();
    helm(
        env,
        home,
        &[
            "package",
            src.to_str().unwrap(),
            "-d",
            out.to_str().unwrap(),
        ],
    );
    out.join(format!("greeter-{version}.tgz"))
}

/// A chart repository on 127.0.0.1, serving the files of a folder (`index.yaml`, archives)
/// one request per connection, until it is stopped.
struct ChartRepo {
    dir: tempfile::TempDir,
    port: u16,
    server: tokio::task::JoinHandle<()>,
    /// Each request kas made (by its User-Agent): whether it carried an `Authorization`.
    asked_by_kas: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
    /// While set, connections are closed unanswered (a repository down, for a while).
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `authorization` or 401 (a private repository's answer to missing or wrong credentials).
fn denies(wanted: Option<&str>, req: &http::Request<hyper::body::Incoming>) -> bool {
    let given = req.headers().get(http::header::AUTHORIZATION);
    wanted.is_some_and(|w| given.is_none_or(|g| g.as_bytes() != w.as_bytes()))
}

impl ChartRepo {
    async fn start() -> Self {
        Self::requiring(None).await
    }

    /// A repository answering 401 to requests without the `Authorization` header `auth`.
    async fn requiring(auth: Option<&'static str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = dir.path().to_path_buf();
        let asked_by_kas = std::sync::Arc::<std::sync::Mutex<Vec<bool>>>::default();
        let asked = asked_by_kas.clone();
        let down = std::sync::Arc::<std::sync::atomic::AtomicBool>::default();
        let is_down = down.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if is_down.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (root, asked) = (root.clone(), asked.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let file = root.join(req.uri().path().trim_start_matches('/'));
                        let refused = denies(auth, &req);
                        let headers = req.headers();
                        if headers
                            .get(http::header::USER_AGENT)
                            .is_some_and(|u| u == "tether-kas")
                        {
                            let authorized = headers.contains_key(http::header::AUTHORIZATION);
                            asked.lock().unwrap().push(authorized);
                        }
                        async move {
                            let answer = match std::fs::read(&file) {
                                Ok(_) if refused => http::Response::builder()
                                    .status(401)
                                    .header("www-authenticate", "Basic realm=\"charts\"")
                                    .body(http_body_util::Full::default())
                                    .unwrap(),
                                Ok(bytes) => http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(bytes),
                                )),
                                Err(_) => http::Response::builder()
                                    .status(404)
                                    .body(http_body_util::Full::default())
                                    .unwrap(),
                            };
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    });
                    // No keep-alive: once stopped, the repository answers nothing at all.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            dir,
            port,
            server,
            asked_by_kas,
            down,
        }
    }

    /// Takes the repository down (`true`: connections are closed unanswered) or back up.
    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// The URL of the repository in the folder `name`.
    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Packages the chart `greeter` at `version` (a ConfigMap saying its version) into the
    /// repository `name` and indexes it, with the real helm.
    fn publish(&self, env: &TestEnv, name: &str, version: &str) {
        let repo = self.dir.path().join(name);
        package_greeter(env, self.dir.path(), version, &repo);
        helm(
            env,
            self.dir.path(),
            &["repo", "index", repo.to_str().unwrap()],
        );
    }

    fn stop(&self) {
        self.server.abort();
    }
}

/// An umbrella chart depending on `greeter` `version` from `repository`.
fn umbrella(repository: &str, version: &str) -> Vec<(String, String)> {
    let mut repo = helm_repo();
    repo[0].1 = format!(
        "apiVersion: v2\nname: app\nversion: 0.1.0\ndependencies:\n- name: greeter\n  version: \"{version}\"\n  repository: {repository}\n"
    );
    repo
}

/// The version, greeting and size the `shop-greeter` ConfigMap of `ns` shows.
fn greeter_shows(env: &TestEnv, ns: &str) -> [String; 3] {
    let cm = get_json(env, &["get", "configmap", "shop-greeter", "-n", ns]).unwrap();
    ["version", "greeting", "size"].map(|k| cm["data"][k].as_str().unwrap_or_default().to_owned())
}

fn greeter_version(env: &TestEnv, ns: &str) -> Value {
    let cm = get_json(env, &["get", "configmap", "shop-greeter", "-n", ns]).unwrap();
    cm["data"]["version"].clone()
}

/// kas's settings allowing `repository`, fetching its index at every rendering.
fn allowing(repository: &str) -> String {
    format!("    chart_repositories:\n    - {repository}\n    chart_index_ttl: 0s\n")
}

/// The umbrella chart's dependency is fetched from the allowed repository and applied; a
/// version published later in its range is applied at the next commit; once the repository
/// is down, a commit still renders with the archive kas keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charts_dependency_is_fetched_from_an_allowed_repository_and_kept() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.0.0");
    let url = charts.url("stable");
    let (rig, _, ns) = rendering_rig(
        "chartrepo",
        |_| HELM_ENTRY.into(),
        |_| umbrella(&url, "~1.0.0"),
        &allowing(&url),
    )
    .await;
    assert_eq!(greeter_version(&rig.env, &ns), "1.0.0");
    // The umbrella chart's own objects are there too.
    let cm = get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["color"], "blue");

    charts.publish(&env, "stable", "1.0.1");
    let c2 = rig.manifests.commit(
        &[("env/values-a.yaml", Some(b"color: green\nsize: s\n"))],
        "green",
    );
    let s = rig.synced_in("group/manifests", &c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(greeter_version(&rig.env, &ns), "1.0.1");

    charts.stop();
    let c3 = rig.manifests.commit(
        &[("env/values-a.yaml", Some(b"color: black\nsize: s\n"))],
        "black",
    );
    let s = rig.synced_in("group/manifests", &c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let cm = get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["color"], "black");
    assert_eq!(greeter_version(&rig.env, &ns), "1.0.1");
    let fetches = |kind: &str, outcome: &str| {
        let series =
            format!("kas_gitops_chart_fetches_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}");
        let kas = &rig.kas;
        async move { kas.metric(&series).await.unwrap_or(0.0) }
    };
    // Two archives downloaded (1.0.0, 1.0.1); the last commit used the index fetched before
    // and the archive kept.
    assert_eq!(fetches("archive", "fetched").await, 2.0);
    assert!(fetches("archive", "cached").await >= 1.0);
    assert!(fetches("index", "stale").await >= 1.0);
}

/// A dependency from a repository kas does not allow, an archive whose digest is not the
/// index's, and a repository down with nothing kept are refused naming what and why, and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_dependencies_not_allowed_tampered_or_unreachable_are_refused() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.0.0");
    charts.publish(&env, "other", "1.0.0");
    let allowed = charts.url("stable");
    let (rig, _, ns) = rendering_rig(
        "chartrefused",
        |_| HELM_ENTRY.into(),
        |_| helm_repo(),
        &allowing(&allowed),
    )
    .await;
    let before = versions(&rig.env, &ns);
    let commit_umbrella = |repository: &str, message: &str| {
        let chart = umbrella(repository, "1.0.0").swap_remove(0);
        rig.manifests
            .commit(&[(&chart.0, Some(chart.1.as_bytes()))], message)
    };

    let other = charts.url("other");
    let c2 = commit_umbrella(&other, "not allowed");
    rig.refused(
        &c2,
        &[&format!(
            "chart charts/app depends on greeter from {other}, which kas's gitops.render.chart_repositories does not allow"
        )],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);

    // The archive changed after it was indexed (tampered with, or rebuilt in place).
    let archive = charts.dir.path().join("stable/greeter-1.0.0.tgz");
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&archive, bytes).unwrap();
    let c3 = commit_umbrella(&allowed, "tampered");
    rig.refused(
        &c3,
        &[
            &format!("the archive of greeter 1.0.0 at {allowed}/greeter-1.0.0.tgz has SHA-256"),
            "as the repository's index (or the registry's manifest) says: refused",
        ],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);

    charts.stop();
    let c4 = rig.manifests.commit(
        &[("env/values-a.yaml", Some(b"color: green\nsize: s\n"))],
        "repository down",
    );
    rig.refused(
        &c4,
        // The index fetched before is used; the archive was never kept (it did not match).
        &[
            &format!("fetching {allowed}/greeter-1.0.0.tgz failed"),
            "Connection refused",
        ],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);
}

/// A `helm.repository` entry for the chart `greeter` of `repository` at `version`, with a
/// values file of the Git repository and inline values.
fn repository_entry(repository: &str, version: &str) -> String {
    format!(
        "    helm:\n      repository: {repository}\n      chart: greeter\n      version: '{version}'\n      release_name: shop\n      values_files:\n      - env/greeter.yaml\n      values:\n        size: xl\n"
    )
}

/// The Git repository of a `helm.repository` entry: only its values.
fn greeter_values(greeting: &str) -> Vec<(String, String)> {
    owned(&[("env/greeter.yaml", format!("greeting: {greeting}\n"))])
}

/// A rig whose entry is `entry`, kas allowing `allowed` and fetching Git every `git_poll`; its
/// first commit, whatever came of it, and the namespace.
async fn repository_rig(
    prefix: &str,
    entry: &str,
    allowed: &str,
    git_poll: &'static str,
) -> (Rig, String, String) {
    let extra = allowing(allowed);
    let values = |_: &str| greeter_values("hello");
    started_rig(prefix, |_| entry.to_owned(), values, &extra, git_poll).await
}

/// Commits a new greeting and waits for its sync: succeeded, with greeter 1.1.0 saying it.
async fn bonjour_with_greeter_1_1_0(rig: &Rig, ns: &str) -> kas::api::SyncView {
    let c = rig.manifests.commit(
        &[("env/greeter.yaml", Some(b"greeting: bonjour\n"))],
        "bonjour",
    );
    let s = rig.synced_in("group/manifests", &c).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let cm = get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", ns]).unwrap();
    assert_eq!(
        (&cm["data"]["version"], &cm["data"]["greeting"]),
        (&Value::from("1.1.0"), &Value::from("bonjour"))
    );
    s
}

/// Flux's HelmRelease of a HelmRepository: the chart is fetched from the allowed repository
/// (the newest version in range), rendered with the values of Git and applied; the version
/// rendered is named; once the repository is down, a commit renders from what kas keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_of_an_allowed_repository_is_applied_with_values_from_git_and_kept() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    for v in ["1.0.0", "1.1.0", "2.0.0"] {
        charts.publish(&env, "stable", v);
    }
    let url = charts.url("stable");
    let (rig, c1, ns) = repository_rig(
        "repochart",
        &repository_entry(&url, ">=1.0.0 <2"),
        &url,
        "300ms",
    )
    .await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.1.0", "hello", "xl"]);
    let named = format!("helm template greeter 1.1.0 from {url}");
    assert!(rig.kas.log().contains(&named), "kas names {named:?}");

    charts.stop();
    bonjour_with_greeter_1_1_0(&rig, &ns).await;
    let fetches = |kind: &str, outcome: &str| {
        let series =
            format!("kas_gitops_chart_fetches_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}");
        let kas = &rig.kas;
        async move { kas.metric(&series).await.unwrap_or(0.0) }
    };
    assert_eq!(fetches("archive", "fetched").await, 1.0);
    assert!(fetches("archive", "cached").await >= 1.0);
    assert!(fetches("index", "stale").await >= 1.0);
}

/// The "unreachable" warning of a `helm.repository` entry follows its repository without a
/// commit: kas sends the commit rendered anew when the repository goes away (the agent's
/// status says so within the index's time to live) and when it is back (the warning goes).
/// Before, the warning came only with the next commit, and stayed until the one after the
/// repository was back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unreachable_warning_of_a_chart_repository_follows_it_without_a_commit() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.1.0");
    let url = charts.url("stable");
    let entry = repository_entry(&url, "~1.1");
    let (rig, c1, ns) = repository_rig("repoflap", &entry, &url, "1h").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert!(s.warnings.is_empty(), "{s:?}");

    let said = format!("chart repository {url} unreachable: using index fetched at ");
    let warned = |s: &kas::api::SyncView| s.warnings.iter().any(|w| w.starts_with(&said));
    charts.set_down(true);
    let s = rig
        .report("a sync saying the repository is down", warned)
        .await;
    assert_eq!((s.outcome, &s.commit_id), (ReportedOutcome::Succeeded, &c1));
    charts.set_down(false);
    let s = rig
        .report("a sync no longer saying so", |s| s.warnings.is_empty())
        .await;
    assert_eq!((s.outcome, &s.commit_id), (ReportedOutcome::Succeeded, &c1));
    assert_eq!(greeter_version(&rig.env, &ns), "1.1.0");
}

/// A kas restarted while the chart repository is down still renders the chart it resolved
/// before (the resolution kept on disk, the archive in the cache), and says so in the
/// project's status and its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kas_restarted_while_the_chart_repository_is_down_renders_what_it_resolved_before() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.1.0");
    let url = charts.url("stable");
    let entry = repository_entry(&url, "~1.1");
    let (mut rig, c1, ns) = repository_rig("repodown", &entry, &url, "300ms").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert!(s.warnings.is_empty(), "{s:?}");

    charts.stop();
    rig.kas.restart().await;
    let s = bonjour_with_greeter_1_1_0(&rig, &ns).await;
    let said = format!("chart repository {url} unreachable: using index fetched at ");
    assert!(
        s.warnings.iter().any(|w| w.starts_with(&said)),
        "{said:?} not in {:?}",
        s.warnings
    );
    assert!(rig.kas.log().contains(&said), "kas logs {said:?}");
    let recorded = "kas_gitops_chart_fetches_total{kind=\"index\",outcome=\"recorded\"}";
    assert!(rig.kas.metric(recorded).await.unwrap_or(0.0) >= 1.0);
}

/// `kas agent status` (its table and JSON) shows the chart version of a `helm.repository`
/// entry live in the cluster, as Flux shows a HelmRelease's, and the new one once a version
/// published in range is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_agent_status_shows_the_chart_version_applied() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.0.0");
    let url = charts.url("stable");
    let entry = repository_entry(&url, "~1.0");
    let (rig, c1, ns) = repository_rig("repoversion", &entry, &url, "1h").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(
        (s.outcome, s.chart_version.as_str()),
        (ReportedOutcome::Succeeded, "1.0.0"),
        "{s:?}"
    );
    let status = |format: &str| {
        let o = rig
            .kas
            .cli()
            .args(["agent", "status", "group/config:seed", "-o", format])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    let table = status("table");
    assert!(table.contains("    chart version: 1.0.0\n"), "{table}");
    let json: Value = serde_json::from_str(&status("json")).unwrap();
    assert_eq!(json["syncs"][0]["chart_version"], "1.0.0", "{json}");

    charts.publish(&env, "stable", "1.0.1");
    let s = rig
        .report("the sync of 1.0.1", |s| s.chart_version == "1.0.1")
        .await;
    assert_eq!((s.outcome, s.commit_id), (ReportedOutcome::Succeeded, c1));
    assert_eq!(greeter_version(&rig.env, &ns), "1.0.1");
    assert!(status("table").contains("    chart version: 1.0.1\n"));
}

/// A private chart repository (HTTP basic authentication) is read with the credentials of
/// kas's configuration, read from a file at each request (a rotated Secret is used at once)
/// and never logged; credentials it refuses fail closed, naming the repository, even though
/// kas holds an index and the archive from before; fixed, the commit is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_chart_repository_is_read_with_kas_credentials_and_refusing_them_fails_closed() {
    // base64("reader:s3cret")
    let charts = ChartRepo::requiring(Some("Basic cmVhZGVyOnMzY3JldA==")).await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "private", "1.1.0");
    let url = charts.url("private");
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let extra = format!(
        "{}    chart_repository_credentials:\n    - url: {url}\n      username: reader\n      password_file: {}\n",
        allowing(&url),
        password.display()
    );
    let entry = repository_entry(&url, "~1.1");
    let values = |_: &str| greeter_values("hello");
    let (rig, c1, ns) = started_rig("repoauth", |_| entry, values, &extra, "300ms").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(greeter_version(&rig.env, &ns), "1.1.0");

    std::fs::write(&password, "n0tThePassw0rd\n").unwrap();
    let c2 = rig.manifests.commit(
        &[("env/greeter.yaml", Some(b"greeting: bonjour\n"))],
        "bonjour",
    );
    rig.refused(
        &c2,
        &[&format!(
            "chart repository {url} refused kas: answered 401 Unauthorized to the credentials of gitops.render.chart_repository_credentials for {url}"
        )],
    )
    .await;
    let cm = get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["greeting"], "hello", "nothing of c2 applied");

    std::fs::write(&password, "s3cret\n").unwrap();
    let s = rig
        .report("c2 applied", |s| {
            s.commit_id == c2 && s.outcome == ReportedOutcome::Succeeded
        })
        .await;
    assert!(s.warnings.is_empty(), "{s:?}");
    let log = rig.kas.log();
    for secret in ["s3cret", "cmVhZGVyOnMzY3JldA", "n0tThePassw0rd"] {
        assert!(!log.contains(secret), "kas logged {secret:?}");
    }
}

/// How many times kas sent the project's manifests to an agent.
fn sendings(rig: &Rig) -> usize {
    rig.kas.log().matches("Sending manifests").count()
}

/// A version published in the entry's range is applied without a commit, as Flux upgrades a
/// HelmRelease; while none is, the index is read again but nothing is rendered or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_published_in_range_is_applied_without_a_commit_and_only_then() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.0.0");
    let url = charts.url("stable");
    // Git is not fetched meanwhile: the chart's own recheck wakes the stream.
    let entry = repository_entry(&url, "~1.0");
    let (rig, c1, ns) = repository_rig("repoupgrade", &entry, &url, "1h").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(greeter_version(&rig.env, &ns), "1.0.0");

    let index_fetches = || async {
        let series = "kas_gitops_chart_fetches_total{kind=\"index\",outcome=\"fetched\"}";
        rig.kas.metric(series).await.unwrap_or(0.0)
    };
    let (sent, fetched) = (sendings(&rig), index_fetches().await);
    wait_for(
        "the index read again twice",
        Duration::from_secs(30),
        || async { (index_fetches().await >= fetched + 2.0).then_some(()) },
    )
    .await;
    assert_eq!(sendings(&rig), sent, "nothing new: nothing sent");

    charts.publish(&env, "stable", "1.0.1");
    wait_for("1.0.1 applied", Duration::from_secs(60), || async {
        (greeter_version(&rig.env, &ns) == "1.0.1").then_some(())
    })
    .await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(sendings(&rig), sent + 1);
}

/// A repository kas does not allow is refused naming the key that would allow it; a
/// constraint no version matches is refused naming it and the versions there, until one is
/// published (applied then, without a commit). Nothing is applied meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_charts_not_allowed_or_matching_no_version_are_refused() {
    let charts = ChartRepo::start().await;
    let env = TestEnv::from_env().expect("a running control plane");
    charts.publish(&env, "stable", "1.0.0");
    charts.publish(&env, "other", "1.0.0");
    let (allowed, other) = (charts.url("stable"), charts.url("other"));

    let entry = repository_entry(&other, "1.0.0");
    let (rig, c1, ns) = repository_rig("reponotallowed", &entry, &allowed, "300ms").await;
    rig.refused(
        &c1,
        &[&format!(
            "helm.repository: the chart greeter is fetched from {other}, which kas's gitops.render.chart_repositories does not allow"
        )],
    )
    .await;
    assert!(get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns]).is_none());
    drop(rig);

    let entry = repository_entry(&allowed, ">=5.0.0");
    let (rig, c1, ns) = repository_rig("reponoversion", &entry, &allowed, "1h").await;
    rig.refused(
        &c1,
        &[&format!(
            "helm.chart greeter of helm.repository {allowed}: no version of greeter in the repository matches >=5.0.0 (it has 1.0.0)"
        )],
    )
    .await;
    assert!(get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns]).is_none());
    charts.publish(&env, "stable", "5.0.0");
    let s = rig
        .report("the sync of 5.0.0", |s| {
            s.commit_id == c1 && s.outcome == ReportedOutcome::Succeeded
        })
        .await;
    assert!(s.error.is_empty(), "{s:?}");
    assert_eq!(greeter_version(&rig.env, &ns), "5.0.0");
}

/// How an [`OciRegistry`] is set up; the default: anonymous, blobs served by itself.
#[derive(Default)]
struct RegistrySetup<'a> {
    /// Behind htpasswd with this user (helm logs in as it); with `issuer`, the user helm
    /// logs in as at the issuer.
    user: Option<(&'static str, &'static str)>,
    /// Behind tokens of this issuer.
    issuer: Option<&'a TokenIssuer>,
    /// Keeping blobs in this server's folder, and moving their reads there.
    storage: Option<&'a ChartRepo>,
}

impl<'a> RegistrySetup<'a> {
    /// Behind tokens of `issuer`, helm logging in as `reader:s3cret`.
    fn token_flow(issuer: &'a TokenIssuer) -> Self {
        Self {
            user: Some(("reader", "s3cret")),
            issuer: Some(issuer),
            storage: None,
        }
    }
}

/// The most tags the test registries answer per page (kas asks for more): a tag list of more
/// versions than that takes several pages, linked by `Link` headers.
const TAGS_PER_PAGE: usize = 2;

/// A real OCI registry: the CNCF distribution registry (testenv/build.sh builds it) on
/// 127.0.0.1, storing in a temporary folder, behind htpasswd when it has a user; charts are
/// pushed to it with the real `helm push`.
struct OciRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
    user: Option<(&'static str, &'static str)>,
}

impl OciRegistry {
    /// Starts it as `setup` says and waits until it accepts connections (another port if one
    /// was taken).
    fn start(env: &TestEnv, setup: RegistrySetup) -> Self {
        let RegistrySetup {
            user,
            issuer,
            storage,
        } = setup;
        let dir = tempfile::tempdir().unwrap();
        // With a storage server, blobs are kept in its folder and their reads moved there,
        // as a registry on S3 or behind a CDN moves them.
        let (data, redirect) = match storage {
            Some(s) => (
                s.dir.path().to_path_buf(),
                format!(
                    "middleware:\n  storage:\n  - name: redirect\n    options:\n      baseurl: {}\n",
                    s.url("")
                ),
            ),
            None => (dir.path().join("data"), String::new()),
        };
        let auth = match (user, issuer) {
            (_, Some(issuer)) => issuer.registry_auth(dir.path()),
            (Some((name, password)), None) => {
                // distribution reads bcrypt entries only; perl's crypt() is libxcrypt's, which
                // makes them (no htpasswd program or bcrypt crate is at hand).
                let out = std::process::Command::new("perl")
                    .args([
                        "-e",
                        "print crypt($ARGV[0], '$2b$05$' . 'tetherregistrysaltsalt')",
                    ])
                    .arg(password)
                    .output()
                    .unwrap();
                let hash = String::from_utf8(out.stdout).unwrap();
                assert!(hash.starts_with("$2b$05$"), "perl crypt() made {hash:?}");
                std::fs::write(dir.path().join("htpasswd"), format!("{name}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: tether\n    path: {}\n",
                    dir.path().join("htpasswd").display()
                )
            }
            (None, None) => String::new(),
        };
        for _ in 0..3 {
            // The registry takes a fixed address and reports none it chose.
            let port = tether_test_support::net::unused_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\ntags:\n  maxtags: {TAGS_PER_PAGE}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: tether-test\n{auth}{redirect}",
                    data.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = std::process::Command::new(env.bin_dir.join("registry"))
                .arg("serve")
                .arg(&config)
                .env("OTEL_TRACES_EXPORTER", "none")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("the registry of testenv/build.sh");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let child = Some(child);
                    return Self {
                        dir,
                        port,
                        child,
                        user,
                    };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        panic!("the registry did not start:\n{log}");
    }

    /// The `oci://` location `path` of the registry.
    fn location(&self, path: &str) -> String {
        format!("oci://127.0.0.1:{}/{path}", self.port)
    }

    /// kas's settings allowing the location `path`, read over plain HTTP (loopback).
    fn allowing(&self, path: &str) -> String {
        format!(
            "{}    plain_http_registries:\n    - oci://127.0.0.1:{}\n",
            allowing(&self.location(path)),
            self.port
        )
    }

    /// Packages `greeter` `version` and pushes it under `path` with the real helm (logged in
    /// first when the registry has a user), as `helm push … oci://registry/path` does.
    /// Returns the chart layer's SHA-256 (the archive's).
    fn push(&self, env: &TestEnv, path: &str, version: &str) -> String {
        let home = self.dir.path();
        if let Some((name, password)) = self.user {
            let host = format!("127.0.0.1:{}", self.port);
            let login = [
                "registry",
                "login",
                &host,
                "--plain-http",
                "-u",
                name,
                "-p",
                password,
            ];
            helm(env, home, &login);
        }
        let archive = package_greeter(env, home, version, &home.join("packages"));
        self.push_archive(env, &archive, path);
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            std::fs::read(&archive).unwrap(),
        ))
    }

    /// Pushes greeter `version` under `path` again, its chart changed (its ConfigMap says
    /// `moved: "yes"`): the tag now names another manifest, as a tag moved on a registry.
    fn push_moved(&self, env: &TestEnv, path: &str, version: &str) {
        let home = self.dir.path();
        let out = home.join("moved");
        package_greeter(env, home, version, &out);
        let template = home
            .join("src")
            .join(version)
            .join("greeter/templates/configmap.yaml");
        let mut text = std::fs::read_to_string(&template).unwrap();
        text.push_str("  moved: \"yes\"\n");
        std::fs::write(&template, text).unwrap();
        let src = home.join("src").join(version).join("greeter");
        helm(
            env,
            home,
            &[
                "package",
                src.to_str().unwrap(),
                "-d",
                out.to_str().unwrap(),
            ],
        );
        self.push_archive(env, &out.join(format!("greeter-{version}.tgz")), path);
    }

    /// Pushes the chart `archive` under `path` with the real helm.
    fn push_archive(&self, env: &TestEnv, archive: &Path, path: &str) {
        let to = self.location(path);
        let archive = archive.to_str().unwrap();
        helm(
            env,
            self.dir.path(),
            &["push", archive, &to, "--plain-http"],
        );
    }

    /// How many `method` requests kas (its User-Agent) sent for `what` (`/v2/<what>`), as
    /// the registry's access log shows them.
    fn kas_requests(&self, method: &str, what: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap();
        let request = format!("\"{method} /v2/{what} ");
        log.lines()
            .filter(|l| l.contains(&request) && l.ends_with("\"tether-kas\""))
            .count()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kas's settings `extra` with the credentials `reader:s3cret` for `url` (its password in a
/// file of the folder returned).
fn with_reader_credentials(extra: &str, url: &str) -> (String, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let extra = format!(
        "{extra}    chart_repository_credentials:\n    - url: {url}\n      username: reader\n      password_file: {}\n",
        password.display()
    );
    (extra, secrets)
}

/// `helm.repository: oci://…` (Flux's HelmRepository of type oci): the newest version in range
/// among those pushed to a real registry is applied with the values of Git, and its version
/// shown; a version pushed later in range (on the tag list's second page) is applied without a
/// commit; a kas restarted while the registry is down renders what it resolved before, saying
/// so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_of_an_oci_registry_is_applied_upgraded_in_range_and_kept_across_a_restart() {
    let env = TestEnv::from_env().expect("a running control plane");
    let mut registry = OciRegistry::start(&env, RegistrySetup::default());
    for v in ["1.0.0", "1.1.0", "2.0.0"] {
        registry.push(&env, "charts", v);
    }
    let location = registry.location("charts");
    let entry = repository_entry(&location, ">=1.0.0 <2");
    let values = |_: &str| greeter_values("hello");
    let extra = registry.allowing("charts");
    let (mut rig, c1, ns) = started_rig("ocichart", |_| entry, values, &extra, "300ms").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(
        (s.outcome, s.chart_version.as_str()),
        (ReportedOutcome::Succeeded, "1.1.0"),
        "{s:?}"
    );
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.1.0", "hello", "xl"]);

    // Tags listed in order, two a page: 1.2.0 is on the second page, beside 2.0.0.
    registry.push(&env, "charts", "1.2.0");
    let s = rig
        .report("the sync of 1.2.0", |s| s.chart_version == "1.2.0")
        .await;
    assert_eq!((s.outcome, s.commit_id), (ReportedOutcome::Succeeded, c1));
    assert_eq!(greeter_version(&rig.env, &ns), "1.2.0");

    registry.stop();
    rig.kas.restart().await;
    let c2 = rig.manifests.commit(
        &[("env/greeter.yaml", Some(b"greeting: bonjour\n"))],
        "bonjour",
    );
    let s = rig.synced_in("group/manifests", &c2).await;
    assert_eq!(
        (s.outcome, s.chart_version.as_str()),
        (ReportedOutcome::Succeeded, "1.2.0"),
        "{s:?}"
    );
    let cm = get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["greeting"], "bonjour");
    let said = format!("chart repository {location} unreachable: using index fetched at ");
    assert!(
        s.warnings.iter().any(|w| w.starts_with(&said)),
        "{said:?} not in {:?}",
        s.warnings
    );
}

/// A chart layer its registry serves changed (its storage tampered with) is refused naming
/// the chart, where it was read and both digests, and nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_layer_not_matching_its_manifests_digest_is_refused() {
    let env = TestEnv::from_env().expect("a running control plane");
    let storage = ChartRepo::start().await;
    let setup = RegistrySetup {
        storage: Some(&storage),
        ..RegistrySetup::default()
    };
    let registry = OciRegistry::start(&env, setup);
    let digest = registry.push(&env, "charts", "1.0.0");
    let blob = storage.dir.path().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{digest}/data",
        &digest[..2]
    ));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&blob, bytes).unwrap();

    let location = registry.location("charts");
    let entry = repository_entry(&location, "1.0.0");
    let values = |_: &str| greeter_values("hello");
    let extra = registry.allowing("charts");
    let (rig, c1, ns) = started_rig("ocitampered", |_| entry, values, &extra, "1h").await;
    rig.refused(
        &c1,
        &[
            &format!("the archive of greeter 1.0.0 at {location}/greeter:1.0.0 has SHA-256"),
            &format!(
                "not {digest} as the repository's index (or the registry's manifest) says: refused"
            ),
        ],
    )
    .await;
    assert!(get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns]).is_none());
}

/// An umbrella chart (the chart of [`helm_repo`]) depending twice on `greeter` `>=1.0.0 <2` of
/// the registry location `repository`, under two aliases: `hello` (its values saying `hola`)
/// and `quiet`, which its condition turns off.
fn oci_umbrella(repository: &str) -> Vec<(String, String)> {
    let mut repo = helm_repo();
    let dependency = |alias: &str| {
        format!(
            "- name: greeter\n  version: \">=1.0.0 <2\"\n  repository: {repository}\n  alias: {alias}\n  condition: {alias}.enabled\n"
        )
    };
    repo[0].1 = format!(
        "apiVersion: v2\nname: app\nversion: 0.1.0\ndependencies:\n{}{}",
        dependency("hello"),
        dependency("quiet")
    );
    repo[1].1 = "color: red\nsize: m\nreplicas: 1\nhello:\n  enabled: true\n  greeting: hola\nquiet:\n  enabled: false\n".into();
    repo
}

/// A chart in Git depending on a chart of an OCI registry (`oci://`, as Bitnami's charts
/// depend on `oci://registry-1.docker.io/bitnamicharts`): kas resolves the range in the
/// registry's tag list and fetches the chart layer once for both aliases, and the agent
/// applies the dependency's objects with the alias's values (the alias its condition turns off
/// renders nothing). A dependency from a location kas does not allow is refused naming the
/// key, the last good commit staying applied. Once the registry is down, a commit renders with
/// the resolution and archive kas keeps, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charts_oci_dependency_is_fetched_from_an_allowed_registry_and_kept() {
    let env = TestEnv::from_env().expect("a running control plane");
    let mut registry = OciRegistry::start(&env, RegistrySetup::default());
    for v in ["1.0.0", "1.1.0", "2.0.0"] {
        registry.push(&env, "deps", v);
    }
    let location = registry.location("deps");
    let repo = oci_umbrella(&location);
    let chart_yaml = repo[0].clone();
    let extra = registry.allowing("deps");
    let (rig, _, ns) = rendering_rig("ocidep", |_| HELM_ENTRY.into(), |_| repo, &extra).await;
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.1.0", "hola", "none"]);
    let cm = get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["color"], "blue");
    let before = versions(&rig.env, &ns);

    let elsewhere = registry.location("elsewhere");
    let other = oci_umbrella(&elsewhere).swap_remove(0);
    let c2 = rig
        .manifests
        .commit(&[(&other.0, Some(other.1.as_bytes()))], "not allowed");
    rig.refused(
        &c2,
        &[&format!(
            "chart charts/app depends on greeter from {elsewhere}, which kas's gitops.render.chart_repositories does not allow"
        )],
    )
    .await;
    assert_eq!(versions(&rig.env, &ns), before);

    registry.stop();
    let c3 = rig.manifests.commit(
        &[
            (&chart_yaml.0, Some(chart_yaml.1.as_bytes())),
            ("env/values-a.yaml", Some(b"color: green\nsize: s\n")),
        ],
        "green, registry down",
    );
    let s = rig.synced_in("group/manifests", &c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let cm = get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["color"], "green");
    assert_eq!(greeter_version(&rig.env, &ns), "1.1.0");
    let said = format!("chart repository {location} unreachable: using index fetched at ");
    assert!(
        s.warnings.iter().any(|w| w.starts_with(&said)),
        "{said:?} not in {:?}",
        s.warnings
    );
    let series = "kas_gitops_chart_fetches_total{kind=\"archive\",outcome=\"fetched\"}";
    assert_eq!(rig.kas.metric(series).await.unwrap_or(0.0), 1.0);
}

/// A chart's `oci://` dependency on a registry behind htpasswd is read as `helm.repository`
/// charts are: without credentials kas fails closed naming the registry location and applies
/// nothing; with `chart_repository_credentials` for the location, the dependency is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charts_oci_dependency_on_a_private_registry_needs_kas_credentials() {
    let env = TestEnv::from_env().expect("a running control plane");
    let setup = RegistrySetup {
        user: Some(("reader", "s3cret")),
        ..RegistrySetup::default()
    };
    let registry = OciRegistry::start(&env, setup);
    registry.push(&env, "private", "1.1.0");
    let location = registry.location("private");
    let repo = |_: &str| oci_umbrella(&location);
    let extra = registry.allowing("private");
    let (rig, c1, ns) = started_rig("ocidepanon", |_| HELM_ENTRY.into(), repo, &extra, "1h").await;
    rig.refused(
        &c1,
        &[&format!(
            "chart repository {location} refused kas: answered 401 Unauthorized: it needs credentials, and gitops.render.chart_repository_credentials has none for it"
        )],
    )
    .await;
    assert!(get_json(&rig.env, &["get", "configmap", "shop-config", "-n", &ns]).is_none());
    drop(rig);

    let (extra, _secrets) = with_reader_credentials(&extra, &location);
    let (rig, _, ns) = rendering_rig("ocidepcreds", |_| HELM_ENTRY.into(), repo, &extra).await;
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.1.0", "hola", "none"]);
}

/// Pushes greeter 1.1.0 to the location `private` of `registry`, which refuses anonymous
/// reads: a rig of an entry for it (`~1.1`) without credentials is refused with the error
/// `refusal(location)`, nothing applied; then `between` runs, and a new rig with the
/// credentials `reader:s3cret` for the location syncs 1.1.0, which is returned.
async fn refused_without_credentials_then_rendered(
    env: &TestEnv,
    registry: &OciRegistry,
    refusal: impl FnOnce(&str) -> String,
    between: impl FnOnce(),
) -> Rig {
    registry.push(env, "private", "1.1.0");
    let location = registry.location("private");
    let entry = repository_entry(&location, "~1.1");
    let values = |_: &str| greeter_values("hello");

    let extra = registry.allowing("private");
    let (rig, c1, ns) = started_rig("ocianon", |_| entry.clone(), values, &extra, "1h").await;
    rig.refused(&c1, &[&refusal(&location)]).await;
    assert!(get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns]).is_none());
    drop(rig);
    between();

    let (extra, _secrets) = with_reader_credentials(&extra, &location);
    let (rig, c1, ns) = started_rig("ocicreds", |_| entry, values, &extra, "1h").await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(
        (s.outcome, s.chart_version.as_str()),
        (ReportedOutcome::Succeeded, "1.1.0"),
        "{s:?}"
    );
    assert_eq!(greeter_version(&rig.env, &ns), "1.1.0");
    rig
}

/// A registry behind htpasswd: without credentials kas fails closed naming the repository and
/// applies nothing; with `chart_repository_credentials` for its `oci://` location the chart is
/// applied, the secret never logged, and the chart's blob is read where the registry moves it
/// (its storage, another host) without the registry's credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_oci_registry_needs_kas_credentials_and_its_storage_gets_none() {
    let env = TestEnv::from_env().expect("a running control plane");
    let storage = ChartRepo::start().await;
    let setup = RegistrySetup {
        user: Some(("reader", "s3cret")),
        issuer: None,
        storage: Some(&storage),
    };
    let registry = OciRegistry::start(&env, setup);
    let refusal = |location: &str| {
        format!(
            "chart repository {location} refused kas: answered 401 Unauthorized: it needs credentials, and gitops.render.chart_repository_credentials has none for it"
        )
    };
    let rig = refused_without_credentials_then_rendered(&env, &registry, refusal, || {}).await;
    let asked = storage.asked_by_kas.lock().unwrap().clone();
    assert!(!asked.is_empty(), "kas read the blob from the storage");
    assert!(
        !asked.contains(&true),
        "kas sent the storage an Authorization"
    );
    let log = rig.kas.log();
    for secret in ["s3cret", "cmVhZGVyOnMzY3JldA"] {
        assert!(!log.contains(secret), "kas logged {secret:?}");
    }
}

/// A registry's token issuer on 127.0.0.1, the realm of distribution's `auth: token`: it
/// issues ES256 tokens granting what a request's `scope` asks to `reader:s3cret` (HTTP basic)
/// and answers 401 to anyone else, counting the tokens issued to kas.
struct TokenIssuer {
    url: String,
    key: std::sync::Arc<SigningKey>,
    issued_to_kas: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Set: it answers 429 Too Many Requests (Retry-After: 120), as a rate-limited realm.
    throttling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct IssuerState {
    key: std::sync::Arc<SigningKey>,
    issued_to_kas: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    throttling: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const TOKEN_ISSUER: &str = "tether-test-issuer";
const TOKEN_SERVICE: &str = "tether-test-registry";

impl TokenIssuer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let state = IssuerState {
            key: std::sync::Arc::new(SigningKey::new("registry-key")),
            issued_to_kas: std::sync::Arc::default(),
            throttling: std::sync::Arc::default(),
        };
        let app = axum::Router::new()
            .route("/token", axum::routing::get(issue_token))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            key: state.key,
            issued_to_kas: state.issued_to_kas,
            throttling: state.throttling,
            _server: server,
        }
    }

    /// How many tokens it issued to kas.
    fn issued(&self) -> usize {
        self.issued_to_kas.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The registry's `auth:` section trusting this issuer (its key in a JWKS file in `dir`).
    fn registry_auth(&self, dir: &Path) -> String {
        let jwks = dir.join("jwks.json");
        let keys = serde_json::json!({"keys": [&self.key.jwk]});
        std::fs::write(&jwks, keys.to_string()).unwrap();
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    jwks: {}\n",
            self.url,
            jwks.display()
        )
    }
}

/// `GET /token?service=…&scope=repository:<name>:<actions>`: a token for `reader` granting
/// each scope asked, or 401.
async fn issue_token(
    axum::extract::State(s): axum::extract::State<IssuerState>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if s.throttling.load(std::sync::atomic::Ordering::SeqCst) {
        let retry = [(http::header::RETRY_AFTER, "120")];
        return (http::StatusCode::TOO_MANY_REQUESTS, retry, "{}").into_response();
    }
    // base64("reader:s3cret")
    let basic = "Basic cmVhZGVyOnMzY3JldA==";
    let authorized = headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|a| a.as_bytes() == basic.as_bytes());
    if !authorized {
        return (http::StatusCode::UNAUTHORIZED, "{}").into_response();
    }
    let access: Vec<Value> = query
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let actions: Vec<&str> = actions.split(',').collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
        })
        .collect();
    let now = support::oidc::now();
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": "reader", "aud": TOKEN_SERVICE,
        "iat": now, "nbf": now - 5, "exp": now + 300, "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let from_kas = headers
        .get(http::header::USER_AGENT)
        .is_some_and(|u| u.as_bytes() == b"tether-kas");
    if from_kas {
        s.issued_to_kas
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    axum::Json(serde_json::json!({"token": s.key.sign(&claims)})).into_response()
}

/// A registry of the token flow (Docker Hub's, GHCR's): it challenges with `Bearer realm=…`;
/// kas asks the realm with no credentials, is refused, and fails closed naming the repository;
/// with `chart_repository_credentials` for the `oci://` location it gets a token there with
/// them and renders the chart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oci_registry_of_the_token_flow_is_read_with_a_token_its_realm_issues_to_kas() {
    let env = TestEnv::from_env().expect("a running control plane");
    let issuer = TokenIssuer::start().await;
    let registry = OciRegistry::start(&env, RegistrySetup::token_flow(&issuer));
    let issued = || issuer.issued();
    let refusal = |location: &str| {
        format!(
            "chart repository {location} refused kas: its token issuer {}: answered 401 Unauthorized: it needs credentials",
            issuer.url
        )
    };
    let none = || assert_eq!(issued(), 0, "no token without credentials");
    refused_without_credentials_then_rendered(&env, &registry, refusal, none).await;
    assert!(
        issued() >= 1,
        "kas read the registry with a token of its realm"
    );
}

/// While a remote base's repository cannot be reached, a new commit of the manifest project is
/// still applied, the base rendered at the commit kas fetched before, with a warning naming the
/// repository, the ref and that commit; the warning goes at the next rendering once the
/// repository answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_base_whose_repository_is_down_is_rendered_at_the_commit_held_with_a_warning() {
    let work = tempfile::tempdir().unwrap();
    let upstream = upstream_repo(work.path(), "upstream", "nginx:1.27");
    upstream.git(&["tag", "v1.0.0"]);
    let tagged = upstream.head();
    let served = work.path().join("git");
    let daemon = GitDaemon::start(&served);
    let (port, url) = (daemon.port, daemon.url("upstream"));
    // Every rendering fetches: the one after the repository is back must not reuse the failure.
    let render = format!("    remote_bases:\n    - {url}\n    remote_base_fetch_interval: 0s\n");
    let base = format!("{url}//base?ref=v1.0.0");
    let entry = |_: &str| "    kustomize:\n      path: overlays/prod\n".to_owned();
    let overlay = |ns: &str| remote_overlay(&format!("{ns}-prod"), &base);
    let (rig, c1, ns) = rendering_rig("rbasedown", entry, overlay, &render).await;
    let ns = format!("{ns}-prod");
    let s = rig.synced_in("group/manifests", &c1).await;
    assert!(s.warnings.is_empty(), "{s:?}");

    drop(daemon);
    let replicas = |n: u32, why: &str| {
        let patch = replicas_patch(n);
        rig.manifests.commit(
            &[("overlays/prod/replicas.yaml", Some(patch.as_bytes()))],
            why,
        )
    };
    let c2 = replicas(4, "4 replicas while the base's repository is down");
    let s = rig.synced_in("group/manifests", &c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let said = format!("remote base repository {url} unreachable since ");
    let warning = s.warnings.iter().find(|w| w.starts_with(&said));
    let warning = warning.unwrap_or_else(|| panic!("{said:?} not in {:?}", s.warnings));
    let used = format!("v1.0.0 rendered at commit {tagged} fetched earlier");
    assert!(warning.contains(&used), "{used:?} not in {warning:?}");
    assert!(rig.kas.log().contains(&said), "kas logs {said:?}");
    let d = get_json(&rig.env, &["get", "deployment", "web", "-n", &ns]).unwrap();
    assert_eq!(d["spec"]["replicas"], 4, "the new commit is applied");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.27",
        "the base at the commit held"
    );

    let _back = GitDaemon::start_on(&served, port);
    let c3 = replicas(5, "5 replicas once the base's repository is back");
    let s = rig.synced_in("group/manifests", &c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert!(s.warnings.is_empty(), "{s:?}");
    let fetches = |outcome: &str| {
        let series = format!("kas_gitops_remote_base_fetches_total{{outcome=\"{outcome}\"}}");
        let kas = &rig.kas;
        async move { kas.metric(&series).await.unwrap_or(0.0) }
    };
    assert!(fetches("stale").await >= 1.0);
    assert!(fetches("fetched").await >= 2.0);
}

/// A repository of a base served by `git daemon` (under `git/<name>` of `dir`): a Deployment
/// of `image` and, from a folder beside the base, a ConfigMap.
fn upstream_repo(dir: &Path, name: &str, image: &str) -> GitRepo {
    let repo = GitRepo::init(&dir.join("git").join(name));
    let base = "resources:\n- deployment.yaml\n- ../common/team.yaml\n";
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: nginx\n        image: {image}\n"
    );
    let team =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: team\ndata:\n  owner: upstream\n";
    repo.commit(
        &[
            ("base/kustomization.yaml", Some(base.as_bytes())),
            ("base/deployment.yaml", Some(deployment.as_bytes())),
            ("common/team.yaml", Some(team.as_bytes())),
        ],
        "a base",
    );
    repo
}

/// An overlay in `ns` on the remote base `base`, with 3 replicas.
fn remote_overlay(ns: &str, base: &str) -> Vec<(String, String)> {
    owned(&[
        (
            "overlays/prod/kustomization.yaml",
            format!(
                "namespace: {ns}\nresources:\n- namespace.yaml\n- {base}\npatches:\n- path: replicas.yaml\n"
            ),
        ),
        (
            "overlays/prod/namespace.yaml",
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
        ),
        ("overlays/prod/replicas.yaml", replicas_patch(3)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_base_of_an_allowed_repository_is_fetched_at_its_tag_and_others_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let upstream = upstream_repo(work.path(), "upstream", "nginx:1.27");
    upstream.git(&["tag", "v1.0.0"]);
    // The branch moves on after the tag: what is applied shows which was fetched.
    let moved = "resources:\n- ../common/team.yaml\n";
    upstream.commit(
        &[("base/kustomization.yaml", Some(moved.as_bytes()))],
        "main moves on",
    );
    upstream_repo(work.path(), "other", "nginx:1.26");
    let daemon = GitDaemon::start(&work.path().join("git"));
    let allowed = format!("    remote_bases:\n    - {}\n", daemon.url("upstream"));
    let base = format!("{}//base?ref=v1.0.0", daemon.url("upstream"));
    let entry = |_: &str| "    kustomize:\n      path: overlays/prod\n".to_owned();
    let overlay = |ns: &str| remote_overlay(&format!("{ns}-prod"), &base);
    let (rig, _, ns) = rendering_rig("rbase", entry, overlay, &allowed).await;
    let ns = format!("{ns}-prod");

    let d = get_json(&rig.env, &["get", "deployment", "web", "-n", &ns]).unwrap();
    assert_eq!(d["spec"]["replicas"], 3, "the overlay's patch");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.27",
        "the base at its tag"
    );
    let team = get_json(&rig.env, &["get", "configmap", "team", "-n", &ns]).unwrap();
    assert_eq!(
        team["data"]["owner"], "upstream",
        "a folder beside the base"
    );
    let before = versions(&rig.env, &ns);

    let other = format!("{}//base?ref=main", daemon.url("other"));
    let text = format!("namespace: {ns}\nresources:\n- namespace.yaml\n- {other}\n");
    let c2 = rig.manifests.commit(
        &[("overlays/prod/kustomization.yaml", Some(text.as_bytes()))],
        "a base of a repository not allowed",
    );
    rig.refused(
        &c2,
        &[
            &format!("overlays/prod/kustomization.yaml refers to the remote {other}"),
            "gitops.render.remote_bases",
            &format!("does not allow {}", daemon.url("other")),
        ],
    )
    .await;
    assert_eq!(
        versions(&rig.env, &ns),
        before,
        "the last good commit stays"
    );
}

/// A registry behind `issuer`'s tokens with greeter 1.0.0 pushed under `path`, and a rig of a
/// `helm.repository` entry for it (kas with the credentials `reader:s3cret` for it, its
/// password in the folder returned, Git fetched every `git_poll`), synced: greeter 1.0.0
/// applied, saying `hello`.
async fn token_flow_chart_rig(
    env: &TestEnv,
    issuer: &TokenIssuer,
    path: &str,
    git_poll: &'static str,
) -> (OciRegistry, Rig, String, tempfile::TempDir) {
    let registry = OciRegistry::start(env, RegistrySetup::token_flow(issuer));
    registry.push(env, path, "1.0.0");
    let location = registry.location(path);
    let entry = repository_entry(&location, "1.0.0");
    let values = |_: &str| greeter_values("hello");
    let (extra, secrets) = with_reader_credentials(&registry.allowing(path), &location);
    let prefix = format!("oci{path}");
    let (rig, c1, ns) = started_rig(&prefix, |_| entry, values, &extra, git_poll).await;
    let s = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.0.0", "hello", "xl"]);
    (registry, rig, ns, secrets)
}

/// Polite to registries counting pulls and token requests (Docker Hub counts each manifest
/// `GET` as a pull and throttles past its limit): a `helm.repository` chart of a token-flow
/// registry re-resolved every second (`chart_index_ttl: 0s`) has its manifest read once, then
/// only asks with `HEAD` whether its tag still names it, and reuses its token instead of
/// asking the realm again; the chart stays applied. Pushed again under the same tag (a moved
/// tag: another manifest), it is read and its new objects applied without a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_resolved_registry_chart_reads_its_manifest_only_when_its_tag_moved() {
    let env = TestEnv::from_env().expect("a running control plane");
    let issuer = TokenIssuer::start().await;
    let (registry, rig, ns, _secrets) = token_flow_chart_rig(&env, &issuer, "polite", "1h").await;

    let manifest = "polite/greeter/manifests/1.0.0";
    let heads = wait_for(
        "five re-resolutions asking with HEAD",
        Duration::from_secs(60),
        || async {
            let heads = registry.kas_requests("HEAD", manifest);
            (heads >= 5).then_some(heads)
        },
    )
    .await;
    assert_eq!(
        registry.kas_requests("GET", manifest),
        1,
        "the manifest read once, then {heads} HEADs"
    );
    let resolutions = rig
        .kas
        .metric("kas_gitops_chart_fetches_total{kind=\"index\",outcome=\"fetched\"}")
        .await
        .unwrap_or(0.0);
    let issued = issuer.issued();
    // A token lives 60 s (its issuer says no expires_in): at most one more within the test.
    assert!(
        resolutions >= 5.0 && issued <= 2,
        "{issued} tokens asked for {resolutions} resolutions"
    );
    let reused = rig
        .kas
        .metric("kas_gitops_chart_fetches_total{kind=\"token\",outcome=\"cached\"}")
        .await
        .unwrap_or(0.0);
    assert!(reused >= 5.0, "tokens reused {reused} times");
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.0.0", "hello", "xl"]);

    registry.push_moved(&env, "polite", "1.0.0");
    wait_for(
        "the moved tag's chart applied",
        Duration::from_secs(60),
        || async {
            let cm = get_json(&rig.env, &["get", "configmap", "shop-greeter", "-n", &ns])?;
            (cm["data"]["moved"] == "yes").then_some(())
        },
    )
    .await;
    assert_eq!(
        registry.kas_requests("GET", manifest),
        2,
        "read again once moved"
    );
}

/// A registry's realm throttling kas (429 Too Many Requests, as Docker Hub's past its pull
/// limit) while kas restarted: the rendering uses the resolution kept on disk, warning that
/// the realm throttled kas and when to retry; the chart stays applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_throttling_kas_is_named_and_the_resolution_kept_is_used() {
    let env = TestEnv::from_env().expect("a running control plane");
    let issuer = TokenIssuer::start().await;
    let (_registry, mut rig, ns, _secrets) =
        token_flow_chart_rig(&env, &issuer, "throttled", "300ms").await;

    issuer
        .throttling
        .store(true, std::sync::atomic::Ordering::SeqCst);
    rig.kas.restart().await;
    let c2 = rig.manifests.commit(
        &[("env/greeter.yaml", Some(b"greeting: bonjour\n"))],
        "bonjour",
    );
    let s = rig.synced_in("group/manifests", &c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert_eq!(greeter_shows(&rig.env, &ns), ["1.0.0", "bonjour", "xl"]);
    let said = format!(
        "answered 429 Too Many Requests, Retry-After: 120: its token issuer {} throttled kas",
        issuer.url
    );
    assert!(
        s.warnings.iter().any(|w| w.contains(&said)),
        "{said:?} not in {:?}",
        s.warnings
    );
    let series = "kas_gitops_chart_fetches_total{kind=\"registry\",outcome=\"throttled\"}";
    assert!(rig.kas.metric(series).await.unwrap_or(0.0) >= 1.0);
}
