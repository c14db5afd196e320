//! `kustomize:` and `helm:` in a manifest project entry: what kas renders at the commit instead
//! of selecting plain files by `paths`.

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::chart_repository;
use crate::check::{check_namespace, is_rfc1123_label};

/// Helm's own limit on release names (they end up in label values with suffixes).
pub const MAX_RELEASE_NAME: usize = 53;

/// Most `values_files` per chart; each is read from the checkout.
pub const MAX_VALUES_FILES: usize = 32;

/// Most API versions a rendering is told of (`helm.api_versions` and the cluster's): each is
/// an argument of `helm`. Clusters serve a few hundred kinds; thousands are a mistake.
pub const MAX_API_VERSIONS: usize = 8192;

/// Whether `v` is a Kubernetes version Helm reads (`v1.31.2`, `1.31`, `v1.30.0-gke.1`).
pub fn is_kube_version(v: &str) -> bool {
    let v = v.strip_prefix('v').unwrap_or(v);
    let (core, suffix) = v.split_once(['-', '+']).unwrap_or((v, ""));
    let parts: Vec<&str> = core.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && v.len() <= 64
        && suffix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-+.".contains(&b))
}

/// Whether `v` is a `version`, `group/version` or `group/version/Kind` (what Helm's
/// `--api-versions` takes).
pub fn is_api_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('/').collect();
    (1..=3).contains(&parts.len())
        && v.len() <= 320
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        })
}

/// `kustomize:` — build a Kustomize directory of the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kustomize {
    /// Directory holding `kustomization.yaml`, relative to the repository root (`.` for the
    /// root itself).
    pub path: String,
}

/// `helm:` — template a chart stored in the repository, or one of a chart repository
/// (`repository`, as Flux's HelmRelease of a HelmRepository).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Helm {
    /// The chart's directory (holding `Chart.yaml`), relative to the repository root; with
    /// `repository`, the chart's name there.
    pub chart: String,
    /// The chart repository (`https://charts.example.com/stable`, holding `index.yaml`, or an
    /// OCI registry location, `oci://registry.example.com/charts`, holding the chart as
    /// `<location>/<chart>`) the chart is fetched from, by kas, instead of the Git repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// With `repository`: the chart's version constraint (`>=6.0.0 <7`, `6.1.x`, `6.1.0`);
    /// the newest stable version when left out, as Helm picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The release name the templates see as `.Release.Name`.
    pub release_name: String,
    /// `.Release.Namespace`; the project's `default_namespace` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Values files in the repository, relative to its root, applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values_files: Vec<String>,
    /// Values applied last (over the files), as a mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<serde_json::Value>,
    /// `.Capabilities.KubeVersion` instead of the cluster's version (`v1.31.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_version: Option<String>,
    /// API versions (`group/version`, `group/version/Kind`) `.Capabilities.APIVersions` has
    /// besides those the cluster serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_versions: Vec<String>,
    /// What agentk does with the chart's hooks (objects annotated `helm.sh/hook`).
    #[serde(default, skip_serializing_if = "HelmHooks::is_default")]
    pub hooks: HelmHooks,
    /// What kas does with objects the chart renders differently at every rendering.
    #[serde(default, skip_serializing_if = "HelmRandom::is_default")]
    pub random: HelmRandom,
    /// Create the release's namespace (`namespace`) with the chart's objects, as `helm install
    /// --create-namespace` and Flux's `install.createNamespace` do. It is applied first and
    /// never pruned (annotated `helm.sh/resource-policy: keep`): removing the entry or the
    /// key leaves it and whatever else lives in it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_namespace: bool,
}

/// `helm.hooks`: what agentk does with objects annotated `helm.sh/hook` (test hooks aside,
/// which kas leaves out of the rendering).
///
/// Helm runs a hook at one moment of a release (a Job before an upgrade, after an install…)
/// and deletes it by its `helm.sh/hook-delete-policy`; agentk has no release and applies
/// every object at every sync, as a permanent one. A hook Job is then never run again on a
/// chart bump (and its changed template fails with "field is immutable" for good), so
/// applying hooks silently is refused by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelmHooks {
    /// A rendering holding a hook fails, naming the object and its `helm.sh/hook`; nothing is
    /// applied.
    #[default]
    Refuse,
    /// Hooks are applied as ordinary objects, with the others and like them.
    Apply,
}

impl HelmHooks {
    fn is_default(&self) -> bool {
        *self == HelmHooks::default()
    }
}

/// `helm.random`: what kas does with objects a chart renders differently at every rendering
/// (values generated by `randAlphaNum`, `genCA`, `uuidv4`…).
///
/// `helm install` keeps such a value by `lookup`ing the live object; kas renders with
/// `helm template`, where `lookup` finds nothing, so the value is generated anew at every
/// rendering (each new commit, each kas restart) and applying it rotates a live password or
/// certificate under the Pods using it. kas renders such a chart twice to find them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelmRandom {
    /// A rendering holding such objects fails, naming them, the chart files and functions;
    /// nothing is applied.
    #[default]
    Refuse,
    /// They are applied, with a warning in the sync report.
    Apply,
}

impl HelmRandom {
    fn is_default(&self) -> bool {
        *self == HelmRandom::default()
    }
}

/// Checks a path inside the repository: relative, `/`-separated, without `..`, so that the
/// renderer is pointed only at the repository's own files.
pub fn check_repository_path(key: &str, value: &str) -> Result<(), ConfigError> {
    let why = if value.trim().is_empty() {
        Some("must not be empty")
    } else if value.starts_with('/') {
        Some("must be relative to the repository root (no leading '/')")
    } else if value.contains('\\') {
        Some("must use '/' as separator")
    } else if value.split('/').any(|c| c == "..") {
        Some("must stay inside the repository (no '..')")
    } else if value.split('/').any(str::is_empty) {
        Some("must not contain empty segments ('//' or a trailing '/')")
    } else {
        None
    };
    match why {
        Some(why) => Err(ConfigError::invalid(key, format!("{value:?} {why}"))),
        None => Ok(()),
    }
}

impl Kustomize {
    pub(crate) fn validate(&self, base: &str) -> Result<(), ConfigError> {
        check_repository_path(&format!("{base}.path"), &self.path)
    }
}

impl Helm {
    /// Checks the settings; kas checks an agent's render request with this too.
    pub fn validate(&self, base: &str) -> Result<(), ConfigError> {
        self.validate_source(base)?;
        let name = &self.release_name;
        if !is_rfc1123_label(name) || name.len() > MAX_RELEASE_NAME {
            return Err(ConfigError::invalid(
                format!("{base}.release_name"),
                format!(
                    "{name:?} is not a valid release name (at most {MAX_RELEASE_NAME} lowercase \
                     letters, digits or '-', starting and ending with a letter or digit)"
                ),
            ));
        }
        if let Some(ns) = &self.namespace {
            check_namespace(&format!("{base}.namespace"), ns)?;
        }
        if self.values_files.len() > MAX_VALUES_FILES {
            return Err(ConfigError::invalid(
                format!("{base}.values_files"),
                format!(
                    "{} files, at most {MAX_VALUES_FILES} are allowed",
                    self.values_files.len()
                ),
            ));
        }
        for (i, file) in self.values_files.iter().enumerate() {
            check_repository_path(&format!("{base}.values_files[{i}]"), file)?;
        }
        self.validate_capabilities(base)?;
        match &self.values {
            None | Some(serde_json::Value::Object(_)) => Ok(()),
            Some(_) => Err(ConfigError::invalid(
                format!("{base}.values"),
                "must be a mapping (key: value)",
            )),
        }
    }
}

impl Helm {
    /// `chart`, and `repository` with `version`: a path of the Git repository, or a chart
    /// name in a chart repository.
    fn validate_source(&self, base: &str) -> Result<(), ConfigError> {
        let Some(repository) = &self.repository else {
            if self.version.is_some() {
                return Err(ConfigError::invalid(
                    format!("{base}.version"),
                    "is only for a chart of helm.repository (a chart in the Git repository has \
                     its version in its Chart.yaml)",
                ));
            }
            return check_repository_path(&format!("{base}.chart"), &self.chart);
        };
        if chart_repository::repository_url(repository).is_none() {
            return Err(ConfigError::invalid(
                format!("{base}.repository"),
                format!(
                    "{repository:?} is not an http://, https:// or oci:// URL without user, \
                     query or fragment"
                ),
            ));
        }
        if !chart_repository::is_chart_name(&self.chart) {
            return Err(ConfigError::invalid(
                format!("{base}.chart"),
                format!(
                    "{:?} is not a chart name: with helm.repository, chart names a chart of \
                     the chart repository (such as podinfo), not a path",
                    self.chart
                ),
            ));
        }
        match &self.version {
            Some(v) => chart_repository::Constraint::parse(v)
                .map(|_| ())
                .map_err(|e| ConfigError::invalid(format!("{base}.version"), e)),
            None => Ok(()),
        }
    }

    fn validate_capabilities(&self, base: &str) -> Result<(), ConfigError> {
        if let Some(v) = &self.kube_version
            && !is_kube_version(v)
        {
            return Err(ConfigError::invalid(
                format!("{base}.kube_version"),
                format!("{v:?} is not a Kubernetes version (such as v1.31.0)"),
            ));
        }
        if self.api_versions.len() > MAX_API_VERSIONS {
            return Err(ConfigError::invalid(
                format!("{base}.api_versions"),
                format!("at most {MAX_API_VERSIONS} are allowed"),
            ));
        }
        match self.api_versions.iter().position(|v| !is_api_version(v)) {
            None => Ok(()),
            Some(i) => Err(ConfigError::invalid(
                format!("{base}.api_versions[{i}]"),
                format!(
                    "{:?} is not an API version (group/version or group/version/Kind)",
                    self.api_versions[i]
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helm() -> Helm {
        Helm {
            chart: "charts/app".into(),
            repository: None,
            version: None,
            release_name: "app".into(),
            namespace: None,
            values_files: vec!["charts/app/values-prod.yaml".into()],
            values: None,
            kube_version: None,
            api_versions: vec![],
            hooks: HelmHooks::Refuse,
            random: HelmRandom::Refuse,
            create_namespace: false,
        }
    }

    fn message(e: ConfigError) -> String {
        e.to_string()
    }

    #[test]
    fn repository_paths_stay_inside_the_repository() {
        for ok in [".", "overlays/prod", "a.b/c-d_e"] {
            assert!(check_repository_path("k", ok).is_ok(), "{ok}");
        }
        let bad = [
            ("", "must not be empty"),
            ("/etc", "no leading '/'"),
            ("a/../..", "no '..'"),
            ("..", "no '..'"),
            ("a//b", "empty segments"),
            ("a/", "empty segments"),
            ("a\\b", "'/' as separator"),
        ];
        for (path, why) in bad {
            let e = message(check_repository_path("x.path", path).expect_err("refused"));
            assert!(e.starts_with("x.path: "), "{e}");
            assert!(e.contains(why), "{path}: {e}");
        }
    }

    #[test]
    fn helm_errors_name_the_key() {
        let base = "gitops.manifest_projects[0].helm";
        let cases: Vec<(Helm, &str)> = vec![
            (
                Helm {
                    release_name: "App".into(),
                    ..helm()
                },
                "release_name",
            ),
            (
                Helm {
                    release_name: "a".repeat(54),
                    ..helm()
                },
                "release_name",
            ),
            (
                Helm {
                    namespace: Some("Bad_ns".into()),
                    ..helm()
                },
                "namespace",
            ),
            (
                Helm {
                    values_files: vec!["ok.yaml".into(), "../x.yaml".into()],
                    ..helm()
                },
                "values_files[1]",
            ),
            (
                Helm {
                    values: Some(serde_json::json!([1, 2])),
                    ..helm()
                },
                "values",
            ),
            (
                Helm {
                    chart: "/abs".into(),
                    ..helm()
                },
                "chart",
            ),
            (
                Helm {
                    kube_version: Some("1.x".into()),
                    ..helm()
                },
                "kube_version",
            ),
            (
                Helm {
                    api_versions: vec!["apps/v1".into(), "--set=x".into()],
                    ..helm()
                },
                "api_versions[1]",
            ),
        ];
        for (h, key) in cases {
            let e = message(h.validate(base).expect_err("refused"));
            assert!(e.starts_with(&format!("{base}.{key}: ")), "{e}");
        }
        assert!(helm().validate(base).is_ok());
        let capabilities = Helm {
            kube_version: Some("v1.30.0-gke.1".into()),
            api_versions: vec![
                "v1".into(),
                "apps/v1".into(),
                "monitoring.coreos.com/v1/ServiceMonitor".into(),
            ],
            ..helm()
        };
        assert!(capabilities.validate(base).is_ok());
    }

    #[test]
    fn a_repository_chart_is_a_name_at_a_plain_or_oci_url_with_a_constraint() {
        let base = "gitops.manifest_projects[0].helm";
        let podinfo = Helm {
            chart: "podinfo".into(),
            repository: Some("https://charts.example.com/stable".into()),
            version: Some(">=6.0.0 <7".into()),
            ..helm()
        };
        assert!(podinfo.validate(base).is_ok());
        let latest = Helm {
            version: None,
            ..podinfo.clone()
        };
        assert!(latest.validate(base).is_ok());
        let oci = Helm {
            repository: Some("oci://registry.example.com/charts".into()),
            ..podinfo.clone()
        };
        assert!(oci.validate(base).is_ok());
        let cases = [
            (
                Helm {
                    chart: "charts/podinfo".into(),
                    ..podinfo.clone()
                },
                "chart",
                "not a chart name",
            ),
            (
                Helm {
                    repository: Some("https://u:p@charts.example.com/".into()),
                    ..podinfo.clone()
                },
                "repository",
                "without user, query or fragment",
            ),
            (
                Helm {
                    repository: Some("ftp://charts.example.com/charts".into()),
                    ..podinfo.clone()
                },
                "repository",
                "not an http://, https:// or oci:// URL",
            ),
            (
                Helm {
                    repository: Some("oci://u:p@registry.example.com/charts".into()),
                    ..podinfo.clone()
                },
                "repository",
                "without user, query or fragment",
            ),
            (
                Helm {
                    repository: Some("https://charts.example.com/?token=1".into()),
                    ..podinfo.clone()
                },
                "repository",
                "without user, query or fragment",
            ),
            (
                Helm {
                    version: Some(">=banana".into()),
                    ..podinfo.clone()
                },
                "version",
                "not a version constraint",
            ),
            (
                Helm {
                    version: Some("1.0.0".into()),
                    ..helm()
                },
                "version",
                "only for a chart of helm.repository",
            ),
        ];
        for (h, key, why) in cases {
            let e = message(h.validate(base).expect_err("refused"));
            assert!(e.starts_with(&format!("{base}.{key}: ")), "{e}");
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn kube_versions_are_what_helm_reads() {
        for ok in ["v1.31.2", "1.31", "v1.30.0-gke.1", "v1.29.3+k3s1"] {
            assert!(is_kube_version(ok), "{ok}");
        }
        for bad in ["", "v1", "1.x.0", "v1.2.3.4", "v1.31.0 --x", "1..2"] {
            assert!(!is_kube_version(bad), "{bad}");
        }
    }
}
