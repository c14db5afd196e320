//! The request a manifest project entry makes: its `kustomize` or `helm` key as kas renders it.
//! agentk sends it; kas builds the same for a preview, so both render alike.

use tether_agent_config::ManifestProject;

use crate::gitops;

/// The entry's `kustomize` or `helm` key as kas expects it, unchanged but for the Helm
/// namespace, which defaults to the project's `default_namespace`.
pub fn render_request(project: &ManifestProject) -> Option<gitops::Render> {
    use gitops::render::Renderer;
    let renderer = match (&project.kustomize, &project.helm) {
        (Some(k), _) => Renderer::Kustomize(gitops::Kustomize {
            path: k.path.clone(),
        }),
        (None, Some(h)) => Renderer::Helm(gitops::Helm {
            chart: h.chart.clone(),
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
        }),
        (None, None) => return None,
    };
    Some(gitops::Render {
        renderer: Some(renderer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitops::render::Renderer;
    use tether_agent_config::{Helm, Kustomize, ProjectRef};

    #[test]
    fn render_settings_pass_through_with_the_default_namespace() {
        let mut p = ManifestProject::new(ProjectRef::Path("g/m".into()));
        assert_eq!(render_request(&p), None);
        p.default_namespace = "apps".into();
        p.helm = Some(Helm {
            chart: "charts/app".into(),
            release_name: "app".into(),
            namespace: None,
            values_files: vec!["v.yaml".into()],
            values: Some(serde_json::json!({"a": 1})),
            hooks: Default::default(),
        });
        let Some(Renderer::Helm(h)) = render_request(&p).and_then(|r| r.renderer) else {
            panic!("helm expected");
        };
        assert_eq!(
            (h.namespace.as_str(), h.values_json.as_str()),
            ("apps", r#"{"a":1}"#)
        );
        p.helm = None;
        p.kustomize = Some(Kustomize {
            path: "overlays/prod".into(),
        });
        let Some(Renderer::Kustomize(k)) = render_request(&p).and_then(|r| r.renderer) else {
            panic!("kustomize expected");
        };
        assert_eq!(k.path, "overlays/prod");
    }
}
