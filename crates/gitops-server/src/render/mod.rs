//! Kustomize and Helm rendering at a commit, in a sandbox: a temporary read-only checkout of
//! the commit, an empty environment, no file of kas's (Landlock, where the kernel has it),
//! no network (a seccomp filter refusing Internet sockets,
//! and a new network namespace where `unshare` works; rendering is refused when neither does),
//! an address-space limit (`prlimit`), a time limit and an output limit. Renderings are cached
//! by (repository, commit, settings).
//!
//! - [`spec`]: settings, command lines, environment (pure).
//! - [`checks`]: symlinks, kustomization references, chart dependencies, error text (pure).
//! - [`dependencies`]: chart dependencies from allowed chart repositories: the allow list,
//!   `index.yaml`, version constraints (pure); [`fetch`]: fetching them, outside the sandbox,
//!   before the checkout (I/O); [`oci`]: charts of OCI registries (`oci://`): tags, challenges,
//!   manifests (pure); [`resolutions`]: what each resolved to, kept on disk for a restart while
//!   a repository is down (pure).
//! - [`remote_bases`]: remote Kustomize bases, their forms and the allow list (pure);
//!   [`remote_fetch`]: fetching their Git repositories (I/O); [`remote_plan`]: which a
//!   rendering needs, and the kustomizations' copies naming them as local folders.
//! - [`checkout`], [`run`]: the files and the process (I/O).
//! - [`confine`]: the seccomp filter, installed by `kas render-confine` before the renderer,
//!   and [`filesystem`]: the Landlock fence it puts up first (files the renderer may reach).
//! - [`memory`]: the renderers fitted into kas's own memory limit (pure, and reading the cgroup).
//! - [`unstable`]: charts rendering differently at every rendering, found by rendering twice
//!   (pure).
//! - [`namespace`]: the release's Namespace `helm.create_namespace` adds (pure).

mod cache;
pub mod checkout;
pub mod checks;
pub mod confine;
pub mod credentials;
pub mod dependencies;
pub mod fetch;
pub mod filesystem;
pub mod memory;
pub mod namespace;
pub mod oci;
pub mod remote_bases;
pub mod remote_fetch;
pub mod remote_plan;
pub mod resolutions;
mod run;
pub mod spec;
mod turns;
pub mod unstable;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tether_git_source::{CommitId, Mirror};

pub use cache::RenderCache;
pub use checkout::{Checkout, CheckoutLimits};
pub use credentials::ChartCredential;
use fetch::Unresolved;
pub use fetch::{ChartFetcher, ChartRepoConfig, Resolution};
pub use remote_fetch::RemoteBaseConfig;
pub use spec::{HelmSpec, ManifestSource, Reach, RenderSpec, Sandbox, Tool};

use run::{Ran, RunLimits};

/// Why a rendering failed. Every message names the repository file (and line, when the
/// renderer reports one) the user has to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    /// The agent sent settings kas cannot use.
    #[error("invalid render settings: {0}")]
    InvalidSettings(String),
    /// The renderer program is not installed where kas looks.
    #[error(
        "{tool} is not available to kas ({detail}): the kas operator installs it or sets gitops.render.{tool}_path"
    )]
    ToolMissing {
        /// Which renderer.
        tool: Tool,
        /// Where kas looked.
        detail: String,
    },
    /// A symbolic link in the repository points outside it.
    #[error("symbolic link {path} points to {target:?}, outside the repository: refused")]
    SymlinkEscapes {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A kustomization refers to something to download.
    #[error(
        "{file} refers to the remote {reference}: kas renders without network access; vendor it into the repository"
    )]
    RemoteReference {
        /// The kustomization file.
        file: String,
        /// The reference.
        reference: String,
    },
    /// A kustomization names a remote base whose repository kas's
    /// `gitops.render.remote_bases` does not allow (none, by default).
    #[error(
        "{file} refers to the remote {reference}: kas renders without network access and fetches remote bases only from the Git repositories kas's gitops.render.remote_bases allows, which does not allow {repository}: refused, nothing was applied; vendor the base into the repository, or the kas operator adds the repository's URL (or a prefix of it) there"
    )]
    RemoteBaseNotAllowed {
        /// The kustomization file.
        file: String,
        /// The reference, as written.
        reference: String,
        /// The repository it names, as kas would fetch it.
        repository: String,
    },
    /// A kustomization names a remote resource kas does not fetch (a plain file URL, a path
    /// leaving the repository, bases nested too deep).
    #[error(
        "{file} refers to the remote {reference}, which kas does not fetch: {detail}; refused, nothing was applied; vendor it into the repository"
    )]
    RemoteBaseRefused {
        /// The kustomization file.
        file: String,
        /// The reference, as written.
        reference: String,
        /// Why.
        detail: String,
    },
    /// An allowed remote base could not be fetched (its repository unreachable, its ref not
    /// there); tried again at the manifest project's next fetch.
    #[error(
        "{file} refers to the remote base {reference}: {detail}; nothing was applied, the last commit applied stays applied"
    )]
    RemoteBaseFailed {
        /// The kustomization file.
        file: String,
        /// The reference, as written.
        reference: String,
        /// Why.
        detail: String,
    },
    /// A kustomization refers to a path outside the repository.
    #[error("{file} refers to {reference}, outside the repository: refused")]
    LeavesRepository {
        /// The kustomization file.
        file: String,
        /// The reference.
        reference: String,
    },
    /// A kustomization has two keys that differ only in case, which Kustomize reads as one.
    #[error(
        "{file} has the key {key} twice, in different cases (Kustomize reads keys case-insensitively): refused"
    )]
    AmbiguousKey {
        /// The kustomization file.
        file: String,
        /// The second spelling.
        key: String,
    },
    /// A kustomization inflates Helm charts (which Kustomize downloads).
    #[error(
        "{file} uses helmCharts, which Kustomize inflates by downloading charts: use the manifest project's helm key with a chart in the repository instead"
    )]
    HelmChartsInKustomization {
        /// The kustomization file.
        file: String,
    },
    /// A chart dependency is not in the repository, and kas fetches none from there.
    #[error(
        "chart {chart} depends on {name} from {repository}, which is not vendored under {chart}/charts/: kas renders without network access and fetches dependencies only from the http(s) chart repositories and oci:// registries the kas operator allows (gitops.render.chart_repositories); run `helm dependency build` and commit the result, or have the repository allowed"
    )]
    DependencyNotVendored {
        /// The chart directory.
        chart: String,
        /// The dependency's name.
        name: String,
        /// Where it would come from.
        repository: String,
    },
    /// A chart dependency's repository (or its archive's URL) is not allowed.
    #[error(
        "chart {chart} depends on {name} from {repository}, which kas's gitops.render.chart_repositories does not allow: refused, nothing was applied; the kas operator adds the repository's URL (or a prefix of it) there, or vendor the dependency (`helm dependency build`, commit {chart}/charts/)"
    )]
    DependencyNotAllowed {
        /// The chart directory.
        chart: String,
        /// The dependency's name.
        name: String,
        /// The URL not allowed (the repository, or an archive's URL in its index).
        repository: String,
    },
    /// A chart dependency's version cannot be resolved in its repository's index.
    #[error("chart {chart} depends on {name} from {repository}: {detail}")]
    DependencyUnresolved {
        /// The chart directory.
        chart: String,
        /// The dependency's name.
        name: String,
        /// Its repository.
        repository: String,
        /// Why.
        detail: String,
    },
    /// The chart repository of `helm.repository` (or its archive's URL) is not allowed.
    #[error(
        "helm.repository: the chart {chart} is fetched from {url}, which kas's gitops.render.chart_repositories does not allow: refused, nothing was applied; the kas operator adds the repository's URL (or a prefix of it) there"
    )]
    ChartNotAllowed {
        /// The chart's name.
        chart: String,
        /// The URL not allowed (the repository, or the archive's URL in its index).
        url: String,
    },
    /// The chart of `helm.repository` has no version matching `helm.version` in the index.
    #[error(
        "helm.chart {chart} of helm.repository {repository}: {detail}; refused, nothing was applied (helm.version chooses among them)"
    )]
    ChartUnresolved {
        /// The chart's name.
        chart: String,
        /// The repository.
        repository: String,
        /// Why (the constraint and the versions there).
        detail: String,
    },
    /// A chart repository could not be read (unreachable, an HTTP error, too large, too slow);
    /// tried again at the next fetch.
    #[error(
        "fetching {url} failed: {detail}; no earlier copy of it is cached, so the last commit applied stays applied"
    )]
    ChartRepository {
        /// What was fetched.
        url: String,
        /// Why it failed (the HTTP status or the error).
        detail: String,
    },
    /// A chart repository refused kas's credentials, or their absence (401, 403). Nothing
    /// kept of it is used: kas fails closed.
    #[error(
        "chart repository {repository} refused kas: {detail}; nothing was applied, the last commit applied stays applied (the kas operator fixes gitops.render.chart_repository_credentials)"
    )]
    ChartRepositoryDenied {
        /// The repository (or archive URL) asked.
        repository: String,
        /// The status and which credentials were sent.
        detail: String,
    },
    /// A chart archive is not the one its repository's index names.
    #[error(
        "the archive of {chart} at {url} has SHA-256 {got}, not {expected} as the repository's index (or the registry's manifest) says: refused, nothing was applied"
    )]
    DigestMismatch {
        /// The chart and its version.
        chart: String,
        /// Where it was fetched.
        url: String,
        /// The index's digest.
        expected: String,
        /// The archive's.
        got: String,
    },
    /// The repository is over the checkout limits.
    #[error("the repository is too large to render: {what}")]
    CheckoutTooLarge {
        /// Which limit, by how much.
        what: String,
    },
    /// The renderer failed; its message, with repository paths.
    #[error("{tool} failed: {message}")]
    Failed {
        /// Which renderer.
        tool: Tool,
        /// What it said.
        message: String,
    },
    /// The renderer ran out of time.
    #[error("{tool} did not finish within {limit:?} and was stopped (gitops.render.timeout)")]
    Timeout {
        /// Which renderer.
        tool: Tool,
        /// The limit.
        limit: Duration,
    },
    /// The renderer ran out of memory.
    #[error(
        "{tool} ran out of its memory limit of {limit} bytes and was stopped (gitops.render.memory_limit): {message}"
    )]
    MemoryLimit {
        /// Which renderer.
        tool: Tool,
        /// The limit.
        limit: u64,
        /// What it said.
        message: String,
    },
    /// The renderer wrote too much.
    #[error(
        "{tool} wrote more than {limit} bytes of manifests and was stopped (gitops.render.max_output_size)"
    )]
    OutputTooLarge {
        /// Which renderer.
        tool: Tool,
        /// The limit.
        limit: u64,
    },
    /// The commit's tree holds an entry Git itself refuses to check out.
    #[error("{0}; kas does not check such a commit out (it was made by hand, not by git)")]
    UncheckableTree(String),
    /// The renderer tried to open a network connection and the sandbox refused it: something
    /// the checks do not know of makes it download.
    #[error(
        "{tool} tried to reach the network, which kas refuses to renderers; vendor what it downloads into the repository: {message}"
    )]
    NetworkRefused {
        /// Which renderer.
        tool: Tool,
        /// What it said.
        message: String,
    },
    /// kas cannot cut renderers off the network here, and is not allowed to render without.
    #[error(
        "kas cannot cut renderers off the network on this host (no network namespace, no seccomp filter), so it renders nothing: the kas operator fixes the sandbox (see kas's startup log) or sets gitops.render.allow_network, which lets repository content make kas fetch URLs"
    )]
    NoNetworkIsolation,
    /// Objects render differently at every rendering (see [`unstable`]) and the entry does
    /// not accept it (`helm.random`).
    #[error(
        "{0}: refused, nothing was applied; set the values the chart generates in helm.values or a values file (the chart's values name them: a password, an existing Secret, a certificate), or set helm.random: apply on the manifest project to apply them anyway"
    )]
    Unstable(String),
    /// kas could not prepare or start the rendering (disk, processes).
    #[error("rendering failed in kas: {0}")]
    Io(String),
}

impl RenderError {
    /// Whether the repository or the configuration is at fault (not kas or its host).
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            RenderError::ToolMissing { .. }
                | RenderError::Io(_)
                | RenderError::NoNetworkIsolation
                | RenderError::ChartRepository { .. }
                | RenderError::ChartRepositoryDenied { .. }
                | RenderError::RemoteBaseFailed { .. }
        )
    }
}

/// How kas renders, from its configuration (`gitops.render`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    /// The `kustomize` program; `None`: found on `PATH` at startup.
    pub kustomize_path: Option<PathBuf>,
    /// The `helm` program; `None`: found on `PATH` at startup.
    pub helm_path: Option<PathBuf>,
    /// Longest one rendering may run.
    pub timeout: Duration,
    /// Address-space limit of the renderer process, in bytes.
    pub memory_limit: u64,
    /// Largest rendering output, in bytes.
    pub max_output_size: u64,
    /// Bounds of the checkout.
    pub checkout: CheckoutLimits,
    /// Most renderings kept.
    pub cache_entries: usize,
    /// Most renderings running at once; the others wait their turn. Each may take a checkout
    /// on disk and `memory_limit` of address space, so many agents' streams asking at once
    /// (after a kas restart, or a commit every agent follows) must not run them all together.
    pub max_concurrent: usize,
    /// Most renderings of one agent running or waiting for a turn at once: one agent's stream or
    /// previews never hold every turn, so other agents' renderings still run.
    pub max_concurrent_per_agent: usize,
    /// How long a rendering that failed through the repository (time or memory limit, the
    /// renderer's error, a refused reference) is answered from memory before it is run again.
    pub failure_ttl: Duration,
    /// Where checkouts are written; the system's temporary directory when `None`. A folder
    /// given here belongs to this renderer: checkouts a killed process left in it are deleted
    /// when the renderer is created.
    pub work_dir: Option<PathBuf>,
    /// The program that confines renderers with a seccomp filter (`<it> render-confine --
    /// renderer…`: kas itself); `None`: no filter, only a network namespace if `unshare` works.
    pub confine_with: Option<PathBuf>,
    /// Render even when renderers cannot be cut off the network. Dangerous: anyone who can
    /// push to a manifest project then makes kas fetch URLs (cloud metadata, cluster services)
    /// and shows what it got.
    pub allow_network: bool,
    /// Files and folders renderers may read besides the system's, the checkout and the
    /// renderer program itself (under `confine_with`'s Landlock fence).
    pub read_paths: Vec<PathBuf>,
    /// Chart repositories kas fetches chart dependencies from (none by default).
    pub charts: ChartRepoConfig,
    /// Git repositories kas fetches remote Kustomize bases from (none by default).
    pub remote_bases: RemoteBaseConfig,
}

/// Creates the checkouts' folder and deletes what a killed kas left there (blocking). Before
/// any rendering, so no live checkout can be taken for a leftover.
fn prepare_work_dir(dir: &Path) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::error!(dir = %dir.display(), error = %e, "Cannot create the renderers' work folder: Kustomize and Helm projects will fail to render");
        return;
    }
    let deleted = checkout::sweep_leftovers(dir);
    if deleted > 0 {
        tracing::info!(dir = %dir.display(), deleted, "Deleted checkouts left by an earlier kas");
    }
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            kustomize_path: None,
            helm_path: None,
            timeout: Duration::from_secs(60),
            memory_limit: 2 << 30,
            max_output_size: 20 << 20,
            checkout: CheckoutLimits {
                max_entries: 10_000,
                max_size: 100 << 20,
            },
            cache_entries: 16,
            max_concurrent: 4,
            max_concurrent_per_agent: 1,
            failure_ttl: Duration::from_secs(30),
            work_dir: None,
            confine_with: None,
            allow_network: false,
            read_paths: Vec::new(),
            charts: ChartRepoConfig::default(),
            remote_bases: RemoteBaseConfig::default(),
        }
    }
}

/// The repository is part of the key: a commit id alone names a commit only within one
/// repository, and two projects holding the same id (a fork, a SHA-1 collision crafted by one
/// project's owner) must never be served each other's rendering. The mirror's folder stands for
/// the repository: kas keeps one per project and remote, and renders only from it. The
/// settings include the agent's cluster as a chart sees it (Kubernetes version, API versions):
/// two clusters may render one commit differently. The chart dependencies fetched, as resolved
/// (version, digest), too: a new version published in a dependency's range renders anew; and
/// the commits remote Kustomize bases resolved to: a branch moved upstream renders anew.
type CacheKey = (
    PathBuf,
    CommitId,
    RenderSpec,
    Vec<dependencies::Resolved>,
    Vec<(String, CommitId)>,
);

/// One rendering's output, and what a second rendering of a chart told of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// The manifests (one multi-document YAML stream).
    pub bytes: Vec<u8>,
    /// The objects a second rendering rendered differently (Helm only; sorted).
    pub unstable: Vec<unstable::Unstable>,
    /// The chart's template files (repository paths) naming functions of
    /// [`unstable::UNSTABLE_FUNCTIONS`], with those functions (Helm only; sorted by path).
    pub calls: Vec<(String, Vec<&'static str>)>,
    /// The chart of `helm.repository` as resolved and rendered (its version and digest).
    pub chart: Option<dependencies::Resolved>,
}

impl Rendered {
    /// The name the rendering is sent as, naming the chart version of `helm.repository`
    /// rendered (so the agent's errors and kas's log say which).
    pub fn label(&self, spec: &RenderSpec) -> String {
        match (spec, &self.chart) {
            (RenderSpec::Helm(h), Some(c)) => {
                format!(
                    "helm template {} {} from {}",
                    c.name, c.version, h.repository
                )
            }
            _ => spec.label(),
        }
    }
}

/// The chart of a `helm.repository` entry as resolved now: its version, and whether it was
/// resolved from what kas kept because the repository could not be reached (renderings then
/// carry the "unreachable" warning, so a change either way is sent to the agent anew).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartNow {
    pub resolved: dependencies::Resolved,
    pub stale: bool,
}

/// A rendering, and what its user should know of how it was made (a chart repository that
/// could not be read, so an earlier index was used; a remote base's repository that could not be
/// fetched, so a commit held from an earlier fetch was used). Not part of the cached rendering: the
/// same rendering is fresh again once the repository answers.
#[derive(Debug, Clone)]
pub struct Output {
    pub rendered: Arc<Rendered>,
    pub warnings: Vec<String>,
}

/// Reads as the rendering it carries: most callers want only that.
impl std::ops::Deref for Output {
    type Target = Rendered;

    fn deref(&self) -> &Rendered {
        &self.rendered
    }
}

/// Charts fetched for a rendering, and the warnings of their resolution.
type Fetched = (Vec<(dependencies::Resolved, Vec<u8>)>, Vec<String>);

/// Renders manifest projects; one per kas, shared by every agent's stream.
#[derive(Debug)]
pub struct Renderer {
    config: RenderConfig,
    kustomize: Result<PathBuf, String>,
    helm: Result<PathBuf, String>,
    sandbox: Sandbox,
    cache: RenderCache<CacheKey, Arc<Rendered>, RenderError>,
    /// Turns to render (see [`RenderConfig::max_concurrent`]).
    turns: tokio::sync::Semaphore,
    /// Each agent's share of them (see [`RenderConfig::max_concurrent_per_agent`]).
    agent_turns: turns::AgentTurns,
    /// Fetches chart dependencies; `None` when no chart repository is allowed.
    charts: Option<ChartFetcher>,
    /// Fetches remote Kustomize bases; `None` when no Git repository is allowed.
    bases: Option<remote_fetch::BaseFetcher>,
}

impl Renderer {
    /// Finds the programs and what confinement this machine allows (blocking: runs `unshare`
    /// once), and logs what is missing.
    pub fn new(config: RenderConfig) -> Self {
        let sandbox = probe_sandbox(config.confine_with.as_deref());
        match (&sandbox.unshare, &sandbox.confine) {
            (Some(_), Some(_)) => tracing::info!(
                "Renderers run in a network namespace and under a seccomp filter refusing Internet sockets"
            ),
            (None, Some(_)) => tracing::info!(
                "unshare cannot create a network namespace here: renderers run under a seccomp filter refusing Internet sockets"
            ),
            (Some(_), None) => tracing::warn!(
                "The seccomp filter cannot be installed here: renderers run in a network namespace only"
            ),
            (None, None) if config.allow_network => tracing::warn!(
                "Neither a network namespace nor a seccomp filter works here and gitops.render.allow_network is set: renderers have kas's network access, so repository content can make kas fetch URLs"
            ),
            (None, None) => tracing::error!(
                "Neither a network namespace nor a seccomp filter works here: kas renders no Kustomize or Helm project (gitops.render.allow_network renders anyway, with network access)"
            ),
        }
        if sandbox.confine.is_some() && !sandbox.landlock {
            tracing::info!(
                "This kernel has no Landlock: renderers can read any file kas can (the network stays cut off)"
            );
        }
        if sandbox.setpriv.is_none() {
            tracing::warn!(
                "setpriv cannot set a parent-death signal here: a renderer running when kas is killed runs on until it ends"
            );
        }
        if sandbox.prlimit.is_none() {
            tracing::warn!(
                "prlimit is not installed: renderers run without a memory limit (time and output limits still apply)"
            );
        }
        Self::with_sandbox(config, sandbox)
    }

    /// As [`Renderer::new`], with the given confinement.
    pub fn with_sandbox(config: RenderConfig, sandbox: Sandbox) -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let find = |configured: &Option<PathBuf>, tool: Tool| match configured {
            Some(p) if p.is_file() => Ok(p.clone()),
            Some(p) => Err(format!("{} does not exist", p.display())),
            None => find_on_path(&tool.to_string(), &path)
                .ok_or_else(|| format!("no {tool} on kas's PATH")),
        };
        let kustomize = find(&config.kustomize_path, Tool::Kustomize);
        let helm = find(&config.helm_path, Tool::Helm);
        for (tool, found) in [(Tool::Kustomize, &kustomize), (Tool::Helm, &helm)] {
            match found {
                Ok(p) => tracing::info!(tool = %tool, path = %p.display(), "Renderer found"),
                Err(why) => {
                    tracing::warn!(tool = %tool, why, "Renderer not available: projects using it get an error")
                }
            }
        }
        if let Some(dir) = &config.work_dir {
            prepare_work_dir(dir);
        }
        let cache = RenderCache::new(config.cache_entries, config.failure_ttl);
        let turns = tokio::sync::Semaphore::new(config.max_concurrent.max(1));
        let agent_turns = turns::AgentTurns::new(config.max_concurrent_per_agent);
        let charts = ChartFetcher::new(config.charts.clone());
        let bases = remote_fetch::BaseFetcher::new(&config.remote_bases);
        Self {
            charts,
            bases,
            config,
            kustomize,
            helm,
            sandbox,
            cache,
            turns,
            agent_turns,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &RenderConfig {
        &self.config
    }

    /// Registers the renderers' own metrics (chart dependency and remote base fetches).
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        if let Some(charts) = &self.charts {
            charts.metrics().register(reg);
        }
        if let Some(bases) = &self.bases {
            bases.metrics().register(reg);
        }
    }

    /// The rendered manifests of `commit` with `spec`, from the cache or rendered now in one of
    /// `agent_id`'s turns.
    pub async fn render(
        &self,
        agent_id: i64,
        mirror: &Mirror,
        commit: CommitId,
        spec: &RenderSpec,
    ) -> Result<Output, RenderError> {
        let (fetched, warnings) = match (spec, &self.charts) {
            // A packaged chart holds its dependencies.
            (RenderSpec::Helm(h), _) if h.from_repository() => self.fetch_chart(h).await?,
            (RenderSpec::Helm(h), Some(charts)) => {
                self.fetch_dependencies(charts, mirror, commit, h).await?
            }
            _ => (Vec::new(), Vec::new()),
        };
        let mut remote = match spec {
            RenderSpec::Kustomize { path } => {
                let max = self.config.checkout.max_size;
                remote_plan::plan(self.bases.as_ref(), mirror, commit, path, max).await?
            }
            RenderSpec::Helm(_) => remote_plan::Plan::default(),
        };
        let mut warnings = warnings;
        warnings.append(&mut remote.warnings);
        let resolved = fetched.iter().map(|(r, _)| r.clone()).collect();
        let key = (
            mirror.dir().to_path_buf(),
            commit,
            spec.clone(),
            resolved,
            remote.key(),
        );
        let rendered = self
            .cache
            .get_or_try_init(key, RenderError::is_user_error, || async {
                // The agent's turn first: an agent waiting for its own renderings never holds
                // one of kas's turns meanwhile.
                let _mine = self.agent_turns.acquire(agent_id).await;
                let _turn = self
                    .turns
                    .acquire()
                    .await
                    .map_err(|e| RenderError::Io(format!("waiting to render: {e}")))?;
                let started = std::time::Instant::now();
                let out = self.render_now(mirror, commit, spec, fetched, remote).await?;
                tracing::info!(commit_id = %commit, renderer = %spec.tool(), source = out.label(spec), bytes = out.bytes.len(), unstable_objects = out.unstable.len(), elapsed_ms = started.elapsed().as_millis() as u64, "Rendered manifests");
                Ok(Arc::new(out))
            })
            .await?;
        Ok(Output { rendered, warnings })
    }

    /// The chart's dependencies on HTTP(S) repositories and OCI registries that `commit` does
    /// not vendor, each allowed, resolved in its repository's index or registry's tag list (one
    /// path for both, [`ChartFetcher::resolve`], as for `helm.repository` charts) and fetched (or
    /// taken from the cache). Before the rendering's cache key, which holds what they resolved
    /// to.
    async fn fetch_dependencies(
        &self,
        charts: &ChartFetcher,
        mirror: &Mirror,
        commit: CommitId,
        h: &HelmSpec,
    ) -> Result<Fetched, RenderError> {
        let (m, chart, limits) = (
            mirror.clone(),
            h.chart.clone(),
            self.config.checkout.clone(),
        );
        let (chart_yaml, listed) =
            tokio::task::spawn_blocking(move || chart_files(&m, &commit, &chart, &limits))
                .await
                .map_err(|e| RenderError::Io(format!("reading the chart: {e}")))??;
        // No Chart.yaml: the checkout's checks say so.
        let Some(chart_yaml) = chart_yaml else {
            return Ok((Vec::new(), Vec::new()));
        };
        let charts_dir = format!("{}/charts", h.chart);
        let mut out: Vec<(dependencies::Resolved, Vec<u8>)> = Vec::new();
        let mut warnings = Vec::new();
        for dep in dependencies::fetched_dependencies(&h.chart, &chart_yaml)? {
            if dependencies::vendored_in(&listed, &charts_dir, &dep.name) {
                continue;
            }
            let resolution = charts.resolve(&dep).await.map_err(|why| match why {
                Unresolved::NotAllowed(repository) => RenderError::DependencyNotAllowed {
                    chart: h.chart.clone(),
                    name: dep.name.clone(),
                    repository,
                },
                Unresolved::NoVersion(detail) => RenderError::DependencyUnresolved {
                    chart: h.chart.clone(),
                    name: dep.name.clone(),
                    repository: dep.repository.clone(),
                    detail,
                },
                Unresolved::Failed(e) => e,
            })?;
            warnings.extend(resolution.stale.as_ref().map(resolutions::Stale::warning));
            let resolved = resolution.resolved;
            // Two aliases of one chart and version need one archive.
            if out
                .iter()
                .any(|(r, _)| r.file_name() == resolved.file_name())
            {
                continue;
            }
            let bytes = charts.archive(&resolved).await?;
            tracing::debug!(chart = %h.chart, dependency = %dep.name, version = %resolved.version, digest = %resolved.digest, "Chart dependency resolved");
            out.push((resolved, bytes));
        }
        out.sort_by_key(|a| a.0.file_name());
        warnings.sort();
        warnings.dedup();
        Ok((out, warnings))
    }

    /// The chart of `helm.repository`, resolved (see [`Renderer::resolve_chart`]) and fetched
    /// (or taken from the archive cache). Before the rendering's cache key, which holds the
    /// version and digest it resolved to.
    async fn fetch_chart(&self, h: &HelmSpec) -> Result<Fetched, RenderError> {
        let (charts, resolution) = self.resolve_repository_chart(h).await?;
        let Resolution { resolved, stale } = resolution;
        let bytes = charts.archive(&resolved).await?;
        tracing::debug!(chart = %h.chart, repository = %h.repository, version = %resolved.version, digest = %resolved.digest, "Chart of helm.repository resolved");
        let warnings = stale.as_ref().map(resolutions::Stale::warning);
        Ok((vec![(resolved, bytes)], warnings.into_iter().collect()))
    }

    /// The newest version of the chart of `helm.repository` matching `helm.version`, in the
    /// repository's index (kept for `chart_index_ttl`); the repository must be allowed.
    async fn resolve_repository_chart(
        &self,
        h: &HelmSpec,
    ) -> Result<(&ChartFetcher, Resolution), RenderError> {
        let not_allowed = |url: String| RenderError::ChartNotAllowed {
            chart: h.chart.clone(),
            url,
        };
        let Some(charts) = &self.charts else {
            return Err(not_allowed(h.repository.clone()));
        };
        let wanted = dependencies::Dependency {
            name: h.chart.clone(),
            version: h.version.clone(),
            repository: h.repository.clone(),
        };
        let resolved = charts.resolve(&wanted).await.map_err(|why| match why {
            Unresolved::NotAllowed(url) => not_allowed(url),
            Unresolved::NoVersion(detail) => RenderError::ChartUnresolved {
                chart: h.chart.clone(),
                repository: h.repository.clone(),
                detail,
            },
            Unresolved::Failed(e) => e,
        })?;
        Ok((charts, resolved))
    }

    /// What the chart of a `helm.repository` entry resolves to now (`None`: `spec` is no such
    /// entry, or it does not resolve). Fetches the index only past `chart_index_ttl`, so
    /// streams may ask at that pace to learn of a version published in the entry's range, or
    /// that its repository went away or came back.
    pub async fn resolve_chart(&self, spec: &RenderSpec) -> Option<ChartNow> {
        match spec {
            RenderSpec::Helm(h) if h.from_repository() => {
                let (_, resolution) = self.resolve_repository_chart(h).await.ok()?;
                Some(ChartNow {
                    stale: resolution.stale.is_some(),
                    resolved: resolution.resolved,
                })
            }
            _ => None,
        }
    }

    /// How often a stream of `spec` asks [`Renderer::resolve_chart`]: at `chart_index_ttl`
    /// (a second at least); `None` when `spec` is not a `helm.repository` entry or no chart
    /// repository is allowed.
    pub fn chart_recheck(&self, spec: &RenderSpec) -> Option<Duration> {
        match spec {
            RenderSpec::Helm(h) if h.from_repository() && self.charts.is_some() => {
                Some(self.config.charts.index_ttl.max(Duration::from_secs(1)))
            }
            _ => None,
        }
    }

    async fn render_now(
        &self,
        mirror: &Mirror,
        commit: CommitId,
        spec: &RenderSpec,
        fetched: Vec<(dependencies::Resolved, Vec<u8>)>,
        remote: remote_plan::Plan,
    ) -> Result<Rendered, RenderError> {
        let tool = spec.tool();
        let program = match tool {
            Tool::Kustomize => &self.kustomize,
            Tool::Helm => &self.helm,
        }
        .clone()
        .map_err(|detail| RenderError::ToolMissing { tool, detail })?;
        // Fail closed: the checks refuse the references they know of, not every way a
        // renderer may download.
        if !self.sandbox.isolates_network() && !self.config.allow_network {
            return Err(RenderError::NoNetworkIsolation);
        }
        let chart = match spec {
            RenderSpec::Helm(h) if h.from_repository() => fetched.first().map(|f| f.0.clone()),
            _ => None,
        };
        let (m, s, limits, dir) = (
            mirror.clone(),
            spec.clone(),
            self.config.checkout.clone(),
            self.config.work_dir.clone(),
        );
        let checkout = tokio::task::spawn_blocking(move || {
            prepare(
                &m,
                &commit,
                &s,
                (&limits, dir.as_deref()),
                &fetched,
                &remote,
            )
        })
        .await
        .map_err(|e| RenderError::Io(format!("preparing the checkout: {e}")))??;
        let reach = Reach {
            read: std::iter::once(checkout.repo.clone())
                .chain(self.config.read_paths.iter().cloned())
                .collect(),
            write: vec![checkout.scratch.clone()],
        };
        let line = spec::sandboxed(
            spec::command_line(
                spec,
                &program,
                (&checkout.repo, &checkout.scratch),
                self.sandbox.fences_files(),
            ),
            &self.sandbox,
            self.config.memory_limit,
            &reach,
        );
        let env = spec::environment(&checkout.scratch);
        let limits = RunLimits {
            timeout: self.config.timeout,
            max_output: self.config.max_output_size,
        };
        let run_once = || async {
            let ran = run::run(&line, &env, &checkout.scratch, &limits)
                .await
                .map_err(|e| {
                    RenderError::Io(format!("starting {}: {e}", line.program.display()))
                })?;
            self.outcome(tool, ran, &checkout)
                .map_err(|e| named_by_folder(e, spec, &checkout))
        };
        let bytes = run_once().await?;
        let RenderSpec::Helm(h) = spec else {
            return Ok(Rendered {
                bytes,
                ..Rendered::default()
            });
        };
        let (calls, packaged) = if h.from_repository() {
            // An archive's templates are not read here: it is rendered twice, as a packaged
            // subchart is.
            (Vec::new(), true)
        } else {
            let chart = checkout.repo.join(&h.chart);
            let chart_name = h.chart.clone();
            tokio::task::spawn_blocking(move || unstable_calls(&chart, &chart_name))
                .await
                .map_err(|e| RenderError::Io(format!("reading the chart: {e}")))?
        };
        // Most charts generate nothing: they are rendered once.
        if !unstable::may_differ(&calls, packaged) {
            return Ok(Rendered {
                bytes,
                unstable: Vec::new(),
                calls,
                chart,
            });
        }
        let again = run_once().await?;
        let unstable = unstable::differing(
            &String::from_utf8_lossy(&bytes),
            &String::from_utf8_lossy(&again),
        );
        Ok(Rendered {
            bytes,
            unstable,
            calls,
            chart,
        })
    }

    /// What a finished run means.
    fn outcome(&self, tool: Tool, ran: Ran, checkout: &Checkout) -> Result<Vec<u8>, RenderError> {
        match ran {
            Ran::Exited {
                success: true,
                stdout,
                ..
            } => Ok(stdout),
            Ran::Exited {
                stderr, killed_by, ..
            } => {
                let values = checkout.scratch.join(spec::VALUES_FILE);
                let message = checks::renderer_message(
                    &stderr,
                    &checkout.repo.display().to_string(),
                    &values.display().to_string(),
                );
                if checks::network_refused(&stderr) {
                    Err(RenderError::NetworkRefused { tool, message })
                } else if checks::out_of_memory(&stderr, killed_by) {
                    Err(RenderError::MemoryLimit {
                        tool,
                        limit: self.config.memory_limit,
                        message,
                    })
                } else {
                    let message =
                        checks::with_restrictor_hint(message, self.sandbox.fences_files());
                    let message = checks::with_submodule_hint(message, &checkout.submodules);
                    let message = checks::with_left_out_hint(message, &checkout.left_out);
                    Err(RenderError::Failed { tool, message })
                }
            }
            Ran::TimedOut => Err(RenderError::Timeout {
                tool,
                limit: self.config.timeout,
            }),
            Ran::OutputTooLarge => Err(RenderError::OutputTooLarge {
                tool,
                limit: self.config.max_output_size,
            }),
        }
    }
}

/// A Helm failure of a chart from Git naming the chart's files by its folder in the
/// repository rather than by its `name` (see [`checks::with_chart_folder`]).
fn named_by_folder(e: RenderError, spec: &RenderSpec, checkout: &Checkout) -> RenderError {
    let (RenderSpec::Helm(h), RenderError::Failed { tool, message }) = (spec, &e) else {
        return e;
    };
    if h.from_repository() {
        return e;
    }
    let chart_yaml = checkout.repo.join(&h.chart).join("Chart.yaml");
    let name = std::fs::read_to_string(chart_yaml)
        .map(|text| checks::chart_name(&text))
        .unwrap_or_default();
    RenderError::Failed {
        tool: *tool,
        message: checks::with_chart_folder(message.clone(), &name, &h.chart),
    }
}

/// The checkout, with the fetched chart dependencies in the chart's `charts/`, checked for
/// what the sandbox refuses, with the inline values written.
fn prepare(
    mirror: &Mirror,
    commit: &CommitId,
    spec: &RenderSpec,
    (limits, work_dir): (&CheckoutLimits, Option<&Path>),
    fetched: &[(dependencies::Resolved, Vec<u8>)],
    remote: &remote_plan::Plan,
) -> Result<Checkout, RenderError> {
    if let RenderSpec::Helm(h) = spec
        && h.from_repository()
    {
        return prepare_repository_chart(mirror, commit, h, (limits, work_dir), fetched);
    }
    let added: Vec<(String, &[u8])> = match spec {
        RenderSpec::Helm(h) => fetched
            .iter()
            .map(|(r, bytes)| (format!("{}/charts/{}", h.chart, r.file_name()), &bytes[..]))
            .collect(),
        RenderSpec::Kustomize { .. } => Vec::new(),
    };
    let folder = match spec {
        RenderSpec::Kustomize { path } => path.as_str(),
        RenderSpec::Helm(h) => h.chart.as_str(),
    };
    let strict = checkout::Strict(Some(folder));
    let checkout = Checkout::write(mirror, commit, limits, work_dir, &added, remote, strict)?;
    let read = |rel: &str| std::fs::read_to_string(checkout.repo.join(rel)).ok();
    match spec {
        RenderSpec::Kustomize { path } => checks::check_kustomizations(path, read)?,
        RenderSpec::Helm(h) => {
            let Some(chart_yaml) = read(&format!("{}/Chart.yaml", h.chart)) else {
                return Err(RenderError::Failed {
                    tool: Tool::Helm,
                    message: format!("{}/Chart.yaml: no such file at this commit", h.chart),
                });
            };
            let charts = checkout.repo.join(&h.chart).join("charts");
            checks::check_chart_dependencies(&h.chart, &chart_yaml, |name| {
                vendored(&charts, name)
            })?;
            write_values(&checkout, h)?;
        }
    }
    Ok(checkout)
}

/// The checkout (for the values files) with the archive of the chart of `helm.repository`
/// in the scratch folder: the commit's own files are not a chart, and nothing is added to
/// them. The archive holds its dependencies; its digest was checked when fetched.
fn prepare_repository_chart(
    mirror: &Mirror,
    commit: &CommitId,
    h: &HelmSpec,
    (limits, work_dir): (&CheckoutLimits, Option<&Path>),
    fetched: &[(dependencies::Resolved, Vec<u8>)],
) -> Result<Checkout, RenderError> {
    let Some((_, archive)) = fetched.first() else {
        return Err(RenderError::Io(format!(
            "the chart {} of {} was not fetched",
            h.chart, h.repository
        )));
    };
    let none = remote_plan::Plan::default();
    // The chart is the archive: the commit gives values files only.
    let strict = checkout::Strict(None);
    let checkout = Checkout::write(mirror, commit, limits, work_dir, &[], &none, strict)?;
    write_scratch(&checkout, spec::CHART_ARCHIVE, archive)?;
    write_values(&checkout, h)?;
    Ok(checkout)
}

/// The inline `helm.values`, in the scratch folder where the command line names them.
fn write_values(checkout: &Checkout, h: &HelmSpec) -> Result<(), RenderError> {
    if h.values_json.is_empty() {
        return Ok(());
    }
    write_scratch(checkout, spec::VALUES_FILE, h.values_json.as_bytes())
}

/// `bytes` as the file `name` of the checkout's scratch folder.
fn write_scratch(checkout: &Checkout, name: &str, bytes: &[u8]) -> Result<(), RenderError> {
    let file = checkout.scratch.join(name);
    std::fs::write(&file, bytes)
        .map_err(|e| RenderError::Io(format!("writing {}: {e}", file.display())))
}

/// The template files of the chart checked out at `dir` (in the repository at `chart`) and of
/// its unpacked subcharts that name functions of [`unstable::UNSTABLE_FUNCTIONS`], by
/// repository path with those functions; and whether a packaged subchart (`charts/*.tgz`,
/// not read here) is there. Blocking.
fn unstable_calls(dir: &Path, chart: &str) -> (Vec<(String, Vec<&'static str>)>, bool) {
    let mut calls = Vec::new();
    let mut packaged = false;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(folder) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            // Not following symbolic links (`file_type` does not): no loop, and Helm reads
            // a chart's links as the files they point to, which are in the walk anyway.
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                todo.push(path);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            packaged |= name.ends_with(".tgz") && folder.ends_with("charts");
            let template = path
                .strip_prefix(dir)
                .is_ok_and(|rel| rel.components().any(|c| c.as_os_str() == "templates"));
            if !kind.is_file() || !template {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let functions = unstable::functions_in(&text);
            if let (false, Ok(rel)) = (functions.is_empty(), path.strip_prefix(dir)) {
                calls.push((format!("{chart}/{}", rel.display()), functions));
            }
        }
    }
    calls.sort();
    (calls, packaged)
}

/// The chart's `Chart.yaml` at `commit` (`None`: none) and the paths under its `charts/`.
/// Blocking.
fn chart_files(
    mirror: &Mirror,
    commit: &CommitId,
    chart: &str,
    limits: &CheckoutLimits,
) -> Result<(Option<String>, Vec<String>), RenderError> {
    let git = |e: tether_git_source::Error| RenderError::Io(format!("reading the chart: {e}"));
    let chart_yaml = mirror
        .read_file(commit, &format!("{chart}/Chart.yaml"), limits.max_size)
        .map_err(git)?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let listed = mirror
        .list_files(commit, &format!("{chart}/charts"), limits.max_entries)
        .map_err(git)?
        .into_iter()
        .map(|e| e.path)
        .collect();
    Ok((chart_yaml, listed))
}

/// Whether `charts/` holds the dependency `name`, unpacked or as `name-<version>.tgz`.
fn vendored(charts: &Path, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    if charts.join(name).join("Chart.yaml").is_file() {
        return true;
    }
    let prefix = format!("{name}-");
    std::fs::read_dir(charts).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n.ends_with(".tgz")
        })
    })
}

/// The first executable file called `name` in the `PATH`-style list `path`.
pub fn find_on_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The confinement this machine allows: a user+network namespace when unprivileged user
/// namespaces work, a network namespace alone when kas may create one, else none; the seccomp
/// filter of `confine_with render-confine` when it refuses a socket here.
pub fn probe_sandbox(confine_with: Option<&Path>) -> Sandbox {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let prlimit = find_on_path("prlimit", &path);
    let unshare = find_on_path("unshare", &path).and_then(|bin| {
        let candidates = [vec!["--user", "--map-root-user", "--net"], vec!["--net"]];
        candidates.into_iter().find_map(|flags| {
            let works = std::process::Command::new(&bin)
                .args(&flags)
                .arg("--")
                .arg(&bin)
                .arg("--version")
                .env_clear()
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            works.then(|| (bin.clone(), flags.iter().map(|f| (*f).to_owned()).collect()))
        })
    });
    let setpriv = find_on_path("setpriv", &path).filter(|bin| {
        std::process::Command::new(bin)
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .arg("--version")
            .env_clear()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let probed = confine_with.and_then(|bin| {
        let out = std::process::Command::new(bin)
            .args([confine::SUBCOMMAND, confine::SELF_TEST])
            .env_clear()
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = said.lines();
        (lines.next() == Some(confine::SELF_TEST_PASSED)).then(|| {
            let landlock = lines.next() == Some(confine::SELF_TEST_LANDLOCK);
            (bin.to_path_buf(), landlock)
        })
    });
    Sandbox {
        unshare,
        prlimit,
        setpriv,
        landlock: probed.as_ref().is_some_and(|(_, landlock)| *landlock),
        confine: probed.map(|(bin, _)| bin),
    }
}
