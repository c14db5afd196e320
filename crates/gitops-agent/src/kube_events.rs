//! Kubernetes Events about GitOps, so `kubectl get events` and `kubectl describe configmap
//! inventory-…` show what agentk did and why it failed, where cluster operators look first.
//!
//! Events are written on the project's inventory ConfigMap (in its default namespace): it exists
//! for every synced project and agentk may write there. One event per change of what is to be
//! said — a sync failing every minute with the same error gives one event, not one a minute.
//! Writing is best effort and off the sync path: a refused or failed write is logged (once per
//! reason) and never fails or delays a sync.
//!
//! [`plan`] is pure: what to say after a sync or a refusal, given what was said last.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::sync::{ObjectState, SyncOutcome};

/// The `source.component` / `reportingComponent` of every event.
pub const COMPONENT: &str = "tether-agentk";

/// Kubernetes keeps an event's message up to 1 kB readable in `kubectl describe`.
const MAX_MESSAGE: usize = 1024;

/// What happened to a project, as far as events go.
#[derive(Debug, Clone, Copy)]
pub enum Happened<'a> {
    /// A sync ran (applied, maybe pruned, maybe failed).
    Synced(&'a SyncOutcome),
    /// kas refused to send this commit's manifests (unsigned commit, rendering or selection
    /// error): nothing was applied or pruned.
    Refused { commit: &'a str, message: &'a str },
    /// The last good commit re-applied (drift correction) while kas refuses the newest one:
    /// its failures and prunes are said as for [`Happened::Synced`], but its success is no
    /// recovery — the newest commit still cannot be applied.
    ReappliedWhileRefused(&'a SyncOutcome),
}

/// Why an event is written; its `reason` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    SyncFailed,
    ManifestsRefused,
    Pruned,
    /// The first successful sync after a failure or refusal.
    SyncRecovered,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SyncFailed => "SyncFailed",
            Self::ManifestsRefused => "ManifestsRefused",
            Self::Pruned => "Pruned",
            Self::SyncRecovered => "SyncRecovered",
        }
    }

    fn is_warning(self) -> bool {
        matches!(self, Self::SyncFailed | Self::ManifestsRefused)
    }
}

/// One event to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub reason: Reason,
    pub message: String,
}

/// What to say about `happened`, given the last note written for the project (`None`: nothing
/// new to say).
pub fn plan(last: Option<&Note>, happened: Happened<'_>) -> Option<Note> {
    let note = match happened {
        Happened::Refused { commit, message } => Note {
            reason: Reason::ManifestsRefused,
            message: format!("commit {}: {message}", short(commit)),
        },
        Happened::Synced(o) => synced_note(last, o, true)?,
        Happened::ReappliedWhileRefused(o) => synced_note(last, o, false)?,
    };
    if last == Some(&note) {
        return None;
    }
    Some(Note {
        message: truncate(note.message),
        ..note
    })
}

fn synced_note(last: Option<&Note>, o: &SyncOutcome, may_recover: bool) -> Option<Note> {
    let commit = short(&o.commit_id);
    // Superseded is no failure (applied and pruned, not waited for): only what it pruned.
    if let Some(error) = o.error.as_ref().filter(|_| !o.superseded()) {
        let failed: Vec<String> = o
            .objects
            .iter()
            .filter(|x| x.status == ObjectState::Live(crate::Status::Failed))
            .map(|x| format!("{} {}: {}", x.obj.kind, qualified(&x.obj), x.message))
            .collect();
        let mut message = format!("commit {commit}: {error}");
        if !failed.is_empty() {
            message.push_str(&format!("; {}", failed.join("; ")));
        }
        return Some(Note {
            reason: Reason::SyncFailed,
            message,
        });
    }
    let pruned: Vec<String> = o
        .objects
        .iter()
        .filter(|x| x.status == ObjectState::Pruned)
        .map(|x| format!("{} {}", x.obj.kind, qualified(&x.obj)))
        .collect();
    if !pruned.is_empty() {
        return Some(Note {
            reason: Reason::Pruned,
            message: format!(
                "commit {commit}: pruned {}: {}",
                pruned.len(),
                pruned.join(", ")
            ),
        });
    }
    let recovering = may_recover && o.succeeded() && last.is_some_and(|n| n.reason.is_warning());
    recovering.then(|| Note {
        reason: Reason::SyncRecovered,
        message: format!("commit {commit}: synchronized, {} objects", o.objects.len()),
    })
}

pub(crate) fn qualified(o: &crate::ObjRef) -> String {
    match &o.namespace {
        Some(ns) => format!("{ns}/{}", o.name),
        None => o.name.clone(),
    }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// Writes the events of every project of one agentk; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    /// Who writes (`reportingInstance`): the pod name, or the agent id.
    instance: String,
    /// Per inventory (namespace, name): the last note written, and whether a failed write was
    /// already logged.
    last: Arc<Mutex<LastNotes>>,
}

/// Per inventory (namespace, name): the last note, and whether a failed write was logged.
type LastNotes = HashMap<(String, String), (Note, bool)>;

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(client: Client, instance: String) -> Self {
        Self {
            client,
            instance,
            last: Arc::default(),
        }
    }

    /// Records what happened to the project whose inventory is `namespace/inventory`; the
    /// write runs in the background.
    pub fn record(&self, namespace: &str, inventory: &str, happened: Happened<'_>) {
        let key = (namespace.to_owned(), inventory.to_owned());
        let note = {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            let Some(note) = plan(last.get(&key).map(|(n, _)| n), happened) else {
                return;
            };
            let logged = last.get(&key).is_some_and(|(_, l)| *l);
            last.insert(key.clone(), (note.clone(), logged));
            note
        };
        let this = self.clone();
        tokio::spawn(async move {
            let written = this.write(&key.0, &key.1, &note).await;
            this.after_write(&key, written);
        });
    }

    async fn write(&self, ns: &str, inventory: &str, note: &Note) -> Result<(), kube::Error> {
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        // `kubectl describe` selects events by the object's uid too; a refusal before the
        // first sync has no inventory yet, and its event still shows in `kubectl get events`.
        let uid = maps
            .get_opt(inventory)
            .await?
            .and_then(|cm| cm.metadata.uid);
        let events: Api<Event> = Api::namespaced(self.client.clone(), ns);
        events
            .create(
                &PostParams::default(),
                &self.event(ns, inventory, uid, note),
            )
            .await
            .map(|_| ())
    }

    fn event(&self, ns: &str, inventory: &str, uid: Option<String>, note: &Note) -> Event {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{inventory}.")),
                namespace: Some(ns.to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("ConfigMap".into()),
                namespace: Some(ns.to_owned()),
                name: Some(inventory.to_owned()),
                uid,
                ..ObjectReference::default()
            },
            reason: Some(note.reason.as_str().into()),
            message: Some(note.message.clone()),
            type_: Some(
                if note.reason.is_warning() {
                    "Warning"
                } else {
                    "Normal"
                }
                .into(),
            ),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: None,
            }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.instance.clone()),
            action: Some("Synchronize".into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        }
    }

    /// Logs a failed write once per inventory until a write succeeds again.
    fn after_write(&self, key: &(String, String), written: Result<(), kube::Error>) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let Some((_, logged)) = last.get_mut(key) else {
            return;
        };
        match written {
            Ok(()) => *logged = false,
            Err(e) if !*logged => {
                *logged = true;
                let line = event_failure_line(&e);
                tracing::warn!(namespace = %key.0, inventory = %key.1, error = %crate::sync::error_text(&e), "{line}");
            }
            Err(_) => {}
        }
    }
}

/// The warning for an Event that could not be written (pure): the RBAC hint only when the API
/// server refused it (403); an API server that does not answer is not the ServiceAccount's fault.
fn event_failure_line(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            "Cannot write a Kubernetes Event about the synchronization: forbidden (may its ServiceAccount create events there?); continuing without"
        }
        _ => "Cannot write a Kubernetes Event about the synchronization; continuing without",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sync::{ObjectOutcome, SyncError};
    use crate::{ObjRef, Status};

    /// The RBAC hint only for a refusal (E12: it was given for an API server not answering).
    #[test]
    fn an_event_write_failure_hints_at_rbac_only_when_forbidden() {
        let status = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                message: "m".into(),
                reason: "r".into(),
                ..kube::core::Status::default()
            }))
        };
        assert!(event_failure_line(&status(403)).contains("may its ServiceAccount create events"));
        assert!(!event_failure_line(&status(503)).contains("ServiceAccount"));
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let service = kube::Error::Service(Box::new(refused));
        assert!(!event_failure_line(&service).contains("ServiceAccount"));
        assert_eq!(
            crate::sync::error_text(&service),
            "ServiceError: Connection refused"
        );
    }

    fn object(name: &str, status: ObjectState, message: &str) -> ObjectOutcome {
        ObjectOutcome {
            obj: ObjRef {
                group: "apps".into(),
                kind: "Deployment".into(),
                namespace: Some("naww".into()),
                name: name.into(),
            },
            status,
            message: message.into(),
            not_applied: false,
        }
    }

    fn outcome(error: Option<SyncError>, objects: Vec<ObjectOutcome>) -> SyncOutcome {
        SyncOutcome {
            commit_id: "0123456789abcdef0123".into(),
            error,
            objects,
            writes: 0,
            dry_run: false,
            watched_statuses: 0,
            taken_over: 0,
            warnings: Vec::new(),
        }
    }

    fn failed() -> SyncOutcome {
        outcome(
            Some(SyncError::Discovery("1 resources failed".into())),
            vec![
                object("nginx", ObjectState::Live(Status::Failed), "forbidden"),
                object("ok", ObjectState::Live(Status::Current), ""),
            ],
        )
    }

    #[test]
    fn a_failed_sync_names_the_commit_and_each_failed_object() {
        let o = failed();
        let n = plan(None, Happened::Synced(&o)).unwrap();
        assert_eq!(n.reason, Reason::SyncFailed);
        assert!(
            n.message.starts_with("commit 0123456789ab: "),
            "{}",
            n.message
        );
        assert!(
            n.message.ends_with("; Deployment naww/nginx: forbidden"),
            "{}",
            n.message
        );
    }

    #[test]
    fn the_same_failure_again_says_nothing_new() {
        let o = failed();
        let first = plan(None, Happened::Synced(&o)).unwrap();
        assert_eq!(plan(Some(&first), Happened::Synced(&o)), None);
    }

    #[test]
    fn a_success_after_a_failure_is_a_recovery_and_then_silence() {
        let bad = failed();
        let first = plan(None, Happened::Synced(&bad)).unwrap();
        let ok = outcome(
            None,
            vec![object("a", ObjectState::Live(Status::Current), "")],
        );
        let recovered = plan(Some(&first), Happened::Synced(&ok)).unwrap();
        assert_eq!(recovered.reason, Reason::SyncRecovered);
        assert_eq!(plan(Some(&recovered), Happened::Synced(&ok)), None);
        let refused = plan(
            None,
            Happened::Refused {
                commit: "0ae7a100f556aaaa",
                message: "kustomize failed",
            },
        )
        .unwrap();
        assert_eq!(
            plan(Some(&refused), Happened::ReappliedWhileRefused(&ok)),
            None,
            "re-applying the last good commit is no recovery"
        );
        let recovered = plan(Some(&refused), Happened::Synced(&ok)).unwrap();
        assert_eq!(recovered.reason, Reason::SyncRecovered);
        assert_eq!(
            plan(None, Happened::Synced(&ok)),
            None,
            "a plain success is quiet"
        );
    }

    #[test]
    fn pruned_objects_are_listed() {
        let o = outcome(None, vec![object("old", ObjectState::Pruned, "")]);
        let n = plan(None, Happened::Synced(&o)).unwrap();
        assert_eq!(n.reason, Reason::Pruned);
        assert_eq!(
            n.message,
            "commit 0123456789ab: pruned 1: Deployment naww/old"
        );
    }

    #[test]
    fn a_refused_commit_is_a_warning_with_kas_words() {
        let h = Happened::Refused {
            commit: "abc",
            message: "not signed by a trusted key",
        };
        let n = plan(None, h).unwrap();
        assert_eq!(n.reason, Reason::ManifestsRefused);
        assert_eq!(n.message, "commit abc: not signed by a trusted key");
        assert!(n.reason.is_warning());
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(2000);
        let h = Happened::Refused {
            commit: "abc",
            message: &message,
        };
        let n = plan(None, h).unwrap();
        assert!(n.message.len() <= MAX_MESSAGE);
        assert!(n.message.ends_with("..."));
    }
}
