//! The agent's token, read again from its file when the file changes: an operator rotating
//! the token (a new Secret, the old token revoked) must not leave agentk retrying with the
//! revoked one until someone restarts it. A change is also announced ([`AgentToken::changes`])
//! so that long-lived streams opened with the old token reopen with the new one: otherwise
//! they kept the old token until kas's connection age ended them (2 h), and revoking it then
//! cut them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    Empty(PathBuf),
}

/// Calls `f` every `every` until `stop`: how the files agentk presents from are followed.
pub(crate) async fn repeat(every: Duration, stop: &CancellationToken, mut f: impl FnMut()) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        f();
    }
}

/// Size and modification time of the token file.
type Stamp = Option<(u64, SystemTime)>;

/// The token every stream to kas presents; cheap to clone. Never printed.
#[derive(Clone)]
pub struct AgentToken(Arc<Inner>);

struct Inner {
    source: Source,
    /// Counts the token's changes.
    changes: watch::Sender<u64>,
}

enum Source {
    Fixed(String),
    File {
        path: PathBuf,
        last: Mutex<(Stamp, String)>,
    },
}

/// No token (kas refuses it): for tests of what does not reach kas.
impl Default for AgentToken {
    fn default() -> Self {
        AgentToken::fixed(String::new())
    }
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentToken(..)")
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn read(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim_end_matches(['\n', '\r']).to_string();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_owned()));
    }
    Ok(token)
}

impl AgentToken {
    /// A token that never changes (tests, load generators).
    pub fn fixed(token: impl Into<String>) -> Self {
        Self::with(Source::Fixed(token.into()))
    }

    fn with(source: Source) -> Self {
        let (changes, _) = watch::channel(0);
        AgentToken(Arc::new(Inner { source, changes }))
    }

    /// Follows the token's changes: the value moves each time a read finds a new token (or
    /// the cluster id streams carry changes, see [`crate::ClusterId`]).
    /// Streams mark it seen before they read the token they open with.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// Makes every stream that follows [`AgentToken::changes`] reopen, as a new token does:
    /// something else the streams present changed (the cluster id).
    pub(crate) fn announce_change(&self) {
        self.0.changes.send_modify(|n| *n += 1);
    }

    /// Reads the token file every `every` until `stop`, so that a new token is announced
    /// even while no stream opens (a token file never changes otherwise).
    pub async fn follow_file(&self, every: Duration, stop: CancellationToken) {
        if matches!(self.0.source, Source::Fixed(_)) {
            return;
        }
        repeat(every, &stop, || {
            self.current();
        })
        .await;
    }

    /// The token in `path`; an unreadable or empty file is an error at start.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let stamp = stamp(path);
        let token = read(path)?;
        Ok(Self::with(Source::File {
            path: path.to_owned(),
            last: Mutex::new((stamp, token)),
        }))
    }

    /// The token to present now: the file's content when it changed since the last read and
    /// reads well, else the last good one (a file being rewritten is tried again next time).
    pub fn current(&self) -> String {
        let (path, last) = match &self.0.source {
            Source::Fixed(t) => return t.clone(),
            Source::File { path, last } => (path, last),
        };
        let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = stamp(path);
        if now != last.0 {
            last.0 = now;
            match read(path) {
                Ok(t) if t != last.1 => {
                    last.1 = t;
                    self.0.changes.send_modify(|n| *n += 1);
                    tracing::info!(file = %path.display(), "Agent token file changed: streams to kas reopen with the new token");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Agent token file changed but cannot be used; keeping the previous token")
                }
            }
        }
        last.1.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_token_file_is_used_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first-token\n").unwrap();
        let t = AgentToken::from_file(&file).unwrap();
        assert_eq!(t.current(), "first-token");
        let changes = t.changes();
        std::fs::write(&file, "second-token-longer\n").unwrap();
        assert!(!changes.has_changed().unwrap(), "announced once read");
        assert_eq!(t.clone().current(), "second-token-longer");
        assert!(changes.has_changed().unwrap(), "a new token is announced");
        assert_eq!(*changes.borrow(), 1);
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            t.current(),
            "second-token-longer",
            "an empty file keeps the last token"
        );
        std::fs::remove_file(&file).unwrap();
        assert_eq!(t.current(), "second-token-longer", "a missing file too");
        std::fs::write(&file, "third\n").unwrap();
        assert_eq!(t.current(), "third");
        assert_eq!(*changes.borrow(), 2, "a broken file announced nothing");
        std::fs::write(&file, "fourth-with-crlf\r\n").unwrap();
        assert_eq!(
            t.current(),
            "fourth-with-crlf",
            "a trailing newline is not part of it"
        );
        assert_eq!(format!("{t:?}"), "AgentToken(..)", "never printed");
    }

    #[test]
    fn an_empty_token_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            AgentToken::from_file(&file),
            Err(TokenError::Empty(_))
        ));
        assert!(matches!(
            AgentToken::from_file(&dir.path().join("missing")),
            Err(TokenError::Read { .. })
        ));
    }
}
