//! One synchronization of a manifest project against the cluster: the I/O around the pure
//! rules of this crate. Decode everything first (bad input never writes or deletes anything),
//! apply with server-side apply in stages, record the inventory, prune what left Git in reverse
//! dependency order, then watch status until everything is Current or Failed, or time runs out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::Client;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, ObjectList, Patch, PatchParams, PropagationPolicy,
};
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use serde_json::{Value, json};
use tether_agent_config::{
    DryRunStrategy, InventoryPolicy, ManifestProject, PrunePropagationPolicy,
};
use tokio_util::sync::CancellationToken;

use crate::apis::Apis;
use crate::decode::{DecodeError, Manifest, decode_file_noting};
use crate::drift;
use crate::events::{self, Phase};
use crate::inventory::{self, InventoryError, OwnershipConflict};
use crate::lease::LeaseCheck;
use crate::object_ref::ObjRef;
use crate::plan;
use crate::prune::{self, Skip};
use crate::record::{self, Recorded};
use crate::status::{ResourceStatus, Status, StatusView, compute_status, sync_outcome};
use crate::status_watch::{Seen, Watches, settled};
use crate::substitute::Variables;
use crate::takeover::{self, DriftManagers, Takeover};
use crate::variables::{self, ReferenceError, Secrets};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "agentk";
/// How many API requests one sync keeps in flight.
pub(crate) const CONCURRENCY: usize = 16;
/// First status poll after applying; the period then doubles up to [`POLL_MAX`]. Most objects
/// are Current at once (or within a second), a few take minutes.
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(2);
/// From this many objects of one type in one namespace, one LIST replaces a GET per object.
const LIST_THRESHOLD: usize = 4;

/// `timeout` from now, or about as far as the clock goes when that overflows: the timeouts come
/// from the agent's configuration, which a kas older than its one-week limit passes unchecked,
/// and adding 2^64 seconds to an `Instant` panics.
fn deadline_in(timeout: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);
    let now = tokio::time::Instant::now();
    now.checked_add(timeout).unwrap_or(now + FAR)
}

/// What to do for one manifest project.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Whether this replica still leads when it writes ([`LeaseCheck`]).
    pub lease: LeaseCheck,
    pub agent_id: i64,
    /// The entry's key: the project as written in the configuration (path or numeric id),
    /// followed by `#name` for a named entry.
    pub project_id: String,
    pub default_namespace: String,
    /// Where namespaced objects that name no namespace land: a Helm entry's `helm.namespace`
    /// (as `helm install --namespace` puts them, and Flux's `targetNamespace`), otherwise
    /// `default_namespace`. The inventory stays in `default_namespace` either way.
    pub objects_namespace: String,
    pub prune: bool,
    /// Whether a commit selecting no object may prune everything (see [`plan::empties`]).
    pub allow_empty: bool,
    /// Whether objects annotated `helm.sh/hook` refuse the sync (see [`plan::helm_hooks`]):
    /// a Helm entry without `helm.hooks: apply`.
    pub refuse_helm_hooks: bool,
    /// Whether a Helm entry renders the files: its `helm.hooks` decides about Helm hooks, and
    /// [`plan::hooks`] says nothing of them.
    pub rendered_by_helm: bool,
    pub prune_timeout: Duration,
    pub prune_propagation_policy: PrunePropagationPolicy,
    pub inventory_policy: InventoryPolicy,
    pub reconcile_timeout: Duration,
    pub dry_run: DryRunStrategy,
    /// Where a running sync tells how far it got (`kas agent reconcile --wait`).
    pub progress: ProgressSink,
    /// The project's `default_namespace` before a configuration change moved it: the
    /// inventory is still there until a sync writes it in the new namespace (and deletes
    /// the old one), so what left Git in the meantime is still pruned.
    pub previous_namespace: Option<String>,
    /// The entry's `post_build`: variables substituted into the objects.
    pub post_build: Option<tether_agent_config::PostBuild>,
    /// agentk's own namespace (empty: unknown), where `post_build.substitute_from` references
    /// without a namespace are read.
    pub agent_namespace: String,
    /// Whose fields are taken over before applying, so that the apply reverts them
    /// ([`takeover`]; `gitops.drift_managers`).
    pub drift_managers: DriftManagers,
    /// The inventories of the agent's entries in force: their objects are not taken over.
    pub live_inventories: inventory::LiveInventories,
}

/// How far a running sync got: its objects so far, how many are Current or Failed, and the
/// first object (in object order) still neither, so that a wait that ends names what it waited
/// for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncProgress {
    pub objects: usize,
    pub current: usize,
    pub failed: usize,
    pub pending: Option<PendingObject>,
}

/// An object not Current yet, with the reason its status gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingObject {
    pub obj: ObjRef,
    pub status: Status,
    pub message: String,
}

impl SyncProgress {
    /// Counts the outcomes recorded so far (pruned objects aside).
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a ObjectOutcome>) -> Self {
        let mut p = Self::default();
        let mut first: Option<&ObjectOutcome> = None;
        for o in outcomes {
            match o.status {
                ObjectState::Pruned | ObjectState::PruneSkipped => continue,
                ObjectState::Live(Status::Current) => p.current += 1,
                ObjectState::Live(Status::Failed) => p.failed += 1,
                ObjectState::Live(_) => {
                    if first.is_none_or(|f| o.obj < f.obj) {
                        first = Some(o);
                    }
                }
            }
            p.objects += 1;
        }
        p.pending = first.and_then(|o| match o.status {
            ObjectState::Live(status) => Some(PendingObject {
                obj: o.obj.clone(),
                status,
                message: o.message.clone(),
            }),
            ObjectState::Pruned | ObjectState::PruneSkipped => None,
        });
        p
    }
}

/// Where a sync publishes its [`SyncProgress`]; none by default.
#[derive(Debug, Clone, Default)]
pub struct ProgressSink(Option<std::sync::Arc<tokio::sync::watch::Sender<SyncProgress>>>);

impl ProgressSink {
    pub fn new(tx: std::sync::Arc<tokio::sync::watch::Sender<SyncProgress>>) -> Self {
        Self(Some(tx))
    }

    fn publish(&self, outcomes: &HashMap<ObjRef, ObjectOutcome>) {
        if let Some(tx) = &self.0 {
            tx.send_if_modified(|p| {
                let now = SyncProgress::of(outcomes.values());
                let changed = *p != now;
                *p = now;
                changed
            });
        }
    }
}

/// Where progress goes is not part of what a sync does: settings that differ only in it are
/// the same settings.
impl PartialEq for ProgressSink {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Settings {
    /// The settings of one `gitops.manifest_projects[]` entry; its key (`project_id`) is the
    /// entry's key ([`ManifestProject::entry_key`]: the project as written, plus `#name` for
    /// a named entry), which names its inventory.
    pub fn for_project(agent_id: i64, p: &ManifestProject) -> Self {
        Settings {
            agent_id,
            project_id: p.entry_key(),
            default_namespace: p.default_namespace.clone(),
            objects_namespace: p
                .helm
                .as_ref()
                .and_then(|h| h.namespace.clone())
                .unwrap_or_else(|| p.default_namespace.clone()),
            prune: p.prune,
            allow_empty: p.allow_empty,
            refuse_helm_hooks: p
                .helm
                .as_ref()
                .is_some_and(|h| h.hooks == tether_agent_config::HelmHooks::Refuse),
            rendered_by_helm: p.helm.is_some(),
            prune_timeout: p.prune_timeout,
            prune_propagation_policy: p.prune_propagation_policy,
            inventory_policy: p.inventory_policy,
            reconcile_timeout: p.reconcile_timeout,
            dry_run: p.dry_run_strategy,
            progress: ProgressSink::default(),
            previous_namespace: None,
            post_build: p.post_build.clone(),
            agent_namespace: String::new(),
            drift_managers: DriftManagers::new(
                tether_agent_config::DEFAULT_DRIFT_MANAGERS
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect(),
            ),
            live_inventories: inventory::LiveInventories::default(),
            lease: LeaseCheck::always(),
        }
    }
}

/// A Helm hook found in a rendering that refuses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelmHook {
    pub obj: ObjRef,
    /// Where it is (`path:line`).
    pub at: String,
    /// The `helm.sh/hook` annotation's value.
    pub hook: String,
}

/// [`SyncError::HelmHook`] for the first hook of `manifests`, when `s` refuses them.
pub(crate) fn refuse_helm_hooks(manifests: &[Manifest], s: &Settings) -> Result<(), SyncError> {
    if !s.refuse_helm_hooks {
        return Ok(());
    }
    match plan::helm_hooks(manifests).into_iter().next() {
        None => Ok(()),
        Some((i, hook)) => Err(SyncError::HelmHook(Box::new(HelmHook {
            obj: manifests[i].obj_ref(),
            at: manifests[i].source(),
            hook,
        }))),
    }
}

/// Where a sync left an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// In the cluster, with this status (`Failed` also when it could not be applied).
    Live(Status),
    /// Deleted because it left Git.
    Pruned,
    /// Left Git but left in place: no longer ours, or of a type the API server does not serve
    /// (the message says which). Not a failure: there was nothing we should delete.
    PruneSkipped,
}

/// One object's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectOutcome {
    pub obj: ObjRef,
    pub status: ObjectState,
    pub message: String,
    /// This sync's write failed (apply refused, or delete of an object that left Git):
    /// counted apart from what was applied.
    pub not_applied: bool,
}

impl ObjectOutcome {
    fn new(obj: ObjRef, status: Status, message: impl Into<String>) -> Self {
        Self {
            obj,
            status: ObjectState::Live(status),
            message: message.into(),
            not_applied: false,
        }
    }

    /// An object this sync could not write, and why.
    fn write_failed(obj: ObjRef, message: String) -> Self {
        Self {
            not_applied: true,
            ..Self::new(obj, Status::Failed, message)
        }
    }
}

/// What deleting one object that left Git did, before waiting for it to be gone.
#[derive(Debug)]
enum Deletion {
    /// A delete was sent (of this type, in this namespace): it may still be going away.
    Sent(ApiResource, Option<String>),
    /// It was gone already.
    Gone,
    /// Left in place.
    Skipped(Skip),
}

/// How pruning one object ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PruneEnd {
    /// Gone; `wrote` when our delete made it so.
    Gone { wrote: bool },
    /// Left in place, and why.
    Skipped(Skip),
}

/// Kubernetes' answer to a failed request, as a readable reason
/// ("deployments.apps is forbidden: … (403 Forbidden)").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    message: String,
    /// The HTTP status, when the API server answered.
    code: Option<u16>,
}

impl ApiError {
    fn is_not_found(&self) -> bool {
        self.code == Some(404)
    }
}

/// What to do when the API server refused agentk its inventory: least-privilege installs
/// grant ConfigMaps only where asked, and the fix is in the install, not in Git.
fn inventory_rbac_hint(e: &ApiError) -> &'static str {
    match e.code {
        Some(403) => {
            " (agentk's ServiceAccount needs ConfigMaps in the project's default_namespace, \
             where its inventory is kept: with the agentk chart, list that namespace in \
             rbac.namespaces or rbac.inventoryNamespaces)"
        }
        _ => "",
    }
}

/// The reason kube-client gives an error response whose body is not a `Status`.
const KUBE_UNPARSED_REASON: &str = "Failed to parse error data";

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => ApiError {
                message: match s.reason.as_str() {
                    // kube's stand-in reason when the body was no Kubernetes Status (an
                    // aggregated API server's or a proxy's plain "service unavailable"):
                    // not the API server's word, so not shown as if it were.
                    KUBE_UNPARSED_REASON => format!("{} ({})", s.message, s.code),
                    reason => format!("{} ({} {reason})", s.message, s.code),
                },
                code: Some(s.code),
            },
            other => ApiError {
                message: error_text(&other),
                code: None,
            },
        }
    }
}

/// An error and its causes, each said once: kube's "ServiceError: client error (Connect)"
/// alone hid why (the API server's address refusing connections, a TLS failure).
pub(crate) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    for cause in std::iter::successors(e.source(), |c| c.source()) {
        let said = cause.to_string();
        // kube's and hyper's errors repeat their source in their own text.
        if !text.ends_with(&said) {
            text = format!("{text}: {said}");
        }
    }
    text
}

/// Why one object could not be applied or pruned (its outcome's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Ownership(#[from] OwnershipConflict),
    #[error("the cluster has no resource type for {kind} in API version {api_version}")]
    NoResourceType { kind: String, api_version: String },
    /// Its group's discovery failed (an aggregated API whose server is down): not "not
    /// served", so it is neither applied nor pruned, and stays in the inventory.
    #[error(
        "API group {group} is unavailable (its discovery failed: {reason}); nothing was done with this object, the next sync tries again"
    )]
    GroupUnavailable { group: String, reason: String },
    #[error("still present after prune_timeout ({0:?})")]
    StillPresent(Duration),
}

impl ObjectError {
    /// Whether an apply failing so shows the object does not exist: its namespace or its type
    /// is missing (404), or the cluster serves no such type. A refusal (403, invalid, a
    /// webhook) shows nothing: a listed object it refused an update of still exists.
    fn shows_absent(&self) -> bool {
        match self {
            ObjectError::Api(e) => e.is_not_found(),
            ObjectError::NoResourceType { .. } => true,
            _ => false,
        }
    }

    /// Whether reading or deleting an object failed in a way that fits it never having been
    /// created: forbidden (a namespace the agent may not read) or not found.
    pub(crate) fn fits_never_created(&self) -> bool {
        matches!(self, ObjectError::Api(e) if matches!(e.code, Some(403 | 404)))
    }
}

/// Whether pruning an object listed only as attempted (its creation failed, [`record`]) ended
/// so that it is forgotten without an outcome: it was not there, is not ours, or cannot be
/// read (a namespace the agent may not read, where it was never created). Only when found
/// ours and deleted (or kept by annotation) does it tell, as any pruned object does.
fn forgets_attempted(end: &Result<PruneEnd, ObjectError>) -> bool {
    match end {
        Ok(PruneEnd::Gone { wrote }) => !wrote,
        Ok(PruneEnd::Skipped(skip)) => !matches!(skip, Skip::Kept { .. }),
        Err(e) => e.fits_never_created(),
    }
}

/// Why a synchronization failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// A file does not decode: nothing was applied or pruned.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A `post_build.substitute_from` reference could not be used: nothing was applied or
    /// pruned.
    #[error(
        "post_build.substitute_from[{index}]: {kind} {namespace}/{name} {reason}; nothing was applied"
    )]
    SubstituteFrom {
        index: usize,
        kind: &'static str,
        namespace: String,
        name: String,
        reason: ReferenceError,
    },
    #[error("inventory {namespace}/{name} is unreadable: {source}")]
    InventoryUnreadable {
        namespace: String,
        name: String,
        source: InventoryError,
    },
    #[error(
        "reading inventory {namespace}/{name}: {source}{}",
        inventory_rbac_hint(source)
    )]
    ReadInventory {
        namespace: String,
        name: String,
        source: ApiError,
    },
    /// Checked before applying, so nothing is applied that the inventory could not track.
    #[error(
        "inventory {namespace}/{name} cannot list this commit's objects: {source}; nothing was applied"
    )]
    InventoryTooLarge {
        namespace: String,
        name: String,
        source: InventoryError,
    },
    /// The inventory could not be written before applying: nothing was applied.
    #[error(
        "namespace {0} (the project's default_namespace, where its inventory is kept) does not exist and this commit does not create it: nothing was applied (create the namespace, or add a Namespace {0} to the project's files)"
    )]
    InventoryNamespaceMissing(String),
    #[error(
        "namespace {namespace} (the project's default_namespace, where its inventory is kept) could not be created: {reason}; nothing else was applied"
    )]
    InventoryNamespaceNotCreated { namespace: String, reason: String },
    #[error(
        "writing inventory {namespace}/{name}: {source}{}",
        inventory_rbac_hint(source)
    )]
    WriteInventory {
        namespace: String,
        name: String,
        source: ApiError,
    },
    /// The last of several attempts' error.
    #[error("API discovery failed: {0}")]
    Discovery(String),
    #[error("{obj} is defined more than once: {}", .sources.join(", "))]
    Duplicate { obj: ObjRef, sources: Vec<String> },
    #[error(
        "{} ({}) is a Helm hook (helm.sh/hook: {}), which agentk would apply as a permanent object, never run as Helm runs hooks: refused, nothing was applied (to apply hooks as ordinary objects, set helm.hooks: apply on the manifest project)"
    , .0.obj, .0.at, .0.hook)]
    HelmHook(Box<HelmHook>),
    #[error(
        "the commit selects no object, which would prune all {0} objects the project applied before: refused, nothing was pruned (if emptying it is meant, set allow_empty: true on the manifest project)"
    )]
    WouldEmpty(usize),
    /// Objects that are not Current (or Pruned) at the end. Upstream's wording, kept for
    /// users' log queries (no singular form).
    #[error("{0} resources failed")]
    ResourcesFailed(usize),
    /// Everything was applied and pruned, but another synchronization (`due`: of a newer
    /// commit, or a re-sync of the same one) became due before these objects were Current, so
    /// their wait was cut ([`SyncStop::supersede`]). Not a failure.
    #[error(
        "superseded: {pending} resources were not Current yet when {due} became due; everything was applied and pruned, and the next synchronization reports their status"
    )]
    Superseded { pending: usize, due: String },
}

/// How a running sync is asked to end early.
#[derive(Debug, Clone, Default)]
pub struct SyncStop {
    /// Stop between requests, whatever the phase: agentk stops, or the entry left the
    /// configuration.
    pub now: CancellationToken,
    /// Cancelled by [`SyncStop::supersede`], and with `now`.
    waiting: CancellationToken,
    /// What the sync that superseded this one is, as its report says it.
    due: Arc<std::sync::OnceLock<String>>,
}

impl SyncStop {
    /// A stop that `now` ends at once (a child: cancelling it ends this sync only).
    pub fn under(now: &CancellationToken) -> Self {
        let now = now.child_token();
        let waiting = now.child_token();
        Self {
            now,
            waiting,
            due: Arc::default(),
        }
    }

    /// Another sync is due (`due`, as the report says it: "a sync of newer commit C", "a
    /// re-sync of the same commit (kas agent reconcile)"): finish applying and pruning, but
    /// stop waiting for the objects to be Current. Cancelling the whole sync instead made a
    /// steady stream of commits starve it: each new commit cut the apply of the one before,
    /// and none finished. Writes end in seconds; a wait for Current may take minutes. The
    /// first cause is kept: it is the one that cut the wait.
    pub fn supersede(&self, due: &str) {
        let _ = self.due.set(due.to_owned());
        self.waiting.cancel();
    }

    /// What superseded the sync, as [`SyncStop::supersede`] was told.
    fn due(&self) -> String {
        self.due
            .get()
            .cloned()
            .unwrap_or_else(|| "another synchronization".to_owned())
    }

    /// Whether the wait was cut by [`SyncStop::supersede`] rather than by a stop.
    pub fn superseded(&self) -> bool {
        self.waiting.is_cancelled() && !self.now.is_cancelled()
    }
}

/// The outcome of a sync whose wait for Current was cut ([`SyncStop::supersede`]): objects
/// still in progress did not fail, they were not waited for. Failed objects still fail it.
fn not_waited_for(out: &mut SyncOutcome, due: &str) {
    let (mut failed, mut pending) = (0, 0);
    for o in &mut out.objects {
        match o.status {
            ObjectState::Live(Status::Failed) => failed += 1,
            ObjectState::Live(Status::Current)
            | ObjectState::Pruned
            | ObjectState::PruneSkipped => {}
            ObjectState::Live(_) => {
                pending += 1;
                o.message = format!("{} (not waited for: {due} was due)", o.message)
                    .trim_start()
                    .to_owned();
            }
        }
    }
    out.error = if failed > 0 {
        Some(SyncError::ResourcesFailed(failed))
    } else if pending > 0 {
        Some(SyncError::Superseded {
            pending,
            due: due.to_owned(),
        })
    } else {
        None
    };
}

/// The outcome of a synchronization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub commit_id: String,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<SyncError>,
    pub objects: Vec<ObjectOutcome>,
    /// Write requests sent (apply, delete, inventory), for the benchmarks.
    pub writes: usize,
    pub dry_run: bool,
    /// Status changes a watch told before any poll (0 when the ServiceAccount may not watch,
    /// or every object was settled by its apply answer).
    pub watched_statuses: usize,
    /// Objects whose fields changed by hand (owned by drift managers) were taken over so the
    /// apply reverted them ([`takeover`]).
    pub taken_over: usize,
    /// What the user should know although it is no failure (hooks in plain files, variables
    /// substituted as empty), said in
    /// the report next to kas's warnings about the commit.
    pub warnings: Vec<String>,
}

impl SyncOutcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }

    /// Everything was applied and pruned, but the wait for Current was cut because a newer
    /// synchronization became due ([`SyncStop::supersede`]).
    pub fn superseded(&self) -> bool {
        matches!(self.error, Some(SyncError::Superseded { .. }))
    }

    fn failed_before_writes(commit_id: &str, error: SyncError, dry_run: bool) -> Self {
        Self {
            commit_id: commit_id.to_string(),
            error: Some(error),
            objects: Vec::new(),
            writes: 0,
            dry_run,
            watched_statuses: 0,
            taken_over: 0,
            warnings: Vec::new(),
        }
    }
}

/// Logs one per-resource event as a JSON log line: the event's own fields (the shapes users of
/// GitLab's agent know, built by [`events`]) merged into the line.
fn log_event(level: tracing::Level, event: &Value) {
    let fields = event.to_string();
    let event_type = event["eventType"].as_str().unwrap_or("event");
    // `fields_json` is merged into the line by the JSON log layer.
    if level <= tracing::Level::WARN {
        tracing::warn!(fields_json = %fields, "{event_type}");
    } else if level <= tracing::Level::INFO {
        tracing::info!(fields_json = %fields, "{event_type}");
    } else {
        tracing::debug!(fields_json = %fields, "{event_type}");
    }
}

/// An object applied (info) or found up to date and not written (`Unchanged`, debug: a
/// re-sync of 5,000 unchanged objects every few minutes was most of agentk's log, and said
/// nothing the sync's own lines do not — `Synchronization done` counts the writes).
fn event_applied(obj: &ObjRef, wrote: bool) {
    let (op, level) = if wrote {
        (
            events::ApplyOperation::ServersideApplied,
            tracing::Level::INFO,
        )
    } else {
        (events::ApplyOperation::Unchanged, tracing::Level::DEBUG)
    };
    log_event(
        level,
        &events::resource_applied(obj, op, std::time::SystemTime::now()),
    );
}

fn event_failed(obj: &ObjRef, phase: Phase, message: &str) {
    log_event(
        tracing::Level::ERROR,
        &events::resource_failed(obj, phase, message, std::time::SystemTime::now()),
    );
}

fn event_pruned(obj: &ObjRef) {
    log_event(
        tracing::Level::INFO,
        &events::resource_pruned(
            obj,
            events::PruneOperation::Pruned,
            std::time::SystemTime::now(),
        ),
    );
}

/// An object that left Git was left in place: cli-utils' `PruneSkipped` with the reason, a
/// warning when nobody chose it (its type vanished).
fn event_prune_skipped(obj: &ObjRef, skip: &Skip) {
    let level = if skip.is_unexpected() {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    };
    let reason = skip.to_string();
    let at = std::time::SystemTime::now();
    log_event(level, &events::resource_prune_skipped(obj, &reason, at));
}

/// Logs an apply answer the moment it arrives rather than when its stage ends, with the
/// object's status when the answer tells it (not in a dry run), so what agentk reports trails
/// the cluster by one answer, not by the whole stage.
fn log_apply_answer(obj: &ObjRef, res: &Result<Applied, ObjectError>, seen: Option<&Seen>) {
    match res {
        Ok(a) => {
            event_applied(obj, a.wrote);
            if let (Some(st), Some(seen)) = (&a.status, seen) {
                seen.record_answer(obj, st.clone(), a.wrote);
            }
        }
        Err(e) => event_failed(obj, Phase::Apply, &e.to_string()),
    }
}

pub(crate) fn event_status(obj: &ObjRef, st: &ResourceStatus, level: tracing::Level) {
    log_event(
        level,
        &events::resource_status(obj, st, std::time::SystemTime::now()),
    );
}

/// The cluster side of synchronizations.
#[derive(Clone)]
pub struct Syncer {
    client: Client,
    /// API discovery's client ([`Syncer::with_discovery`]).
    discovery: Client,
    /// Unavailable API groups already logged: shared by the clones, one per project.
    outages: Arc<std::sync::Mutex<crate::apis::Outages>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").finish_non_exhaustive()
    }
}

/// A manifest whose type discovery knows.
struct Resolved {
    idx: usize,
    ar: ApiResource,
    namespaced: bool,
}

impl Resolved {
    fn namespace<'m>(&self, m: &'m Manifest) -> Option<&'m str> {
        self.namespaced.then(|| m.namespace()).flatten()
    }
}

/// One applied object: whether a write was sent, and its status as far as the API server's
/// answer (or the live object, when nothing needed writing) tells. Only the status is kept:
/// holding thousands of returned objects until the end of the stage would dominate memory.
struct Applied {
    wrote: bool,
    status: Option<ResourceStatus>,
    /// The object's resource version after the apply: where a status watch starts to count.
    resource_version: Option<String>,
    /// Whether fields of drift managers were taken over before the apply ([`takeover`]).
    took_over: bool,
    /// The inventory the object was adopted from by this apply (`adopt_all`), if any.
    adopted_from: Option<String>,
}

/// What is known of an object before applying it.
enum Known {
    /// Not looked up yet: GET it.
    Unknown,
    /// A LIST of its type and namespace did not contain it.
    Absent,
    Live(LiveSummary),
}

/// What the apply needs to know of a live object, so thousands of listed objects need not be
/// held while the stage runs.
struct LiveSummary {
    owner: Option<String>,
    /// The inventory the owner adopted it from ([`inventory::ADOPTED_FROM_ANNOTATION`]).
    adopted_from: Option<String>,
    up_to_date: bool,
    status: ResourceStatus,
    resource_version: Option<String>,
    /// The managed fields to write first, when drift managers own fields of the object.
    takeover: Option<Takeover>,
}

impl LiveSummary {
    /// `desired` is the object as it would be sent (owner set, digest stamped); `live` the
    /// object without its managed fields, which are `managed`.
    fn of(desired: &Value, live: &Value, managed: &[ManagedFieldsEntry], s: &Settings) -> Self {
        LiveSummary {
            owner: inventory::owner(live).map(str::to_owned),
            adopted_from: inventory::adopted_from(live).map(str::to_owned),
            up_to_date: drift::is_up_to_date(desired, live),
            status: compute_status(live),
            resource_version: live["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned),
            takeover: takeover::take_over(managed, &s.drift_managers, FIELD_MANAGER),
        }
    }
}

/// What a sync says of the objects it adopted from other inventories (also logged at warn): an
/// adoption is a change of hands the other inventory's owner must know of.
fn adoption_warnings(adopted: &[(ObjRef, String)], dry: bool) -> Vec<String> {
    let verb = if dry { "would adopt" } else { "adopted" };
    adopted
        .iter()
        .map(|(obj, from)| {
            let line = format!(
                "{verb} {} {}/{} from inventory {from:?} (inventory_policy adopt_all): it is this entry's now, and that inventory fails it, not taking it back, while its files still declare it",
                obj.kind,
                obj.namespace_or_empty(),
                obj.name
            );
            if !dry {
                tracing::warn!(object = %obj, from_inventory = %from, "{line}");
            }
            line
        })
        .collect()
}

/// Marks `obj` (as it will be sent) with the inventory it is adopted from: the live object's
/// owner when another inventory than ours (`inv_id`), returned; or, for an object adopted
/// before and ours since, the inventory it was adopted from, kept so that a later apply does not
/// drop the note (that inventory then knows not to take it back).
fn note_adoption(
    obj: &mut Value,
    inv_id: &str,
    owner: Option<&str>,
    adopted_from: Option<&str>,
) -> Option<String> {
    match owner {
        Some(other) if other != inv_id => {
            inventory::set_adopted_from(obj, other);
            Some(other.to_owned())
        }
        Some(_) => {
            if let Some(from) = adopted_from {
                inventory::set_adopted_from(obj, from);
            }
            None
        }
        None => None,
    }
}

/// Whether the sync must stop before its next writes: asked to (`cancel`), or this replica's
/// leadership lapsed ([`LeaseCheck`]), which stops it as a stop would (`cancel` is this sync's
/// own token): the worker starts it again once the election renewed, or is stopped.
fn stopped_or_lapsed(s: &Settings, cancel: &CancellationToken) -> bool {
    if !cancel.is_cancelled() && !s.lease.fresh() {
        tracing::warn!(
            "This replica's Lease was not renewed within the renew deadline (was the process paused?): the sync stops before its next writes"
        );
        cancel.cancel();
    }
    cancel.is_cancelled()
}

/// An object as JSON without its managed fields: neither status nor drift reads them, and they
/// are often the largest part of what the API server returns (converting them cost agentk most
/// of its CPU per applied object).
pub(crate) fn lean_value(mut o: DynamicObject) -> Value {
    o.metadata.managed_fields = None;
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// [`lean_value`], and the managed fields it left out (for [`takeover`]).
/// Gives a listed item the type of the list it came in, when it lacks one.
fn typed(o: &mut DynamicObject, ar: &ApiResource) {
    if o.types.as_ref().is_none_or(|t| t.kind.is_empty()) {
        o.types = Some(kube::api::TypeMeta {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
        });
    }
}

pub(crate) fn split_managed(mut o: DynamicObject) -> (Value, Vec<ManagedFieldsEntry>) {
    let managed = o.metadata.managed_fields.take().unwrap_or_default();
    (lean_value(o), managed)
}

/// Objects per LIST page: bounds what one response holds in memory. A page is decoded whole
/// (managed fields and status included), and 500 Deployments decoded took 12 MB, the largest
/// single allocation of a 5,000-object sync; 100 keep it near 2.5 MB for a few more requests.
const LIST_PAGE: u32 = 100;

/// The object to send for a manifest: marked as ours, then stamped with its digest. (Public for
/// the benchmarks' bare client, which sends exactly these bodies.)
pub fn prepared(m: &Manifest, inv_id: &str) -> Value {
    let mut obj = m.object();
    inventory::set_owner(&mut obj, inv_id);
    drift::stamp_digest(&mut obj);
    obj
}

/// Groups objects by resource type and namespace: one LIST per group instead of one GET per
/// object.
pub(crate) type GroupKey = (String, String, String, Option<String>);

pub(crate) fn group_key(ar: &ApiResource, ns: Option<&str>) -> GroupKey {
    (
        ar.group.clone(),
        ar.version.clone(),
        ar.plural.clone(),
        ns.map(str::to_owned),
    )
}

impl Syncer {
    pub fn new(client: Client) -> Self {
        Self {
            discovery: client.clone(),
            client,
            outages: Arc::default(),
        }
    }

    /// Discovers the API through `client`: one that does not retry 503 answers, so a group
    /// whose aggregated API server is down is left out at once rather than after kube's retries.
    pub fn with_discovery(self, client: Client) -> Self {
        Self {
            discovery: client,
            ..self
        }
    }

    pub(crate) fn api(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    /// The cluster as a Helm chart sees it: the API server's version (`v1.31.2`) and
    /// [`crate::apis::api_versions`].
    pub async fn cluster(&self) -> Result<(String, Vec<String>), SyncError> {
        let info = self
            .discovery
            .apiserver_version()
            .await
            .map_err(|e| SyncError::Discovery(e.to_string()))?;
        let apis = self.discover().await?;
        Ok((info.git_version, apis.api_versions()))
    }

    /// API discovery; groups whose query fails are left out and named, not fatal.
    /// Logs the API groups whose outage started or ended since a sync last looked.
    fn log_outages(&self, disc: &Apis) {
        let news = self
            .outages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .update(disc.unavailable_groups());
        news.log();
    }

    pub(crate) async fn discover(&self) -> Result<Apis, SyncError> {
        crate::apis::discover(&self.discovery)
            .await
            .map_err(SyncError::Discovery)
    }

    pub(crate) fn resolve(disc: &Apis, m: &Manifest) -> Option<(ApiResource, ApiCapabilities)> {
        disc.resolve(m)
    }

    pub(crate) fn resolve_ref(disc: &Apis, r: &ObjRef) -> Option<(ApiResource, ApiCapabilities)> {
        disc.resolve_ref(r)
    }

    /// Synchronizes `files` (path, bytes) of `commit_id`. Never prunes or deletes anything when
    /// a file fails to decode or the inventory cannot be read.
    pub async fn sync(
        &self,
        s: &Settings,
        commit_id: &str,
        files: &[(String, Vec<u8>)],
        stop: &SyncStop,
    ) -> SyncOutcome {
        let dry = s.dry_run != DryRunStrategy::None;
        let mut warnings = Vec::new();
        let mut out = match self
            .sync_phases(s, commit_id, files, stop, &mut warnings)
            .await
        {
            Ok(out) => out,
            Err(Aborted::BeforeWrites(e)) => SyncOutcome::failed_before_writes(commit_id, e, dry),
            Err(Aborted::AfterWrites(e, p)) => {
                let mut out = finish(commit_id, p.results, p.writes, dry);
                out.error = Some(e);
                out
            }
        };
        out.warnings = warnings;
        out
    }

    /// The phases of [`Syncer::sync`], in order; the first two read only.
    async fn sync_phases(
        &self,
        s: &Settings,
        commit_id: &str,
        files: &[(String, Vec<u8>)],
        stop: &SyncStop,
        warnings: &mut Vec<String>,
    ) -> Result<SyncOutcome, Aborted> {
        let dry = s.dry_run != DryRunStrategy::None;
        let cancel = &stop.now;
        // 1. Decode everything (variables substituted) before writing to the cluster.
        let vars = self.variables(s, Secrets::Read).await?;
        let mut manifests = decode_all(files, vars.as_ref(), warnings)?;
        warnings.append(&mut set_hooks_aside(&mut manifests, s));
        if s.dry_run == DryRunStrategy::Client {
            // No discovery in this mode: a hook is named as written, as every object is.
            refuse_helm_hooks(&manifests, s)?;
            return Ok(client_dry_run(commit_id, &manifests));
        }
        // 2. The previous inventory, and discovery.
        let mut previous = self.read_inventory(s).await?;
        if plan::empties(manifests.len(), previous.recorded.objects.len(), s) {
            return Err(SyncError::WouldEmpty(previous.recorded.objects.len()).into());
        }
        let disc = self.discover().await?;
        self.log_outages(&disc);
        default_namespaces(&mut manifests, &disc, s);
        // After the defaults, so a hook is named in the namespace it would land in; still
        // before any write.
        refuse_helm_hooks(&manifests, s)?;
        if let Some((obj, sources)) = plan::duplicates(&manifests).into_iter().next() {
            return Err(SyncError::Duplicate { obj, sources }.into());
        }
        if !dry {
            let declared: Vec<ObjRef> = manifests.iter().map(Manifest::obj_ref).collect();
            s.live_inventories.keep_created(&previous.name, &declared);
        }
        // 3. Apply in stages, after recording what the stages may create.
        let mut p = Progress::default();
        if !dry {
            if let Some(intent) = self
                .record_intent(s, &previous, &mut manifests, &disc, &mut p)
                .await?
            {
                previous.stored = Some(intent);
            }
            p.watches = Some(Watches::new(self.client.clone(), p.seen.clone()));
        }
        let disc = self
            .apply_stages(s, &previous.name, &mut manifests, disc, cancel, &mut p)
            .await;
        if dry {
            p.mark_dry_run();
        } else {
            // 4. Inventory and prune; 5. status.
            if let Err(e) = self
                .record_and_prune(s, &previous, &manifests, &disc, cancel, &mut p)
                .await
            {
                return Err(Aborted::AfterWrites(e, Box::new(p)));
            }
            // Waiting needs neither the manifests nor the previous inventory: a sync of
            // thousands of objects should not hold them while its objects roll out.
            drop(manifests);
            drop(previous);
            s.progress.publish(&p.results);
            let waiting = &stop.waiting;
            self.wait_status(&p.applied, &p.seen, &disc, s, waiting, &mut p.results)
                .await;
        }
        let (watched_statuses, taken_over) = (p.seen.watched(), p.taken_over);
        let mut out = finish(commit_id, p.results, p.writes, dry);
        out.watched_statuses = watched_statuses;
        out.taken_over = taken_over;
        warnings.extend(adoption_warnings(&p.adopted, dry));
        if !dry && stop.superseded() {
            not_waited_for(&mut out, &stop.due());
        }
        Ok(out)
    }

    /// The variables of the project's `post_build`, read anew at every sync ([`variables`]).
    pub(crate) async fn variables(
        &self,
        s: &Settings,
        secrets: Secrets,
    ) -> Result<Option<Variables>, SyncError> {
        variables::load(
            &self.client,
            s.post_build.as_ref(),
            &s.agent_namespace,
            secrets,
        )
        .await
    }

    /// The previous inventory: unreadable means we cannot know what to prune, so the sync stops.
    /// Not yet in the default namespace but in the one before it ([`Settings::previous_namespace`]):
    /// that one, to be moved.
    pub(crate) async fn read_inventory(
        &self,
        s: &Settings,
    ) -> Result<PreviousInventory, SyncError> {
        let name = inventory::inventory_name(s.agent_id, &s.project_id);
        let mut previous = PreviousInventory {
            recorded: Recorded::default(),
            exists: false,
            stored: None,
            moved_from: None,
            name,
        };
        if let Some(recorded) = self
            .inventory_in(&s.default_namespace, &previous.name)
            .await?
        {
            previous.recorded = recorded;
            previous.exists = true;
            return Ok(previous);
        }
        if let Some(old) = s
            .previous_namespace
            .as_ref()
            .filter(|o| **o != s.default_namespace)
            && let Some(recorded) = self.inventory_in(old, &previous.name).await?
        {
            previous.recorded = recorded;
            previous.moved_from = Some(old.clone());
        }
        Ok(previous)
    }

    /// What inventory `name` in `namespace` records, if it exists.
    async fn inventory_in(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Recorded>, SyncError> {
        let cms: Api<DynamicObject> = self.api(
            &ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
            Some(namespace),
        );
        let cm = match cms.get_opt(name).await {
            Ok(Some(cm)) => cm,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(SyncError::ReadInventory {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    source: e.into(),
                });
            }
        };
        let data: BTreeMap<String, String> = cm
            .data
            .get("data")
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .unwrap_or_default();
        inventory::decode(&data)
            .and_then(|objects| {
                let attempted = inventory::decode_attempted(&data)?;
                Ok(Some(Recorded { objects, attempted }))
            })
            .map_err(|source| SyncError::InventoryUnreadable {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source,
            })
    }

    /// Applies in stages: CRDs, Namespaces and ClusterRoles first, then (after discovery sees the new types)
    /// everything else. Returns the discovery of the last stage.
    async fn apply_stages(
        &self,
        s: &Settings,
        inv_id: &str,
        manifests: &mut [Manifest],
        mut disc: Apis,
        cancel: &CancellationToken,
        p: &mut Progress,
    ) -> Apis {
        let dry = s.dry_run != DryRunStrategy::None;
        let stages = plan::apply_stages(manifests);
        for (n, stage) in stages.iter().enumerate() {
            if stopped_or_lapsed(s, cancel) {
                break;
            }
            // Only a new CRD changes what discovery says (Namespaces and ClusterRoles do not).
            let crd_applied = stages[..n].iter().flatten().any(|&i| {
                (manifests[i].group(), manifests[i].kind())
                    == ("apiextensions.k8s.io", "CustomResourceDefinition")
            });
            if crd_applied {
                match self.discover_stage(manifests, stage, cancel).await {
                    Ok(d) => disc = d,
                    Err(e) => {
                        tracing::warn!(error = %e, "Re-running discovery failed; using the previous one")
                    }
                }
            }
            let resolved = resolve_stage(s, manifests, stage, &disc, p);
            let outcomes = self
                .apply_resolved(s, inv_id, manifests, resolved, p.watches.as_mut())
                .await;
            p.record_applied(outcomes);
            // Only a stage of prerequisites is waited for here (with no prerequisite in the
            // commit, the first stage is everything, and its status is the job of step 5).
            let prerequisites: Vec<usize> = stage
                .iter()
                .copied()
                .filter(|&i| plan::must_be_ready_first(manifests[i].group(), manifests[i].kind()))
                .collect();
            if stages.len() > 1 && n == 0 && !dry && !prerequisites.is_empty() {
                self.wait_established(manifests, &prerequisites, &disc, cancel)
                    .await;
            }
        }
        disc
    }

    /// Applies a stage's resolved objects, looking the live ones up by LIST where a type and
    /// namespace holds enough of them. With `watches` (not in a dry run), each answer's status
    /// is recorded as it arrives and objects still in progress are watched from then on.
    async fn apply_resolved(
        &self,
        s: &Settings,
        inv_id: &str,
        manifests: &[Manifest],
        resolved: Vec<Resolved>,
        mut watches: Option<&mut Watches>,
    ) -> Vec<(ObjRef, Result<Applied, ObjectError>)> {
        // The stage's objects by type+namespace and name: each listed object is compared
        // with what would be sent for it as its page arrives, and only a summary is kept
        // (preparing an object twice costs less than holding thousands of them).
        let mut index: HashMap<GroupKey, HashMap<&str, usize>> = HashMap::new();
        for r in &resolved {
            let m = &manifests[r.idx];
            index
                .entry(group_key(&r.ar, r.namespace(m)))
                .or_default()
                .insert(m.name(), r.idx);
        }
        let mut live = self
            .list_groups(
                resolved
                    .iter()
                    .map(|r| (r.ar.clone(), r.namespace(&manifests[r.idx]))),
                |key, name, obj, managed| {
                    let idx = *index.get(key)?.get(name)?;
                    let desired = prepared(&manifests[idx], inv_id);
                    Some(LiveSummary::of(&desired, obj, managed, s))
                },
            )
            .await;
        futures_util::stream::iter(resolved.into_iter().map(|r| {
            let m = &manifests[r.idx];
            let known = match live.get_mut(&group_key(&r.ar, r.namespace(m))) {
                Some(objects) => objects.remove(m.name()).map_or(Known::Absent, Known::Live),
                None => Known::Unknown,
            };
            let obj = prepared(m, inv_id);
            let at = (r.ar.clone(), r.namespace(m).map(str::to_owned));
            self.apply_one(s, inv_id, m, obj, r.ar, r.namespaced, known)
                .map(move |(o, res)| (o, res, at))
        }))
        .buffer_unordered(CONCURRENCY)
        .map(|(obj, res, (ar, ns))| {
            log_apply_answer(&obj, &res, watches.as_deref().map(Watches::seen));
            if let (Some(w), Ok(a)) = (watches.as_deref_mut(), &res)
                && let (Some(st), Some(rv)) = (&a.status, &a.resource_version)
                && !settled(st)
            {
                w.track(&obj, &ar, ns.as_deref(), rv);
            }
            (obj, res)
        })
        .collect::<Vec<_>>()
        .await
    }

    /// Records the inventory — what is known to exist, and the commit's objects whose creation
    /// failed ([`record::after_apply`]) — and prunes what left Git. Objects still to be pruned
    /// are in the inventory until they are gone. An unchanged set is not written: a re-sync,
    /// and a retry of an object that keeps failing, write nothing.
    async fn record_and_prune(
        &self,
        s: &Settings,
        previous: &PreviousInventory,
        manifests: &[Manifest],
        disc: &Apis,
        cancel: &CancellationToken,
        p: &mut Progress,
    ) -> Result<(), SyncError> {
        let desired: BTreeSet<ObjRef> = manifests.iter().map(Manifest::obj_ref).collect();
        let held = &previous.recorded;
        let mut now = record::after_apply(held, &desired, &p.applied, &p.absent);
        let prune_tiers = if s.prune {
            prune::to_prune_in_tiers(&held.all(), &desired, &crd_kinds(manifests))
        } else {
            Vec::new()
        };
        let prune_list: Vec<ObjRef> = prune_tiers.iter().flatten().cloned().collect();
        let (prune_tiers, replacements) = hold_back_moved(prune_tiers, held, &desired, p);
        let prune_tiers = keep_inventory_namespace(prune_tiers, &s.default_namespace, p);
        // Not listed as attempted, so the next sync sees them new again and keeps holding.
        now.attempted.retain(|o| !replacements.contains(o));
        let with_pending = record::with_pending(now.clone(), held, &prune_list);
        if previous.stored() != Some(&with_pending) {
            self.write_inventory(s, &previous.name, &with_pending)
                .await
                .map_err(|e| SyncError::WriteInventory {
                    namespace: s.default_namespace.clone(),
                    name: previous.name.clone(),
                    source: e,
                })?;
            p.writes += 1;
        }
        let dropped = self
            .prune_all(s, previous, &prune_tiers, disc, cancel, p)
            .await;
        let left = prune_list.iter().filter(|o| !dropped.contains(*o));
        let final_inv = record::with_pending(now, held, left);
        if final_inv != with_pending {
            if let Err(e) = self.write_inventory(s, &previous.name, &final_inv).await {
                tracing::warn!(error = %e, "Updating the inventory after pruning failed; the next sync retries");
            } else {
                p.writes += 1;
            }
        }
        if let Some(old) = &previous.moved_from {
            self.delete_moved_inventory(old, &previous.name, p).await;
        }
        Ok(())
    }

    /// Deletes the inventory left in the project's former default namespace, now that the
    /// new one records its objects. A failure leaves a stale copy only (warn): it is read
    /// again only if the default namespace moves back while the new one is missing.
    async fn delete_moved_inventory(&self, namespace: &str, name: &str, p: &mut Progress) {
        let cms: Api<DynamicObject> = self.api(
            &ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
            Some(namespace),
        );
        match cms.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                p.writes += 1;
                tracing::info!(
                    namespace,
                    inventory = name,
                    "Inventory moved to the new default namespace"
                );
            }
            Err(e) => {
                tracing::warn!(namespace, inventory = name, error = %ApiError::from(e), "Deleting the inventory in the former default namespace failed");
            }
        }
    }

    /// Before applying: adds every object this sync may create to the inventory. A sync cut
    /// short — a newer commit cancelling it, agentk stopped, killed or losing its lease —
    /// has created objects its final inventory write never recorded; without this, a later
    /// commit that drops them would never prune them. Listing objects that end up not created
    /// or not ours is harmless: pruning deletes only objects that carry our owner mark, and
    /// the write after applying moves those whose creation failed to `attempted`
    /// ([`record`]), which a retry does not add again. An inventory too large for a
    /// ConfigMap fails here, before anything is applied.
    ///
    /// When the inventory's namespace does not exist yet and the commit creates it, that
    /// Namespace is applied first ([`Syncer::create_inventory_namespace`]).
    async fn record_intent(
        &self,
        s: &Settings,
        previous: &PreviousInventory,
        manifests: &mut [Manifest],
        disc: &Apis,
        p: &mut Progress,
    ) -> Result<Option<Recorded>, SyncError> {
        let desired: BTreeSet<ObjRef> = manifests.iter().map(Manifest::obj_ref).collect();
        let Some(intent) = record::intent(&previous.recorded, previous.exists, &desired) else {
            return Ok(None);
        };
        let (namespace, name) = (s.default_namespace.clone(), previous.name.clone());
        let data = inventory::encode_with_attempted(&intent.objects, &intent.attempted);
        if let Err(source) = inventory::check_size(&data) {
            return Err(SyncError::InventoryTooLarge {
                namespace,
                name,
                source,
            });
        }
        let written = match self.write_inventory(s, &name, &intent).await {
            // 404: the namespace is missing (writing a ConfigMap creates it otherwise).
            Err(e) if e.is_not_found() => {
                self.create_inventory_namespace(s, &name, manifests, disc, p)
                    .await?;
                self.write_inventory(s, &name, &intent).await
            }
            other => other,
        };
        written.map_err(|source| SyncError::WriteInventory {
            namespace,
            name,
            source,
        })?;
        p.writes += 1;
        Ok(Some(intent))
    }

    /// Applies the commit's Namespace that the inventory is kept in, alone and before the
    /// inventory is written: the Flux and Argo CD layout of a project creating its own
    /// `default_namespace`. Crash-safe although applied before the intent is recorded: a sync
    /// cut short right after it leaves only that Namespace unrecorded, and nothing else
    /// applied; the next sync finds the Namespace in Git again, applies it (unchanged) and
    /// records it. Without such a Namespace in the commit, the error says so.
    async fn create_inventory_namespace(
        &self,
        s: &Settings,
        inv_id: &str,
        manifests: &mut [Manifest],
        disc: &Apis,
        p: &mut Progress,
    ) -> Result<(), SyncError> {
        let namespace = s.default_namespace.clone();
        let Some(idx) = plan::creates_namespace(manifests, &namespace) else {
            return Err(SyncError::InventoryNamespaceMissing(namespace));
        };
        let resolved = resolve_stage(s, manifests, &[idx], disc, p);
        let outcomes = self
            .apply_resolved(s, inv_id, manifests, resolved, None)
            .await;
        let failure = outcomes.iter().find_map(|(_, r)| r.as_ref().err());
        if let Some(e) = failure.map(ToString::to_string) {
            return Err(SyncError::InventoryNamespaceNotCreated {
                namespace,
                reason: e,
            });
        }
        // Not resolved (no outcome): the cluster serves no Namespaces to us, said by the
        // inventory write failing again.
        p.record_applied(outcomes);
        tracing::info!(
            namespace,
            "Applied the project's default namespace before writing its inventory there"
        );
        Ok(())
    }

    /// Prunes tier by tier (reverse dependency order); returns the objects that leave the
    /// inventory: gone, or left in place as no longer ours to delete.
    async fn prune_all(
        &self,
        s: &Settings,
        held: &PreviousInventory,
        tiers: &[Vec<ObjRef>],
        disc: &Apis,
        cancel: &CancellationToken,
        p: &mut Progress,
    ) -> BTreeSet<ObjRef> {
        let mut dropped = BTreeSet::new();
        for tier in tiers {
            if stopped_or_lapsed(s, cancel) {
                break;
            }
            for (obj, end) in self.prune_tier(s, &held.name, tier, disc).await {
                if held.recorded.only_attempted(&obj) && forgets_attempted(&end) {
                    tracing::debug!(object = %obj, "Forgot an object that left Git and was never created");
                    dropped.insert(obj);
                    continue;
                }
                let (state, message) = match end {
                    Ok(PruneEnd::Gone { wrote }) => {
                        p.writes += usize::from(wrote);
                        event_pruned(&obj);
                        (ObjectState::Pruned, String::new())
                    }
                    Ok(PruneEnd::Skipped(skip)) => {
                        event_prune_skipped(&obj, &skip);
                        (ObjectState::PruneSkipped, skip.to_string())
                    }
                    Err(e) => {
                        let message = e.to_string();
                        event_failed(&obj, Phase::Prune, &message);
                        (ObjectState::Live(Status::Failed), message)
                    }
                };
                if state != ObjectState::Live(Status::Failed) {
                    dropped.insert(obj.clone());
                }
                let outcome = ObjectOutcome {
                    obj: obj.clone(),
                    status: state,
                    message,
                    not_applied: state == ObjectState::Live(Status::Failed),
                };
                p.results.insert(obj, outcome);
            }
        }
        dropped
    }

    /// LISTs (in pages) each resource type and namespace that holds at least
    /// [`LIST_THRESHOLD`] of the given objects, keeping `summarize(group, name, object,
    /// managed fields)` of each listed object it returns `Some` for ([`split_managed`]). A
    /// group whose LIST fails (e.g. RBAC allows GET but not LIST) is left out, so its objects
    /// are looked up one by one.
    pub(crate) async fn list_groups<T, F>(
        &self,
        objects: impl Iterator<Item = (ApiResource, Option<&str>)>,
        summarize: F,
    ) -> HashMap<GroupKey, HashMap<String, T>>
    where
        F: Fn(&GroupKey, &str, &Value, &[ManagedFieldsEntry]) -> Option<T>,
    {
        self.list_groups_as(objects, |key, ar, mut o: DynamicObject| {
            let name = o.metadata.name.clone()?;
            // A LIST's items of built-in kinds come without apiVersion and kind, and a status
            // without a kind was read by the generic rule: Current, for Deployments that
            // could not run (E12).
            typed(&mut o, ar);
            let (v, managed) = split_managed(o);
            summarize(key, &name, &v, &managed).map(|t| (name, t))
        })
        .await
    }

    /// [`Self::list_groups`] with each listed item read as `I` (an [`ObjectList`] of it) and
    /// kept as `keep(group, its type, item)` says: a caller that needs a few fields of each
    /// object reads only those, never building the rest.
    async fn list_groups_as<I, T, F>(
        &self,
        objects: impl Iterator<Item = (ApiResource, Option<&str>)>,
        keep: F,
    ) -> HashMap<GroupKey, HashMap<String, T>>
    where
        I: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        F: Fn(&GroupKey, &ApiResource, I) -> Option<(String, T)>,
    {
        let mut counts: HashMap<GroupKey, (ApiResource, usize)> = HashMap::new();
        for (ar, ns) in objects {
            counts
                .entry(group_key(&ar, ns))
                .or_insert_with(|| (ar.clone(), 0))
                .1 += 1;
        }
        let keep = &keep;
        let lists = futures_util::stream::iter(
            counts
                .into_iter()
                .filter(|(_, (_, n))| *n >= LIST_THRESHOLD)
                .map(|(key, (ar, _))| async move {
                    let mut found = HashMap::new();
                    let listed = self
                        .list_pages(&ar, key.3.as_deref(), |item: I| {
                            found.extend(keep(&key, &ar, item));
                        })
                        .await;
                    (key, listed.map(|()| found))
                }),
        )
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut out = HashMap::new();
        for (key, list) in lists {
            match list {
                Ok(found) => {
                    out.insert(key, found);
                }
                Err(e) => {
                    tracing::debug!(resource = %key.2, namespace = ?key.3, error = %ApiError::from(e), "LIST failed; looking objects up one by one");
                }
            }
        }
        out
    }

    /// Every object of type `ar` in `ns`, in pages of [`LIST_PAGE`], each item read as `I`
    /// and handed to `each` before the next page is asked for.
    async fn list_pages<I>(
        &self,
        ar: &ApiResource,
        ns: Option<&str>,
        mut each: impl FnMut(I),
    ) -> Result<(), kube::Error>
    where
        I: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let url = self.api(ar, ns).resource_url().to_owned();
        let mut params = ListParams::default().limit(LIST_PAGE);
        loop {
            let req = kube::core::Request::new(&url)
                .list(&params)
                .map_err(kube::Error::BuildRequest)?;
            let page = self.client.request::<ObjectList<I>>(req).await?;
            page.items.into_iter().for_each(&mut each);
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => return Ok(()),
            }
        }
    }

    /// Applies one object with server-side apply, after checking who owns it, unless the live
    /// object already is what we would apply ([`drift::is_up_to_date`]). `obj` is the
    /// manifest's object as it is to be sent ([`prepared`]).
    #[allow(clippy::too_many_arguments)]
    async fn apply_one(
        &self,
        s: &Settings,
        inv_id: &str,
        m: &Manifest,
        mut obj: Value,
        ar: ApiResource,
        namespaced: bool,
        known: Known,
    ) -> (ObjRef, Result<Applied, ObjectError>) {
        let obj_ref = m.obj_ref();
        let ns = if namespaced { m.namespace() } else { None };
        let api = self.api(&ar, ns);
        let name = m.name();
        let live = match known {
            Known::Live(summary) => Some(summary),
            Known::Absent => None,
            Known::Unknown => match api.get_opt(name).await {
                Ok(o) => o
                    .map(split_managed)
                    .map(|(v, managed)| LiveSummary::of(&obj, &v, &managed, s)),
                Err(e) => return (obj_ref, Err(ApiError::from(e).into())),
            },
        };
        let (mut took_over, mut adopted_from) = (false, None);
        if live.is_none()
            && s.dry_run == DryRunStrategy::None
            && let Err(conflict) = s.live_inventories.claim_creation(inv_id, &obj_ref)
        {
            return (obj_ref, Err(conflict.into()));
        }
        if let Some(current) = live {
            // Ownership: another inventory's object is not taken over unless the policy allows.
            if let Err(conflict) = inventory::may_take_over(
                s.inventory_policy,
                current.owner.as_deref(),
                (inv_id, &s.live_inventories),
            ) {
                return (obj_ref, Err(conflict.into()));
            }
            let (owner, from) = (current.owner.as_deref(), current.adopted_from.as_deref());
            if let Err(conflict) = inventory::not_taken_from_us(owner, from, inv_id) {
                return (obj_ref, Err(conflict.into()));
            }
            adopted_from = note_adoption(&mut obj, inv_id, owner, from);
            if s.dry_run == DryRunStrategy::None {
                let rv = current.resource_version.as_deref();
                match &current.takeover {
                    // Fields changed by hand are ours now: the apply below reverts them, even
                    // when every value of the manifest is still in place.
                    Some(t) => took_over = self.take_over(&api, &obj_ref, t, rv).await,
                    None if current.up_to_date => {
                        return (
                            obj_ref,
                            Ok(Applied {
                                wrote: false,
                                status: Some(current.status),
                                resource_version: current.resource_version,
                                took_over: false,
                                adopted_from: None,
                            }),
                        );
                    }
                    None => {}
                }
            }
        }
        let mut pp = PatchParams::apply(FIELD_MANAGER).force();
        if s.dry_run == DryRunStrategy::Server {
            pp = pp.dry_run();
        }
        let mut answer = self.apply_request(&api, name, &pp, &obj).await;
        if let Err(e) = &answer
            && s.dry_run == DryRunStrategy::None
            && is_immutable_change(e)
            && asks_to_be_recreated(&obj)
        {
            answer = self.recreate(&api, name, &pp, &obj, s.prune_timeout).await;
        }
        match answer {
            Ok(view) => {
                let wrote = s.dry_run == DryRunStrategy::None;
                let resource_version = view.metadata.resource_version.clone();
                let applied = Applied {
                    wrote,
                    status: wrote.then(|| view.status()),
                    resource_version,
                    took_over,
                    adopted_from,
                };
                (obj_ref, Ok(applied))
            }
            Err(e) => (obj_ref, Err(ApiError::from(e).into())),
        }
    }

    /// Writes the managed fields of `t` ([`takeover::patch`]): whether it was written. A
    /// failure (the object changed since it was read, a 409) is only logged: the apply still
    /// sets every value of the manifest, and the next sync takes over what is left.
    async fn take_over(
        &self,
        api: &Api<DynamicObject>,
        obj: &ObjRef,
        t: &Takeover,
        resource_version: Option<&str>,
    ) -> bool {
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let body = takeover::patch(t, resource_version);
        let sent = match kube::core::Request::new(api.resource_url()).patch(
            &obj.name,
            &pp,
            &Patch::Merge(&body),
        ) {
            Ok(req) => self.client.request::<StatusView>(req).await,
            Err(e) => Err(kube::Error::BuildRequest(e)),
        };
        match sent {
            Ok(_) => {
                tracing::info!(object = %obj, managers = ?t.managers, "Took over the fields of drift managers: the apply reverts what they changed by hand");
                true
            }
            Err(e) => {
                tracing::warn!(object = %obj, managers = ?t.managers, error = %ApiError::from(e), "Taking over the fields of drift managers failed; applying anyway");
                false
            }
        }
    }

    /// Deletes the live object and applies `obj` anew, once the old one is gone (at most
    /// `timeout`): for a change the API server refuses to make in place (an immutable field,
    /// such as a Job's template or a Deployment's selector), asked for by the object itself.
    async fn recreate(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        pp: &PatchParams,
        obj: &Value,
        timeout: Duration,
    ) -> Result<StatusView, kube::Error> {
        // Background: the object goes at once and its dependents (a Job's Pods, a Deployment's
        // ReplicaSets) are collected after it, so the new one does not wait for them.
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let old_uid = match api.delete(name, &dp).await {
            Ok(either) => either.left().and_then(|o| o.metadata.uid),
            Err(kube::Error::Api(st)) if st.code == 404 => None,
            Err(e) => return Err(e),
        };
        tracing::info!(
            name,
            "Recreating an object whose change cannot be applied in place (kustomize.toolkit.fluxcd.io/force: enabled)"
        );
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let live = api.get_opt(name).await?;
            let gone = live.is_none_or(|o| old_uid.is_some() && o.metadata.uid != old_uid);
            if gone || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        self.apply_request(api, name, pp, obj).await
    }

    /// The server-side apply PATCH of `obj`, its answer read as a [`StatusView`]: the
    /// returned object is never built whole.
    async fn apply_request(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        pp: &PatchParams,
        obj: &Value,
    ) -> Result<StatusView, kube::Error> {
        let req = kube::core::Request::new(api.resource_url())
            .patch(name, pp, &Patch::Apply(obj))
            .map_err(kube::Error::BuildRequest)?;
        self.client.request::<StatusView>(req).await
    }

    /// Waits (bounded) until the stage's CRDs are Established and Namespaces Active.
    /// Discovery for a stage after the first. The API server publishes a new CRD's type in
    /// discovery shortly *after* the CRD is Established, so when an object of a CRD from this
    /// commit does not resolve yet, discovery is retried (200 ms apart, up to 10 s) instead of
    /// failing the object with "no resource type".
    async fn discover_stage(
        &self,
        manifests: &[Manifest],
        stage: &[usize],
        cancel: &CancellationToken,
    ) -> Result<Apis, SyncError> {
        let crd_groups: BTreeSet<String> = manifests
            .iter()
            .filter(|m| {
                m.group() == "apiextensions.k8s.io" && m.kind() == "CustomResourceDefinition"
            })
            .filter_map(|m| m.name().split_once('.').map(|(_, g)| g.to_string()))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let disc = self.discover().await?;
            let waiting = stage.iter().any(|&i| {
                let m = &manifests[i];
                crd_groups.contains(m.group()) && Self::resolve(&disc, m).is_none()
            });
            if !waiting || cancel.is_cancelled() || tokio::time::Instant::now() > deadline {
                return Ok(disc);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_established(
        &self,
        manifests: &[Manifest],
        stage: &[usize],
        disc: &Apis,
        cancel: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for &idx in stage {
            let m = &manifests[idx];
            let Some((ar, _)) = Self::resolve(disc, m) else {
                continue;
            };
            let api = self.api(&ar, None);
            loop {
                if cancel.is_cancelled() || tokio::time::Instant::now() > deadline {
                    return;
                }
                let ready = match api.get_opt(m.name()).await {
                    Ok(Some(o)) => compute_status(&lean_value(o)).status == Status::Current,
                    _ => true, // failed to apply or not visible to us: nothing to wait for
                };
                if ready {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn write_inventory(
        &self,
        s: &Settings,
        name: &str,
        set: &Recorded,
    ) -> Result<(), ApiError> {
        let data = inventory::encode_with_attempted(&set.objects, &set.attempted);
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": s.default_namespace,
                "labels": {inventory::INVENTORY_LABEL: name},
            },
            "data": data,
        });
        let api: Api<DynamicObject> = self.api(
            &ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
            Some(&s.default_namespace),
        );
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map(|_| ())
        .map_err(ApiError::from)
    }

    /// Prunes one tier: deletes all its objects at once (bounded concurrency), then waits until
    /// they are gone with one LIST per type and namespace, not a GET and a sleep per object
    /// (300 ConfigMaps took 62 s that way). Each object's outcome, or why it failed.
    async fn prune_tier(
        &self,
        s: &Settings,
        inv_id: &str,
        tier: &[ObjRef],
        disc: &Apis,
    ) -> Vec<(ObjRef, Result<PruneEnd, ObjectError>)> {
        // Owned items: a closure over `&ObjRef` makes the future not provably `Send`.
        let deleted = futures_util::stream::iter(tier.iter().cloned().map(|obj| async move {
            let res = self.delete_if_ours(s, inv_id, &obj, disc).await;
            (obj, res)
        }))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut out = Vec::with_capacity(deleted.len());
        let mut deleting: BTreeMap<(String, Option<String>), (ApiResource, Vec<ObjRef>)> =
            BTreeMap::new();
        for (obj, res) in deleted {
            match res {
                Ok(Deletion::Sent(ar, ns)) => {
                    deleting
                        .entry((format!("{}/{}", ar.api_version, ar.plural), ns.clone()))
                        .or_insert_with(|| (ar, Vec::new()))
                        .1
                        .push(obj);
                }
                Ok(Deletion::Gone) => out.push((obj, Ok(PruneEnd::Gone { wrote: false }))),
                Ok(Deletion::Skipped(skip)) => out.push((obj, Ok(PruneEnd::Skipped(skip)))),
                Err(e) => out.push((obj, Err(e))),
            }
        }
        let deadline = deadline_in(s.prune_timeout);
        let waits = deleting
            .into_iter()
            .map(|((_, ns), (ar, objs))| async move {
                self.wait_gone(&ar, ns.as_deref(), objs, deadline, s.prune_timeout)
                    .await
            });
        for group in futures_util::stream::iter(waits)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
        {
            out.extend(group);
        }
        out
    }

    /// Deletes one object that left Git if it is still ours.
    async fn delete_if_ours(
        &self,
        s: &Settings,
        inv_id: &str,
        obj: &ObjRef,
        disc: &Apis,
    ) -> Result<Deletion, ObjectError> {
        let Some((ar, caps)) = Self::resolve_ref(disc, obj) else {
            if let Some(reason) = disc.unavailable(&obj.group) {
                // Not known to be gone: a failure, so it stays in the inventory.
                return Err(ObjectError::GroupUnavailable {
                    group: obj.group.clone(),
                    reason: reason.to_owned(),
                });
            }
            // Nothing the API server lets us read or delete: not "pruned", we did nothing.
            return Ok(Deletion::Skipped(Skip::TypeNotServed));
        };
        let ns = if caps.scope == Scope::Namespaced {
            obj.namespace.clone()
        } else {
            None
        };
        let api = self.api(&ar, ns.as_deref());
        match api.get_opt(&obj.name).await {
            Ok(None) => return Ok(Deletion::Gone),
            Ok(Some(current)) => {
                let annotations = current.metadata.annotations.unwrap_or_default();
                let owner = annotations
                    .get(inventory::OWNING_INVENTORY_ANNOTATION)
                    .map(String::as_str)
                    .filter(|o| !o.is_empty());
                if !inventory::may_prune(owner, inv_id) {
                    // Adopted by another inventory, or kept by hand: not ours to delete.
                    let owner = owner.map(str::to_owned);
                    return Ok(Deletion::Skipped(Skip::NotOurs { owner }));
                }
                if let Some(annotation) = crate::prune::kept_by(&annotations) {
                    return Ok(Deletion::Skipped(Skip::Kept { annotation }));
                }
            }
            Err(e) => return Err(ApiError::from(e).into()),
        }
        let policy = match s.prune_propagation_policy {
            PrunePropagationPolicy::Orphan => PropagationPolicy::Orphan,
            PrunePropagationPolicy::Background => PropagationPolicy::Background,
            PrunePropagationPolicy::Foreground => PropagationPolicy::Foreground,
        };
        let dp = DeleteParams {
            propagation_policy: Some(policy),
            ..DeleteParams::default()
        };
        match api.delete(&obj.name, &dp).await {
            Ok(_) => Ok(Deletion::Sent(ar, ns)),
            // Gone between the read and the delete.
            Err(kube::Error::Api(st)) if st.code == 404 => Ok(Deletion::Gone),
            Err(e) => Err(ApiError::from(e).into()),
        }
    }

    /// Waits until `objs` (of one type, in one namespace) are gone, listing their names with
    /// growing pauses (50 ms doubling to 1 s); what is still there at `deadline` failed.
    async fn wait_gone(
        &self,
        ar: &ApiResource,
        ns: Option<&str>,
        objs: Vec<ObjRef>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Vec<(ObjRef, Result<PruneEnd, ObjectError>)> {
        let api = self.api(ar, ns);
        let mut pending = objs;
        let mut out = Vec::with_capacity(pending.len());
        let mut pause = Duration::from_millis(50);
        let (started, mut said) = (tokio::time::Instant::now(), false);
        loop {
            let present = match present_names(&api, &pending).await {
                Ok(names) => names,
                Err(e) => {
                    let e = ObjectError::from(e);
                    out.extend(pending.into_iter().map(|o| (o, Err(e.clone()))));
                    return out;
                }
            };
            let (still, gone): (Vec<ObjRef>, Vec<ObjRef>) = pending
                .into_iter()
                .partition(|o| present.contains_key(&o.name));
            out.extend(
                gone.into_iter()
                    .map(|o| (o, Ok(PruneEnd::Gone { wrote: true }))),
            );
            pending = still;
            if pending.is_empty() {
                return out;
            }
            if tokio::time::Instant::now() + pause > deadline {
                let e = ObjectError::StillPresent(timeout);
                out.extend(pending.into_iter().map(|o| (o, Err(e.clone()))));
                return out;
            }
            if !said && started.elapsed() >= PRUNE_WAIT_SAID_AFTER {
                said = true;
                tracing::warn!("{}", still_deleting_line(&pending, &present, timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Follows every applied object's status until all are Current or Failed, or `timeout`.
    /// What `seen` learns (apply answers, the watches started during the apply) wakes it at
    /// once; objects not settled are also polled, from [`POLL_MIN`] doubling to [`POLL_MAX`],
    /// by one LIST per type and namespace when enough of them are pending, by GET otherwise.
    async fn wait_status(
        &self,
        applied: &BTreeSet<ObjRef>,
        seen: &Seen,
        disc: &Apis,
        s: &Settings,
        cancel: &CancellationToken,
        results: &mut HashMap<ObjRef, ObjectOutcome>,
    ) {
        let timeout = s.reconcile_timeout;
        let deadline = deadline_in(timeout);
        let targets = status_targets(applied, disc);
        let mut log = StatusLog {
            results,
            sink: &s.progress,
        };
        let mut period = POLL_MIN;
        let mut next_poll = tokio::time::Instant::now() + period;
        loop {
            log.catch_up(seen);
            let pending: Vec<&Target> = targets.iter().filter(|t| !log.settled(&t.0)).collect();
            if pending.is_empty() || cancel.is_cancelled() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                log.time_out(&targets, timeout);
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_poll) => {
                    for (o, st) in self.poll_statuses(&pending).await {
                        seen.record(&o, st);
                    }
                    period = (period * 2).min(POLL_MAX);
                    next_poll = tokio::time::Instant::now() + period;
                }
                () = seen.changed() => {}
                () = cancel.cancelled() => break,
            }
        }
    }

    /// The current status of each object: LISTs for groups of [`LIST_THRESHOLD`] or more, GETs
    /// for the rest (and for groups whose LIST failed).
    async fn poll_statuses(&self, pending: &[&Target]) -> Vec<(ObjRef, ResourceStatus)> {
        let mut wanted: HashMap<GroupKey, BTreeSet<&str>> = HashMap::new();
        for (o, g) in pending.iter().copied() {
            let (ar, ns) = &**g;
            wanted
                .entry(group_key(ar, ns.as_deref()))
                .or_default()
                .insert(o.name.as_str());
        }
        // Listed as status views: a poll reads each pending object's status, and building
        // whole objects (a Deployment's template, its managed fields) was the largest part of
        // agentk's memory while Deployments became available.
        let mut live = self
            .list_groups_as(
                pending.iter().map(|(_, g)| (g.0.clone(), g.1.as_deref())),
                |key, ar, mut view: StatusView| {
                    let name = view.metadata.name.take()?;
                    // Only the pending objects' statuses are kept.
                    if !wanted
                        .get(key)
                        .is_some_and(|names| names.contains(name.as_str()))
                    {
                        return None;
                    }
                    view.type_as(&ar.api_version, &ar.kind);
                    Some((name, view.status()))
                },
            )
            .await;
        let mut out = Vec::with_capacity(pending.len());
        let mut singles = Vec::new();
        for (o, g) in pending.iter().copied() {
            let (ar, ns) = &**g;
            match live.get_mut(&group_key(ar, ns.as_deref())) {
                Some(objects) => {
                    let st = objects
                        .remove(&o.name)
                        .unwrap_or_else(ResourceStatus::not_found);
                    out.push((o.clone(), st));
                }
                None => singles.push((o.clone(), self.api(ar, ns.as_deref()))),
            }
        }
        let polled = futures_util::stream::iter(singles.into_iter().map(|(o, api)| async move {
            let st = match api.get_opt(&o.name).await {
                Ok(Some(obj)) => compute_status(&lean_value(obj)),
                Ok(None) => ResourceStatus::not_found(),
                Err(e) => ResourceStatus::new(Status::Unknown, ApiError::from(e).to_string()),
            };
            (o, st)
        }))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        out.extend(polled);
        out
    }
}

/// Which of `objs` still exist: one LIST of names, or — where the agent may delete but not
/// list — one GET each.
/// The objects of `api` present now, by name, with their finalizers (what holds one being
/// deleted).
async fn present_names(
    api: &Api<DynamicObject>,
    objs: &[ObjRef],
) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
    let named = |m: kube::api::ObjectMeta| Some((m.name?, m.finalizers.unwrap_or_default()));
    match api.list_metadata(&ListParams::default()).await {
        Ok(list) => Ok(list
            .items
            .into_iter()
            .filter_map(|o| named(o.metadata))
            .collect()),
        Err(kube::Error::Api(st)) if st.code == 403 => {
            // Owned names: a closure over `&ObjRef` makes the future not provably `Send`.
            let wanted: Vec<String> = objs.iter().map(|o| o.name.clone()).collect();
            let found = futures_util::stream::iter(
                wanted
                    .into_iter()
                    .map(|name| async move { api.get_metadata_opt(&name).await }),
            )
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
            let mut names = BTreeMap::new();
            for f in found {
                names.extend(f?.and_then(|m| named(m.metadata)));
            }
            Ok(names)
        }
        Err(e) => Err(e.into()),
    }
}

/// How long pruning waits for deleted objects to go before it says which it waits for.
const PRUNE_WAIT_SAID_AFTER: Duration = Duration::from_secs(30);

/// The warning for objects still there [`PRUNE_WAIT_SAID_AFTER`] after their deletion (pure):
/// which, and what holds them. A foreground deletion waits for kube-controller-manager's
/// garbage collector; the sync waited up to `prune_timeout` (1 h) without a word (E12).
fn still_deleting_line(
    pending: &[ObjRef],
    present: &BTreeMap<String, Vec<String>>,
    timeout: Duration,
) -> String {
    let held: Vec<String> = pending
        .iter()
        .map(|o| {
            let finalizers = present.get(&o.name).filter(|f| !f.is_empty());
            match finalizers {
                Some(f) => format!("{o} (finalizers: {})", f.join(", ")),
                None => o.to_string(),
            }
        })
        .collect();
    format!(
        "Pruning still waits for {} object(s) to be deleted: {}; a finalizer's controller must remove them (foregroundDeletion: kube-controller-manager's garbage collector); the sync waits up to prune_timeout ({timeout:?})",
        held.len(),
        held.join(", ")
    )
}

/// Why the phases of a sync stopped early.
enum Aborted {
    /// Before anything was written: the outcome lists no objects.
    BeforeWrites(SyncError),
    /// After applying: the outcome keeps what was done.
    AfterWrites(SyncError, Box<Progress>),
}

impl From<SyncError> for Aborted {
    fn from(e: SyncError) -> Self {
        Aborted::BeforeWrites(e)
    }
}

/// The inventory as the previous sync left it.
pub(crate) struct PreviousInventory {
    /// The inventory ConfigMap's name, which is also the owner mark of our objects.
    pub(crate) name: String,
    exists: bool,
    pub(crate) recorded: Recorded,
    /// What this sync wrote before applying, when it did ([`Syncer::record_intent`]).
    stored: Option<Recorded>,
    /// The namespace the inventory was read from, when the default namespace moved away from
    /// it; deleted there once recorded in the new one.
    moved_from: Option<String>,
}

impl PreviousInventory {
    /// The set the ConfigMap holds now, if it exists.
    fn stored(&self) -> Option<&Recorded> {
        self.stored
            .as_ref()
            .or(self.exists.then_some(&self.recorded))
    }
}

/// What one sync has done so far.
#[derive(Default)]
struct Progress {
    /// Each object's outcome so far.
    results: HashMap<ObjRef, ObjectOutcome>,
    /// Objects applied (or, in a server dry run, accepted).
    applied: BTreeSet<ObjRef>,
    /// Objects whose apply failed in a way showing they do not exist ([`ObjectError::shows_absent`]).
    absent: BTreeSet<ObjRef>,
    /// Write requests sent.
    writes: usize,
    /// Objects whose drift managers' fields were taken over ([`takeover`]).
    taken_over: usize,
    /// Objects adopted from another inventory (`adopt_all`), with that inventory.
    adopted: Vec<(ObjRef, String)>,
    /// Every status seen so far (apply answers, watches, polls).
    seen: Seen,
    /// The status watches of objects the apply left in progress (none in a dry run).
    watches: Option<Watches>,
}

impl Progress {
    fn record_applied(&mut self, outcomes: Vec<(ObjRef, Result<Applied, ObjectError>)>) {
        for (obj, res) in outcomes {
            match res {
                // The events were logged as the answers arrived (`log_apply_answer`).
                Ok(a) => {
                    self.writes += usize::from(a.wrote) + usize::from(a.took_over);
                    self.taken_over += usize::from(a.took_over);
                    if let Some(from) = a.adopted_from {
                        self.adopted.push((obj.clone(), from));
                    }
                    // The answer's status is in `seen` already (a ConfigMap is Current at
                    // once); the rest are watched or polled.
                    self.applied.insert(obj.clone());
                    self.results.insert(
                        obj.clone(),
                        ObjectOutcome::new(obj, Status::InProgress, "applied"),
                    );
                }
                Err(e) => {
                    if e.shows_absent() {
                        self.absent.insert(obj.clone());
                    }
                    self.failed_outcome(obj, e.to_string());
                }
            }
        }
    }

    fn apply_failed(&mut self, obj: ObjRef, e: &ObjectError) {
        if e.shows_absent() {
            self.absent.insert(obj.clone());
        }
        let message = e.to_string();
        event_failed(&obj, Phase::Apply, &message);
        self.failed_outcome(obj, message);
    }

    fn failed_outcome(&mut self, obj: ObjRef, message: String) {
        self.results
            .insert(obj.clone(), ObjectOutcome::write_failed(obj, message));
    }

    /// A server dry run changed nothing, so there is no status to wait for.
    fn mark_dry_run(&mut self) {
        for obj in &self.applied {
            if let Some(r) = self.results.get_mut(obj) {
                r.status = ObjectState::Live(Status::Unknown);
                r.message = "server dry run: accepted by the API server, nothing changed".into();
            }
        }
    }
}

/// Leaves out the objects Argo CD would skip and returns a warning for each hook of a plain
/// file ([`plan::hooks`]), logged at warn.
pub(crate) fn set_hooks_aside(manifests: &mut Vec<Manifest>, s: &Settings) -> Vec<String> {
    let hooks = plan::hooks(manifests, s.rendered_by_helm);
    for warning in &hooks.warnings {
        tracing::warn!(warning, "A hook in the manifests");
    }
    for i in hooks.skipped.into_iter().rev() {
        manifests.remove(i);
    }
    hooks.warnings
}

/// Decodes every file, substituting `vars`; any error stops the sync before it touches the
/// cluster.
///
/// Adds to `warnings` a warning per file naming the variables substituted as empty for want
/// of a value ([`crate::substitute::emptied_warning`]), logged at warn.
pub(crate) fn decode_all(
    files: &[(String, Vec<u8>)],
    vars: Option<&Variables>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Manifest>, SyncError> {
    let mut manifests = Vec::new();
    for (path, bytes) in files {
        let mut emptied = BTreeSet::new();
        manifests.append(&mut decode_file_noting(path, bytes, vars, &mut emptied)?);
        if let Some(warning) = crate::substitute::emptied_warning(path, &emptied) {
            tracing::warn!(warning, "Variables substituted as empty");
            warnings.push(warning);
        }
    }
    Ok(manifests)
}

/// Client-side dry run: the files decode and are consistent; nothing is sent.
fn client_dry_run(commit_id: &str, manifests: &[Manifest]) -> SyncOutcome {
    let objects = manifests
        .iter()
        .map(|m| {
            ObjectOutcome::new(
                m.obj_ref(),
                Status::Unknown,
                "client dry run: decoded, not sent",
            )
        })
        .collect();
    SyncOutcome {
        commit_id: commit_id.to_string(),
        error: None,
        objects,
        writes: 0,
        dry_run: true,
        watched_statuses: 0,
        taken_over: 0,
        warnings: Vec::new(),
    }
}

/// Namespaces are defaulted from discovery (the scope of a kind is the cluster's to say),
/// before identities are compared: `dude/nginx` and a `nginx` defaulted into `dude` are the
/// same object. Kinds a CRD of this very commit introduces are resolved after stage 1.
pub(crate) fn default_namespaces(manifests: &mut [Manifest], disc: &Apis, s: &Settings) {
    for m in manifests.iter_mut() {
        if let Some((_, caps)) = Syncer::resolve(disc, m) {
            m.set_default_namespace(&s.objects_namespace, caps.scope == Scope::Namespaced);
        }
    }
}

/// Resolves a stage's objects against discovery, defaulting their namespaces; an object whose
/// type the cluster does not serve fails here.
fn resolve_stage(
    s: &Settings,
    manifests: &mut [Manifest],
    stage: &[usize],
    disc: &Apis,
    p: &mut Progress,
) -> Vec<Resolved> {
    let mut resolved = Vec::new();
    for &idx in stage {
        let m = &mut manifests[idx];
        match Syncer::resolve(disc, m) {
            Some((ar, caps)) => {
                let namespaced = caps.scope == Scope::Namespaced;
                m.set_default_namespace(&s.objects_namespace, namespaced);
                resolved.push(Resolved {
                    idx,
                    ar,
                    namespaced,
                });
            }
            None => p.apply_failed(m.obj_ref(), &not_resolved(disc, m)),
        }
    }
    resolved
}

/// Why `m`'s type did not resolve: its group could not be discovered, or it is not served.
pub(crate) fn not_resolved(disc: &Apis, m: &Manifest) -> ObjectError {
    match disc.unavailable(m.group()) {
        Some(reason) => ObjectError::GroupUnavailable {
            group: m.group().to_owned(),
            reason: reason.to_owned(),
        },
        None => ObjectError::NoResourceType {
            kind: m.kind().to_string(),
            api_version: m.api_version().to_string(),
        },
    }
}

/// An object whose status is awaited: its type and namespace.
/// Its type and namespace are shared by every target of the group (thousands of copies of an
/// `ApiResource` were a large part of a big sync's memory).
type Target = (ObjRef, Arc<(ApiResource, Option<String>)>);

/// The applied objects whose type discovery knows.
fn status_targets(applied: &BTreeSet<ObjRef>, disc: &Apis) -> Vec<Target> {
    let mut groups: HashMap<GroupKey, Arc<(ApiResource, Option<String>)>> = HashMap::new();
    applied
        .iter()
        .filter_map(|o| {
            let (ar, caps) = Syncer::resolve_ref(disc, o)?;
            let ns = if caps.scope == Scope::Namespaced {
                o.namespace.clone()
            } else {
                None
            };
            let group = groups
                .entry(group_key(&ar, ns.as_deref()))
                .or_insert_with(|| Arc::new((ar, ns)))
                .clone();
            Some((o.clone(), group))
        })
        .collect()
}

/// The statuses seen while waiting, each kept as the object's outcome (their events were
/// logged by [`Seen`] when they changed).
struct StatusLog<'a> {
    results: &'a mut HashMap<ObjRef, ObjectOutcome>,
    sink: &'a ProgressSink,
}

impl StatusLog<'_> {
    /// Takes the statuses `seen` learned since the last call; publishes progress once if any
    /// changed an applied object's outcome.
    fn catch_up(&mut self, seen: &Seen) {
        let mut changed = false;
        for (o, st) in seen.take_changes() {
            let Some(r) = self.results.get_mut(&o) else {
                continue;
            };
            if r.status != ObjectState::Live(st.status) || r.message != st.message {
                r.status = ObjectState::Live(st.status);
                r.message = st.message;
                changed = true;
            }
        }
        if changed {
            self.sink.publish(self.results);
        }
    }

    /// Current or Failed: nothing more to wait for.
    fn settled(&self, o: &ObjRef) -> bool {
        self.results.get(o).is_some_and(|r| {
            matches!(
                r.status,
                ObjectState::Live(Status::Current | Status::Failed)
            )
        })
    }

    /// Says of every target still not settled that `timeout` passed.
    fn time_out(&mut self, targets: &[Target], timeout: Duration) {
        for (o, _) in targets {
            if self.settled(o) {
                continue;
            }
            if let Some(r) = self.results.get_mut(o) {
                r.message = format!(
                    "{} (not Current after reconcile_timeout {timeout:?})",
                    r.message
                );
            }
        }
    }
}

/// (group, kind) pairs served by CRDs in this sync, for prune ordering.
pub(crate) fn crd_kinds(manifests: &[Manifest]) -> Vec<(String, String)> {
    manifests
        .iter()
        .filter(|m| m.kind() == "CustomResourceDefinition")
        .filter_map(|m| {
            let object = m.object();
            let spec = &object["spec"];
            Some((
                spec["group"].as_str()?.to_string(),
                spec["names"]["kind"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// `tiers` without the objects whose replacement in another namespace this sync did not
/// create ([`prune::held_back`]), and those replacements. Each object held gets its outcome,
/// left in place, and stays in the inventory (it is not among the objects `prune_all` drops),
/// so a later sync prunes it once the replacement exists. Objects only attempted never
/// existed: nothing to hold. A replacement is an object new to the inventory: one it lists
/// already (attempted for several commits, say a Deployment in a namespace the agent may not
/// write, beside the one being removed) replaces nothing, and the caller keeps replacements
/// out of `attempted` so that they stay new while they fail.
fn hold_back_moved(
    tiers: Vec<Vec<ObjRef>>,
    held: &Recorded,
    desired: &BTreeSet<ObjRef>,
    p: &mut Progress,
) -> (Vec<Vec<ObjRef>>, BTreeSet<ObjRef>) {
    let listed = held.all();
    let not_created: BTreeSet<ObjRef> = desired
        .difference(&p.applied)
        .filter(|o| !listed.contains(*o))
        .cloned()
        .collect();
    let candidates: Vec<ObjRef> = tiers
        .iter()
        .flatten()
        .filter(|o| !held.only_attempted(o))
        .cloned()
        .collect();
    let waiting = prune::held_back(&candidates, &not_created);
    for (obj, replacement) in &waiting {
        let skip = Skip::ReplacementMissing {
            replacement: replacement.clone(),
        };
        left_in_place(obj, &skip, p);
    }
    let tiers = without(tiers, |o| waiting.contains_key(o));
    (tiers, waiting.into_values().collect())
}

/// An object that left Git but whose prune waits: said (event, log) and reported
/// `PruneSkipped` with why. It stays in the inventory: `prune_all` never sees it.
fn left_in_place(obj: &ObjRef, skip: &Skip, p: &mut Progress) {
    event_prune_skipped(obj, skip);
    let outcome = ObjectOutcome {
        obj: obj.clone(),
        status: ObjectState::PruneSkipped,
        message: skip.to_string(),
        not_applied: false,
    };
    p.results.insert(obj.clone(), outcome);
}

/// `tiers` without the objects `held` picks, empty tiers dropped.
fn without(tiers: Vec<Vec<ObjRef>>, held: impl Fn(&ObjRef) -> bool) -> Vec<Vec<ObjRef>> {
    tiers
        .into_iter()
        .map(|t| t.into_iter().filter(|o| !held(o)).collect())
        .filter(|t: &Vec<ObjRef>| !t.is_empty())
        .collect()
}

/// `tiers` without the Namespace the inventory is kept in ([`prune::holds_inventory`]): it
/// gets its outcome, left in place, and stays in the inventory (`prune_all` does not drop it),
/// so a sync after `default_namespace` moves prunes it.
fn keep_inventory_namespace(
    tiers: Vec<Vec<ObjRef>>,
    inventory_namespace: &str,
    p: &mut Progress,
) -> Vec<Vec<ObjRef>> {
    let holds = |o: &ObjRef| prune::holds_inventory(o, inventory_namespace);
    for obj in tiers.iter().flatten().filter(|o| holds(o)) {
        left_in_place(obj, &Skip::HoldsInventory, p);
    }
    without(tiers, holds)
}

/// The outcome of a sync from its objects' outcomes: failed unless every object is Current,
/// Pruned or PruneSkipped (or, in a server dry run, Unknown: nothing was changed, so nothing
/// became Current).
fn finish(
    commit_id: &str,
    results: HashMap<ObjRef, ObjectOutcome>,
    writes: usize,
    dry: bool,
) -> SyncOutcome {
    let mut objects: Vec<ObjectOutcome> = results.into_values().collect();
    objects.sort_by(|a, b| a.obj.cmp(&b.obj));
    let live: Vec<(ObjRef, ResourceStatus)> = objects
        .iter()
        .filter_map(|o| match o.status {
            ObjectState::Live(Status::Unknown) if dry => None,
            ObjectState::Live(status) => Some((
                o.obj.clone(),
                ResourceStatus::new(status, o.message.clone()),
            )),
            ObjectState::Pruned | ObjectState::PruneSkipped => None,
        })
        .collect();
    // After the wait, objects still pending failed too: they did not become Current in time.
    let failed = sync_outcome(&live).not_current();
    SyncOutcome {
        commit_id: commit_id.to_string(),
        error: (failed > 0).then_some(SyncError::ResourcesFailed(failed)),
        objects,
        writes,
        dry_run: dry,
        watched_statuses: 0,
        taken_over: 0,
        warnings: Vec::new(),
    }
}

/// Whether the API server refused an apply because it changes a field that cannot change (a
/// Job's template, a Service's clusterIP, a Deployment's selector).
fn is_immutable_change(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(st) if st.code == 422 && st.message.contains("immutable"))
}

/// Whether an object asks to be deleted and created again when a change to it cannot be
/// applied in place, with the annotation Flux reads for that, so manifests written for Flux
/// keep their meaning. Only the object's own annotation does it: recreating deletes its
/// dependents (a Job's Pods) and, for a PersistentVolumeClaim or a Namespace, data.
fn asks_to_be_recreated(obj: &Value) -> bool {
    obj.pointer("/metadata/annotations/kustomize.toolkit.fluxcd.io~1force")
        .and_then(Value::as_str)
        == Some("enabled")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_error_shows_the_api_servers_reason_and_not_kubes_stand_in() {
        let err = |message: &str, reason: &str, code: u16| {
            let status = kube::core::Status::failure(message, reason).with_code(code);
            ApiError::from(kube::Error::Api(status.boxed())).to_string()
        };
        assert_eq!(
            err("service unavailable", KUBE_UNPARSED_REASON, 503),
            "service unavailable (503)"
        );
        assert_eq!(
            err("deployments.apps is forbidden", "Forbidden", 403),
            "deployments.apps is forbidden (403 Forbidden)"
        );
    }

    #[test]
    fn only_immutable_refusals_of_objects_asking_for_it_recreate() {
        let refusal = |code: u16, message: &str| {
            kube::Error::Api(
                kube::core::Status::failure(message, "Invalid")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(is_immutable_change(&refusal(
            422,
            "ConfigMap \"a\" is invalid: data: Forbidden: field is immutable when `immutable` is set"
        )));
        assert!(!is_immutable_change(&refusal(
            422,
            "spec.replicas: Invalid value: -1"
        )));
        assert!(!is_immutable_change(&refusal(409, "immutable")));
        let with = |value: &str| serde_json::json!({"metadata": {"annotations": {"kustomize.toolkit.fluxcd.io/force": value}}});
        assert!(asks_to_be_recreated(&with("enabled")));
        assert!(!asks_to_be_recreated(&with("disabled")));
        assert!(!asks_to_be_recreated(&serde_json::json!({"metadata": {}})));
    }

    fn obj(name: &str) -> ObjRef {
        ObjRef::new("", "ConfigMap", Some("dude"), name)
    }

    /// Objects a prune waits for are named with what holds them.
    #[test]
    fn a_long_prune_wait_names_the_objects_and_their_finalizers() {
        let present = BTreeMap::from([
            ("w3".to_owned(), vec!["foregroundDeletion".to_owned()]),
            ("w4".to_owned(), Vec::new()),
        ]);
        let line =
            still_deleting_line(&[obj("w3"), obj("w4")], &present, Duration::from_secs(3600));
        assert_eq!(
            line,
            format!(
                "Pruning still waits for 2 object(s) to be deleted: {} (finalizers: foregroundDeletion), {}; a finalizer's controller must remove them (foregroundDeletion: kube-controller-manager's garbage collector); the sync waits up to prune_timeout (3600s)",
                obj("w3"),
                obj("w4")
            )
        );
    }

    fn results(states: &[(&str, ObjectState)]) -> HashMap<ObjRef, ObjectOutcome> {
        states
            .iter()
            .map(|(name, status)| {
                let o = ObjectOutcome {
                    obj: obj(name),
                    status: *status,
                    message: String::new(),
                    not_applied: false,
                };
                (o.obj.clone(), o)
            })
            .collect()
    }

    /// The largest timeout a configuration can hold gives a deadline decades away instead of
    /// panicking the worker; an ordinary one is exactly that far.
    #[test]
    fn a_timeout_past_the_clock_gives_a_far_deadline_instead_of_a_panic() {
        let before = tokio::time::Instant::now();
        let far = deadline_in(Duration::from_secs(u64::MAX));
        assert!(far > before + Duration::from_secs(10 * 365 * 86_400));
        let hour = deadline_in(Duration::from_secs(3600));
        assert!(hour >= before + Duration::from_secs(3600));
        assert!(hour <= tokio::time::Instant::now() + Duration::from_secs(3600));
    }

    fn api_error(code: u16) -> ObjectError {
        ObjectError::Api(ApiError {
            message: String::new(),
            code: Some(code),
        })
    }

    /// A refused inventory says which rights agentk lacks and where the install grants them;
    /// other failures are left as the API server worded them.
    #[test]
    fn a_forbidden_inventory_names_the_rights_to_grant() {
        let refused = |code| SyncError::WriteInventory {
            namespace: "apps".into(),
            name: "inventory-1-2".into(),
            source: ApiError {
                message: "configmaps \"inventory-1-2\" is forbidden (403 Forbidden)".into(),
                code: Some(code),
            },
        };
        let forbidden = refused(403).to_string();
        assert!(
            forbidden.starts_with("writing inventory apps/inventory-1-2: configmaps")
                && forbidden.contains("rbac.inventoryNamespaces"),
            "{forbidden}"
        );
        assert!(!refused(500).to_string().contains("rbac."));
    }

    /// A 404 (namespace or type gone) or an unserved type shows the object absent; a refusal
    /// does not (a listed object whose update is refused still exists).
    #[test]
    fn only_a_missing_namespace_or_type_shows_an_object_absent() {
        assert!(api_error(404).shows_absent());
        let no_type = ObjectError::NoResourceType {
            kind: "ServiceMonitor".into(),
            api_version: "monitoring.coreos.com/v1".into(),
        };
        assert!(no_type.shows_absent());
        for code in [403, 409, 422, 500] {
            assert!(!api_error(code).shows_absent(), "{code}");
        }
    }

    /// An attempted object that left Git is forgotten silently unless it was found ours.
    #[test]
    fn an_attempted_object_is_forgotten_unless_found_ours() {
        let forgotten = [
            Ok(PruneEnd::Gone { wrote: false }),
            Ok(PruneEnd::Skipped(Skip::TypeNotServed)),
            Ok(PruneEnd::Skipped(Skip::NotOurs { owner: None })),
            Err(api_error(403)),
            Err(api_error(404)),
        ];
        for end in &forgotten {
            assert!(forgets_attempted(end), "{end:?}");
        }
        let told = [
            Ok(PruneEnd::Gone { wrote: true }),
            Ok(PruneEnd::Skipped(Skip::Kept {
                annotation: "helm.sh/resource-policy: keep".into(),
            })),
            Err(api_error(500)),
            Err(ObjectError::StillPresent(Duration::from_secs(1))),
        ];
        for end in &told {
            assert!(!forgets_attempted(end), "{end:?}");
        }
    }

    /// Each file whose variables were emptied for want of a value gets one warning naming
    /// them; a file whose variables all resolved, or used defaults, gets none.
    #[test]
    fn decoding_warns_per_file_of_variables_substituted_as_empty() {
        let mut vars = Variables::new(false);
        vars.set("set", "1");
        let cm = |name: &str, value: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  v: \"{value}\"\n"
            );
            (format!("{name}.yaml"), yaml.into_bytes())
        };
        let files = [
            cm("fine", "${set}${other:=x}"),
            cm("typo", "${sett}-${TAG}"),
        ];
        let mut warnings = Vec::new();
        let manifests = decode_all(&files, Some(&vars), &mut warnings).expect("decodes");
        assert_eq!(manifests.len(), 2);
        let [warning] = &warnings[..] else {
            panic!("one warning: {warnings:?}");
        };
        assert!(
            warning.starts_with(
                "typo.yaml: post_build variables not set, substituted as empty: ${TAG}, ${sett} ("
            ),
            "{warning}"
        );
    }

    #[test]
    fn progress_counts_objects_current_and_failed_names_the_first_pending_and_is_published_once_per_change()
     {
        let mut r = results(&[
            ("a", ObjectState::Live(Status::Current)),
            ("b", ObjectState::Live(Status::Failed)),
            ("d", ObjectState::Live(Status::Unknown)),
            ("c", ObjectState::Live(Status::InProgress)),
            ("e", ObjectState::Pruned),
            ("0", ObjectState::PruneSkipped),
        ]);
        if let Some(c) = r.get_mut(&obj("c")) {
            c.message = "0 of 1 replicas available".into();
        }
        let want = SyncProgress {
            objects: 4,
            current: 1,
            failed: 1,
            pending: Some(PendingObject {
                obj: obj("c"),
                status: Status::InProgress,
                message: "0 of 1 replicas available".into(),
            }),
        };
        assert_eq!(SyncProgress::of(r.values()), want);
        let (tx, mut rx) = tokio::sync::watch::channel(SyncProgress::default());
        let sink = ProgressSink::new(std::sync::Arc::new(tx));
        sink.publish(&r);
        assert_eq!(*rx.borrow_and_update(), want);
        sink.publish(&r);
        assert!(!rx.has_changed().unwrap_or(true), "the same progress twice");
        ProgressSink::default().publish(&r);
    }

    #[test]
    fn finish_succeeds_when_every_object_is_current_pruned_or_left_in_place() {
        let out = finish(
            "c1",
            results(&[
                ("b", ObjectState::Live(Status::Current)),
                ("a", ObjectState::Pruned),
                ("c", ObjectState::PruneSkipped),
            ]),
            3,
            false,
        );
        assert!(out.succeeded(), "{out:?}");
        assert_eq!((out.commit_id.as_str(), out.writes), ("c1", 3));
        let names: Vec<&str> = out.objects.iter().map(|o| o.obj.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "sorted by object");
    }

    #[test]
    fn finish_counts_failed_and_still_pending_objects_as_failed() {
        let out = finish(
            "c1",
            results(&[
                ("a", ObjectState::Live(Status::Current)),
                ("b", ObjectState::Live(Status::Failed)),
                ("c", ObjectState::Live(Status::InProgress)),
                ("d", ObjectState::Live(Status::Unknown)),
            ]),
            0,
            false,
        );
        assert_eq!(out.error, Some(SyncError::ResourcesFailed(3)));
        assert_eq!(
            out.error.map(|e| e.to_string()).as_deref(),
            Some("3 resources failed")
        );
    }

    #[test]
    fn a_superseded_sync_fails_only_on_failed_objects_and_marks_the_rest_not_waited_for() {
        let mut out = finish(
            "c1",
            results(&[
                ("a", ObjectState::Live(Status::Current)),
                ("b", ObjectState::Live(Status::InProgress)),
                ("c", ObjectState::Live(Status::Unknown)),
                ("d", ObjectState::Pruned),
            ]),
            4,
            false,
        );
        let due = "a re-sync of the same commit (kas agent reconcile)";
        not_waited_for(&mut out, due);
        let superseded = SyncError::Superseded {
            pending: 2,
            due: due.to_owned(),
        };
        assert_eq!(out.error, Some(superseded));
        assert!(out.superseded() && !out.succeeded());
        let b = out.objects.iter().find(|o| o.obj.name == "b").expect("b");
        assert!(
            b.message.ends_with(
                "(not waited for: a re-sync of the same commit (kas agent reconcile) was due)"
            ),
            "{b:?}"
        );
        assert!(
            out.error.expect("an error").to_string().starts_with(
                "superseded: 2 resources were not Current yet when a re-sync of the same commit (kas agent reconcile) became due"
            ),
        );

        let failing = [
            ("a", ObjectState::Live(Status::Failed)),
            ("b", ObjectState::Live(Status::InProgress)),
        ];
        let mut out = finish("c1", results(&failing), 0, false);
        not_waited_for(&mut out, "a sync of newer commit c2");
        assert_eq!(
            out.error,
            Some(SyncError::ResourcesFailed(1)),
            "a failure stays one"
        );
    }

    #[test]
    fn a_superseded_sync_whose_objects_were_all_current_succeeded() {
        let states = [
            ("a", ObjectState::Live(Status::Current)),
            ("b", ObjectState::PruneSkipped),
        ];
        let mut out = finish("c1", results(&states), 1, false);
        not_waited_for(&mut out, "a sync of newer commit c2");
        assert!(out.succeeded(), "{out:?}");
    }

    #[test]
    fn supersede_cuts_only_the_wait_and_a_stop_cuts_both() {
        let root = CancellationToken::new();
        let s = SyncStop::under(&root);
        s.supersede("a sync of newer commit c2");
        s.supersede("a re-sync of the same commit (kas agent reconcile)");
        assert!(s.superseded() && s.waiting.is_cancelled() && !s.now.is_cancelled());
        assert_eq!(
            s.due(),
            "a sync of newer commit c2",
            "the first cause cut the wait"
        );
        let t = SyncStop::under(&root);
        root.cancel();
        assert!(t.now.is_cancelled() && t.waiting.is_cancelled());
        assert!(!t.superseded(), "stopped, not superseded");
    }

    #[test]
    fn finish_of_a_dry_run_does_not_fail_on_unknown() {
        let states = [("a", ObjectState::Live(Status::Unknown))];
        assert!(finish("c1", results(&states), 0, true).succeeded());
        assert!(!finish("c1", results(&states), 0, false).succeeded());
    }

    #[test]
    fn errors_read_as_before() {
        let dup = SyncError::Duplicate {
            obj: obj("a"),
            sources: vec!["x.yaml".into(), "y.yaml".into()],
        };
        assert_eq!(
            dup.to_string(),
            format!("{} is defined more than once: x.yaml, y.yaml", obj("a"))
        );
        let none = ObjectError::NoResourceType {
            kind: "Widget".into(),
            api_version: "example.com/v1".into(),
        };
        assert_eq!(
            none.to_string(),
            "the cluster has no resource type for Widget in API version example.com/v1"
        );
        assert_eq!(
            ObjectError::StillPresent(Duration::from_secs(5)).to_string(),
            "still present after prune_timeout (5s)"
        );
    }
}
