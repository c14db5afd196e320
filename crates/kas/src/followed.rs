//! A value read from a file and read again when the file changes: credentials and CAs that a
//! rotated Kubernetes Secret (or cert-manager) rewrites in place are used without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Checks of the file at most this often (a burst of requests stats it no more).
const RECHECK: Duration = Duration::from_secs(1);

/// A file's size and modification time, `None` when it cannot be read: what tells that a
/// rotated file changed.
pub type Stamp = Option<(u64, SystemTime)>;

pub fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// The value parsed from `path`, parsed again when the file's size or time changes. A file
/// that does not parse (half-written, empty) keeps the previous value, logged at warn; it is
/// tried again when it changes next.
pub struct Followed<T> {
    path: PathBuf,
    /// What the file is, for the log ("admin token file").
    what: &'static str,
    parse: fn(&Path) -> Result<T, String>,
    state: Mutex<State<T>>,
}

struct State<T> {
    value: Arc<T>,
    stamp: Stamp,
    checked: Instant,
}

impl<T> std::fmt::Debug for Followed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value: it may be a credential.
        f.debug_struct("Followed")
            .field("path", &self.path)
            .finish()
    }
}

impl<T> Followed<T> {
    /// Reads the file now; its error when it does not parse.
    pub fn load(
        path: &Path,
        what: &'static str,
        parse: fn(&Path) -> Result<T, String>,
    ) -> Result<Self, String> {
        let stamp = stamp(path);
        let value = Arc::new(parse(path)?);
        Ok(Self {
            path: path.to_owned(),
            what,
            parse,
            state: Mutex::new(State {
                value,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The value now, read again first if the file changed.
    pub fn current(&self) -> Arc<T> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.checked.elapsed() < RECHECK {
            return Arc::clone(&s.value);
        }
        s.checked = Instant::now();
        let now = stamp(&self.path);
        if now != s.stamp {
            match (self.parse)(&self.path) {
                Ok(v) => {
                    s.value = Arc::new(v);
                    s.stamp = now;
                    tracing::info!(file = %self.path.display(), "{} changed: using it", self.what);
                }
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), error = %e, "{} changed but cannot be used; keeping the previous one", self.what);
                }
            }
        }
        Arc::clone(&s.value)
    }

    /// Lets the next [`Followed::current`] look at the file at once (tests).
    #[cfg(test)]
    pub fn recheck_now(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.checked = Instant::now().checked_sub(RECHECK).unwrap_or(s.checked);
    }
}
