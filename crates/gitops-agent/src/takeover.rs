//! Taking over the fields people changed by hand, so that the next apply reverts them.
//!
//! Server-side apply removes a field only when no manager owns it any more, and sets only the
//! values of the fields it applies. A label added with `kubectl label` belongs to
//! `kubectl-label`, a container added with `kubectl edit` to `kubectl-edit`, and every field of
//! an object first created with client-side `kubectl apply` to `kubectl-client-side-apply` as
//! well as to us: our apply never removes them, even once they left Git. As Flux does
//! (`ssa.PatchReplaceFieldsManagers`), agentk first rewrites the object's `managedFields` so
//! that the entries of these *drift managers* are gone and its own apply entry owns their
//! fields; the apply that follows removes what the manifest does not have.
//!
//! Only entries of the object itself are taken over, never a subresource's: `status` and
//! `scale` are written by controllers (an HPA scales through `scale` as
//! `kube-controller-manager`). Which managers count is the configuration's
//! (`gitops.drift_managers`, default [`tether_agent_config::DEFAULT_DRIFT_MANAGERS`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use serde_json::{Map, Value, json};

/// The field managers whose fields are drift: names, or prefixes ending in `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriftManagers(Vec<String>);

impl DriftManagers {
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, manager: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => manager.starts_with(prefix),
            None => manager == p,
        })
    }
}

/// What taking over an object's drift managers changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Takeover {
    /// The drift managers whose entries go, as found on the object.
    pub managers: Vec<String>,
    /// The object's `managedFields` afterwards.
    pub managed_fields: Vec<ManagedFieldsEntry>,
}

/// The `managedFields` in which `to`'s apply entry owns the fields of every drift manager's
/// entry and those entries are gone; `None` when the object has no such entry (nothing to
/// write: an unchanged object costs no request).
pub fn take_over(
    entries: &[ManagedFieldsEntry],
    drift: &DriftManagers,
    to: &str,
) -> Option<Takeover> {
    let is_drift = |e: &ManagedFieldsEntry| {
        is_main_resource(e)
            && e.manager
                .as_deref()
                .is_some_and(|m| m != to && drift.matches(m))
    };
    if !entries.iter().any(is_drift) {
        return None;
    }
    let ours = entries.iter().position(|e| is_own_apply(e, to));
    let mut managers = Vec::new();
    let mut merged: Option<ManagedFieldsEntry> = ours.map(|i| entries[i].clone());
    let mut kept = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        if Some(i) == ours {
            // Placeholder, replaced by the merged entry below: keeps the entries' order.
            kept.push(None);
        } else if is_drift(e) {
            managers.extend(e.manager.clone());
            let e = &without_replicas(e);
            merged = Some(match merged.take() {
                Some(m) => absorb(m, e),
                None => {
                    kept.push(None);
                    as_own_apply(e, to)
                }
            });
        } else {
            kept.push(Some(e.clone()));
        }
    }
    let merged = merged?;
    let managed_fields = kept
        .into_iter()
        .scan(Some(merged), |m, e| Some(e.or_else(|| m.take())))
        .flatten()
        .collect();
    Some(Takeover {
        managers,
        managed_fields,
    })
}

/// The merge patch that writes `t`, refused (409) if the object changed since
/// `resource_version` was read: an entry written in between would be lost.
pub fn patch(t: &Takeover, resource_version: Option<&str>) -> Value {
    let mut meta = Map::new();
    meta.insert("managedFields".into(), json!(t.managed_fields));
    if let Some(rv) = resource_version {
        meta.insert("resourceVersion".into(), json!(rv));
    }
    json!({ "metadata": meta })
}

/// Removes from `after` (the object as an apply of `desired` would leave it, ownership as it
/// was) what the apply that follows the takeover `t` removes as well: the fields `to`'s entry
/// owns after the takeover that `desired` does not set and no other manager owns. A preview
/// computes the sync's outcome with it without writing the takeover.
pub fn revert_in(after: &mut Value, desired: &Value, t: &Takeover, to: &str) {
    fn fields(e: &ManagedFieldsEntry) -> Option<&Value> {
        e.fields_v1.as_ref().map(|f| &f.0)
    }
    let Some(ours) = t
        .managed_fields
        .iter()
        .find(|e| is_own_apply(e, to))
        .and_then(fields)
    else {
        return;
    };
    let others: Vec<&Value> = t
        .managed_fields
        .iter()
        .filter(|e| is_main_resource(e) && !is_own_apply(e, to))
        .filter_map(fields)
        .collect();
    strip(after, Some(desired), ours, &others);
}

/// [`revert_in`] below one node: `owned` is our field set at `after`, `others` the other
/// managers' sets there, `desired` the manifest's value there (if any).
fn strip(after: &mut Value, desired: Option<&Value>, owned: &Value, others: &[&Value]) {
    let Value::Object(owned) = owned else {
        return;
    };
    let mut gone = Vec::new();
    for (key, sub) in owned.iter().filter(|(k, _)| k.as_str() != ".") {
        let Some(slot) = locate(after, key) else {
            continue;
        };
        let theirs: Vec<&Value> = others.iter().filter_map(|o| o.get(key)).collect();
        let wanted = desired.and_then(|d| locate_ref(d, key));
        let owns_node = sub
            .as_object()
            .is_some_and(|m| m.is_empty() || m.contains_key("."));
        if owns_node && wanted.is_none() && theirs.is_empty() {
            gone.push(slot);
        } else if let Some(child) = child_mut(after, slot) {
            strip(child, wanted, sub, &theirs);
        }
    }
    remove_all(after, gone);
}

/// Where a field-set key (`f:name`, `k:{…}`, `v:…`, `i:n`) points in `v`.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    Field(String),
    Item(usize),
}

fn locate(v: &Value, key: &str) -> Option<Slot> {
    let (kind, rest) = key.split_at_checked(2)?;
    match (kind, v) {
        ("f:", Value::Object(m)) => m.contains_key(rest).then(|| Slot::Field(rest.to_owned())),
        ("k:", Value::Array(items)) => {
            let Value::Object(k) = serde_json::from_str::<Value>(rest).ok()? else {
                return None;
            };
            items
                .iter()
                .position(|i| k.iter().all(|(f, kv)| i.get(f) == Some(kv)))
                .map(Slot::Item)
        }
        ("v:", Value::Array(items)) => {
            let want: Value = serde_json::from_str(rest).ok()?;
            items.iter().position(|i| *i == want).map(Slot::Item)
        }
        ("i:", Value::Array(items)) => {
            let i: usize = rest.parse().ok()?;
            (i < items.len()).then_some(Slot::Item(i))
        }
        _ => None,
    }
}

fn locate_ref<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    match locate(v, key)? {
        Slot::Field(f) => v.get(f),
        Slot::Item(i) => v.get(i),
    }
}

fn child_mut(v: &mut Value, slot: Slot) -> Option<&mut Value> {
    match slot {
        Slot::Field(f) => v.get_mut(f),
        Slot::Item(i) => v.get_mut(i),
    }
}

/// Removes the `slots` of `v`; list items from the last, so the indices hold.
fn remove_all(v: &mut Value, slots: Vec<Slot>) {
    let mut items: Vec<usize> = Vec::new();
    for s in slots {
        match (s, &mut *v) {
            (Slot::Field(f), Value::Object(m)) => {
                m.remove(&f);
            }
            (Slot::Item(i), Value::Array(_)) => items.push(i),
            _ => {}
        }
    }
    items.sort_unstable_by(|a, b| b.cmp(a));
    if let Value::Array(list) = v {
        for i in items {
            list.remove(i);
        }
    }
}

fn is_main_resource(e: &ManagedFieldsEntry) -> bool {
    e.subresource.as_deref().is_none_or(str::is_empty)
}

fn is_own_apply(e: &ManagedFieldsEntry, to: &str) -> bool {
    e.manager.as_deref() == Some(to)
        && e.operation.as_deref() == Some("Apply")
        && is_main_resource(e)
}

/// A drift manager's entry renamed to `to`'s apply entry (the object has none yet: it was
/// created by hand, and agentk is adopting it).
fn as_own_apply(e: &ManagedFieldsEntry, to: &str) -> ManagedFieldsEntry {
    ManagedFieldsEntry {
        manager: Some(to.to_owned()),
        operation: Some("Apply".to_owned()),
        fields_type: Some("FieldsV1".to_owned()),
        ..e.clone()
    }
}

/// `e` without `spec.replicas`, which is left to no one rather than taken over: an object
/// first created with `kubectl apply` and replicas, scaled since by an HPA that has not written
/// a different count yet, has only kubectl's entry owning it. Taken over, the apply of a
/// manifest without replicas (as an HPA wants) would reset the workload to one replica. A
/// manifest with replicas sets them anyway: its forced apply takes the field.
fn without_replicas(e: &ManagedFieldsEntry) -> ManagedFieldsEntry {
    let mut e = e.clone();
    if let Some(FieldsV1(Value::Object(fields))) = &mut e.fields_v1
        && let Some(Value::Object(spec)) = fields.get_mut("f:spec")
        && spec.remove("f:replicas").is_some()
        && spec.is_empty()
    {
        // An empty node would be read as owning `spec` whole.
        fields.remove("f:spec");
    }
    e
}

/// `ours` owning `other`'s fields as well.
fn absorb(mut ours: ManagedFieldsEntry, other: &ManagedFieldsEntry) -> ManagedFieldsEntry {
    let mut fields = ours.fields_v1.take().map_or_else(|| json!({}), |f| f.0);
    if let Some(FieldsV1(theirs)) = &other.fields_v1 {
        union(&mut fields, theirs);
    }
    ours.fields_v1 = Some(FieldsV1(fields));
    ours
}

/// Adds the field set `b` to `a`. A FieldsV1 set is a tree of objects (`f:name`, `k:{…}`,
/// `v:…`, `i:…`, and `.` for the node itself) whose leaves are `{}`: the union is the merge
/// of the trees.
fn union(a: &mut Value, b: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (a, b) {
        for (k, bv) in b {
            match a.get_mut(k) {
                Some(av) => union(av, bv),
                None => {
                    a.insert(k.clone(), bv.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(manager: &str, operation: &str, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            api_version: Some("v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            subresource: None,
            time: None,
        }
    }

    fn defaults() -> DriftManagers {
        DriftManagers::new(
            tether_agent_config::DEFAULT_DRIFT_MANAGERS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
        )
    }

    fn ours() -> ManagedFieldsEntry {
        entry(
            "agentk",
            "Apply",
            json!({"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}),
        )
    }

    fn managers(t: &Takeover) -> Vec<&str> {
        t.managed_fields
            .iter()
            .filter_map(|e| e.manager.as_deref())
            .collect()
    }

    #[test]
    fn an_object_without_drift_managers_needs_no_write() {
        let hpa = ManagedFieldsEntry {
            subresource: Some("scale".into()),
            ..entry(
                "kube-controller-manager",
                "Update",
                json!({"f:spec": {"f:replicas": {}}}),
            )
        };
        let operator = entry(
            "cert-manager",
            "Update",
            json!({"f:metadata": {"f:annotations": {"f:x": {}}}}),
        );
        assert_eq!(
            take_over(&[ours(), hpa, operator], &defaults(), "agentk"),
            None
        );
        assert_eq!(take_over(&[], &defaults(), "agentk"), None);
    }

    #[test]
    fn a_label_added_by_hand_moves_into_our_apply_entry() {
        let status = entry("kube-controller-manager", "Update", json!({"f:status": {}}));
        let label = entry(
            "kubectl-label",
            "Update",
            json!({"f:metadata": {"f:labels": {"f:hand": {}}}}),
        );
        let t =
            take_over(&[ours(), status.clone(), label], &defaults(), "agentk").expect("a takeover");
        assert_eq!(t.managers, ["kubectl-label"]);
        assert_eq!(managers(&t), ["agentk", "kube-controller-manager"]);
        assert_eq!(t.managed_fields[1], status);
        let fields = &t.managed_fields[0].fields_v1.as_ref().expect("fields").0;
        assert_eq!(
            fields,
            &json!({"f:data": {"f:a": {}},
                    "f:metadata": {"f:labels": {"f:app": {}, "f:hand": {}}}})
        );
        assert_eq!(t.managed_fields[0].operation.as_deref(), Some("Apply"));
    }

    #[test]
    fn an_object_created_by_hand_gets_the_first_drift_entry_as_our_apply_entry() {
        let before = entry(
            "before-first-apply",
            "Update",
            json!({"f:data": {"f:old": {}}}),
        );
        let csa = entry(
            "kubectl-client-side-apply",
            "Update",
            json!({"f:data": {"f:a": {}, "f:b": {}}}),
        );
        let t = take_over(&[before, csa], &defaults(), "agentk").expect("a takeover");
        assert_eq!(
            t.managers,
            ["before-first-apply", "kubectl-client-side-apply"]
        );
        assert_eq!(managers(&t), ["agentk"]);
        let e = &t.managed_fields[0];
        assert_eq!(e.operation.as_deref(), Some("Apply"));
        assert_eq!(
            e.fields_v1.as_ref().expect("fields").0,
            json!({"f:data": {"f:old": {}, "f:a": {}, "f:b": {}}})
        );
    }

    #[test]
    fn subresource_entries_and_other_managers_stay() {
        // `kubectl scale` writes through the scale subresource: like an HPA's, left alone.
        let scaled = ManagedFieldsEntry {
            subresource: Some("scale".into()),
            ..entry("kubectl", "Update", json!({"f:spec": {"f:replicas": {}}}))
        };
        let rollout = entry("kubectl-rollout", "Update", json!({"f:spec": {}}));
        let edit = entry("kubectl-edit", "Update", json!({"f:data": {"f:e": {}}}));
        let t = take_over(
            &[scaled.clone(), ours(), rollout.clone(), edit],
            &defaults(),
            "agentk",
        )
        .expect("a takeover");
        assert_eq!(t.managers, ["kubectl-edit"]);
        assert_eq!(t.managed_fields, {
            let mut o = ours();
            union(
                &mut o.fields_v1.as_mut().expect("fields").0,
                &json!({"f:data": {"f:e": {}}}),
            );
            vec![scaled, o, rollout]
        });
    }

    /// An HPA-scaled Deployment first created with `kubectl apply` and replicas: kubectl's
    /// entry is the only owner of `spec.replicas`. It is left to no one (the workload keeps
    /// its count), while the entry's other fields are taken over.
    #[test]
    fn replicas_owned_by_a_drift_manager_are_left_to_no_one() {
        let kubectl = entry(
            "kubectl-client-side-apply",
            "Update",
            json!({"f:spec": {"f:replicas": {}, "f:paused": {}}}),
        );
        let t = take_over(&[ours(), kubectl], &defaults(), "agentk").expect("taken over");
        assert_eq!(managers(&t), ["agentk"]);
        let fields = &t.managed_fields[0].fields_v1.as_ref().expect("fields").0;
        assert_eq!(fields["f:spec"], json!({"f:paused": {}}));
        let only_replicas = entry("kubectl", "Update", json!({"f:spec": {"f:replicas": {}}}));
        let t = take_over(&[only_replicas], &defaults(), "agentk").expect("taken over");
        let fields = &t.managed_fields[0].fields_v1.as_ref().expect("fields").0;
        assert!(
            fields.get("f:spec").is_none(),
            "no empty spec node: {fields}"
        );
    }

    #[test]
    fn an_empty_list_turns_it_off_and_prefixes_match_like_flux() {
        let label = entry("kubectl-label", "Update", json!({"f:metadata": {}}));
        let off = DriftManagers::new(Vec::new());
        assert!(off.is_empty());
        assert_eq!(take_over(&[ours(), label.clone()], &off, "agentk"), None);
        let prefix = DriftManagers::new(vec!["kubectl*".into()]);
        assert!(prefix.matches("kubectl-rollout") && prefix.matches("kubectl"));
        assert!(!prefix.matches("kube-controller-manager"));
        assert!(take_over(&[ours(), label], &prefix, "agentk").is_some());
        // Our own entries are never "drift", even when a pattern matches them.
        let all_a = DriftManagers::new(vec!["agent*".into()]);
        let update = entry("agentk", "Update", json!({"f:data": {}}));
        assert_eq!(take_over(&[ours(), update], &all_a, "agentk"), None);
    }

    #[test]
    fn revert_in_removes_what_was_added_by_hand_and_keeps_what_git_or_others_set() {
        let label = entry(
            "kubectl-label",
            "Update",
            json!({"f:metadata": {"f:labels": {".": {}, "f:hand": {}}}}),
        );
        let patch = entry(
            "kubectl-patch",
            "Update",
            json!({"f:data": {"f:extra": {}}}),
        );
        let operator = entry(
            "operator",
            "Update",
            json!({"f:metadata": {"f:annotations": {"f:op": {}}}}),
        );
        let t = take_over(&[ours(), label, patch, operator], &defaults(), "agentk")
            .expect("a takeover");
        let desired = json!({"metadata": {"labels": {"app": "web"}}, "data": {"a": "1"}});
        let mut after = json!({
            "metadata": {"name": "c", "labels": {"app": "web", "hand": "made"},
                         "annotations": {"op": "x"}},
            "data": {"a": "1", "extra": "x"},
        });
        revert_in(&mut after, &desired, &t, "agentk");
        assert_eq!(
            after,
            json!({"metadata": {"name": "c", "labels": {"app": "web"}, "annotations": {"op": "x"}},
                   "data": {"a": "1"}})
        );
        // A labels map Git does not have at all goes whole.
        let mut after = json!({"metadata": {"labels": {"hand": "made"}}, "data": {"a": "1"}});
        revert_in(&mut after, &json!({"data": {"a": "1"}}), &t, "agentk");
        assert_eq!(after, json!({"metadata": {}, "data": {"a": "1"}}));
    }

    #[test]
    fn revert_in_finds_list_items_by_key_value_and_index() {
        let edit = entry(
            "kubectl-edit",
            "Update",
            json!({"f:spec": {
                "f:ports": {"k:{\"port\":81}": {".": {}, "f:port": {}}},
                "f:finalizers": {"v:\"hand\"": {}},
                "f:args": {"i:1": {}},
            }}),
        );
        let t = take_over(&[ours(), edit], &defaults(), "agentk").expect("a takeover");
        let desired = json!({"spec": {"ports": [{"port": 80}], "finalizers": ["git"],
                                      "args": ["a"]}});
        let mut after = json!({"spec": {
            "ports": [{"port": 80}, {"port": 81}],
            "finalizers": ["git", "hand"],
            "args": ["a", "b"],
        }});
        revert_in(&mut after, &desired, &t, "agentk");
        assert_eq!(after, desired);
        // Without a takeover entry of ours nothing is touched.
        let none = Takeover {
            managers: Vec::new(),
            managed_fields: Vec::new(),
        };
        let mut same = json!({"data": {"x": "1"}});
        revert_in(&mut same, &json!({}), &none, "agentk");
        assert_eq!(same, json!({"data": {"x": "1"}}));
    }

    #[test]
    fn the_patch_replaces_managed_fields_only_if_the_object_did_not_change() {
        let label = entry("kubectl-label", "Update", json!({"f:metadata": {}}));
        let t = take_over(&[ours(), label], &defaults(), "agentk").expect("a takeover");
        let p = patch(&t, Some("42"));
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        let sent = p["metadata"]["managedFields"].as_array().expect("list");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["manager"], "agentk");
        assert_eq!(sent[0]["operation"], "Apply");
        assert_eq!(
            sent[0]["fieldsV1"]["f:metadata"]["f:labels"]["f:app"],
            json!({})
        );
        assert!(patch(&t, None)["metadata"].get("resourceVersion").is_none());
    }
}
