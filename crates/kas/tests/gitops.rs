//! The seed walkthrough end to end: a real control plane (controller-manager, scheduler, kwok),
//! real Git repositories, real kas and agentk processes, and an agent whose ServiceAccount has
//! exactly the seed's RBAC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kas::api::ProjectRequest;
use serde_json::Value;
use support::gitops::{
    Rig, RigArgs, admin_rbac, configmap, deployment, get_json, is_event, rig, rig_entry,
    rig_entry_in, rig_with,
};
use support::{Agent, Kas, KasOptions, monitoring, wait_for};
use tether_gitops_server::{ReportedOutcome, ReportedStatus};
use tether_testenv::{TestEnv, run_output, seed_agent_rbac};

struct AgentRef {
    agent_id: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dry_run_changes_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("dry").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "    dry_run_strategy: server\n",
        &[("manifests/cm.yaml", Some(&configmap("dry", &ns, "v1")))],
        &[],
    )
    .await;
    let s = rig.synced(&c1).await;
    assert!(s.dry_run, "{s:?}");
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert!(get_json(&rig.env, &["get", "configmap", "dry", "-n", &ns]).is_none());
    let inventories = get_json(
        &rig.env,
        &[
            "get",
            "configmaps",
            "-n",
            &ns,
            "-l",
            "cli-utils.sigs.k8s.io/inventory-id",
        ],
    )
    .unwrap();
    assert_eq!(
        inventories["items"].as_array().unwrap().len(),
        0,
        "no inventory in a dry run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn must_match_leaves_objects_of_another_inventory_alone() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("owned").unwrap();
    // Someone else's object, and an unowned one.
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: theirs\n  namespace: {ns}\n  annotations:\n    config.k8s.io/owning-inventory: someone-else\ndata:\n  value: original\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: unowned\n  namespace: {ns}\ndata:\n  value: original\n"
    ))
    .unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            (
                "manifests/theirs.yaml",
                Some(&configmap("theirs", &ns, "ours")),
            ),
            (
                "manifests/unowned.yaml",
                Some(&configmap("unowned", &ns, "ours")),
            ),
            ("manifests/mine.yaml", Some(&configmap("mine", &ns, "ours"))),
        ],
        &[],
    )
    .await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.error, "2 resources failed", "{s:?}");
    let theirs = s.objects.iter().find(|o| o.name == "theirs").unwrap();
    assert_eq!(theirs.status, ReportedStatus::Failed);
    assert!(theirs.message.contains("someone-else"), "{theirs:?}");
    let unowned = s.objects.iter().find(|o| o.name == "unowned").unwrap();
    assert_eq!(unowned.status, ReportedStatus::Failed);
    for name in ["theirs", "unowned"] {
        let cm = get_json(&rig.env, &["get", "configmap", name, "-n", &ns]).unwrap();
        assert_eq!(
            cm["data"]["value"], "original",
            "{name} must not be taken over"
        );
    }
    let mine = get_json(&rig.env, &["get", "configmap", "mine", "-n", &ns]).unwrap();
    assert_eq!(mine["data"]["value"], "ours");
}

/// An object whose owning-inventory annotation was removed by hand is no longer the agent's:
/// when it leaves Git it stays in the cluster, and is reported as left in place (with the
/// reason), not as pruned — in the report, the logs and the Kubernetes Event. So is one that
/// was committed with a keep annotation of the tools users come from (here Flux's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_no_longer_ours_or_asking_to_be_kept_is_left_in_place_and_not_reported_pruned() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("detach").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            ("manifests/kept.yaml", Some(&configmap("kept", &ns, "v1"))),
            ("manifests/gone.yaml", Some(&configmap("gone", &ns, "v1"))),
            ("manifests/flux.yaml", Some(format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: flux\n  namespace: {ns}\n  annotations:\n    kustomize.toolkit.fluxcd.io/prune: disabled\n"
            ).as_bytes())),
            // Something stays selected: a commit selecting nothing is refused.
            ("manifests/stays.yaml", Some(&configmap("stays", &ns, "v1"))),
        ],
        &[],
    )
    .await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);
    // Kept by hand: the annotation naming the agent's inventory removed.
    run_output(rig.env.kubectl().args([
        "annotate",
        "configmap",
        "kept",
        "-n",
        &ns,
        "config.k8s.io/owning-inventory-",
    ]))
    .unwrap();

    let c2 = rig.manifests.commit(
        &[
            ("manifests/kept.yaml", None),
            ("manifests/gone.yaml", None),
            ("manifests/flux.yaml", None),
        ],
        "all three leave Git",
    );
    let s = rig.synced(&c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let kept = s.objects.iter().find(|o| o.name == "kept").unwrap();
    assert_eq!(kept.status, ReportedStatus::PruneSkipped, "{kept:?}");
    assert!(kept.message.contains("left in place"), "{kept:?}");
    let gone = s.objects.iter().find(|o| o.name == "gone").unwrap();
    assert_eq!(gone.status, ReportedStatus::Pruned, "{gone:?}");
    let flux = s.objects.iter().find(|o| o.name == "flux").unwrap();
    assert_eq!(flux.status, ReportedStatus::PruneSkipped, "{flux:?}");
    assert!(
        flux.message
            .contains("`kustomize.toolkit.fluxcd.io/prune: disabled` asks to keep it"),
        "{flux:?}"
    );
    assert!(get_json(&rig.env, &["get", "configmap", "kept", "-n", &ns]).is_some());
    assert!(get_json(&rig.env, &["get", "configmap", "flux", "-n", &ns]).is_some());
    assert!(get_json(&rig.env, &["get", "configmap", "gone", "-n", &ns]).is_none());

    let lines = rig.agent.log_lines();
    let operation = |name: &str| {
        lines
            .iter()
            .find(|l| is_event(l, "resourcePruned", "ConfigMap", &ns, name))
            .map(|l| l["operation"].clone())
    };
    assert_eq!(operation("kept"), Some(Value::from("PruneSkipped")));
    assert_eq!(operation("gone"), Some(Value::from("Pruned")));
    let inventory = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    let (_, message) = wait_event(&rig.env, &ns, &inventory, "Pruned").await;
    assert!(
        message.contains(&format!("ConfigMap {ns}/gone")),
        "{message}"
    );
    assert!(!message.contains("kept"), "{message}");
}

/// A change the API server refuses to make in place (here the data of a ConfigMap marked
/// `immutable`, as with a Job's template) fails the object, naming why; an object carrying
/// Flux's `kustomize.toolkit.fluxcd.io/force: enabled` is deleted and created again instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_change_fails_unless_the_object_asks_to_be_recreated() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("recreate").unwrap();
    let immutable = |name: &str, value: &str, force: bool| {
        let annotations = if force {
            "  annotations:\n    kustomize.toolkit.fluxcd.io/force: enabled\n"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\n{annotations}immutable: true\ndata:\n  value: {value}\n"
        )
        .into_bytes()
    };
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            (
                "manifests/plain.yaml",
                Some(&immutable("plain", "v1", false)),
            ),
            (
                "manifests/forced.yaml",
                Some(&immutable("forced", "v1", true)),
            ),
        ],
        &[],
    )
    .await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);
    let uid = |name: &str| {
        get_json(&rig.env, &["get", "configmap", name, "-n", &ns]).unwrap()["metadata"]["uid"]
            .clone()
    };
    let forced_uid = uid("forced");

    let c2 = rig.manifests.commit(
        &[
            (
                "manifests/plain.yaml",
                Some(&immutable("plain", "v2", false)),
            ),
            (
                "manifests/forced.yaml",
                Some(&immutable("forced", "v2", true)),
            ),
        ],
        "v2",
    );
    let s = rig.synced(&c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Failed, "{s:?}");
    let plain = s.objects.iter().find(|o| o.name == "plain").unwrap();
    assert_eq!(plain.status, ReportedStatus::Failed, "{plain:?}");
    assert!(plain.message.contains("immutable"), "{plain:?}");
    let forced = s.objects.iter().find(|o| o.name == "forced").unwrap();
    assert_eq!(forced.status, ReportedStatus::Current, "{forced:?}");
    let live = get_json(&rig.env, &["get", "configmap", "forced", "-n", &ns]).unwrap();
    assert_eq!(live["data"]["value"], "v2");
    assert_ne!(live["metadata"]["uid"], forced_uid, "created anew");
    let plain_live = get_json(&rig.env, &["get", "configmap", "plain", "-n", &ns]).unwrap();
    assert_eq!(plain_live["data"]["value"], "v1", "left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_apply_before_their_resources_and_are_pruned_after_them() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("crd").unwrap();
    // A CRD unique to this test run, and one of its objects, in the same commit.
    let group = format!("{ns}.tether.test");
    let crd = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names:\n    plural: widgets\n    singular: widget\n    kind: Widget\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n"
    );
    let widget =
        format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n");
    // The last commit removes everything: meant, so allowed.
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "    allow_empty: true\n",
        &[
            ("manifests/crd.yaml", Some(crd.as_bytes())),
            ("manifests/widget.yaml", Some(widget.as_bytes())),
        ],
        &[],
    )
    .await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let w = s.objects.iter().find(|o| o.kind == "Widget").unwrap();
    assert_eq!(w.status, ReportedStatus::Current);
    assert_eq!(
        w.namespace, ns,
        "the custom resource got the default namespace"
    );
    assert!(
        get_json(
            &rig.env,
            &["get", &format!("widgets.{group}"), "w1", "-n", &ns]
        )
        .is_some()
    );

    // Both leave Git: the Widget is pruned before its CRD.
    let c2 = rig.manifests.commit(
        &[
            ("manifests/crd.yaml", None),
            ("manifests/widget.yaml", None),
        ],
        "remove",
    );
    rig.synced(&c2).await;
    let lines = rig.agent.log_lines();
    let pos = |kind: &str| {
        lines
            .iter()
            .position(|l| l["eventType"] == "resourcePruned" && l["kind"] == kind)
            .unwrap_or_else(|| panic!("no prune event for {kind}"))
    };
    assert!(pos("Widget") < pos("CustomResourceDefinition"));
    assert!(get_json(&rig.env, &["get", "crd", &format!("widgets.{group}")]).is_none());
}

/// A CRD of `group` with kind `Widget` and the given plural.
fn widget_crd(group: &str, plural: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {plural}.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names:\n    plural: {plural}\n    kind: Widget\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n"
    )
}

/// agentk killed in the middle of a sync (OOM, node loss, or a sync aborted after its stop
/// grace) has created objects that its end-of-sync inventory write never recorded; the next
/// commit that drops them must still prune them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_a_sync_killed_midway_are_pruned_when_they_leave_git() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("midway").unwrap();
    // The sync is held between its two stages: the commit's CRD takes a kind another CRD of
    // its group already has, so it is never Established and agentk waits for it (60 s)
    // before applying the ConfigMap — a window in which to kill agentk.
    let group = format!("{ns}.tether.test");
    env.apply_yaml(&widget_crd(&group, "widgets")).unwrap();
    let held = format!("gadgets.{group}");
    let (mut rig, _c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            (
                "manifests/crd.yaml",
                Some(widget_crd(&group, "gadgets").as_bytes()),
            ),
            ("manifests/cm.yaml", Some(&configmap("kept", &ns, "v1"))),
        ],
        &[],
    )
    .await;
    wait_for(
        "agentk to create the held CRD",
        Duration::from_secs(60),
        || async { get_json(&rig.env, &["get", "crd", &held]) },
    )
    .await;
    rig.agent.kill9();
    assert!(
        get_json(&rig.env, &["get", "configmap", "kept", "-n", &ns]).is_none(),
        "agentk was killed before its second stage"
    );

    // The CRD leaves Git; a new agentk syncs the new commit.
    let c2 = rig
        .manifests
        .commit(&[("manifests/crd.yaml", None)], "drop the CRD");
    rig.agent = rig.start_agent("agentk-2");
    let s = rig.synced(&c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert!(get_json(&rig.env, &["get", "configmap", "kept", "-n", &ns]).is_some());
    wait_for(
        "the held CRD to be pruned",
        Duration::from_secs(30),
        || async {
            get_json(&rig.env, &["get", "crd", &held])
                .is_none()
                .then_some(())
        },
    )
    .await;
    run_output(
        rig.env
            .kubectl()
            .args(["delete", "crd", &format!("widgets.{group}")]),
    )
    .unwrap();
}

/// A ConfigMap without a namespace (it takes the project's `default_namespace`).
fn unnamespaced(name: &str) -> Vec<u8> {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n")
        .into_bytes()
}

/// A rig whose agent synced ConfigMaps `one` and `two` in namespace `moving-…`, and a second
/// namespace `moved-…` to move the project to: (rig, namespace, the other one, commit).
async fn moving_rig() -> (Rig, String, String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("moving").unwrap();
    let moved = env.create_namespace("moved").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            ("manifests/one.yaml", Some(&unnamespaced("one"))),
            ("manifests/two.yaml", Some(&unnamespaced("two"))),
        ],
        &[],
    )
    .await;
    rig.synced(&c1).await;
    (rig, ns, moved, c1)
}

/// Commits the configuration moving the project to `moved`; returns the commit.
fn move_project(rig: &Rig, moved: &str) -> String {
    rig.config.commit(
        &[(
            ".gitlab/agents/seed/config.yaml",
            Some(
                format!("gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {moved}\n")
                    .as_bytes(),
            ),
        )],
        "move the default namespace",
    )
}

/// After `two` left Git and the project moved from `ns` to `moved`: `one` only in `moved`,
/// `two` nowhere, the inventory only in `moved`.
async fn assert_moved_and_pruned(rig: &Rig, ns: &str, moved: &str, commit: &str) {
    let s = rig.synced(commit).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let exists =
        |name: &str, n: &str| get_json(&rig.env, &["get", "configmap", name, "-n", n]).is_some();
    assert!(exists("one", moved), "applied in the new namespace");
    assert!(
        !exists("one", ns),
        "the copy in the former namespace is pruned"
    );
    assert!(!exists("two", ns), "what left Git is pruned");
    let inventory = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    assert!(exists(&inventory, moved));
    assert!(!exists(&inventory, ns), "the former inventory is gone");
}

/// The project's `default_namespace` changes while agentk runs: the inventory moves with it,
/// and what left Git meanwhile — and the copies left in the former namespace — is pruned (the
/// inventory in the former namespace used to be forgotten, and its objects never pruned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_pruned_across_a_change_of_default_namespace() {
    let (rig, ns, moved, _) = moving_rig().await;
    let cfg = move_project(&rig, &moved);
    rig.agent
        .wait_log("Agent configuration applied", &cfg)
        .await;
    let c2 = rig
        .manifests
        .commit(&[("manifests/two.yaml", None)], "drop two");
    assert_moved_and_pruned(&rig, &ns, &moved, &c2).await;
}

/// The same change made while agentk is down (a rollout, a drained node): the agentk that
/// starts afterwards never saw the former namespace. kas tells it where the last successful
/// sync left the inventory, so it is still found, its objects pruned, and it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_pruned_across_a_change_of_default_namespace_made_while_agentk_was_down() {
    let (mut rig, ns, moved, _) = moving_rig().await;
    rig.agent.stop();
    let cfg = move_project(&rig, &moved);
    let c2 = rig
        .manifests
        .commit(&[("manifests/two.yaml", None)], "drop two");
    // kas has both commits before agentk starts, so agentk never sees the former namespace.
    wait_for(
        "kas to fetch both commits",
        Duration::from_secs(30),
        || async {
            let heads: Vec<String> = rig
                .kas
                .admin
                .list_projects()
                .await
                .ok()?
                .into_iter()
                .filter_map(|p| p.commit)
                .collect();
            (heads.contains(&cfg) && heads.contains(&c2)).then_some(())
        },
    )
    .await;
    rig.agent = rig.start_agent("agentk-2");
    assert_moved_and_pruned(&rig, &ns, &moved, &c2).await;
    assert!(
        rig.agent
            .log()
            .contains("The project's inventory is in its former default namespace"),
        "{}",
        rig.agent.log()
    );
}

/// A manifest project removed from the configuration takes its metric series with it (its
/// last-success time used to stay and age until a staleness alert fired), and leaves
/// `kas agent status` (its last report used to stay there, however old).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_removed_from_the_configuration_leaves_no_metric_series_nor_status() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("unlisted").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/cm.yaml", Some(&configmap("listed", &ns, "1")))],
        &[],
    )
    .await;
    rig.synced(&c1).await;
    let series =
        r#"agentk_gitops_last_successful_sync_timestamp_seconds{project="group/manifests"}"#;
    wait_for("the project's series", Duration::from_secs(10), || async {
        rig.agent.metric(series).await
    })
    .await;
    let cfg = rig.config.commit(
        &[(".gitlab/agents/seed/config.yaml", Some(b"gitops: {}\n"))],
        "no manifest project",
    );
    rig.agent
        .wait_log("Agent configuration applied", &cfg)
        .await;
    wait_for(
        "the project's series to go",
        Duration::from_secs(10),
        || async {
            let text = rig.agent.metrics_text().await?;
            (!text.contains(r#"project="group/manifests""#)).then_some(())
        },
    )
    .await;
    // Nor is it in the agent's status any more (its last report stayed there for good).
    wait_for(
        "the project to leave the status",
        Duration::from_secs(10),
        || async {
            let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            syncs.is_empty().then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected_by_the_periodic_resync() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("drift").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[(
            "manifests/cm.yaml",
            Some(&configmap("settings", &ns, "from-git")),
        )],
        &["--gitops-resync-interval", "1s"],
    )
    .await;
    rig.synced(&c1).await;
    // Someone changes the object by hand…
    run_output(rig.env.kubectl().args([
        "patch",
        "configmap",
        "settings",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"data":{"value":"by-hand"}}"#,
    ]))
    .unwrap();
    // …and the next re-apply of the same commit puts Git's value back.
    wait_for(
        "the drift to be corrected",
        Duration::from_secs(30),
        || async {
            let cm = get_json(&rig.env, &["get", "configmap", "settings", "-n", &ns])?;
            (cm["data"]["value"] == "from-git").then_some(())
        },
    )
    .await;
}

/// The object with its managed fields (`kubectl get` leaves them out).
fn get_managed(env: &TestEnv, kind: &str, name: &str, ns: &str) -> Option<Value> {
    get_json(env, &["get", kind, name, "-n", ns, "--show-managed-fields"])
}

/// `manager`'s entry among the object's managed fields, if it has one.
fn managed_by<'a>(obj: &'a Value, manager: &str) -> Option<&'a Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == manager)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_added_by_hand_are_reverted_and_a_controllers_fields_stay() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("by-hand").unwrap();
    // No `replicas` in Git: they are the autoscaler's to set.
    let web = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {ns}\n  labels:\n    app: web\nspec:\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n"
    );
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            (
                "manifests/cm.yaml",
                Some(&configmap("settings", &ns, "from-git")),
            ),
            ("manifests/web.yaml", Some(web.as_bytes())),
        ],
        &["--gitops-resync-interval", "1s"],
    )
    .await;
    rig.synced(&c1).await;
    let kubectl = |args: &[&str]| {
        run_output(rig.env.kubectl().args(args).args(["-n", &ns])).unwrap();
    };
    // Controllers: an autoscaler scaling through the scale subresource, an operator annotating.
    kubectl(&[
        "patch",
        "deployment",
        "web",
        "--subresource=scale",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":3}}"#,
        "--field-manager=kube-controller-manager",
    ]);
    kubectl(&[
        "annotate",
        "deployment",
        "web",
        "operator.example.com/seen=yes",
        "--field-manager=example-operator",
    ]);
    // By hand, with real kubectl: a label (manager `kubectl-label`), an annotation
    // (`kubectl-annotate`), and `kubectl edit` changing a value and adding a key.
    kubectl(&["label", "deployment", "web", "hand=made"]);
    kubectl(&["annotate", "deployment", "web", "by-hand=yes"]);
    run_output(
        rig.env
            .kubectl()
            .env(
                "KUBE_EDITOR",
                r"sed -i -e 's/^  value: from-git$/  value: edited\n  extra: edited/'",
            )
            .args(["edit", "configmap", "settings", "-n", &ns]),
    )
    .unwrap();

    // The re-syncs revert what people did, and only that. (Each change may be reverted by a
    // different re-sync: they run every second.)
    let took_over = |name: &str, manager: &str| {
        rig.agent.log_lines().iter().any(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("Took over"))
                && l["object"]
                    .as_str()
                    .is_some_and(|o| o.ends_with(&format!("/{name}")))
                && l["managers"].as_str().is_some_and(|m| m.contains(manager))
        })
    };
    let web = wait_for(
        "the changes by hand to be reverted",
        Duration::from_secs(30),
        || async {
            let web = get_managed(&rig.env, "deployment", "web", &ns)?;
            let cm = get_managed(&rig.env, "configmap", "settings", &ns)?;
            let reverted = ["kubectl-label", "kubectl-annotate"]
                .iter()
                .all(|m| took_over("web", m) && managed_by(&web, m).is_none())
                && took_over("settings", "kubectl-edit")
                && managed_by(&cm, "kubectl-edit").is_none()
                && cm["data"] == serde_json::json!({"value": "from-git"})
                // Taking a field over and the apply that removes it are two writes: read
                // between them, the field is still there, now agentk's.
                && web["metadata"]["labels"].get("hand").is_none()
                && web["metadata"]["annotations"].get("by-hand").is_none();
            reverted.then_some(web)
        },
    )
    .await;
    assert!(web["metadata"]["labels"].get("hand").is_none(), "{web}");
    let annotations = &web["metadata"]["annotations"];
    assert!(annotations.get("by-hand").is_none(), "{annotations}");
    assert_eq!(annotations["operator.example.com/seen"], "yes");
    assert!(managed_by(&web, "example-operator").is_some());
    assert_eq!(web["spec"]["replicas"], 3, "the autoscaler's replicas stay");
    assert!(managed_by(&web, "kube-controller-manager").is_some());
    // Counted in the sync's summary, and once taken over, re-syncs write nothing again.
    let done = |l: &Value| l["msg"] == "Synchronization done" && l["commit_id"] == c1;
    wait_for(
        "a sync that took over fields",
        Duration::from_secs(30),
        || async {
            rig.agent
                .log_lines()
                .iter()
                .any(|l| done(l) && l["taken_over"].as_u64().is_some_and(|n| n >= 1))
                .then_some(())
        },
    )
    .await;
    let seen = rig.agent.log_lines().iter().filter(|l| done(l)).count();
    let writes = rig.writes(&c1, seen + 2).await;
    assert_eq!(
        writes[seen..],
        [0, 0],
        "re-syncs after the takeover: {writes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_of_an_object_created_with_client_side_apply_leaves_with_git_after_adoption() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("adopted").unwrap();
    let cm = |keys: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: old\n  namespace: {ns}\ndata:\n{keys}"
        )
    };
    // Created by hand with client-side `kubectl apply`, before agentk manages it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.yaml");
    std::fs::write(&file, cm("  keep: a\n  drop: b\n")).unwrap();
    run_output(env.kubectl().args(["apply", "-f", file.to_str().unwrap()])).unwrap();
    let before = get_managed(&env, "configmap", "old", &ns).unwrap();
    assert!(
        managed_by(&before, "kubectl-client-side-apply").is_some(),
        "{before}"
    );
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "    inventory_policy: adopt_if_no_inventory\n",
        &[(
            "manifests/old.yaml",
            Some(cm("  keep: a\n  drop: b\n").as_bytes()),
        )],
        &[],
    )
    .await;
    rig.synced(&c1).await;
    // The key leaves Git: it leaves the cluster, though kubectl's apply set it too.
    let c2 = rig.manifests.commit(
        &[("manifests/old.yaml", Some(cm("  keep: a\n").as_bytes()))],
        "drop a key",
    );
    rig.synced(&c2).await;
    let after = get_managed(&rig.env, "configmap", "old", &ns).unwrap();
    assert_eq!(after["data"], serde_json::json!({"keep": "a"}), "{after}");
    assert!(
        managed_by(&after, "kubectl-client-side-apply").is_none(),
        "{after}"
    );
    // So does kubectl's record of what it applied, which no longer says what is there.
    assert!(
        after["metadata"]["annotations"]
            .get("kubectl.kubernetes.io/last-applied-configuration")
            .is_none(),
        "{after}"
    );
}

/// Two entries of one agent declaring the same object, both `inventory_policy: adopt_all`
/// (the policy the refusal of a second owner suggests): the second is refused, naming the
/// entry that owns the object, and the owner keeps it across commits. adopt_all made them take
/// it from each other at every sync (three writes each time), and the one whose files then
/// lost it pruned it while the other still declared it (E8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_entries_of_one_agent_do_not_take_an_object_from_each_other() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("twoentries").unwrap();
    let extra = format!(
        "    name: first\n    inventory_policy: adopt_all\n  - id: group/manifests\n    name: second\n    default_namespace: {ns}\n    paths:\n    - glob: '/manifests/*.yaml'\n    inventory_policy: adopt_all\n"
    );
    // Enough objects that the two first syncs, side by side, overlap: one entry looks its
    // objects up while the other is creating them.
    const N: usize = 60;
    let cms = |v: &str| {
        (0..N)
            .flat_map(|i| [configmap(&format!("shared-{i}"), &ns, v), b"---\n".to_vec()])
            .flatten()
            .collect::<Vec<u8>>()
    };
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        &extra,
        &[("manifests/cm.yaml", Some(&cms("1")))],
        &[],
    )
    .await;
    let owners = || -> BTreeMap<String, String> {
        let live = get_json(&rig.env, &["get", "configmaps", "-n", &ns]).unwrap();
        let items = live["items"].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .filter_map(|o| {
                let name = o["metadata"]["name"].as_str()?.to_owned();
                let owner =
                    o["metadata"]["annotations"]["config.k8s.io/owning-inventory"].as_str()?;
                Some((
                    name,
                    if owner.contains("-first-") {
                        "first"
                    } else {
                        "second"
                    }
                    .to_owned(),
                ))
            })
            .collect()
    };
    let both = |commit: String| {
        let rig = &rig;
        async move {
            let first = rig.synced_in("group/manifests#first", &commit).await;
            let second = rig.synced_in("group/manifests#second", &commit).await;
            (first, second)
        }
    };
    // Each object is applied by one entry, the one its annotation names, and the other is
    // refused for it naming that one — at the first syncs too, which both found the objects
    // absent (both used to create them and record them in their inventories).
    let one_owner_each = |(first, second): (kas::api::SyncView, kas::api::SyncView)| {
        let owners = owners();
        for i in 0..N {
            let name = format!("shared-{i}");
            let owner = owners.get(&name).map(String::as_str);
            let (won, lost) = match owner {
                Some("first") => (&first, &second),
                Some(_) => (&second, &first),
                None => panic!("{name} has no owner: {owners:?}"),
            };
            let of = |v: &kas::api::SyncView| v.objects.iter().find(|o| o.name == name).cloned();
            let applied = of(won).unwrap_or_else(|| panic!("{name} not in {won:?}"));
            assert!(
                !applied.not_applied,
                "{name} not applied by its owner: {applied:?}"
            );
            let refused = of(lost).unwrap_or_else(|| panic!("{name} not in {lost:?}"));
            // "was created by" when both found it absent, "is owned by" once it exists.
            let sibling = format!("entry {} of this agent", won.project_id);
            assert!(
                refused.not_applied
                    && refused.message.contains(&sibling)
                    && refused
                        .message
                        .contains("two entries must not declare one object"),
                "{name} owned by {owner:?}: {refused:?}"
            );
        }
        owners
    };
    let owners_then = one_owner_each(both(c1).await);
    let c2 = rig
        .manifests
        .commit(&[("manifests/cm.yaml", Some(&cms("2")))], "two");
    let owners_now = one_owner_each(both(c2).await);
    assert_eq!(owners_now, owners_then, "objects changed hands");
    let live = get_json(&rig.env, &["get", "configmap", "shared-0", "-n", &ns]).unwrap();
    assert_eq!(live["data"]["value"], "2", "{live}");
}

/// A Service of type LoadBalancer stays in progress until its address is set (no load balancer
/// controller runs here, so the test sets it): agentk follows it with a watch when its
/// ServiceAccount may watch, and by polling when it may not. Returns the sync's
/// `watched_statuses` (status changes a watch told first).
async fn load_balancer_followed(prefix: &str, rbac: fn(&str) -> String) -> u64 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(prefix).unwrap();
    let lb = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\n  namespace: {ns}\nspec:\n  type: LoadBalancer\n  ports:\n  - port: 80\n"
    );
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &rbac(&ns),
        "",
        &[
            ("manifests/lb.yaml", Some(lb.as_bytes())),
            ("manifests/cm.yaml", Some(&configmap("c", &ns, "v1"))),
        ],
        &[],
    )
    .await;
    let in_progress = |l: &Value| {
        l["eventType"] == "resourceStatus" && l["name"] == "lb" && l["status"] == "InProgress"
    };
    wait_for(
        "the Service in progress",
        Duration::from_secs(60),
        || async { rig.agent.log_lines().iter().any(in_progress).then_some(()) },
    )
    .await;
    run_output(rig.env.kubectl().args([
        "patch",
        "service",
        "lb",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.10"}]}}}"#,
    ]))
    .unwrap();
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let lines = rig.agent.log_lines();
    assert!(
        lines.iter().any(|l| l["eventType"] == "resourceStatus"
            && l["name"] == "lb"
            && l["status"] == "Current"
            && l["project_id"] == "group/manifests"),
        "the Service reported Current, as an event of its project"
    );
    let done = lines
        .iter()
        .find(|l| l["msg"] == "Synchronization done" && l["commit_id"] == c1.as_str())
        .expect("the sync's summary line");
    done["watched_statuses"].as_u64().expect("watched_statuses")
}

/// The Service's address reaches agentk by its status watch. The watch starts with the sync's
/// wait; on a loaded machine (a fresh-clone CI once) the API server may start it after the
/// address was set, and the 2-second poll then sees the address first, which the watch only
/// confirms: up to three syncs are tried, each in its own namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_in_progress_is_followed_by_a_watch() {
    for attempt in 1..=3 {
        if load_balancer_followed(&format!("watch{attempt}"), admin_rbac).await >= 1 {
            return;
        }
    }
    panic!("the Service's address never came from a watch in three syncs");
}

/// Every verb but `watch`: status still arrives, by polling.
fn rbac_without_watch(agent_ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: gitlab-agent\n  namespace: {agent_ns}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {agent_ns}-no-watch\n\
rules:\n- apiGroups: [\"*\"]\n  resources: [\"*\"]\n  verbs: [get, list, create, update, patch, delete]\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {agent_ns}-no-watch\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {agent_ns}-no-watch\n\
subjects:\n- kind: ServiceAccount\n  name: gitlab-agent\n  namespace: {agent_ns}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_watch_verb_status_is_polled() {
    let watched = load_balancer_followed("nowatch", rbac_without_watch).await;
    assert_eq!(watched, 0, "no watch may run without the verb");
}

/// `n` ConfigMaps `cm-0`, `cm-1`, … as one multi-document file.
fn configmaps(n: usize, ns: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(configmap(&format!("cm-{i}"), ns, "v"));
        out.extend(b"---\n");
    }
    out
}

impl Rig {
    /// The `writes` of agentk's first `syncs` "Synchronization done" lines for `commit` (the
    /// first sync, then the periodic re-syncs), waiting for them.
    async fn writes(&self, commit: &str, syncs: usize) -> Vec<u64> {
        wait_for(
            &format!("{syncs} syncs of {commit}"),
            Duration::from_secs(120),
            || async {
                let w: Vec<u64> = self
                    .agent
                    .log_lines()
                    .iter()
                    .filter(|l| l["msg"] == "Synchronization done" && l["commit_id"] == commit)
                    .filter_map(|l| l["writes"].as_u64())
                    .collect();
                (w.len() >= syncs).then_some(w)
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_writes_only_what_changed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("writes").unwrap();
    // Five ConfigMaps (looked up with one LIST) and a Deployment (looked up with a GET).
    let many = configmaps(5, &ns);
    let two_keys = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: two\n  namespace: {ns}\ndata:\n  keep: a\n  drop: b\n"
    );
    // A Secret written with `stringData`, which the API server stores as `data`.
    let secret = |keys: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  namespace: {ns}\nstringData:\n{keys}"
        )
    };
    let two_secrets = secret("  keep: a\n  drop: b\n");
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            ("manifests/many.yaml", Some(&many)),
            ("manifests/two.yaml", Some(two_keys.as_bytes())),
            ("manifests/secret.yaml", Some(two_secrets.as_bytes())),
            ("manifests/web.yaml", Some(&deployment("web", &ns, 1))),
        ],
        &["--gitops-resync-interval", "1s"],
    )
    .await;
    rig.synced(&c1).await;
    // First sync: eight objects and the inventory; the re-syncs of the same commit: nothing
    // (the Secret's `stringData` included: it used to be written again at every re-sync).
    let writes = rig.writes(&c1, 3).await;
    assert_eq!(
        writes[0], 9,
        "first sync: 8 objects + inventory ({writes:?})"
    );
    assert!(
        writes[1..].iter().all(|&w| w == 0),
        "re-syncs wrote: {writes:?}"
    );

    // A commit that removes one key of one ConfigMap: one write, and the key is gone (the
    // live object is a superset of the new manifest; the digest says it changed).
    let one_key = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: two\n  namespace: {ns}\ndata:\n  keep: a\n"
    );
    let one_secret = secret("  keep: a\n");
    let c2 = rig.manifests.commit(
        &[
            ("manifests/two.yaml", Some(one_key.as_bytes())),
            ("manifests/secret.yaml", Some(one_secret.as_bytes())),
        ],
        "drop a key",
    );
    let writes = rig.writes(&c2, 2).await;
    assert_eq!(writes[0], 2, "two objects changed ({writes:?})");
    assert_eq!(writes[1], 0, "re-sync after it ({writes:?})");
    let cm = get_json(&rig.env, &["get", "configmap", "two", "-n", &ns]).unwrap();
    assert_eq!(cm["data"], serde_json::json!({"keep": "a"}));
    let s = get_json(&rig.env, &["get", "secret", "s", "-n", &ns]).unwrap();
    assert_eq!(
        s["data"],
        serde_json::json!({"keep": "YQ=="}),
        "the key left Git"
    );
    // An unchanged object's event is debug: at info, cm-0's `resourceApplied` is logged once
    // (its first apply), not again at each of the re-syncs above (they were most of the log).
    let lines = rig.agent.log_lines();
    let applied: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["eventType"] == "resourceApplied" && l["name"] == "cm-0")
        .collect();
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0]["operation"], "ServersideApplied");
}

/// A Deployment as kube-prometheus writes its grafana and prometheus-adapter: `env: []`, a
/// volume mount with `readOnly: false` and `emptyDir: {}`. The API server drops the empty list
/// and the `false` (an omitempty boolean), so the live object lacks both.
fn deployment_with_fields_the_server_drops(name: &str, ns: &str) -> Vec<u8> {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n      - name: grafana\n        image: grafana/grafana:12.1.0\n        env: []\n        volumeMounts:\n        - mountPath: /var/lib/grafana\n          name: storage\n          readOnly: false\n      volumes:\n      - name: storage\n        emptyDir: {{}}\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_a_deployment_with_fields_the_server_drops_writes_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("dropped").unwrap();
    let grafana = deployment_with_fields_the_server_drops("grafana", &ns);
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/grafana.yaml", Some(&grafana))],
        &["--gitops-resync-interval", "1s"],
    )
    .await;
    rig.synced(&c1).await;
    let live = get_json(&rig.env, &["get", "deployment", "grafana", "-n", &ns]).unwrap();
    let container = &live["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container.get("env").is_none() && container["volumeMounts"][0].get("readOnly").is_none(),
        "the API server dropped `env: []` and `readOnly: false`: {container}"
    );
    let writes = rig.writes(&c1, 3).await;
    assert_eq!(
        writes[0], 2,
        "first sync: the Deployment + inventory ({writes:?})"
    );
    assert!(
        writes[1..].iter().all(|&w| w == 0),
        "re-syncs wrote: {writes:?}"
    );
}

/// Objects that fail to be created at every sync — a Deployment in a namespace the agent may
/// not write, a ServiceMonitor whose CRD is not installed — no longer make every retry write
/// the inventory twice (added before applying, dropped after): retries write nothing, the
/// inventory's resourceVersion stays put, and removing them from Git succeeds (they were
/// never created, so there is nothing to prune).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_objects_that_keep_failing_to_be_created_writes_nothing() {
    let (rig, agent_ns, dude, naww) = Seed::synced_rig().await;
    let inventory = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    let naww_yaml = deployment("nginx", &naww, 1);
    let monitor = format!(
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: web\n  namespace: {dude}\nspec: {{}}\n"
    );
    let c2 = rig.manifests.commit(
        &[
            ("manifests/naww.yaml", Some(&naww_yaml)),
            ("manifests/monitor.yaml", Some(monitor.as_bytes())),
        ],
        "two objects that cannot be created",
    );
    let failures = |n: usize| {
        let writes: Vec<u64> = rig
            .agent
            .log_lines()
            .iter()
            .filter(|l| l["msg"] == "Synchronization failed" && l["commit_id"] == c2.as_str())
            .filter_map(|l| l["writes"].as_u64())
            .collect();
        async move { (writes.len() >= n).then_some(writes) }
    };
    let resource_version = || {
        let cm = get_json(&rig.env, &["get", "configmap", &inventory, "-n", &agent_ns]).unwrap();
        cm["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    wait_for("two failed syncs", Duration::from_secs(60), || failures(2)).await;
    let before = resource_version();
    let writes = wait_for("two more failed syncs", Duration::from_secs(60), || {
        failures(4)
    })
    .await;
    assert_eq!(resource_version(), before, "a retry rewrote the inventory");
    assert!(
        writes[1..].iter().all(|&w| w == 0),
        "retries wrote: {writes:?}"
    );

    let c3 = rig.manifests.commit(
        &[
            ("manifests/naww.yaml", None),
            ("manifests/monitor.yaml", None),
        ],
        "remove them",
    );
    let report = rig.synced(&c3).await;
    assert_eq!(report.outcome, ReportedOutcome::Succeeded, "{report:?}");
}

/// An object moved to another namespace whose copy there cannot be created (here a namespace
/// the agent may not write; a release moved to a namespace that does not exist is the same)
/// is not pruned where it runs: it is reported left in place until its replacement exists,
/// then pruned. It was pruned in the same failed sync, leaving nothing running, and the
/// report said nothing of it. Other objects leaving Git are still pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_moved_to_a_namespace_where_it_cannot_be_created_keeps_running_where_it_was() {
    let (rig, agent_ns, dude, naww) = Seed::synced_rig().await;
    let leaving = configmap("leaving", &dude, "v1");
    let c2 = rig
        .manifests
        .commit(&[("manifests/leaving.yaml", Some(&leaving))], "a ConfigMap");
    assert_eq!(rig.synced(&c2).await.outcome, ReportedOutcome::Succeeded);

    let moved = deployment("nginx", &naww, 1);
    let c3 = rig.manifests.commit(
        &[
            ("manifests/dude.yaml", Some(&moved)),
            ("manifests/leaving.yaml", None),
        ],
        "move nginx where the agent may not write; the ConfigMap leaves",
    );
    let s = rig.synced(&c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Failed, "{s:?}");
    let old = s
        .objects
        .iter()
        .find(|o| o.name == "nginx" && o.namespace == dude)
        .unwrap();
    assert_eq!(old.status, ReportedStatus::PruneSkipped, "{old:?}");
    assert!(
        old.message.contains(&format!("moved to namespace {naww}"))
            && old.message.contains("pruned once the replacement exists"),
        "{old:?}"
    );
    assert!(get_json(&rig.env, &["get", "configmap", "leaving", "-n", &dude]).is_none());
    // Retries keep holding it (the replacement stays new to the inventory while it fails).
    wait_for(
        "two retries of the move",
        Duration::from_secs(60),
        || async { (rig.sync_failures(&c3) >= 3).then_some(()) },
    )
    .await;
    assert!(get_json(&rig.env, &["get", "deployment", "nginx", "-n", &dude]).is_some());

    let placed = deployment("nginx", &agent_ns, 1);
    let c4 = rig.manifests.commit(
        &[("manifests/dude.yaml", Some(&placed))],
        "move nginx where it can be created",
    );
    let s = rig.synced(&c4).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let old = s
        .objects
        .iter()
        .find(|o| o.name == "nginx" && o.namespace == dude)
        .unwrap();
    assert_eq!(old.status, ReportedStatus::Pruned, "{old:?}");
    assert!(get_json(&rig.env, &["get", "deployment", "nginx", "-n", &dude]).is_none());
    assert!(get_json(&rig.env, &["get", "deployment", "nginx", "-n", &agent_ns]).is_some());
}

/// Argo CD hooks in plain files: a PreSync hook is applied as an ordinary object and said
/// (naming file, object and annotation) in the report's warnings; a `Skip` one is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argo_hooks_in_plain_files_are_warned_about_and_skip_is_not_applied() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("hooks").unwrap();
    let hook = |name: &str, value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    argocd.argoproj.io/hook: {value}\n"
        )
    };
    let (pre, skip) = (hook("pre", "PreSync"), hook("skipped", "Skip"));
    let files = [
        ("manifests/pre.yaml", Some(pre.as_bytes())),
        ("manifests/skip.yaml", Some(skip.as_bytes())),
    ];
    let (rig, c1) = rig(env, ns.clone(), &admin_rbac(&ns), "", &files, &[]).await;
    let report = rig.synced(&c1).await;
    assert_eq!(report.outcome, ReportedOutcome::Succeeded, "{report:?}");
    let said = |what: &str| report.warnings.iter().any(|w| w.contains(what));
    assert!(
        said(&format!(
            "manifests/pre.yaml:1: ConfigMap {ns}/pre is annotated argocd.argoproj.io/hook: PreSync: applied"
        )),
        "{:?}",
        report.warnings
    );
    assert!(said("not applied"), "{:?}", report.warnings);
    assert!(get_json(&rig.env, &["get", "configmap", "pre", "-n", &ns]).is_some());
    assert!(get_json(&rig.env, &["get", "configmap", "skipped", "-n", &ns]).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_across_list_pages_writes_nothing() {
    // More ConfigMaps than one LIST page (500): the re-sync must see every page to find them
    // all up to date.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("pages").unwrap();
    let many = configmaps(520, &ns);
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/many.yaml", Some(&many))],
        &["--gitops-resync-interval", "1s"],
    )
    .await;
    rig.synced(&c1).await;
    let writes = rig.writes(&c1, 2).await;
    assert_eq!(writes[0], 521, "520 objects + inventory ({writes:?})");
    assert_eq!(writes[1], 0, "re-sync ({writes:?})");
}

/// The seed's namespaces and the agent's RBAC: it may write in its own namespace and `dude`.
struct Seed {
    env: TestEnv,
    agent_ns: String,
    dude: String,
    naww: String,
    rbac: String,
}

impl Seed {
    fn new() -> Seed {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let env = TestEnv::from_env().expect("a running control plane");
        let agent_ns = env.create_namespace("gitlab-k8s-agent").unwrap();
        let dude = env.create_namespace("dude").unwrap();
        let naww = env.create_namespace("naww").unwrap();
        let rbac = seed_agent_rbac(&agent_ns, "gitlab-agent", &dude);
        Seed {
            env,
            agent_ns,
            dude,
            naww,
            rbac,
        }
    }

    /// A rig whose manifests are the Deployment `nginx` in dude, synced; with the agent's
    /// namespace and the namespaces dude and naww.
    async fn synced_rig() -> (Rig, String, String, String) {
        let seed = Seed::new();
        let dude_yaml = deployment("nginx", &seed.dude, 1);
        let initial = [("manifests/dude.yaml", Some(&dude_yaml[..]))];
        let ns = seed.agent_ns.clone();
        let (rig, c1) = rig(seed.env, ns, &seed.rbac, "", &initial, &[]).await;
        assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);
        (rig, seed.agent_ns, seed.dude, seed.naww)
    }
}

/// An agentk whose node clock is two hours ahead reports its syncs in kas's time: `kas agent
/// status` shows a sync just done as just done, not two hours in the future; agentk warns of
/// the offset and exports it. (finished_at was agentk's clock, shown as is: E14 F4. Ahead, not
/// behind: the test API server's certificate is minutes old, and a clock behind it refuses it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_clock_is_ahead_reports_its_syncs_in_kas_time() {
    let (mut rig, _, dude, _) = Seed::synced_rig().await;
    rig.agent.stop();
    let args: Vec<&str> = rig.agent_args.iter().map(String::as_str).collect();
    let agent = Agent::start_env(
        rig._dir.path(),
        "ahead",
        &rig.kas.url("grpc"),
        &rig.token,
        (None, &args),
        &support::faketime("+2h"),
    );
    let cm = support::gitops::configmap("clock", &dude, "1");
    let c2 = rig
        .manifests
        .commit(&[("manifests/clock.yaml", Some(&cm))], "a ConfigMap");
    let synced = rig.synced(&c2).await;
    let now = std::time::SystemTime::now();
    let at = humantime::parse_rfc3339(&synced.finished_at).unwrap();
    let off = now.duration_since(at).unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_secs(60),
        "finished at {} (now {:?})",
        synced.finished_at,
        now
    );
    let offset = agent
        .metric("agentk_kas_clock_offset_seconds")
        .await
        .unwrap();
    assert!((-7_250.0..-7_150.0).contains(&offset), "{offset}");
    assert!(
        agent.log().contains("This node's clock differs from kas's"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_walkthrough() {
    let Seed {
        env,
        agent_ns,
        dude,
        naww,
        rbac,
    } = Seed::new();
    let (rig, c1) = rig(
        env,
        agent_ns.clone(),
        &rbac,
        "",
        &[
            ("manifests/dude.yaml", Some(&deployment("nginx", &dude, 1))),
            ("manifests/naww.yaml", Some(&deployment("nginx", &naww, 1))),
        ],
        &[],
    )
    .await;
    let Rig {
        env,
        kas,
        agent,
        manifests,
        agent_id,
        ..
    } = &rig;
    let t = AgentRef {
        agent_id: *agent_id,
    };

    // 1. dude becomes Available and is reported Current; naww fails as forbidden, alone.
    agent
        .wait_line("Starting synchronization worker", |l| {
            l["msg"] == "Starting synchronization worker" && l["project_id"] == "group/manifests"
        })
        .await;
    agent
        .wait_line("Synchronizing objects", |l| {
            l["msg"] == "Synchronizing objects"
                && l["commit_id"] == c1.as_str()
                && l["agent_id"] == t.agent_id
        })
        .await;
    let current = agent
        .wait_line("dude Current", |l| {
            is_event(l, "resourceStatus", "Deployment", &dude, "nginx") && l["status"] == "Current"
        })
        .await;
    assert_eq!(current["message"], "Deployment is available. Replicas: 1");
    assert_eq!(current["group"], "apps");
    assert_eq!(current["type"], "status");
    let d = get_json(
        env,
        &[
            "get",
            "deployment",
            "nginx",
            "-n",
            &dude,
            "--show-managed-fields",
        ],
    )
    .unwrap();
    assert_eq!(d["status"]["availableReplicas"], 1);
    assert_eq!(
        d["metadata"]["managedFields"][0]["manager"], "agentk",
        "server-side apply with field manager agentk"
    );
    let failed = agent
        .wait_line("naww failed", |l| {
            is_event(l, "resourceFailed", "Deployment", &naww, "nginx")
        })
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("forbidden"),
        "{failed}"
    );
    let summary = agent
        .wait_line("Synchronization failed", |l| {
            l["msg"] == "Synchronization failed" && l["commit_id"] == c1.as_str()
        })
        .await;
    assert_eq!(summary["error"], "1 resources failed");
    let none = get_json(env, &["get", "deployments", "-n", &naww]).unwrap();
    assert_eq!(none["items"].as_array().unwrap().len(), 0);

    // kas shows the commit applied and every object's last status.
    let status = wait_for("kas to show the sync", Duration::from_secs(30), || async {
        let s = kas.admin.gitops_status(t.agent_id).await.ok()?;
        s.into_iter().find(|s| s.commit_id == c1)
    })
    .await;
    assert_eq!(status.project_id, "group/manifests");
    assert_eq!(status.outcome, ReportedOutcome::Failed);
    let by_ns = |ns: &str| {
        status
            .objects
            .iter()
            .find(|o| o.namespace == ns)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_ns(&dude).status, ReportedStatus::Current);
    assert_eq!(by_ns(&naww).status, ReportedStatus::Failed);
    // The same in agentk's metrics, which users alert on; and which build runs.
    let series = |s: &str| format!("agentk_gitops_{s}");
    assert!(
        agent
            .metric(&series(
                r#"syncs_total{project="group/manifests",outcome="failed"}"#
            ))
            .await
            >= Some(1.0)
    );
    for (status, n) in [("Current", 1.0), ("Failed", 1.0), ("Pruned", 0.0)] {
        let objects = series(&format!(
            r#"objects{{project="group/manifests",status="{status}"}}"#
        ));
        assert_eq!(agent.metric(&objects).await, Some(n), "{objects}");
    }
    let build = format!(
        r#"agentk_build_info{{version="{}",commit="{}"}}"#,
        env!("CARGO_PKG_VERSION"),
        tether_build_info::COMMIT
    );
    assert_eq!(agent.metric(&build).await, Some(1.0), "{build}");

    // 2. Scale dude to 2 in Git: applied.
    let c2 = manifests.commit(
        &[("manifests/dude.yaml", Some(&deployment("nginx", &dude, 2)))],
        "scale",
    );
    let two = agent
        .wait_line("dude at 2 replicas", |l| {
            is_event(l, "resourceStatus", "Deployment", &dude, "nginx")
                && l["message"] == "Deployment is available. Replicas: 2"
        })
        .await;
    assert_eq!(two["status"], "Current");
    let d = get_json(env, &["get", "deployment", "nginx", "-n", &dude]).unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    let _ = c2;

    // 3. Remove dude.yaml: pruned.
    let c3 = manifests.commit(&[("manifests/dude.yaml", None)], "remove dude");
    agent
        .wait_line("dude pruned", |l| {
            is_event(l, "resourcePruned", "Deployment", &dude, "nginx")
        })
        .await;
    wait_for(
        "the Deployment to be gone",
        Duration::from_secs(60),
        || async {
            get_json(env, &["get", "deployments", "-n", &dude])
                .filter(|v| v["items"].as_array().is_some_and(Vec::is_empty))
        },
    )
    .await;
    let _ = c3;

    // 4. Bring dude back, then commit a broken file: nothing is deleted, the error is clear.
    let c4 = manifests.commit(
        &[("manifests/dude.yaml", Some(&deployment("nginx", &dude, 1)))],
        "dude again",
    );
    wait_for(
        "kas to show c4 with dude Current",
        Duration::from_secs(90),
        || async {
            kas.admin
                .gitops_status(t.agent_id)
                .await
                .ok()?
                .into_iter()
                .find(|s| {
                    s.commit_id == c4
                        && s.objects
                            .iter()
                            .any(|o| o.namespace == dude && o.status == ReportedStatus::Current)
                })
        },
    )
    .await;
    let c5 = manifests.commit(
        &[(
            "manifests/broken.yaml",
            Some(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n"),
        )],
        "broken",
    );
    let broken = agent
        .wait_line("the broken commit's failure", |l| {
            l["msg"] == "Synchronization failed" && l["commit_id"] == c5.as_str()
        })
        .await;
    let error = broken["error"].as_str().unwrap();
    assert!(error.contains("manifests/broken.yaml"), "{error}");
    assert!(error.contains(":4:") || error.contains("line"), "{error}");
    let d = get_json(env, &["get", "deployment", "nginx", "-n", &dude]);
    assert!(
        d.is_some(),
        "nothing may be deleted because of a broken file"
    );
    assert!(
        !agent
            .log_lines()
            .iter()
            .any(|l| l["eventType"] == "resourcePruned"
                && l["namespace"] == dude.as_str()
                && l["time"].as_str() > broken["time"].as_str()),
        "no prune after the broken commit"
    );

    // 5. Fix it: recovers.
    let c6 = manifests.commit(
        &[(
            "manifests/broken.yaml",
            Some(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fixed\n"),
        )],
        "fixed",
    );
    let recovered = wait_for(
        "kas to show the fixed commit",
        Duration::from_secs(90),
        || async {
            kas.admin
                .gitops_status(t.agent_id)
                .await
                .ok()?
                .into_iter()
                .find(|s| s.commit_id == c6)
        },
    )
    .await;
    assert_eq!(
        recovered.error, "1 resources failed",
        "only naww fails: {recovered:?}"
    );
    let cm = recovered
        .objects
        .iter()
        .find(|o| o.kind == "ConfigMap" && o.name == "fixed")
        .unwrap();
    assert_eq!(cm.status, ReportedStatus::Current);
    assert_eq!(
        cm.namespace, agent_ns,
        "default_namespace applied to the namespaced object"
    );
    assert!(get_json(env, &["get", "configmap", "fixed", "-n", &agent_ns]).is_some());
}

/// `kas agent status` and the configuration in force survive kas restarts (SIGTERM and
/// kill -9), even while the agent is away: they are stored, not only in kas's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_configuration_survive_kas_restarts_while_the_agent_is_away() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("persist").unwrap();
    let (mut rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/cm.yaml", Some(&configmap("kept", &ns, "v1")))],
        &[],
    )
    .await;
    let before = rig.synced(&c1).await;
    let config_commit = rig.kas.agent(rig.agent_id).await.config.unwrap().commit;
    rig.agent.stop();
    for kill9 in [false, true] {
        rig.kas.restart_by(kill9).await;
        // At once, with no agent connected.
        let after = rig.kas.admin.gitops_status(rig.agent_id).await.unwrap();
        assert_eq!(after.len(), 1, "kill9: {kill9}");
        assert_eq!(after[0].commit_id, c1);
        assert_eq!(after[0].outcome, before.outcome);
        assert_eq!(after[0].objects, before.objects);
        let a = rig.kas.agent(rig.agent_id).await;
        assert!(!a.connected);
        assert_eq!(a.config.map(|c| c.commit), Some(config_commit.clone()));
    }
}

fn mirror_pack_counts(kas_dir: &std::path::Path) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut stack = vec![kas_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.ends_with("objects/pack") {
                let packs = std::fs::read_dir(&p)
                    .unwrap()
                    .flatten()
                    .filter(|f| f.path().extension().is_some_and(|x| x == "pack"))
                    .count();
                out.push((p.display().to_string(), packs));
            } else if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// Hundreds of commits over time, fetched by poll and by push webhook, with kas restarted
/// (SIGTERM and kill -9) along the way: every commit is applied, each mirror stays at a
/// bounded number of packs, and kas's memory and open files stay flat. GitOps used to stop
/// after ~32 fetches. Bounded for CI: `TETHER_SOAK_COMMITS` (default 300); `scripts/soak`
/// runs a long version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_is_applied_across_hundreds_of_fetches_and_kas_restarts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let commits: usize = std::env::var("TETHER_SOAK_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("soak").unwrap();
    let (mut rig, c0) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/cm.yaml", Some(&configmap("soak", &ns, "0")))],
        &[],
    )
    .await;
    rig.synced(&c0).await;
    let secret = rig._dir.path().join("hook-secret");
    std::fs::write(&secret, "soak-hook\n").unwrap();
    let project = rig
        .set_manifests_project(ProjectRequest {
            webhook_secret_file: Some(secret.display().to_string()),
            ..ProjectRequest::default()
        })
        .await;
    let (first_restart, second_restart) = (commits / 4, commits / 2);
    let mut baseline = None;
    let t0 = Instant::now();
    for i in 1..=commits {
        let value = i.to_string();
        let c = rig.manifests.commit(
            &[("manifests/cm.yaml", Some(&configmap("soak", &ns, &value)))],
            &format!("soak {i}"),
        );
        if i % 2 == 0 {
            let code = rig
                .kas
                .webhook(
                    project.id,
                    &[
                        ("x-gitlab-token", "soak-hook".into()),
                        ("x-gitlab-event", "Push Hook".into()),
                    ],
                    br#"{"ref":"refs/heads/main","after":"0"}"#,
                )
                .await;
            assert_eq!(code, 200, "webhook for commit {i}");
        }
        // Other tests change the shared cluster meanwhile (CRDs come and go); a sync that
        // failed for that is retried, and every commit must end applied.
        wait_for(
            &format!("commit {i} applied"),
            Duration::from_secs(90),
            || async {
                let s = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
                s.into_iter()
                    .find(|s| s.commit_id == c && s.outcome == ReportedOutcome::Succeeded)
            },
        )
        .await;
        if i == first_restart || i == second_restart {
            rig.kas.restart_by(i == second_restart).await;
        }
        if i == second_restart + 10 {
            baseline = Some(rig.kas.footprint());
        }
    }
    let cm = get_json(&rig.env, &["get", "configmap", "soak", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["value"], commits.to_string());
    for (dir, packs) in mirror_pack_counts(&rig.kas.dir) {
        assert!(packs <= 9, "{dir} holds {packs} packs");
    }
    let (rss0, fds0) = baseline.expect("a baseline");
    let (rss1, fds1) = rig.kas.footprint();
    eprintln!(
        "soak: {commits} commits in {:?}; kas RSS {} → {} KiB, open files {fds0} → {fds1}",
        t0.elapsed(),
        rss0 / 1024,
        rss1 / 1024
    );
    assert!(fds1 <= fds0 + 8, "open files grew from {fds0} to {fds1}");
    assert!(
        rss1 <= rss0 + rss0 / 2 + (8 << 20),
        "memory grew from {rss0} to {rss1} bytes"
    );
}

fn synchronizing(agent: &Agent, commit: &str) -> bool {
    agent
        .log_lines()
        .iter()
        .any(|l| l["msg"] == "Synchronizing objects" && l["commit_id"] == commit)
}

/// Lease timing for tests that wait for leadership to change hands: seconds, not tens.
const FAST_LEASE: [&str; 6] = [
    "--leader-election-lease-duration",
    "4s",
    "--leader-election-renew-deadline",
    "3s",
    "--leader-election-retry-period",
    "500ms",
];

/// A rig whose agentk leads with [`FAST_LEASE`] and has synced its first commit (a ConfigMap
/// `one` = 1); the arguments another replica of it needs.
async fn replicas_rig(prefix: &str) -> (Rig, String, Vec<String>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(prefix).unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/cm.yaml", Some(&configmap("one", &ns, "1")))],
        &FAST_LEASE,
    )
    .await;
    rig.synced(&c1).await;
    let args = [
        "--kubeconfig",
        rig.kubeconfig.to_str().unwrap(),
        "--leader-election-namespace",
        &ns,
    ]
    .into_iter()
    .chain(FAST_LEASE)
    .map(str::to_owned)
    .collect();
    (rig, ns, args)
}

/// Two agentk replicas with one token (`replicas: 2`, or a rollout's surge pod): both serve
/// tunnels, exactly one — the holder of the Lease — applies; when it is killed the other takes
/// over within the lease duration. Before, both applied and both pruned every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_one_applies_and_the_other_takes_over() {
    let (mut rig, ns, args) = replicas_rig("replicas").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut second = Agent::start_with(
        rig._dir.path(),
        "replica-2",
        &rig.kas.url("grpc"),
        &rig.token,
        None,
        &args,
    );
    wait_for(
        "both replicas connected",
        Duration::from_secs(30),
        || async {
            let a = rig.kas.agent(rig.agent_id).await;
            (a.connections.len() == 2).then_some(())
        },
    )
    .await;
    let lease = get_json(
        &rig.env,
        &[
            "get",
            "lease",
            &format!("agent-{}-lock", rig.agent_id),
            "-n",
            &ns,
        ],
    )
    .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "seed");

    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("one", &ns, "2")))],
        "two",
    );
    rig.synced(&c2).await;
    assert!(synchronizing(&rig.agent, &c2));
    assert!(
        !second
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "Synchronizing objects"),
        "the follower applied:\n{}",
        second.log()
    );
    // Both serve tunnels.
    for _ in 0..8 {
        assert_eq!(
            rig.kas
                .admin
                .echo(rig.agent_id, b"x".to_vec())
                .await
                .unwrap()
                .as_ref(),
            b"x"
        );
    }

    rig.agent.kill9();
    let killed = Instant::now();
    let c3 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("one", &ns, "3")))],
        "three",
    );
    rig.synced(&c3).await;
    eprintln!(
        "the follower applied the next commit {:?} after the leader was killed",
        killed.elapsed()
    );
    assert!(synchronizing(&second, &c3), "{}", second.log());
    let cm = get_json(&rig.env, &["get", "configmap", "one", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["value"], "3");
    second.stop();
}

/// A sync logs a status line at info for the objects it wrote and for statuses that change
/// during it, not for objects already as the files say: each sync of a busy repository whose
/// objects did not change logged a line per object (E9: ~64,000 lines an hour for a
/// 300-object agent in a monorepo).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_logs_status_lines_only_for_the_objects_it_wrote() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("quietlog").unwrap();
    let (a, b, c) = (
        configmap("a", &ns, "1"),
        configmap("b", &ns, "1"),
        configmap("c", &ns, "1"),
    );
    let initial = [
        ("manifests/a.yaml", Some(a.as_slice())),
        ("manifests/b.yaml", Some(b.as_slice())),
        ("manifests/c.yaml", Some(c.as_slice())),
    ];
    let (rig, c1) = rig(env, ns.clone(), &admin_rbac(&ns), "", &initial, &[]).await;
    rig.synced(&c1).await;
    // The status lines at info of the sync of `commit`, by object name.
    let status_lines = |commit: &str| -> Vec<String> {
        let lines = rig.agent.log_lines();
        let start = lines
            .iter()
            .position(|l| l["msg"] == "Synchronizing objects" && l["commit_id"] == commit)
            .expect("the sync started");
        let mut names: Vec<String> = lines[start..]
            .iter()
            .take_while(|l| !(l["msg"] == "Synchronization done" && l["commit_id"] == commit))
            .filter(|l| l["eventType"] == "resourceStatus" && l["level"] == "info")
            .map(|l| l["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(status_lines(&c1), ["a", "b", "c"]);

    // Another part of the repository changes: nothing of the entry's is written.
    let c2 = rig
        .manifests
        .commit(&[("docs/readme.md", Some(b"hello"))], "docs");
    rig.synced(&c2).await;
    assert_eq!(status_lines(&c2), Vec::<String>::new());
    // One object changes: its line alone.
    let c3 = rig.manifests.commit(
        &[("manifests/b.yaml", Some(&configmap("b", &ns, "2")))],
        "b two",
    );
    rig.synced(&c3).await;
    assert_eq!(status_lines(&c3), ["b"]);
}

/// Since when kas has had the commit an agent is behind is known for an entry on another
/// branch (its streams tell kas when they find the branch moved) and after a kas restart (at
/// least since kas started): both read no time, so such an entry never counted as stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_says_since_when_an_entry_is_behind_on_a_branch_and_after_a_kas_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("behind").unwrap();
    let extra = format!(
        "    name: main\n  - id: group/manifests\n    name: dev\n    ref:\n      branch: dev\n    default_namespace: {ns}\n    paths:\n    - glob: '/dev/*.yaml'\n"
    );
    let (mut rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        &extra,
        &[
            ("manifests/cm.yaml", Some(&configmap("main", &ns, "1"))),
            ("dev/cm.yaml", Some(&configmap("dev", &ns, "1"))),
        ],
        &[],
    )
    .await;
    rig.manifests.git(&["branch", "dev"]);
    rig.synced_in("group/manifests#dev", &c1).await;
    rig.synced_in("group/manifests#main", &c1).await;
    rig.agent.kill9();
    // A commit on dev without checking it out (the remote's HEAD, its default branch, stays).
    let tree = rig.manifests.git(&["rev-parse", "dev^{tree}"]);
    let c2 = rig
        .manifests
        .git(&["commit-tree", &tree, "-p", "dev", "-m", "dev two"]);
    rig.manifests.git(&["update-ref", "refs/heads/dev", &c2]);
    let c3 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("main", &ns, "3")))],
        "main three",
    );
    let dev = behind(&rig.kas, rig.agent_id, "group/manifests#dev", &c2).await;
    assert!(dev.newer_since.is_some(), "{dev:?}");
    let main = behind(&rig.kas, rig.agent_id, "group/manifests#main", &c3).await;
    let fetched_at = main.newer_since.clone().expect("known since the fetch");

    rig.kas.restart().await;
    let main = behind(&rig.kas, rig.agent_id, "group/manifests#main", &c3).await;
    let since = main.newer_since.clone().expect("known since kas started");
    assert!(since >= fetched_at, "{since} before {fetched_at}");
    let dev = behind(&rig.kas, rig.agent_id, "group/manifests#dev", &c2).await;
    assert!(dev.newer_since.is_some(), "{dev:?}");
}

/// The report of `entry` once the status says kas has `commit` for it and the agent has not
/// reported on it.
async fn behind(kas: &Kas, agent_id: i64, entry: &str, commit: &str) -> kas::api::SyncView {
    wait_for(
        &format!("{entry} behind {commit}"),
        Duration::from_secs(30),
        || async {
            let syncs = kas.admin.gitops_status(agent_id).await.ok()?;
            syncs
                .into_iter()
                .find(|s| s.project_id == entry && s.newer_commit == commit)
        },
    )
    .await
}

/// A GitOps leader whose path to kas breaks (its node's egress, a half-open load balancer)
/// while another replica stays connected: past the grace (two lease durations, here 8 s) the
/// connected replica asks for the lease, the leader hands it over, and the next commit is
/// applied by the connected one. The leader used to keep the lease for as long as the cut
/// lasted, and nothing was applied meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_kas_hands_the_lease_to_a_replica_that_is_connected() {
    let (mut rig, ns, args) = replicas_rig("cutleader").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = tether_test_support::net::SeveringRelay::start(rig.kas.agent_port).await;
    let replica = |name: &str, url: &str| {
        Agent::start_with(rig._dir.path(), name, url, &rig.token, None, &args)
    };
    let mut cut = replica("replica-2", &format!("grpc://127.0.0.1:{}", relay.port));
    let holder = || {
        let lease = format!("agent-{}-lock", rig.agent_id);
        get_json(&rig.env, &["get", "lease", &lease, "-n", &ns]).unwrap()["spec"]["holderIdentity"]
            .clone()
    };
    let connections = |n: usize| {
        let kas = &rig.kas;
        let id = rig.agent_id;
        move || async move { (kas.agent(id).await.connections.len() == n).then_some(()) }
    };
    wait_for(
        "two replicas connected",
        Duration::from_secs(30),
        connections(2),
    )
    .await;
    // replica-2, the one whose path will break, leads.
    rig.agent.kill9();
    wait_for("replica-2 to lead", Duration::from_secs(30), || async {
        (holder() == "replica-2").then_some(())
    })
    .await;
    let mut connected = replica("replica-3", &rig.kas.url("grpc"));
    wait_for(
        "replicas 2 and 3 connected",
        Duration::from_secs(30),
        connections(2),
    )
    .await;

    relay.sever();
    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("one", &ns, "2")))],
        "two",
    );
    // Until the lease moves (the grace is 8 s here), the status says the newest commit is
    // not reported on (it read "succeeded" of the older one, and nothing more).
    let behind = wait_for(
        "the status to say c2 is not applied yet",
        Duration::from_secs(8),
        || async {
            let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            syncs.into_iter().find(|s| s.newer_commit == c2)
        },
    )
    .await;
    assert!(behind.newer_since.is_some(), "{behind:?}");
    rig.synced(&c2).await;
    assert!(synchronizing(&connected, &c2), "{}", connected.log());
    assert_eq!(holder(), "replica-3");
    assert!(
        cut.log().contains("Handed the GitOps lease"),
        "{}",
        cut.log()
    );
    assert!(!synchronizing(&cut, &c2), "{}", cut.log());
    cut.stop();
    connected.stop();
}

/// Four or more objects of a kind in a namespace have their statuses read by one LIST, whose
/// items of built-in kinds come without a kind: the status rules then read every one as
/// Current, and Deployments that could not run were reported synced (E12, High). Here four
/// Deployments whose Pods no node accepts stay not Current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_whose_status_is_listed_are_not_current_while_they_cannot_run() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("unschedulable").unwrap();
    let stuck = |name: &str| {
        let d = String::from_utf8(deployment(name, &ns, 1)).unwrap();
        d.replace(
            "    spec:\n      containers:",
            "    spec:\n      nodeSelector:\n        tether.example.com/nowhere: \"true\"\n      containers:",
        )
        .into_bytes()
    };
    let files: Vec<(String, Vec<u8>)> = (1..=4)
        .map(|i| {
            (
                format!("manifests/stuck-{i}.yaml"),
                stuck(&format!("stuck-{i}")),
            )
        })
        .collect();
    let initial: Vec<(&str, Option<&[u8]>)> = files
        .iter()
        .map(|(p, b)| (p.as_str(), Some(b.as_slice())))
        .collect();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "    reconcile_timeout: 8s\n",
        &initial,
        &[],
    )
    .await;
    let report = rig.synced(&c1).await;
    let deployments: Vec<_> = report
        .objects
        .iter()
        .filter(|o| o.kind == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 4, "{report:?}");
    assert!(
        deployments
            .iter()
            .all(|o| o.status != ReportedStatus::Current),
        "{report:?}"
    );
    assert_ne!(report.outcome, ReportedOutcome::Succeeded, "{report:?}");
}

/// An object that left Git and is held by a finalizer after its deletion is named in a warning
/// (with the finalizer) after 30 s of waiting, and the prune ends once the finalizer is gone:
/// the sync waited up to `prune_timeout` (1 h) without a word (E12: a foreground deletion
/// the garbage collector did not process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_held_by_a_finalizer_is_said_and_ends_when_it_is_removed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("held").unwrap();
    let held = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  namespace: {ns}\n  finalizers: [example.com/hold]\ndata:\n  value: \"1\"\n"
    );
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[
            ("manifests/held.yaml", Some(held.as_bytes())),
            ("manifests/kept.yaml", Some(&configmap("kept", &ns, "1"))),
        ],
        &[],
    )
    .await;
    rig.synced(&c1).await;
    let c2 = rig
        .manifests
        .commit(&[("manifests/held.yaml", None)], "drop held");
    let said = rig
        .agent
        .wait_line("the prune's warning", |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("Pruning still waits for 1 object(s)"))
        })
        .await;
    assert_eq!(said["level"], "warn", "{said}");
    let msg = said["msg"].as_str().unwrap();
    assert!(msg.contains("held (finalizers: example.com/hold)"), "{msg}");
    let patched = rig
        .env
        .kubectl()
        .args(["-n", &ns, "patch", "configmap", "held", "--type=merge"])
        .args(["-p", r#"{"metadata":{"finalizers":null}}"#])
        .output()
        .unwrap();
    assert!(patched.status.success(), "{patched:?}");
    let s2 = rig.synced(&c2).await;
    assert_eq!(s2.outcome, ReportedOutcome::Succeeded, "{s2:?}");
}

/// RBAC for an agent that may do anything with core objects in its namespace, and only
/// `lease_verbs` on Leases there.
fn lease_rbac(ns: &str, lease_verbs: &[&str]) -> String {
    let verbs = lease_verbs.join(", ");
    let role = |name: &str, rules: &str| {
        format!(
            "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}\n  namespace: {ns}\nrules:\n{rules}\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {name}\n\
subjects:\n- kind: ServiceAccount\n  name: gitlab-agent\n  namespace: {ns}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: gitlab-agent\n  namespace: {ns}\n{}{}",
        role(
            "gitlab-agent-write",
            "- apiGroups: [\"\", \"events.k8s.io\"]\n  resources: [\"*\"]\n  verbs: [\"*\"]\n"
        ),
        role(
            "gitlab-agent-lease",
            &format!(
                "- apiGroups: [\"coordination.k8s.io\"]\n  resources: [\"leases\"]\n  verbs: [{verbs}]\n"
            )
        ),
    )
}

/// "No replica leads" shows in the metrics: an agent that may read its Lease but not write it
/// exports `agentk_leader` 0 and counts every failed round in
/// `agentk_leader_election_failures_total`; given the rights it leads (1) and applies; when
/// they are taken away it stops leading by the renew deadline (0), the failures counted
/// again, and its GitOps stream closes, which kas counts (`streams` 0, read by `kas agent
/// status`). Before, only a log line said so, once, while readiness looked fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_gauge_follows_the_lease_and_refused_lease_writes_are_counted() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("leaderless").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &lease_rbac(&ns, &["get"]),
        "",
        &[("manifests/cm.yaml", Some(&configmap("led", &ns, "1")))],
        &FAST_LEASE,
    )
    .await;
    let lease = format!("agent-{}-lock", rig.agent_id);
    let gauge = format!(r#"agentk_leader{{lease="{lease}"}}"#);
    let failures = format!(r#"agentk_leader_election_failures_total{{lease="{lease}"}}"#);
    let metric = |series: &str| {
        let series = series.to_owned();
        let agent = &rig.agent;
        async move { agent.metric(&series).await }
    };
    let refused = wait_for(
        "refused lease writes counted",
        Duration::from_secs(30),
        || async { metric(&failures).await.filter(|n| *n >= 3.0) },
    )
    .await;
    assert_eq!(metric(&gauge).await, Some(0.0), "leading without a lease");
    assert!(!synchronizing(&rig.agent, &c1), "applied without the lease");

    rig.env
        .apply_yaml(&lease_rbac(&ns, &["get", "create", "update"]))
        .unwrap();
    wait_for("leading", Duration::from_secs(30), || async {
        metric(&gauge).await.filter(|v| *v == 1.0)
    })
    .await;
    rig.synced(&c1).await;
    // kas counts the leader's GitOps stream for the entry, which `kas agent status` reads.
    let streams = || async {
        let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
        syncs.first().and_then(|s| s.streams)
    };
    assert_eq!(streams().await, Some(1));

    let before = metric(&failures).await.unwrap();
    assert!(before >= refused);
    rig.env.apply_yaml(&lease_rbac(&ns, &["get"])).unwrap();
    wait_for("no longer leading", Duration::from_secs(30), || async {
        metric(&gauge).await.filter(|v| *v == 0.0)
    })
    .await;
    let after = metric(&failures).await.unwrap();
    assert!(
        after > before,
        "refused renewals counted: {before} -> {after}"
    );
    // Its report still says "succeeded", but no stream of the agent serves the entry any more:
    // after a minute connected, `kas agent status` says no replica leads (exit 8).
    wait_for("the stream to close", Duration::from_secs(10), || async {
        (streams().await == Some(0)).then_some(())
    })
    .await;
}

/// A symlink matched by a glob is said in `kas agent status`, not silently skipped; a commit
/// whose globs match nothing is refused (it would prune everything: every file deleted or the
/// directory renamed by mistake) unless the entry sets `allow_empty: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_symlinks_are_reported_and_emptying_a_project_needs_allow_empty() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("warned").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/cm.yaml", Some(&configmap("warned", &ns, "1")))],
        &[],
    )
    .await;
    assert!(rig.synced(&c1).await.warnings.is_empty());
    std::os::unix::fs::symlink("cm.yaml", rig.manifests.dir.join("manifests/link.yaml")).unwrap();
    let c2 = rig.manifests.commit(&[], "a symlink");
    let s2 = rig.synced(&c2).await;
    assert_eq!(s2.outcome, ReportedOutcome::Succeeded);
    assert!(
        s2.warnings
            .iter()
            .any(|w| w.contains("manifests/link.yaml is a symbolic link")),
        "{s2:?}"
    );
    // Every file deleted (a mistake, most likely): refused, nothing pruned.
    let c3 = rig.manifests.commit(
        &[("manifests/cm.yaml", None), ("manifests/link.yaml", None)],
        "everything removed",
    );
    let s3 = rig.synced(&c3).await;
    assert_eq!(s3.outcome, ReportedOutcome::Failed, "{s3:?}");
    // The warning beside the refusal does not say that everything is pruned.
    assert!(
        s3.warnings
            .iter()
            .any(|w| w.contains("no file matches") && !w.contains("is pruned")),
        "{s3:?}"
    );
    assert!(
        s3.error.contains("selects no object") && s3.error.contains("allow_empty: true"),
        "{s3:?}"
    );
    let exists = || get_json(&rig.env, &["get", "configmap", "warned", "-n", &ns]).is_some();
    assert!(exists(), "nothing was pruned");
    // Meant: the entry allows emptying the project, and the same commit prunes everything.
    let cfg = rig.config.commit(
        &[(
            ".gitlab/agents/seed/config.yaml",
            Some(
                format!(
                    "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n    paths:\n    - glob: '/manifests/*.yaml'\n    allow_empty: true\n"
                )
                .as_bytes(),
            ),
        )],
        "allow emptying the project",
    );
    rig.agent
        .wait_log("Agent configuration applied", &cfg)
        .await;
    let pruned = wait_for("the emptying sync", Duration::from_secs(60), || async {
        let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
        let s = syncs.into_iter().find(|s| s.commit_id == c3)?;
        (s.outcome == ReportedOutcome::Succeeded).then_some(s)
    })
    .await;
    assert!(
        pruned
            .objects
            .iter()
            .any(|o| o.name == "warned" && o.status == ReportedStatus::Pruned),
        "{pruned:?}"
    );
    assert!(!exists(), "pruned");
}

/// A rig whose project's `default_namespace` is `own-…`, a namespace that does not exist, with
/// `files` as its first commit: (rig, that namespace, the commit).
async fn own_namespace_rig(
    files: impl Fn(&str) -> Vec<(&'static str, Vec<u8>)>,
) -> (Rig, String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("owner").unwrap();
    let own = tether_testenv::unique_name("own");
    let files = files(&own);
    let initial: Vec<(&str, Option<&[u8]>)> = files
        .iter()
        .map(|(p, b)| (*p, Some(b.as_slice())))
        .collect();
    let args = RigArgs {
        env,
        rbac: &admin_rbac(&agent_ns),
        agent_ns,
        project_extra: "",
        initial: &initial,
        agent_args: &[],
    };
    let entry = "    paths:\n    - glob: '/manifests/*.yaml'\n";
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let (rig, c1) = rig_entry_in(args, &own, entry, opts).await;
    (rig, own, c1)
}

/// Flux's and Argo CD's layout: the project's `default_namespace` is a Namespace of its own
/// files. The inventory is kept there, and used to be written before anything was applied, so
/// every sync failed with `namespaces "…" not found`; the Namespace is applied first now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_creating_its_own_default_namespace_applies_on_the_first_sync() {
    let (rig, own, c1) = own_namespace_rig(|own| {
        vec![
            (
                "manifests/ns.yaml",
                format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {own}\n").into_bytes(),
            ),
            ("manifests/cm.yaml", unnamespaced("inside")),
        ]
    })
    .await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    for (kind, name) in [("Namespace", own.as_str()), ("ConfigMap", "inside")] {
        assert!(
            s.objects
                .iter()
                .any(|o| o.kind == kind && o.name == name && o.status == ReportedStatus::Current),
            "{kind} {name} Current: {s:?}"
        );
    }
    let inventory = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    let cm = get_json(&rig.env, &["get", "configmap", &inventory, "-n", &own])
        .expect("the inventory in the project's own namespace");
    let listed = cm["data"].to_string();
    assert!(listed.contains(&own) && listed.contains("inside"), "{cm}");
}

/// A commit moving the objects to another namespace removes from Git the Namespace the
/// inventory is kept in (the project's `default_namespace`, unchanged). That Namespace is left
/// in place, said so, and stays in the inventory; the next commit syncs. Before, it was pruned
/// with the inventory in it, and every later sync failed for want of the namespace until
/// someone created it by hand (E5 H1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespace_holding_the_inventory_is_left_in_place_when_it_leaves_git() {
    let namespace = |name: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n").into_bytes()
    };
    let (rig, own, c1) = own_namespace_rig(|own| {
        vec![
            ("manifests/ns.yaml", namespace(own)),
            ("manifests/cm.yaml", unnamespaced("inside")),
        ]
    })
    .await;
    rig.synced(&c1).await;
    let moved = format!("{own}-2");
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inside\n  namespace: {moved}\n"
    );
    let c2 = rig.manifests.commit(
        &[
            ("manifests/ns.yaml", Some(&namespace(&moved))),
            ("manifests/cm.yaml", Some(cm.as_bytes())),
        ],
        "move to another namespace",
    );
    let s = rig.synced(&c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let kept = s
        .objects
        .iter()
        .find(|o| o.kind == "Namespace" && o.name == own)
        .expect("the inventory's Namespace in the report");
    assert_eq!(kept.status, ReportedStatus::PruneSkipped, "{s:?}");
    assert!(
        kept.message.contains("inventory is kept in this namespace"),
        "{kept:?}"
    );
    let ns = get_json(&rig.env, &["get", "namespace", &own]).expect("the Namespace kept");
    assert_eq!(ns["status"]["phase"], "Active", "{ns}");
    let inventory = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    get_json(&rig.env, &["get", "configmap", &inventory, "-n", &own]).expect("the inventory");

    let again = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inside\n  namespace: {moved}\ndata:\n  v: \"2\"\n"
    );
    let c3 = rig
        .manifests
        .commit(&[("manifests/cm.yaml", Some(again.as_bytes()))], "v2");
    let s = rig.synced(&c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
}

/// A `default_namespace` that does not exist and that the commit does not create: the sync
/// fails before any write, saying so (not a bare 404 about writing the inventory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_default_namespace_the_commit_does_not_create_is_named() {
    let (rig, own, c1) =
        own_namespace_rig(|_| vec![("manifests/cm.yaml", unnamespaced("inside"))]).await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Failed, "{s:?}");
    assert!(
        s.error.contains(&format!(
            "namespace {own} (the project's default_namespace, where its inventory is kept) does not exist and this commit does not create it"
        )),
        "{s:?}"
    );
}

/// A commit that fails before applying anything (a manifest that does not decode) still shows,
/// in `kas agent status`, the objects that are in the cluster — said to be from the last
/// commit that applied them — instead of an empty list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_still_shows_the_objects_in_the_cluster() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("kept").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "",
        &[("manifests/cm.yaml", Some(&configmap("kept", &ns, "1")))],
        &[],
    )
    .await;
    rig.synced(&c1).await;
    let bad = rig.manifests.commit(
        &[("manifests/broken.yaml", Some(b"kind: [unclosed\n"))],
        "a broken manifest",
    );
    let s = rig.synced(&bad).await;
    assert_eq!(s.outcome, ReportedOutcome::Failed);
    assert!(s.error.contains("manifests/broken.yaml"), "{s:?}");
    assert!(s.objects.iter().any(|o| o.name == "kept"), "{s:?}");
    assert!(
        s.warnings.iter().any(|w| w.contains(&c1)),
        "the objects are said to be from {c1}: {s:?}"
    );
}

/// The Grafana dashboard and the alert rules under deploy/monitoring name only series that kas
/// and agentk really export (scraped after a successful sync, a failed one, a refused webhook
/// and a refused configuration); the rules pass promtool's checks and their unit tests; both
/// binaries' metrics pass `promtool check metrics` (Prometheus naming conventions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_assets_use_only_exported_metrics_and_pass_promtool() {
    let (rig, _, _, naww) = Seed::synced_rig().await;
    let naww_yaml = deployment("nginx", &naww, 1);
    let c2 = rig
        .manifests
        .commit(&[("manifests/naww.yaml", Some(&naww_yaml))], "forbidden");
    assert_eq!(rig.synced(&c2).await.outcome, ReportedOutcome::Failed);
    assert_eq!(rig.kas.webhook(999_999, &[], b"{}").await, 401);
    rig.config.commit(
        &[(".gitlab/agents/seed/config.yaml", Some(b"gitops: 5\n"))],
        "invalid configuration",
    );
    for series in [
        "kas_configuration_refusals_total",
        r#"kas_webhook_deliveries_total{outcome="refused"}"#,
        "kas_gitops_reconcile_lag_seconds_count",
    ] {
        wait_for(series, Duration::from_secs(30), || async {
            rig.kas.metric(series).await.filter(|n| *n >= 1.0)
        })
        .await;
    }
    let failed = r#"agentk_gitops_syncs_total{project="group/manifests",outcome="failed"}"#;
    assert!(rig.agent.metric(failed).await >= Some(1.0), "{failed}");

    let kas_text = rig.kas.metrics_text().await.unwrap();
    let agent_text = rig.agent.metrics_text().await.unwrap();
    monitoring::assert_area_exported("gitops.rs", &[&kas_text, &agent_text]);
    for (file, names) in monitoring::referenced() {
        let outside: Vec<_> = names
            .iter()
            .filter(|n| !monitoring::AREAS.iter().any(|(p, _)| n.starts_with(p)))
            .collect();
        assert!(outside.is_empty(), "{file}: no test scrapes {outside:?}");
    }
    let monitoring = monitoring::folder();
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(monitoring.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    let queries = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| p["targets"].as_array().map_or(0, Vec::len))
        .collect::<Vec<_>>();
    assert!(
        queries.len() >= 12 && queries.iter().all(|n| *n >= 1),
        "{queries:?}"
    );

    let promtool = |args: &[&str], stdin: Option<&str>| {
        let mut c = std::process::Command::new(rig.env.bin_dir.join("promtool"));
        c.args(args).current_dir(&monitoring);
        promtool_run(c, stdin)
    };
    let rules = promtool(&["check", "rules", "alerts.yaml"], None);
    assert_eq!(rules, "", "promtool check rules");
    let tests = promtool(&["test", "rules", "alerts.test.yaml"], None);
    assert_eq!(tests, "", "promtool test rules");
    for text in [&kas_text, &agent_text] {
        let problems = promtool(&["check", "metrics"], Some(text));
        // promtool lints the classic text format, where a counter's HELP names the sample
        // (`x_total`); OpenMetrics, which both binaries serve, names the family (`x`).
        let real: Vec<&str> = problems
            .lines()
            .filter(|l| {
                let family = l.strip_suffix("_total no help text");
                !family.is_some_and(|f| text.contains(&format!("# HELP {f} ")))
            })
            .collect();
        assert!(real.is_empty(), "promtool check metrics: {real:?}");
    }
}

/// Runs promtool; returns what it reported as problems (empty when it succeeded).
fn promtool_run(mut c: std::process::Command, stdin: Option<&str>) -> String {
    use std::io::Write;
    use std::process::Stdio;
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("promtool (built by testenv/build.sh)");
    let input = stdin.unwrap_or_default().to_owned();
    let mut pipe = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    if out.status.success() {
        return String::new();
    }
    let problems = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !problems.trim().is_empty(),
        "{c:?} failed without saying why"
    );
    problems
}

/// Sync failures, prunes, recoveries and refused commits are Kubernetes Events on the project's
/// inventory ConfigMap: `kubectl get events` and `kubectl describe configmap` show them, once
/// per change (a failure retried many times is one event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_prunes_and_refused_commits_are_kubernetes_events() {
    let Seed {
        env,
        agent_ns,
        dude,
        naww,
        rbac,
    } = Seed::new();
    let dude_yaml = deployment("nginx", &dude, 1);
    let cm = configmap("settings", &dude, "1");
    let initial = [
        ("manifests/dude.yaml", Some(&dude_yaml[..])),
        ("manifests/cm.yaml", Some(&cm[..])),
    ];
    // Drift correction every second: the last good commit is re-applied while one is refused.
    let resync = ["--gitops-resync-interval", "1s"];
    let (rig, c1) = rig(env, agent_ns.clone(), &rbac, "", &initial, &resync).await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);
    let inventory = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    let event = |reason: &'static str| wait_event(&rig.env, &agent_ns, &inventory, reason);
    // A forbidden namespace: one SyncFailed warning naming the object, even across retries.
    let naww_yaml = deployment("nginx", &naww, 1);
    let c2 = rig
        .manifests
        .commit(&[("manifests/naww.yaml", Some(&naww_yaml))], "forbidden");
    rig.synced(&c2).await;
    let (kind, message) = event("SyncFailed").await;
    assert_eq!(kind, "Warning");
    assert!(
        message.contains(&format!("Deployment {naww}/nginx")),
        "{message}"
    );
    assert!(message.contains(&c2[..12]), "{message}");
    wait_for(
        "a retry of the failed sync",
        Duration::from_secs(30),
        || async { (rig.sync_failures(&c2) >= 2).then_some(()) },
    )
    .await;

    // Fixed and the ConfigMap removed: pruned, said once.
    let c3 = rig.manifests.commit(
        &[("manifests/naww.yaml", None), ("manifests/cm.yaml", None)],
        "fix and prune",
    );
    assert_eq!(rig.synced(&c3).await.outcome, ReportedOutcome::Succeeded);
    let (kind, message) = event("Pruned").await;
    assert_eq!(kind, "Normal");
    assert!(
        message.contains(&format!("ConfigMap {dude}/settings")),
        "{message}"
    );

    // Only signed commits from now on: the next (unsigned) commit is refused, and said so.
    let keys = tempfile::tempdir().unwrap();
    let signer =
        tether_testenv::signing::Signer::ssh(keys.path(), "trusted", "ops@example.com").unwrap();
    let trust = signer.write_trust(keys.path(), "allowed_signers").unwrap();
    rig.set_manifests_project(ProjectRequest {
        verify_allowed_signers_file: Some(trust.display().to_string()),
        ..ProjectRequest::default()
    })
    .await;
    let c4 = rig
        .manifests
        .commit(&[("manifests/cm.yaml", Some(&cm))], "unsigned");
    let (kind, message) = event("ManifestsRefused").await;
    assert_eq!(kind, "Warning");
    assert!(message.contains(&c4[..12]), "{message}");

    // kubectl describe of the inventory shows them (events are matched by the object's uid).
    let out =
        run_output(
            rig.env
                .kubectl()
                .args(["describe", "configmap", &inventory, "-n", &agent_ns]),
        )
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    for reason in ["SyncFailed", "Pruned", "ManifestsRefused"] {
        assert!(out.contains(reason), "{out}");
    }
    let all = get_json(&rig.env, &["get", "events", "-n", &agent_ns]).unwrap();
    let failures = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "SyncFailed")
        .count();
    assert_eq!(failures, 1, "one event for a failure retried several times");

    // While c4 stands refused, agentk re-applies the last good commit: no recovery (it was
    // said as one, naming c3, and the real recovery below then went unsaid).
    wait_for(
        "the last good commit re-applied while c4 is refused",
        Duration::from_secs(30),
        || async {
            let log = rig.agent.log();
            log.contains("Re-applied the last good commit")
                .then_some(())
        },
    )
    .await;
    let c5 = signer.commit(&rig.manifests.dir, "signed").unwrap();
    assert_eq!(rig.synced(&c5).await.outcome, ReportedOutcome::Succeeded);
    let (kind, message) = event("SyncRecovered").await;
    assert_eq!(kind, "Normal");
    assert!(message.contains(&c5[..12]), "{message}");
}

/// Waits for an event with `reason` on the inventory ConfigMap; returns its type and message.
async fn wait_event(env: &TestEnv, ns: &str, inventory: &str, reason: &str) -> (String, String) {
    wait_for(
        &format!("a {reason} event"),
        Duration::from_secs(30),
        || async {
            let list = get_json(env, &["get", "events", "-n", ns])?;
            list["items"].as_array()?.iter().find_map(|e| {
                if e["reason"] != reason || e["involvedObject"]["name"] != inventory {
                    return None;
                }
                Some((
                    e["type"].as_str()?.to_owned(),
                    e["message"].as_str()?.to_owned(),
                ))
            })
        },
    )
    .await
}

/// What the local receiver got: path, headers, body.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
    /// The status it answered.
    status: u16,
}

/// A local HTTP server standing in for every receiver; answers 503 to the first `fail_first`
/// webhook deliveries, 201 to everything else.
async fn receiver(fail_first: usize) -> (u16, Arc<Mutex<Vec<Received>>>) {
    receiver_answering(move |seen, path, _| {
        let hooks = seen.iter().filter(|r| r.path == "/hook").count();
        if path == "/hook" && hooks < fail_first {
            503
        } else {
            201
        }
    })
    .await
}

/// A local HTTP server standing in for every receiver, answering each request (path, body) as
/// `answer` says, given the requests before it.
async fn receiver_answering(
    answer: impl Fn(&[Received], &str, &[u8]) -> u16 + Clone + Send + Sync + 'static,
) -> (u16, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let seen = Arc::clone(&got);
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (seen, answer) = (Arc::clone(&seen), answer.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec();
            let mut seen = seen.lock().unwrap();
            let status = answer(&seen, parts.uri.path(), &body);
            seen.push(Received {
                path: parts.uri.path().to_owned(),
                headers: parts.headers,
                body,
                status,
            });
            axum::http::StatusCode::from_u16(status).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, got)
}

fn notifications_yaml(dir: &std::path::Path, port: u16) -> String {
    let file = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let (secret, token) = (
        file("hook-secret", "s3cret\n"),
        file("forge-token", "tok\n"),
    );
    let slack = file("slack-url", &format!("http://127.0.0.1:{port}/slack\n"));
    let base = format!("http://127.0.0.1:{port}");
    let forges: String = ["gitlab", "github", "gitea"]
        .iter()
        .map(|f| {
            format!("  - {{name: {f}, type: {f}, url: '{base}/{f}', token_file: '{token}'}}\n")
        })
        .collect();
    format!(
        "notifications:\n  receivers:\n  - {{name: hook, type: webhook, url: '{base}/hook', secret_file: '{secret}'}}\n  - {{name: chat, type: slack, url_file: '{slack}'}}\n{forges}"
    )
}

/// A failed sync, its recovery and a refused configuration reach a signed JSON webhook and a
/// Slack-compatible chat exactly once each; GitLab, GitHub and Gitea get pending → success or
/// failed per commit; a receiver answering 503 gets the message again; retries of a failing
/// sync and a kas restart (the agent re-sending its report) send nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_each_receiver_once_per_transition() {
    let Seed {
        env,
        agent_ns,
        dude,
        naww,
        rbac,
    } = Seed::new();
    let (port, got) = receiver(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let yaml = notifications_yaml(secrets.path(), port);
    let dude_yaml = deployment("nginx", &dude, 1);
    let initial = [("manifests/dude.yaml", Some(&dude_yaml[..]))];
    let (mut rig, c1) = rig_with(env, agent_ns, &rbac, "", &initial, &[], yaml).await;
    rig.synced(&c1).await;
    let naww_yaml = deployment("nginx", &naww, 1);
    let c2 = rig
        .manifests
        .commit(&[("manifests/naww.yaml", Some(&naww_yaml))], "forbidden");
    rig.synced(&c2).await;
    let retried = |n: usize| {
        let lines = rig.agent.log_lines();
        let failures = lines
            .iter()
            .filter(|l| l["msg"] == "Synchronization failed" && l["commit_id"] == c2.as_str());
        (failures.count() >= n).then_some(())
    };
    wait_for(
        "two retries of the failing sync",
        Duration::from_secs(30),
        || async { retried(3) },
    )
    .await;
    let c3 = rig
        .manifests
        .commit(&[("manifests/naww.yaml", None)], "fix");
    assert_eq!(rig.synced(&c3).await.outcome, ReportedOutcome::Succeeded);
    let delivered = |path: &'static str, n: usize| {
        let got = Arc::clone(&got);
        async move {
            let got = got.lock().unwrap();
            let ok: Vec<Received> = got
                .iter()
                .filter(|r| r.path.starts_with(path) && r.status == 201)
                .cloned()
                .collect();
            (ok.len() >= n).then_some(ok)
        }
    };
    // Everything delivered before the restart, so nothing is in flight when kas is killed.
    for (path, n) in [
        ("/hook", 2),
        ("/slack", 2),
        ("/gitlab/", 6),
        ("/github/", 6),
        ("/gitea/", 6),
    ] {
        wait_for(path, Duration::from_secs(30), || delivered(path, n)).await;
    }

    // A restart: the agent reconnects and re-sends its last report, which is no news.
    let reports = |kas: &Kas| kas.log().matches("Synchronization reported").count();
    let before = reports(&rig.kas);
    rig.kas.kill9_restart().await;
    wait_for(
        "the report re-sent after the restart",
        Duration::from_secs(30),
        || async { (reports(&rig.kas) > before).then_some(()) },
    )
    .await;
    // Then a refused configuration: queued after anything the restart might have queued.
    rig.config.commit(
        &[(".gitlab/agents/seed/config.yaml", Some(b"gitops: 5\n"))],
        "invalid",
    );
    // A fetch, a refusal and a delivery after a kill -9 and restart: 30 s was once too short
    // on a CI machine running the hundreds-of-fetches test beside it.
    let hook = wait_for(
        "the refusal on the webhook",
        Duration::from_secs(60),
        || delivered("/hook", 3),
    )
    .await;
    let chat = wait_for("the refusal in the chat", Duration::from_secs(30), || {
        delivered("/slack", 3)
    })
    .await;

    let events: Vec<String> = hook
        .iter()
        .map(|r| json_of(&r.body)["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events,
        ["sync_failed", "sync_recovered", "configuration_refused"]
    );
    for r in &hook {
        let signature = r.headers["x-tether-signature-256"].to_str().unwrap();
        assert_eq!(
            signature,
            format!("sha256={}", hmac_hex(b"s3cret", &r.body))
        );
    }
    let failed = json_of(&hook[0].body);
    assert_eq!(failed["commit"], c2.as_str());
    assert!(
        failed["failed_objects"][0]
            .as_str()
            .unwrap()
            .contains(&format!("Deployment {naww}/nginx"))
    );
    // The chat's order may differ: a message claimed by the killed kas waits for its claim to
    // expire; each is there once.
    let texts: Vec<String> = chat
        .iter()
        .map(|r| json_of(&r.body)["text"].as_str().unwrap().to_owned())
        .collect();
    for said in [
        "failed to sync `group/manifests`",
        "synced `group/manifests`",
        "refused the configuration",
    ] {
        assert_eq!(
            texts.iter().filter(|t| t.contains(said)).count(),
            1,
            "{said}: {texts:?}"
        );
    }
    let kas_text = rig.kas.metrics_text().await.unwrap();
    monitoring::assert_area_exported("gitops.rs notifications", &[&kas_text]);
    let all = got.lock().unwrap().clone();
    let attempts = all.iter().filter(|r| r.path == "/hook").count();
    assert_eq!(
        attempts, 4,
        "the 503 answered delivery was sent again, nothing else twice"
    );
    assert_eq!(all.iter().filter(|r| r.path == "/slack").count(), 3);
    let expected = [
        (&c1, "pending"),
        (&c1, "success"),
        (&c2, "pending"),
        (&c2, "failed"),
        (&c3, "pending"),
        (&c3, "success"),
    ];
    for (forge, prefix, failed_word) in [
        (
            "gitlab",
            "/gitlab/api/v4/projects/group%2Fmanifests/statuses/",
            "failed",
        ),
        (
            "github",
            "/github/repos/group/manifests/statuses/",
            "failure",
        ),
        (
            "gitea",
            "/gitea/api/v1/repos/group/manifests/statuses/",
            "failure",
        ),
    ] {
        let statuses: Vec<(String, String)> = all
            .iter()
            .filter(|r| r.path.starts_with(&format!("/{forge}/")))
            .map(|r| {
                let commit = r
                    .path
                    .strip_prefix(prefix)
                    .unwrap_or_else(|| panic!("{forge}: {}", r.path));
                (
                    commit.to_owned(),
                    json_of(&r.body)["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(c, s)| {
                (
                    (*c).clone(),
                    if *s == "failed" {
                        failed_word.to_owned()
                    } else {
                        (*s).to_owned()
                    },
                )
            })
            .collect();
        assert_eq!(statuses, want, "{forge}");
    }
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

/// HMAC-SHA256 as a receiver computes it (not kas's code).
fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// A newest commit kas refuses (here a file two globs match) while agentk keeps re-applying the
/// last good one every second: the status stays "failed at the refused commit, and why", the
/// re-syncs count as failed syncs in agentk's metrics (the last success does not advance), no
/// receiver hears of a recovery, and `kas agent reconcile --wait` exits 1 naming that commit.
/// Before, the first drift re-sync (5 min by default) replaced the failure with a success of
/// the older commit, said `sync_recovered`, and reconcile exited 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_newest_commit_stays_failed_across_resyncs_of_the_last_good_one() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("refusedstays").unwrap();
    let (port, got) = receiver(0).await;
    let secrets = tempfile::tempdir().unwrap();
    let yaml = notifications_yaml(secrets.path(), port);
    let initial = [("manifests/cm.yaml", Some(&configmap("app", &ns, "v1")[..]))];
    let second_glob = "    - glob: '/manifests/dup.yaml'\n";
    let resync = ["--gitops-resync-interval", "1s"];
    let (mut rig, c1) = rig_with(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        second_glob,
        &initial,
        &resync,
        yaml,
    )
    .await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);
    let dup = configmap("dup", &ns, "v1");
    let c2 = rig
        .manifests
        .commit(&[("manifests/dup.yaml", Some(&dup))], "matched twice");
    let refused = rig.synced(&c2).await;
    assert!(
        refused.error.contains("matched by two globs"),
        "{refused:?}"
    );
    let series =
        "agentk_gitops_last_successful_sync_timestamp_seconds{project=\"group/manifests\"}";
    let last_success = rig.agent.metric(series).await;

    // Three drift re-syncs of c1 after the refusal.
    let resyncs = || {
        let lines = rig.agent.log_lines();
        lines
            .iter()
            .filter(|l| l["msg"] == "Synchronization done" && l["commit_id"] == c1.as_str())
            .count()
    };
    let before = resyncs();
    wait_for("three re-syncs of c1", Duration::from_secs(60), || async {
        (resyncs() >= before + 3).then_some(())
    })
    .await;
    let status = rig.kas.admin.gitops_status(rig.agent_id).await.unwrap();
    let s = &status[0];
    assert_eq!(
        (s.commit_id.as_str(), s.outcome),
        (c2.as_str(), ReportedOutcome::Failed),
        "{s:?}"
    );
    assert!(s.error.contains("matched by two globs"), "{s:?}");
    let failed = "agentk_gitops_syncs_total{project=\"group/manifests\",outcome=\"failed\"}";
    let failures = rig.agent.metric(failed).await.unwrap_or(0.0);
    assert!(
        failures >= 4.0,
        "the refusal and three re-syncs: {failures}"
    );
    assert_eq!(rig.agent.metric(series).await, last_success);

    let out = reconcile_wait(&rig.kas, "60s").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("commit {} failed", &c2[..12])),
        "{stdout}"
    );
    assert!(stdout.contains("matched by two globs"), "{stdout}");

    // kas restarts: agentk asks for the head afresh and is told the refusal again, which is
    // not a new failure (no second error line, Event or count).
    let told = |msg: &str| {
        rig.agent
            .log_lines()
            .iter()
            .filter(|l| l["msg"] == msg && l["commit_id"] == c2.as_str())
            .count()
    };
    assert_eq!(told("Synchronization failed"), 1);
    let refusals = rig.agent.metric(failed).await.unwrap_or(0.0);
    let resyncs_before_restart = resyncs();
    rig.kas.restart_by(false).await;
    wait_for(
        "the refusal told again",
        Duration::from_secs(60),
        || async {
            let again = told("kas says the newest commit is still refused") >= 1;
            (again || told("Synchronization failed") > 1).then_some(())
        },
    )
    .await;
    assert_eq!(told("Synchronization failed"), 1);
    let counted = rig.agent.metric(failed).await.unwrap_or(0.0);
    let resynced = resyncs() - resyncs_before_restart;
    assert!(
        counted <= refusals + resynced as f64,
        "only re-syncs count as failures after the restart: {refusals} → {counted}, {resynced} re-syncs"
    );

    // A fix is the recovery, and the only one: delivered after anything queued before it.
    let c3 = rig.manifests.commit(&[("manifests/dup.yaml", None)], "fix");
    assert_eq!(rig.synced(&c3).await.outcome, ReportedOutcome::Succeeded);
    let events = wait_for(
        "the recovery on the webhook",
        Duration::from_secs(30),
        || {
            let (got, c3) = (Arc::clone(&got), c3.clone());
            async move {
                let got = got.lock().unwrap();
                let events: Vec<(String, String)> = got
                    .iter()
                    .filter(|r| r.path == "/hook")
                    .map(|r| {
                        let v = json_of(&r.body);
                        let word = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                        (word("event"), word("commit"))
                    })
                    .collect();
                events
                    .iter()
                    .any(|(e, c)| e == "sync_recovered" && *c == c3)
                    .then_some(events)
            }
        },
    )
    .await;
    assert_eq!(
        events,
        [
            ("sync_failed".to_owned(), c2.clone()),
            ("sync_recovered".to_owned(), c3.clone())
        ]
    );
}

/// An APIService for a made-up group whose Service has no endpoints: its discovery answers 503,
/// as a crashlooping metrics-server's does. Deleted when dropped: the control plane is shared.
struct BrokenApiService {
    env: TestEnv,
    name: String,
}

impl BrokenApiService {
    fn register(env: &TestEnv, ns: &str, group: &str) -> BrokenApiService {
        let name = format!("v1.{group}");
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: nowhere\n  namespace: {ns}\nspec:\n  ports:\n  - port: 443\n"
        );
        let spec = [
            format!("  group: {group}"),
            "  version: v1".into(),
            "  groupPriorityMinimum: 1000".into(),
            "  versionPriority: 15".into(),
            "  insecureSkipTLSVerify: true".into(),
            format!("  service: {{name: nowhere, namespace: {ns}, port: 443}}"),
        ]
        .join("\n");
        let yaml = format!(
            "{service}---\napiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
        );
        env.apply_yaml(&yaml).unwrap();
        BrokenApiService {
            env: env.clone(),
            name,
        }
    }
}

impl Drop for BrokenApiService {
    fn drop(&mut self) {
        let _ = self
            .env
            .kubectl()
            .args(["delete", "apiservice", &self.name, "--wait=false"])
            .output();
    }
}

/// One aggregated API that does not answer fails only its own objects: a ConfigMap change is
/// applied, a warning names the group, and an object of that group listed in the inventory is
/// neither pruned nor dropped from it (kas shows it failed, saying why). Before, every sync
/// failed with "API discovery failed" and nothing was applied until that API came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_api_group_fails_only_its_own_objects() {
    use tether_gitops_agent::inventory;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("apisvc").unwrap();
    let initial = [("manifests/cm.yaml", Some(&configmap("app", &ns, "v1")[..]))];
    let resync = ["--gitops-resync-interval", "1s"];
    let (rig, c1) = rig(env, ns.clone(), &admin_rbac(&ns), "", &initial, &resync).await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);

    let group = format!("{ns}.tether.test");
    let _broken = BrokenApiService::register(&rig.env, &ns, &group);
    let raw = format!("/apis/{group}/v1");
    let get_raw = |path: &str| rig.env.kubectl().args(["get", "--raw", path]).output().ok();
    wait_for(
        "the group listed, its query failing",
        Duration::from_secs(30),
        || async {
            let listed: Value = serde_json::from_slice(&get_raw("/apis")?.stdout).ok()?;
            let listed = listed["groups"]
                .as_array()?
                .iter()
                .any(|g| g["name"] == group.as_str());
            (listed && !get_raw(&raw)?.status.success()).then_some(())
        },
    )
    .await;

    // An object of that group in the inventory (as if applied while the group answered).
    let inv = inventory::inventory_name(rig.agent_id, "group/manifests");
    let widget = tether_gitops_agent::ObjRef {
        group: group.clone(),
        kind: "Widget".into(),
        namespace: Some(ns.clone()),
        name: "w1".into(),
    };
    let read_inventory = || {
        let cm = get_json(&rig.env, &["get", "configmap", &inv, "-n", &ns]).unwrap();
        let data: std::collections::BTreeMap<String, String> =
            serde_json::from_value(cm["data"].clone()).unwrap();
        inventory::decode(&data).unwrap()
    };
    let mut listed = read_inventory();
    listed.insert(widget.clone());
    let patch = serde_json::json!({"data": inventory::encode(&listed)}).to_string();
    let out = rig
        .env
        .kubectl()
        .args([
            "patch",
            "configmap",
            &inv,
            "-n",
            &ns,
            "--type=merge",
            "-p",
            &patch,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("app", &ns, "v2")))],
        "v2",
    );
    let s = rig.synced(&c2).await;
    let cm = get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).unwrap();
    assert_eq!(cm["data"]["value"], "v2", "the change was applied: {s:?}");
    let w = s
        .objects
        .iter()
        .find(|o| o.name == "w1")
        .expect("the widget is reported");
    assert_eq!(w.status, ReportedStatus::Failed, "{w:?}");
    assert!(
        w.message
            .contains(&format!("API group {group} is unavailable")),
        "{w:?}"
    );
    assert!(read_inventory().contains(&widget), "still in the inventory");
    // Two more syncs of the commit: the outage is said once, not at every sync, and its
    // reason as the API server gave it, not a dump of kube's error structure.
    wait_for(
        "two more syncs of the commit",
        Duration::from_secs(60),
        || async {
            let failed =
                rig.agent.log_lines().into_iter().filter(|l| {
                    l["msg"] == "Synchronization failed" && l["commit_id"] == c2.as_str()
                });
            (failed.count() >= 3).then_some(())
        },
    )
    .await;
    let warnings: Vec<Value> = rig
        .agent
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["level"].as_str().map(str::to_lowercase).as_deref() == Some("warn")
                && l["msg"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("API group unavailable")
                && l["group"] == group.as_str()
        })
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning names the group:\n{}",
        rig.agent.log()
    );
    let reason = warnings[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("503") && !reason.contains('{'),
        "a readable reason: {reason}"
    );
    // kube-client's own line for each 503, without URL or group, is not logged as an error.
    let contextless = rig.agent.log_lines().into_iter().find(|l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("failed with status"))
    });
    assert_eq!(contextless, None, "{}", rig.agent.log());
}

/// Two commits in quick succession: the first is still syncing (its Deployment's pod can be
/// scheduled nowhere, so agentk waits for it to become available) when the second reaches the
/// agent, which cancels the first sync and never reports it. The forges get the first commit
/// superseded (GitLab `canceled`, GitHub and Gitea `error`, naming the second), once, instead
/// of `pending` for good (a deploy that looked stuck in merge requests); the second gets
/// `pending` then `success`; no commit is left `pending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_superseded_before_its_sync_finished_does_not_stay_pending_on_forges() {
    let (port, got) = receiver(0).await;
    let (rig, ns, c0, _secrets) = forge_rig("superseded", port).await;

    let c1 = stuck_commit(&rig, &ns).await;
    let c2 = replacing_commit(&rig, &ns);
    assert_eq!(rig.synced(&c2).await.outcome, ReportedOutcome::Succeeded);

    for (forge, prefix, superseded) in FORGES {
        let statuses = wait_for(
            &format!("{forge} to get c2's success"),
            Duration::from_secs(30),
            || async {
                let statuses = forge_statuses(&got, prefix);
                let done = (c2.clone(), "success".to_owned());
                statuses
                    .iter()
                    .any(|(c, s, _)| (c, s) == (&done.0, &done.1))
                    .then_some(statuses)
            },
        )
        .await;
        let states: Vec<(&str, &str)> = statuses
            .iter()
            .map(|(c, s, _)| (c.as_str(), s.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                (c0.as_str(), "pending"),
                (c0.as_str(), "success"),
                (c1.as_str(), "pending"),
                (c1.as_str(), superseded),
                (c2.as_str(), "pending"),
                (c2.as_str(), "success"),
            ],
            "{forge}"
        );
        let said = &statuses[3].2;
        assert!(
            said.starts_with(&format!("superseded by {}", &c2[..8])),
            "{said}"
        );
    }
}

/// Commits pushed faster than their objects become Current (E2 saw a commit every few seconds
/// starve a project for ten minutes: each new commit cancelled the sync under way, none was
/// reported, and status showed a commit long gone). Each sync now finishes applying and
/// pruning, is reported `superseded` when the next commit arrives (what it pruned included),
/// and the forges keep `superseded` on it rather than a failure; the last commit, whose
/// objects all become Current, succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_pushed_faster_than_their_objects_become_current_are_each_applied_and_reported() {
    let (port, got) = receiver(0).await;
    let (rig, ns, c0, _secrets) = forge_rig("stream", port).await;
    let app = |v: &str| configmap("app", &ns, v);
    let (stuck, extra) = (unschedulable("stuck", &ns), configmap("extra", &ns, "x"));
    let c1 = rig.manifests.commit(
        &[
            ("manifests/stuck.yaml", Some(&stuck)),
            ("manifests/extra.yaml", Some(&extra)),
        ],
        "a Deployment that never becomes available",
    );
    // c2 drops `extra`; c3 changes `app`; c4 drops the Deployment and succeeds.
    let (v2, v3, v4) = (app("v2"), app("v3"), app("v4"));
    type Files<'a> = &'a [(&'a str, Option<&'a [u8]>)];
    let next: [(Files, &str); 3] = [
        (
            &[
                ("manifests/extra.yaml", None),
                ("manifests/cm.yaml", Some(&v2)),
            ],
            "drop extra",
        ),
        (&[("manifests/cm.yaml", Some(&v3))], "v3"),
        (
            &[
                ("manifests/stuck.yaml", None),
                ("manifests/cm.yaml", Some(&v4)),
            ],
            "drop the Deployment",
        ),
    ];
    let mut commits = vec![c1];
    for (files, message) in next {
        // Pushed once the previous commit's sync has started (else it would replace that
        // commit before any sync of it, which is right, but not what is tested here).
        let previous = commits.last().cloned().unwrap();
        rig.agent
            .wait_line("the previous commit's sync to start", |l| {
                l["msg"] == "Synchronizing objects" && l["commit_id"] == previous.as_str()
            })
            .await;
        commits.push(rig.manifests.commit(files, message));
        let s = rig.synced(&previous).await;
        assert_eq!(s.outcome, ReportedOutcome::Superseded, "{s:?}");
        assert!(
            s.error
                .starts_with("superseded: 1 resources were not Current yet"),
            "{}",
            s.error
        );
        let stuck_seen = s.objects.iter().find(|o| o.name == "stuck").unwrap();
        assert_eq!(
            stuck_seen.status,
            ReportedStatus::InProgress,
            "{stuck_seen:?}"
        );
        if message == "v3" {
            // c2's sync pruned `extra` before c3 cut its wait: reported, not lost.
            let extra = s.objects.iter().find(|o| o.name == "extra");
            assert_eq!(
                extra.map(|o| o.status),
                Some(ReportedStatus::Pruned),
                "{s:?}"
            );
        }
    }
    let last = commits.last().unwrap();
    assert_eq!(rig.synced(last).await.outcome, ReportedOutcome::Succeeded);
    let superseded = r#"agentk_gitops_syncs_total{project="group/manifests",outcome="superseded"}"#;
    assert_eq!(
        rig.agent.metric(superseded).await,
        Some(3.0),
        "{superseded}"
    );
    let failed = r#"agentk_gitops_syncs_total{project="group/manifests",outcome="failed"}"#;
    assert_eq!(rig.agent.metric(failed).await, None, "{failed}");

    // GitLab's statuses: the superseded commits stay `canceled` (the report of their
    // application says nothing the forge should show), the last one succeeds.
    let (forge, prefix, canceled) = FORGES[0];
    let statuses = wait_for(
        &format!("{forge} to get the last commit's success"),
        Duration::from_secs(30),
        || async {
            let statuses = forge_statuses(&got, prefix);
            statuses
                .iter()
                .any(|(c, s, _)| c == last && s == "success")
                .then_some(statuses)
        },
    )
    .await;
    let mut want = vec![(c0.as_str(), "pending"), (c0.as_str(), "success")];
    for c in &commits[..3] {
        want.extend([(c.as_str(), "pending"), (c.as_str(), canceled)]);
    }
    want.extend([(last.as_str(), "pending"), (last.as_str(), "success")]);
    let mut states: Vec<(&str, &str)> = statuses
        .iter()
        .map(|(c, s, _)| (c.as_str(), s.as_str()))
        .collect();
    // A commit's `canceled` and the next one's `pending` are queued together, in either order.
    states.sort_by_key(|(c, _)| commits.iter().position(|x| x == c).map_or(0, |i| i + 1));
    assert_eq!(states, want);
}

/// Commits pushed while syncs wait for objects that never become Current, with agentk killed
/// (kill -9) while one sync waits and kas killed while the next one does: the syncs cut by
/// the kills are never finished, yet the last commit succeeds and the cluster and the
/// inventory hold exactly its objects: what earlier commits dropped was pruned, nothing is
/// orphaned (an evaluator checked this by hand only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_syncs_converge_across_kill9_of_agentk_and_kas() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("converge").unwrap();
    let (stuck, extra) = (unschedulable("stuck", &ns), configmap("extra", &ns, "x"));
    let v1 = configmap("app", &ns, "v1");
    let initial = [
        ("manifests/stuck.yaml", Some(&stuck[..])),
        ("manifests/extra.yaml", Some(&extra[..])),
        ("manifests/cm.yaml", Some(&v1[..])),
    ];
    let (mut rig, c1) = rig(env, ns.clone(), &admin_rbac(&ns), "", &initial, &[]).await;
    let under_way = |agent: &Agent, commit: &str| {
        let commit = commit.to_owned();
        let lines = agent.log_lines();
        lines
            .iter()
            .any(|l| l["msg"] == "Synchronizing objects" && l["commit_id"] == commit.as_str())
    };
    wait_for("c1's sync under way", Duration::from_secs(60), || async {
        under_way(&rig.agent, &c1).then_some(())
    })
    .await;
    rig.agent.kill9();
    let v2 = configmap("app", &ns, "v2");
    let c2 = rig.manifests.commit(
        &[
            ("manifests/extra.yaml", None),
            ("manifests/cm.yaml", Some(&v2)),
        ],
        "drop extra",
    );
    rig.agent = rig.start_agent("seed-again");
    wait_for("c2's sync under way", Duration::from_secs(60), || async {
        under_way(&rig.agent, &c2).then_some(())
    })
    .await;
    rig.kas.kill9_restart().await;
    let v3 = configmap("app", &ns, "v3");
    let c3 = rig.manifests.commit(
        &[
            ("manifests/stuck.yaml", None),
            ("manifests/cm.yaml", Some(&v3)),
        ],
        "drop the Deployment",
    );
    let s = rig.synced(&c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");

    assert!(get_json(&rig.env, &["get", "deployment", "stuck", "-n", &ns]).is_none());
    assert!(get_json(&rig.env, &["get", "configmap", "extra", "-n", &ns]).is_none());
    let app = get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).unwrap();
    assert_eq!(app["data"]["value"], "v3");
    let inv = tether_gitops_agent::inventory::inventory_name(rig.agent_id, "group/manifests");
    let cm = get_json(&rig.env, &["get", "configmap", &inv, "-n", &ns]).unwrap();
    let data: std::collections::BTreeMap<String, String> =
        serde_json::from_value(cm["data"].clone()).unwrap();
    let recorded: Vec<String> = tether_gitops_agent::inventory::decode(&data)
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(recorded, [format!("/ConfigMap/{ns}/app")]);
}

/// `kas agent reconcile` while a sync waits for its objects supersedes that sync as a new
/// commit does: it is reported with what it pruned, and the sync answering the request runs
/// after it. E2 saw a reconcile cancel a sync that had pruned, and only the next one (which
/// pruned nothing) was reported: the prune went unreported. The superseded report says a
/// re-sync of the same commit cut it (it said "a newer synchronization").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_during_a_sync_reports_what_that_sync_pruned_then_answers() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("resyncprune").unwrap();
    let (stuck, extra) = (unschedulable("stuck", &ns), configmap("extra", &ns, "x"));
    let initial = [("manifests/extra.yaml", Some(&extra[..]))];
    let (rig, c1) = rig(env, ns.clone(), &admin_rbac(&ns), "", &initial, &[]).await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Succeeded);
    // c2 prunes `extra` and then waits for a Deployment that never becomes available.
    let c2 = rig.manifests.commit(
        &[
            ("manifests/extra.yaml", None),
            ("manifests/stuck.yaml", Some(&stuck)),
        ],
        "prune extra, wait for stuck",
    );
    rig.agent
        .wait_line("c2's prune", |l| {
            l["msg"] == "resourcePruned" && l["name"] == "extra"
        })
        .await;
    // Followed until the timeout (the answering sync waits for `stuck` too): it shows the
    // superseded sync's prune, which the answering report ("0 pruned") does not repeat.
    let out = rig
        .kas
        .cli()
        .args([
            "agent",
            "reconcile",
            "group/config:seed",
            "--wait",
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cut = format!(
        "group/manifests: commit {} superseded: 1 applied, 0 Current, 1 not Current, 1 pruned;",
        &c2[..12]
    );
    assert!(
        stdout.lines().any(|l| l.starts_with(&cut)
            && l.ends_with("(a synchronization during this reconcile, not its answer)")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = rig.synced(&c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Superseded, "{s:?}");
    assert_eq!(s.resync_id, 0, "answers no reconcile: {s:?}");
    // A re-sync of the commit it was syncing cut it, not a newer commit (E4 L6).
    assert!(
        s.error
            .contains("when a re-sync of the same commit (kas agent reconcile) became due"),
        "{s:?}"
    );
    let pruned = s.objects.iter().find(|o| o.name == "extra");
    assert_eq!(
        pruned.map(|o| o.status),
        Some(ReportedStatus::Pruned),
        "{s:?}"
    );
    rig.agent
        .wait_line("the sync answering the reconcile", |l| {
            l["msg"] == "Synchronizing objects"
                && l["commit_id"] == c2.as_str()
                && l["resync_id"].as_u64() > Some(0)
        })
        .await;
}

/// Each forge's name, the path its commit statuses are posted under (the commit follows), and
/// what it calls a superseded commit.
const FORGES: [(&str, &str, &str); 3] = [
    (
        "gitlab",
        "/gitlab/api/v4/projects/group%2Fmanifests/statuses/",
        "canceled",
    ),
    ("github", "/github/repos/group/manifests/statuses/", "error"),
    (
        "gitea",
        "/gitea/api/v1/repos/group/manifests/statuses/",
        "error",
    ),
];

/// The statuses a forge accepted (answered 201), in order: (commit, state, description).
fn forge_statuses(got: &Mutex<Vec<Received>>, prefix: &str) -> Vec<(String, String, String)> {
    let got = got.lock().unwrap();
    got.iter()
        .filter(|r| r.status == 201)
        .filter_map(|r| {
            let commit = r.path.strip_prefix(prefix)?;
            let body = json_of(&r.body);
            let field = |k: &str| body[k].as_str().unwrap().to_owned();
            Some((commit.to_owned(), field("state"), field("description")))
        })
        .collect()
}

/// A forge that answers 500 to a commit's `pending` until it has accepted another status of
/// that commit: the `pending` is retried after the commit's `success` was delivered.
fn pending_fails_until_final(seen: &[Received], path: &str, body: &[u8]) -> u16 {
    let state = |body: &[u8]| {
        serde_json::from_slice::<Value>(body).ok()?["state"]
            .as_str()
            .map(str::to_owned)
    };
    let is_forge = FORGES.iter().any(|(_, prefix, _)| path.starts_with(prefix));
    let finished = seen
        .iter()
        .any(|r| r.path == path && r.status == 201 && state(&r.body).as_deref() != Some("pending"));
    if is_forge && state(body).as_deref() == Some("pending") && !finished {
        500
    } else {
        201
    }
}

/// Forges answer 500 to the commit's `pending` until they have its `success`, so kas retries
/// the `pending` (with backoff) while the agent's report comes and its `success` is delivered.
/// The retried `pending` is dropped, not sent after the `success` (which would leave the
/// commit `pending` on the forge for good): `success` is the last status each forge accepts,
/// and kas counts the three drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retried_after_its_commits_success_is_dropped_not_sent_after_it() {
    let (port, got) = receiver_answering(pending_fails_until_final).await;
    let (rig, _ns, c0, _secrets) = forge_rig("ordered", port).await;

    // Settled: each forge has the `success`, and the `pending` was either accepted (the
    // defect) or dropped.
    let dropped = r#"kas_notifications_total{outcome="dropped"}"#;
    let (dropped, statuses) = wait_for(
        "every forge's statuses of the commit to settle",
        Duration::from_secs(60),
        || async {
            let dropped = rig.kas.metric(dropped).await.unwrap_or(0.0);
            let statuses: Vec<_> = FORGES
                .iter()
                .map(|(_, prefix, _)| forge_statuses(&got, prefix))
                .collect();
            let has = |s: &[(String, String, String)], state: &str| {
                s.iter().any(|(c, st, _)| *c == c0 && st == state)
            };
            let settled = statuses
                .iter()
                .all(|s| has(s, "success") && (has(s, "pending") || dropped >= 3.0));
            settled.then_some((dropped, statuses))
        },
    )
    .await;
    for ((forge, _, _), statuses) in FORGES.iter().zip(&statuses) {
        let states: Vec<&str> = statuses.iter().map(|(_, s, _)| s.as_str()).collect();
        assert_eq!(states, ["success"], "{forge}: the only status accepted");
    }
    assert_eq!(dropped, 3.0, "one pending dropped per forge");
}

/// The agent gets a commit whose sync never finishes, and agentk is killed before reporting
/// it; a newer commit is pushed and a new agentk, whose stream says it has no commit, gets it.
/// The first commit, sent on the earlier stream, is marked superseded on every forge (not left
/// `pending` for good, as when only the stream that sent it knew of it); the one before it,
/// which the agent reported, keeps its `success`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_sent_before_agentk_restarted_is_superseded_by_the_next_one_on_forges() {
    let (port, got) = receiver(0).await;
    let (mut rig, ns, c0, _secrets) = forge_rig("restarted", port).await;

    let c1 = stuck_commit(&rig, &ns).await;
    rig.agent.kill9();
    let c2 = replacing_commit(&rig, &ns);
    rig.agent = rig.start_agent("agentk-2");
    assert_eq!(rig.synced(&c2).await.outcome, ReportedOutcome::Succeeded);

    for (forge, prefix, superseded) in FORGES {
        let statuses = wait_for(
            &format!("{forge} to get c1's and c2's last statuses"),
            Duration::from_secs(30),
            || async {
                let statuses = forge_statuses(&got, prefix);
                let has = |commit: &str, state: &str| {
                    statuses.iter().any(|(c, s, _)| c == commit && s == state)
                };
                (has(&c1, superseded) && has(&c2, "success")).then_some(statuses)
            },
        )
        .await;
        let of = |commit: &str| -> Vec<String> {
            let mine = statuses.iter().filter(|(c, _, _)| c == commit);
            mine.map(|(_, s, _)| s.clone()).collect()
        };
        assert_eq!(of(&c0), ["pending", "success"], "{forge}");
        assert_eq!(of(&c1), ["pending", superseded], "{forge}");
        assert_eq!(of(&c2), ["pending", "success"], "{forge}");
        let said = &statuses
            .iter()
            .find(|(c, s, _)| *c == c1 && s == superseded)
            .unwrap()
            .2;
        assert!(
            said.starts_with(&format!("superseded by {}", &c2[..8])),
            "{forge}: {said}"
        );
    }
}

/// The database fails while agentk reports a failed sync (the outbox's table renamed away, so
/// every write to it fails): kas refuses the report, with its notifications, and agentk sends
/// it again until the table is back; then the webhook gets `sync_failed` and every forge the
/// commit's `failed`, once each, before the next commit's news. Before, the report was stored
/// and its notifications lost (only counted), and agentk's retry was no news: the commit
/// stayed `pending` on the forges and `sync_failed` never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_whose_notifications_failed_to_queue_is_notified_once_the_database_works() {
    let (port, got) = receiver(0).await;
    let (rig, _ns, _c0, _secrets) = forge_rig("outboxaway", port).await;
    let db = rig.kas.dir.join("data/kas.sqlite");

    outbox_away(&db, true).await;
    let c1 = rig.manifests.commit(
        &[("manifests/broken.yaml", Some(b"kind: [unclosed\n"))],
        "does not decode",
    );
    // The report's fate while the outbox is away: refused (agentk keeps it), or stored.
    let refusal = "Storing a sync report failed; the agent sends it again";
    wait_for(
        "kas to take or refuse c1's report",
        Duration::from_secs(60),
        || async {
            let status = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            let stored = status.iter().any(|s| s.commit_id == c1);
            (stored || rig.kas.log().contains(refusal)).then_some(())
        },
    )
    .await;
    outbox_away(&db, false).await;
    assert_eq!(rig.synced(&c1).await.outcome, ReportedOutcome::Failed);
    let c2 = rig
        .manifests
        .commit(&[("manifests/broken.yaml", None)], "fix");
    assert_eq!(rig.synced(&c2).await.outcome, ReportedOutcome::Succeeded);

    let hook = wait_for(
        "the recovery on the webhook",
        Duration::from_secs(60),
        || {
            let got = Arc::clone(&got);
            async move {
                let events = hook_events(&got);
                events
                    .contains(&"sync_recovered".to_owned())
                    .then_some(events)
            }
        },
    )
    .await;
    assert_eq!(hook, ["sync_failed", "sync_recovered"]);
    for (forge, prefix, _) in FORGES {
        let statuses = wait_for(
            &format!("{forge} to get c2's success"),
            Duration::from_secs(30),
            || async {
                let statuses = forge_statuses(&got, prefix);
                let done = statuses.iter().any(|(c, s, _)| *c == c2 && s == "success");
                done.then_some(statuses)
            },
        )
        .await;
        // c1's `pending` was lost with the outbox away (a commit sent is acknowledged before
        // its status is queued); its outcome (each forge's word for failed) arrived, once.
        let outcome: Vec<&str> = statuses
            .iter()
            .filter(|(c, s, _)| *c == c1 && s != "pending")
            .map(|(_, _, description)| description.as_str())
            .collect();
        assert_eq!(outcome.len(), 1, "{forge}: {statuses:?}");
        assert!(outcome[0].contains("unclosed"), "{forge}: {outcome:?}");
    }
    assert!(
        rig.kas.log().contains(refusal),
        "the report was refused first"
    );
}

/// The events delivered to the webhook, in order.
fn hook_events(got: &Mutex<Vec<Received>>) -> Vec<String> {
    let got = got.lock().unwrap();
    got.iter()
        .filter(|r| r.path == "/hook" && r.status == 201)
        .map(|r| json_of(&r.body)["event"].as_str().unwrap().to_owned())
        .collect()
}

/// Renames kas's outbox table away (`away`), so that every write to it fails as in a database
/// outage, or back; through a connection of the test's own.
async fn outbox_away(db: &std::path::Path, away: bool) {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let sql = if away {
        "ALTER TABLE notifications RENAME TO notifications_away"
    } else {
        "ALTER TABLE notifications_away RENAME TO notifications"
    };
    sqlx::query(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

/// kas with every kind of receiver at `port`, an agent, and its first commit (a ConfigMap)
/// synced: (rig, agent namespace, first commit, the receivers' secrets to keep).
async fn forge_rig(ns: &str, port: u16) -> (Rig, String, String, tempfile::TempDir) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(ns).unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let yaml = notifications_yaml(secrets.path(), port);
    let initial = [("manifests/cm.yaml", Some(&configmap("app", &ns, "v1")[..]))];
    let rbac = admin_rbac(&ns);
    let (rig, c0) = rig_with(env, ns.clone(), &rbac, "", &initial, &[], yaml).await;
    assert_eq!(rig.synced(&c0).await.outcome, ReportedOutcome::Succeeded);
    (rig, ns, c0, secrets)
}

/// Commits a Deployment that never becomes available and waits until the agent applies it:
/// its sync is under way and does not finish.
async fn stuck_commit(rig: &Rig, ns: &str) -> String {
    let c1 = rig.manifests.commit(
        &[("manifests/stuck.yaml", Some(&unschedulable("stuck", ns)))],
        "never available",
    );
    rig.agent
        .wait_line("the first commit's sync to be under way", |l| {
            l["msg"] == "resourceApplied" && l["name"] == "stuck"
        })
        .await;
    c1
}

/// Commits the removal of the stuck Deployment and a new ConfigMap (a sync that succeeds).
fn replacing_commit(rig: &Rig, ns: &str) -> String {
    let v2 = configmap("app", ns, "v2");
    rig.manifests.commit(
        &[
            ("manifests/stuck.yaml", None),
            ("manifests/cm.yaml", Some(&v2)),
        ],
        "replaces it",
    )
}

/// A Deployment whose pod can be scheduled nowhere: agentk waits for it to become available,
/// so a sync applying it does not finish.
fn unschedulable(name: &str, ns: &str) -> Vec<u8> {
    String::from_utf8(deployment(name, ns, 1))
        .unwrap()
        .replace(
            "    spec:\n      containers:",
            "    spec:\n      nodeSelector:\n        tether.test/none: none\n      containers:",
        )
        .into_bytes()
}

/// `post_build`: `${cluster_name}` comes from `substitute`, `${region}` and `${replicas:=2}` from
/// a ConfigMap in the cluster (its default while the key is missing), `replicas` being applied
/// as a number. The ConfigMap is read at every sync: a change to it takes effect at the next
/// re-sync of the same commit, and once it is deleted syncs fail naming it, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_build_variables_come_from_the_configuration_and_a_configmap_read_at_every_sync() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("postbuild").unwrap();
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cluster-vars\n  namespace: {ns}\ndata:\n  region: eu-west\n"
    ))
    .unwrap();
    let extra = format!(
        "    post_build:\n      substitute:\n        cluster_name: prod-eu\n      substitute_from:\n      - kind: ConfigMap\n        name: cluster-vars\n        namespace: {ns}\n"
    );
    let web = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-${cluster_name}\n  labels:\n    region: ${region}\nspec:\n  replicas: ${replicas:=2}\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.27\n";
    let settings = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  cluster: ${cluster_name}\n  escaped: $${literal}\n  unset: \"${not_set}\"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: script\n  annotations:\n    kustomize.toolkit.fluxcd.io/substitute: disabled\ndata:\n  run.sh: echo ${cluster_name}\n";
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        &extra,
        &[
            ("manifests/web.yaml", Some(web.as_bytes())),
            ("manifests/settings.yaml", Some(settings.as_bytes())),
        ],
        &["--gitops-resync-interval", "1s"],
    )
    .await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    // The variable that is not set is said, once, for its file; defaults and escapes are not.
    let [emptied] = &s.warnings[..] else {
        panic!("one warning: {:?}", s.warnings);
    };
    assert!(
        emptied.starts_with("manifests/settings.yaml: post_build variables not set, substituted as empty: ${not_set} ("),
        "{emptied}"
    );
    let deployment = || get_json(&rig.env, &["get", "deployment", "web-prod-eu", "-n", &ns]);
    let d = deployment().expect("the Deployment named from substitute");
    assert_eq!(d["spec"]["replicas"], 2, "the default, as a number");
    assert_eq!(d["metadata"]["labels"]["region"], "eu-west");
    let cm = get_json(&rig.env, &["get", "configmap", "settings", "-n", &ns]).expect("settings");
    assert_eq!(cm["data"]["cluster"], "prod-eu");
    assert_eq!(cm["data"]["escaped"], "${literal}");
    assert_eq!(cm["data"]["unset"], "");
    let script = get_json(&rig.env, &["get", "configmap", "script", "-n", &ns]).expect("script");
    assert_eq!(script["data"]["run.sh"], "echo ${cluster_name}");

    // The ConfigMap changes in the cluster, not in Git: the next re-sync applies it.
    run_output(rig.env.kubectl().args([
        "patch",
        "configmap",
        "cluster-vars",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"data":{"replicas":"3"}}"#,
    ]))
    .unwrap();
    wait_for(
        "the re-sync to apply the ConfigMap's new variable",
        Duration::from_secs(60),
        || async { (deployment()?["spec"]["replicas"] == 3).then_some(()) },
    )
    .await;

    // Without the ConfigMap the syncs fail, naming it, and leave the objects as they were.
    run_output(
        rig.env
            .kubectl()
            .args(["delete", "configmap", "cluster-vars", "-n", &ns]),
    )
    .unwrap();
    let expected = format!(
        "post_build.substitute_from[0]: ConfigMap {ns}/cluster-vars does not exist (create it, or set optional: true on the reference); nothing was applied"
    );
    let failed = wait_for(
        "a sync failing on the missing ConfigMap",
        Duration::from_secs(60),
        || async {
            let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            syncs
                .into_iter()
                .find(|s| s.outcome == ReportedOutcome::Failed && s.error.contains("cluster-vars"))
        },
    )
    .await;
    assert_eq!(failed.error, expected);
    assert_eq!(deployment().expect("still there")["spec"]["replicas"], 3);
}

/// A rig for `depends_on`: one repository serving two entries, `group/manifests` (the
/// infrastructure, files under `infra/`) and `group/apps` (files under `apps/`), which depends
/// on it; `files` makes the infrastructure's and the apps' manifest from the namespace.
/// Returns the rig, its namespace and the first commit.
async fn depends_rig(
    prefix: &str,
    files: impl FnOnce(&str) -> (Vec<u8>, Vec<u8>),
) -> (Rig, String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(prefix).unwrap();
    let (infra, apps) = files(&ns);
    let entry = format!(
        "    paths:\n    - glob: '/infra/*.yaml'\n  - id: group/apps\n    default_namespace: {ns}\n    paths:\n    - glob: '/apps/*.yaml'\n    depends_on: [group/manifests]\n"
    );
    let initial = [
        ("infra/infra.yaml", Some(&infra[..])),
        ("apps/app.yaml", Some(&apps[..])),
    ];
    let (rig, c1) = two_folder_rig(env, &ns, &entry, &initial).await;
    rig.kas
        .set_projects(&[("group/apps", &rig.manifests)])
        .await;
    (rig, ns, c1)
}

/// A rig whose repository starts with `initial` (two folders), the agent's configuration
/// listing `entry` after the first entry's `id` and `default_namespace` (kas polls every
/// 300 ms). Returns the rig and the first commit.
async fn two_folder_rig(
    env: TestEnv,
    ns: &str,
    entry: &str,
    initial: &[(&str, Option<&[u8]>)],
) -> (Rig, String) {
    two_folder_rig_polling(env, ns, entry, initial, "300ms").await
}

/// [`two_folder_rig`] with kas polling the repositories every `git_poll`.
async fn two_folder_rig_polling(
    env: TestEnv,
    ns: &str,
    entry: &str,
    initial: &[(&str, Option<&[u8]>)],
    git_poll: &'static str,
) -> (Rig, String) {
    let rbac = admin_rbac(ns);
    let args = RigArgs {
        env,
        agent_ns: ns.to_owned(),
        rbac: &rbac,
        project_extra: "",
        initial,
        agent_args: &[],
    };
    let opts = KasOptions {
        git_poll,
        ..KasOptions::default()
    };
    rig_entry(args, entry, opts).await
}

/// Waits until kas shows a report of `group/apps` at `commit` for which `wanted` holds.
async fn apps_report(
    rig: &Rig,
    commit: &str,
    what: &str,
    wanted: impl Fn(&kas::api::SyncView) -> bool,
) -> kas::api::SyncView {
    entry_report(rig, "group/apps", commit, what, wanted).await
}

/// Waits until kas shows a report of the entry `key` at `commit` for which `wanted` holds.
async fn entry_report(
    rig: &Rig,
    key: &str,
    commit: &str,
    what: &str,
    wanted: impl Fn(&kas::api::SyncView) -> bool,
) -> kas::api::SyncView {
    wait_for(what, Duration::from_secs(90), || async {
        rig.kas
            .admin
            .gitops_status(rig.agent_id)
            .await
            .ok()?
            .into_iter()
            .find(|s| s.project_id == key && s.commit_id == commit && wanted(s))
    })
    .await
}

/// Flux's `dependsOn`: `group/apps` depends on `group/manifests`, whose Deployment can be
/// scheduled only on a node labelled for this test. Until it is Current, apps applies nothing
/// and its status says what it waits for; once a node gets the label, the Deployment becomes
/// Available, the infrastructure's sync succeeds and apps applies at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_waits_for_its_dependency_to_be_current_then_applies() {
    // A label value of this run only, so that no other test's pods land on the node.
    let (label, value) = ("tether.test/depends-on", tether_testenv::unique_name("dep"));
    let (rig, ns, c1) = depends_rig("dep-ok", |ns| {
        let infra = String::from_utf8(deployment("db", ns, 1)).unwrap().replace(
            "    spec:\n      containers:",
            &format!("    spec:\n      nodeSelector:\n        {label}: {value}\n      containers:"),
        );
        (infra.into_bytes(), configmap("app", ns, "v1"))
    })
    .await;
    let waiting = apps_report(&rig, &c1, "apps waiting for the infrastructure", |s| {
        s.outcome == ReportedOutcome::Waiting && s.error.contains("is under way")
    })
    .await;
    assert!(
        waiting
            .error
            .starts_with("waiting for dependency group/manifests: its synchronization of commit "),
        "{waiting:?}"
    );
    assert!(
        get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).is_none(),
        "apps applied before its dependency was Current"
    );
    let waiting_series = r#"agentk_gitops_waiting_for_dependencies{project="group/apps"}"#;
    assert_eq!(rig.agent.metric(waiting_series).await, Some(1.0));

    // `reconcile --wait` follows the wait (it exited 1 at once on every monorepo commit):
    // it shows the wait, then the entry's synchronization once the dependency is ready.
    let mut reconcile = reconcile_wait(&rig.kas, "120s")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(reconcile.stdout.take().unwrap()));
    let mut shown = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        shown.push(line.clone());
        if line.starts_with("group/apps: commit ") && line.contains("waiting for dependency") {
            break;
        }
    }
    let node = first_node(&rig.env);
    let labelled = format!("{label}={value}");
    run_output(rig.env.kubectl().args(["label", "node", &node, &labelled])).unwrap();
    shown.extend(lines.map(Result::unwrap));
    let status = reconcile.wait().unwrap();
    assert!(status.success(), "{status}: {shown:#?}");
    assert!(
        shown
            .iter()
            .any(|l| l.starts_with("group/apps: commit ") && l.contains(" succeeded: ")),
        "{shown:#?}"
    );
    let infra_done = rig.synced_in("group/manifests", &c1).await;
    let applied = apps_report(&rig, &c1, "apps applied", |s| {
        s.outcome == ReportedOutcome::Succeeded
    })
    .await;
    run_output(
        rig.env
            .kubectl()
            .args(["label", "node", &node, &format!("{label}-")]),
    )
    .unwrap();
    assert_eq!(
        infra_done.outcome,
        ReportedOutcome::Succeeded,
        "{infra_done:?}"
    );
    assert!(
        applied.objects.iter().any(|o| o.name == "app"),
        "{applied:?}"
    );
    assert_eq!(rig.agent.metric(waiting_series).await, Some(0.0));
    let cm = get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).unwrap();
    let db = get_json(&rig.env, &["get", "deployment", "db", "-n", &ns]).unwrap();
    let available = db["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Available" && c["status"] == "True")
        .expect("the Deployment is Available");
    // RFC 3339 UTC timestamps of one format compare as strings.
    let (created, ready) = (
        cm["metadata"]["creationTimestamp"].as_str().unwrap(),
        available["lastTransitionTime"].as_str().unwrap(),
    );
    assert!(
        created >= ready,
        "apps applied at {created}, the infrastructure ready at {ready}"
    );
}

/// Two entries of one project (a monorepo), `apps` depending on `infra`: a commit changing
/// both reaches the two entries' streams at slightly different moments. `apps` must not apply
/// it before `infra` has synchronized it, and not at all when `infra` fails on it. It applied
/// it first whenever its stream got the commit first (2 runs in 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monorepo_commit_reaching_the_dependant_first_waits_for_the_dependency() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("dep-mono").unwrap();
    let entry = format!(
        "    name: infra\n    paths:\n    - glob: '/infra/*.yaml'\n  - id: group/manifests\n    name: apps\n    default_namespace: {ns}\n    paths:\n    - glob: '/apps/*.yaml'\n    depends_on: ['group/manifests#infra']\n"
    );
    let (infra, apps) = (configmap("infra", &ns, "1"), configmap("app", &ns, "1"));
    let initial = [
        ("infra/infra.yaml", Some(&infra[..])),
        ("apps/app.yaml", Some(&apps[..])),
    ];
    let (rig, c1) = two_folder_rig(env, &ns, &entry, &initial).await;
    entry_report(&rig, "group/manifests#apps", &c1, "apps applied", |s| {
        s.outcome == ReportedOutcome::Succeeded
    })
    .await;
    // Infrastructure that cannot apply: a namespace that does not exist.
    let broken = configmap("infra", &format!("{ns}-missing"), "x");
    for round in 2..5 {
        let value = round.to_string();
        let app = configmap("app", &ns, &value);
        let commit = rig.manifests.commit(
            &[
                ("infra/infra.yaml", Some(&broken[..])),
                ("apps/app.yaml", Some(&app[..])),
            ],
            "infra and apps",
        );
        let failed = entry_report(
            &rig,
            "group/manifests#infra",
            &commit,
            "infra failing",
            |s| s.outcome == ReportedOutcome::Failed,
        )
        .await;
        assert!(!failed.error.is_empty(), "{failed:?}");
        let cm = get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).unwrap();
        assert_ne!(
            cm["data"]["value"], value,
            "round {round}: apps applied the commit its dependency failed on"
        );
        let fixed = configmap("infra", &ns, &value);
        let commit = rig
            .manifests
            .commit(&[("infra/infra.yaml", Some(&fixed[..]))], "infra fixed");
        entry_report(&rig, "group/manifests#apps", &commit, "apps applied", |s| {
            s.outcome == ReportedOutcome::Succeeded
        })
        .await;
        let cm = get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).unwrap();
        assert_eq!(cm["data"]["value"], value, "round {round}");
    }
}

/// A dependant of an entry whose sync fails applies nothing and says so, naming the
/// dependency and its error, in `kas agent status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_waiting_on_a_failing_dependency_says_so_in_agent_status() {
    let (rig, ns, c1) = depends_rig("dep-fail", |ns| {
        (b"kind: [unclosed\n".to_vec(), configmap("app", ns, "v1"))
    })
    .await;
    let failed = rig.synced_in("group/manifests", &c1).await;
    assert_eq!(failed.outcome, ReportedOutcome::Failed, "{failed:?}");
    let waiting = apps_report(
        &rig,
        &c1,
        "apps waiting on the failed infrastructure",
        |s| s.outcome == ReportedOutcome::Waiting && s.error.contains("failed"),
    )
    .await;
    let short = &c1[..8];
    assert!(
        waiting.error.starts_with(&format!(
            "waiting for dependency group/manifests: its last synchronization (commit {short}) failed: "
        )) && waiting.error.contains("infra/infra.yaml"),
        "{waiting:?}"
    );
    assert!(get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).is_none());

    let stdout = seed_status(&rig);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("group/apps"))
        .unwrap_or_else(|| panic!("no line of group/apps: {stdout}"));
    assert!(
        line.contains(" waiting ")
            && line.contains("waiting for dependency group/manifests: its last synchronization"),
        "{line}"
    );
}

/// `kas agent reconcile group/config:seed --wait --timeout <timeout>`.
fn reconcile_wait(kas: &Kas, timeout: &str) -> std::process::Command {
    let mut c = kas.cli();
    c.args([
        "agent",
        "reconcile",
        "group/config:seed",
        "--wait",
        "--timeout",
        timeout,
    ]);
    c
}

/// What `kas agent status` prints for the rig's agent.
fn seed_status(rig: &Rig) -> String {
    let out = rig
        .kas
        .cli()
        .args(["agent", "status", "group/config:seed"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The name of a node of the test cluster (kwok's).
fn first_node(env: &TestEnv) -> String {
    let nodes = get_json(env, &["get", "nodes"]).unwrap();
    nodes["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Flux's usual monorepo (fluxcd/flux2-kustomize-helm-example): one repository, its
/// `infrastructure/` and `apps/` folders listed as two named entries of the same project, apps
/// depending on `group/manifests#infra`. Both apply, each into its own inventory, and `kas agent
/// status` shows both; the apps folder emptied prunes the apps' objects only; and the apps
/// entry removed from the configuration leaves the infrastructure's entry as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_named_entries_of_one_repository_apply_and_prune_apart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("mono").unwrap();
    let infra_entry = "    name: infra\n    paths:\n    - glob: '/infrastructure/*.yaml'\n";
    let apps_entry = format!(
        "  - id: group/manifests\n    name: apps\n    default_namespace: {ns}\n    paths:\n    - glob: '/apps/*.yaml'\n    allow_empty: true\n    depends_on: ['group/manifests#infra']\n"
    );
    let (infra_cm, app_cm) = (configmap("infra", &ns, "v1"), configmap("app", &ns, "v1"));
    let initial = [
        ("infrastructure/infra.yaml", Some(&infra_cm[..])),
        ("apps/app.yaml", Some(&app_cm[..])),
    ];
    let entries = format!("{infra_entry}{apps_entry}");
    let (rig, c1) = two_folder_rig(env, &ns, &entries, &initial).await;
    let (infra_key, apps_key) = ("group/manifests#infra", "group/manifests#apps");
    let infra = applied_in(&rig, infra_key, &c1).await;
    let apps = applied_in(&rig, apps_key, &c1).await;
    assert_eq!(infra.outcome, ReportedOutcome::Succeeded, "{infra:?}");
    assert_eq!(apps.outcome, ReportedOutcome::Succeeded, "{apps:?}");
    assert!(apps.finished_at >= infra.finished_at, "{apps:?} {infra:?}");
    let names =
        |v: &kas::api::SyncView| v.objects.iter().map(|o| o.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&infra), ["infra"]);
    assert_eq!(names(&apps), ["app"]);

    // Each entry's objects are its own inventory's.
    let inventory = |key: &str| tether_gitops_agent::inventory::inventory_name(rig.agent_id, key);
    let owner = |name: &str| {
        let cm = get_json(&rig.env, &["get", "configmap", name, "-n", &ns]).unwrap();
        cm["metadata"]["annotations"]["config.k8s.io/owning-inventory"].clone()
    };
    assert_eq!(owner("infra"), Value::from(inventory(infra_key)));
    assert_eq!(owner("app"), Value::from(inventory(apps_key)));
    for key in [infra_key, apps_key] {
        let name = inventory(key);
        assert!(get_json(&rig.env, &["get", "configmap", &name, "-n", &ns]).is_some());
    }

    let stdout = seed_status(&rig);
    for key in [infra_key, apps_key] {
        assert!(
            stdout.lines().any(|l| l.starts_with(key)),
            "no line of {key}: {stdout}"
        );
    }

    // The apps folder emptied: only the apps entry prunes.
    let c2 = rig.manifests.commit(&[("apps/app.yaml", None)], "no apps");
    let apps = applied_in(&rig, apps_key, &c2).await;
    let infra = applied_in(&rig, infra_key, &c2).await;
    assert_eq!(apps.outcome, ReportedOutcome::Succeeded, "{apps:?}");
    assert_eq!(infra.outcome, ReportedOutcome::Succeeded, "{infra:?}");
    assert!(get_json(&rig.env, &["get", "configmap", "app", "-n", &ns]).is_none());
    assert_eq!(owner("infra"), Value::from(inventory(infra_key)));

    // The apps entry removed: it leaves the status; the infrastructure's entry stays.
    let only_infra = format!(
        "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n{infra_entry}"
    );
    let cfg = rig.config.commit(
        &[(
            ".gitlab/agents/seed/config.yaml",
            Some(only_infra.as_bytes()),
        )],
        "apps removed",
    );
    rig.agent
        .wait_log("Agent configuration applied", &cfg)
        .await;
    let left = wait_for(
        "the apps entry to leave the status",
        Duration::from_secs(10),
        || async {
            let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            (syncs.len() == 1).then_some(syncs)
        },
    )
    .await;
    assert_eq!(left[0].project_id, infra_key);
    assert_eq!(left[0].commit_id, c2);
    assert_eq!(owner("infra"), Value::from(inventory(infra_key)));
}

/// Waits until kas shows a sync of `commit` by the entry `key` that did not wait for its
/// dependencies (succeeded or failed).
async fn applied_in(rig: &Rig, key: &str, commit: &str) -> kas::api::SyncView {
    let what = format!("{key} to apply {commit}");
    entry_report(rig, key, commit, &what, |s| {
        s.outcome != ReportedOutcome::Waiting
    })
    .await
}

/// A push webhook for a repository that two named entries read reaches both: each syncs the
/// pushed commit. kas polls once an hour here, so only the webhook can have made it fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_webhook_reaches_every_named_entry_of_the_repository() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("hooked").unwrap();
    let entries = format!(
        "    name: infra\n    paths:\n    - glob: '/infrastructure/*.yaml'\n  - id: group/manifests\n    name: apps\n    default_namespace: {ns}\n    paths:\n    - glob: '/apps/*.yaml'\n"
    );
    let (infra_cm, app_cm) = (configmap("infra", &ns, "v1"), configmap("app", &ns, "v1"));
    let initial = [
        ("infrastructure/infra.yaml", Some(&infra_cm[..])),
        ("apps/app.yaml", Some(&app_cm[..])),
    ];
    let (rig, c1) = two_folder_rig_polling(env, &ns, &entries, &initial, "1h").await;
    let keys = ["group/manifests#infra", "group/manifests#apps"];
    for key in keys {
        applied_in(&rig, key, &c1).await;
    }
    let secret = rig._dir.path().join("hook-secret");
    std::fs::write(&secret, "s3cret-hook\n").unwrap();
    let view = rig
        .set_manifests_project(ProjectRequest {
            webhook_secret_file: Some(secret.display().to_string()),
            ..ProjectRequest::default()
        })
        .await;
    let (infra_v2, app_v2) = (configmap("infra", &ns, "v2"), configmap("app", &ns, "v2"));
    let c2 = rig.manifests.commit(
        &[
            ("infrastructure/infra.yaml", Some(&infra_v2)),
            ("apps/app.yaml", Some(&app_v2)),
        ],
        "both folders change",
    );
    let headers = [
        ("x-gitlab-token", "s3cret-hook".to_owned()),
        ("x-gitlab-event", "Push Hook".to_owned()),
    ];
    let body = br#"{"ref":"refs/heads/main","after":"0"}"#;
    assert_eq!(rig.kas.webhook(view.id, &headers, body).await, 200);
    for key in keys {
        let s = applied_in(&rig, key, &c2).await;
        assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{key}: {s:?}");
    }
    for name in ["infra", "app"] {
        let cm = get_json(&rig.env, &["get", "configmap", name, "-n", &ns]).unwrap();
        assert_eq!(cm["data"]["value"], "v2", "{name}");
    }
}

/// `kas agent status` shows a sync under way (here one waiting for a Deployment that never
/// becomes available): its commit, how far it got and the object it waits for, in the table
/// and in `-o json`, above the project's last report. Only the web UI and `reconcile --wait` showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_shows_a_sync_under_way() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("underway").unwrap();
    let initial = [("manifests/cm.yaml", Some(&configmap("app", &ns, "v1")[..]))];
    let (mut rig, c0) = rig(env, ns.clone(), &admin_rbac(&ns), "", &initial, &[]).await;
    rig.synced(&c0).await;
    let c1 = stuck_commit(&rig, &ns).await;
    let status = |rig: &Rig, format: &str| {
        String::from_utf8_lossy(&rig.agent_status(format).stdout).into_owned()
    };
    let under_way = format!("group/manifests: synchronizing commit {}", &c1[..8]);
    let table = wait_for(
        "the sync under way in the status",
        Duration::from_secs(30),
        || {
            let table = status(&rig, "table");
            let found = table.contains(&under_way);
            async move { found.then_some(table) }
        },
    )
    .await;
    assert!(
        table.contains("1 Current") && table.contains(&format!("commit {}", &c0[..12])),
        "{table}"
    );
    // What it waits for is named, with the reason from the object's status.
    let waiting = format!("not Current yet: Deployment/{ns}/stuck InProgress: ");
    assert!(table.contains(&waiting), "{table}");
    let json: Value = serde_json::from_str(&status(&rig, "json")).unwrap();
    assert_eq!(json["under_way"][0]["commit_id"], c1.as_str(), "{json}");
    assert_eq!(json["under_way"][0]["pending"]["name"], "stuck", "{json}");

    // agentk dies mid-sync: the sync is no longer said to be under way (it was, for as long
    // as kas ran, since no outcome came to clear it).
    rig.agent.kill9();
    wait_for(
        "the killed sync to leave the status",
        Duration::from_secs(10),
        || {
            let table = status(&rig, "table");
            let gone = !table.contains("synchronizing commit");
            async move { gone.then_some(()) }
        },
    )
    .await;
    let json: Value = serde_json::from_str(&status(&rig, "json")).unwrap();
    assert!(json.get("under_way").is_none(), "{json}");
}

/// `kas agent status` shows every entry of the configuration in force, also those the agent
/// has not reported on, and why: one naming a project kas does not have (`unknown project`,
/// with the command that adds it) and one whose project kas cannot fetch (`fetch failing`,
/// with kas's fetch error), beside the synchronized entry's report, in the table and in `-o
/// json`, and it exits 8. Before, both entries were simply missing and it exited 0. So does a
/// configuration project kas cannot fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_shows_entries_without_a_report_and_why() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("unreported").unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &seed_agent_rbac(&ns, "gitlab-agent", &ns),
        "  - id: group/ghost\n  - id: group/broken\n",
        &[("manifests/cm.yaml", Some(&configmap("here", &ns, "v1")))],
        &[],
    )
    .await;
    rig.synced(&c1).await;
    // A directory that is no repository: kas takes it (it exists), and every fetch fails.
    let not_a_repository = rig._dir.path().join("not-a-repository");
    std::fs::create_dir_all(&not_a_repository).unwrap();
    // Points a project at that directory.
    let (admin, remote) = (&rig.kas.admin, not_a_repository.display().to_string());
    let break_project = |path: &str| {
        let req = ProjectRequest {
            path: path.into(),
            remote: Some(remote.clone()),
            ..ProjectRequest::default()
        };
        async move { admin.set_project(&req).await.unwrap() }
    };
    break_project("group/broken").await;
    let fetch_error = wait_for(
        "kas's fetch of group/broken to fail",
        Duration::from_secs(30),
        || async {
            let projects = rig.kas.admin.list_projects().await.ok()?;
            projects
                .into_iter()
                .find(|p| p.path == "group/broken")?
                .fetch_error
        },
    )
    .await;
    let status = |format: &str| {
        let o = rig
            .kas
            .cli()
            .args(["agent", "status", "group/config:seed", "-o", format])
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };

    let (code, stdout, stderr) = status("table");
    assert_eq!(code, Some(8), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("group/manifests  commit {}", &c1[..12])),
        "{stdout}"
    );
    let ghost = "group/ghost  unknown project: \"group/ghost\" is not registered in kas \
                 (kas project add --path group/ghost --remote <repository>)";
    let failing = format!("group/broken  fetch failing: {fetch_error}");
    for line in [ghost, failing.as_str()] {
        assert!(stdout.contains(line), "{line} not in {stdout}");
        assert!(stderr.contains(line), "{line} not in {stderr}");
    }

    let (code, stdout, _) = status("json");
    assert_eq!(code, Some(8));
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["syncs"][0]["project_id"], "group/manifests", "{json}");
    let rows = json["unreported"].as_array().unwrap();
    let row = |i: usize| (rows[i]["project_id"].clone(), rows[i]["state"].clone());
    assert_eq!(rows.len(), 2, "{json}");
    assert_eq!(row(0), ("group/ghost".into(), "unknown_project".into()));
    assert_eq!(row(1), ("group/broken".into(), "fetch_failing".into()));
    assert_eq!(rows[1]["reason"], fetch_error.as_str());

    // A reported entry whose project kas can no longer fetch: its report is old news (it
    // read as current, exit 0, while no push reached the agent).
    break_project("group/manifests").await;
    let stale = wait_for(
        "the reported entry's fetch error in its status",
        Duration::from_secs(30),
        || async {
            let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.ok()?;
            let s = syncs
                .into_iter()
                .find(|s| s.project_id == "group/manifests")?;
            (!s.fetch_error.is_empty()).then_some(s)
        },
    )
    .await;
    let (code, stdout, stderr) = status("table");
    assert_eq!(code, Some(8), "{stdout}{stderr}");
    let line = format!("fetch failing: {}", stale.fetch_error);
    assert!(stdout.contains(&format!("    {line}")), "{stdout}");
    assert!(
        stderr.contains(&format!("group/manifests  {line}")),
        "{stderr}"
    );

    // The configuration project itself: a config.yaml pushed now would never be seen (it
    // exited 0 while that lasted, E8).
    break_project("group/config").await;
    let config_error = wait_for(
        "the configuration project's fetch error in the agent's view",
        Duration::from_secs(30),
        || async { rig.kas.agent(rig.agent_id).await.config_fetch_error },
    )
    .await;
    let (code, stdout, stderr) = status("table");
    assert_eq!(code, Some(8), "{stdout}{stderr}");
    let line = format!("configuration project fetch failing: {config_error}");
    assert!(stdout.contains(&line), "{stdout}");
    assert!(stderr.contains(&line), "{stderr}");
    let (_, stdout, _) = status("json");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["config_fetch_error"], config_error.as_str(), "{json}");
}

/// A rotated token file moves the manifests stream to the new token too (between commits):
/// once `kas token list` shows no stream open with the old token, revoking it ends nothing,
/// and a commit pushed afterwards is applied without agentk ever hearing a refusal. Before,
/// the manifests stream kept the old token for up to 2 h, and revoking it cut the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_goes_on_across_an_agent_token_rotation() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("rotation").unwrap();
    let cm = |v: &str| configmap("rotated", &ns, v);
    let v1 = cm("v1");
    let initial = [("manifests/cm.yaml", Some(v1.as_slice()))];
    let (rig, c1) = rig(env, ns.clone(), &admin_rbac(&ns), "", &initial, &[]).await;
    rig.synced(&c1).await;
    let admin = &rig.kas.admin;
    let old = admin.list_tokens(rig.agent_id).await.unwrap()[0].id;
    let streams = |id: i64| async move {
        let tokens = admin.list_tokens(rig.agent_id).await.unwrap();
        tokens.iter().find(|t| t.id == id).unwrap().open_streams
    };

    let new = admin.create_token(rig.agent_id, "rotated").await.unwrap();
    let file = rig._dir.path().join("seed.token");
    std::fs::write(&file, format!("{}\n", new.token)).unwrap();
    wait_for(
        "no stream left on the old token",
        Duration::from_secs(20),
        || async { (streams(old).await == 0).then_some(()) },
    )
    .await;
    let r = admin.revoke_token(old).await.unwrap();
    assert_eq!(r.streams_ended, 0, "{r:?}");

    let c2 = rig
        .manifests
        .commit(&[("manifests/cm.yaml", Some(&cm("v2")))], "v2");
    let s = rig.synced(&c2).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let applied = get_json(&rig.env, &["get", "configmap", "rotated", "-n", &ns]).unwrap();
    assert_eq!(applied["data"]["value"], "v2");
    let log = rig.agent.log();
    assert!(!log.contains("kas refused the agent token"), "{log}");
}

/// A commit of an agent with many entries reads each entry's stored report by itself: reading
/// all of the agent's reports for each of them made a commit cost entries² rows (E13: 301
/// entries of one tenant kept the database from answering the other tenants for 90 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_to_many_entries_reads_each_stored_report_alone() {
    const N: usize = 12;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("many-entries").unwrap();
    let entry = |i: usize| format!("    name: e{i}\n    paths:\n    - glob: '/e/{i}/*.yaml'\n");
    let mut entries = entry(0);
    for i in 1..N {
        entries += &format!(
            "  - id: group/manifests\n    default_namespace: {ns}\n{}",
            entry(i)
        );
    }
    let files = |value: &str| -> Vec<(String, Vec<u8>)> {
        (0..N)
            .map(|i| {
                (
                    format!("e/{i}/cm.yaml"),
                    configmap(&format!("cm-{i}"), &ns, value),
                )
            })
            .collect()
    };
    let as_change = |files: &[(String, Vec<u8>)]| -> Vec<(String, Option<Vec<u8>>)> {
        files
            .iter()
            .map(|(p, b)| (p.clone(), Some(b.clone())))
            .collect()
    };
    let first = as_change(&files("v1"));
    let initial: Vec<(&str, Option<&[u8]>)> = first
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_deref()))
        .collect();
    let (rig, c1) = two_folder_rig(env, &ns, &entries, &initial).await;
    for i in 0..N {
        applied_in(&rig, &format!("group/manifests#e{i}"), &c1).await;
    }

    let series = |op: &str, kind: &str| {
        format!("kas_store_operations_total{{operation=\"{op}\",kind=\"{kind}\"}}")
    };
    let count = |s: String| {
        let kas = &rig.kas;
        async move { kas.metric(&s).await.unwrap_or(0.0) }
    };
    let all_before = count(series("sync_reports", "read")).await;
    let one_before = count(series("sync_report", "read")).await;
    let puts_before = count(series("put_sync_report", "write")).await;
    let second = as_change(&files("v2"));
    let change: Vec<(&str, Option<&[u8]>)> = second
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_deref()))
        .collect();
    let c2 = rig.manifests.commit(&change, "v2 everywhere");
    // Waited for on kas's metrics: asking kas for the status reads every report.
    wait_for(
        "a report of each entry stored",
        Duration::from_secs(90),
        || async {
            let puts = count(series("put_sync_report", "write")).await;
            (puts >= puts_before + N as f64).then_some(())
        },
    )
    .await;
    let all = count(series("sync_reports", "read")).await - all_before;
    let one = count(series("sync_report", "read")).await - one_before;
    assert_eq!(all, 0.0, "no reading of every report on a commit's way");
    assert!(
        one <= 3.0 * N as f64,
        "{one} single reads for {N} entries: one to send each, one to store each"
    );
    for i in 0..N {
        applied_in(&rig, &format!("group/manifests#e{i}"), &c2).await;
    }
    // Which agent makes kas do this work, for an operator looking for a noisy one.
    let per_agent =
        |name: &str| format!("kas_gitops_{name}_total{{agent_id=\"{}\"}}", rig.agent_id);
    let sent = count(per_agent("selections_sent")).await;
    let stored = count(per_agent("reports_stored")).await;
    assert!(sent >= 2.0 * N as f64, "{sent} selections sent");
    assert!(stored >= 2.0 * N as f64, "{stored} reports stored");
}

/// Two agents declaring one object, both with `inventory_policy: adopt_all`, took it from each
/// other at every resync, both green, and the one whose files dropped it pruned the other's
/// live object (E13). An adoption is said (a warning of the sync, at warn in the log) and noted
/// on the object; the inventory it was taken from then fails the object, naming the adopter,
/// instead of taking it back, and does not prune it once it leaves its files. The other agent
/// is played here by `kubectl`, writing the annotations an agentk writes when it adopts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_adopted_by_another_inventory_is_not_taken_back_nor_pruned() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("adopted").unwrap();
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: theirs\n  namespace: {ns}\n  annotations:\n    config.k8s.io/owning-inventory: someone-else\ndata:\n  value: original\n"
    ))
    .unwrap();
    let (rig, c1) = rig(
        env,
        ns.clone(),
        &admin_rbac(&ns),
        "    inventory_policy: adopt_all\n",
        &[(
            "manifests/theirs.yaml",
            Some(&configmap("theirs", &ns, "ours")),
        )],
        &[],
    )
    .await;
    let s = rig.synced(&c1).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    let said = format!("adopted ConfigMap {ns}/theirs from inventory \"someone-else\"");
    assert!(
        s.warnings.iter().any(|w| w.contains(&said)),
        "{:?}",
        s.warnings
    );
    let cm = get_json(&rig.env, &["get", "configmap", "theirs", "-n", &ns]).unwrap();
    let annotations = &cm["metadata"]["annotations"];
    assert_eq!(
        annotations["agentk.tether.dev/adopted-from"], "someone-else",
        "{cm}"
    );
    assert_eq!(cm["data"]["value"], "ours");
    let ours = annotations["config.k8s.io/owning-inventory"]
        .as_str()
        .unwrap()
        .to_owned();
    let logged = rig.agent.log();
    assert!(
        logged.lines().any(|l| l.contains("\"level\":\"warn\"")
            && l.contains(&format!("adopted ConfigMap {ns}/theirs from inventory"))),
        "logged at warn: {logged}"
    );

    // The other agent takes it back, as an agentk adopting it writes.
    run_output(rig.env.kubectl().args([
        "annotate",
        "--overwrite",
        "configmap",
        "theirs",
        "-n",
        &ns,
        "config.k8s.io/owning-inventory=someone-else",
        &format!("agentk.tether.dev/adopted-from={ours}"),
    ]))
    .unwrap();
    let c2 = rig.manifests.commit(
        &[("manifests/mine.yaml", Some(&configmap("mine", &ns, "ours")))],
        "another object",
    );
    let s = rig.synced(&c2).await;
    let theirs = s.objects.iter().find(|o| o.name == "theirs").unwrap();
    assert_eq!(theirs.status, ReportedStatus::Failed, "{s:?}");
    assert!(
        theirs.message.contains("by inventory \"someone-else\""),
        "{theirs:?}"
    );
    let cm = get_json(&rig.env, &["get", "configmap", "theirs", "-n", &ns]).unwrap();
    assert_eq!(
        cm["metadata"]["annotations"]["config.k8s.io/owning-inventory"], "someone-else",
        "not taken back: {cm}"
    );

    let c3 = rig
        .manifests
        .commit(&[("manifests/theirs.yaml", None)], "theirs leaves");
    let s = rig.synced(&c3).await;
    assert_eq!(s.outcome, ReportedOutcome::Succeeded, "{s:?}");
    assert!(
        get_json(&rig.env, &["get", "configmap", "theirs", "-n", &ns]).is_some(),
        "the other inventory's object is not pruned"
    );
}
