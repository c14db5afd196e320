//! What to render, as kas received it from the agent, and the command lines that render it.
//! Pure: no process is started here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tether_protocol::gitops::{self as wire, render::Renderer as WireRenderer};

use super::RenderError;

/// Where the files of a manifest project come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ManifestSource {
    /// Plain files selected by `paths` globs.
    Globs(Vec<String>),
    /// The output of a renderer run at the commit.
    Render(RenderSpec),
}

impl ManifestSource {
    /// Reads an `ObjectsRequest`'s `globs` and `render`, checking the render settings again
    /// (agentk validated them, but kas trusts no agent with paths it will open).
    pub fn from_request(
        globs: &[String],
        render: Option<&wire::Render>,
    ) -> Result<Self, RenderError> {
        match render.and_then(|r| r.renderer.as_ref()) {
            None => Ok(ManifestSource::Globs(globs.to_vec())),
            Some(WireRenderer::Kustomize(k)) => {
                check_path("kustomize.path", &k.path)?;
                Ok(ManifestSource::Render(RenderSpec::Kustomize {
                    path: k.path.clone(),
                }))
            }
            Some(WireRenderer::Helm(h)) => Ok(ManifestSource::Render(RenderSpec::Helm(Box::new(
                HelmSpec::from_wire(h)?,
            )))),
        }
    }
}

impl ManifestSource {
    /// What an entry of the agent's configuration asks for, as agentk puts it in its request
    /// (the Helm namespace defaulting to the entry's `default_namespace`, the chart seeing
    /// `cluster`): for previews, which must render exactly as the stream does.
    pub fn from_project(
        p: &tether_agent_config::ManifestProject,
        cluster: &tether_protocol::render::Cluster,
    ) -> Result<Self, RenderError> {
        let globs: Vec<String> = p.paths.iter().map(|g| g.glob.clone()).collect();
        match tether_protocol::render::render_request(p, cluster) {
            Some(render) => Self::from_request(&[], Some(&render)),
            None => Self::from_request(&globs, None),
        }
    }
}

/// One rendering's settings; with the commit, the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RenderSpec {
    /// `kustomize build <path>`.
    Kustomize {
        /// The kustomization's directory, relative to the repository root.
        path: String,
    },
    /// `helm template` (boxed: its settings are many times a path's size).
    Helm(Box<HelmSpec>),
}

/// `helm template` settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HelmSpec {
    /// The chart's directory, relative to the repository root; with `repository`, the
    /// chart's name there.
    pub chart: String,
    /// `helm.repository`: the chart repository the chart is fetched from; empty for a chart
    /// of the Git repository.
    pub repository: String,
    /// `helm.version`: the chart's version constraint in `repository`; empty for the newest.
    pub version: String,
    /// `.Release.Name`.
    pub release_name: String,
    /// `.Release.Namespace`.
    pub namespace: String,
    /// Values files in the repository, in order.
    pub values_files: Vec<String>,
    /// `values` as compact JSON with sorted keys, so equal values make equal cache keys; empty
    /// for none.
    pub values_json: String,
    /// `.Capabilities.KubeVersion`; empty for Helm's default.
    pub kube_version: String,
    /// `.Capabilities.APIVersions` besides Helm's defaults, sorted (agentk sends them so).
    pub api_versions: Vec<String>,
    /// `helm.random: apply`: objects rendering differently at every rendering are applied
    /// with a warning, not refused (see [`super::unstable`]).
    pub apply_random: bool,
    /// The project's `default_namespace`, where objects without a namespace land, for
    /// messages; empty when the agent did not say.
    pub default_namespace: String,
    /// `helm.create_namespace`: the selection adds the Namespace `namespace`
    /// ([`crate::select`]); the rendering itself does not change.
    pub create_namespace: bool,
}

impl HelmSpec {
    /// The settings as the agent sent them, checked exactly as agentk checks its configuration:
    /// they come from the agent's request, and a release name or namespace that is not a DNS
    /// label could be read by `helm` as one of its options (`--post-renderer=…`, `--set-file=…`).
    fn from_wire(h: &wire::Helm) -> Result<Self, RenderError> {
        if h.namespace.is_empty() {
            return Err(RenderError::InvalidSettings(
                "helm.namespace must be set".into(),
            ));
        }
        let values = if h.values_json.is_empty() {
            None
        } else {
            match serde_json::from_str::<serde_json::Value>(&h.values_json) {
                Ok(v @ serde_json::Value::Object(_)) => Some(v),
                _ => {
                    return Err(RenderError::InvalidSettings(
                        "helm.values must be a JSON object".into(),
                    ));
                }
            }
        };
        let settings = tether_agent_config::Helm {
            chart: h.chart.clone(),
            repository: (!h.repository.is_empty()).then(|| h.repository.clone()),
            version: (!h.version.is_empty()).then(|| h.version.clone()),
            release_name: h.release_name.clone(),
            namespace: Some(h.namespace.clone()),
            values_files: h.values_files.clone(),
            values,
            kube_version: (!h.kube_version.is_empty()).then(|| h.kube_version.clone()),
            api_versions: h.api_versions.clone(),
            // agentk's business: kas renders hooks either way.
            hooks: tether_agent_config::HelmHooks::default(),
            random: tether_agent_config::HelmRandom::default(),
            create_namespace: h.create_namespace,
        };
        settings
            .validate("helm")
            .map_err(|e| RenderError::InvalidSettings(e.to_string()))?;
        if !h.default_namespace.is_empty() {
            tether_agent_config::check_namespace("default_namespace", &h.default_namespace)
                .map_err(|e| RenderError::InvalidSettings(e.to_string()))?;
        }
        Ok(HelmSpec {
            // serde_json's maps are sorted by key: this is a canonical form, so equal values
            // make equal cache keys.
            values_json: settings.values.map(|v| v.to_string()).unwrap_or_default(),
            chart: settings.chart,
            repository: settings.repository.unwrap_or_default(),
            version: settings.version.unwrap_or_default(),
            release_name: settings.release_name,
            namespace: h.namespace.clone(),
            values_files: settings.values_files,
            kube_version: settings.kube_version.unwrap_or_default(),
            api_versions: settings.api_versions,
            apply_random: h.apply_random,
            default_namespace: h.default_namespace.clone(),
            create_namespace: h.create_namespace,
        })
    }
}

impl HelmSpec {
    /// Whether the chart comes from a chart repository (`helm.repository`), not the commit.
    pub fn from_repository(&self) -> bool {
        !self.repository.is_empty()
    }
}

fn check_path(key: &str, value: &str) -> Result<(), RenderError> {
    tether_agent_config::check_repository_path(key, value)
        .map_err(|e| RenderError::InvalidSettings(e.to_string()))
}

impl RenderSpec {
    /// The name of the one "file" the rendering is sent as (agentk's errors quote it).
    pub fn label(&self) -> String {
        match self {
            RenderSpec::Kustomize { path } => format!("kustomize build {path}"),
            RenderSpec::Helm(h) if h.from_repository() => {
                format!("helm template {} from {}", h.chart, h.repository)
            }
            RenderSpec::Helm(h) => format!("helm template {}", h.chart),
        }
    }

    /// The renderer's name, for errors.
    pub fn tool(&self) -> Tool {
        match self {
            RenderSpec::Kustomize { .. } => Tool::Kustomize,
            RenderSpec::Helm(_) => Tool::Helm,
        }
    }
}

/// A renderer program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `kustomize`.
    Kustomize,
    /// `helm`.
    Helm,
}

impl std::fmt::Display for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tool::Kustomize => "kustomize",
            Tool::Helm => "helm",
        })
    }
}

/// A program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// The file the inline `helm.values` are written to, in the scratch directory.
pub const VALUES_FILE: &str = "values.json";

/// The archive of a chart of `helm.repository`, as kas fetched it, in the scratch directory
/// (`helm template` reads a packaged chart as it reads a folder).
pub const CHART_ARCHIVE: &str = "chart.tgz";

/// Kustomize's load restrictor. `LoadRestrictionsRootOnly` (its default) refuses any file
/// outside the kustomization's own directory, so an overlay's `../../common/x.yaml` fails,
/// where Flux renders it: Flux uses `LoadRestrictionsNone` on a filesystem confined to the
/// repository. kas does the same when the renderer's files are fenced by Landlock (the
/// checkout is all of the repository it can read) — the reference checks already refuse
/// paths leaving the repository. Without the fence only the checks would stand between a
/// field they do not know of and kas's files, so the restrictor stays on.
pub fn load_restrictor(files_fenced: bool) -> &'static str {
    if files_fenced {
        "LoadRestrictionsNone"
    } else {
        "LoadRestrictionsRootOnly"
    }
}

/// The renderer's command line for `spec`, with the repository checked out at `repo` and the
/// scratch directory (home, caches, the inline values) at `scratch`.
///
/// Kustomize runs without plugins, and with the load restrictor [`load_restrictor`] chooses
/// for `files_fenced`; Helm only templates (it never fetches dependencies or talks to a
/// cluster in this mode), with the chart's `crds/` and without its test hooks.
pub fn command_line(
    spec: &RenderSpec,
    program: &Path,
    (repo, scratch): (&Path, &Path),
    files_fenced: bool,
) -> CommandLine {
    let mut args: Vec<OsString> = Vec::new();
    match spec {
        RenderSpec::Kustomize { path } => {
            args.push("build".into());
            args.push(repo.join(path).into());
            args.push(format!("--load-restrictor={}", load_restrictor(files_fenced)).into());
        }
        RenderSpec::Helm(h) => {
            // Every option as one `--name=value` word and `--` before the release name and
            // chart: whatever slipped past the checks is then a value or an argument, never
            // an option of helm's own.
            args.push("template".into());
            // The chart's `crds/` folder is left out by `helm template` unless asked for;
            // without it a chart's custom resources find no definition (agentk applies CRDs
            // in a stage of their own first, as `helm install` does).
            args.push("--include-crds".into());
            // Test hooks are run on demand by `helm test`, never installed: applied as
            // ordinary objects they would be created for good, and a failing test Pod would
            // fail every sync.
            args.push("--skip-tests".into());
            args.push(joined("--namespace=", &h.namespace));
            // The agent's cluster: without them a chart sees Helm's built-in defaults (an old
            // Kubernetes, no custom API), and its version gates and `.APIVersions.Has` checks
            // choose wrongly.
            if !h.kube_version.is_empty() {
                args.push(joined("--kube-version=", &h.kube_version));
            }
            for v in &h.api_versions {
                args.push(joined("--api-versions=", v));
            }
            for f in &h.values_files {
                args.push(joined("--values=", repo.join(f)));
            }
            if !h.values_json.is_empty() {
                args.push(joined("--values=", scratch.join(VALUES_FILE)));
            }
            args.push("--".into());
            args.push(OsString::from(&h.release_name));
            if h.from_repository() {
                args.push(scratch.join(CHART_ARCHIVE).into());
            } else {
                args.push(repo.join(&h.chart).into());
            }
        }
    }
    CommandLine {
        program: program.to_path_buf(),
        args,
    }
}

/// `option` and `value` as one word (`--values=/path`).
fn joined(option: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut word = OsString::from(option);
    word.push(value.as_ref());
    word
}

/// How the renderer is confined, as found on this machine at startup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sandbox {
    /// `unshare` and its arguments for a new network namespace, when it works here.
    pub unshare: Option<(PathBuf, Vec<String>)>,
    /// `prlimit`, when installed.
    pub prlimit: Option<PathBuf>,
    /// `setpriv`, when it can set a parent-death signal here.
    pub setpriv: Option<PathBuf>,
    /// The program that runs `<it> render-confine -- <renderer> <args>` (kas itself), when
    /// its seccomp filter works here: no Internet sockets for the renderer, namespace or not.
    pub confine: Option<PathBuf>,
    /// Whether `confine` also fences the renderer's files with Landlock here (the kernel has
    /// it).
    pub landlock: bool,
}

/// What a renderer may reach besides the system's files under `render-confine`'s Landlock
/// fence (see [`super::filesystem`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reach {
    /// Read: the checkout, and what the operator adds.
    pub read: Vec<PathBuf>,
    /// Read and written: the scratch folder.
    pub write: Vec<PathBuf>,
}

impl Sandbox {
    /// Whether renderers run fenced by Landlock: `confine` is used and the kernel has it.
    pub fn fences_files(&self) -> bool {
        self.confine.is_some() && self.landlock
    }

    /// Whether renderers are cut off the network: by a network namespace, a seccomp filter
    /// or both.
    pub fn isolates_network(&self) -> bool {
        self.unshare.is_some() || self.confine.is_some()
    }
}

/// `line` run inside the sandbox: `setpriv --pdeathsig KILL -- unshare … -- prlimit --as=N
/// -- kas render-confine -- program args…`.
///
/// `setpriv` makes the kernel kill the renderer when kas dies: a kas killed with SIGKILL (OOM,
/// `kill -9`) cannot stop it, and a renderer that never ends would run on forever. The
/// wrappers exec one into the other, so the signal reaches the renderer itself.
pub fn sandboxed(
    line: CommandLine,
    sandbox: &Sandbox,
    memory_limit: u64,
    reach: &Reach,
) -> CommandLine {
    let mut out = line;
    if let Some(confine) = &sandbox.confine {
        let paths = |flag: &'static str, paths: &[PathBuf]| {
            paths
                .iter()
                .flat_map(move |p| [OsString::from(flag), p.into()])
                .collect::<Vec<_>>()
        };
        let mut flags = vec![OsString::from(super::confine::SUBCOMMAND)];
        flags.extend(paths("--read", &reach.read));
        flags.extend(paths("--write", &reach.write));
        flags.push("--".into());
        out = wrapped(confine, flags, out);
    }
    if let Some(prlimit) = &sandbox.prlimit {
        let limit = format!("--as={memory_limit}").into();
        out = wrapped(prlimit, [limit, "--".into()], out);
    }
    if let Some((unshare, flags)) = &sandbox.unshare {
        let flags = flags.iter().map(OsString::from);
        out = wrapped(unshare, flags.chain(["--".into()]), out);
    }
    if let Some(setpriv) = &sandbox.setpriv {
        let flags = ["--pdeathsig".into(), "KILL".into(), "--".into()];
        out = wrapped(setpriv, flags, out);
    }
    out
}

/// `wrapper flags… program args…`.
fn wrapped(
    wrapper: &Path,
    flags: impl IntoIterator<Item = OsString>,
    line: CommandLine,
) -> CommandLine {
    let mut args: Vec<OsString> = flags.into_iter().collect();
    args.push(line.program.into());
    args.extend(line.args);
    CommandLine {
        program: wrapper.to_path_buf(),
        args,
    }
}

/// The renderer's whole environment: nothing of kas's (no credentials, no proxy, no `PATH`,
/// so no `git` for remote bases), every home and cache in the scratch directory.
pub fn environment(scratch: &Path) -> Vec<(&'static str, PathBuf)> {
    let home = scratch.join("home");
    vec![
        ("HOME", home.clone()),
        ("TMPDIR", scratch.join("tmp")),
        ("XDG_CACHE_HOME", home.join(".cache")),
        ("XDG_CONFIG_HOME", home.join(".config")),
        ("XDG_DATA_HOME", home.join(".local/share")),
        ("HELM_CACHE_HOME", home.join(".cache/helm")),
        ("HELM_CONFIG_HOME", home.join(".config/helm")),
        ("HELM_DATA_HOME", home.join(".local/share/helm")),
        ("KUSTOMIZE_PLUGIN_HOME", home.join("kustomize-plugins")),
        ("PATH", PathBuf::new()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(line: &CommandLine) -> Vec<String> {
        std::iter::once(line.program.display().to_string())
            .chain(line.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    fn helm_spec(values_json: &str) -> RenderSpec {
        RenderSpec::Helm(Box::new(HelmSpec {
            chart: "charts/app".into(),
            repository: String::new(),
            version: String::new(),
            release_name: "web".into(),
            namespace: "prod".into(),
            values_files: vec!["charts/app/a.yaml".into(), "env/b.yaml".into()],
            values_json: values_json.into(),
            kube_version: String::new(),
            api_versions: vec![],
            apply_random: false,
            default_namespace: String::new(),
            create_namespace: false,
        }))
    }

    #[test]
    fn kustomize_builds_the_directory_in_the_checkout() {
        let spec = RenderSpec::Kustomize {
            path: "overlays/prod".into(),
        };
        let dirs = (Path::new("/w/repo"), Path::new("/w/s"));
        let line = command_line(&spec, Path::new("/bin/kustomize"), dirs, false);
        assert_eq!(
            strings(&line),
            [
                "/bin/kustomize",
                "build",
                "/w/repo/overlays/prod",
                "--load-restrictor=LoadRestrictionsRootOnly"
            ]
        );
        // Fenced by Landlock: files anywhere in the repository, as Flux reads them.
        let fenced = command_line(&spec, Path::new("/bin/kustomize"), dirs, true);
        assert_eq!(
            strings(&fenced)[3],
            "--load-restrictor=LoadRestrictionsNone"
        );
    }

    #[test]
    fn helm_templates_with_values_files_in_order_then_inline_values() {
        let line = command_line(
            &helm_spec("{\"a\":1}"),
            Path::new("helm"),
            (Path::new("/w/repo"), Path::new("/w/s")),
            true,
        );
        assert_eq!(
            strings(&line),
            [
                "helm",
                "template",
                "--include-crds",
                "--skip-tests",
                "--namespace=prod",
                "--values=/w/repo/charts/app/a.yaml",
                "--values=/w/repo/env/b.yaml",
                "--values=/w/s/values.json",
                "--",
                "web",
                "/w/repo/charts/app",
            ]
        );
        let without = command_line(
            &helm_spec(""),
            Path::new("helm"),
            (Path::new("/r"), Path::new("/s")),
            true,
        );
        assert!(!strings(&without).contains(&"/s/values.json".to_owned()));
    }

    /// A chart of `helm.repository` is the archive kas fetched into the scratch folder;
    /// values files are still the commit's.
    #[test]
    fn a_repository_chart_is_templated_from_its_archive_with_the_commits_values() {
        let request = wire::Render {
            renderer: Some(WireRenderer::Helm(wire::Helm {
                chart: "podinfo".into(),
                repository: "https://charts.example.com/stable".into(),
                version: ">=6 <7".into(),
                release_name: "web".into(),
                namespace: "prod".into(),
                values_files: vec!["podinfo/values.yaml".into()],
                ..Default::default()
            })),
        };
        let Ok(ManifestSource::Render(spec)) = ManifestSource::from_request(&[], Some(&request))
        else {
            panic!("a rendering expected");
        };
        assert_eq!(
            spec.label(),
            "helm template podinfo from https://charts.example.com/stable"
        );
        let line = command_line(
            &spec,
            Path::new("helm"),
            (Path::new("/w/repo"), Path::new("/w/s")),
            true,
        );
        let words = strings(&line);
        assert!(words.contains(&"--values=/w/repo/podinfo/values.yaml".to_owned()));
        assert_eq!(words[words.len() - 2..], ["web", "/w/s/chart.tgz"]);
        // A path as a chart name, or a repository with credentials, is refused as agentk
        // refuses it.
        for (chart, repository, key) in [
            (
                "charts/podinfo",
                "https://charts.example.com/",
                "helm.chart",
            ),
            (
                "podinfo",
                "https://u:p@charts.example.com/",
                "helm.repository",
            ),
            ("podinfo", "file:///etc", "helm.repository"),
        ] {
            let bad = wire::Render {
                renderer: Some(WireRenderer::Helm(wire::Helm {
                    chart: chart.into(),
                    repository: repository.into(),
                    release_name: "web".into(),
                    namespace: "prod".into(),
                    ..Default::default()
                })),
            };
            let e = ManifestSource::from_request(&[], Some(&bad))
                .expect_err("refused")
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    /// The agent's cluster reaches the chart; a request without it (an older agent) renders
    /// with Helm's defaults, and a different cluster is a different cache key.
    #[test]
    fn helm_is_told_the_agents_cluster_which_is_part_of_the_cache_key() {
        let request = |kube_version: &str, api_versions: &[&str]| wire::Render {
            renderer: Some(WireRenderer::Helm(wire::Helm {
                chart: "c".into(),
                release_name: "r".into(),
                namespace: "n".into(),
                kube_version: kube_version.into(),
                api_versions: api_versions.iter().map(|&v| v.into()).collect(),
                ..Default::default()
            })),
        };
        let source = |r: &wire::Render| ManifestSource::from_request(&[], Some(r)).expect("ok");
        let line = |r: &wire::Render| match source(r) {
            ManifestSource::Render(spec) => strings(&command_line(
                &spec,
                Path::new("helm"),
                (Path::new("/r"), Path::new("/s")),
                true,
            )),
            ManifestSource::Globs(_) => panic!("a rendering expected"),
        };
        let told = request("v1.31.2", &["apps/v1", "x.io/v1/Thing"]);
        let args = line(&told);
        for arg in [
            "--kube-version=v1.31.2",
            "--api-versions=apps/v1",
            "--api-versions=x.io/v1/Thing",
        ] {
            assert!(args.contains(&arg.to_owned()), "{arg}: {args:?}");
        }
        let older = line(&request("", &[]));
        assert!(
            !older
                .iter()
                .any(|a| a.starts_with("--kube-version") || a.starts_with("--api-versions")),
            "{older:?}"
        );
        assert_ne!(
            source(&told),
            source(&request("v1.32.0", &["apps/v1", "x.io/v1/Thing"]))
        );
        assert_ne!(source(&told), source(&request("v1.31.2", &["apps/v1"])));
        for bad in [request("1.x", &[]), request("", &["--set=a"])] {
            let e = ManifestSource::from_request(&[], Some(&bad)).expect_err("refused");
            assert!(matches!(e, RenderError::InvalidSettings(_)), "{e}");
        }
    }

    /// The settings come from the agent's request: a release name or namespace that helm would
    /// read as its own option (a post-renderer program, a file of kas's to read into the
    /// values) is refused before any renderer runs, as agentk refuses it in its configuration.
    #[test]
    fn helm_settings_that_are_not_dns_labels_are_refused() {
        let request = |release: &str, namespace: &str| wire::Render {
            renderer: Some(WireRenderer::Helm(wire::Helm {
                chart: "c".into(),
                release_name: release.into(),
                namespace: namespace.into(),
                values_files: vec![],
                values_json: String::new(),
                ..Default::default()
            })),
        };
        for (release, namespace, key) in [
            ("--post-renderer=/bin/sh", "n", "helm.release_name"),
            (
                "--set-file=x=/etc/kas/peers/secret",
                "n",
                "helm.release_name",
            ),
            ("-x", "n", "helm.release_name"),
            ("App", "n", "helm.release_name"),
            (&"a".repeat(54), "n", "helm.release_name"),
            ("r", "--post-renderer=/bin/sh", "helm.namespace"),
            ("r", "Prod", "helm.namespace"),
        ] {
            let refused = ManifestSource::from_request(&[], Some(&request(release, namespace)))
                .expect_err(release);
            assert!(
                matches!(&refused, RenderError::InvalidSettings(m) if m.contains(key)),
                "{release:?} {namespace:?}: {refused}"
            );
        }
        ManifestSource::from_request(&[], Some(&request("web-1", "prod"))).expect("accepted");
    }

    #[test]
    fn the_sandbox_wraps_setpriv_around_unshare_around_prlimit_around_confine_around_the_renderer()
    {
        let line = CommandLine {
            program: "/bin/kustomize".into(),
            args: vec!["build".into()],
        };
        let sandbox = Sandbox {
            unshare: Some(("/usr/bin/unshare".into(), vec!["--net".into()])),
            prlimit: Some("/usr/bin/prlimit".into()),
            setpriv: Some("/usr/bin/setpriv".into()),
            confine: Some("/bin/kas".into()),
            landlock: true,
        };
        let reach = Reach {
            read: vec!["/w/c/repo".into()],
            write: vec!["/w/c/scratch".into()],
        };
        assert_eq!(
            strings(&sandboxed(line.clone(), &sandbox, 1024, &reach)),
            [
                "/usr/bin/setpriv",
                "--pdeathsig",
                "KILL",
                "--",
                "/usr/bin/unshare",
                "--net",
                "--",
                "/usr/bin/prlimit",
                "--as=1024",
                "--",
                "/bin/kas",
                "render-confine",
                "--read",
                "/w/c/repo",
                "--write",
                "/w/c/scratch",
                "--",
                "/bin/kustomize",
                "build"
            ]
        );
        assert_eq!(
            sandboxed(line.clone(), &Sandbox::default(), 1024, &reach),
            line
        );
    }

    #[test]
    fn the_environment_has_no_path_and_homes_in_the_scratch_directory() {
        let env = environment(Path::new("/w/s"));
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("PATH"), Some(PathBuf::new()));
        assert!(
            env.iter()
                .all(|(n, v)| *n == "PATH" || v.starts_with("/w/s"))
        );
        assert_eq!(get("HELM_CACHE_HOME"), Some("/w/s/home/.cache/helm".into()));
    }

    #[test]
    fn equal_settings_make_equal_cache_keys_and_values_are_canonical() {
        let wire_helm = |values: &str| wire::Render {
            renderer: Some(WireRenderer::Helm(wire::Helm {
                chart: "c".into(),
                release_name: "r".into(),
                namespace: "n".into(),
                values_files: vec![],
                values_json: values.into(),
                ..Default::default()
            })),
        };
        let a = ManifestSource::from_request(&[], Some(&wire_helm("{\"b\":1,\"a\":2}")))
            .expect("accepted");
        let b = ManifestSource::from_request(&[], Some(&wire_helm("{ \"a\": 2, \"b\": 1 }")))
            .expect("accepted");
        let c = ManifestSource::from_request(&[], Some(&wire_helm("{\"a\":3,\"b\":1}")))
            .expect("accepted");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let array =
            ManifestSource::from_request(&[], Some(&wire_helm("[1]"))).expect_err("refused");
        assert!(
            array
                .to_string()
                .contains("helm.values must be a JSON object"),
            "{array}"
        );
        let kustomize = |path: &str| wire::Render {
            renderer: Some(WireRenderer::Kustomize(wire::Kustomize {
                path: path.into(),
            })),
        };
        let escaping =
            ManifestSource::from_request(&[], Some(&kustomize("../x"))).expect_err("refused");
        assert!(escaping.to_string().contains("no '..'"), "{escaping}");
        assert_eq!(
            ManifestSource::from_request(&["*.yaml".into()], None).expect("accepted"),
            ManifestSource::Globs(vec!["*.yaml".into()])
        );
    }
}
