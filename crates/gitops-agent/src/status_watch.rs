//! Watches the objects an apply left in progress, from the moment the first such answer arrives,
//! so their status is reported as the cluster changes it: a Deployment applied early in a
//! 5,000-object sync is reported Current when it becomes Current, not at the first poll after
//! the last object was applied. Polling stays as the fallback (a ServiceAccount without `watch`,
//! a resource version that is not a number, a watch that keeps failing).
//!
//! Each type and namespace with an object in progress gets one watch from resource version `0`
//! (the API server's current state of every object of the group, then each change). Events and
//! apply answers are ordered by resource version, so neither an event older than the write nor
//! a change that happened before the object was tracked is lost or misread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject, WatchEvent, WatchParams};
use kube::discovery::ApiResource;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::object_ref::ObjRef;
use crate::status::{ResourceStatus, Status, StatusView};
use crate::sync::{GroupKey, group_key};

/// The statuses a sync has seen so far (apply answers, watch events, polls), shared by the sync
/// and its watches. Each change is logged once, whoever saw it first.
#[derive(Clone, Default)]
pub(crate) struct Seen {
    inner: Arc<Mutex<SeenInner>>,
    changed: Arc<Notify>,
    /// Changes a watch told first (reported in the sync's summary: 0 means polling did it all).
    watched: Arc<AtomicUsize>,
}

#[derive(Default)]
struct SeenInner {
    statuses: HashMap<ObjRef, ResourceStatus>,
    /// Objects whose status changed since the waiter last took the changes: it reads those
    /// rather than every object each time it wakes.
    changes: Vec<ObjRef>,
}

impl Seen {
    /// Keeps `st` as `o`'s status; logs the status event and wakes the waiter when it changed.
    pub(crate) fn record(&self, o: &ObjRef, st: ResourceStatus) -> bool {
        self.record_as(o, st, tracing::Level::INFO)
    }

    /// [`Seen::record`] of the status an apply answer told: for an object not written
    /// (`wrote` false: already as the files say) its first status is logged at debug — every
    /// sync of an unchanged repository logged a line per object at info (a 300-object agent
    /// in a busy monorepo: ~64,000 lines an hour, E9); a change of it later in the sync is
    /// still logged at info.
    pub(crate) fn record_answer(&self, o: &ObjRef, st: ResourceStatus, wrote: bool) -> bool {
        let first = if wrote {
            tracing::Level::INFO
        } else {
            tracing::Level::DEBUG
        };
        self.record_as(o, st, first)
    }

    /// Records `st`; a first status is logged at `first`, a change at info.
    fn record_as(&self, o: &ObjRef, st: ResourceStatus, first: tracing::Level) -> bool {
        let level = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            match inner.statuses.insert(o.clone(), st.clone()) {
                Some(before) if before == st => None,
                before => {
                    inner.changes.push(o.clone());
                    Some(if before.is_some() {
                        tracing::Level::INFO
                    } else {
                        first
                    })
                }
            }
        };
        let Some(level) = level else {
            return false;
        };
        crate::sync::event_status(o, &st, level);
        self.changed.notify_one();
        true
    }

    /// [`Seen::record`] of a status a watch told.
    fn record_watched(&self, o: &ObjRef, st: ResourceStatus) {
        if self.record(o, st) {
            self.watched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many status changes a watch told first.
    pub(crate) fn watched(&self) -> usize {
        self.watched.load(Ordering::Relaxed)
    }

    /// The objects whose status changed since the last call, with their newest status.
    pub(crate) fn take_changes(&self) -> Vec<(ObjRef, ResourceStatus)> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = std::mem::take(&mut inner.changes);
        changes
            .into_iter()
            .filter_map(|o| {
                let st = inner.statuses.get(&o)?.clone();
                Some((o, st))
            })
            .collect()
    }

    /// Resolves once a status changed since the last call (at once when one already did).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Current, Failed or gone: no watch needed.
pub(crate) fn settled(st: &ResourceStatus) -> bool {
    matches!(st.status, Status::Current | Status::Failed)
}

/// One type and namespace: the objects tracked (with the resource version of their write) and,
/// for the others, the newest status an event told, in case they are tracked later. Pure logic.
#[derive(Default)]
pub(crate) struct Group {
    tracked: HashMap<String, (u64, ObjRef)>,
    untracked: HashMap<String, (u64, ResourceStatus)>,
}

impl Group {
    /// An event about `name` at resource version `rv`: the status to report, when the object
    /// is tracked and the event is not older than our write.
    pub(crate) fn on_event(
        &mut self,
        name: &str,
        rv: u64,
        st: ResourceStatus,
    ) -> Option<(ObjRef, ResourceStatus)> {
        if let Some((applied, obj)) = self.tracked.get(name) {
            return (rv >= *applied).then(|| (obj.clone(), st));
        }
        match self.untracked.get(name) {
            Some((newer, _)) if *newer > rv => {}
            _ => {
                self.untracked.insert(name.to_owned(), (rv, st));
            }
        }
        None
    }

    /// Tracks `obj`, written at resource version `applied`: the status an earlier event already
    /// told, when that event is newer than the write.
    pub(crate) fn track(&mut self, obj: &ObjRef, applied: u64) -> Option<(ObjRef, ResourceStatus)> {
        self.tracked
            .insert(obj.name.clone(), (applied, obj.clone()));
        match self.untracked.remove(&obj.name) {
            Some((rv, st)) if rv > applied => Some((obj.clone(), st)),
            _ => None,
        }
    }
}

type SharedGroup = Arc<Mutex<Group>>;

/// The watches of one sync; dropping it stops them.
pub(crate) struct Watches {
    client: Client,
    seen: Seen,
    groups: HashMap<GroupKey, SharedGroup>,
    tasks: JoinSet<()>,
}

impl Watches {
    pub(crate) fn seen(&self) -> &Seen {
        &self.seen
    }

    pub(crate) fn new(client: Client, seen: Seen) -> Self {
        Watches {
            client,
            seen,
            groups: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Follows `obj` (of type `ar`, in `ns`), written at resource version `rv`, until the sync
    /// ends. An object whose resource version is not a number is left to polling.
    pub(crate) fn track(&mut self, obj: &ObjRef, ar: &ApiResource, ns: Option<&str>, rv: &str) {
        let Ok(applied) = rv.parse::<u64>() else {
            return;
        };
        let group = match self.groups.get(&group_key(ar, ns)) {
            Some(g) => g.clone(),
            None => {
                let g = SharedGroup::default();
                self.groups.insert(group_key(ar, ns), g.clone());
                let api: Api<DynamicObject> = match ns {
                    Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
                    None => Api::all_with(self.client.clone(), ar),
                };
                let url = api.resource_url().to_owned();
                // The sync's span (agent, project) goes with the task: its status events must
                // say which project they belong to, like the sync's own.
                let task = follow(self.client.clone(), url, g.clone(), self.seen.clone());
                self.tasks.spawn(task.instrument(tracing::Span::current()));
                g
            }
        };
        let told = group
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .track(obj, applied);
        if let Some((o, st)) = told {
            self.seen.record_watched(&o, st);
        }
    }
}

/// Watch failures in a row after which the group is left to polling.
const MAX_FAILURES: u32 = 3;

/// Watches one group (its resource `url`) until the sync drops it, reporting tracked objects'
/// statuses to `seen`. Re-watches from the last version seen when the API server ends the
/// watch, from `0` when that version expired. Events are read as [`StatusView`]s: a
/// Deployment's event is mostly fields the status rules never read.
async fn follow(client: Client, url: String, group: SharedGroup, seen: Seen) {
    let mut version = "0".to_owned();
    let mut failures = 0;
    while failures < MAX_FAILURES {
        let stream = match watch(&client, &url, &version).await {
            Ok(s) => s,
            Err(e) => {
                // Forbidden (no `watch` verb) or unreachable: polling still reports status.
                tracing::debug!(error = %e, "Status watch failed; polling instead");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200) * failures).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        let mut events = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                    events = true;
                    on_object(&group, &seen, o, &mut version, false);
                }
                Ok(WatchEvent::Deleted(o)) => {
                    events = true;
                    on_object(&group, &seen, o, &mut version, true);
                }
                Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                Ok(WatchEvent::Error(e)) => {
                    if e.code == 410 {
                        version = "0".to_owned();
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        // A watch that ended before any event is a failure, so a server that keeps ending
        // watches at once is not asked again in a tight loop; one that carried events (and
        // ended at its timeout or with an expired version) is simply started again.
        failures = if events { 0 } else { failures + 1 };
        if failures > 0 {
            tokio::time::sleep(Duration::from_millis(200) * failures).await;
        }
    }
}

async fn watch(
    client: &Client,
    url: &str,
    version: &str,
) -> Result<
    impl futures_util::Stream<Item = kube::Result<WatchEvent<StatusView>>> + use<>,
    kube::Error,
> {
    let req = kube::core::Request::new(url)
        .watch(&WatchParams::default(), version)
        .map_err(kube::Error::BuildRequest)?;
    client.request_events::<StatusView>(req).await
}

/// One object of a watch event: its status goes to `seen` when it is tracked and the event is
/// not older than the write.
fn on_object(group: &SharedGroup, seen: &Seen, o: StatusView, version: &mut String, gone: bool) {
    let (Some(name), Some(rv)) = (o.metadata.name.clone(), &o.metadata.resource_version) else {
        return;
    };
    version.clone_from(rv);
    let Ok(rv) = rv.parse::<u64>() else {
        return;
    };
    let st = if gone {
        ResourceStatus::not_found()
    } else {
        o.status()
    };
    let told = group
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .on_event(&name, rv, st);
    if let Some((obj, st)) = told {
        seen.record_watched(&obj, st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn obj(name: &str) -> ObjRef {
        ObjRef {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: Some("ns".into()),
            name: name.into(),
        }
    }

    fn current() -> ResourceStatus {
        ResourceStatus::new(Status::Current, "available")
    }

    fn in_progress() -> ResourceStatus {
        ResourceStatus::new(Status::InProgress, "rolling out")
    }

    #[test]
    fn an_event_about_a_tracked_object_after_its_write_is_reported() {
        let mut g = Group::default();
        assert_eq!(g.track(&obj("a"), 10), None);
        assert_eq!(g.on_event("a", 12, current()), Some((obj("a"), current())));
    }

    #[test]
    fn an_event_older_than_the_write_is_not_reported() {
        let mut g = Group::default();
        g.track(&obj("a"), 10);
        assert_eq!(g.on_event("a", 9, current()), None);
    }

    #[test]
    fn a_change_seen_before_the_object_was_tracked_is_reported_when_tracked() {
        let mut g = Group::default();
        assert_eq!(g.on_event("a", 15, in_progress()), None);
        assert_eq!(g.on_event("a", 17, current()), None);
        // A stale repeat (the initial state of a re-watch) does not replace the newer status.
        assert_eq!(g.on_event("a", 15, in_progress()), None);
        assert_eq!(g.track(&obj("a"), 12), Some((obj("a"), current())));
    }

    #[test]
    fn a_change_older_than_the_write_is_dropped_when_tracked() {
        let mut g = Group::default();
        // The object as it was before this sync wrote it (Current at its old generation).
        g.on_event("a", 5, current());
        assert_eq!(g.track(&obj("a"), 12), None);
        assert_eq!(
            g.on_event("a", 13, in_progress()),
            Some((obj("a"), in_progress()))
        );
    }

    #[tokio::test]
    async fn seen_logs_and_wakes_only_on_a_change() {
        let seen = Seen::default();
        seen.record(&obj("a"), in_progress());
        seen.changed().await;
        seen.record(&obj("a"), in_progress());
        assert!(
            seen.changed().now_or_never().is_none(),
            "an unchanged status must not wake the waiter"
        );
        seen.record(&obj("a"), current());
        seen.changed().await;
        assert_eq!(
            seen.take_changes(),
            vec![(obj("a"), current()), (obj("a"), current())],
            "each change is listed with the newest status"
        );
        assert!(seen.take_changes().is_empty());
    }
}
