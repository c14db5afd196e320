//! The API server's floor for the apply phase: a bare client that sends the same server-side
//! apply PATCHes as agentk (one per object, JSON bodies, `force`, at agentk's concurrency) and
//! nothing else: the bodies and URLs are prepared before the clock starts, and no lookup,
//! inventory or status request is made.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

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
fn object_path(o: &Value, ns: &str) -> Result<String> {
    let api_version = o["apiVersion"].as_str().context("no apiVersion")?;
    let kind = o["kind"].as_str().context("no kind")?;
    let name = o["metadata"]["name"].as_str().context("no metadata.name")?;
    let prefix = if api_version.contains('/') {
        "apis"
    } else {
        "api"
    };
    Ok(format!(
        "/{prefix}/{api_version}/namespaces/{ns}/{}s/{name}",
        kind.to_ascii_lowercase()
    ))
}

/// The documents of one multi-document YAML text (split at `---` lines), as JSON.
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            if !cur.trim().is_empty() {
                docs.push(serde_saphyr::from_str::<Value>(&cur)?);
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    Ok(docs)
}

/// One PATCH per object of the `*.yaml` files in `dir` (path order), into namespace `ns`.
pub fn patches(dir: &Path, ns: &str) -> Result<Vec<Patch>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for mut o in documents(&text).with_context(|| format!("{}", f.display()))? {
            let path = object_path(&o, ns).with_context(|| format!("{}", f.display()))?;
            o["metadata"]["namespace"] = ns.into();
            out.push(Patch {
                path,
                body: Bytes::from(serde_json::to_vec(&o)?),
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
    let resp = c.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "PATCH {}: {status}: {}",
            p.path,
            String::from_utf8_lossy(&body)
        );
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_patch_per_document_with_its_path() {
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
        assert_eq!(body["metadata"]["namespace"], "ns1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
