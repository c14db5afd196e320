//! The sandbox's rules that can be decided from text alone: symlink targets, the references of
//! kustomizations, a chart's dependencies, and how a renderer's error reads. Pure.

use std::collections::BTreeSet;

use serde_json::Value;

use super::RenderError;

/// Whether the symlink at `link` (a repository path) pointing at `target` stays inside the
/// repository, resolving `..` by name (an absolute target never does).
pub fn link_stays_inside(link: &str, target: &str) -> bool {
    let parent = link.rsplit_once('/').map_or("", |(dir, _)| dir);
    join_inside(parent, target).is_some()
}

/// `dir` joined with the relative `reference`, `..` resolved by name; `None` when it leaves the
/// repository.
pub fn join_inside(dir: &str, reference: &str) -> Option<String> {
    if reference.starts_with('/') {
        return None;
    }
    let mut at: Vec<&str> = dir
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    for part in reference.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                at.pop()?;
            }
            name => at.push(name),
        }
    }
    Some(at.join("/"))
}

/// Whether a kustomization reference names something to download rather than a local path.
pub fn is_remote(reference: &str) -> bool {
    let lower = reference.to_ascii_lowercase();
    lower.contains("://")
        || lower.starts_with("git@")
        || lower.contains("?ref=")
        || lower.contains("//")
        || ["github.com/", "gitlab.com/", "bitbucket.org/"]
            .iter()
            .any(|host| lower.starts_with(host))
}

/// The file names Kustomize looks for in a directory, in its order.
pub const KUSTOMIZATION_FILES: [&str; 3] =
    ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// The local directories a kustomization (the file `file`, in the directory `dir`) refers to,
/// after refusing what the sandbox cannot allow: remote bases and resources, references that
/// leave the repository, and `helmCharts` (which Kustomize inflates by downloading charts).
pub fn kustomization_references(
    dir: &str,
    file: &str,
    text: &str,
) -> Result<Vec<String>, RenderError> {
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| RenderError::Failed {
        tool: super::Tool::Kustomize,
        message: format!("{file}: {e}"),
    })?;
    if doc.get("helmCharts").is_some() || doc.get("helmGlobals").is_some() {
        return Err(RenderError::HelmChartsInKustomization { file: file.into() });
    }
    let mut local = Vec::new();
    for key in ["resources", "bases", "components", "crds"] {
        let Some(Value::Array(items)) = doc.get(key) else {
            continue;
        };
        for reference in items.iter().filter_map(Value::as_str) {
            if is_remote(reference) {
                return Err(RenderError::RemoteReference {
                    file: file.into(),
                    reference: reference.into(),
                });
            }
            match join_inside(dir, reference) {
                Some(path) => local.push(path),
                None => {
                    return Err(RenderError::LeavesRepository {
                        file: file.into(),
                        reference: reference.into(),
                    });
                }
            }
        }
    }
    Ok(local)
}

/// Checks the kustomization at `start` and every local kustomization it reaches; `read` gives
/// a repository file's text (`None` when there is no such file).
pub fn check_kustomizations(
    start: &str,
    read: impl Fn(&str) -> Option<String>,
) -> Result<(), RenderError> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start.trim_matches('/').to_owned()];
    while let Some(dir) = todo.pop() {
        if !seen.insert(dir.clone()) {
            continue;
        }
        let found = KUSTOMIZATION_FILES.iter().find_map(|name| {
            let file = if dir.is_empty() || dir == "." {
                (*name).to_owned()
            } else {
                format!("{dir}/{name}")
            };
            read(&file).map(|text| (file, text))
        });
        // A plain file resource, or a missing directory: Kustomize itself says what is wrong.
        let Some((file, text)) = found else { continue };
        todo.extend(kustomization_references(&dir, &file, &text)?);
    }
    Ok(())
}

/// Checks that every dependency of the chart in `chart` (its `Chart.yaml` text) is vendored:
/// `vendored(name)` says whether `charts/<name>` or `charts/<name>-*.tgz` is in the chart.
pub fn check_chart_dependencies(
    chart: &str,
    chart_yaml: &str,
    vendored: impl Fn(&str) -> bool,
) -> Result<(), RenderError> {
    let doc: Value = serde_saphyr::from_str(chart_yaml).map_err(|e| RenderError::Failed {
        tool: super::Tool::Helm,
        message: format!("{chart}/Chart.yaml: {e}"),
    })?;
    let Some(Value::Array(deps)) = doc.get("dependencies") else {
        return Ok(());
    };
    for dep in deps {
        let name = dep.get("name").and_then(Value::as_str).unwrap_or_default();
        if !vendored(name) {
            let repository = dep
                .get("repository")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(RenderError::DependencyNotVendored {
                chart: chart.into(),
                name: name.into(),
                repository: repository.into(),
            });
        }
    }
    Ok(())
}

/// Longest renderer message kept (the rest is cut): enough for an error and its context.
pub const MAX_MESSAGE: usize = 4096;

/// A renderer's stderr as the user reads it: paths relative to the repository (the checkout's
/// temporary location means nothing to them), the inline values file named as the key it came
/// from, Go's goroutine dumps dropped, and cut at [`MAX_MESSAGE`].
pub fn renderer_message(stderr: &str, repo: &str, values_file: &str) -> String {
    let text = stderr
        .replace(values_file, "helm.values")
        .replace(&format!("{repo}/"), "")
        .replace(repo, ".");
    let mut lines: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.starts_with("goroutine ") || line.starts_with("runtime stack:") {
            break;
        }
        if !line.trim().is_empty() {
            lines.push(line.trim_end());
        }
    }
    let mut message = lines.join("\n");
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" …");
    }
    message
}

/// Whether a renderer that failed ran into its address-space limit (Go's runtime says so in
/// these words when an allocation or its startup reservation is refused).
pub fn out_of_memory(stderr: &str) -> bool {
    [
        "out of memory",
        "failed to reserve",
        "cannot allocate memory",
    ]
    .iter()
    .any(|m| stderr.contains(m))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn symlinks_may_point_anywhere_inside_but_never_out() {
        assert!(link_stays_inside("a/link", "b"));
        assert!(link_stays_inside("a/link", "../c/d"));
        assert!(link_stays_inside("a/b/link", "../../x"));
        assert!(link_stays_inside("link", "./x/./y"));
        assert!(!link_stays_inside("link", "../x"));
        assert!(!link_stays_inside("a/link", "../../x"));
        assert!(!link_stays_inside("a/link", "/etc/passwd"));
        assert!(!link_stays_inside("a/link", "b/../../../x"));
    }

    #[test]
    fn references_resolve_inside_the_repository() {
        assert_eq!(
            join_inside("overlays/prod", "../../base").as_deref(),
            Some("base")
        );
        assert_eq!(join_inside("", "base").as_deref(), Some("base"));
        assert_eq!(join_inside(".", "./a/b").as_deref(), Some("a/b"));
        assert_eq!(join_inside("overlays/prod", "../../../x"), None);
        assert_eq!(join_inside("a", "/etc"), None);
    }

    #[test]
    fn remote_references_are_recognized() {
        for r in [
            "https://github.com/org/repo//deploy?ref=v1",
            "github.com/org/repo/deploy",
            "git@gitlab.com:org/repo.git",
            "ssh://git@host/org/repo",
            "http://example.com/cm.yaml",
        ] {
            assert!(is_remote(r), "{r}");
        }
        for r in ["../base", "cm.yaml", "github-config/base"] {
            assert!(!is_remote(r), "{r}");
        }
    }

    #[test]
    fn reachable_kustomizations_are_checked_and_refusals_name_the_file() {
        let mut files = HashMap::new();
        files.insert(
            "overlays/prod/kustomization.yaml",
            "resources:\n- ../../base\n- cm.yaml\n",
        );
        files.insert("base/kustomization.yaml", "resources:\n- deploy.yaml\n");
        files.insert(
            "other/kustomization.yaml",
            "resources:\n- https://example.com/x.yaml\n",
        );
        let read = |files: &HashMap<&str, &str>, p: &str| files.get(p).map(|t| (*t).to_owned());
        assert!(check_kustomizations("overlays/prod", |p| read(&files, p)).is_ok());
        files.insert(
            "base/kustomization.yaml",
            "resources:\n- github.com/org/repo/base?ref=v1\n",
        );
        let e = check_kustomizations("overlays/prod", |p| read(&files, p)).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "base/kustomization.yaml refers to the remote github.com/org/repo/base?ref=v1: kas renders without network access; vendor it into the repository"
        );
        files.insert("base/kustomization.yaml", "bases:\n- ../../../outside\n");
        let e = check_kustomizations("overlays/prod", |p| read(&files, p)).expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("base/kustomization.yaml refers to ../../../outside"),
            "{e}"
        );
        files.insert("base/kustomization.yaml", "helmCharts:\n- name: x\n");
        let e = check_kustomizations("overlays/prod", |p| read(&files, p)).expect_err("refused");
        assert!(e.to_string().contains("helmCharts"), "{e}");
    }

    #[test]
    fn chart_dependencies_must_be_vendored() {
        let chart = "apiVersion: v2\nname: app\nversion: 1.0.0\ndependencies:\n- name: redis\n  version: 1.0.0\n  repository: https://charts.example.com\n";
        let e = check_chart_dependencies("charts/app", chart, |_| false).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "chart charts/app depends on redis from https://charts.example.com, which is not vendored under charts/app/charts/: kas renders without network access; run `helm dependency build` and commit the result"
        );
        assert!(check_chart_dependencies("charts/app", chart, |n| n == "redis").is_ok());
        assert!(
            check_chart_dependencies("c", "apiVersion: v2\nname: a\nversion: 1\n", |_| false)
                .is_ok()
        );
    }

    #[test]
    fn renderer_messages_name_repository_files() {
        let stderr = "Error: template: app/templates/cm.yaml:7:20: executing \"app/templates/cm.yaml\" at <.Values.x.y>: nil pointer\n\nError: trouble in /tmp/r1/repo/overlays/prod/patch.yaml and /tmp/r1/s/values.json\n";
        assert_eq!(
            renderer_message(stderr, "/tmp/r1/repo", "/tmp/r1/s/values.json"),
            "Error: template: app/templates/cm.yaml:7:20: executing \"app/templates/cm.yaml\" at <.Values.x.y>: nil pointer\nError: trouble in overlays/prod/patch.yaml and helm.values"
        );
        let dump = "fatal error: runtime: out of memory\n\nruntime stack:\nruntime.throw(...)\ngoroutine 1 [running]:\n";
        assert_eq!(
            renderer_message(dump, "/r", "/v"),
            "fatal error: runtime: out of memory"
        );
        assert!(out_of_memory(dump));
        assert!(!out_of_memory("Error: bad patch"));
        let long = "x".repeat(MAX_MESSAGE * 2);
        assert_eq!(
            renderer_message(&long, "/r", "/v").len(),
            MAX_MESSAGE + " …".len()
        );
    }
}
