//! Installing into a cluster: the Helm charts under deploy/helm and the plain manifests under
//! deploy/manifests, checked with the real (pinned) helm and applied to the real control plane
//! with server-side apply. Pods land on the kwok node, which marks them Running without running
//! a container, so "the agent Deployment becomes Available" is real scheduling and real
//! controllers, not agentk's in-cluster code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Agent, GitRepo, Kas, KasOptions, Pki, wait_for};
use tether_testenv::{TestEnv, run_output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart(name: &str) -> PathBuf {
    repo_root().join("deploy/helm").join(name)
}

/// The pinned helm from the control plane's programs folder, with its own config, cache and data
/// folders inside the run's state directory (nothing read from or written to the user's).
fn helm(env: &TestEnv) -> Command {
    let mut c = Command::new(env.bin_dir.join("helm"));
    let home = env.dir.join("helm");
    c.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    c
}

/// `helm template` of a chart as release `release` in `namespace`, with values files in order.
fn template(
    env: &TestEnv,
    chart_name: &str,
    release: &str,
    namespace: &str,
    values: &[PathBuf],
) -> String {
    let mut c = helm(env);
    c.args(["template", release])
        .arg(chart(chart_name))
        .args(["--namespace", namespace]);
    for v in values {
        c.arg("-f").arg(v);
    }
    String::from_utf8(run_output(&mut c).unwrap()).unwrap()
}

/// The objects of a multi-document YAML stream (empty documents dropped).
fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|o| !o.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, namespace: Option<&str>, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"].as_str() == namespace
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace:?}/{name} in {objs:#?}"))
}

fn kinds(objs: &[Value]) -> Vec<String> {
    objs.iter()
        .map(|o| o["kind"].as_str().unwrap().to_string())
        .collect()
}

fn ci_values(chart_name: &str, file: &str) -> PathBuf {
    chart(chart_name).join("ci").join(file)
}

/// RBAC questions about one ServiceAccount, answered by the API server (`kubectl auth can-i`).
struct Rights<'a> {
    env: &'a TestEnv,
    user: String,
}

impl Rights<'_> {
    fn of<'a>(env: &'a TestEnv, namespace: &str, sa: &str) -> Rights<'a> {
        Rights {
            env,
            user: format!("system:serviceaccount:{namespace}:{sa}"),
        }
    }

    fn can(&self, args: &[&str]) -> bool {
        let out = self
            .env
            .kubectl()
            .args(["auth", "can-i", "--as", &self.user])
            .args(args)
            .output()
            .unwrap();
        // Exit status 1 with "no" is a refusal; anything else on stderr is a broken question.
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            answer == "yes" || answer == "no",
            "can-i {args:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer == "yes"
    }

    fn yes(&self, args: &[&str]) {
        assert!(
            self.can(args),
            "{} expected to be allowed {args:?}",
            self.user
        );
    }

    fn no(&self, args: &[&str]) {
        assert!(
            !self.can(args),
            "{} expected to be refused {args:?}",
            self.user
        );
    }
}

/// The agentk chart with a committed ci values file, released in `agent_ns` and managing
/// `managed`: this run's unique namespaces stand in for the names the file uses.
fn agentk_managing(env: &TestEnv, values_file: &str, agent_ns: &str, managed: &[&str]) -> String {
    agentk_with_rbac(env, values_file, agent_ns, managed, &[])
}

/// As [`agentk_managing`], with ConfigMaps only (inventories) in `inventories`.
fn agentk_with_rbac(
    env: &TestEnv,
    values_file: &str,
    agent_ns: &str,
    managed: &[&str],
    inventories: &[&str],
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut rbac = format!("rbac:\n  namespaces: [{}]\n", managed.join(", "));
    if !inventories.is_empty() {
        rbac += &format!("  inventoryNamespaces: [{}]\n", inventories.join(", "));
    }
    let names = write(dir.path(), "namespaces.yaml", &rbac);
    template(
        env,
        "agentk",
        "agentk",
        agent_ns,
        &[ci_values("agentk", values_file), names],
    )
}

/// Waits (kubectl's own watch, no polling here) until a Deployment reports Available.
fn wait_available(env: &TestEnv, namespace: &str, name: &str) {
    run_output(env.kubectl().args([
        "wait",
        "--for=condition=Available",
        "--timeout=120s",
        "-n",
        namespace,
        &format!("deployment/{name}"),
    ]))
    .unwrap_or_else(|e| panic!("deployment {namespace}/{name} not Available: {e}"));
}

fn get_json(env: &TestEnv, args: &[&str]) -> Value {
    let out = run_output(env.kubectl().args(args).args(["-o", "json"])).unwrap();
    serde_json::from_slice(&out).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn both_charts_pass_helm_lint_with_every_ci_values_file() {
    let env = TestEnv::from_env().expect("a running control plane");
    // The helm of testenv/versions.env, not whichever one is on PATH.
    let pins = std::fs::read_to_string(repo_root().join("testenv/versions.env")).unwrap();
    let pinned = pins
        .lines()
        .find_map(|l| l.strip_prefix("HELM_VERSION="))
        .unwrap();
    let version = run_output(helm(&env).args(["version", "--short"])).unwrap();
    assert!(
        String::from_utf8_lossy(&version).starts_with(pinned),
        "helm {} is not the pinned {pinned}",
        String::from_utf8_lossy(&version)
    );
    for chart_name in ["agentk", "kas"] {
        let ci = chart(chart_name).join("ci");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&ci)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 2, "{chart_name} has ci values files");
        for values in files {
            let out = run_output(
                helm(&env)
                    .args(["lint", "--strict"])
                    .arg(chart(chart_name))
                    .arg("-f")
                    .arg(&values),
            )
            .unwrap_or_else(|e| panic!("helm lint {chart_name} -f {}: {e}", values.display()));
            let out = String::from_utf8_lossy(&out);
            assert!(out.contains("0 chart(s) failed"), "{out}");
        }
    }
}

#[test]
fn the_agentk_chart_says_which_value_is_missing() {
    let env = TestEnv::from_env().expect("a running control plane");
    let dir = tempfile::tempdir().unwrap();
    let render = |values: &str| {
        helm(&env)
            .args(["template", "agentk"])
            .arg(chart("agentk"))
            .arg("-f")
            .arg(write(dir.path(), "v.yaml", values))
            .output()
            .unwrap()
    };
    let out = render("{}");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config.kasAddress is required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = render("config:\n  kasAddress: grpcs://kas.example.com:8150\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set config.secretName"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of chart `name` as a chart version from before `valuesVersion` was: without the key
/// and without the templates' check of it.
fn chart_from_before_values_version(dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    let cp = Command::new("cp")
        .arg("-r")
        .arg(chart(name))
        .arg(&copy)
        .status();
    assert!(cp.unwrap().success());
    let values = copy.join("values.yaml");
    let text = std::fs::read_to_string(&values).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("valuesVersion:"))
        .collect();
    std::fs::write(&values, kept.join("\n")).unwrap();
    for entry in std::fs::read_dir(copy.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let check = format!("{{{{- include \"{name}.valuesInForce\" . }}}}\n");
        std::fs::write(&path, text.replace(&check, "")).unwrap();
    }
    copy
}

/// `helm upgrade --reuse-values` from a chart version without some of this one's values keeps
/// the old version's values, new keys missing: templates failed on them ("nil pointer evaluating
/// interface {}.enabled", E11). The chart now refuses, naming the way that works, and that way
/// (`--reset-then-reuse-values`) upgrades the release keeping the values set at install.
#[test]
fn an_upgrade_reusing_an_older_charts_values_is_refused_naming_the_way_that_works() {
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("agentk-reuse").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let older = chart_from_before_values_version(dir.path(), "agentk");
    let helm_in = |args: &[&str], chart_dir: &Path| {
        helm(&env)
            .args(args)
            .args(["agentk"])
            .arg(chart_dir)
            .args(["--namespace", &ns])
            .output()
            .unwrap()
    };
    let kas = "config.kasAddress=grpcs://kas.example.com:8150";
    let installed = helm_in(
        &["install", "--set", kas, "--set", "config.token=t"],
        &older,
    );
    assert!(installed.status.success(), "{installed:?}");

    let reused = helm_in(&["upgrade", "--reuse-values"], &chart("agentk"));
    assert!(!reused.status.success(), "{reused:?}");
    let said = String::from_utf8_lossy(&reused.stderr);
    assert!(
        said.contains("the values of this chart version are missing (valuesVersion none")
            && said.contains("--reset-then-reuse-values"),
        "{said}"
    );

    let reset = helm_in(&["upgrade", "--reset-then-reuse-values"], &chart("agentk"));
    assert!(reset.status.success(), "{reset:?}");
    let values = helm(&env)
        .args([
            "get",
            "values",
            "agentk",
            "--namespace",
            &ns,
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    let values: Value = serde_json::from_slice(&values.stdout).unwrap();
    assert_eq!(
        values["config"]["kasAddress"],
        "grpcs://kas.example.com:8150"
    );
}

#[test]
fn the_plain_manifests_are_up_to_date_with_the_chart() {
    let env = TestEnv::from_env().expect("a running control plane");
    let mut c = Command::new(repo_root().join("scripts/render-manifests"));
    c.arg("--check").env("HELM", env.bin_dir.join("helm"));
    run_output(&mut c).unwrap_or_else(|e| panic!("run scripts/render-manifests: {e}"));
    // And they are what a user would apply: the chart's objects plus the namespace.
    let text = std::fs::read_to_string(repo_root().join("deploy/manifests/agentk.yaml")).unwrap();
    let objs = objects(&text);
    find(&objs, "Namespace", None, "gitlab-agent");
    find(&objs, "Deployment", Some("gitlab-agent"), "agentk");
}

/// The Deployment every values file must give: the token as a file from a Secret, the
/// observability port's probes, a restrictive securityContext, the Pod's name and namespace.
fn assert_hardened_agentk(d: &Value, token_secret: &str) {
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--token-file=/etc/agentk/token/token"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--observability-listen-address=0.0.0.0:8080"),
        "{args:?}"
    );
    let token_volume = pod_volume(pod, "token");
    assert_eq!(token_volume["secret"]["secretName"], token_secret);
    let env: Vec<&Value> = c["env"].as_array().unwrap().iter().collect();
    assert!(
        env.iter().all(|e| e
            .get("valueFrom")
            .is_none_or(|v| v.get("secretKeyRef").is_none())),
        "no Secret in the environment: {env:?}"
    );
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = env.iter().find(|e| e["name"] == name).unwrap();
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], path);
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/liveness");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readiness");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
}

#[test]
fn the_default_agentk_chart_runs_on_the_cluster_as_cluster_admin() {
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("agentk-default").unwrap();
    let yaml = template(
        &env,
        "agentk",
        "agentk",
        &ns,
        &[ci_values("agentk", "default-values.yaml")],
    );
    let objs = objects(&yaml);
    let d = find(&objs, "Deployment", Some(&ns), "agentk");
    assert_hardened_agentk(d, "agentk-token");
    // The image tag follows the chart's appVersion, which is the workspace's version.
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/tether-dev/agentk:{}", env!("CARGO_PKG_VERSION"))
    );
    let crb = find(&objs, "ClusterRoleBinding", None, &format!("{ns}-agentk"));
    assert_eq!(crb["roleRef"]["name"], "cluster-admin");
    assert!(
        !kinds(&objs).contains(&"PodDisruptionBudget".to_string()),
        "one replica, no PDB"
    );

    env.apply_yaml(&yaml).unwrap();
    wait_available(&env, &ns, "agentk");
    let pods = get_json(
        &env,
        &[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            "app.kubernetes.io/name=agentk",
        ],
    );
    assert_eq!(
        pods["items"][0]["spec"]["nodeName"],
        tether_testenv::cluster::NODE_NAME
    );
    let secret = get_json(&env, &["get", "secret", "agentk-token", "-n", &ns]);
    assert!(
        secret["data"]["token"].is_string(),
        "the chart made the token Secret"
    );
    // cluster-admin
    Rights::of(&env, &ns, "agentk").yes(&["*", "*", "--all-namespaces"]);
}

#[test]
fn the_least_privilege_agentk_chart_grants_nothing_beyond_its_namespaces() {
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("gitlab-k8s-agent").unwrap();
    let dude = env.create_namespace("dude").unwrap();
    let naww = env.create_namespace("naww").unwrap();
    let inventories = env.create_namespace("team-inventories").unwrap();
    let yaml = agentk_with_rbac(
        &env,
        "least-privilege-values.yaml",
        &agent_ns,
        &[&agent_ns, &dude],
        &[&inventories],
    );
    let objs = objects(&yaml);
    assert_hardened_agentk(
        find(&objs, "Deployment", Some(&agent_ns), "agentk"),
        "gitlab-agent-token",
    );
    assert!(
        !objs.iter().any(|o| o["kind"] == "Secret"),
        "an existing Secret is used, none is made"
    );
    assert!(
        !objs.iter().any(|o| o["roleRef"]["name"] == "cluster-admin"),
        "no cluster-admin in least-privilege mode"
    );
    // The existing Secret, made beforehand as a user would.
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: gitlab-agent-token\n  namespace: {agent_ns}\nstringData:\n  token: some-agent-token\n"
    ))
    .unwrap();
    env.apply_yaml(&yaml).unwrap();
    wait_available(&env, &agent_ns, "agentk");

    let sa = Rights::of(&env, &agent_ns, "agentk");
    // Everything in its own namespace and in dude.
    sa.yes(&["create", "deployments.apps", "-n", &dude]);
    sa.yes(&["delete", "secrets", "-n", &dude]);
    sa.yes(&["create", "deployments.apps", "-n", &agent_ns]);
    // Nothing in naww, ConfigMaps included, nor in kube-system: no cluster-wide ConfigMap
    // writes (they would let the agent rewrite any ConfigMap of the cluster).
    sa.no(&["create", "deployments.apps", "-n", &naww]);
    sa.no(&["get", "secrets", "-n", &naww]);
    sa.no(&["create", "configmaps", "-n", &naww]);
    sa.no(&["update", "configmaps", "-n", "kube-system"]);
    sa.no(&["get", "configmaps", "--all-namespaces"]);
    // Inventories only where inventoryNamespaces says.
    sa.yes(&["update", "configmaps", "-n", &inventories]);
    sa.yes(&["create", "events", "-n", &inventories]);
    sa.no(&["create", "deployments.apps", "-n", &inventories]);
    sa.no(&["get", "secrets", "-n", &inventories]);
    // Leader election in its own namespace.
    sa.yes(&["create", "leases.coordination.k8s.io", "-n", &agent_ns]);
    sa.yes(&["update", "leases.coordination.k8s.io", "-n", &agent_ns]);
    sa.no(&["create", "leases.coordination.k8s.io", "-n", &naww]);
    // Nothing cluster-scoped beyond that.
    sa.no(&["create", "namespaces"]);
    sa.no(&["create", "clusterroles.rbac.authorization.k8s.io"]);
    sa.no(&["list", "deployments.apps", "--all-namespaces"]);
}

#[test]
fn an_existing_role_and_cluster_read_only_grant_what_they_say() {
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("agentk-role").unwrap();
    let apps = env.create_namespace("apps").unwrap();
    let other = env.create_namespace("other").unwrap();
    let yaml = agentk_managing(&env, "existing-role-values.yaml", &agent_ns, &[&apps]);
    let objs = objects(&yaml);
    assert!(
        !kinds(&objs).contains(&"ServiceAccount".to_string()),
        "serviceAccount.create: false"
    );
    let rb = find(&objs, "RoleBinding", Some(&apps), "agentk-write");
    assert_eq!(rb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(rb["roleRef"]["name"], "edit");
    assert!(
        !objs
            .iter()
            .any(|o| o["kind"] == "Role" && o["metadata"]["name"] == "agentk-write"),
        "the existing role replaces the generated ones"
    );
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: platform-agent\n  namespace: {agent_ns}\n"
    ))
    .unwrap();
    env.apply_yaml(&yaml).unwrap();
    wait_available(&env, &agent_ns, "agentk");

    let sa = Rights::of(&env, &agent_ns, "platform-agent");
    // `edit` in the managed namespace: workloads, not RBAC.
    sa.yes(&["create", "deployments.apps", "-n", &apps]);
    sa.no(&["create", "roles.rbac.authorization.k8s.io", "-n", &apps]);
    // `view` everywhere: reads, but neither Secrets nor writes.
    sa.yes(&["list", "deployments.apps", "--all-namespaces"]);
    sa.no(&["get", "secrets", "-n", &other]);
    sa.no(&["create", "deployments.apps", "-n", &other]);
    // Its own needs in its namespace.
    sa.yes(&["create", "leases.coordination.k8s.io", "-n", &agent_ns]);
    sa.yes(&["create", "configmaps", "-n", &agent_ns]);
}

#[test]
fn the_existing_secret_values_add_a_ca_a_pdb_a_service_monitor_and_a_network_policy() {
    let env = TestEnv::from_env().expect("a running control plane");
    let yaml = template(
        &env,
        "agentk",
        "gitlab-agent",
        "agents",
        &[ci_values("agentk", "existing-secret-values.yaml")],
    );
    let objs = objects(&yaml);
    // The release name says agentk's role already; objects take it as it is.
    let fullname = "gitlab-agent-agentk";
    let d = find(&objs, "Deployment", Some("agents"), fullname);
    assert_hardened_agentk(d, "gitlab-agent-token");
    assert_eq!(d["spec"]["replicas"], 2);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let args = c["args"].as_array().unwrap();
    for want in [
        "--ca-cert-file=/etc/agentk/ca/ca.crt",
        "--kas-address=wss://kas.example.com/agent",
        "--tunnel-min-idle=4",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "HTTPS_PROXY")
    );
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["example.com/team"],
        "platform"
    );
    let ca = find(&objs, "Secret", Some("agents"), &format!("{fullname}-ca"));
    assert!(ca["data"]["ca.crt"].is_string());
    let pdb = find(&objs, "PodDisruptionBudget", Some("agents"), fullname);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    // Unready agentk (kas unreachable) must not block node drains.
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    let svc = find(
        &objs,
        "Service",
        Some("agents"),
        &format!("{fullname}-metrics"),
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    let sm = find(&objs, "ServiceMonitor", Some("agents"), fullname);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "observability");

    // Inbound: the metrics port only, from the monitoring namespace; outbound: DNS, kas and
    // the API server only. Accepted by the API server as it stands.
    let np = find(&objs, "NetworkPolicy", Some("agents"), fullname);
    let spec = &np["spec"];
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "agentk"
    );
    let ingress = spec["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": "observability", "protocol": "TCP"}])
    );
    let from = &ingress[0]["from"][0]["namespaceSelector"]["matchLabels"];
    assert_eq!(from["kubernetes.io/metadata.name"], "monitoring");
    let egress = spec["egress"].as_array().unwrap();
    let ports: Vec<&Value> = egress.iter().map(|r| &r["ports"][0]["port"]).collect();
    assert_eq!(ports, [&json!(53), &json!(443), &json!(6443)]);
    let ns = env.create_namespace("agents").unwrap();
    let mut np = np.clone();
    np["metadata"]["namespace"] = json!(ns);
    env.apply_yaml(&np.to_string())
        .unwrap_or_else(|e| panic!("the NetworkPolicy is refused: {e}"));
}

/// The kas configuration the chart generates, parsed by kas's own loader (unknown keys are
/// errors there, so a key the chart invents fails here).
fn kas_configuration(objs: &[Value], ns: &str) -> kas::config::Config {
    let cm = find(objs, "ConfigMap", Some(ns), "kas");
    let text = cm["data"]["kas.yaml"].as_str().unwrap();
    kas::config::Config::parse(text, Path::new("kas.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn service_ports(objs: &[Value], ns: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = objs
        .iter()
        .filter(|o| o["kind"] == "Service" && o["metadata"]["namespace"] == ns)
        .filter(|o| o["spec"]["clusterIP"] != "None")
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap().to_string(),
                o["spec"]["ports"][0]["port"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The volume of the Pod holding `path`: the mount with the longest path above it.
fn volume_of(pod: &Value, path: &Path) -> String {
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{} is on no volume: {mounts:?}", path.display()));
    mount["name"].as_str().unwrap().to_owned()
}

/// The Pod's volume named `name`.
fn pod_volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    let volumes = pod["volumes"].as_array().unwrap();
    let found = volumes.iter().find(|v| v["name"] == name);
    found.unwrap_or_else(|| panic!("no volume {name}: {volumes:?}"))
}

/// The names of a StatefulSet's claim templates.
fn claim_templates(sts: &Value) -> Vec<&str> {
    sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| t["metadata"]["name"].as_str().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// Git mirrors and the SQLite database are on different volumes, so mirrors growing cannot
/// fill the database's disk: by default the mirrors on an emptyDir with a size limit, or on a
/// claim of their own.
fn assert_mirrors_apart_from_the_database(env: &TestEnv, ns: &str, objs: &[Value]) {
    let cfg = kas_configuration(objs, ns);
    let sts = find(objs, "StatefulSet", Some(ns), "kas");
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(volume_of(pod, &cfg.sqlite_path()), "data");
    assert_eq!(volume_of(pod, &cfg.admin_token_file()), "data");
    assert_eq!(volume_of(pod, &cfg.git_cache_dir()), "mirrors");
    let mirrors = pod_volume(pod, "mirrors");
    assert_eq!(mirrors["emptyDir"]["sizeLimit"], "5Gi", "{mirrors}");
    assert_eq!(claim_templates(sts), ["data"]);

    let dir = tempfile::tempdir().unwrap();
    let values = write(
        dir.path(),
        "mirrors.yaml",
        "mirrors:\n  size: 20Gi\n  persistence:\n    enabled: true\n",
    );
    let objs = objects(&template(env, "kas", "kas", ns, &[values]));
    let sts = find(&objs, "StatefulSet", Some(ns), "kas");
    let pod = &sts["spec"]["template"]["spec"];
    assert!(
        !pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "mirrors"),
        "the claim's volume comes from its template"
    );
    assert_eq!(claim_templates(sts), ["data", "mirrors"]);
    let claim = &sts["spec"]["volumeClaimTemplates"][1]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "20Gi");
}

/// A Kubernetes memory quantity in bytes (the binary suffixes the chart uses).
fn quantity_bytes(q: &str) -> u64 {
    let suffixes = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)];
    let (digits, unit) = suffixes
        .iter()
        .find_map(|(s, unit)| q.strip_suffix(s).map(|d| (d, *unit)))
        .unwrap_or((q, 1));
    digits.parse::<u64>().unwrap() * unit
}

/// kas's renderers share its container's memory limit: with the chart's defaults,
/// `max_concurrent` × `memory_limit` + `memory_reserve` fits in `resources.limits.memory`, so
/// a default install runs the settings it was given and logs no warning about lowering them.
#[test]
fn the_kas_charts_default_memory_limit_holds_its_renderers_and_kas() {
    use tether_gitops_server::render::memory::{RenderMemory, fit};
    let env = TestEnv::from_env().expect("helm of the control plane's programs");
    let objs = objects(&template(&env, "kas", "kas", "kas", &[]));
    let cfg = kas_configuration(&objs, "kas");
    let sts = find(&objs, "StatefulSet", Some("kas"), "kas");
    let resources = &sts["spec"]["template"]["spec"]["containers"][0]["resources"];
    let limit = quantity_bytes(resources["limits"]["memory"].as_str().unwrap());
    let render = &cfg.gitops.render;
    let configured = RenderMemory {
        memory_limit: render.memory_limit,
        max_concurrent: render.max_concurrent,
    };
    let fitted = fit(configured, render.memory_reserve, Some(limit)).unwrap();
    assert_eq!(fitted.lowered, None, "{resources}");
    assert!(
        render.max_concurrent >= 2,
        "one slow rendering holds up no other"
    );
}

#[test]
fn the_kas_chart_is_accepted_by_the_cluster() {
    let env = TestEnv::from_env().expect("a running control plane");

    // Defaults: plain listeners, a generated admin token, SQLite on a claim.
    let ns = env.create_namespace("kas-default").unwrap();
    let yaml = template(
        &env,
        "kas",
        "kas",
        &ns,
        &[ci_values("kas", "default-values.yaml")],
    );
    let objs = objects(&yaml);
    let cfg = kas_configuration(&objs, &ns);
    assert_eq!(cfg.data_dir, Path::new("/var/lib/kas"));
    assert_eq!(cfg.agent.listen.address().to_string(), "0.0.0.0:8150");
    assert_eq!(
        cfg.kubernetes_api.listen.address().to_string(),
        "0.0.0.0:8154"
    );
    assert_eq!(
        cfg.api.listen.address().to_string(),
        "127.0.0.1:8153",
        "the admin API stays on loopback"
    );
    assert!(cfg.webhooks.listen.is_none());
    assert_eq!(
        service_ports(&objs, &ns),
        [
            ("kas-agent".to_string(), 8150),
            ("kas-k8s-api".to_string(), 8154),
            ("kas-observability".to_string(), 8151),
        ]
    );
    let sts = find(&objs, "StatefulSet", Some(&ns), "kas");
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_mirrors_apart_from_the_database(&env, &ns, &objs);
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/liveness");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readiness");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    // kas (and the admin commands run with `kubectl exec`) read the ConfigMap's file.
    let config_env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KAS_CONFIGURATION_FILE")
        .unwrap();
    assert_eq!(config_env["value"], "/etc/kas/config/kas.yaml");
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "config" && m["mountPath"] == "/etc/kas/config")
    );
    env.apply_yaml(&yaml).unwrap();
    // The StatefulSet controller accepted the template and made the Pod's claim.
    run_output(env.kubectl().args([
        "wait",
        "--for=create",
        "--timeout=60s",
        "-n",
        &ns,
        "pvc/data-kas-0",
    ]))
    .unwrap();

    // TLS, an admin token Secret, webhooks, a path prefix and extra configuration.
    let ns = env.create_namespace("kas-tls").unwrap();
    let yaml = template(
        &env,
        "kas",
        "kas",
        &ns,
        &[ci_values("kas", "tls-values.yaml")],
    );
    let objs = objects(&yaml);
    let cfg = kas_configuration(&objs, &ns);
    let tls_cert = Some(PathBuf::from("/etc/kas/tls/tls.crt"));
    assert_eq!(cfg.agent.listen.certificate_file, tls_cert);
    assert_eq!(cfg.kubernetes_api.listen.certificate_file, tls_cert);
    let webhooks = cfg.webhooks.listen.as_ref().unwrap();
    assert_eq!(webhooks.address().to_string(), "0.0.0.0:8155");
    assert_eq!(webhooks.certificate_file, tls_cert);
    assert_eq!(cfg.kubernetes_api.path_prefix, "/k8s-proxy");
    assert_eq!(
        cfg.kubernetes_api.ca_file,
        Some(PathBuf::from("/etc/kas/tls/ca.crt"))
    );
    assert_eq!(
        cfg.api.admin_token_file,
        Some(PathBuf::from("/etc/kas/admin/admin-token"))
    );
    assert_eq!(
        cfg.git.poll_interval,
        std::time::Duration::from_secs(60),
        "config merged in"
    );
    assert_eq!(
        cfg.git_cache_dir(),
        Path::new("/var/lib/kas-mirrors"),
        "the chart's git keys kept beside those merged in"
    );
    assert!(
        service_ports(&objs, &ns).contains(&("kas-webhooks".to_string(), 8155)),
        "{:?}",
        service_ports(&objs, &ns)
    );
    env.apply_yaml(&yaml).unwrap();
    let sts = get_json(&env, &["get", "statefulset", "kas", "-n", &ns]);
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    for (volume, secret) in [("tls", "kas-tls"), ("admin-token", "kas-admin-token")] {
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == volume && v["secret"]["secretName"] == secret),
            "{volume} from {secret}: {volumes:?}"
        );
    }
}

const CI_ISSUER: &str = "https://gitlab.install.test";
const CI_AUDIENCE: &str = "https://kas.install.test";

/// A CI job's OIDC ID token for project `group/app`, signed with a fresh key whose JWKS is
/// written to `jwks` (the issuer kas is told to trust).
fn ci_job_id_token(jwks: &Path) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
    let pair = rcgen::KeyPair::generate().unwrap();
    let key = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("install".into());
    std::fs::write(jwks, json!({ "keys": [jwk] }).to_string()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("install".into());
    let claims = json!({
        "iss": CI_ISSUER, "aud": CI_AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 900,
        "project_path": "group/app", "project_id": "42", "namespace_path": "group",
        "job_id": "901", "pipeline_id": "900", "user_login": "alice",
    });
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_job_installs_the_agentk_chart_through_kas_with_helm() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("ci-agent").unwrap();
    let target = env.create_namespace("ci-helm").unwrap();
    // The agent serving the job: outside the cluster, as a ServiceAccount bound to
    // cluster-admin (the chart's default RBAC creates cluster-wide bindings, which only a
    // holder of those rights may create).
    env.apply_yaml(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: deployer\n  namespace: {agent_ns}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {agent_ns}-deployer\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\n\
subjects:\n- kind: ServiceAccount\n  name: deployer\n  namespace: {agent_ns}\n"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent_kubeconfig = dir.path().join("agent.kubeconfig");
    env.write_service_account_kubeconfig(&agent_ns, "deployer", "1h", &agent_kubeconfig)
        .unwrap();
    let pki = Pki::generate(dir.path());
    let jwks = dir.path().join("jwks.json");
    let id_token = ci_job_id_token(&jwks);

    // The agent lets jobs of group/app act with its own rights in the target namespace.
    let config_repo = GitRepo::init(&dir.path().join("config"));
    let c1 = config_repo.commit(
        &[(
            ".gitlab/agents/deployer/config.yaml",
            Some(
                format!("ci_access:\n  projects:\n  - id: group/app\n    default_namespace: {target}\n    access_as:\n      agent: {{}}\n")
                    .as_bytes(),
            ),
        )],
        "ci access",
    );
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "1s",
            kubernetes_api_extra: format!(
                "  ci_issuers:\n  - issuer: {CI_ISSUER}\n    audience: {CI_AUDIENCE}\n    jwks:\n      file: {}\n  ca_file: {}\n",
                jwks.display(),
                pki.ca.display()
            ),
            k8s_tls: Some((pki.cert.clone(), pki.key.clone())),
            ..KasOptions::default()
        },
    )
    .await;
    kas.set_projects(&[("group/config", &config_repo)]).await;
    let registered = kas
        .admin
        .register_agent("group/config", "deployer")
        .await
        .unwrap();
    let agent = Agent::start_with(
        dir.path(),
        "deployer",
        &kas.url("grpc"),
        &registered.token,
        None,
        &["--kubeconfig", agent_kubeconfig.to_str().unwrap()],
    );
    agent.wait_log("Agent configuration applied", &c1).await;
    // kas authorizes jobs with the configuration it holds: wait until it has this one.
    wait_for(
        "kas to hold the agent's configuration",
        Duration::from_secs(30),
        || async {
            let a = kas.agent(registered.agent_id).await;
            (a.connected && a.config.is_some_and(|c| c.commit == c1)).then_some(())
        },
    )
    .await;

    // The job: its kubeconfig from kas, then helm as the client, all through the tunnel.
    let id_token_file = write(dir.path(), "id_token", &id_token);
    let ci_kubeconfig = dir.path().join("ci.kubeconfig");
    run_output(Command::new(env!("CARGO_BIN_EXE_kas")).args([
        "kubeconfig",
        &format!("--server=https://localhost:{}", kas.k8s_port),
        &format!("--id-token-file={}", id_token_file.display()),
        &format!("--ca-cert-file={}", pki.ca.display()),
        &format!("--output={}", ci_kubeconfig.display()),
    ]))
    .unwrap();
    let kc = std::fs::read_to_string(&ci_kubeconfig).unwrap();
    assert!(
        kc.contains(&format!("https://localhost:{}", kas.k8s_port)),
        "the job talks to kas, not the API server: {kc}"
    );
    let job_helm = |args: &[&str]| {
        let mut c = helm(&env);
        c.arg("--kubeconfig")
            .arg(&ci_kubeconfig)
            .args([
                "--kube-context",
                "group/config:deployer",
                "--namespace",
                &target,
            ])
            .args(args);
        String::from_utf8(run_output(&mut c).unwrap_or_else(|e| panic!("helm {args:?}: {e}")))
            .unwrap()
    };
    let chart_dir = chart("agentk");
    let values = ci_values("agentk", "default-values.yaml");
    let install = [
        "upgrade",
        "--install",
        "agentk",
        chart_dir.to_str().unwrap(),
        "-f",
        values.to_str().unwrap(),
        "--wait",
        "--timeout=2m",
    ];
    job_helm(&install);
    // What the job installed is in the cluster, seen with the admin's credentials.
    wait_available(&env, &target, "agentk");
    let d = get_json(&env, &["get", "deployment", "agentk", "-n", &target]);
    assert_eq!(
        d["metadata"]["annotations"]["meta.helm.sh/release-name"],
        "agentk"
    );
    let crb = get_json(
        &env,
        &["get", "clusterrolebinding", &format!("{target}-agentk")],
    );
    assert_eq!(crb["roleRef"]["name"], "cluster-admin");

    // An upgrade through the tunnel: two replicas bring a PodDisruptionBudget.
    let mut upgrade = install.to_vec();
    upgrade.extend(["--set", "replicas=2"]);
    job_helm(&upgrade);
    let status: Value =
        serde_json::from_str(&job_helm(&["status", "agentk", "-o", "json"])).unwrap();
    assert_eq!(status["version"], 2);
    assert_eq!(status["info"]["status"], "deployed");
    let pdb = get_json(
        &env,
        &["get", "poddisruptionbudget", "agentk", "-n", &target],
    );
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");

    // And an uninstall removes what the release made.
    job_helm(&["uninstall", "agentk", "--wait", "--timeout=2m"]);
    let gone = env
        .kubectl()
        .args(["get", "deployment", "agentk", "-n", &target])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}

/// The `token` key of a Secret, decoded.
fn secret_token(secret: &Value) -> String {
    use base64::Engine as _;
    let stored = secret["data"]["token"].as_str().unwrap();
    let stored = base64::engine::general_purpose::STANDARD
        .decode(stored)
        .unwrap();
    String::from_utf8(stored).unwrap()
}

/// Runs the Helm steps `kas agent register` printed (from `kubectl create namespace` to the
/// end of the `helm` command) as a person would, in the repository (the chart's path is
/// relative to it), with the token saved in `token_file`, the cluster's kubectl and the
/// pinned helm.
fn run_printed_helm_steps(env: &TestEnv, text: &str, token_file: &Path) {
    let steps: Vec<String> = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("kubectl create namespace"))
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.replace("agentk.token", &token_file.display().to_string()))
        .collect();
    assert!(steps.len() >= 3, "no Helm steps in:\n{text}");
    let path = format!(
        "{}:{}",
        env.bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut sh = Command::new("sh");
    sh.args(["-ec", &steps.join("\n")])
        .current_dir(repo_root())
        .env("PATH", path)
        .env("KUBECONFIG", &env.kubeconfig);
    for (var, value) in helm(env).get_envs() {
        sh.env(var, value.unwrap());
    }
    run_output(&mut sh).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_an_agent_prints_how_to_install_it_and_writes_manifests_that_run() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::from_env().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    let ns = tether_testenv::unique_name("registered");
    let file = dir.path().join("agentk.yaml");
    let out = run_output(
        Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&kas.config)
            .args([
                "agent",
                "register",
                "--project",
                "group/app",
                "--name",
                "reg",
            ])
            .args(["--kas-address", "grpcs://kas.corp.example:8150"])
            .args(["--namespace", &ns, "--output-manifests"])
            .arg(&file),
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("the token line")
        .to_owned();
    for expected in [
        "helm upgrade --install reg deploy/helm/agentk".to_owned(),
        format!(
            "kubectl -n {ns} create secret generic reg-agent-token --from-file=token=agentk.token"
        ),
        "--set config.kasAddress=grpcs://kas.corp.example:8150".to_owned(),
        "--set config.secretName=reg-agent-token".to_owned(),
        format!("kubectl apply --server-side -f {}", file.display()),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing in:\n{text}");
    }
    // Shown once, and in no command to type (shell history, ps).
    assert_eq!(text.matches(token.as_str()).count(), 1, "{text}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the manifests hold the token");

    // The Helm commands, run as printed, install an agent that reads the token from the file.
    let token_file = dir.path().join("agentk.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    run_printed_helm_steps(&env, &text, &token_file);
    wait_available(&env, &ns, "reg-agentk");
    let d = get_json(&env, &["get", "deployment", "reg-agentk", "-n", &ns]);
    assert_hardened_agentk(&d, "reg-agent-token");
    let secret = get_json(&env, &["get", "secret", "reg-agent-token", "-n", &ns]);
    assert_eq!(secret_token(&secret), format!("{token}\n"));

    // The written manifests are accepted as they are and agentk's Deployment runs.
    run_output(
        env.kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(&file),
    )
    .unwrap();
    wait_available(&env, &ns, "agentk");
    let secret = get_json(&env, &["get", "secret", "agentk-token", "-n", &ns]);
    assert_eq!(secret_token(&secret), token);
    let d = get_json(&env, &["get", "deployment", "agentk", "-n", &ns]);
    let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--kas-address=grpcs://kas.corp.example:8150"),
        "{args}"
    );
}

/// Several replicas: PostgreSQL's URL and Redis's password and CA (TLS) from Secrets, the peers listener with
/// the shared secret and mutual TLS (cert-manager's Secret layout), each Pod told its IP; the generated configuration is one kas accepts,
/// and the cluster accepts the objects. Without what replicas share, helm names the value.
#[test]
fn the_kas_chart_scales_out_on_postgresql_redis_and_peers() {
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("kas-replicas").unwrap();
    let values = ci_values("kas", "replicas-values.yaml");
    let yaml = template(&env, "kas", "kas", &ns, &[values]);
    let objs = objects(&yaml);
    let cfg = kas_configuration(&objs, &ns);
    assert_eq!(
        cfg.database.url_file.as_deref(),
        Some(Path::new("/etc/kas/database/url"))
    );
    let redis = cfg.redis.as_ref().unwrap();
    assert_eq!(redis.url, "rediss://redis.kas.svc:6380/0");
    assert_eq!(
        redis.password_file.as_deref(),
        Some(Path::new("/etc/kas/redis/password"))
    );
    assert_eq!(
        redis.ca_file.as_deref(),
        Some(Path::new("/etc/kas/redis-ca/ca.crt"))
    );
    let peers = cfg.peers.as_ref().unwrap();
    assert_eq!(peers.listen.to_string(), "0.0.0.0:8156");
    let tls = peers.tls.as_ref().expect("mutual TLS on the hop");
    assert_eq!(tls.ca_file, Path::new("/etc/kas/peers-tls/ca.crt"));
    assert_eq!(
        tls.certificate_file,
        Path::new("/etc/kas/peers-tls/tls.crt")
    );
    assert_eq!(tls.key_file, Path::new("/etc/kas/peers-tls/tls.key"));
    assert_eq!(tls.server_name.as_deref(), Some("kas-peers"));
    let sts = find(&objs, "StatefulSet", Some(&ns), "kas");
    assert_eq!(sts["spec"]["replicas"], 3);
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let pod_ip = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_IP")
        .unwrap();
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    for (volume, secret) in [
        ("database", "kas-database"),
        ("redis", "kas-redis"),
        ("redis-ca", "kas-redis-ca"),
        ("peers", "kas-peers"),
        ("peers-tls", "kas-peers-tls"),
    ] {
        let v = pod_volume(pod, volume);
        assert_eq!(v["secret"]["secretName"], secret);
    }
    // The peers port is no Service's: replicas reach each other by Pod IP.
    assert!(service_ports(&objs, &ns).iter().all(|(_, p)| *p != 8156));
    // Only kas's own Pods reach it; the other listeners stay open.
    let policy = find(&objs, "NetworkPolicy", Some(&ns), "kas-peers");
    let selector = &policy["spec"]["podSelector"]["matchLabels"];
    assert_eq!(selector, &sts["spec"]["selector"]["matchLabels"]);
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let ports = |rule: &Value| -> Vec<String> {
        rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ports(&rules[0]), ["peers"]);
    assert_eq!(rules[0]["from"][0]["podSelector"]["matchLabels"], *selector);
    assert!(rules[1].get("from").is_none(), "open to every client");
    assert!(!ports(&rules[1]).contains(&"peers".to_owned()));
    let container_ports: Vec<String> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .filter(|n| n != "peers")
        .collect();
    assert_eq!(
        ports(&rules[1]),
        container_ports,
        "every other listener stays reachable"
    );
    // Disruptions: one replica down at a time (unready ones always evictable), spread over
    // nodes, and a SIGTERM that drains before closing the listeners.
    let pdb = find(&objs, "PodDisruptionBudget", Some(&ns), "kas");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    let spread =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        spread["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(cfg.shutdown_delay, std::time::Duration::from_secs(5));
    assert_eq!(cfg.shutdown_timeout, std::time::Duration::from_secs(10));
    // The delay, the tunnels' drain and the 5 s the rest takes to close, before the kill.
    let stop = cfg.shutdown_delay + cfg.shutdown_timeout + kas::server::CLOSE_GRACE;
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > stop.as_secs());
    env.apply_yaml(&yaml).unwrap();
    let applied = get_json(&env, &["get", "poddisruptionbudget", "kas", "-n", &ns]);
    assert_eq!(applied["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");

    let mut c = helm(&env);
    c.args(["template", "kas"])
        .arg(chart("kas"))
        .args(["--set", "replicas=2"]);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("replicas > 1 needs database.urlSecret.name"),
        "{err}"
    );

    // An exposed admin API on several replicas needs one admin token for all of them.
    let mut c = helm(&env);
    c.args(["template", "kas"])
        .arg(chart("kas"))
        .arg("-f")
        .arg(ci_values("kas", "replicas-values.yaml"))
        .args(["--set", "api.expose=true"]);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("replicas > 1 with api.expose needs adminToken.secretName"),
        "{err}"
    );
}
