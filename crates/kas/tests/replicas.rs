//! Several kas replicas sharing PostgreSQL and Redis, as real processes: a token revoked on one
//! replica ends the agent's streams on another within a second, and readiness follows Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::gitops::{RigArgs, configmap, rig_opts};
use support::{Agent, Kas, KasOptions, wait_for};
use tether_testenv::postgres::Postgres;
use tether_testenv::redis::Redis;

/// PostgreSQL and Redis for the replicas, and the options each replica starts with. The token
/// re-check is an hour, so only Redis can carry a revocation across in time.
struct Shared {
    _pg: Postgres,
    redis: Redis,
    yaml: String,
}

impl Shared {
    fn start() -> Shared {
        let pg = Postgres::start().unwrap();
        let url = pg.create_database("kas").unwrap();
        let redis = Redis::start().unwrap();
        let yaml = format!(
            "database:\n  url: {url}\nredis:\n  url: {}\n  password_file: {}\n",
            redis.url(),
            redis.password_file().unwrap().display()
        );
        Shared {
            _pg: pg,
            redis,
            yaml,
        }
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

/// The status of kas's `/readiness`, or `None` if the endpoint does not answer.
async fn readiness(kas: &Kas) -> Option<u16> {
    let response = kas.observability_get("/readiness").await?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_replica_ends_its_streams_on_another_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let shared = Shared::start();
    let one = shared.replica(&dir.path().join("kas-1")).await;
    let two = shared.replica(&dir.path().join("kas-2")).await;
    let t = one
        .admin
        .register_agent("group/app", "agent")
        .await
        .unwrap();
    let agent = Agent::start(dir.path(), "agentk", &one.url("grpc"), &t.token, None);
    one.wait_connected(t.agent_id).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_ready_only_while_redis_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut shared = Shared::start();
    let kas = shared.replica(&dir.path().join("kas")).await;
    assert_eq!(readiness(&kas).await, Some(200));
    shared.redis.stop();
    wait_for("kas not ready", Duration::from_secs(10), || async {
        (readiness(&kas).await == Some(503)).then_some(())
    })
    .await;
    assert!(kas.log().contains("Redis"), "{}", kas.log());
    shared.redis.restart().unwrap();
    wait_for("kas ready again", Duration::from_secs(15), || async {
        (readiness(&kas).await == Some(200)).then_some(())
    })
    .await;
}

/// With each replica keeping its own mirrors, a push webhook sent to replica 2 makes replica 1,
/// which serves the agent, fetch too: the commit is applied at once (the poll is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_sent_to_one_replica_drives_the_sync_of_an_agent_on_another() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = tether_testenv::TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("replicas").unwrap();
    let rbac = support::gitops::admin_rbac(&ns);
    let shared = Shared::start();
    let c = configmap("first", &ns, "1");
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &rbac,
        project_extra: "",
        initial: &[("manifests/cm.yaml", Some(&c[..]))],
        agent_args: &[],
    };
    let (rig, c1) = rig_opts(args, shared.options()).await;
    rig.synced(&c1).await;
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
