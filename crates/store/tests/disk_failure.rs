//! What the store does when its filesystem stops taking writes: every write must either commit
//! or return an error, and the store must recover by itself once the filesystem does.
//!
//! These tests mount real tmpfs filesystems, so they need root (CAP_SYS_ADMIN). They fail, not
//! skip, when mounting is impossible: a green run must mean the behaviour was checked.

use std::fmt::Debug;

use tether_store::{Error, ProjectSource, SqliteStore, Store};
use tether_testenv::tmpfs::Tmpfs;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Records which of the expected failures did not happen, so one run reports all of them.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn expect_err<T: Debug>(&mut self, what: &str, result: Result<T, Error>) {
        if let Ok(value) = result {
            self.0.push(format!("{what} returned Ok({value:?})"));
        }
    }

    fn assert_none(self, when: &str) {
        assert!(
            self.0.is_empty(),
            "{when}, these writes reported success:\n{}",
            self.0.join("\n")
        );
    }
}

fn source(remote: &str) -> ProjectSource {
    ProjectSource {
        remote: Some(remote.to_owned()),
        ..ProjectSource::default()
    }
}

/// Far enough ahead that the user token cannot expire during the test.
const FAR_FUTURE: i64 = 4_000_000_000;

#[tokio::test]
async fn writes_fail_while_the_disk_is_full_and_work_again_once_it_is_not() -> TestResult {
    let fs = Tmpfs::mount(4096);
    let db = fs.path().join("kas.db");
    let store = SqliteStore::open(&db).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let (kept, kept_token) = store.create_token(agent.id, "kept").await?;
    let (revoked, revoked_token) = store.create_token(agent.id, "to revoke").await?;
    let (user, user_token) = store
        .create_user_token(agent.id, "alice", "[]", FAR_FUTURE)
        .await?;
    store
        .put_sync_report(agent.id, "manifests", b"before", &[])
        .await?;
    store.put_config_state(agent.id, b"before").await?;

    let filler = fs.fill();
    let mut failures = Failures::default();
    // Several times: the defect handed out the same id again and again.
    for i in 0..3 {
        let result = store.create_token(agent.id, &format!("full {i}")).await;
        failures.expect_err("create_token", result.map(|(info, _)| info));
    }
    let result = store
        .create_user_token(agent.id, "bob", "[]", FAR_FUTURE)
        .await;
    failures.expect_err("create_user_token", result.map(|(info, _)| info));
    failures.expect_err(
        "register_agent",
        store.register_agent("group/project", "second").await,
    );
    failures.expect_err("revoke_token", store.revoke_token(revoked.id).await);
    failures.expect_err("revoke_user_token", store.revoke_user_token(user.id).await);
    let remote = source("https://example.com/r.git");
    let result = store.set_project_source("group/project", &remote).await;
    failures.expect_err("set_project_source", result);
    let result = store
        .put_sync_report(agent.id, "manifests", b"while full", &[])
        .await;
    failures.expect_err("put_sync_report", result);
    let result = store.put_config_state(agent.id, b"while full").await;
    failures.expect_err("put_config_state", result);
    failures.assert_none("with the disk full");

    // Failed writes changed nothing, and reads keep working on a full disk.
    assert!(store.authenticate(kept_token.expose()).await?.is_some());
    assert!(
        store.token_active(revoked.id).await?,
        "a failed revoke took effect"
    );
    assert!(
        store
            .authenticate_user_token(user_token.expose())
            .await?
            .is_some()
    );
    let reports = store.sync_reports(agent.id).await?;
    assert_eq!(reports, [("manifests".to_owned(), b"before".to_vec())]);
    assert_eq!(
        store.config_state(agent.id).await?.as_deref(),
        Some(&b"before"[..])
    );

    std::fs::remove_file(&filler)?;
    // Ordinary refusals roll a transaction back; on every pooled connection (hence the count)
    // that must leave no transaction open, whatever the failed commits before did to it.
    for _ in 0..8 {
        let duplicate = store.register_agent("group/project", "agent").await;
        assert!(
            matches!(duplicate, Err(Error::AlreadyExists(_))),
            "{duplicate:?}"
        );
    }
    // More writes than the pool has connections, so each pooled connection is exercised after
    // the failures: one stuck in a transaction would make its writes vanish on close.
    let mut created = Vec::new();
    for i in 0..8 {
        created.push(store.create_token(agent.id, &format!("after {i}")).await?);
    }
    assert!(store.revoke_token(revoked.id).await?);
    assert!(store.revoke_user_token(user.id).await?);
    let second = store.register_agent("group/project", "second").await?;
    store
        .set_project_source("group/project", &source("https://example.com/r.git"))
        .await?;
    store
        .put_sync_report(agent.id, "manifests", b"after", &[])
        .await?;
    store.put_config_state(agent.id, b"after").await?;
    store.close().await;

    let store = SqliteStore::open(&db).await?;
    let mut expected: Vec<i64> = [kept.id, revoked.id].into();
    expected.extend(created.iter().map(|(info, _)| info.id));
    let listed: Vec<i64> = store
        .list_tokens(agent.id)
        .await?
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(
        listed, expected,
        "tokens after reopening (ids must not repeat)"
    );
    for (info, token) in &created {
        let auth = store.authenticate(token.expose()).await?;
        assert_eq!(auth.map(|a| a.token_id), Some(info.id), "token {}", info.id);
    }
    assert!(store.authenticate(kept_token.expose()).await?.is_some());
    assert!(
        store.authenticate(revoked_token.expose()).await?.is_none(),
        "revoked token"
    );
    assert!(
        !store.token_active(revoked.id).await?,
        "revoked token still active"
    );
    assert!(
        store
            .authenticate_user_token(user_token.expose())
            .await?
            .is_none()
    );
    assert_eq!(
        store.find_agent("group/project", "second").await?,
        Some(second)
    );
    let project = store.get_project_by_path("group/project").await?;
    assert_eq!(
        project.and_then(|p| p.remote).as_deref(),
        Some("https://example.com/r.git")
    );
    let reports = store.sync_reports(agent.id).await?;
    assert_eq!(reports, [("manifests".to_owned(), b"after".to_vec())]);
    assert_eq!(
        store.config_state(agent.id).await?.as_deref(),
        Some(&b"after"[..])
    );
    store.close().await;
    Ok(())
}

/// Linux refuses `mount -o remount,ro` (EBUSY) while any file on the filesystem is open for
/// writing, and an open store holds its database that way; so a filesystem cannot turn
/// read-only under a running store short of a kernel-forced remount after I/O errors. What can
/// happen is kas starting while its volume is read-only and the volume later becoming writable:
/// the store must then serve reads, refuse writes, and write again without being reopened.
#[tokio::test]
async fn a_store_opened_read_only_reads_and_writes_again_once_writable() -> TestResult {
    let fs = Tmpfs::mount(4096);
    let db = fs.path().join("kas.db");
    let store = SqliteStore::open(&db).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let (kept, kept_token) = store.create_token(agent.id, "kept").await?;
    let (revoked, revoked_token) = store.create_token(agent.id, "to revoke").await?;
    store.close().await;

    fs.remount("ro");
    let store = SqliteStore::open(&db).await?;
    assert!(store.authenticate(kept_token.expose()).await?.is_some());
    assert_eq!(store.list_tokens(agent.id).await?.len(), 2);
    let mut failures = Failures::default();
    let result = store.create_token(agent.id, "read-only").await;
    failures.expect_err("create_token", result.map(|(info, _)| info));
    failures.expect_err("revoke_token", store.revoke_token(revoked.id).await);
    failures.expect_err(
        "register_agent",
        store.register_agent("group/project", "second").await,
    );
    failures.assert_none("on a read-only filesystem");
    assert!(
        store.token_active(revoked.id).await?,
        "a failed revoke took effect"
    );

    fs.remount("rw");
    // As many writes as the pool has connections and more: every connection opened while the
    // filesystem was read-only must be replaced, not kept refusing writes.
    let mut created = Vec::new();
    for i in 0..8 {
        created.push(store.create_token(agent.id, &format!("after {i}")).await?);
    }
    assert!(store.revoke_token(revoked.id).await?);
    store.close().await;

    let store = SqliteStore::open(&db).await?;
    let mut expected: Vec<i64> = [kept.id, revoked.id].into();
    expected.extend(created.iter().map(|(info, _)| info.id));
    let listed: Vec<i64> = store
        .list_tokens(agent.id)
        .await?
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, expected);
    assert!(
        store.authenticate(revoked_token.expose()).await?.is_none(),
        "revoked token"
    );
    store.close().await;
    Ok(())
}
