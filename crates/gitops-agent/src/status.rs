//! Whether applied objects have reached their desired state: the rules of
//! `sigs.k8s.io/cli-utils/pkg/kstatus`, as pure functions over the live object.
//!
//! Order of evaluation (as kstatus):
//! 1. `metadata.deletionTimestamp` set → `Terminating`;
//! 2. `status.observedGeneration` differs from `metadata.generation` → `InProgress` (the
//!    controller has not seen the latest spec yet, so nothing else in `status` is
//!    meaningful);
//! 3. standard conditions: `Reconciling=True` → `InProgress`, `Stalled=True` → `Failed`;
//! 4. per-kind rules for built-in kinds (below);
//! 5. otherwise a `Ready` condition (`True` → `Current`, else `InProgress`) — not in kstatus
//!    core, but Flux, cert-manager and most operators publish one;
//! 6. otherwise `Current` ("Resource is current"): no status means nothing to wait for.
//!
//! A malformed object (say `status` is a string, or `status.replicas` is not an integer)
//! is `Unknown`, with a message naming the field; callers keep waiting on `Unknown`, never
//! treat it as healthy.
//!
//! Deliberate differences from kstatus, for reasons given at each rule: a `Failed` Pod is
//! `Failed` (kstatus: Current); an unschedulable Pod stays `InProgress` (kstatus turns it
//! Failed after 15 s, which needs a clock and ignores cluster autoscalers); crash-looping
//! init containers fail a Pending Pod; a `LoadBalancer` Service waits for
//! `status.loadBalancer.ingress` (kstatus only checks `spec.clusterIP`).

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::decode::split_api_version;
use crate::object_ref::ObjRef;

/// kstatus' status values; `Display` gives the exact words users see in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Status {
    /// Not there yet; keep waiting.
    InProgress,
    /// The desired state is reached.
    Current,
    /// The object will not reach its desired state without a change.
    Failed,
    /// Being deleted.
    Terminating,
    /// Not in the cluster.
    NotFound,
    /// Could not be determined (malformed object).
    Unknown,
}

impl Status {
    /// The exact word: `InProgress`, `Current`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "InProgress",
            Status::Current => "Current",
            Status::Failed => "Failed",
            Status::Terminating => "Terminating",
            Status::NotFound => "NotFound",
            Status::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status and the human-readable reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    /// The status.
    pub status: Status,
    /// Why, for users (`Deployment is available. Replicas: 1`).
    pub message: String,
}

impl ResourceStatus {
    /// A status with a message.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        ResourceStatus {
            status,
            message: message.into(),
        }
    }

    /// For an object the caller looked up and did not find.
    pub fn not_found() -> Self {
        ResourceStatus::new(Status::NotFound, "Resource not found")
    }
}

/// What the status rules read of an object the API server returns — `apiVersion`, `kind`,
/// `metadata.generation` and `deletionTimestamp`, `spec` and `status` — with its name and
/// resource version. Parsing an answer into this skips the rest (data, managed fields,
/// annotations) without building it, which was most of agentk's CPU per applied object.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct StatusView {
    #[serde(default, rename = "apiVersion")]
    api_version: Value,
    #[serde(default)]
    kind: Value,
    #[serde(default)]
    pub metadata: ViewMeta,
    #[serde(default)]
    spec: Value,
    #[serde(default)]
    status: Value,
}

/// The metadata [`StatusView`] keeps.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ViewMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "resourceVersion")]
    pub resource_version: Option<String>,
    #[serde(default)]
    generation: Value,
    #[serde(default, rename = "deletionTimestamp")]
    deletion_timestamp: Value,
}

impl StatusView {
    /// Gives a view without a type (an item of a LIST of a built-in kind) the type of its list.
    pub fn type_as(&mut self, api_version: &str, kind: &str) {
        let empty = |v: &Value| v.as_str().is_none_or(str::is_empty);
        if empty(&self.kind) {
            self.api_version = Value::String(api_version.to_owned());
            self.kind = Value::String(kind.to_owned());
        }
    }

    /// The object's status, by the same rules as [`compute_status`].
    pub fn status(self) -> ResourceStatus {
        let mut meta = serde_json::Map::new();
        for (k, v) in [
            ("generation", self.metadata.generation),
            ("deletionTimestamp", self.metadata.deletion_timestamp),
        ] {
            if !v.is_null() {
                meta.insert(k.to_owned(), v);
            }
        }
        let mut obj = serde_json::Map::new();
        obj.insert("metadata".to_owned(), Value::Object(meta));
        for (k, v) in [
            ("apiVersion", self.api_version),
            ("kind", self.kind),
            ("spec", self.spec),
            ("status", self.status),
        ] {
            if !v.is_null() {
                obj.insert(k.to_owned(), v);
            }
        }
        compute_status(&Value::Object(obj))
    }
}

/// Computes an object's status from its live state (as returned by the API server).
pub fn compute_status(obj: &Value) -> ResourceStatus {
    compute(obj).unwrap_or_else(|message| ResourceStatus::new(Status::Unknown, message))
}

/// `Err` carries the "malformed" message that becomes `Unknown`.
type Check = Result<ResourceStatus, String>;

fn current(message: impl Into<String>) -> Check {
    Ok(ResourceStatus::new(Status::Current, message))
}

fn in_progress(message: impl Into<String>) -> Check {
    Ok(ResourceStatus::new(Status::InProgress, message))
}

fn failed(message: impl Into<String>) -> Check {
    Ok(ResourceStatus::new(Status::Failed, message))
}

fn compute(obj: &Value) -> Check {
    if !obj.is_object() {
        return Err("object is not a mapping".to_owned());
    }
    for section in ["metadata", "status", "spec"] {
        match obj.get(section) {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(_) => return Err(format!("{section} is not a mapping")),
        }
    }
    if !str_field(obj, &["metadata", "deletionTimestamp"], "")?.is_empty() {
        return Ok(ResourceStatus::new(
            Status::Terminating,
            "Resource scheduled for deletion",
        ));
    }
    let kind = str_field(obj, &["kind"], "")?;
    let generation = opt_int(obj, &["metadata", "generation"])?;
    let observed = opt_int(obj, &["status", "observedGeneration"])?;
    if let (Some(generation), Some(observed)) = (generation, observed)
        && generation != observed
    {
        return in_progress(format!(
            "{kind} generation is {generation}, but latest observed generation is {observed}"
        ));
    }
    let conditions = conditions(obj)?;
    for c in &conditions {
        if c.status == "True" && c.type_ == "Reconciling" {
            return in_progress(c.message_or(&format!("{kind} is reconciling")));
        }
        if c.status == "True" && c.type_ == "Stalled" {
            return failed(c.message_or(&format!("{kind} is stalled")));
        }
    }
    let group = split_api_version(str_field(obj, &["apiVersion"], "")?).0;
    match (group, kind) {
        ("", "Service") => service(obj),
        ("", "Pod") => pod(obj, &conditions),
        ("", "PersistentVolumeClaim") => pvc(obj),
        ("", "Namespace") => namespace(obj),
        ("", "Secret" | "ConfigMap") | ("batch", "CronJob") => current("Resource is always ready"),
        ("apps", "StatefulSet") => statefulset(obj),
        ("apps" | "extensions", "DaemonSet") => daemonset(obj, kind),
        ("apps" | "extensions", "Deployment") => deployment(obj, &conditions),
        ("apps" | "extensions", "ReplicaSet") => replicaset(obj, &conditions),
        ("policy", "PodDisruptionBudget") => current("AllowedDisruptions has been computed."),
        ("batch", "Job") => job(obj, &conditions),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => crd(&conditions),
        ("apiregistration.k8s.io", "APIService") => api_service(&conditions),
        _ => generic(&conditions),
    }
}

// ---------------------------------------------------------------------------------------
// Field access: missing or null means "use the default"; a wrong type is malformed.

fn field<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter()
        .try_fold(obj, |v, key| v.get(key))
        .filter(|v| !v.is_null())
}

fn opt_int(obj: &Value, path: &[&str]) -> Result<Option<i64>, String> {
    match field(obj, path) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("{} is not an integer", path.join("."))),
    }
}

fn int_field(obj: &Value, path: &[&str], default: i64) -> Result<i64, String> {
    Ok(opt_int(obj, path)?.unwrap_or(default))
}

fn str_field<'a>(obj: &'a Value, path: &[&str], default: &'a str) -> Result<&'a str, String> {
    match field(obj, path) {
        None => Ok(default),
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("{} is not a string", path.join("."))),
    }
}

/// One entry of `status.conditions`.
struct Condition<'a> {
    type_: &'a str,
    status: &'a str,
    reason: &'a str,
    message: &'a str,
}

impl Condition<'_> {
    fn message_or(&self, fallback: &str) -> String {
        if !self.message.is_empty() {
            self.message.to_owned()
        } else if !self.reason.is_empty() {
            self.reason.to_owned()
        } else {
            fallback.to_owned()
        }
    }
}

fn conditions(obj: &Value) -> Result<Vec<Condition<'_>>, String> {
    let Some(list) = field(obj, &["status", "conditions"]) else {
        return Ok(Vec::new());
    };
    let list = list.as_array().ok_or("status.conditions is not a list")?;
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let text = |key: &str| match c.get(key) {
                None | Some(Value::Null) => Ok(""),
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(_) => Err(format!("status.conditions[{i}].{key} is not a string")),
            };
            if !c.is_object() {
                return Err(format!("status.conditions[{i}] is not a mapping"));
            }
            Ok(Condition {
                type_: text("type")?,
                status: text("status")?,
                reason: text("reason")?,
                message: text("message")?,
            })
        })
        .collect()
}

fn find<'a, 'b>(conditions: &'b [Condition<'a>], type_: &str) -> Option<&'b Condition<'a>> {
    conditions.iter().find(|c| c.type_ == type_)
}

// ---------------------------------------------------------------------------------------
// Per-kind rules.

fn generic(conditions: &[Condition<'_>]) -> Check {
    match find(conditions, "Ready") {
        Some(c) if c.status == "True" => current("Resource is Ready"),
        Some(c) => in_progress(c.message_or("Resource is not Ready")),
        None => current("Resource is current"),
    }
}

fn deployment(obj: &Value, conditions: &[Condition<'_>]) -> Check {
    // Without progressDeadlineSeconds the controller never sets `Progressing`, so it cannot
    // be waited for; i32::MAX is how the controller spells "no deadline".
    let deadline = int_field(
        obj,
        &["spec", "progressDeadlineSeconds"],
        i64::from(i32::MAX),
    )?;
    let mut progressing = deadline == i64::from(i32::MAX);
    let mut available = false;
    for c in conditions {
        match c.type_ {
            "Progressing" if c.reason == "ProgressDeadlineExceeded" => {
                return failed(if c.message.is_empty() {
                    "Progress deadline exceeded".to_owned()
                } else {
                    format!("Progress deadline exceeded: {}", c.message)
                });
            }
            "Progressing" if c.status == "True" && c.reason == "NewReplicaSetAvailable" => {
                progressing = true;
            }
            "Available" if c.status == "True" => available = true,
            _ => {}
        }
    }
    // The controller defaults spec.replicas to 1.
    let spec = int_field(obj, &["spec", "replicas"], 1)?;
    let replicas = int_field(obj, &["status", "replicas"], 0)?;
    let updated = int_field(obj, &["status", "updatedReplicas"], 0)?;
    let ready = int_field(obj, &["status", "readyReplicas"], 0)?;
    let avail = int_field(obj, &["status", "availableReplicas"], 0)?;
    if spec > replicas {
        return in_progress(format!("Replicas: {replicas}/{spec}"));
    }
    if spec > updated {
        return in_progress(format!("Updated: {updated}/{spec}"));
    }
    if replicas > spec {
        return in_progress(format!("Pending termination: {}", replicas - spec));
    }
    if updated > avail {
        return in_progress(format!("Available: {avail}/{updated}"));
    }
    if spec > ready {
        return in_progress(format!("Ready: {ready}/{spec}"));
    }
    if !progressing {
        return in_progress("ReplicaSet not Available");
    }
    if !available {
        return in_progress("Deployment not Available");
    }
    current(format!("Deployment is available. Replicas: {replicas}"))
}

fn replicaset(obj: &Value, conditions: &[Condition<'_>]) -> Check {
    if conditions
        .iter()
        .any(|c| c.type_ == "ReplicaFailure" && c.status == "True")
    {
        return in_progress("Replica Failure condition. Check Pods");
    }
    let spec = int_field(obj, &["spec", "replicas"], 1)?;
    let replicas = int_field(obj, &["status", "replicas"], 0)?;
    let ready = int_field(obj, &["status", "readyReplicas"], 0)?;
    let avail = int_field(obj, &["status", "availableReplicas"], 0)?;
    let labelled = int_field(obj, &["status", "fullyLabeledReplicas"], 0)?;
    if spec > labelled {
        return in_progress(format!("Labelled: {labelled}/{spec}"));
    }
    if spec > avail {
        return in_progress(format!("Available: {avail}/{spec}"));
    }
    if spec > ready {
        return in_progress(format!("Ready: {ready}/{spec}"));
    }
    if replicas > spec {
        return in_progress(format!("Pending termination: {}", replicas - spec));
    }
    current(format!("ReplicaSet is available. Replicas: {replicas}"))
}

fn statefulset(obj: &Value) -> Check {
    // With OnDelete, pods are only replaced when the user deletes them: nothing to wait for.
    if str_field(obj, &["spec", "updateStrategy", "type"], "")? == "OnDelete" {
        return current("StatefulSet is using the ondelete update strategy");
    }
    let spec = int_field(obj, &["spec", "replicas"], 1)?;
    let ready = int_field(obj, &["status", "readyReplicas"], 0)?;
    let current_replicas = int_field(obj, &["status", "currentReplicas"], 0)?;
    let updated = int_field(obj, &["status", "updatedReplicas"], 0)?;
    let replicas = int_field(obj, &["status", "replicas"], 0)?;
    let partition = int_field(
        obj,
        &["spec", "updateStrategy", "rollingUpdate", "partition"],
        -1,
    )?;
    if spec > replicas {
        return in_progress(format!("Replicas: {replicas}/{spec}"));
    }
    if spec > ready {
        return in_progress(format!("Ready: {ready}/{spec}"));
    }
    if replicas > spec {
        return in_progress(format!("Pending termination: {}", replicas - spec));
    }
    if partition != -1 {
        // Only ordinals at or above the partition are updated.
        if updated < spec - partition {
            return in_progress(format!("updated: {updated}/{}", spec - partition));
        }
        return current(format!("Partition rollout complete. updated: {updated}"));
    }
    if spec > current_replicas {
        return in_progress(format!("current: {current_replicas}/{spec}"));
    }
    let current_revision = str_field(obj, &["status", "currentRevision"], "")?;
    let update_revision = str_field(obj, &["status", "updateRevision"], "")?;
    if current_revision != update_revision {
        return in_progress("Waiting for updated revision to match current");
    }
    current(format!(
        "All replicas scheduled as expected. Replicas: {replicas}"
    ))
}

fn daemonset(obj: &Value, kind: &str) -> Check {
    // The generic generation check is skipped when either field is missing; the DaemonSet
    // controller always sets both once it has acted, so missing means "not yet".
    if opt_int(obj, &["metadata", "generation"])?.is_none() {
        return in_progress(format!("{kind} metadata.generation not found"));
    }
    if opt_int(obj, &["status", "observedGeneration"])?.is_none() {
        return in_progress(format!("{kind} status.observedGeneration not found"));
    }
    let desired = int_field(obj, &["status", "desiredNumberScheduled"], -1)?;
    let scheduled = int_field(obj, &["status", "currentNumberScheduled"], 0)?;
    let updated = int_field(obj, &["status", "updatedNumberScheduled"], 0)?;
    let avail = int_field(obj, &["status", "numberAvailable"], 0)?;
    let ready = int_field(obj, &["status", "numberReady"], 0)?;
    if desired == -1 {
        return in_progress("Missing .status.desiredNumberScheduled");
    }
    if desired > scheduled {
        return in_progress(format!("Current: {scheduled}/{desired}"));
    }
    if desired > updated {
        return in_progress(format!("Updated: {updated}/{desired}"));
    }
    if desired > avail {
        return in_progress(format!("Available: {avail}/{desired}"));
    }
    if desired > ready {
        return in_progress(format!("Ready: {ready}/{desired}"));
    }
    current(format!(
        "All replicas scheduled as expected. Replicas: {desired}"
    ))
}

fn pod(obj: &Value, conditions: &[Condition<'_>]) -> Check {
    let phase = str_field(obj, &["status", "phase"], "")?;
    match phase {
        "Succeeded" => current("Pod has completed successfully"),
        // kstatus calls this Current so that completed Pods never block; but a Pod that
        // failed will not recover by waiting, and users applying a bare Pod want to know.
        "Failed" => failed("Pod has completed, but not successfully"),
        "Running" => {
            if find(conditions, "Ready").is_some_and(|c| c.status == "True") {
                return current("Pod is Ready");
            }
            if let Some(names) = crash_looping(obj)? {
                return failed(format!("Containers in CrashLoop state: {names}"));
            }
            in_progress(waiting_detail(obj, "Pod is running but is not Ready")?)
        }
        "Pending" => {
            // Init containers run while the Pod is Pending; one crash-looping there keeps it
            // Pending forever.
            if let Some(names) = crash_looping(obj)? {
                return failed(format!("Containers in CrashLoop state: {names}"));
            }
            if let Some(c) = find(conditions, "PodScheduled")
                && c.status == "False"
                && c.reason == "Unschedulable"
            {
                // Not Failed: a cluster autoscaler may still add a node.
                return in_progress(format!(
                    "Pod could not be scheduled: {}",
                    c.message_or("Unschedulable")
                ));
            }
            in_progress(waiting_detail(obj, "Pod is in the Pending phase")?)
        }
        "" => in_progress("Pod phase not available"),
        other => Err(format!("unknown Pod phase {other:?}")),
    }
}

/// Container and init-container statuses, as (name, waiting reason, waiting message).
fn waiting_containers(obj: &Value) -> Result<Vec<(&str, &str, &str)>, String> {
    let mut out = Vec::new();
    for list in ["initContainerStatuses", "containerStatuses"] {
        let Some(statuses) = field(obj, &["status", list]) else {
            continue;
        };
        let statuses = statuses
            .as_array()
            .ok_or_else(|| format!("status.{list} is not a list"))?;
        for s in statuses {
            let name = str_field(s, &["name"], "")?;
            let reason = str_field(s, &["state", "waiting", "reason"], "")?;
            let message = str_field(s, &["state", "waiting", "message"], "")?;
            if !reason.is_empty() {
                out.push((name, reason, message));
            }
        }
    }
    Ok(out)
}

fn crash_looping(obj: &Value) -> Result<Option<String>, String> {
    let names: Vec<&str> = waiting_containers(obj)?
        .into_iter()
        .filter(|(_, reason, _)| *reason == "CrashLoopBackOff")
        .map(|(name, _, _)| name)
        .collect();
    Ok((!names.is_empty()).then(|| names.join(",")))
}

/// Adds why containers are waiting (ImagePullBackOff, ...): transient to kstatus, so still
/// InProgress, but it is what the user needs to see when the sync times out.
fn waiting_detail(obj: &Value, base: &str) -> Result<String, String> {
    let waiting = waiting_containers(obj)?;
    let Some((name, reason, message)) = waiting
        .iter()
        .find(|(_, reason, _)| *reason != "ContainerCreating" && *reason != "PodInitializing")
    else {
        return Ok(base.to_owned());
    };
    Ok(if message.is_empty() {
        format!("{base}: container {name} is waiting: {reason}")
    } else {
        format!("{base}: container {name} is waiting: {reason}: {message}")
    })
}

fn job(obj: &Value, conditions: &[Condition<'_>]) -> Check {
    let parallelism = int_field(obj, &["spec", "parallelism"], 1)?;
    let completions = int_field(obj, &["spec", "completions"], parallelism)?;
    let succeeded = int_field(obj, &["status", "succeeded"], 0)?;
    let active = int_field(obj, &["status", "active"], 0)?;
    let failed_pods = int_field(obj, &["status", "failed"], 0)?;
    let start_time = str_field(obj, &["status", "startTime"], "")?;
    for c in conditions {
        match c.type_ {
            "Complete" if c.status == "True" => {
                return current(format!(
                    "Job Completed. succeeded: {succeeded}/{completions}"
                ));
            }
            "Failed" if c.status == "True" => {
                return failed(format!("Job Failed. failed: {failed_pods}/{completions}"));
            }
            "Suspended" if c.status == "True" => return current("Job is suspended"),
            _ => {}
        }
    }
    if start_time.is_empty() {
        return in_progress("Job not started");
    }
    // As kstatus: a running Job is Current, so that a long batch job does not hold the
    // sync until reconcile_timeout.
    current(format!(
        "Job in progress. success:{succeeded}, active: {active}, failed: {failed_pods}"
    ))
}

fn service(obj: &Value) -> Check {
    if str_field(obj, &["spec", "type"], "ClusterIP")? == "LoadBalancer" {
        let ingress = field(obj, &["status", "loadBalancer", "ingress"]);
        let has_ingress = match ingress {
            None => false,
            Some(Value::Array(items)) => !items.is_empty(),
            Some(_) => return Err("status.loadBalancer.ingress is not a list".to_owned()),
        };
        if !has_ingress {
            return in_progress("Service type LoadBalancer: no ingress address assigned yet");
        }
    }
    current("Service is ready")
}

fn pvc(obj: &Value) -> Check {
    let phase = str_field(obj, &["status", "phase"], "unknown")?;
    if phase != "Bound" {
        return in_progress(format!("PVC is not Bound. phase: {phase}"));
    }
    current("PVC is Bound")
}

fn namespace(obj: &Value) -> Check {
    match str_field(obj, &["status", "phase"], "")? {
        "Active" => current("Namespace is active"),
        "Terminating" => Ok(ResourceStatus::new(
            Status::Terminating,
            "Namespace is terminating",
        )),
        "" => in_progress("Namespace phase not available"),
        other => Err(format!("unknown Namespace phase {other:?}")),
    }
}

fn crd(conditions: &[Condition<'_>]) -> Check {
    for c in conditions {
        if c.type_ == "NamesAccepted" && c.status == "False" {
            return failed(c.message_or("CRD names not accepted"));
        }
        if c.type_ == "Established" {
            if c.status == "False" && c.reason != "Installing" {
                return failed(c.message_or("CRD is not established"));
            }
            if c.status == "True" {
                return current("CRD is established");
            }
        }
    }
    in_progress("Install in progress")
}

/// An aggregated API is served only while kube-aggregator finds it `Available`. `False` is
/// InProgress, not Failed, as a Deployment not yet available is: its server is usually being
/// started by the same sync (`MissingEndpoints`, `FailedDiscoveryCheck`), and one that never
/// comes up fails the sync at `reconcile_timeout` with this message.
fn api_service(conditions: &[Condition<'_>]) -> Check {
    match find(conditions, "Available") {
        Some(c) if c.status == "True" => current("APIService is available"),
        Some(c) => {
            let why = match (c.reason, c.message) {
                ("", "") => String::new(),
                ("", m) => format!(": {m}"),
                (r, "") => format!(" ({r})"),
                (r, m) => format!(" ({r}): {m}"),
            };
            in_progress(format!("APIService is not available{why}"))
        }
        None => in_progress("APIService availability not checked yet"),
    }
}

// ---------------------------------------------------------------------------------------
// Aggregation.

/// Where a sync stands after looking at every object's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Everything is Current: the sync succeeded.
    Done,
    /// Something is still InProgress, Unknown, Terminating or NotFound: poll again (until
    /// the caller's `reconcile_timeout`).
    Waiting,
    /// Nothing left to wait for, but some objects Failed.
    Failed,
}

/// Counts per status and the resulting [`SyncState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The verdict.
    pub state: SyncState,
    /// Objects that are Current.
    pub current: usize,
    /// Objects that are InProgress.
    pub in_progress: usize,
    /// Objects that Failed (including any the caller recorded as failed to apply).
    pub failed: usize,
    /// Objects being deleted.
    pub terminating: usize,
    /// Objects not found.
    pub not_found: usize,
    /// Objects whose status is Unknown.
    pub unknown: usize,
}

impl Outcome {
    /// Objects still worth waiting for.
    pub fn pending(&self) -> usize {
        self.in_progress + self.terminating + self.not_found + self.unknown
    }

    /// Objects that are not Current: once `reconcile_timeout` has passed, the pending ones
    /// count as failed too, since they did not become Current in time.
    pub fn not_current(&self) -> usize {
        self.failed + self.pending()
    }
}

/// Aggregates the statuses of every object in a sync. Objects that failed to apply should
/// be passed in as `Failed` with the API error as message. An empty list is `Done`.
///
/// Failed objects do not stop the wait for the others: each object gets its chance to
/// become Current, so that one broken Deployment does not hide the state of the rest.
pub fn sync_outcome(statuses: &[(ObjRef, ResourceStatus)]) -> Outcome {
    let mut o = Outcome {
        state: SyncState::Done,
        current: 0,
        in_progress: 0,
        failed: 0,
        terminating: 0,
        not_found: 0,
        unknown: 0,
    };
    for (_, s) in statuses {
        match s.status {
            Status::Current => o.current += 1,
            Status::InProgress => o.in_progress += 1,
            Status::Failed => o.failed += 1,
            Status::Terminating => o.terminating += 1,
            Status::NotFound => o.not_found += 1,
            Status::Unknown => o.unknown += 1,
        }
    }
    o.state = if o.pending() > 0 {
        SyncState::Waiting
    } else if o.failed > 0 {
        SyncState::Failed
    } else {
        SyncState::Done
    };
    o
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
