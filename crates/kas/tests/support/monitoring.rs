//! The Grafana dashboard and alert rules under deploy/monitoring, checked against the metrics
//! the real binaries export. A family appears in a scrape only once it has a sample, so each
//! test checks the names of the area it exercises ([`AREAS`]), and one test checks that every
//! name of the assets belongs to an area.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// Metric name prefixes and the test file whose scrape covers them.
pub const AREAS: &[(&str, &str)] = &[
    ("agentk_", "gitops.rs"),
    ("kas_git", "gitops.rs"),
    ("kas_webhook_", "gitops.rs"),
    ("kas_configuration_", "gitops.rs"),
    ("kas_tunnel_", "gitops.rs"),
    ("kas_agent_", "gitops.rs"),
    ("kas_build_", "gitops.rs"),
    ("kas_k8s_proxy_", "kubeproxy.rs"),
    ("kas_listener_", "listeners.rs"),
    ("kas_rate_limited_", "ratelimit.rs"),
    ("kas_auth_", "ratelimit.rs"),
    ("kas_notifications_", "gitops.rs notifications"),
    ("kas_store_", "store.rs"),
    ("kas_redis_", "replicas.rs"),
    ("kas_tls_", "tunnel.rs"),
];

pub fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/monitoring")
}

/// The files whose queries must name exported series.
pub const FILES: [&str; 3] = ["grafana-dashboard.json", "alerts.yaml", "alerts.test.yaml"];

/// The kas and agentk series the monitoring assets refer to, by file.
pub fn referenced() -> Vec<(&'static str, BTreeSet<String>)> {
    FILES
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(folder().join(f)).unwrap();
            let names = text
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| w.starts_with("kas_") || w.starts_with("agentk_"))
                .map(str::to_owned)
                .collect();
            (*f, names)
        })
        .collect()
}

/// Every series name in a Prometheus text exposition.
pub fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l[..l.find(['{', ' ']).unwrap_or(l.len())].to_owned())
        .collect()
}

/// Fails unless every series of the assets in `prefix`'s area is in one of the scrapes.
pub fn assert_area_exported(area: &str, scrapes: &[&str]) {
    let have: BTreeSet<String> = scrapes.iter().flat_map(|t| exported(t)).collect();
    let prefixes: Vec<&str> = AREAS
        .iter()
        .filter(|(_, file)| *file == area)
        .map(|(p, _)| *p)
        .collect();
    for (file, names) in referenced() {
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p)) && !have.contains(*n))
            .collect();
        assert!(
            missing.is_empty(),
            "deploy/monitoring/{file} names series the binaries do not export: {missing:?}"
        );
    }
}
