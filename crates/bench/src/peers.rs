//! The peers' GitOps engines on the same files, ServiceAccount and cluster as agentk: Flux's
//! (`fluxcd/pkg/ssa`, as kustomize-controller calls it) and cli-utils' applier (GitLab's former
//! GitOps engine), small Go programs of `bench/engines` built by `testenv/build.sh`. Each run
//! prints one JSON line (phases, counts, its own CPU seconds and peak RSS); the API requests it
//! sent come from the API server's counters around the run.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::apimetrics::Scraper;
use crate::servers::Ctx;

/// One engine at one concurrency setting.
#[derive(Debug, Clone, Copy)]
pub struct Engine {
    /// Its column in the report.
    pub label: &'static str,
    /// The program in the control plane's bin folder.
    pub program: &'static str,
    /// `--concurrency` (None: the engine has no such setting).
    pub concurrency: Option<usize>,
    /// What the report says about its settings.
    pub settings: &'static str,
}

/// Flux at kustomize-controller's default `--concurrent-ssa` and at agentk's concurrency;
/// cli-utils' applier, which sends one request at a time and has no setting for more.
pub const ENGINES: [Engine; 3] = [
    Engine {
        label: "Flux ssa ×4",
        program: "flux-ssa",
        concurrency: Some(4),
        settings: "ApplyAllStaged + DeleteAll + WaitForSet, concurrency 4 (kustomize-controller's default), 500 ms poll interval, no client rate limit",
    },
    Engine {
        label: "Flux ssa ×16",
        program: "flux-ssa",
        concurrency: Some(crate::floor::CONCURRENCY),
        settings: "as above at agentk's concurrency 16",
    },
    Engine {
        label: "cli-utils",
        program: "cli-utils",
        concurrency: None,
        settings: "applier with inventory ConfigMap, SSA with force, must-match inventory policy, background prune, status watcher; sequential (no concurrency setting), no client rate limit",
    },
];

/// A short name for namespaces and files.
pub fn slug(e: &Engine) -> String {
    format!("{}-{}", e.program, e.concurrency.unwrap_or(1))
}

/// Runs `engine` on the manifests of `dir` (missing or empty: prune everything) into `ns`,
/// keeping its state (Flux's inventory) in `state_dir`; its JSON line, with `requests` (API
/// requests counted meanwhile) and `label`.
pub async fn run_engine(
    ctx: &Ctx,
    api: &Scraper<'_>,
    engine: &Engine,
    dir: &Path,
    ns: &str,
    state_dir: &Path,
) -> Result<Value> {
    let mut cmd = Command::new(ctx.env.bin_dir.join(engine.program));
    cmd.arg("-kubeconfig")
        .arg(&ctx.agent_kubeconfig)
        .arg("-dir")
        .arg(dir)
        .args(["-namespace", ns]);
    if let Some(c) = engine.concurrency {
        cmd.args(["-concurrency", &c.to_string()]);
    }
    cmd.arg("-inventory")
        .arg(state_dir.join(format!("{}-{ns}.json", slug(engine))));
    let before = api.counts().await?;
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    if !out.status.success() {
        bail!(
            "{} into {ns}: {}: {}",
            engine.label,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let requests = api.since(&before).await?;
    let line = String::from_utf8_lossy(&out.stdout);
    let mut v: Value = serde_json::from_str(line.lines().last().unwrap_or_default())
        .with_context(|| format!("{}: the last line is not JSON: {line}", engine.label))?;
    v["requests"] = requests;
    v["label"] = engine.label.into();
    eprintln!(
        "bench: {} {} objects into {ns}: total {:.2} s (apply {:.2} s), {} requests ({} writes), CPU {:.2} s, peak RSS {:.1} MiB",
        engine.label,
        v["objects"],
        v["total_seconds"].as_f64().unwrap_or(f64::NAN),
        v["apply_seconds"].as_f64().unwrap_or(f64::NAN),
        v["requests"]["total"],
        v["requests"]["writes"],
        v["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
        v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
    );
    Ok(v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tether_gitops_agent::status::{Status, compute_status};
    use tether_testenv::{TestEnv, run_output};

    /// CI's check that the engine programs still build (testenv/build.sh) and work: each
    /// applies 10 objects (9 ConfigMaps, 1 Deployment) to the test control plane, exits only
    /// once its own wait says all are Current, and the objects are there and Current.
    #[test]
    fn each_engine_applies_ten_objects_until_all_current() {
        let env = TestEnv::from_env().unwrap();
        let dir = std::env::temp_dir().join(format!("bench-engines-{}", std::process::id()));
        crate::gitops::write_manifests(&dir, 10, None).unwrap();
        for e in [&ENGINES[0], &ENGINES[2]] {
            let ns = env.create_namespace(&slug(e)).unwrap();
            let out = run_output(
                Command::new("timeout")
                    .arg("300")
                    .arg(env.bin_dir.join(e.program))
                    .arg("-kubeconfig")
                    .arg(&env.kubeconfig)
                    .arg("-dir")
                    .arg(dir.join("manifests"))
                    .args(["-namespace", &ns])
                    .arg("-inventory")
                    .arg(dir.join(format!("{ns}.json")))
                    .args(["-concurrency", "2"]),
            )
            .unwrap();
            let line: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(line["objects"], 10, "{line}");
            assert_eq!(line["applied"], 10, "{line}");
            let list: Value = serde_json::from_slice(
                &run_output(env.kubectl().args([
                    "get",
                    "configmaps,deployments",
                    "-o",
                    "json",
                    "-n",
                    &ns,
                ]))
                .unwrap(),
            )
            .unwrap();
            let ours: Vec<&Value> = list["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|o| {
                    let name = o["metadata"]["name"].as_str().unwrap_or_default();
                    name.starts_with("cm-") || name.starts_with("deploy-")
                })
                .collect();
            assert_eq!(ours.len(), 10, "{} in {ns}", e.program);
            for o in ours {
                assert_eq!(
                    compute_status(o).status,
                    Status::Current,
                    "{} in {ns}: {o}",
                    e.program
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
