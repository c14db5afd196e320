//! The inventory: which objects a manifest project applied, stored in a ConfigMap so that
//! the next sync can prune what left Git; plus object ownership between inventories.
//!
//! # ConfigMap layout (format `tether.inventory/v1`)
//!
//! | data key  | value                                                |
//! |-----------|------------------------------------------------------|
//! | `format`  | `tether.inventory/v1`                                |
//! | `count`   | number of objects, to detect truncation               |
//! | `objects` | the objects, grouped (see below)                      |
//! | `attempted_count`, `attempted` | optional: objects of the commit a sync set out to create that are not known to exist (their creation failed), counted and listed the same way |
//!
//! `objects` lists each `(group, kind, namespace)` once as a header line
//! `group/kind/namespace` (always two `/`), followed by the names in that group, one per
//! line (names never contain a `/` after escaping, which tells the two line kinds apart).
//! Components use [`ObjRef`]'s percent-escaping. Sorted, so the same set always encodes to
//! the same bytes and an unchanged sync does not rewrite the ConfigMap.
//!
//! ```text
//! /Namespace/
//! dude
//! apps/Deployment/dude
//! nginx
//! web
//! ```
//!
//! Grouping keeps the inventory small: 10,000 typical objects take well under 300 KiB,
//! far below the 1 MiB a ConfigMap may hold (etcd's request limit is 1.5 MiB).
//!
//! ConfigMaps written by upstream's cli-utils (one data key per object, such as
//! `dude_nginx_apps_Deployment`) are also read, so that a cluster migrated from GitLab's
//! agent keeps pruning correctly; they are rewritten in the new format on the next sync.
//!
//! `objects` lists only objects known to exist: applied, or listed before and not known to
//! be gone (plus, before applying, what the sync may create). An object whose creation
//! failed (a namespace the agent may not write, a type the cluster does not serve) is listed
//! under `attempted` instead while the commit has it: a retry then neither adds it before
//! applying nor drops it after (no writes), and when it leaves Git it is deleted only if found
//! carrying our owner mark, anything else (absent, forbidden, type not served) forgets it
//! without a failure.
//!
//! A corrupted inventory is always an error and never an empty set: an empty "previous"
//! set is harmless, but a wrong one makes the caller prune objects, or keep orphans.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tether_agent_config::InventoryPolicy;
use thiserror::Error;

use crate::object_ref::{ObjRef, escape, unescape};

/// Label on the inventory ConfigMap carrying the inventory id (upstream cli-utils name).
pub const INVENTORY_LABEL: &str = "cli-utils.sigs.k8s.io/inventory-id";

/// Annotation on every applied object naming the inventory that owns it (cli-utils name).
pub const OWNING_INVENTORY_ANNOTATION: &str = "config.k8s.io/owning-inventory";

/// The inventory an object was adopted from (`inventory_policy: adopt_all`), kept while the
/// adopting inventory owns it: the inventory it was taken from then knows, and does not take it
/// back. Two agents (or entries of different agents) declaring one object with adopt_all took
/// it from each other at every resync, both green, and the one whose files dropped it pruned
/// the other's live object.
pub const ADOPTED_FROM_ANNOTATION: &str = "agentk.tether.dev/adopted-from";

/// The inventory an object was adopted from ([`ADOPTED_FROM_ANNOTATION`]), if any.
pub fn adopted_from(obj: &Value) -> Option<&str> {
    annotation(obj, ADOPTED_FROM_ANNOTATION)
}

/// Notes on `obj` (as it will be sent) that it was adopted from `inventory_id`.
pub fn set_adopted_from(obj: &mut Value, inventory_id: &str) {
    set_annotation(obj, ADOPTED_FROM_ANNOTATION, inventory_id);
}

/// Whether this inventory may take back an object another inventory owns now: not when that
/// one adopted it from this one (its `adopted_from` is ours) — both declare it, and taking it
/// back started a fight of adoptions at every resync. Pure.
pub fn not_taken_from_us(
    current_owner: Option<&str>,
    adopted_from: Option<&str>,
    our_id: &str,
) -> Result<(), OwnershipConflict> {
    match (current_owner.filter(|o| !o.is_empty()), adopted_from) {
        (Some(owner), Some(from)) if owner != our_id && from == our_id => {
            Err(OwnershipConflict::AdoptedFromUs {
                owner: owner.to_owned(),
                ours: our_id.to_owned(),
            })
        }
        _ => Ok(()),
    }
}

/// The most a ConfigMap's data may hold (keys plus values), enforced by the API server.
pub const CONFIGMAP_MAX_BYTES: usize = 1024 * 1024;

const FORMAT_KEY: &str = "format";
const COUNT_KEY: &str = "count";
const OBJECTS_KEY: &str = "objects";
const ATTEMPTED_COUNT_KEY: &str = "attempted_count";
const ATTEMPTED_KEY: &str = "attempted";
const FORMAT_V1: &str = "tether.inventory/v1";

/// Label values are at most 63 characters; the id is used as one, and so that the
/// ConfigMap name (`inventory-<id>`) can serve as one too, ids stay within 63 - 10.
const MAX_ID_LEN: usize = 63 - "inventory-".len();
/// Hex digits of SHA-256 kept when a project key has to be hashed (48 bits: collisions
/// among one agent's projects are not a practical concern).
const HASH_LEN: usize = 12;

/// The inventory id of one manifest project of one agent: the value of
/// [`INVENTORY_LABEL`] and [`OWNING_INVENTORY_ANNOTATION`].
///
/// For a numeric project id this is upstream's `<agentId>-<projectId>` (so the inventory
/// name matches GitLab's agent). Other keys (project paths) are lowercased (GitLab paths
/// are case-insensitive, so `Group/App` and `group/app` share an inventory), reduced to
/// `[a-z0-9-]` and suffixed with a hash of the key, so different paths never collide
/// (`a/b-c` and `a-b/c`). The result is always a valid label value (≤ 53 characters,
/// alphanumeric at both ends).
///
/// A named entry's key (`group/app#apps`, `42#apps`) is hashed the same way: `#` occurs in no
/// project path, so its id differs from the unnamed entry's and from the project's other named
/// entries', while an unnamed entry keeps the id it always had.
pub fn inventory_id(agent_id: i64, project_key: &str) -> String {
    let key = project_key.to_ascii_lowercase();
    if agent_id >= 0 && !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) {
        let plain = format!("{agent_id}-{key}");
        if plain.len() <= MAX_ID_LEN {
            return plain;
        }
    }
    let agent = if agent_id < 0 {
        format!("n{}", agent_id.unsigned_abs())
    } else {
        agent_id.to_string()
    };
    let digest = hex::encode(Sha256::digest(format!("{agent_id}\n{key}").as_bytes()));
    let hash = &digest[..HASH_LEN];
    let mut readable = String::new();
    for c in key.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (readable.is_empty() || readable.ends_with('-'))) {
            readable.push(c);
        }
    }
    // Room for "<agent>-" and "-<hash>"; at least something readable is kept.
    let room = MAX_ID_LEN.saturating_sub(agent.len() + HASH_LEN + 2);
    readable.truncate(room);
    let readable = readable.trim_end_matches('-');
    let readable = if readable.is_empty() {
        "project"
    } else {
        readable
    };
    let mut id = format!("{agent}-{readable}-{hash}");
    // Only reachable with absurd agent ids; the hash alone is still unique and valid.
    if id.len() > MAX_ID_LEN {
        id = format!("p{hash}");
    }
    id
}

/// The inventory ConfigMap's name: `inventory-<inventory id>` (upstream's
/// `inventory-<agentId>-<projectId>` for numeric project ids). At most 63 characters: a
/// valid DNS-1123 name and also a valid label value.
pub fn inventory_name(agent_id: i64, project_key: &str) -> String {
    format!("inventory-{}", inventory_id(agent_id, project_key))
}

/// The inventory ConfigMap to create or server-side apply.
pub fn configmap(
    name: &str,
    namespace: &str,
    inventory_id: &str,
    data: &BTreeMap<String, String>,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { INVENTORY_LABEL: inventory_id },
        },
        "data": data,
    })
}

/// Encodes a set of objects as ConfigMap data (see the module docs). Refs must have a
/// non-empty kind and name, as every decoded manifest has.
pub fn encode(refs: &BTreeSet<ObjRef>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (FORMAT_KEY.to_owned(), FORMAT_V1.to_owned()),
        (COUNT_KEY.to_owned(), refs.len().to_string()),
        (OBJECTS_KEY.to_owned(), encode_list(refs)),
    ])
}

/// [`encode`], plus the objects a sync set out to create that are not known to exist
/// (`attempted`, see the module docs); the keys are left out when there are none, so an
/// inventory without such objects reads the same to an agent that does not know them.
pub fn encode_with_attempted(
    objects: &BTreeSet<ObjRef>,
    attempted: &BTreeSet<ObjRef>,
) -> BTreeMap<String, String> {
    let mut data = encode(objects);
    if !attempted.is_empty() {
        data.insert(ATTEMPTED_COUNT_KEY.to_owned(), attempted.len().to_string());
        data.insert(ATTEMPTED_KEY.to_owned(), encode_list(attempted));
    }
    data
}

/// One list of objects: a `group/kind/namespace` header per group, then its names.
fn encode_list(refs: &BTreeSet<ObjRef>) -> String {
    let mut text = String::new();
    let mut current: Option<(&str, &str, Option<&str>)> = None;
    for r in refs {
        let group = (r.group.as_str(), r.kind.as_str(), r.namespace.as_deref());
        if current != Some(group) {
            text.push_str(&format!(
                "{}/{}/{}\n",
                escape(&r.group),
                escape(&r.kind),
                escape(r.namespace_or_empty())
            ));
            current = Some(group);
        }
        text.push_str(&escape(&r.name));
        text.push('\n');
    }
    text
}

/// How many bytes of the ConfigMap's size limit `data` uses.
pub fn data_size(data: &BTreeMap<String, String>) -> usize {
    data.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Fails when `data` would be rejected by the API server for size, so the caller can report
/// it before applying anything (rather than after the objects are already in the cluster
/// and untracked).
pub fn check_size(data: &BTreeMap<String, String>) -> Result<(), InventoryError> {
    let bytes = data_size(data);
    if bytes > CONFIGMAP_MAX_BYTES {
        return Err(InventoryError::TooLarge {
            bytes,
            limit: CONFIGMAP_MAX_BYTES,
        });
    }
    Ok(())
}

/// Why an inventory could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InventoryError {
    /// The ConfigMap has no format marker and is not a cli-utils inventory either.
    #[error("inventory ConfigMap is not in a known format (no {FORMAT_KEY:?} key)")]
    UnknownFormat,
    /// A format this version does not understand (written by a newer agent?).
    #[error("inventory format {0:?} is not supported")]
    UnsupportedFormat(String),
    /// The content does not parse.
    #[error("inventory is corrupted: {0}")]
    Corrupted(String),
    /// The encoded inventory does not fit in a ConfigMap.
    #[error("inventory needs {bytes} bytes, more than a ConfigMap may hold ({limit})")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

/// Decodes ConfigMap data written by [`encode`] (or by upstream cli-utils).
pub fn decode(data: &BTreeMap<String, String>) -> Result<BTreeSet<ObjRef>, InventoryError> {
    let Some(format) = data.get(FORMAT_KEY) else {
        return decode_cli_utils(data);
    };
    if format != FORMAT_V1 {
        return Err(InventoryError::UnsupportedFormat(format.clone()));
    }
    decode_list(data, COUNT_KEY, OBJECTS_KEY)?
        .ok_or_else(|| InventoryError::Corrupted(format!("no {OBJECTS_KEY:?} key")))
}

/// The `attempted` objects of data written by [`encode_with_attempted`]: none when the
/// inventory has no such key (written by [`encode`], an older agent, or cli-utils).
pub fn decode_attempted(
    data: &BTreeMap<String, String>,
) -> Result<BTreeSet<ObjRef>, InventoryError> {
    if data.get(FORMAT_KEY).is_none() {
        return Ok(BTreeSet::new());
    }
    Ok(decode_list(data, ATTEMPTED_COUNT_KEY, ATTEMPTED_KEY)?.unwrap_or_default())
}

/// The list under `list_key`, checked against the number under `count_key`; `None` when
/// there is no such list.
fn decode_list(
    data: &BTreeMap<String, String>,
    count_key: &str,
    list_key: &str,
) -> Result<Option<BTreeSet<ObjRef>>, InventoryError> {
    let corrupted = |m: String| InventoryError::Corrupted(m);
    let Some(text) = data.get(list_key) else {
        return Ok(None);
    };
    let count: usize = data
        .get(count_key)
        .ok_or_else(|| corrupted(format!("no {count_key:?} key")))?
        .parse()
        .map_err(|_| corrupted(format!("{count_key:?} is not a number")))?;
    let mut refs = BTreeSet::new();
    let mut lines = 0;
    let mut header: Option<(String, String, Option<String>)> = None;
    for (i, line) in text.split_terminator('\n').enumerate() {
        let at = |m: &str| corrupted(format!("{list_key} line {}: {m}", i + 1));
        let un = |s: &str| unescape(s).ok_or_else(|| at("invalid %-escape"));
        if line.contains('/') {
            let mut parts = line.split('/');
            let (Some(g), Some(k), Some(ns), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(at("expected group/kind/namespace"));
            };
            let kind = un(k)?;
            if kind.is_empty() {
                return Err(at("empty kind"));
            }
            let ns = un(ns)?;
            header = Some((un(g)?, kind, (!ns.is_empty()).then_some(ns)));
        } else {
            let Some((group, kind, ns)) = &header else {
                return Err(at("name before any group/kind/namespace line"));
            };
            let name = un(line)?;
            if name.is_empty() {
                return Err(at("empty name"));
            }
            refs.insert(ObjRef {
                group: group.clone(),
                kind: kind.clone(),
                namespace: ns.clone(),
                name,
            });
            lines += 1;
        }
    }
    // A mismatch means truncation, duplicated lines or hand edits: not trustworthy.
    if lines != count || refs.len() != count {
        return Err(corrupted(format!(
            "{count_key:?} says {count} objects, found {} ({} distinct)",
            lines,
            refs.len()
        )));
    }
    Ok(Some(refs))
}

/// Upstream cli-utils' ConfigMap inventory: each data key is
/// `<namespace>_<name>_<group>_<kind>` with `:` in names written as `__`.
fn decode_cli_utils(data: &BTreeMap<String, String>) -> Result<BTreeSet<ObjRef>, InventoryError> {
    // An empty data map might be an empty cli-utils inventory, or something else entirely;
    // guessing "empty" could mean pruning nothing or everything later, so refuse.
    if data.is_empty() {
        return Err(InventoryError::UnknownFormat);
    }
    data.keys()
        .map(|key| parse_cli_utils_key(key).ok_or(InventoryError::UnknownFormat))
        .collect()
}

fn parse_cli_utils_key(key: &str) -> Option<ObjRef> {
    let (namespace, rest) = key.split_once('_')?;
    let (rest, kind) = rest.rsplit_once('_')?;
    let (name, group) = rest.rsplit_once('_')?;
    let name = name.replace("__", ":");
    if name.is_empty() || kind.is_empty() || name.contains('_') {
        return None;
    }
    Some(ObjRef::new(group, kind, Some(namespace), name))
}

/// The inventory that owns an object (its [`OWNING_INVENTORY_ANNOTATION`]), if any; an
/// empty annotation counts as none.
pub fn owner(obj: &Value) -> Option<&str> {
    annotation(obj, OWNING_INVENTORY_ANNOTATION)
}

/// Annotation `key` of `obj`, when set and not empty.
fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?
        .get("annotations")?
        .get(key)?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// Marks an object as owned by `inventory_id` before it is applied. Objects without a
/// `metadata` mapping are left alone (decoding rejects them anyway).
pub fn set_owner(obj: &mut Value, inventory_id: &str) {
    set_annotation(obj, OWNING_INVENTORY_ANNOTATION, inventory_id);
}

/// Sets annotation `key` of `obj` (no `metadata` mapping: left alone).
fn set_annotation(obj: &mut Value, key: &str, value: &str) {
    let Some(metadata) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let annotations = metadata
        .entry("annotations")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !annotations.is_object() {
        *annotations = Value::Object(serde_json::Map::new());
    }
    if let Some(map) = annotations.as_object_mut() {
        map.insert(key.to_owned(), Value::String(value.to_owned()));
    }
}

/// The inventories of the agent's entries in its configuration in force (inventory name, as
/// objects' owning-inventory annotation has it, → entry key), shared by its workers and
/// replaced when the configuration changes: an object owned by one of them is another entry's,
/// whatever the policy. It also holds what each of them created ([`LiveInventories::claim_creation`]),
/// which the annotation cannot tell while two entries' first syncs run side by side.
#[derive(Debug, Clone, Default)]
pub struct LiveInventories(std::sync::Arc<std::sync::RwLock<Live>>);

#[derive(Debug, Default)]
struct Live {
    /// inventory name → entry key, for the entries in force.
    entries: BTreeMap<String, String>,
    /// inventory name → the objects its entry created and still declares, as hashes of their
    /// references: a sync of thousands of objects keeps 8 bytes for each, not its reference
    /// (a collision would refuse one object naming a sibling: about one chance in 10¹¹ with
    /// 10,000 objects).
    created: std::collections::HashMap<String, std::collections::HashSet<u64>>,
}

fn ref_hash(obj: &ObjRef) -> u64 {
    use std::hash::{Hash, Hasher};
    // Its keys are fixed: the same reference hashes the same in every worker of the process.
    let mut h = std::hash::DefaultHasher::new();
    obj.hash(&mut h);
    h.finish()
}

impl LiveInventories {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Live> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entries now in force, by their inventory ids. What those no longer in force created
    /// is forgotten: an entry that left owns nothing.
    pub fn set(&self, live: BTreeMap<String, String>) {
        let mut g = self.write();
        g.created
            .retain(|inventory, _| live.contains_key(inventory));
        g.entries = live;
    }

    /// The entry in force whose inventory is `inventory`.
    pub fn entry_of(&self, inventory: &str) -> Option<String> {
        self.read().entries.get(inventory).cloned()
    }

    /// Keeps, of what `inventory` created, only the objects it still declares (at the start of
    /// each of its syncs): an object it dropped may be created by another entry once pruned.
    pub fn keep_created<'a>(
        &self,
        inventory: &str,
        declared: impl IntoIterator<Item = &'a ObjRef>,
    ) {
        let declared: std::collections::HashSet<u64> = declared.into_iter().map(ref_hash).collect();
        if let Some(created) = self.write().created.get_mut(inventory) {
            created.retain(|h| declared.contains(h));
        }
    }

    /// Records that `inventory` is about to create `obj`, which it found absent, unless another
    /// entry in force created it first: two entries declaring one object both find it absent
    /// on their first syncs, which run side by side, and the owning-inventory annotation
    /// cannot tell them apart before either has written it.
    pub fn claim_creation(&self, inventory: &str, obj: &ObjRef) -> Result<(), OwnershipConflict> {
        let h = ref_hash(obj);
        let mut g = self.write();
        if !g.entries.contains_key(inventory) {
            return Ok(());
        }
        let sibling = g
            .created
            .iter()
            .find(|(other, created)| other.as_str() != inventory && created.contains(&h))
            .map(|(other, _)| other.clone());
        if let Some(owner) = sibling {
            let entry = g.entries.get(&owner).cloned().unwrap_or_default();
            return Err(OwnershipConflict::CreatedBySibling { entry, owner });
        }
        g.created.entry(inventory.to_owned()).or_default().insert(h);
        Ok(())
    }
}

/// Which entries are live is not part of what a sync does (as for progress).
impl PartialEq for LiveInventories {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Why an existing object may not be applied by this inventory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OwnershipConflict {
    /// Another entry of this agent, in its configuration in force, owns the object: two
    /// entries declare it. Taking it over (adopt_all did) made them take it from each other at
    /// every sync, and the one whose files no longer had it pruned it while the other still
    /// declared it.
    #[error(
        "object is owned by entry {entry} of this agent (inventory {owner:?}): two entries must not declare one object (remove it from one; an object moved here is created once {entry} has pruned it)"
    )]
    OwnedBySibling {
        /// The other entry's key.
        entry: String,
        /// Its inventory id.
        owner: String,
    },
    /// Another entry of this agent in force created the object while this one was finding it
    /// absent: both declare it, and both would have created it.
    #[error(
        "object was created by entry {entry} of this agent (inventory {owner:?}), which declares it too: two entries must not declare one object (remove it from one)"
    )]
    CreatedBySibling {
        /// The other entry's key.
        entry: String,
        /// Its inventory id.
        owner: String,
    },
    /// Another inventory owns the object.
    #[error(
        "object is owned by inventory {owner:?}, not {ours:?}; inventory_policy {policy} does not take it over (adopt_all would)"
    )]
    OwnedByOther {
        /// The owning inventory's id.
        owner: String,
        /// Our inventory id.
        ours: String,
        /// The policy in force, as written in the configuration.
        policy: &'static str,
    },
    /// Another inventory adopted the object from this one: both declare it.
    #[error(
        "object was adopted from this inventory ({ours:?}) by inventory {owner:?} (inventory_policy adopt_all there): both declare it, and taking it back would make them take it from each other at every sync — remove it from the files of one"
    )]
    AdoptedFromUs {
        /// The adopting inventory's id.
        owner: String,
        /// Our inventory id.
        ours: String,
    },
    /// The object exists but belongs to no inventory, and the policy is `must_match`.
    #[error(
        "object already exists and is not owned by inventory {ours:?}; inventory_policy must_match does not adopt it (adopt_if_no_inventory would)"
    )]
    NotOwned {
        /// Our inventory id.
        ours: String,
    },
}

fn policy_name(policy: InventoryPolicy) -> &'static str {
    match policy {
        InventoryPolicy::MustMatch => "must_match",
        InventoryPolicy::AdoptIfNoInventory => "adopt_if_no_inventory",
        InventoryPolicy::AdoptAll => "adopt_all",
    }
}

/// Whether this inventory may apply an object that already exists in the cluster, given the
/// object's current owner (see [`owner`]). Objects that do not exist yet are always ours to
/// create; do not call this for them.
///
/// - `must_match`: only objects already owned by us.
/// - `adopt_if_no_inventory`: also objects owned by no inventory.
/// - `adopt_all`: anything, even objects owned by another inventory — but not one of another
///   entry of this agent in force (`live`): two entries must not declare one object.
pub fn may_take_over(
    policy: InventoryPolicy,
    current_owner: Option<&str>,
    (our_id, live): (&str, &LiveInventories),
) -> Result<(), OwnershipConflict> {
    let current_owner = current_owner.filter(|o| !o.is_empty());
    match (policy, current_owner) {
        (_, Some(owner)) if owner == our_id => Ok(()),
        (_, Some(owner)) if let Some(entry) = live.entry_of(owner) => {
            Err(OwnershipConflict::OwnedBySibling {
                entry,
                owner: owner.to_owned(),
            })
        }
        (InventoryPolicy::AdoptAll, _) => Ok(()),
        (InventoryPolicy::AdoptIfNoInventory, None) => Ok(()),
        (InventoryPolicy::MustMatch, None) => Err(OwnershipConflict::NotOwned {
            ours: our_id.to_owned(),
        }),
        (policy, Some(owner)) => Err(OwnershipConflict::OwnedByOther {
            owner: owner.to_owned(),
            ours: our_id.to_owned(),
            policy: policy_name(policy),
        }),
    }
}

/// Whether a pruning candidate may be deleted: only when it is still owned by us. An object
/// adopted by another inventory since (or whose annotation was removed by a user to keep
/// it) is left alone and only dropped from our inventory.
pub fn may_prune(current_owner: Option<&str>, our_id: &str) -> bool {
    current_owner == Some(our_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(g: &str, k: &str, ns: Option<&str>, n: &str) -> ObjRef {
        ObjRef::new(g, k, ns, n)
    }

    fn is_label_value(s: &str) -> bool {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    }

    fn is_dns1123_subdomain(s: &str) -> bool {
        s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }

    #[test]
    fn numeric_project_ids_match_upstream() {
        assert_eq!(inventory_id(5, "42"), "5-42");
        assert_eq!(inventory_name(5, "42"), "inventory-5-42");
    }

    #[test]
    fn paths_are_sanitized_hashed_and_case_insensitive() {
        let id = inventory_id(5, "Group/Sub_Group/app.name");
        assert!(id.starts_with("5-group-sub-group-app-name-"), "{id}");
        assert_eq!(id, inventory_id(5, "group/sub_group/app.name"));
        assert_ne!(inventory_id(5, "a/b-c"), inventory_id(5, "a-b/c"));
        assert_ne!(inventory_id(5, "a/b"), inventory_id(6, "a/b"));
    }

    /// An upgrade must find every existing inventory: an unnamed entry's key is the project
    /// as written, exactly as before names existed, and its id is pinned here. Named entries
    /// of the same project get ids of their own.
    #[test]
    fn named_entries_have_their_own_inventories_and_unnamed_ones_keep_theirs() {
        assert_eq!(inventory_name(5, "42"), "inventory-5-42");
        assert_eq!(
            inventory_name(5, "group/app"),
            "inventory-5-group-app-767491e9dacc"
        );
        let keys = [
            "group/app",
            "group/app#infra",
            "group/app#apps",
            "group/app-apps",
        ];
        let ids: BTreeSet<String> = keys.iter().map(|k| inventory_id(5, k)).collect();
        assert_eq!(ids.len(), keys.len(), "{ids:?}");
        assert!(inventory_id(5, "group/app#apps").starts_with("5-group-app-apps-"));
        let numeric = inventory_id(5, "42#apps");
        assert_ne!(numeric, "5-42");
        assert!(numeric.starts_with("5-42-apps-"), "{numeric}");
        let long = format!("{}#{}", "g/".repeat(40) + "p", "a".repeat(40));
        assert!(inventory_name(5, &long).len() <= 63);
    }

    #[test]
    fn ids_and_names_are_always_valid() {
        let long = "very-long-group-name/".repeat(30) + "project";
        let keys = [
            "42",
            "group/project",
            "G/P",
            long.as_str(),
            "///",
            "",
            "ünïcode/prøject",
            &"9".repeat(80),
            "-leading/trailing-",
        ];
        for agent in [1, 0, 123_456_789, -7, i64::MAX, i64::MIN] {
            for key in keys {
                let id = inventory_id(agent, key);
                assert!(is_label_value(&id), "{agent} {key:?} -> {id}");
                assert!(id.len() <= 53, "{agent} {key:?} -> {id}");
                let name = inventory_name(agent, key);
                assert!(is_dns1123_subdomain(&name), "{agent} {key:?} -> {name}");
                assert!(is_label_value(&name), "{agent} {key:?} -> {name}");
            }
        }
        assert_ne!(
            inventory_id(1, &long),
            inventory_id(1, &(long.clone() + "2"))
        );
    }

    #[test]
    fn configmap_shape() {
        let data = encode(&BTreeSet::new());
        let cm = configmap("inventory-5-42", "gitlab-agent", "5-42", &data);
        assert_eq!(cm["metadata"]["labels"][INVENTORY_LABEL], "5-42");
        assert_eq!(cm["metadata"]["namespace"], "gitlab-agent");
        assert_eq!(cm["data"]["format"], FORMAT_V1);
        assert_eq!(cm["data"]["count"], "0");
    }

    #[test]
    fn encode_layout_is_grouped_and_sorted() {
        let refs = BTreeSet::from([
            r("apps", "Deployment", Some("dude"), "web"),
            r("", "Namespace", None, "dude"),
            r("apps", "Deployment", Some("dude"), "nginx"),
            r("", "ConfigMap", Some("dude"), "cfg"),
        ]);
        let data = encode(&refs);
        assert_eq!(
            data["objects"],
            "/ConfigMap/dude\ncfg\n/Namespace/\ndude\napps/Deployment/dude\nnginx\nweb\n"
        );
        assert_eq!(data["count"], "4");
        assert_eq!(decode(&data), Ok(refs));
    }

    #[test]
    fn round_trip_including_odd_names_and_empty() {
        let refs = BTreeSet::from([
            r(
                "rbac.authorization.k8s.io",
                "ClusterRole",
                None,
                "system:viewer",
            ),
            r("x.io", "Weird", Some("n/s"), "with/slash%and\nnewline"),
            r("", "ConfigMap", Some("ns"), "dude"),
        ]);
        assert_eq!(decode(&encode(&refs)), Ok(refs));
        assert_eq!(decode(&encode(&BTreeSet::new())), Ok(BTreeSet::new()));
    }

    #[test]
    fn ten_thousand_objects_fit_comfortably() {
        let mut refs = BTreeSet::new();
        for i in 0..10_000 {
            let (group, kind) = match i % 4 {
                0 => ("apps", "Deployment"),
                1 => ("", "Service"),
                2 => ("", "ConfigMap"),
                _ => ("networking.k8s.io", "Ingress"),
            };
            refs.insert(r(
                group,
                kind,
                Some(&format!("team-namespace-{}", i % 97)),
                &format!("service-name-{i}"),
            ));
        }
        let data = encode(&refs);
        let size = data_size(&data);
        assert!(size < 1024 * 1024, "{size}");
        assert!(size < 300 * 1024, "{size}");
        assert_eq!(check_size(&data), Ok(()));
        assert_eq!(decode(&data), Ok(refs));

        // Worst case: every object in its own namespace, so no grouping helps.
        let worst: BTreeSet<ObjRef> = (0..10_000)
            .map(|i| {
                r(
                    "apps",
                    "Deployment",
                    Some(&format!("team-namespace-{i}")),
                    &format!("service-name-{i}"),
                )
            })
            .collect();
        let size = data_size(&encode(&worst));
        assert!(size < 1024 * 1024, "{size}");
    }

    #[test]
    fn too_large_is_reported() {
        let data = BTreeMap::from([("objects".to_owned(), "x".repeat(CONFIGMAP_MAX_BYTES))]);
        assert!(matches!(
            check_size(&data),
            Err(InventoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn attempted_objects_round_trip_and_are_left_out_when_none() {
        let objects = BTreeSet::from([r("", "ConfigMap", Some("dude"), "a")]);
        let attempted = BTreeSet::from([r("apps", "Deployment", Some("naww"), "nginx")]);
        let data = encode_with_attempted(&objects, &attempted);
        assert_eq!(decode(&data), Ok(objects.clone()));
        assert_eq!(decode_attempted(&data), Ok(attempted));
        let plain = encode_with_attempted(&objects, &BTreeSet::new());
        assert_eq!(
            plain,
            encode(&objects),
            "same bytes as before attempted existed"
        );
        assert_eq!(decode_attempted(&plain), Ok(BTreeSet::new()));
        let mut truncated = data.clone();
        truncated.insert("attempted_count".into(), "2".into());
        assert!(matches!(
            decode_attempted(&truncated),
            Err(InventoryError::Corrupted(_))
        ));
        let cli_utils = BTreeMap::from([("dude_nginx_apps_Deployment".to_owned(), String::new())]);
        assert_eq!(decode_attempted(&cli_utils), Ok(BTreeSet::new()));
    }

    #[test]
    fn corruption_is_an_error_never_empty() {
        let good = encode(&BTreeSet::from([
            r("apps", "Deployment", Some("dude"), "a"),
            r("apps", "Deployment", Some("dude"), "b"),
        ]));
        let with = |key: &str, value: &str| {
            let mut d = good.clone();
            d.insert(key.to_owned(), value.to_owned());
            d
        };
        let without = |key: &str| {
            let mut d = good.clone();
            d.remove(key);
            d
        };
        let corrupted = [
            with("objects", "apps/Deployment/dude\na\n"),
            with("objects", "apps/Deployment/dude\na\na\n"),
            with("objects", "a\nb\n"),
            with("objects", "apps/Deployment\na\nb\n"),
            with("objects", "apps/Deployment/dude/x\na\nb\n"),
            with("objects", "apps//dude\na\nb\n"),
            with("objects", "apps/Deployment/dude\na\n\nb\n"),
            with("objects", "apps/Deployment/dude\na%G1\nb\n"),
            with("objects", ""),
            with("count", "two"),
            with("count", "3"),
            without("count"),
            without("objects"),
        ];
        for data in corrupted {
            assert!(
                matches!(decode(&data), Err(InventoryError::Corrupted(_))),
                "{data:?} -> {:?}",
                decode(&data)
            );
        }
        assert_eq!(
            decode(&with("format", "tether.inventory/v2")),
            Err(InventoryError::UnsupportedFormat(
                "tether.inventory/v2".into()
            ))
        );
        assert_eq!(decode(&BTreeMap::new()), Err(InventoryError::UnknownFormat));
        let garbage = BTreeMap::from([("hello".to_owned(), "world".to_owned())]);
        assert_eq!(decode(&garbage), Err(InventoryError::UnknownFormat));
    }

    #[test]
    fn reads_upstream_cli_utils_inventories() {
        let data = BTreeMap::from([
            ("dude_nginx_apps_Deployment".to_owned(), String::new()),
            ("_dude__Namespace".to_owned(), String::new()),
            (
                "_system__controller__x_rbac.authorization.k8s.io_ClusterRole".to_owned(),
                String::new(),
            ),
            ("dude_my-config__ConfigMap".to_owned(), String::new()),
        ]);
        let refs = decode(&data);
        assert_eq!(
            refs,
            Ok(BTreeSet::from([
                r("apps", "Deployment", Some("dude"), "nginx"),
                r("", "Namespace", None, "dude"),
                r(
                    "rbac.authorization.k8s.io",
                    "ClusterRole",
                    None,
                    "system:controller:x"
                ),
                r("", "ConfigMap", Some("dude"), "my-config"),
            ]))
        );
        let bad = BTreeMap::from([
            ("dude_nginx_apps_Deployment".to_owned(), String::new()),
            ("nonsense".to_owned(), String::new()),
        ]);
        assert_eq!(decode(&bad), Err(InventoryError::UnknownFormat));
    }

    #[test]
    fn owner_annotation() {
        let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
        assert_eq!(owner(&obj), None);
        set_owner(&mut obj, "5-42");
        assert_eq!(owner(&obj), Some("5-42"));
        assert_eq!(
            obj["metadata"]["annotations"][OWNING_INVENTORY_ANNOTATION],
            "5-42"
        );
        obj["metadata"]["annotations"]["keep"] = json!("me");
        set_owner(&mut obj, "5-43");
        assert_eq!(owner(&obj), Some("5-43"));
        assert_eq!(obj["metadata"]["annotations"]["keep"], "me");
        let mut empty = json!({"metadata": {"annotations": {OWNING_INVENTORY_ANNOTATION: ""}}});
        assert_eq!(owner(&empty), None);
        empty["metadata"]["annotations"] = json!(null);
        set_owner(&mut empty, "x");
        assert_eq!(owner(&empty), Some("x"));
    }

    #[test]
    fn an_object_adopted_from_us_is_not_taken_back() {
        let e = not_taken_from_us(Some("inv-b"), Some("inv-a"), "inv-a").expect_err("taken back");
        assert!(
            e.to_string()
                .contains("adopted from this inventory (\"inv-a\") by inventory \"inv-b\""),
            "{e}"
        );
        let ok = |owner, from| not_taken_from_us(owner, from, "inv-a").is_ok();
        assert!(ok(Some("inv-b"), Some("inv-c")), "adopted from a third");
        assert!(ok(Some("inv-a"), Some("inv-a")), "ours");
        assert!(ok(Some("inv-b"), None), "never adopted");
        assert!(ok(None, Some("inv-a")), "owned by none");
        let mut obj = json!({"metadata": {"name": "x"}});
        assert_eq!(adopted_from(&obj), None);
        set_adopted_from(&mut obj, "inv-b");
        assert_eq!(adopted_from(&obj), Some("inv-b"));
    }

    #[test]
    fn take_over_policies() {
        use InventoryPolicy::*;
        let ours = "5-42";
        // (policy, current owner, allowed)
        let table = [
            (MustMatch, Some(ours), true),
            (MustMatch, None, false),
            (MustMatch, Some(""), false),
            (MustMatch, Some("5-43"), false),
            (AdoptIfNoInventory, Some(ours), true),
            (AdoptIfNoInventory, None, true),
            (AdoptIfNoInventory, Some("5-43"), false),
            (AdoptAll, Some(ours), true),
            (AdoptAll, None, true),
            (AdoptAll, Some("5-43"), true),
        ];
        let none = LiveInventories::default();
        for (policy, owner, allowed) in table {
            assert_eq!(
                may_take_over(policy, owner, (ours, &none)).is_ok(),
                allowed,
                "{policy:?} {owner:?}"
            );
        }
        let e = may_take_over(MustMatch, Some("7-1"), (ours, &none)).err();
        assert_eq!(
            e.map(|e| e.to_string()),
            Some("object is owned by inventory \"7-1\", not \"5-42\"; inventory_policy must_match does not take it over (adopt_all would)".to_owned())
        );
        let e = may_take_over(MustMatch, None, (ours, &none)).err();
        assert_eq!(e, Some(OwnershipConflict::NotOwned { ours: ours.into() }));
        assert!(matches!(
            may_take_over(AdoptIfNoInventory, Some("7-1"), (ours, &none)),
            Err(OwnershipConflict::OwnedByOther {
                policy: "adopt_if_no_inventory",
                ..
            })
        ));
    }

    /// Another entry of the agent in force owns the object: no policy takes it over (adopt_all
    /// made two entries take it from each other at every sync); once that entry is no longer
    /// in force, adopt_all adopts its objects as before.
    #[test]
    fn no_policy_takes_an_object_from_another_entry_in_force() {
        use InventoryPolicy::*;
        let live = LiveInventories::default();
        live.set([("5-43".to_owned(), "group/other".to_owned())].into());
        for policy in [MustMatch, AdoptIfNoInventory, AdoptAll] {
            let e = may_take_over(policy, Some("5-43"), ("5-42", &live))
                .expect_err("another entry owns it");
            assert!(
                e.to_string()
                    .starts_with("object is owned by entry group/other of this agent"),
                "{e}"
            );
        }
        assert!(may_take_over(AdoptAll, Some("5-42"), ("5-42", &live)).is_ok());
        live.set(Default::default());
        assert!(may_take_over(AdoptAll, Some("5-43"), ("5-42", &live)).is_ok());
    }

    #[test]
    fn only_the_first_entry_in_force_to_create_an_object_may_create_it() {
        let live = LiveInventories::default();
        live.set(
            [
                ("5-42".to_owned(), "group/one".to_owned()),
                ("5-43".to_owned(), "group/two".to_owned()),
            ]
            .into(),
        );
        let x = r("", "ConfigMap", Some("ns"), "x");
        let y = r("", "ConfigMap", Some("ns"), "y");
        live.claim_creation("5-42", &x)
            .expect("the first to create it");
        live.claim_creation("5-42", &x).expect("its own again");
        let e = live
            .claim_creation("5-43", &x)
            .expect_err("created by the other");
        assert!(
            e.to_string()
                .starts_with("object was created by entry group/one of this agent"),
            "{e}"
        );
        live.claim_creation("5-43", &y).expect("another object");
        // Dropped from the first entry's files: the second may create it once it is gone.
        live.keep_created("5-42", [&y]);
        live.claim_creation("5-43", &x)
            .expect("no longer declared by the first");
        // An entry that left the configuration created nothing any longer.
        live.set([("5-42".to_owned(), "group/one".to_owned())].into());
        live.claim_creation("5-42", &y)
            .expect("its former sibling left");
        // Outside an agent's workers (no entries in force), nothing is recorded.
        let none = LiveInventories::default();
        none.claim_creation("5-42", &x).expect("no siblings");
        none.claim_creation("5-43", &x).expect("no siblings");
    }

    #[test]
    fn prune_only_what_we_own() {
        assert!(may_prune(Some("5-42"), "5-42"));
        assert!(!may_prune(Some("7-1"), "5-42"));
        assert!(!may_prune(None, "5-42"));
    }
}
