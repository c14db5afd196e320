//! Agent-token authentication backed by the store, and kas's own admin token.

use std::path::{Path, PathBuf};
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

/// kas's admin token: random, kept in a 0600 file beside the data (or the file configured,
/// e.g. a mounted Secret), checked by digest in constant time. Only its SHA-256 stays in
/// memory. The file is read again when its size or time changes (checked at most once a
/// second): a rotated token works at once and the old one stops working, without a restart.
#[derive(Clone)]
pub struct AdminToken {
    inner: Arc<AdminTokenFile>,
}

struct AdminTokenFile {
    path: PathBuf,
    state: std::sync::Mutex<AdminState>,
}

struct AdminState {
    digest: [u8; 32],
    stamp: Option<(u64, std::time::SystemTime)>,
    checked: std::time::Instant,
}

/// Checks of the token file at most this often (a burst of admin calls stats it no more).
const ADMIN_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn file_stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// The token in the file, if it holds one.
fn read_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

impl AdminToken {
    /// Reads the token file, creating it with a fresh token when missing.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let token = match read_token(path) {
            Some(t) => t,
            None => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let token = random_token(48);
                write_private(path, &format!("{token}\n"))?;
                token
            }
        };
        let state = AdminState {
            digest: digest(&token),
            stamp: file_stamp(path),
            checked: std::time::Instant::now(),
        };
        Ok(Self {
            inner: Arc::new(AdminTokenFile {
                path: path.to_owned(),
                state: std::sync::Mutex::new(state),
            }),
        })
    }

    /// The digest of the token in force, read again first if the file changed. A file that
    /// is empty or unreadable (being rewritten) keeps the previous token.
    fn current(&self) -> [u8; 32] {
        let f = &self.inner;
        let mut s = f
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.checked.elapsed() < ADMIN_RECHECK {
            return s.digest;
        }
        s.checked = std::time::Instant::now();
        let now = file_stamp(&f.path);
        if now != s.stamp {
            match read_token(&f.path) {
                Some(t) => {
                    s.stamp = now;
                    let new = digest(&t);
                    if new != s.digest {
                        s.digest = new;
                        tracing::info!(file = %f.path.display(), "Admin token file changed: the new token is in force, the old one no longer works");
                    }
                }
                None => {
                    tracing::warn!(file = %f.path.display(), "Admin token file is empty or unreadable; keeping the previous token")
                }
            }
        }
        s.digest
    }

    pub fn matches(&self, presented: &str) -> bool {
        bool::from(digest(presented).ct_eq(&self.current()))
    }

    /// Names the token in force without revealing it (a digest of its digest): what a web UI
    /// session opened with it records, so rotating the token ends those sessions too.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.current()))
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
        let recheck_now = |t: &AdminToken| {
            let mut s = t.inner.state.lock().expect("lock");
            s.checked = std::time::Instant::now() - ADMIN_RECHECK;
        };
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
