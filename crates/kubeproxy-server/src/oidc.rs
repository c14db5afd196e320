//! Verification of CI job ID tokens (OIDC JWTs) against trusted issuers' published keys.
//!
//! Upstream kas asks GitLab which agents a `CI_JOB_TOKEN` may use. Tether has no GitLab to ask,
//! so a job presents the OIDC ID token its CI system signs for it (GitLab `id_tokens:`, GitHub
//! Actions `id-token: write`), and kas checks it offline against the issuer's JWKS:
//!
//! - the `alg` is an asymmetric algorithm (RS*, PS*, ES256/ES384, EdDSA) that fits the key: a
//!   JWKS is public, so accepting HMAC would let anyone who reads it mint tokens;
//! - `iss` is exactly one of the [`TrustedIssuer`]s, and the key comes from that issuer's set;
//! - `aud` contains the issuer's configured audience, so a token minted for another service
//!   cannot be replayed here;
//! - `exp` is required and `nbf` honoured, both with [`DEFAULT_LEEWAY`] for clock skew, against
//!   the `now` the caller passes (tests and replays stay deterministic).
//!
//! # Claims used
//!
//! | identity field      | GitLab ([`ClaimMapping::gitlab`]) | GitHub ([`ClaimMapping::github`]) |
//! | ------------------- | --------------------------------- | --------------------------------- |
//! | `project_path`      | `project_path`                    | `repository` (`owner/repo`)       |
//! | `project_id`        | `project_id`                      | `repository_id`                   |
//! | `job_id`            | `job_id`                          | `run_id`                          |
//! | `pipeline_id`       | `pipeline_id`                     | `run_id`                          |
//! | `environment`       | `environment`                     | `environment`                     |
//! | `environment_tier`  | `deployment_tier`                 | — (GitHub has no tier)            |
//! | `namespace_path`    | `namespace_path`                  | `repository_owner`                |
//! | `user`              | `user_login`                      | `actor`                           |
//!
//! GitHub's token has no per-job number: `run_id` names the workflow run, so it stands in for
//! both the job and the pipeline, and a `ci_job` identity covers every job of the run.
//! `workflow_ref` / `job_workflow_ref` (which workflow file at which ref minted the token) are
//! not mapped yet; they are the claims to use for ref-based rules later.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::AuthError;

/// Clock skew tolerated on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Key sets older than this are reloaded on the next verification, so rotated keys are
/// picked up even when no token names them yet.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Keys not reloaded for this long (every reload failed) stop verifying: kas answers 503
/// rather than trust, during a long JWKS outage, a key the issuer may have withdrawn.
pub const DEFAULT_MAX_KEY_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// At most one reload per issuer in this interval: a flood of tokens with made-up `kid`s must
/// not turn kas into a JWKS fetch amplifier.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// The only algorithms accepted. No HMAC (see the module docs) and, by construction, no `none`.
const ACCEPTED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// An OIDC issuer whose CI ID tokens kas accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// Exact `iss` value, e.g. `https://gitlab.example.com` or
    /// `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// Audience jobs must request for kas (GitLab `id_tokens: X: aud:`; GitHub `audience=`).
    pub audience: String,
    /// Where the issuer's signing keys are published.
    pub jwks: JwksSource,
    /// Which claims carry the identity; defaults to GitLab's names.
    #[serde(default)]
    pub claims: ClaimMapping,
    /// Top-level namespaces (or deeper paths) whose projects this issuer's tokens may name;
    /// `None`: every path, allowed only when this is the sole issuer (see
    /// [`crate::validate_issuers`]). A token for a project outside them is refused (403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
}

/// Where a key set comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JwksSource {
    /// A JWKS JSON file (air-gapped setups, tests), re-read on each refresh.
    File(PathBuf),
    /// A JWKS URL (e.g. `<issuer>/oauth/discovery/keys`), fetched through the [`JwksFetcher`].
    Url(String),
}

/// Claim names the [`CiIdentity`] fields are read from. `None` means the issuer has no such
/// claim. `Default` is [`ClaimMapping::gitlab`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimMapping {
    /// Full path of the job's project (required claim).
    pub project_path: String,
    /// Numeric project id.
    pub project_id: Option<String>,
    /// Numeric job id (required claim).
    pub job_id: String,
    /// Numeric pipeline id (required claim).
    pub pipeline_id: String,
    /// Environment name.
    pub environment: Option<String>,
    /// Environment tier (`production`, `staging`, ...).
    pub environment_tier: Option<String>,
    /// Path of the namespace (group) holding the project; when absent it is derived from
    /// `project_path`.
    pub namespace_path: Option<String>,
    /// Login of the user the job runs as.
    pub user: Option<String>,
}

impl ClaimMapping {
    /// GitLab CI `id_tokens` claim names.
    pub fn gitlab() -> Self {
        ClaimMapping {
            project_path: "project_path".into(),
            project_id: Some("project_id".into()),
            job_id: "job_id".into(),
            pipeline_id: "pipeline_id".into(),
            environment: Some("environment".into()),
            environment_tier: Some("deployment_tier".into()),
            namespace_path: Some("namespace_path".into()),
            user: Some("user_login".into()),
        }
    }

    /// GitHub Actions OIDC claim names (see the module docs for `run_id`).
    pub fn github() -> Self {
        ClaimMapping {
            project_path: "repository".into(),
            project_id: Some("repository_id".into()),
            job_id: "run_id".into(),
            pipeline_id: "run_id".into(),
            environment: Some("environment".into()),
            environment_tier: None,
            namespace_path: Some("repository_owner".into()),
            user: Some("actor".into()),
        }
    }
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping::gitlab()
    }
}

/// Who a verified CI job is, as far as authorization and impersonation need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiIdentity {
    /// The trusted issuer that signed the token.
    pub issuer: String,
    /// Full path of the job's project, as the issuer spells it.
    pub project_path: String,
    /// Numeric project id, when the issuer provides one.
    pub project_id: Option<i64>,
    /// Job id.
    pub job_id: i64,
    /// Pipeline id.
    pub pipeline_id: i64,
    /// Environment name, when the job deploys to one.
    pub environment: Option<String>,
    /// Environment tier, when the issuer provides one.
    pub environment_tier: Option<String>,
    /// Path of the namespace (group or user) holding the project.
    pub namespace_path: String,
    /// Login of the user the job runs as.
    pub user: Option<String>,
}

/// A failed JWKS fetch, as reported by the [`JwksFetcher`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl FetchError {
    /// An error with a message only.
    pub fn new(message: impl Into<String>) -> Self {
        FetchError {
            message: message.into(),
            source: None,
        }
    }

    /// An error with a message and its cause.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        FetchError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Fetches a JWKS document over the network. kas implements it with its HTTP client (and its
/// TLS roots and proxy settings), which keeps this crate free of network I/O.
#[async_trait]
pub trait JwksFetcher: Send + Sync + fmt::Debug {
    /// The body of `url` (a JWKS JSON document).
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError>;
}

/// A fetcher for setups whose issuers all use [`JwksSource::File`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFetcher;

#[async_trait]
impl JwksFetcher for NoFetcher {
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::new(format!(
            "cannot fetch {url}: no JWKS fetcher configured"
        )))
    }
}

/// Why a key set could not be (re)loaded. Logged, and surfaced as
/// [`AuthError::KeysUnavailable`] only when no earlier key set is left to fall back on.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("fetching {url}: {source}")]
    Fetch { url: String, source: FetchError },
    #[error("not a JWKS document: {0}")]
    Parse(serde_json::Error),
    #[error("the key set has no usable signature key")]
    NoUsableKey,
}

/// One usable public key from a JWKS.
#[derive(Debug)]
struct PublicKey {
    kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    key: DecodingKey,
}

impl PublicKey {
    /// Converts one JWK; `None` for keys that cannot verify JWT signatures here.
    fn from_jwk(jwk: &Jwk) -> Option<Self> {
        // Encryption keys are not signature keys, whatever else they look like.
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return None;
        }
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                (AlgorithmFamily::Ed, None)
            }
            // Symmetric keys in a public document would let anyone sign; never use them.
            AlgorithmParameters::OctetKey(_) | AlgorithmParameters::OctetKeyPair(_) => return None,
        };
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(alg) => Some(signature_algorithm(alg)?),
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(PublicKey {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            curve,
            key,
        })
    }

    /// Whether a token signed with `alg` may be checked with this key (RFC 8725 §3.1: the key
    /// decides the algorithm, not the token).
    fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|pinned| pinned != alg) || alg.family() != self.family {
            return false;
        }
        match (alg, &self.curve) {
            (Algorithm::ES256, Some(curve)) => *curve == EllipticCurve::P256,
            (Algorithm::ES384, Some(curve)) => *curve == EllipticCurve::P384,
            _ => true,
        }
    }
}

/// Maps a JWK `alg` to an accepted signature algorithm.
fn signature_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    let alg = match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    Some(alg)
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<PublicKey>,
}

impl KeySet {
    fn parse(bytes: &[u8]) -> Result<Self, LoadError> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let raw: RawSet = serde_json::from_slice(bytes).map_err(LoadError::Parse)?;
        // Keys are parsed one by one: a single key of a type this crate does not know must not
        // take the issuer's other keys down with it.
        let keys: Vec<PublicKey> = raw
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| PublicKey::from_jwk(&jwk))
            .collect();
        if keys.is_empty() {
            return Err(LoadError::NoUsableKey);
        }
        Ok(KeySet { keys })
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

#[derive(Debug, Default)]
struct IssuerKeys {
    keys: Option<Arc<KeySet>>,
    loaded_at: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
    /// A load is running (at most one per issuer).
    loading: bool,
    /// The keys' being too old was logged (once until a load succeeds, not per token).
    too_old_logged: bool,
}

/// What a verification does about an issuer's keys, decided under the state lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Use the keys there are (possibly none).
    Use,
    /// Start a load and wait for it.
    Load,
    /// Wait for the load already running: the keys there are lack what the token needs.
    Wait,
}

impl IssuerKeys {
    /// Whether the keys were last loaded `max_age` or longer before `now`. A load "after" now
    /// (the clock stepped back since) is young, not infinitely old: a 10 s step back during a
    /// JWKS outage refused every CI job at once, saying the keys could not be reloaded for a
    /// day (E14). (For reloading, such a load counts as long ago: see [`elapsed`].)
    fn too_old(&self, now: SystemTime, max_age: Duration) -> bool {
        self.loaded_at
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() >= max_age)
    }

    /// Loads when the set is stale or lacks `kid` (rate-limited by `min_refresh`); while a load
    /// runs, only a verification that lacks its key waits for it, so a flood of made-up `kid`s
    /// during a JWKS outage cannot hold up tokens whose key is at hand.
    fn plan(
        &self,
        kid: Option<&str>,
        now: SystemTime,
        refresh: Duration,
        min_refresh: Duration,
    ) -> Plan {
        let stale = self.loaded_at.is_none_or(|at| elapsed(at, now) >= refresh);
        let missing_kid = match (&self.keys, kid) {
            (Some(keys), Some(kid)) => !keys.has_kid(kid),
            _ => false,
        };
        if self.loading {
            let lacking = self.keys.is_none() || missing_kid;
            return if lacking { Plan::Wait } else { Plan::Use };
        }
        let may_load = self
            .last_attempt
            .is_none_or(|at| elapsed(at, now) >= min_refresh);
        if (stale || missing_kid) && may_load {
            Plan::Load
        } else {
            Plan::Use
        }
    }
}

#[derive(Debug)]
struct CacheEntry {
    source: JwksSource,
    // Held only to read or update, never across a fetch (which may take the fetcher's whole
    // deadline): verifications whose key is known never wait on the issuer's JWKS.
    state: Arc<std::sync::Mutex<IssuerKeys>>,
    // Counts finished loads; verifications waiting for a load watch it.
    loads: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Locks an issuer's state. A panic while it was held cannot leave it half-updated (every
/// update is a few assignments), so a poisoned lock is used as it is.
fn lock(state: &std::sync::Mutex<IssuerKeys>) -> std::sync::MutexGuard<'_, IssuerKeys> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Signing keys per issuer, loaded lazily and refreshed every `refresh_interval`, or sooner when
/// a token names a `kid` the cached set lacks (at most once per `min_refresh_interval`). A failed
/// reload keeps the previous keys: an issuer's brief outage must not lock every job out. Loads
/// run one at a time per issuer, in a task of their own, outside the issuer's lock.
#[derive(Debug)]
pub struct JwksCache {
    fetcher: Arc<dyn JwksFetcher>,
    refresh_interval: Duration,
    min_refresh_interval: Duration,
    max_key_age: Duration,
    entries: HashMap<String, CacheEntry>,
}

impl JwksCache {
    /// A cache for `sources` (issuer → JWKS location) with the default intervals.
    pub fn new(
        sources: impl IntoIterator<Item = (String, JwksSource)>,
        fetcher: Arc<dyn JwksFetcher>,
    ) -> Self {
        JwksCache {
            fetcher,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            max_key_age: DEFAULT_MAX_KEY_AGE,
            entries: sources
                .into_iter()
                .map(|(issuer, source)| {
                    let entry = CacheEntry {
                        source,
                        state: Arc::default(),
                        loads: Arc::new(tokio::sync::watch::Sender::new(0)),
                    };
                    (issuer, entry)
                })
                .collect(),
        }
    }

    /// Sets how old a key set may get before it is reloaded.
    pub fn with_refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// Sets the minimum time between two loads of one issuer's keys.
    pub fn with_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    /// Sets how long keys are used after their last successful load (every reload failing).
    pub fn with_max_key_age(mut self, age: Duration) -> Self {
        self.max_key_age = age;
        self
    }

    /// The keys of `issuer`, reloading them first when they are stale or lack `kid`.
    async fn keys(
        &self,
        issuer: &str,
        kid: Option<&str>,
        now: SystemTime,
    ) -> Result<Arc<KeySet>, AuthError> {
        let entry = self.entries.get(issuer).ok_or(AuthError::UnknownIssuer)?;
        // Subscribed before the state is read, so a load that ends after it is seen.
        let mut loads = entry.loads.subscribe();
        let plan = {
            let mut state = lock(&entry.state);
            let plan = state.plan(kid, now, self.refresh_interval, self.min_refresh_interval);
            if plan == Plan::Load {
                state.loading = true;
                state.last_attempt = Some(now);
            }
            plan
        };
        if plan == Plan::Load {
            self.spawn_load(issuer, entry, now);
        }
        if plan != Plan::Use {
            // An error means the sender is gone with the cache: nothing left to wait for.
            let _ = loads.changed().await;
        }
        let mut state = lock(&entry.state);
        let keys = state
            .keys
            .clone()
            .ok_or_else(|| AuthError::KeysUnavailable {
                issuer: issuer.to_owned(),
            })?;
        if state.too_old(now, self.max_key_age) {
            if !state.too_old_logged {
                state.too_old_logged = true;
                let max_age_secs = self.max_key_age.as_secs();
                tracing::warn!(
                    issuer,
                    max_age_secs,
                    "the issuer's signing keys could not be reloaded for longer than the maximum key age: its tokens are refused (503) until a reload succeeds"
                );
            }
            return Err(AuthError::KeysTooOld {
                issuer: issuer.to_owned(),
                max_age: self.max_key_age,
            });
        }
        Ok(keys)
    }

    /// Loads `entry`'s keys in a task of its own: a verification given up half-way (its client
    /// went away) must not leave the issuer marked as loading forever.
    fn spawn_load(&self, issuer: &str, entry: &CacheEntry, now: SystemTime) {
        let done = LoadDone {
            issuer: issuer.to_owned(),
            state: Arc::clone(&entry.state),
            loads: Arc::clone(&entry.loads),
            now,
            result: None,
        };
        let (fetcher, source) = (Arc::clone(&self.fetcher), entry.source.clone());
        tokio::spawn(async move {
            // Moved whole: a closure capturing only `done.result` would drop the rest, and run
            // `LoadDone::drop`, at once.
            let mut done = done;
            done.result = Some(load(fetcher.as_ref(), &source).await);
        });
    }
}

/// A running load; its result is stored when it is dropped, so that even a load that panicked
/// clears `loading` and wakes its waiters.
struct LoadDone {
    issuer: String,
    state: Arc<std::sync::Mutex<IssuerKeys>>,
    loads: Arc<tokio::sync::watch::Sender<u64>>,
    now: SystemTime,
    result: Option<Result<KeySet, LoadError>>,
}

impl Drop for LoadDone {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        match self.result.take() {
            Some(Ok(keys)) => {
                state.keys = Some(Arc::new(keys));
                state.loaded_at = Some(self.now);
                state.too_old_logged = false;
            }
            Some(Err(err)) => {
                let issuer = &self.issuer;
                tracing::warn!(issuer, error = %err, "loading the issuer's signing keys failed");
            }
            None => {
                let issuer = &self.issuer;
                tracing::warn!(
                    issuer,
                    "loading the issuer's signing keys ended without a result"
                );
            }
        }
        state.loading = false;
        self.loads.send_modify(|n| *n = n.wrapping_add(1));
    }
}

async fn load(fetcher: &dyn JwksFetcher, source: &JwksSource) -> Result<KeySet, LoadError> {
    let bytes = match source {
        JwksSource::File(path) => {
            tokio::fs::read(path)
                .await
                .map_err(|source| LoadError::Read {
                    path: path.display().to_string(),
                    source,
                })?
        }
        JwksSource::Url(url) => fetcher
            .fetch(url)
            .await
            .map_err(|source| LoadError::Fetch {
                url: url.clone(),
                source,
            })?,
    };
    KeySet::parse(&bytes)
}

/// Time from `then` to `now`; a clock that went backwards counts as "long ago" so that the
/// cache reloads rather than trusting timestamps from the future forever.
fn elapsed(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::MAX)
}

/// Verifies CI ID tokens from a fixed set of trusted issuers.
#[derive(Debug)]
pub struct OidcVerifier {
    issuers: Vec<TrustedIssuer>,
    cache: JwksCache,
    leeway: Duration,
    /// Tokens verified recently (by SHA-256, never the token itself).
    verified: crate::ExpiringMap<[u8; 32], Verified>,
}

/// How long a verified token is trusted without checking its signature again. A CI job sends
/// the same ID token with every request; checking an ES256/RS256 signature costs more than the
/// rest of the proxy's work per request. A key withdrawn from the issuer's key set stops
/// verifying new tokens at once and cached ones within this time; `exp` and `nbf` are checked on
/// every use.
pub const VERIFIED_TOKEN_TTL: Duration = Duration::from_secs(30);
/// Bound on remembered tokens (expired entries are dropped first, then everything).
const VERIFIED_TOKEN_MAX: usize = 4096;

#[derive(Debug, Clone)]
struct Verified {
    identity: CiIdentity,
    claims_exp: f64,
    claims_nbf: Option<NotBefore>,
}

impl OidcVerifier {
    /// A verifier for `issuers`; `fetcher` loads [`JwksSource::Url`] key sets.
    pub fn new(issuers: Vec<TrustedIssuer>, fetcher: Arc<dyn JwksFetcher>) -> Self {
        let cache = JwksCache::new(
            issuers.iter().map(|i| (i.issuer.clone(), i.jwks.clone())),
            fetcher,
        );
        OidcVerifier::with_cache(issuers, cache)
    }

    /// A verifier using a cache configured by the caller (intervals).
    pub fn with_cache(issuers: Vec<TrustedIssuer>, cache: JwksCache) -> Self {
        // jsonwebtoken picks its crypto backend from its features and panics at first use when
        // both are enabled, which another crate in the build could do by asking for
        // `aws_lc_rs`. Installing ours explicitly avoids that; if a backend was installed
        // already, that one is used, which is as good.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        OidcVerifier {
            issuers,
            cache,
            leeway: DEFAULT_LEEWAY,
            verified: crate::ExpiringMap::new(VERIFIED_TOKEN_TTL, VERIFIED_TOKEN_MAX),
        }
    }

    /// Sets the clock-skew leeway on `exp` and `nbf`.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Verifies `token` at time `now` and extracts the job's identity. A token verified within
    /// [`VERIFIED_TOKEN_TTL`] is not verified again, but its lifetime is.
    pub async fn verify(&self, token: &str, now: SystemTime) -> Result<CiIdentity, AuthError> {
        Ok(self.verify_until(token, now).await?.0)
    }

    /// As [`OidcVerifier::verify`], with the moment the token stops being accepted (its `exp`
    /// plus the leeway): a request it started, such as a watch or an exec, must end then too.
    pub async fn verify_until(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(CiIdentity, SystemTime), AuthError> {
        use sha2::Digest;
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self.verified.get(&key, now) {
            check_times(v.claims_exp, v.claims_nbf, now, self.leeway)?;
            return Ok((v.identity, self.valid_until(v.claims_exp)));
        }
        let (identity, claims_exp, claims_nbf) = self.verify_uncached(token, now).await?;
        let until = self.valid_until(claims_exp);
        self.verified.insert(
            key,
            Verified {
                identity: identity.clone(),
                claims_exp,
                claims_nbf,
            },
            now,
        );
        Ok((identity, until))
    }

    /// When a token with `exp` stops being accepted.
    fn valid_until(&self, exp: f64) -> SystemTime {
        let at = Duration::try_from_secs_f64(exp.max(0.0)).unwrap_or(Duration::MAX);
        UNIX_EPOCH
            .checked_add(at.saturating_add(self.leeway))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)))
    }

    /// The full check; returns the identity and the token's `exp` and `nbf`.
    async fn verify_uncached(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(CiIdentity, f64, Option<NotBefore>), AuthError> {
        let (issuer, claims, exp, nbf) = self.checked_claims(token, now).await?;
        let identity = identity(issuer, &claims)?;
        // The signature proves only that this issuer vouches for the path; whether the path is
        // the issuer's to vouch for is configuration (another issuer may own it).
        if !crate::issuer_speaks_for(issuer.namespaces.as_deref(), &identity.project_path) {
            return Err(AuthError::OutsideIssuerNamespaces {
                issuer: issuer.issuer.clone(),
                project: identity.project_path,
                namespaces: issuer.namespaces.clone().unwrap_or_default(),
            });
        }
        Ok((identity, exp, nbf))
    }

    /// Checks any OIDC ID token of a trusted issuer (signature, `iss`, `aud`, `exp`, `nbf`)
    /// and returns its claims, for callers that read other claims than a CI job's (the web
    /// UI's logins). Never cached.
    pub async fn verify_claims(&self, token: &str, now: SystemTime) -> Result<Value, AuthError> {
        Ok(self.checked_claims(token, now).await?.1)
    }

    /// The issuer that signed `token` and its checked claims, `exp` and `nbf`.
    async fn checked_claims(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(&TrustedIssuer, Value, f64, Option<NotBefore>), AuthError> {
        const NOT_A_JWT: AuthError = AuthError::Malformed("token is not a JWT");
        let header = jsonwebtoken::decode_header(token).map_err(|_| NOT_A_JWT)?;
        let alg = header.alg;
        if !ACCEPTED_ALGORITHMS.contains(&alg) {
            return Err(AuthError::UnsupportedAlgorithm(format!("{alg:?}")));
        }

        // The issuer is read before the signature is checked only to pick whose keys to check
        // it with; `decode` below verifies the signature and then `iss` again.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
            .map_err(|_| NOT_A_JWT)?
            .claims;
        let iss = match unverified.get("iss") {
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("iss".into())),
            // An array `iss` is not valid OIDC, and jsonwebtoken's subset rule for it is not
            // the exact match wanted here.
            Some(Value::String(iss)) => iss.as_str(),
            Some(_) => return Err(AuthError::InvalidClaim("iss".into())),
        };
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(AuthError::UnknownIssuer)?;

        let kid = header.kid.as_deref();
        let keys = self.cache.keys(&issuer.issuer, kid, now).await?;
        let candidates: Vec<&PublicKey> = match kid {
            Some(kid) => keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            // Without a `kid`, any key of the issuer that fits the algorithm may have signed.
            None => keys.keys.iter().filter(|k| k.fits(alg)).collect(),
        };
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey);
        }

        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&[&issuer.audience]);
        validation.set_required_spec_claims(&["iss", "aud"]);
        // jsonwebtoken checks time against the system clock; `exp`/`nbf` are checked below
        // against the caller's `now` instead.
        validation.validate_exp = false;
        validation.validate_nbf = false;

        let mut result = Err(AuthError::UnsupportedAlgorithm(format!("{alg:?}")));
        for key in candidates.into_iter().filter(|k| k.fits(alg)) {
            result = jsonwebtoken::decode::<Value>(token, &key.key, &validation)
                .map(|data| data.claims)
                .map_err(map_jwt_error);
            // Only a signature mismatch is worth trying the next key for; anything else was
            // found after the signature verified.
            if !matches!(result, Err(AuthError::BadSignature)) {
                break;
            }
        }
        let claims = result?;
        let (exp, nbf) = lifetime(&claims)?;
        check_times(exp, nbf, now, self.leeway)?;
        Ok((issuer, claims, exp, nbf))
    }
}

fn map_jwt_error(err: jsonwebtoken::errors::Error) -> AuthError {
    match err.into_kind() {
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::InvalidClaim(claim),
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidAlgorithm => AuthError::UnsupportedAlgorithm("for this key".into()),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed("token is not a JWT"),
        // Signature mismatches, and keys the backend could not use for this token.
        _ => AuthError::BadSignature,
    }
}

/// The token's `exp` (required) and the later of `nbf` and `iat` (named), before which it is not
/// valid: a token issued in the future comes from an issuer (or a kas) whose clock is off.
fn lifetime(claims: &Value) -> Result<(f64, Option<NotBefore>), AuthError> {
    let exp = numeric_date(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
    let nbf = numeric_date(claims, "nbf")?.map(|at| NotBefore { claim: "nbf", at });
    let iat = numeric_date(claims, "iat")?.map(|at| NotBefore { claim: "iat", at });
    let later = match (nbf, iat) {
        (Some(n), Some(i)) => Some(if i.at > n.at { i } else { n }),
        (n, i) => n.or(i),
    };
    Ok((exp, later))
}

/// The time a token is valid from, and the claim that says it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NotBefore {
    claim: &'static str,
    at: f64,
}

fn check_times(
    exp: f64,
    nbf: Option<NotBefore>,
    now: SystemTime,
    leeway: Duration,
) -> Result<(), AuthError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let leeway_secs = leeway.as_secs();
    let leeway = leeway.as_secs_f64();
    // RFC 7519 §4.1.4: the token must not be accepted "on or after" exp.
    if now >= exp + leeway {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = nbf
        && now + leeway < nbf.at
    {
        // Whole seconds for the message; the comparison above is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let secs = |t: f64| t.max(0.0) as u64;
        return Err(AuthError::NotYetValid {
            claim: nbf.claim,
            at: secs(nbf.at),
            now: secs(now),
            leeway_secs,
        });
    }
    Ok(())
}

fn numeric_date(claims: &Value, name: &str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| AuthError::InvalidClaim(name.into())),
        Some(_) => Err(AuthError::InvalidClaim(name.into())),
    }
}

fn identity(issuer: &TrustedIssuer, claims: &Value) -> Result<CiIdentity, AuthError> {
    let map = &issuer.claims;
    let project_path = required_string(claims, &map.project_path)?;
    // Paths are matched against `ci_access` entries segment by segment: `grp/sub/../app` would
    // pass for a project of `grp/sub`. No forge signs such a path; refused all the same.
    if !plain_path(&project_path) {
        return Err(AuthError::InvalidClaim(map.project_path.clone()));
    }
    let namespace_path = match optional_string(claims, map.namespace_path.as_deref())? {
        Some(ns) => ns,
        None => match project_path.rsplit_once('/') {
            Some((ns, _)) if !ns.is_empty() => ns.to_owned(),
            _ => return Err(AuthError::InvalidClaim(map.project_path.clone())),
        },
    };
    Ok(CiIdentity {
        issuer: issuer.issuer.clone(),
        project_id: optional_id(claims, map.project_id.as_deref())?,
        job_id: required_id(claims, &map.job_id)?,
        pipeline_id: required_id(claims, &map.pipeline_id)?,
        environment: optional_string(claims, map.environment.as_deref())?,
        environment_tier: optional_string(claims, map.environment_tier.as_deref())?,
        namespace_path,
        user: optional_string(claims, map.user.as_deref())?,
        project_path,
    })
}

/// Whether `path` is a forge's project path: non-empty segments, none `.` or `..`.
fn plain_path(path: &str) -> bool {
    path.split('/')
        .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

/// A string claim; `None` when unmapped, absent, null or empty (GitLab leaves `environment`
/// out of jobs without one, other issuers send `""`).
fn optional_string(claims: &Value, name: Option<&str>) -> Result<Option<String>, AuthError> {
    let Some(name) = name else { return Ok(None) };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AuthError::InvalidClaim(name.into())),
    }
}

fn required_string(claims: &Value, name: &str) -> Result<String, AuthError> {
    optional_string(claims, Some(name))?.ok_or_else(|| AuthError::MissingClaim(name.into()))
}

/// A numeric id claim. GitLab and GitHub send ids as decimal strings; numbers are accepted too.
fn optional_id(claims: &Value, name: Option<&str>) -> Result<Option<i64>, AuthError> {
    let Some(name) = name else { return Ok(None) };
    let invalid = || AuthError::InvalidClaim(name.into());
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            s.parse().map(Some).map_err(|_| invalid())
        }
        Some(Value::Number(n)) => n
            .as_i64()
            .filter(|id| *id >= 0)
            .map(Some)
            .ok_or_else(invalid),
        Some(_) => Err(invalid()),
    }
}

fn required_id(claims: &Value, name: &str) -> Result<i64, AuthError> {
    optional_id(claims, Some(name))?.ok_or_else(|| AuthError::MissingClaim(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// Keys with kid `k`, loaded (and last attempted) at `t(0)`.
    fn loaded(loading: bool) -> IssuerKeys {
        let set = br#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}"#;
        let keys = KeySet::parse(set).expect("key set");
        IssuerKeys {
            keys: Some(Arc::new(keys)),
            loaded_at: Some(t(0)),
            last_attempt: Some(t(0)),
            loading,
            too_old_logged: false,
        }
    }

    fn plan(state: &IssuerKeys, kid: Option<&str>, at: SystemTime) -> Plan {
        state.plan(kid, at, HOUR, MINUTE)
    }

    #[test]
    fn keys_are_loaded_when_missing_stale_or_lacking_the_kid_at_most_once_a_minute() {
        assert_eq!(plan(&IssuerKeys::default(), Some("k"), t(0)), Plan::Load);
        let keys = loaded(false);
        assert_eq!(plan(&keys, Some("k"), t(10)), Plan::Use);
        assert_eq!(plan(&keys, Some("other"), t(10)), Plan::Use, "rate-limited");
        assert_eq!(plan(&keys, Some("other"), t(60)), Plan::Load);
        assert_eq!(plan(&keys, Some("k"), t(3600)), Plan::Load, "stale");
    }

    #[test]
    fn keys_are_too_old_from_the_maximum_age_after_their_last_load() {
        let keys = loaded(false);
        let day = Duration::from_secs(86_400);
        assert!(!keys.too_old(t(86_399), day));
        assert!(keys.too_old(t(86_400), day));
        assert!(
            !IssuerKeys::default().too_old(t(86_400), day),
            "never loaded: no keys at all"
        );
        let stepped_back = UNIX_EPOCH + Duration::from_secs(1_700_000_000 - 10);
        assert!(
            !keys.too_old(stepped_back, day),
            "the clock stepped back 10 s"
        );
        assert_eq!(
            plan(&keys, Some("k"), stepped_back),
            Plan::Load,
            "reloaded early instead"
        );
    }

    #[test]
    fn while_a_load_runs_only_verifications_lacking_their_key_wait() {
        let keys = loaded(true);
        assert_eq!(plan(&keys, Some("k"), t(3600)), Plan::Use);
        assert_eq!(plan(&keys, None, t(3600)), Plan::Use);
        assert_eq!(plan(&keys, Some("other"), t(3600)), Plan::Wait);
        let first_load = IssuerKeys {
            loading: true,
            ..IssuerKeys::default()
        };
        assert_eq!(plan(&first_load, Some("k"), t(0)), Plan::Wait);
    }
}
