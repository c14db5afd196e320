//! CI job ID tokens as GitLab issues them, signed by a throwaway key kas is told to trust.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://gitlab.test.local";
pub const AUDIENCE: &str = "https://kas.test.local";

pub struct SigningKey {
    pub encoding: EncodingKey,
    pub jwk: Jwk,
}

impl SigningKey {
    pub fn new(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate().unwrap();
        let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        SigningKey { encoding, jwk }
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = self.jwk.common.key_id.clone();
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// GitLab CI ID token claims for job 777 of project `group/app` (id 42).
pub fn claims(project: &str) -> Value {
    let t = now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "iat": t, "nbf": t - 5, "exp": t + 600,
        "project_path": project, "project_id": "42", "namespace_path": "group",
        "job_id": "777", "pipeline_id": "555", "user_login": "alice",
    })
}

/// A minimal but real OpenID Connect provider on 127.0.0.1 for the web UI's login: discovery,
/// JWKS, `/authorize` (approves the current user at once, records the PKCE challenge and
/// nonce) and `/token` (checks the code, redirect URI, client and PKCE verifier, then signs an
/// ID token).
pub struct Issuer {
    pub url: String,
    pub client_id: String,
    user: std::sync::Arc<std::sync::Mutex<Value>>,
    _server: tokio::task::JoinHandle<()>,
}

/// What `/authorize` remembers until `/token`.
struct Grant {
    challenge: String,
    nonce: String,
    redirect_uri: String,
    user: Value,
}

#[derive(Clone)]
struct IssuerState {
    url: String,
    client_id: String,
    key: std::sync::Arc<SigningKey>,
    user: std::sync::Arc<std::sync::Mutex<Value>>,
    grants: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Grant>>>,
}

impl Issuer {
    pub async fn start(client_id: &str) -> Issuer {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let user = std::sync::Arc::new(std::sync::Mutex::new(json!({})));
        let state = IssuerState {
            url: url.clone(),
            client_id: client_id.into(),
            key: std::sync::Arc::new(SigningKey::new("web-key")),
            user: user.clone(),
            grants: std::sync::Arc::default(),
        };
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", axum::routing::post(token))
            .with_state(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Issuer {
            url,
            client_id: client_id.into(),
            user,
            _server: server,
        }
    }

    /// The person the next `/authorize` approves: `sub`, username and groups.
    pub fn log_in_as(&self, sub: &str, username: &str, groups: &[&str]) {
        *self.user.lock().unwrap() =
            json!({"sub": sub, "preferred_username": username, "groups": groups});
    }
}

async fn discovery(
    axum::extract::State(s): axum::extract::State<IssuerState>,
) -> axum::Json<Value> {
    axum::Json(json!({
        "issuer": s.url,
        "authorization_endpoint": format!("{}/authorize", s.url),
        "token_endpoint": format!("{}/token", s.url),
        "jwks_uri": format!("{}/jwks", s.url),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn jwks(axum::extract::State(s): axum::extract::State<IssuerState>) -> axum::Json<Value> {
    axum::Json(json!({"keys": [&s.key.jwk]}))
}

type Params = axum::extract::Query<std::collections::HashMap<String, String>>;

async fn authorize(
    axum::extract::State(s): axum::extract::State<IssuerState>,
    axum::extract::Query(q): Params,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let p = |k: &str| q.get(k).cloned().unwrap_or_default();
    if p("client_id") != s.client_id
        || p("response_type") != "code"
        || p("code_challenge_method") != "S256"
        || p("code_challenge").is_empty()
        || !p("scope").split(' ').any(|x| x == "openid")
    {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            "bad authorization request",
        )
            .into_response();
    }
    let code = format!("code-{}", rand_hex());
    let grant = Grant {
        challenge: p("code_challenge"),
        nonce: p("nonce"),
        redirect_uri: p("redirect_uri"),
        user: s.user.lock().unwrap().clone(),
    };
    s.grants.lock().unwrap().insert(code.clone(), grant);
    let to = format!(
        "{}?code={code}&state={}",
        p("redirect_uri"),
        form_encode(&p("state"))
    );
    axum::response::Redirect::to(&to).into_response()
}

async fn token(
    axum::extract::State(s): axum::extract::State<IssuerState>,
    axum::extract::Form(f): axum::extract::Form<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use base64::Engine as _;
    use sha2::Digest as _;
    let p = |k: &str| f.get(k).cloned().unwrap_or_default();
    let refused = || {
        (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        )
    };
    let Some(g) = s.grants.lock().unwrap().remove(&p("code")) else {
        return refused().into_response();
    };
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(p("code_verifier").as_bytes()));
    if p("grant_type") != "authorization_code"
        || p("client_id") != s.client_id
        || p("redirect_uri") != g.redirect_uri
        || challenge != g.challenge
    {
        return refused().into_response();
    }
    let t = now();
    let mut claims =
        json!({"iss": s.url, "aud": s.client_id, "iat": t, "exp": t + 300, "nonce": g.nonce});
    for (k, v) in g.user.as_object().unwrap() {
        claims[k] = v.clone();
    }
    axum::Json(
        json!({"access_token": rand_hex(), "token_type": "Bearer", "expires_in": 300,
        "id_token": s.key.sign(&claims)}),
    )
    .into_response()
}

fn rand_hex() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
