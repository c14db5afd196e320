//! The API server's floor for the apply phase: a bare client that sends the same server-side
//! apply PATCHes as agentk (one per object, agentk's own JSON bodies, `force`, at agentk's
//! concurrency) and nothing else: the bodies and URLs are prepared before the clock starts,
//! and no lookup, inventory or status request is made.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tether_gitops_agent::decode::{Manifest, decode_file};
use tether_gitops_agent::inventory::inventory_name;
use tether_gitops_agent::sync::prepared;

use crate::util::body_of;

/// agentk's number of concurrent apply requests (`tether_gitops_agent::sync::CONCURRENCY`).
pub const CONCURRENCY: usize = 16;
const FIELD_MANAGER: &str = "bench-floor";

type BodyClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One prepared request.
#[derive(Debug)]
pub struct Patch {
    path: String,
    body: Bytes,
}

/// The REST path of a namespaced object (the benchmark's kinds pluralise with an `s`).
fn object_path(m: &Manifest, ns: &str) -> String {
    let prefix = if m.group().is_empty() { "api" } else { "apis" };
    format!(
        "/{prefix}/{}/namespaces/{ns}/{}s/{}",
        m.api_version(),
        m.kind().to_ascii_lowercase(),
        m.name()
    )
}

/// One PATCH per object of the `*.yaml` files in `dir` (path order), into namespace `ns`: the
/// body agentk sends for it (decoded by agentk's decoder, namespace defaulted, marked with an
/// inventory and stamped with its digest by agentk's own `prepared`), so the floor's requests
/// cost the API server what agentk's do.
pub fn patches(dir: &Path, ns: &str) -> Result<Vec<Patch>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let inventory = inventory_name(1, &format!("bench/{ns}"));
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read(&f)?;
        for mut m in decode_file(&f.display().to_string(), &text)? {
            m.set_default_namespace(ns, true);
            out.push(Patch {
                path: object_path(&m, ns),
                body: Bytes::from(serde_json::to_vec(&prepared(&m, &inventory))?),
            });
        }
    }
    Ok(out)
}

async fn send(c: &BodyClient, server: &str, auth: &str, p: Patch) -> Result<()> {
    let req = http::Request::patch(format!(
        "{server}{}?fieldManager={FIELD_MANAGER}&force=true",
        p.path
    ))
    .header(http::header::AUTHORIZATION, auth)
    .header(http::header::CONTENT_TYPE, "application/apply-patch+yaml")
    .body(Full::new(p.body))?;
    body_of(c, req, &format!("PATCH {}", p.path)).await?;
    Ok(())
}

/// Sends the PATCHes of `dir` into `ns` at [`CONCURRENCY`]; the seconds it took.
pub async fn run(ca_pem: &[u8], server: &str, auth: &str, dir: &Path, ns: &str) -> Result<Value> {
    let patches = patches(dir, ns)?;
    let objects = patches.len();
    let c = crate::util::https_client_for::<Full<Bytes>>(ca_pem)?;
    let t = Instant::now();
    futures_util::stream::iter(patches)
        .map(|p| send(&c, server, auth, p))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(json!({"objects": objects, "concurrency": CONCURRENCY, "apply_seconds": seconds}))
}

/// The floor from a run just before agentk's and one just after: the mean apply time (the
/// order of two runs changes either by about a third), each run's figures kept, and the first
/// run's API requests (both send the same).
pub fn bracket(before: &Value, after: &Value) -> Value {
    let secs = |v: &Value| v["apply_seconds"].as_f64();
    json!({
        "objects": before["objects"],
        "concurrency": CONCURRENCY,
        "apply_seconds": secs(before).zip(secs(after)).map(|(b, a)| (b + a) / 2.0),
        "runs": [before, after],
        "requests": before["requests"],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_patch_per_document_with_its_path_and_agentks_body() {
        let dir = std::env::temp_dir().join(format!("bench-floor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: \"1\"\n---\n\
apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  replicas: 1\n";
        std::fs::write(dir.join("x.yaml"), text).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let p = patches(&dir, "ns1").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].path, "/api/v1/namespaces/ns1/configmaps/a");
        assert_eq!(p[1].path, "/apis/apps/v1/namespaces/ns1/deployments/d");
        let body: Value = serde_json::from_slice(&p[0].body).unwrap();
        assert_eq!(body["data"]["k"], "1");
        assert!(
            body["metadata"]["annotations"]["config.k8s.io/owning-inventory"].is_string(),
            "agentk's body: {body}"
        );
        assert_eq!(body["metadata"]["namespace"], "ns1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_floor_is_the_mean_of_the_runs_around_agentk() {
        let before = json!({"objects": 10, "apply_seconds": 1.0, "requests": {"APPLY": 10}});
        let after = json!({"objects": 10, "apply_seconds": 2.0, "requests": {"APPLY": 10}});
        let f = bracket(&before, &after);
        assert_eq!(f["apply_seconds"], 1.5);
        assert_eq!(f["runs"][1]["apply_seconds"], 2.0);
        assert_eq!(f["requests"]["APPLY"], 10);
    }
}
