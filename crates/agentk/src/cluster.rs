//! Which cluster agentk runs in, as far as kas needs to tell clusters apart: the UID of the
//! ServiceAccount agentk uses against the API server. Replicas of one agent share it; the same
//! token installed in a second cluster (a copied Secret, a reused Helm values file) runs as a
//! ServiceAccount with another UID, and kas warns — such a token sends a CI job's kubectl to
//! whichever cluster's tunnel kas picks, and applies the same GitOps twice.
//!
//! The UID comes from the ServiceAccount token's own claims, so no API call or extra RBAC is
//! needed; it is an identity hint for kas, not a credential, and is not verified here.

use std::path::{Path, PathBuf};

use base64::Engine;
use secrecy::ExposeSecret;
use tether_tunnel_agent::{AgentToken, ClusterId};

/// Longest UID kept (Kubernetes UIDs are 36 characters).
const MAX_UID_LEN: usize = 64;

/// The ServiceAccount UID of the API token `cfg` uses; empty when it is not a ServiceAccount
/// token (a client certificate, an exec plugin, a user's token outside a cluster). A token
/// file (a Pod's projected token, rotated by the kubelet) is followed: the ServiceAccount
/// created again gives a new UID, which `streams` reopen to send.
pub fn cluster_id(cfg: &kube::Config, streams: &AgentToken) -> ClusterId {
    let auth = &cfg.auth_info;
    match (&auth.token, &auth.token_file) {
        (Some(t), _) => {
            ClusterId::fixed(service_account_uid(t.expose_secret().trim()).unwrap_or_default())
        }
        (None, Some(file)) => {
            let file = PathBuf::from(file);
            ClusterId::following(move || uid_in_file(&file), streams)
        }
        (None, None) => ClusterId::default(),
    }
}

/// The UID in the token file; `None` while it cannot be read or holds no UID (being
/// rewritten: the last one read stays).
fn uid_in_file(file: &Path) -> Option<String> {
    let token = std::fs::read_to_string(file).ok()?;
    service_account_uid(token.trim())
}

/// The ServiceAccount UID in a ServiceAccount JWT: the bound token's
/// `kubernetes.io.serviceaccount.uid`, or a legacy Secret token's
/// `kubernetes.io/serviceaccount/service-account.uid`.
fn service_account_uid(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let uid = claims
        .pointer("/kubernetes.io/serviceaccount/uid")
        .or_else(|| claims.get("kubernetes.io/serviceaccount/service-account.uid"))?
        .as_str()?;
    let valid = !uid.is_empty()
        && uid.len() <= MAX_UID_LEN
        && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    valid.then(|| uid.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn the_service_account_uid_comes_from_bound_and_legacy_tokens() {
        let bound = serde_json::json!({"kubernetes.io": {"namespace": "gitlab-agent",
            "serviceaccount": {"name": "agentk", "uid": "4f7c6a1e-0b7d-4c1e-9c55-1f0e9d2b3a10"}}});
        assert_eq!(
            service_account_uid(&jwt(&bound)).as_deref(),
            Some("4f7c6a1e-0b7d-4c1e-9c55-1f0e9d2b3a10")
        );
        let legacy =
            serde_json::json!({"kubernetes.io/serviceaccount/service-account.uid": "abc-123"});
        assert_eq!(
            service_account_uid(&jwt(&legacy)).as_deref(),
            Some("abc-123")
        );
    }

    #[test]
    fn a_token_file_is_followed_to_a_new_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let token_of = |uid: &str| {
            jwt(&serde_json::json!({"kubernetes.io": {"serviceaccount": {"uid": uid}}}))
        };
        std::fs::write(&file, token_of("uid-old")).unwrap();
        let mut cfg = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        cfg.auth_info.token_file = Some(file.display().to_string());
        let streams = AgentToken::fixed("agent-token");
        let id = cluster_id(&cfg, &streams);
        assert_eq!(id.current(), "uid-old");
        std::fs::write(&file, "").unwrap();
        assert!(!id.refresh(), "a file being rewritten keeps the UID");
        std::fs::write(&file, token_of("uid-new")).unwrap();
        let changes = streams.changes();
        assert!(id.refresh());
        assert_eq!(id.current(), "uid-new");
        assert!(changes.has_changed().unwrap(), "streams reopen to send it");
    }

    #[test]
    fn other_tokens_and_odd_uids_give_none() {
        assert_eq!(service_account_uid("not-a-jwt"), None);
        assert_eq!(
            service_account_uid(&jwt(&serde_json::json!({"sub": "alice"}))),
            None
        );
        let odd = serde_json::json!({"kubernetes.io": {"serviceaccount": {"uid": "a\nb"}}});
        assert_eq!(service_account_uid(&jwt(&odd)), None);
        let long =
            serde_json::json!({"kubernetes.io": {"serviceaccount": {"uid": "a".repeat(65)}}});
        assert_eq!(service_account_uid(&jwt(&long)), None);
    }
}
