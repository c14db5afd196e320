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

/// How Kustomize uses a local path a kustomization names, so how the checks follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Followed {
    /// A resource, base or component: a directory's kustomization is checked in turn; a file
    /// is only read as manifests.
    Resources,
    /// A generator, transformer or validator: a directory's kustomization is checked in turn
    /// and everything it lists is plugin configuration; a file is plugin configuration, whose
    /// own file fields Kustomize loads too.
    Plugins,
    /// A file read as it is (a patch, an env file, an OpenAPI schema…): nothing to follow.
    File,
}

/// The keys whose presence alone is refused: Kustomize inflates Helm charts by downloading
/// them (lower case: keys are compared so).
const HELM_KEYS: [&str; 3] = ["helmcharts", "helmglobals", "helmchartinflationgenerator"];

/// A YAML document with every mapping key in lower case, recursively: Kustomize decodes its
/// files with Go's `encoding/json`, which matches field names case-insensitively, so
/// `Resources:` is `resources:` to it. Two keys differing only in case are refused, as which
/// one Kustomize keeps is not ours to guess.
fn lowercase_keys(value: Value, file: &str) -> Result<Value, RenderError> {
    Ok(match value {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, v) in map {
                let lower = key.to_lowercase();
                if out.contains_key(&lower) {
                    return Err(RenderError::AmbiguousKey {
                        file: file.into(),
                        key,
                    });
                }
                out.insert(lower, lowercase_keys(v, file)?);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| lowercase_keys(v, file))
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

/// The strings of `doc[key]`, a list (a lone string counts as a list of one).
fn strings<'a>(doc: &'a Value, key: &str) -> Vec<&'a str> {
    match doc.get(key) {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The `field` string of every object in the list `doc[key]`.
fn fields<'a>(doc: &'a Value, key: &str, field: &str) -> Vec<&'a str> {
    match doc.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get(field).and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    }
}

/// The paths of a generator's `files` (`path` or `key=path`), `envs` and `env`.
fn generator_sources(args: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    for source in strings(args, "files") {
        // Kustomize refuses a second `=`; the whole entry is checked as well below.
        out.push(source);
        if let Some((_, path)) = source.split_once('=') {
            out.push(path);
        }
    }
    out.extend(strings(args, "envs"));
    out.extend(strings(args, "env"));
    out
}

/// Every path or URL Kustomize loads for the (key-lowercased) kustomization or plugin
/// configuration `doc`, with how it is followed; inline entries (YAML text, several lines)
/// as `None`.
fn loaded(doc: &Value) -> Vec<(&str, Followed)> {
    let mut out = Vec::new();
    for key in ["resources", "bases", "components"] {
        out.extend(
            strings(doc, key)
                .into_iter()
                .map(|r| (r, Followed::Resources)),
        );
    }
    for key in ["generators", "transformers", "validators"] {
        out.extend(
            strings(doc, key)
                .into_iter()
                .map(|r| (r, Followed::Plugins)),
        );
    }
    // Plugin configurations' own keys (`paths`: PatchStrategicMergeTransformer; `path`:
    // PatchTransformer, PatchJson6902Transformer; `files`/`envs`/`env`: the generators) are
    // checked in kustomizations too: there they mean nothing, so checking costs nothing.
    let mut files: Vec<&str> = ["crds", "configurations", "patchesstrategicmerge", "paths"]
        .iter()
        .flat_map(|k| strings(doc, k))
        .collect();
    for key in ["patches", "patchesjson6902", "replacements"] {
        files.extend(fields(doc, key, "path"));
    }
    for key in ["configmapgenerator", "secretgenerator"] {
        if let Some(Value::Array(generators)) = doc.get(key) {
            files.extend(generators.iter().flat_map(generator_sources));
        }
    }
    files.extend(generator_sources(doc));
    files.extend(strings(doc, "path"));
    if let Some(path) = doc.get("openapi").and_then(|o| o.get("path")) {
        files.extend(path.as_str());
    }
    out.extend(files.into_iter().map(|f| (f, Followed::File)));
    out
}

/// Whether a list entry is YAML text (an inline patch or plugin configuration) rather than a
/// path: Kustomize tells them apart the same way, by the line break.
fn is_inline(entry: &str) -> bool {
    entry.contains('\n')
}

/// Parses one kustomization or plugin configuration document, keys lowercased.
fn parse(file: &str, text: &str) -> Result<Vec<Value>, RenderError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| RenderError::Failed {
        tool: super::Tool::Kustomize,
        message: format!("{file}: {e}"),
    })?;
    docs.into_iter().map(|d| lowercase_keys(d, file)).collect()
}

/// A remote base a kustomization names: the kustomization file and the reference as written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRef {
    /// The kustomization file (a repository path).
    pub file: String,
    /// The entry of `resources`, `bases` or `components`.
    pub reference: String,
}

/// What a kustomization names: local paths with how each is followed, and remote bases.
pub type References = (Vec<(String, Followed)>, Vec<RemoteRef>);

/// The local paths a kustomization (the file `file`, in the directory `dir`) or plugin
/// configuration refers to, with how each is followed, and the remote bases it names (remote
/// entries of `resources`, `bases` and `components`, for the caller to allow or refuse), after
/// refusing what the sandbox cannot allow: remote references of any other field Kustomize
/// loads from (it fetches any `http(s)://` path whatever its load restrictor says), references
/// that leave the repository, and `helmCharts` (which Kustomize inflates by downloading
/// charts).
pub fn kustomization_references(
    dir: &str,
    file: &str,
    text: &str,
) -> Result<References, RenderError> {
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for doc in parse(file, text)? {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        if HELM_KEYS.iter().any(|k| doc.get(k).is_some())
            || kind.eq_ignore_ascii_case("HelmChartInflationGenerator")
        {
            return Err(RenderError::HelmChartsInKustomization { file: file.into() });
        }
        for (reference, followed) in loaded(&doc) {
            if is_inline(reference) {
                if followed == Followed::Plugins {
                    let (l, r) = kustomization_references(dir, file, reference)?;
                    // A plugin configuration names no base: what it loads is files.
                    if let Some(RemoteRef { file, reference }) = r.into_iter().next() {
                        return Err(RenderError::RemoteReference { file, reference });
                    }
                    local.extend(l);
                }
                continue;
            }
            if followed == Followed::Resources && is_remote(reference) {
                remote.push(RemoteRef {
                    file: file.into(),
                    reference: reference.into(),
                });
                continue;
            }
            local.push((local_path(dir, file, reference)?, followed));
        }
    }
    Ok((local, remote))
}

/// `reference` as a repository path, refused when remote or outside the repository.
fn local_path(dir: &str, file: &str, reference: &str) -> Result<String, RenderError> {
    if is_remote(reference) {
        return Err(RenderError::RemoteReference {
            file: file.into(),
            reference: reference.into(),
        });
    }
    join_inside(dir, reference).ok_or_else(|| RenderError::LeavesRepository {
        file: file.into(),
        reference: reference.into(),
    })
}

/// Checks the kustomization at `start` and every local kustomization and plugin
/// configuration it reaches; `read` gives a repository file's text (`None` when there is no
/// such file, or it is a directory). Every remote base is refused: kas rewrites those it
/// fetched before this check, so one left is one it did not fetch.
pub fn check_kustomizations(
    start: &str,
    read: impl Fn(&str) -> Option<String>,
) -> Result<(), RenderError> {
    match remote_bases_named(start, read)?.into_iter().next() {
        Some(RemoteRef { file, reference }) => {
            Err(RenderError::RemoteReference { file, reference })
        }
        None => Ok(()),
    }
}

/// Checks as [`check_kustomizations`] does, and returns the remote bases named by the
/// kustomizations reached (each kustomization file and reference once, sorted).
pub fn remote_bases_named(
    start: &str,
    read: impl Fn(&str) -> Option<String>,
) -> Result<Vec<RemoteRef>, RenderError> {
    let mut seen = BTreeSet::new();
    let mut remote = BTreeSet::new();
    let start = start.trim_matches('/').to_owned();
    // (path, how it is followed, the directory of the kustomization that named it)
    let mut todo = vec![(start.clone(), Followed::Resources, start)];
    while let Some((path, followed, from)) = todo.pop() {
        if !seen.insert((path.clone(), followed)) {
            continue;
        }
        let found = KUSTOMIZATION_FILES.iter().find_map(|name| {
            let file = if path.is_empty() || path == "." {
                (*name).to_owned()
            } else {
                format!("{path}/{name}")
            };
            read(&file).map(|text| (file, text))
        });
        let (references, bases) = match (found, followed) {
            (Some((file, text)), _) => kustomization_references(&path, &file, &text)?,
            // A plugin configuration file: its paths are loaded from the directory of the
            // kustomization that named it.
            (None, Followed::Plugins) => match read(&path) {
                Some(text) => kustomization_references(&from, &path, &text)?,
                None => continue,
            },
            // A plain file resource, or a missing directory: Kustomize itself says what is
            // wrong.
            (None, _) => continue,
        };
        for base in bases {
            // A plugin configuration names no base: what it loads is files.
            if followed == Followed::Plugins {
                return Err(RenderError::RemoteReference {
                    file: base.file,
                    reference: base.reference,
                });
            }
            remote.insert(base);
        }
        for (next, f) in references {
            // What a plugin directory lists is plugin configuration in turn.
            let f = match (followed, f) {
                (_, Followed::File) => continue,
                (Followed::Plugins, _) => Followed::Plugins,
                (_, f) => f,
            };
            todo.push((next, f, path.clone()));
        }
    }
    Ok(remote.into_iter().collect())
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

/// The `name` a chart's `Chart.yaml` gives it ("" when it says none or does not parse).
pub fn chart_name(chart_yaml: &str) -> String {
    serde_saphyr::from_str::<Value>(chart_yaml)
        .ok()
        .and_then(|doc| doc.get("name").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default()
}

/// Helm names a chart's files after the chart's `name` (`web/templates/cm.yaml`), which need
/// not be its folder in the repository (`charts/web-app`): the message names the repository's
/// files instead, so users find the file to fix. Only a path at the start of a word is
/// changed (`web/` inside `my-web/` is not the chart).
pub fn with_chart_folder(message: String, name: &str, folder: &str) -> String {
    let folder = folder.trim_end_matches('/');
    if name.is_empty() || name == folder {
        return message;
    }
    let from = format!("{name}/");
    let starts_word = |i: usize| {
        message[..i]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "(\"'<:=,[".contains(c))
    };
    let mut out = String::with_capacity(message.len());
    let mut last = 0;
    for (i, _) in message.match_indices(&from) {
        if i < last || !starts_word(i) {
            continue;
        }
        out.push_str(&message[last..i]);
        out.push_str(folder);
        out.push('/');
        last = i + from.len();
    }
    out.push_str(&message[last..]);
    out
}

/// Longest renderer message kept (the rest is cut): enough for an error and its context.
pub const MAX_MESSAGE: usize = 4096;

/// Helm's advice after a chart renders invalid YAML: a flag of a command tether users do not
/// run, so it is dropped.
const HELM_DEBUG_HINT: &str = "Use --debug flag to render out invalid YAML";

/// A renderer's stderr as the user reads it: paths relative to the repository (the checkout's
/// temporary location means nothing to them), the inline values file named as the key it came
/// from, Go's goroutine dumps and Helm's `--debug` hint dropped, on one line (`kas agent
/// status` shows one line per project: lines are joined with "; "), and cut at
/// [`MAX_MESSAGE`].
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
        let line = line.trim();
        if !line.is_empty() && line != HELM_DEBUG_HINT {
            lines.push(line);
        }
    }
    let mut message = lines.join("; ");
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

/// Kustomize's refusal of a file outside the kustomization's directory, with why: kas keeps
/// the load restrictor on where the kernel cannot fence the renderer's files (see
/// `spec::load_restrictor`). Users coming from Flux, which reads such files, would otherwise
/// read it as their repository's mistake.
pub fn with_restrictor_hint(message: String, files_fenced: bool) -> String {
    if files_fenced || !message.contains("is not in or below") {
        return message;
    }
    format!(
        "{message} (kas runs Kustomize with LoadRestrictionsRootOnly because this kas's kernel has no Landlock to confine the renderer's files; with Landlock, files anywhere in the repository may be used)"
    )
}

/// A renderer's failure in a repository holding `submodules`, with why files may be missing:
/// kas does not fetch submodules, so a kustomization or chart using their files fails for
/// want of them.
pub fn with_submodule_hint(message: String, submodules: &[String]) -> String {
    with_listed(message, submodules, |list| {
        format!(
            "the repository's submodules {list} are empty where kas renders: kas does not fetch submodules; commit the files they hold into this repository, or make the submodule's repository a manifest project of its own"
        )
    })
}

/// A renderer's failure in a checkout that left out links leaving the repository (outside
/// the entry's folder): the files the renderer missed may be theirs.
pub fn with_left_out_hint(message: String, left_out: &[String]) -> String {
    with_listed(message, left_out, |list| {
        format!(
            "symbolic links pointing outside the repository are left out where kas renders: {list}"
        )
    })
}

/// `message` followed by `(note)`, the note naming `items`; `message` alone without items.
fn with_listed(message: String, items: &[String], note: impl Fn(&str) -> String) -> String {
    if items.is_empty() {
        return message;
    }
    format!("{message} ({})", note(&items.join(", ")))
}

/// Whether a renderer that failed ran into its memory limit: Go's runtime says so in these
/// words when an allocation or its startup reservation is refused by the address-space limit,
/// and the kernel's or the cgroup's OOM killer ends it with SIGKILL (kas's own kills, for time
/// and output, are told apart before).
pub fn out_of_memory(stderr: &str, killed_by: Option<i32>) -> bool {
    killed_by == Some(nix::libc::SIGKILL)
        || [
            "out of memory",
            "failed to reserve",
            "cannot allocate memory",
        ]
        .iter()
        .any(|m| stderr.contains(m))
}

/// Whether a renderer failed because the seccomp filter refused it a socket (Go's words for
/// `EACCES` from `socket()`).
pub fn network_refused(stderr: &str) -> bool {
    stderr.contains("socket: permission denied")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_failure_in_a_repository_with_submodules_names_them() {
        let said = "error: accumulating resources: 'lib/crd.yaml' doesn't exist".to_owned();
        assert_eq!(with_submodule_hint(said.clone(), &[]), said);
        let hinted = with_submodule_hint(said.clone(), &["lib".into(), "vendor/x".into()]);
        assert!(hinted.starts_with(&said), "{hinted}");
        assert!(
            hinted.contains("submodules lib, vendor/x are empty where kas renders: kas does not fetch submodules"),
            "{hinted}"
        );
    }

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
    fn remote_bases_are_returned_and_remote_plugin_configurations_refused() {
        let mut files = HashMap::new();
        files.insert(
            "app/kustomization.yaml",
            "resources:\n- ../base\n- github.com/org/repo/a?ref=v1\ncomponents:\n- https://h.example/org/repo//c?ref=v2\n",
        );
        files.insert(
            "base/kustomization.yaml",
            "Bases:\n- github.com/org/repo/a?ref=v1\n",
        );
        let read = |files: &HashMap<&str, &str>, p: &str| files.get(p).map(|t| (*t).to_owned());
        let found = remote_bases_named("app", |p| read(&files, p)).expect("checked");
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|r| (r.file.as_str(), r.reference.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("app/kustomization.yaml", "github.com/org/repo/a?ref=v1"),
                (
                    "app/kustomization.yaml",
                    "https://h.example/org/repo//c?ref=v2"
                ),
                ("base/kustomization.yaml", "github.com/org/repo/a?ref=v1"),
            ]
        );
        files.insert("app/kustomization.yaml", "generators:\n- gen\n");
        files.insert(
            "app/gen/kustomization.yaml",
            "resources:\n- github.com/org/repo/g?ref=v1\n",
        );
        let e = remote_bases_named("app", |p| read(&files, p)).expect_err("refused");
        assert!(matches!(e, RenderError::RemoteReference { .. }), "{e}");
    }

    /// The outcome of checking the kustomization `text` at `app/` with `others` beside it.
    fn check_app(text: &str, others: &[(&str, &str)]) -> Result<(), RenderError> {
        let mut files: HashMap<String, String> = others
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect();
        files.insert("app/kustomization.yaml".into(), text.into());
        check_kustomizations("app", |p| files.get(p).cloned())
    }

    fn refused_reference(text: &str, others: &[(&str, &str)]) -> (String, String) {
        match check_app(text, others) {
            Err(RenderError::RemoteReference { file, reference }) => (file, reference),
            other => panic!("expected a remote reference refused in {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn every_field_kustomize_loads_from_refuses_urls_in_any_case() {
        let url = "http://169.254.169.254/latest/meta-data/iam";
        let cases = [
            format!("Resources:\n- {url}\n"),
            format!("RESOURCES: [{url}]\n"),
            format!("crds:\n- {url}\n"),
            format!("configMapGenerator:\n- name: x\n  files:\n  - k={url}\n"),
            format!("configMapGenerator:\n- name: x\n  Files:\n  - {url}\n"),
            format!("secretGenerator:\n- name: x\n  envs:\n  - {url}\n"),
            format!("ConfigMapGenerator:\n- name: x\n  env: {url}\n"),
            format!("patches:\n- path: {url}\n"),
            format!("patches:\n- Path: {url}\n  target:\n    kind: Deployment\n"),
            format!("patchesStrategicMerge:\n- {url}\n"),
            format!("patchesJson6902:\n- path: {url}\n"),
            format!("replacements:\n- path: {url}\n"),
            format!("openapi:\n  path: {url}\n"),
            format!("openapi:\n  version: v1.20.4\n  path: {url}\n"),
            format!("configurations:\n- {url}\n"),
            format!("generators:\n- {url}\n"),
            format!("transformers:\n- {url}\n"),
            format!("validators:\n- {url}\n"),
            format!("components:\n- {url}\n"),
            "resources:\n- oci://registry.example.com/manifests:v1\n".to_owned(),
        ];
        for text in &cases {
            let (file, reference) = refused_reference(text, &[]);
            assert_eq!(file, "app/kustomization.yaml", "{text}");
            assert!(is_remote(&reference), "{text}: {reference}");
        }
    }

    #[test]
    fn local_references_of_every_field_are_accepted_and_leaving_is_refused() {
        let legit = "resources:\n- deploy.yaml\n- ../base\nconfigMapGenerator:\n- name: x\n  files:\n  - app.properties\n  - key=conf/other.txt\n  envs:\n  - env.txt\npatches:\n- path: patch.yaml\n- patch: |-\n    - op: replace\n      path: /spec/replicas\n      value: 3\n  target:\n    kind: Deployment\npatchesStrategicMerge:\n- psm.yaml\n- |-\n  apiVersion: apps/v1\n  kind: Deployment\n  metadata:\n    name: web\npatchesJson6902:\n- path: json.yaml\n  target:\n    kind: Deployment\n    name: web\nreplacements:\n- path: repl.yaml\n- source:\n    kind: ConfigMap\n    name: x\n  targets: []\nopenapi:\n  path: schema.json\nconfigurations:\n- conf.yaml\ntransformers:\n- prefix.yaml\ncommonAnnotations:\n  docs: https://example.com/docs\n";
        let base = ("base/kustomization.yaml", "resources:\n- cm.yaml\n");
        let prefix = (
            "app/prefix.yaml",
            "apiVersion: builtin\nkind: PrefixSuffixTransformer\nmetadata:\n  name: p\nprefix: a-\nfieldSpecs:\n- path: metadata/name\n",
        );
        assert!(check_app(legit, &[base, prefix]).is_ok());
        for text in [
            "configMapGenerator:\n- name: x\n  files:\n  - k=../../etc/passwd\n",
            "patches:\n- path: ../../x.yaml\n",
            "Transformers:\n- ../../t\n",
            "openapi:\n  path: /etc/schema.json\n",
        ] {
            assert!(
                matches!(
                    check_app(text, &[]),
                    Err(RenderError::LeavesRepository { .. })
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn inline_patches_pass_but_inline_and_file_plugin_configurations_are_checked() {
        let url = "https://evil.example/x";
        let inline = format!(
            "generators:\n- |-\n  apiVersion: builtin\n  kind: ConfigMapGenerator\n  metadata:\n    name: x\n  files:\n  - {url}\n"
        );
        assert_eq!(refused_reference(&inline, &[]).1, url);
        // A generator file, and a generator directory whose kustomization lists one.
        let config = format!(
            "apiVersion: builtin\nkind: PatchTransformer\nmetadata:\n  name: p\nPath: {url}\n"
        );
        let (file, reference) =
            refused_reference("transformers:\n- t.yaml\n", &[("app/t.yaml", &config)]);
        assert_eq!((file.as_str(), reference.as_str()), ("app/t.yaml", url));
        let dir = [
            ("app/gen/kustomization.yaml", "resources:\n- g.yaml\n"),
            ("app/gen/g.yaml", &config[..]),
        ];
        assert_eq!(
            refused_reference("generators:\n- gen\n", &dir).0,
            "app/gen/g.yaml"
        );
        let helm = "generators:\n- |-\n  apiVersion: builtin\n  kind: HelmChartInflationGenerator\n  metadata:\n    name: x\n";
        assert!(matches!(
            check_app(helm, &[]),
            Err(RenderError::HelmChartsInKustomization { .. })
        ));
        assert!(matches!(
            check_app("HelmCharts:\n- name: x\n", &[]),
            Err(RenderError::HelmChartsInKustomization { .. })
        ));
    }

    #[test]
    fn keys_differing_only_in_case_and_yaml_merges_cannot_hide_a_reference() {
        let e = check_app("resources: []\nResources:\n- ../other\n", &[]).expect_err("refused");
        assert!(matches!(e, RenderError::AmbiguousKey { .. }), "{e}");
        let merged = "x: &x\n  resources:\n  - https://evil.example/a\n<<: *x\n";
        assert_eq!(refused_reference(merged, &[]).1, "https://evil.example/a");
    }

    #[test]
    fn a_renderer_killed_by_sigkill_ran_out_of_memory() {
        // The cgroup's OOM killer says nothing on stderr: Go is killed mid-allocation.
        assert!(out_of_memory("", Some(nix::libc::SIGKILL)));
        assert!(network_refused(
            "Error: Get \"http://127.0.0.1:9/x\": dial tcp 127.0.0.1:9: socket: permission denied"
        ));
        assert!(!network_refused("Error: open x.yaml: permission denied"));
    }

    #[test]
    fn chart_dependencies_must_be_vendored() {
        let chart = "apiVersion: v2\nname: app\nversion: 1.0.0\ndependencies:\n- name: redis\n  version: 1.0.0\n  repository: https://charts.example.com\n";
        let e = check_chart_dependencies("charts/app", chart, |_| false).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "chart charts/app depends on redis from https://charts.example.com, which is not vendored under charts/app/charts/: kas renders without network access and fetches dependencies only from the http(s) chart repositories and oci:// registries the kas operator allows (gitops.render.chart_repositories); run `helm dependency build` and commit the result, or have the repository allowed"
        );
        assert!(check_chart_dependencies("charts/app", chart, |n| n == "redis").is_ok());
        assert!(
            check_chart_dependencies("c", "apiVersion: v2\nname: a\nversion: 1\n", |_| false)
                .is_ok()
        );
    }

    #[test]
    fn a_load_restrictor_refusal_says_why_only_without_the_fence() {
        let refusal = "Error: accumulating resources: security; file 'common/cm.yaml' is not in or below 'overlays/prod'".to_owned();
        assert!(with_restrictor_hint(refusal.clone(), false).contains("no Landlock"));
        assert_eq!(with_restrictor_hint(refusal.clone(), true), refusal);
        assert_eq!(with_restrictor_hint("other".into(), false), "other");
    }

    /// Helm's own advice names a flag tether users cannot pass, and its line broke the one
    /// line per project of `kas agent status`.
    #[test]
    fn helms_debug_hint_is_dropped_and_the_message_is_one_line() {
        let stderr = "Error: YAML parse error on app/templates/cm.yaml: error converting YAML to JSON: yaml: line 4: did not find expected key\nUse --debug flag to render out invalid YAML\n";
        let message = renderer_message(stderr, "/tmp/r1/repo", "/v");
        assert_eq!(
            message,
            "Error: YAML parse error on app/templates/cm.yaml: error converting YAML to JSON: yaml: line 4: did not find expected key"
        );
        let refusal = "Error: x is not in or below y".to_owned();
        let hinted = with_submodule_hint(with_restrictor_hint(refusal, false), &["sub".into()]);
        assert!(!hinted.contains('\n'), "{hinted}");
    }

    #[test]
    fn helm_messages_name_the_charts_folder_not_its_name() {
        let said = "Error: parse error at (web/templates/cm.yaml:5): unclosed action started at web/templates/cm.yaml:4; my-web/x and web/charts/db/templates/a.yaml";
        assert_eq!(
            with_chart_folder(said.into(), "web", "charts/web-app"),
            "Error: parse error at (charts/web-app/templates/cm.yaml:5): unclosed action started at charts/web-app/templates/cm.yaml:4; my-web/x and charts/web-app/charts/db/templates/a.yaml"
        );
        assert_eq!(with_chart_folder(said.into(), "web", "web"), said);
        assert_eq!(with_chart_folder(said.into(), "", "charts/x"), said);
        assert_eq!(
            chart_name("apiVersion: v2\nname: web\nversion: 1.0.0\n"),
            "web"
        );
        assert_eq!(chart_name("{"), "");
    }

    #[test]
    fn renderer_messages_name_repository_files() {
        let stderr = "Error: template: app/templates/cm.yaml:7:20: executing \"app/templates/cm.yaml\" at <.Values.x.y>: nil pointer\n\nError: trouble in /tmp/r1/repo/overlays/prod/patch.yaml and /tmp/r1/s/values.json\n";
        assert_eq!(
            renderer_message(stderr, "/tmp/r1/repo", "/tmp/r1/s/values.json"),
            "Error: template: app/templates/cm.yaml:7:20: executing \"app/templates/cm.yaml\" at <.Values.x.y>: nil pointer; Error: trouble in overlays/prod/patch.yaml and helm.values"
        );
        let dump = "fatal error: runtime: out of memory\n\nruntime stack:\nruntime.throw(...)\ngoroutine 1 [running]:\n";
        assert_eq!(
            renderer_message(dump, "/r", "/v"),
            "fatal error: runtime: out of memory"
        );
        assert!(out_of_memory(dump, None));
        assert!(!out_of_memory("Error: bad patch", None));
        assert!(!out_of_memory("Error: bad patch", Some(nix::libc::SIGTERM)));
        let long = "x".repeat(MAX_MESSAGE * 2);
        assert_eq!(
            renderer_message(&long, "/r", "/v").len(),
            MAX_MESSAGE + " …".len()
        );
    }
}
