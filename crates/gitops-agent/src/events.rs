//! Per-resource events in the JSON shape of cli-utils' `--output=events` printer, which is
//! what GitLab agent users saw in agentk's logs and may have built queries on:
//!
//! ```json
//! {"eventType":"resourceStatus","group":"apps","kind":"Deployment","message":"Deployment is available. Replicas: 1","name":"nginx","namespace":"dude","status":"Current","timestamp":"2024-05-01T10:00:00Z","type":"status"}
//! ```
//!
//! | builder              | `type`                  | `eventType`        | extra fields          |
//! |----------------------|-------------------------|--------------------|-----------------------|
//! | [`resource_applied`] | `apply`                 | `resourceApplied`  | `operation`           |
//! | [`resource_status`]  | `status`                | `resourceStatus`   | `status`, `message`   |
//! | [`resource_failed`]  | the phase (`apply`/...) | `resourceFailed`   | `error`               |
//! | [`resource_pruned`]  | `prune`                 | `resourcePruned`   | `operation`           |
//! | [`resource_prune_skipped`] | `prune`           | `resourcePruned`   | `operation` (`PruneSkipped`), `reason` |
//! | [`error_event`]      | `error`                 | `error`            | `error` (no resource) |
//!
//! The builders are pure: the caller passes the time, so tests are deterministic.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::object_ref::ObjRef;
use crate::status::ResourceStatus;

/// The phase an event belongs to; a failure carries the phase it happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Applying objects.
    Apply,
    /// Waiting for status.
    Status,
    /// Deleting objects that left Git.
    Prune,
    /// Deleting objects because the whole project was removed.
    Delete,
}

impl Phase {
    /// The `type` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Apply => "apply",
            Phase::Status => "status",
            Phase::Prune => "prune",
            Phase::Delete => "delete",
        }
    }
}

/// What an apply did, spelled as cli-utils does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOperation {
    /// Server-side applied (the normal case here).
    ServersideApplied,
    /// Created.
    Created,
    /// Changed.
    Configured,
    /// Nothing to change.
    Unchanged,
}

impl ApplyOperation {
    /// The `operation` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyOperation::ServersideApplied => "ServersideApplied",
            ApplyOperation::Created => "Created",
            ApplyOperation::Configured => "Configured",
            ApplyOperation::Unchanged => "Unchanged",
        }
    }
}

/// What a prune did, spelled as cli-utils does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneOperation {
    /// Deleted.
    Pruned,
    /// Left alone (not ours any more, or dry run).
    Skipped,
}

impl PruneOperation {
    /// The `operation` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            PruneOperation::Pruned => "Pruned",
            PruneOperation::Skipped => "PruneSkipped",
        }
    }
}

/// `resourceApplied`.
pub fn resource_applied(obj: &ObjRef, operation: ApplyOperation, at: SystemTime) -> Value {
    let mut e = base(Phase::Apply.as_str(), "resourceApplied", Some(obj), at);
    e.insert("operation".into(), operation.as_str().into());
    Value::Object(e)
}

/// `resourceStatus`.
pub fn resource_status(obj: &ObjRef, status: &ResourceStatus, at: SystemTime) -> Value {
    let mut e = base(Phase::Status.as_str(), "resourceStatus", Some(obj), at);
    e.insert("status".into(), status.status.as_str().into());
    e.insert("message".into(), status.message.clone().into());
    Value::Object(e)
}

/// `resourceFailed`: `error` is the API server's or our message.
pub fn resource_failed(obj: &ObjRef, phase: Phase, error: &str, at: SystemTime) -> Value {
    let mut e = base(phase.as_str(), "resourceFailed", Some(obj), at);
    e.insert("error".into(), error.into());
    Value::Object(e)
}

/// `resourcePruned`.
pub fn resource_pruned(obj: &ObjRef, operation: PruneOperation, at: SystemTime) -> Value {
    let mut e = base(Phase::Prune.as_str(), "resourcePruned", Some(obj), at);
    e.insert("operation".into(), operation.as_str().into());
    Value::Object(e)
}

/// `resourcePruned` of an object left in place (`PruneSkipped`), with the reason.
pub fn resource_prune_skipped(obj: &ObjRef, reason: &str, at: SystemTime) -> Value {
    let mut e = resource_pruned(obj, PruneOperation::Skipped, at);
    e["reason"] = reason.into();
    e
}

/// An error not tied to one object (say, the inventory could not be read).
pub fn error_event(error: &str, at: SystemTime) -> Value {
    let mut e = base("error", "error", None, at);
    e.insert("error".into(), error.into());
    Value::Object(e)
}

fn base(type_: &str, event_type: &str, obj: Option<&ObjRef>, at: SystemTime) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("type".into(), type_.into());
    e.insert("eventType".into(), event_type.into());
    e.insert("timestamp".into(), rfc3339(at).into());
    if let Some(obj) = obj {
        e.insert("group".into(), obj.group.clone().into());
        e.insert("kind".into(), obj.kind.clone().into());
        e.insert("namespace".into(), obj.namespace_or_empty().into());
        e.insert("name".into(), obj.name.clone().into());
    }
    e
}

/// RFC 3339 in UTC with whole seconds (`2024-05-01T10:00:00Z`), like Go's
/// `time.RFC3339` that upstream used. Times before 1970 are clamped to the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;
    use serde_json::json;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(1_714_557_600)), "2024-05-01T10:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(4_102_444_799)), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(at(1_709_251_199)), "2024-02-29T23:59:59Z");
        assert_eq!(
            rfc3339(at(1_714_557_600) + Duration::from_millis(999)),
            "2024-05-01T10:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn status_event_matches_upstream_shape() {
        let obj = ObjRef::new("apps", "Deployment", Some("dude"), "nginx");
        let s = ResourceStatus::new(Status::Current, "Deployment is available. Replicas: 1");
        assert_eq!(
            resource_status(&obj, &s, at(1_714_557_600)),
            json!({"eventType": "resourceStatus", "group": "apps", "kind": "Deployment",
                   "message": "Deployment is available. Replicas: 1", "name": "nginx",
                   "namespace": "dude", "status": "Current",
                   "timestamp": "2024-05-01T10:00:00Z", "type": "status"})
        );
    }

    #[test]
    fn other_events() {
        let ns = ObjRef::new("", "Namespace", None, "dude");
        let t = at(0);
        assert_eq!(
            resource_applied(&ns, ApplyOperation::ServersideApplied, t),
            json!({"eventType": "resourceApplied", "group": "", "kind": "Namespace",
                   "name": "dude", "namespace": "", "operation": "ServersideApplied",
                   "timestamp": "1970-01-01T00:00:00Z", "type": "apply"})
        );
        let dep = ObjRef::new("apps", "Deployment", Some("naww"), "nginx");
        let err = "deployments.apps \"nginx\" is forbidden: User \"system:serviceaccount:gitlab-k8s-agent:agent\" cannot patch resource \"deployments\" in API group \"apps\" in the namespace \"naww\"";
        assert_eq!(
            resource_failed(&dep, Phase::Apply, err, t),
            json!({"eventType": "resourceFailed", "group": "apps", "kind": "Deployment",
                   "name": "nginx", "namespace": "naww", "error": err,
                   "timestamp": "1970-01-01T00:00:00Z", "type": "apply"})
        );
        assert_eq!(
            resource_failed(&dep, Phase::Prune, "x", t)["type"],
            json!("prune")
        );
        assert_eq!(
            resource_pruned(&dep, PruneOperation::Pruned, t),
            json!({"eventType": "resourcePruned", "group": "apps", "kind": "Deployment",
                   "name": "nginx", "namespace": "naww", "operation": "Pruned",
                   "timestamp": "1970-01-01T00:00:00Z", "type": "prune"})
        );
        assert_eq!(
            resource_pruned(&dep, PruneOperation::Skipped, t)["operation"],
            json!("PruneSkipped")
        );
        assert_eq!(
            resource_prune_skipped(&dep, "not ours", t),
            json!({"eventType": "resourcePruned", "group": "apps", "kind": "Deployment",
                   "name": "nginx", "namespace": "naww", "operation": "PruneSkipped",
                   "reason": "not ours", "timestamp": "1970-01-01T00:00:00Z", "type": "prune"})
        );
        assert_eq!(
            error_event("inventory is corrupted", t),
            json!({"eventType": "error", "error": "inventory is corrupted",
                   "timestamp": "1970-01-01T00:00:00Z", "type": "error"})
        );
    }
}
