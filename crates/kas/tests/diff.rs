//! `kas agent diff`: the real CLI against a real kas, a real agentk synced to the real control
//! plane, and real Git branches. The preview goes through the agent's tunnel with server-side
//! dry run, so the cluster must be exactly as it was afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::gitops::{Rig, RigArgs, configmap, deployment, get_json, rig_opts};
use support::oidc::{AUDIENCE, ISSUER, SigningKey, claims};
use support::{GitRepo, Kas, KasOptions, Pki};
use tether_gitops_server::ReportedOutcome;
use tether_kas_api::{
    AdminClient, ClientError, DiffChange, DiffRequest, DiffView, UserTokenRequest,
};
use tether_testenv::{TestEnv, seed_agent_rbac};

const AGENT: &str = "group/config:seed";

/// `kas agent diff ARGS…`: exit code, stdout, stderr.
fn kas_diff(kas: &Kas, args: &[&str]) -> (Option<i32>, String, String) {
    let o = kas
        .cli()
        .args(["agent", "diff"])
        .args(args)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (o.status.code(), text(o.stdout), text(o.stderr))
}

/// An agent that may write only in its namespace `ns` (plus ConfigMaps anywhere, as in the
/// seed), synced to main: Deployment `web` (1 replica), ConfigMaps `keep` and `old`.
async fn synced_rig(prefix: &str) -> (Rig, String) {
    synced_rig_with(prefix, |_| Vec::new()).await
}

/// [`synced_rig`] with more files on main, given the namespace.
async fn synced_rig_with(
    prefix: &str,
    more: impl FnOnce(&str) -> Vec<(&'static str, Vec<u8>)>,
) -> (Rig, String) {
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    synced_rig_full(prefix, more, |_| String::new(), opts).await
}

/// [`synced_rig_with`] with `config_extra` (given the namespace) appended to the agent's
/// `config.yaml` and kas started with `opts`.
async fn synced_rig_full(
    prefix: &str,
    more: impl FnOnce(&str) -> Vec<(&'static str, Vec<u8>)>,
    config_extra: impl FnOnce(&str) -> String,
    opts: KasOptions,
) -> (Rig, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(prefix).unwrap();
    let rbac = seed_agent_rbac(&ns, "gitlab-agent", &ns);
    let mut files = vec![
        ("manifests/web.yaml", deployment("web", &ns, 1)),
        ("manifests/keep.yaml", configmap("keep", &ns, "same")),
        ("manifests/old.yaml", configmap("old", &ns, "going")),
    ];
    files.extend(more(&ns));
    let config_extra = config_extra(&ns);
    let initial: Vec<(&str, Option<&[u8]>)> = files
        .iter()
        .map(|(p, c)| (*p, Some(c.as_slice())))
        .collect();
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &rbac,
        project_extra: &config_extra,
        initial: &initial,
        agent_args: &[],
    };
    let (rig, c1) = rig_opts(args, opts).await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    (rig, ns)
}

/// Commits `files` on a new branch `name` of the manifests, in a worktree of its own, so the
/// repository's HEAD (the branch the agent follows) never moves.
fn branch(rig: &Rig, name: &str, files: &[(&str, Option<&[u8]>)]) -> String {
    let dir = rig.manifests.dir.with_file_name(format!("wt-{name}"));
    rig.manifests
        .git(&["worktree", "add", "-q", "-b", name, dir.to_str().unwrap()]);
    GitRepo { dir }.commit(files, &format!("{name}: preview me"))
}

/// The objects of the only project of a JSON preview, by name, with their change.
fn changes(view: &DiffView) -> Vec<(String, DiffChange)> {
    assert_eq!(view.projects.len(), 1, "{view:?}");
    view.projects[0]
        .objects
        .iter()
        .map(|o| (o.name.clone(), o.change))
        .collect()
}

/// What a preview must leave as it was: the objects and the inventory.
fn cluster_state(rig: &Rig, ns: &str) -> Value {
    let get = |args: &[&str]| get_json(&rig.env, args);
    let inventory = get(&[
        "get",
        "configmaps",
        "-n",
        ns,
        "-l",
        "cli-utils.sigs.k8s.io/inventory-id",
    ])
    .map(|l| l["items"][0]["data"].clone());
    serde_json::json!({
        "replicas": get(&["get", "deployment", "web", "-n", ns]).map(|d| d["spec"]["replicas"].clone()),
        "new": get(&["get", "configmap", "new", "-n", ns]).is_some(),
        "old": get(&["get", "configmap", "old", "-n", ns]).is_some(),
        "inventory": inventory,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_diff_shows_one_changed_one_created_one_pruned_and_changes_nothing() {
    let (rig, ns) = synced_rig("diff").await;
    let before = cluster_state(&rig, &ns);
    assert_eq!(before["replicas"], 1, "{before}");
    branch(
        &rig,
        "feature",
        &[
            ("manifests/web.yaml", Some(&deployment("web", &ns, 3))),
            ("manifests/new.yaml", Some(&configmap("new", &ns, "fresh"))),
            ("manifests/old.yaml", None),
        ],
    );
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "feature"]);
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    for line in [
        format!("► Deployment/{ns}/web drifted"),
        format!("► ConfigMap/{ns}/new created"),
        format!("► ConfigMap/{ns}/old deleted"),
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in:\n{out}");
    }
    let diff_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(['-', '+']) && !l.starts_with("---") && !l.starts_with("+++"))
        .collect();
    assert_eq!(diff_lines, ["-  replicas: 1", "+  replicas: 3"], "{out}");
    assert!(
        !out.contains("keep"),
        "an unchanged object is not listed:\n{out}"
    );

    let (code, json, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "feature", "-o", "json"]);
    assert_eq!(code, Some(1), "{err}");
    let view: DiffView = serde_json::from_str(&json).unwrap();
    let mut got = changes(&view);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want = [
        ("keep".to_owned(), DiffChange::Unchanged),
        ("new".to_owned(), DiffChange::Created),
        ("old".to_owned(), DiffChange::Pruned),
        ("web".to_owned(), DiffChange::Changed),
    ];
    assert_eq!(got, want, "{json}");
    assert_eq!(
        cluster_state(&rig, &ns),
        before,
        "a preview changes nothing"
    );
}

/// An object already as the files say is not dry-run, as a sync does not send it: with an
/// admission policy refusing every update of the namespace's ConfigMaps (as CRD upgrade checks
/// refuse some no-op updates), the preview of the synced ref says "no changes" — it showed
/// `✗ … denied request` and exited 2 for a sync that succeeds writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_already_as_git_says_is_not_dry_run() {
    let (rig, ns) = synced_rig("diffvap").await;
    let policy = format!("tether-test-no-updates-{ns}");
    rig.env
        .apply_yaml(&format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {policy}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["UPDATE"]
      resources: ["configmaps"]
  validations:
  - expression: "false"
    message: "updates refused by {policy}"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {policy}
spec:
  policyName: {policy}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {ns}
"#
        ))
        .unwrap();
    // The policy is in force once an update of a ConfigMap of no project is refused.
    let probe = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n  namespace: NS\ndata:\n  v: \"VALUE\"\n";
    rig.env
        .apply_yaml(&probe.replace("NS", &ns).replace("VALUE", "0"))
        .unwrap();
    support::wait_for(
        "the admission policy to refuse updates",
        std::time::Duration::from_secs(30),
        || {
            let refused = rig
                .env
                .apply_yaml(
                    &probe
                        .replace("NS", &ns)
                        .replace("VALUE", &format!("{:?}", std::time::Instant::now())),
                )
                .is_err();
            async move { refused.then_some(()) }
        },
    )
    .await;
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "main"]);
    let _ = rig
        .env
        .kubectl()
        .args([
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            &policy,
        ])
        .output();
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.ends_with("✔ no changes\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synced_ref_has_no_changes_and_a_bad_ref_agent_or_manifest_is_an_error() {
    let (rig, ns) = synced_rig("diffsame").await;
    let before = cluster_state(&rig, &ns);
    for git_ref in ["main".to_owned(), rig.manifests.head()] {
        let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", &git_ref]);
        assert_eq!(code, Some(0), "{git_ref}: {out}{err}");
        assert!(out.ends_with("✔ no changes\n"), "{out}");
    }
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "no-such-branch"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains("group/manifests has no branch, tag or commit no-such-branch"),
        "{out}"
    );
    let (code, out, err) = kas_diff(&rig.kas, &["group/config:nope", "--ref", "main"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("no agent group/config:nope"), "{err}");
    // A manifest that does not decode: the preview names the file and shows no object (a
    // sync would apply and prune nothing).
    branch(
        &rig,
        "broken",
        &[(
            "manifests/keep.yaml",
            Some(b"apiVersion: v1\nkind: [ConfigMap\n"),
        )],
    );
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "broken"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains("✗ ") && out.contains("manifests/keep.yaml"),
        "{out}"
    );
    assert!(!out.contains("►"), "{out}");
    assert_eq!(cluster_state(&rig, &ns), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_in_a_namespace_the_agent_may_not_write_is_an_error_of_that_object() {
    let (rig, _) = synced_rig("diffrbac").await;
    let elsewhere = rig.env.create_namespace("diffforbidden").unwrap();
    branch(
        &rig,
        "elsewhere",
        &[(
            "manifests/elsewhere.yaml",
            Some(&deployment("intruder", &elsewhere, 1)),
        )],
    );
    let (code, json, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "elsewhere", "-o", "json"]);
    assert_eq!(code, Some(2), "{json}{err}");
    let view: DiffView = serde_json::from_str(&json).unwrap();
    let intruder = view.projects[0]
        .objects
        .iter()
        .find(|o| o.name == "intruder")
        .unwrap();
    assert_eq!(intruder.change, DiffChange::Failed, "{intruder:?}");
    assert_eq!(intruder.namespace, elsewhere);
    let error = intruder.error.as_deref().unwrap_or_default();
    assert!(error.contains("forbidden"), "{error}");
    // The rest of the preview is still there.
    assert!(changes(&view).contains(&("keep".to_owned(), DiffChange::Unchanged)));
    let (_, out, _) = kas_diff(&rig.kas, &[AGENT, "--ref", "elsewhere"]);
    assert!(
        out.contains(&format!("✗ Deployment/{elsewhere}/intruder: ")),
        "{out}"
    );
    assert!(
        get_json(
            &rig.env,
            &["get", "deployment", "intruder", "-n", &elsewhere]
        )
        .is_none()
    );
}

fn secret(ns: &str, password: &str) -> Vec<u8> {
    format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: {ns}\nstringData:\n  password: {password}\n  user: deployer\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_shows_which_keys_change_never_their_values() {
    let (old, new) = ("old-pass-7f3a", "new-pass-91c2");
    let (rig, ns) = synced_rig_with("diffsecret", |ns| {
        vec![("manifests/secret.yaml", secret(ns, old))]
    })
    .await;
    branch(
        &rig,
        "rotate",
        &[("manifests/secret.yaml", Some(&secret(&ns, new)))],
    );
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "rotate"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(&format!("► Secret/{ns}/creds drifted")),
        "{out}"
    );
    let diff_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(['-', '+']) && !l.starts_with("---") && !l.starts_with("+++"))
        .collect();
    assert_eq!(
        diff_lines,
        [
            "-  password: \"*** (before)\"",
            "+  password: \"*** (after)\""
        ],
        "{out}"
    );
    let (_, json, _) = kas_diff(&rig.kas, &[AGENT, "--ref", "rotate", "-o", "json"]);
    for secret in [old, new, "deployer"] {
        let b64 = base64_of(secret);
        for text in [&out, &json] {
            assert!(
                !text.contains(secret) && !text.contains(&b64),
                "{secret} in:\n{text}"
            );
        }
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_jobs_and_people_preview_through_the_proxy_without_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::new("ci-key");
    let pki = Pki::generate(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::json!({"keys": [&key.jwk]}).to_string()).unwrap();
    let opts = KasOptions {
        git_poll: "300ms",
        kubernetes_api_extra: format!(
            "  ci_issuers:\n  - issuer: {ISSUER}\n    audience: {AUDIENCE}\n    jwks:\n      file: {}\n  ca_file: {}\n",
            jwks.display(),
            pki.ca.display()
        ),
        k8s_tls: Some((pki.cert.clone(), pki.key.clone())),
        ..KasOptions::default()
    };
    // Jobs of group/app may use the agent (as the agent, ci_access's default); so may its
    // developers with a personal access token.
    let access = "ci_access:\n  projects:\n  - id: group/app\n\
                  user_access:\n  access_as:\n    agent: {}\n  projects:\n  - id: group/app\n";
    let (mut rig, ns) =
        synced_rig_full("diffci", |_| Vec::new(), |_| access.to_owned(), opts).await;
    branch(
        &rig,
        "scale",
        &[("manifests/web.yaml", Some(&deployment("web", &ns, 2)))],
    );
    // As in a pipeline: no kas configuration, no admin token; only the job's ID token.
    let job = |project: &str, agent: &str| {
        let token = dir
            .path()
            .join(format!("{}.jwt", project.replace('/', "-")));
        std::fs::write(&token, key.sign(&claims(project))).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_kas"))
            .current_dir(dir.path())
            .args(["agent", "diff", agent, "--ref", "scale"])
            .arg(format!("--server=https://localhost:{}", rig.kas.k8s_port))
            .arg(format!("--id-token-file={}", token.display()))
            .arg(format!("--ca-cert-file={}", pki.ca.display()))
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (o.status.code(), text(o.stdout), text(o.stderr))
    };
    let (code, out, err) = job("group/app", AGENT);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(&format!("► Deployment/{ns}/web drifted")),
        "{out}"
    );
    assert!(out.contains("+  replicas: 2"), "{out}");
    // A job of a project ci_access does not list: by name (not in its kubeconfig) or by id
    // (refused by the proxy), an error, never "no changes".
    let (code, out, err) = job("group/other", AGENT);
    assert_eq!(code, Some(2), "{out}{err}");
    let (code, out, err) = job("group/other", &rig.agent_id.to_string());
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("403"), "{err}");
    // A person's personal access token works the same way, until it is revoked.
    let user = UserTokenRequest {
        username: "alice".into(),
        memberships: vec!["project:group/app:42:developer".parse().unwrap()],
        expires_in_seconds: Some(3600),
    };
    let t = rig
        .kas
        .admin
        .create_user_token(rig.agent_id, &user)
        .await
        .unwrap();
    let proxy = AdminClient::new(
        &format!("https://localhost:{}", rig.kas.k8s_port),
        &format!("pat:{}:{}", t.agent_id, t.token),
    )
    .trusting(Some(&pki.ca))
    .unwrap();
    let req = DiffRequest {
        git_ref: "scale".into(),
        project: None,
    };
    let view = proxy.proxy_diff(&req).await.unwrap();
    assert!(view.has_changes() && !view.has_errors(), "{view:?}");
    rig.kas.admin.revoke_user_token(t.token_id).await.unwrap();
    match proxy.proxy_diff(&req).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status.as_u16(), 401),
        other => panic!("a revoked token must be refused: {other:?}"),
    }
    assert_eq!(
        get_json(&rig.env, &["get", "deployment", "web", "-n", &ns]).unwrap()["spec"]["replicas"],
        1
    );

    // The agent gone: the job is told so within seconds (exit 4, as `kas agent ping`), not
    // after each project's wait for a tunnel with a plain failure (exit 2).
    rig.agent.stop();
    let (code, out, err) = job("group/app", AGENT);
    assert_eq!(code, Some(4), "{out}{err}");
    assert!(
        err.contains(&format!(
            "agent {} is not connected (waited 5s for it): nothing can carry the preview",
            rig.agent_id
        )),
        "{err}"
    );
}

/// A preview substitutes `post_build` variables as the sync would: from `substitute` and from a
/// ConfigMap read through the agent's tunnel (created by the first sync, so optional then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_substitutes_post_build_variables() {
    let extra = |ns: &str| {
        format!(
            "    post_build:\n      substitute:\n        cluster_name: prod-eu\n      substitute_from:\n      - kind: ConfigMap\n        name: vars\n        namespace: {ns}\n        optional: true\n"
        )
    };
    let vars = |ns: &str| {
        vec![(
            "manifests/vars.yaml",
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: vars\n  namespace: {ns}\ndata:\n  region: eu-west\n").into_bytes(),
        )]
    };
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let (rig, ns) = synced_rig_full("diffvars", vars, extra, opts).await;
    let new = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: new\n  namespace: {ns}\ndata:\n  where: ${{cluster_name}}-${{region}}\n"
    );
    branch(
        &rig,
        "feature",
        &[("manifests/new.yaml", Some(new.as_bytes()))],
    );
    let (code, json, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "feature", "-o", "json"]);
    assert_eq!(code, Some(1), "{err}");
    let view: DiffView = serde_json::from_str(&json).unwrap();
    assert_eq!(view.projects[0].error, None, "{json}");
    let created = view.projects[0]
        .objects
        .iter()
        .find(|o| o.name == "new")
        .expect("the new ConfigMap");
    assert_eq!(created.change, DiffChange::Created);
    assert!(
        created.diff.contains("where: prod-eu-eu-west"),
        "{}",
        created.diff
    );
}

/// With `--project`, only that project's preview decides the exit code: the agent's other
/// entry (here one naming a project kas does not have, so its preview fails) is shown, at the
/// ref it follows, but does not turn "no changes" into exit 2. Before, any project's failure
/// made the diff of the project asked about exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_project_only_that_projects_preview_decides_the_exit_code() {
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let ghost = |_: &str| "  - id: group/ghost\n".to_owned();
    let (rig, _) = synced_rig_full("diffone", |_| Vec::new(), ghost, opts).await;
    let args = [AGENT, "--ref", "main", "--project", "group/manifests"];
    let (code, out, err) = kas_diff(&rig.kas, &args);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("◎ group/ghost at default branch"), "{out}");
    assert!(out.ends_with("✔ no changes in group/manifests\n"), "{out}");
    let (code, out, err) = kas_diff(
        &rig.kas,
        &[AGENT, "--ref", "main", "--project", "group/ghost"],
    );
    assert_eq!(code, Some(2), "{out}{err}");
}

/// A ref whose files cannot be selected (here one over the 5 MiB per-file limit) names the
/// commit it resolved to, with why its files were refused; a ref that resolves to nothing says
/// no commit was resolved. Both printed a blank where the commit goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_whose_selection_fails_names_the_commit_it_tried() {
    let (rig, _) = synced_rig("diffsel").await;
    // Comment lines: a YAML file over the limit whatever its contents.
    let big = "# padding\n".repeat(550_000);
    let tried = branch(
        &rig,
        "too-big",
        &[("manifests/big.yaml", Some(big.as_bytes()))],
    );
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "too-big"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains(&format!("◎ group/manifests at too-big {}\n", &tried[..12])),
        "{out}"
    );
    assert!(
        out.contains("manifests/big.yaml is 5500000 bytes, over the limit"),
        "{out}"
    );
    let (_, json, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "too-big", "-o", "json"]);
    let view: DiffView = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}{err}"));
    assert_eq!(view.projects[0].commit.as_deref(), Some(tried.as_str()));
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "no-such-branch"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains("◎ group/manifests at no-such-branch (no commit resolved)\n"),
        "{out}"
    );
}

/// ConfigMap `keep` as the cluster has it: its data and labels.
fn keep_state(rig: &Rig, ns: &str) -> Value {
    let cm = get_json(&rig.env, &["get", "configmap", "keep", "-n", ns]).unwrap();
    serde_json::json!({"data": cm["data"], "labels": cm["metadata"]["labels"]})
}

/// The lines of a text preview that differ (`-` before, `+` after the sync).
fn diff_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with(['-', '+']) && !l.starts_with("---") && !l.starts_with("+++"))
        .collect()
}

/// Changes ConfigMap `keep` by hand with real kubectl (its own field managers, as a person's):
/// adds the data key `extra` and the label `hand`, and sets `value` when given. Then the
/// preview of the synced ref must show the sync reverting them all (the sync takes over the
/// fields of these drift managers), exit with the changes code, and leave the object alone;
/// after a reconcile, which reverts them, it says "no changes". It said "no changes" before
/// the sync reverted them, or kept `extra` in "(after sync)" when `value` changed as well.
async fn hand_edits_are_shown_reverted(prefix: &str, value: Option<&str>) -> Vec<String> {
    let (rig, ns) = synced_rig(prefix).await;
    let kubectl = |args: &[&str]| {
        let o = rig
            .env
            .kubectl()
            .args(args)
            .args(["-n", &ns])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let data = match value {
        Some(v) => format!(r#"{{"data":{{"extra":"x","value":"{v}"}}}}"#),
        None => r#"{"data":{"extra":"x"}}"#.to_owned(),
    };
    kubectl(&["patch", "configmap", "keep", "--type", "merge", "-p", &data]);
    kubectl(&["label", "configmap", "keep", "hand=made"]);
    let edited = keep_state(&rig, &ns);
    assert_eq!(edited["data"]["extra"], "x", "{edited}");

    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "main"]);
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let line = format!("► ConfigMap/{ns}/keep drifted");
    assert!(out.lines().any(|l| l == line), "{line:?} in:\n{out}");
    let lines: Vec<String> = diff_lines(&out).into_iter().map(str::to_owned).collect();
    for removed in ["extra: x", "hand: made"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with('-') && l.ends_with(removed)),
            "{removed:?} removed in:\n{out}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with('+') && l.ends_with(removed)),
            "{removed:?} not kept in:\n{out}"
        );
    }
    let (code, json, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "main", "-o", "json"]);
    assert_eq!(code, Some(1), "{err}");
    let view: DiffView = serde_json::from_str(&json).unwrap();
    let keep = changes(&view).into_iter().find(|(n, _)| n == "keep");
    assert_eq!(
        keep,
        Some(("keep".to_owned(), DiffChange::Changed)),
        "{json}"
    );
    assert_eq!(keep_state(&rig, &ns), edited, "the preview changed nothing");

    let o = rig
        .kas
        .cli()
        .args(["agent", "reconcile", AGENT, "--wait"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reverted = keep_state(&rig, &ns);
    assert_eq!(
        reverted["data"],
        serde_json::json!({"value": "same"}),
        "{reverted}"
    );
    assert!(reverted["labels"].get("hand").is_none(), "{reverted}");
    let (code, out, err) = kas_diff(&rig.kas, &[AGENT, "--ref", "main"]);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.ends_with("✔ no changes\n"), "{out}");
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_and_a_label_added_by_hand_are_shown_removed_by_the_next_sync() {
    let lines = hand_edits_are_shown_reverted("diffhand", None).await;
    // Only the hand edits differ; the labels Git does not set go whole.
    assert_eq!(lines, ["-  extra: x", "-  labels:", "-    hand: made"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_git_managed_key_also_changed_by_hand_the_added_key_is_still_shown_removed() {
    let lines = hand_edits_are_shown_reverted("diffhandval", Some("hand")).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with('-') && l.ends_with("value: hand"))
            && lines
                .iter()
                .any(|l| l.starts_with('+') && l.ends_with("value: same")),
        "{lines:?}"
    );
}
