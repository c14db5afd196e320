//! kas's configuration file (`--configuration-file`), with an embedded default.
//!
//! Every key is optional; unknown keys are errors so a typo never silently falls back to a
//! default. Durations are written like `20s`, `5m`, `2h`. `docs/kas-configuration.md` documents
//! every key and `docs/examples/kas.yaml` is loaded by a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder for the SQLite database and the admin token.
    pub data_dir: PathBuf,
    pub database: Database,
    pub agent: AgentListener,
    pub api: Api,
    pub git: Git,
    pub gitops: GitOps,
    pub kubernetes_api: KubernetesApi,
    pub observability: Observability,
    pub webhooks: Webhooks,
    /// The web UI (`web.listen`; off without it).
    pub web: Web,
    /// Limits on failed authentication and agent token use (see [`crate::limits`]).
    pub rate_limits: crate::limits::RateLimits,
    /// Receivers told about failed and recovered syncs and refusals.
    pub notifications: tether_notifications::NotificationsConfig,
    /// Redis shared by several kas replicas (revocations reach all of them at once).
    pub redis: Option<crate::cluster::RedisConfig>,
    /// Routing between replicas: the private listener and the shared secret (needs `redis`).
    pub peers: Option<crate::peers::PeersConfig>,
    /// On SIGTERM, how long kas stays up but not ready before it stops its listeners: the
    /// time load balancers (Kubernetes endpoints) take to stop sending it new connections.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// After `shutdown_delay`, how long requests in flight on the agents' tunnels get to
    /// finish (idle tunnels end at once, so agents reconnect to another replica) before they
    /// are cut; kas then exits within a few seconds.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// Push webhooks from Git hosts. Without `listen`, they are served on the internal API's
/// listener (as before this section existed); with it, only here, so the internal API can
/// stay on loopback while Git hosts reach this listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Webhooks {
    pub listen: Option<Listen>,
}

/// The web UI: pages, live sync progress, actions and cluster browsing. Off unless `listen`
/// is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Web {
    pub listen: Option<Listen>,
    /// How long a login lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// The address agentk dials, shown in the install commands after registration
    /// (default: `grpc://` and the agent listener's address).
    pub agent_address: Option<String>,
    /// Login with OpenID Connect (besides the admin token).
    pub oidc: Option<WebOidc>,
}

impl Default for Web {
    fn default() -> Self {
        Self {
            listen: None,
            session_ttl: Duration::from_secs(8 * 3600),
            agent_address: None,
            oidc: None,
        }
    }
}

/// An OpenID Connect provider people log in with (authorization code flow with PKCE).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebOidc {
    /// The issuer URL; `<issuer>/.well-known/openid-configuration` is read at start.
    pub issuer: String,
    pub client_id: String,
    /// File holding the client secret (none: a public client, PKCE alone).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// This UI's callback as registered at the provider: `https://<web UI>/login/oidc/callback`.
    pub redirect_url: String,
    /// Extra PEM CA trusted for the provider (besides the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Subjects (`sub`) who get the admin role; everyone else is a viewer.
    #[serde(default)]
    pub admin_subjects: Vec<String>,
    /// Groups (in `groups_claim`) whose members get the admin role.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    /// Subjects (`sub`) who may log in as viewers. Besides admins, only people listed here or
    /// in `viewer_groups` may log in: an identity provider serves far more people than those
    /// who should read every agent's configuration and errors (gitlab.com: everyone).
    #[serde(default)]
    pub viewer_subjects: Vec<String>,
    /// Groups (in `groups_claim`) whose members may log in as viewers.
    #[serde(default)]
    pub viewer_groups: Vec<String>,
    /// The claim naming the person in the cluster (impersonated as `gitlab:user:<it>`).
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// The claim listing the person's groups: each is a group membership for `user_access`.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The role those group memberships carry for `user_access`.
    #[serde(default = "default_groups_access_level")]
    pub groups_access_level: tether_kubeproxy_server::AccessLevel,
}

fn default_username_claim() -> String {
    "preferred_username".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_groups_access_level() -> tether_kubeproxy_server::AccessLevel {
    tether_kubeproxy_server::AccessLevel::Developer
}

/// The Kubernetes API proxy for CI jobs and users.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesApi {
    pub listen: Listen,
    /// Path under which the Kubernetes API is served (e.g. `/k8s-proxy`).
    pub path_prefix: String,
    /// OIDC issuers whose CI job ID tokens are accepted (`Bearer ci:<agent id>:<token>`).
    pub ci_issuers: Vec<tether_kubeproxy_server::TrustedIssuer>,
    /// URL clients use to reach this listener, for generated kubeconfigs (default: from the
    /// request's Host header).
    pub public_url: Option<String>,
    /// PEM CA that signed this listener's certificate, embedded in generated kubeconfigs.
    pub ca_file: Option<PathBuf>,
    /// Extra PEM CA trusted when fetching issuers' JWKS URLs (besides the system's roots).
    pub jwks_ca_file: Option<PathBuf>,
    /// How long an issuer's keys are used after their last successful load while every reload
    /// fails; after it the issuer's tokens get 503.
    #[serde(with = "humantime_serde")]
    pub jwks_max_key_age: Duration,
    /// Most live requests one caller (a CI job, a personal access token) may hold through one
    /// agent; more get 429, so one caller cannot take all of the agent's tunnels.
    pub max_requests_per_caller: usize,
    /// Most live requests the CI jobs of one project may hold together through one agent, so
    /// one pipeline's jobs cannot take all of its tunnels either.
    pub max_requests_per_project: usize,
}

impl Default for KubernetesApi {
    fn default() -> Self {
        Self {
            listen: listen(KUBERNETES_API_PORT),
            path_prefix: "/".into(),
            ci_issuers: Vec::new(),
            public_url: None,
            ca_file: None,
            jwks_ca_file: None,
            jwks_max_key_age: tether_kubeproxy_server::DEFAULT_MAX_KEY_AGE,
            // Two projects at their cap leave agentk's default 500 streams a quarter for
            // everyone else.
            max_requests_per_caller: 128,
            max_requests_per_project: 192,
        }
    }
}

/// Limits on what one manifest project may make kas read and send (upstream's defaults).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GitOps {
    /// Largest manifest file, in bytes.
    pub max_file_size: u64,
    /// Largest total of a project's selected files, in bytes.
    pub max_total_size: u64,
    /// Most `paths` (globs) per manifest project.
    pub max_paths: usize,
    /// Most tree entries one glob's listing may visit.
    pub max_files_visited: usize,
    /// Most files one manifest project may select.
    pub max_files: usize,
    /// Manifest projects any agent's configuration may list, besides those of its own
    /// top-level group (see [`tether_agent_config::ManifestAccess`]): paths, `group/*`,
    /// `group/**`, or `**` for every project.
    pub shared_manifest_projects: Vec<String>,
    /// Kustomize and Helm rendering.
    pub render: Render,
}

/// `gitops.render`: the renderers and the limits of their sandbox.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Render {
    /// The `kustomize` program (default: found on `PATH`).
    pub kustomize_path: Option<PathBuf>,
    /// The `helm` program (default: found on `PATH`).
    pub helm_path: Option<PathBuf>,
    /// Longest one rendering may run.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Address-space limit of a renderer, in bytes.
    pub memory_limit: u64,
    /// Memory kas keeps for itself beside its renderers, in bytes: renderers are fitted into
    /// the container's memory limit minus this at start.
    pub memory_reserve: u64,
    /// Largest output of one rendering, in bytes.
    pub max_output_size: u64,
    /// Most tree entries of a checkout.
    pub max_checkout_files: usize,
    /// Largest checkout, in bytes.
    pub max_checkout_size: u64,
    /// Most renderings kept in memory.
    pub cache_entries: usize,
    /// Most renderings running at once.
    pub max_concurrent: usize,
    /// Most renderings of one agent running at once.
    pub max_concurrent_per_agent: usize,
    /// How long a rendering that failed through the repository is answered from memory.
    #[serde(with = "humantime_serde")]
    pub failure_ttl: Duration,
    /// Where checkouts are written (default: `<data_dir>/render`); this kas's alone.
    pub work_dir: Option<PathBuf>,
    /// Render even where renderers cannot be cut off the network (neither a network namespace
    /// nor kas's seccomp filter works). Dangerous: repository content can then make kas fetch
    /// any URL it reaches (cloud metadata, cluster services) and show the response.
    pub allow_network: bool,
    /// URL prefixes of the http(s) chart repositories and OCI registry locations (`oci://`)
    /// kas fetches charts and charts' dependencies from (itself, before rendering); empty:
    /// none, dependencies must be vendored.
    pub chart_repositories: Vec<String>,
    /// Registries (`oci://host[:port]`) read over plain HTTP instead of HTTPS, as `helm
    /// --plain-http` does: loopback hosts only (a registry on kas's own host).
    pub plain_http_registries: Vec<String>,
    /// CA certificates trusted for those repositories instead of the system's.
    pub chart_repositories_ca_file: Option<PathBuf>,
    /// Credentials for private chart repositories (HTTP basic or a bearer token, read from
    /// files, e.g. a mounted Secret), each sent only to URLs under its `url`.
    pub chart_repository_credentials: Vec<tether_gitops_server::ChartCredential>,
    /// Longest one request to a chart repository may take.
    #[serde(with = "humantime_serde")]
    pub chart_fetch_timeout: Duration,
    /// How long a repository's index is used before it is fetched again.
    #[serde(with = "humantime_serde")]
    pub chart_index_ttl: Duration,
    /// Largest `index.yaml`, in bytes.
    pub max_chart_index_size: u64,
    /// Largest chart archive, in bytes.
    pub max_chart_size: u64,
    /// Where fetched chart archives are kept (default: `<data_dir>/charts`).
    pub chart_cache_dir: Option<PathBuf>,
    /// Most bytes of chart archives kept there.
    pub chart_cache_size: u64,
    /// URL prefixes of the Git repositories (`https://`, `http://`, `git://`) kas fetches
    /// remote Kustomize bases from (itself, before rendering, anonymously); empty: none, a
    /// kustomization naming one is refused.
    pub remote_bases: Vec<String>,
    /// A remote base's repository fetched less than this ago is not fetched again (concurrent
    /// renderings share one fetch whatever it is).
    #[serde(with = "humantime_serde")]
    pub remote_base_fetch_interval: Duration,
}

impl Default for Render {
    fn default() -> Self {
        let d = tether_gitops_server::RenderConfig::default();
        Self {
            kustomize_path: d.kustomize_path,
            helm_path: d.helm_path,
            timeout: d.timeout,
            memory_limit: d.memory_limit,
            memory_reserve: tether_gitops_server::render::memory::DEFAULT_RESERVE,
            max_output_size: d.max_output_size,
            max_checkout_files: d.checkout.max_entries,
            max_checkout_size: d.checkout.max_size,
            cache_entries: d.cache_entries,
            max_concurrent: d.max_concurrent,
            max_concurrent_per_agent: d.max_concurrent_per_agent,
            failure_ttl: d.failure_ttl,
            work_dir: d.work_dir,
            allow_network: d.allow_network,
            chart_repositories: d.charts.allowed,
            plain_http_registries: d.charts.plain_http,
            chart_repositories_ca_file: d.charts.ca_file,
            chart_repository_credentials: d.charts.credentials,
            chart_fetch_timeout: d.charts.timeout,
            chart_index_ttl: d.charts.index_ttl,
            max_chart_index_size: d.charts.max_index_size,
            max_chart_size: d.charts.max_archive_size,
            chart_cache_dir: d.charts.cache_dir,
            chart_cache_size: d.charts.cache_size,
            remote_bases: d.remote_bases.allowed,
            remote_base_fetch_interval: d.remote_bases.fetch_interval,
        }
    }
}

impl Render {
    /// The renderer's settings; checkouts go to `work_dir`, by default `<data_dir>/render`
    /// (a folder of this kas alone: leftovers of a killed kas are deleted there at start).
    pub fn config(&self, data_dir: &Path) -> tether_gitops_server::RenderConfig {
        tether_gitops_server::RenderConfig {
            kustomize_path: self.kustomize_path.clone(),
            helm_path: self.helm_path.clone(),
            timeout: self.timeout,
            memory_limit: self.memory_limit,
            max_output_size: self.max_output_size,
            checkout: tether_gitops_server::render::CheckoutLimits {
                max_entries: self.max_checkout_files,
                max_size: self.max_checkout_size,
            },
            cache_entries: self.cache_entries,
            max_concurrent: self.max_concurrent,
            max_concurrent_per_agent: self.max_concurrent_per_agent,
            failure_ttl: self.failure_ttl,
            work_dir: Some(
                self.work_dir
                    .clone()
                    .unwrap_or_else(|| data_dir.join("render")),
            ),
            // kas itself confines the renderers (`kas render-confine`, dispatched in main).
            confine_with: std::env::current_exe().ok(),
            allow_network: self.allow_network,
            read_paths: Vec::new(),
            charts: tether_gitops_server::ChartRepoConfig {
                allowed: self.chart_repositories.clone(),
                timeout: self.chart_fetch_timeout,
                max_index_size: self.max_chart_index_size,
                max_archive_size: self.max_chart_size,
                index_ttl: self.chart_index_ttl,
                cache_dir: Some(
                    self.chart_cache_dir
                        .clone()
                        .unwrap_or_else(|| data_dir.join("charts")),
                ),
                cache_size: self.chart_cache_size,
                ca_file: self.chart_repositories_ca_file.clone(),
                credentials: self.chart_repository_credentials.clone(),
                plain_http: self.plain_http_registries.clone(),
            },
            remote_bases: tether_gitops_server::RemoteBaseConfig {
                allowed: self.remote_bases.clone(),
                // Beside the manifest projects' mirrors' default folder, never in it: kas
                // sweeps that one of mirrors no project uses.
                cache_dir: Some(data_dir.join("remote-bases")),
                fetch_interval: self.remote_base_fetch_interval,
                ..tether_gitops_server::RemoteBaseConfig::default()
            },
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.timeout.is_zero() {
            return Err("gitops.render.timeout must be positive".into());
        }
        if self.max_output_size == 0
            || self.max_checkout_size == 0
            || self.cache_entries == 0
            || self.max_concurrent == 0
            || self.max_concurrent_per_agent == 0
        {
            return Err(
                "gitops.render.max_output_size, max_checkout_size, cache_entries, max_concurrent and max_concurrent_per_agent must be positive"
                    .into(),
            );
        }
        tether_gitops_server::render::dependencies::AllowList::new(&self.chart_repositories)
            .map_err(|e| format!("gitops.render.chart_repositories: {e}"))?;
        tether_gitops_server::render::remote_bases::AllowList::new(&self.remote_bases)
            .map_err(|e| format!("gitops.render.remote_bases: {e}"))?;
        for r in &self.plain_http_registries {
            tether_gitops_server::render::oci::plain_http_registry(r)
                .map_err(|e| format!("gitops.render.plain_http_registries: {e}"))?;
        }
        for c in &self.chart_repository_credentials {
            c.validate()
                .map_err(|e| format!("gitops.render.chart_repository_credentials: {e}"))?;
        }
        if self.chart_fetch_timeout.is_zero()
            || self.max_chart_index_size == 0
            || self.max_chart_size == 0
        {
            return Err(
                "gitops.render.chart_fetch_timeout, max_chart_index_size and max_chart_size must be positive"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Default for GitOps {
    fn default() -> Self {
        let l = tether_gitops_server::Limits::default();
        Self {
            max_file_size: l.max_file_size,
            max_total_size: l.max_total_size,
            max_paths: l.max_paths,
            max_files_visited: l.max_visited_entries,
            max_files: l.max_files,
            shared_manifest_projects: Vec::new(),
            render: Render::default(),
        }
    }
}

impl GitOps {
    /// Which manifest projects an agent's configuration may list.
    pub fn manifest_access(&self) -> tether_agent_config::ManifestAccess {
        tether_agent_config::ManifestAccess::new(self.shared_manifest_projects.clone())
    }

    pub fn limits(&self) -> tether_gitops_server::Limits {
        tether_gitops_server::Limits {
            max_file_size: self.max_file_size,
            max_total_size: self.max_total_size,
            max_paths: self.max_paths,
            max_visited_entries: self.max_files_visited,
            max_files: self.max_files,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Git {
    /// How often each project's repository is fetched (push webhooks fetch at once).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest one fetch may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Folder of the bare mirrors; default `<data_dir>/git`.
    pub cache_dir: Option<PathBuf>,
}

impl Default for Git {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(20),
            fetch_timeout: Duration::from_secs(120),
            cache_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    /// SQLite file; default `<data_dir>/kas.sqlite`.
    pub sqlite_path: Option<PathBuf>,
    /// PostgreSQL instead of SQLite: `postgres://user[:password]@host[:port]/database`
    /// (with `?sslmode=verify-full` and friends for TLS). Exclusive with `sqlite_path`.
    pub url: Option<String>,
    /// A file holding that URL instead (it carries the password: a mounted Secret). Read when
    /// kas loads its configuration, then followed: a rotated URL is used for new connections
    /// once one connects with it. Exclusive with `url`.
    pub url_file: Option<PathBuf>,
    /// Where `url` was read from (`url_file`, moved here by [`Config::load`]), to follow it.
    #[serde(skip)]
    pub url_read_from: Option<PathBuf>,
    /// PostgreSQL: the server cancels a statement running longer, and kas gives up on an
    /// operation 5 s after that — a server that vanished answers nothing, and TCP would wait
    /// a quarter of an hour. `0s`: neither.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            sqlite_path: None,
            url: None,
            url_file: None,
            url_read_from: None,
            statement_timeout: tether_store::DEFAULT_STATEMENT_TIMEOUT,
        }
    }
}

/// Which database kas keeps its records in (see [`Config::database_location`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// The embedded default: a SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server, by URL.
    Postgres(String),
}

impl DatabaseLocation {
    /// Parses `sqlite:PATH` or a `postgres://` / `postgresql://` URL, as `kas store copy`
    /// takes them.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err("sqlite: needs a path, e.g. sqlite:kas-data/kas.sqlite".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_owned()));
        }
        Err(format!(
            "{:?} is neither sqlite:PATH nor a postgres:// URL",
            redact_url(text)
        ))
    }
}

impl std::fmt::Display for DatabaseLocation {
    /// For messages and logs: the SQLite path, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

/// `scheme://user:password@host…` with the password replaced, so a URL can be logged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Where to listen; see [`Listen::address`]. Left out, a listener with a default address
    /// keeps it (filled in at parse time), and one without (`webhooks`, `web`) is an error.
    #[serde(default)]
    address: Option<SocketAddr>,
    /// PEM certificate chain; with `key_file`, the listener speaks TLS.
    pub certificate_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The limits below default per listener (see [`ListenLimits`] and the `*_LIMITS`
    /// constants), so each is optional here.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_connections_per_address: Option<usize>,
}

/// A listener's abuse limits, resolved from its `listen` section and its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenLimits {
    /// Longest TLS handshake (agent listener: also protocol detection and WebSocket upgrade).
    pub handshake_timeout: Duration,
    /// Longest time for a request's headers (HTTP listeners only).
    pub header_timeout: Duration,
    /// Longest silence between requests of a keep-alive connection (HTTP listeners only).
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
}

impl ListenLimits {
    pub fn connections(&self) -> tether_transport::ConnectionLimits {
        tether_transport::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
        }
    }
}

const fn limits(max_connections: usize, max_connections_per_address: usize) -> ListenLimits {
    ListenLimits {
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(90),
        max_connections,
        max_connections_per_address,
    }
}

/// Agents behind one NAT share an address and each holds a few connections, hence the
/// generous per-address cap. Agent connections are long-lived HTTP/2: no header or idle
/// timeout (HTTP/2 pings find dead peers).
pub const AGENT_LIMITS: ListenLimits = limits(4096, 512);
/// CI runners run many jobs from one address. Per address well above
/// `max_requests_per_caller` (128): one job holding its share over HTTP/1.1 (a connection per
/// request) gets the 429 naming that key, and other jobs of the runner are still served (at
/// 256 the job took every connection of its address first, and every new one from there was
/// closed without a word: kubectl said `EOF`).
pub const KUBERNETES_API_LIMITS: ListenLimits = limits(2048, 1024);
/// Admin commands: few clients.
pub const API_LIMITS: ListenLimits = limits(256, 64);
/// Git hosts send a request per push.
pub const WEBHOOKS_LIMITS: ListenLimits = limits(256, 32);
/// People's browsers: a few connections each, one of them a long-lived event stream.
pub const WEB_LIMITS: ListenLimits = limits(512, 32);
/// Prometheus and the kubelet's probes: a few clients, one connection each at a time.
pub const OBSERVABILITY_LIMITS: ListenLimits = limits(128, 32);
/// Other replicas: one connection per request forwarded to an agent held here (a watch or an
/// exec keeps one for its whole life), all from a few addresses; as many as the Kubernetes
/// API listener admits, the source of those requests.
pub const PEERS_LIMITS: ListenLimits = limits(2048, 2048);

/// The peers listener's caps: `peers.max_connections`, for all clients and for one address
/// alike (the other replicas are a few addresses).
pub fn peers_limits(pc: &crate::peers::PeersConfig) -> tether_transport::ConnectionLimits {
    let max = pc
        .max_connections
        .map_or(PEERS_LIMITS.max_connections, std::num::NonZeroUsize::get);
    tether_transport::ConnectionLimits {
        max_connections: max,
        max_connections_per_address: max,
    }
}

impl Listen {
    /// The address to bind. Always the written or the default one once the configuration is
    /// parsed ([`Config::parse`] fills it in); a `Listen` built in code has one too.
    pub fn address(&self) -> SocketAddr {
        self.address
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// This listener's limits: what is set here, the rest from `defaults`.
    pub fn limits(&self, defaults: ListenLimits) -> ListenLimits {
        ListenLimits {
            handshake_timeout: self.handshake_timeout.unwrap_or(defaults.handshake_timeout),
            header_timeout: self.header_timeout.unwrap_or(defaults.header_timeout),
            idle_timeout: self.idle_timeout.unwrap_or(defaults.idle_timeout),
            max_connections: self.max_connections.unwrap_or(defaults.max_connections),
            max_connections_per_address: self
                .max_connections_per_address
                .unwrap_or(defaults.max_connections_per_address),
        }
    }

    fn validate_limits(&self, name: &str) -> Result<(), String> {
        let zero_timeout = [
            ("handshake_timeout", self.handshake_timeout),
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
        ]
        .into_iter()
        .find(|(_, d)| d.is_some_and(|d| d.is_zero()));
        if let Some((key, _)) = zero_timeout {
            return Err(format!("{name}.{key} must be positive"));
        }
        if self.max_connections == Some(0) || self.max_connections_per_address == Some(0) {
            return Err(format!("{name}: connection caps must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentListener {
    /// gRPC over HTTP/2 and gRPC inside a WebSocket share this listener.
    pub listen: Listen,
    /// How long a request waits for an idle tunnel of its agent.
    #[serde(with = "humantime_serde")]
    pub tunnel_wait_timeout: Duration,
    /// Upper bound on an agent connection's age, so load balancers can rebalance.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Time given to requests in flight when a connection reaches its age.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// Server-side HTTP/2 pings, after this long without a frame from the agent: a connection
    /// the network dropped without a reset is found within this plus `keepalive_timeout`, and
    /// the agent then shows as not connected.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Longest a connection may go from its accept to its first request with accepted
    /// credentials; then it is closed. agentk authenticates at once; generous for a kas busy
    /// with a reconnect storm.
    #[serde(with = "humantime_serde")]
    pub authentication_timeout: Duration,
    /// How often tokens of live streams are re-checked; bounds how long a revoked token's
    /// streams live when it was revoked by another kas (the local admin API ends them at once).
    #[serde(with = "humantime_serde")]
    pub token_recheck_interval: Duration,
    /// Most concurrent HTTP/2 streams on one agent connection (tunnel, configuration,
    /// manifests streams): bounds what one connection can make kas hold.
    pub max_streams_per_connection: u32,
    /// Most tunnel streams one agent may have open on this kas, over all its connections.
    pub max_streams_per_agent: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// The internal API used by the admin commands.
    pub listen: Listen,
    /// File holding the admin token; created (mode 0600) on first start if missing.
    pub admin_token_file: Option<PathBuf>,
    /// PEM CA that signed `listen.certificate_file`; the admin commands trust it (default:
    /// the system's roots).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Observability {
    pub listen: Listen,
    pub logging: Logging,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    pub level: String,
}

/// The listeners' default ports (all on 127.0.0.1).
const AGENT_PORT: u16 = 8150;
const OBSERVABILITY_PORT: u16 = 8151;
const API_PORT: u16 = 8153;
const KUBERNETES_API_PORT: u16 = 8154;

fn listen(port: u16) -> Listen {
    Listen {
        address: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        certificate_file: None,
        key_file: None,
        handshake_timeout: None,
        header_timeout: None,
        idle_timeout: None,
        max_connections: None,
        max_connections_per_address: None,
    }
}

impl Default for Listen {
    fn default() -> Self {
        listen(0)
    }
}

impl Default for AgentListener {
    fn default() -> Self {
        Self {
            listen: listen(AGENT_PORT),
            tunnel_wait_timeout: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(2 * 3600),
            max_connection_age_grace: Duration::from_secs(5 * 60),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            authentication_timeout: Duration::from_secs(60),
            token_recheck_interval: Duration::from_secs(60),
            // agentk's pool (500 at most by default) with its configuration and manifests
            // streams fits with room to spare.
            max_streams_per_connection: 1024,
            max_streams_per_agent: tether_tunnel_server::DEFAULT_MAX_STREAMS_PER_AGENT,
        }
    }
}

impl Default for Api {
    fn default() -> Self {
        Self {
            listen: listen(API_PORT),
            admin_token_file: None,
            ca_file: None,
        }
    }
}

impl Default for Observability {
    fn default() -> Self {
        Self {
            listen: listen(OBSERVABILITY_PORT),
            logging: Logging::default(),
        }
    }
}

impl Default for Logging {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("kas-data"),
            database: Database::default(),
            agent: AgentListener::default(),
            api: Api::default(),
            git: Git::default(),
            gitops: GitOps::default(),
            kubernetes_api: KubernetesApi::default(),
            observability: Observability::default(),
            webhooks: Webhooks::default(),
            web: Web::default(),
            rate_limits: crate::limits::RateLimits::default(),
            notifications: tether_notifications::NotificationsConfig::default(),
            redis: None,
            peers: None,
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Why one caller could be cut off before its 429 (pure): the Kubernetes API listener's
    /// connections per address do not exceed `max_requests_per_caller`, so a client opening a
    /// connection per request (HTTP/1.1) from one address reaches the address's cap first,
    /// and its next connections, and those of every other job from that address, are closed
    /// unanswered.
    pub fn per_caller_unreachable(&self) -> Option<String> {
        let per_address = self
            .kubernetes_api
            .listen
            .limits(KUBERNETES_API_LIMITS)
            .max_connections_per_address;
        let per_caller = self.kubernetes_api.max_requests_per_caller;
        (per_address <= per_caller).then(|| {
            format!(
                "kubernetes_api.listen.max_connections_per_address ({per_address}) is not above kubernetes_api.max_requests_per_caller ({per_caller}): a caller opening a connection per request takes every connection of its address before it gets its 429, and later connections from that address (other CI jobs of the runner) are closed unanswered"
            )
        })
    }

    /// Parses YAML text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| invalid(e.to_string()))?
        };
        cfg.fill_listen_addresses().map_err(invalid)?;
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    /// Reads and parses a file, then the files it names for secrets (`database.url_file`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        if let Some(file) = cfg.database.url_file.take() {
            let url = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            cfg.database.url = Some(url.trim().to_owned());
            cfg.validate().map_err(|message| ConfigError::Invalid {
                path: file.clone(),
                message,
            })?;
            cfg.database.url_read_from = Some(file);
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        self.validate_listeners()?;
        if self.agent.authentication_timeout.is_zero() {
            return Err("agent.authentication_timeout must be positive".into());
        }
        if self.agent.tunnel_wait_timeout.is_zero() {
            return Err("agent.tunnel_wait_timeout must be positive".into());
        }
        if self.agent.keepalive_interval.is_zero() || self.agent.keepalive_timeout.is_zero() {
            return Err(
                "agent.keepalive_interval and agent.keepalive_timeout must be positive".into(),
            );
        }
        if !self.kubernetes_api.path_prefix.starts_with('/') {
            return Err("kubernetes_api.path_prefix must start with /".into());
        }
        tether_kubeproxy_server::validate_issuers(&self.kubernetes_api.ci_issuers)
            .map_err(|e| format!("kubernetes_api.{e}"))?;
        if self.kubernetes_api.max_requests_per_caller == 0
            || self.kubernetes_api.max_requests_per_project == 0
        {
            return Err(
                "kubernetes_api.max_requests_per_caller and max_requests_per_project must be at least 1"
                    .into(),
            );
        }
        // Shorter than the hourly refresh, keys would be refused before a reload was tried.
        if self.kubernetes_api.jwks_max_key_age < tether_kubeproxy_server::DEFAULT_REFRESH_INTERVAL
        {
            return Err(
                "kubernetes_api.jwks_max_key_age must be at least 1h (the keys' refresh interval)"
                    .into(),
            );
        }
        if self.git.poll_interval.is_zero() {
            return Err("git.poll_interval must be positive".into());
        }
        if self.agent.token_recheck_interval.is_zero() {
            return Err("agent.token_recheck_interval must be positive".into());
        }
        if self.agent.max_streams_per_connection == 0 || self.agent.max_streams_per_agent == 0 {
            return Err(
                "agent.max_streams_per_connection and agent.max_streams_per_agent must be at least 1"
                    .into(),
            );
        }
        if self.shutdown_delay > Duration::from_secs(300) {
            return Err(
                "shutdown_delay is over 5 minutes: Kubernetes would kill kas first (its termination grace period must exceed the delay plus shutdown_timeout plus 5 s)".into(),
            );
        }
        if self.shutdown_timeout > Duration::from_secs(3600) {
            return Err(
                "shutdown_timeout is over an hour: Kubernetes would kill kas first (its termination grace period must exceed shutdown_delay plus the timeout plus 5 s)".into(),
            );
        }
        self.rate_limits.validate()?;
        self.gitops.render.validate()?;
        if let Some(p) = tether_agent_config::ManifestAccess::invalid_pattern(
            &self.gitops.shared_manifest_projects,
        ) {
            return Err(format!(
                "gitops.shared_manifest_projects: {p:?} is not a project path, group/*, group/** or **"
            ));
        }
        self.notifications.validate().map_err(|e| e.to_string())?;
        if let Some(redis) = &self.redis {
            redis.validate()?;
        }
        if self.peers.is_some() && self.redis.is_none() {
            return Err("peers needs redis: the replicas find each other's agents there".into());
        }
        self.validate_database()?;
        if self.web.session_ttl.is_zero() {
            return Err("web.session_ttl must be positive".into());
        }
        if self.web.oidc.is_some() && self.web.listen.is_none() {
            return Err("web.oidc needs web.listen".into());
        }
        tether_observability::parse_level(&self.observability.logging.level)
            .map_err(|e| format!("observability.logging.level: {e}"))?;
        crate::config_durations::check(&crate::config_durations::bounds(self))
    }

    fn validate_database(&self) -> Result<(), String> {
        if self.database.url_file.is_some() && self.database.url.is_some() {
            return Err("database.url and database.url_file are exclusive".into());
        }
        if self.database.url_file.is_some() && self.database.sqlite_path.is_some() {
            return Err("database.url_file and database.sqlite_path are exclusive".into());
        }
        let Some(url) = &self.database.url else {
            return Ok(());
        };
        if self.database.sqlite_path.is_some() {
            return Err(
                "database.url and database.sqlite_path are exclusive: kas keeps its \
                        records in one database (url for PostgreSQL, sqlite_path for the embedded \
                        SQLite)"
                    .into(),
            );
        }
        match DatabaseLocation::parse(url) {
            Ok(DatabaseLocation::Postgres(_)) => Ok(()),
            _ => Err(format!(
                "database.url must be a postgres:// URL, not {:?}",
                redact_url(url)
            )),
        }
    }

    /// A `listen` section may set only some keys: the address left out stays the listener's
    /// default (a section written to raise a cap moved its listener to a random port, so
    /// agents and the admin commands could no longer reach kas). `webhooks` and `web` have
    /// no default address: their section must name one.
    fn fill_listen_addresses(&mut self) -> Result<(), String> {
        let defaults = [
            (&mut self.agent.listen, AGENT_PORT),
            (&mut self.kubernetes_api.listen, KUBERNETES_API_PORT),
            (&mut self.api.listen, API_PORT),
            (&mut self.observability.listen, OBSERVABILITY_PORT),
        ];
        for (l, port) in defaults {
            l.address
                .get_or_insert(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        let own = [
            ("webhooks", &self.webhooks.listen),
            ("web", &self.web.listen),
        ];
        match own
            .iter()
            .find(|(_, l)| l.as_ref().is_some_and(|l| l.address.is_none()))
        {
            Some((name, _)) => Err(format!(
                "{name}.listen.address is required: this listener has no default address"
            )),
            None => Ok(()),
        }
    }

    fn validate_listeners(&self) -> Result<(), String> {
        let mut all = vec![
            ("agent.listen", &self.agent.listen),
            ("kubernetes_api.listen", &self.kubernetes_api.listen),
            ("api.listen", &self.api.listen),
            ("observability.listen", &self.observability.listen),
        ];
        if let Some(w) = &self.webhooks.listen {
            all.push(("webhooks.listen", w));
        }
        if let Some(w) = &self.web.listen {
            all.push(("web.listen", w));
        }
        for (name, l) in all {
            if l.certificate_file.is_some() != l.key_file.is_some() {
                return Err(format!("{name}: certificate_file and key_file go together"));
            }
            l.validate_limits(name)?;
        }
        let a = &self.agent.listen;
        if a.header_timeout.is_some() || a.idle_timeout.is_some() {
            return Err("agent.listen: header_timeout and idle_timeout do not apply to agents' long-lived HTTP/2 connections (handshake_timeout covers their start)".into());
        }
        Ok(())
    }

    /// Whether webhooks have their own listener (else they share the internal API's).
    pub fn separate_webhooks(&self) -> bool {
        self.webhooks.listen.is_some()
    }

    /// The configured database: PostgreSQL when `database.url` is set, else SQLite.
    pub fn database_location(&self) -> DatabaseLocation {
        match &self.database.url {
            Some(url) => DatabaseLocation::Postgres(url.clone()),
            None => DatabaseLocation::Sqlite(self.sqlite_path()),
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.database
            .sqlite_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kas.sqlite"))
    }

    pub fn git_cache_dir(&self) -> PathBuf {
        self.git
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("git"))
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.api
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin-token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("kas.yaml"))
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c = parse("").expect("valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.agent.listen.address().to_string(), "127.0.0.1:8150");
        assert_eq!(c.agent.tunnel_wait_timeout, Duration::from_secs(20));
        assert_eq!(c.sqlite_path(), PathBuf::from("kas-data/kas.sqlite"));
    }

    #[test]
    fn database_is_sqlite_unless_a_postgres_url_is_set() {
        let c = parse("data_dir: /d\n").expect("valid");
        assert_eq!(
            c.database_location(),
            DatabaseLocation::Sqlite(PathBuf::from("/d/kas.sqlite"))
        );
        let c = parse("database:\n  url: postgres://kas:pw@db:5432/kas\n").expect("valid");
        assert_eq!(
            c.database_location(),
            DatabaseLocation::Postgres("postgres://kas:pw@db:5432/kas".into())
        );
        assert_eq!(
            c.database_location().to_string(),
            "postgres://kas:***@db:5432/kas"
        );
        let both = parse("database:\n  url: postgres://db/kas\n  sqlite_path: /d/kas.sqlite\n");
        let err = both.expect_err("both at once").to_string();
        assert!(err.contains("exclusive"), "{err}");
        let err = parse("database:\n  url: mysql://u:secret@db/kas\n")
            .expect_err("not postgres")
            .to_string();
        assert!(err.contains("postgres://"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn durations_and_addresses_parse() {
        let c = parse(
            "agent:\n  listen:\n    address: 127.0.0.1:9000\n  tunnel_wait_timeout: 3s\n  token_recheck_interval: 500ms\n",
        )
        .expect("valid");
        assert_eq!(c.agent.listen.address().port(), 9000);
        assert_eq!(c.agent.tunnel_wait_timeout, Duration::from_secs(3));
        assert_eq!(c.agent.token_recheck_interval, Duration::from_millis(500));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = parse("agent:\n  tunel_wait_timeout: 3s\n").expect_err("typo");
        assert!(e.to_string().contains("tunel_wait_timeout"), "{e}");
        assert!(e.to_string().contains("kas.yaml"), "{e}");
    }

    #[test]
    fn half_a_tls_pair_is_an_error() {
        let e = parse("agent:\n  listen:\n    certificate_file: /x.pem\n").expect_err("no key");
        assert!(e.to_string().contains("agent.listen"), "{e}");
    }

    #[test]
    fn chart_repositories_must_be_plain_http_or_oci_urls_and_default_to_none() {
        let c = parse("data_dir: /d\n").expect("valid");
        let charts = c.gitops.render.config(&c.data_dir).charts;
        assert!(charts.allowed.is_empty());
        assert_eq!(charts.cache_dir, Some(PathBuf::from("/d/charts")));
        let c = parse("gitops:\n  render:\n    chart_repositories:\n    - https://charts.example.com/stable\n    - oci://registry.example.com/charts\n")
            .expect("valid");
        assert_eq!(
            c.gitops.render.chart_repositories,
            [
                "https://charts.example.com/stable",
                "oci://registry.example.com/charts"
            ]
        );
        for bad in [
            "ftp://registry.example.com/charts",
            "https://u:pw@charts.example.com/",
            "oci://u:pw@registry.example.com/charts",
        ] {
            let e = parse(&format!(
                "gitops:\n  render:\n    chart_repositories:\n    - {bad}\n"
            ))
            .expect_err(bad)
            .to_string();
            assert!(e.contains("gitops.render.chart_repositories"), "{e}");
        }
    }

    #[test]
    fn remote_bases_are_git_url_prefixes_and_default_to_none() {
        let c = parse("data_dir: /d\n").expect("valid");
        let bases = c.gitops.render.config(&c.data_dir).remote_bases;
        assert!(bases.allowed.is_empty());
        assert_eq!(bases.cache_dir, Some(PathBuf::from("/d/remote-bases")));
        let c = parse("gitops:\n  render:\n    remote_bases:\n    - https://github.com/org/\n    - git://git.internal/infra\n")
            .expect("valid");
        assert_eq!(
            c.gitops.render.remote_bases,
            ["https://github.com/org/", "git://git.internal/infra"]
        );
        for bad in [
            "github.com/org",
            "ssh://git@github.com/org",
            "file:///srv/git",
            "https://u:pw@github.com/org",
        ] {
            let e = parse(&format!(
                "gitops:\n  render:\n    remote_bases:\n    - {bad}\n"
            ))
            .expect_err(bad)
            .to_string();
            assert!(e.contains("gitops.render.remote_bases"), "{e}");
        }
    }

    #[test]
    fn remote_bases_are_fetched_at_most_once_a_minute_unless_set_otherwise() {
        let c = parse("data_dir: /d\n").expect("valid");
        let bases = c.gitops.render.config(&c.data_dir).remote_bases;
        assert_eq!(bases.fetch_interval, Duration::from_secs(60));
        let c = parse("gitops:\n  render:\n    remote_base_fetch_interval: 0s\n").expect("valid");
        let bases = c.gitops.render.config(&c.data_dir).remote_bases;
        assert_eq!(bases.fetch_interval, Duration::ZERO);
    }

    #[test]
    fn plain_http_registries_are_loopback_ones_only() {
        let yaml = |entry: &str| {
            format!("gitops:\n  render:\n    plain_http_registries:\n    - {entry}\n")
        };
        let c = parse(&yaml("oci://127.0.0.1:5000")).expect("valid");
        let charts = c.gitops.render.config(&c.data_dir).charts;
        assert_eq!(charts.plain_http, ["oci://127.0.0.1:5000"]);
        for bad in ["oci://registry.example.com", "http://127.0.0.1:5000"] {
            let e = parse(&yaml(bad)).expect_err(bad).to_string();
            assert!(e.contains("gitops.render.plain_http_registries"), "{e}");
        }
    }

    #[test]
    fn chart_repository_credentials_are_basic_or_bearer_files_and_reach_the_renderer() {
        let yaml = |entry: &str| {
            format!("gitops:\n  render:\n    chart_repository_credentials:\n    - {entry}\n")
        };
        let c = parse(&yaml(
            "{url: 'https://h/private', username: reader, password_file: /s/pw}",
        ))
        .expect("valid");
        let creds = c.gitops.render.config(&c.data_dir).charts.credentials;
        assert_eq!(creds.len(), 1);
        assert_eq!(creds[0].password_file, Some(PathBuf::from("/s/pw")));
        parse(&yaml("{url: 'https://h/private', token_file: /s/token}")).expect("valid");
        for bad in [
            "{url: 'https://h/private', username: reader, password_file: /s/pw, token_file: /s/t}",
            "{url: 'https://h/private', username: reader}",
            "{url: 'ftp://h/private', token_file: /s/t}",
        ] {
            let e = parse(&yaml(bad)).expect_err(bad).to_string();
            assert!(
                e.contains("gitops.render.chart_repository_credentials"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_bad_log_level_is_an_error() {
        let e = parse("observability:\n  logging:\n    level: loud\n").expect_err("level");
        assert!(e.to_string().contains("observability.logging.level"), "{e}");
    }

    #[test]
    fn by_default_one_caller_reaches_its_429_before_its_addresss_connection_cap() {
        assert_eq!(Config::default().per_caller_unreachable(), None);
        let mut c = Config::default();
        c.kubernetes_api.max_requests_per_caller = 1024;
        let said = c.per_caller_unreachable().expect("a warning");
        assert!(
            said.starts_with("kubernetes_api.listen.max_connections_per_address (1024) is not above kubernetes_api.max_requests_per_caller (1024)"),
            "{said}"
        );
    }

    #[test]
    fn listener_limits_default_per_listener_and_override_per_key() {
        let c = parse(
            "kubernetes_api:\n  listen:\n    header_timeout: 2s\n    max_connections_per_address: 3\n",
        )
        .expect("valid");
        let k = c.kubernetes_api.listen.limits(KUBERNETES_API_LIMITS);
        assert_eq!(k.header_timeout, Duration::from_secs(2));
        assert_eq!(k.max_connections_per_address, 3);
        assert_eq!(k.idle_timeout, KUBERNETES_API_LIMITS.idle_timeout);
        assert_eq!(k.max_connections, KUBERNETES_API_LIMITS.max_connections);
        assert_eq!(c.api.listen.limits(API_LIMITS), API_LIMITS);
        assert!(!c.separate_webhooks());
    }

    /// A section setting only a limit keeps the listener's address (it moved the listener to
    /// a random port); a listener without a default address needs one written.
    #[test]
    fn a_listen_section_without_an_address_keeps_the_listeners_default_address() {
        let c = parse(
            "agent: {listen: {max_connections: 100}}\napi: {listen: {max_connections: 10}}\n\
             observability: {listen: {max_connections: 10}}\n\
             kubernetes_api: {listen: {max_connections: 10}}\n",
        )
        .expect("valid");
        let addresses = [
            c.agent.listen.address(),
            c.observability.listen.address(),
            c.api.listen.address(),
            c.kubernetes_api.listen.address(),
        ];
        let expected = [
            "127.0.0.1:8150",
            "127.0.0.1:8151",
            "127.0.0.1:8153",
            "127.0.0.1:8154",
        ];
        assert_eq!(addresses.map(|a| a.to_string()), expected);
        assert_eq!(c.agent.listen.limits(AGENT_LIMITS).max_connections, 100);
        for name in ["webhooks", "web"] {
            let e = parse(&format!("{name}:\n  listen:\n    max_connections: 5\n"))
                .expect_err("no address");
            let said = e.to_string();
            assert!(
                said.contains(&format!("{name}.listen.address is required")),
                "{said}"
            );
        }
    }

    #[test]
    fn the_web_ui_is_off_by_default_and_its_oidc_keys_have_defaults() {
        let c = parse("").expect("valid");
        assert_eq!(c.web.listen, None);
        let c = parse(
            "web:\n  listen:\n    address: 127.0.0.1:8156\n  oidc:\n    issuer: https://idp\n    \
             client_id: web\n    redirect_url: http://127.0.0.1:8156/login/oidc/callback\n",
        )
        .expect("valid");
        let o = c.web.oidc.expect("oidc");
        assert_eq!(o.username_claim, "preferred_username");
        assert_eq!(o.groups_claim, "groups");
        assert_eq!(c.web.session_ttl, Duration::from_secs(8 * 3600));
        let e = parse("web:\n  oidc:\n    issuer: i\n    client_id: c\n    redirect_url: r\n")
            .expect_err("oidc without a listener");
        assert!(e.to_string().contains("web.oidc needs web.listen"), "{e}");
        let e = parse("web:\n  session_ttl: 0s\n").expect_err("zero");
        assert!(e.to_string().contains("web.session_ttl"), "{e}");
    }

    #[test]
    fn limits_that_cannot_work_are_errors() {
        let e = parse("api:\n  listen:\n    max_connections: 0\n").expect_err("zero cap");
        assert!(e.to_string().contains("api.listen"), "{e}");
        let e = parse("kubernetes_api:\n  listen:\n    header_timeout: 0s\n").expect_err("zero");
        assert!(e.to_string().contains("header_timeout"), "{e}");
        let e = parse("agent:\n  listen:\n    idle_timeout: 5s\n").expect_err("agent idle");
        assert!(e.to_string().contains("agent.listen"), "{e}");
        let e = parse("observability:\n  listen:\n    max_connections: 0\n").expect_err("obs");
        assert!(e.to_string().contains("observability.listen"), "{e}");
        let c = parse("observability:\n  listen:\n    max_connections: 5\n").expect("obs caps");
        let caps = c.observability.listen.limits(OBSERVABILITY_LIMITS);
        assert_eq!(caps.max_connections, 5);
    }

    #[test]
    fn a_webhooks_listener_with_tls_parses() {
        let c = parse(
            "webhooks:\n  listen:\n    address: 0.0.0.0:8155\n    certificate_file: /c.pem\n    key_file: /k.pem\n",
        )
        .expect("valid");
        assert!(c.separate_webhooks());
        let w = c.webhooks.listen.expect("listen");
        assert_eq!(w.address().port(), 8155);
        let e = parse("webhooks:\n  listen:\n    key_file: /k.pem\n").expect_err("half pair");
        assert!(e.to_string().contains("webhooks.listen"), "{e}");
    }

    #[test]
    fn the_example_configuration_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/kas.yaml");
        let c = Config::load(&p).expect("example config");
        assert_eq!(c.agent.tunnel_wait_timeout, Duration::from_secs(20));
        assert_eq!(c.database.statement_timeout, Duration::from_secs(60));
    }

    /// Two issuers must say whose projects each speaks for, without overlap, or kas does not
    /// start; one issuer alone may leave it out.
    #[test]
    fn several_ci_issuers_need_disjoint_namespaces() {
        let issuers = |gl: &str, gh: &str| {
            format!(
                "kubernetes_api:\n  ci_issuers:\n  - issuer: https://gitlab.example\n    audience: kas\n    jwks:\n      file: /gl.json\n{gl}  - issuer: https://token.actions.githubusercontent.com\n    audience: kas\n    jwks:\n      file: /gh.json\n    claims:\n      project_path: repository\n{gh}"
            )
        };
        let err = parse(&issuers("    namespaces: [acme]\n", ""))
            .expect_err("the GitHub issuer lists no namespaces")
            .to_string();
        assert!(
            err.contains("ci_issuers[1] (https://token.actions.githubusercontent.com)")
                && err.contains("namespaces"),
            "{err}"
        );
        let err = parse(&issuers(
            "    namespaces: [acme]\n",
            "    namespaces: [Acme]\n",
        ))
        .expect_err("acme claimed twice")
        .to_string();
        assert!(
            err.contains("ci_issuers[0] (https://gitlab.example)") && err.contains("overlap"),
            "{err}"
        );
        let c = parse(&issuers(
            "    namespaces: [acme]\n",
            "    namespaces: [acme-gh]\n",
        ))
        .expect("disjoint namespaces");
        assert_eq!(
            c.kubernetes_api.ci_issuers[1].namespaces,
            Some(vec!["acme-gh".to_owned()])
        );
        let single = "kubernetes_api:\n  ci_issuers:\n  - issuer: https://gitlab.example\n    audience: kas\n    jwks:\n      file: /gl.json\n";
        assert_eq!(
            parse(single).expect("one issuer").kubernetes_api.ci_issuers[0].namespaces,
            None
        );
    }

    #[test]
    fn plain_http_jwks_urls_and_repeated_issuers_stop_kas() {
        let issuer = |jwks: &str| {
            format!(
                "  - issuer: https://gitlab.example\n    audience: kas\n    jwks:\n      {jwks}\n"
            )
        };
        let http = format!(
            "kubernetes_api:\n  ci_issuers:\n{}",
            issuer("url: http://gitlab.example/oauth/discovery/keys")
        );
        let err = parse(&http).expect_err("http JWKS URL").to_string();
        assert!(
            err.contains("kubernetes_api.ci_issuers[0] (https://gitlab.example)")
                && err.contains("not https"),
            "{err}"
        );
        let https = issuer("url: https://gitlab.example/oauth/discovery/keys");
        assert!(parse(&format!("kubernetes_api:\n  ci_issuers:\n{https}")).is_ok());
        let twice = format!(
            "kubernetes_api:\n  ci_issuers:\n{https}    namespaces: [a]\n{}    namespaces: [b]\n",
            issuer("file: /keys.json")
        );
        let err = parse(&twice).expect_err("listed twice").to_string();
        assert!(err.contains("ci_issuers[0] and ci_issuers[1]"), "{err}");
    }

    #[test]
    fn the_jwks_max_key_age_is_a_day_by_default_and_at_least_the_refresh_interval() {
        let c = parse("").expect("valid");
        assert_eq!(
            c.kubernetes_api.jwks_max_key_age,
            Duration::from_secs(86_400)
        );
        let c = parse("kubernetes_api:\n  jwks_max_key_age: 6h\n").expect("valid");
        assert_eq!(
            c.kubernetes_api.jwks_max_key_age,
            Duration::from_secs(6 * 3600)
        );
        let err = parse("kubernetes_api:\n  jwks_max_key_age: 10m\n")
            .expect_err("shorter than the refresh")
            .to_string();
        assert!(err.contains("jwks_max_key_age"), "{err}");
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_database_url_is_read_from_its_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("url");
        std::fs::write(&url, "postgres://kas:secret@db/kas\n").unwrap();
        let cfg = dir.path().join("kas.yaml");
        std::fs::write(&cfg, format!("database:\n  url_file: {}\n", url.display())).unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(
            c.database.url.as_deref(),
            Some("postgres://kas:secret@db/kas")
        );
        assert_eq!(c.database.url_read_from.as_deref(), Some(url.as_path()));
        std::fs::write(&url, "mysql://db\n").unwrap();
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("postgres://") && !e.contains("secret"), "{e}");
        let both = format!(
            "database:\n  url: postgres://db/kas\n  url_file: {}\n",
            url.display()
        );
        assert!(parse(&both).unwrap_err().to_string().contains("exclusive"));
    }
}
