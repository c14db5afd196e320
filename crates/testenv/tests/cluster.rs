//! Proof that the control plane is real: controllers, scheduler and kwok make a Deployment
//! Available, and the API server enforces RBAC for a ServiceAccount token.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tether_testenv::{TestEnv, run_output, seed_agent_rbac};

fn nginx(name: &str, ns: &str, replicas: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}
            }
        }
    })
}

#[test]
fn deployment_becomes_available_with_one_replica() {
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("avail").expect("namespace");
    env.apply_yaml(&nginx("nginx", &ns, 1).to_string())
        .expect("apply the Deployment");
    run_output(env.kubectl().args([
        "wait",
        "--for=condition=Available",
        "--timeout=120s",
        "-n",
        &ns,
        "deployment/nginx",
    ]))
    .expect("the Deployment becomes Available");
    let out =
        run_output(
            env.kubectl()
                .args(["get", "deployment", "nginx", "-n", &ns, "-o", "json"]),
        )
        .expect("get the Deployment");
    let d: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(
        d["status"]["availableReplicas"], 1,
        "status: {}",
        d["status"]
    );
    assert_eq!(d["status"]["readyReplicas"], 1);
    let available = d["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Available")
        .expect("an Available condition");
    assert_eq!(available["status"], "True");
}

#[tokio::test]
async fn seed_agent_rbac_allows_dude_and_forbids_naww() {
    // Several crypto providers are compiled into the workspace's test builds; pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("gitlab-k8s-agent").expect("ns");
    let dude = env.create_namespace("dude").expect("ns");
    let naww = env.create_namespace("naww").expect("ns");
    env.apply_yaml(&seed_agent_rbac(&agent_ns, "gitlab-agent", &dude))
        .expect("RBAC");

    // A real TokenRequest, as the agent's pod would get.
    let token = run_output(env.kubectl().args([
        "create",
        "token",
        "gitlab-agent",
        "-n",
        &agent_ns,
        "--duration=10m",
    ]))
    .expect("TokenRequest");
    let token = String::from_utf8(token).expect("utf-8");
    let kubeconfig =
        Kubeconfig::from_yaml(&env.token_kubeconfig(token.trim())).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");

    let in_dude: Api<Deployment> = Api::namespaced(client.clone(), &dude);
    let d: Deployment = serde_json::from_value(nginx("nginx", &dude, 1)).expect("Deployment");
    in_dude
        .create(&PostParams::default(), &d)
        .await
        .expect("the agent may create a Deployment in dude");

    let in_naww: Api<Deployment> = Api::namespaced(client.clone(), &naww);
    let d: Deployment = serde_json::from_value(nginx("nginx", &naww, 1)).expect("Deployment");
    match in_naww.create(&PostParams::default(), &d).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert_eq!(status.reason, "Forbidden", "{status:?}");
        }
        other => panic!("expected 403 Forbidden in naww, got {other:?}"),
    }
    // Nothing landed in naww (checked as admin).
    let admin = kube::Client::try_default().await.expect("admin client");
    let left: Api<Deployment> = Api::namespaced(admin, &naww);
    let listed = left.list(&ListParams::default()).await.expect("list");
    assert!(listed.items.is_empty());

    // ConfigMaps are allowed cluster-wide: that is where inventories live.
    let cms: Api<ConfigMap> = Api::namespaced(client, &naww);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "inventory-probe", "namespace": naww}
    }))
    .expect("ConfigMap");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("ConfigMaps may be written in any namespace");
}
