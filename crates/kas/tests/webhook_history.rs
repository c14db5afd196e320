//! The push webhook delivery history of a real kas (in this process, SQLite, listeners on
//! 127.0.0.1) under deliveries to project ids that do not exist and floods to one that does.
//! Needs no control plane.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tether_kas_api::AdminClient;

/// kas with every listener on a free loopback port, a separate webhook listener, and failure
/// limits high enough that every delivery below reaches the webhook handler.
fn config(data_dir: &std::path::Path) -> kas::config::Config {
    let listen = "  listen:\n    address: 127.0.0.1:0\n";
    let unlimited = "{ per_minute: 1000000, burst: 1000000 }";
    let yaml = format!(
        "data_dir: {}\nagent:\n{listen}api:\n{listen}kubernetes_api:\n{listen}\
         observability:\n{listen}webhooks:\n{listen}\
         rate_limits:\n  failed_auth_per_address: {unlimited}\n  failed_auth_per_credential: {unlimited}\n",
        data_dir.display()
    );
    kas::config::Config::parse(&yaml, std::path::Path::new("test.yaml")).expect("config")
}

async fn post(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> u16 {
    let req = http::Request::post(url)
        .header("x-gitlab-token", "not-the-secret")
        .header("x-gitlab-event", "Push Hook")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    client
        .request(req)
        .await
        .expect("webhook answer")
        .status()
        .as_u16()
}

/// Deliveries to project ids kas does not have leave no history; one project's history stays
/// at its last few deliveries however many arrive; a deleted project's history goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_existing_projects_have_a_bounded_delivery_history() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let running = kas::server::start(config(tmp.path()))
        .await
        .expect("kas starts");
    let hooks = running.webhooks_addr.expect("webhook listener");
    let secret = tmp.path().join("webhook-secret");
    std::fs::write(&secret, "the-secret").expect("secret");
    let source = tether_store::ProjectSource {
        webhook_secret_file: Some(secret.display().to_string()),
        ..Default::default()
    };
    let project = running
        .store
        .set_project_source("group/app", &source)
        .await
        .expect("project");
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    for unknown in (project.id + 1..).take(300) {
        let url = format!("http://{hooks}/webhooks/projects/{unknown}");
        assert_eq!(post(&client, &url).await, 401);
        assert!(running.deliveries.of(unknown).is_empty(), "{unknown}");
    }
    assert_eq!(running.deliveries.projects(), 0);

    let url = format!("http://{hooks}/webhooks/projects/{}", project.id);
    for _ in 0..50 {
        assert_eq!(post(&client, &url).await, 401);
    }
    let history = running.deliveries.of(project.id);
    assert_eq!(history.len(), 5, "{history:?}");
    assert!(history.iter().all(|(_, outcome)| *outcome == "refused"));
    assert_eq!(running.deliveries.projects(), 1);

    let token = tmp.path().join("admin-token");
    let admin = AdminClient::from_token_file(&format!("http://{}", running.api_addr), &token)
        .expect("admin client");
    admin.remove_project("group/app").await.expect("delete");
    assert!(running.deliveries.of(project.id).is_empty());
    assert_eq!(running.deliveries.projects(), 0);

    running.stop();
    running.shutdown(Duration::from_secs(5)).await;
}
