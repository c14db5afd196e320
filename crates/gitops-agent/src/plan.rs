//! What to apply, and in which order.
//!
//! Typical use by the caller:
//! 1. decode every file ([`crate::decode_file`]);
//! 2. [`set_default_namespace`] on each object (scope from API discovery);
//! 3. refuse the sync if [`duplicates`] is not empty;
//! 4. apply [`apply_stages`] one after the other, waiting for each stage's objects to be
//!    Current before the next one: objects of a custom kind can only be applied once their
//!    CRD is Established, and namespaced objects once their Namespace exists.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::decode::Manifest;
use crate::object_ref::ObjRef;

/// Whether an object must exist before the others can be applied: CRDs (their kinds are
/// not served before), Namespaces (objects in them are rejected before) and ClusterRoles, as
/// in Flux's first stage: a binding to a ClusterRole is checked against the role's rules
/// when it is written, so an agent allowed to create bindings only for rights it holds
/// (without the `bind` verb) is refused a binding whose ClusterRole is not there yet.
pub fn is_prerequisite(group: &str, kind: &str) -> bool {
    must_be_ready_first(group, kind)
        || (group, kind) == ("rbac.authorization.k8s.io", "ClusterRole")
}

/// Whether the next stage must wait for such a prerequisite to be Current, not only written:
/// a CRD's kind is served once it is Established, and a Namespace still being deleted refuses
/// new objects. A ClusterRole is in force as soon as it is written.
pub fn must_be_ready_first(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        ("apiextensions.k8s.io", "CustomResourceDefinition") | ("", "Namespace")
    )
}

/// Indexes into `objects`, grouped into stages to apply one after the other: first CRDs,
/// Namespaces and ClusterRoles, then everything else. Within a stage the indexes keep file order, but the
/// objects are applied several at a time and finish in any order: nothing in a stage may
/// depend on another object of it being there first. Empty stages are left out so there is
/// nothing to wait for.
pub fn apply_stages(objects: &[Manifest]) -> Vec<Vec<usize>> {
    let (first, rest): (Vec<usize>, Vec<usize>) =
        (0..objects.len()).partition(|&i| is_prerequisite(objects[i].group(), objects[i].kind()));
    [first, rest]
        .into_iter()
        .filter(|stage| !stage.is_empty())
        .collect()
}

/// The index of the Namespace named `namespace` among `objects`: a project whose
/// `default_namespace` (where its inventory is kept) its own files create, as Flux's and Argo
/// CD's examples do. That Namespace is applied before the inventory can be written.
pub fn creates_namespace(objects: &[Manifest], namespace: &str) -> Option<usize> {
    objects
        .iter()
        .position(|m| (m.group(), m.kind()) == ("", "Namespace") && m.name() == namespace)
}

/// Objects defined more than once (in two files, or twice in one), with every place they
/// are defined (`path:line`), ordered by object. Applying both would make the result depend
/// on order, so the caller reports these as an error and applies nothing.
///
/// Call this after [`set_default_namespace`], so that an object without a namespace and
/// the same object naming the default namespace are recognized as one.
pub fn duplicates(objects: &[Manifest]) -> Vec<(ObjRef, Vec<String>)> {
    let mut seen: BTreeMap<ObjRef, Vec<String>> = BTreeMap::new();
    for m in objects {
        seen.entry(m.obj_ref()).or_default().push(m.source());
    }
    seen.into_iter()
        .filter(|(_, sources)| sources.len() > 1)
        .collect()
}

/// Gives a namespaced object without `metadata.namespace` (or with an empty one) the
/// project's `default_namespace`. Cluster-scoped objects get none: a namespace there is
/// removed, so the object's identity (and the inventory entry) matches what the API server
/// stores. Whether a kind is namespaced comes from API discovery, hence the flag.
///
/// Objects without a `metadata` mapping are left alone (decoding rejects them anyway).
pub fn set_default_namespace(obj: &mut Value, default_namespace: &str, namespaced: bool) {
    let Some(metadata) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if !namespaced {
        metadata.remove("namespace");
        return;
    }
    let has_namespace = metadata
        .get("namespace")
        .and_then(Value::as_str)
        .is_some_and(|ns| !ns.is_empty());
    if !has_namespace {
        metadata.insert(
            "namespace".to_owned(),
            Value::String(default_namespace.to_owned()),
        );
    }
}

/// Whether a sync of `selected` objects would prune every one of the `previous` objects the
/// project applied before, without the entry allowing it (`allow_empty`). A commit that deletes
/// every file or renames the selected directory selects nothing; taking it literally would
/// delete the whole application, Namespaces included. Argo CD refuses it the same way unless
/// told otherwise (`allowEmpty`).
pub fn empties(selected: usize, previous: usize, s: &crate::sync::Settings) -> bool {
    selected == 0 && previous > 0 && s.prune && !s.allow_empty
}

/// The annotation that makes an object a Helm hook, its value the events it runs at
/// (`pre-install,pre-upgrade`).
pub const HELM_HOOK_ANNOTATION: &str = "helm.sh/hook";

/// Objects of `objects` annotated [`HELM_HOOK_ANNOTATION`], by index, with the annotation's
/// value. Helm runs a hook at one moment of a release and deletes it by its delete policy;
/// applied at every sync as a permanent object it runs once, never on a chart bump, and a
/// changed Job fails with "field is immutable" for good.
pub fn helm_hooks(objects: &[Manifest]) -> Vec<(usize, String)> {
    objects
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let object = m.object();
            let hook = object["metadata"]["annotations"].get(HELM_HOOK_ANNOTATION)?;
            Some((i, hook.as_str().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// The annotation that makes an object an Argo CD resource hook, its value the phases it runs
/// at (`PreSync,PostSync`), or `Skip`: not to be applied at all.
pub const ARGOCD_HOOK_ANNOTATION: &str = "argocd.argoproj.io/hook";

/// What a sync does with the hooks of a commit: objects to leave out, and a warning for each.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Indexes of objects not to apply (`argocd.argoproj.io/hook: Skip`).
    pub skipped: Vec<usize>,
    pub warnings: Vec<String>,
}

/// The Argo CD hooks of `objects`, and their Helm hooks unless a Helm entry rendered them
/// (where `helm.hooks` decides, [`helm_hooks`]). tether has no sync phases to run a hook at, so
/// a hook is applied as an ordinary object that stays — what it did before, so an upgrade
/// prunes nothing — and said: a Job then runs once, not at every sync, and a changed one
/// fails as immutable. `Skip` is honoured, as Argo CD does: the object is not applied (one
/// applied before is pruned, having left the set).
pub fn hooks(objects: &[Manifest], rendered_by_helm: bool) -> Hooks {
    let mut out = Hooks::default();
    for (i, m) in objects.iter().enumerate() {
        let object = m.object();
        let annotations = &object["metadata"]["annotations"];
        let obj = m.obj_ref();
        let what = format!(
            "{}: {} {}",
            m.source(),
            obj.kind,
            crate::kube_events::qualified(&obj)
        );
        if let Some(hook) = annotations.get(ARGOCD_HOOK_ANNOTATION) {
            let hook = hook.as_str().unwrap_or_default();
            if hook.split(',').any(|h| h.trim() == "Skip") {
                out.skipped.push(i);
                out.warnings.push(format!(
                    "{what} is annotated {ARGOCD_HOOK_ANNOTATION}: {hook}: not applied, as Argo CD skips it"
                ));
                continue;
            }
            out.warnings.push(format!(
                "{what} is annotated {ARGOCD_HOOK_ANNOTATION}: {hook}: applied as an ordinary object that stays (tether runs no hooks at sync phases: a Job runs once, not at every sync); remove the annotation once that is what you want"
            ));
        } else if let Some(hook) = annotations
            .get(HELM_HOOK_ANNOTATION)
            .filter(|_| !rendered_by_helm)
        {
            let hook = hook.as_str().unwrap_or_default();
            out.warnings.push(format!(
                "{what} is annotated {HELM_HOOK_ANNOTATION}: {hook} outside a Helm entry: applied as an ordinary object that stays (only a helm entry knows releases); remove the annotation once that is what you want"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_namespace_of_the_inventory_is_found_among_the_objects_by_kind_and_name() {
        let object = |api_version: &str, kind: &str, name: &str| {
            let o = serde_json::json!({"apiVersion": api_version, "kind": kind,
                "metadata": {"name": name}});
            crate::decode::Manifest::new("ns.yaml", 0, 1, &o)
        };
        let objects = [
            object("v1", "ConfigMap", "cert-manager"),
            object("v1", "Namespace", "other"),
            object("example.com/v1", "Namespace", "cert-manager"),
            object("v1", "Namespace", "cert-manager"),
        ];
        assert_eq!(super::creates_namespace(&objects, "cert-manager"), Some(3));
        assert_eq!(super::creates_namespace(&objects, "missing"), None);
    }

    #[test]
    fn helm_hooks_are_the_objects_annotated_helm_sh_hook() {
        let object = |name: &str, annotations: serde_json::Value| {
            let o = serde_json::json!({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "annotations": annotations}});
            crate::decode::Manifest::new("helm template charts/app", 0, 1, &o)
        };
        let objects = [
            object("plain", serde_json::json!({"a": "b"})),
            object(
                "migrate",
                serde_json::json!({"helm.sh/hook": "pre-install,pre-upgrade"}),
            ),
            object("none", serde_json::Value::Null),
            object("weighted", serde_json::json!({"helm.sh/hook-weight": "1"})),
        ];
        assert_eq!(
            super::helm_hooks(&objects),
            [(1, "pre-install,pre-upgrade".to_owned())]
        );
    }

    #[test]
    fn only_helm_entries_refuse_hooks_and_apply_lets_them_through() {
        use tether_agent_config::{Helm, HelmHooks, ManifestProject, ProjectRef};
        let mut entry = ManifestProject::new(ProjectRef::Path("group/app".into()));
        assert!(!crate::sync::Settings::for_project(1, &entry).refuse_helm_hooks);
        let mut helm = Helm {
            chart: "c".into(),
            repository: None,
            version: None,
            release_name: "r".into(),
            namespace: None,
            values_files: vec![],
            values: None,
            kube_version: None,
            api_versions: vec![],
            hooks: HelmHooks::Refuse,
            random: Default::default(),
            create_namespace: false,
        };
        entry.helm = Some(helm.clone());
        assert!(crate::sync::Settings::for_project(1, &entry).refuse_helm_hooks);
        helm.hooks = HelmHooks::Apply;
        entry.helm = Some(helm);
        assert!(!crate::sync::Settings::for_project(1, &entry).refuse_helm_hooks);
    }

    #[test]
    fn emptying_a_project_needs_allow_empty() {
        use tether_agent_config::{ManifestProject, ProjectRef};
        let entry = ManifestProject::new(ProjectRef::Path("group/app".into()));
        let mut s = crate::sync::Settings::for_project(1, &entry);
        assert!(super::empties(0, 3, &s));
        assert!(!super::empties(1, 3, &s), "something still selected");
        assert!(!super::empties(0, 0, &s), "nothing to prune anyway");
        s.allow_empty = true;
        assert!(!super::empties(0, 3, &s));
        s.allow_empty = false;
        s.prune = false;
        assert!(
            !super::empties(0, 3, &s),
            "pruning is off: nothing is deleted"
        );
    }

    use super::*;
    use serde_json::json;

    fn manifest(path: &str, line: usize, object: Value) -> Manifest {
        Manifest::new(path, 0, line, &object)
    }

    fn obj(api: &str, kind: &str, ns: Option<&str>, name: &str) -> Value {
        let mut o = json!({"apiVersion": api, "kind": kind, "metadata": {"name": name}});
        if let Some(ns) = ns {
            o["metadata"]["namespace"] = json!(ns);
        }
        o
    }

    #[test]
    fn stages_put_crds_namespaces_and_cluster_roles_first_keeping_file_order() {
        let objects = vec![
            manifest("a", 1, obj("apps/v1", "Deployment", Some("dude"), "web")),
            manifest("a", 2, obj("v1", "Namespace", None, "dude")),
            manifest("a", 3, obj("example.com/v1", "Widget", Some("dude"), "w")),
            manifest(
                "a",
                4,
                obj(
                    "apiextensions.k8s.io/v1",
                    "CustomResourceDefinition",
                    None,
                    "widgets.example.com",
                ),
            ),
            manifest("a", 5, obj("v1", "ConfigMap", Some("dude"), "cfg")),
            manifest(
                "a",
                6,
                obj("rbac.authorization.k8s.io/v1", "ClusterRole", None, "r"),
            ),
            // A CRD-defined kind that happens to be called Namespace is not a Namespace.
            manifest("a", 7, obj("example.com/v1", "Namespace", None, "x")),
        ];
        assert_eq!(
            apply_stages(&objects),
            vec![vec![1, 3, 5], vec![0, 2, 4, 6]]
        );
    }

    #[test]
    fn only_crds_and_namespaces_are_waited_for() {
        assert!(must_be_ready_first(
            "apiextensions.k8s.io",
            "CustomResourceDefinition"
        ));
        assert!(must_be_ready_first("", "Namespace"));
        assert!(is_prerequisite("rbac.authorization.k8s.io", "ClusterRole"));
        assert!(!must_be_ready_first(
            "rbac.authorization.k8s.io",
            "ClusterRole"
        ));
        // A Role is namespaced: its Namespace may be in the first stage of the same commit.
        assert!(!is_prerequisite("rbac.authorization.k8s.io", "Role"));
    }

    #[test]
    fn empty_stages_are_left_out() {
        let only_rest = vec![manifest("a", 1, obj("v1", "ConfigMap", Some("x"), "c"))];
        assert_eq!(apply_stages(&only_rest), vec![vec![0]]);
        let only_first = vec![manifest("a", 1, obj("v1", "Namespace", None, "x"))];
        assert_eq!(apply_stages(&only_first), vec![vec![0]]);
        assert!(apply_stages(&[]).is_empty());
    }

    #[test]
    fn duplicates_across_files_versions_and_within_a_file() {
        let objects = vec![
            manifest(
                "a.yaml",
                1,
                obj("apps/v1", "Deployment", Some("dude"), "web"),
            ),
            manifest(
                "b.yaml",
                7,
                obj("apps/v1beta2", "Deployment", Some("dude"), "web"),
            ),
            manifest(
                "b.yaml",
                20,
                obj("apps/v1", "Deployment", Some("other"), "web"),
            ),
            manifest("c.yaml", 1, obj("v1", "ConfigMap", Some("x"), "c")),
            manifest("c.yaml", 9, obj("v1", "ConfigMap", Some("x"), "c")),
            manifest("c.yaml", 15, obj("v1", "Secret", Some("x"), "c")),
        ];
        let d = duplicates(&objects);
        let got: Vec<(String, Vec<String>)> =
            d.into_iter().map(|(r, s)| (r.to_string(), s)).collect();
        assert_eq!(
            got,
            vec![
                (
                    "/ConfigMap/x/c".to_owned(),
                    vec!["c.yaml:1".to_owned(), "c.yaml:9".to_owned()]
                ),
                (
                    "apps/Deployment/dude/web".to_owned(),
                    vec!["a.yaml:1".to_owned(), "b.yaml:7".to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn defaulting_then_duplicates_sees_through_missing_namespace() {
        let mut objects = vec![
            manifest("a.yaml", 1, obj("v1", "ConfigMap", None, "c")),
            manifest("b.yaml", 1, obj("v1", "ConfigMap", Some("default"), "c")),
        ];
        assert!(duplicates(&objects).is_empty());
        for m in &mut objects {
            m.set_default_namespace("default", true);
        }
        assert_eq!(duplicates(&objects).len(), 1);
    }

    #[test]
    fn set_default_namespace_rules() {
        let mut o = obj("v1", "ConfigMap", None, "c");
        set_default_namespace(&mut o, "dflt", true);
        assert_eq!(o["metadata"]["namespace"], json!("dflt"));

        let mut o = obj("v1", "ConfigMap", Some(""), "c");
        set_default_namespace(&mut o, "dflt", true);
        assert_eq!(o["metadata"]["namespace"], json!("dflt"));

        let mut o = obj("v1", "ConfigMap", Some("mine"), "c");
        o["metadata"]["labels"] = json!({"a": "b"});
        set_default_namespace(&mut o, "dflt", true);
        assert_eq!(o["metadata"]["namespace"], json!("mine"));
        assert_eq!(o["metadata"]["labels"], json!({"a": "b"}));

        let mut o = obj("v1", "Namespace", None, "dude");
        set_default_namespace(&mut o, "dflt", false);
        assert_eq!(o["metadata"].get("namespace"), None);

        let mut o = obj(
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            Some("oops"),
            "r",
        );
        set_default_namespace(&mut o, "dflt", false);
        assert_eq!(o["metadata"].get("namespace"), None);

        let mut o = json!({"kind": "X"});
        set_default_namespace(&mut o, "dflt", true);
        assert_eq!(o, json!({"kind": "X"}));
    }

    #[test]
    fn hooks_in_plain_files_are_applied_and_said_and_argo_skip_is_left_out() {
        let object = |name: &str, annotations: serde_json::Value| {
            let o = serde_json::json!({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": "dude", "annotations": annotations}});
            crate::decode::Manifest::new("manifests/jobs.yaml", 0, 3, &o)
        };
        let objects = [
            object("plain", serde_json::json!({"a": "b"})),
            object(
                "migrate",
                serde_json::json!({"argocd.argoproj.io/hook": "PreSync"}),
            ),
            object(
                "example",
                serde_json::json!({"argocd.argoproj.io/hook": "PostSync, Skip"}),
            ),
            object("helm", serde_json::json!({"helm.sh/hook": "post-install"})),
        ];
        let found = super::hooks(&objects, false);
        assert_eq!(found.skipped, [2]);
        let [migrate, example, helm] = &found.warnings[..] else {
            panic!("three warnings: {:?}", found.warnings);
        };
        assert!(
            migrate.starts_with("manifests/jobs.yaml:3: Job dude/migrate is annotated argocd.argoproj.io/hook: PreSync: applied"),
            "{migrate}"
        );
        assert!(
            example.contains("Job dude/example") && example.contains("not applied"),
            "{example}"
        );
        assert!(
            helm.contains("Job dude/helm is annotated helm.sh/hook: post-install"),
            "{helm}"
        );
        let rendered = super::hooks(&objects, true);
        assert_eq!(
            rendered.warnings.len(),
            2,
            "a Helm entry's helm.hooks decides: {rendered:?}"
        );
    }
}
