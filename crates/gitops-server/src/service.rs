//! The GitOps gRPC service as kas serves it: for each manifest project an agent asks about,
//! select the files at the newest commit of the requested ref and stream them whenever that
//! commit changes; keep the agents' sync reports for the admin commands.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

use tether_git_source::{CommitId, GitRef, Sources};
use tether_protocol::gitops::git_ops_server::{GitOps, GitOpsServer};
use tether_protocol::gitops::{
    Header, ObjectChunk, ObjectsRequest, ObjectsResponse, ReportAck, Resync, SelectionError,
    Suspension, SyncOutcome, SyncReport, Trailer, git_ref, objects_response,
};
use tether_store::Store;
use tether_tunnel_server::{Authenticator, Registry, authenticate_request};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::control::{Controls, Directives, ResyncId, suspension_for};
use crate::lag::ReconcileLag;
use crate::render::{ChartNow, ManifestSource, RenderSpec, Renderer};
use crate::reports::SyncStates;
use crate::select::{Limits, Selection, manifests_at};

/// Size of the file chunks on the wire (well under gRPC's message limit).
const CHUNK: usize = 512 * 1024;

/// What the GitOps service needs from the rest of kas.
#[derive(Clone)]
pub struct GitOpsDeps {
    /// Checks the agent token of every call.
    pub auth: Arc<dyn Authenticator>,
    /// Manifest projects and the sync reports.
    pub store: Arc<dyn Store>,
    /// The Git mirrors the manifests are read from.
    pub sources: Arc<Sources>,
    /// Ends an agent's streams when its token is revoked or kas stops.
    pub registry: Arc<Registry>,
    /// Bounds of one selection.
    pub limits: Limits,
    /// Renders Kustomize directories and Helm charts (sandbox, cache).
    pub renderer: Arc<Renderer>,
    /// Told of offered commits, refusals and sync reports (failures, recoveries, statuses).
    pub notifier: tether_notifications::Notifier,
    /// The manifest projects each agent may read and report on.
    pub access: Arc<dyn crate::ProjectAccess>,
}

impl std::fmt::Debug for GitOpsDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitOpsDeps")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The server half of GitOps, built once at startup: the gRPC service for the agent listener
/// and the sync reports for the admin API.
#[derive(Debug, Clone)]
pub struct GitOpsModule {
    service: GitOpsService,
}

impl GitOpsModule {
    pub fn new(deps: GitOpsDeps) -> Self {
        let reports = Arc::new(SyncStates::new(Arc::clone(&deps.store)));
        let lag = Arc::new(ReconcileLag::default());
        Self {
            service: GitOpsService {
                deps,
                reports,
                lag,
                controls: Arc::new(Controls::default()),
            },
        }
    }

    /// Registers the module's metrics (`gitops_reconcile_lag_seconds`, chart dependency
    /// fetches, and the renderers' memory settings in force, which kas may have lowered to fit
    /// its own memory limit).
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        self.service.lag.register(reg);
        self.service.reports.register(reg);
        self.service.deps.renderer.register(reg);
        let render = self.service.deps.renderer.config();
        let gauge = |value: u64| {
            let g: Gauge = Gauge::default();
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
            g
        };
        reg.register(
            "gitops_render_memory_limit_bytes",
            "Address-space limit of each renderer, as in force",
            gauge(render.memory_limit),
        );
        reg.register(
            "gitops_render_max_concurrent",
            "Most renderings running at once, as in force",
            gauge(u64::try_from(render.max_concurrent).unwrap_or(u64::MAX)),
        );
    }

    /// The renderer the streams use (previews share it and its cache).
    pub fn renderer(&self) -> Arc<Renderer> {
        Arc::clone(&self.service.deps.renderer)
    }

    /// The directives to agents' streams: re-sync now, suspensions changed.
    pub fn controls(&self) -> Arc<Controls> {
        Arc::clone(&self.service.controls)
    }

    /// The agents' last sync reports (what `kas agent status` shows).
    pub fn reports(&self) -> Arc<SyncStates> {
        Arc::clone(&self.service.reports)
    }

    /// The gRPC service, to add to the agent listener's router.
    pub fn service(&self) -> GitOpsServer<GitOpsService> {
        GitOpsServer::new(self.service.clone())
            .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE)
    }
}

/// The `GitOps` gRPC service; see [`GitOpsModule::service`].
#[derive(Clone)]
pub struct GitOpsService {
    deps: GitOpsDeps,
    reports: Arc<SyncStates>,
    lag: Arc<ReconcileLag>,
    controls: Arc<Controls>,
}

impl std::fmt::Debug for GitOpsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitOpsService").finish_non_exhaustive()
    }
}

type Tx = mpsc::Sender<Result<ObjectsResponse, Status>>;

fn msg(m: objects_response::Message) -> Result<ObjectsResponse, Status> {
    Ok(ObjectsResponse { message: Some(m) })
}

impl GitOpsService {
    async fn find_project(&self, id: &str) -> Result<tether_store::Project, Status> {
        let found = match id.parse::<i64>() {
            Ok(n) => self.deps.store.get_project(n).await,
            Err(_) => self.deps.store.get_project_by_path(id).await,
        }
        .map_err(|e| match e {
            tether_store::Error::InvalidName { .. } => Status::invalid_argument(e.to_string()),
            _ => Status::unavailable(e.to_string()),
        })?;
        found.ok_or_else(|| Status::not_found(format!("manifest project {id} is not known to kas")))
    }

    /// The project of the entry `key` names (`project` or `project#name`, as agents send
    /// it in `project_id`), if the agent's configuration in force lists that entry.
    async fn listed_project(
        &self,
        agent_id: i64,
        key: &str,
    ) -> Result<tether_store::Project, Status> {
        let (id, name) = tether_agent_config::split_entry_key(key);
        if let Some(name) = name.filter(|n| !tether_agent_config::is_entry_name(n)) {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not an entry name: {}",
                tether_agent_config::ENTRY_NAME_RULE
            )));
        }
        let project = self.find_project(id).await?;
        let listed = self.deps.access.listed(agent_id).await;
        match listed {
            Some(l) if crate::lists(&l, &project, name) => {
                match self.deps.access.outside(agent_id, &project.path).await {
                    None => Ok(project),
                    Some(why) => {
                        tracing::warn!(agent_id, project = %project.path, "An agent's configuration in force lists a manifest project outside its group; refused: {why}");
                        Err(Status::permission_denied(why))
                    }
                }
            }
            _ => {
                tracing::warn!(agent_id, project = %project.path, entry = name.unwrap_or_default(), "An agent asked for a manifest project entry its configuration in force does not list; refused");
                Err(crate::access::denied(&project, name, listed.is_some()))
            }
        }
    }

    /// Streams the selection at each new commit until the agent goes away; holds commits
    /// while the project is suspended; passes re-sync requests on after any newer commit.
    async fn run(
        self,
        agent_id: i64,
        token_id: i64,
        project: tether_store::Project,
        req: ObjectsRequest,
        source: ManifestSource,
        tx: Tx,
    ) {
        let lease = self.deps.registry.lease(token_id);
        // However this stream ends, a sync it leaves without an outcome is no longer shown.
        let _open = self.reports.stream_opened(agent_id, &req.project_id);
        let git_ref = match req.r#ref.and_then(|r| r.r#ref) {
            None => GitRef::DefaultBranch,
            Some(git_ref::Ref::Branch(b)) => GitRef::Branch(b),
            Some(git_ref::Ref::Tag(t)) => GitRef::Tag(t),
            Some(git_ref::Ref::Commit(c)) => GitRef::Commit(c),
        };
        let at = StreamAt {
            agent_id,
            project: &project,
            project_key: &req.project_id,
            git_ref: &git_ref,
            source: &source,
            tx: &tx,
        };
        let mut offered = Offered {
            last: req.commit_id.clone(),
            refused: None,
            unresolved: None,
            kas_failed: None,
            chart: None,
        };
        let mut heads = self.deps.sources.watch(project.id);
        let mut directives = self.controls.subscribe(agent_id, project.id);
        let mut control = StreamControl {
            resynced: ResyncId(self.reports.answered(agent_id, &req.project_id).await),
            ..StreamControl::default()
        };
        let mut charts = ChartRecheck::new(&self.deps.renderer, &source);
        loop {
            let d = *directives.borrow_and_update();
            if !self.apply_suspension(&at, d, &mut control).await {
                return;
            }
            // Marked seen even while suspended, or `changed()` below would not wait.
            let fetched = {
                let h = heads.borrow_and_update();
                h.fetches > 0 || h.restored
            };
            let recheck = charts.take_due();
            if control.sent.as_ref().is_some_and(|s| !s.suspended) {
                // A rendering may run for minutes: an agent gone or a token revoked meanwhile
                // ends it (the renderer is killed with the future) instead of letting it run
                // to its time limit for no one.
                let offer = tokio::select! {
                    ok = async {
                        (!fetched || self.offer_newest(&at, &mut offered).await)
                            && (!recheck || self.offer_new_chart(&at, &mut offered).await)
                    } => ok,
                    () = tx.closed() => false,
                    () = lease.cancelled() => {
                        let _ = tx.send(Err(lease.end_status())).await;
                        false
                    }
                };
                if !offer {
                    return;
                }
                if !send_resync(&tx, d.resync, &mut control).await {
                    return;
                }
            }
            tokio::select! {
                changed = heads.changed() => if changed.is_err() { return },
                changed = directives.changed() => if changed.is_err() { return },
                () = charts.due() => {},
                () = lease.cancelled() => {
                    let _ = tx.send(Err(lease.end_status())).await;
                    return;
                }
                () = tx.closed() => return,
            }
        }
    }

    /// Offers the newest commit of the ref if the agent does not have it; false when the agent
    /// is gone. Every successful fetch wakes the caller; the ref may have moved even if the
    /// default branch did not. A mirror restored from disk after a restart serves its commit
    /// before the first fetch of this process (the remote may be slow or down).
    async fn offer_newest(&self, at: &StreamAt<'_>, offered: &mut Offered) -> bool {
        let Some(mirror) = self.deps.sources.mirror(at.project.id) else {
            return true;
        };
        let resolved = mirror.resolve(at.git_ref);
        // The agent was told of a failure of another commit (refused, unrenderable, a ref
        // gone) and the head is now the commit it has (the branch went back): offered again,
        // so the agent learns the failure no longer stands.
        let told_other = |commit: &CommitId| {
            offered.unresolved.is_some()
                || offered.refused.is_some_and(|c| c != *commit)
                || offered
                    .kas_failed
                    .as_ref()
                    .is_some_and(|(c, _)| *c != commit.to_hex())
        };
        let stale = resolved.as_ref().is_ok_and(told_other);
        if let Ok(commit) = &resolved {
            offered.unresolved = None;
            // Since when kas has had it, for the status of an agent behind it.
            self.deps
                .sources
                .ref_since(at.project.id, at.git_ref, commit);
        }
        match resolved {
            Ok(commit) if commit.to_hex() != offered.last || stale => {
                self.lag.seen(&commit.to_hex());
                self.offer_commit(&at.offer(&mirror), commit, offered).await
            }
            Ok(_) => true,
            Err(e) => {
                offered.last = String::new();
                let message = format!("{} of {}: {e}", at.git_ref, at.project.path);
                // Said once while it stays so: a deleted branch is seen again at every fetch,
                // and re-sending made the agent report a new failure (and a notification
                // flip against its drift re-syncs) every poll, for as long as it was missing.
                if offered.unresolved.as_ref() == Some(&message) {
                    return true;
                }
                offered.unresolved = Some(message.clone());
                send_error(at.tx, String::new(), message).await
            }
        }
    }

    /// Sends the commit the agent has again, rendered anew, when the chart of its
    /// `helm.repository` entry now resolves to another version than the one it was sent with
    /// (a version published in the range of `helm.version`, as Flux upgrades a HelmRelease
    /// without a commit). Nothing is rendered when the version stayed. False when the agent
    /// is gone.
    async fn offer_new_chart(&self, at: &StreamAt<'_>, offered: &mut Offered) -> bool {
        let ManifestSource::Render(spec) = at.source else {
            return true;
        };
        let Ok(commit) = CommitId::from_hex(&offered.last) else {
            return true;
        };
        let Some(mirror) = self.deps.sources.mirror(at.project.id) else {
            return true;
        };
        let now = self.deps.renderer.resolve_chart(spec).await;
        if now.is_none() || now == offered.chart || offered.kas_failed.is_some() {
            return true;
        }
        let version = |c: &Option<ChartNow>| c.as_ref().map(|c| c.resolved.version.clone());
        if version(&now) == version(&offered.chart) {
            // Its repository went away or came back: the agent's status says so (or stops
            // saying so) now, not at the next commit.
            let unreachable = now.as_ref().is_some_and(|c| c.stale);
            tracing::info!(agent_id = at.agent_id, project = %at.project.path, commit_id = %commit, unreachable, "The chart repository of helm.repository is unreachable or back: sending the commit rendered anew");
        } else {
            tracing::info!(agent_id = at.agent_id, project = %at.project.path, commit_id = %commit, version = version(&now), was = version(&offered.chart), "A new version of the chart of helm.repository: sending the commit rendered with it");
        }
        match self.send_commit(&at.offer(&mirror), commit).await {
            Delivery::Sent => {
                offered.chart = now;
                true
            }
            // Tried again at the next recheck.
            Delivery::KasFailed(message) => {
                tracing::warn!(agent_id = at.agent_id, project = %at.project.path, commit_id = %commit, error = message, "Rendering the new chart version failed in kas");
                true
            }
            Delivery::Gone => false,
        }
    }

    /// Reads the project's suspension when it may have changed (first, then at each change)
    /// and tells the agent when it differs from what it was told. False when the agent is gone
    /// or the store cannot say: the stream then ends with `UNAVAILABLE` and the agent retries,
    /// rather than applying a project that may be suspended.
    async fn apply_suspension(
        &self,
        at: &StreamAt<'_>,
        d: Directives,
        control: &mut StreamControl,
    ) -> bool {
        if control.suspensions_seen == Some(d.suspensions) {
            return true;
        }
        let all = match self.deps.store.suspensions(Some(at.agent_id)).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(agent_id = at.agent_id, project = %at.project.path, error = %e, "Cannot read the project's suspension; ending the stream");
                let status = Status::unavailable(format!("reading suspensions: {e}"));
                let _ = at.tx.send(Err(status)).await;
                return false;
            }
        };
        control.suspensions_seen = Some(d.suspensions);
        let now = wire_suspension(suspension_for(&all, at.project.id));
        if control.sent.as_ref() == Some(&now) {
            return true;
        }
        if now.suspended {
            tracing::info!(agent_id = at.agent_id, project = %at.project.path, reason = %now.reason, suspended_by = %now.suspended_by, "GitOps suspended: holding new commits");
        }
        control.sent = Some(now.clone());
        at.tx
            .send(msg(objects_response::Message::Suspension(now)))
            .await
            .is_ok()
    }

    /// Sends `commit` when it passes the project's signature policy (signed commits only);
    /// otherwise tells the agent why, once, and sends nothing, so it applies and prunes nothing
    /// and keeps the last verified commit. False when the agent is gone.
    async fn offer_commit(&self, at: &Offer<'_>, commit: CommitId, offered: &mut Offered) -> bool {
        let (agent_id, project) = (at.agent_id, at.project);
        match self.deps.sources.verify(project.id, commit).await {
            Err(refusal) if offered.refused == Some(commit) => {
                tracing::debug!(agent_id, project = %project.path, commit_id = %commit, reason = %refusal.reason, "Manifest commit still refused");
                true
            }
            Err(refusal) => {
                tracing::warn!(agent_id, project = %project.path, commit_id = %commit, signer = refusal.signer.as_deref().unwrap_or_default(), reason = %refusal.reason, "Refused a manifest commit: it is not signed by a trusted key; nothing is applied");
                offered.refused = refusal.definitive.then_some(commit);
                if refusal.definitive {
                    let (notifier, hex) = (&self.deps.notifier, commit.to_hex());
                    notifier
                        .commit_refused(agent_id, at.entry(), &hex, &refusal.reason)
                        .await;
                }
                let message = format!("{refusal}; the last verified commit stays applied");
                send_error(at.tx, commit.to_hex(), message).await
            }
            Ok(_) => {
                let hex = commit.to_hex();
                let retry = offered.kas_failed.as_ref().is_some_and(|(c, _)| *c == hex);
                // Queued before the commit goes out, so a forge hears `pending` before the
                // outcome of a fast sync (once per commit, not at each retry).
                if !retry {
                    let notifier = &self.deps.notifier;
                    let replaces = Some(offered.last.as_str());
                    notifier
                        .commit_offered(agent_id, at.entry(), &hex, replaces)
                        .await;
                }
                // Resolved before the rendering: a version published meanwhile is sent at
                // the next recheck (at worst the same one again), never missed.
                let chart = match at.source {
                    ManifestSource::Render(spec) => self.deps.renderer.resolve_chart(spec).await,
                    ManifestSource::Globs(_) => None,
                };
                match self.send_commit(at, commit).await {
                    Delivery::Sent => {
                        offered.refused = None;
                        offered.kas_failed = None;
                        offered.last = hex;
                        offered.chart = chart;
                        true
                    }
                    Delivery::KasFailed(message) => {
                        // `last` unchanged: the next fetch offers the commit again. The agent
                        // hears of the failure once per commit (its text may differ at each
                        // try: it names the checkout's random folder).
                        let told = offered.kas_failed.replace((hex.clone(), message.clone()));
                        if told.is_some_and(|(c, _)| c == hex) {
                            return true;
                        }
                        send_error(at.tx, hex, message).await
                    }
                    Delivery::Gone => false,
                }
            }
        }
    }

    /// Sends one commit's files, or the user's error in them.
    async fn send_commit(&self, at: &Offer<'_>, commit: CommitId) -> Delivery {
        let (agent_id, project, source, tx) = (at.agent_id, at.project, at.source, at.tx);
        let mirror = at.mirror;
        let (limits, renderer) = (&self.deps.limits, &self.deps.renderer);
        let selection = match manifests_at(agent_id, mirror, commit, source, limits, renderer).await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(agent_id, project = %project.path, commit_id = %commit, error = %e, user_error = e.is_user_error(), "Manifest selection failed");
                if !e.is_user_error() {
                    return Delivery::KasFailed(e.to_string());
                }
                let told = send_error(tx, commit.to_hex(), e.to_string()).await;
                return if told { Delivery::Sent } else { Delivery::Gone };
            }
        };
        if self.send_selection(at, commit, selection).await {
            Delivery::Sent
        } else {
            Delivery::Gone
        }
    }

    /// Streams a selection: header, files in chunks, trailer. False when the agent is gone.
    async fn send_selection(&self, at: &Offer<'_>, commit: CommitId, selection: Selection) -> bool {
        let (agent_id, project, source, tx) = (at.agent_id, at.project, at.source, at.tx);
        tracing::info!(agent_id, project = %project.path, commit_id = %commit, files = selection.files.len(), "Sending manifests");
        for warning in &selection.warnings {
            tracing::warn!(agent_id, project = %project.path, commit_id = %commit, warning, "Manifest selection warning");
        }
        let warnings = selection.warnings;
        self.reports.selection_sent(agent_id);
        let header = Header {
            commit_id: commit.to_hex(),
            project_numeric_id: project.id,
            project_path: project.path.clone(),
            rendered: matches!(source, ManifestSource::Render(_)),
            chart_repository: matches!(source, ManifestSource::Render(RenderSpec::Helm(h)) if h.from_repository()),
            chart_version: selection.chart_version,
            progress_reports: true,
            kas_time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            inventory_namespace: self
                .reports
                .inventory_namespace(agent_id, at.project_key)
                .await,
        };
        if tx
            .send(msg(objects_response::Message::Header(header)))
            .await
            .is_err()
        {
            return false;
        }
        let files = u32::try_from(selection.files.len()).unwrap_or(u32::MAX);
        for f in selection.files {
            // An empty file still announces itself (one empty chunk).
            let chunks: Vec<&[u8]> = if f.bytes.is_empty() {
                vec![&[][..]]
            } else {
                f.bytes.chunks(CHUNK).collect()
            };
            for c in chunks {
                let chunk = ObjectChunk {
                    source: f.path.clone(),
                    data: c.to_vec(),
                };
                if tx
                    .send(msg(objects_response::Message::Object(chunk)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
        tx.send(msg(objects_response::Message::Trailer(Trailer {
            files,
            warnings,
        })))
        .await
        .is_ok()
    }
}

#[tonic::async_trait]
impl GitOps for GitOpsService {
    type GetObjectsToSynchronizeStream = ReceiverStream<Result<ObjectsResponse, Status>>;

    async fn get_objects_to_synchronize(
        &self,
        request: Request<ObjectsRequest>,
    ) -> Result<Response<Self::GetObjectsToSynchronizeStream>, Status> {
        let id = authenticate_request(self.deps.auth.as_ref(), &request).await?;
        let req = request.into_inner();
        let project = self.listed_project(id.agent_id, &req.project_id).await?;
        if project.remote.is_none() {
            return Err(Status::failed_precondition(format!(
                "manifest project {} has no Git repository configured",
                project.path
            )));
        }
        let source = ManifestSource::from_request(&req.globs, req.render.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = mpsc::channel(8);
        let run = self
            .clone()
            .run(id.agent_id, id.token_id, project, req, source, tx);
        tokio::spawn(run);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_sync(
        &self,
        request: Request<SyncReport>,
    ) -> Result<Response<ReportAck>, Status> {
        let id = authenticate_request(self.deps.auth.as_ref(), &request).await?;
        let report = request.into_inner();
        if !crate::is_commit_id(&report.commit_id) {
            return Err(Status::invalid_argument(
                "commit_id is not a commit's hexadecimal name",
            ));
        }
        self.listed_project(id.agent_id, &report.project_id).await?;
        if report.in_progress {
            // How far a sync got, for `kas agent reconcile --wait`: not an outcome.
            tracing::debug!(agent_id = id.agent_id, project_id = %report.project_id, resync_id = report.resync_id, "Synchronization progress");
            self.reports.put_progress(id.agent_id, report);
            return Ok(Response::new(ReportAck {}));
        }
        tracing::info!(
            agent_id = id.agent_id,
            project_id = %report.project_id,
            commit_id = %report.commit_id,
            outcome = %crate::ReportedOutcome::from(report.sync_outcome()),
            objects = report.objects.len(),
            "Synchronization reported"
        );
        // Acknowledged only once stored with its notifications: otherwise agentk keeps the
        // report and retries, and the retry queues them (stored without them, the retry would
        // be no news and they would be lost).
        let notifier = &self.deps.notifier;
        let previous = self.reports.put(id.agent_id, &report, notifier).await.map_err(|e| {
            tracing::error!(agent_id = id.agent_id, project_id = %report.project_id, error = %e, "Storing a sync report failed; the agent sends it again");
            Status::unavailable(format!("storing the report: {e}"))
        })?;
        // A report re-sent after a reconnect is not a new application of its commit.
        let new_commit = previous.is_none_or(|p| p.commit_id != report.commit_id);
        // Superseded: applied, only not waited for.
        let applied = matches!(
            report.sync_outcome(),
            SyncOutcome::Succeeded | SyncOutcome::Superseded
        );
        if new_commit && applied {
            self.lag.applied(&report.commit_id);
        }
        Ok(Response::new(ReportAck {}))
    }
}

/// What one agent's stream was offered so far.
struct Offered {
    /// The commit the agent has (sent, or in force when it connected).
    last: String,
    /// The commit last refused for its signature, so the agent hears of it once (it is checked
    /// again at each fetch: the project's trusted keys may have changed).
    refused: Option<CommitId>,
    /// Why the entry's ref did not resolve, as last told to the agent (told once).
    unresolved: Option<String>,
    /// The commit whose selection last failed on kas's side, and why (told once per commit).
    kas_failed: Option<(String, String)>,
    /// What the chart of a `helm.repository` entry resolved to when `last` was sent; `None`
    /// before kas sent one on this stream (the agent's version is unknown after it
    /// reconnected: the first recheck sends its commit again, with the version resolved then).
    chart: Option<ChartNow>,
}

/// When a stream of a `helm.repository` entry next asks which version its chart resolves to:
/// every `chart_index_ttl`, whatever else wakes the stream meanwhile (Git fetches come more
/// often), so the index is not fetched faster than its TTL.
struct ChartRecheck {
    every: Option<std::time::Duration>,
    next: tokio::time::Instant,
}

impl ChartRecheck {
    fn new(renderer: &Renderer, source: &ManifestSource) -> Self {
        let every = match source {
            ManifestSource::Render(spec) => renderer.chart_recheck(spec),
            ManifestSource::Globs(_) => None,
        };
        let next = tokio::time::Instant::now() + every.unwrap_or_default();
        Self { every, next }
    }

    /// Whether a recheck is due; if so the next one is scheduled.
    fn take_due(&mut self) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        let now = tokio::time::Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + every;
        true
    }

    /// Ready when a recheck is due; never for other entries.
    async fn due(&self) {
        match self.every {
            Some(_) => tokio::time::sleep_until(self.next).await,
            None => std::future::pending().await,
        }
    }
}

/// What became of a commit offered to an agent.
enum Delivery {
    /// Its manifests, or the user's error in them, went out.
    Sent,
    /// Selecting or rendering failed on kas's side (disk, a renderer missing): offered again
    /// at the next fetch rather than left failed until the next commit.
    KasFailed(String),
    /// The agent is gone.
    Gone,
}

/// Where a commit is offered: one agent's stream of one project.
struct Offer<'a> {
    agent_id: i64,
    project: &'a tether_store::Project,
    /// The project as the agent names it (its reports' `project_id`).
    project_key: &'a str,
    mirror: &'a tether_git_source::Mirror,
    source: &'a ManifestSource,
    tx: &'a Tx,
}

impl Offer<'_> {
    /// The entry this stream serves, as forge statuses tell entries apart.
    fn entry(&self) -> tether_notifications::Entry<'_> {
        tether_notifications::Entry::of(&self.project.path, self.project_key)
    }
}

/// Where a stream sends: one agent's stream of one project at one ref.
struct StreamAt<'a> {
    agent_id: i64,
    project: &'a tether_store::Project,
    project_key: &'a str,
    git_ref: &'a GitRef,
    source: &'a ManifestSource,
    tx: &'a Tx,
}

impl<'a> StreamAt<'a> {
    /// Where this stream offers a commit read from `mirror`.
    fn offer<'b>(&'b self, mirror: &'b tether_git_source::Mirror) -> Offer<'b>
    where
        'a: 'b,
    {
        Offer {
            agent_id: self.agent_id,
            project: self.project,
            project_key: self.project_key,
            mirror,
            source: self.source,
            tx: self.tx,
        }
    }
}

/// What one stream told the agent beyond commits.
#[derive(Default)]
struct StreamControl {
    /// The suspension generation last read (`None`: not read yet).
    suspensions_seen: Option<u64>,
    /// The suspension state last sent (`None`: none yet, so nothing may be offered).
    sent: Option<Suspension>,
    /// The newest re-sync id sent.
    resynced: ResyncId,
}

fn wire_suspension(s: Option<&tether_store::Suspension>) -> Suspension {
    s.map_or_else(Suspension::default, |s| Suspension {
        suspended: true,
        reason: s.reason.clone(),
        suspended_by: s.suspended_by.clone(),
        suspended_at: s.suspended_at,
    })
}

/// Passes a re-sync request on once; false when the agent is gone.
async fn send_resync(tx: &Tx, asked: ResyncId, control: &mut StreamControl) -> bool {
    if asked <= control.resynced {
        return true;
    }
    control.resynced = asked;
    tx.send(msg(objects_response::Message::Resync(Resync {
        id: asked.0,
    })))
    .await
    .is_ok()
}

/// Tells the agent a selection failed (nothing to apply); false when the agent is gone.
async fn send_error(tx: &Tx, commit_id: String, message: String) -> bool {
    tx.send(msg(objects_response::Message::Error(SelectionError {
        commit_id,
        message,
    })))
    .await
    .is_ok()
}
