//! Errors of this crate. gix's own error types never appear in signatures: they are boxed as
//! sources, so a gix upgrade cannot break callers.

use std::path::PathBuf;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of [`Mirror`](crate::Mirror).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fetching from the remote failed; the mirror keeps its previous state.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The mirror directory could not be opened or created.
    #[error("cannot open or create the mirror at {path}: {source}")]
    Open {
        /// The mirror directory.
        path: PathBuf,
        /// Why.
        source: BoxError,
    },
    /// The mirror directory holds a repository with a work tree; mirrors are bare.
    #[error("{path} is not a bare repository")]
    NotBare {
        /// The mirror directory.
        path: PathBuf,
    },
    /// A branch, tag, or commit that the mirror does not have: the whole sentence, saying what
    /// is missing and why it may be.
    #[error("{0}")]
    NotFound(String),
    /// Not a full hex commit id.
    #[error("invalid commit id {0:?}: expected a full hex object id")]
    InvalidCommitId(String),
    /// A branch or tag name that is not a valid ref name.
    #[error("invalid branch or tag name {0:?}")]
    InvalidRefName(String),
    /// A path with empty, `.` or `..` components.
    #[error("invalid path {0:?}: empty, '.' and '..' components are not allowed")]
    InvalidPath(String),
    /// A tree entry whose name Git itself refuses to check out (`git fsck`: empty, `.`, `..`,
    /// `.git`, or holding a `/`): only a hand-made object has one, and written out it would
    /// land outside the directory it is listed in.
    #[error(
        "the tree at {dir:?} has an entry named {name:?}, which Git refuses to check out (empty, '.', '..', '.git' or containing '/')"
    )]
    InvalidTreeEntry {
        /// The directory holding it (`""` for the root).
        dir: String,
        /// The entry's name, lossily decoded.
        name: String,
    },
    /// The file is over the caller's size limit; its content was not read.
    #[error("file {path} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The requested path.
        path: String,
        /// The blob's size.
        size: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// A listing visited more tree entries than allowed.
    #[error(
        "listing files under {prefix:?} visited more than {limit} entries; use a narrower path or raise the limit"
    )]
    TooManyEntries {
        /// The requested prefix.
        prefix: String,
        /// The caller's limit.
        limit: usize,
    },
    /// Reading the repository failed (corruption, I/O).
    #[error("{context}: {source}")]
    Git {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        source: BoxError,
    },
    /// The blocking task running a fetch panicked or was cancelled.
    #[error("the fetch task failed: {0}")]
    Task(String),
}

/// Why a fetch failed, in terms a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The remote could not be reached (DNS, connection refused, timeout).
    #[error("cannot reach {remote}: {detail}")]
    Unreachable {
        /// The remote (without credentials).
        remote: String,
        /// The underlying error chain.
        detail: String,
    },
    /// The remote rejected or required credentials.
    #[error("authentication to {remote} failed: {detail}")]
    Auth {
        /// The remote (without credentials).
        remote: String,
        /// The underlying error chain.
        detail: String,
    },
    /// The remote is reachable but there is no repository there (or it is not exported to us).
    #[error("{remote} is not a Git repository or does not exist: {detail}")]
    NotARepository {
        /// The remote (without credentials).
        remote: String,
        /// The underlying error chain.
        detail: String,
    },
    /// Anything else (protocol errors, a corrupt pack, local disk errors).
    #[error("fetching from {remote} failed: {detail}")]
    Other {
        /// The remote (without credentials).
        remote: String,
        /// The underlying error chain.
        detail: String,
    },
}

// HTTP statuses are matched with their "status" prefix: a bare "403" also occurs in port numbers
// and addresses (127.0.0.1:40317), which must not decide the classification.
const AUTH_TEXT: &[&str] = &[
    "authentication",
    "unauthorized",
    "status 401",
    "status 403",
    "forbidden",
    "credentials",
    "permission denied",
];
const NOT_REPO_TEXT: &[&str] = &[
    "not a git repository",
    "no such repository",
    "does not appear to be a git repository",
    "repository not found",
    "not exported",
    "access denied",
    "status 404",
    "not found",
    "no such file or directory",
];
const UNREACHABLE_TEXT: &[&str] = &[
    "connection refused",
    "could not resolve",
    "failed to lookup address",
    "dns error",
    "timed out",
    "no route to host",
    "network is unreachable",
    "error trying to connect",
    "connection reset",
];

/// Maps a gix fetch error to a [`FetchError`].
///
/// gix reports transport failures through several layers (its classified errors, `std::io`
/// errors, HTTP statuses as text), so this looks at all of them: first typed signals, then
/// well-known messages. `remote_said` is what a spawned `git upload-pack` wrote on stderr:
/// gix's own words for a process that failed (its output ended early) do not say why, so it is
/// added to the detail and classified with it ("does not appear to be a git repository").
pub(crate) fn classify_fetch_error(
    remote: &str,
    has_credentials: bool,
    err: gix::Error,
    remote_said: Option<&str>,
) -> FetchError {
    let mut detail = error_chain(&err);
    if read_timed_out(&err) {
        // EAGAIN from a socket read timeout reads like a local resource problem.
        detail = format!(
            "the server accepted the connection but sent nothing before the socket read timeout: {detail}"
        );
    }
    if let Some(said) = remote_said {
        detail.push_str(&format!(" (git upload-pack said: {said})"));
    }
    let remote = remote.to_owned();
    let lower = detail.to_lowercase();
    let mentions = |texts: &[&str]| texts.iter().any(|t| lower.contains(t));

    if err.is_unauthenticated() || err.is_permission_denied() || mentions(AUTH_TEXT) {
        if !has_credentials {
            // gix's own wording here is about credential helpers, which we never use.
            detail = format!("the remote requires credentials and none are configured ({detail})");
        }
        FetchError::Auth { remote, detail }
    } else if unreachable_io(&err) || mentions(UNREACHABLE_TEXT) {
        FetchError::Unreachable { remote, detail }
    } else if mentions(NOT_REPO_TEXT) {
        FetchError::NotARepository { remote, detail }
    } else {
        FetchError::Other { remote, detail }
    }
}

/// The messages of an error and its sources joined with `: `. Outer messages often already
/// embed their source's text; each piece is kept once.
fn error_chain(err: &gix::Error) -> String {
    let mut detail = String::new();
    for message in err.iter_errors().map(ToString::to_string) {
        if !detail.contains(&message) {
            if !detail.is_empty() {
                detail.push_str(": ");
            }
            detail.push_str(&message);
        }
    }
    detail
}

/// Whether a socket read of the transport timed out (`WouldBlock`, EAGAIN, is how a read
/// timeout surfaces on Linux): a server that accepted the connection and stays silent.
fn read_timed_out(err: &gix::Error) -> bool {
    err.iter_errors().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::WouldBlock)
    })
}

/// Whether an `std::io` error in the chain says the remote could not be reached.
fn unreachable_io(err: &gix::Error) -> bool {
    use std::io::ErrorKind as K;
    let io_kind = err
        .iter_errors()
        .find_map(|e| e.downcast_ref::<std::io::Error>().map(std::io::Error::kind));
    matches!(
        io_kind,
        Some(
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::TimedOut
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::AddrNotAvailable
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_timeout_says_the_server_stayed_silent() {
        let io = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        let err = gix::Error::from_error(io);
        let FetchError::Other { detail, .. } = classify_fetch_error("git://h/r", false, err, None)
        else {
            panic!("not an other error");
        };
        assert!(
            detail.starts_with("the server accepted the connection but sent nothing before"),
            "{detail}"
        );
    }
}
