//! CI ID token verification with keys made by the test (EC P-256 fresh per run, RSA from
//! tests/data) and key sets in temporary files or behind a fake fetcher. No network.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tether_kubeproxy_server::{
    AuthError, CiIdentity, ClaimMapping, FetchError, JwksCache, JwksFetcher, JwksSource, NoFetcher,
    OidcVerifier, TrustedIssuer,
};

const GITLAB: &str = "https://gitlab.example.com";
const GITHUB: &str = "https://token.actions.githubusercontent.com";
const AUDIENCE: &str = "https://kas.example.com";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs()
}

/// A signing key and its public JWK.
struct Key {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl Key {
    fn ec(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
        Key::new(Algorithm::ES256, kid, encoding)
    }

    fn rsa(kid: &str) -> Key {
        let pem = include_bytes!("data/rsa-test-key.pem");
        let encoding = EncodingKey::from_rsa_pem(pem).expect("RSA test key");
        Key::new(Algorithm::RS256, kid, encoding)
    }

    fn new(alg: Algorithm, kid: &str, encoding: EncodingKey) -> Key {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("public JWK");
        jwk.common.key_id = Some(kid.to_owned());
        Key {
            alg,
            kid: kid.to_owned(),
            encoding,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_as(claims, self.alg, Some(&self.kid))
    }

    fn sign_as(&self, claims: &Value, alg: Algorithm, kid: Option<&str>) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signs")
    }
}

fn jwks(keys: &[&Key]) -> Vec<u8> {
    let keys: Vec<&Jwk> = keys.iter().map(|k| &k.jwk).collect();
    serde_json::to_vec(&json!({ "keys": keys })).expect("JWKS JSON")
}

fn write_jwks(path: &Path, keys: &[&Key]) {
    std::fs::write(path, jwks(keys)).expect("writes JWKS");
}

fn gitlab_claims() -> Value {
    let t = secs(now());
    json!({
        "iss": GITLAB,
        "aud": AUDIENCE,
        "sub": "project_path:acme/platform/app:ref_type:branch:ref:main",
        "iat": t,
        "nbf": t - 5,
        "exp": t + 300,
        "namespace_id": "7",
        "namespace_path": "acme/platform",
        "project_id": "22",
        "project_path": "acme/platform/app",
        "user_login": "alice",
        "pipeline_id": "1000",
        "job_id": "1212",
        "environment": "production",
        "deployment_tier": "production",
    })
}

fn github_claims() -> Value {
    let t = secs(now());
    json!({
        "iss": GITHUB,
        "aud": AUDIENCE,
        "sub": "repo:acme/app:environment:staging",
        "iat": t,
        "exp": t + 300,
        "repository": "acme/app",
        "repository_id": "123456",
        "repository_owner": "acme",
        "run_id": "987654321",
        "actor": "octocat",
        "environment": "staging",
        "workflow_ref": "acme/app/.github/workflows/deploy.yml@refs/heads/main",
    })
}

fn gitlab_identity() -> CiIdentity {
    CiIdentity {
        issuer: GITLAB.into(),
        project_path: "acme/platform/app".into(),
        project_id: Some(22),
        job_id: 1212,
        pipeline_id: 1000,
        environment: Some("production".into()),
        environment_tier: Some("production".into()),
        namespace_path: "acme/platform".into(),
        user: Some("alice".into()),
    }
}

fn issuer(issuer: &str, jwks: JwksSource, claims: ClaimMapping) -> TrustedIssuer {
    TrustedIssuer {
        issuer: issuer.into(),
        audience: AUDIENCE.into(),
        jwks,
        claims,
        namespaces: None,
    }
}

/// A GitLab issuer (EC key `gl-1`) and a GitHub issuer (RSA key `gh-1`), each from a file.
struct Setup {
    _dir: tempfile::TempDir,
    gitlab_jwks: std::path::PathBuf,
    gitlab_key: Key,
    github_key: Key,
    verifier: OidcVerifier,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let gitlab_jwks = dir.path().join("gitlab.json");
    let github_jwks = dir.path().join("github.json");
    let gitlab_key = Key::ec("gl-1");
    let github_key = Key::rsa("gh-1");
    write_jwks(&gitlab_jwks, &[&gitlab_key]);
    write_jwks(&github_jwks, &[&github_key]);
    let verifier = OidcVerifier::new(
        vec![
            issuer(
                GITLAB,
                JwksSource::File(gitlab_jwks.clone()),
                ClaimMapping::gitlab(),
            ),
            issuer(
                GITHUB,
                JwksSource::File(github_jwks),
                ClaimMapping::github(),
            ),
        ],
        Arc::new(NoFetcher),
    );
    Setup {
        _dir: dir,
        gitlab_jwks,
        gitlab_key,
        github_key,
        verifier,
    }
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    if let Some(map) = claims.as_object_mut() {
        map.remove(key);
    }
    claims
}

#[tokio::test]
async fn gitlab_es256_token() {
    let s = setup();
    let token = s.gitlab_key.sign(&gitlab_claims());
    assert_eq!(
        s.verifier.verify(&token, now()).await,
        Ok(gitlab_identity())
    );
}

#[tokio::test]
async fn github_rs256_token() {
    let s = setup();
    let token = s.github_key.sign(&github_claims());
    assert_eq!(
        s.verifier.verify(&token, now()).await,
        Ok(CiIdentity {
            issuer: GITHUB.into(),
            project_path: "acme/app".into(),
            project_id: Some(123456),
            job_id: 987654321,
            pipeline_id: 987654321,
            environment: Some("staging".into()),
            environment_tier: None,
            namespace_path: "acme".into(),
            user: Some("octocat".into()),
        })
    );
}

/// Both test issuers vouch for an `acme` (the fixtures' GitLab group and GitHub organisation
/// share the name, as in the attack): once each issuer lists its namespaces, a GitHub token
/// for `acme/app` is refused with a 403 naming the issuer, and each issuer's own projects pass.
#[tokio::test]
async fn a_token_for_a_project_outside_its_issuers_namespaces_is_refused() {
    let s = setup();
    let dir = tempfile::tempdir().expect("temp dir");
    let github_jwks = dir.path().join("github.json");
    write_jwks(&github_jwks, &[&s.github_key]);
    let scoped = |iss: &str, jwks: JwksSource, claims: ClaimMapping, ns: &str| TrustedIssuer {
        namespaces: Some(vec![ns.to_owned()]),
        ..issuer(iss, jwks, claims)
    };
    let verifier = OidcVerifier::new(
        vec![
            scoped(
                GITLAB,
                JwksSource::File(s.gitlab_jwks.clone()),
                ClaimMapping::gitlab(),
                "ACME",
            ),
            scoped(
                GITHUB,
                JwksSource::File(github_jwks),
                ClaimMapping::github(),
                "acme-gh",
            ),
        ],
        Arc::new(NoFetcher),
    );

    let refused = verifier
        .verify(&s.github_key.sign(&github_claims()), now())
        .await
        .expect_err("GitHub may not speak for acme/app");
    assert_eq!(
        refused,
        AuthError::OutsideIssuerNamespaces {
            issuer: GITHUB.into(),
            project: "acme/app".into(),
            namespaces: vec!["acme-gh".into()],
        }
    );
    assert_eq!(refused.status(), http::StatusCode::FORBIDDEN);
    let message = refused.to_string();
    assert!(
        message.contains(GITHUB) && message.contains("\"acme\"") && message.contains("acme-gh"),
        "{message}"
    );

    let gitlab = s.gitlab_key.sign(&gitlab_claims());
    assert_eq!(verifier.verify(&gitlab, now()).await, Ok(gitlab_identity()));
    let own = with(github_claims(), "repository", json!("acme-gh/app"));
    let identity = verifier
        .verify(&s.github_key.sign(&own), now())
        .await
        .expect("GitHub speaks for acme-gh");
    assert_eq!(identity.project_path, "acme-gh/app");
}

#[tokio::test]
async fn claim_variants_that_verify() {
    let s = setup();
    let t = secs(now());
    let no_env = CiIdentity {
        environment: None,
        environment_tier: None,
        ..gitlab_identity()
    };
    let cases: Vec<(&str, Value, CiIdentity)> = vec![
        (
            "expired but within the 30 s leeway",
            with(gitlab_claims(), "exp", json!(t - 20)),
            gitlab_identity(),
        ),
        (
            "nbf ahead but within the leeway",
            with(gitlab_claims(), "nbf", json!(t + 20)),
            gitlab_identity(),
        ),
        (
            "aud as an array containing ours",
            with(
                gitlab_claims(),
                "aud",
                json!(["https://other.example.com", AUDIENCE]),
            ),
            gitlab_identity(),
        ),
        (
            "ids as numbers",
            with(
                with(gitlab_claims(), "job_id", json!(1212)),
                "project_id",
                json!(22),
            ),
            gitlab_identity(),
        ),
        (
            "no environment",
            without(without(gitlab_claims(), "environment"), "deployment_tier"),
            no_env.clone(),
        ),
        (
            "empty environment",
            with(
                with(gitlab_claims(), "environment", json!("")),
                "deployment_tier",
                json!(""),
            ),
            no_env,
        ),
        (
            "namespace derived from the project path",
            without(gitlab_claims(), "namespace_path"),
            gitlab_identity(),
        ),
    ];
    for (name, claims, want) in cases {
        let token = s.gitlab_key.sign(&claims);
        assert_eq!(s.verifier.verify(&token, now()).await, Ok(want), "{name}");
    }
}

#[tokio::test]
async fn rejections() {
    let s = setup();
    let t = secs(now());
    let forger = Key::ec("gl-1"); // same kid, different key
    let stranger = Key::ec("other-kid");
    let hmac = Key::new(
        Algorithm::HS256,
        "gl-1",
        EncodingKey::from_secret(b"shared secret"),
    );
    let gl = &s.gitlab_key;
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "expired beyond the leeway",
            gl.sign(&with(gitlab_claims(), "exp", json!(t - 31))),
            AuthError::Expired,
        ),
        (
            "exactly at exp + leeway",
            gl.sign(&with(gitlab_claims(), "exp", json!(t - 30))),
            AuthError::Expired,
        ),
        (
            "not yet valid",
            gl.sign(&with(gitlab_claims(), "nbf", json!(t + 31))),
            AuthError::NotYetValid {
                claim: "nbf",
                at: t + 31,
                now: t,
                leeway_secs: 30,
            },
        ),
        (
            "issued in the future (the issuer's clock or kas's is off)",
            gl.sign(&with(gitlab_claims(), "iat", json!(t + 3600))),
            AuthError::NotYetValid {
                claim: "iat",
                at: t + 3600,
                now: t,
                leeway_secs: 30,
            },
        ),
        (
            "no exp",
            gl.sign(&without(gitlab_claims(), "exp")),
            AuthError::MissingClaim("exp".into()),
        ),
        (
            "exp as a string",
            gl.sign(&with(gitlab_claims(), "exp", json!("soon"))),
            AuthError::InvalidClaim("exp".into()),
        ),
        (
            "wrong audience",
            gl.sign(&with(
                gitlab_claims(),
                "aud",
                json!("https://vault.example.com"),
            )),
            AuthError::WrongAudience,
        ),
        (
            "no audience",
            gl.sign(&without(gitlab_claims(), "aud")),
            AuthError::MissingClaim("aud".into()),
        ),
        (
            "unknown issuer",
            gl.sign(&with(
                gitlab_claims(),
                "iss",
                json!("https://evil.example.com"),
            )),
            AuthError::UnknownIssuer,
        ),
        (
            "issuer differing only by a trailing slash",
            gl.sign(&with(gitlab_claims(), "iss", json!(format!("{GITLAB}/")))),
            AuthError::UnknownIssuer,
        ),
        (
            "no issuer",
            gl.sign(&without(gitlab_claims(), "iss")),
            AuthError::MissingClaim("iss".into()),
        ),
        (
            "issuer as an array",
            gl.sign(&with(gitlab_claims(), "iss", json!([GITLAB]))),
            AuthError::InvalidClaim("iss".into()),
        ),
        (
            "forged signature (right kid, wrong key)",
            forger.sign(&gitlab_claims()),
            AuthError::BadSignature,
        ),
        (
            "GitLab claims signed with GitHub's key",
            s.github_key
                .sign_as(&gitlab_claims(), Algorithm::RS256, Some("gl-1")),
            AuthError::UnsupportedAlgorithm("RS256".into()),
        ),
        (
            "unknown kid",
            stranger.sign(&gitlab_claims()),
            AuthError::UnknownKey,
        ),
        (
            "HMAC is never accepted",
            hmac.sign(&gitlab_claims()),
            AuthError::UnsupportedAlgorithm("HS256".into()),
        ),
        (
            "no project path",
            gl.sign(&without(gitlab_claims(), "project_path")),
            AuthError::MissingClaim("project_path".into()),
        ),
        (
            "no job id",
            gl.sign(&without(gitlab_claims(), "job_id")),
            AuthError::MissingClaim("job_id".into()),
        ),
        (
            "non-numeric job id",
            gl.sign(&with(gitlab_claims(), "job_id", json!("12a"))),
            AuthError::InvalidClaim("job_id".into()),
        ),
        (
            "negative job id",
            gl.sign(&with(gitlab_claims(), "job_id", json!(-1))),
            AuthError::InvalidClaim("job_id".into()),
        ),
        (
            "project path without a namespace",
            gl.sign(&without(
                with(gitlab_claims(), "project_path", json!("app")),
                "namespace_path",
            )),
            AuthError::InvalidClaim("project_path".into()),
        ),
        (
            "a project path climbing out of its group",
            gl.sign(&with(
                gitlab_claims(),
                "project_path",
                json!("acme/platform/../app"),
            )),
            AuthError::InvalidClaim("project_path".into()),
        ),
        (
            "a project path with an empty segment",
            gl.sign(&with(gitlab_claims(), "project_path", json!("acme//app"))),
            AuthError::InvalidClaim("project_path".into()),
        ),
        (
            "environment of the wrong type",
            gl.sign(&with(gitlab_claims(), "environment", json!(5))),
            AuthError::InvalidClaim("environment".into()),
        ),
        (
            "not a JWT",
            "not-a-jwt".to_owned(),
            AuthError::Malformed("token is not a JWT"),
        ),
    ];
    for (name, token, want) in cases {
        let got = s.verifier.verify(&token, now()).await;
        assert_eq!(got, Err(want.clone()), "{name}");
        assert_eq!(want.status(), http::StatusCode::UNAUTHORIZED, "{name}");
    }
}

#[tokio::test]
async fn tampered_payload_fails_the_signature() {
    let s = setup();
    let token = s.gitlab_key.sign(&gitlab_claims());
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    // Re-encode the payload with another project path, keep header and signature.
    let other = s.gitlab_key.sign(&with(
        gitlab_claims(),
        "project_path",
        json!("acme/platform/admin"),
    ));
    parts[1] = other.split('.').nth(1).expect("payload").to_owned();
    assert_eq!(
        s.verifier.verify(&parts.join("."), now()).await,
        Err(AuthError::BadSignature)
    );
}

#[tokio::test]
async fn token_without_kid_tries_the_fitting_keys() {
    let s = setup();
    let token = s
        .gitlab_key
        .sign_as(&gitlab_claims(), Algorithm::ES256, None);
    assert_eq!(
        s.verifier.verify(&token, now()).await,
        Ok(gitlab_identity())
    );

    let stranger = Key::ec("x");
    let token = stranger.sign_as(&gitlab_claims(), Algorithm::ES256, None);
    assert_eq!(
        s.verifier.verify(&token, now()).await,
        Err(AuthError::BadSignature)
    );

    // No RSA key in GitLab's set at all.
    let token = s
        .github_key
        .sign_as(&gitlab_claims(), Algorithm::RS256, None);
    assert_eq!(
        s.verifier.verify(&token, now()).await,
        Err(AuthError::UnknownKey)
    );
}

#[tokio::test]
async fn unknown_kid_reloads_at_most_once_a_minute() {
    let s = setup();
    let t0 = now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let claims_at = |t: SystemTime| with(gitlab_claims(), "exp", json!(secs(t) + 300));

    // First use loads the set with gl-1 only.
    let token = s.gitlab_key.sign(&claims_at(t0));
    assert!(s.verifier.verify(&token, t0).await.is_ok());

    // The issuer rotates in gl-2.
    let rotated = Key::ec("gl-2");
    write_jwks(&s.gitlab_jwks, &[&s.gitlab_key, &rotated]);
    let token = rotated.sign(&claims_at(at(1)));
    assert_eq!(
        s.verifier.verify(&token, at(1)).await,
        Err(AuthError::UnknownKey),
        "a reload within a minute of the last one is refused"
    );
    let token = rotated.sign(&claims_at(at(60)));
    assert!(
        s.verifier.verify(&token, at(60)).await.is_ok(),
        "a minute later the unknown kid triggers a reload"
    );

    // And gl-3 a moment later: rate-limited again, then fine.
    let third = Key::ec("gl-3");
    write_jwks(&s.gitlab_jwks, &[&rotated, &third]);
    let token = third.sign(&claims_at(at(61)));
    assert_eq!(
        s.verifier.verify(&token, at(61)).await,
        Err(AuthError::UnknownKey)
    );
    let token = third.sign(&claims_at(at(120)));
    assert!(s.verifier.verify(&token, at(120)).await.is_ok());
}

#[tokio::test]
async fn stale_sets_are_reloaded_and_failed_reloads_keep_the_old_keys() {
    let s = setup();
    let t0 = now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let claims_at = |t: SystemTime| with(gitlab_claims(), "exp", json!(secs(t) + 300));
    let old = &s.gitlab_key;
    assert!(
        s.verifier
            .verify(&old.sign(&claims_at(t0)), t0)
            .await
            .is_ok()
    );

    // The issuer retires gl-1; cached keys stay valid until the refresh interval (1 h).
    let new = Key::ec("gl-9");
    write_jwks(&s.gitlab_jwks, &[&new]);
    let t = at(3599);
    assert!(s.verifier.verify(&old.sign(&claims_at(t)), t).await.is_ok());
    let t = at(3600);
    assert_eq!(
        s.verifier.verify(&old.sign(&claims_at(t)), t).await,
        Err(AuthError::UnknownKey)
    );
    assert!(s.verifier.verify(&new.sign(&claims_at(t)), t).await.is_ok());

    // The file breaks: the last good set keeps working.
    std::fs::write(&s.gitlab_jwks, b"{not json").expect("writes");
    let t = at(7300);
    assert!(s.verifier.verify(&new.sign(&claims_at(t)), t).await.is_ok());
}

/// Keys kept after failed reloads serve only up to the maximum key age (24 h by default):
/// then the issuer's tokens get a 503 saying why, and the next successful reload ends it.
#[tokio::test]
async fn keys_not_reloaded_within_the_maximum_age_are_refused_with_a_503() {
    let s = setup();
    let t0 = now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let token_at = |t: SystemTime| {
        s.gitlab_key
            .sign(&with(gitlab_claims(), "exp", json!(secs(t) + 300)))
    };
    assert!(s.verifier.verify(&token_at(t0), t0).await.is_ok());

    std::fs::write(&s.gitlab_jwks, b"{not json").expect("writes");
    let t = at(86_399);
    assert!(
        s.verifier.verify(&token_at(t), t).await.is_ok(),
        "within the age"
    );
    let t = at(86_400);
    let refused = s.verifier.verify(&token_at(t), t).await;
    assert_eq!(
        refused,
        Err(AuthError::KeysTooOld {
            issuer: GITLAB.into(),
            max_age: Duration::from_secs(86_400),
        })
    );
    let err = refused.expect_err("refused");
    assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(err.to_string().contains("could not be reloaded"), "{err}");

    write_jwks(&s.gitlab_jwks, &[&s.gitlab_key]);
    let t = at(86_460);
    assert!(s.verifier.verify(&token_at(t), t).await.is_ok(), "reloaded");
}

#[tokio::test]
async fn unloadable_keys_are_a_503() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = Key::ec("k");
    let oct_only = dir.path().join("oct.json");
    std::fs::write(
        &oct_only,
        serde_json::to_vec(&json!({"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}))
            .expect("json"),
    )
    .expect("writes");
    for source in [
        JwksSource::File(dir.path().join("missing.json")),
        JwksSource::File(oct_only),
        JwksSource::Url("https://gitlab.example.com/oauth/discovery/keys".into()),
    ] {
        let verifier = OidcVerifier::new(
            vec![issuer(GITLAB, source.clone(), ClaimMapping::gitlab())],
            Arc::new(NoFetcher),
        );
        let err = verifier
            .verify(&key.sign(&gitlab_claims()), now())
            .await
            .expect_err("no keys");
        assert_eq!(
            err,
            AuthError::KeysUnavailable {
                issuer: GITLAB.into()
            },
            "{source:?}"
        );
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }
}

/// Serves a JWKS body and counts fetches.
#[derive(Debug)]
struct FakeFetcher {
    body: Mutex<Vec<u8>>,
    fetches: AtomicUsize,
}

#[async_trait]
impl JwksFetcher for FakeFetcher {
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        assert_eq!(url, "https://gitlab.example.com/oauth/discovery/keys");
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let body = self.body.lock().map_err(|_| FetchError::new("poisoned"))?;
        if body.is_empty() {
            return Err(FetchError::new("503 from the issuer"));
        }
        Ok(body.clone())
    }
}

/// A JWKS URL that answers only as the test allows: each fetch reports that it started, then
/// waits for a permit.
#[derive(Debug)]
struct GatedFetcher {
    body: Vec<u8>,
    permits: tokio::sync::Semaphore,
    started: tokio::sync::mpsc::UnboundedSender<()>,
    fetches: AtomicUsize,
}

#[async_trait]
impl JwksFetcher for GatedFetcher {
    async fn fetch(&self, _url: &str) -> Result<Vec<u8>, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let _ = self.started.send(());
        let permit = self.permits.acquire().await;
        permit.map_err(|_| FetchError::new("closed"))?.forget();
        Ok(self.body.clone())
    }
}

/// A verifier whose GitLab keys (`key`) come from a [`GatedFetcher`] with `permits` answers
/// allowed; the receiver tells when a fetch starts.
fn gated(
    key: &Key,
    permits: usize,
) -> (
    Arc<OidcVerifier>,
    Arc<GatedFetcher>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (started, starts) = tokio::sync::mpsc::unbounded_channel();
    let fetcher = Arc::new(GatedFetcher {
        body: jwks(&[key]),
        permits: tokio::sync::Semaphore::new(permits),
        started,
        fetches: AtomicUsize::new(0),
    });
    let source = JwksSource::Url("https://gitlab.example.com/oauth/discovery/keys".into());
    let cache = JwksCache::new([(GITLAB.to_owned(), source.clone())], fetcher.clone());
    let issuers = vec![issuer(GITLAB, source, ClaimMapping::gitlab())];
    let verifier = Arc::new(OidcVerifier::with_cache(issuers, cache));
    (verifier, fetcher, starts)
}

/// During a JWKS outage (a fetch hanging until its deadline), a token with a trusted `iss` and
/// a made-up `kid` starts a reload; tokens whose key is already known verify meanwhile instead
/// of queueing behind the fetch.
#[tokio::test]
async fn a_hanging_reload_does_not_hold_up_tokens_with_a_known_key() {
    let key = Key::ec("k1");
    let (verifier, fetcher, mut starts) = gated(&key, 1);
    let claims = |job: &str| with(gitlab_claims(), "job_id", json!(job));
    assert!(
        verifier
            .verify(&key.sign(&claims("1")), now())
            .await
            .is_ok()
    );
    starts.recv().await.expect("the first load");

    let bogus = Key::ec("made-up").sign(&gitlab_claims());
    let attacker = tokio::spawn({
        let verifier = Arc::clone(&verifier);
        async move {
            verifier
                .verify(&bogus, now() + Duration::from_secs(60))
                .await
        }
    });
    starts
        .recv()
        .await
        .expect("the reload the made-up kid asks for");

    // A token not verified before (another job), so its signature is checked with the keys.
    let known = key.sign(&claims("2"));
    let verified = tokio::time::timeout(
        Duration::from_secs(5),
        verifier.verify(&known, now() + Duration::from_secs(61)),
    )
    .await
    .expect("a token with a known key should not wait for the hanging reload");
    assert!(verified.is_ok(), "{verified:?}");

    fetcher.permits.add_permits(1);
    assert_eq!(attacker.await.expect("joins"), Err(AuthError::UnknownKey));
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 2);
}

/// Verifications that need the keys while they load wait for that one load instead of
/// starting their own.
#[tokio::test]
async fn verifications_waiting_for_keys_share_one_load() {
    let key = Key::ec("k1");
    let (verifier, fetcher, mut starts) = gated(&key, 0);
    let waiting: Vec<_> = (0..3)
        .map(|job| {
            let verifier = Arc::clone(&verifier);
            let token = key.sign(&with(gitlab_claims(), "job_id", json!(job.to_string())));
            tokio::spawn(async move { verifier.verify(&token, now()).await })
        })
        .collect();
    starts.recv().await.expect("a load starts");
    fetcher.permits.add_permits(1);
    for w in waiting {
        assert!(w.await.expect("joins").is_ok());
    }
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn url_sources_go_through_the_fetcher() {
    let key = Key::ec("k1");
    // Besides the usable key: an unknown key type and an encryption key, both skipped.
    let mut set: Value = serde_json::from_slice(&jwks(&[&key])).expect("json");
    set["keys"]
        .as_array_mut()
        .expect("keys")
        .extend([json!({"kty": "XYZ", "kid": "weird"}), {
            let mut enc = serde_json::to_value(&Key::ec("enc").jwk).expect("json");
            enc["use"] = json!("enc");
            enc
        }]);
    let fetcher = Arc::new(FakeFetcher {
        body: Mutex::new(serde_json::to_vec(&set).expect("json")),
        fetches: AtomicUsize::new(0),
    });
    let source = JwksSource::Url("https://gitlab.example.com/oauth/discovery/keys".into());
    let cache = JwksCache::new([(GITLAB.to_owned(), source.clone())], fetcher.clone())
        .with_min_refresh_interval(Duration::from_secs(10));
    let verifier =
        OidcVerifier::with_cache(vec![issuer(GITLAB, source, ClaimMapping::gitlab())], cache);

    assert_eq!(
        verifier.verify(&key.sign(&gitlab_claims()), now()).await,
        Ok(gitlab_identity())
    );
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);

    // A flood of made-up kids costs one fetch per interval, not one per token.
    for i in 0..20 {
        let token = Key::ec(&format!("bogus-{i}")).sign(&gitlab_claims());
        assert_eq!(
            verifier
                .verify(&token, now() + Duration::from_secs(i % 5))
                .await,
            Err(AuthError::UnknownKey)
        );
    }
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    let token = Key::ec("bogus").sign(&gitlab_claims());
    let later = now() + Duration::from_secs(10);
    assert_eq!(
        verifier.verify(&token, later).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 2);

    // The encryption key is not a signature key.
    let enc_signed = Key::ec("enc").sign(&gitlab_claims());
    assert_eq!(
        verifier.verify(&enc_signed, later).await,
        Err(AuthError::UnknownKey)
    );

    // The issuer goes down: the cached key keeps working.
    fetcher.body.lock().expect("lock").clear();
    let much_later = now() + Duration::from_secs(2 * 3600);
    let claims = with(gitlab_claims(), "exp", json!(secs(much_later) + 60));
    assert!(
        verifier
            .verify(&key.sign(&claims), much_later)
            .await
            .is_ok()
    );
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_remembered_token_is_still_refused_once_expired() {
    let s = setup();
    let t = secs(now());
    let token = s
        .gitlab_key
        .sign(&with(gitlab_claims(), "exp", json!(t + 60)));
    let first = s.verifier.verify(&token, now()).await.expect("valid");
    // Within the cache's lifetime the same identity comes back…
    let again = s
        .verifier
        .verify(&token, now() + Duration::from_secs(5))
        .await
        .expect("still valid");
    assert_eq!(first, again);
    // …but the token's own expiry still applies to the remembered entry.
    assert!(matches!(
        s.verifier
            .verify(&token, now() + Duration::from_secs(91))
            .await,
        Err(AuthError::Expired)
    ));
}

#[tokio::test]
async fn a_remembered_token_is_checked_again_after_the_cache_lifetime() {
    // The key set is a file; once the issuer withdraws the key, a token verified before is
    // refused when its cache entry runs out.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    let key = Key::ec("gl-1");
    write_jwks(&path, &[&key]);
    let source = JwksSource::File(path.clone());
    let cache = JwksCache::new([(GITLAB.to_owned(), source.clone())], Arc::new(NoFetcher))
        .with_refresh_interval(Duration::from_secs(1))
        .with_min_refresh_interval(Duration::ZERO);
    let verifier =
        OidcVerifier::with_cache(vec![issuer(GITLAB, source, ClaimMapping::gitlab())], cache);
    let t = secs(now());
    let token = key.sign(&with(gitlab_claims(), "exp", json!(t + 3600)));
    verifier.verify(&token, now()).await.expect("valid");
    write_jwks(&path, &[&Key::ec("gl-2")]);
    // The key set is reloaded (older than 1 s), yet the token was verified 2 s ago.
    let soon = now() + Duration::from_secs(2);
    verifier.verify(&token, soon).await.expect("remembered");
    let later = now() + tether_kubeproxy_server::VERIFIED_TOKEN_TTL + Duration::from_secs(1);
    assert_eq!(
        verifier.verify(&token, later).await,
        Err(AuthError::UnknownKey)
    );
}
