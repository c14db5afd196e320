//! Login with OpenID Connect: authorization code flow with PKCE (S256), `state` and `nonce`.
//! The provider's endpoints come from its discovery document (read at the first login); the
//! ID token is checked by the same verifier as CI jobs' ID tokens (signature against the
//! provider's JWKS, `iss`, `aud`, `exp`). URL and claim handling are pure functions below.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Deserialize;
use sha2::Digest as _;
use tether_kubeproxy_server::{ClaimMapping, JwksSource, OidcVerifier, TrustedIssuer};

use super::html::url_part;
use super::session::{Person, Role, random_token};
use crate::config::WebOidc;
use crate::jwks::HttpJwksFetcher;

/// How long a started login may take at the provider (its cookie's lifetime).
pub const LOGIN_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider's discovery document: {0}")]
    Discovery(String),
    #[error("the identity provider refused the login: {0}")]
    Refused(String),
    #[error("exchanging the code at the identity provider: {0}")]
    Exchange(String),
    #[error("the ID token: {0}")]
    IdToken(String),
    #[error(
        "{0} may not use this web UI: an administrator can list its subject in \
         web.oidc.viewer_subjects or one of its groups in web.oidc.viewer_groups"
    )]
    NotAllowed(String),
}

/// What discovery tells (only what the flow needs).
#[derive(Debug, Clone, Deserialize)]
pub struct Discovered {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// A login between the redirect to the provider and its callback. It travels in an
/// `HttpOnly` cookie of the browser that started it, not in kas's memory: the callback may
/// reach another replica, or a kas restarted meanwhile, and still finish the login; and only
/// that browser can finish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginState {
    pub state: String,
    nonce: String,
    code_verifier: String,
}

impl LoginState {
    /// The cookie's value: the three random tokens, dot-separated.
    pub fn cookie_value(&self) -> String {
        format!("{}.{}.{}", self.state, self.nonce, self.code_verifier)
    }

    /// Reads [`LoginState::cookie_value`] back; `None` unless it is three hex tokens.
    pub fn from_cookie(value: &str) -> Option<LoginState> {
        let mut parts = value.split('.');
        let mut token = || {
            parts
                .next()
                .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_owned)
        };
        let login = LoginState {
            state: token()?,
            nonce: token()?,
            code_verifier: token()?,
        };
        parts.next().is_none().then_some(login)
    }

    /// Whether the provider's `state` parameter is this login's (constant time).
    pub fn matches(&self, state: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.state.as_bytes().ct_eq(state.as_bytes()))
    }
}

/// The configured provider.
pub struct Provider {
    cfg: WebOidc,
    client_secret: Option<String>,
    http: Arc<HttpJwksFetcher>,
    discovered: tokio::sync::OnceCell<(Discovered, OidcVerifier)>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.cfg.issuer)
            .finish_non_exhaustive()
    }
}

/// `BASE64URL(SHA256(verifier))`, RFC 7636's S256 method.
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

/// The provider's authorization URL for one login.
pub fn authorization_url(
    endpoint: &str,
    cfg: &WebOidc,
    state: &str,
    nonce: &str,
    challenge: &str,
) -> String {
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    format!(
        "{endpoint}{sep}response_type=code&client_id={}&redirect_uri={}&scope=openid%20profile%20email%20groups&state={}&nonce={}&code_challenge={}&code_challenge_method=S256",
        url_part(&cfg.client_id),
        url_part(&cfg.redirect_url),
        url_part(state),
        url_part(nonce),
        url_part(challenge)
    )
}

/// The token request's form.
pub fn token_form(cfg: &WebOidc, secret: Option<&str>, code: &str, verifier: &str) -> String {
    let mut form = format!(
        "grant_type=authorization_code&code={}&redirect_uri={}&client_id={}&code_verifier={}",
        url_part(code),
        url_part(&cfg.redirect_url),
        url_part(&cfg.client_id),
        url_part(verifier)
    );
    if let Some(s) = secret {
        form.push_str(&format!("&client_secret={}", url_part(s)));
    }
    form
}

/// The person and their role from checked ID token claims (the nonce already matched).
pub fn person_of(cfg: &WebOidc, claims: &serde_json::Value) -> Result<(Person, Role), OidcError> {
    let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let subject = text("sub").ok_or_else(|| OidcError::IdToken("no sub claim".into()))?;
    let username = text(&cfg.username_claim).unwrap_or_else(|| subject.clone());
    let groups: Vec<String> = claims
        .get(&cfg.groups_claim)
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let Some(role) = role_of(cfg, &subject, &groups) else {
        return Err(OidcError::NotAllowed(format!(
            "{username} (subject {subject})"
        )));
    };
    Ok((
        Person {
            subject,
            username,
            groups,
        },
        role,
    ))
}

/// The role `web.oidc` gives a person now: at login, and again at each request of their
/// session, so a person taken off the lists (kas running the new configuration) loses the web
/// UI at once rather than at the end of `session_ttl`. `None`: listed nowhere.
pub fn role_of(cfg: &WebOidc, subject: &str, groups: &[String]) -> Option<Role> {
    let listed = |subjects: &[String], in_groups: &[String]| {
        subjects.iter().any(|s| s == subject) || groups.iter().any(|g| in_groups.contains(g))
    };
    if listed(&cfg.admin_subjects, &cfg.admin_groups) {
        Some(Role::Admin)
    } else if listed(&cfg.viewer_subjects, &cfg.viewer_groups) {
        Some(Role::Viewer)
    } else {
        None
    }
}

impl Provider {
    pub fn new(cfg: WebOidc) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let ca = match &cfg.ca_file {
            Some(f) => Some(
                std::fs::read(f)
                    .with_context(|| format!("reading web.oidc.ca_file {}", f.display()))?,
            ),
            None => None,
        };
        let client_secret = match &cfg.client_secret_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| {
                        format!("reading web.oidc.client_secret_file {}", f.display())
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Self {
            http: Arc::new(HttpJwksFetcher::new(ca.as_deref())?),
            cfg,
            client_secret,
            discovered: tokio::sync::OnceCell::new(),
        })
    }

    /// The discovery document and a verifier for its keys; read once (retried until it works).
    async fn discovered(&self) -> Result<&(Discovered, OidcVerifier), OidcError> {
        self.discovered
            .get_or_try_init(|| async {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.cfg.issuer.trim_end_matches('/')
                );
                let text = self
                    .http
                    .get_text(&url)
                    .await
                    .map_err(|e| OidcError::Discovery(format!("{e:#}")))?;
                let d: Discovered = serde_json::from_str(&text)
                    .map_err(|e| OidcError::Discovery(format!("{url}: {e}")))?;
                if d.issuer != self.cfg.issuer {
                    return Err(OidcError::Discovery(format!(
                        "{url} names issuer {}, not {}",
                        d.issuer, self.cfg.issuer
                    )));
                }
                let trusted = TrustedIssuer {
                    issuer: d.issuer.clone(),
                    audience: self.cfg.client_id.clone(),
                    jwks: JwksSource::Url(d.jwks_uri.clone()),
                    claims: ClaimMapping::default(),
                    // The web UI reads who logs in, not which project a job runs in.
                    namespaces: None,
                };
                let fetcher: Arc<dyn tether_kubeproxy_server::JwksFetcher> = self.http.clone();
                Ok((d, OidcVerifier::new(vec![trusted], fetcher)))
            })
            .await
    }

    /// The role the login's groups carry for `user_access`.
    pub fn groups_access_level(&self) -> tether_kubeproxy_server::AccessLevel {
        self.cfg.groups_access_level
    }

    /// Starts a login: what the browser keeps for the callback, and the URL to send it to.
    pub async fn start(&self) -> Result<(LoginState, String), OidcError> {
        let (d, _) = self.discovered().await?;
        let login = LoginState {
            state: random_token(),
            nonce: random_token(),
            code_verifier: random_token(),
        };
        let url = authorization_url(
            &d.authorization_endpoint,
            &self.cfg,
            &login.state,
            &login.nonce,
            &pkce_challenge(&login.code_verifier),
        );
        Ok((login, url))
    }

    /// Finishes `login`: exchanges `code` (with the PKCE verifier), checks the ID token and
    /// its nonce. The provider takes a code once, so a replayed callback fails there.
    pub async fn finish(
        &self,
        login: &LoginState,
        code: &str,
    ) -> Result<(Person, Role), OidcError> {
        let (d, verifier) = self.discovered().await?;
        let form = token_form(
            &self.cfg,
            self.client_secret.as_deref(),
            code,
            &login.code_verifier,
        );
        let text = self
            .http
            .post_form(&d.token_endpoint, form)
            .await
            .map_err(|e| OidcError::Exchange(format!("{e:#}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| OidcError::Exchange(e.to_string()))?;
        let id_token = v
            .get("id_token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| OidcError::Exchange("the answer has no id_token".into()))?;
        let claims = verifier
            .verify_claims(id_token, SystemTime::now())
            .await
            .map_err(|e| OidcError::IdToken(e.to_string()))?;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(login.nonce.as_str()) {
            return Err(OidcError::IdToken("its nonce is not this login's".into()));
        }
        person_of(&self.cfg, &claims)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cfg() -> WebOidc {
        WebOidc {
            issuer: "https://idp.example".into(),
            client_id: "tether web".into(),
            client_secret_file: None,
            redirect_url: "https://kas.example/login/oidc/callback".into(),
            ca_file: None,
            admin_subjects: vec!["root-sub".into()],
            admin_groups: vec!["ops".into()],
            viewer_subjects: vec!["u3".into()],
            viewer_groups: vec!["people".into()],
            username_claim: "preferred_username".into(),
            groups_claim: "groups".into(),
            groups_access_level: tether_kubeproxy_server::AccessLevel::Developer,
        }
    }

    #[test]
    fn a_login_state_travels_in_its_cookie_and_nothing_else_reads_as_one() {
        let login = LoginState {
            state: random_token(),
            nonce: random_token(),
            code_verifier: random_token(),
        };
        let value = login.cookie_value();
        assert_eq!(LoginState::from_cookie(&value), Some(login.clone()));
        assert!(login.matches(&login.state));
        assert!(!login.matches(&login.nonce));
        assert!(!login.matches(""));
        for bad in [
            String::new(),
            login.state.clone(),
            format!("{value}.{}", random_token()),
            value.replacen('a', "g", 1).replacen('0', "g", 1),
            format!("{}..{}", login.state, login.code_verifier),
        ] {
            assert_eq!(LoginState::from_cookie(&bad), None, "{bad}");
        }
    }

    #[test]
    fn the_pkce_challenge_is_rfc_7636s() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn the_authorization_url_carries_state_nonce_and_challenge() {
        let u = authorization_url("https://idp.example/auth", &cfg(), "s1", "n1", "c1");
        assert_eq!(
            u,
            "https://idp.example/auth?response_type=code&client_id=tether%20web&redirect_uri=https%3A%2F%2Fkas.example%2Flogin%2Foidc%2Fcallback&scope=openid%20profile%20email%20groups&state=s1&nonce=n1&code_challenge=c1&code_challenge_method=S256"
        );
        assert!(
            authorization_url("https://idp/a?x=1", &cfg(), "s", "n", "c")
                .starts_with("https://idp/a?x=1&response_type")
        );
    }

    #[test]
    fn the_token_form_sends_the_verifier_and_the_secret_if_any() {
        let f = token_form(&cfg(), None, "co de", "v");
        assert!(f.contains("code=co%20de") && f.contains("code_verifier=v"));
        assert!(!f.contains("client_secret"));
        assert!(token_form(&cfg(), Some("s&"), "c", "v").ends_with("&client_secret=s%26"));
    }

    #[test]
    fn roles_come_from_subjects_and_groups() {
        let claims =
            serde_json::json!({"sub": "u1", "preferred_username": "alice", "groups": ["people"]});
        let (p, role) = person_of(&cfg(), &claims).expect("person");
        assert_eq!((p.username.as_str(), role), ("alice", Role::Viewer));
        assert_eq!(p.groups, ["people"]);
        let ops = serde_json::json!({"sub": "u2", "groups": ["ops"]});
        let (p, role) = person_of(&cfg(), &ops).expect("person");
        assert_eq!((p.username.as_str(), role), ("u2", Role::Admin));
        let root = serde_json::json!({"sub": "root-sub"});
        assert_eq!(person_of(&cfg(), &root).expect("person").1, Role::Admin);
        assert!(person_of(&cfg(), &serde_json::json!({})).is_err());
        let listed = serde_json::json!({"sub": "u3"});
        assert_eq!(person_of(&cfg(), &listed).expect("person").1, Role::Viewer);
    }

    /// Anyone the identity provider knows was a viewer of every agent's configuration,
    /// errors and access rules: now only those listed (or admins) may log in.
    #[test]
    fn a_person_neither_admin_nor_listed_as_viewer_may_not_log_in() {
        let stranger =
            serde_json::json!({"sub": "u9", "preferred_username": "eve", "groups": ["elsewhere"]});
        let e = person_of(&cfg(), &stranger).expect_err("a stranger logged in");
        assert!(matches!(e, OidcError::NotAllowed(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("eve (subject u9)") && text.contains("viewer_groups"),
            "{text}"
        );
        let none = WebOidc {
            viewer_subjects: Vec::new(),
            viewer_groups: Vec::new(),
            ..cfg()
        };
        let viewer = serde_json::json!({"sub": "u1", "groups": ["people"]});
        assert!(
            person_of(&none, &viewer).is_err(),
            "nobody listed: admins only"
        );
        assert_eq!(
            person_of(&none, &serde_json::json!({"sub": "root-sub"}))
                .expect("admin")
                .1,
            Role::Admin
        );
    }
}
