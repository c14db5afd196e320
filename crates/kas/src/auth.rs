//! Agent-token authentication backed by the store, and kas's own admin token.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tether_store::Store;
use tether_tunnel_server::{AgentIdentity, AuthError, Authenticator};

use crate::followed::Followed;
use crate::token_use::TokenUse;

/// Looks agent tokens up in the store, behind the agent listener's limits, noting the tokens
/// in use (at connect and at each re-check of live streams) for `kas token list`.
#[derive(Debug, Clone)]
pub struct StoreAuthenticator {
    pub store: Arc<dyn Store>,
    pub guard: Arc<tether_guard::AuthGuard>,
    pub used: Arc<TokenUse>,
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
            if let Some(a) = &found {
                self.used.note([a.token_id]);
            }
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
            let active = self
                .store
                .active_tokens(&token_ids)
                .await
                .map_err(|e| AuthError(e.to_string()))?;
            self.used.note(active.iter().copied());
            Ok(active)
        })
    }

    fn guard(&self) -> Option<&tether_guard::AuthGuard> {
        Some(&self.guard)
    }
}

/// kas's admin token: random, kept in a 0600 file beside the data (or the file configured,
/// e.g. a mounted Secret), checked by digest in constant time. Only its SHA-256 stays in
/// memory. The file is read again when it changes ([`Followed`]): a rotated token works at
/// once and the old one stops working, without a restart.
#[derive(Clone)]
pub struct AdminToken {
    digest: Arc<Followed<[u8; 32]>>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The token in the file, if it holds one.
fn read_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn token_digest(path: &Path) -> Result<[u8; 32], String> {
    read_token(path)
        .map(|t| digest(&t))
        .ok_or_else(|| "empty or unreadable".to_owned())
}

impl AdminToken {
    /// Reads the token file, creating it with a fresh token when missing.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        if read_token(path).is_none() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            write_private(path, &format!("{}\n", random_token(48)))?;
        }
        let digest = Followed::load(path, "Admin token file", token_digest)
            .map_err(std::io::Error::other)?;
        Ok(Self {
            digest: Arc::new(digest),
        })
    }

    pub fn matches(&self, presented: &str) -> bool {
        bool::from(digest(presented).ct_eq(&*self.digest.current()))
    }

    /// Names the token in force without revealing it (a digest of its digest): what a web UI
    /// session opened with it records, so rotating the token ends those sessions too.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(*self.digest.current()))
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

    #[test]
    fn a_rotated_admin_token_file_is_followed_and_an_empty_one_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("admin-token");
        std::fs::write(&p, "old-token\n").expect("write");
        let t = AdminToken::load_or_create(&p).expect("load");
        let old_print = t.fingerprint();
        assert!(t.matches("old-token"));
        let recheck_now = |t: &AdminToken| t.digest.recheck_now();
        std::fs::write(&p, "").expect("write");
        recheck_now(&t);
        assert!(
            t.matches("old-token"),
            "a half-written file keeps the token"
        );
        std::fs::write(&p, "the-new-token\n").expect("write");
        recheck_now(&t);
        assert!(t.matches("the-new-token"));
        assert!(!t.matches("old-token"));
        assert_ne!(t.fingerprint(), old_print);
        // Clones (the API's, the web UI's) follow the same file.
        let clone = t.clone();
        assert!(clone.matches("the-new-token"));
    }
}
