//! The architecture rule "agentk never depends on server code" as a property of the crate graph.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

fn is_server_crate(name: &str) -> bool {
    name.ends_with("-server")
        || matches!(
            name,
            "kas" | "tether-store" | "tether-git-source" | "tether-guard"
        )
}

#[test]
fn agentk_depends_on_no_server_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        // Only the host's packages: they are all built already, so no download is needed.
        .args([
            "metadata",
            "--format-version=1",
            "--offline",
            "--filter-platform",
            env!("HOST_TRIPLE"),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");

    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id"),
                p["name"].as_str().expect("name"),
            )
        })
        .collect();
    let nodes: HashMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|d| {
                    // Normal (non-dev) dependencies only: tests may use anything.
                    d["dep_kinds"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k["kind"].is_null()))
                })
                .map(|d| d["pkg"].as_str().expect("pkg"))
                .collect();
            (n["id"].as_str().expect("id"), deps)
        })
        .collect();
    let root = names
        .iter()
        .find(|(_, n)| **n == "agentk")
        .map(|(id, _)| *id)
        .expect("agentk package");

    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            stack.extend(nodes.get(id).into_iter().flatten().copied());
        }
    }
    let reached: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(reached.contains("tether-tunnel-agent"), "{reached:?}");
    let bad: Vec<&&str> = reached.iter().filter(|n| is_server_crate(n)).collect();
    assert!(bad.is_empty(), "agentk depends on server crates: {bad:?}");
}

#[test]
fn server_crate_rule_recognises_server_crates() {
    assert!(is_server_crate("tether-tunnel-server"));
    assert!(is_server_crate("tether-store"));
    assert!(!is_server_crate("tether-tunnel-agent"));
    assert!(!is_server_crate("tether-protocol"));
}
