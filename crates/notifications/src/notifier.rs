//! The producer side: kas's GitOps and configuration modules tell the [`Notifier`] what
//! happened; it turns that into messages for the receivers that take them and puts them in the
//! store's outbox (durable, deduplicated), then wakes the dispatcher.

use std::sync::Arc;

use prost::Message as _;
use tether_protocol::gitops::SyncReport;
use tether_store::{OutboxMessage, Store};
use tokio::sync::Notify;

use crate::event::{
    AgentInfo, CommitStatus, Message, State, Summary, Transition, TransitionKind, failed_objects,
    report_change,
};
use crate::render::Receiver;

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) receivers: Vec<Receiver>,
    pub(crate) wake: Notify,
    /// Notifications lost: a commit's or a configuration's, their records unreadable or the
    /// outbox refusing them. A sync report's are queued in the write that stores it, so they
    /// are never lost: the report fails with them, and agentk sends it again.
    pub(crate) lost: prometheus_client::metrics::counter::Counter,
}

/// Which entry of an agent's configuration a forge status is about: the manifest project's
/// path on the forge, and the entry's `name` when the project is listed more than once (each
/// named entry has a status of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub project: &'a str,
    pub name: Option<&'a str>,
}

impl<'a> Entry<'a> {
    /// The entry of a stream: the project's path and the entry key the agent uses
    /// (`project` or `project#name`).
    pub fn of(project: &'a str, key: &'a str) -> Self {
        Entry {
            project,
            name: crate::event::entry_name(key),
        }
    }

    /// Where the last commit sent is recorded: the path, `#name` for a named entry.
    fn key(&self) -> String {
        match self.name {
            Some(name) => format!("{}#{name}", self.project),
            None => self.project.to_owned(),
        }
    }

    fn status(
        &self,
        agent: AgentInfo,
        commit: &str,
        state: State,
        description: String,
    ) -> CommitStatus {
        CommitStatus {
            state,
            agent,
            project: self.project.to_owned(),
            entry: self.name.map(str::to_owned),
            commit: commit.to_owned(),
            description,
        }
    }
}

/// Cheap to clone; does nothing when no receiver is configured.
#[derive(Clone, Default)]
pub struct Notifier {
    pub(crate) shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let receivers = self.shared.as_ref().map_or(0, |s| s.receivers.len());
        f.debug_struct("Notifier")
            .field("receivers", &receivers)
            .finish()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

impl Notifier {
    /// A notifier that sends nothing (no `notifications.receivers`).
    pub fn disabled() -> Self {
        Self::default()
    }

    fn wants(&self, statuses: bool) -> Option<&Arc<Shared>> {
        let s = self.shared.as_ref()?;
        s.receivers
            .iter()
            .any(|r| r.kind.takes_statuses() == statuses)
            .then_some(s)
    }

    /// Queues `message` for every receiver that takes it.
    pub async fn send(&self, message: Message) {
        self.send_unless(message, &[]).await;
    }

    /// The outbox rows of `message`: one per receiver that takes it.
    fn rows(s: &Shared, message: &Message) -> Vec<OutboxMessage> {
        let payload = match serde_json::to_vec(message) {
            Ok(payload) => payload,
            Err(e) => {
                s.lost.inc();
                tracing::error!(error = %e, "Cannot encode a notification: it is lost");
                return Vec::new();
            }
        };
        let (key, order) = (message.dedup_key(), message.order_key());
        let receivers = s.receivers.iter().filter(|r| r.takes(message));
        receivers
            .map(|r| OutboxMessage {
                receiver: r.name.clone(),
                dedup_key: key.clone(),
                order_key: order.clone(),
                payload: payload.clone(),
            })
            .collect()
    }

    /// Queues `message` for every receiver that takes it and has no message with one of the
    /// `unless` keys (checked with the insert, in one store write).
    async fn send_unless(&self, message: Message, unless: &[&str]) {
        let Some(s) = &self.shared else { return };
        let mut queued = false;
        for m in Self::rows(s, &message) {
            let (store, order) = (&s.store, m.order_key.as_deref());
            let (receiver, key, payload) = (&m.receiver, &m.dedup_key, &m.payload);
            let added = if unless.is_empty() {
                store
                    .enqueue_notification(receiver, key, order, payload)
                    .await
            } else {
                store
                    .enqueue_notification_unless(receiver, key, order, payload, unless)
                    .await
            };
            match added {
                Ok(added) => queued |= added,
                Err(e) => {
                    s.lost.inc();
                    tracing::error!(receiver, key, error = %e, "Cannot queue a notification: it is lost");
                }
            }
        }
        self.queued(queued);
    }

    /// Wakes the dispatcher when messages were `added` to the outbox (by the caller's write,
    /// as [`Notifier::sync_messages`]' are).
    pub fn queued(&self, added: bool) {
        if let Some(s) = self.shared.as_ref().filter(|_| added) {
            s.wake.notify_one();
        }
    }

    /// The agent a notification is about; `None` for an agent the store no longer has
    /// (nothing to tell).
    async fn agent_record(
        s: &Shared,
        agent_id: i64,
    ) -> Result<Option<AgentInfo>, tether_store::Error> {
        let Some(agent) = s.store.get_agent(agent_id).await? else {
            return Ok(None);
        };
        let project = s.store.get_project(agent.project_id).await?;
        Ok(project.map(|p| AgentInfo {
            id: agent.id,
            name: agent.name,
            project: p.path,
        }))
    }

    /// [`Notifier::agent_record`] for a notification (`what`) whose event is acknowledged
    /// already (a commit sent, a configuration refused): when the store cannot be read the
    /// notification is lost, so it is logged at error and counted (`notifications_lost_total`),
    /// never dropped silently.
    async fn agent(&self, s: &Shared, agent_id: i64, what: &str) -> Option<AgentInfo> {
        Self::agent_record(s, agent_id).await.unwrap_or_else(|e| {
            s.lost.inc();
            tracing::error!(agent_id, notification = what, error = %e, "Cannot read the agent's records for a notification: it is lost");
            None
        })
    }

    /// The path of a manifest project named by path or numeric id (the id itself for a
    /// project the store no longer has), from a report's key: a named entry's (`project#name`)
    /// is of the project's repository too.
    async fn project_path(s: &Shared, key: &str) -> Result<String, tether_store::Error> {
        let (project, _) = key.split_once('#').unwrap_or((key, ""));
        let Ok(id) = project.parse::<i64>() else {
            return Ok(project.to_owned());
        };
        let found = s.store.get_project(id).await?;
        Ok(found.map_or_else(|| project.to_owned(), |p| p.path))
    }

    /// The messages an agent's sync report calls for; `previous` is its report of that project
    /// before this one. The caller queues them in the write that stores the report
    /// ([`Store::put_sync_report`]), then calls [`Notifier::queued`]. An error (the agent's
    /// records unreadable) is the caller's to fail the report with: agentk sends it again,
    /// and since the previous report is still the stored one, the same messages follow —
    /// once each, by their keys. A message made of a record read wrong would differ (another
    /// key), so there is no fallback here.
    pub async fn sync_messages(
        &self,
        agent_id: i64,
        previous: Option<&SyncReport>,
        report: &SyncReport,
    ) -> Result<Vec<OutboxMessage>, tether_store::Error> {
        let Some(s) = self.shared.as_deref() else {
            return Ok(Vec::new());
        };
        let change = report_change(previous, report);
        if change.transition.is_none() && change.status.is_none() {
            return Ok(Vec::new());
        }
        let Some(agent) = Self::agent_record(s, agent_id).await? else {
            return Ok(Vec::new());
        };
        let project = Self::project_path(s, &report.project_id).await?;
        let summary = Summary::of(report);
        let mut rows = Vec::new();
        if let Some(kind) = change.transition {
            // People are told which entry of a project listed more than once failed.
            let entry = match report.project_id.split_once('#') {
                Some((_, name)) => format!("{project}#{name}"),
                None => project.clone(),
            };
            let transition = Message::Transition(Transition {
                kind,
                agent: Some(agent.clone()),
                project: entry,
                commit: report.commit_id.clone(),
                message: report.error.clone(),
                summary: summary.clone(),
                failed_objects: failed_objects(report),
                at: report.finished_at,
            });
            rows.extend(Self::rows(s, &transition));
        }
        // A failure that names no commit (the entry's ref did not resolve) has no commit for
        // a forge to mark.
        if let Some(state) = change.status.filter(|_| !report.commit_id.is_empty()) {
            let description = match report.error.as_str() {
                "" => summary.describe(),
                error => format!("{}; {error}", summary.describe()),
            };
            let status = Message::Status(CommitStatus {
                state,
                agent,
                project,
                entry: crate::event::entry_name(&report.project_id).map(str::to_owned),
                commit: report.commit_id.clone(),
                description,
            });
            rows.extend(Self::rows(s, &status));
        }
        Ok(rows)
    }

    async fn status(
        &self,
        agent: AgentInfo,
        at: Entry<'_>,
        commit: &str,
        state: State,
        description: String,
    ) {
        self.send(Message::Status(at.status(
            agent,
            commit,
            state,
            description,
        )))
        .await;
    }

    /// A status kas infers while the agent may be reporting the commit (`pending`,
    /// `superseded`): not queued once the commit's outcome is. The caller's look at the
    /// agent's reports comes before; a report landing in between queues the outcome first,
    /// and this status, newer, would replace it on the forge for good.
    async fn status_unless_reported(
        &self,
        agent: AgentInfo,
        at: Entry<'_>,
        commit: &str,
        state: State,
        description: String,
    ) {
        let status = at.status(agent, commit, state, description);
        let outcomes = crate::event::outcome_keys(&status);
        let unless: Vec<&str> = outcomes.iter().map(String::as_str).collect();
        self.send_unless(Message::Status(status), &unless).await;
    }

    /// kas sent an agent a new commit of a manifest project: `pending` on the forges. The
    /// commit it replaces is the last one sent to the agent, as the store records it for every
    /// stream and replica (`replaces`, the commit the agent had from this stream, when the
    /// store has none or cannot say). Unless the agent reported that one, its sync was under
    /// way and agentk stops waiting for it once it has applied, reporting it superseded (or
    /// failed, which then replaces this status): it is marked superseded
    /// first (once: the outbox's key), so it does not stay `pending` for good. Known only to a
    /// stream, a commit sent before the agent's stream reconnected (agentk or kas restarted,
    /// another replica) stayed `pending`.
    pub async fn commit_offered(
        &self,
        agent_id: i64,
        at: Entry<'_>,
        commit: &str,
        replaces: Option<&str>,
    ) {
        let Some(s) = self.wants(true).cloned() else {
            return;
        };
        let Some(agent) = self.agent(&s, agent_id, "commit sent").await else {
            return;
        };
        let key = at.key();
        let recorded = match s.store.record_offered_commit(agent_id, &key, commit).await {
            Ok(before) => before,
            Err(e) => {
                tracing::warn!(agent_id, project = %key, commit_id = commit, error = %e, "Cannot record the commit sent to the agent; a commit it replaces may stay pending on forges");
                None
            }
        };
        let older = recorded.as_deref().or(replaces);
        if let Some(older) = older.filter(|c| !c.is_empty() && *c != commit)
            && !self.reported(&s, agent_id, at, older).await
        {
            let description = crate::event::superseded_by(commit);
            self.status_unless_reported(agent.clone(), at, older, State::Superseded, description)
                .await;
        }
        if self.reported(&s, agent_id, at, commit).await {
            return;
        }
        let description = "sent to the agent; applying".to_owned();
        self.status_unless_reported(agent, at, commit, State::Pending, description)
            .await;
    }

    /// Whether the agent's last report of the entry `at` is about `commit`. Its outcome went
    /// to the forges then; offered again (a stream reopened) once the outbox has deleted the
    /// first `pending`, a second one would stay on the commit for good, since a report of the
    /// same commit and outcome is no news. Unreadable reports count as none: within the
    /// retention the outbox's key still keeps that `pending` out.
    async fn reported(&self, s: &Shared, agent_id: i64, at: Entry<'_>, commit: &str) -> bool {
        let Ok(reports) = s.store.sync_reports(agent_id).await else {
            return false;
        };
        for (key, bytes) in reports {
            let Ok(report) = SyncReport::decode(bytes.as_slice()) else {
                continue;
            };
            if report.commit_id != commit || crate::event::entry_name(&key) != at.name {
                continue;
            }
            let path = Self::project_path(s, &key).await.unwrap_or(key);
            if path == at.project {
                return true;
            }
        }
        false
    }

    /// kas refused a manifest commit (its signature): nothing is applied.
    pub async fn commit_refused(&self, agent_id: i64, at: Entry<'_>, commit: &str, reason: &str) {
        let Some(s) = self.shared.clone() else { return };
        self.send(Message::Transition(Transition {
            kind: TransitionKind::CommitRefused,
            agent: None,
            project: at.project.to_owned(),
            commit: commit.to_owned(),
            message: reason.to_owned(),
            summary: Summary::default(),
            failed_objects: Vec::new(),
            at: unix_now(),
        }))
        .await;
        if self.wants(true).is_some()
            && let Some(agent) = self.agent(&s, agent_id, "commit refused").await
        {
            let description = format!("refused: {reason}");
            self.status(agent, at, commit, State::Failed, description)
                .await;
        }
    }

    /// kas refused an agent's configuration at `commit`; the last good one stays in force.
    pub async fn configuration_refused(&self, agent_id: i64, commit: &str, error: &str) {
        let Some(s) = self.wants(false).cloned() else {
            return;
        };
        let Some(agent) = self.agent(&s, agent_id, "configuration refused").await else {
            return;
        };
        let project = agent.project.clone();
        self.send(Message::Transition(Transition {
            kind: TransitionKind::ConfigurationRefused,
            agent: Some(agent),
            project,
            commit: commit.to_owned(),
            message: error.to_owned(),
            summary: Summary::default(),
            failed_objects: Vec::new(),
            at: unix_now(),
        }))
        .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tether_protocol::gitops::SyncOutcome;
    use tether_store::SqliteStore;

    use super::*;
    use crate::config::Kind;

    /// A notifier with one GitLab receiver, queuing into `store`.
    fn forge_notifier(store: &Arc<dyn Store>) -> Notifier {
        let forge = Receiver {
            name: "forge".into(),
            kind: Kind::Gitlab,
            url: "https://gitlab.example.com".into(),
            secret: None,
            token: Some("token".into()),
            events: Vec::new(),
        };
        Notifier {
            shared: Some(Arc::new(Shared {
                store: Arc::clone(store),
                receivers: vec![forge],
                wake: Notify::new(),
                lost: Default::default(),
            })),
        }
    }

    /// A store on a fresh file, an agent, and a notifier with one forge queuing into it.
    async fn forge_setup() -> (
        tempfile::TempDir,
        Arc<dyn Store>,
        tether_store::Agent,
        Notifier,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("kas.db")).await.unwrap());
        let agent = store.register_agent("group/config", "agent").await.unwrap();
        let notifier = forge_notifier(&store);
        (dir, store, agent, notifier)
    }

    /// Every message in the outbox as (key, payload), in the order queued (claiming would
    /// show only the newest status of each commit).
    async fn queued(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("kas.db"));
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let sql = "SELECT dedup_key, payload FROM notifications ORDER BY id";
        let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }

    /// The agent's report of a successful sync of `commit`.
    fn succeeded(project: &str, commit: &str) -> SyncReport {
        let mut report = SyncReport {
            project_id: project.into(),
            commit_id: commit.into(),
            finished_at: 1_700_000_000,
            ..SyncReport::default()
        };
        report.set_sync_outcome(SyncOutcome::Succeeded);
        report
    }

    async fn report(store: &Arc<dyn Store>, agent_id: i64, project: &str, commit: &str) {
        let bytes = succeeded(project, commit).encode_to_vec();
        store
            .put_sync_report(agent_id, project, &bytes, &[])
            .await
            .unwrap();
    }

    /// A fresh agentk's stream says it has no commit: the one an earlier stream (before agentk
    /// or kas restarted, or on another replica) sent and the agent never reported is
    /// superseded by the next commit all the same, as the store remembers it; a commit the
    /// agent reported keeps its outcome.
    #[tokio::test]
    async fn a_commit_sent_on_an_earlier_stream_is_superseded_by_the_next_one() {
        let (dir, store, agent, notifier) = forge_setup().await;
        let project = "group/manifests";

        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c1", Some(""))
            .await;
        // The next stream's agentk has nothing in force.
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c2", Some(""))
            .await;
        report(&store, agent.id, project, "c2").await;
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c3", Some(""))
            .await;

        let keys: Vec<String> = queued(dir.path())
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let key = |c: &str, s: &str| format!("status:{}:{project}:{c}:{s}", agent.id);
        let want = [
            key("c1", "Pending"),
            key("c1", "Superseded"),
            key("c2", "Pending"),
            key("c3", "Pending"),
        ];
        assert_eq!(keys, want);
    }

    /// A commit replaced before the agent reported it (agentk cancels its sync) is marked
    /// superseded, once, before the newer commit's `pending`; a replaced commit the agent
    /// reported keeps its outcome.
    #[tokio::test]
    async fn a_commit_replaced_before_its_report_is_superseded_once() {
        let (dir, store, agent, notifier) = forge_setup().await;
        let project = "group/manifests";

        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c1", Some(""))
            .await;
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c2", Some("c1"))
            .await;
        // Offered again on a reopened stream: nothing new.
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c2", Some("c1"))
            .await;
        report(&store, agent.id, project, "c2").await;
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c3", Some("c2"))
            .await;

        let queued = queued(dir.path()).await;
        let keys: Vec<&str> = queued.iter().map(|(k, _)| k.as_str()).collect();
        let key = |c: &str, s: &str| format!("status:{}:{project}:{c}:{s}", agent.id);
        let want = [
            key("c1", "Pending"),
            key("c1", "Superseded"),
            key("c2", "Pending"),
            key("c3", "Pending"),
        ];
        assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>());
        let superseded: Message = serde_json::from_slice(&queued[1].1).unwrap();
        let Message::Status(s) = superseded else {
            panic!("{superseded:?}")
        };
        assert_eq!(s.description, crate::event::superseded_by("c2"));
    }

    /// The agent's report of a commit can land while kas sends it the next one, between
    /// `commit_offered` finding no report of the replaced commit and its queuing `superseded`.
    /// Driven here by queuing the report's outcome without storing the report, which is what
    /// that look saw: the commit's status on the forge stays the outcome, not `superseded`.
    #[tokio::test]
    async fn a_report_landing_while_its_commit_is_replaced_keeps_its_outcome() {
        let (_dir, store, agent, notifier) = forge_setup().await;
        let project = "group/manifests";
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c1", Some(""))
            .await;
        let report = succeeded(project, "c1");
        let outcome = notifier.sync_messages(agent.id, None, &report).await;
        for m in outcome.unwrap() {
            let order = m.order_key.as_deref();
            let queue = store.enqueue_notification(&m.receiver, &m.dedup_key, order, &m.payload);
            queue.await.unwrap();
        }

        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c2", Some("c1"))
            .await;

        let claimed = store.claim_notifications(10, 60, 600).await.unwrap();
        let keys: Vec<&str> = claimed.iter().map(|n| n.dedup_key.as_str()).collect();
        let key = |c: &str, s: &str| format!("status:{}:{project}:{c}:{s}", agent.id);
        assert_eq!(keys, [key("c1", "Success"), key("c2", "Pending")]);
    }

    /// A reopened stream offers the agent its commit again, possibly after the outbox deleted
    /// that commit's first `pending` (past the retention): the agent already reported the
    /// commit, and its report of it again says nothing new, so a second `pending` would be the
    /// commit's status on the forge for good. A commit not reported yet still gets one.
    #[tokio::test]
    async fn a_commit_already_reported_is_not_made_pending_again() {
        let (_dir, store, agent, notifier) = forge_setup().await;
        let project = "group/manifests";
        report(&store, agent.id, project, "c1").await;

        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c1", None)
            .await;
        notifier
            .commit_offered(agent.id, Entry::of(project, project), "c2", None)
            .await;
        let queued = store.claim_notifications(10, 60, 600).await.unwrap();
        let keys: Vec<&str> = queued.iter().map(|n| n.dedup_key.as_str()).collect();
        let c2 = format!("status:{}:group/manifests:c2:Pending", agent.id);
        assert_eq!(keys, [c2.as_str()]);
    }

    /// A named entry's report (`project#name`) posts its commit status to the project's
    /// repository, and its failure names the entry.
    #[tokio::test]
    async fn a_named_entrys_report_is_of_its_projects_repository() {
        let (_dir, _store, agent, mut notifier) = forge_setup().await;
        if let Some(shared) = notifier.shared.as_mut().and_then(Arc::get_mut) {
            shared.receivers.push(Receiver {
                name: "chat".into(),
                kind: Kind::Slack,
                url: "https://chat.example.com/hook".into(),
                secret: None,
                token: None,
                events: crate::event::TransitionKind::ALL.to_vec(),
            });
        }
        let mut failed = succeeded("group/manifests#apps", "c1");
        failed.set_sync_outcome(SyncOutcome::Failed);
        let before = succeeded("group/manifests#apps", "c0");
        let messages = notifier
            .sync_messages(agent.id, Some(&before), &failed)
            .await;
        let keys: Vec<String> = messages.unwrap().into_iter().map(|m| m.dedup_key).collect();
        let status = format!("status:{}:group/manifests#apps:c1:Failed", agent.id);
        assert!(keys.contains(&status), "{keys:?}");
        let failure = format!(
            "sync_failed:{}:group/manifests#apps:c1:1700000000",
            agent.id
        );
        assert!(keys.contains(&failure), "{keys:?}");
    }

    /// Two named entries of one project sync the same commit: each gets a forge status (a
    /// context) of its own, `pending` when sent and then its own outcome, so `infra`'s success
    /// reported last does not hide `apps`' failure (they shared one context, the last report
    /// replacing the other on the forge).
    #[tokio::test]
    async fn named_entries_of_one_project_each_get_their_own_forge_status() {
        let (_dir, store, agent, notifier) = forge_setup().await;
        let project = "group/fleet";
        for key in ["group/fleet#apps", "group/fleet#infra"] {
            notifier
                .commit_offered(agent.id, Entry::of(project, key), "c1", Some(""))
                .await;
        }
        let mut apps = succeeded("group/fleet#apps", "c1");
        apps.set_sync_outcome(SyncOutcome::Failed);
        let infra = succeeded("group/fleet#infra", "c1");
        let mut outcomes = Vec::new();
        for report in [apps, infra] {
            outcomes.extend(
                notifier
                    .sync_messages(agent.id, None, &report)
                    .await
                    .unwrap(),
            );
        }
        for m in outcomes {
            let order = m.order_key.as_deref();
            let queue = store.enqueue_notification(&m.receiver, &m.dedup_key, order, &m.payload);
            queue.await.unwrap();
        }

        // The newest of each context is what is sent: both outcomes, neither replaced.
        let claimed = store.claim_notifications(10, 60, 600).await.unwrap();
        let mut keys: Vec<&str> = claimed.iter().map(|n| n.dedup_key.as_str()).collect();
        keys.sort_unstable();
        let key = |e: &str, s: &str| format!("status:{}:group/fleet#{e}:c1:{s}", agent.id);
        assert_eq!(keys, [key("apps", "Failed"), key("infra", "Success")]);
        let contexts: Vec<String> = claimed
            .iter()
            .map(
                |n| match serde_json::from_slice::<Message>(&n.payload).unwrap() {
                    Message::Status(s) => s.context(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        for entry in ["apps", "infra"] {
            let want = format!("tether/group/config:agent#{entry}");
            assert!(contexts.contains(&want), "{contexts:?}");
        }
    }

    /// A sync report whose agent's records cannot be read (the database failing while it is
    /// stored) is an error for the caller to refuse the report with, so that agentk sends it
    /// again: its notifications are not lost (it used to count them lost, the report stored
    /// without them).
    #[tokio::test]
    async fn a_sync_reports_messages_from_an_unreadable_store_are_an_error_not_a_loss() {
        let (dir, _store, agent, notifier) = forge_setup().await;
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("kas.db"));
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        // Reads of the agent fail from now on, as in an outage.
        sqlx::query("ALTER TABLE agents RENAME TO agents_away")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let mut failed = SyncReport {
            project_id: "group/manifests".into(),
            commit_id: "c1".into(),
            ..SyncReport::default()
        };
        failed.set_sync_outcome(SyncOutcome::Failed);
        let messages = notifier.sync_messages(agent.id, None, &failed).await;

        assert!(messages.is_err(), "{messages:?}");
        let lost = notifier.shared.as_ref().map(|s| s.lost.get());
        assert_eq!(lost, Some(0));
    }
}
