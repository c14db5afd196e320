//! The last sync report of each (agent, manifest project), kept in the store so that
//! `kas agent status` shows them across kas restarts (and from any replica).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tether_notifications::Notifier;
use tether_protocol::gitops::{EarlierSync, ObjectState, SyncOutcome, SyncReport};
use tether_store::Store;

use tether_kas_api::{ReportedOutcome, ReportedStatus};

/// How a report that applied nothing says whose objects it shows.
const CARRIED: &str = tether_protocol::report::OBJECTS_AS_OF;

/// The agents' last sync reports, in the store; and how far the syncs running for `kas agent
/// reconcile --wait` got, in memory only (it is gone once their outcome arrives). A counter
/// bumped on every report or progress this kas receives wakes whoever follows them (the web
/// UI's live pages).
#[derive(Debug)]
pub struct SyncStates(
    Arc<dyn Store>,
    Mutex<HashMap<(i64, String), SyncReport>>,
    tokio::sync::watch::Sender<u64>,
    /// The GitOps streams open here, by (agent, entry): a sync's progress is dropped when the
    /// last stream of its entry ends (see [`SyncStates::stream_opened`]).
    Mutex<HashMap<(i64, String), usize>>,
    /// The newest outcome of each (agent, entry) that kas could not record (the store refused
    /// the write: read-only, disk full), until one is: agentk sends it again meanwhile, and
    /// without this the reason was only in kas's log while `kas agent reconcile --wait` timed
    /// out.
    Mutex<HashMap<(i64, String), Unrecorded>>,
    /// The GitOps work each agent makes this kas do, for telling which one loads it.
    AgentLoad,
);

/// Per agent: manifest selections sent (one per entry per commit or re-sync) and reports
/// stored. An agent with hundreds of entries committing every few seconds slowed the database
/// for every agent, and nothing said which one it was (E13).
#[derive(Debug, Default)]
struct AgentLoad {
    sent: Family<AgentLabel, Counter>,
    stored: Family<AgentLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent_id: i64,
}

/// An outcome the agent reported that kas could not record, and why.
#[derive(Debug, Clone)]
pub struct Unrecorded {
    pub report: SyncReport,
    /// The store's error.
    pub error: String,
}

impl SyncStates {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self(
            store,
            Mutex::default(),
            tokio::sync::watch::Sender::new(0),
            Mutex::default(),
            Mutex::default(),
            AgentLoad::default(),
        )
    }

    /// Registers the per-agent load counters.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "gitops_selections_sent",
            "Manifest selections sent to an agent (one per entry per commit or re-sync)",
            self.5.sent.clone(),
        );
        reg.register(
            "gitops_reports_stored",
            "Sync reports of an agent stored",
            self.5.stored.clone(),
        );
    }

    /// Counts a manifest selection sent to the agent.
    pub(crate) fn selection_sent(&self, agent_id: i64) {
        self.5.sent.get_or_create(&AgentLabel { agent_id }).inc();
    }

    fn unrecorded_map(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, String), Unrecorded>> {
        self.4
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The agent's outcomes kas could not record (the newest of each entry), by entry.
    pub fn unrecorded(&self, agent_id: i64) -> Vec<Unrecorded> {
        let mut out: Vec<Unrecorded> = self
            .unrecorded_map()
            .iter()
            .filter(|((agent, _), _)| *agent == agent_id)
            .map(|(_, u)| u.clone())
            .collect();
        out.sort_by(|a, b| a.report.project_id.cmp(&b.report.project_id));
        out
    }

    /// Counts a stream of `entry` open for `agent_id` until the guard drops. When the last
    /// one ends (agentk killed or disconnected, the entry removed from its configuration), a
    /// sync it reported progress of is over without an outcome to clear it: otherwise `kas
    /// agent status` said "synchronizing" for as long as kas ran. A reconnected agent opens
    /// its new stream before or after the old one is found gone; either way the new sync's
    /// progress is kept while any stream of the entry is open.
    pub(crate) fn stream_opened(self: &Arc<Self>, agent_id: i64, entry: &str) -> OpenStream {
        let key = (agent_id, entry.to_owned());
        *self.streams().entry(key.clone()).or_default() += 1;
        OpenStream {
            states: Arc::clone(self),
            key: Some(key),
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, String), usize>> {
        self.3
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stream_closed(&self, key: (i64, String)) {
        let mut streams = self.streams();
        let last = match streams.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if !last {
            return;
        }
        streams.remove(&key);
        // Taken while the stream count is held, so a stream opening now keeps what it reports.
        let dropped = self.running().remove(&key).is_some();
        drop(streams);
        if dropped {
            self.changed();
        }
    }

    /// Changes when this kas receives a report or progress of any agent.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.2.subscribe()
    }

    fn changed(&self) {
        self.2.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, String), SyncReport>> {
        self.1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a progress report (`in_progress`) until the sync's outcome arrives.
    pub(crate) fn put_progress(&self, agent_id: i64, report: SyncReport) {
        self.running()
            .insert((agent_id, report.project_id.clone()), report);
        self.changed();
    }

    /// Forgets the progress of a deleted agent's syncs (its streams were ended with its
    /// tokens, so no outcome will arrive to clear it).
    pub fn forget(&self, agent_id: i64) {
        let label = AgentLabel { agent_id };
        self.5.sent.remove(&label);
        self.5.stored.remove(&label);
        self.running().retain(|(agent, _), _| *agent != agent_id);
        self.unrecorded_map()
            .retain(|(agent, _), _| *agent != agent_id);
        self.changed();
    }

    /// The agents with syncs under way here, for finding deleted ones among them.
    pub fn agent_ids(&self) -> Vec<i64> {
        self.running().keys().map(|(agent, _)| *agent).collect()
    }

    /// The agent's syncs under way that reported progress, by project.
    pub fn progress(&self, agent_id: i64) -> Vec<SyncReport> {
        let mut out: Vec<SyncReport> = self
            .running()
            .iter()
            .filter(|((agent, _), _)| *agent == agent_id)
            .map(|(_, r)| r.clone())
            .collect();
        out.sort_by(|a, b| a.project_id.cmp(&b.project_id));
        out
    }

    /// The agent's reports, by project. A stored report that no longer decodes is skipped
    /// with a warning (the next sync replaces it).
    pub async fn for_agent(&self, agent_id: i64) -> Result<Vec<SyncReport>, tether_store::Error> {
        let mut out = Vec::new();
        for (project, bytes) in self.0.sync_reports(agent_id).await? {
            match decode_report(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(agent_id, project, error = %e, "Skipping an undecodable stored sync report");
                }
            }
        }
        Ok(out)
    }

    /// The newest `kas agent reconcile` the agent's stored report of `project_id` answers (0:
    /// none, or the store cannot say, so an unanswered one is still sent): a new stream does
    /// not ask again for one the agent answered before (it re-synced at every new leadership).
    pub(crate) async fn answered(&self, agent_id: i64, project_id: &str) -> u64 {
        match self.stored(agent_id, project_id).await {
            Ok(report) => report.map_or(0, |r| r.resync_id),
            Err(e) => {
                tracing::warn!(agent_id, project_id, error = %e, "Cannot read which reconcile the agent answered last; the newest one asked is sent again");
                0
            }
        }
    }

    /// The agent's stored report of `project_id`, if any (one that no longer decodes is none,
    /// with a warning: the next sync replaces it).
    async fn stored(
        &self,
        agent_id: i64,
        project_id: &str,
    ) -> Result<Option<SyncReport>, tether_store::Error> {
        let Some(bytes) = self.0.sync_report(agent_id, project_id).await? else {
            return Ok(None);
        };
        match decode_report(&bytes) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::warn!(agent_id, project = project_id, error = %e, "Skipping an undecodable stored sync report");
                Ok(None)
            }
        }
    }

    /// Where the agent's last successful sync of `project_id` left its inventory (empty when
    /// no report says, or the store cannot answer: the agent then looks only in the project's
    /// default namespace, as before).
    pub(crate) async fn inventory_namespace(&self, agent_id: i64, project_id: &str) -> String {
        match self.stored(agent_id, project_id).await {
            Ok(report) => report.map(|r| r.inventory_namespace).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(agent_id, project_id, error = %e, "Cannot read where the project's inventory is; the agent looks in its default namespace only");
                String::new()
            }
        }
    }

    /// Stores the report with the notifications it calls for, in one store write (so a store
    /// failure loses neither: the report is refused, and agentk sends it again); returns the
    /// one it replaces (the agent's previous report of that project), so callers can tell a
    /// new sync from one re-sent after a reconnect.
    /// A failure is kept for [`SyncStates::unrecorded`] until a report of the entry is stored.
    pub(crate) async fn put(
        &self,
        agent_id: i64,
        report: &SyncReport,
        notifier: &Notifier,
    ) -> Result<Option<SyncReport>, tether_store::Error> {
        let key = (agent_id, report.project_id.clone());
        let put = self.put_in_store(agent_id, report, notifier).await;
        match &put {
            Ok(_) => {
                self.5.stored.get_or_create(&AgentLabel { agent_id }).inc();
                self.unrecorded_map().remove(&key)
            }
            Err(e) => self.unrecorded_map().insert(
                key,
                Unrecorded {
                    report: report.clone(),
                    error: e.to_string(),
                },
            ),
        };
        self.changed();
        put
    }

    async fn put_in_store(
        &self,
        agent_id: i64,
        report: &SyncReport,
        notifier: &Notifier,
    ) -> Result<Option<SyncReport>, tether_store::Error> {
        let previous = self.stored(agent_id, &report.project_id).await?;
        let messages = notifier
            .sync_messages(agent_id, previous.as_ref(), report)
            .await?;
        let report = keep_applied_objects(previous.as_ref(), report);
        let bytes = report.encode_to_vec();
        let added = self
            .0
            .put_sync_report(agent_id, &report.project_id, &bytes, &messages)
            .await?;
        notifier.queued(added);
        self.running()
            .remove(&(agent_id, report.project_id.clone()));
        Ok(previous)
    }
}

/// What a report takes from the previous one. Where the inventory is, when it does not say.
/// And the objects, for a sync that failed before applying anything (a manifest that does
/// not decode, a selection error) or waits for its `depends_on`: it reports none, but the previous sync's are still in the
/// cluster, so they stay in the status, said to be from that commit.
fn keep_applied_objects(previous: Option<&SyncReport>, report: &SyncReport) -> SyncReport {
    let mut report = report.clone();
    // What the notifications of the next deciding report compare with (kas's own field: an
    // agent's value is not kept).
    let before = match previous.filter(|_| !tether_notifications::event::decides(&report)) {
        Some(p) if tether_notifications::event::decides(p) => p.sync_outcome(),
        Some(p) => p.decided_before(),
        None => SyncOutcome::Unspecified,
    };
    report.set_decided_before(before);
    if report.inventory_namespace.is_empty()
        && let Some(p) = previous
    {
        // Only a successful sync says; until the next one the inventory stays where it was.
        report
            .inventory_namespace
            .clone_from(&p.inventory_namespace);
    }
    report.earlier = earlier_than(previous, &report);
    let applied_nothing = matches!(
        report.sync_outcome(),
        SyncOutcome::Failed | SyncOutcome::Waiting
    );
    if !applied_nothing || !report.objects.is_empty() {
        return report;
    }
    if let Some(previous) = previous.filter(|p| !p.objects.is_empty()) {
        // After several failures in a row, still the commit they were applied at.
        let note = previous
            .warnings
            .iter()
            .find(|w| w.starts_with(CARRIED))
            .cloned()
            .unwrap_or_else(|| format!("{CARRIED} {}", previous.commit_id));
        // agentk says it itself of a refused commit's report: once is enough.
        report.warnings.retain(|w| !w.starts_with(CARRIED));
        report.warnings.push(note);
        report.objects = previous.objects.clone();
    }
    report
}

/// How long a replaced report is kept in short with the reports after it, and how many are.
const EARLIER_WINDOW_SECS: i64 = 600;
const EARLIER_KEPT: usize = 4;

/// The reports `report` replaces, in short, newest first: `previous` and those it kept, within
/// [`EARLIER_WINDOW_SECS`] of `report`. A report sent again (agentk re-sends its last one when
/// its stream reopens) replaces nothing new.
fn earlier_than(previous: Option<&SyncReport>, report: &SyncReport) -> Vec<EarlierSync> {
    let Some(previous) = previous else {
        return Vec::new();
    };
    let resent = (
        &previous.commit_id,
        previous.finished_at,
        previous.resync_id,
        previous.sync_outcome,
    ) == (
        &report.commit_id,
        report.finished_at,
        report.resync_id,
        report.sync_outcome,
    );
    let replaced = (!resent).then(|| in_short(previous));
    replaced
        .into_iter()
        .chain(previous.earlier.iter().cloned())
        .filter(|e| e.finished_at >= report.finished_at - EARLIER_WINDOW_SECS)
        .take(EARLIER_KEPT)
        .collect()
}

/// A report in short: its objects counted as `kas agent reconcile` counts them.
fn in_short(r: &SyncReport) -> EarlierSync {
    let mut e = EarlierSync {
        commit_id: r.commit_id.clone(),
        sync_outcome: r.sync_outcome,
        error: r.error.clone(),
        finished_at: r.finished_at,
        resync_id: r.resync_id,
        ..EarlierSync::default()
    };
    if r.warnings.iter().any(|w| w.starts_with(CARRIED)) {
        // An earlier commit's objects: this sync applied and pruned nothing.
        return e;
    }
    for o in &r.objects {
        match o.state() {
            ObjectState::Pruned => e.pruned += 1,
            ObjectState::PruneSkipped => e.left_in_place += 1,
            ObjectState::Current => e.current += 1,
            _ => {
                e.not_current += 1;
                e.not_applied += u32::from(o.not_applied);
            }
        }
    }
    e
}

/// The fields of a report stored before its outcome and statuses were enums; their tags are
/// `reserved` in gitops.proto, so [`SyncReport`] skips them.
#[derive(Clone, PartialEq, Message)]
struct LegacyReport {
    #[prost(string, tag = "3")]
    outcome: String,
    #[prost(message, repeated, tag = "5")]
    objects: Vec<LegacyObject>,
}

#[derive(Clone, PartialEq, Message)]
struct LegacyObject {
    #[prost(string, tag = "5")]
    status: String,
}

/// Decodes a stored report, reading the words of one stored before the enums (kas keeps an
/// agent's last report until its next sync, which may be long after an upgrade).
pub(crate) fn decode_report(bytes: &[u8]) -> Result<SyncReport, prost::DecodeError> {
    let mut report = SyncReport::decode(bytes)?;
    if report.sync_outcome() != SyncOutcome::Unspecified {
        return Ok(report);
    }
    let legacy = LegacyReport::decode(bytes)?;
    report.set_sync_outcome(ReportedOutcome::from_word(&legacy.outcome).into());
    for (o, old) in report.objects.iter_mut().zip(&legacy.objects) {
        if o.state() == ObjectState::Unspecified {
            o.set_state(ReportedStatus::from_word(&old.status).into());
        }
    }
    Ok(report)
}

/// A GitOps stream counted open (see [`SyncStates::stream_opened`]).
#[derive(Debug)]
pub(crate) struct OpenStream {
    states: Arc<SyncStates>,
    key: Option<(i64, String)>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.states.stream_closed(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn progress_and_reports_wake_their_followers() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> =
            Arc::new(tether_store::SqliteStore::open(&dir.path().join("kas.db")).await?);
        let agent = store.register_agent("group/project", "agent").await?.id;
        let states = SyncStates::new(store);
        let mut changes = states.changes();
        let report = SyncReport {
            project_id: "group/manifests".into(),
            commit_id: "c0ffee".into(),
            ..SyncReport::default()
        };
        states.put_progress(agent, report.clone());
        assert!(changes.has_changed()?, "progress");
        changes.borrow_and_update();
        states.put(agent, &report, &Notifier::disabled()).await?;
        assert!(changes.has_changed()?, "a report");
        Ok(())
    }

    /// A report keeps the ones it replaced in short (newest first, counted), within ten
    /// minutes and at most four; one sent again replaces nothing new.
    #[test]
    fn a_report_keeps_those_it_replaced_in_short() {
        let object = |state: ObjectState| {
            let mut o = tether_protocol::gitops::ObjectStatus::default();
            o.set_state(state);
            o
        };
        let sync = |commit: &str, finished_at: i64, resync_id: u64| {
            let mut r = SyncReport {
                project_id: "group/manifests".into(),
                commit_id: commit.into(),
                finished_at,
                resync_id,
                ..SyncReport::default()
            };
            r.set_sync_outcome(SyncOutcome::Succeeded);
            r
        };
        let mut pruning = sync("c2", 1_000, 0);
        pruning.objects = vec![
            object(ObjectState::Current),
            object(ObjectState::InProgress),
            object(ObjectState::Pruned),
            object(ObjectState::Pruned),
            object(ObjectState::PruneSkipped),
        ];
        let answer = keep_applied_objects(Some(&pruning), &sync("c2", 1_001, 7));
        let short = &answer.earlier;
        assert_eq!(short.len(), 1);
        assert_eq!((short[0].commit_id.as_str(), short[0].resync_id), ("c2", 0));
        assert_eq!(
            (short[0].current, short[0].not_current, short[0].pruned),
            (1, 1, 2)
        );
        assert_eq!(short[0].left_in_place, 1);
        let resent = keep_applied_objects(Some(&answer), &answer);
        assert_eq!(resent.earlier, answer.earlier, "a re-sent report");

        let mut last = answer;
        for t in 1_002..1_010 {
            last = keep_applied_objects(Some(&last), &sync("c3", t, 0));
        }
        assert_eq!(last.earlier.len(), 4, "at most four");
        assert_eq!(last.earlier[0].finished_at, 1_008, "newest first");
        let later = keep_applied_objects(Some(&last), &sync("c4", 1_609, 0));
        let kept: Vec<i64> = later.earlier.iter().map(|e| e.finished_at).collect();
        assert_eq!(kept, [1_009], "only those of the ten minutes before");
    }

    /// A failed report with no objects that already says whose objects it shows (agentk's
    /// report of a refused commit) says it once, as of the objects kas keeps.
    #[test]
    fn the_commit_the_objects_are_of_is_said_once() {
        let mut previous = SyncReport {
            project_id: "group/manifests".into(),
            commit_id: "c1".into(),
            objects: vec![tether_protocol::gitops::ObjectStatus::default()],
            ..SyncReport::default()
        };
        previous.set_sync_outcome(SyncOutcome::Succeeded);
        let mut refused = SyncReport {
            project_id: "group/manifests".into(),
            commit_id: "c3".into(),
            warnings: vec![format!("{CARRIED} c2")],
            ..SyncReport::default()
        };
        refused.set_sync_outcome(SyncOutcome::Failed);
        let stored = keep_applied_objects(Some(&previous), &refused);
        assert_eq!(stored.warnings, [format!("{CARRIED} c1")]);
        assert_eq!(stored.objects.len(), 1);
    }

    #[tokio::test]
    async fn a_forgotten_agent_has_no_progress() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> =
            Arc::new(tether_store::SqliteStore::open(&dir.path().join("kas.db")).await?);
        let states = SyncStates::new(store);
        let report = SyncReport {
            project_id: "group/manifests".into(),
            ..SyncReport::default()
        };
        states.put_progress(1, report.clone());
        states.put_progress(2, report.clone());
        states.forget(1);
        assert_eq!(states.progress(1), []);
        assert_eq!(states.progress(2), [report], "another agent's");
        Ok(())
    }

    #[tokio::test]
    async fn progress_goes_with_the_last_stream_of_its_entry()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> =
            Arc::new(tether_store::SqliteStore::open(&dir.path().join("kas.db")).await?);
        let states = Arc::new(SyncStates::new(store));
        let report = |entry: &str| SyncReport {
            project_id: entry.into(),
            ..SyncReport::default()
        };
        // A reconnect: the new stream opens before the old one is found gone.
        let old = states.stream_opened(1, "group/a");
        let new = states.stream_opened(1, "group/a");
        let _other = states.stream_opened(1, "group/b");
        states.put_progress(1, report("group/a"));
        states.put_progress(1, report("group/b"));
        drop(old);
        assert_eq!(
            states.progress(1).len(),
            2,
            "a stream of group/a is still open"
        );
        drop(new);
        assert_eq!(states.progress(1), [report("group/b")]);
        // Opened again later: counted from zero, and its own progress is kept.
        let again = states.stream_opened(1, "group/a");
        states.put_progress(1, report("group/a"));
        assert_eq!(states.progress(1).len(), 2);
        drop(again);
        assert_eq!(states.progress(1), [report("group/b")]);
        Ok(())
    }

    #[tokio::test]
    async fn where_the_inventory_is_stays_known_until_a_successful_sync_says_otherwise()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> =
            Arc::new(tether_store::SqliteStore::open(&dir.path().join("kas.db")).await?);
        let agent = store.register_agent("group/project", "agent").await?.id;
        let states = SyncStates::new(store);
        let (project, off) = ("group/manifests", Notifier::disabled());
        assert_eq!(states.inventory_namespace(agent, project).await, "");
        let report = |ns: &str, outcome: SyncOutcome| SyncReport {
            project_id: project.into(),
            commit_id: "c0ffee".into(),
            sync_outcome: outcome.into(),
            inventory_namespace: ns.into(),
            ..SyncReport::default()
        };
        states
            .put(agent, &report("apps", SyncOutcome::Succeeded), &off)
            .await?;
        assert_eq!(states.inventory_namespace(agent, project).await, "apps");
        // A failed sync does not say: the inventory is still where the last success left it.
        states
            .put(agent, &report("", SyncOutcome::Failed), &off)
            .await?;
        assert_eq!(states.inventory_namespace(agent, project).await, "apps");
        states
            .put(agent, &report("web", SyncOutcome::Succeeded), &off)
            .await?;
        assert_eq!(states.inventory_namespace(agent, project).await, "web");
        assert_eq!(states.inventory_namespace(agent, "group/other").await, "");
        Ok(())
    }

    /// An agent's report of a failed sync, stored while the outbox refuses writes (a database
    /// blip): the report used to be stored and its notifications lost, and agentk's re-send
    /// was then no news, so the forge's commit stayed `pending` and `sync_failed` never came.
    /// Now the report is refused with them; its retry, once the store works again, queues
    /// each once, and a further re-send (after a reconnect) queues nothing more.
    #[tokio::test]
    async fn a_report_whose_notifications_cannot_be_queued_is_refused_kept_as_unrecorded_and_its_retry_queues_them_once()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("kas.db");
        let store: Arc<dyn Store> = Arc::new(tether_store::SqliteStore::open(&db).await?);
        let agent = store.register_agent("group/project", "agent").await?.id;
        let (notifier, _dispatcher) = notifier(dir.path(), Arc::clone(&store))?;
        let states = SyncStates::new(Arc::clone(&store));
        let report = SyncReport {
            project_id: "group/manifests".into(),
            commit_id: "c0ffee".into(),
            sync_outcome: SyncOutcome::Failed.into(),
            error: "apply failed".into(),
            ..SyncReport::default()
        };

        outbox_away(&db, true).await?;
        let refused = states.put(agent, &report, &notifier).await;
        let stored = store.sync_reports(agent).await?;
        // Said to whoever asks (`kas agent reconcile --wait`, status), not only in the log.
        let unrecorded = states.unrecorded(agent);
        assert_eq!(unrecorded.len(), 1, "{unrecorded:?}");
        assert_eq!(unrecorded[0].report.commit_id, "c0ffee");
        let error = refused.as_ref().err().map(ToString::to_string);
        assert_eq!(Some(&unrecorded[0].error), error.as_ref());
        outbox_away(&db, false).await?;
        // agentk sends the report again until kas takes it, and once more after a reconnect.
        states.put(agent, &report, &notifier).await?;
        assert!(states.unrecorded(agent).is_empty(), "recorded since");
        states.put(agent, &report, &notifier).await?;

        let queued = store.claim_notifications(10, 60, 600).await?;
        let mut got: Vec<(&str, &str)> = queued
            .iter()
            .map(|n| (n.receiver.as_str(), n.dedup_key.as_str()))
            .collect();
        got.sort_unstable();
        let status = format!("status:{agent}:group/manifests:c0ffee:Failed");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "chat");
        assert_eq!(got[1], ("forge", status.as_str()));
        assert!(refused.is_err(), "not stored without its notifications");
        assert!(stored.is_empty(), "{stored:?}");
        Ok(())
    }

    /// A notifier with a chat receiver (transitions) and a GitLab one (commit statuses).
    fn notifier(
        dir: &std::path::Path,
        store: Arc<dyn Store>,
    ) -> Result<(Notifier, Option<tether_notifications::Dispatcher>), Box<dyn std::error::Error>>
    {
        use tether_notifications::config::{Kind, NotificationsConfig, ReceiverConfig};
        let token = dir.join("gitlab-token");
        std::fs::write(&token, "token")?;
        let receiver = |name: &str, kind: Kind, url: &str| ReceiverConfig {
            name: name.into(),
            kind,
            url: Some(url.into()),
            url_file: None,
            secret_file: None,
            token_file: kind.takes_statuses().then(|| token.clone()),
            ca_file: None,
            events: tether_notifications::event::TransitionKind::ALL.to_vec(),
        };
        let cfg = NotificationsConfig {
            receivers: vec![
                receiver("chat", Kind::Slack, "https://chat.example.com/hook"),
                receiver("forge", Kind::Gitlab, "https://gitlab.example.com"),
            ],
            ..NotificationsConfig::default()
        };
        Ok(tether_notifications::start(&cfg, store)?)
    }

    /// Renames the outbox away (`away`), so that every write to it fails as in an outage, or
    /// back; through a connection of its own, as an operator's would be.
    async fn outbox_away(db: &std::path::Path, away: bool) -> Result<(), sqlx::Error> {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db);
        let pool = sqlx::SqlitePool::connect_with(options).await?;
        let sql = if away {
            "ALTER TABLE notifications RENAME TO notifications_away"
        } else {
            "ALTER TABLE notifications_away RENAME TO notifications"
        };
        sqlx::query(sql).execute(&pool).await?;
        pool.close().await;
        Ok(())
    }
}
