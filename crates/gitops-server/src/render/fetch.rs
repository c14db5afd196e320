//! Chart dependencies fetched by kas itself, outside the renderers' sandbox (which keeps no
//! network): each repository's `index.yaml`, kept for `index_ttl`, and chart archives, checked
//! against the index's SHA-256 and kept on disk by digest, beside each chart's last resolution
//! (so a kas restarted while a repository is down still renders with the archive it keeps).
//! Only URLs of the allow list are asked; redirects are not followed; every answer has a time
//! and size limit; credentials (see [`super::credentials`]) go only to URLs under their prefix,
//! and a repository refusing them (401, 403) fails the rendering, nothing kept of it used.
//! Charts of OCI registries (`oci://`) are read by [`registry`]: the tag list stands for the
//! index, the manifest's chart layer for the archive.

mod records;
mod registry;

use records::Recorded;
use registry::{Kept, Tokens};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tether_transport::with_causes;
use url::Url;

use super::RenderError;
use super::credentials::{ChartCredential, authorization, credential_for};
use super::dependencies::{
    self, AllowList, ChartIndex, Dependency, Resolved, index_url, looks_gzipped, parse_index,
    sha256_hex,
};
use super::oci;
use super::resolutions::Stale;

/// Why a chart was not resolved: its caller names what asked for it (a dependency of a chart,
/// or `helm.repository`).
#[derive(Debug)]
pub enum Unresolved {
    /// This URL (the repository, or the archive's URL in its index) is not allowed.
    NotAllowed(String),
    /// The index has no version of the chart matching the constraint, or no usable entry.
    NoVersion(String),
    /// The index could not be fetched.
    Failed(RenderError),
}

/// Where kas may fetch chart dependencies from, and the bounds of each fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartRepoConfig {
    /// URL prefixes of the chart repositories (and archive locations) allowed; empty: none,
    /// dependencies must be vendored.
    pub allowed: Vec<String>,
    /// Longest one request (answer and body) may take.
    pub timeout: Duration,
    /// Largest `index.yaml`, in bytes.
    pub max_index_size: u64,
    /// Largest chart archive, in bytes.
    pub max_archive_size: u64,
    /// How long a fetched index is used before it is fetched again.
    pub index_ttl: Duration,
    /// Where archives are kept by digest; none kept when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of archives kept there; the least recently used go first.
    pub cache_size: u64,
    /// CA certificates trusted for HTTPS repositories instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Credentials sent to private repositories, each only to URLs under its prefix.
    pub credentials: Vec<ChartCredential>,
    /// Registries (`oci://host[:port]`, loopback only) read over plain HTTP instead of HTTPS.
    pub plain_http: Vec<String>,
}

impl Default for ChartRepoConfig {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            timeout: Duration::from_secs(30),
            max_index_size: 64 << 20,
            max_archive_size: 20 << 20,
            index_ttl: Duration::from_secs(60),
            cache_dir: None,
            cache_size: 512 << 20,
            ca_file: None,
            credentials: Vec::new(),
            plain_http: Vec::new(),
        }
    }
}

/// Why a request to a chart repository failed.
#[derive(Debug)]
enum Failure {
    /// It answered 401 or 403: kas's credentials (or their absence) are refused. Nothing kept
    /// is used then: access was withdrawn, or the kas operator must fix the credentials.
    Denied(String),
    /// Anything else (unreachable, an HTTP error, too large, too slow).
    Other(String),
}

impl From<String> for Failure {
    fn from(detail: String) -> Self {
        Failure::Other(detail)
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// An answer, its body read (within its size limit).
struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

/// An index as last fetched.
#[derive(Debug)]
struct Fetched {
    at: Instant,
    /// The same moment, as the warnings of a stale resolution name it.
    wall: SystemTime,
    index: Arc<ChartIndex>,
}

/// A repository's index as [`ChartFetcher::index`] gives it.
#[derive(Debug, Clone)]
pub struct IndexAt {
    /// The index's URL.
    pub url: Url,
    pub index: Arc<ChartIndex>,
    /// When it was fetched.
    pub fetched_at: SystemTime,
    /// Why it could not be fetched again, when this is an earlier copy.
    pub stale: Option<String>,
}

/// What a chart resolved to, and whether its index was not fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub resolved: Resolved,
    /// Set when the repository could not be read and an earlier index (in memory, or the
    /// resolution kept on disk) was used.
    pub stale: Option<Stale>,
}

/// Fetches indexes and archives for every rendering of this kas.
#[derive(Debug)]
pub struct ChartFetcher {
    config: ChartRepoConfig,
    allow: AllowList,
    /// The client, or why there is none (the CA file could not be read).
    client: Result<HttpClient, String>,
    /// One slot per index URL: renderings wanting the same index wait for one fetch.
    indexes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Fetched>>>>>,
    /// The resolutions last written to disk, by file name: unchanged ones are not rewritten,
    /// and records no chart used for long are deleted (see [`records`]).
    recorded: Mutex<Recorded>,
    /// The last resolution of each chart of a registry, by its record's file name: the tag
    /// list and manifest are read again only past `index_ttl`.
    oci: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Kept>>>>>,
    /// Registry tokens, reused within their life (see [`Tokens`]).
    tokens: Tokens,
    /// The registries read over plain HTTP (loopback ones only).
    plain_http: Vec<url::Url>,
    metrics: ChartFetchMetrics,
}

/// Fetches by what was fetched (`index`, `archive`) and outcome.
#[derive(Debug, Clone, Default)]
pub struct ChartFetchMetrics {
    fetches: Family<FetchLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabel {
    kind: &'static str,
    outcome: &'static str,
}

impl ChartFetchMetrics {
    /// Registers `gitops_chart_fetches_total`.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "gitops_chart_fetches",
            "Chart repository requests and cache uses for chart dependencies and helm.repository charts, by kind (index, archive, manifest, token, registry) and outcome (fetched, cached, stale, recorded, failed, digest_mismatch, unchanged, throttled; recorded: the repository could not be read and the resolution kept on disk was used; manifest unchanged: a HEAD showed the registry manifest kept is still its tag's, no GET; token cached: a registry token reused within its life; registry throttled: a 429 answer)",
            self.fetches.clone(),
        );
    }

    fn count(&self, kind: &'static str, outcome: &'static str) {
        self.fetches
            .get_or_create(&FetchLabel { kind, outcome })
            .inc();
    }
}

impl ChartFetcher {
    /// A fetcher for `config`; `None` when no repository is allowed. The allow list was
    /// checked with the configuration (an entry that is not a URL allows nothing).
    pub fn new(config: ChartRepoConfig) -> Option<Self> {
        let allow = match AllowList::new(&config.allowed) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "gitops.render.chart_repositories is invalid: kas fetches no chart dependency");
                AllowList::default()
            }
        };
        if allow.is_empty() {
            return None;
        }
        let client = client(config.ca_file.as_deref());
        if let Err(e) = &client {
            tracing::error!(error = %e, "Cannot set up HTTPS for chart repositories: charts with dependencies to fetch fail to render");
        }
        if let Some(dir) = &config.cache_dir
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::error!(dir = %dir.display(), error = %e, "Cannot create the chart archive cache: archives are fetched at every rendering");
        }
        tracing::info!(repositories = ?config.allowed, "Chart dependencies are fetched from these repositories");
        let plain_http = config
            .plain_http
            .iter()
            .filter_map(|r| match oci::plain_http_registry(r) {
                Ok(url) => Some(url),
                Err(e) => {
                    tracing::error!(error = %e, "gitops.render.plain_http_registries: ignored, read over HTTPS");
                    None
                }
            })
            .collect();
        Some(Self {
            config,
            allow,
            client,
            indexes: Mutex::default(),
            recorded: Mutex::default(),
            oci: Mutex::default(),
            tokens: Tokens::default(),
            plain_http,
            metrics: ChartFetchMetrics::default(),
        })
    }

    /// The allow list.
    pub fn allow(&self) -> &AllowList {
        &self.allow
    }

    /// The fetch counters.
    pub fn metrics(&self) -> &ChartFetchMetrics {
        &self.metrics
    }

    /// `repository`'s index: kept if fetched within `index_ttl`, else fetched; when that
    /// fails, the last one fetched (its archives are likely cached), else the failure.
    pub async fn index(&self, repository: &str) -> Result<IndexAt, RenderError> {
        let url = index_url(repository).map_err(|detail| RenderError::ChartRepository {
            url: repository.into(),
            detail,
        })?;
        let slot = {
            let mut all = self.indexes.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(all.entry(url.to_string()).or_default())
        };
        let mut kept = slot.lock().await;
        let at = |f: &Fetched, stale: Option<String>| IndexAt {
            url: url.clone(),
            index: Arc::clone(&f.index),
            fetched_at: f.wall,
            stale,
        };
        if let Some(f) = kept
            .as_ref()
            .filter(|f| f.at.elapsed() < self.config.index_ttl)
        {
            self.metrics.count("index", "cached");
            return Ok(at(f, None));
        }
        let fetched = match self
            .get(&url, self.config.max_index_size, "max_chart_index_size")
            .await
        {
            Ok(bytes) => parse_index(&bytes),
            Err(Failure::Other(detail)) => Err(detail),
            Err(Failure::Denied(detail)) => {
                self.metrics.count("index", "denied");
                return Err(denied(repository, detail));
            }
        };
        match fetched {
            Ok(index) => {
                self.metrics.count("index", "fetched");
                let f = kept.insert(Fetched {
                    at: Instant::now(),
                    wall: SystemTime::now(),
                    index: Arc::new(index),
                });
                Ok(at(f, None))
            }
            Err(detail) => match kept.as_ref() {
                Some(f) => {
                    self.metrics.count("index", "stale");
                    Ok(at(f, Some(detail)))
                }
                None => {
                    self.metrics.count("index", "failed");
                    Err(RenderError::ChartRepository {
                        url: url.to_string(),
                        detail,
                    })
                }
            },
        }
    }

    /// `chart`'s newest version matching its constraint in its repository's index (fetched
    /// or kept, see [`ChartFetcher::index`]) or a registry's tag list (see
    /// [`ChartFetcher::oci_resolve`]); the repository and the archive's URL must both be
    /// allowed. When the repository cannot be read and nothing is in memory (kas restarted
    /// meanwhile), the resolution kept on disk. The one resolution of chart dependencies and
    /// of `helm.repository` charts.
    pub async fn resolve(&self, chart: &Dependency) -> Result<Resolution, Unresolved> {
        if !self.allow.allows(&chart.repository) {
            return Err(Unresolved::NotAllowed(chart.repository.clone()));
        }
        let fresh = if oci::is_oci(&chart.repository) {
            self.oci_resolve(chart).await
        } else {
            self.index_resolve(chart).await
        };
        let resolution = match fresh {
            // Fail closed: refused credentials are not worked around with what was kept.
            Err(Unresolved::Failed(e))
                if !matches!(e, RenderError::ChartRepositoryDenied { .. }) =>
            {
                self.recorded_instead(chart, e).await?
            }
            other => other?,
        };
        if let Some(stale) = &resolution.stale {
            tracing::warn!(chart = %chart.name, version = %resolution.resolved.version, "{}", stale.warning());
        }
        if !self.allow.allows(&resolution.resolved.url) {
            return Err(Unresolved::NotAllowed(format!(
                "{} (its archive's URL in the index of {})",
                resolution.resolved.url, chart.repository
            )));
        }
        Ok(resolution)
    }

    /// `chart` resolved in its repository's index (see [`ChartFetcher::index`]), kept on disk
    /// when the index is fresh.
    async fn index_resolve(&self, chart: &Dependency) -> Result<Resolution, Unresolved> {
        let at = self
            .index(&chart.repository)
            .await
            .map_err(Unresolved::Failed)?;
        let resolved =
            dependencies::resolve(chart, &at.index, &at.url).map_err(Unresolved::NoVersion)?;
        if at.stale.is_none() {
            self.record(chart, &resolved, None, at.fetched_at).await;
        }
        let stale = at.stale.map(|error| Stale {
            repository: chart.repository.clone(),
            fetched_at: at.fetched_at,
            error,
        });
        Ok(Resolution { resolved, stale })
    }

    /// The resolution of `chart` kept on disk, as a stale one, its repository having failed
    /// with `e`; `e` when none is kept.
    async fn recorded_instead(
        &self,
        chart: &Dependency,
        e: RenderError,
    ) -> Result<Resolution, Unresolved> {
        let Some(record) = self.recorded(chart).await else {
            return Err(Unresolved::Failed(e));
        };
        self.metrics.count("index", "recorded");
        let error = match e {
            RenderError::ChartRepository { detail, .. } => detail,
            other => other.to_string(),
        };
        Ok(Resolution {
            resolved: record.resolved(),
            stale: Some(Stale {
                repository: chart.repository.clone(),
                fetched_at: record.fetched_at(),
                error,
            }),
        })
    }

    /// The archive of `resolved`, from the cache or fetched, its SHA-256 checked against the
    /// index's.
    pub async fn archive(&self, resolved: &Resolved) -> Result<Vec<u8>, RenderError> {
        if let Some(bytes) = self.cached(&resolved.digest).await {
            self.metrics.count("archive", "cached");
            return Ok(bytes);
        }
        let fetched = if oci::is_oci(&resolved.url) {
            self.blob(resolved).await
        } else {
            match Url::parse(&resolved.url) {
                Ok(url) => {
                    self.get(&url, self.config.max_archive_size, "max_chart_size")
                        .await
                }
                Err(e) => Err(Failure::Other(e.to_string())),
            }
        };
        let bytes = fetched.map_err(|failure| {
            self.metrics.count("archive", "failed");
            match failure {
                Failure::Denied(detail) => denied(&resolved.url, detail),
                Failure::Other(detail) => RenderError::ChartRepository {
                    url: resolved.url.clone(),
                    detail,
                },
            }
        })?;
        let got = sha256_hex(&bytes);
        if got != resolved.digest || !looks_gzipped(&bytes) {
            self.metrics.count("archive", "digest_mismatch");
            return Err(RenderError::DigestMismatch {
                chart: format!("{} {}", resolved.name, resolved.version),
                url: resolved.url.clone(),
                expected: resolved.digest.clone(),
                got,
            });
        }
        self.metrics.count("archive", "fetched");
        self.keep(&resolved.digest, &bytes).await;
        Ok(bytes)
    }

    /// The body of a `GET` of `url` (allowed, a 2xx answer, at most `max` bytes, within the
    /// timeout); why not, otherwise. `limit` names the setting bounding the size.
    async fn get(&self, url: &Url, max: u64, limit: &str) -> Result<Vec<u8>, Failure> {
        if !self.allow.allows(url.as_str()) {
            return Err(Failure::Other(
                "not under gitops.render.chart_repositories".into(),
            ));
        }
        let credential = credential_for(&self.config.credentials, url.as_str());
        let authorization = match credential {
            Some(c) => Some(self.authorization(c).await?),
            None => None,
        };
        let answer = self.send(url, None, authorization, (max, limit)).await?;
        let status = answer.status;
        if status.is_redirection() {
            let to = answer
                .headers
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or_default();
            return Err(Failure::Other(format!(
                "answered {status}, a redirect to {to:?}: kas follows no redirect (name the final location in the chart, and allow it)"
            )));
        }
        if is_refusal(status) {
            return Err(Failure::Denied(refusal(status, credential)));
        }
        if !status.is_success() {
            return Err(format!("answered {status}").into());
        }
        Ok(answer.body)
    }

    /// The answer to a `GET` of `url` with `accept` and `authorization` (sensitive), whatever
    /// its status, its body at most `max` bytes (`limit` names the setting), all within the
    /// timeout. No redirect is followed.
    async fn send(
        &self,
        url: &Url,
        accept: Option<&str>,
        authorization: Option<http::HeaderValue>,
        limit: (u64, &str),
    ) -> Result<Answer, Failure> {
        self.send_as(http::Method::GET, url, accept, authorization, limit)
            .await
    }

    /// As [`ChartFetcher::send`], with `method` (a `HEAD` is answered without a body).
    async fn send_as(
        &self,
        method: http::Method,
        url: &Url,
        accept: Option<&str>,
        authorization: Option<http::HeaderValue>,
        (max, limit): (u64, &str),
    ) -> Result<Answer, Failure> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(http::header::USER_AGENT, "tether-kas")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        if let Some(accept) = accept.and_then(|a| http::HeaderValue::from_str(a).ok()) {
            headers.insert(http::header::ACCEPT, accept);
        }
        if let Some(value) = authorization {
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let exchange = async {
            let answer = client.request(request).await.map_err(|e| with_causes(&e))?;
            let (parts, body) = answer.into_parts();
            let max_usize = usize::try_from(max).unwrap_or(usize::MAX);
            let body = Limited::new(body, max_usize).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("larger than {max} bytes (gitops.render.{limit})")
                } else {
                    with_causes(&*e)
                }
            })?;
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes().to_vec(),
            })
        };
        tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| {
                Failure::Other(format!(
                    "no complete answer within {:?} (gitops.render.chart_fetch_timeout)",
                    self.config.timeout
                ))
            })?
    }

    /// The `Authorization` header of `credential`, its secret read now (a rotated Secret is
    /// used at once). Errors name the credential's URL and file, never the secret.
    async fn authorization(
        &self,
        credential: &ChartCredential,
    ) -> Result<http::HeaderValue, Failure> {
        let Some(file) = credential.secret_file().cloned() else {
            return Err(Failure::Other(format!(
                "the credentials for {} name no file",
                credential.url
            )));
        };
        let read = tokio::task::spawn_blocking({
            let file = file.clone();
            move || std::fs::read_to_string(file)
        })
        .await
        .map_err(|e| e.to_string())?;
        let secret = read.map_err(|e| {
            format!(
                "cannot read the credentials for {} from {}: {e}",
                credential.url,
                file.display()
            )
        })?;
        Ok(authorization(credential, &secret)?)
    }

    /// The archive of `digest` from the cache, checked again (a disk may corrupt it).
    async fn cached(&self, digest: &str) -> Option<Vec<u8>> {
        let dir = self.config.cache_dir.clone()?;
        let digest = digest.to_owned();
        tokio::task::spawn_blocking(move || read_cached(&dir, &digest))
            .await
            .ok()
            .flatten()
    }

    /// Keeps `bytes` as the archive of `digest`, then trims the cache to its size.
    async fn keep(&self, digest: &str, bytes: &[u8]) {
        let Some(dir) = self.config.cache_dir.clone() else {
            return;
        };
        let (digest, bytes, bound) = (digest.to_owned(), bytes.to_vec(), self.config.cache_size);
        let kept = tokio::task::spawn_blocking(move || {
            write_cached(&dir, &digest, &bytes)?;
            trim(&dir, bound, &digest)
        })
        .await;
        match kept {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Cannot keep a chart archive in the cache"),
            Err(e) => tracing::warn!(error = %e, "Cannot keep a chart archive in the cache"),
        }
    }
}

/// Whether `status` refuses kas's credentials (or their absence).
fn is_refusal(status: http::StatusCode) -> bool {
    status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN
}

/// Why a repository refused kas with `status`, naming the credentials sent (never the secret).
fn refusal(status: http::StatusCode, credential: Option<&ChartCredential>) -> String {
    match credential {
        Some(c) => format!(
            "answered {status} to the credentials of gitops.render.chart_repository_credentials for {}",
            c.url
        ),
        None => format!(
            "answered {status}: it needs credentials, and gitops.render.chart_repository_credentials has none for it"
        ),
    }
}

fn denied(repository: &str, detail: String) -> RenderError {
    RenderError::ChartRepositoryDenied {
        repository: repository.to_owned(),
        detail,
    }
}

fn client(ca_file: Option<&Path>) -> Result<HttpClient, String> {
    let connector = tether_transport::https_connector(ca_file).map_err(|e| e.to_string())?;
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
}

fn cache_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join(format!("{digest}.tgz"))
}

fn read_cached(dir: &Path, digest: &str) -> Option<Vec<u8>> {
    let path = cache_path(dir, digest);
    let bytes = std::fs::read(&path).ok()?;
    if sha256_hex(&bytes) != digest {
        tracing::warn!(path = %path.display(), "A cached chart archive does not match its digest: fetched again");
        let _ = std::fs::remove_file(&path);
        return None;
    }
    // Its time of last use, for the least-recently-used trim.
    let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
    Some(bytes)
}

fn write_cached(dir: &Path, digest: &str, bytes: &[u8]) -> std::io::Result<()> {
    write_file(dir, &format!("{digest}.tgz"), bytes)
}

/// Written under a temporary name and renamed: a reader never sees half a file.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.persist(dir.join(name))
        .map(|_| ())
        .map_err(|e| e.error)
}

/// Deletes the least recently used archives of `dir` until at most `bound` bytes are kept;
/// `keep` (just written) stays even alone over the bound.
fn trim(dir: &Path, bound: u64, keep: &str) -> std::io::Result<()> {
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let path = e.path();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_file() && path.extension().is_some_and(|x| x == "tgz") {
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            files.push((used, meta.len(), path));
        }
    }
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    let kept = cache_path(dir, keep);
    for (_, size, path) in files {
        if total <= bound {
            break;
        }
        if path != kept {
            std::fs::remove_file(&path)?;
            total = total.saturating_sub(size);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cache_keeps_checked_archives_and_trims_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (a, b, c) = (vec![1u8; 100], vec![2u8; 100], vec![3u8; 100]);
        let (da, db, dc) = (sha256_hex(&a), sha256_hex(&b), sha256_hex(&c));
        write_cached(d, &da, &a).unwrap();
        write_cached(d, &db, &b).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        for digest in [&da, &db] {
            let f = std::fs::File::open(cache_path(d, digest)).unwrap();
            f.set_modified(old).unwrap();
        }
        // Used: a is now the most recent of the two.
        assert_eq!(read_cached(d, &da), Some(a.clone()));
        write_cached(d, &dc, &c).unwrap();
        trim(d, 200, &dc).unwrap();
        assert!(read_cached(d, &db).is_none(), "least recently used");
        assert_eq!(read_cached(d, &da), Some(a));
        assert_eq!(read_cached(d, &dc), Some(c.clone()));
        // What was just written stays, even alone over the bound.
        trim(d, 10, &dc).unwrap();
        assert_eq!(read_cached(d, &dc), Some(c));
        // A corrupted archive is not served, and is deleted.
        std::fs::write(cache_path(d, &dc), b"other").unwrap();
        assert!(read_cached(d, &dc).is_none());
        assert!(!cache_path(d, &dc).exists());
    }
}
