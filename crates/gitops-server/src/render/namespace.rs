//! `helm.create_namespace`: the release's Namespace, added to a chart's rendering (pure).
//!
//! `helm install --create-namespace` creates it outside the release, so uninstalling leaves
//! it; Flux's `install.createNamespace` does the same. Added to the rendering, it is applied
//! like the chart's objects (Namespaces first), and its `helm.sh/resource-policy: keep`
//! annotation makes agentk leave it in place when the entry or the key goes, with whatever
//! else lives in it.

/// The name of the file the Namespace comes as: what agentk's messages name as its source.
pub const SOURCE: &str = "helm.create_namespace";

/// The Namespace `namespace` (a DNS label, checked with the entry's settings), unless the
/// chart's output `rendered` has it already: the same object twice fails the sync.
pub fn namespace_to_add(rendered: &str, namespace: &str) -> Option<String> {
    if renders_namespace(rendered, namespace) {
        return None;
    }
    Some(format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n  annotations:\n    helm.sh/resource-policy: keep\n"
    ))
}

/// Whether one of the documents of `rendered` is the Namespace `namespace`. A document that
/// does not parse is not it (agentk names it when it decodes the output).
fn renders_namespace(rendered: &str, namespace: &str) -> bool {
    super::unstable::split_documents(rendered)
        .into_iter()
        .any(|doc| {
            let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap_or_default();
            v["apiVersion"] == "v1"
                && v["kind"] == "Namespace"
                && v["metadata"]["name"] == namespace
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_is_added_kept_unless_the_chart_renders_it() {
        let chart = "---\n# Source: app/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n";
        let added = namespace_to_add(chart, "shop").expect("added");
        let v: serde_json::Value = serde_saphyr::from_str(&added).expect("YAML");
        assert_eq!(v["kind"], "Namespace");
        assert_eq!(v["metadata"]["name"], "shop");
        assert_eq!(
            v["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "never pruned"
        );
        let with_it = format!(
            "{chart}---\n# Source: app/templates/ns.yaml\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"shop\"\n"
        );
        assert_eq!(namespace_to_add(&with_it, "shop"), None);
        assert!(
            namespace_to_add(&with_it, "other").is_some(),
            "another namespace"
        );
    }
}
