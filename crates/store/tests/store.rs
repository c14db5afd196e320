//! End-to-end tests of the store, each run against both backends: SQLite on a real database
//! file and PostgreSQL on a real server started for the test (see
//! `tether_testenv::postgres`). A few tests about SQLite's files run against SQLite only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use tether_store::{
    Error, NotificationResult, OutboxMessage, PgStore, SqliteStore, Store, SuspensionScope,
    TOKEN_PREFIX, TOKEN_RANDOM_LEN, WebSession,
};
use tether_testenv::postgres::Postgres;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Where a test's database lives; keeps the file or the server alive for the test.
enum Db {
    File { _dir: TempDir, path: PathBuf },
    Server(Postgres, String),
}

/// A store on a fresh, empty database, used through `Arc<dyn Store>` as kas does.
async fn open(backend: Backend) -> Result<(Db, Arc<dyn Store>), Box<dyn std::error::Error>> {
    let db = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("kas.db");
            Db::File { _dir: dir, path }
        }
        Backend::Postgres => {
            let server = Postgres::start()?;
            let url = server.create_database("kas")?;
            Db::Server(server, url)
        }
    };
    let store = db.reopen().await?;
    Ok((db, store))
}

impl Db {
    /// Opens the database (again), as a restarted kas would.
    async fn reopen(&self) -> Result<Arc<dyn Store>, Error> {
        Ok(match self {
            Db::File { path, .. } => Arc::new(SqliteStore::open(path).await?),
            Db::Server(_, url) => Arc::new(PgStore::connect(url).await?),
        })
    }

    /// Whether any file the database engine keeps data in holds `needle` (for PostgreSQL the
    /// whole cluster directory, write-ahead log included).
    fn holds(&self, needle: &[u8]) -> bool {
        let files = match self {
            Db::File { path, .. } => database_files(path),
            Db::Server(server, _) => files_under(server.data_dir()),
        };
        files.iter().any(|file| {
            let bytes = std::fs::read(file).expect("read database file");
            bytes.windows(needle.len()).any(|w| w == needle)
        })
    }
}

/// What the outbox tests read and change beside the store's API, through a connection of
/// their own: the store stamps `done_at` with its own clock, so a message finished days ago
/// can only be had by moving its stamp back.
impl Db {
    /// Moves a message's creation and finish (if finished) `secs` into the past.
    async fn backdate_notification(&self, id: i64, secs: i64) -> Result<(), sqlx::Error> {
        let sql = "UPDATE notifications SET created_at = created_at - $1, done_at = done_at - $1 \
                   WHERE id = $2";
        match self {
            Db::File { path, .. } => {
                let pool = sqlx::SqlitePool::connect_with(sqlite_options(path)).await?;
                sqlx::query(sql).bind(secs).bind(id).execute(&pool).await?;
                pool.close().await;
            }
            Db::Server(_, url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                sqlx::query(sql).bind(secs).bind(id).execute(&pool).await?;
                pool.close().await;
            }
        }
        Ok(())
    }

    /// The keys of every message in the outbox, by id.
    async fn notification_keys(&self) -> Result<Vec<String>, sqlx::Error> {
        let sql = "SELECT dedup_key FROM notifications ORDER BY id";
        let keys = match self {
            Db::File { path, .. } => {
                let pool = sqlx::SqlitePool::connect_with(sqlite_options(path)).await?;
                let keys = sqlx::query_scalar(sql).fetch_all(&pool).await?;
                pool.close().await;
                keys
            }
            Db::Server(_, url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                let keys = sqlx::query_scalar(sql).fetch_all(&pool).await?;
                pool.close().await;
                keys
            }
        };
        Ok(keys)
    }
}

/// Faults: what an outage does to a write, through a connection of the test's own.
impl Db {
    /// Renames the outbox away (`away`), so that writes to it fail as in an outage, or back.
    async fn outbox_away(&self, away: bool) -> Result<(), sqlx::Error> {
        let sql = if away {
            "ALTER TABLE notifications RENAME TO notifications_away"
        } else {
            "ALTER TABLE notifications_away RENAME TO notifications"
        };
        match self {
            Db::File { path, .. } => {
                let pool = sqlx::SqlitePool::connect_with(sqlite_options(path)).await?;
                sqlx::query(sql).execute(&pool).await?;
                pool.close().await;
            }
            Db::Server(_, url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                sqlx::query(sql).execute(&pool).await?;
                pool.close().await;
            }
        }
        Ok(())
    }
}

/// What a newer kas leaves in the database for an older one to find.
impl Db {
    /// Records migration `version` as applied, as a kas with that migration would.
    async fn record_migration(&self, version: i64) -> Result<(), sqlx::Error> {
        let sql = "INSERT INTO _sqlx_migrations \
                   (version, description, success, checksum, execution_time) \
                   VALUES ($1, 'from a newer kas', TRUE, $2, 1)";
        // The same statement on either engine's pool.
        macro_rules! insert {
            ($pool:expr) => {{
                let pool = $pool;
                let checksum = vec![0u8; 48];
                let query = sqlx::query(sql).bind(version).bind(checksum);
                query.execute(&pool).await?;
                pool.close().await;
            }};
        }
        match self {
            Db::File { path, .. } => {
                insert!(sqlx::SqlitePool::connect_with(sqlite_options(path)).await?)
            }
            Db::Server(_, url) => insert!(sqlx::PgPool::connect(url).await?),
        }
        Ok(())
    }
}

fn sqlite_options(path: &Path) -> sqlx::sqlite::SqliteConnectOptions {
    sqlx::sqlite::SqliteConnectOptions::new().filename(path)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read database directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else if path.is_file() {
            files.push(path);
        }
    }
    files
}

/// Runs each named test (an `async fn(Backend) -> TestResult`) once per backend, as
/// `sqlite::name` and `postgres::name`.
macro_rules! on_both_backends {
    ($($(($($args:tt)*))? $name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test $(($($args)*))?]
                async fn $name() -> super::TestResult {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test $(($($args)*))?]
                async fn $name() -> super::TestResult {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

/// A SQLite store on a fresh file, for the tests about SQLite's files.
async fn open_sqlite() -> Result<(TempDir, PathBuf, SqliteStore), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kas.db");
    let store = SqliteStore::open(&path).await?;
    Ok((dir, path, store))
}

/// Every file SQLite may keep data in for this database.
fn database_files(db: &Path) -> Vec<PathBuf> {
    let mut files = vec![db.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    files.into_iter().filter(|p| p.exists()).collect()
}

fn files_contain(db: &Path, needle: &[u8]) -> bool {
    database_files(db).iter().any(|file| {
        let bytes = std::fs::read(file).expect("read database file");
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

async fn register_token_authenticate(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store
        .register_agent("group/sub/project", "my-agent")
        .await?;
    assert_eq!(agent.name, "my-agent");
    let project = store
        .get_project_by_path("group/sub/project")
        .await?
        .expect("project created by register_agent");
    assert_eq!(agent.project_id, project.id);

    let (info, token) = store.create_token(agent.id, "first").await?;
    assert_eq!(info.agent_id, agent.id);
    assert_eq!(info.description, "first");
    assert!(info.is_active());
    assert!(token.expose().starts_with(TOKEN_PREFIX));
    assert_eq!(token.expose().len(), TOKEN_PREFIX.len() + TOKEN_RANDOM_LEN);

    let auth = store
        .authenticate(token.expose())
        .await?
        .expect("fresh token authenticates");
    assert_eq!(auth.agent_id, agent.id);
    assert_eq!(auth.agent_name, "my-agent");
    assert_eq!(auth.project_id, project.id);
    assert_eq!(auth.project_path, "group/sub/project");
    assert_eq!(auth.token_id, info.id);
    assert!(store.token_active(info.id).await?);
    Ok(())
}

async fn wrong_tokens_are_rejected(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("g/p", "a").await?;
    let (_info, token) = store.create_token(agent.id, "").await?;

    // Same shape as a real token, one character different.
    let mut wrong = token.expose().to_string();
    let last = wrong.pop().expect("non-empty");
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    let uppercase = token.expose().to_uppercase();
    let with_newline = format!("{}\n", token.expose());
    let prefix_only = &token.expose()[..TOKEN_PREFIX.len() + 10];
    for bad in [
        wrong.as_str(),
        uppercase.as_str(),
        with_newline.as_str(),
        prefix_only,
        "",
        "tether_",
        "not a token",
    ] {
        assert!(store.authenticate(bad).await?.is_none(), "{bad:?} accepted");
    }
    Ok(())
}

async fn revoked_token_is_rejected(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("g/p", "a").await?;
    let (info, token) = store.create_token(agent.id, "to revoke").await?;
    assert!(store.authenticate(token.expose()).await?.is_some());

    assert!(store.revoke_token(info.id).await?, "first revocation");
    assert!(store.authenticate(token.expose()).await?.is_none());
    assert!(!store.token_active(info.id).await?);
    // Idempotent: a second revocation succeeds but reports the token was no longer active.
    assert!(!store.revoke_token(info.id).await?);
    assert!(!store.token_active(info.id).await?);

    let listed = store.list_tokens(agent.id).await?;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked_at.is_some());
    assert!(!listed[0].is_active());

    assert!(matches!(
        store.revoke_token(info.id + 1000).await,
        Err(Error::NotFound(_))
    ));
    assert!(!store.token_active(info.id + 1000).await?);
    Ok(())
}

/// The batched re-check gives the active subset, whatever the number of ids (more than one
/// query's worth here), ignoring revoked and unknown ones.
async fn active_tokens_are_found_in_batches(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("g/p", "a").await?;
    let (kept, _) = store.create_token(agent.id, "kept").await?;
    let (revoked, _) = store.create_token(agent.id, "revoked").await?;
    store.revoke_token(revoked.id).await?;
    let mut ids: Vec<i64> = (0..1_200)
        .map(|i| kept.id + revoked.id + 10_000 + i)
        .collect();
    ids.extend([revoked.id, kept.id]);
    assert_eq!(store.active_tokens(&ids).await?, vec![kept.id]);
    assert!(store.active_tokens(&[]).await?.is_empty());
    Ok(())
}

async fn active_user_tokens_are_neither_revoked_nor_expired(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("g/p", "a").await?;
    // Expiry times are Unix seconds: far in the future, and long past.
    let (far, past) = (4_000_000_000, 1);
    let token = |expires_at: i64| {
        let store = &store;
        async move {
            let (info, _) = store
                .create_user_token(agent.id, "alice", "[]", expires_at)
                .await?;
            Ok::<i64, Box<dyn std::error::Error>>(info.id)
        }
    };
    let (kept, revoked, expired) = (token(far).await?, token(far).await?, token(past).await?);
    store.revoke_user_token(revoked).await?;
    let unknown = kept + revoked + expired + 1;
    let mut ids: Vec<i64> = (0..1_200).map(|i| unknown + i).collect();
    ids.extend([expired, revoked, kept]);
    assert_eq!(store.active_user_tokens(&ids).await?, vec![kept]);
    assert!(store.active_user_tokens(&[]).await?.is_empty());
    Ok(())
}

async fn two_tokens_per_agent(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("g/p", "a").await?;
    let (info1, token1) = store.create_token(agent.id, "one").await?;
    let (info2, token2) = store.create_token(agent.id, "two").await?;
    assert_ne!(info1.id, info2.id);
    assert_ne!(token1.expose(), token2.expose());

    let auth1 = store.authenticate(token1.expose()).await?.expect("token1");
    let auth2 = store.authenticate(token2.expose()).await?.expect("token2");
    assert_eq!((auth1.agent_id, auth1.token_id), (agent.id, info1.id));
    assert_eq!((auth2.agent_id, auth2.token_id), (agent.id, info2.id));

    assert!(store.revoke_token(info1.id).await?);
    assert!(store.authenticate(token1.expose()).await?.is_none());
    assert!(store.authenticate(token2.expose()).await?.is_some());
    assert!(!store.token_active(info1.id).await?);
    assert!(store.token_active(info2.id).await?);

    let listed = store.list_tokens(agent.id).await?;
    let summary: Vec<_> = listed
        .iter()
        .map(|t| (t.id, t.description.as_str(), t.is_active()))
        .collect();
    assert_eq!(
        summary,
        vec![(info1.id, "one", false), (info2.id, "two", true)]
    );
    Ok(())
}

async fn tokens_of_different_agents_are_kept_apart(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let a = store.register_agent("g/p", "a").await?;
    let b = store.register_agent("g/q", "a").await?;
    let (_, token_a) = store.create_token(a.id, "").await?;
    let (_, token_b) = store.create_token(b.id, "").await?;
    let auth_a = store.authenticate(token_a.expose()).await?.expect("a");
    let auth_b = store.authenticate(token_b.expose()).await?.expect("b");
    assert_eq!(
        (auth_a.agent_id, auth_a.project_path.as_str()),
        (a.id, "g/p")
    );
    assert_eq!(
        (auth_b.agent_id, auth_b.project_path.as_str()),
        (b.id, "g/q")
    );
    assert_eq!(store.list_tokens(a.id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn database_never_holds_the_plaintext_token() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kas.db");
    let store = SqliteStore::open(&path).await?;
    let agent = store.register_agent("g/p", "a").await?;
    let (_info, token) = store.create_token(agent.id, "secret check").await?;
    let random_part = token.expose().as_bytes()[TOKEN_PREFIX.len()..].to_vec();
    let digest_hex = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(token.expose().as_bytes()))
    };

    // Rollback journal, not WAL: no `-wal`, and above all no memory-mapped `-shm` index.
    for suffix in ["-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        assert!(
            !Path::new(&file).exists(),
            "{suffix} exists: journal mode is WAL"
        );
    }
    assert!(!files_contain(&path, token.expose().as_bytes()));
    assert!(!files_contain(&path, &random_part));
    // Sanity check that the search would find what is stored: the digest and the description.
    assert!(files_contain(&path, digest_hex.as_bytes()));
    assert!(files_contain(&path, b"secret check"));

    store.close().await;
    assert!(!files_contain(&path, token.expose().as_bytes()));
    assert!(!files_contain(&path, &random_part));
    let main_file = std::fs::read(&path)?;
    assert!(
        main_file
            .windows(digest_hex.len())
            .any(|w| w == digest_hex.as_bytes()),
        "a committed digest should be in the main file"
    );
    Ok(())
}

async fn invalid_names_are_rejected(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let too_long = "a".repeat(64);
    for name in [
        "MyAgent",
        "-agent",
        "agent-",
        "",
        "my_agent",
        too_long.as_str(),
    ] {
        let got = store.register_agent("g/p", name).await;
        assert!(
            matches!(
                got,
                Err(Error::InvalidName {
                    what: "agent name",
                    ..
                })
            ),
            "{name:?}: {got:?}"
        );
        let got = store.find_agent("g/p", name).await;
        assert!(
            matches!(got, Err(Error::InvalidName { .. })),
            "{name:?}: {got:?}"
        );
    }
    for path in ["", "/g/p", "g/p/", "g//p", "g/p q", "g/../p", "g/ü"] {
        let got = store.register_agent(path, "agent").await;
        assert!(
            matches!(
                got,
                Err(Error::InvalidName {
                    what: "project path",
                    ..
                })
            ),
            "{path:?}: {got:?}"
        );
        let got = store.ensure_project(path).await;
        assert!(
            matches!(got, Err(Error::InvalidName { .. })),
            "{path:?}: {got:?}"
        );
    }
    // Nothing was written by the rejected calls.
    assert!(store.list_projects().await?.is_empty());
    assert!(store.list_agents().await?.is_empty());
    // 63 characters is the limit, not past it.
    let longest = "a".repeat(63);
    store.register_agent("g/p", &longest).await?;
    Ok(())
}

async fn duplicate_agent_is_rejected_and_leaves_no_trace(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let first = store.register_agent("g/p", "a").await?;
    let again = store.register_agent("g/p", "a").await;
    assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");
    // The same name in another project is a different agent.
    let other = store.register_agent("g/other", "a").await?;
    assert_ne!(first.id, other.id);
    assert_ne!(first.project_id, other.project_id);

    let found = store.find_agent("g/p", "a").await?.expect("found");
    assert_eq!(found, first);
    assert_eq!(store.get_agent(first.id).await?, Some(first.clone()));
    assert!(store.find_agent("g/p", "b").await?.is_none());
    assert!(store.find_agent("g/nope", "a").await?.is_none());
    assert!(store.get_agent(first.id + 1000).await?.is_none());
    Ok(())
}

async fn projects_and_listings(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let p1 = store.ensure_project("b/project").await?;
    let p1_again = store.ensure_project("b/project").await?;
    assert_eq!(p1, p1_again, "ensure_project returns the existing project");
    let p2 = store.ensure_project("a/project").await?;
    assert!(store.get_project_by_path("c/none").await?.is_none());

    let paths: Vec<_> = store
        .list_projects()
        .await?
        .into_iter()
        .map(|p| (p.id, p.path))
        .collect();
    assert_eq!(
        paths,
        vec![
            (p2.id, "a/project".to_string()),
            (p1.id, "b/project".to_string())
        ]
    );

    // register_agent reuses an existing project.
    let z = store.register_agent("b/project", "z").await?;
    let y = store.register_agent("a/project", "y").await?;
    let x = store.register_agent("b/project", "x").await?;
    assert_eq!(z.project_id, p1.id);
    let agents: Vec<_> = store
        .list_agents()
        .await?
        .into_iter()
        .map(|a| (a.id, a.name, a.project_id, a.project_path))
        .collect();
    assert_eq!(
        agents,
        vec![
            (y.id, "y".into(), p2.id, "a/project".into()),
            (x.id, "x".into(), p1.id, "b/project".into()),
            (z.id, "z".into(), p1.id, "b/project".into()),
        ]
    );
    assert_eq!(store.list_projects().await?.len(), 2);
    Ok(())
}

async fn unknown_agent_for_tokens(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    assert!(matches!(
        store.create_token(42, "x").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store.list_tokens(42).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

async fn reopening_keeps_the_data(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let (agent, info, token) = {
        let agent = store.register_agent("group/project", "agent-1").await?;
        let (info, token) = store.create_token(agent.id, "kept").await?;
        let (revoked, _) = store.create_token(agent.id, "revoked").await?;
        store.revoke_token(revoked.id).await?;
        store.close().await;
        (agent, info, token)
    };

    // Opening again also re-runs the migrator, which must accept an up-to-date schema.
    let store = db.reopen().await?;
    assert_eq!(
        store.find_agent("group/project", "agent-1").await?,
        Some(agent.clone())
    );
    let auth = store
        .authenticate(token.expose())
        .await?
        .expect("token survives");
    assert_eq!((auth.agent_id, auth.token_id), (agent.id, info.id));
    let tokens = store.list_tokens(agent.id).await?;
    assert_eq!(tokens.len(), 2);
    assert!(tokens[0].is_active());
    assert!(!tokens[1].is_active());
    assert!(matches!(
        store.register_agent("group/project", "agent-1").await,
        Err(Error::AlreadyExists(_))
    ));
    Ok(())
}

/// An id is never handed out twice, also after reopening: a new agent given a deleted one's id
/// was authorized by the deleted agent's configuration (kas's memory of it) and took over its
/// inventories and Lease in the cluster; a token given a revoked one's id could be revoked by
/// mistake, or come back under a revocation meant for the old one. SQLite gave the largest id
/// plus one, so deleting the newest row handed its id out again.
async fn deleted_ids_are_never_given_again(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    store.register_agent("group/kept", "kept").await?;
    let gone = store.register_agent("group/gone", "gone").await?;
    let (gone_token, _) = store.create_token(gone.id, "gone").await?;
    let far = 4_000_000_000;
    let (gone_pat, _) = store.create_user_token(gone.id, "alice", "[]", far).await?;
    assert!(store.delete_agent(gone.id).await?);
    assert!(store.remove_project("group/gone").await?);
    store.close().await;

    let store = db.reopen().await?;
    let new = store.register_agent("group/new", "gone").await?;
    assert!(new.id > gone.id, "agent id {} given again", new.id);
    assert!(new.project_id > gone.project_id, "project id given again");
    let (token, _) = store.create_token(new.id, "new").await?;
    assert!(
        token.id > gone_token.id,
        "token id {} given again",
        token.id
    );
    let (pat, _) = store.create_user_token(new.id, "bob", "[]", far).await?;
    assert!(
        pat.id > gone_pat.id,
        "personal token id {} given again",
        pat.id
    );

    // Without reopening too.
    assert!(store.delete_agent(new.id).await?);
    let newer = store.register_agent("group/new", "gone").await?;
    assert!(newer.id > new.id, "agent id {} given again", newer.id);
    Ok(())
}

async fn token_debug_and_display_are_redacted(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("g/p", "a").await?;
    let created = store.create_token(agent.id, "debug").await?;
    let secret = &created.1.expose()[TOKEN_PREFIX.len()..];
    for shown in [
        format!("{created:?}"),
        format!("{created:#?}"),
        format!("{}", created.1),
    ] {
        assert!(!shown.contains(secret), "secret leaked: {shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
    Ok(())
}

async fn concurrent_writers_wait_instead_of_failing(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let agent = store.register_agent("g/p", &format!("agent-{i}")).await?;
            let (_, token) = store.create_token(agent.id, "").await?;
            store.authenticate(token.expose()).await
        }));
    }
    for task in tasks {
        assert!(task.await??.is_some());
    }
    assert_eq!(store.list_agents().await?.len(), 16);
    Ok(())
}

async fn project_sources_are_set_read_and_removed(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let src = tether_store::ProjectSource {
        remote: Some("git://127.0.0.1:9418/group/app".into()),
        credentials_file: None,
        webhook_secret_file: Some("/etc/kas/hook-secret".into()),
        ..Default::default()
    };
    let p = store.set_project_source("group/app", &src).await?;
    assert_eq!(p.remote.as_deref(), Some("git://127.0.0.1:9418/group/app"));
    let again = store.get_project(p.id).await?.ok_or("project")?;
    assert_eq!(again, p);
    assert_eq!(
        again.webhook_secret_file.as_deref(),
        Some("/etc/kas/hook-secret")
    );
    // Updating keeps the id.
    let moved = store
        .set_project_source(
            "group/app",
            &tether_store::ProjectSource {
                remote: Some("file:///srv/git/app".into()),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(moved.id, p.id);
    assert_eq!(moved.webhook_secret_file, None);

    // A project with agents cannot be removed; an empty one can.
    store.register_agent("group/app", "a1").await?;
    let err = store
        .remove_project("group/app")
        .await
        .err()
        .ok_or("refused")?;
    assert!(matches!(err, Error::InUse(_)), "{err}");
    store
        .set_project_source("group/other", &Default::default())
        .await?;
    assert!(store.remove_project("group/other").await?);
    assert!(!store.remove_project("group/other").await?);
    assert!(store.get_project_by_path("group/other").await?.is_none());
    Ok(())
}

async fn user_tokens_authenticate_until_revoked_or_expired(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let agent = store.register_agent("group/app", "a1").await?;
    let far = 4_000_000_000;
    let (info, token) = store
        .create_user_token(agent.id, "alice", "[]", far)
        .await?;
    let found = store
        .authenticate_user_token(token.expose())
        .await?
        .ok_or("valid token")?;
    assert_eq!(found.username, "alice");
    assert_eq!(found.agent_id, agent.id);
    assert!(!db.holds(token.expose().as_bytes()));
    // Agent tokens and user tokens are different things.
    assert!(store.authenticate(token.expose()).await?.is_none());
    assert!(store.revoke_user_token(info.id).await?);
    assert!(
        store
            .authenticate_user_token(token.expose())
            .await?
            .is_none()
    );
    // Idempotent: a second revocation succeeds but reports the token was no longer active.
    assert!(!store.revoke_user_token(info.id).await?);
    let (_, expired) = store.create_user_token(agent.id, "bob", "[]", 1).await?;
    assert!(
        store
            .authenticate_user_token(expired.expose())
            .await?
            .is_none()
    );
    Ok(())
}

/// A mistyped id is not "revoked already": it is an error, as for agent tokens.
async fn revoking_an_unknown_user_token_is_not_found(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("group/app", "a1").await?;
    let (info, _) = store
        .create_user_token(agent.id, "alice", "[]", 4_000_000_000)
        .await?;
    let missing = store.revoke_user_token(info.id + 1000).await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    assert!(
        store.revoke_user_token(info.id).await?,
        "the real one is revoked"
    );
    Ok(())
}

async fn sync_reports_and_config_state_survive_reopening(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let other = store.register_agent("group/project", "other").await?;
    assert!(store.sync_reports(agent.id).await?.is_empty());
    assert_eq!(store.config_state(agent.id).await?, None);

    // Bytes that are not UTF-8 (a NUL, 0xff) must come back unchanged.
    store
        .put_sync_report(agent.id, "b/manifests", &[0, 1, 0xff], &[])
        .await?;
    store
        .put_sync_report(agent.id, "a/manifests", b"first", &[])
        .await?;
    store
        .put_sync_report(agent.id, "a/manifests", b"second", &[])
        .await?;
    store
        .put_sync_report(other.id, "a/manifests", b"other's", &[])
        .await?;
    store.put_config_state(agent.id, b"state 1").await?;
    store.put_config_state(agent.id, &[0, 0xfe]).await?;
    store.close().await;

    let store = db.reopen().await?;
    let expected = [
        ("a/manifests".to_owned(), b"second".to_vec()),
        ("b/manifests".to_owned(), vec![0, 1, 0xff]),
    ];
    assert_eq!(store.sync_reports(agent.id).await?, expected);
    assert_eq!(
        store.sync_report(agent.id, "a/manifests").await?,
        Some(b"second".to_vec())
    );
    assert_eq!(store.sync_report(agent.id, "c/manifests").await?, None);
    assert_eq!(
        store.sync_report(other.id, "a/manifests").await?,
        Some(b"other's".to_vec()),
        "each agent's own"
    );
    assert_eq!(
        store.sync_reports(other.id).await?,
        [("a/manifests".to_owned(), b"other's".to_vec())]
    );
    assert_eq!(store.config_state(agent.id).await?, Some(vec![0, 0xfe]));
    assert_eq!(store.config_state(other.id).await?, None);
    assert_eq!(store.config_states().await?, [(agent.id, vec![0, 0xfe])]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let now = i64::try_from(now).expect("in range");
    let recent = store.config_states_since(now - 60).await?;
    assert_eq!(recent, [(agent.id, vec![0, 0xfe])], "written just now");
    assert!(
        store.config_states_since(now + 3600).await?.is_empty(),
        "none later"
    );
    store.close().await;
    Ok(())
}

async fn agent_state_needs_an_agent_and_goes_away_with_it(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let missing = store.put_sync_report(999, "a/manifests", b"r", &[]).await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    let missing = store.put_config_state(999, b"s").await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    assert!(store.sync_reports(999).await?.is_empty());
    assert_eq!(store.config_state(999).await?, None);

    let agent = store.register_agent("group/project", "agent").await?;
    store
        .put_sync_report(agent.id, "a/manifests", b"r", &[])
        .await?;
    store.put_config_state(agent.id, b"s").await?;
    let (token, _) = store.create_token(agent.id, "t").await?;
    store
        .create_user_token(agent.id, "alice", "[]", i64::MAX)
        .await?;
    store
        .suspend(agent.id, SuspensionScope::Agent, "incident", "admin")
        .await?;
    assert!(store.delete_agent(agent.id).await?);
    assert!(!store.delete_agent(agent.id).await?, "deleted twice");
    store.close().await;

    let store = db.reopen().await?;
    assert!(store.sync_reports(agent.id).await?.is_empty());
    assert_eq!(store.config_state(agent.id).await?, None);
    assert!(store.suspensions(Some(agent.id)).await?.is_empty());
    assert!(store.list_user_tokens(Some(agent.id)).await?.is_empty());
    assert!(!store.token_active(token.id).await?);
    assert!(store.get_agent(agent.id).await?.is_none());
    store.close().await;
    Ok(())
}

async fn suspensions_are_kept_replaced_and_lifted(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let other = store.register_agent("group/project", "other").await?;
    let missing = store
        .suspend(999, SuspensionScope::Agent, "", "admin")
        .await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");

    store
        .suspend(agent.id, SuspensionScope::Project(7), "first", "admin")
        .await?;
    let s = store
        .suspend(
            agent.id,
            SuspensionScope::Project(7),
            "incident 42",
            "alice",
        )
        .await?;
    assert_eq!(
        (s.reason.as_str(), s.suspended_by.as_str()),
        ("incident 42", "alice")
    );
    store
        .suspend(agent.id, SuspensionScope::Agent, "freeze", "admin")
        .await?;
    store
        .suspend(other.id, SuspensionScope::Project(3), "", "admin")
        .await?;
    store.close().await;

    let store = db.reopen().await?;
    let mine = store.suspensions(Some(agent.id)).await?;
    let scopes: Vec<_> = mine.iter().map(|s| s.scope).collect();
    assert_eq!(
        scopes,
        [SuspensionScope::Agent, SuspensionScope::Project(7)]
    );
    assert_eq!(mine[1].reason, "incident 42");
    assert_eq!(store.suspensions(None).await?.len(), 3);

    assert_eq!(
        store.resume(agent.id, SuspensionScope::Project(7)).await?,
        1
    );
    assert_eq!(
        store.resume(agent.id, SuspensionScope::Project(7)).await?,
        0
    );
    store
        .suspend(agent.id, SuspensionScope::Project(8), "", "admin")
        .await?;
    // Resuming the whole agent lifts every suspension it has, and no other agent's.
    assert_eq!(store.resume(agent.id, SuspensionScope::Agent).await?, 2);
    assert!(store.suspensions(Some(agent.id)).await?.is_empty());
    assert_eq!(store.suspensions(None).await?.len(), 1);
    store.close().await;
    Ok(())
}

async fn user_tokens_are_listed_without_their_secrets(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let other = store.register_agent("group/project", "other").await?;
    let (a, _) = store
        .create_user_token(agent.id, "alice", "[]", i64::MAX)
        .await?;
    let (b, _) = store
        .create_user_token(other.id, "bob", "[]", i64::MAX)
        .await?;
    store.revoke_user_token(b.id).await?;
    let mine = store.list_user_tokens(Some(agent.id)).await?;
    assert_eq!(mine, std::slice::from_ref(&a));
    let all = store.list_user_tokens(None).await?;
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), [a.id, b.id]);
    assert!(all[1].revoked_at.is_some());
    store.close().await;
    Ok(())
}

/// Databases written by earlier versions are in WAL mode; opening one must switch it to the
/// rollback journal (no memory-mapped index) and keep its records.
/// The readiness check fails while another process holds the database locked, as every
/// token check then does, and passes once it is released. It ran `SELECT 1`, which touches no
/// table and took no lock: kas kept saying ready (now and then) while it could authenticate
/// nothing.
#[tokio::test]
async fn the_check_fails_while_another_process_locks_the_database() -> TestResult {
    let (_dir, path, store) = open_sqlite().await?;
    store.check().await?;
    let other = rusqlite::Connection::open(&path)?;
    other.execute_batch("BEGIN EXCLUSIVE; SELECT 1;")?;
    let locked = store.check().await;
    assert!(
        matches!(&locked, Err(e) if e.to_string().contains("locked")),
        "{locked:?}"
    );
    // As kas's readiness asks: each check given 1.5 s, every 2 s. None may pass.
    for _ in 0..6 {
        let within = tokio::time::timeout(std::time::Duration::from_millis(1500), store.check());
        assert!(!matches!(within.await, Ok(Ok(()))), "a check passed");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    other.execute_batch("COMMIT;")?;
    store.check().await?;
    Ok(())
}

#[tokio::test]
async fn a_wal_database_is_converted_on_open() -> TestResult {
    let (_dir, path, store) = open_sqlite().await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let (_, token) = store.create_token(agent.id, "before").await?;
    store.close().await;
    let journal_mode = |mode: &'static str| {
        let path = path.clone();
        async move {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
            let mut conn = sqlx::ConnectOptions::connect(&options).await?;
            let query = format!("PRAGMA journal_mode{mode}");
            let mode: String = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
                .fetch_one(&mut conn)
                .await?;
            sqlx::Connection::close(conn).await?;
            Ok::<_, sqlx::Error>(mode)
        }
    };
    assert_eq!(journal_mode(" = WAL").await?, "wal");

    let store = SqliteStore::open(&path).await?;
    assert!(store.authenticate(token.expose()).await?.is_some());
    store.create_token(agent.id, "after").await?;
    store.close().await;
    // Only WAL is recorded in the file; a connection that sets nothing reports the default.
    assert_eq!(
        journal_mode("").await?,
        "delete",
        "the file is still in WAL mode"
    );
    Ok(())
}

/// The outbox sends each (receiver, key) once, hides a claimed message from other claimers,
/// retries at the time given, forgets nothing across a reopen and stops at delivery.
async fn notifications_are_queued_once_claimed_retried_and_finished(
    backend: Backend,
) -> TestResult {
    let (db, store) = open(backend).await?;
    assert!(
        store
            .enqueue_notification("ops", "sync:1:a:failed", None, b"one")
            .await?
    );
    assert!(
        !store
            .enqueue_notification("ops", "sync:1:a:failed", None, b"again")
            .await?
    );
    assert!(
        store
            .enqueue_notification("chat", "sync:1:a:failed", None, b"two")
            .await?
    );
    let claimed = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        (claimed[0].receiver.as_str(), &claimed[0].payload[..]),
        ("ops", &b"one"[..])
    );
    assert!(
        store.claim_notifications(10, 60, 600).await?.is_empty(),
        "claimed ones are held"
    );

    let (ops, chat) = (claimed[0].id, claimed[1].id);
    store
        .finish_notification(ops, &NotificationResult::Delivered)
        .await?;
    let retry = NotificationResult::Retry {
        at: 0,
        error: "503".into(),
    };
    store.finish_notification(chat, &retry).await?;
    store.close().await;

    let store = db.reopen().await?;
    let again = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(again.len(), 1, "only the one to retry: {again:?}");
    assert_eq!((again[0].id, again[0].attempts), (chat, 1));
    let later = NotificationResult::Retry {
        at: unix_now() + 300,
        error: "503".into(),
    };
    store.finish_notification(chat, &later).await?;
    assert!(
        store.claim_notifications(10, 60, 600).await?.is_empty(),
        "not due yet"
    );
    assert!(
        !store
            .enqueue_notification("ops", "sync:1:a:failed", None, b"x")
            .await?,
        "delivered stays known"
    );
    Ok(())
}

fn unix_now() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    i64::try_from(since.expect("clock after 1970").as_secs()).expect("seconds fit in i64")
}

/// Finished messages (delivered or given up) older than the cut-off are deleted, oldest first
/// and at most `limit` per call; messages still to send (claimed, waiting for a retry, never
/// tried) stay however old, recent finished ones stay, and the keys of those kept still keep
/// repeats out while a deleted one's can be queued again.
async fn finished_notifications_past_the_retention_are_deleted_in_batches(
    backend: Backend,
) -> TestResult {
    const DAY: i64 = 86_400;
    let (db, store) = open(backend).await?;
    let keys = [
        "old-1", "old-2", "old-3", "given-up", "recent", "retrying", "claimed",
    ];
    for key in keys {
        store.enqueue_notification("ops", key, None, b"m").await?;
    }
    let claimed = store.claim_notifications(10, 60, 600).await?;
    let id = |key: &str| claimed.iter().find(|n| n.dedup_key == key).map(|n| n.id);
    let id = |key: &str| id(key).ok_or(format!("{key} was not claimed"));
    for key in ["old-1", "old-2", "old-3", "recent"] {
        let delivered = NotificationResult::Delivered;
        store.finish_notification(id(key)?, &delivered).await?;
    }
    let gave_up = NotificationResult::GaveUp {
        error: "410".into(),
    };
    store.finish_notification(id("given-up")?, &gave_up).await?;
    let retry = NotificationResult::Retry {
        at: unix_now() + 300,
        error: "503".into(),
    };
    store.finish_notification(id("retrying")?, &retry).await?;
    store
        .enqueue_notification("ops", "waiting", None, b"m")
        .await?;
    assert_eq!(db.notification_keys().await?.len(), 8);
    // Ten, nine and eight days ago, so "oldest first" has one answer; the messages still to
    // send are as old as the oldest, which must not matter.
    for (key, days) in [("old-1", 10), ("old-2", 9), ("old-3", 8), ("given-up", 8)] {
        db.backdate_notification(id(key)?, days * DAY).await?;
    }
    for key in ["retrying", "claimed"] {
        db.backdate_notification(id(key)?, 10 * DAY).await?;
    }

    let cutoff = unix_now() - 7 * DAY;
    assert_eq!(store.delete_finished_notifications(cutoff, 2).await?, 2);
    let after_one_batch = db.notification_keys().await?;
    let expected = [
        "old-3", "given-up", "recent", "retrying", "claimed", "waiting",
    ];
    assert_eq!(after_one_batch, expected, "the two oldest, and no more");
    assert_eq!(store.delete_finished_notifications(cutoff, 2).await?, 2);
    assert_eq!(store.delete_finished_notifications(cutoff, 2).await?, 0);
    let kept = db.notification_keys().await?;
    assert_eq!(kept, ["recent", "retrying", "claimed", "waiting"]);

    assert!(
        !store
            .enqueue_notification("ops", "recent", None, b"m")
            .await?
    );
    assert!(
        !store
            .enqueue_notification("ops", "claimed", None, b"m")
            .await?
    );
    assert!(
        store
            .enqueue_notification("ops", "old-1", None, b"m")
            .await?
    );
    let due = store.claim_notifications(10, 60, 600).await?;
    let due: Vec<&str> = due.iter().map(|n| n.dedup_key.as_str()).collect();
    assert_eq!(due, ["waiting", "old-1"], "the claimed one is still held");
    Ok(())
}

/// Messages of one ordering key (the states of one commit's status on a forge) replace one
/// another: a `pending` waiting for its retry is never claimed once a newer message of its key
/// is queued, even after that one was delivered, and is dropped; a newer one waits while an
/// older one is being sent (it could arrive after it); other keys and unordered messages are
/// not held up. Across a reopen, as after a restart or on another replica.
async fn ordered_notifications_are_sent_newest_only_and_never_after_a_newer_one(
    backend: Backend,
) -> TestResult {
    let (db, store) = open(backend).await?;
    let c1 = Some("status:1:g/m:c1");
    store
        .enqueue_notification("forge", "c1:pending", c1, b"p")
        .await?;
    let first = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(first.len(), 1);
    // Queued while `pending` is being sent: it waits for it.
    store
        .enqueue_notification("forge", "c1:success", c1, b"s")
        .await?;
    store
        .enqueue_notification("forge", "c2:pending", Some("status:1:g/m:c2"), b"p")
        .await?;
    store
        .enqueue_notification("chat", "c1:recovered", None, b"t")
        .await?;
    let claimable = |n: &[tether_store::PendingNotification]| {
        n.iter().map(|n| n.dedup_key.clone()).collect::<Vec<_>>()
    };
    let second = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(claimable(&second), ["c2:pending", "c1:recovered"]);
    assert_eq!(
        store.drop_replaced_notifications(600).await?,
        0,
        "the one being sent is left to finish"
    );

    let retry = NotificationResult::Retry {
        at: 0,
        error: "500".into(),
    };
    store.finish_notification(first[0].id, &retry).await?;
    store.close().await;
    let store = db.reopen().await?;
    let third = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(claimable(&third), ["c1:success"], "not the stale pending");
    store
        .finish_notification(third[0].id, &NotificationResult::Delivered)
        .await?;
    assert!(
        store.claim_notifications(10, 60, 600).await?.is_empty(),
        "never after the newer one was delivered"
    );
    assert_eq!(store.drop_replaced_notifications(600).await?, 1);
    assert_eq!(store.drop_replaced_notifications(600).await?, 0);
    Ok(())
}

/// A retry time or a claim stored further ahead than the horizon was written by a clock that
/// has since stepped back (kas's clock a day ahead, then corrected by NTP): the message is due
/// now, not a day later; one within the horizon still waits (E14 F9).
async fn a_retry_or_claim_written_by_a_clock_ahead_is_due_once_it_stepped_back(
    backend: Backend,
) -> TestResult {
    let (_db, store) = open(backend).await?;
    let day = 86_400;
    store
        .enqueue_notification("ops", "sync_failed:1:a", None, b"f")
        .await?;
    let claimed = store.claim_notifications(10, 60, 600).await?;
    let ahead = NotificationResult::Retry {
        at: unix_now() + day,
        error: "503".into(),
    };
    store.finish_notification(claimed[0].id, &ahead).await?;
    let again = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(again.len(), 1, "a retry a day ahead is due now");

    let near = NotificationResult::Retry {
        at: unix_now() + 300,
        error: "503".into(),
    };
    store.finish_notification(again[0].id, &near).await?;
    assert!(
        store.claim_notifications(10, 60, 600).await?.is_empty(),
        "a retry within the horizon waits"
    );

    // A claim a day long, as a replica whose clock ran a day ahead stored one.
    store
        .enqueue_notification("forge", "c1:pending", Some("status:1:g/m:c1"), b"p")
        .await?;
    let held = store.claim_notifications(10, day, 2 * day).await?;
    assert_eq!(held.len(), 1);
    let taken = store.claim_notifications(10, 60, 600).await?;
    assert_eq!(
        taken.iter().map(|n| n.id).collect::<Vec<_>>(),
        [held[0].id],
        "a claim past the horizon has lapsed"
    );
    let c2 = Some("status:1:g/m:c2");
    store
        .enqueue_notification("forge", "c2:pending", c2, b"p")
        .await?;
    assert_eq!(store.claim_notifications(10, day, 2 * day).await?.len(), 1);
    store
        .enqueue_notification("forge", "c2:success", c2, b"s")
        .await?;
    assert_eq!(
        store.drop_replaced_notifications(600).await?,
        1,
        "the pending its success replaces, claimed past the horizon, is dropped"
    );
    Ok(())
}

/// A message queued "unless" others is not queued once the receiver has one of them (still to
/// send or finished), whatever its state; other receivers and keys are apart.
async fn a_message_is_not_queued_after_one_it_must_not_replace(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let c1 = Some("status:1:g/m:c1");
    let outcomes = ["c1:success", "c1:failed"];
    store
        .enqueue_notification("forge", "c1:success", c1, b"s")
        .await?;
    assert!(
        !store
            .enqueue_notification_unless("forge", "c1:superseded", c1, b"x", &outcomes)
            .await?
    );
    let claimed = store.claim_notifications(10, 60, 600).await?;
    let keys: Vec<&str> = claimed.iter().map(|n| n.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c1:success"], "the outcome stays the newest");
    store
        .finish_notification(claimed[0].id, &NotificationResult::Delivered)
        .await?;
    assert!(
        !store
            .enqueue_notification_unless("forge", "c1:superseded", c1, b"x", &outcomes)
            .await?,
        "nor after it was delivered"
    );
    assert!(
        store
            .enqueue_notification_unless("other", "c1:superseded", c1, b"x", &outcomes)
            .await?
    );
    let c2 = Some("status:1:g/m:c2");
    assert!(
        store
            .enqueue_notification_unless("forge", "c2:superseded", c2, b"x", &["c2:success"])
            .await?
    );
    Ok(())
}

/// A sync report and the outbox messages it calls for are written together: while the outbox
/// fails, neither is (the report before stays, so a retry sees the same change); once it
/// works, both are; written again (a re-sent report), the messages add nothing, by their keys.
async fn a_sync_report_and_its_notifications_are_stored_together_or_not_at_all(
    backend: Backend,
) -> TestResult {
    let (db, store) = open(backend).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    store
        .put_sync_report(agent.id, "a/manifests", b"first", &[])
        .await?;
    let failed = |receiver: &str| OutboxMessage {
        receiver: receiver.into(),
        dedup_key: "status:c2:failed".into(),
        order_key: Some("status:c2".into()),
        payload: b"failed".to_vec(),
    };
    let messages = [failed("forge"), failed("other")];

    db.outbox_away(true).await?;
    let refused = store
        .put_sync_report(agent.id, "a/manifests", b"second", &messages)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let kept = store.sync_reports(agent.id).await?;
    assert_eq!(kept, [("a/manifests".to_owned(), b"first".to_vec())]);
    db.outbox_away(false).await?;

    let put =
        |report: &'static [u8]| store.put_sync_report(agent.id, "a/manifests", report, &messages);
    assert!(put(b"second").await?, "queued with the retry");
    assert!(!put(b"second").await?, "once");
    let stored = store.sync_reports(agent.id).await?;
    assert_eq!(stored, [("a/manifests".to_owned(), b"second".to_vec())]);
    let claimed = store.claim_notifications(10, 60, 600).await?;
    let got: Vec<(&str, &str)> = claimed
        .iter()
        .map(|n| (n.receiver.as_str(), n.dedup_key.as_str()))
        .collect();
    assert_eq!(
        got,
        [("forge", "status:c2:failed"), ("other", "status:c2:failed")]
    );
    Ok(())
}

/// The last commit sent to an agent of each project is recorded whichever stream sends it:
/// recording another hands back the one before; the same one again, none; other agents and
/// projects are apart; an unknown agent is refused; an agent with records can be deleted.
async fn the_commit_last_offered_is_recorded_per_agent_and_project(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let agent = store.register_agent("group/config", "a").await?;
    let other = store.register_agent("group/config", "b").await?;
    let (id, m) = (agent.id, "group/manifests");
    assert_eq!(store.record_offered_commit(id, m, "c1").await?, None);
    assert_eq!(store.record_offered_commit(id, m, "c1").await?, None);
    assert_eq!(store.record_offered_commit(other.id, m, "x1").await?, None);
    assert_eq!(
        store.record_offered_commit(id, "group/other", "o1").await?,
        None
    );
    let store = db.reopen().await?;
    let before = store.record_offered_commit(id, m, "c2").await?;
    assert_eq!(before.as_deref(), Some("c1"));
    let before = store.record_offered_commit(other.id, m, "x2").await?;
    assert_eq!(before.as_deref(), Some("x1"));
    assert!(matches!(
        store.record_offered_commit(999, m, "c1").await,
        Err(Error::NotFound(_))
    ));
    // Its foreign key would refuse the delete if the record did not go with it.
    assert!(store.delete_agent(id).await?);
    Ok(())
}

/// A web UI session as kas records one.
fn web_session(digest: &str, expires_at: i64) -> WebSession {
    WebSession {
        id_digest: digest.into(),
        role: "viewer".into(),
        subject: Some("sub-1".into()),
        username: Some("alice".into()),
        groups: r#"["ops"]"#.into(),
        csrf: format!("csrf-{digest}"),
        admin_token: None,
        expires_at,
    }
}

/// Sessions are found until they expire or end, survive reopening the store, and stay
/// bounded: expired ones go first, then those expiring soonest.
async fn web_sessions_expire_end_survive_reopening_and_stay_bounded(
    backend: Backend,
) -> TestResult {
    let (db, store) = open(backend).await?;
    let later = unix_now() + 3_600;
    store
        .create_web_session(&web_session("a", later), 3, 3)
        .await?;
    store
        .create_web_session(&web_session("old", unix_now() - 1), 3, 3)
        .await?;
    assert_eq!(store.web_session("a").await?, Some(web_session("a", later)));
    assert_eq!(store.web_session("old").await?, None, "expired");
    assert_eq!(store.web_session("missing").await?, None);

    store.close().await;
    let store = db.reopen().await?;
    assert_eq!(store.web_session("a").await?, Some(web_session("a", later)));
    assert!(store.delete_web_session("a").await?);
    assert!(!store.delete_web_session("a").await?);
    assert_eq!(store.web_session("a").await?, None, "logged out");

    // At most three: the expired one is dropped first, then the one expiring soonest.
    for (i, d) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        let expires = later + i64::try_from(i)?;
        store
            .create_web_session(&web_session(d, expires), 3, 3)
            .await?;
    }
    let mut live = Vec::new();
    for d in ["old", "s1", "s2", "s3", "s4"] {
        if store.web_session(d).await?.is_some() {
            live.push(d);
        }
    }
    assert_eq!(live, ["s2", "s3", "s4"]);
    Ok(())
}

/// One person logging in again and again pushes out only their own sessions; a flood that
/// fills the table pushes out viewers' sessions before any admin's, even one expiring sooner.
/// (Each login dropped the soonest-expiring session of anyone, so a script logging in 10,000
/// times logged every admin out.)
async fn a_login_flood_pushes_out_the_floods_own_sessions_then_viewers_never_admins_first(
    backend: Backend,
) -> TestResult {
    let (_db, store) = open(backend).await?;
    let later = unix_now() + 3_600;
    let mut admin = web_session("admin", later);
    admin.role = "admin".into();
    admin.subject = Some("root".into());
    store.create_web_session(&admin, 4, 2).await?;
    let mut other = web_session("other", later + 1);
    other.subject = Some("bob".into());
    store.create_web_session(&other, 4, 2).await?;
    for i in 0..5 {
        let d = format!("flood-{i}");
        store
            .create_web_session(&web_session(&d, later + 10 + i), 4, 2)
            .await?;
    }
    let mut live = Vec::new();
    for d in [
        "admin", "other", "flood-0", "flood-1", "flood-2", "flood-3", "flood-4",
    ] {
        if store.web_session(d).await?.is_some() {
            live.push(d);
        }
    }
    assert_eq!(
        live,
        ["admin", "other", "flood-3", "flood-4"],
        "per subject"
    );

    // Full of distinct people: the viewer expiring soonest goes, not the admin expiring sooner.
    let mut carol = web_session("carol", later + 100);
    carol.subject = Some("carol".into());
    store.create_web_session(&carol, 4, 2).await?;
    assert!(
        store.web_session("admin").await?.is_some(),
        "an admin pushed out"
    );
    assert!(store.web_session("other").await?.is_none());
    assert!(store.web_session("carol").await?.is_some());
    Ok(())
}

/// A kas rolled back (or an old replica restarting mid-rollout) opens a database a newer kas
/// migrated further: it starts, with the records, instead of refusing a migration it does not
/// know (sqlx's `VersionMissing`).
async fn a_database_migrated_by_a_newer_kas_still_opens(backend: Backend) -> TestResult {
    let (db, store) = open(backend).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    store.close().await;
    db.record_migration(9999).await?;

    let store = db.reopen().await?;
    assert_eq!(store.get_agent(agent.id).await?, Some(agent));
    store.register_agent("group/project", "another").await?;
    Ok(())
}

/// Two replicas record a token's use in any order: the later time stays; unknown ids are
/// ignored; a token never marked has none. A recorded time more than 10 minutes ahead of a new
/// one came from a clock since stepped back: the new one replaces it.
async fn a_tokens_last_use_never_moves_back(backend: Backend) -> TestResult {
    let (_db, store) = open(backend).await?;
    let agent = store.register_agent("group/project", "agent").await?;
    let (used, _) = store.create_token(agent.id, "used").await?;
    let (spare, _) = store.create_token(agent.id, "spare").await?;
    assert_eq!(used.last_used_at, None);
    store.mark_tokens_used(&[used.id, 999_999], 200).await?;
    store.mark_tokens_used(&[used.id], 100).await?;
    let tokens = store.list_tokens(agent.id).await?;
    let of = |id: i64| tokens.iter().find(|t| t.id == id).map(|t| t.last_used_at);
    assert_eq!(of(used.id), Some(Some(200)));
    assert_eq!(of(spare.id), Some(None));
    store.mark_tokens_used(&[spare.id], 100 + 86_400).await?;
    store.mark_tokens_used(&[spare.id], 100).await?;
    let tokens = store.list_tokens(agent.id).await?;
    let last = tokens
        .iter()
        .find(|t| t.id == spare.id)
        .map(|t| t.last_used_at);
    assert_eq!(
        last,
        Some(Some(100)),
        "a day ahead: from a clock stepped back since"
    );
    Ok(())
}

on_both_backends!(
    a_tokens_last_use_never_moves_back,
    a_database_migrated_by_a_newer_kas_still_opens,
    finished_notifications_past_the_retention_are_deleted_in_batches,
    notifications_are_queued_once_claimed_retried_and_finished,
    ordered_notifications_are_sent_newest_only_and_never_after_a_newer_one,
    a_retry_or_claim_written_by_a_clock_ahead_is_due_once_it_stepped_back,
    a_message_is_not_queued_after_one_it_must_not_replace,
    a_sync_report_and_its_notifications_are_stored_together_or_not_at_all,
    the_commit_last_offered_is_recorded_per_agent_and_project,
    active_tokens_are_found_in_batches,
    active_user_tokens_are_neither_revoked_nor_expired,
    register_token_authenticate,
    wrong_tokens_are_rejected,
    revoked_token_is_rejected,
    two_tokens_per_agent,
    tokens_of_different_agents_are_kept_apart,
    invalid_names_are_rejected,
    duplicate_agent_is_rejected_and_leaves_no_trace,
    projects_and_listings,
    unknown_agent_for_tokens,
    reopening_keeps_the_data,
    deleted_ids_are_never_given_again,
    token_debug_and_display_are_redacted,
    (flavor = "multi_thread", worker_threads = 2) concurrent_writers_wait_instead_of_failing,
    project_sources_are_set_read_and_removed,
    user_tokens_authenticate_until_revoked_or_expired,
    revoking_an_unknown_user_token_is_not_found,
    sync_reports_and_config_state_survive_reopening,
    agent_state_needs_an_agent_and_goes_away_with_it,
    suspensions_are_kept_replaced_and_lifted,
    user_tokens_are_listed_without_their_secrets,
    web_sessions_expire_end_survive_reopening_and_stay_bounded,
    a_login_flood_pushes_out_the_floods_own_sessions_then_viewers_never_admins_first,
);
