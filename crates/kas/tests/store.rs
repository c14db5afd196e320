//! kas on PostgreSQL, as real processes: a kas whose records are in a PostgreSQL server started
//! for the test, restarts, readiness following the database, and moving a SQLite kas over with
//! `kas store copy`; failed writes counted on a full disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::{Agent, Kas, KasOptions, wait_for};
use tether_testenv::postgres::Postgres;
use tether_testenv::tmpfs::Tmpfs;

fn on_postgres(url: &str) -> KasOptions {
    KasOptions {
        extra_yaml: format!("database:\n  url: {url}\n"),
        ..KasOptions::default()
    }
}

/// The newest schema migration, which [`undo_the_newest_migration`] undoes.
const NEWEST_MIGRATION: i64 = 14;

/// Turns the SQLite database at `db` back into what the kas before the newest migration (0014,
/// `agent_tokens.last_used_at`) left: an older installation. A newer migration needs its own
/// undo here.
fn undo_the_newest_migration(db: &std::path::Path) {
    let undo = format!(
        "ALTER TABLE agent_tokens DROP COLUMN last_used_at; \
         DELETE FROM _sqlx_migrations WHERE version = {NEWEST_MIGRATION};"
    );
    let undone = Command::new("sqlite3").arg(db).arg(&undo).output().unwrap();
    assert!(undone.status.success(), "{}", text(&undone));
}

/// Runs `kas` with these arguments to completion.
fn kas_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_on_postgres_keeps_its_agents_across_restarts_and_is_ready_only_with_its_database_logging_an_outage_once()
 {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("kas").unwrap();
    let mut kas = Kas::start(&dir.path().join("kas"), on_postgres(&url)).await;
    let t = kas
        .admin
        .register_agent("group/app", "agent")
        .await
        .unwrap();
    let _agent = Agent::start(dir.path(), "agentk", &kas.url("grpc"), &t.token, None);
    kas.wait_connected(t.agent_id).await;
    // The records are in PostgreSQL: no SQLite file appeared next to the admin token.
    assert!(!kas.dir.join("data/kas.sqlite").exists());

    kas.restart().await;
    let view = kas.wait_connected(t.agent_id).await;
    assert_eq!(view.name, "agent");
    let agents = kas.admin.list_agents().await.unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");

    assert_eq!(kas.readiness().await, Some(200));
    pg.stop().unwrap();
    wait_for("kas not ready", Duration::from_secs(10), || async {
        (kas.readiness().await == Some(503)).then_some(())
    })
    .await;
    // The outage lasts several readiness checks (one every 2 s): the log says so once, not
    // once per check, and once again when the database is back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    pg.restart().unwrap();
    wait_for("kas ready again", Duration::from_secs(10), || async {
        (kas.readiness().await == Some(200)).then_some(())
    })
    .await;
    let log = kas.log();
    assert_eq!(
        log.matches("Database check failed: not ready").count(),
        1,
        "{log}"
    );
    wait_for("the recovery logged", Duration::from_secs(5), || async {
        kas.log().contains("Database answers again").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_kas_copied_to_postgres_keeps_its_agents_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite_kas = Kas::start(&dir.path().join("sqlite"), KasOptions::default()).await;
    let t = sqlite_kas
        .admin
        .register_agent("group/app", "agent")
        .await
        .unwrap();
    sqlite_kas
        .admin
        .register_agent("group/other", "second")
        .await
        .unwrap();
    sqlite_kas.stop();
    let sqlite = format!(
        "sqlite:{}",
        sqlite_kas.dir.join("data/kas.sqlite").display()
    );

    let pg = Postgres::start().unwrap();
    let url = pg.create_database("kas").unwrap();
    // The schema can be created ahead of the copy; the copy needs it empty, not absent.
    let config = dir.path().join("migrate.yaml");
    std::fs::write(&config, format!("database:\n  url: {url}\n")).unwrap();
    let migrated = kas_cli(&[
        "--configuration-file",
        config.to_str().unwrap(),
        "store",
        "migrate",
    ]);
    assert!(migrated.status.success(), "{}", text(&migrated));
    assert!(
        text(&migrated).contains(&format!("schema created (version {NEWEST_MIGRATION})")),
        "{}",
        text(&migrated)
    );

    // The source as the kas before the newest migration left it: the copy must not migrate it
    // (it is often the backup or the database to go back to).
    let db = sqlite_kas.dir.join("data/kas.sqlite");
    undo_the_newest_migration(&db);
    let before = std::fs::read(&db).unwrap();

    let copied = kas_cli(&["store", "copy", "--from", &sqlite, "--to", &url]);
    assert!(copied.status.success(), "{}", text(&copied));
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the source was changed"
    );
    let out = text(&copied);
    let count = |table: &str| -> Option<u64> {
        out.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == table).then(|| words.next()?.parse().ok())?
        })
    };
    assert_eq!(count("projects"), Some(2), "{out}");
    assert_eq!(count("agents"), Some(2), "{out}");
    assert_eq!(count("agent_tokens"), Some(2), "{out}");
    assert_eq!(count("user_tokens"), Some(0), "{out}");

    let again = kas_cli(&["store", "copy", "--from", &sqlite, "--to", &url]);
    assert!(!again.status.success());
    assert!(text(&again).contains("not empty"), "{}", text(&again));
    let missing = dir.path().join("missing.sqlite");
    let from_missing = kas_cli(&[
        "store",
        "copy",
        "--from",
        &format!("sqlite:{}", missing.display()),
        "--to",
        &url,
    ]);
    assert!(!from_missing.status.success());
    assert!(!missing.exists(), "a missing source must not be created");

    let pg_kas = Kas::start(&dir.path().join("pg"), on_postgres(&url)).await;
    let _agent = Agent::start(dir.path(), "agentk", &pg_kas.url("grpc"), &t.token, None);
    let view = pg_kas.wait_connected(t.agent_id).await;
    assert_eq!(view.name, "agent");
    assert_eq!(pg_kas.admin.list_agents().await.unwrap().len(), 2);
    // New records continue after the copied ones.
    let third = pg_kas
        .admin
        .register_agent("group/app", "third")
        .await
        .unwrap();
    assert!(third.agent_id > t.agent_id);
}

/// A PostgreSQL password rotated in the file of `database.url_file` (a Secret) is followed
/// without restarting kas: a URL the server does not take yet keeps the working one (warned),
/// and once the server takes it, new connections use it — also after the old sessions ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_database_password_is_followed_without_restarting_kas() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start().unwrap();
    let url_file = dir.path().join("database-url");
    let first = pg.create_password_database("kas", "first-pw-1").unwrap();
    std::fs::write(&url_file, &first).unwrap();
    let options = KasOptions {
        extra_yaml: format!("database:\n  url_file: {}\n", url_file.display()),
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), options).await;
    kas.admin.register_agent("group/app", "one").await.unwrap();

    // The Secret changes before the database: kas says so and goes on with the old password.
    std::fs::write(&url_file, pg.password_url("kas", "second-pw-2")).unwrap();
    wait_for(
        "a warning about the URL",
        Duration::from_secs(30),
        || async { kas.log().contains("does not connect").then_some(()) },
    )
    .await;
    kas.admin.register_agent("group/app", "two").await.unwrap();
    assert_eq!(kas.readiness().await, Some(200));

    // The database takes it and ends every session opened with the old one.
    pg.rotate_password("second-pw-2").unwrap();
    wait_for("the new URL in use", Duration::from_secs(30), || async {
        kas.log().contains("new connections use it").then_some(())
    })
    .await;
    wait_for("kas ready", Duration::from_secs(10), || async {
        (kas.readiness().await == Some(200)).then_some(())
    })
    .await;
    kas.admin
        .register_agent("group/app", "three")
        .await
        .unwrap();
    let agents = kas.admin.list_agents().await.unwrap();
    assert_eq!(agents.len(), 3, "{agents:?}");
    let log = kas.log();
    assert!(
        !log.contains("first-pw-1") && !log.contains("second-pw-2"),
        "{log}"
    );
}

/// With kas's database disk full, a failed write is counted in
/// `kas_store_errors_total{operation,kind="write"}` on kas's /metrics (what the alert
/// `TetherKasStoreWritesFailing` follows), under the operation that failed; refusals such as a
/// duplicate agent are not failures and are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_on_a_full_disk_are_counted_on_the_metrics_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(16 * 1024);
    // Only kas's data (its database) lives on the small disk; its log stays writable.
    std::os::unix::fs::symlink(disk.path(), dir.path().join("data")).unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    kas.admin.register_agent("group/app", "one").await.unwrap();
    let duplicate = kas.admin.register_agent("group/app", "one").await;
    assert!(duplicate.is_err(), "{duplicate:?}");
    let series = r#"kas_store_errors_total{operation="register_agent",kind="write"}"#;
    assert_eq!(kas.metric(series).await, None, "a refusal was counted");

    let filler = disk.fill();
    for name in ["two", "three"] {
        let failed = kas.admin.register_agent("group/app", name).await;
        assert!(failed.is_err(), "registered on a full disk: {failed:?}");
    }
    assert_eq!(kas.metric(series).await, Some(2.0));
    let text = kas.metrics_text().await.unwrap();
    support::monitoring::assert_area_exported("store.rs", &[&text]);

    std::fs::remove_file(filler).unwrap();
    kas.admin.register_agent("group/app", "two").await.unwrap();
    assert_eq!(kas.metric(series).await, Some(2.0), "a success was counted");
}

/// Registers agents `w-0`, `w-1`, … through the admin API until `stop`; the names registered,
/// and any write that failed.
async fn keep_registering(
    kas: &Kas,
    stop: &std::sync::atomic::AtomicBool,
    registered: &std::sync::Mutex<Vec<String>>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for i in 0.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let name = format!("w-{i}");
        match kas.admin.register_agent("group/writes", &name).await {
            Ok(_) => registered.lock().unwrap().push(name),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    failures
}

/// The agent names `kas agent list` prints for the kas of `config`.
fn listed_agents(kas: &Kas) -> Vec<String> {
    let out = kas
        .cli()
        .args(["agent", "list", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let agents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    agents
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `kas store backup` takes a consistent copy of a running kas's SQLite database while kas
/// keeps writing (none of its writes fails meanwhile); a second kas started on the copy (put
/// in place as the restore steps say) lists the agents, the ones written during the backup
/// as an unbroken prefix (one moment's state). An existing file is refused and kept unless
/// `--force`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_kas_writes_restores_into_a_second_kas() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(&dir.path().join("live"), KasOptions::default()).await;
    for i in 0..50 {
        let name = format!("before-{i}");
        kas.admin.register_agent("group/app", &name).await.unwrap();
    }
    let backup = dir.path().join("kas-backup.sqlite");
    let (stop, registered) = (AtomicBool::new(false), std::sync::Mutex::new(Vec::new()));
    let backed_up = async {
        wait_for("writes under way", Duration::from_secs(10), || async {
            (registered.lock().unwrap().len() >= 3).then_some(())
        })
        .await;
        let mut cmd = kas.cli();
        cmd.args(["store", "backup", "--to"]).arg(&backup);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let during = registered.lock().unwrap().len();
        wait_for(
            "writes after the backup",
            Duration::from_secs(10),
            || async { (registered.lock().unwrap().len() > during).then_some(()) },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        out
    };
    let (out, failures) = tokio::join!(backed_up, keep_registering(&kas, &stop, &registered));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("backed up"), "{}", text(&out));
    assert!(
        failures.is_empty(),
        "writes failed during the backup: {failures:?}"
    );

    let restored_dir = dir.path().join("restored");
    std::fs::create_dir_all(restored_dir.join("data")).unwrap();
    std::fs::copy(&backup, restored_dir.join("data/kas.sqlite")).unwrap();
    let restored = Kas::start(&restored_dir, KasOptions::default()).await;
    let names = listed_agents(&restored);
    for i in 0..50 {
        assert!(
            names.contains(&format!("before-{i}")),
            "before-{i}: {names:?}"
        );
    }
    let written: Vec<&String> = names.iter().filter(|n| n.starts_with("w-")).collect();
    assert!(written.len() >= 3, "{names:?}");
    for i in 0..written.len() {
        assert!(
            names.contains(&format!("w-{i}")),
            "not one moment's state: {names:?}"
        );
    }
    assert!(
        written.len() < registered.lock().unwrap().len(),
        "{names:?}"
    );

    let before = std::fs::read(&backup).unwrap();
    let refused = kas
        .cli()
        .args(["store", "backup", "--to"])
        .arg(&backup)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("--force"), "{}", text(&refused));
    assert_eq!(
        std::fs::read(&backup).unwrap(),
        before,
        "the existing file changed"
    );
    let forced = kas
        .cli()
        .args(["store", "backup", "--force", "--to"])
        .arg(&backup)
        .output();
    let forced = forced.unwrap();
    assert!(forced.status.success(), "{}", text(&forced));
    assert_ne!(
        std::fs::read(&backup).unwrap(),
        before,
        "--force kept the old file"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().contains("partial")),
        "{left:?}"
    );
}

/// `kas store restore` puts a backup in place of a stopped kas's database: ids keep counting
/// after the largest the replaced database gave (an agent registered after the backup, still
/// running in a cluster, must not share its id with the next one), and it says what the
/// restore undoes — a token revoked and an agent suspended after the backup. Restored with
/// `cp` as before, ids 2 and 3 were given again (E8). It refuses while kas answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_ids_counting_and_says_what_it_undoes() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(&dir.path().join("live"), KasOptions::default()).await;
    let first = kas
        .admin
        .register_agent("group/app", "first")
        .await
        .unwrap();
    let gone = kas.admin.register_agent("group/app", "gone").await;
    let gone = gone.unwrap();
    let backup = dir.path().join("kas-backup.sqlite");
    let out = kas
        .cli()
        .args(["store", "backup", "--to"])
        .arg(&backup)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let since = kas
        .admin
        .register_agent("group/app", "since")
        .await
        .unwrap();
    let extra = kas
        .admin
        .create_token(first.agent_id, "extra")
        .await
        .unwrap();
    kas.admin.revoke_token(first.token_id).await.unwrap();
    kas.admin.delete_agent(gone.agent_id).await.unwrap();
    let suspend = tether_kas_api::SuspendRequest {
        reason: "incident 7".into(),
        ..Default::default()
    };
    kas.admin.suspend(first.agent_id, &suspend).await.unwrap();
    let restore = |kas: &Kas| {
        let mut c = kas.cli();
        c.args(["store", "restore", "--from"]).arg(&backup);
        c.output().unwrap()
    };
    let refused = restore(&kas);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("stop it before restoring"),
        "{}",
        text(&refused)
    );

    kas.stop();
    let out = restore(&kas);
    let (stdout, stderr) = (
        text(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("agents: ids continue after {}", since.agent_id)),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "agent tokens revoked after the backup are active again: {}",
            first.token_id
        )),
        "{stderr}"
    );
    // A deleted agent comes back with its token, as a revoked token does.
    assert!(
        stderr.contains(&format!(
            "agents deleted after the backup are back: {} (delete them again: kas agent delete ID), with their agent tokens {} ",
            gone.agent_id, gone.token_id
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "the suspension of agent {} by admin",
            first.agent_id
        )),
        "{stderr}"
    );
    kas.start_again().await;
    let next = kas.admin.register_agent("group/app", "next").await.unwrap();
    assert!(next.agent_id > since.agent_id, "{next:?} after {since:?}");
    assert!(next.token_id > extra.token_id, "{next:?} after {extra:?}");
    let names = listed_agents(&kas);
    assert!(!names.contains(&"since".to_owned()), "{names:?}");
}

/// `kas store backup` of a kas on PostgreSQL says to use pg_dump (and why), never the URL's
/// password, exits non-zero and writes nothing.
#[test]
fn a_backup_of_postgres_points_to_pg_dump() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kas.yaml");
    let url = "postgres://kas:s3cret-pw@127.0.0.1:1/kas";
    std::fs::write(&config, format!("database:\n  url: {url}\n")).unwrap();
    let to = dir.path().join("backup.sqlite");
    let out = kas_cli(&[
        "--configuration-file",
        config.to_str().unwrap(),
        "store",
        "backup",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pg_dump"), "{}", text(&out));
    assert!(!text(&out).contains("s3cret-pw"), "{}", text(&out));
    assert!(!to.exists());
}

/// A TCP proxy to PostgreSQL that can go silent: the connections open through it stop
/// carrying anything either way but stay open — a server that vanished (a node gone, a network
/// dropping everything) as its clients see it. Connections opened afterwards work.
struct Proxy {
    port: u16,
    silence: std::sync::Mutex<tokio_util::sync::CancellationToken>,
}

impl Proxy {
    async fn start(upstream: u16) -> std::sync::Arc<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = std::sync::Arc::new(Proxy {
            port: listener.local_addr().unwrap().port(),
            silence: std::sync::Mutex::new(tokio_util::sync::CancellationToken::new()),
        });
        let accepting = std::sync::Arc::clone(&proxy);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let silence = accepting.silence.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Both sockets stay open, silent, until the test ends.
                        () = silence.cancelled() => std::future::pending::<()>().await,
                    }
                });
            }
        });
        proxy
    }

    /// The connections open now go silent.
    fn go_silent(&self) {
        let mut silence = self.silence.lock().unwrap();
        silence.cancel();
        *silence = tokio_util::sync::CancellationToken::new();
    }
}

/// PostgreSQL vanishing under a write (its answers stop arriving, the connection stays open):
/// the write fails within `database.statement_timeout` plus 5 s and is counted, where it
/// waited for TCP to give up — about 15 minutes, or for good behind a connection that is never
/// reset — holding the request. kas writes again once the database can be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_database_vanished_fails_within_the_statement_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("kas").unwrap();
    let port: u16 = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = Proxy::start(port).await;
    let proxied = url.replace(&format!(":{port}/"), &format!(":{}/", proxy.port));
    let options = KasOptions {
        extra_yaml: format!("database:\n  url: {proxied}\n  statement_timeout: 2s\n"),
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), options).await;
    kas.admin.register_agent("group/app", "one").await.unwrap();
    // Registering an agent now takes a while on the server, so the write is under way when
    // the proxy goes silent.
    pg.sql_in(
        "kas",
        "CREATE FUNCTION slow() RETURNS trigger AS $$BEGIN PERFORM pg_sleep(3); RETURN NEW; END$$ LANGUAGE plpgsql;\
         CREATE TRIGGER slow BEFORE INSERT ON agents FOR EACH ROW EXECUTE FUNCTION slow();",
    )
    .unwrap();

    let started = std::time::Instant::now();
    let register = kas.admin.register_agent("group/app", "two");
    let silenced = async {
        wait_for("the write under way", Duration::from_secs(10), || async {
            let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'";
            (pg.sql_in("kas", sleeping).unwrap().trim() == "1").then_some(())
        })
        .await;
        proxy.go_silent();
    };
    let (registered, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(register, silenced)
    })
    .await
    .expect("the write still waits for the vanished database");
    assert!(registered.is_err(), "{registered:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let series = r#"kas_store_errors_total{operation="register_agent",kind="write"}"#;
    assert_eq!(kas.metric(series).await, Some(1.0));
    assert!(kas.log().contains("did not answer within"), "{}", kas.log());

    pg.sql_in("kas", "DROP TRIGGER slow ON agents;").unwrap();
    wait_for("writes working again", Duration::from_secs(30), || async {
        kas.admin.register_agent("group/app", "three").await.ok()
    })
    .await;
}

/// `kas store migrate` says what it did: created the schema, migrated it (from which version,
/// applying which migrations), or found it up to date (it said "schema up to date" each time);
/// on a database a newer kas migrated (a rollback) it says so, naming the migrations it does
/// not know, not "up to date".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_migrate_says_what_it_did_and_a_schema_newer_than_kas() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kas.sqlite");
    let config = dir.path().join("kas.yaml");
    std::fs::write(
        &config,
        format!("database:\n  sqlite_path: {}\n", db.display()),
    )
    .unwrap();
    let migrate = || {
        let config = config.to_str().unwrap();
        kas_cli(&["--configuration-file", config, "store", "migrate"])
    };
    let said = |out: &std::process::Output| {
        assert!(out.status.success(), "{}", text(out));
        text(out)
    };
    let newest = NEWEST_MIGRATION;
    let first = said(&migrate());
    assert!(
        first.contains(&format!("schema created (version {newest})")),
        "{first}"
    );
    let second = said(&migrate());
    assert!(
        second.contains(&format!("schema up to date (version {newest})")),
        "{second}"
    );
    undo_the_newest_migration(&db);
    let third = said(&migrate());
    assert!(
        third.contains(&format!(
            "schema migrated from version {} to {newest} (applied {newest} ",
            newest - 1
        )),
        "{third}"
    );

    // What a newer kas's migration leaves in sqlx's bookkeeping table.
    let insert = "INSERT INTO _sqlx_migrations \
                  (version, description, success, checksum, execution_time) \
                  VALUES (99999, 'from a newer kas', 1, x'00', 1)";
    let recorded = Command::new("sqlite3")
        .arg(&db)
        .arg(insert)
        .output()
        .unwrap();
    assert!(recorded.status.success(), "{}", text(&recorded));
    let again = migrate();
    assert!(again.status.success(), "{}", text(&again));
    let said = text(&again);
    assert!(!said.contains("up to date"), "{said}");
    assert!(
        said.contains(
            "the schema is newer than this kas: migration(s) 99999 were applied by a newer kas"
        ),
        "{said}"
    );
}

/// kas says in its log which schema it runs on and, at an upgrade, which migrations it applied
/// and from which version: the moment after which the version it replaced may not start on
/// the database. It said nothing about migrating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_logs_the_schema_it_creates_migrates_or_finds_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let mut kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    let said = |kas: &Kas, msg: &str| -> Vec<serde_json::Value> {
        let lines = kas.log_lines().into_iter();
        lines.filter(|l| l["msg"] == msg).collect()
    };
    let created = said(&kas, "Database schema created");
    assert_eq!(created.len(), 1, "{}", kas.log());
    let newest = created[0]["schema_version"].as_i64().unwrap();
    let up = kas
        .log_lines()
        .into_iter()
        .find(|l| l["msg"] == "kas is up")
        .unwrap();
    assert!(
        up["version"].as_str().unwrap().contains(" (commit "),
        "{up}"
    );
    kas.stop();

    // The database as the kas before the newest migration left it.
    assert_eq!(newest, NEWEST_MIGRATION, "{}", kas.log());
    undo_the_newest_migration(&kas.dir.join("data/kas.sqlite"));
    kas.restart().await;
    let migrated = said(
        &kas,
        "Database schema migrated: a kas that does not know these migrations may refuse to start on this database (roll back by restoring the backup taken before)",
    );
    assert_eq!(migrated.len(), 1, "{}", kas.log());
    assert_eq!(migrated[0]["from_version"], newest - 1, "{}", migrated[0]);
    assert_eq!(
        migrated[0]["applied"], "14 token last used",
        "{}",
        migrated[0]
    );

    kas.restart().await;
    let current = said(&kas, "Database schema is up to date");
    assert_eq!(current.len(), 1, "{}", kas.log());
    assert_eq!(current[0]["schema_version"], newest);
}
