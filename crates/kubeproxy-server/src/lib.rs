//! Server half of Kubernetes API access: authenticate CI jobs and users, authorize them against
//! the agent's configuration, and route their requests through the reverse tunnel.
//!
//! This crate holds the pure decisions; kas owns the listener and the tunnel:
//!
//! 1. [`Credential::from_headers`] — which agent, and which kind of secret (`ci:` / `pat:`).
//! 2. [`OidcVerifier::verify`] — a CI job's ID token becomes a [`CiIdentity`] (signature, issuer,
//!    audience, lifetime checked against keys from the issuer's JWKS; the project must lie in
//!    the issuer's `namespaces`, see [`issuer_speaks_for`]).
//! 3. [`authorize_ci`] / [`authorize_user`] — the agent's `ci_access` / `user_access` decide
//!    whether, and as whom ([`Authorized::access_as`]), the request goes to the cluster.
//! 4. [`ci_job_context`] / [`user_context`] — what kas sends to agentk with the request;
//!    [`ci_kubeconfig`] — the kubeconfig a CI job downloads.
//!
//! Errors carry the HTTP status the proxy answers with ([`AuthError::status`]: 401, 503 when
//! the signing keys cannot be loaded, 403 for a token whose issuer may not speak for its
//! project ([`issuer_speaks_for`]); [`Denied::status`]: 403).

mod authorize;
mod context;
mod credentials;
mod expiring;
mod gitlab;
mod issuers;
mod kubeconfig;
mod membership;
mod oidc;
mod path;

pub use authorize::{
    AccessLevel, Authorized, Denied, MatchedBy, Membership, MembershipKind, RoleGrant,
    UserAuthorized, UserIdentity, authorize_ci, authorize_user, environment_matches,
};
pub use context::{KubeconfigAgent, ci_job_context, ci_kubeconfig, mode_name, user_context};
pub use credentials::Credential;
pub use expiring::ExpiringMap;
pub use gitlab::{environment_slug, roles_up_to};
pub use issuers::{IssuerConfigError, issuer_speaks_for, validate_issuers};
pub use kubeconfig::{CLUSTER_NAME, Kubeconfig, KubeconfigError, check_ca_pem};
pub use membership::{
    MembershipSpecError, membership_warnings, memberships_from_json, memberships_to_json,
};
pub use oidc::{
    CiIdentity, ClaimMapping, DEFAULT_LEEWAY, DEFAULT_MAX_KEY_AGE, DEFAULT_MIN_REFRESH_INTERVAL,
    DEFAULT_REFRESH_INTERVAL, FetchError, JwksCache, JwksFetcher, JwksSource, NoFetcher,
    OidcVerifier, TrustedIssuer, VERIFIED_TOKEN_TTL,
};
pub use path::strip_path_prefix;

/// Why a request could not be authenticated. No variant carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error(
        "no credentials: expected Authorization: Bearer ci:<agent id>:<token> or pat:<agent id>:<token>"
    )]
    Missing,
    /// The credential or token does not have the expected shape.
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    /// The token's `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// The token's `nbf` or `iat` is in the future (beyond the leeway): the issuer's clock or
    /// kas's is off, which the message says with both times.
    #[error(
        "token not yet valid: its {claim} is {}, kas's clock reads {} (leeway {leeway_secs} s): \
         check the issuer's and kas's clocks", rfc3339(*.at), rfc3339(*.now)
    )]
    NotYetValid {
        /// `nbf` or `iat`.
        claim: &'static str,
        /// The claim's time, Unix seconds.
        at: u64,
        /// kas's time, Unix seconds.
        now: u64,
        leeway_secs: u64,
    },
    /// The token's `aud` does not contain the issuer's configured audience.
    #[error("token audience does not match")]
    WrongAudience,
    /// The token's `iss` is not one of the trusted issuers.
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    /// The signature does not verify with the issuer's key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The issuer's key set has no key for the token (unknown `kid`, or no key of its kind).
    #[error("token signing key is unknown")]
    UnknownKey,
    /// The token's `alg` is not an accepted asymmetric algorithm, or does not fit the key.
    #[error("token algorithm {0} is not accepted")]
    UnsupportedAlgorithm(String),
    /// A claim the identity needs is absent.
    #[error("token lacks the {0:?} claim")]
    MissingClaim(String),
    /// A claim has the wrong type or value (for example a non-numeric `job_id`).
    #[error("token claim {0:?} has an invalid value")]
    InvalidClaim(String),
    /// The issuer's key set could not be loaded at all (never loaded, or every load failed).
    #[error("signing keys of issuer {issuer} are unavailable")]
    KeysUnavailable {
        /// The trusted issuer whose keys are missing.
        issuer: String,
    },
    /// The issuer's keys were last loaded longer ago than the cache's maximum key age (every
    /// reload since failed): a key the issuer withdrew meanwhile must not stay trusted forever.
    #[error(
        "signing keys of issuer {issuer} could not be reloaded for {}s: its tokens are refused \
         until a reload succeeds", .max_age.as_secs()
    )]
    KeysTooOld {
        /// The trusted issuer whose keys are too old.
        issuer: String,
        /// The maximum key age configured.
        max_age: std::time::Duration,
    },
    /// The token is genuine, but its project lies outside the namespaces its issuer may speak
    /// for (another issuer's projects, or none kas trusts it for).
    #[error(
        "issuer {issuer} may not speak for project {project:?}: its namespace {:?} is not one of \
         the issuer's namespaces ({})", top_namespace(.project), .namespaces.join(", ")
    )]
    OutsideIssuerNamespaces {
        /// The issuer that signed the token.
        issuer: String,
        /// The project path the token names.
        project: String,
        /// The namespaces the issuer may speak for.
        namespaces: Vec<String>,
    },
}

/// The first segment of `path`: the top-level group, user or organisation.
fn top_namespace(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

impl AuthError {
    /// The status the proxy answers with: 401, except 503 for key sets that cannot be loaded
    /// (the client's credential may well be fine; retrying later can succeed).
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::KeysUnavailable { .. } | AuthError::KeysTooOld { .. } => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
            // Who the caller is is settled; what it may reach is not granted: a refusal.
            AuthError::OutsideIssuerNamespaces { .. } => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// Unix seconds as an RFC 3339 time, for messages.
fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}
