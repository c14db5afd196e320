//! What a synchronization of some files would change, without changing anything: the cluster
//! side of `kas agent diff`.
//!
//! It reads the cluster as a sync would (the same decoding, inventory, discovery, namespace
//! defaulting, ownership rules and field manager), asks the API server what each object would
//! become with a server-side apply in dry-run mode, and lists what the inventory says would be
//! pruned. Nothing is written: every apply carries `dryRun=All`, and the inventory is only read.
//!
//! [`clean`] and [`compare`] are the pure rules: which fields a preview hides (those the
//! cluster sets by itself) and how the live and the would-be object are told apart.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::Client;
use kube::api::{Patch, PatchParams};
use kube::discovery::{ApiResource, Scope};
use serde_json::Value;

use crate::apis::Apis;
use crate::decode::Manifest;
use crate::drift::APPLIED_DIGEST_ANNOTATION;
use crate::inventory;
use crate::object_ref::ObjRef;
use crate::plan;
use crate::prune;
use crate::sync::{
    ApiError, CONCURRENCY, FIELD_MANAGER, GroupKey, ObjectError, PreviousInventory, Settings,
    SyncError, Syncer, crd_kinds, decode_all, default_namespaces, group_key, prepared,
    refuse_helm_hooks, split_managed,
};
use crate::takeover;

/// What a sync would do to one object. Objects are [`clean`]ed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Not in the cluster: it would be created as `after`.
    Created { after: Value },
    /// In the cluster as `before`; it would become `after`.
    Changed { before: Value, after: Value },
    /// The apply would change nothing the preview shows.
    Unchanged,
    /// Applied before, gone from the files: it would be deleted.
    Pruned { before: Value },
    /// The sync would fail for this object, and why.
    Failed { error: String },
}

/// One object's [`Change`].
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectChange {
    pub obj: ObjRef,
    pub change: Change,
}

/// `kubectl apply`'s copy of the object it applied.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Top-level metadata fields the API server maintains: never part of what Git says.
const SERVER_METADATA: [&str; 7] = [
    "managedFields",
    "resourceVersion",
    "uid",
    "generation",
    "creationTimestamp",
    "selfLink",
    "deletionGracePeriodSeconds",
];

/// The object without what the cluster sets by itself — `status`, `managedFields`,
/// `resourceVersion`, `uid`, `generation`, timestamps — nor agentk's applied digest (it
/// changes with every content change, so it would only repeat the diff) and kubectl's
/// last-applied copy.
pub fn clean(obj: &Value) -> Value {
    let mut out = obj.clone();
    let Some(map) = out.as_object_mut() else {
        return out;
    };
    map.remove("status");
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in SERVER_METADATA {
            meta.remove(key);
        }
        let emptied = meta
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
            .is_some_and(|a| {
                a.remove(APPLIED_DIGEST_ANNOTATION);
                // kubectl's client-side bookkeeping (agentk never writes it); on a Secret it
                // would hold the values.
                a.remove(LAST_APPLIED_ANNOTATION);
                a.is_empty()
            });
        if emptied {
            meta.remove("annotations");
        }
    }
    out
}

/// The change from `live` (absent: not in the cluster) to `after`, both as the API server
/// returned them. A Secret's values are compared, then [`redact`]ed.
pub fn compare(live: Option<&Value>, after: &Value) -> Change {
    let mut after = clean(after);
    match live.map(clean) {
        None => {
            redact(None, &mut after);
            Change::Created { after }
        }
        Some(before) if before == after => Change::Unchanged,
        Some(mut before) => {
            redact(Some(&mut before), &mut after);
            Change::Changed { before, after }
        }
    }
}

/// What a pruned object is shown as: [`clean`]ed, a Secret's values [`redact`]ed.
pub fn pruned_view(live: &Value) -> Value {
    let mut before = clean(live);
    redact(Some(&mut before), &mut Value::Null);
    before
}

/// Replaces the values of a Secret's `data` and `stringData` (in `before` and `after` alike;
/// `after` is `Null` for an object that would be pruned)
/// so a preview never prints them — in a merge-request pipeline it lands in job logs — while it
/// still tells which keys change: an equal value on both sides reads `***`, a differing one
/// `*** (before)` and `*** (after)`. Other objects are left alone.
pub fn redact(mut before: Option<&mut Value>, after: &mut Value) {
    let is_secret = |v: &Value| v["apiVersion"] == "v1" && v["kind"] == "Secret";
    if !is_secret(after) && !before.as_deref().is_some_and(is_secret) {
        return;
    }
    for field in ["data", "stringData"] {
        let theirs = before
            .as_deref()
            .and_then(|b| b.get(field))
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(map) = after.get_mut(field).and_then(Value::as_object_mut) {
            for (key, value) in map.iter_mut() {
                let same = theirs.get(key) == Some(&*value);
                *value = Value::from(if same { "***" } else { "*** (after)" });
            }
        }
        let ours = after.get(field).cloned().unwrap_or(Value::Null);
        let map = before
            .as_deref_mut()
            .and_then(|b| b.get_mut(field))
            .and_then(Value::as_object_mut);
        for (key, value) in map.into_iter().flatten() {
            let same = ours.get(key).and_then(Value::as_str) == Some("***");
            *value = Value::from(if same { "***" } else { "*** (before)" });
        }
    }
}

/// What the files create that the cluster cannot know of before they are applied: objects in
/// such a namespace, or of such a type, cannot be dry-run and are shown as they would be sent.
#[derive(Debug, Default)]
struct CreatedHere {
    namespaces: BTreeSet<String>,
    crd_groups: BTreeSet<String>,
}

impl CreatedHere {
    fn of(manifests: &[Manifest]) -> Self {
        let mut out = CreatedHere::default();
        for m in manifests {
            match (m.group(), m.kind()) {
                ("", "Namespace") => {
                    out.namespaces.insert(m.name().to_owned());
                }
                ("apiextensions.k8s.io", "CustomResourceDefinition") => {
                    if let Some(group) = m.object()["spec"]["group"].as_str() {
                        out.crd_groups.insert(group.to_owned());
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// Previews a sync of `files` (path, bytes) with the settings `s`. A failure to read what the
/// whole preview needs (a file that does not decode, the inventory, discovery) is an error;
/// one object's failure is that object's [`Change::Failed`]. Sorted by object.
pub async fn preview(
    client: Client,
    s: &Settings,
    files: &[(String, Vec<u8>)],
) -> Result<Vec<ObjectChange>, SyncError> {
    let syncer = Syncer::new(client);
    let vars = syncer
        .variables(s, crate::variables::Secrets::Refuse)
        .await?;
    let mut manifests = decode_all(files, vars.as_ref(), &mut Vec::new())?;
    // As a sync would: what Argo CD skips is not applied (the warnings are the sync's to say).
    crate::sync::set_hooks_aside(&mut manifests, s);
    let previous = syncer.read_inventory(s).await?;
    let disc = syncer.discover().await?;
    default_namespaces(&mut manifests, &disc, s);
    // After the defaults, as in a sync: the hook is named where it would land.
    refuse_helm_hooks(&manifests, s)?;
    if let Some((obj, sources)) = plan::duplicates(&manifests).into_iter().next() {
        return Err(SyncError::Duplicate { obj, sources });
    }
    let listed = syncer.list_live(&manifests, &disc).await;
    let ctx = Ctx {
        s,
        inv_id: previous.name.as_str(),
        disc: &disc,
        here: &CreatedHere::of(&manifests),
        listed: &listed,
    };
    let (syncer_ref, ctx_ref, all) = (&syncer, &ctx, &manifests);
    // By index: a closure over `&Manifest` makes the future not provably `Send`.
    let mut out: Vec<ObjectChange> =
        futures_util::stream::iter((0..all.len()).map(|i| async move {
            let m = &all[i];
            let change =
                syncer_ref
                    .change_of(ctx_ref, m)
                    .await
                    .unwrap_or_else(|e| Change::Failed {
                        error: e.to_string(),
                    });
            ObjectChange {
                obj: m.obj_ref(),
                change,
            }
        }))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    if s.prune {
        out.extend(syncer.pruned(&previous, &manifests, &disc).await);
    }
    out.sort_by(|a, b| a.obj.cmp(&b.obj));
    Ok(out)
}

/// A live object without its managed fields, and those fields (for [`takeover`]).
type Live = (Value, Vec<ManagedFieldsEntry>);

/// Live objects by type and namespace, where enough manifests share one to LIST it (as a sync
/// looks them up); the objects of other types and namespaces are read one by one.
type Listed = HashMap<GroupKey, HashMap<String, Live>>;

/// What every object's preview shares.
struct Ctx<'a> {
    s: &'a Settings,
    inv_id: &'a str,
    disc: &'a Apis,
    here: &'a CreatedHere,
    listed: &'a Listed,
}

impl Syncer {
    /// [`Listed`] for `manifests`: only their own objects are kept, with the `apiVersion` and
    /// `kind` a LIST leaves out of its items (so they compare with the dry run's answer).
    async fn list_live(&self, manifests: &[Manifest], disc: &Apis) -> Listed {
        let mut wanted: HashMap<GroupKey, (ApiResource, HashSet<&str>)> = HashMap::new();
        for m in manifests {
            if let Some((ar, caps)) = Syncer::resolve(disc, m) {
                let ns = (caps.scope == Scope::Namespaced)
                    .then(|| m.namespace())
                    .flatten();
                let names = &mut wanted
                    .entry(group_key(&ar, ns))
                    .or_insert_with(|| (ar, HashSet::new()))
                    .1;
                names.insert(m.name());
            }
        }
        let objects = wanted.iter().flat_map(|((.., ns), (ar, names))| {
            std::iter::repeat_n((ar.clone(), ns.as_deref()), names.len())
        });
        self.list_groups(objects, |key, name, obj, managed| {
            let (ar, names) = wanted.get(key)?;
            names.contains(name).then(|| {
                let mut obj = obj.clone();
                obj["apiVersion"] = Value::from(ar.api_version.as_str());
                obj["kind"] = Value::from(ar.kind.as_str());
                (obj, managed.to_vec())
            })
        })
        .await
    }

    /// One object's change: its live state, the ownership rule, then a dry-run apply, and what
    /// the sync's takeover of fields changed by hand removes besides ([`takeover::revert_in`]).
    async fn change_of(&self, ctx: &Ctx<'_>, m: &Manifest) -> Result<Change, ObjectError> {
        let Ctx {
            s,
            inv_id,
            disc,
            here,
            listed,
        } = ctx;
        let desired = prepared(m, inv_id);
        let Some((ar, caps)) = Syncer::resolve(disc, m) else {
            if here.crd_groups.contains(m.group()) {
                return Ok(compare(None, &desired));
            }
            return Err(crate::sync::not_resolved(disc, m));
        };
        let ns = (caps.scope == Scope::Namespaced)
            .then(|| m.namespace())
            .flatten();
        let api = self.api(&ar, ns);
        let live = match listed.get(&group_key(&ar, ns)) {
            Some(objects) => objects.get(m.name()).cloned(),
            None => api
                .get_opt(m.name())
                .await
                .map_err(ApiError::from)?
                .map(split_managed),
        };
        // As in a sync: fields drift managers own are taken over, and the apply reverts them.
        let took_over = live.as_ref().and_then(|(_, managed)| {
            takeover::take_over(managed, &s.drift_managers, FIELD_MANAGER)
        });
        let live = live.map(|(v, _)| v);
        if let Some(live) = &live {
            inventory::may_take_over(
                s.inventory_policy,
                inventory::owner(live),
                (inv_id, &s.live_inventories),
            )?;
            inventory::not_taken_from_us(
                inventory::owner(live),
                inventory::adopted_from(live),
                inv_id,
            )?;
            // As in a sync, an object already as the files say is not sent: a dry run of it
            // would ask for an update the sync never makes, which an admission policy may
            // refuse (a CRD upgrade check), failing a preview of a sync that succeeds. With
            // fields to take over, the sync applies anyway.
            if took_over.is_none() && crate::drift::is_up_to_date(&desired, live) {
                return Ok(Change::Unchanged);
            }
        }
        let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
        let mut after = match api.patch(m.name(), &params, &Patch::Apply(&desired)).await {
            Ok(o) => serde_json::to_value(o).unwrap_or(Value::Null),
            // Its namespace does not exist yet: the same files create it.
            Err(kube::Error::Api(st))
                if st.code == 404
                    && live.is_none()
                    && ns.is_some_and(|n| here.namespaces.contains(n)) =>
            {
                desired.clone()
            }
            Err(e) => return Err(ApiError::from(e).into()),
        };
        // The dry run cannot see a takeover the preview does not write: what it would remove
        // besides is removed here, by the same ownership.
        if let Some(t) = &took_over {
            takeover::revert_in(&mut after, &desired, t, FIELD_MANAGER);
        }
        Ok(compare(live.as_ref(), &after))
    }

    /// What the sync would prune: objects of the inventory no longer in the files that still
    /// exist and are still ours (the rule pruning itself follows).
    async fn pruned(
        &self,
        previous: &PreviousInventory,
        manifests: &[Manifest],
        disc: &Apis,
    ) -> Vec<ObjectChange> {
        let desired: BTreeSet<ObjRef> = manifests.iter().map(Manifest::obj_ref).collect();
        let held = &previous.recorded;
        let candidates = prune::to_prune(&held.all(), &desired, &crd_kinds(manifests));
        let inv_id = previous.name.as_str();
        let found = futures_util::stream::iter(candidates.into_iter().map(|obj| async move {
            let live = self.live_if_ours(&obj, inv_id, disc).await;
            (obj, live)
        }))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        found
            .into_iter()
            .filter_map(|(obj, live)| {
                let change = match live {
                    Ok(Some(before)) => Change::Pruned {
                        before: pruned_view(&before),
                    },
                    Ok(None) => return None,
                    // Its creation failed: the sync forgets it when it cannot read it.
                    Err(e) if held.only_attempted(&obj) && e.fits_never_created() => return None,
                    Err(e) => Change::Failed {
                        error: e.to_string(),
                    },
                };
                Some(ObjectChange { obj, change })
            })
            .collect()
    }

    /// The live object, if it exists and belongs to the inventory `inv_id`.
    async fn live_if_ours(
        &self,
        obj: &ObjRef,
        inv_id: &str,
        disc: &Apis,
    ) -> Result<Option<Value>, ObjectError> {
        let Some((ar, caps)) = Syncer::resolve_ref(disc, obj) else {
            // A sync would fail to prune it (kept in the inventory), not skip it.
            return match disc.unavailable(&obj.group) {
                Some(reason) => Err(ObjectError::GroupUnavailable {
                    group: obj.group.clone(),
                    reason: reason.to_owned(),
                }),
                None => Ok(None),
            };
        };
        let ns = (caps.scope == Scope::Namespaced)
            .then_some(obj.namespace.as_deref())
            .flatten();
        let live = self
            .api(&ar, ns)
            .get_opt(&obj.name)
            .await
            .map_err(ApiError::from)?;
        Ok(live
            .and_then(|o| serde_json::to_value(o).ok())
            .filter(|v| inventory::owner(v) == Some(inv_id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn live_deployment(replicas: u32) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web",
                "namespace": "app",
                "uid": "0b5c",
                "resourceVersion": "812",
                "generation": 3,
                "creationTimestamp": "2026-11-26T08:00:00Z",
                "managedFields": [{"manager": "agentk"}],
                "annotations": {
                    APPLIED_DIGEST_ANNOTATION: format!("digest-{replicas}"),
                    "config.k8s.io/owning-inventory": "inv",
                },
                "labels": {"app": "web"},
            },
            "spec": {"replicas": replicas},
            "status": {"readyReplicas": replicas},
        })
    }

    #[test]
    fn clean_drops_what_the_cluster_sets_and_keeps_what_git_says() {
        let cleaned = clean(&live_deployment(2));
        assert_eq!(
            cleaned,
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": "web",
                    "namespace": "app",
                    "annotations": {"config.k8s.io/owning-inventory": "inv"},
                    "labels": {"app": "web"},
                },
                "spec": {"replicas": 2},
            })
        );
    }

    #[test]
    fn clean_removes_annotations_left_empty_by_the_digest() {
        let obj =
            json!({"metadata": {"name": "a", "annotations": {APPLIED_DIGEST_ANNOTATION: "x"}}});
        assert_eq!(clean(&obj), json!({"metadata": {"name": "a"}}));
        assert_eq!(clean(&json!("scalar")), json!("scalar"));
    }

    fn secret(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": data})
    }

    #[test]
    fn secret_values_never_show_but_which_keys_change_does() {
        let live = secret(json!({"same": "c2FtZQ==", "changed": "b2xk", "gone": "eA=="}));
        let after = secret(json!({"same": "c2FtZQ==", "changed": "bmV3", "added": "eQ=="}));
        let Change::Changed { before, after } = compare(Some(&live), &after) else {
            panic!("a changed Secret");
        };
        assert_eq!(
            before["data"],
            json!({"same": "***", "changed": "*** (before)", "gone": "*** (before)"})
        );
        assert_eq!(
            after["data"],
            json!({"same": "***", "changed": "*** (after)", "added": "*** (after)"})
        );
        let Change::Created { after } = compare(None, &secret(json!({"k": "dg=="}))) else {
            panic!("a created Secret");
        };
        assert_eq!(after["data"], json!({"k": "*** (after)"}));
        let pruned = pruned_view(&secret(json!({"k": "dg=="})));
        assert_eq!(pruned["data"], json!({"k": "*** (before)"}));
        // Equal Secrets are unchanged, and nothing else is redacted.
        assert_eq!(compare(Some(&live), &live), Change::Unchanged);
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"}});
        assert_eq!(compare(None, &cm), Change::Created { after: cm.clone() });
    }

    #[test]
    fn compare_tells_created_changed_and_unchanged() {
        let mut same = live_deployment(2);
        // Only server-maintained fields differ: nothing a user changed.
        same["metadata"]["resourceVersion"] = json!("813");
        same["status"] = json!({});
        assert_eq!(compare(Some(&live_deployment(2)), &same), Change::Unchanged);
        assert_eq!(
            compare(Some(&live_deployment(2)), &live_deployment(3)),
            Change::Changed {
                before: clean(&live_deployment(2)),
                after: clean(&live_deployment(3)),
            }
        );
        assert_eq!(
            compare(None, &live_deployment(1)),
            Change::Created {
                after: clean(&live_deployment(1))
            }
        );
    }
}
