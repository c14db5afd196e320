//! Agent-token authentication backed by the store, and kas's own admin token.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tether_store::Store;
use tether_tunnel_server::{AgentIdentity, AuthError, Authenticator};

/// Looks agent tokens up in the store, behind the agent listener's limits.
#[derive(Debug, Clone)]
pub struct StoreAuthenticator {
    pub store: Arc<dyn Store>,
    pub guard: Arc<tether_guard::AuthGuard>,
}

impl Authenticator for StoreAuthenticator {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> tether_tunnel_server::service_future::BoxFuture<'a, Result<Option<AgentIdentity>, AuthError>>
    {
        Box::pin(async move {
            let found = self
                .store
                .authenticate(token)
                .await
                .map_err(|e| AuthError(e.to_string()))?;
            Ok(found.map(|a| AgentIdentity {
                agent_id: a.agent_id,
                agent_name: a.agent_name,
                project_path: a.project_path,
                token_id: a.token_id,
            }))
        })
    }

    fn active_tokens(
        &self,
        token_ids: Vec<i64>,
    ) -> tether_tunnel_server::service_future::BoxFuture<'_, Result<Vec<i64>, AuthError>> {
        Box::pin(async move {
            self.store
                .active_tokens(&token_ids)
                .await
                .map_err(|e| AuthError(e.to_string()))
        })
    }

    fn guard(&self) -> Option<&tether_guard::AuthGuard> {
        Some(&self.guard)
    }
}

/// kas's admin token: random, kept in a 0600 file beside the data, checked by digest in
/// constant time. Only its SHA-256 stays in memory.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl AdminToken {
    /// Reads the token file, creating it with a fresh token when missing.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        if let Ok(text) = std::fs::read_to_string(path) {
            let t = text.trim();
            if !t.is_empty() {
                return Ok(Self { digest: digest(t) });
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let token = random_token(48);
        write_private(path, &format!("{token}\n"))?;
        Ok(Self {
            digest: digest(&token),
        })
    }

    pub fn matches(&self, presented: &str) -> bool {
        bool::from(digest(presented).ct_eq(&self.digest))
    }
}

/// Alphanumeric random string from the OS-seeded CSPRNG.
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_is_created_private_and_matches_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/admin-token");
        let t = AdminToken::load_or_create(&p).expect("create");
        let text = std::fs::read_to_string(&p).expect("read");
        assert!(t.matches(text.trim()));
        assert!(!t.matches("nope"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Loading again keeps the same token.
        let again = AdminToken::load_or_create(&p).expect("load");
        assert!(again.matches(text.trim()));
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    }
}
