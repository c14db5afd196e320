//! Agent half of GitOps as agentk runs it: one worker per manifest project of the configuration
//! in force. A worker keeps the objects stream to kas open, collects each commit's files, and
//! synchronizes them; a new commit cancels the sync in progress. Failed syncs are retried with
//! backoff; successful ones are re-applied periodically to correct drift.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tether_agent_config::{GitRef, ManifestProject, ProjectRef};
use tether_gitops_agent::sync::{Settings, SyncOutcome, Syncer};
use tether_protocol::gitops::git_ops_client::GitOpsClient;
use tether_protocol::gitops::{
    ObjectStatus, ObjectsRequest, SyncReport, git_ref, objects_response,
};
use tether_protocol::metadata;
use tether_tunnel_agent::{AgentMeta, Backoff};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::configuration::Applied;

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

fn project_key(id: &ProjectRef) -> String {
    match id {
        ProjectRef::Path(p) => p.clone(),
        ProjectRef::Numeric(n) => n.to_string(),
    }
}

fn with_token<T>(meta: &AgentMeta, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(mut v) = MetadataValue::try_from(format!("Bearer {}", meta.token)) {
        v.set_sensitive(true);
        req.metadata_mut().insert(metadata::AUTHORIZATION, v);
    }
    req
}

/// Runs workers for the configuration in force until `shutdown`.
pub async fn run(
    channel: Channel,
    meta: AgentMeta,
    syncer: Arc<Syncer>,
    mut config: watch::Receiver<Option<Arc<Applied>>>,
    timing: Timing,
    shutdown: CancellationToken,
) {
    // project key → (its settings, the worker's stop token, its task)
    let mut workers: HashMap<String, (ManifestProject, CancellationToken, JoinHandle<()>)> =
        HashMap::new();
    loop {
        let applied = config.borrow_and_update().clone();
        if let Some(applied) = applied {
            let wanted: HashMap<String, ManifestProject> = applied
                .config
                .gitops
                .manifest_projects
                .iter()
                .map(|p| (project_key(&p.id), p.clone()))
                .collect();
            // Stop workers whose project left the configuration or whose settings changed.
            workers.retain(|key, (p, stop, _)| {
                let keep = wanted.get(key) == Some(p);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for (key, p) in wanted {
                if workers.contains_key(&key) {
                    continue;
                }
                tracing::info!(project_id = %key, "Starting synchronization worker");
                let stop = shutdown.child_token();
                let worker = Worker {
                    client: GitOpsClient::new(channel.clone())
                        .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE),
                    meta: meta.clone(),
                    syncer: Arc::clone(&syncer),
                    settings: Settings {
                        agent_id: applied.agent_id,
                        project_id: key.clone(),
                        default_namespace: p.default_namespace.clone(),
                        prune: p.prune,
                        prune_timeout: p.prune_timeout,
                        prune_propagation_policy: p.prune_propagation_policy,
                        inventory_policy: p.inventory_policy,
                        reconcile_timeout: p.reconcile_timeout,
                        dry_run: p.dry_run_strategy,
                    },
                    project: p.clone(),
                    timing: timing.clone(),
                };
                let task = tokio::spawn(
                    worker
                        .run(stop.clone())
                        .instrument(tracing::info_span!("worker", project_id = %key)),
                );
                workers.insert(key, (p, stop, task));
            }
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    for (_, (_, stop, task)) in workers {
        stop.cancel();
        let _ = task.await;
    }
}

struct Worker {
    client: GitOpsClient<Channel>,
    meta: AgentMeta,
    syncer: Arc<Syncer>,
    settings: Settings,
    project: ManifestProject,
    timing: Timing,
}

/// A commit's files, complete.
#[derive(Clone)]
struct Commit {
    id: String,
    files: Vec<(String, Vec<u8>)>,
}

impl Worker {
    fn request(&self, last: &str) -> ObjectsRequest {
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
            globs: self.project.paths.iter().map(|p| p.glob.clone()).collect(),
            commit_id: last.to_string(),
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            ..Backoff::default()
        };
        let mut stream_failures = 0u32;
        // The newest complete commit, and the sync state for it.
        let mut current: Option<Commit> = None;
        let mut sync: Option<(CancellationToken, JoinHandle<SyncOutcome>)> = None;
        let mut next_run: Option<tokio::time::Instant> = None;
        let mut sync_failures = 0u32;
        let mut stream: Option<tonic::Streaming<tether_protocol::gitops::ObjectsResponse>> = None;
        let mut reconnect_at = tokio::time::Instant::now();
        let mut building: Option<Commit> = None;
        loop {
            if stream.is_none() && tokio::time::Instant::now() >= reconnect_at {
                let last = current.as_ref().map(|c| c.id.clone()).unwrap_or_default();
                match self
                    .client
                    .get_objects_to_synchronize(with_token(&self.meta, self.request(&last)))
                    .await
                {
                    Ok(s) => {
                        stream = Some(s.into_inner());
                        stream_failures = 0;
                    }
                    Err(status) => {
                        stream_failures = stream_failures.saturating_add(1);
                        if stream_failures == 1 {
                            tracing::warn!(code = ?status.code(), error = status.message(), "Cannot get the manifests from kas; retrying");
                        }
                        reconnect_at =
                            tokio::time::Instant::now() + backoff.delay(stream_failures, 0.5);
                    }
                }
            }
            // Start a sync when one is due and none runs.
            if sync.is_none()
                && let Some(c) = &current
                && next_run.is_some_and(|t| tokio::time::Instant::now() >= t)
            {
                next_run = None;
                let token = stop.child_token();
                let (syncer, settings, commit, t) = (
                    Arc::clone(&self.syncer),
                    self.settings.clone(),
                    c.clone(),
                    token.clone(),
                );
                tracing::info!(agent_id = settings.agent_id, commit_id = %commit.id, "Synchronizing objects");
                let task = tokio::spawn(
                    async move { syncer.sync(&settings, &commit.id, &commit.files, &t).await }
                        .in_current_span(),
                );
                sync = Some((token, task));
            }
            let wake_at = [next_run, (stream.is_none()).then_some(reconnect_at)]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                msg = async { match stream.as_mut() { Some(s) => s.message().await, None => std::future::pending().await } } => {
                    match msg {
                        Ok(Some(resp)) => match resp.message {
                            Some(objects_response::Message::Header(h)) => {
                                building = Some(Commit { id: h.commit_id, files: Vec::new() });
                            }
                            Some(objects_response::Message::Object(o)) => {
                                if let Some(b) = building.as_mut() {
                                    match b.files.last_mut() {
                                        Some((path, data)) if *path == o.source => data.extend_from_slice(&o.data),
                                        _ => b.files.push((o.source, o.data)),
                                    }
                                }
                            }
                            Some(objects_response::Message::Trailer(_)) => {
                                if let Some(b) = building.take() {
                                    // A new commit cancels the sync in progress.
                                    if let Some((t, task)) = sync.take() {
                                        t.cancel();
                                        let _ = task.await;
                                    }
                                    current = Some(b);
                                    sync_failures = 0;
                                    next_run = Some(tokio::time::Instant::now());
                                }
                            }
                            Some(objects_response::Message::Error(e)) => {
                                building = None;
                                tracing::error!(commit_id = %e.commit_id, error = %e.message, "Synchronization failed");
                                self.report(&e.commit_id, "failed", &e.message, &[], false).await;
                            }
                            None => {}
                        },
                        Ok(None) => { stream = None; reconnect_at = tokio::time::Instant::now() + Duration::from_secs(1); }
                        Err(status) => {
                            stream_failures = stream_failures.saturating_add(1);
                            tracing::warn!(code = ?status.code(), error = status.message(), "The manifests stream ended; reconnecting");
                            stream = None;
                            building = None;
                            reconnect_at = tokio::time::Instant::now() + backoff.delay(stream_failures, 0.5);
                        }
                    }
                }
                done = async { match sync.as_mut() { Some((_, task)) => task.await, None => std::future::pending().await } } => {
                    let cancelled = sync.as_ref().is_some_and(|(t, _)| t.is_cancelled());
                    sync = None;
                    if let Ok(outcome) = done && !cancelled {
                        self.log_outcome(&outcome);
                        let objects: Vec<ObjectStatus> = outcome.objects.iter().map(|o| ObjectStatus {
                            group: o.obj.group.clone(),
                            kind: o.obj.kind.clone(),
                            namespace: o.obj.namespace.clone().unwrap_or_default(),
                            name: o.obj.name.clone(),
                            status: o.status.clone(),
                            message: o.message.clone(),
                        }).collect();
                        let outcome_word = if outcome.succeeded { "succeeded" } else { "failed" };
                        self.report(&outcome.commit_id, outcome_word, outcome.error.as_deref().unwrap_or(""), &objects, outcome.dry_run).await;
                        next_run = Some(if outcome.succeeded {
                            sync_failures = 0;
                            tokio::time::Instant::now() + self.timing.resync_interval
                        } else {
                            sync_failures = sync_failures.saturating_add(1);
                            tokio::time::Instant::now() + self.timing.retry.delay(sync_failures, 0.5)
                        });
                    }
                }
                () = async { match wake_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
                () = stop.cancelled() => {
                    if let Some((t, task)) = sync.take() {
                        t.cancel();
                        let _ = task.await;
                    }
                    return;
                }
            }
        }
    }

    fn log_outcome(&self, o: &SyncOutcome) {
        match &o.error {
            None => {
                tracing::info!(agent_id = self.settings.agent_id, commit_id = %o.commit_id, objects = o.objects.len(), writes = o.writes, dry_run = o.dry_run, "Synchronization done")
            }
            Some(e) => {
                tracing::error!(agent_id = self.settings.agent_id, commit_id = %o.commit_id, error = %e, writes = o.writes, "Synchronization failed")
            }
        }
    }

    async fn report(
        &mut self,
        commit: &str,
        outcome: &str,
        error: &str,
        objects: &[ObjectStatus],
        dry_run: bool,
    ) {
        let report = SyncReport {
            project_id: self.settings.project_id.clone(),
            commit_id: commit.to_string(),
            outcome: outcome.to_string(),
            error: error.to_string(),
            objects: objects.to_vec(),
            finished_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
                .unwrap_or(0),
            dry_run,
        };
        if let Err(e) = self
            .client
            .report_sync(with_token(&self.meta, report))
            .await
        {
            tracing::warn!(
                error = e.message(),
                "Reporting the synchronization to kas failed"
            );
        }
    }
}
