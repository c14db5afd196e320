//! What is particular to the PostgreSQL backend: a server that goes away, and moving an
//! installation from SQLite (`tether_store::copy`). Each test starts its own server.

use tether_store::copy;
use tether_store::{
    Error, PgStore, ProjectSource, SqliteStore, Store, SuspensionScope, WebSession,
};
use tether_testenv::postgres::Postgres;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test]
async fn an_unreachable_server_is_an_error_never_a_missing_record() -> TestResult {
    let server = Postgres::start()?;
    let store = PgStore::connect(&server.create_database("kas")?).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let (_, token) = store.create_token(agent.id, "t").await?;
    store.check().await?;

    server.stop()?;
    let got = store.get_agent(agent.id).await;
    assert!(matches!(got, Err(Error::Database(_))), "{got:?}");
    let got = store.authenticate(token.expose()).await;
    assert!(matches!(got, Err(Error::Database(_))), "{got:?}");
    let got = store.find_agent("group/project", "agent").await;
    assert!(matches!(got, Err(Error::Database(_))), "{got:?}");
    let got = store.register_agent("group/project", "other").await;
    assert!(matches!(got, Err(Error::Database(_))), "{got:?}");
    assert!(store.check().await.is_err());

    // The pool reconnects by itself once the server is back.
    server.restart()?;
    store.check().await?;
    assert_eq!(store.get_agent(agent.id).await?, Some(agent));
    assert!(store.authenticate(token.expose()).await?.is_some());
    Ok(())
}

#[tokio::test]
async fn copy_moves_every_record_and_refuses_a_non_empty_target() -> TestResult {
    let dir = tempfile::tempdir()?;
    let sqlite = SqliteStore::open(&dir.path().join("kas.db")).await?;
    let source = ProjectSource {
        remote: Some("https://example.test/group/project.git".into()),
        credentials_file: Some("/etc/kas/creds".into()),
        webhook_secret_file: None,
        ssh_key_file: Some("/etc/kas/deploy-key".into()),
        known_hosts_file: Some("/etc/kas/known_hosts".into()),
        verify_allowed_signers_file: Some("/etc/kas/allowed_signers".into()),
        verify_gpg_keyring_file: None,
    };
    sqlite.set_project_source("group/project", &source).await?;
    sqlite.ensure_project("group/empty").await?;
    let agent = sqlite.register_agent("group/project", "agent").await?;
    let other = sqlite.register_agent("other/project", "agent").await?;
    let (kept, token) = sqlite.create_token(agent.id, "kept").await?;
    let (revoked, revoked_token) = sqlite.create_token(agent.id, "revoked").await?;
    sqlite.revoke_token(revoked.id).await?;
    let (user, user_token) = sqlite
        .create_user_token(other.id, "alice", "[]", 4_000_000_000)
        .await?;
    sqlite
        .put_sync_report(agent.id, "a/manifests", &[0, 0xff], &[])
        .await?;
    sqlite.put_config_state(agent.id, b"state").await?;
    sqlite
        .enqueue_notification("ops", "sync:1", None, b"{}")
        .await?;
    let c1 = Some("status:1:a/manifests:c1");
    sqlite
        .enqueue_notification("forge", "c1:pending", c1, b"{}")
        .await?;
    sqlite
        .record_offered_commit(agent.id, "a/manifests", "c1")
        .await?;
    sqlite
        .suspend(agent.id, SuspensionScope::Agent, "incident", "alice")
        .await?;
    let session = WebSession {
        id_digest: "d1".into(),
        role: "admin".into(),
        subject: None,
        username: None,
        groups: "[]".into(),
        csrf: "c1".into(),
        admin_token: Some("f1".into()),
        expires_at: 4_000_000_000,
    };
    sqlite.create_web_session(&session, 10, 10).await?;
    // The newest agent and token, deleted: PostgreSQL must not give their ids again either.
    let deleted = sqlite.register_agent("group/project", "deleted").await?;
    let (deleted_token, _) = sqlite.create_token(deleted.id, "").await?;
    sqlite.delete_agent(deleted.id).await?;

    let server = Postgres::start()?;
    let pg = PgStore::connect(&server.create_database("kas")?).await?;
    let counts = copy::sqlite_to_postgres(&sqlite, &pg).await?;
    let counted: Vec<(&str, u64)> = counts.iter().map(|c| (c.table, c.rows)).collect();
    assert_eq!(
        counted,
        [
            ("projects", 3),
            ("agents", 2),
            ("agent_tokens", 2),
            ("user_tokens", 1),
            ("sync_reports", 1),
            ("config_states", 1),
            ("notifications", 2),
            ("web_sessions", 1),
            ("offered_commits", 1),
            ("gitops_suspensions", 1),
        ]
    );

    // Same records, same ids, same tokens.
    assert_eq!(pg.list_projects().await?, sqlite.list_projects().await?);
    assert_eq!(pg.list_agents().await?, sqlite.list_agents().await?);
    assert_eq!(
        pg.list_tokens(agent.id).await?,
        sqlite.list_tokens(agent.id).await?
    );
    let auth = pg
        .authenticate(token.expose())
        .await?
        .ok_or("token copied")?;
    assert_eq!((auth.agent_id, auth.token_id), (agent.id, kept.id));
    assert!(pg.authenticate(revoked_token.expose()).await?.is_none());
    let found = pg
        .authenticate_user_token(user_token.expose())
        .await?
        .ok_or("user token copied")?;
    assert_eq!(found.id, user.id);
    assert_eq!(
        pg.sync_reports(agent.id).await?,
        [("a/manifests".to_owned(), vec![0, 0xff])]
    );
    assert_eq!(pg.config_state(agent.id).await?, Some(b"state".to_vec()));
    // A message already queued is not queued twice after the move.
    assert!(
        !pg.enqueue_notification("ops", "sync:1", None, b"{}")
            .await?
    );
    assert!(
        pg.enqueue_notification("ops", "sync:2", None, b"{}")
            .await?
    );
    // Ordering keys and the last commit offered come along.
    pg.enqueue_notification("forge", "c1:success", c1, b"{}")
        .await?;
    let due = pg.claim_notifications(10, 60, 600).await?;
    let due: Vec<&str> = due.iter().map(|n| n.dedup_key.as_str()).collect();
    assert_eq!(due, ["sync:1", "sync:2", "c1:success"]);
    let before = pg
        .record_offered_commit(agent.id, "a/manifests", "c2")
        .await?;
    assert_eq!(before.as_deref(), Some("c1"));
    assert_eq!(pg.suspensions(None).await?, sqlite.suspensions(None).await?);
    assert_eq!(
        pg.web_session("d1").await?,
        Some(session),
        "logins survive the move"
    );

    // New records get ids past the copied ones, and past those SQLite gave and deleted.
    let new = pg.register_agent("group/project", "new").await?;
    assert!(new.id > deleted.id, "{new:?}");
    let (new_token, _) = pg.create_token(new.id, "").await?;
    assert!(new_token.id > deleted_token.id && new_token.id > revoked.id);

    // A second copy would merge two installations: refused, and nothing is written.
    let again = copy::sqlite_to_postgres(&sqlite, &pg).await;
    assert!(matches!(again, Err(Error::InUse(_))), "{again:?}");
    assert_eq!(pg.list_agents().await?.len(), 3);
    Ok(())
}

/// A TCP relay to PostgreSQL that goes silent, both ways and without closing anything, right
/// after forwarding the first statement that takes kas's write lock: a kas whose node died (or
/// whose connection a network drop left half-open) in the middle of a write.
struct VanishingRelay {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    vanished: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl VanishingRelay {
    async fn start(to: u16) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let vanished = std::sync::Arc::new(tokio::sync::Notify::new());
        let (a, v) = (armed.clone(), vanished.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    tokio::spawn(relay(client, server, a.clone(), v.clone()));
                }
            }
        });
        Ok(Self {
            port,
            armed,
            vanished,
            task,
        })
    }
}

impl Drop for VanishingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until, once `armed`, the client has taken the write lock; then holds both
/// connections open, forwarding nothing more.
async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    vanished: std::sync::Arc<tokio::sync::Notify>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quiet = silent.clone();
    let back = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            if quiet.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    // The statement's text goes with its preparation; it runs with the client's next message,
    // so the relay goes silent after forwarding that one: the lock is then held.
    let mut prepared = false;
    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
        let runs_it = prepared;
        prepared |= armed.load(std::sync::atomic::Ordering::SeqCst)
            && buf[..n].windows(21).any(|w| w == b"pg_advisory_xact_lock");
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if runs_it {
            silent.store(true, std::sync::atomic::Ordering::SeqCst);
            vanished.notify_one();
            std::future::pending::<()>().await;
        }
    }
    back.abort();
}

/// A kas that vanishes while holding the write lock (its node died mid-write) must not stop
/// every other replica's writes until the server's TCP keepalive notices, about two hours:
/// the server ends its idle transaction within seconds and the lock passes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_vanishes_holding_the_write_lock_does_not_stop_other_writers() -> TestResult {
    let server = Postgres::start()?;
    let url = server.create_database("kas")?;
    let relay = VanishingRelay::start(server.port).await?;
    let through_relay = url.replace(&format!(":{}/", server.port), &format!(":{}/", relay.port));
    let vanishing = PgStore::connect(&through_relay).await?;
    let other = PgStore::connect(&url).await?;

    relay.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let stuck = tokio::spawn(async move { vanishing.register_agent("group/a", "a").await });
    relay.vanished.notified().await;

    let written = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        other.register_agent("group/b", "b"),
    )
    .await;
    assert!(matches!(written, Ok(Ok(_))), "{written:?}");
    assert!(other.find_agent("group/a", "a").await?.is_none());
    assert!(!stuck.is_finished(), "the vanished writer never heard back");
    stuck.abort();
    Ok(())
}

/// Writes wait for one lock shared by every replica. When another replica holds it (or the
/// database is slow), the writes queued behind it must not take every connection of this kas's
/// pool: its reads (token checks, readiness) still get one. Before, each queued write held a
/// connection while it waited for the lock, and with eight queued a read failed after the
/// pool's acquire timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_behind_the_write_lock_leave_connections_for_reads() -> TestResult {
    let server = Postgres::start()?;
    let url = server.create_database("kas")?;
    let store = PgStore::connect(&url).await?;
    store.register_agent("group/a", "a").await?;

    // Another replica in the middle of a write (the lock of every write: "tether" in ASCII).
    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(0x7465_7468_6572_i64)
        .execute(&mut other)
        .await?;
    let writers: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.register_agent("group/b", &format!("w{i}")).await })
        })
        .collect();
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar(waiting).fetch_one(&mut other).await?;
        if n > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no write queued");
        tokio::task::yield_now().await;
    }

    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.find_agent("group/a", "a"),
    )
    .await;
    assert!(matches!(read, Ok(Ok(Some(_)))), "{read:?}");
    let n: i64 = sqlx::query_scalar(waiting).fetch_one(&mut other).await?;
    assert_eq!(
        n, 1,
        "one connection of this kas waits for the lock, not one per write"
    );

    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(0x7465_7468_6572_i64)
        .execute(&mut other)
        .await?;
    for w in writers {
        w.await??;
    }
    assert_eq!(store.list_agents().await?.len(), 13);
    Ok(())
}
