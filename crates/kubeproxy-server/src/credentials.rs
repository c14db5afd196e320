//! Credentials on the Kubernetes API proxy: `Authorization: Bearer <type>:<agent id>:<secret>`.
//!
//! The agent id is part of the credential (as upstream) because one job or user may be allowed to
//! use several agents; the kubeconfig GitLab generates has one user entry per agent.
//!
//! - `ci:<agent id>:<ID token>` — a CI job's OIDC ID token (GitLab `id_tokens:`, GitHub Actions
//!   OIDC). Upstream carries `CI_JOB_TOKEN` here; tether has no GitLab to ask about it, so the job
//!   presents a signed ID token that [`crate::oidc`] verifies offline.
//! - `pat:<agent id>:<token>` — a personal access token, checked by kas against its store.
//!
//! The secret never appears in `Debug`, `Display` or an error: these values end up in logs.

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::AuthError;

/// A parsed proxy credential. `Debug` shows the kind and agent id only.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// `ci:<agent_id>:<jwt>`: a CI job's ID token.
    CiJob {
        /// Agent the job wants to reach.
        agent_id: i64,
        /// The compact-serialized JWT (secret).
        jwt: String,
    },
    /// `pat:<agent_id>:<token>`: a personal access token.
    Personal {
        /// Agent the user wants to reach.
        agent_id: i64,
        /// The token (secret).
        token: String,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::CiJob { agent_id, .. } => f
                .debug_struct("CiJob")
                .field("agent_id", agent_id)
                .field("jwt", &"<redacted>")
                .finish(),
            Credential::Personal { agent_id, .. } => f
                .debug_struct("Personal")
                .field("agent_id", agent_id)
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

impl Credential {
    /// The agent the credential asks for.
    pub fn agent_id(&self) -> i64 {
        match self {
            Credential::CiJob { agent_id, .. } | Credential::Personal { agent_id, .. } => *agent_id,
        }
    }

    /// Parses the request's single `Authorization` header.
    ///
    /// Several `Authorization` headers are refused rather than picking one: proxies disagree on
    /// which one wins, and that disagreement is a classic smuggling vector.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, AuthError> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = values.next().ok_or(AuthError::Missing)?;
        if values.next().is_some() {
            return Err(AuthError::Malformed("more than one Authorization header"));
        }
        let value = value
            .to_str()
            .map_err(|_| AuthError::Malformed("Authorization header is not visible ASCII"))?;
        Self::parse(value)
    }

    /// Parses an `Authorization` header value.
    pub fn parse(value: &str) -> Result<Self, AuthError> {
        // The auth scheme is case-insensitive (RFC 9110 §11.1); upstream only took "Bearer ".
        let rest = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest,
            _ => return Err(AuthError::Malformed("expected a Bearer credential")),
        };
        let (kind, rest) = rest
            .split_once(':')
            .ok_or(AuthError::Malformed("expected <type>:<agent id>:<token>"))?;
        let (agent_id, secret) = rest
            .split_once(':')
            .ok_or(AuthError::Malformed("expected <type>:<agent id>:<token>"))?;
        // Only plain decimal digits: `i64::from_str` would also take a sign, and "+1" or "-0"
        // naming the same agent as "1" or "0" helps nobody.
        if agent_id.is_empty() || !agent_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AuthError::Malformed("agent id is not a number"));
        }
        let agent_id: i64 = agent_id
            .parse()
            .map_err(|_| AuthError::Malformed("agent id is out of range"))?;
        if secret.is_empty() {
            return Err(AuthError::Malformed("empty token"));
        }
        if secret.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(AuthError::Malformed("token contains whitespace"));
        }
        let secret = secret.to_owned();
        match kind {
            "ci" => Ok(Credential::CiJob {
                agent_id,
                jwt: secret,
            }),
            "pat" => Ok(Credential::Personal {
                agent_id,
                token: secret,
            }),
            _ => Err(AuthError::Malformed(
                "unknown token type, expected ci or pat",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn parse_table() {
        let ci = |agent_id, jwt: &str| {
            Ok(Credential::CiJob {
                agent_id,
                jwt: jwt.to_owned(),
            })
        };
        let pat = |agent_id, token: &str| {
            Ok(Credential::Personal {
                agent_id,
                token: token.to_owned(),
            })
        };
        let malformed = |why| Err(AuthError::Malformed(why));
        let cases: Vec<(&str, Result<Credential, AuthError>)> = vec![
            ("Bearer ci:5:aaa.bbb.ccc", ci(5, "aaa.bbb.ccc")),
            ("bearer ci:5:aaa.bbb.ccc", ci(5, "aaa.bbb.ccc")),
            ("BEARER pat:42:glpat-xyz", pat(42, "glpat-xyz")),
            // Only the first two colons split: the rest belongs to the token.
            ("Bearer pat:1:a:b", pat(1, "a:b")),
            ("Bearer ci:0:t", ci(0, "t")),
            ("Basic Y2k6NTp4", malformed("expected a Bearer credential")),
            ("Bearer", malformed("expected a Bearer credential")),
            ("Bearerci:5:x", malformed("expected a Bearer credential")),
            ("Bearer ci", malformed("expected <type>:<agent id>:<token>")),
            (
                "Bearer ci:5",
                malformed("expected <type>:<agent id>:<token>"),
            ),
            ("Bearer ci:5:", malformed("empty token")),
            ("Bearer ci::x", malformed("agent id is not a number")),
            ("Bearer ci:-5:x", malformed("agent id is not a number")),
            ("Bearer ci:+5:x", malformed("agent id is not a number")),
            ("Bearer ci:five:x", malformed("agent id is not a number")),
            (
                "Bearer ci:99999999999999999999:x",
                malformed("agent id is out of range"),
            ),
            ("Bearer ci:5:a b", malformed("token contains whitespace")),
            (
                "Bearer job:5:x",
                malformed("unknown token type, expected ci or pat"),
            ),
            (
                "Bearer CI:5:x",
                malformed("unknown token type, expected ci or pat"),
            ),
            // A plain Kubernetes token is not ours to accept.
            (
                "Bearer eyJhbGciOi.abc.def",
                malformed("expected <type>:<agent id>:<token>"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Credential::parse(input), want, "input {input:?}");
        }
    }

    #[test]
    fn from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(Credential::from_headers(&headers), Err(AuthError::Missing));

        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer pat:7:tok"));
        let cred = Credential::from_headers(&headers);
        assert_eq!(
            cred,
            Ok(Credential::Personal {
                agent_id: 7,
                token: "tok".into()
            })
        );

        headers.append(AUTHORIZATION, HeaderValue::from_static("Bearer pat:8:tok"));
        assert_eq!(
            Credential::from_headers(&headers),
            Err(AuthError::Malformed("more than one Authorization header"))
        );

        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer pat:7:t\xe9").expect("obs-text is a valid value"),
        );
        assert_eq!(
            Credential::from_headers(&headers),
            Err(AuthError::Malformed(
                "Authorization header is not visible ASCII"
            ))
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let secret = "super-secret-value";
        for input in [
            format!("Bearer ci:5:{secret}"),
            format!("Bearer pat:5:{secret}"),
        ] {
            let cred = Credential::parse(&input).expect("valid");
            let debug = format!("{cred:?}");
            assert!(!debug.contains(secret), "{debug}");
            assert!(debug.contains("agent_id: 5"), "{debug}");
            assert_eq!(cred.agent_id(), 5);
        }
        for input in [
            format!("Bearer xx:5:{secret}"),
            format!("Bearer ci:x:{secret}"),
            format!("Token {secret}"),
        ] {
            let err = Credential::parse(&input).expect_err("invalid");
            assert!(!err.to_string().contains(secret));
            assert!(!format!("{err:?}").contains(secret));
        }
    }
}
