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
