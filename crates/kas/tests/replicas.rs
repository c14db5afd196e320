//! Several kas replicas sharing PostgreSQL and Redis, as real processes: a token revoked on one
//! replica ends the agent's streams on another within a second, and readiness follows Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::gitops::{RigArgs, configmap, rig_opts};
use support::{Agent, GitRepo, Kas, KasOptions, wait_for};
use tether_store::{Store, SuspensionScope};
use tether_testenv::postgres::Postgres;
use tether_testenv::redis::Redis;

/// PostgreSQL and Redis for the replicas, and the options each replica starts with. The token
/// re-check is an hour, so only Redis can carry a revocation across in time.
struct Shared {
    pg: Postgres,
    redis: Redis,
    yaml: String,
    url: String,
}

impl Shared {
    fn start() -> Shared {
        Shared::with_redis(Redis::start().unwrap(), None)
    }

    /// Redis reached over TLS (`rediss://`, trusting `pki`'s CA).
    fn start_tls(pki: &support::Pki) -> Shared {
        Shared::with_redis(Redis::start_tls(&pki.cert, &pki.key).unwrap(), Some(pki))
    }

    fn with_redis(redis: Redis, tls: Option<&support::Pki>) -> Shared {
        let pg = Postgres::start().unwrap();
        let url = pg.create_database("kas").unwrap();
        let redis_url = match tls {
            Some(pki) => format!(
                "{}\n  ca_file: {}",
                redis.tls_url().unwrap(),
                pki.ca.display()
            ),
            None => redis.url(),
        };
        let yaml = format!(
            "database:\n  url: {url}\nredis:\n  url: {redis_url}\n  password_file: {}\n",
            redis.password_file().unwrap().display()
        );
        Shared {
            pg,
            redis,
            yaml,
            url,
        }
    }

    /// The replicas' database, for writing to it behind their back.
    fn database_url(&self) -> String {
        self.url.clone()
    }

    fn options(&self) -> KasOptions {
        KasOptions {
            token_recheck: "1h",
            // Only webhooks make kas fetch in time.
            git_poll: "1h",
            extra_yaml: self.yaml.clone(),
            ..KasOptions::default()
        }
    }

    async fn replica(&self, dir: &std::path::Path) -> Kas {
        Kas::start(dir, self.options()).await
    }
}

/// An agent registered on `one` and its agentk connected there (its files in `dir`).
async fn agent_on(one: &Kas, dir: &std::path::Path) -> (tether_kas_api::TokenCreated, Agent) {
    let t = one
        .admin
        .register_agent("group/app", "agent")
        .await
        .unwrap();
    let agent = Agent::start(dir, "agentk", &one.url("grpc"), &t.token, None);
    one.wait_connected(t.agent_id).await;
    (t, agent)
}

/// Waits up to `secs` for kas's `kas_redis_channel_subscribed` to read `value`.
async fn wait_subscribed(kas: &Kas, what: &str, value: f64, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || async {
        (kas.metric("kas_redis_channel_subscribed").await == Some(value)).then_some(())
    })
    .await;
}

/// Waits up to `secs` for kas's `/readiness` to answer `code`.
async fn wait_readiness(kas: &Kas, what: &str, code: u16, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || async {
        (kas.readiness().await == Some(code)).then_some(())
    })
    .await;
}

/// A kas on its own PostgreSQL reaching `redis` through a relay on `port`.
async fn replica_through(redis: &Redis, port: u16) -> (Postgres, tempfile::TempDir, Kas) {
    let pg = Postgres::start().unwrap();
    let url = pg.create_database("kas").unwrap();
    let extra_yaml = format!(
        "database:\n  url: {url}\nredis:\n  url: redis://127.0.0.1:{port}/0\n  password_file: {}\n",
        redis.password_file().unwrap().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let opts = KasOptions {
        extra_yaml,
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
    (pg, dir, kas)
}

/// Redis connections left half-open (a failover, or a load balancer that dropped their state
/// without a reset: nothing arrives, nothing fails) are noticed and replaced: kas is ready
/// again within seconds, and its revocation channel, pinged, subscribes again. The client
/// reconnects only on a failure, so kas stayed not ready (and deaf to other replicas'
/// revocations) until the kernel gave up on the socket, many minutes later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_gone_silent_are_replaced_and_the_channel_resubscribes() {
    let redis = Redis::start().unwrap();
    let relay = tether_test_support::net::SilencingRelay::start(redis.port).await;
    let (_pg, _dir, kas) = replica_through(&redis, relay.port).await;
    wait_readiness(&kas, "kas ready", 200, 10).await;

    relay.silence_open_connections();
    wait_readiness(&kas, "kas not ready", 503, 10).await;
    wait_readiness(&kas, "kas ready again", 200, 30).await;
    wait_for(
        "the channel subscribed again",
        Duration::from_secs(60),
        || async {
            kas.log()
                .contains("Following the Redis revocation channel again")
                .then_some(())
        },
    )
    .await;
    assert!(
        kas.log().contains("replaced it with a new one"),
        "{}",
        kas.log()
    );
}

/// A replica cut from Redis exports it: `kas_redis_channel_subscribed` drops to 0 (what
/// `TetherKasRedisChannelDown` follows) and each lost subscription or failed attempt counts in
/// `kas_redis_channel_losses_total`; subscribed again, the gauge is back to 1. Nothing told an
/// operator that a replica was deaf to the others' revocations but its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_redis_exports_its_lost_channel_until_it_resubscribes() {
    let redis = Redis::start().unwrap();
    let relay = tether_test_support::net::SeveringRelay::start(redis.port).await;
    let (_pg, _dir, kas) = replica_through(&redis, relay.port).await;
    let losses = "kas_redis_channel_losses_total";
    wait_subscribed(&kas, "subscribed", 1.0, 10).await;
    assert_eq!(kas.metric(losses).await, Some(0.0));

    relay.sever();
    wait_subscribed(&kas, "the loss exported", 0.0, 10).await;
    assert!(kas.metric(losses).await >= Some(1.0));
    support::monitoring::assert_area_exported("replicas.rs", &[&kas.metrics_text().await.unwrap()]);

    relay.restore();
    wait_subscribed(&kas, "subscribed again", 1.0, 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_replica_ends_its_streams_on_another_within_a_second() {
    revoked_on_two_ends_streams_on_one(&Shared::start()).await;
}

/// The same through a Redis that speaks only TLS to kas (`rediss://` with the CA's file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_redis_over_tls() {
    let pki = support::Pki::temporary();
    let shared = Shared::start_tls(&pki);
    assert!(
        shared.yaml.contains("rediss://localhost:"),
        "{}",
        shared.yaml
    );
    revoked_on_two_ends_streams_on_one(&shared).await;
}

/// An agent on replica 1, its token revoked on replica 2: its streams on replica 1 end within
/// a second (only Redis can carry it: the token re-check is an hour).
async fn revoked_on_two_ends_streams_on_one(shared: &Shared) {
    let dir = tempfile::tempdir().unwrap();
    let one = shared.replica(&dir.path().join("kas-1")).await;
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let (t, agent) = agent_on(&one, dir.path()).await;

    let started = Instant::now();
    let revoked = two.admin.revoke_token(t.token_id).await.unwrap();
    assert!(revoked.was_active);
    assert_eq!(
        revoked.streams_ended, 0,
        "the agent's streams are on the other replica"
    );
    one.wait_disconnected(t.agent_id).await;
    let took = started.elapsed();
    eprintln!("streams on replica 1 ended {took:?} after the revocation on replica 2");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(
        one.log()
            .contains("Ended what a revoked token opened on this replica"),
        "{}",
        one.log()
    );
    // The agent is refused from then on, on either replica.
    wait_for(
        "the agent to hear it is revoked",
        Duration::from_secs(10),
        || async {
            agent
                .log()
                .to_lowercase()
                .contains("unauthenticated")
                .then_some(())
        },
    )
    .await;
}

/// A token revoked on replica 2 while Redis is down: the revocation is stored, but replica 1
/// cannot be told. The CLI says so and exits 2 (it printed success); and replica 1 re-checks
/// every live token as soon as it is subscribed again, so the agent's streams there end
/// seconds after Redis is back (they lived until the periodic re-check, an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_while_redis_is_down_ends_its_streams_on_another_replica_once_redis_is_back()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut shared = Shared::start();
    let one = shared.replica(&dir.path().join("kas-1")).await;
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let (t, _agent) = agent_on(&one, dir.path()).await;
    wait_subscribed(&one, "replica 1 subscribed", 1.0, 10).await;

    shared.redis.stop();
    wait_subscribed(&one, "replica 1's loss", 0.0, 10).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&two.config)
        .args(["token", "revoke", &t.token_id.to_string()])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&format!("token {} revoked", t.token_id)),
        "{said}"
    );
    assert!(
        said.contains("the other kas replicas could not be told now (Redis: ")
            && said.contains("as soon as they are subscribed to Redis again"),
        "{said}"
    );
    // Replica 1 has not heard: the agent is still connected there.
    assert!(one.agent(t.agent_id).await.connected);

    shared.redis.restart().unwrap();
    let back = Instant::now();
    wait_subscribed(&one, "replica 1 subscribed again", 1.0, 30).await;
    one.wait_disconnected(t.agent_id).await;
    let took = back.elapsed();
    eprintln!("streams on replica 1 ended {took:?} after Redis came back");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_ready_only_while_redis_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut shared = Shared::start();
    let kas = shared.replica(&dir.path().join("kas")).await;
    // The observability endpoint is the last module to start.
    wait_readiness(&kas, "kas ready", 200, 10).await;
    shared.redis.stop();
    wait_readiness(&kas, "kas not ready", 503, 10).await;
    assert!(kas.log().contains("Redis"), "{}", kas.log());
    shared.redis.restart().unwrap();
    wait_readiness(&kas, "kas ready again", 200, 15).await;
}

/// The peers listener (which the chart binds for every pod to reach) holds at most
/// `peers.max_connections`: more are closed on arrival and counted, so a flood of connections
/// cannot take kas's file descriptors from its agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peers_listener_closes_connections_over_its_cap() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = Shared::start();
    let mut opts = with_peers(shared.options(), dir.path());
    // with_peers' section is the last of the file: this key joins it.
    opts.extra_yaml.push_str("  max_connections: 2\n");
    let port = peers_port(&opts);
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", port));
    let _held = [connect().await.unwrap(), connect().await.unwrap()];
    wait_for("two connections held", Duration::from_secs(5), || async {
        kas.metric(r#"kas_listener_connections{listener="peers"}"#)
            .await
            .filter(|n| *n == 2.0)
    })
    .await;
    let mut third = connect().await.unwrap();
    let mut buf = [0u8; 16];
    // Closed at once: well before the 5 s a connection has to send its preamble.
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    let series =
        r#"kas_listener_connections_refused_total{listener="peers",reason="max_connections"}"#;
    assert_eq!(kas.metric(series).await, Some(1.0));
}

/// The peers address of a replica [`with_peers`] configured, read from its configuration.
fn peers_address(kas: &Kas) -> String {
    let config = std::fs::read_to_string(&kas.config).unwrap();
    let listen = config.split("peers:\n  listen: ").nth(1).unwrap();
    listen.lines().next().unwrap().to_owned()
}

/// The port of the peers listener [`with_peers`] configured.
fn peers_port(opts: &KasOptions) -> u16 {
    let listen = opts
        .extra_yaml
        .split("peers:\n  listen: 127.0.0.1:")
        .nth(1)
        .unwrap();
    listen.lines().next().unwrap().parse().unwrap()
}

/// A Redis password rotated as operators do it: the new one in kas's password file (the
/// Secret), and Redis restarted with it. kas used to reconnect with the password it read at
/// start forever — not ready, and deaf to other replicas' revocations; it now follows the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_redis_password_is_followed_without_restarting_kas() {
    let dir = tempfile::tempdir().unwrap();
    let mut shared = Shared::start();
    let one = shared.replica(&dir.path().join("kas-1")).await;
    wait_readiness(&one, "kas ready", 200, 10).await;

    shared.redis.password = format!("rotated-{}", std::process::id());
    shared.redis.password_file().unwrap();
    shared.redis.restart().unwrap();
    wait_readiness(&one, "kas not ready", 503, 10).await;
    wait_readiness(&one, "kas ready on the new password", 200, 40).await;
    // Whichever notices first: the file watch, or the silent-connection check (which opens
    // its new connection with the files as they are now).
    let log = one.log();
    assert!(
        log.contains("Redis credential files changed: connected with them")
            || log.contains("replaced it with a new one"),
        "{log}"
    );

    // Its revocation channel is back too: a revocation on a new replica ends its streams.
    wait_for(
        "the revocation channel followed again",
        Duration::from_secs(10),
        || async {
            one.log()
                .contains("Following the Redis revocation channel again")
                .then_some(())
        },
    )
    .await;
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let (t, _agent) = agent_on(&one, dir.path()).await;
    let revoked = two.admin.revoke_token(t.token_id).await.unwrap();
    assert_eq!(revoked.streams_ended, 0, "the streams are on replica 1");
    one.wait_disconnected(t.agent_id).await;
}

/// A GitOps rig (its kas is replica 1) whose agent synchronized one ConfigMap in a new
/// namespace `name-…`: the rig, the namespace and the commit.
async fn synced_rig(name: &str, opts: KasOptions) -> (support::gitops::Rig, String, String) {
    synced_rig_with(name, opts, "").await
}

/// As [`synced_rig`], with `config_extra` appended to the agent's `config.yaml`.
async fn synced_rig_with(
    name: &str,
    opts: KasOptions,
    config_extra: &str,
) -> (support::gitops::Rig, String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = tether_testenv::TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(name).unwrap();
    let rbac = support::gitops::admin_rbac(&ns);
    let c = configmap("first", &ns, "1");
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &rbac,
        project_extra: config_extra,
        initial: &[("manifests/cm.yaml", Some(&c[..]))],
        agent_args: &[],
    };
    let (rig, c1) = rig_opts(args, opts).await;
    rig.synced(&c1).await;
    (rig, ns, c1)
}

/// With each replica keeping its own mirrors, a push webhook sent to replica 2 makes replica 1,
/// which serves the agent, fetch too: the commit is applied at once (the poll is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_sent_to_one_replica_drives_the_sync_of_an_agent_on_another() {
    let shared = Shared::start();
    let (rig, ns, _) = synced_rig("replicas", shared.options()).await;
    let dir = tempfile::tempdir().unwrap();
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, "replica-hook\n").unwrap();
    let project = rig
        .set_manifests_project(kas::api::ProjectRequest {
            webhook_secret_file: Some(secret.display().to_string()),
            ..kas::api::ProjectRequest::default()
        })
        .await;

    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("first", &ns, "2")))],
        "second",
    );
    let headers = [
        ("x-gitlab-token", "replica-hook".to_owned()),
        ("x-gitlab-event", "Push Hook".to_owned()),
    ];
    let body = br#"{"ref":"refs/heads/main","after":"0"}"#;
    assert_eq!(two.webhook(project.id, &headers, body).await, 200);
    let synced = rig.synced(&c2).await;
    assert_eq!(synced.outcome, tether_kas_api::ReportedOutcome::Succeeded);
    assert!(
        rig.kas
            .log()
            .contains("Push webhook taken by another replica"),
        "{}",
        rig.kas.log()
    );
}

/// A project set through replica 2 — here moved to another repository — takes effect on
/// replica 1, which serves the agent: replica 1 mirrors the new remote and the agent applies
/// its commit (without this, replica 1 kept the old remote until it restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_set_through_one_replica_is_mirrored_by_the_others() {
    let shared = Shared::start();
    let (rig, ns, _) = synced_rig("moved", shared.options()).await;
    let dir = tempfile::tempdir().unwrap();
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let moved = support::GitRepo::init(&dir.path().join("moved"));
    let c2 = moved.commit(
        &[("manifests/cm.yaml", Some(&configmap("first", &ns, "moved")))],
        "in the new repository",
    );
    let request = kas::api::ProjectRequest {
        path: "group/manifests".into(),
        remote: Some(moved.dir.display().to_string()),
        ..kas::api::ProjectRequest::default()
    };
    two.admin.set_project(&request).await.unwrap();
    let synced = rig.synced(&c2).await;
    assert_eq!(synced.outcome, tether_kas_api::ReportedOutcome::Succeeded);

    // Removed through replica 2: replica 1 stops mirroring it too.
    two.admin.remove_project("group/manifests").await.unwrap();
    wait_for(
        "replica 1 to drop the project",
        Duration::from_secs(10),
        || async {
            rig.kas
                .log()
                .contains("Project removed (through another replica)")
                .then_some(())
        },
    )
    .await;
}

/// A suspension asked of a replica that holds only a follower agentk reaches the leader's
/// GitOps stream on another replica (it reached only the streams of the replica asked, so
/// the leader kept applying while the CLI said "suspended").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_asked_of_any_replica_reaches_the_leader() {
    let shared = Shared::start();
    let (rig, _, _) = synced_rig("suspended", shared.options()).await;
    let dir = tempfile::tempdir().unwrap();
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let _follower = follower(&rig, dir.path(), &two).await;

    let request = tether_kas_api::SuspendRequest {
        reason: "incident 7".into(),
        ..tether_kas_api::SuspendRequest::default()
    };
    two.admin.suspend(rig.agent_id, &request).await.unwrap();
    rig.agent
        .wait_line("the leader to hear of the suspension", |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("GitOps suspended by kas"))
                && l["reason"] == "incident 7"
        })
        .await;
}

/// `kas agent reconcile --wait` through a replica holding only a follower agentk's tunnels
/// (the leader's GitOps stream is on another replica) reaches the leader and waits for its
/// sync: exit 0. It counted only the GitOps streams of the replica asked, said "no GitOps
/// stream" and exited 4 without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_through_a_replica_with_only_a_follower_reaches_the_leader() {
    let (_shared, dir, (rig, _, _), two) = peered_pair("followed").await;
    let _follower = follower(&rig, dir.path(), &two).await;

    let id = rig.agent_id.to_string();
    let out = two
        .cli()
        .args(["agent", "reconcile", &id, "--wait", "--timeout", "90s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains("no GitOps stream"), "{stdout}");
    assert!(
        stdout.contains("succeeded: 1 applied, 1 Current"),
        "the leader's sync was waited for: {stdout}"
    );
}

/// The replica holding every connection of an agent that no agentk replica leads (its Lease
/// out of reach) counts its GitOps streams — none — so `kas agent status` can say so (exit 8),
/// through it or through another replica (which asks it). With replicas the count was never
/// given: an agent whose ServiceAccount token expired read `succeeded`, exit 0 (E14 F23).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_holding_an_agent_without_a_leader_counts_its_streams() {
    let (_shared, dir, (mut rig, _, _), two) = peered_pair("leaderless").await;
    let one = &rig.kas;
    let streams = |kas: &Kas| {
        let admin = kas.admin.clone();
        let id = rig.agent_id;
        async move {
            let syncs = admin.gitops_status(id).await.ok()?;
            syncs.first().map(|s| s.streams)
        }
    };
    assert_eq!(
        streams(one).await,
        Some(Some(1)),
        "the leader's stream, here"
    );
    assert_eq!(streams(&two).await, Some(Some(1)), "asked of the holder");
    rig.agent.stop();
    // A Lease in a namespace that does not exist: connected, never leading.
    let mut args = rig.agent_args.clone();
    let at = args
        .iter()
        .position(|a| a == "--leader-election-namespace")
        .unwrap();
    args[at + 1] = "no-such-namespace".to_owned();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    rig.agent = Agent::start_with(
        dir.path(),
        "leaderless",
        &one.url("grpc"),
        &rig.token,
        None,
        &args,
    );
    wait_for(
        "the agent to fail its election",
        Duration::from_secs(30),
        || async {
            rig.agent
                .log()
                .contains("Leader election failed")
                .then_some(())
        },
    )
    .await;
    let one = &rig.kas;
    wait_for(
        "no stream counted by the holder",
        Duration::from_secs(30),
        || async { (streams(one).await == Some(Some(0))).then_some(()) },
    )
    .await;
    assert_eq!(streams(&two).await, Some(Some(0)));
}

/// With Redis unreachable, a replica not holding the agent cannot ask the others whether they
/// hold it: `kas agent status` through it says the connection is unknown, naming what did not
/// answer, and exits 7. It said "offline" and exited 0 (the list was the replica's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_through_a_replica_cut_from_redis_says_unknown_not_offline() {
    let (mut shared, _dir, (rig, _, _), two) = peered_pair("unknown").await;
    let id = rig.agent_id.to_string();
    let status = |kas: &Kas| {
        let out = kas.cli().args(["agent", "status", &id]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = status(&two);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("agent {id}: connected")),
        "{stdout}"
    );

    shared.redis.stop();
    let (code, stdout, stderr) = status(&two);
    assert!(!stdout.contains("offline"), "{stdout}");
    assert!(stdout.contains(": unknown (the other replicas"), "{stdout}");
    assert_eq!(code, Some(7), "{stdout}\n{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");
}

/// A suspension whose Redis message never came (the subscription was down at that moment; here
/// it is written to the database behind kas's back) still reaches the leader's stream: every
/// replica re-reads the suspensions every 10 s. A resumption too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_whose_message_was_lost_still_reaches_the_leader() {
    let shared = Shared::start();
    let (rig, _, _) = synced_rig("lostsusp", shared.options()).await;
    let store = tether_store::PgStore::connect(&shared.database_url())
        .await
        .unwrap();
    store
        .suspend(rig.agent_id, SuspensionScope::Agent, "incident 9", "dba")
        .await
        .unwrap();
    rig.agent
        .wait_line("the leader to hear of the suspension", |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("GitOps suspended by kas"))
                && l["reason"] == "incident 9"
        })
        .await;
    store
        .resume(rig.agent_id, SuspensionScope::Agent)
        .await
        .unwrap();
    rig.agent
        .wait_line("the leader to hear of the resumption", |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("GitOps resumed"))
        })
        .await;
}

/// A second agentk Pod of `rig`'s agent (a follower: the rig's leads), connected to `kas`.
async fn follower(rig: &support::gitops::Rig, dir: &std::path::Path, kas: &Kas) -> Agent {
    let args: Vec<&str> = rig.agent_args.iter().map(String::as_str).collect();
    let agent = Agent::start_with(dir, "follower", &kas.url("grpc"), &rig.token, None, &args);
    kas.wait_connected(rig.agent_id).await;
    agent
}

/// Two replicas with peers listeners: a [`synced_rig`] (its kas is replica 1) and replica 2.
async fn peered_pair(
    name: &str,
) -> (
    Shared,
    tempfile::TempDir,
    (support::gitops::Rig, String, String),
    Kas,
) {
    let shared = Shared::start();
    let dir = tempfile::tempdir().unwrap();
    let opts = with_peers(shared.options(), dir.path());
    let rig = synced_rig(name, opts).await;
    let two = Kas::start(
        &dir.path().join("kas-2"),
        with_peers(shared.options(), dir.path()),
    )
    .await;
    (shared, dir, rig, two)
}

/// The replicas of [`Shared`], each with its private peers listener.
async fn replicas_with_peers(
    shared: &Shared,
    dir: &std::path::Path,
    n: usize,
    pki: &support::Pki,
) -> Vec<Kas> {
    replicas_with(shared, dir, n, pki, &|_, o| o).await
}

/// Options of replica `i`, changed by a test.
type Customize<'a> = &'a dyn Fn(usize, KasOptions) -> KasOptions;

/// [`replicas_with_peers`], each replica's options passed through `custom`.
async fn replicas_with(
    shared: &Shared,
    dir: &std::path::Path,
    n: usize,
    pki: &support::Pki,
    custom: Customize<'_>,
) -> Vec<Kas> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut opts = custom(i, with_peers(shared.options(), dir));
        opts.git_poll = "1s";
        // kubectl sends a bearer token over TLS only.
        opts.k8s_tls = Some((pki.cert.clone(), pki.key.clone()));
        out.push(Kas::start(&dir.join(format!("kas-{i}")), opts).await);
    }
    out
}

/// `opts` with a private peers listener; the replicas' shared secret is kept in `dir`.
fn with_peers(mut opts: KasOptions, dir: &std::path::Path) -> KasOptions {
    let secret = dir.join("peer-secret");
    std::fs::write(&secret, "replicas-share-this\n").unwrap();
    opts.extra_yaml.push_str(&format!(
        "peers:\n  listen: 127.0.0.1:{}\n  secret_file: {}\n",
        support::free_port(),
        secret.display()
    ));
    opts
}

/// Makes PostgreSQL refuse every write of a configuration state (as a full disk would) until
/// the trigger `refuse` is dropped.
fn refuse_config_writes(pg: &Postgres) {
    pg.sql_in(
        "kas",
        "CREATE FUNCTION refuse() RETURNS trigger AS $$BEGIN RAISE EXCEPTION 'disk full (simulated)'; END$$ LANGUAGE plpgsql;\
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON config_states FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .unwrap();
}

/// kubectl with only a server and a person's token (no client certificate to fall back on).
fn person_kubectl(
    env: &tether_testenv::TestEnv,
    (dir, ca): (&std::path::Path, &std::path::Path),
    port: u16,
    token: &str,
) -> std::process::Command {
    let kubeconfig = dir.join(format!("person-{port}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kas\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\ncontexts:\n- name: kas\n  context:\n    cluster: kas\n    user: person\ncurrent-context: kas\nusers:\n- name: person\n  user:\n    token: {token}\n",
            ca = ca.display()
        ),
    )
    .unwrap();
    let mut c = std::process::Command::new(env.bin_dir.join("kubectl"));
    c.arg("--kubeconfig").arg(kubeconfig);
    c
}

/// Three replicas, an agent whose connections go through a balancer in front of them (to the
/// first that lives), and a person allowed to use the agent.
struct Routed {
    env: tether_testenv::TestEnv,
    ns: String,
    kas: Vec<Kas>,
    agent: Agent,
    agent_id: i64,
    /// `pat:<agent id>:<token>`.
    token: String,
    /// That token's id.
    token_id: i64,
    pki: support::Pki,
    dir: tempfile::TempDir,
    /// The agent's token and kubeconfig, to start it again elsewhere.
    agent_token: String,
    agent_kubeconfig: String,
    shared: Shared,
}

impl Routed {
    async fn start() -> Routed {
        Routed::start_with(None, &|_, o| o).await
    }

    /// With the agent's kubeconfig (default: the test cluster's) and each replica's options
    /// passed through `custom`.
    async fn start_with(
        agent_kubeconfig: Option<std::path::PathBuf>,
        custom: Customize<'_>,
    ) -> Routed {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let env = tether_testenv::TestEnv::from_env().expect("a running control plane");
        let ns = env.create_namespace("routed").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::start();
        let pki = support::Pki::temporary();
        let kas = replicas_with(&shared, dir.path(), 3, &pki, custom).await;
        let repo = support::GitRepo::init(&dir.path().join("config"));
        let config = b"user_access:\n  access_as:\n    agent: {}\n  projects:\n  - id: group/app\n";
        let commit = repo.commit(
            &[(".gitlab/agents/proxy/config.yaml", Some(&config[..]))],
            "access",
        );
        kas[0].set_projects(&[("group/config", &repo)]).await;
        let t = kas[0]
            .admin
            .register_agent("group/config", "proxy")
            .await
            .unwrap();
        let kubeconfig = agent_kubeconfig.unwrap_or_else(|| env.kubeconfig.clone());
        let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
        let lb = balancer(kas.iter().map(|k| k.agent_port).collect()).await;
        let url = format!("grpc://127.0.0.1:{lb}");
        let agent = Agent::start_with(
            dir.path(),
            "proxy",
            &url,
            &t.token,
            None,
            &["--kubeconfig", &kubeconfig],
        );
        agent.wait_log("Agent configuration applied", &commit).await;
        let request = kas::api::UserTokenRequest {
            username: "alice".into(),
            memberships: vec!["project:group/app:42:developer".parse().unwrap()],
            expires_in_seconds: Some(3600),
        };
        let pat = kas[0]
            .admin
            .create_user_token(t.agent_id, &request)
            .await
            .unwrap();
        let token = format!("pat:{}:{}", t.agent_id, pat.token);
        Routed {
            env,
            ns,
            kas,
            agent,
            agent_id: t.agent_id,
            token,
            token_id: pat.token_id,
            pki,
            dir,
            agent_token: t.token,
            agent_kubeconfig: kubeconfig,
            shared,
        }
    }

    /// Stops agentk and starts it again connected straight to replica `to`.
    fn move_agent(&mut self, to: usize) {
        self.agent.stop();
        let url = format!("grpc://127.0.0.1:{}", self.kas[to].agent_port);
        let extra = ["--kubeconfig", self.agent_kubeconfig.as_str()];
        let dir = self.dir.path();
        self.agent = Agent::start_with(dir, "proxy", &url, &self.agent_token, None, &extra);
    }

    /// The status of the person's GET of the namespace's ConfigMaps through replica `i`.
    async fn get_status(&self, i: usize) -> u16 {
        self.person_get(i)().await
    }

    /// The person's GET of the namespace's ConfigMaps through replica `i`, to send from a task
    /// of its own: its status.
    fn person_get(&self, i: usize) -> impl Fn() -> BoxFuture<'static, u16> + Send + 'static {
        let (port, ca) = (self.kas[i].k8s_port, self.pki.ca.clone());
        let path = format!("/api/v1/namespaces/{}/configmaps", self.ns);
        let bearer = format!("Bearer {}", self.token);
        move || {
            let (ca, path, bearer) = (ca.clone(), path.clone(), bearer.clone());
            Box::pin(async move {
                let mut sender = support::upgrade::tls_http1(port, &ca).await;
                let request = http::Request::get(path)
                    .header("authorization", bearer)
                    .body(http_body_util::Empty::new())
                    .unwrap();
                let response = sender.send_request(request).await;
                response.unwrap().status().as_u16()
            })
        }
    }

    /// The replica holding the agent's tunnels.
    async fn holder(&self) -> usize {
        wait_for(
            "a replica to hold the agent",
            Duration::from_secs(30),
            || async {
                for (i, kas) in self.kas.iter().enumerate() {
                    if kas.admin.stats().await.ok()?.connected_agents == 1 {
                        return Some(i);
                    }
                }
                None
            },
        )
        .await
    }

    /// Makes replica `i` remember the person's token as valid: two requests, one look-up.
    async fn remember_token(&self, i: usize) {
        let series =
            "kas_store_operations_total{operation=\"authenticate_user_token\",kind=\"read\"}";
        let lookups = || async { self.kas[i].metric(series).await.unwrap_or(0.0) };
        let before = lookups().await;
        assert_eq!(self.get_status(i).await, 200);
        assert_eq!(self.get_status(i).await, 200);
        let looked_up = lookups().await - before;
        assert_eq!(looked_up, 1.0, "remembered after one look-up");
    }

    /// Waits up to `within` for replica `i` to refuse the person's (revoked) token.
    async fn refused_by(&self, i: usize, within: Duration) {
        let t0 = Instant::now();
        let what = format!("replica {} to refuse the revoked token", i + 1);
        wait_for(&what, within, || async {
            (self.get_status(i).await == 401).then_some(())
        })
        .await;
        eprintln!("{what}: {:?} after the revocation", t0.elapsed());
    }

    /// The person's GETs through replica `via`, one every 50 ms from a task of its own, until
    /// the returned flag is set: the task answers their statuses, in order.
    fn requests_flowing(
        &self,
        via: usize,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        tokio::task::JoinHandle<Vec<u16>>,
    ) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stopped, get) = (Arc::clone(&stop), self.person_get(via));
        let task = tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                pace.tick().await;
                statuses.push(get().await);
            }
            statuses
        });
        (stop, task)
    }

    /// The person's GETs through replica `via`, one after the other until `done` (within a
    /// minute), none answered with a 502; their statuses.
    async fn get_until<F, Fut>(&self, via: usize, what: &str, mut done: F) -> Vec<u16>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let statuses = std::sync::Mutex::new(Vec::new());
        wait_for(what, Duration::from_secs(60), || {
            let finished = done();
            async {
                let status = self.get_status(via).await;
                let seen = {
                    let mut seen = statuses.lock().unwrap();
                    seen.push(status);
                    seen.clone()
                };
                assert_ne!(status, 502, "{seen:?}");
                finished.await.then_some(())
            }
        })
        .await;
        statuses.into_inner().unwrap()
    }

    /// A connection to the replicas' Redis, to read and write behind their back.
    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let redis = &self.shared.redis;
        let url = format!("redis://:{}@127.0.0.1:{}/0", redis.password, redis.port);
        let client = redis::Client::open(url).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// The replica ids in the agent's directory entry.
    async fn directory_fields(&self) -> Vec<String> {
        self.hash_fields("agent").await
    }

    /// The fields of the agent's `tether:<what>:<id>` hash.
    async fn hash_fields(&self, what: &str) -> Vec<String> {
        let mut conn = self.redis().await;
        let key = format!("tether:{what}:{}", self.agent_id);
        let mut fields: Vec<String> = redis::cmd("HKEYS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        fields.sort();
        fields
    }

    /// The person's kubectl through replica `i`.
    fn kubectl(&self, i: usize) -> std::process::Command {
        let at = (self.dir.path(), self.pki.ca.as_path());
        person_kubectl(&self.env, at, self.kas[i].k8s_port, &self.token)
    }

    /// The person's `kubectl get configmaps --watch -o name` of the namespace through replica
    /// `i`, and the lines it prints.
    fn watch_configmaps(
        &self,
        i: usize,
    ) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
        let mut watch = self
            .kubectl(i)
            .args(["get", "configmaps", "-n", &self.ns, "--watch", "-o", "name"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = watch.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        (watch, rx)
    }
}

/// With `peers.tls`, the hop between replicas is encrypted: a person's kubectl through replica
/// 3 reaches the agent on replica 1 through a tap recording the hop, and neither the request
/// nor the ConfigMap it reads can be found in what crossed (nor an admin request forwarded
/// there); a connection that does not present
/// a certificate of the hop's CA gets nothing and is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_peers_tls_the_hop_is_encrypted_and_a_connection_without_its_certificate_is_refused() {
    let hop = support::Pki::temporary();
    let tap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tap_port = tap.local_addr().unwrap().port();
    let first_peers_port = std::sync::Mutex::new(None);
    let custom = |i: usize, o: KasOptions| {
        let mut o = peers_tls(o, &hop);
        if i == 0 {
            *first_peers_port.lock().unwrap() = Some(peers_port(&o));
            o.extra_yaml
                .push_str(&format!("  advertise_address: 127.0.0.1:{tap_port}\n"));
        }
        o
    };
    let r = Routed::start_with(None, &custom).await;
    let peers = first_peers_port.lock().unwrap().unwrap();
    let seen = recording_relay(tap, peers);
    let value = "hop-payload-7f3a9c";
    let literal = format!("--from-literal=k={value}");
    let create = ["-n", &r.ns, "create", "configmap", "wire", &literal];
    tether_testenv::run_output(r.env.kubectl().args(create)).unwrap();
    let get = ["-n", &r.ns, "get", "configmap", "wire", "-o", "yaml"];
    let read = tether_testenv::run_output(r.kubectl(2).args(get)).unwrap();
    assert!(String::from_utf8_lossy(&read).contains(value));
    // An admin request forwarded to the holder crosses it too.
    let echoed = r.kas[2].admin.echo(r.agent_id, b"ping".to_vec()).await;
    assert_eq!(&echoed.unwrap()[..], b"ping");
    let crossed = seen.lock().unwrap().clone();
    assert!(
        crossed.len() > 1000,
        "the request crossed the tap: {} bytes",
        crossed.len()
    );
    for plain in [
        value.as_bytes(),
        b"configmaps/wire",
        b"agent_id",
        b"kubernetes_api",
    ] {
        let found = crossed.windows(plain.len()).any(|w| w == plain);
        assert!(
            !found,
            "{:?} readable on the hop",
            String::from_utf8_lossy(plain)
        );
    }
    let mut stranger = tokio::net::TcpStream::connect(("127.0.0.1", peers))
        .await
        .unwrap();
    stranger.write_all(b"00\n{}\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = stranger.read_to_end(&mut answer).await;
    assert!(
        !answer.starts_with(b"OK") && !answer.starts_with(b"ERR"),
        "{answer:?}"
    );
    let refused = "Refused a connection on the peers listener: its TLS handshake failed";
    wait_for("the refusal logged", Duration::from_secs(10), || async {
        r.kas[0].log().contains(refused).then_some(())
    })
    .await;
}

/// `opts` (with a peers listener) with the hop under mutual TLS: certificates of `hop`'s CA.
fn peers_tls(mut opts: KasOptions, hop: &support::Pki) -> KasOptions {
    opts.extra_yaml.push_str(&format!(
        "  tls:\n    certificate_file: {}\n    key_file: {}\n    ca_file: {}\n    server_name: localhost\n",
        hop.cert.display(),
        hop.key.display(),
        hop.ca.display()
    ));
    opts
}

/// Relays connections from `listener` to `port`, recording what crosses in both directions.
fn recording_relay(
    listener: tokio::net::TcpListener,
    port: u16,
) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(copy_recording(dr, uw, std::sync::Arc::clone(&record)));
            tokio::spawn(copy_recording(ur, dw, std::sync::Arc::clone(&record)));
        }
    });
    seen
}

async fn copy_recording(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
    }
    let _ = to.shutdown().await;
}

/// A TCP balancer in front of replicas: each connection goes to the first that accepts it, as
/// a load balancer does once its health check marks a dead replica down.
async fn balancer(backends: Vec<u16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let backends = backends.clone();
            tokio::spawn(async move {
                for b in backends {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", b)).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        return;
                    }
                }
            });
        }
    });
    port
}

/// An agent connected to replica 1; a person's kubectl through replica 3: get, apply, a watch
/// and a multi-MB LIST cross the hop between replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_through_another_replica_reaches_the_agent() {
    let r = Routed::start().await;
    let (env, ns, dir) = (&r.env, &r.ns, &r.dir);
    let one = &r.kas[0];
    let kubectl = |args: &[&str]| {
        let out = r.kubectl(2).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // get, and apply (a write through the hop).
    let listed = wait_for("a routed get", Duration::from_secs(30), || async {
        let out = r
            .kubectl(2)
            .args(["get", "configmaps", "-n", ns, "-o", "name"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).unwrap())
    })
    .await;
    assert!(
        listed.contains("kube-root-ca.crt") || listed.is_empty(),
        "{listed}"
    );
    let manifest = dir.path().join("cm.yaml");
    std::fs::write(&manifest, configmap("routed", ns, "1")).unwrap();
    kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        kubectl(&["get", "configmap", "routed", "-n", ns, "-o", "name"])
            .contains("configmap/routed")
    );

    // A multi-MB LIST.
    let big = "x".repeat(900 * 1024);
    for i in 0..3 {
        let file = dir.path().join(format!("big-{i}.yaml"));
        std::fs::write(&file, configmap(&format!("big-{i}"), ns, &big)).unwrap();
        // `create`: kubectl apply would copy the 900 KiB into an annotation (256 KiB at most).
        tether_testenv::run_output(env.kubectl().args(["create", "-f", file.to_str().unwrap()]))
            .unwrap();
    }
    let list = kubectl(&["get", "configmaps", "-n", ns, "-o", "json"]);
    assert!(list.len() > 2_700_000, "{} bytes", list.len());

    // A watch: an event made after it started comes through the hop.
    let (mut watch, rx) = r.watch_configmaps(2);
    let late = dir.path().join("late.yaml");
    std::fs::write(&late, configmap("late", ns, "1")).unwrap();
    wait_for("the watch to start", Duration::from_secs(30), || async {
        rx.try_recv()
            .ok()
            .filter(|l| l.contains("configmap/"))
            .map(drop)
    })
    .await;
    tether_testenv::run_output(env.kubectl().args(["apply", "-f", late.to_str().unwrap()]))
        .unwrap();
    wait_for(
        "the watch to see the new object",
        Duration::from_secs(30),
        || async {
            rx.try_iter()
                .any(|l| l.contains("configmap/late"))
                .then_some(())
        },
    )
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(one.log().contains("Peers listener is up"), "{}", one.log());
}

/// A replica whose clock is 6 minutes ahead (a node without NTP) still routes to the agent's
/// replica and is routed to: the replicas compare the directory's expiries and the forwarded
/// requests' times in Redis's time, and the skewed replica exports its offset and warns. On
/// their own clocks, replicas 40 s apart refused each other's requests ("ERR refused") and one
/// 5 minutes ahead saw no holder: "agent 1 is not connected" after 20 s (E14 F14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_clocks_differ_by_minutes_still_route_to_each_other() {
    let mut r = Routed::start_with(None, &|i, mut o| {
        if i == 1 {
            o.env = support::faketime("+6m");
        }
        o
    })
    .await;
    r.move_agent(0);
    r.kas[0].wait_connected(r.agent_id).await;
    assert_eq!(r.holder().await, 0);
    for i in [1, 2] {
        wait_for(
            &format!("a request through replica {i}"),
            Duration::from_secs(30),
            || async { (r.get_status(i).await == 200).then_some(()) },
        )
        .await;
    }
    // From the skewed replica to the agent's and back: the agent moves to it.
    r.move_agent(1);
    r.kas[1].wait_connected(r.agent_id).await;
    wait_for(
        "a request through replica 0 to the skewed one",
        Duration::from_secs(30),
        || async { (r.get_status(0).await == 200).then_some(()) },
    )
    .await;

    let offset = |i: usize| {
        let kas = &r.kas[i];
        async move { kas.metric("kas_redis_clock_offset_seconds").await.unwrap() }
    };
    let skewed = offset(1).await;
    assert!((-370.0..-350.0).contains(&skewed), "{skewed}");
    assert!(offset(0).await.abs() < 5.0);
    let log = r.kas[1].log();
    assert!(log.contains("This replica's clock is off Redis's"), "{log}");
    assert!(
        !r.kas[0]
            .log()
            .contains("This replica's clock is off Redis's")
    );
}

/// A personal access token replica 2 remembers as valid (it looked it up once for two
/// requests) is refused there as soon as replica 1's revocation reaches it through Redis,
/// well before replica 2 would forget it (10 s): the revocation forgets it on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_remembered_by_another_replica_is_refused_there_once_revoked() {
    let r = Routed::start().await;
    r.remember_token(1).await;

    r.kas[0].admin.revoke_user_token(r.token_id).await.unwrap();
    r.refused_by(1, Duration::from_secs(1)).await;
}

/// A personal access token replica 2 remembers (looked up once for two requests) is refused
/// there once Redis is down and the token is revoked through replica 1: replica 2 can no
/// longer hear of revocations, so it stops serving what it remembers and asks the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_token_is_not_served_from_memory_while_redis_is_down() {
    let mut r = Routed::start().await;
    r.remember_token(1).await;

    r.shared.redis.stop();
    let answer = r.kas[0].admin.revoke_user_token(r.token_id).await.unwrap();
    assert_eq!(answer["was_active"], true, "{answer}");
    assert!(
        answer["replicas_not_told"]
            .as_str()
            .is_some_and(|n| n.contains("Redis")),
        "{answer}"
    );
    r.refused_by(1, Duration::from_secs(5)).await;
}

/// Revoking a personal access token while PostgreSQL refuses the write (a trigger): the
/// revocation fails with 503 saying it was not stored, but the token's open watch through
/// replica 1 ends at once, and replicas 1 and 2 refuse the token from then on; once the
/// database takes writes, running it again stores it. Before, the failed write returned
/// before anything else, and the sessions of a token feared stolen ran on through the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_database_refuses_still_ends_the_tokens_live_requests() {
    let r = Routed::start().await;
    let (mut watch, rx) = r.watch_configmaps(0);
    let cm = r.dir.path().join("cm.yaml");
    std::fs::write(&cm, configmap("watched", &r.ns, "1")).unwrap();
    tether_testenv::run_output(r.env.kubectl().args(["apply", "-f", cm.to_str().unwrap()]))
        .unwrap();
    wait_for("the watch to run", Duration::from_secs(30), || async {
        rx.try_iter()
            .any(|l| l.contains("configmap/watched"))
            .then_some(())
    })
    .await;
    assert_eq!(r.get_status(1).await, 200);

    let pg = &r.shared.pg;
    pg.sql_in(
        "kas",
        "CREATE FUNCTION refuse() RETURNS trigger AS $$BEGIN RAISE EXCEPTION 'disk full (simulated)'; END$$ LANGUAGE plpgsql;\
         CREATE TRIGGER refuse BEFORE UPDATE ON user_tokens FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .unwrap();
    let err = r.kas[0]
        .admin
        .revoke_user_token(r.token_id)
        .await
        .expect_err("a revocation the database refused reported as done")
        .to_string();
    assert!(
        err.contains("503") || err.contains("Service Unavailable"),
        "{err}"
    );
    assert!(
        err.contains("was not stored") && err.contains("1 live requests"),
        "{err}"
    );
    let t0 = Instant::now();
    while watch.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the watch still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        r.get_status(0).await,
        401,
        "replica 1 still lets the token in"
    );
    wait_for(
        "replica 2 to refuse the token",
        Duration::from_secs(10),
        || async { (r.get_status(1).await == 401).then_some(()) },
    )
    .await;

    pg.sql_in("kas", "DROP TRIGGER refuse ON user_tokens;")
        .unwrap();
    let stored = r.kas[0].admin.revoke_user_token(r.token_id).await.unwrap();
    assert_eq!(stored["was_active"], true, "{stored}");
}

/// Replica 1, which holds the agent's tunnels, is killed: the agent reconnects (through the
/// balancer, to replica 2) and the person's requests through replica 3 work again within 2 s of
/// the reconnection, although replica 1's directory entries have not expired yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_work_again_within_two_seconds_of_the_agent_reconnecting_to_another_replica() {
    let mut r = Routed::start().await;
    let get = |r: &Routed| {
        r.kubectl(2)
            .args(["get", "configmaps", "-n", &r.ns, "-o", "name"])
            .output()
            .unwrap()
            .status
            .success()
    };
    wait_for("a routed get", Duration::from_secs(30), || async {
        get(&r).then_some(())
    })
    .await;
    r.kas[0].kill9();
    r.kas[1].wait_connected(r.agent_id).await;
    let reconnected = Instant::now();
    wait_for(
        "a get through replica 3 again",
        Duration::from_secs(10),
        || async { get(&r).then_some(()) },
    )
    .await;
    let took = reconnected.elapsed();
    eprintln!("requests worked again {took:?} after the agent reconnected to replica 2");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(r.agent.log().contains("127.0.0.1"), "the agent ran");
}

/// Redis unreachable (its data kept) while the agent moves from replica 1 to replica 2:
/// replica 1's removal of its directory entry fails, and of its configuration stream's entry
/// (`tether:running`). Once Redis is back, those removals are made within seconds, and no
/// request through replica 3 fails with a 502 meanwhile (one sent to replica 1 first goes to
/// replica 2 when replica 1 refuses it). Replica 1's entries counted for the rest of their 5
/// and 3 minutes before, and each request routed to it first failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_removal_failed_during_a_redis_outage_is_removed_once_redis_is_back() {
    let mut r = Routed::start().await;
    wait_for("a routed get", Duration::from_secs(30), || async {
        (r.get_status(2).await == 200).then_some(())
    })
    .await;
    let before = r.directory_fields().await;
    assert_eq!(before.len(), 1, "{before:?}");

    r.shared.redis.stop_keeping_data().unwrap();
    r.move_agent(1);
    wait_for(
        "the agent on replica 2 only",
        Duration::from_secs(30),
        || async {
            let one = r.kas[0].admin.stats().await.unwrap().connected_agents;
            let two = r.kas[1].admin.stats().await.unwrap().connected_agents;
            (one == 0 && two == 1).then_some(())
        },
    )
    .await;
    wait_for(
        "replica 1 to fail removing the agent's entries",
        Duration::from_secs(60),
        || async {
            let log = r.kas[0].log();
            let withdrawn = "Cannot withdraw an ended configuration stream";
            (log.contains("Cannot remove an agent whose tunnels left") && log.contains(withdrawn))
                .then_some(())
        },
    )
    .await;
    r.shared.redis.restart().unwrap();
    // Replica 2 may write its own entry the moment Redis is back, before this reads.
    let back = r.directory_fields().await;
    assert!(
        before.iter().all(|f| back.contains(f)),
        "the data came back: {back:?}"
    );

    let what = "replica 1's entry to be removed and replica 2's written";
    let mut statuses = r
        .get_until(2, what, || async {
            let fields = r.directory_fields().await;
            fields.len() == 1 && fields != before
        })
        .await;
    for _ in 0..5 {
        statuses.push(r.get_status(2).await);
    }
    let replica_one = format!("{}:", before[0]);
    wait_for(
        "replica 1's ended configuration stream to be withdrawn",
        Duration::from_secs(30),
        || async {
            let running = r.hash_fields("running").await;
            (!running.iter().any(|f| f.starts_with(&replica_one))).then_some(())
        },
    )
    .await;
    assert!(!statuses.contains(&502), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
}

/// A replica listed as holding the agent but without its tunnels (its entry not removed yet)
/// refuses the requests routed to it: each goes to the agent's other holder instead of failing
/// with a 502, and kas counts it as sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_a_holder_that_lost_the_agent_goes_to_the_next_holder() {
    let r = Routed::start().await;
    wait_for("a routed get", Duration::from_secs(30), || async {
        (r.get_status(2).await == 200).then_some(())
    })
    .await;
    let holder = r.directory_fields().await;
    // Every other replica listed too (replica 3 skips itself): replica 2 lacks the agent.
    let mut conn = r.redis().await;
    let replicas: Vec<String> = redis::cmd("KEYS")
        .arg("tether:replica:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    for key in replicas {
        let id = key.trim_start_matches("tether:replica:").to_owned();
        if !holder.contains(&id) {
            let _: () = redis::cmd("HSET")
                .arg(format!("tether:agent:{}", r.agent_id))
                .arg(id)
                .arg(until)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    // The holders are tried in the order Redis's answer was read in: until replica 2 came
    // first once.
    let resent = "kas_tunnel_requests_resent_total";
    let statuses = r
        .get_until(2, "a request refused by replica 2", || async {
            r.kas[2].metric(resent).await.unwrap_or(0.0) > 0.0
        })
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// A rolling restart (SIGTERM, one replica after the other, as a Deployment rollout does):
/// after each, the person's requests through another replica work again, with the agent's
/// configuration and tunnels found wherever they now are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_replicas_keeps_access() {
    let mut r = Routed::start().await;
    let get = |r: &Routed, via: usize| {
        r.kubectl(via)
            .args(["get", "configmaps", "-n", &r.ns, "-o", "name"])
            .output()
            .unwrap()
            .status
            .success()
    };
    for i in 0..3 {
        let via = (i + 1) % 3;
        wait_for("a routed get", Duration::from_secs(30), || async {
            get(&r, via).then_some(())
        })
        .await;
        r.kas[i].restart().await;
        let back = Instant::now();
        wait_for(
            &format!("access through replica {via} after restarting replica {i}"),
            Duration::from_secs(30),
            || async { get(&r, via).then_some(()) },
        )
        .await;
        eprintln!(
            "replica {i} restarted: access through replica {via} {:?} after it was back",
            back.elapsed()
        );
    }
    // Each replica serves the person after the rollout, wherever the agent is now.
    for via in 0..3 {
        assert!(get(&r, via), "through replica {via}");
    }
}

/// A rolling restart (SIGTERM, one replica after the other, each serving through a 5 s
/// `shutdown_delay` as the chart sets it) of replicas whose peers hop is under mutual TLS,
/// while the person's requests flow, one at a time, through a replica that does not hold the
/// agent: each crosses the hop to the holder, or waits for the agent to reconnect elsewhere
/// when the holder is the one restarted. Every request is answered 200: the one in flight on
/// the holder's tunnel when its shutdown delay ends is served to its end (the holder drains;
/// it was cut with a 502), and one arriving after the holder had gone and before the agent was
/// back waits for it (it failed 503 at once, "no replica holding agent 1 answered", the
/// directory cache still naming the holder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_replicas_with_peers_tls_fails_no_request() {
    let hop = support::Pki::temporary();
    let mut r = Routed::start_with(None, &|_, o| rollout(peers_tls(o, &hop))).await;
    wait_for("a routed get", Duration::from_secs(30), || async {
        (r.get_status(2).await == 200).then_some(())
    })
    .await;
    let mut seen = Vec::new();
    for i in 0..3 {
        let holder = r.holder().await;
        let via = (0..3).find(|v| *v != i && *v != holder).unwrap();
        let (stop, flow) = r.requests_flowing(via);
        r.kas[i].restart().await;
        wait_for(
            &format!("access through replica {via} after restarting replica {i}"),
            Duration::from_secs(30),
            || async { (r.get_status(via).await == 200).then_some(()) },
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        seen.push((i, holder, via, flow.await.unwrap()));
    }
    for (i, holder, via, statuses) in seen {
        let what = format!("replica {i} restarted (holder {holder}), through {via}: {statuses:?}");
        assert!(statuses.len() > 10, "requests flowed: {what}");
        assert!(statuses.iter().all(|s| *s == 200), "{what}");
    }
}

/// The replica holding the agent's tunnels is stopped (SIGTERM) while a person's request
/// through another replica is being served on one of them (the stand-in API server holds its
/// answer): the holder drains. Its idle tunnels end, so the agent reconnects to another
/// replica, which serves the requests sent meanwhile, and the request in flight is answered to
/// its end through the stopping holder, which exits only then. kas ended every tunnel at once
/// when it stopped: that request failed 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_on_a_stopping_holder_is_answered_while_new_ones_are_served_elsewhere()
{
    use http_body_util::BodyExt;
    use support::upgrade::{HELD_BODY, HeldUpstream, fake_kubeconfig, tls_http1};
    let mut upstream = HeldUpstream::start().await;
    let fake_dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake_kubeconfig(fake_dir.path(), upstream.port);
    // Longer than the test can take: the holder exits because the request ended, not because
    // the drain ran out.
    let mut r = Routed::start_with(Some(kubeconfig), &|_, mut o| {
        o.extra_yaml.push_str("shutdown_timeout: 60s\n");
        o
    })
    .await;
    let holder = r.holder().await;
    let via = (0..3).find(|v| *v != holder).unwrap();
    wait_for("a routed get", Duration::from_secs(30), || async {
        (r.get_status(via).await == 200).then_some(())
    })
    .await;

    let (port, ca) = (r.kas[via].k8s_port, r.pki.ca.clone());
    let request = http::Request::get(format!("/api/v1/namespaces/{}/configmaps/held", r.ns))
        .header("authorization", format!("Bearer {}", r.token))
        .body(http_body_util::Empty::new())
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let mut sender = tls_http1(port, &ca).await;
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        (status, body.map_err(|e| e.to_string()))
    });
    upstream.arrived().await;
    r.kas[holder].sigterm();

    for n in 0..5 {
        assert_eq!(r.get_status(via).await, 200, "request {n} during the drain");
    }
    assert!(
        r.kas[holder].running(),
        "the holder waits for the request in flight:\n{}",
        r.kas[holder].log()
    );
    let moved_to = wait_for(
        "another replica to hold the agent",
        Duration::from_secs(10),
        || async {
            for (i, kas) in r.kas.iter().enumerate().filter(|(i, _)| *i != holder) {
                if kas.admin.stats().await.ok()?.connected_agents == 1 {
                    return Some(i);
                }
            }
            None
        },
    )
    .await;
    eprintln!("the agent moved from replica {holder} to {moved_to}");

    upstream.release();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.as_deref(), Ok(HELD_BODY.as_bytes()));
    r.kas[holder].stop();
}

/// `opts` with the chart's `shutdown_delay`: a replica told to stop serves 5 s more.
fn rollout(mut opts: KasOptions) -> KasOptions {
    opts.extra_yaml.push_str("shutdown_delay: 5s\n");
    opts
}

/// Failed authentications counted on one replica limit the client on the others: behind one
/// address a client spread over three replicas would otherwise get three times its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_failure_limit_on_one_replica_is_refused_by_another_within_a_second() {
    use support::source::{get, http_client};
    let dir = tempfile::tempdir().unwrap();
    let shared = Shared::start();
    // One failure refilled every 10 s: the limit cannot wear off during the test.
    let opts = || KasOptions {
        extra_yaml: format!(
            "{}rate_limits:\n  failed_auth_per_address:\n    per_minute: 6\n    burst: 20\n  limited_response_delay: 0s\n",
            shared.yaml
        ),
        ..shared.options()
    };
    let one = Kas::start(&dir.path().join("kas-1"), opts()).await;
    let two = Kas::start(&dir.path().join("kas-2"), opts()).await;
    let flooder = http_client("127.0.0.2".parse().unwrap());
    let agents = |kas: &Kas| format!("http://127.0.0.1:{}/api/v1/agents", kas.api_port);
    let token = std::fs::read_to_string(two.dir.join("data/admin-token")).unwrap();
    let good = format!("Bearer {}", token.trim());
    // A good credential is never counted, so asking replica 2 with it does not limit by itself.
    assert_eq!(get(&flooder, &agents(&two), &good).await.0, 200);

    for i in 0..20 {
        let bad = format!("Bearer wrong-{i}");
        assert_eq!(
            get(&flooder, &agents(&one), &bad).await.0,
            401,
            "failure {i}"
        );
    }
    assert_eq!(get(&flooder, &agents(&one), "Bearer wrong").await.0, 429);
    let started = Instant::now();
    wait_for(
        "replica 2 to refuse the address",
        Duration::from_secs(5),
        || async { (get(&flooder, &agents(&two), &good).await.0 == 429).then_some(()) },
    )
    .await;
    let took = started.elapsed();
    eprintln!("replica 2 refused the address {took:?} after replica 1 did");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Only that address: another client is still served by replica 2.
    let local = http_client("127.0.0.1".parse().unwrap());
    assert_eq!(get(&local, &agents(&two), &good).await.0, 200);
}

/// An agent connected to replica 1; every admin command about it is asked of replica 2, which
/// forwards it to replica 1: ping through the tunnel, the agent list (connected, configuration
/// in force), GitOps status, suspend/resume, reconcile and diff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_about_an_agent_work_through_any_replica() {
    let (_shared, _dir, (rig, ns, c1), two) = peered_pair("admin-routed").await;
    let id = rig.agent_id;

    let echoed = two.admin.echo(id, b"ping".to_vec()).await.unwrap();
    assert_eq!(&echoed[..], b"ping");
    let listed = two.admin.list_agents().await.unwrap();
    let agent = listed.iter().find(|a| a.id == id).unwrap();
    assert!(agent.connected, "{agent:?}");
    assert_eq!(agent.connections.len(), 1, "{agent:?}");
    assert!(agent.config.is_some(), "{agent:?}");
    // Named by the replica holding it (the web UI's Replica column), not the one answering.
    let holder = peers_address(&rig.kas);
    assert_eq!(agent.connections[0].replica, holder, "{agent:?}");
    assert_ne!(holder, peers_address(&two));
    let status = two.admin.gitops_status(id).await.unwrap();
    assert!(status.iter().any(|s| s.commit_id == c1), "{status:?}");

    let suspend = tether_kas_api::SuspendRequest::default();
    two.admin.suspend(id, &suspend).await.unwrap();
    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("first", &ns, "2")))],
        "second",
    );
    let refused = two.admin.reconcile(id, &Default::default()).await;
    let refused = format!("{:#}", refused.unwrap_err());
    assert!(refused.contains("suspended"), "{refused}");
    two.admin.resume(id, &suspend).await.unwrap();
    let started = two.admin.reconcile(id, &Default::default()).await.unwrap();
    assert!(
        started.projects.iter().all(|p| p.streams >= 1),
        "{started:?}"
    );
    let synced = rig.synced(&c2).await;
    assert_eq!(synced.outcome, tether_kas_api::ReportedOutcome::Succeeded);

    let request = tether_kas_api::DiffRequest {
        git_ref: "main".into(),
        project: None,
    };
    let diff = two.admin.diff(id, &request).await.unwrap();
    let changes: Vec<_> = diff
        .projects
        .iter()
        .flat_map(|p| &p.objects)
        .filter(|o| o.change.is_change())
        .collect();
    assert!(changes.is_empty(), "{diff:?}");
    assert!(two.log().contains("Peers listener is up"), "{}", two.log());
}

/// A token's streams live on whichever replica agentk's connection reached: `kas token list`
/// through another replica counts them (STREAMS 0 there said nothing before), and when the
/// replica holding them does not answer it names it and exits 7 rather than show a 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_streams_are_counted_on_every_replica_and_a_silent_one_is_named() {
    let (_shared, _dir, (mut rig, _, _), two) = peered_pair("token-streams").await;
    let id = rig.agent_id;
    let streams = |list: &[tether_kas_api::TokenView]| -> Vec<(i64, usize)> {
        list.iter().map(|t| (t.id, t.open_streams)).collect()
    };
    let on_holder = rig.kas.admin.list_tokens(id).await.unwrap();
    assert!(on_holder[0].open_streams >= 1, "{on_holder:?}");
    let through_two = two.admin.list_tokens(id).await.unwrap();
    assert_eq!(streams(&through_two), streams(&on_holder));
    assert!(
        through_two[0].streams_unknown_on.is_empty(),
        "{through_two:?}"
    );

    let holder = peers_address(&rig.kas);
    rig.kas.kill9();
    let listed = two.admin.list_tokens(id).await.unwrap();
    assert_eq!(listed[0].streams_unknown_on, [format!("replica {holder}")]);
    let out = two
        .cli()
        .args(["token", "list", "--agent-id", &id.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "STREAMS misses the streams open on replica {holder}"
        )),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("STREAMS"));
}

/// Redis losing its data (a restart without persistence, a failover to a replica that had not
/// caught up; here FLUSHALL) loses which replica holds which agent. Each replica sees its own
/// liveness key gone and writes its agents again within seconds; requests through another
/// replica found no holder until the 4-minute refresh before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_directory_is_rebuilt_within_seconds_after_redis_lost_its_data() {
    let shared = Shared::start();
    let dir = tempfile::tempdir().unwrap();
    let opts = with_peers(shared.options(), dir.path());
    let (rig, _, _) = synced_rig("flushed", opts).await;
    let two = Kas::start(
        &dir.path().join("kas-2"),
        with_peers(shared.options(), dir.path()),
    )
    .await;
    let id = rig.agent_id;
    assert_eq!(
        &two.admin.echo(id, b"one".to_vec()).await.unwrap()[..],
        b"one"
    );

    shared.redis.flush_all().unwrap();
    // A replica started now has nothing cached: it knows only what Redis says.
    let three = Kas::start(
        &dir.path().join("kas-3"),
        with_peers(shared.options(), dir.path()),
    )
    .await;
    wait_for(
        "an echo through replica 3",
        Duration::from_secs(30),
        || async { three.admin.echo(id, b"two".to_vec()).await.ok() },
    )
    .await;
}

/// exec, attach and port-forward cross the hop: the agent (on replica 1) talks to a stand-in
/// API server that upgrades and echoes (kwok's pods run nothing); the person upgrades through
/// replica 3 with WebSockets and SPDY, and 300 KB come back unchanged each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_crosses_the_hop_between_replicas() {
    use support::upgrade::{fake_kubeconfig, tls_http1, upgrade_and_echo, upgrading_server};
    let port = upgrading_server().await;
    let fake_dir = tempfile::tempdir().unwrap();
    let r = Routed::start_with(Some(fake_kubeconfig(fake_dir.path(), port)), &|_, o| o).await;
    r.kas[0].wait_connected(r.agent_id).await;
    let path = format!(
        "/api/v1/namespaces/{}/pods/p/exec?command=sh&stdin=true",
        r.ns
    );
    let authorization = format!("Bearer {}", r.token);
    for protocol in ["websocket", "SPDY/3.1"] {
        let sender = tls_http1(r.kas[2].k8s_port, &r.pki.ca).await;
        upgrade_and_echo(sender, &path, &authorization, protocol).await;
    }
    let local = r.kas[2].admin.stats().await.unwrap();
    assert_eq!(local.connected_agents, 0, "the agent is not on replica 3");
}

/// What every replica shows about the agent: the configuration commit in force and whether its
/// GitOps status includes a successful sync of `commit`.
async fn shown(kas: &Kas, agent_id: i64, commit: &str) -> (String, bool) {
    let agents = kas.admin.list_agents().await.unwrap();
    let agent = agents.iter().find(|a| a.id == agent_id).unwrap();
    let config = agent
        .config
        .as_ref()
        .map(|c| c.commit.clone())
        .unwrap_or_default();
    let status = kas.admin.gitops_status(agent_id).await.unwrap();
    let synced = status
        .iter()
        .any(|s| s.commit_id == commit && s.outcome == tether_kas_api::ReportedOutcome::Succeeded);
    (config, synced)
}

/// The restart tests repeated across replicas: the three replicas are restarted one after the
/// other (the agent's own one second); after each, every replica shows the agent's
/// configuration in force and its last sync, and afterwards a commit reconciled through replica
/// 3 is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_keeps_configuration_and_sync_status_on_every_replica() {
    let shared = Shared::start();
    let dir = tempfile::tempdir().unwrap();
    let opts = || with_peers(shared.options(), dir.path());
    let (mut rig, ns, c1) = synced_rig("rolling", opts()).await;
    let mut others = Vec::new();
    for i in [2, 3] {
        others.push(Kas::start(&dir.path().join(format!("kas-{i}")), opts()).await);
    }
    let config = shown(&rig.kas, rig.agent_id, &c1).await.0;
    assert!(!config.is_empty());
    for restarted in 0..3 {
        match restarted {
            1 => rig.kas.restart().await,
            i => others[i / 2].restart().await,
        }
        rig.kas.wait_connected(rig.agent_id).await;
        for (i, kas) in [&rig.kas, &others[0], &others[1]].into_iter().enumerate() {
            let seen = wait_for(
                &format!(
                    "replica {} to show the agent after restart {restarted}",
                    i + 1
                ),
                Duration::from_secs(30),
                || async {
                    let seen = shown(kas, rig.agent_id, &c1).await;
                    (seen.0 == config && seen.1).then_some(seen)
                },
            )
            .await;
            assert_eq!(seen, (config.clone(), true));
        }
    }
    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("first", &ns, "2")))],
        "after the rollout",
    );
    let started = others[1]
        .admin
        .reconcile(rig.agent_id, &Default::default())
        .await
        .unwrap();
    assert!(
        started
            .projects
            .iter()
            .all(|p| p.commit.as_deref() == Some(c2.as_str())),
        "{started:?}"
    );
    let synced = rig.synced(&c2).await;
    assert_eq!(synced.outcome, tether_kas_api::ReportedOutcome::Succeeded);
}

/// A replica's options for [`CiRig`]: peers, the proxy over TLS taking the CI issuer's tokens
/// (keys in `dir`'s `jwks.json`), and a 1 s Git poll (the agent's configuration changes are
/// fetched without webhooks).
fn ci_options(shared: &Shared, dir: &std::path::Path, pki: &support::Pki) -> KasOptions {
    let mut opts = with_peers(shared.options(), dir);
    opts.git_poll = "1s";
    opts.kubernetes_api_extra = format!(
        "  ci_issuers:\n  - issuer: {}\n    audience: {}\n    jwks:\n      file: {}\n  ca_file: {}\n",
        support::oidc::ISSUER,
        support::oidc::AUDIENCE,
        dir.join("jwks.json").display(),
        pki.ca.display()
    );
    opts.k8s_tls = Some((pki.cert.clone(), pki.key.clone()));
    opts
}

/// The CI issuer's signing key, its keys in `dir`'s `jwks.json` (as [`ci_options`] reads
/// them), and the proxies' TLS certificates.
fn ci_issuer(dir: &std::path::Path) -> (support::oidc::SigningKey, support::Pki) {
    let key = support::oidc::SigningKey::new("ci-key");
    let pki = support::Pki::generate(dir);
    let keys = serde_json::json!({"keys": [&key.jwk]}).to_string();
    std::fs::write(dir.join("jwks.json"), keys).unwrap();
    (key, pki)
}

/// A GitOps rig whose agent (on replica 1, the only one it dials) lets CI jobs of `group/app`
/// use it, and more replicas can be started: each replica's Kubernetes API proxy takes CI job
/// ID tokens signed by `key`, over TLS (`pki`'s CA).
struct CiRig {
    rig: support::gitops::Rig,
    ns: String,
    key: support::oidc::SigningKey,
    pki: support::Pki,
    dir: tempfile::TempDir,
    shared: Shared,
}

impl CiRig {
    async fn start(name: &str) -> CiRig {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::start();
        let (key, pki) = ci_issuer(dir.path());
        let ci_access = "ci_access:\n  projects:\n  - id: group/app\n";
        let opts = ci_options(&shared, dir.path(), &pki);
        let (rig, ns, _) = synced_rig_with(name, opts, ci_access).await;
        CiRig {
            rig,
            ns,
            key,
            pki,
            dir,
            shared,
        }
    }

    /// Another replica (the agent does not dial it).
    async fn replica(&self, name: &str) -> Kas {
        let opts = ci_options(&self.shared, self.dir.path(), &self.pki);
        Kas::start(&self.dir.path().join(name), opts).await
    }

    /// A file holding the ID token of a job of `project`.
    fn job_token(&self, project: &str) -> std::path::PathBuf {
        let file = self
            .dir
            .path()
            .join(format!("{}.jwt", project.replace('/', "-")));
        let jwt = self.key.sign(&support::oidc::claims(project));
        std::fs::write(&file, jwt).unwrap();
        file
    }

    /// `kas agent diff <agent id> --ref <git_ref> --server <replica's proxy>` as a job of
    /// `group/app` runs it: exit code, stdout, stderr.
    fn ci_diff(&self, through: &Kas, git_ref: &str) -> (Option<i32>, String, String) {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
            .current_dir(self.dir.path())
            .args(["agent", "diff", &self.rig.agent_id.to_string()])
            .args(["--ref", git_ref])
            .arg(format!("--server=https://localhost:{}", through.k8s_port))
            .arg(format!(
                "--id-token-file={}",
                self.job_token("group/app").display()
            ))
            .arg(format!("--ca-cert-file={}", self.pki.ca.display()))
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (o.status.code(), text(o.stdout), text(o.stderr))
    }

    /// A GET of `path` through `through`'s proxy to the rig's agent, as a job of `group/app`
    /// (allowed by the agent's `ci_access`): status and body.
    async fn ci_get(&self, through: &Kas, path: &str) -> (u16, String) {
        let jwt = std::fs::read_to_string(self.job_token("group/app")).unwrap();
        let bearer = format!("Bearer ci:{}:{jwt}", self.rig.agent_id);
        support::upgrade::tls_get(through.k8s_port, &self.pki.ca, path, &bearer).await
    }

    /// Commits the agent's configuration with `from` replaced by `to` (lines of its
    /// `ci_access`), and waits for replica 1 to have it in force.
    async fn change_ci_access(&self, from: &str, to: &str) {
        let file = ".gitlab/agents/seed/config.yaml";
        let before = std::fs::read_to_string(self.rig.config.dir.join(file)).unwrap();
        let after = before.replace(from, to);
        assert_ne!(before, after);
        let commit = self
            .rig
            .config
            .commit(&[(file, Some(after.as_bytes()))], "ci access changed");
        wait_for(
            "replica 1 to have the new configuration in force",
            Duration::from_secs(30),
            || async {
                let agent = self.rig.kas.agent(self.rig.agent_id).await;
                agent.config.filter(|c| c.commit == commit).map(drop)
            },
        )
        .await;
    }

    /// How many agents `kas` remembers (its debug stats).
    async fn remembered(kas: &Kas) -> usize {
        kas.admin.stats().await.unwrap().remembered_agents
    }

    /// The kubeconfig `through`'s proxy gives a job of `project`: status and body.
    async fn kubeconfig(&self, through: &Kas, project: &str) -> (u16, String) {
        let jwt = std::fs::read_to_string(self.job_token(project)).unwrap();
        support::upgrade::ci_kubeconfig(through.k8s_port, &self.pki.ca, &jwt).await
    }
}

/// A CI job's `kas agent diff --server` reaching replicas 2 and 3 while the agent's tunnels
/// are on replica 1: the preview reaches the agent through replica 1 and shows the drift (exit
/// 1). It used to wait for a tunnel on the replica asked and fail "agent N is not connected"
/// (exit 2) — most CI diff jobs, behind a balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_diff_through_a_replica_without_the_agent_reaches_it() {
    let r = CiRig::start("ci-diff").await;
    let changed = configmap("first", &r.ns, "changed");
    let dir = r.rig.manifests.dir.with_file_name("wt-scale");
    r.rig.manifests.git(&[
        "worktree",
        "add",
        "-q",
        "-b",
        "scale",
        dir.to_str().unwrap(),
    ]);
    support::GitRepo { dir }.commit(&[("manifests/cm.yaml", Some(&changed))], "scale");
    let others = [r.replica("kas-2").await, r.replica("kas-3").await];
    for (i, through) in others.iter().enumerate() {
        assert_eq!(through.admin.stats().await.unwrap().connected_agents, 0);
        let (code, out, err) = r.ci_diff(through, "scale");
        assert_eq!(code, Some(1), "through replica {}: {out}{err}", i + 2);
        let drifted = format!("ConfigMap/{}/first", r.ns);
        assert!(out.contains(&drifted), "through replica {}: {out}", i + 2);
    }
}

/// `ci_access` changed while the agent is on replica 1: a job of the newly allowed project
/// gets a kubeconfig with the agent's context from replica 2 at once. Replica 2 used its memory
/// of the configuration (as it was when it started) and answered 403 "this job may use no
/// agent" until it restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_from_another_replica_follows_a_changed_ci_access() {
    let r = CiRig::start("ci-kubeconfig").await;
    let two = r.replica("kas-2").await;
    let context = "group/config:seed";
    let (code, body) = r.kubeconfig(&two, "group/app").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(context), "{body}");
    assert_eq!(r.kubeconfig(&two, "group/new").await.0, 403);

    let to = "  - id: group/app\n  - id: group/new\n";
    r.change_ci_access("  - id: group/app\n", to).await;
    let (code, body) = r.kubeconfig(&two, "group/new").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(context), "{body}");
}

/// A kas replica opening an agent's configuration stream reads the agent's stored record
/// first: another replica served the agent since this one started, so this one's memory had
/// no configuration in force for it. Kept as "previous" from that stale memory, nothing was
/// restored when the agent (a new pod of an older agentk) refused the newest configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serving_an_agent_first_reads_what_another_replica_stored() {
    let shared = Shared::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = support::Pki::generate(dir.path());
    let repo = GitRepo::init(&dir.path().join("config"));
    let path = ".gitlab/agents/moved/config.yaml";
    let level = |l: &str| format!("observability:\n  logging:\n    level: {l}\n").into_bytes();
    let c0 = repo.commit(&[(path, Some(&level("info")))], "c0");
    let kas = replicas_with_peers(&shared, dir.path(), 2, &pki).await;
    kas[0].set_projects(&[("group/moved", &repo)]).await;
    let t = kas[0]
        .admin
        .register_agent("group/moved", "moved")
        .await
        .unwrap();
    let mut on_a = support::config_stream(&kas[0], &t.token, ("", "", "")).await;
    assert_eq!(on_a.message().await.unwrap().unwrap().commit_id, c0);
    let c1 = repo.commit(&[(path, Some(&level("debug")))], "c1");
    assert_eq!(on_a.message().await.unwrap().unwrap().commit_id, c1);
    drop(on_a);

    // A new pod connects to the other replica, which has fetched c1 and sends it c1 too…
    wait_for(
        "the other replica to fetch c1",
        Duration::from_secs(30),
        || async {
            let projects = kas[1].admin.list_projects().await.ok()?;
            let p = projects.into_iter().find(|p| p.path == "group/moved")?;
            (p.commit.as_deref() == Some(c1.as_str())).then_some(())
        },
    )
    .await;
    let mut on_b = support::config_stream(&kas[1], &t.token, ("", "", "")).await;
    assert_eq!(on_b.message().await.unwrap().unwrap().commit_id, c1);
    drop(on_b);
    // …and refuses it: it gets c0, the configuration in force before c1.
    let why = "unknown field `level`";
    let mut refused = support::config_stream(&kas[1], &t.token, ("", &c1, why)).await;
    let in_force = tokio::time::timeout(Duration::from_secs(10), refused.message())
        .await
        .expect("kas sends the configuration in force before c1")
        .unwrap()
        .unwrap();
    assert_eq!(
        (in_force.commit_id.as_str(), in_force.error.as_str()),
        (c0.as_str(), "")
    );
}

/// An agent deleted through replica 1 is forgotten by replica 2 within two seconds: replica 2
/// kept its configuration in force (loaded at its start), whose `ci_access` went on
/// authorizing CI jobs there, until replica 2 restarted. A job's request through replica 2 is
/// refused afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_deleted_through_one_replica_is_forgotten_by_another() {
    let r = CiRig::start("deleted").await;
    let two = r.replica("kas-2").await;
    let (code, body) = r.ci_get(&two, "/version").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(CiRig::remembered(&two).await, 1);

    r.rig.kas.admin.delete_agent(r.rig.agent_id).await.unwrap();
    wait_for(
        "replica 2 to forget the deleted agent",
        Duration::from_secs(2),
        || async { (CiRig::remembered(&two).await == 0).then_some(()) },
    )
    .await;
    let (code, body) = r.ci_get(&two, "/version").await;
    assert_eq!(code, 403, "{body}");
}

/// An agent deleted where no message reached the replicas (written to the database behind
/// their back, as a lost Redis message leaves them; the agent's tunnels stay up on replica 1):
/// a CI job's request through replica 2, which remembers the agent's `ci_access`, is refused
/// at once instead of reaching the cluster, and both replicas forget the agent within their
/// 10 s look for deleted agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_deleted_without_a_message_is_refused_at_once_and_forgotten_everywhere() {
    let r = CiRig::start("lostdelete").await;
    let two = r.replica("kas-2").await;
    let store = tether_store::PgStore::connect(&r.shared.database_url())
        .await
        .unwrap();
    let (code, body) = r.ci_get(&two, "/version").await;
    assert_eq!(code, 200, "{body}");

    assert!(store.delete_agent(r.rig.agent_id).await.unwrap());
    let (code, body) = r.ci_get(&two, "/version").await;
    // 503 while replica 2 still remembers the agent's project (5 s), 403 after.
    assert!(matches!(code, 403 | 503), "{code}: {body}");
    for (i, kas) in [&r.rig.kas, &two].into_iter().enumerate() {
        wait_for(
            &format!("replica {} to forget the deleted agent", i + 1),
            Duration::from_secs(30),
            || async { (CiRig::remembered(kas).await == 0).then_some(()) },
        )
        .await;
    }
}

/// While the database is down, a CI job's request for a connected agent is answered 503 by
/// kas (once the agent's project, remembered 5 s, must be read again), logged at warn and
/// counted in `kas_k8s_proxy_requests_total{code="503"}` — not 403 "agent N is not available"
/// counted as a denial, which told the job the agent was gone. Served again once the database
/// is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_job_gets_503_not_403_while_the_database_is_down() {
    let r = CiRig::start("pgdown").await;
    let kas = &r.rig.kas;
    let (code, body) = r.ci_get(kas, "/version").await;
    assert_eq!(code, 200, "{body}");

    r.shared.pg.stop().unwrap();
    let (code, body) = wait_for(
        "kas to stop serving from its memory of the agent's project",
        Duration::from_secs(30),
        || async {
            let (code, body) = r.ci_get(kas, "/version").await;
            (code != 200).then_some((code, body))
        },
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("reading agent"), "{body}");
    let failed = r#"kas_k8s_proxy_requests_total{agent_id="0",access_as="unknown",code="503"}"#;
    assert!(kas.metric(failed).await.is_some_and(|n| n >= 1.0));
    let denied = r#"kas_k8s_proxy_denials_total{reason="Forbidden"}"#;
    assert_eq!(
        kas.metric(denied).await,
        None,
        "an outage counted as a denial"
    );
    assert!(kas.log().contains("Kubernetes API request failed in kas"));

    r.shared.pg.restart().unwrap();
    wait_for("the job served again", Duration::from_secs(30), || async {
        (r.ci_get(kas, "/version").await.0 == 200).then_some(())
    })
    .await;
}

/// A job through replica 2 for an agent whose configuration replica 1 (holding it) has not
/// stored yet waits for it, as for a tunnel, and is served once it is stored: it was refused
/// at once with 503 "agent N has not connected since kas started" — untrue, the agent was
/// connected (to replica 1). Unknown until the wait ends, the 503 says what may be going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_through_another_replica_waits_for_a_configuration_not_stored_yet() {
    let r = CiRig::start("notyet").await;
    let mut opts = ci_options(&r.shared, r.dir.path(), &r.pki);
    opts.tunnel_wait = "10s";
    let two = Kas::start(&r.dir.path().join("kas-2"), opts).await;
    let id = r.rig.agent_id;
    // Replica 1 holds it in memory; the store has none, as right after the agent connected.
    let forget = format!("DELETE FROM config_states WHERE agent_id = {id};");
    r.shared.pg.sql_in("kas", &forget).unwrap();
    let (code, body) = r.ci_get(&two, "/version").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!(
            "agent {id} has no configuration in force known to the kas replicas yet"
        )) && !body.contains("has not connected since kas started"),
        "{body}"
    );

    // Replica 1 stores the configuration again when a new one is in force; the job, asked
    // first, is still waiting for it then.
    let (served, ()) = tokio::join!(
        r.ci_get(&two, "/version"),
        r.change_ci_access(
            "  - id: group/app\n",
            "  - id: group/app\n  - id: group/other\n"
        )
    );
    assert_eq!(served.0, 200, "{}", served.1);
}

/// A Pod's configuration stream, as [`PodsRig::pod`] opens it.
type ConfigStream = tonic::Streaming<tether_protocol::agent_configuration::ConfigurationResponse>;
/// `ci_access` no longer lists `group/app`, but the database refused the write of that
/// configuration in force (a trigger on its table): once the database takes writes again,
/// replica 2 — which authorizes with the stored configuration — refuses the job within
/// seconds. The failed write was logged once and never retried, so replica 2 kept letting the
/// job in for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_access_removal_not_stored_at_first_reaches_the_other_replicas_once_the_database_recovers()
 {
    let r = CiRig::start("unstored").await;
    let two = r.replica("kas-2").await;
    let (code, body) = r.ci_get(&two, "/version").await;
    assert_eq!(code, 200, "{body}");

    let pg = &r.shared.pg;
    refuse_config_writes(pg);
    r.change_ci_access("  - id: group/app\n", "  - id: group/other\n")
        .await;
    let unstored = "kas_configuration_unstored_agents";
    wait_for(
        "the failed write counted",
        Duration::from_secs(10),
        || async { (r.rig.kas.metric(unstored).await == Some(1.0)).then_some(()) },
    )
    .await;
    assert_eq!(r.ci_get(&two, "/version").await.0, 200, "not stored yet");

    pg.sql_in("kas", "DROP TRIGGER refuse ON config_states;")
        .unwrap();
    wait_for(
        "replica 2 to refuse the job",
        Duration::from_secs(15),
        || async { (r.ci_get(&two, "/version").await.0 == 403).then_some(()) },
    )
    .await;
    assert_eq!(r.rig.kas.metric(unstored).await, Some(0.0));
}

/// While replica 1 cannot store the agent's configuration in force (a trigger refuses the
/// write), `kas agent status` — through replica 1, which serves the agent, and through
/// replica 2 — says so, with the stored commit replica 2 still authorizes with, in its text
/// and its JSON; once stored, it says nothing more. Status said nothing, and operators could
/// not tell why the replicas disagreed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_says_while_the_configuration_in_force_is_not_yet_stored() {
    let r = CiRig::start("unstoredstatus").await;
    let two = r.replica("kas-2").await;
    let id = r.rig.agent_id.to_string();
    let before = r.rig.kas.agent(r.rig.agent_id).await.config.unwrap().commit;
    let pg = &r.shared.pg;
    refuse_config_writes(pg);
    r.change_ci_access("  - id: group/app\n", "  - id: group/other\n")
        .await;
    let status = |kas: &Kas, json: bool| {
        let mut cmd = kas.cli();
        cmd.args(["agent", "status", &id]);
        if json {
            cmd.args(["-o", "json"]);
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    let others = format!("other replicas still use commit {}", &before[..12]);
    for kas in [&r.rig.kas, &two] {
        let text = status(kas, false);
        assert!(
            text.contains("NOT STORED: configuration in force: commit"),
            "{text}"
        );
        assert!(text.contains(&others), "{text}");
        assert!(text.contains("disk full (simulated)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&status(kas, true)).unwrap();
        let unstored = &json["config"]["unstored"];
        assert_eq!(unstored["stored_commit"], before.as_str(), "{json}");
        assert!(unstored["error"].as_str().unwrap().contains("disk full"));
    }

    pg.sql_in("kas", "DROP TRIGGER refuse ON config_states;")
        .unwrap();
    wait_for(
        "the configuration stored",
        Duration::from_secs(15),
        || async { (!status(&r.rig.kas, false).contains("NOT STORED")).then_some(()) },
    )
    .await;
}

/// The configuration file of [`PodsRig`]'s agent.
const PODS_CONFIG: &str = ".gitlab/agents/pods/config.yaml";

/// A configuration letting CI jobs of `projects` use the agent.
fn ci_access(projects: &[&str]) -> Vec<u8> {
    let listed: String = projects.iter().map(|p| format!("  - id: {p}\n")).collect();
    format!("ci_access:\n  projects:\n{listed}").into_bytes()
}

/// Two replicas whose proxies take CI jobs' ID tokens (signed by `key`, over TLS), and an agent
/// without agentk — the tests speak for its Pods on their configuration streams — whose first
/// configuration, `c0`, lets jobs of `group/app` use it.
struct PodsRig {
    kas: Vec<Kas>,
    repo: GitRepo,
    token: String,
    agent_id: i64,
    c0: String,
    key: support::oidc::SigningKey,
    pki: support::Pki,
    /// Between replica 1 and Redis.
    relay: tether_test_support::net::SeveringRelay,
    _dir: tempfile::TempDir,
    shared: Shared,
}

impl PodsRig {
    /// Replica 1 polls Git every `first_poll`, replica 2 every second.
    async fn start(first_poll: &'static str) -> PodsRig {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shared = Shared::start();
        let relay = tether_test_support::net::SeveringRelay::start(shared.redis.port).await;
        let dir = tempfile::tempdir().unwrap();
        let (key, pki) = ci_issuer(dir.path());
        let repo = GitRepo::init(&dir.path().join("config"));
        let c0 = repo.commit(&[(PODS_CONFIG, Some(&ci_access(&["group/app"])))], "c0");
        let mut kas = Vec::new();
        for (i, poll) in [first_poll, "1s"].into_iter().enumerate() {
            let mut opts = ci_options(&shared, dir.path(), &pki);
            opts.git_poll = poll;
            if i == 0 {
                let direct = format!(":{}/", shared.redis.port);
                let relayed = format!(":{}/", relay.port);
                opts.extra_yaml = opts.extra_yaml.replace(&direct, &relayed);
            }
            kas.push(Kas::start(&dir.path().join(format!("kas-{i}")), opts).await);
        }
        kas[0].set_projects(&[("group/pods", &repo)]).await;
        let t = kas[0]
            .admin
            .register_agent("group/pods", "pods")
            .await
            .unwrap();
        PodsRig {
            kas,
            repo,
            token: t.token,
            agent_id: t.agent_id,
            c0,
            key,
            pki,
            relay,
            _dir: dir,
            shared,
        }
    }

    /// A subscription to the channel the replicas publish on, as a replica's.
    async fn events(&self) -> redis::aio::PubSub {
        let redis = &self.shared.redis;
        let url = format!("redis://:{}@127.0.0.1:{}/0", redis.password, redis.port);
        let client = redis::Client::open(url).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe("tether:events").await.unwrap();
        pubsub
    }

    /// A tunnel of the agent to replica `i`, open while the stream is kept: that replica
    /// then authorizes CI jobs with the configuration in force in its memory (not the store).
    async fn tunnel(&self, i: usize) -> tonic::Streaming<tether_protocol::tunnel::ServerFrame> {
        use tether_protocol::tunnel::reverse_tunnel_client::ReverseTunnelClient;
        use tether_protocol::tunnel::{AgentFrame, Descriptor, agent_frame::Frame};
        let address = tether_transport::KasAddress::parse(&self.kas[i].url("grpc")).unwrap();
        let channel = tether_transport::connect_lazy(&address, &Default::default()).unwrap();
        let descriptor = AgentFrame {
            frame: Some(Frame::Descriptor(Descriptor::default())),
        };
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::iter([descriptor]),
            futures_util::stream::pending(),
        );
        let mut req = tonic::Request::new(frames);
        req.metadata_mut().insert(
            tether_protocol::metadata::AUTHORIZATION,
            tether_protocol::metadata::bearer(&self.token).unwrap(),
        );
        let tunnel = ReverseTunnelClient::new(channel).connect(req).await;
        self.kas[i].wait_connected(self.agent_id).await;
        tunnel.unwrap().into_inner()
    }

    /// Commits `c`, which also lets jobs of `group/new` use the agent, and waits for replica
    /// `i` to fetch it.
    async fn commit_c(&self, i: usize) -> String {
        let access = ci_access(&["group/app", "group/new"]);
        let c = self.repo.commit(&[(PODS_CONFIG, Some(&access))], "c");
        wait_for(
            "the replica to fetch c",
            Duration::from_secs(30),
            || async {
                let projects = self.kas[i].admin.list_projects().await.ok()?;
                let p = projects.into_iter().find(|p| p.path == "group/pods")?;
                (p.commit.as_deref() == Some(c.as_str())).then_some(())
            },
        )
        .await;
        c
    }

    /// The configuration stream of the agent's Pod `pod` on replica `i`, saying what it runs
    /// and refused (as [`support::config_stream_from`]).
    async fn pod(&self, i: usize, pod: &str, said: (&str, &str, &str)) -> ConfigStream {
        support::config_stream_from(&self.kas[i], &self.token, pod, said).await
    }

    /// Pod P2 (a new agentk) on replica 2 runs the newest configuration `c`; Pod P1 (an older
    /// agentk) on replica 1 was sent it too and reopened its stream refusing it, running `c0`.
    /// Returns `c` and the two Pods' streams.
    async fn old_pod_refusing_c(&self) -> (String, [ConfigStream; 2]) {
        let mut p1 = self.pod(0, "agentk-old", ("", "", "")).await;
        assert_eq!(p1.message().await.unwrap().unwrap().commit_id, self.c0);
        let c = self.commit_c(1).await;
        assert_eq!(p1.message().await.unwrap().unwrap().commit_id, c);
        let mut p2 = self.pod(1, "agentk-new", ("", "", "")).await;
        assert_eq!(p2.message().await.unwrap().unwrap().commit_id, c);

        // P1 does not know a field of c: it reopens its stream saying so, running c0.
        drop(p1);
        let why = "unknown field `new_feature`";
        let p1 = self.pod(0, "agentk-old", (&self.c0, &c, why)).await;
        (c, [p1, p2])
    }

    /// The commit replica `i` shows in force (`kas agent status`).
    async fn in_force(&self, i: usize) -> String {
        let agent = self.kas[i].agent(self.agent_id).await;
        agent.config.map(|c| c.commit).unwrap_or_default()
    }

    /// Waits up to `secs` for replica `i` to have `c0` in force, refusing a job of `group/new`.
    async fn wait_c0_in_force(&self, i: usize, what: &str, secs: u64) {
        wait_for(what, Duration::from_secs(secs), || async {
            let c0 = self.in_force(i).await == self.c0;
            (c0 && !self.new_job_may_use_the_agent(i).await).then_some(())
        })
        .await;
    }

    /// Whether replica `i` gives a CI job of `group/new` — which only `c` lets use the agent —
    /// a kubeconfig with the agent's context.
    async fn new_job_may_use_the_agent(&self, i: usize) -> bool {
        let jwt = self.key.sign(&support::oidc::claims("group/new"));
        let port = self.kas[i].k8s_port;
        let (code, body) = support::upgrade::ci_kubeconfig(port, &self.pki.ca, &jwt).await;
        code == 200 && body.contains("group/pods:pods")
    }
}

/// A rollout with mixed agentk versions across kas replicas: Pod P2, on replica 2, runs the
/// newest configuration `c`; Pod P1, an older agentk on replica 1, refuses it. `c` stays in
/// force on both replicas and goes on authorizing CI jobs. Replica 1 compared only the Pods
/// connected to it: P1's refusal took `c` out of force there and, through the store, for every
/// replica, although P2 ran it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_refusing_what_a_pod_on_another_replica_runs_does_not_take_it_out_of_force() {
    let r = PodsRig::start("1s").await;
    let (c, _pods) = r.old_pod_refusing_c().await;
    for i in 0..2 {
        assert_eq!(r.in_force(i).await, c, "replica {}", i + 1);
        assert!(r.new_job_may_use_the_agent(i).await, "replica {}", i + 1);
    }
    let state = r.kas[0].agent(r.agent_id).await.config.unwrap();
    assert_eq!(
        state.error_commit.as_deref(),
        Some(c.as_str()),
        "the refusal shows"
    );
    assert!(
        r.kas[0]
            .log()
            .contains("another replica was sent it and has not refused it, so it stays in force")
    );
}

/// When Pod P2, on replica 2, the last one running the configuration in force (`c`), goes,
/// the configuration Pod P1 runs on replica 1 (`c0`: replica 1 has not fetched `c` yet) is put
/// in force on both replicas, and CI jobs are authorized by it. Replica 2 compared only the
/// Pods connected to it: none were left, so `c` stayed in force for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_last_pod_running_the_configuration_in_force_goes_the_others_is_in_force() {
    let r = PodsRig::start("1h").await;
    let mut p1 = r.pod(0, "agentk-old", ("", "", "")).await;
    assert_eq!(p1.message().await.unwrap().unwrap().commit_id, r.c0);
    let c = r.commit_c(1).await;
    let mut p2 = r.pod(1, "agentk-new", ("", "", "")).await;
    assert_eq!(p2.message().await.unwrap().unwrap().commit_id, c);
    assert_eq!(r.in_force(1).await, c);
    assert!(r.new_job_may_use_the_agent(0).await);

    drop(p2);
    for i in [1, 0] {
        let what = format!("replica {} to put c0 in force", i + 1);
        r.wait_c0_in_force(i, &what, 10).await;
    }
    assert!(
        r.kas[1]
            .log()
            .contains("Every replica of the agent still connected runs this configuration")
    );
    drop(p1);
}

/// Replica 2, whose Pod P2 runs the configuration in force (`c`), is killed (SIGKILL: it
/// neither withdraws P2's entry nor deletes its liveness key) while Pod P1, an older agentk on
/// replica 1, refuses `c` and runs `c0`. `c` stays in force while replica 2's liveness key
/// lives; once it expires, P2's entry stops counting and replica 1 soon puts `c0`, which every
/// Pod still connected runs, in force, and CI jobs are authorized by it. Replica 1 decided only
/// when one of its own streams opened or ended, so `c` stayed in force for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_pods_stop_counting_once_its_liveness_key_expires() {
    let mut r = PodsRig::start("1s").await;
    let (c, pods) = r.old_pod_refusing_c().await;
    assert_eq!(r.in_force(0).await, c, "P2 runs c");

    r.kas[1].kill9();
    // The liveness key (10 s, refreshed every 3 s) outlives this look.
    assert_eq!(r.in_force(0).await, c, "replica 2's key still lives");
    // The key's 10 s, the 5 s grace and the 5 s period of deciding again, with room.
    r.wait_c0_in_force(0, "replica 1 to put c0 in force", 45)
        .await;
    drop(pods);
}

/// Replica 1, where the agent's tunnel is (so it authorizes CI jobs with the configuration in
/// force in its memory), has `c` in force: its Pod P1 refused it, but Pod P2 on replica 2 runs
/// it. Replica 1 is cut from Redis and P2 goes: replica 2 puts `c0` — without `group/new` in
/// `ci_access` — in force, stores it and publishes it while replica 1 hears nothing. Once
/// replica 1 reaches Redis again and resubscribes, it reads the configurations in force from
/// the store: `c0` is in force there within seconds and a job of `group/new` is refused. The
/// message published meanwhile was lost for good, and replica 1 kept authorizing the job with
/// `c` until something else made it read the agent's record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_access_removal_published_while_a_replica_was_cut_from_redis_reaches_it_once_it_resubscribes()
 {
    let r = PodsRig::start("1s").await;
    let _tunnel = r.tunnel(0).await;
    let (c, [p1, p2]) = r.old_pod_refusing_c().await;
    assert_eq!(r.in_force(0).await, c, "P2 runs c");
    assert!(r.new_job_may_use_the_agent(0).await);

    let mut events = r.events().await;
    r.relay.sever();
    drop(p2);
    // Within replica 1's liveness key (10 s): replica 2 still counts P1 and decides.
    config_in_force_published(&mut events, "replica 2 to publish c0 in force", 6).await;
    assert!(!r.new_job_may_use_the_agent(1).await, "c0 stored");
    r.relay.restore();
    // Resubscribing takes a few seconds of back-off; the periodic re-read is 30 s.
    r.wait_c0_in_force(0, "replica 1 to put c0 in force once it resubscribes", 15)
        .await;
    assert!(
        r.kas[0]
            .log()
            .contains("Following the Redis revocation channel again")
    );
    drop(p1);
}

/// Waits up to `secs` for the next `ConfigInForce` message on `events`.
async fn config_in_force_published(events: &mut redis::aio::PubSub, what: &str, secs: u64) {
    let published = tokio::time::timeout(Duration::from_secs(secs), async {
        let mut messages = events.on_message();
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            let payload: String = m.get_payload().unwrap();
            if payload.contains("config_in_force") {
                return;
            }
        }
    });
    published
        .await
        .unwrap_or_else(|_| panic!("{what} within {secs} s"));
}

/// Replica 1, where the agent's tunnel is (so it authorizes CI jobs with the configuration in
/// force in its memory), has `c` in force: P2 on replica 2 runs it, while P1 on replica 1 and
/// P3 on replica 2 (older agentk) refuse it and run `c0`. The database refuses configuration
/// writes and P2 goes: replica 2 puts `c0` in force, fails to store it and publishes it;
/// replica 1 reads the former record, with `c`. Once the database takes writes, replica 2's
/// retry stores `c0` and publishes it again, so replica 1 puts `c0` in force at once (a job of
/// `group/new` is refused). The retry published nothing, and replica 1 kept authorizing the
/// job with `c` until its 30 s re-read of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_stored_by_the_retry_is_published_to_the_other_replicas() {
    a_refused_decision_is_stored_and_published_by_the_retry(true).await;
}

/// As above, but replica 2 is left with no stream of the agent when P2 goes (no P3): it puts
/// `c0` — what P1 on replica 1 runs — in force, fails to store it and publishes it, and its
/// retry stores and publishes it once the database takes writes. The retry gave the decision
/// up at once, with no stream of the agent left on replica 2, and `c` stayed stored: replica 1
/// authorized the job with it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_whose_write_failed_is_stored_by_the_retry_with_no_stream_of_the_agent_left() {
    a_refused_decision_is_stored_and_published_by_the_retry(false).await;
}

/// The scenario of the two tests above; `p3`: whether P3 keeps a stream on replica 2.
async fn a_refused_decision_is_stored_and_published_by_the_retry(p3: bool) {
    let r = PodsRig::start("1s").await;
    let _tunnel = r.tunnel(0).await;
    let (c, [p1, p2]) = r.old_pod_refusing_c().await;
    let why = "unknown field `new_feature`";
    let p3 = if p3 {
        Some(r.pod(1, "agentk-old-2", (&r.c0, &c, why)).await)
    } else {
        None
    };
    assert_eq!(r.in_force(0).await, c, "P2 runs c");

    let mut events = r.events().await;
    refuse_config_writes(&r.shared.pg);
    drop(p2);
    config_in_force_published(&mut events, "replica 2 to publish c0 in force", 10).await;
    let unstored = "kas_configuration_unstored_agents";
    assert_eq!(r.kas[1].metric(unstored).await, Some(1.0), "c0 not stored");
    assert!(
        r.new_job_may_use_the_agent(0).await,
        "replica 1 read the record with c"
    );

    r.shared
        .pg
        .sql_in("kas", "DROP TRIGGER refuse ON config_states;")
        .unwrap();
    // The retry runs every 5 s; replica 1's re-read every 30 s.
    config_in_force_published(&mut events, "replica 2 to publish c0 once stored", 10).await;
    assert_eq!(r.kas[1].metric(unstored).await, Some(0.0));
    r.wait_c0_in_force(0, "replica 1 to put c0 in force", 5)
        .await;
    drop((p1, p3));
}
