//! Agent half of GitOps as agentk runs it: one worker per manifest project of the configuration
//! in force. A worker keeps the objects stream to kas open, collects each commit's files, and
//! synchronizes them. A new commit (or `kas agent reconcile`) supersedes the sync in progress:
//! that one finishes applying and pruning, is reported without waiting for its objects to be
//! Current, and the newer one starts. Failed syncs are retried with backoff; successful ones
//! are re-applied periodically to correct drift.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tether_agent_config::{GitRef, ManifestProject};
use tether_gitops_agent::Status;
use tether_gitops_agent::inventory::{LiveInventories, inventory_name};
use tether_gitops_agent::kube_events::{Happened, Recorder};
use tether_gitops_agent::metrics::SyncMetrics;
use tether_gitops_agent::sync::{
    ObjectState, ProgressSink, Settings, SyncOutcome, SyncProgress, SyncStop, Syncer,
};
use tether_gitops_agent::takeover::DriftManagers;

pub use kas_clock::KasClock;
use tether_protocol::gitops::git_ops_client::GitOpsClient;
use tether_protocol::gitops::{
    self as wire, ObjectStatus, ObjectsRequest, ObjectsResponse, SyncReport, git_ref,
    objects_response,
};
use tether_protocol::metadata;
use tether_protocol::render::Cluster;
use tether_tunnel_agent::{AgentMeta, Backoff};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::configuration::Applied;

mod depends;
mod kas_clock;
mod leadership;
mod refusal;
mod schedule;
mod stop;
mod supervise;

use depends::{Board, LastSync};
pub use leadership::Leadership;
use refusal::Refusal;
use schedule::{ResyncStep, Schedule};
use stop::stop_all;
use supervise::supervise;

/// How a worker behaves beyond the configuration file.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Re-apply the last commit this often (drift correction).
    pub resync_interval: Duration,
    /// Retry a failed sync after 10 s, growing to 1 min.
    pub retry: Backoff,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(300),
            retry: Backoff {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(60),
                factor: 2.0,
                jitter: 0.1,
            },
        }
    }
}

/// What every worker shares: the syncer that applies, the metrics syncs are counted in and
/// the Kubernetes Events written about them.
#[derive(Debug, Clone)]
pub struct Engine {
    pub syncer: Arc<Syncer>,
    pub metrics: SyncMetrics,
    pub events: Recorder,
    /// kas's clock, heard with each commit: the times agentk reports are in kas's time.
    pub kas_clock: Arc<KasClock>,
}

fn with_token<T>(meta: &AgentMeta, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    // A token metadata cannot carry goes without: kas then answers UNAUTHENTICATED, which
    // the caller reports (agentk trims the token file, so this means a corrupt file).
    if let Ok(v) = metadata::bearer(&meta.token.current()) {
        req.metadata_mut().insert(metadata::AUTHORIZATION, v);
    }
    req
}

/// Runs workers for the configuration in force until `shutdown`.
pub async fn run(
    channel: Channel,
    meta: AgentMeta,
    engine: Engine,
    mut config: watch::Receiver<Option<Arc<Applied>>>,
    mut leadership: Leadership,
    timing: Timing,
    shutdown: CancellationToken,
) {
    let mut workers = Workers {
        running: HashMap::new(),
        moved: HashMap::new(),
        drift_managers: Vec::new(),
        board: watch::Sender::new(Board::new()),
        live: LiveInventories::default(),
        channel,
        meta,
        engine,
        timing,
        lease: leadership.lease(),
    };
    loop {
        let applied = config.borrow_and_update().clone();
        // Only the leader applies; a replica that is not (or no longer) leading runs no worker.
        let lead = leadership.leads();
        if let Some(applied) = applied {
            workers.reconcile(&applied, lead, &shutdown).await;
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            () = leadership.changed() => {}
            () = shutdown.cancelled() => break,
        }
    }
    let running = workers
        .running
        .into_iter()
        .map(|(key, (_, stop, task))| (key, stop, task))
        .collect();
    stop_all(running, WORKER_STOP_DEADLINE).await;
}

/// The running workers, and what new ones are made of.
struct Workers {
    /// entry key ([`ManifestProject::entry_key`]) → (its settings, the worker's stop token, its task)
    running: HashMap<String, (ManifestProject, CancellationToken, JoinHandle<()>)>,
    /// entry key → its default namespace before the configuration moved it (where its
    /// inventory stays until the first sync in the new one).
    moved: HashMap<String, String>,
    /// `gitops.drift_managers` as the running workers have it: a change restarts them all.
    drift_managers: Vec<String>,
    /// How each running worker stands for the entries that `depends_on` it.
    board: watch::Sender<Board>,
    /// The inventories of the entries in force, shared with every worker.
    live: LiveInventories,
    channel: Channel,
    meta: AgentMeta,
    engine: Engine,
    timing: Timing,
    /// Whether the election's last renewal still holds, for the syncs to check as they write.
    lease: tether_gitops_agent::lease::LeaseCheck,
}

impl Workers {
    /// Runs one worker per manifest project of `applied` (none unless `lead`): stops the
    /// workers whose project left the configuration or whose settings changed, then starts the
    /// missing ones.
    async fn reconcile(&mut self, applied: &Applied, lead: bool, shutdown: &CancellationToken) {
        let in_force: std::collections::HashSet<String> = applied
            .config
            .gitops
            .manifest_projects
            .iter()
            .map(ManifestProject::entry_key)
            .collect();
        let wanted: HashMap<String, ManifestProject> = applied
            .config
            .gitops
            .manifest_projects
            .iter()
            .filter(|_| lead)
            .map(|p| (p.entry_key(), p.clone()))
            .collect();
        // Every entry in force, the stopped ones' successors included: their objects are no
        // other entry's to take over.
        self.live.set(
            wanted
                .keys()
                .map(|key| (inventory_name(applied.agent_id, key), key.clone()))
                .collect(),
        );
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(key, (p, _, _))| wanted.get(*key) != Some(p))
            .map(|(key, _)| key.clone())
            .collect();
        let drift_managers = applied.config.gitops.drift_managers();
        let gone: Vec<String> = if drift_managers == self.drift_managers {
            gone
        } else {
            self.drift_managers = drift_managers;
            self.running.keys().cloned().collect()
        };
        let mut stopping = Vec::with_capacity(gone.len());
        let mut unpublished = Vec::with_capacity(gone.len());
        for key in gone {
            if let Some((old, stop, task)) = self.running.remove(&key) {
                unpublished.push(old.entry_identity());
                if let Some(new) = wanted.get(&key)
                    && new.default_namespace != old.default_namespace
                {
                    self.moved.insert(key.clone(), old.default_namespace);
                }
                stopping.push((key, stop, task));
            }
        }
        // Its dependants wait until it (or its successor) says how it stands: taken off the
        // board before the stop and again after it, which a last publication may precede.
        let unpublish = |board: &watch::Sender<Board>| {
            board.send_modify(|b| b.retain(|id, _| !unpublished.contains(id)));
        };
        unpublish(&self.board);
        // A stopped worker must be gone before its successor (or another replica) applies
        // the same objects: all are stopped together, within one sync's stop grace.
        for key in stop_all(stopping, WORKER_STOP_DEADLINE).await {
            // After the worker ended, so its last sync cannot record them again.
            if in_force.contains(&key) && !wanted.contains_key(&key) {
                // This replica no longer leads: its counts stay (the failures of an outage
                // that took the lease away among them), its state goes.
                self.engine.metrics.forget_state(&key);
            } else if !wanted.contains_key(&key) {
                self.engine.metrics.forget(&key);
            }
        }
        unpublish(&self.board);
        for (key, p) in wanted {
            if !self.running.contains_key(&key) {
                let stop = shutdown.child_token();
                let task = self.start(&key, &p, applied.agent_id, stop.clone());
                self.running.insert(key, (p, stop, task));
            }
        }
    }

    fn start(
        &self,
        key: &str,
        p: &ManifestProject,
        agent_id: i64,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        tracing::info!(project_id = %key, "Starting synchronization worker");
        // Before the worker runs, so that a dependant started with it does not find it missing.
        let identity = p.entry_identity();
        self.board.send_modify(|b| {
            b.insert(identity.clone(), depends::not_synchronized());
        });
        let board = self.board.clone();
        let settings = Settings {
            previous_namespace: self.moved.get(key).cloned(),
            agent_namespace: self.meta.pod_namespace.clone(),
            drift_managers: DriftManagers::new(self.drift_managers.clone()),
            live_inventories: self.live.clone(),
            lease: self.lease.clone(),
            ..Settings::for_project(agent_id, p)
        };
        let (channel, meta, engine) =
            (self.channel.clone(), self.meta.clone(), self.engine.clone());
        let (project, timing) = (p.clone(), self.timing.clone());
        let retry = timing.retry;
        // A fresh worker for each run: one that panicked is started again from nothing.
        let worker = move |run: CancellationToken| {
            let (progress_tx, progress) = watch::channel(SyncProgress::default());
            let worker = Worker {
                client: GitOpsClient::new(channel.clone())
                    .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE),
                meta: meta.clone(),
                engine: engine.clone(),
                settings: Settings {
                    progress: ProgressSink::new(Arc::new(progress_tx)),
                    ..settings.clone()
                },
                project: project.clone(),
                timing: timing.clone(),
                progress,
                identity: identity.clone(),
                board_seen: board.subscribe(),
                board: board.clone(),
            };
            worker.run(run)
        };
        tokio::spawn(
            async move {
                supervise(worker, stop, retry).await;
            }
            .instrument(tracing::info_span!("worker", project_id = %key)),
        )
    }
}

struct Worker {
    client: GitOpsClient<Channel>,
    meta: AgentMeta,
    engine: Engine,
    settings: Settings,
    project: ManifestProject,
    timing: Timing,
    /// What the running sync publishes through `settings.progress`.
    progress: watch::Receiver<SyncProgress>,
    /// The entry as `depends_on` items match it ([`ManifestProject::entry_identity`]).
    identity: String,
    /// Where the worker says how it stands ([`Worker::publish`]), and where it sees how its
    /// dependencies stand.
    board: watch::Sender<Board>,
    board_seen: watch::Receiver<Board>,
}

/// A commit's files, complete, and what kas warned about them.
#[derive(Clone)]
struct Commit {
    id: String,
    files: Vec<(String, Vec<u8>)>,
    warnings: Vec<String>,
    /// The chart version kas rendered for a `helm.repository` entry ("" otherwise), reported
    /// with the sync.
    chart_version: String,
    /// kas keeps progress reports apart from outcomes (`Header.progress_reports`).
    progress_reports: bool,
}

/// How long a cancelled sync may take to wind down before its task is aborted. Cancellation is
/// checked between requests; a request hanging on the API server must not hold agentk past
/// Kubernetes' termination grace period (30 s by default), so it is dropped mid-flight — as
/// safe as a crash: a sync lists what it may create in the inventory before applying it, so
/// a later sync can prune what an abandoned one created.
const SYNC_STOP_GRACE: Duration = Duration::from_secs(2);

/// How long stopping the workers waits for them: a worker ends within its sync's stop grace
/// of being cancelled (it starts no sync once cancelled), plus a moment to return.
const WORKER_STOP_DEADLINE: Duration = SYNC_STOP_GRACE.saturating_add(Duration::from_secs(1));

/// Bound of one `ReportSync` call: kas answers in milliseconds, a hung kas must not stall the
/// worker (it keeps the report and retries).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound of one progress report: progress that cannot be told at once is not worth waiting for.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);

/// The objects stream to kas and the commit being received on it.
struct Stream {
    open: Option<tonic::Streaming<ObjectsResponse>>,
    failures: u32,
    reconnect_at: Instant,
    /// The stream was lost since it was last open: kas may have restarted and forgotten our
    /// report, so the next open re-sends it.
    lost: bool,
    building: Option<Commit>,
    /// The agent token's changes: the stream reopens with a new token (between commits).
    rotations: watch::Receiver<u64>,
}

/// The newest complete commit and the synchronization of it.
struct SyncState {
    /// The commit (shared with the running sync, so a commit of thousands of files is held
    /// once) and when to synchronize it.
    schedule: Schedule<Arc<Commit>>,
    running: Option<Running>,
    /// When the running sync started, for its duration metric.
    started: Instant,
    /// The newest commit offered could not be applied: the schedule's commit is an earlier
    /// one, still re-applied, whose reports say the newest failed. Gone with the next commit.
    refused: Option<Refusal>,
    /// The last sync that finished, for the entries that depend on this one.
    last: Option<LastSync>,
    /// A sync is due but a dependency is not ready: what was reported about it.
    waiting: Option<Waiting>,
}

/// A sync under way.
struct Running {
    stop: SyncStop,
    task: JoinHandle<SyncOutcome>,
    /// What it synchronizes: once superseded, no longer the schedule's newest commit.
    commit: Arc<Commit>,
    /// The refusal in force when it started: a newer commit ends the refusal while this sync
    /// (of the last good commit) still runs, and its report must still carry it, not read as
    /// that commit recovering ([`Running::refusal`]).
    refused: Option<Refusal>,
}

impl Running {
    /// The refusal its report carries: the newest one told (during the sync, or before it),
    /// or, when a newer commit ended it meanwhile, the one in force when it started.
    fn refusal<'a>(&'a self, now: Option<&'a Refusal>) -> Option<&'a Refusal> {
        now.or(self.refused.as_ref())
    }
}

/// The "waiting for dependency" report sent last: sent again only when one of these changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    reason: String,
    commit_id: String,
    resync_id: u64,
}

/// The last report and whether kas has confirmed it.
struct Reports {
    last: Option<SyncReport>,
    pending: bool,
    failures: u32,
    retry_at: Instant,
}

/// What woke the worker.
enum Event {
    Message(Result<Option<ObjectsResponse>, tonic::Status>),
    SyncDone(Result<SyncOutcome, tokio::task::JoinError>),
    /// The running sync got further.
    Progress,
    /// The agent token changed while no commit was being received.
    NewToken,
    Timer,
    Stop,
}

/// Cancels a running sync and waits for it, aborting it after [`SYNC_STOP_GRACE`].
async fn stop_sync(running: Option<Running>) {
    let Some(Running { stop, mut task, .. }) = running else {
        return;
    };
    stop.now.cancel();
    if tokio::time::timeout(SYNC_STOP_GRACE, &mut task)
        .await
        .is_err()
    {
        tracing::warn!("The synchronization did not stop in time; abandoning its requests");
        task.abort();
        let _ = task.await;
    }
}

/// Cuts the running sync's wait for Current, so that the sync of commit `next` (asked for by
/// `by`: `kas agent reconcile`, or none for a commit kas sent) starts once the running one
/// has applied and pruned.
fn supersede(running: Option<&Running>, next: &str, by: Option<&str>) {
    let Some(r) = running else {
        return;
    };
    if !r.stop.superseded() {
        let due = due_wording(&r.commit.id, next, by);
        tracing::info!(commit_id = %r.commit.id, due, "Another synchronization is due: the running one finishes applying and pruning, and is not waited for");
        r.stop.supersede(&due);
    }
}

/// What superseded a sync of commit `running`, as its report says (pure): a re-sync of the
/// same commit must not read as a newer commit having arrived.
fn due_wording(running: &str, next: &str, by: Option<&str>) -> String {
    let what = if next == running {
        "a re-sync of the same commit".to_owned()
    } else {
        format!("a sync of newer commit {}", next.get(..12).unwrap_or(next))
    };
    match by {
        Some(by) => format!("{what} ({by})"),
        None => what,
    }
}

fn stream_backoff() -> Backoff {
    Backoff {
        // Back within a second of a kas restart; a kas that stays down is retried less often.
        initial: Duration::from_millis(500),
        max: Duration::from_secs(60),
        ..Backoff::default()
    }
}

/// When to reopen the objects stream or resend a report after `failures` failures in a row:
/// the backoff with its jitter drawn at random, so the agents (and projects) a kas restart
/// cut off do not all come back in the same instant, over and over.
fn retry_delay(failures: u32) -> Duration {
    stream_backoff().delay(failures, rand::random::<f64>())
}

fn wire_state(state: ObjectState) -> wire::ObjectState {
    match state {
        ObjectState::Live(Status::InProgress) => wire::ObjectState::InProgress,
        ObjectState::Live(Status::Current) => wire::ObjectState::Current,
        ObjectState::Live(Status::Failed) => wire::ObjectState::Failed,
        ObjectState::Live(Status::Terminating) => wire::ObjectState::Terminating,
        ObjectState::Live(Status::NotFound) => wire::ObjectState::NotFound,
        ObjectState::Live(Status::Unknown) => wire::ObjectState::Unknown,
        ObjectState::Pruned => wire::ObjectState::Pruned,
        ObjectState::PruneSkipped => wire::ObjectState::PruneSkipped,
    }
}

fn report_of(outcome: &SyncOutcome, settings: &Settings, finished_at: i64) -> SyncReport {
    let objects = outcome
        .objects
        .iter()
        .map(|o| ObjectStatus {
            group: o.obj.group.clone(),
            kind: o.obj.kind.clone(),
            namespace: o.obj.namespace.clone().unwrap_or_default(),
            name: o.obj.name.clone(),
            state: wire_state(o.status).into(),
            message: o.message.clone(),
            not_applied: o.not_applied,
        })
        .collect();
    // A successful sync leaves the inventory in the default namespace (moved there if it was
    // elsewhere); kas tells a restarted agent, should the namespace change while it is down.
    // A superseded sync wrote it too: only its wait for Current was cut.
    let wrote_inventory = outcome.succeeded() || outcome.superseded();
    let inventory_namespace = if wrote_inventory && !outcome.dry_run {
        settings.default_namespace.clone()
    } else {
        String::new()
    };
    SyncReport {
        project_id: settings.project_id.clone(),
        commit_id: outcome.commit_id.clone(),
        sync_outcome: if outcome.succeeded() {
            wire::SyncOutcome::Succeeded
        } else if outcome.superseded() {
            wire::SyncOutcome::Superseded
        } else {
            wire::SyncOutcome::Failed
        }
        .into(),
        error: outcome
            .error
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        objects,
        finished_at,
        dry_run: outcome.dry_run,
        warnings: Vec::new(),
        resync_id: 0,
        in_progress: false,
        progress: None,
        inventory_namespace,
        // Set from the commit's header by the caller, which has it.
        chart_version: String::new(),
        // kas's own.
        decided_before: 0,
        earlier: Vec::new(),
    }
}

impl Worker {
    fn request(&self, last: &str, cluster: &Cluster) -> ObjectsRequest {
        let render = tether_protocol::render::render_request(&self.project, cluster);
        ObjectsRequest {
            project_id: self.settings.project_id.clone(),
            r#ref: self
                .project
                .git_ref
                .as_ref()
                .map(|r| tether_protocol::gitops::GitRef {
                    r#ref: Some(match r {
                        GitRef::Branch(b) => git_ref::Ref::Branch(b.clone()),
                        GitRef::Tag(t) => git_ref::Ref::Tag(t.clone()),
                        GitRef::Commit(c) => git_ref::Ref::Commit(c.clone()),
                    }),
                }),
            globs: if render.is_some() {
                Vec::new()
            } else {
                self.project.paths.iter().map(|p| p.glob.clone()).collect()
            },
            commit_id: last.to_string(),
            render,
        }
    }

    /// The cluster as a Helm chart of the project sees it: asked afresh at each stream, so a
    /// new CRD or an upgraded API server reaches the next rendering. A Helm project whose
    /// cluster cannot be read opens no stream (and is retried as one that failed): rendered
    /// without it, `.Capabilities.APIVersions.Has` checks would leave objects out, and the
    /// sync would prune them.
    async fn cluster(&self) -> Result<Cluster, tether_gitops_agent::SyncError> {
        if self.project.helm.is_none() {
            return Ok(Cluster::default());
        }
        let (kube_version, api_versions) = self.engine.syncer.cluster().await?;
        Ok(Cluster {
            kube_version,
            api_versions,
        })
    }

    async fn run(mut self, stop: CancellationToken) {
        let now = Instant::now();
        let mut stream = Stream {
            open: None,
            failures: 0,
            reconnect_at: now,
            lost: false,
            building: None,
            rotations: self.meta.token.changes(),
        };
        let mut sync = SyncState {
            schedule: Schedule::new(),
            running: None,
            started: now,
            refused: None,
            last: None,
            waiting: None,
        };
        let mut reports = Reports {
            last: None,
            pending: false,
            failures: 0,
            retry_at: now,
        };
        loop {
            self.open_stream(&mut stream, &mut reports, &sync, &stop)
                .await;
            self.start_due_sync(&mut sync, &mut reports, &stop).await;
            self.retry_report(&mut reports, &stop).await;
            self.publish(&sync);
            let watch = (&mut self.progress, &mut self.board_seen);
            match next_event(&mut stream, &mut sync, &reports, watch, &stop).await {
                Event::Message(m) => {
                    self.on_message(m, &mut stream, &mut sync, &mut reports, &stop)
                        .await;
                }
                Event::SyncDone(done) => {
                    self.on_sync_done(done, &mut sync, &mut reports, &stop)
                        .await;
                }
                Event::Progress => self.report_progress(&sync).await,
                Event::NewToken => {
                    tracing::debug!("The manifests stream reopens with the new agent token");
                    stream.open = None;
                    stream.reconnect_at = Instant::now();
                }
                Event::Timer => {}
                Event::Stop => {
                    stop_sync(sync.running.take()).await;
                    return;
                }
            }
        }
    }

    /// (Re)opens the objects stream when it is closed and its backoff has passed.
    async fn open_stream(
        &mut self,
        stream: &mut Stream,
        reports: &mut Reports,
        sync: &SyncState,
        stop: &CancellationToken,
    ) {
        if stream.open.is_some() || Instant::now() < stream.reconnect_at {
            return;
        }
        // While a newer commit stands refused, ask for the head afresh: kas then tells the
        // refusal again if it still stands, or sends the head's files if the branch went back
        // to the commit in force (which ends the refusal); saying "I have it" would hear
        // nothing in that case, and the refusal would be reported for good.
        let last = match &sync.refused {
            Some(_) => String::new(),
            None => sync
                .schedule
                .current()
                .map(|c| c.id.clone())
                .unwrap_or_default(),
        };
        let cluster = tokio::select! {
            c = self.cluster() => c,
            () = stop.cancelled() => return,
        };
        let opened = match cluster {
            Ok(cluster) => {
                stream.rotations.borrow_and_update();
                let req = with_token(&self.meta, self.request(&last, &cluster));
                tokio::select! {
                    r = self.client.get_objects_to_synchronize(req) => r,
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match opened {
            Ok(s) => {
                stream.open = Some(s.into_inner());
                stream.failures = 0;
                if std::mem::take(&mut stream.lost) && reports.last.is_some() {
                    reports.pending = true;
                    reports.retry_at = Instant::now();
                }
            }
            Err(status) => {
                stream.failures = stream.failures.saturating_add(1);
                stream.lost = true;
                if stream.failures == 1 {
                    let error = tether_tunnel_agent::status_text(&status);
                    tracing::warn!(code = ?status.code(), error, "Cannot get the manifests from kas; retrying");
                }
                stream.reconnect_at = Instant::now() + retry_delay(stream.failures);
            }
        }
    }

    /// Starts a sync of the newest commit when one is due, none runs and the entries this one
    /// `depends_on` are ready; while one is not, reports that it waits.
    async fn start_due_sync(
        &mut self,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        // A stopping worker starts nothing: its stop must take one sync's grace, not two.
        let running = sync.running.is_some();
        if stop.is_cancelled() || !sync.schedule.is_due(Instant::now(), running) {
            return;
        }
        let source = self.source();
        let due = sync.schedule.current().map(|c| c.id.clone());
        let blocker = depends::blocker(
            &self.project.depends_on,
            &self.board_seen.borrow_and_update(),
            due.as_deref().map(|commit| (source.as_str(), commit)),
        );
        if let Some(reason) = blocker {
            self.wait_for_dependencies(reason, sync, reports, stop)
                .await;
            return;
        }
        if sync.waiting.take().is_some() {
            tracing::info!("The entries this one depends on are ready; synchronizing");
            self.engine
                .metrics
                .set_waiting(&self.settings.project_id, false);
        }
        if !self.settings.lease.fresh() {
            // Woken from a pause longer than the renew deadline: the election has not run
            // yet, and another replica may lead by now with a newer commit applied.
            tracing::info!(
                "This replica's Lease was not renewed within the renew deadline (was the process paused?): waiting for the election before synchronizing"
            );
            tokio::select! {
                () = self.settings.lease.renewed() => {}
                () = stop.cancelled() => {}
            }
            return;
        }
        let Some((commit, resync_id)) = sync.schedule.take_due(Instant::now(), running) else {
            return;
        };
        let sync_stop = SyncStop::under(stop);
        let (syncer, settings, s, c) = (
            Arc::clone(&self.engine.syncer),
            self.settings.clone(),
            sync_stop.clone(),
            Arc::clone(&commit),
        );
        tracing::info!(agent_id = settings.agent_id, commit_id = %commit.id, resync_id, "Synchronizing objects");
        let task = tokio::spawn(
            async move { syncer.sync(&settings, &c.id, &c.files, &s).await }.in_current_span(),
        );
        sync.running = Some(Running {
            stop: sync_stop,
            task,
            commit,
            refused: sync.refused.clone(),
        });
        sync.started = Instant::now();
    }

    /// A sync is due but a dependency is not ready: nothing is applied (the objects of the
    /// last sync stay as they are), and kas is told why, once per reason, commit and
    /// `kas agent reconcile` request (which the report answers, so `--wait` ends with it).
    async fn wait_for_dependencies(
        &mut self,
        reason: String,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        let commit_id = sync
            .schedule
            .current()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let waiting = Waiting {
            reason,
            commit_id,
            resync_id: sync.schedule.answer_asked(),
        };
        if sync.waiting.as_ref() == Some(&waiting) {
            return;
        }
        tracing::info!(commit_id = %waiting.commit_id, reason = %waiting.reason, "Not synchronizing until the entries this one depends on are ready");
        let report = SyncReport {
            project_id: self.settings.project_id.clone(),
            commit_id: waiting.commit_id.clone(),
            sync_outcome: wire::SyncOutcome::Waiting.into(),
            error: waiting.reason.clone(),
            finished_at: self.engine.kas_clock.now_secs(),
            dry_run: self.settings.dry_run != tether_agent_config::DryRunStrategy::None,
            resync_id: waiting.resync_id,
            ..SyncReport::default()
        };
        sync.waiting = Some(waiting);
        self.engine
            .metrics
            .set_waiting(&self.settings.project_id, true);
        self.report(report, reports, stop).await;
    }

    /// The project and ref this worker follows, as [`depends::Readiness::ReadyAt`] compares
    /// them: entries with the same one get the same commits.
    fn source(&self) -> String {
        format!("{}@{:?}", self.project.id, self.project.git_ref)
    }

    /// Tells the entries that depend on this one how it stands (a no-op when unchanged, so
    /// that they are woken only by news).
    fn publish(&self, sync: &SyncState) {
        let now = depends::readiness(&depends::Facts {
            suspended: sync.schedule.is_suspended(),
            refused: sync
                .refused
                .as_ref()
                .map(|r| (r.commit_id.as_str(), r.message.as_str())),
            waiting: sync.waiting.as_ref().map(|w| w.reason.as_str()),
            newest: sync.schedule.current().map(|c| c.id.as_str()),
            last: sync.last.as_ref(),
            running: sync.running.is_some(),
            source: Some(&self.source()),
        });
        self.board.send_if_modified(|b| {
            if b.get(&self.identity) == Some(&now) {
                return false;
            }
            b.insert(self.identity.clone(), now);
            true
        });
    }

    async fn on_message(
        &mut self,
        msg: Result<Option<ObjectsResponse>, tonic::Status>,
        stream: &mut Stream,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                stream.open = None;
                stream.lost = true;
                stream.reconnect_at = Instant::now() + Duration::from_secs(1);
                return;
            }
            Err(status) => {
                let step = stream.failures.saturating_add(1);
                if tether_tunnel_agent::is_refusal(status.code()) {
                    stream.failures = step;
                    tracing::warn!(code = ?status.code(), error = status.message(), "The manifests stream ended; reconnecting");
                } else {
                    // The connection ended under the stream: every 2 h kas rotates it (its
                    // maximum age). Not counted as a failure, so a reopening that fails warns.
                    tracing::debug!(code = ?status.code(), error = status.message(), "The manifests stream ended; reconnecting");
                }
                stream.open = None;
                stream.lost = true;
                stream.building = None;
                stream.reconnect_at = Instant::now() + retry_delay(step);
                return;
            }
        };
        match resp.message {
            Some(objects_response::Message::Header(h))
                if let Some(message) = older_kas(&self.project, &h) =>
            {
                stream.building = None;
                self.refuse(h.commit_id, message.to_owned(), sync, reports, stop)
                    .await;
            }
            Some(objects_response::Message::Header(h)) => {
                self.engine.kas_clock.heard(h.kas_time_ms);
                self.inventory_seen_in(&h.inventory_namespace);
                stream.building = Some(Commit {
                    id: h.commit_id,
                    files: Vec::new(),
                    warnings: Vec::new(),
                    chart_version: h.chart_version,
                    progress_reports: h.progress_reports,
                });
            }
            Some(objects_response::Message::Object(o)) => {
                if let Some(b) = stream.building.as_mut() {
                    match b.files.last_mut() {
                        Some((path, data)) if *path == o.source => {
                            data.extend_from_slice(&o.data);
                        }
                        _ => b.files.push((o.source, o.data)),
                    }
                }
            }
            Some(objects_response::Message::Trailer(t)) => {
                if let Some(mut b) = stream.building.take() {
                    for warning in &t.warnings {
                        tracing::warn!(commit_id = %b.id, warning, "kas warns about this commit's manifests");
                    }
                    b.warnings = t.warnings;
                    // A new commit supersedes the sync in progress, and replaces any refused one.
                    supersede(sync.running.as_ref(), &b.id, None);
                    sync.refused = None;
                    // Held while suspended (kas holds commits then; this is for safety).
                    sync.schedule.commit(Arc::new(b), Instant::now());
                }
            }
            Some(objects_response::Message::Suspension(s)) => on_suspension(&s, sync).await,
            Some(objects_response::Message::Resync(r)) => {
                self.on_resync(r.id, sync, reports, stop).await;
            }
            Some(objects_response::Message::Error(e)) => {
                stream.building = None;
                self.refuse(e.commit_id, e.message, sync, reports, stop)
                    .await;
            }
            None => {}
        }
    }

    /// kas says where this project's last successful sync left its inventory. Somewhere else
    /// than the default namespace means the configuration moved the project while this agent
    /// was not running (or before its first sync in the new namespace): the next sync reads
    /// the inventory there, so what it lists is still pruned, and moves it.
    fn inventory_seen_in(&mut self, namespace: &str) {
        let s = &mut self.settings;
        if namespace.is_empty()
            || namespace == s.default_namespace
            || s.previous_namespace.as_deref() == Some(namespace)
        {
            return;
        }
        tracing::info!(project_id = %s.project_id, namespace, default_namespace = %s.default_namespace, "The project's inventory is in its former default namespace; the next synchronization moves it");
        s.previous_namespace = Some(namespace.to_owned());
    }

    /// Reports a commit that cannot be applied: nothing is applied or pruned. The last good
    /// commit is still re-applied on schedule, but until a newer commit arrives its reports
    /// say this one failed.
    async fn refuse(
        &mut self,
        commit_id: String,
        message: String,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        let refusal = Refusal {
            commit_id: commit_id.clone(),
            message: message.clone(),
        };
        if sync
            .refused
            .as_ref()
            .is_some_and(|r| r.same_commit(&refusal))
        {
            // Told again (agentk reconnected and asked for the head afresh): counted, logged
            // and recorded as an Event once, when it was first told.
            tracing::info!(commit_id = %commit_id, "kas says the newest commit is still refused");
        } else {
            tracing::error!(commit_id = %commit_id, error = %message, "Synchronization failed");
            self.event(Happened::Refused {
                commit: &commit_id,
                message: &message,
            });
            self.engine
                .metrics
                .record_refused(&self.settings.project_id);
        }
        sync.refused = Some(refusal);
        let report = SyncReport {
            project_id: self.settings.project_id.clone(),
            commit_id,
            sync_outcome: wire::SyncOutcome::Failed.into(),
            error: message,
            objects: Vec::new(),
            finished_at: self.engine.kas_clock.now_secs(),
            dry_run: false,
            warnings: Vec::new(),
            resync_id: sync.schedule.answer_asked(),
            in_progress: false,
            progress: None,
            inventory_namespace: String::new(),
            // Nothing of the refused commit was applied.
            chart_version: String::new(),
            // kas's own.
            decided_before: 0,
            earlier: Vec::new(),
        };
        self.report(report, reports, stop).await;
    }

    async fn on_sync_done(
        &mut self,
        done: Result<SyncOutcome, tokio::task::JoinError>,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        let Some(running) = sync.running.take() else {
            return;
        };
        let cancelled = running.stop.now.is_cancelled();
        let outcome = match done {
            Ok(outcome) if !cancelled => outcome,
            // Stopped by the sync itself, the Lease having lapsed (the worker is not
            // stopping): tried again, once the election renewed, as after a crash.
            Ok(_) if !stop.is_cancelled() => {
                sync.schedule
                    .crashed(Instant::now(), &self.timing, rand::random::<f64>());
                return;
            }
            Ok(_) => return,
            Err(e) => {
                // A panic in the sync: say so, and retry like any failure.
                tracing::error!(error = %e, "The synchronization task failed");
                sync.schedule
                    .crashed(Instant::now(), &self.timing, rand::random::<f64>());
                return;
            }
        };
        sync.last = Some(LastSync::of(&outcome));
        let refused = running.refusal(sync.refused.as_ref());
        self.log_outcome(&outcome, refused);
        self.event(if refused.is_some() {
            Happened::ReappliedWhileRefused(&outcome)
        } else {
            Happened::Synced(&outcome)
        });
        // In kas's time, as the report: alerts compare it with Prometheus's clock.
        let finished_at = self.engine.kas_clock.now_secs();
        // A superseded sync is neither: the newer one counts.
        let counted_ok = outcome.succeeded() && refused.is_none();
        #[allow(clippy::cast_precision_loss)]
        self.engine.metrics.record_as(
            &self.settings.project_id,
            &outcome,
            counted_ok,
            sync.started.elapsed(),
            finished_at as f64,
        );
        let mut report = report_of(&outcome, &self.settings, finished_at);
        // Scheduled by how the sync itself went: drift correction goes on while refused.
        report.resync_id = sync.schedule.finished(
            outcome.succeeded(),
            Instant::now(),
            (&self.timing, rand::random::<f64>()),
        );
        // kas's warnings about the commit first, then the sync's own (hooks, emptied variables).
        let commit = &running.commit;
        report.warnings = [&commit.warnings[..], &outcome.warnings[..]].concat();
        report.chart_version.clone_from(&commit.chart_version);
        if let Some(refused) = refused {
            report = refusal::carry(report, refused);
        }
        self.report(report, reports, stop).await;
    }

    /// kas asks for a sync now (`kas agent reconcile`): restart any sync in progress so the one
    /// reported has run entirely after the request.
    async fn on_resync(
        &mut self,
        id: u64,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        match sync.schedule.resync(id, Instant::now()) {
            ResyncStep::Seen | ResyncStep::Held => {}
            ResyncStep::SyncNow => {
                tracing::info!(resync_id = id, "kas asked for a synchronization now");
                // The one that answers runs entirely after the request; the one under way
                // finishes its writes first, and is reported (what it pruned included).
                let next = sync.schedule.current().map(|c| c.id.clone());
                supersede(
                    sync.running.as_ref(),
                    next.as_deref().unwrap_or_default(),
                    Some("kas agent reconcile"),
                );
            }
            ResyncStep::NoCommit => self.answer_without_commit(id, sync, reports, stop).await,
        }
    }

    /// A re-sync asked while there is no commit to synchronize. Without a commit the only
    /// report there can be is kas's refusal of one (unsigned, not renderable): it stays the
    /// answer, so `kas agent reconcile --wait` ends with its reason instead of waiting for a
    /// commit that may never come. With no report at all the commit is still on its way, and
    /// its sync answers the request.
    async fn answer_without_commit(
        &mut self,
        id: u64,
        sync: &mut SyncState,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        let Some(mut report) = reports.last.clone() else {
            tracing::info!(
                resync_id = id,
                "kas asked for a synchronization before any commit arrived; the first commit's synchronization answers it"
            );
            return;
        };
        tracing::warn!(resync_id = id, commit_id = %report.commit_id, error = %report.error, "kas asked for a synchronization, but there is no commit that can be applied");
        report.resync_id = sync.schedule.answer_asked();
        report.finished_at = self.engine.kas_clock.now_secs();
        self.report(report, reports, stop).await;
    }

    /// A Kubernetes Event on the project's inventory ConfigMap (written in the background).
    fn event(&self, happened: Happened<'_>) {
        let s = &self.settings;
        let inventory = inventory_name(s.agent_id, &s.project_id);
        self.engine
            .events
            .record(&s.default_namespace, &inventory, happened);
    }

    /// Tells kas how far the running sync got; best effort (the outcome is what counts and is
    /// retried), bounded so a slow kas does not hold the worker.
    async fn report_progress(&mut self, sync: &SyncState) {
        let p = self.progress.borrow_and_update().clone();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let report = SyncReport {
            project_id: self.settings.project_id.clone(),
            commit_id: sync
                .running
                .as_ref()
                .map(|r| r.commit.id.clone())
                .unwrap_or_default(),
            resync_id: sync.schedule.resync_running(),
            in_progress: true,
            progress: Some(wire::SyncProgress {
                objects: count(p.objects),
                current: count(p.current),
                failed: count(p.failed),
                pending: p.pending.map(|o| ObjectStatus {
                    group: o.obj.group,
                    kind: o.obj.kind,
                    namespace: o.obj.namespace.unwrap_or_default(),
                    name: o.obj.name,
                    state: wire_state(ObjectState::Live(o.status)).into(),
                    message: o.message,
                    not_applied: false,
                }),
            }),
            finished_at: self.engine.kas_clock.now_secs(),
            ..SyncReport::default()
        };
        let call = self.client.report_sync(with_token(&self.meta, report));
        if let Ok(Err(status)) = tokio::time::timeout(PROGRESS_TIMEOUT, call).await {
            tracing::debug!(
                error = status.message(),
                "kas did not take a progress report"
            );
        }
    }

    fn log_outcome(&self, o: &SyncOutcome, refused: Option<&Refusal>) {
        if let Some(r) = refused {
            tracing::warn!(commit_id = %o.commit_id, refused_commit_id = %r.commit_id, refusal = %r.message, "Re-applied the last good commit; the newest commit cannot be applied and is reported failed");
        }
        match &o.error {
            Some(e) if o.superseded() => {
                tracing::info!(agent_id = self.settings.agent_id, commit_id = %o.commit_id, objects = o.objects.len(), writes = o.writes, reason = %e, "Synchronization superseded")
            }
            None => {
                tracing::info!(agent_id = self.settings.agent_id, commit_id = %o.commit_id, objects = o.objects.len(), writes = o.writes, dry_run = o.dry_run, watched_statuses = o.watched_statuses, taken_over = o.taken_over, "Synchronization done")
            }
            Some(e) => {
                tracing::error!(agent_id = self.settings.agent_id, commit_id = %o.commit_id, error = %e, writes = o.writes, "Synchronization failed")
            }
        }
    }

    /// Records `report` as the last one and sends it.
    async fn report(
        &mut self,
        report: SyncReport,
        reports: &mut Reports,
        stop: &CancellationToken,
    ) {
        reports.last = Some(report);
        reports.pending = true;
        reports.failures = 0;
        reports.retry_at = Instant::now();
        self.retry_report(reports, stop).await;
    }

    /// Sends the last report if kas has not confirmed it yet and its retry time has come. A
    /// report kas did not take is kept and retried with backoff: `kas agent status` must not
    /// stay blank or stale because one call failed.
    async fn retry_report(&mut self, reports: &mut Reports, stop: &CancellationToken) {
        if !reports.pending || Instant::now() < reports.retry_at {
            return;
        }
        let Some(report) = reports.last.clone() else {
            reports.pending = false;
            return;
        };
        let call = tokio::time::timeout(
            REPORT_TIMEOUT,
            self.client.report_sync(with_token(&self.meta, report)),
        );
        let result = tokio::select! {
            r = call => r,
            () = stop.cancelled() => return,
        };
        let error = match result {
            Ok(Ok(_)) => {
                if reports.failures > 0 {
                    tracing::info!("The synchronization report reached kas");
                }
                reports.pending = false;
                reports.failures = 0;
                return;
            }
            Ok(Err(status)) => status.message().to_string(),
            Err(_) => format!("no answer within {REPORT_TIMEOUT:?}"),
        };
        reports.failures = reports.failures.saturating_add(1);
        if reports.failures == 1 {
            tracing::warn!(
                error,
                "Reporting the synchronization to kas failed; retrying"
            );
        }
        reports.retry_at = Instant::now() + retry_delay(reports.failures);
    }
}

/// kas suspended or resumed the project. Suspending stops the running sync and every later one
/// (drift correction included); resuming synchronizes the commit the worker has at once.
async fn on_suspension(s: &wire::Suspension, sync: &mut SyncState) {
    if !sync.schedule.suspend(s.suspended, Instant::now()) {
        return;
    }
    if s.suspended {
        tracing::warn!(reason = %s.reason, suspended_by = %s.suspended_by, "GitOps suspended by kas: nothing is applied, pruned or drift-corrected until it is resumed");
        stop_sync(sync.running.take()).await;
    } else {
        tracing::info!("GitOps resumed by kas: synchronizing now");
    }
}

/// Waits for the next thing the worker must act on.
async fn next_event(
    stream: &mut Stream,
    sync: &mut SyncState,
    reports: &Reports,
    (progress, board): (
        &mut watch::Receiver<SyncProgress>,
        &mut watch::Receiver<Board>,
    ),
    stop: &CancellationToken,
) -> Event {
    // Every sync's progress is reported to a kas that says it keeps progress reports apart
    // (`kas agent status` shows it); to an older one only a sync it asked for (`kas agent
    // reconcile --wait`): it would store a progress report as an outcome.
    let followed = sync
        .running
        .as_ref()
        .is_some_and(|r| r.commit.progress_reports || sync.schedule.resync_running() > 0);
    // Waiting for dependencies, the sync stays due: its time must not wake the worker again
    // and again; the board does, when a dependency's readiness changes.
    let waiting = sync.waiting.is_some();
    let wake_at = [
        sync.schedule.wake_at().filter(|_| !waiting),
        stream.open.is_none().then_some(stream.reconnect_at),
        reports.pending.then_some(reports.retry_at),
    ]
    .into_iter()
    .flatten()
    .min();
    let receiving_none = stream.open.is_some() && stream.building.is_none();
    let message = async {
        match stream.open.as_mut() {
            Some(s) => s.message().await,
            None => std::future::pending().await,
        }
    };
    let sync_done = async {
        match sync.running.as_mut() {
            Some(r) => (&mut r.task).await,
            None => std::future::pending().await,
        }
    };
    let timer = async {
        match wake_at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        m = message => Event::Message(m),
        d = sync_done => Event::SyncDone(d),
        () = timer => Event::Timer,
        changed = progress.changed(), if followed => match changed {
            Ok(()) => Event::Progress,
            Err(_) => Event::Timer,
        },
        // The worker holds a sender itself: the board cannot close under it.
        Ok(()) = board.changed(), if waiting => Event::Timer,
        // Not while a commit arrives: it would be sent again.
        Ok(()) = stream.rotations.changed(), if receiving_none => Event::NewToken,
        () = stop.cancelled() => Event::Stop,
    }
}

/// Why a commit's header shows kas did not render what the entry asks for (a kas older than
/// rendering, or than `helm.repository`), if it does: the commit is refused, not applied.
fn older_kas(project: &ManifestProject, h: &wire::Header) -> Option<&'static str> {
    let renders = project.kustomize.is_some() || project.helm.is_some();
    let from_repository = project
        .helm
        .as_ref()
        .is_some_and(|helm| helm.repository.is_some());
    if renders && !h.rendered {
        Some(
            "kas sent this commit without rendering it: it is older than Kustomize/Helm rendering; upgrade kas (nothing was applied)",
        )
    } else if from_repository && !h.chart_repository {
        Some(
            "kas sent this commit without rendering the chart of helm.repository: it is older than chart repositories (it would render a folder of the Git repository named as the chart); upgrade kas (nothing was applied)",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_superseded_by_a_re_sync_of_its_commit_says_so_not_a_newer_commit() {
        let c1 = "0123456789abcdef0123456789abcdef01234567";
        let c2 = "fedcba9876543210fedcba9876543210fedcba98";
        assert_eq!(
            due_wording(c1, c1, Some("kas agent reconcile")),
            "a re-sync of the same commit (kas agent reconcile)"
        );
        assert_eq!(
            due_wording(c1, c2, Some("kas agent reconcile")),
            "a sync of newer commit fedcba987654 (kas agent reconcile)"
        );
        assert_eq!(
            due_wording(c1, c2, None),
            "a sync of newer commit fedcba987654"
        );
    }

    #[test]
    fn a_commit_a_kas_older_than_the_entrys_rendering_sent_is_refused() {
        let mut p = ManifestProject::new(tether_agent_config::ProjectRef::Path("g/m".into()));
        p.helm = Some(tether_agent_config::Helm {
            chart: "podinfo".into(),
            repository: Some("https://charts.example.com/stable".into()),
            version: None,
            release_name: "podinfo".into(),
            namespace: None,
            values_files: vec![],
            values: None,
            kube_version: None,
            api_versions: vec![],
            hooks: Default::default(),
            random: Default::default(),
            create_namespace: false,
        });
        let header = |rendered, chart_repository| wire::Header {
            rendered,
            chart_repository,
            ..wire::Header::default()
        };
        assert!(older_kas(&p, &header(false, false)).is_some());
        let older = older_kas(&p, &header(true, false)).unwrap_or_default();
        assert!(older.contains("helm.repository"), "{older}");
        assert_eq!(older_kas(&p, &header(true, true)), None);
        // A chart of the Git repository needs only a rendering kas.
        p.helm = p.helm.take().map(|h| tether_agent_config::Helm {
            repository: None,
            chart: "charts/app".into(),
            ..h
        });
        assert_eq!(older_kas(&p, &header(true, false)), None);
        p.helm = None;
        assert_eq!(older_kas(&p, &header(false, false)), None);
    }

    #[test]
    fn stream_and_report_retries_are_spread_by_jitter() {
        let backoff = stream_backoff();
        let base = backoff.delay(3, 0.5);
        let delays: Vec<Duration> = (0..100).map(|_| retry_delay(3)).collect();
        let (low, high) = (
            base.mul_f64(1.0 - backoff.jitter),
            base.mul_f64(1.0 + backoff.jitter),
        );
        assert!(
            delays.iter().all(|d| (low..=high).contains(d)),
            "outside {low:?}..={high:?}: {delays:?}"
        );
        // 100 uniform draws over ±20 % all within ±1 % of the middle: about 10^-70.
        let spread = base.mul_f64(0.01);
        assert!(
            delays.iter().any(|d| d.abs_diff(base) > spread),
            "no jitter: {delays:?}"
        );
    }
}
