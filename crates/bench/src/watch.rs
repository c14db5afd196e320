//! Watches of the API server, read as JSON lines: when every Deployment of the kubectl path is
//! Available, and when each object of agentk's namespace is Current (kstatus, computed by
//! agentk's own status rules) as the bench sees it, for the status lag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use http_body_util::{BodyExt, Empty};
use serde_json::{Value, json};
use tether_gitops_agent::status::{Status, compute_status};

use crate::agent_log::unix_now;
use crate::util::HttpsClient;

/// Opens a watch of `url` (open when this returns) and feeds each event to `on_event` in a
/// task, which resolves to the moment `on_event` returned true, or fails when the watch ends
/// first.
pub async fn watch_events<F>(
    http: &HttpsClient,
    url: &str,
    auth: &str,
    mut on_event: F,
) -> Result<tokio::task::JoinHandle<Result<Instant>>>
where
    F: FnMut(&Value) -> bool + Send + 'static,
{
    let req = http::Request::get(url)
        .header(http::header::AUTHORIZATION, auth)
        .body(Empty::new())?;
    let resp = http.request(req).await?;
    if !resp.status().is_success() {
        bail!("watching {url}: {}", resp.status());
    }
    let mut body = resp.into_body();
    let url = url.to_string();
    Ok(tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                buf.extend_from_slice(data);
            }
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                if let Ok(ev) = serde_json::from_slice::<Value>(&line)
                    && on_event(&ev)
                {
                    return Ok(Instant::now());
                }
            }
        }
        bail!("the watch of {url} ended")
    }))
}

/// `Kind/name` of an object, the key both sides of the status lag use.
pub fn key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The first moment (Unix seconds) the bench saw each object of a namespace Current.
pub struct CurrentWatch {
    seen: Arc<Mutex<HashMap<String, f64>>>,
    tasks: Vec<tokio::task::JoinHandle<Result<Instant>>>,
}

impl CurrentWatch {
    /// Watches ConfigMaps and Deployments of `ns` (open when this returns).
    pub async fn start(http: &HttpsClient, server: &str, auth: &str, ns: &str) -> Result<Self> {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        for path in ["api/v1", "apis/apps/v1"]
            .iter()
            .zip(["configmaps", "deployments"])
        {
            let url = format!(
                "{server}/{}/namespaces/{ns}/{}?watch=1&timeoutSeconds=3600",
                path.0, path.1
            );
            let seen = seen.clone();
            let on_event = move |ev: &Value| {
                let o = &ev["object"];
                if ev["type"] != "DELETED" && compute_status(o).status == Status::Current {
                    let k = key(
                        o["kind"].as_str().unwrap_or_default(),
                        o["metadata"]["name"].as_str().unwrap_or_default(),
                    );
                    if let Ok(mut seen) = seen.lock() {
                        seen.entry(k).or_insert_with(unix_now);
                    }
                }
                false
            };
            tasks.push(watch_events(http, &url, auth, on_event).await?);
        }
        Ok(CurrentWatch { seen, tasks })
    }

    /// Waits, at most `timeout`, until the watches saw every object of `keys` Current: the
    /// bench may read its streams later than agentk logged, and an object only one side saw
    /// is left out of the lag.
    pub async fn catch_up<'k>(
        &self,
        keys: impl Iterator<Item = &'k String> + Clone,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self
                .seen
                .lock()
                .map(|seen| keys.clone().all(|k| seen.contains_key(k)))
                .unwrap_or(true);
            if all || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the watches; what they saw.
    pub fn stop(self) -> HashMap<String, f64> {
        for t in &self.tasks {
            t.abort();
        }
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// (agentk reported Current) − (the bench's watch saw it Current), in milliseconds, for the
/// objects both saw: p50, p90, max, and how many objects only one side saw.
pub fn lag(agent: &HashMap<String, f64>, watch: &HashMap<String, f64>) -> Value {
    let mut ms: Vec<f64> = agent
        .iter()
        .filter_map(|(k, a)| Some((a - watch.get(k)?) * 1000.0))
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len().max(1)) - 1;
        ms.get(i).copied()
    };
    json!({
        "objects": ms.len(),
        "only_agentk": agent.keys().filter(|k| !watch.contains_key(*k)).count(),
        "only_watch": watch.keys().filter(|k| !agent.contains_key(*k)).count(),
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "max_ms": ms.last(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_distribution_of_objects_both_sides_saw() {
        let watch: HashMap<String, f64> = (0..10)
            .map(|i| (key("ConfigMap", &i.to_string()), 100.0))
            .collect();
        let mut agent: HashMap<String, f64> = (0..10)
            .map(|i| {
                (
                    key("ConfigMap", &i.to_string()),
                    100.0 + f64::from(i) * 0.01,
                )
            })
            .collect();
        agent.insert(key("Deployment", "x"), 101.0);
        let l = lag(&agent, &watch);
        assert_eq!(l["objects"], 10);
        assert_eq!(l["only_agentk"], 1);
        assert_eq!(l["only_watch"], 0);
        let near = |v: &Value, want: f64| (v.as_f64().unwrap_or(-1.0) - want).abs() < 1e-6;
        assert!(near(&l["p50_ms"], 40.0), "{l}");
        assert!(near(&l["p90_ms"], 80.0), "{l}");
        assert!(near(&l["max_ms"], 90.0), "{l}");
        assert!(lag(&HashMap::new(), &watch)["p50_ms"].is_null());
    }
}
