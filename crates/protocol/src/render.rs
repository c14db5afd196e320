//! The request a manifest project entry makes: its `kustomize` or `helm` key as kas renders it.
//! agentk sends it; kas builds the same for a preview, so both render alike.

use tether_agent_config::ManifestProject;

use crate::gitops;

/// The agent's cluster as a chart sees it (`.Capabilities`), as agentk discovered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    /// The API server's version (`v1.31.2`); empty when unknown.
    pub kube_version: String,
    /// The group/versions and group/version/Kinds served.
    pub api_versions: Vec<String>,
}

/// The entry's `kustomize` or `helm` key as kas expects it, unchanged but for the Helm
/// namespace, which defaults to the project's `default_namespace`, and the chart's view of
/// `cluster`: `helm.kube_version` over its version, `helm.api_versions` added to its API
/// versions (sorted and without repeats, so equal clusters make equal cache keys in kas).
pub fn render_request(project: &ManifestProject, cluster: &Cluster) -> Option<gitops::Render> {
    use gitops::render::Renderer;
    let renderer = match (&project.kustomize, &project.helm) {
        (Some(k), _) => Renderer::Kustomize(gitops::Kustomize {
            path: k.path.clone(),
        }),
        (None, Some(h)) => Renderer::Helm(gitops::Helm {
            chart: h.chart.clone(),
            repository: h.repository.clone().unwrap_or_default(),
            version: h.version.clone().unwrap_or_default(),
            release_name: h.release_name.clone(),
            namespace: h
                .namespace
                .clone()
                .unwrap_or_else(|| project.default_namespace.clone()),
            values_files: h.values_files.clone(),
            values_json: h
                .values
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            kube_version: h
                .kube_version
                .clone()
                .unwrap_or_else(|| cluster.kube_version.clone()),
            api_versions: merged(&cluster.api_versions, &h.api_versions),
            apply_random: h.random == tether_agent_config::HelmRandom::Apply,
            default_namespace: project.default_namespace.clone(),
            create_namespace: h.create_namespace,
        }),
        (None, None) => return None,
    };
    Some(gitops::Render {
        renderer: Some(renderer),
    })
}

fn merged(a: &[String], b: &[String]) -> Vec<String> {
    let all: std::collections::BTreeSet<&String> = a.iter().chain(b).collect();
    all.into_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitops::render::Renderer;
    use tether_agent_config::{Helm, Kustomize, ProjectRef};

    #[test]
    fn render_settings_pass_through_with_the_default_namespace() {
        let mut p = ManifestProject::new(ProjectRef::Path("g/m".into()));
        assert_eq!(render_request(&p, &Cluster::default()), None);
        p.default_namespace = "apps".into();
        p.helm = Some(Helm {
            chart: "charts/app".into(),
            repository: None,
            version: None,
            release_name: "app".into(),
            namespace: None,
            values_files: vec!["v.yaml".into()],
            values: Some(serde_json::json!({"a": 1})),
            kube_version: None,
            api_versions: vec![],
            hooks: Default::default(),
            random: Default::default(),
            create_namespace: false,
        });
        let Some(Renderer::Helm(h)) =
            render_request(&p, &Cluster::default()).and_then(|r| r.renderer)
        else {
            panic!("helm expected");
        };
        assert_eq!(
            (h.namespace.as_str(), h.values_json.as_str()),
            ("apps", r#"{"a":1}"#)
        );
        assert_eq!(
            (h.default_namespace.as_str(), h.apply_random),
            ("apps", false)
        );
        p.helm = p.helm.take().map(|h| Helm {
            chart: "podinfo".into(),
            repository: Some("https://charts.example.com/stable".into()),
            version: Some(">=6 <7".into()),
            ..h
        });
        let Some(Renderer::Helm(h)) =
            render_request(&p, &Cluster::default()).and_then(|r| r.renderer)
        else {
            panic!("helm expected");
        };
        assert_eq!(
            (h.chart.as_str(), h.repository.as_str(), h.version.as_str()),
            ("podinfo", "https://charts.example.com/stable", ">=6 <7")
        );
        p.helm = None;
        p.kustomize = Some(Kustomize {
            path: "overlays/prod".into(),
        });
        let Some(Renderer::Kustomize(k)) =
            render_request(&p, &Cluster::default()).and_then(|r| r.renderer)
        else {
            panic!("kustomize expected");
        };
        assert_eq!(k.path, "overlays/prod");
    }

    #[test]
    fn the_cluster_is_sent_with_the_entrys_overrides() {
        let mut p = ManifestProject::new(ProjectRef::Path("g/m".into()));
        let helm = Helm {
            chart: "c".into(),
            repository: None,
            version: None,
            release_name: "r".into(),
            namespace: Some("n".into()),
            values_files: vec![],
            values: None,
            kube_version: None,
            api_versions: vec!["x.io/v1/Thing".into(), "apps/v1".into()],
            hooks: Default::default(),
            random: Default::default(),
            create_namespace: false,
        };
        p.helm = Some(helm.clone());
        let cluster = Cluster {
            kube_version: "v1.31.2".into(),
            api_versions: vec!["v1".into(), "apps/v1".into()],
        };
        let sent = |p: &ManifestProject| match render_request(p, &cluster).and_then(|r| r.renderer)
        {
            Some(Renderer::Helm(h)) => (h.kube_version, h.api_versions),
            _ => panic!("helm expected"),
        };
        assert_eq!(
            sent(&p),
            (
                "v1.31.2".to_owned(),
                vec!["apps/v1".into(), "v1".into(), "x.io/v1/Thing".into()]
            )
        );
        p.helm = Some(Helm {
            kube_version: Some("v1.28.0".into()),
            ..helm
        });
        assert_eq!(sent(&p).0, "v1.28.0");
    }
}
