//! Sync reports in a real SQLite store: reports stored by a kas from before the outcome and the
//! statuses were enums still load, with their words.

use std::sync::Arc;

use prost::Message;
use tether_gitops_server::{ReportedOutcome, ReportedStatus, SyncStates};
use tether_protocol::gitops::{ObjectState, ObjectStatus, SyncOutcome, SyncReport};
use tether_store::{SqliteStore, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `SyncReport` as gitops.proto defined it before field 9 (`string outcome = 3`, objects with
/// `string status = 5`): what older kas versions stored.
#[derive(Clone, PartialEq, Message)]
struct OldSyncReport {
    #[prost(string, tag = "1")]
    project_id: String,
    #[prost(string, tag = "2")]
    commit_id: String,
    #[prost(string, tag = "3")]
    outcome: String,
    #[prost(string, tag = "4")]
    error: String,
    #[prost(message, repeated, tag = "5")]
    objects: Vec<OldObjectStatus>,
    #[prost(int64, tag = "6")]
    finished_at: i64,
}

#[derive(Clone, PartialEq, Message)]
struct OldObjectStatus {
    #[prost(string, tag = "2")]
    kind: String,
    #[prost(string, tag = "4")]
    name: String,
    #[prost(string, tag = "5")]
    status: String,
    #[prost(string, tag = "6")]
    message: String,
}

fn old_object(name: &str, status: &str) -> OldObjectStatus {
    OldObjectStatus {
        kind: "ConfigMap".into(),
        name: name.into(),
        status: status.into(),
        message: format!("{name} message"),
    }
}

async fn open_store(
    dir: &tempfile::TempDir,
) -> Result<(Arc<dyn Store>, i64), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("kas.db")).await?);
    let agent = store.register_agent("group/project", "agent").await?;
    Ok((store, agent.id))
}

/// A report with one object and neither outcome nor status set.
fn one_object_report() -> SyncReport {
    SyncReport {
        project_id: "group/manifests".into(),
        commit_id: "c0ffee".into(),
        objects: vec![ObjectStatus {
            name: "a".into(),
            ..ObjectStatus::default()
        }],
        ..SyncReport::default()
    }
}

#[tokio::test]
async fn a_report_stored_before_the_enums_loads_with_its_words() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (store, agent) = open_store(&dir).await?;
    let old = OldSyncReport {
        project_id: "group/manifests".into(),
        commit_id: "c0ffee".into(),
        outcome: "failed".into(),
        error: "1 resources failed".into(),
        objects: vec![
            old_object("a", "Current"),
            old_object("b", "Pruned"),
            old_object("c", "Failed"),
            old_object("d", "SomethingNew"),
        ],
        finished_at: 1_700_000_000,
    };
    store
        .put_sync_report(agent, &old.project_id, &old.encode_to_vec(), &[])
        .await?;

    let reports = SyncStates::new(Arc::clone(&store)).for_agent(agent).await?;
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.commit_id, "c0ffee");
    assert_eq!(r.error, "1 resources failed");
    assert_eq!(
        ReportedOutcome::from(r.sync_outcome()),
        ReportedOutcome::Failed
    );
    let statuses: Vec<(&str, ReportedStatus, &str)> = r
        .objects
        .iter()
        .map(|o| (o.name.as_str(), o.state().into(), o.message.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("a", ReportedStatus::Current, "a message"),
            ("b", ReportedStatus::Pruned, "b message"),
            ("c", ReportedStatus::Failed, "c message"),
            ("d", ReportedStatus::Unknown, "d message"),
        ]
    );
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn a_report_without_any_outcome_loads_as_unknown() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (store, agent) = open_store(&dir).await?;
    let bare = one_object_report();
    store
        .put_sync_report(agent, &bare.project_id, &bare.encode_to_vec(), &[])
        .await?;

    let reports = SyncStates::new(Arc::clone(&store)).for_agent(agent).await?;
    assert_eq!(reports.len(), 1);
    assert_eq!(
        ReportedOutcome::from(reports[0].sync_outcome()),
        ReportedOutcome::Unknown
    );
    assert_eq!(
        ReportedStatus::from(reports[0].objects[0].state()),
        ReportedStatus::Unknown
    );
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn a_typed_report_loads_as_stored() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (store, agent) = open_store(&dir).await?;
    let mut report = one_object_report();
    report.set_sync_outcome(SyncOutcome::Succeeded);
    report.objects[0].set_state(ObjectState::Pruned);
    store
        .put_sync_report(agent, &report.project_id, &report.encode_to_vec(), &[])
        .await?;

    let reports = SyncStates::new(Arc::clone(&store)).for_agent(agent).await?;
    assert_eq!(reports, [report]);
    store.close().await;
    Ok(())
}
