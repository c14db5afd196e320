//! API discovery that survives an unavailable group. kube's `Discovery::run` fails as a whole
//! when one group's query fails; an aggregated API whose server is down (metrics-server
//! crashlooping: its APIService answers 503) would then fail every sync of every project.
//! Here the groups whose query fails are found, left out and named ([`Apis::unavailable`]):
//! objects of those groups fail on their own, and are neither pruned nor dropped from the
//! inventory, since the cluster did not say their type is not served.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use kube::Client;
use kube::discovery::{ApiCapabilities, ApiResource, Discovery};

use crate::decode::Manifest;
use crate::object_ref::ObjRef;

/// Group queries run at once while looking for the failing ones.
const PROBES: usize = 8;

/// What discovery found: the types served, and the groups it could not query.
pub(crate) struct Apis {
    served: Discovery,
    /// Group → why its query failed.
    unavailable: BTreeMap<String, String>,
}

impl Apis {
    pub(crate) fn resolve(&self, m: &Manifest) -> Option<(ApiResource, ApiCapabilities)> {
        let gvk = kube::core::GroupVersionKind::gvk(m.group(), m.version(), m.kind());
        self.served.resolve_gvk(&gvk)
    }

    pub(crate) fn resolve_ref(&self, r: &ObjRef) -> Option<(ApiResource, ApiCapabilities)> {
        self.served.get(&r.group)?.recommended_kind(&r.kind)
    }

    /// Why `group` could not be discovered; `None` when it was (or does not exist).
    pub(crate) fn unavailable(&self, group: &str) -> Option<&str> {
        self.unavailable.get(group).map(String::as_str)
    }

    /// What `.Capabilities.APIVersions` holds for this cluster: see [`api_versions`].
    pub(crate) fn api_versions(&self) -> Vec<String> {
        api_versions(self.served.groups().flat_map(|g| {
            g.versions()
                .flat_map(|v| g.versioned_resources(v))
                .map(|(ar, _)| (ar.group, ar.version, ar.kind))
                .collect::<Vec<_>>()
        }))
    }

    /// The groups that could not be discovered, and why.
    pub(crate) fn unavailable_groups(&self) -> &BTreeMap<String, String> {
        &self.unavailable
    }
}

/// The groups whose outage was already said, so that an outage is logged once when it starts
/// and once when it ends, not at every sync of every project (pure; one per agentk).
#[derive(Debug, Default)]
pub(crate) struct Outages {
    said: BTreeSet<String>,
}

/// What one discovery changed in the outages said.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct OutageNews {
    /// Groups newly unavailable, and why.
    pub started: Vec<(String, String)>,
    /// Groups said unavailable that answered this time.
    pub ended: Vec<String>,
}

impl Outages {
    /// Records the groups a complete discovery found `unavailable` (every other group answered
    /// or is gone) and returns what changed.
    pub(crate) fn update(&mut self, unavailable: &BTreeMap<String, String>) -> OutageNews {
        let started = unavailable
            .iter()
            .filter(|(g, _)| !self.said.contains(*g))
            .map(|(g, r)| (g.clone(), r.clone()))
            .collect();
        let ended = self
            .said
            .iter()
            .filter(|g| !unavailable.contains_key(*g))
            .cloned()
            .collect();
        self.said = unavailable.keys().cloned().collect();
        OutageNews { started, ended }
    }
}

impl OutageNews {
    pub(crate) fn log(&self) {
        for (group, reason) in &self.started {
            tracing::warn!(
                group,
                reason,
                "API group unavailable: its discovery failed; until it answers, its objects are neither applied nor pruned and stay in the inventory"
            );
        }
        for group in &self.ended {
            tracing::info!(group, "API group available again");
        }
    }
}

/// Helm's `.Capabilities.APIVersions` entries for the served `(group, version, kind)`s: each
/// `group/version` (`v1` for the core group) and each `group/version/Kind`, which
/// `.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor"` looks for; sorted, once each.
pub(crate) fn api_versions(
    served: impl IntoIterator<Item = (String, String, String)>,
) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for (group, version, kind) in served {
        let gv = if group.is_empty() {
            version
        } else {
            format!("{group}/{version}")
        };
        out.insert(format!("{gv}/{kind}"));
        out.insert(gv);
    }
    out.into_iter().collect()
}

/// How querying one group version went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    Answered,
    /// 404: the group went away since it was listed (a CRD deleted): not unavailable, the
    /// next discovery does not list it.
    Gone,
    Failed(String),
}

impl Probe {
    fn of<T>(res: Result<T, kube::Error>) -> Self {
        match res {
            Ok(_) => Self::Answered,
            Err(kube::Error::Api(s)) if s.code == 404 => Self::Gone,
            // As the API server said it ("… (503 ServiceUnavailable)"), not kube's error
            // with its Debug dump of the status.
            Err(e) => Self::Failed(crate::sync::ApiError::from(e).to_string()),
        }
    }
}

/// The groups with a version whose query failed, and the first failure of each (pure).
fn unavailable_of(probes: Vec<(String, Probe)>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (group, probe) in probes {
        if let Probe::Failed(reason) = probe {
            out.entry(group).or_insert(reason);
        }
    }
    out
}

/// Discovers the cluster's API, leaving out the groups whose query fails. Fails only when the
/// list of groups cannot be read, or discovery keeps failing with no group to blame (a group
/// can vanish between the listing and its query; a fresh discovery a moment later succeeds).
pub(crate) async fn discover(client: &Client) -> Result<Apis, String> {
    let mut unavailable = BTreeMap::new();
    let mut retries = 0u32;
    loop {
        let left_out: Vec<&str> = unavailable.keys().map(String::as_str).collect();
        let error = match Discovery::new(client.clone())
            .exclude(&left_out)
            .run()
            .await
        {
            Ok(served) => {
                return Ok(Apis {
                    served,
                    unavailable,
                });
            }
            Err(e) => e.to_string(),
        };
        let failing = failing_groups(client, &unavailable).await?;
        if failing.is_empty() {
            retries += 1;
            if retries >= 3 {
                return Err(error);
            }
            tokio::time::sleep(Duration::from_millis(200) * retries).await;
        }
        // Each round leaves out more groups or spends a retry, so this ends.
        unavailable.extend(failing);
    }
}

/// Queries every version of every group not already `known` to fail; the groups that fail.
async fn failing_groups(
    client: &Client,
    known: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let groups = client.list_api_groups().await.map_err(|e| e.to_string())?;
    let mut probes = Vec::new();
    let mut versions = Vec::new();
    for g in groups
        .groups
        .into_iter()
        .filter(|g| !known.contains_key(&g.name))
    {
        if g.versions.is_empty() {
            // kube's discovery refuses a group without versions.
            probes.push((g.name.clone(), Probe::Failed("it lists no version".into())));
        }
        versions.extend(
            g.versions
                .into_iter()
                .map(|v| (g.name.clone(), v.group_version)),
        );
    }
    let answers = futures_util::stream::iter(versions.into_iter().map(|(group, gv)| async move {
        let res = client.list_api_group_resources(&gv).await;
        (group, Probe::of(res))
    }))
    .buffer_unordered(PROBES)
    .collect::<Vec<_>>()
    .await;
    probes.extend(answers);
    Ok(unavailable_of(probes))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{OutageNews, Outages};

    fn down(groups: &[&str]) -> BTreeMap<String, String> {
        groups
            .iter()
            .map(|g| ((*g).to_owned(), "503".to_owned()))
            .collect()
    }

    #[test]
    fn an_outage_is_said_when_it_starts_and_when_it_ends_not_at_every_sync() {
        let mut o = Outages::default();
        let metrics = ("metrics.k8s.io".to_owned(), "503".to_owned());
        let news = o.update(&down(&["metrics.k8s.io"]));
        assert_eq!(news.started, vec![metrics.clone()]);
        // The next syncs (of this project or another) find it down still: nothing to say.
        assert_eq!(o.update(&down(&["metrics.k8s.io"])), OutageNews::default());
        let news = o.update(&down(&["metrics.k8s.io", "custom.metrics.k8s.io"]));
        assert_eq!(news.started.len(), 1);
        assert_eq!(news.started[0].0, "custom.metrics.k8s.io");
        let news = o.update(&down(&["custom.metrics.k8s.io"]));
        assert_eq!(news.ended, vec!["metrics.k8s.io".to_owned()]);
        assert!(news.started.is_empty());
        // A new outage of the same group is said again.
        assert_eq!(
            o.update(&down(&["custom.metrics.k8s.io", "metrics.k8s.io"]))
                .started,
            vec![metrics]
        );
    }

    #[test]
    fn api_versions_are_group_versions_and_their_kinds() {
        let served = [
            ("", "v1", "Pod"),
            ("", "v1", "ConfigMap"),
            ("apps", "v1", "Deployment"),
            ("monitoring.coreos.com", "v1", "ServiceMonitor"),
        ]
        .map(|(g, v, k)| (g.to_owned(), v.to_owned(), k.to_owned()));
        assert_eq!(
            super::api_versions(served),
            [
                "apps/v1",
                "apps/v1/Deployment",
                "monitoring.coreos.com/v1",
                "monitoring.coreos.com/v1/ServiceMonitor",
                "v1",
                "v1/ConfigMap",
                "v1/Pod",
            ]
        );
    }

    use super::*;

    #[test]
    fn a_group_is_unavailable_when_any_of_its_versions_fails_and_gone_groups_are_not() {
        let failed = |m: &str| Probe::Failed(m.into());
        let probes = vec![
            ("apps".to_owned(), Probe::Answered),
            ("metrics.k8s.io".to_owned(), Probe::Answered),
            (
                "metrics.k8s.io".to_owned(),
                failed("503 service unavailable"),
            ),
            ("metrics.k8s.io".to_owned(), failed("second")),
            ("widgets.example.com".to_owned(), Probe::Gone),
        ];
        let out = unavailable_of(probes);
        assert_eq!(
            out,
            BTreeMap::from([(
                "metrics.k8s.io".to_owned(),
                "503 service unavailable".to_owned()
            )])
        );
    }

    #[test]
    fn a_404_is_a_group_gone_and_other_errors_fail() {
        let not_found = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            ..kube::core::Status::default()
        }));
        assert_eq!(Probe::of::<()>(Err(not_found)), Probe::Gone);
        let unavailable = kube::Error::Api(Box::new(kube::core::Status {
            code: 503,
            message: "service unavailable".into(),
            ..kube::core::Status::default()
        }));
        assert!(matches!(
            Probe::of::<()>(Err(unavailable)),
            Probe::Failed(_)
        ));
        assert_eq!(Probe::of(Ok(())), Probe::Answered);
    }
}
