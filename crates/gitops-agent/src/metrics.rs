//! What users alert on about GitOps, as Prometheus metrics: how syncs end and how long they
//! take, when each manifest project last synced successfully, and its objects by status.
//!
//! Histograms carry only the outcome as a label (10,000 agents must not make 10,000 series per
//! bucket in a central Prometheus); the per-project series are counters and gauges, bounded by
//! the manifest projects of one agent's configuration.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::status::Status;
use crate::sync::{ObjectState, SyncOutcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectOutcomeLabel {
    project: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabel {
    project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectsLabel {
    project: String,
    status: &'static str,
}

/// Every status an object can be reported with, so a status that no object has any more reads
/// 0 instead of keeping its last value.
const STATUSES: [&str; 8] = [
    "InProgress",
    "Current",
    "Failed",
    "Terminating",
    "NotFound",
    "Unknown",
    "Pruned",
    "PruneSkipped",
];

/// The GitOps metrics of one agent; cheap to clone (the series are shared).
#[derive(Clone, Debug)]
pub struct SyncMetrics {
    syncs: Family<ProjectOutcomeLabel, Counter>,
    duration: Family<OutcomeLabel, Histogram>,
    last_success: Family<ProjectLabel, Gauge<f64, AtomicU64>>,
    objects: Family<ObjectsLabel, Gauge>,
    /// Objects whose fields changed by hand were taken over ([`crate::takeover`]).
    taken_over: Family<ProjectLabel, Counter>,
    /// 1 while an entry's due sync waits for its `depends_on` entries.
    waiting: Family<ProjectLabel, Gauge>,
    /// kas's clock minus this node's, as last heard with a commit (seconds).
    pub kas_clock_offset: Gauge<f64, AtomicU64>,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        Self {
            syncs: Family::default(),
            // 50 ms to ~27 min: a sync of a handful of objects up to a reconcile timeout.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 16))
            }),
            last_success: Family::default(),
            objects: Family::default(),
            taken_over: Family::default(),
            waiting: Family::default(),
            kas_clock_offset: Gauge::default(),
        }
    }
}

impl SyncMetrics {
    /// Registers the series (names get the registry's prefix, e.g. `agentk_`).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "kas_clock_offset_seconds",
            "kas's clock minus this node's, as last heard with a commit: sync times are reported in kas's time; past a minute agentk warns (check NTP)",
            self.kas_clock_offset.clone(),
        );
        reg.register(
            "gitops_syncs",
            "Synchronizations of manifest projects, by outcome",
            self.syncs.clone(),
        );
        reg.register(
            "gitops_sync_duration_seconds",
            "How long synchronizations took, by outcome",
            self.duration.clone(),
        );
        reg.register(
            "gitops_last_successful_sync_timestamp_seconds",
            "When each manifest project last synchronized successfully (Unix seconds)",
            self.last_success.clone(),
        );
        reg.register(
            "gitops_objects",
            "Objects of each manifest project at its last synchronization, by status",
            self.objects.clone(),
        );
        reg.register(
            "gitops_drift_taken_over",
            "Objects whose fields changed by hand (owned by drift managers) agentk took over so that its apply reverted them",
            self.taken_over.clone(),
        );
        reg.register(
            "gitops_waiting_for_dependencies",
            "1 while a manifest project's due synchronization waits for the entries it depends on (depends_on), 0 otherwise",
            self.waiting.clone(),
        );
    }

    /// Whether `project`'s due sync waits for its dependencies: nothing is applied meanwhile,
    /// which no sync counter shows (a wait is no sync, and no failure).
    pub fn set_waiting(&self, project: &str, waiting: bool) {
        self.waiting
            .get_or_create(&ProjectLabel {
                project: project.to_owned(),
            })
            .set(i64::from(waiting));
    }

    /// Records a finished synchronization of `project` that took `took`, ending at `now_unix`.
    pub fn record(&self, project: &str, outcome: &SyncOutcome, took: Duration, now_unix: f64) {
        self.record_as(project, outcome, outcome.succeeded(), took, now_unix);
    }

    /// [`Self::record`], counted as `succeeded` says rather than as the outcome does: a
    /// re-sync of the last good commit while a newer commit is refused counts as failed (the
    /// project is not at its newest commit), though its objects are counted as it saw them.
    pub fn record_as(
        &self,
        project: &str,
        outcome: &SyncOutcome,
        succeeded: bool,
        took: Duration,
        now_unix: f64,
    ) {
        // A superseded sync applied and pruned everything but was not waited for: neither a
        // success (its objects may never become Current) nor a failure worth an alert.
        let label = OutcomeLabel {
            outcome: match (succeeded, outcome.superseded()) {
                (true, _) => "succeeded",
                (false, true) => "superseded",
                (false, false) => "failed",
            },
        };
        self.syncs
            .get_or_create(&ProjectOutcomeLabel {
                project: project.to_owned(),
                outcome: label.outcome,
            })
            .inc();
        self.duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        // Created at 0 with the project's first sync, so that increase() sees the first one.
        self.taken_over
            .get_or_create(&ProjectLabel {
                project: project.to_owned(),
            })
            .inc_by(u64::try_from(outcome.taken_over).unwrap_or(u64::MAX));
        if succeeded {
            self.last_success
                .get_or_create(&ProjectLabel {
                    project: project.to_owned(),
                })
                .set(now_unix);
        }
        // A failure before anything was applied says nothing about the objects: keep the
        // counts of the last sync that had them.
        if outcome.objects.is_empty() && !outcome.succeeded() {
            return;
        }
        for status in STATUSES {
            let n = outcome
                .objects
                .iter()
                .filter(|o| state_word(o.status) == status)
                .count();
            self.objects
                .get_or_create(&ObjectsLabel {
                    project: project.to_owned(),
                    status,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

impl SyncMetrics {
    /// Counts a commit of `project` that could not be applied at all (kas refused it: a
    /// rendering or selection error, an unsigned commit) as a failed synchronization. No
    /// duration (nothing ran) and no object counts (nothing was applied).
    pub fn record_refused(&self, project: &str) {
        self.syncs
            .get_or_create(&ProjectOutcomeLabel {
                project: project.to_owned(),
                outcome: "failed",
            })
            .inc();
    }

    /// Drops `project`'s series: it left the configuration.
    pub fn forget(&self, project: &str) {
        for outcome in ["succeeded", "failed", "superseded"] {
            self.syncs.remove(&ProjectOutcomeLabel {
                project: project.to_owned(),
                outcome,
            });
        }
        self.taken_over.remove(&ProjectLabel {
            project: project.to_owned(),
        });
        self.forget_state(project);
    }

    /// Drops `project`'s gauges, keeping its counters: this replica stopped leading. Kept, its
    /// last-success time would age until a staleness alert fired for a project another
    /// replica syncs, and its object counts would stay frozen. The counters stay: a sync that
    /// failed as the API server went away (and with it the lease) was counted and dropped
    /// seconds later, before any scrape, so no alert could see an outage (E12).
    pub fn forget_state(&self, project: &str) {
        let project = project.to_owned();
        for status in STATUSES {
            self.objects.remove(&ObjectsLabel {
                project: project.clone(),
                status,
            });
        }
        self.waiting.remove(&ProjectLabel {
            project: project.clone(),
        });
        self.last_success.remove(&ProjectLabel { project });
    }
}

fn state_word(state: ObjectState) -> &'static str {
    match state {
        ObjectState::Live(s) => Status::as_str(s),
        ObjectState::Pruned => "Pruned",
        ObjectState::PruneSkipped => "PruneSkipped",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::object_ref::ObjRef;
    use crate::sync::{ObjectOutcome, SyncError};

    fn text(m: &SyncMetrics) -> String {
        let mut reg = Registry::with_prefix("agentk");
        m.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    fn object(name: &str, status: ObjectState) -> ObjectOutcome {
        ObjectOutcome {
            obj: ObjRef {
                group: String::new(),
                kind: "ConfigMap".into(),
                namespace: Some("ns".into()),
                name: name.into(),
            },
            status,
            message: String::new(),
            not_applied: false,
        }
    }

    fn outcome(error: Option<SyncError>, objects: Vec<ObjectOutcome>) -> SyncOutcome {
        SyncOutcome {
            commit_id: "c".into(),
            error,
            objects,
            writes: 0,
            dry_run: false,
            watched_statuses: 0,
            taken_over: 0,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn a_successful_sync_counts_its_objects_and_its_time() {
        let m = SyncMetrics::default();
        let ok = outcome(
            None,
            vec![
                object("a", ObjectState::Live(Status::Current)),
                object("b", ObjectState::Live(Status::Current)),
                object("c", ObjectState::Pruned),
            ],
        );
        m.record(
            "group/app",
            &ok,
            Duration::from_millis(300),
            1_700_000_000.0,
        );
        let t = text(&m);
        assert!(
            t.contains(r#"agentk_gitops_syncs_total{project="group/app",outcome="succeeded"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"agentk_gitops_sync_duration_seconds_count{outcome="succeeded"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"agentk_gitops_objects{project="group/app",status="Current"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"agentk_gitops_objects{project="group/app",status="Pruned"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"agentk_gitops_objects{project="group/app",status="Failed"} 0"#),
            "{t}"
        );
        assert!(
            t.contains(r#"agentk_gitops_last_successful_sync_timestamp_seconds{project="group/app"} 1700000000"#),
            "{t}"
        );
        assert!(
            !t.contains("duration_seconds_bucket{project"),
            "no project label on histograms"
        );
    }

    #[test]
    fn objects_taken_over_add_up_per_project() {
        let m = SyncMetrics::default();
        let mut ok = outcome(None, vec![object("a", ObjectState::Live(Status::Current))]);
        m.record("quiet", &ok, Duration::from_secs(1), 100.0);
        ok.taken_over = 2;
        m.record("edited", &ok, Duration::from_secs(1), 100.0);
        m.record("edited", &ok, Duration::from_secs(1), 200.0);
        assert_samples(
            &text(&m),
            &[
                r#"agentk_gitops_drift_taken_over_total{project="quiet"} 0"#,
                r#"agentk_gitops_drift_taken_over_total{project="edited"} 4"#,
            ],
        );
    }

    #[test]
    fn a_forgotten_project_has_no_series_and_the_others_keep_theirs() {
        let m = SyncMetrics::default();
        let ok = outcome(None, vec![object("a", ObjectState::Live(Status::Current))]);
        m.record("gone", &ok, Duration::from_secs(1), 100.0);
        m.record("kept", &ok, Duration::from_secs(1), 100.0);
        m.forget("gone");
        let t = text(&m);
        assert!(!t.contains(r#"project="gone""#), "{t}");
        assert!(
            t.contains(
                r#"agentk_gitops_last_successful_sync_timestamp_seconds{project="kept"} 100"#
            ),
            "{t}"
        );
    }

    #[test]
    fn a_project_no_longer_led_here_keeps_its_sync_counts_only() {
        let m = SyncMetrics::default();
        let failed = outcome(
            Some(SyncError::Discovery("API server gone".into())),
            vec![object("a", ObjectState::Live(Status::Current))],
        );
        m.record("led", &failed, Duration::from_secs(1), 100.0);
        m.forget_state("led");
        let t = text(&m);
        assert_samples(
            &t,
            &[r#"agentk_gitops_syncs_total{project="led",outcome="failed"} 1"#],
        );
        assert!(!t.contains(r#"agentk_gitops_objects{project="led""#), "{t}");
        assert!(
            !t.contains("last_successful_sync_timestamp_seconds{"),
            "{t}"
        );
    }

    /// Asserts that the exposition `t` has each of `samples` (name, labels and value).
    fn assert_samples(t: &str, samples: &[&str]) {
        for sample in samples {
            assert!(t.contains(sample), "{sample} in:\n{t}");
        }
    }

    #[test]
    fn a_failure_before_any_object_keeps_the_last_counts_and_the_last_success_time() {
        let m = SyncMetrics::default();
        let ok = outcome(None, vec![object("a", ObjectState::Live(Status::Current))]);
        m.record("p", &ok, Duration::from_secs(1), 100.0);
        let failed = outcome(Some(SyncError::Discovery("down".into())), Vec::new());
        m.record("p", &failed, Duration::from_secs(1), 200.0);
        assert_samples(
            &text(&m),
            &[
                r#"agentk_gitops_syncs_total{project="p",outcome="failed"} 1"#,
                r#"agentk_gitops_objects{project="p",status="Current"} 1"#,
                r#"agentk_gitops_last_successful_sync_timestamp_seconds{project="p"} 100"#,
            ],
        );
    }

    #[test]
    fn a_refused_commit_and_the_resyncs_of_the_last_good_one_count_as_failed() {
        let m = SyncMetrics::default();
        let ok = outcome(None, vec![object("a", ObjectState::Live(Status::Current))]);
        m.record("p", &ok, Duration::from_secs(1), 100.0);
        m.record_refused("p");
        // The drift re-sync of the last good commit went well, but the newest is refused: the
        // last success stays the one before the refusal.
        m.record_as("p", &ok, false, Duration::from_secs(1), 400.0);
        assert_samples(
            &text(&m),
            &[
                r#"agentk_gitops_syncs_total{project="p",outcome="failed"} 2"#,
                r#"agentk_gitops_syncs_total{project="p",outcome="succeeded"} 1"#,
                r#"agentk_gitops_last_successful_sync_timestamp_seconds{project="p"} 100"#,
                r#"agentk_gitops_objects{project="p",status="Current"} 1"#,
            ],
        );
    }
    #[test]
    fn a_wait_for_dependencies_shows_until_the_sync_starts_and_leaves_with_the_project() {
        let m = SyncMetrics::default();
        m.set_waiting("group/apps", true);
        let series = r#"agentk_gitops_waiting_for_dependencies{project="group/apps"}"#;
        assert!(text(&m).contains(&format!("{series} 1")), "{}", text(&m));
        m.set_waiting("group/apps", false);
        assert!(text(&m).contains(&format!("{series} 0")), "{}", text(&m));
        m.forget("group/apps");
        assert!(!text(&m).contains(series), "{}", text(&m));
    }
}
