//! The kubectl path of the GitOps comparison: `kubectl apply --server-side`, `kubectl wait`,
//! and a watch noting when every Deployment was Available.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tether_testenv::{TestEnv, run_output};

use crate::agent_log::SYNC_TIMEOUT;
use crate::util::HttpsClient;
use crate::watch::watch_events;

/// Watches the Deployments of `ns` (the watch is open when this returns) and resolves, in a
/// task, to the moment `expected` of them are Available.
async fn watch_available(
    http: &HttpsClient,
    server: &str,
    auth: &str,
    ns: &str,
    expected: usize,
) -> Result<tokio::task::JoinHandle<Result<Instant>>> {
    let url =
        format!("{server}/apis/apps/v1/namespaces/{ns}/deployments?watch=1&timeoutSeconds=3600");
    let mut available = HashSet::new();
    watch_events(http, &url, auth, move |ev| {
        let o = &ev["object"];
        let name = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let is_available = o["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Available" && c["status"] == "True")
        });
        if is_available && ev["type"] != "DELETED" {
            available.insert(name);
        } else {
            available.remove(&name);
        }
        available.len() >= expected
    })
    .await
}

/// What the kubectl path took, in seconds from the start of `kubectl apply`.
pub struct KubectlTimes {
    pub apply: f64,
    /// Until every Deployment was Available, seen by a watch running alongside.
    pub available: f64,
    /// Until `kubectl wait --for=condition=Available deployment --all` returned.
    pub wait: f64,
}

/// `kubectl apply --server-side -f DIR --recursive -n NS`, then `kubectl wait` for every
/// Deployment to be Available, with a watch of the Deployments alongside.
pub async fn kubectl_baseline(
    env: &TestEnv,
    watch: (&HttpsClient, &str),
    dir: &Path,
    ns: &str,
    deployments: usize,
) -> Result<KubectlTimes> {
    let available = watch_available(watch.0, &env.server, watch.1, ns, deployments).await?;
    let (env, dir, ns) = (env.clone(), dir.to_path_buf(), ns.to_string());
    let t = Instant::now();
    let (apply, wait) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        run_output(
            env.kubectl()
                .args(["apply", "--server-side", "--recursive", "-n", &ns, "-f"])
                .arg(&dir),
        )?;
        let apply = t.elapsed().as_secs_f64();
        run_output(env.kubectl().args([
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "-n",
            &ns,
            &format!("--timeout={}s", SYNC_TIMEOUT.as_secs()),
        ]))?;
        Ok::<_, anyhow::Error>((apply, t.elapsed().as_secs_f64()))
    })
    .await??;
    let available = tokio::time::timeout(Duration::from_secs(60), available)
        .await
        .context(
            "kubectl wait returned, but the watch did not see every Deployment Available",
        )???;
    Ok(KubectlTimes {
        apply,
        available: available.duration_since(t).as_secs_f64(),
        wait,
    })
}
