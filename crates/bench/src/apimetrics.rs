//! API requests an engine sends, from kube-apiserver's `apiserver_request_total` (its
//! `/metrics`, read with the bench's cluster-admin token) before and after the engine runs.
//!
//! Only requests on the kinds the benchmark applies (ConfigMaps and Deployments, no
//! subresource) are counted: that leaves out kube-controller-manager's and kwok's work on
//! ReplicaSets, Pods, Leases and status subresources, which follows from the objects whatever
//! engine wrote them. Every client is counted, so kube-controller-manager's one revision
//! annotation per new Deployment is in every engine's figure alike.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{Value, json};

use crate::util::{HttpsClient, get_text};

const METRIC: &str = "apiserver_request_total";
const KINDS: [&str; 2] = ["configmaps", "deployments"];

/// Requests by verb (`GET`, `LIST`, `PATCH`, …; dry-run ones as `PATCH (dry run)`).
pub type Counts = BTreeMap<String, u64>;

/// `name="value"` pairs of a Prometheus label set (values without escaped quotes, which
/// `apiserver_request_total`'s labels never hold).
fn labels(s: &str) -> BTreeMap<&str, &str> {
    s.split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.trim_matches(','), v.trim_end_matches('"')))
        })
        .collect()
}

/// The counters of the applied kinds in a `/metrics` text, summed by verb.
pub fn parse(text: &str) -> Counts {
    let mut counts = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(METRIC).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((set, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let l = labels(set);
        let counted = l.get("resource").is_some_and(|r| KINDS.contains(r))
            && l.get("subresource").is_none_or(|s| s.is_empty());
        let Some(n) = value.trim().parse::<f64>().ok().filter(|_| counted) else {
            continue;
        };
        let verb = l.get("verb").copied().unwrap_or("?");
        let key = if l.get("dry_run").is_some_and(|d| !d.is_empty()) {
            format!("{verb} (dry run)")
        } else {
            verb.to_string()
        };
        *counts.entry(key).or_default() += n as u64;
    }
    counts
}

/// `after - before`, verb by verb (verbs with no new request left out).
pub fn diff(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(verb, &a)| {
            let d = a.saturating_sub(before.get(verb).copied().unwrap_or(0));
            (d > 0).then(|| (verb.clone(), d))
        })
        .collect()
}

/// Writes (create, update, patch, server-side apply, delete; not dry runs) among `counts`.
/// The API server counts a server-side apply as the verb `APPLY`, not `PATCH`.
pub fn writes(counts: &Counts) -> u64 {
    [
        "POST",
        "PUT",
        "PATCH",
        "APPLY",
        "DELETE",
        "DELETECOLLECTION",
    ]
    .iter()
    .filter_map(|v| counts.get(*v))
    .sum()
}

/// [`writes`] of the `by_verb` of a JSON result of [`Scraper::since`] (results written before
/// `APPLY` counted as a write carry a wrong `writes`).
pub fn writes_of(requests: &Value) -> Option<u64> {
    let by_verb = requests["by_verb"].as_object()?;
    let counts: Counts = by_verb
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .collect();
    Some(writes(&counts))
}

/// Reads the API server's counters.
pub struct Scraper<'a> {
    pub http: &'a HttpsClient,
    pub server: &'a str,
    pub auth: &'a str,
}

impl Scraper<'_> {
    pub async fn counts(&self) -> Result<Counts> {
        let text = get_text(self.http, &format!("{}/metrics", self.server), self.auth).await?;
        Ok(parse(&text))
    }

    /// The requests counted since `before`, as JSON (by verb, a total and the writes).
    pub async fn since(&self, before: &Counts) -> Result<Value> {
        let d = diff(before, &self.counts().await?);
        Ok(json!({"total": d.values().sum::<u64>(), "writes": writes(&d), "by_verb": d}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="configmaps",scope="resource",subresource="",verb="PATCH",version="v1"} 12
apiserver_request_total{code="201",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="",verb="PATCH",version="v1"} 3
apiserver_request_total{code="201",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="",verb="APPLY",version="v1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="All",group="",resource="configmaps",scope="resource",subresource="",verb="PATCH",version="v1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="status",verb="PUT",version="v1"} 40
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="LIST",version="v1"} 7
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="configmaps",scope="namespace",subresource="",verb="LIST",version="v1"} 2
apiserver_request_duration_seconds_count{verb="PATCH"} 99
"#;

    #[test]
    fn counts_applied_kinds_by_verb_and_dry_runs_apart() {
        let c = parse(TEXT);
        assert_eq!(c.get("PATCH"), Some(&15));
        assert_eq!(c.get("PATCH (dry run)"), Some(&5));
        assert_eq!(c.get("LIST"), Some(&2), "pods are not counted");
        assert_eq!(c.get("PUT"), None, "status subresources are not counted");
        assert_eq!(c.get("APPLY"), Some(&4));
        assert_eq!(writes(&c), 19);
        let j = serde_json::json!({"by_verb": c, "writes": 0});
        assert_eq!(writes_of(&j), Some(19));
    }

    #[test]
    fn diff_keeps_new_requests_only() {
        let before = parse(TEXT);
        let mut after = before.clone();
        *after.entry("PATCH".into()).or_default() += 4;
        after.insert("DELETE".into(), 2);
        let d = diff(&before, &after);
        assert_eq!(d, Counts::from([("DELETE".into(), 2), ("PATCH".into(), 4)]));
        assert_eq!(writes(&d), 6);
    }
}
