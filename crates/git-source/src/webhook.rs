//! Push webhook verification for GitLab, GitHub and Gitea, as pure functions over headers and
//! body, so the HTTP layer stays elsewhere.
//!
//! - GitLab sends the shared secret itself in `X-Gitlab-Token`.
//! - GitHub sends `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`.
//! - Gitea sends `X-Gitea-Signature: <hex HMAC-SHA256(secret, body)>` (newer versions also send
//!   GitHub's header; the Gitea one is checked first when present).

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Header carrying GitLab's shared secret.
pub const GITLAB_TOKEN_HEADER: &str = "x-gitlab-token";
/// Header carrying GitHub's body signature.
pub const GITHUB_SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Header carrying Gitea's body signature.
pub const GITEA_SIGNATURE_HEADER: &str = "x-gitea-signature";

/// Which forge sent a verified webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookKind {
    /// GitLab (`X-Gitlab-Token`).
    GitLab,
    /// GitHub (`X-Hub-Signature-256`).
    GitHub,
    /// Gitea (`X-Gitea-Signature`).
    Gitea,
}

/// Why a webhook was rejected. Deliberately coarse: details would help an attacker more than an
/// operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// None of the known token or signature headers is present.
    #[error("the webhook has no X-Gitlab-Token, X-Hub-Signature-256 or X-Gitea-Signature header")]
    Missing,
    /// A header is present but does not match the secret (or is malformed).
    #[error("the webhook token or signature does not match the configured secret")]
    Mismatch,
    /// The configured secret is empty; accepting anything would make the check meaningless.
    #[error("no webhook secret is configured")]
    EmptySecret,
}

/// Verifies a webhook's token or signature against `secret`.
pub fn verify_webhook(
    headers: &http::HeaderMap,
    body: &[u8],
    secret: &[u8],
) -> Result<WebhookKind, WebhookError> {
    verify_webhook_with(
        |name| headers.get(name).map(http::HeaderValue::as_bytes),
        body,
        secret,
    )
}

/// [`verify_webhook`] with a header lookup closure (called with lowercase header names), for
/// callers that do not have an [`http::HeaderMap`].
pub fn verify_webhook_with<'h>(
    header: impl Fn(&str) -> Option<&'h [u8]>,
    body: &[u8],
    secret: &[u8],
) -> Result<WebhookKind, WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::EmptySecret);
    }
    if let Some(token) = header(GITLAB_TOKEN_HEADER) {
        // Hash both sides first so the comparison takes the same time whatever the lengths.
        let equal = Sha256::digest(token).ct_eq(&Sha256::digest(secret));
        return if bool::from(equal) {
            Ok(WebhookKind::GitLab)
        } else {
            Err(WebhookError::Mismatch)
        };
    }
    if let Some(signature) = header(GITEA_SIGNATURE_HEADER) {
        return verify_hmac(signature, body, secret).map(|()| WebhookKind::Gitea);
    }
    if let Some(signature) = header(GITHUB_SIGNATURE_HEADER) {
        let hex = signature
            .strip_prefix(b"sha256=")
            .ok_or(WebhookError::Mismatch)?;
        return verify_hmac(hex, body, secret).map(|()| WebhookKind::GitHub);
    }
    Err(WebhookError::Missing)
}

fn verify_hmac(hex_signature: &[u8], body: &[u8], secret: &[u8]) -> Result<(), WebhookError> {
    let signature = hex::decode(hex_signature.trim_ascii()).map_err(|_| WebhookError::Mismatch)?;
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| WebhookError::Mismatch)?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&signature)
        .map_err(|_| WebhookError::Mismatch)
}

/// The ref and new commit of a push, from a webhook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    /// The full ref name, like `refs/heads/main` or `refs/tags/v1`.
    pub git_ref: String,
    /// The commit the ref points to after the push; all zeros when the ref was deleted.
    pub after: String,
}

impl PushEvent {
    /// Extracts `ref` and `after` from a push event body. GitLab, GitHub and Gitea all use these
    /// two top-level fields. `None` when the body is not JSON or lacks them (other event kinds).
    pub fn from_body(body: &[u8]) -> Option<PushEvent> {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(rename = "ref")]
            git_ref: String,
            after: String,
        }
        let body: Body = serde_json::from_slice(body).ok()?;
        Some(PushEvent {
            git_ref: body.git_ref,
            after: body.after,
        })
    }

    /// The branch name, if a branch was pushed.
    pub fn branch(&self) -> Option<&str> {
        self.git_ref.strip_prefix("refs/heads/")
    }

    /// The tag name, if a tag was pushed.
    pub fn tag(&self) -> Option<&str> {
        self.git_ref.strip_prefix("refs/tags/")
    }

    /// Whether the push deleted the ref.
    pub fn is_deletion(&self) -> bool {
        !self.after.is_empty() && self.after.bytes().all(|b| b == b'0')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    // From GitHub's documentation ("Validating webhook deliveries"), computed independently of
    // this crate's code.
    const GITHUB_DOC_SIGNATURE: &str =
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                *name,
                HeaderValue::from_str(value).expect("valid header value"),
            );
        }
        map
    }

    fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret).expect("any key length");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn known_answer_matches_github_docs() {
        assert_eq!(hmac_hex(SECRET, BODY), GITHUB_DOC_SIGNATURE);
    }

    #[test]
    fn verification_table() {
        let good = format!("sha256={GITHUB_DOC_SIGNATURE}");
        let wrong = format!("sha256={}", hmac_hex(b"other", BODY));
        type Case<'a> = (
            &'a str,
            Vec<(&'static str, &'a str)>,
            &'a [u8],
            Result<WebhookKind, WebhookError>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "gitlab right",
                vec![("X-Gitlab-Token", "It's a Secret to Everybody")],
                SECRET,
                Ok(WebhookKind::GitLab),
            ),
            (
                "gitlab wrong",
                vec![("X-Gitlab-Token", "nope")],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "gitlab prefix",
                vec![("X-Gitlab-Token", "It's a Secret")],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "gitlab empty",
                vec![("X-Gitlab-Token", "")],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "github right",
                vec![("X-Hub-Signature-256", &good)],
                SECRET,
                Ok(WebhookKind::GitHub),
            ),
            (
                "github wrong",
                vec![("X-Hub-Signature-256", &wrong)],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "github no prefix",
                vec![("X-Hub-Signature-256", GITHUB_DOC_SIGNATURE)],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "github not hex",
                vec![("X-Hub-Signature-256", "sha256=zz")],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "github wrong secret",
                vec![("X-Hub-Signature-256", &good)],
                b"other",
                Err(WebhookError::Mismatch),
            ),
            (
                "gitea right",
                vec![("X-Gitea-Signature", GITHUB_DOC_SIGNATURE)],
                SECRET,
                Ok(WebhookKind::Gitea),
            ),
            (
                "gitea with github header too",
                vec![
                    ("X-Gitea-Signature", GITHUB_DOC_SIGNATURE),
                    ("X-Hub-Signature-256", &good),
                ],
                SECRET,
                Ok(WebhookKind::Gitea),
            ),
            (
                "gitea wrong",
                vec![("X-Gitea-Signature", &wrong[7..])],
                SECRET,
                Err(WebhookError::Mismatch),
            ),
            (
                "missing",
                vec![("X-Other", "x")],
                SECRET,
                Err(WebhookError::Missing),
            ),
            (
                "empty secret",
                vec![("X-Gitlab-Token", "")],
                b"",
                Err(WebhookError::EmptySecret),
            ),
        ];
        for (name, pairs, secret, want) in cases {
            assert_eq!(
                verify_webhook(&headers(&pairs), BODY, secret),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn body_is_signed() {
        let sig = format!("sha256={GITHUB_DOC_SIGNATURE}");
        let map = headers(&[("X-Hub-Signature-256", &sig)]);
        assert_eq!(
            verify_webhook(&map, b"Hello, World?", SECRET),
            Err(WebhookError::Mismatch)
        );
    }

    #[test]
    fn lookup_closure_variant() {
        let got = verify_webhook_with(
            |name| (name == GITEA_SIGNATURE_HEADER).then_some(GITHUB_DOC_SIGNATURE.as_bytes()),
            BODY,
            SECRET,
        );
        assert_eq!(got, Ok(WebhookKind::Gitea));
    }

    #[test]
    fn push_events() {
        let gitlab = br#"{"object_kind":"push","before":"95790bf891e76fee5e1747ab589903a6a1f80f22","after":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","ref":"refs/heads/master","project":{"id":15}}"#;
        let event = PushEvent::from_body(gitlab).expect("a push event");
        assert_eq!(event.branch(), Some("master"));
        assert_eq!(event.after, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
        assert!(!event.is_deletion());

        let tag = br#"{"ref":"refs/tags/v1.0","after":"0000000000000000000000000000000000000000","pusher":{}}"#;
        let event = PushEvent::from_body(tag).expect("a push event");
        assert_eq!(event.tag(), Some("v1.0"));
        assert_eq!(event.branch(), None);
        assert!(event.is_deletion());

        assert_eq!(PushEvent::from_body(br#"{"zen":"ping"}"#), None);
        assert_eq!(PushEvent::from_body(b"not json"), None);
    }
}
