//! Agent tokens: generation, hashing and the redacting wrapper for the plaintext.

use std::fmt;

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// Every token starts with this, so leaked tokens are recognisable by secret scanners and so
/// obviously foreign input can be rejected without a database round trip.
pub const TOKEN_PREFIX: &str = "tether_";

/// Random alphanumeric characters after the prefix: 50 × log2(62) ≈ 297 bits of entropy, far
/// beyond guessing range, which is also why a plain (unsalted) SHA-256 is an adequate hash here.
pub const TOKEN_RANDOM_LEN: usize = 50;

/// The plaintext of a newly created agent token.
///
/// It exists only in the value returned by [`Store::create_token`](crate::Store::create_token);
/// the store keeps just its digest. `Debug` and `Display` are redacted so the secret cannot end
/// up in logs through a stray `{:?}`; [`AgentToken::expose`] must be called explicitly. Not
/// `Clone`, to keep copies of the secret deliberate.
pub struct AgentToken(String);

impl AgentToken {
    /// Makes a fresh token from the thread-local CSPRNG (ChaCha, seeded from the OS).
    pub(crate) fn generate() -> Self {
        let mut rng = rand::rng();
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + TOKEN_RANDOM_LEN);
        token.push_str(TOKEN_PREFIX);
        token.extend(
            (&mut rng)
                .sample_iter(Alphanumeric)
                .take(TOKEN_RANDOM_LEN)
                .map(char::from),
        );
        Self(token)
    }

    /// The plaintext token, to hand to the user exactly once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

impl fmt::Display for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of the token's bytes.
pub(crate) fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Cheap shape check done before hashing and querying. It only rejects strings that no
/// generated token can equal, so it reveals nothing about any stored token.
pub(crate) fn has_token_shape(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == TOKEN_RANDOM_LEN && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let a = AgentToken::generate();
        let b = AgentToken::generate();
        for t in [&a, &b] {
            assert!(t.expose().starts_with(TOKEN_PREFIX));
            assert_eq!(t.expose().len(), TOKEN_PREFIX.len() + TOKEN_RANDOM_LEN);
            assert!(has_token_shape(t.expose()), "{}", t.expose());
        }
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn formatting_is_redacted() {
        let t = AgentToken::generate();
        let secret = &t.expose()[TOKEN_PREFIX.len()..];
        for shown in [format!("{t:?}"), format!("{t}"), format!("{t:#?}")] {
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains("redacted"), "{shown}");
        }
    }

    #[test]
    fn shape_check() {
        let ok = format!("{TOKEN_PREFIX}{}", "a".repeat(TOKEN_RANDOM_LEN));
        assert!(has_token_shape(&ok));
        let cases = [
            String::new(),
            TOKEN_PREFIX.to_string(),
            "a".repeat(TOKEN_RANDOM_LEN),
            format!("glagent-{}", "a".repeat(TOKEN_RANDOM_LEN)),
            format!("{TOKEN_PREFIX}{}", "a".repeat(TOKEN_RANDOM_LEN - 1)),
            format!("{TOKEN_PREFIX}{}", "a".repeat(TOKEN_RANDOM_LEN + 1)),
            format!("{TOKEN_PREFIX}{}-", "a".repeat(TOKEN_RANDOM_LEN - 1)),
        ];
        for bad in &cases {
            assert!(!has_token_shape(bad), "{bad:?}");
        }
    }

    #[test]
    fn digest_is_sha256() {
        // Known answer for SHA-256("abc").
        assert_eq!(
            hex::encode(digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
