//! Which objects to delete because they left Git, and in which order.
//!
//! **The caller must never prune when the current set is incomplete**: if any manifest file
//! failed to decode (or the file list could not be fetched), objects from that file are
//! missing from `current` and would be deleted. Likewise never prune when the previous
//! inventory failed to decode ([`crate::inventory::decode`] errors rather than returning an
//! empty set for exactly this reason). Before deleting each object, check that it is still
//! ours with [`crate::inventory::may_prune`].

use std::collections::BTreeSet;

use crate::object_ref::ObjRef;

/// Objects in `previous` but not in `current`, ordered for deletion so that nothing is
/// deleted before the things that still need it (the reverse of the apply order):
///
/// 1. custom resources — while their CRD and their operator still exist, so that the
///    operator can run their finalizers (deleting the CRD first orphans them or hangs);
/// 2. other objects (workloads, Services, ConfigMaps, cluster-scoped objects, ...);
/// 3. RBAC objects and ServiceAccounts — an operator being removed in step 2 may still need
///    its permissions while it finalizes;
/// 4. Namespaces — everything inside them is gone by then;
/// 5. CustomResourceDefinitions — last, as deleting one deletes all its resources.
///
/// A custom resource is an object whose `(group, kind)` is in `crd_kinds` (the kinds served
/// by CRDs, from API discovery or the CRD objects), or whose group is served by a CRD in
/// `previous` (a CRD's name is `<plural>.<group>`, so this needs no discovery). Within a
/// step, objects keep `ObjRef` order, so the result is deterministic.
pub fn to_prune(
    previous: &BTreeSet<ObjRef>,
    current: &BTreeSet<ObjRef>,
    crd_kinds: &[(String, String)],
) -> Vec<ObjRef> {
    to_prune_in_tiers(previous, current, crd_kinds)
        .into_iter()
        .flatten()
        .collect()
}

/// [`to_prune`] grouped by step: nothing in a tier depends on another object of the same tier,
/// so a tier's objects may be deleted all at once, and the next tier starts once they are gone.
/// Empty tiers are left out.
pub fn to_prune_in_tiers(
    previous: &BTreeSet<ObjRef>,
    current: &BTreeSet<ObjRef>,
    crd_kinds: &[(String, String)],
) -> Vec<Vec<ObjRef>> {
    let crd_groups: BTreeSet<&str> = previous
        .iter()
        .filter(|r| r.is_crd())
        .filter_map(|r| r.name.split_once('.').map(|(_, group)| group))
        .collect();
    let is_custom = |r: &ObjRef| {
        crd_groups.contains(r.group.as_str())
            || crd_kinds
                .iter()
                .any(|(group, kind)| *group == r.group && *kind == r.kind)
    };
    let tier = |r: &ObjRef| -> u8 {
        if r.is_crd() {
            5
        } else if r.is_namespace() {
            4
        } else if is_custom(r) {
            1
        } else if is_rbac(r) {
            3
        } else {
            2
        }
    };
    let mut tiers: Vec<Vec<ObjRef>> = vec![Vec::new(); 5];
    // The set iterates in ObjRef order, which is kept within a tier.
    for r in previous.difference(current) {
        tiers[usize::from(tier(r) - 1)].push(r.clone());
    }
    tiers.retain(|t| !t.is_empty());
    tiers
}

/// Why an object that left Git was left in place instead of deleted. Neither is a failure of
/// the sync: the object is no longer ours, or there is nothing the API server lets us delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Its owning-inventory annotation was removed (`None`: someone keeps it by hand) or names
    /// another inventory (which adopted it).
    NotOurs { owner: Option<String> },
    /// The API server does not serve its type (its CRD was deleted, say), so it cannot be
    /// read or deleted.
    TypeNotServed,
    /// It carries an annotation asking to be kept (see [`kept_by`]), written as `key: value`.
    Kept { annotation: String },
    /// It moved to another namespace in Git and its replacement there was not created (see
    /// [`held_back`]): it stays in the inventory and is pruned once the replacement exists.
    ReplacementMissing { replacement: ObjRef },
    /// It is the Namespace the project's inventory is kept in (its `default_namespace`):
    /// deleting it deletes the inventory, and every later sync fails for want of the
    /// namespace. It stays in the inventory and is pruned once the inventory moves (see
    /// [`holds_inventory`]).
    HoldsInventory,
}

/// Whether pruning `obj` would delete the inventory: it is the Namespace the inventory is
/// kept in, `inventory_namespace`. A commit moving an overlay's objects to another namespace
/// removes the old Namespace from Git while `default_namespace` still names it; cli-utils
/// leaves its inventory's namespace in place for the same reason.
pub fn holds_inventory(obj: &ObjRef, inventory_namespace: &str) -> bool {
    obj.is_namespace() && obj.name == inventory_namespace
}

/// The objects of `to_prune` whose prune waits, each with its replacement: the object of the
/// same group, kind and name that Git now puts in another namespace and that this sync did
/// not create (in `not_created`: its apply failed, or never ran). Moving a release to a
/// namespace that does not exist fails every new object; pruning the old ones in the same
/// sync left nothing running. Flux and Argo CD do not prune when the apply fails; here other
/// prunes still go ahead (one failing object must not block the rest), only those an object
/// that failed was meant to replace wait.
pub fn held_back(
    to_prune: &[ObjRef],
    not_created: &BTreeSet<ObjRef>,
) -> std::collections::BTreeMap<ObjRef, ObjRef> {
    let moved_to = |old: &ObjRef| {
        not_created.iter().find(|new| {
            new.namespace.is_some()
                && new.namespace != old.namespace
                && (&new.group, &new.kind, &new.name) == (&old.group, &old.kind, &old.name)
        })
    };
    to_prune
        .iter()
        .filter(|old| old.namespace.is_some())
        .filter_map(|old| Some((old.clone(), moved_to(old)?.clone())))
        .collect()
}

/// The annotations with which an object asks to be left in place when it leaves Git, as the
/// tools users come from spell them, so manifests written for them keep their meaning here:
/// a PersistentVolumeClaim, a Namespace or a CRD (whose deletion deletes every resource of it)
/// can be removed from Git without being deleted. The value must match exactly, as there.
const KEEP_ANNOTATIONS: [(&str, &str); 4] = [
    // Helm's own: what `helm uninstall` leaves behind.
    ("helm.sh/resource-policy", "keep"),
    // Flux's kustomize-controller.
    ("kustomize.toolkit.fluxcd.io/prune", "disabled"),
    // cli-utils (kpt, and GitLab's former GitOps engine), new and old spelling.
    ("cli-utils.sigs.k8s.io/on-remove", "keep"),
    ("client.lifecycle.config.k8s.io/deletion", "detach"),
];

/// Argo CD's sync options annotation, a comma-separated list, and the option that keeps.
const ARGO_SYNC_OPTIONS: (&str, &str) = ("argocd.argoproj.io/sync-options", "Prune=false");

/// The annotation (as `key: value`) with which an object asks to be kept when it leaves Git,
/// if any (see [`KEEP_ANNOTATIONS`]).
pub fn kept_by(annotations: &std::collections::BTreeMap<String, String>) -> Option<String> {
    let exact = KEEP_ANNOTATIONS
        .iter()
        .find(|(key, value)| annotations.get(*key).is_some_and(|v| v.trim() == *value))
        .map(|(key, value)| format!("{key}: {value}"));
    exact.or_else(|| {
        let (key, option) = ARGO_SYNC_OPTIONS;
        let options = annotations.get(key)?;
        options
            .split(',')
            .any(|o| o.trim() == option)
            .then(|| format!("{key}: {options}"))
    })
}

impl Skip {
    /// Whether someone should look: a type vanishing is unexpected, while an object detached or
    /// adopted was someone's choice.
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self,
            Self::TypeNotServed | Self::ReplacementMissing { .. } | Self::HoldsInventory
        )
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const ANNOTATION: &str = crate::inventory::OWNING_INVENTORY_ANNOTATION;
        match self {
            Self::NotOurs { owner: None } => write!(
                f,
                "left in place, not deleted: its {ANNOTATION} annotation was removed, so it is no longer this agent's"
            ),
            Self::NotOurs { owner: Some(owner) } => write!(
                f,
                "left in place, not deleted: its {ANNOTATION} annotation names another inventory ({owner})"
            ),
            Self::TypeNotServed => write!(
                f,
                "not deleted: the API server does not serve its type (if its CustomResourceDefinition was deleted, the object went with it)"
            ),
            Self::Kept { annotation } => write!(
                f,
                "left in place, not deleted: its annotation `{annotation}` asks to keep it"
            ),
            Self::ReplacementMissing { replacement } => write!(
                f,
                "left in place for now: it moved to namespace {} in Git, where its replacement was not created; it is pruned once the replacement exists",
                replacement.namespace_or_empty()
            ),
            Self::HoldsInventory => write!(
                f,
                "left in place, not deleted: the project's inventory is kept in this namespace (its default_namespace); it is pruned once default_namespace names another namespace, or delete it by hand"
            ),
        }
    }
}

fn is_rbac(r: &ObjRef) -> bool {
    (r.group == "rbac.authorization.k8s.io"
        && matches!(
            r.kind.as_str(),
            "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ))
        || (r.group.is_empty() && r.kind == "ServiceAccount")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ObjRef {
        match s.parse() {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn set(items: &[&str]) -> BTreeSet<ObjRef> {
        items.iter().map(|s| r(s)).collect()
    }

    fn names(v: &[ObjRef]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_objects_whose_replacement_in_another_namespace_was_not_created_wait() {
        let to_prune = [
            r("apps/Deployment/old/web"),
            r("/Service/old/web"),
            r("/ConfigMap/old/settings"),
            r("/ConfigMap/old/gone"),
            r("rbac.authorization.k8s.io/ClusterRole//web"),
        ];
        // The Deployment and the ConfigMap failed in the new namespace; the Service there
        // was created (not listed); a Deployment of another name failing holds nothing, nor
        // does a cluster-scoped object of the same name.
        let not_created = set(&[
            "apps/Deployment/new/web",
            "/ConfigMap/new/settings",
            "apps/Deployment/new/other",
            "rbac.authorization.k8s.io/ClusterRole//web",
        ]);
        let waiting = held_back(&to_prune, &not_created);
        let pairs: Vec<(String, String)> = waiting
            .iter()
            .map(|(old, new)| (old.to_string(), new.to_string()))
            .collect();
        assert_eq!(
            pairs,
            [
                (
                    "/ConfigMap/old/settings".into(),
                    "/ConfigMap/new/settings".into()
                ),
                (
                    "apps/Deployment/old/web".into(),
                    "apps/Deployment/new/web".into()
                ),
            ]
        );
        let why = Skip::ReplacementMissing {
            replacement: r("apps/Deployment/new/web"),
        };
        assert!(why.is_unexpected());
        let said = why.to_string();
        assert!(
            said.contains("namespace new") && said.contains("pruned once"),
            "{said}"
        );
    }

    #[test]
    fn only_the_namespace_of_the_inventory_holds_it() {
        assert!(holds_inventory(&r("/Namespace//shop"), "shop"));
        assert!(!holds_inventory(&r("/Namespace//shop2"), "shop"));
        assert!(!holds_inventory(&r("/ConfigMap/shop/shop"), "shop"));
        let said = Skip::HoldsInventory.to_string();
        assert!(
            said.contains("inventory is kept in this namespace"),
            "{said}"
        );
        assert!(Skip::HoldsInventory.is_unexpected());
    }

    #[test]
    fn an_object_removed_from_git_and_not_moved_is_not_held_back() {
        let to_prune = [r("apps/Deployment/ns/web")];
        let failed_elsewhere = set(&["apps/Deployment/ns/api", "/Service/other/web"]);
        assert!(held_back(&to_prune, &failed_elsewhere).is_empty());
    }

    #[test]
    fn a_skip_says_why_the_object_was_left() {
        let detached = Skip::NotOurs { owner: None }.to_string();
        assert!(detached.starts_with("left in place"), "{detached}");
        assert!(
            detached.contains("config.k8s.io/owning-inventory"),
            "{detached}"
        );
        let adopted = Skip::NotOurs {
            owner: Some("5-other".into()),
        };
        assert!(adopted.to_string().contains("(5-other)"), "{adopted}");
        assert!(!adopted.is_unexpected());
        assert!(Skip::TypeNotServed.is_unexpected());
        assert!(
            Skip::TypeNotServed
                .to_string()
                .contains("does not serve its type")
        );
    }

    #[test]
    fn the_keep_annotations_of_helm_flux_cli_utils_and_argo_keep_an_object() {
        let of = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let kept = |pairs: &[(&str, &str)]| kept_by(&of(pairs));
        assert_eq!(
            kept(&[("helm.sh/resource-policy", "keep")]).as_deref(),
            Some("helm.sh/resource-policy: keep")
        );
        assert!(kept(&[("kustomize.toolkit.fluxcd.io/prune", "disabled")]).is_some());
        assert!(kept(&[("cli-utils.sigs.k8s.io/on-remove", "keep")]).is_some());
        assert!(kept(&[("client.lifecycle.config.k8s.io/deletion", "detach")]).is_some());
        assert_eq!(
            kept(&[(
                "argocd.argoproj.io/sync-options",
                "ServerSideApply=true, Prune=false"
            )])
            .as_deref(),
            Some("argocd.argoproj.io/sync-options: ServerSideApply=true, Prune=false")
        );
        assert_eq!(kept(&[]), None);
        assert_eq!(kept(&[("helm.sh/resource-policy", "delete")]), None);
        assert_eq!(
            kept(&[("kustomize.toolkit.fluxcd.io/prune", "enabled")]),
            None
        );
        assert_eq!(
            kept(&[("argocd.argoproj.io/sync-options", "Prune=true")]),
            None
        );
        let skip = Skip::Kept {
            annotation: "helm.sh/resource-policy: keep".into(),
        };
        assert!(!skip.is_unexpected());
        assert!(
            skip.to_string()
                .contains("`helm.sh/resource-policy: keep` asks to keep it"),
            "{skip}"
        );
    }

    #[test]
    fn tiers_group_the_deletion_order() {
        let prev = set(&[
            "apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com",
            "example.com/Widget/ns/w",
            "/ConfigMap/ns/a",
            "/ConfigMap/ns/b",
            "/ServiceAccount/ns/sa",
            "/Namespace//ns",
        ]);
        let tiers: Vec<Vec<String>> = to_prune_in_tiers(&prev, &BTreeSet::new(), &[])
            .iter()
            .map(|t| names(t))
            .collect();
        assert_eq!(
            tiers,
            [
                vec!["example.com/Widget/ns/w"],
                vec!["/ConfigMap/ns/a", "/ConfigMap/ns/b"],
                vec!["/ServiceAccount/ns/sa"],
                vec!["/Namespace//ns"],
                vec!["apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com"],
            ]
        );
    }

    #[test]
    fn nothing_to_prune() {
        let s = set(&["apps/Deployment/dude/web", "/Namespace//dude"]);
        assert!(to_prune(&s, &s, &[]).is_empty());
        assert!(to_prune(&BTreeSet::new(), &s, &[]).is_empty());
    }

    #[test]
    fn only_removed_objects() {
        let previous = set(&["apps/Deployment/dude/web", "/ConfigMap/dude/cfg"]);
        let current = set(&["apps/Deployment/dude/web", "/ConfigMap/dude/new"]);
        assert_eq!(
            names(&to_prune(&previous, &current, &[])),
            ["/ConfigMap/dude/cfg"]
        );
    }

    #[test]
    fn reverse_dependency_order() {
        let previous = set(&[
            "apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com",
            "/Namespace//dude",
            "/Namespace//ops",
            "apps/Deployment/ops/widget-operator",
            "rbac.authorization.k8s.io/ClusterRole//widget-operator",
            "rbac.authorization.k8s.io/ClusterRoleBinding//widget-operator",
            "/ServiceAccount/ops/widget-operator",
            "example.com/Widget/dude/w1",
            "example.com/Gadget//g1",
            "cert-manager.io/Certificate/dude/tls",
            "/ConfigMap/dude/cfg",
            "scheduling.k8s.io/PriorityClass//high",
            "apps/Deployment/dude/kept",
        ]);
        let current = set(&["apps/Deployment/dude/kept"]);
        let crd_kinds = [("cert-manager.io".to_owned(), "Certificate".to_owned())];
        assert_eq!(
            names(&to_prune(&previous, &current, &crd_kinds)),
            [
                // 1. custom resources (by CRD in the set, and by discovery)
                "cert-manager.io/Certificate/dude/tls",
                "example.com/Gadget//g1",
                "example.com/Widget/dude/w1",
                // 2. everything else
                "/ConfigMap/dude/cfg",
                "apps/Deployment/ops/widget-operator",
                "scheduling.k8s.io/PriorityClass//high",
                // 3. RBAC and service accounts
                "/ServiceAccount/ops/widget-operator",
                "rbac.authorization.k8s.io/ClusterRole//widget-operator",
                "rbac.authorization.k8s.io/ClusterRoleBinding//widget-operator",
                // 4. namespaces
                "/Namespace//dude",
                "/Namespace//ops",
                // 5. CRDs
                "apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com",
            ]
        );
    }

    #[test]
    fn crd_kept_means_its_resources_are_not_tiered_by_it() {
        // The CRD stays (it is in `current` and `previous`): its group is still detected
        // from `previous`, which only affects ordering, never membership.
        let previous = set(&[
            "apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com",
            "example.com/Widget/dude/w1",
            "/ConfigMap/dude/cfg",
        ]);
        let current = set(&["apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com"]);
        assert_eq!(
            names(&to_prune(&previous, &current, &[])),
            ["example.com/Widget/dude/w1", "/ConfigMap/dude/cfg"]
        );
    }
}
