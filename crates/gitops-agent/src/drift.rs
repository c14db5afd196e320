//! Whether an object in the cluster already is what we would apply, so a re-sync writes only
//! what drifted.
//!
//! Two checks, both needed:
//! - **the same manifest**: every apply stamps [`APPLIED_DIGEST_ANNOTATION`] with a digest of
//!   the object as sent. A field removed from Git leaves the live object a superset of the new
//!   manifest, which only a changed digest reveals (server-side apply then removes the field);
//! - **no drift**: every field of the manifest has the same value in the live object. Fields
//!   others set, defaults the API server filled in and `status` do not count; a value someone
//!   changed (or a field someone removed) does.
//!
//! When in doubt the answer is "apply": a needless server-side apply of an unchanged object is
//! harmless, a skipped one is not.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Digest of the object as last applied by agentk.
pub const APPLIED_DIGEST_ANNOTATION: &str = "agentk.tether.dev/applied-digest";

/// Parent keys under which values are resource quantities, which the API server rewrites to
/// canonical form (`0.5` → `500m`, `1024Mi` → `1Gi`): `resources.requests.cpu`,
/// `ResourceQuota.spec.hard["requests.cpu"]`, ….
const QUANTITY_PARENTS: &[&str] = &["limits", "requests", "hard", "capacity", "allocatable"];
/// Keys whose own value is a quantity.
const QUANTITY_KEYS: &[&str] = &["sizeLimit"];

/// Booleans of the built-in types that are plain `bool` with `omitempty` wherever a key of
/// that name occurs, so the API server never returns `false`: `readOnly` of volume mounts and
/// volume sources, a container's `stdin`/`stdinOnce`/`tty`, a Pod's `hostNetwork`/`hostPID`/
/// `hostIPC`, a Deployment's `paused`, a Service's `publishNotReadyAddresses`. Only these:
/// elsewhere an absent `false` may be a field removed by hand, and for pointer booleans such
/// as `automountServiceAccountToken` or `allowPrivilegeEscalation` absence means `true`
/// (treating those as equal would hide real drift; missing one here costs an extra apply).
const FALSE_OMITTED: &[&str] = &[
    "readOnly",
    "stdin",
    "stdinOnce",
    "tty",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "paused",
    "publishNotReadyAddresses",
];

/// SHA-256 (hex) of the object's canonical JSON (keys sorted), ignoring any digest annotation
/// already in it.
pub fn applied_digest(obj: &Value) -> String {
    let mut copy = obj.clone();
    remove_digest(&mut copy);
    // serde_json's map keeps keys sorted (no `preserve_order`), so equal objects serialize alike.
    hex::encode(Sha256::digest(copy.to_string().as_bytes()))
}

fn remove_digest(obj: &mut Value) {
    if let Some(a) = obj
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(APPLIED_DIGEST_ANNOTATION);
    }
}

/// Stamps the object to send with its digest (after every other change to it).
pub fn stamp_digest(obj: &mut Value) {
    let digest = applied_digest(obj);
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let ann = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if let Some(a) = ann.as_object_mut() {
        a.insert(APPLIED_DIGEST_ANNOTATION.into(), Value::String(digest));
    }
}

/// Whether applying `desired` (stamped with [`stamp_digest`]) to `live` would change nothing.
pub fn is_up_to_date(desired: &Value, live: &Value) -> bool {
    let stamped = desired
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(APPLIED_DIGEST_ANNOTATION));
    let found = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(APPLIED_DIGEST_ANNOTATION));
    if stamped.is_none() || stamped != found {
        return false;
    }
    let (Some(d), Some(l)) = (desired.as_object(), live.as_object()) else {
        return false;
    };
    d.iter().all(|(k, v)| match k.as_str() {
        // Identity is matched by the caller (and list items carry no apiVersion/kind);
        // status is not ours to set.
        "apiVersion" | "kind" | "status" => true,
        _ => contained(v, l.get(k), "", k),
    })
}

/// Whether `desired` is found in `live`: objects key by key (extra live keys are fine), lists
/// element by element (same length), scalars equal. What the API server drops counts as
/// found: `null`, an empty object or list, and `false` for [`FALSE_OMITTED`] keys. `parent`
/// and `key` locate the value (for list elements, the list's).
fn contained(desired: &Value, live: Option<&Value>, parent: &str, key: &str) -> bool {
    match (desired, live) {
        // `key: null`, `{}` and `[]` ask for nothing; the server omits them.
        (Value::Null, _) => true,
        (Value::Object(d), None) if d.is_empty() => true,
        (Value::Array(d), None) if d.is_empty() => true,
        (Value::Bool(false), None) => FALSE_OMITTED.contains(&key),
        (_, None) => false,
        (Value::Object(d), Some(Value::Object(l))) => {
            d.iter().all(|(k, v)| contained(v, l.get(k), key, k))
        }
        (Value::Array(d), Some(Value::Array(l))) => {
            d.len() == l.len()
                && d.iter()
                    .zip(l)
                    .all(|(dv, lv)| contained(dv, Some(lv), parent, key))
        }
        (Value::Number(d), Some(Value::Number(l))) => d == l || d.as_f64() == l.as_f64(),
        (Value::String(d), Some(Value::String(l))) => {
            d == l || (is_quantity(parent, key) && quantities_equal(d, l))
        }
        // A quantity written as a number (`cpu: 1`) comes back as a string ("1").
        (Value::Number(d), Some(Value::String(l))) if is_quantity(parent, key) => {
            quantities_equal(&d.to_string(), l)
        }
        (d, Some(l)) => d == l,
    }
}

fn is_quantity(parent: &str, key: &str) -> bool {
    QUANTITY_PARENTS.contains(&parent) || QUANTITY_KEYS.contains(&key)
}

/// Numeric value of a Kubernetes quantity (`500m`, `1Gi`, `2e3`), if it is one.
fn quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

fn quantities_equal(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desired() -> Value {
        let mut d = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "dude", "creationTimestamp": null,
                         "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.27",
                        "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}},
                        "env": []}]}
                }
            },
            "status": {}
        });
        stamp_digest(&mut d);
        d
    }

    /// What the API server returns for `desired()`: defaults, others' fields, canonical
    /// quantities, no apiVersion/kind (as in a list), a status.
    fn live_of(d: &Value) -> Value {
        let mut l = d.clone();
        let o = l.as_object_mut().expect("object");
        o.remove("apiVersion");
        o.remove("kind");
        l["metadata"]["creationTimestamp"] = json!("2026-11-23T10:00:00Z");
        l["metadata"]["resourceVersion"] = json!("42");
        l["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("1");
        l["spec"]["strategy"] = json!({"type": "RollingUpdate"});
        l["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] =
            json!({"cpu": "500m", "memory": "1Gi"});
        l["spec"]["template"]["spec"]["containers"][0]
            .as_object_mut()
            .expect("container")
            .remove("env");
        l["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
        l["status"] = json!({"replicas": 2, "observedGeneration": 1});
        l
    }

    #[test]
    fn unchanged_object_with_server_defaults_is_up_to_date() {
        let d = desired();
        assert!(is_up_to_date(&d, &live_of(&d)));
    }

    #[test]
    fn changed_value_in_cluster_is_drift() {
        let d = desired();
        let mut l = live_of(&d);
        l["spec"]["replicas"] = json!(5);
        assert!(!is_up_to_date(&d, &l));
        let mut l = live_of(&d);
        l["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:evil");
        assert!(!is_up_to_date(&d, &l));
    }

    #[test]
    fn removed_field_in_cluster_is_drift() {
        let d = desired();
        let mut l = live_of(&d);
        l["metadata"]["labels"]
            .as_object_mut()
            .expect("labels")
            .remove("app");
        assert!(!is_up_to_date(&d, &l));
    }

    #[test]
    fn field_removed_from_git_changes_the_digest() {
        // The live object still has the old field (a superset of the new manifest): only the
        // digest tells that the manifest changed, so the apply that removes it is not skipped.
        let old = desired();
        let live = live_of(&old);
        let mut new = old.clone();
        new["metadata"]["labels"]
            .as_object_mut()
            .expect("labels")
            .remove("app");
        stamp_digest(&mut new);
        assert_ne!(
            new["metadata"]["annotations"][APPLIED_DIGEST_ANNOTATION],
            old["metadata"]["annotations"][APPLIED_DIGEST_ANNOTATION]
        );
        assert!(!is_up_to_date(&new, &live));
    }

    #[test]
    fn object_never_stamped_is_applied() {
        let d = desired();
        let mut l = live_of(&d);
        l["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations")
            .remove(APPLIED_DIGEST_ANNOTATION);
        assert!(!is_up_to_date(&d, &l));
    }

    #[test]
    fn digest_ignores_key_order_and_its_own_annotation() {
        let a = json!({"metadata": {"name": "x", "annotations": {"a": "1"}}, "data": {"k": "v"}});
        let b: Value = serde_json::from_str(
            r#"{"data": {"k": "v"}, "metadata": {"annotations": {"a": "1"}, "name": "x"}}"#,
        )
        .expect("json");
        assert_eq!(applied_digest(&a), applied_digest(&b));
        let mut stamped = a.clone();
        stamp_digest(&mut stamped);
        assert_eq!(applied_digest(&stamped), applied_digest(&a));
    }

    /// kube-prometheus's grafana: `env: []` and a volume mount's `readOnly: false`, both
    /// dropped by the API server.
    fn with_read_only_false(mut d: Value) -> Value {
        d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/data", "readOnly": false}]);
        stamp_digest(&mut d);
        d
    }

    #[test]
    fn false_and_empty_values_the_server_drops_are_up_to_date() {
        let d = with_read_only_false(desired());
        let mut l = live_of(&d);
        l["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/data"}]);
        assert!(is_up_to_date(&d, &l));
        // A `true` the server would have kept is drift when it is gone.
        let mut t = d.clone();
        t["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = json!(true);
        stamp_digest(&mut t);
        let mut l = live_of(&t);
        l["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/data"}]);
        assert!(!is_up_to_date(&t, &l));
    }

    #[test]
    fn a_removed_false_the_server_would_have_kept_is_drift() {
        // `automountServiceAccountToken` is a pointer: the server keeps `false`, and without
        // it the token is mounted. Nor do `0` and `""` match an absent field.
        for (key, value) in [
            ("automountServiceAccountToken", json!(false)),
            ("terminationGracePeriodSeconds", json!(0)),
            ("hostname", json!("")),
        ] {
            let mut d = desired();
            d["spec"]["template"]["spec"][key] = value;
            stamp_digest(&mut d);
            let mut l = live_of(&d);
            l["spec"]["template"]["spec"]
                .as_object_mut()
                .expect("pod spec")
                .remove(key);
            assert!(!is_up_to_date(&d, &l), "{key}");
        }
    }

    #[test]
    fn list_length_change_is_drift() {
        let d = desired();
        let mut l = live_of(&d);
        l["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": "sidecar", "image": "x"}));
        assert!(!is_up_to_date(&d, &l));
    }

    #[test]
    fn quantities_compare_by_value_only_where_they_are_quantities() {
        assert!(quantities_equal("0.5", "500m"));
        assert!(quantities_equal("1024Mi", "1Gi"));
        assert!(quantities_equal("2e3", "2k"));
        assert!(!quantities_equal("1", "2"));
        assert!(!quantities_equal("abc", "abc1"));
        // In a ConfigMap, "1k" and "1000" are different strings.
        let mut d = json!({"metadata": {"name": "c"}, "data": {"limits": "1k"}});
        stamp_digest(&mut d);
        let mut l = d.clone();
        l["data"]["limits"] = json!("1000");
        assert!(!is_up_to_date(&d, &l));
        let mut d = json!({"metadata": {"name": "c"}, "data": {"size": "1k"}});
        stamp_digest(&mut d);
        let mut l = d.clone();
        l["data"]["size"] = json!("1000");
        assert!(!is_up_to_date(&d, &l));
    }

    #[test]
    fn numeric_quantity_matches_its_string_form() {
        let mut d = json!({"metadata": {"name": "q"}, "spec": {"hard": {"cpu": 2, "pods": 10}}});
        stamp_digest(&mut d);
        let mut l = d.clone();
        l["spec"]["hard"] = json!({"cpu": "2", "pods": "10"});
        assert!(is_up_to_date(&d, &l));
    }
}
