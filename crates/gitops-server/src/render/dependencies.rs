//! Chart dependencies kas fetches from chart repositories the kas operator allows
//! (`gitops.render.chart_repositories`): which dependencies of a chart come from an HTTP(S)
//! repository or an OCI registry, whether a URL is allowed, the repository's `index.yaml`, and
//! which of its versions satisfies a dependency's `version` (Helm's semver constraints). Pure.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

pub use tether_agent_config::chart_repository::Constraint;
use tether_agent_config::chart_repository::{bare, is_chart_name, plain_url, repository_url};

use super::{RenderError, Tool};

/// A dependency of `Chart.yaml` on a chart of an HTTP(S) repository or an OCI registry (or the
/// chart of a `helm.repository` entry, asked the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The chart's name in the repository.
    pub name: String,
    /// Helm's version constraint (an exact version or a range); empty for the newest.
    pub version: String,
    /// The repository's URL (`http(s)://…`) or registry location (`oci://…`), as written.
    pub repository: String,
}

/// What a dependency resolved to: the version chosen, its archive and the archive's digest.
/// Part of the rendering's cache key, so a new version published in the range renders anew.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resolved {
    /// The chart's name.
    pub name: String,
    /// The version chosen.
    pub version: String,
    /// The archive's URL (absolute).
    pub url: String,
    /// The archive's SHA-256, lowercase hex, from the index.
    pub digest: String,
}

impl Resolved {
    /// The archive's file name under the chart's `charts/` (as `helm dependency build` names
    /// it); name and version were checked to be plain file-name characters.
    pub fn file_name(&self) -> String {
        format!("{}-{}.tgz", self.name, self.version)
    }
}

/// Whether a dependency's `repository` is one kas may fetch from (`http://`, `https://`, or an
/// OCI registry's `oci://`, as `helm dependency build` fetches them): the others (`file://`,
/// `@alias`, `alias:`) name no place kas could ask, so they must be vendored.
pub fn is_fetched_repository(repository: &str) -> bool {
    let lower = repository.trim().to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://") || lower.starts_with("oci://")
}

/// The dependencies of `chart_yaml` (the chart at `chart`) on HTTP(S) repositories and OCI
/// registries.
pub fn fetched_dependencies(chart: &str, chart_yaml: &str) -> Result<Vec<Dependency>, RenderError> {
    let doc: Value = serde_saphyr::from_str(chart_yaml).map_err(|e| RenderError::Failed {
        tool: Tool::Helm,
        message: format!("{chart}/Chart.yaml: {e}"),
    })?;
    let Some(Value::Array(deps)) = doc.get("dependencies") else {
        return Ok(Vec::new());
    };
    let text = |d: &Value, key: &str| match d.get(key) {
        Some(Value::String(s)) => s.trim().to_owned(),
        // `version: 1.2` is read by YAML as a number; Helm reads the text.
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    Ok(deps
        .iter()
        .map(|d| Dependency {
            name: text(d, "name"),
            version: text(d, "version"),
            repository: text(d, "repository"),
        })
        .filter(|d| is_fetched_repository(&d.repository))
        .collect())
}

/// Whether the repository paths `listed` (the chart's `charts/` folder, `charts` being its
/// path) hold the dependency `name`, unpacked or as `name-<version>.tgz`, as Helm finds it.
pub fn vendored_in(listed: &[String], charts: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let unpacked = format!("{charts}/{name}/Chart.yaml");
    let packed = format!("{charts}/{name}-");
    listed.iter().any(|p| {
        *p == unpacked
            || (p.starts_with(&packed) && p.ends_with(".tgz") && !p[packed.len()..].contains('/'))
    })
}

/// The URL prefixes kas fetches charts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    prefixes: Vec<Url>,
}

impl AllowList {
    /// The allow list of `prefixes`; an error names the first that is not a plain HTTP(S) URL
    /// or registry location (`oci://`).
    pub fn new<S: AsRef<str>>(prefixes: &[S]) -> Result<Self, String> {
        let prefixes = prefixes
            .iter()
            .map(|p| {
                repository_url(p.as_ref()).ok_or_else(|| {
                    format!(
                        "{:?} is not an http://, https:// or oci:// URL without user, query or fragment",
                        p.as_ref()
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { prefixes })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Whether `url` is under one of the prefixes: same scheme, host and port, and a path
    /// continuing the prefix's at a `/` (`https://h/charts` allows `https://h/charts/x`, not
    /// `https://h/charts-evil`; `https://h` never allows `https://h.evil.example`). Compared
    /// after parsing, so `..`, case and default ports cannot leave a prefix.
    pub fn allows(&self, url: &str) -> bool {
        let Some(url) = repository_url(url) else {
            return false;
        };
        self.prefixes.iter().any(|p| is_under(p, &url))
    }
}

/// Whether `url` is under `prefix`: same scheme, host and port, and a path continuing the
/// prefix's at a `/` (see [`AllowList::allows`]).
pub fn is_under(prefix: &Url, url: &Url) -> bool {
    let (want, path) = (prefix.path(), url.path());
    prefix.scheme() == url.scheme()
        && prefix.host_str() == url.host_str()
        && prefix.port_or_known_default() == url.port_or_known_default()
        && (want.ends_with('/') && path.starts_with(want)
            || path == want
            || path.strip_prefix(want).is_some_and(|r| r.starts_with('/')))
}

/// The URL of `repository`'s index (`<repository>/index.yaml`, as Helm asks it).
pub fn index_url(repository: &str) -> Result<Url, String> {
    let base = format!("{}/index.yaml", repository.trim().trim_end_matches('/'));
    plain_url(&base).ok_or_else(|| format!("{repository:?} is not a plain http(s) URL"))
}

/// A chart repository's index: each chart's versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChartIndex {
    entries: HashMap<String, Vec<IndexEntry>>,
}

/// One version of a chart in an index.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct IndexEntry {
    #[serde(default)]
    version: String,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default)]
    digest: String,
}

#[derive(Deserialize)]
struct IndexFile {
    #[serde(default)]
    entries: HashMap<String, Vec<IndexEntry>>,
}

/// Parses an `index.yaml` (only the fields kas uses; the budget grows with the text, as a
/// large public repository's index has hundreds of thousands of nodes).
pub fn parse_index(text: &[u8]) -> Result<ChartIndex, String> {
    let text = std::str::from_utf8(text).map_err(|_| "index.yaml is not UTF-8".to_owned())?;
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = text.len().saturating_add(50_000);
    budget.max_events = budget.max_nodes.saturating_mul(2).saturating_add(1_000);
    budget.max_total_scalar_bytes = text.len().saturating_mul(4).saturating_add(1 << 20);
    let options = serde_saphyr::options! { budget: Some(budget), with_snippet: false };
    let file: IndexFile = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| format!("index.yaml cannot be read: {e}"))?;
    Ok(ChartIndex {
        entries: file.entries,
    })
}

/// A version of the index read as Helm reads it: a `v` prefix and a missing patch or minor
/// (`1.2`) are allowed.
pub fn parse_version(text: &str) -> Option<semver::Version> {
    let text = bare(text.trim());
    if let Ok(v) = semver::Version::parse(text) {
        return Some(v);
    }
    let (core, rest) = match text.find(['-', '+']) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let parts = core.split('.').count();
    let padded = match parts {
        1 => format!("{core}.0.0{rest}"),
        2 => format!("{core}.0{rest}"),
        _ => return None,
    };
    semver::Version::parse(&padded).ok()
}

/// The newest version of `dep` in `index` (fetched from `index_url`) satisfying its
/// constraint, with its archive's absolute URL and digest; why not, otherwise.
pub fn resolve(dep: &Dependency, index: &ChartIndex, index_url: &Url) -> Result<Resolved, String> {
    if !is_chart_name(&dep.name) {
        return Err(format!("{:?} is not a chart name", dep.name));
    }
    let versions = index
        .entries
        .get(&dep.name)
        .ok_or_else(|| format!("the repository has no chart {}", dep.name))?;
    let (version, entry) = newest(dep, versions.iter().map(|e| (parse_version(&e.version), e)))?;
    let version = version.to_string();
    let first = entry
        .urls
        .first()
        .ok_or_else(|| format!("the index gives no URL for {} {version}", dep.name))?;
    let url = index_url
        .join(first)
        .map_err(|e| format!("the index's URL {first:?} for {} {version}: {e}", dep.name))?;
    let digest = entry.digest.trim().to_ascii_lowercase();
    if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "the index gives no SHA-256 digest for {} {version}, so kas cannot check the archive",
            dep.name
        ));
    }
    Ok(Resolved {
        name: dep.name.clone(),
        version,
        url: url.to_string(),
        digest,
    })
}

/// The newest of a chart's `published` versions (each read as a version, or not, with what
/// came with it) satisfying `dep`'s constraint; why none, naming those there, otherwise.
pub fn newest<T>(
    dep: &Dependency,
    published: impl IntoIterator<Item = (Option<semver::Version>, T)>,
) -> Result<(semver::Version, T), String> {
    let constraint = Constraint::parse(&dep.version)?;
    let mut all = Vec::new();
    let mut best: Option<(semver::Version, T)> = None;
    for (version, item) in published {
        let Some(version) = version else { continue };
        all.push(version.clone());
        if constraint.matches(&version) && best.as_ref().is_none_or(|(b, _)| version > *b) {
            best = Some((version, item));
        }
    }
    best.ok_or_else(|| {
        let wanted = if dep.version.is_empty() {
            "any version"
        } else {
            dep.version.as_str()
        };
        format!(
            "no version of {} in the repository matches {wanted} (it has {})",
            dep.name,
            available(all)
        )
    })
}

/// Most versions an error lists.
const LISTED_VERSIONS: usize = 10;

/// `versions`, newest first, the [`LISTED_VERSIONS`] newest only.
fn available(mut versions: Vec<semver::Version>) -> String {
    versions.sort_by(|a, b| b.cmp(a));
    versions.dedup();
    if versions.is_empty() {
        return "no version".into();
    }
    let more = versions.len().saturating_sub(LISTED_VERSIONS);
    let listed: Vec<String> = versions
        .iter()
        .take(LISTED_VERSIONS)
        .map(ToString::to_string)
        .collect();
    match more {
        0 => listed.join(", "),
        n => format!("{} and {n} older", listed.join(", ")),
    }
}

/// The SHA-256 of `bytes`, lowercase hex (as `index.yaml` gives digests).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `bytes` start as a gzip stream does (a chart archive is a gzipped tar).
pub fn looks_gzipped(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn http_and_oci_dependencies_are_listed_with_their_versions_as_text() {
        let chart = "apiVersion: v2\nname: app\nversion: 1.0.0\ndependencies:\n- name: redis\n  version: 17.x\n  repository: https://charts.example.com/stable\n- name: db\n  version: 1.2\n  repository: HTTP://charts.example.com\n- name: local\n  repository: file://../local\n- name: oci\n  version: 1.0.0\n  repository: oci://registry.example.com/charts\n  alias: cache\n  condition: cache.enabled\n- name: aliased\n  repository: '@stable'\n- name: vendored\n";
        let deps = fetched_dependencies("charts/app", chart).unwrap();
        let dep = |name: &str, version: &str, repository: &str| Dependency {
            name: name.into(),
            version: version.into(),
            repository: repository.into(),
        };
        assert_eq!(
            deps,
            [
                dep("redis", "17.x", "https://charts.example.com/stable"),
                dep("db", "1.2", "HTTP://charts.example.com"),
                // The chart's name, not its alias: the registry knows it by that name.
                dep("oci", "1.0.0", "oci://registry.example.com/charts"),
            ]
        );
        assert!(
            fetched_dependencies("c", "apiVersion: v2\nname: a\n")
                .unwrap()
                .is_empty()
        );
        assert!(fetched_dependencies("c", "a: [").is_err());
        assert!(is_fetched_repository(" OCI://r.example.com/x"));
        for vendored in ["file://../x", "@stable", "alias:stable", "", "ftp://x/"] {
            assert!(!is_fetched_repository(vendored), "{vendored}");
        }
    }

    #[test]
    fn a_vendored_dependency_is_found_unpacked_or_packed_directly_under_charts() {
        let listed: Vec<String> = [
            "app/charts/redis/Chart.yaml",
            "app/charts/db-1.2.0.tgz",
            "app/charts/deep/x/other-1.0.0.tgz",
        ]
        .map(String::from)
        .to_vec();
        assert!(vendored_in(&listed, "app/charts", "redis"));
        assert!(vendored_in(&listed, "app/charts", "db"));
        assert!(!vendored_in(&listed, "app/charts", "other"));
        assert!(!vendored_in(&listed, "app/charts", "deep"));
        assert!(!vendored_in(&listed, "app/charts", ""));
    }

    #[test]
    fn the_allow_list_matches_whole_hosts_and_path_segments_only() {
        let allow = AllowList::new(&[
            "https://charts.example.com/stable",
            "http://127.0.0.1:8080/",
        ])
        .unwrap();
        for ok in [
            "https://charts.example.com/stable",
            "https://charts.example.com/stable/",
            "https://CHARTS.example.com/stable/redis-1.0.0.tgz",
            "https://charts.example.com:443/stable/index.yaml",
            "http://127.0.0.1:8080/x/index.yaml",
        ] {
            assert!(allow.allows(ok), "{ok}");
        }
        for refused in [
            "https://charts.example.com/stable-evil",
            "https://charts.example.com/stable/../other/x.tgz",
            "https://charts.example.com.evil.example/stable",
            "https://charts.example.com@evil.example/stable",
            "https://user:pw@charts.example.com/stable/x",
            "http://charts.example.com/stable",
            "https://charts.example.com:8443/stable",
            "https://charts.example.com/stable/x?token=1",
            "http://127.0.0.1:8081/",
            "file:///etc/passwd",
            "oci://charts.example.com/stable",
            "not a url",
        ] {
            assert!(!allow.allows(refused), "{refused}");
        }
        assert!(AllowList::new(&["ftp://x"]).is_err());
        assert!(AllowList::new(&["https://u:p@x/"]).is_err());
        assert!(AllowList::new::<&str>(&[]).unwrap().is_empty());
        assert!(!AllowList::default().allows("https://charts.example.com/stable"));
    }

    const INDEX: &str = "apiVersion: v1\nentries:\n  redis:\n  - name: redis\n    version: 17.1.0\n    urls: [redis-17.1.0.tgz]\n    digest: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n  - name: redis\n    version: 17.3.1\n    urls: [https://cdn.example.com/redis-17.3.1.tgz]\n    digest: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n  - name: redis\n    version: 18.0.0-rc.1\n    urls: [redis-18.0.0-rc.1.tgz]\n    digest: cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc\n  - name: redis\n    version: v16.0\n    urls: [charts/redis-16.0.0.tgz]\n    digest: dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd\n  nodigest:\n  - version: 1.0.0\n    urls: [nodigest-1.0.0.tgz]\ngenerated: 2024-01-01T00:00:00Z\n";

    fn dep(name: &str, version: &str) -> Dependency {
        Dependency {
            name: name.into(),
            version: version.into(),
            repository: "https://charts.example.com/stable".into(),
        }
    }

    #[test]
    fn the_newest_matching_version_is_resolved_with_its_absolute_url_and_digest() {
        let index = parse_index(INDEX.as_bytes()).unwrap();
        let at = index_url("https://charts.example.com/stable/").unwrap();
        assert_eq!(at.as_str(), "https://charts.example.com/stable/index.yaml");
        let r = resolve(&dep("redis", "17.x"), &index, &at).unwrap();
        assert_eq!(
            r,
            Resolved {
                name: "redis".into(),
                version: "17.3.1".into(),
                url: "https://cdn.example.com/redis-17.3.1.tgz".into(),
                digest: "b".repeat(64),
            }
        );
        let exact = resolve(&dep("redis", "17.1.0"), &index, &at).unwrap();
        assert_eq!(
            exact.url,
            "https://charts.example.com/stable/redis-17.1.0.tgz"
        );
        assert_eq!(exact.digest, "a".repeat(64), "lowercased");
        assert_eq!(exact.file_name(), "redis-17.1.0.tgz");
        // Pre-releases only when asked for, as in Helm.
        assert_eq!(
            resolve(&dep("redis", "*"), &index, &at).unwrap().version,
            "17.3.1"
        );
        let old = resolve(&dep("redis", "~16"), &index, &at).unwrap();
        assert_eq!(
            (old.version.as_str(), old.url.as_str()),
            (
                "16.0.0",
                "https://charts.example.com/stable/charts/redis-16.0.0.tgz"
            )
        );
        let errors = [
            (
                dep("redis", "^19"),
                "no version of redis in the repository matches ^19 (it has 18.0.0-rc.1, 17.3.1, 17.1.0, 16.0.0)",
            ),
            (dep("mysql", "1.0.0"), "the repository has no chart mysql"),
            (dep("nodigest", ""), "no SHA-256 digest for nodigest 1.0.0"),
            (dep("../x", ""), "is not a chart name"),
        ];
        for (d, want) in errors {
            let e = resolve(&d, &index, &at).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(parse_index(b"entries: [").is_err());
        assert!(parse_index(b"\xff").is_err());
    }

    #[test]
    fn digests_are_lowercase_sha256_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(looks_gzipped(&[0x1f, 0x8b, 8]));
        assert!(!looks_gzipped(b"<html>"));
    }
}
