//! Bare mirrors of remote repositories and reads straight from their object database.
//!
//! Everything gix-specific stays in this module: gix has frequent breaking releases, and the rest
//! of tether should only see [`Mirror`], [`CommitId`] and plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use gix::bstr::{BStr, ByteSlice};
use gix::protocol::transport::client::blocking_io::Transport;
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::remote::Direction;

use crate::activity::{Activity, CAP_FACTOR, GaveUp, Stall};
use crate::error::{BoxError, Error, FetchError, classify_fetch_error};
use crate::interrupt::{FetchInterrupt, InterruptOnDrop};
use crate::maintenance::{self, MaintenanceStatus, RepackReport};
use crate::remote::{Remote, RemoteKind};
use crate::upload_pack::StderrTail;
use crate::verify::{Refusal, Verified, VerifyPolicy};

/// A transport set up here rather than by gix (`None`: gix connects), and the stderr of the
/// process it spawned when that is kept.
type OwnTransport = (Option<Box<dyn Transport + Send>>, Option<StderrTail>);

/// Refspecs of a mirror: every branch and tag, force-updated (`+`) so rewritten history on the
/// remote replaces ours, as `git clone --mirror` does.
const MIRROR_REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// Config applied in memory to every opened mirror. The identity is only used for reflog
/// entries; it avoids depending on the server's global Git configuration, which an isolated
/// open does not read anyway.
const CONFIG_OVERRIDES: [&str; 3] = [
    "user.name=tether",
    "user.email=tether@localhost",
    "core.logAllRefUpdates=false",
];

/// The last commit that passed signature verification (outside `refs/heads` and `refs/tags`, so
/// fetches never touch it, and its objects are kept by repacks).
const VERIFIED_REF: &str = "refs/tether/verified";

/// A full commit id (hex SHA-1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(gix::ObjectId);

impl CommitId {
    /// Parses a full hex commit id (40 characters for SHA-1).
    pub fn from_hex(hex: &str) -> Result<CommitId, Error> {
        gix::ObjectId::from_hex(hex.trim().as_bytes())
            .map(CommitId)
            .map_err(|_| Error::InvalidCommitId(hex.to_owned()))
    }

    /// The id as lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.to_string()
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.0)
    }
}

impl std::str::FromStr for CommitId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CommitId::from_hex(s)
    }
}

/// What to read from: a branch, a tag, a commit, or the remote's default branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GitRef {
    /// The branch the remote's `HEAD` pointed at when last fetched.
    DefaultBranch,
    /// A branch name, without `refs/heads/`.
    Branch(String),
    /// A tag name, without `refs/tags/`; annotated tags are peeled to their commit.
    Tag(String),
    /// A full commit id; it must have been fetched (be reachable from a branch or tag).
    Commit(String),
}

impl std::fmt::Display for GitRef {
    /// As people name it in messages: `branch feat2`, `tag v1`, `commit 3f2c…`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitRef::DefaultBranch => f.write_str("the default branch"),
            GitRef::Branch(b) => write!(f, "branch {b}"),
            GitRef::Tag(t) => write!(f, "tag {t}"),
            GitRef::Commit(c) => write!(f, "commit {c}"),
        }
    }
}

/// A file found by [`Mirror::list_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path from the repository root, `/`-separated.
    pub path: String,
    /// Size in bytes (of the link's target path, for a symlink).
    pub size: u64,
    /// A symbolic link rather than a file: listed so callers can say they skip it (its target
    /// may lie outside the repository, so nothing should read through it).
    pub symlink: bool,
    /// A submodule (a gitlink: a commit of another repository, whose files kas does not
    /// fetch): listed so callers can say what is missing rather than skip it silently. Its size
    /// is 0.
    pub submodule: bool,
}

/// One reference that a fetch created, moved or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefChange {
    /// Full name, like `refs/heads/main`.
    pub name: String,
    /// Object id (hex) before the fetch; `None` if the ref is new.
    pub old: Option<String>,
    /// Object id (hex) after the fetch; `None` if the ref was deleted on the remote.
    pub new: Option<String>,
}

/// The result of [`Mirror::fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOutcome {
    /// Refs that changed, sorted by name.
    pub changes: Vec<RefChange>,
    /// The default branch after the fetch.
    pub default_branch: Option<String>,
    /// The repack that followed the fetch, if the mirror had piled up enough packs for one.
    pub repack: Option<RepackReport>,
}

impl FetchOutcome {
    /// Whether any branch or tag changed.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// A bare mirror of one remote repository in a local directory.
///
/// Cheap to clone (shared inside). Reads may run concurrently with a fetch and its maintenance:
/// new objects arrive in new pack files, refs are replaced atomically, and a repack writes its
/// pack before deleting the old ones, so a reader sees either the old or the new state. Use one
/// `Mirror` per directory: fetches and maintenance are serialized per instance only.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    remote: Remote,
    /// Replaced after maintenance; readers take a handle under the read lock and drop the lock
    /// at once, so a reader keeps the handle it started with, which stays valid.
    repo: RwLock<gix::ThreadSafeRepository>,
    /// Two fetches into one repository at once would race on ref locks and fail, and a repack
    /// must not see a half-written pack; queue them.
    fetch_lock: Mutex<()>,
    state: Mutex<State>,
    /// What the running fetch has done so far: its deadline is one of inactivity.
    activity: Activity,
}

/// What maintenance knows about the object directory.
struct State {
    status: MaintenanceStatus,
    /// Packs on disk when the current handle was opened.
    packs_at_open: usize,
}

impl fmt::Debug for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirror")
            .field("dir", &self.inner.dir)
            .field("remote", &self.inner.remote)
            .finish()
    }
}

fn git_err<E: std::error::Error + Send + Sync + 'static>(
    context: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::Git {
        context,
        source: Box::new(e) as BoxError,
    }
}

/// A poisoned lock only means another thread panicked while holding it; what it guards (a
/// handle, counters) stays consistent, and the repository on disk is transactional.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the mirror isolated from the server's global and system Git configuration.
///
/// gix sizes the object store's table of pack indices when it opens a repository (by default
/// 1.1 × the packs on disk, at least 32) and cannot grow it: once fetches added more packs
/// than that, every read failed with "too few index slots". The handle is reopened whenever
/// the pack set changed (see [`Mirror::fetch`]), and twice the packs on disk plus 64 leaves room
/// for many fetches in between even if repacks keep failing.
fn open_repo(dir: &Path) -> Result<gix::ThreadSafeRepository, BoxError> {
    let options = gix::open::Options::isolated()
        .config_overrides(CONFIG_OVERRIDES)
        .object_store_slots(gix::odb::store::init::Slots::AsNeededByDiskState {
            multiplier: 2.0,
            minimum: 64,
        });
    let repo = gix::open_opts(dir, options)?;
    Ok(repo.into_sync())
}

impl Mirror {
    /// A successful fetch repacks the mirror when it holds more packs than this (see the
    /// reasoning at the constant's definition in the maintenance module).
    pub const PACK_THRESHOLD: usize = maintenance::PACK_THRESHOLD;

    /// Opens the bare repository in `dir`, or creates it (and missing parents) if `dir` does not
    /// exist or is empty. Nothing is fetched yet.
    ///
    /// The mirror is opened isolated from the server's global and system Git configuration and
    /// environment, so a user's `~/.gitconfig` (URL rewrites, credential helpers) cannot change
    /// what the server fetches.
    pub fn open_or_init(dir: impl Into<PathBuf>, remote: Remote) -> Result<Mirror, Error> {
        let dir = dir.into();
        let open_err = |source: BoxError| Error::Open {
            path: dir.clone(),
            source,
        };
        let is_empty_dir = std::fs::read_dir(&dir)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !dir.exists() || is_empty_dir {
            std::fs::create_dir_all(&dir).map_err(|e| open_err(Box::new(e)))?;
            gix::init_bare(&dir).map_err(|e| open_err(Box::new(e)))?;
        }
        let repo = open_repo(&dir).map_err(open_err)?;
        if !repo.to_thread_local().is_bare() {
            return Err(Error::NotBare { path: dir });
        }
        let packs = maintenance::count_packs(&dir).map_err(|e| open_err(Box::new(e)))?;
        Ok(Mirror {
            inner: Arc::new(Inner {
                dir,
                remote,
                repo: RwLock::new(repo),
                fetch_lock: Mutex::new(()),
                activity: Activity::default(),
                state: Mutex::new(State {
                    status: MaintenanceStatus {
                        packs,
                        ..MaintenanceStatus::default()
                    },
                    packs_at_open: packs,
                }),
            }),
        })
    }

    /// The mirror's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The remote this mirror fetches from.
    pub fn remote(&self) -> &Remote {
        &self.inner.remote
    }

    /// Pack count and the last repack, as of the last fetch.
    pub fn maintenance_status(&self) -> MaintenanceStatus {
        lock(&self.inner.state).status.clone()
    }

    /// Waits for a running fetch (and its maintenance) to end, and keeps others from starting
    /// while the guard lives.
    pub(crate) fn lock_fetches(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.fetch_lock)
    }

    fn repo(&self) -> gix::Repository {
        self.inner
            .repo
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .to_thread_local()
    }

    /// Fetches all branches and tags from the remote, force-updating local refs, removing refs
    /// deleted on the remote, and recording the remote's default branch. Then maintains the
    /// mirror: removes what failed fetches left behind, and repacks when more than
    /// [`Mirror::PACK_THRESHOLD`] packs have piled up.
    ///
    /// Blocking (network and disk I/O): from async code use [`Mirror::fetch_async`]. On failure
    /// the mirror is left as it was, so previously fetched commits stay readable. A failed
    /// repack does not fail the fetch: it is logged, and reported in
    /// [`FetchOutcome::repack`] and [`Mirror::maintenance_status`].
    ///
    /// A silent server cannot block it forever: `git://` connections time out after a minute
    /// without a byte, `ssh` ends a connection whose server stops answering keep-alives, and
    /// the HTTP client (reqwest's blocking default) gives up on a read after 30 s. To stop it
    /// sooner, use [`Mirror::fetch_interruptible`] or [`Mirror::fetch_async_within`].
    pub fn fetch(&self) -> Result<FetchOutcome, Error> {
        self.fetch_interruptible(&FetchInterrupt::new())
    }

    /// [`Mirror::fetch`], stopped early (failing, the mirror left as it was) when `interrupt`
    /// is triggered from another thread, also while it still waits for a running fetch.
    pub fn fetch_interruptible(&self, interrupt: &FetchInterrupt) -> Result<FetchOutcome, Error> {
        let _guard = self.lock_fetches();
        let result = self.fetch_only(interrupt);
        let repack = if result.is_ok() {
            self.maintain()
        } else {
            None
        };
        self.reopen_if_packs_changed(repack.is_some());
        let mut outcome = result?;
        outcome.repack = repack;
        Ok(outcome)
    }

    /// The fetch without the maintenance after it, under the fetch lock (held by the caller).
    fn fetch_only(&self, interrupt: &FetchInterrupt) -> Result<FetchOutcome, Error> {
        if interrupt.is_interrupted() {
            // Its waiter has given up on it while it queued: do not start it.
            return Err(self.interrupted());
        }
        // Before: leftovers of a process that died mid-fetch. After: a failed fetch leaves its
        // pack's `.keep`, and gix also leaves it when a pack arrived but no ref moved.
        self.remove_leftovers();
        let result = self.fetch_locked(interrupt);
        self.remove_leftovers();
        if let Ok(outcome) = &result {
            tracing::debug!(remote = %self.inner.remote, dir = %self.inner.dir.display(), changes = outcome.changes.len(), "fetched mirror");
        }
        result
    }

    /// The maintenance [`Mirror::fetch`] does after fetching (a repack when packs piled up),
    /// on tokio's blocking pool, for callers of [`Mirror::fetch_async_within`]: apart from the
    /// fetch, so a long repack neither counts against the fetch's deadline nor delays what the
    /// fetch brought. Bounded by the repack's own timeout.
    pub async fn maintain_async(&self) -> Option<RepackReport> {
        let mirror = self.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = mirror.lock_fetches();
            let repack = mirror.maintain();
            mirror.reopen_if_packs_changed(repack.is_some());
            repack
        })
        .await
        .ok()
        .flatten()
    }

    /// The fetch itself, under the fetch lock.
    fn fetch_locked(&self, interrupt: &FetchInterrupt) -> Result<FetchOutcome, Error> {
        let remote = &self.inner.remote;
        if let Some(path) = remote.local_path()
            && !path.exists()
        {
            // Checked here because the file transport's own error for this case is an opaque
            // failure of a spawned `git-upload-pack`.
            return Err(FetchError::NotARepository {
                remote: remote.to_string(),
                detail: "the path does not exist".to_owned(),
            }
            .into());
        }
        let repo = self.repo();
        let before = branch_and_tag_ids(&repo)?;
        let remote_refs = self.receive(&repo, interrupt)?;
        prune_refs(&repo, &remote_refs)?;
        record_remote_head(&repo, &remote_refs)?;
        let after = branch_and_tag_ids(&repo)?;
        Ok(FetchOutcome {
            changes: ref_changes(&before, &after),
            default_branch: self.default_branch()?,
            repack: None,
        })
    }

    /// Removes leftovers of failed fetches; a failure is logged and the fetch goes on, since
    /// the leftovers only cost disk space (and keep one pack out of repacks).
    fn remove_leftovers(&self) {
        match maintenance::remove_leftovers(&self.inner.dir) {
            Ok(removed) => lock(&self.inner.state).status.leftovers_removed += removed,
            Err(e) => {
                tracing::warn!(dir = %self.inner.dir.display(), error = %e, "Removing leftovers of failed fetches from the mirror failed");
            }
        }
    }

    /// Counts packs, logging a failure; `None` then.
    fn count_packs(&self) -> Option<usize> {
        maintenance::count_packs(&self.inner.dir)
            .inspect_err(|e| {
                tracing::warn!(dir = %self.inner.dir.display(), error = %e, "Counting the mirror's packs failed");
            })
            .ok()
    }

    /// Repacks when more than [`Mirror::PACK_THRESHOLD`] packs piled up; returns what happened
    /// if it ran. Under the fetch lock, after a successful fetch.
    fn maintain(&self) -> Option<RepackReport> {
        let packs_before = self.count_packs()?;
        lock(&self.inner.state).status.packs = packs_before;
        if packs_before <= Self::PACK_THRESHOLD {
            return None;
        }
        let last = lock(&self.inner.state).status.last_repack.clone();
        if maintenance::failed_recently(last.as_ref(), SystemTime::now()) {
            // A repack that outlasted its timeout would likely do it again: at every fetch,
            // burning a CPU for up to its timeout each time.
            return None;
        }
        let started = Instant::now();
        let result = maintenance::repack(&self.inner.dir);
        // A killed repack may leave its temporary pack behind.
        self.remove_leftovers();
        let packs_after = self.count_packs().unwrap_or(packs_before);
        let report = RepackReport {
            ended_at: SystemTime::now(),
            duration: started.elapsed(),
            packs_before,
            packs_after,
            error: result.err().map(|e| e.to_string()),
        };
        match &report.error {
            None => {
                tracing::debug!(dir = %self.inner.dir.display(), packs_before, packs_after, duration = ?report.duration, "Repacked the mirror");
            }
            Some(error) => {
                tracing::warn!(dir = %self.inner.dir.display(), packs = packs_before, %error, "Repacking the mirror failed; its packs stay as they were");
            }
        }
        let mut state = lock(&self.inner.state);
        state.status.packs = packs_after;
        state.status.last_repack = Some(report.clone());
        Some(report)
    }

    /// Replaces the repository handle after a repack or when packs were added or removed, so
    /// the object store is sized for the packs now on disk. Readers holding the old handle
    /// finish with it.
    fn reopen_if_packs_changed(&self, repacked: bool) {
        let Some(packs) = self.count_packs() else {
            return;
        };
        {
            let mut state = lock(&self.inner.state);
            state.status.packs = packs;
            if !repacked && packs == state.packs_at_open {
                return;
            }
        }
        match open_repo(&self.inner.dir) {
            Ok(repo) => {
                *self
                    .inner
                    .repo
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = repo;
                lock(&self.inner.state).packs_at_open = packs;
            }
            Err(error) => {
                tracing::warn!(dir = %self.inner.dir.display(), %error, "Reopening the mirror failed; the previous handle stays in use");
            }
        }
    }

    /// Connects, negotiates and receives the pack; returns the remote's advertised refs.
    fn receive(
        &self,
        repo: &gix::Repository,
        interrupt: &FetchInterrupt,
    ) -> Result<Vec<gix::protocol::handshake::Ref>, Error> {
        let remote = &self.inner.remote;
        let has_credentials = remote.has_credentials();
        let ssh = remote.kind() == RemoteKind::Ssh;
        let ssh_log = ssh.then(|| crate::ssh::log_path(&self.inner.dir));
        let ssh_stderr = ssh.then(|| crate::ssh::stderr_path(&self.inner.dir));
        let (transport, upload_pack_stderr) = self.own_transport(interrupt)?;
        let classify = |e: gix::Error| {
            // What ssh logged explains an SSH failure better than gix's view of a closed pipe.
            if let Some(fetch_error) = ssh_log
                .as_deref()
                .and_then(|log| crate::ssh::classify(remote, log))
            {
                return Error::from(fetch_error);
            }
            let said = upload_pack_stderr
                .as_ref()
                .and_then(StderrTail::text)
                .or_else(|| {
                    ssh_stderr
                        .as_deref()
                        .and_then(crate::upload_pack::file_text)
                });
            Error::from(classify_fetch_error(
                &remote.to_string(),
                has_credentials,
                e,
                said.as_deref(),
            ))
        };
        let git_remote = repo
            .remote_at(remote.transport_url().as_str())
            .map_err(classify)?
            .with_refspecs(MIRROR_REFSPECS, Direction::Fetch)
            .map_err(git_err("configuring refspecs"))?
            // Tags come from the explicit refspec; gix's tag following would duplicate them.
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        // Read now: a rotated token is used at once; a missing or broken file fails this fetch,
        // named in the project's status.
        let credentials = remote.credentials().map_err(|e| {
            Error::from(crate::error::FetchError::Auth {
                remote: remote.to_string(),
                detail: e.to_string(),
            })
        })?;
        let account = credentials.map(|c| {
            let (username, password) = c.basic_auth();
            gix::sec::identity::Account {
                username: username.to_owned(),
                password: password.to_owned(),
                oauth_refresh_token: None,
            }
        });
        let connection = match transport {
            Some(transport) => git_remote.to_connection_with_transport(transport),
            None => git_remote.connect(Direction::Fetch).map_err(classify)?,
        };
        let connection = connection
            // Always override gix's default (configured helpers, then a terminal prompt): a
            // server must never prompt, and only uses the credentials it was given.
            .with_credentials(move |action| match action {
                gix::credentials::helper::Action::Get(ctx) => {
                    Ok(account
                        .clone()
                        .map(|identity| gix::credentials::protocol::Outcome {
                            identity,
                            next: ctx.into(),
                        }))
                }
                gix::credentials::helper::Action::Store(_)
                | gix::credentials::helper::Action::Erase(_) => Ok(None),
            });
        // HEAD without a destination: fetched for its symref target only, like `git clone`.
        let head_spec = gix::refspec::parse("HEAD".into(), gix::refspec::parse::Operation::Fetch)
            .map_err(git_err("parsing the HEAD refspec"))?
            .to_owned();
        let options = gix::remote::ref_map::Options {
            extra_refspecs: vec![head_spec],
            ..Default::default()
        };
        let mut progress = self.inner.activity.start();
        let outcome = connection
            .prepare_fetch(
                gix::NestedProgress::add_child(&mut progress, "refs"),
                options,
            )
            .map_err(classify)?
            .with_reflog_message(gix::remote::fetch::RefLogMessage::Prefixed {
                action: "tether mirror fetch".into(),
            })
            .receive(progress, interrupt.flag())
            .map_err(|e| {
                // What an interrupted fetch's transport says (a closed connection) is only a
                // consequence of the interrupt.
                if interrupt.is_interrupted() {
                    self.interrupted()
                } else {
                    classify(e)
                }
            })?;
        Ok(outcome.ref_map.remote_refs)
    }

    /// The transport for remotes whose connection is set up here rather than by gix: `ssh`
    /// with this project's command line, `git://` with a read timeout and interruptible, local
    /// ones with upload-pack's stderr kept (returned too). `None` for HTTP, which gix connects
    /// itself.
    fn own_transport(&self, interrupt: &FetchInterrupt) -> Result<OwnTransport, Error> {
        let remote = &self.inner.remote;
        match remote.kind() {
            RemoteKind::Ssh => {
                let log = crate::ssh::log_path(&self.inner.dir);
                let stderr = crate::ssh::stderr_path(&self.inner.dir);
                // A fresh log per fetch, so an old failure is never reported again.
                std::fs::write(&log, b"").map_err(git_err("creating the ssh log"))?;
                std::fs::write(&stderr, b"").map_err(git_err("creating the ssh stderr file"))?;
                let transport = crate::ssh::transport(remote, &log, &stderr).map_err(|detail| {
                    Error::from(FetchError::Other {
                        remote: remote.to_string(),
                        detail,
                    })
                })?;
                Ok((Some(transport), None))
            }
            RemoteKind::Git => Ok((Some(crate::daemon::transport(remote, interrupt)?), None)),
            RemoteKind::Local => {
                let path = remote.local_path().unwrap_or(Path::new(""));
                let (transport, stderr) =
                    crate::upload_pack::transport(path).map_err(|detail| {
                        Error::from(FetchError::Other {
                            remote: remote.to_string(),
                            detail,
                        })
                    })?;
                Ok((Some(transport), Some(stderr)))
            }
            RemoteKind::Http | RemoteKind::Https => Ok((None, None)),
        }
    }

    fn interrupted(&self) -> Error {
        Error::from(FetchError::Other {
            remote: self.inner.remote.to_string(),
            detail: "the fetch was interrupted".to_owned(),
        })
    }

    /// [`Mirror::fetch`] on tokio's blocking pool, so network I/O does not stall the runtime.
    /// Dropping the future interrupts the fetch.
    pub async fn fetch_async(&self) -> Result<FetchOutcome, Error> {
        let mirror = self.clone();
        let interrupt = FetchInterrupt::new();
        let _stop_when_dropped = InterruptOnDrop(interrupt.clone());
        tokio::task::spawn_blocking(move || mirror.fetch_interruptible(&interrupt))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// The fetch of [`Mirror::fetch_async`] without its maintenance (see
    /// [`Mirror::maintain_async`]), interrupted when nothing was received or indexed for
    /// `timeout`, or once it has run [`CAP_FACTOR`](crate::activity::CAP_FACTOR) times
    /// `timeout` (time spent queued behind a running fetch of this mirror counts, and that
    /// fetch's progress counts as this one's). The interrupted fetch releases the mirror's
    /// fetch lock soon after, so the next fetch is not stuck behind it.
    pub async fn fetch_async_within(&self, timeout: Duration) -> Result<FetchOutcome, Error> {
        let mirror = self.clone();
        let interrupt = FetchInterrupt::new();
        // Dropped when given up: interrupts the fetch.
        let _stop_when_dropped = InterruptOnDrop(interrupt.clone());
        let fetch = tokio::task::spawn_blocking(move || {
            let _guard = mirror.lock_fetches();
            let result = mirror.fetch_only(&interrupt);
            mirror.reopen_if_packs_changed(false);
            result
        });
        let cap = timeout.saturating_mul(CAP_FACTOR);
        let gave_up = match self.while_progressing(timeout, cap, fetch).await {
            Ok(joined) => return joined.map_err(|e| Error::Task(e.to_string()))?,
            Err(gave_up) => gave_up,
        };
        let detail = match gave_up {
            GaveUp::Silent(idle) => {
                format!("no answer within {idle:?} (nothing received or indexed for that long)")
            }
            GaveUp::TooLong(cap) => format!(
                "still running after {cap:?} ({CAP_FACTOR} times git.fetch_timeout), though progressing"
            ),
        };
        Err(Error::from(FetchError::Other {
            remote: self.inner.remote.to_string(),
            detail,
        }))
    }

    /// Runs `work` to its end, unless this mirror's fetches report no progress for `idle`
    /// (nothing received or indexed) or `cap` passes first. What a fetch deadline is made
    /// of, and what a caller waiting for a fetch it asked for can use, so that it does not give
    /// up on a fetch that is slow but moving.
    pub async fn while_progressing<F: std::future::Future>(
        &self,
        idle: Duration,
        cap: Duration,
        work: F,
    ) -> Result<F::Output, GaveUp> {
        let activity = &self.inner.activity;
        let mut stall = Stall::new(idle, cap, Instant::now(), activity.fingerprint());
        let mut check = tokio::time::interval(stall.check_every());
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = check.tick() => {
                    if let Some(gave_up) = stall.observe(Instant::now(), activity.fingerprint()) {
                        return Err(gave_up);
                    }
                }
            }
        }
    }

    /// The remote's default branch as seen at the last fetch (its `HEAD` symref). Falls back to
    /// `main`, then `master`, when the remote did not advertise `HEAD` or it points at a branch
    /// that does not exist. `None` if none of these exist (for example before the first fetch).
    pub fn default_branch(&self) -> Result<Option<String>, Error> {
        let repo = self.repo();
        let head = repo
            .head_name()
            .map_err(git_err("reading HEAD"))?
            .and_then(|name| {
                name.as_bstr()
                    .strip_prefix(b"refs/heads/")
                    .map(|b| b.to_str_lossy().into_owned())
            });
        for candidate in head
            .into_iter()
            .chain(["main".to_owned(), "master".to_owned()])
        {
            if find_ref(&repo, &format!("refs/heads/{candidate}"))?.is_some() {
                return Ok(Some(candidate));
            }
        }
        Ok(None)
    }

    /// Whether anything was ever fetched into the mirror: a branch or tag, or a pack (left by
    /// a branch since deleted on the remote). A repository nothing was pushed to has neither.
    pub fn ever_fetched_anything(&self) -> Result<bool, Error> {
        if !branch_and_tag_ids(&self.repo())?.is_empty() {
            return Ok(true);
        }
        let packs = self.inner.dir.join("objects").join("pack");
        Ok(std::fs::read_dir(&packs)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "pack"))
            })
            .unwrap_or(false))
    }

    /// Resolves `git_ref` to a commit present in the mirror.
    pub fn resolve(&self, git_ref: &GitRef) -> Result<CommitId, Error> {
        let repo = self.repo();
        let full_name = match git_ref {
            GitRef::DefaultBranch => {
                let branch = self.default_branch()?.ok_or_else(|| {
                    Error::NotFound(
                        "the remote had no default branch at the last fetch (its HEAD names \
                         none of its branches, and it has no main or master)"
                            .to_owned(),
                    )
                })?;
                format!("refs/heads/{branch}")
            }
            GitRef::Branch(name) => format!("refs/heads/{}", check_ref_name(name)?),
            GitRef::Tag(name) => format!("refs/tags/{}", check_ref_name(name)?),
            GitRef::Commit(hex) => {
                let id = CommitId::from_hex(hex)?;
                return match repo.try_find_object(id.0) {
                    Ok(Some(object)) if object.kind == gix::object::Kind::Commit => Ok(id),
                    Ok(Some(_)) => Err(not_a_commit(&id)),
                    Ok(None) => Err(commit_not_found(&id)),
                    Err(e) => Err(git_err("looking up a commit")(e)),
                };
            }
        };
        let mut reference = find_ref(&repo, &full_name)?.ok_or_else(|| {
            Error::NotFound(format!(
                "{full_name} was not on the remote at the last fetch (deleted, renamed, or not \
                 pushed yet?)"
            ))
        })?;
        let commit = reference
            .peel_to_commit()
            .map_err(git_err("peeling a ref to its commit"))?;
        Ok(CommitId(commit.id))
    }

    /// Whether `commit` is `tip` or one of its ancestors, looking at no more than `limit`
    /// commits of `tip`'s history (a commit further back counts as not found). Blocking.
    pub fn in_history(
        &self,
        commit: &CommitId,
        tip: &CommitId,
        limit: usize,
    ) -> Result<bool, Error> {
        let repo = self.repo();
        let walk = repo
            .rev_walk([tip.0])
            .all()
            .map_err(git_err("walking a branch's history"))?;
        for info in walk.take(limit) {
            if info.map_err(git_err("walking a branch's history"))?.id == commit.0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Checks that `commit` is signed by a key `policy` trusts (see [`VerifyPolicy`]). Blocking:
    /// it runs `git verify-commit`, and `gpg` to import the trusted keys.
    pub fn verify_commit(
        &self,
        commit: &CommitId,
        policy: &VerifyPolicy,
    ) -> Result<Verified, Refusal> {
        crate::verify::verify_commit(&self.inner.dir, commit, policy)
    }

    /// Remembers `commit` as the last one that passed verification, in a ref fetches neither
    /// move nor prune, so it is still known after a restart.
    pub(crate) fn mark_verified(&self, commit: &CommitId) -> Result<(), Error> {
        let repo = self.repo();
        let name: gix::refs::FullName = VERIFIED_REF
            .try_into()
            .map_err(git_err("naming the verified ref"))?;
        repo.edit_reference(RefEdit {
            change: Change::Update {
                log: LogChange::default(),
                expected: PreviousValue::Any,
                new: gix::refs::Target::Object(commit.0),
            },
            name,
            deref: false,
        })
        .map_err(git_err("recording the verified commit"))?;
        Ok(())
    }

    /// The commit [`Mirror::mark_verified`] recorded last, if any.
    pub(crate) fn last_verified(&self) -> Result<Option<CommitId>, Error> {
        let repo = self.repo();
        match find_ref(&repo, VERIFIED_REF)? {
            Some(mut reference) => {
                let commit = reference
                    .peel_to_commit()
                    .map_err(git_err("peeling the verified ref"))?;
                Ok(Some(CommitId(commit.id)))
            }
            None => Ok(None),
        }
    }

    /// Reads the file at `path` in `commit`, straight from the object database.
    ///
    /// `None` when there is no file at `path` (missing, or a directory or submodule). Fails with
    /// [`Error::TooLarge`] when the blob is over `max_size` bytes, checked from the object's
    /// header before its content is inflated.
    pub fn read_file(
        &self,
        commit: &CommitId,
        path: &str,
        max_size: u64,
    ) -> Result<Option<Vec<u8>>, Error> {
        let repo = self.repo();
        let Some((id, mode)) = entry_at(&repo, commit, path)? else {
            return Ok(None);
        };
        if !mode.is_blob() {
            return Ok(None);
        }
        let header = repo
            .find_header(id)
            .map_err(git_err("reading an object header"))?;
        if header.size() > max_size {
            return Err(Error::TooLarge {
                path: path.to_owned(),
                size: header.size(),
                limit: max_size,
            });
        }
        let object = repo.find_object(id).map_err(git_err("reading a blob"))?;
        Ok(Some(object.detach().data))
    }

    /// The target of the symbolic link at `path` in `commit`, as stored (never followed);
    /// `None` when there is no symbolic link at `path`.
    pub fn read_link(&self, commit: &CommitId, path: &str) -> Result<Option<String>, Error> {
        let repo = self.repo();
        match entry_at(&repo, commit, path)? {
            Some((id, mode)) if mode.is_link() => {
                let object = repo.find_object(id).map_err(git_err("reading a link"))?;
                Ok(Some(String::from_utf8_lossy(&object.data).into_owned()))
            }
            _ => Ok(None),
        }
    }

    /// Lists regular and executable files under the directory `prefix` (`""` or `"/"` for the
    /// whole tree) at `commit`, recursively, sorted by path.
    ///
    /// Directories whose name starts with `.` (`.git*`, `.gitlab`, ...) are skipped; symlinks
    /// are listed with [`FileEntry::symlink`] set, submodules (never fetched, so their files are
    /// not here) with [`FileEntry::submodule`] set. Every tree entry looked at counts towards
    /// `visit_limit`; past it the listing fails with [`Error::TooManyEntries`] rather than
    /// returning a silently truncated list. A missing prefix gives an empty list.
    pub fn list_files(
        &self,
        commit: &CommitId,
        prefix: &str,
        visit_limit: usize,
    ) -> Result<Vec<FileEntry>, Error> {
        let components = split_path(prefix)?;
        let repo = self.repo();
        let root = commit_tree(&repo, commit)?;
        let start = match prefix_tree(&root, &components)? {
            Prefix::Tree(id) => id,
            // The prefix is a submodule or inside one: said, as one under it would be.
            Prefix::Submodule(path) => {
                return Ok(vec![FileEntry {
                    path,
                    size: 0,
                    symlink: false,
                    submodule: true,
                }]);
            }
            Prefix::Missing => return Ok(Vec::new()),
        };
        let base = components.join("/");
        let mut visited = 0usize;
        let mut files = Vec::new();
        let mut stack = vec![(base, start)];
        while let Some((dir, tree_id)) = stack.pop() {
            let tree = repo.find_tree(tree_id).map_err(git_err("reading a tree"))?;
            let decoded = tree.decode().map_err(git_err("decoding a tree"))?;
            for entry in &decoded.entries {
                visited += 1;
                if visited > visit_limit {
                    return Err(Error::TooManyEntries {
                        prefix: prefix.to_owned(),
                        limit: visit_limit,
                    });
                }
                let name = entry.filename.to_str_lossy();
                if !is_checkout_name(&name) {
                    return Err(Error::InvalidTreeEntry {
                        dir: dir.clone(),
                        name: name.into_owned(),
                    });
                }
                let path = if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                };
                if entry.mode.is_tree() {
                    if !name.starts_with('.') {
                        stack.push((path, entry.oid.to_owned()));
                    }
                } else if entry.mode.is_blob() || entry.mode.is_link() {
                    let header = repo
                        .find_header(entry.oid.to_owned())
                        .map_err(git_err("reading an object header"))?;
                    files.push(FileEntry {
                        path,
                        size: header.size(),
                        symlink: entry.mode.is_link(),
                        submodule: false,
                    });
                } else if entry.mode.is_commit() && !name.starts_with('.') {
                    files.push(FileEntry {
                        path,
                        size: 0,
                        symlink: false,
                        submodule: true,
                    });
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }
}

/// What a listing's prefix is at a commit.
enum Prefix {
    Tree(gix::ObjectId),
    /// The prefix is this submodule, or lies inside it.
    Submodule(String),
    /// Missing, or a file.
    Missing,
}

/// Walks `components` down from `root` one directory at a time: a submodule on the way is
/// named (looking past it would look for the other repository's objects, which are not here).
fn prefix_tree(root: &gix::Tree<'_>, components: &[&str]) -> Result<Prefix, Error> {
    let mut id = root.id;
    for depth in 1..=components.len() {
        let entry = root
            .clone()
            .lookup_entry(components[..depth].iter().map(|c| c.as_bytes()))
            .map_err(git_err("looking up a path"))?;
        match entry {
            Some(e) if e.mode().is_commit() => {
                return Ok(Prefix::Submodule(components[..depth].join("/")));
            }
            Some(e) if e.mode().is_tree() => id = e.object_id(),
            _ => return Ok(Prefix::Missing),
        }
    }
    Ok(Prefix::Tree(id))
}

/// Deletes refs under `refs/heads` and `refs/tags` that the remote no longer advertises. The
/// advertisement was filtered to exactly these prefixes (plus HEAD), so anything absent was
/// deleted upstream.
fn prune_refs(
    repo: &gix::Repository,
    remote_refs: &[gix::protocol::handshake::Ref],
) -> Result<(), Error> {
    let advertised: BTreeSet<&BStr> = remote_refs
        .iter()
        .map(|r| r.unpack().0)
        .filter(|name| name.starts_with(b"refs/heads/") || name.starts_with(b"refs/tags/"))
        .collect();
    let deletions: Vec<RefEdit> = branch_and_tag_ids(repo)?
        .into_iter()
        .filter(|(name, _)| !advertised.contains(name.as_bytes().as_bstr()))
        .filter_map(|(name, id)| {
            Some(RefEdit {
                change: Change::Delete {
                    expected: PreviousValue::MustExistAndMatch(gix::refs::Target::Object(id)),
                    log: RefLog::AndReference,
                },
                name: name.try_into().ok()?,
                deref: false,
            })
        })
        .collect();
    if !deletions.is_empty() {
        repo.edit_references(deletions)
            .map_err(git_err("deleting refs removed on the remote"))?;
    }
    Ok(())
}

/// Records the remote's default branch as our HEAD, as `git clone --mirror` does.
fn record_remote_head(
    repo: &gix::Repository,
    remote_refs: &[gix::protocol::handshake::Ref],
) -> Result<(), Error> {
    let remote_head = remote_refs.iter().find_map(|r| match r {
        gix::protocol::handshake::Ref::Symbolic {
            full_ref_name,
            target,
            ..
        }
        | gix::protocol::handshake::Ref::Unborn {
            full_ref_name,
            target,
        } if full_ref_name == "HEAD" && target.starts_with(b"refs/heads/") => Some(target),
        _ => None,
    });
    let Some(target) = remote_head else {
        return Ok(());
    };
    if repo
        .head_name()
        .ok()
        .flatten()
        .is_some_and(|current| current.as_bstr() == target.as_bstr())
    {
        return Ok(());
    }
    let target: gix::refs::FullName = target
        .as_bstr()
        .try_into()
        .map_err(git_err("recording the remote's HEAD"))?;
    let head: gix::refs::FullName = "HEAD"
        .try_into()
        .map_err(git_err("recording the remote's HEAD"))?;
    repo.edit_reference(RefEdit {
        change: Change::Update {
            log: LogChange::default(),
            expected: PreviousValue::Any,
            new: gix::refs::Target::Symbolic(target),
        },
        name: head,
        deref: false,
    })
    .map_err(git_err("recording the remote's HEAD"))?;
    Ok(())
}

/// The refs that differ between `before` and `after`, sorted by name.
fn ref_changes(
    before: &BTreeMap<String, gix::ObjectId>,
    after: &BTreeMap<String, gix::ObjectId>,
) -> Vec<RefChange> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let old = before.get(name);
            let new = after.get(name);
            (old != new).then(|| RefChange {
                name: name.clone(),
                old: old.map(ToString::to_string),
                new: new.map(ToString::to_string),
            })
        })
        .collect()
}

/// All refs under `refs/heads/` and `refs/tags/`, by full name, with the object they point to.
fn branch_and_tag_ids(repo: &gix::Repository) -> Result<BTreeMap<String, gix::ObjectId>, Error> {
    let platform = repo.references().map_err(git_err("listing refs"))?;
    let mut out = BTreeMap::new();
    for iter in [
        platform.local_branches().map_err(git_err("listing refs"))?,
        platform.tags().map_err(git_err("listing refs"))?,
    ] {
        for reference in iter {
            let reference = reference.map_err(git_err("listing refs"))?;
            if let Some(id) = reference.target().try_id() {
                out.insert(reference.name().as_bstr().to_string(), id.to_owned());
            }
        }
    }
    Ok(out)
}

fn commit_not_found(id: &CommitId) -> Error {
    Error::NotFound(format!(
        "commit {id} not found in the mirror (is it on a branch or tag of the remote, and fetched?)"
    ))
}

fn not_a_commit(id: &CommitId) -> Error {
    Error::NotFound(format!(
        "{id} not found in the mirror as a commit (the object is not one)"
    ))
}

fn find_ref<'r>(
    repo: &'r gix::Repository,
    full_name: &str,
) -> Result<Option<gix::Reference<'r>>, Error> {
    repo.try_find_reference(full_name)
        .map_err(git_err("looking up a ref"))
}

/// The object and mode of the tree entry at `path` in `commit`; `None` when there is none.
fn entry_at(
    repo: &gix::Repository,
    commit: &CommitId,
    path: &str,
) -> Result<Option<(gix::ObjectId, gix::object::tree::EntryMode)>, Error> {
    let components = split_path(path)?;
    if components.is_empty() {
        return Ok(None);
    }
    let tree = commit_tree(repo, commit)?;
    let entry = tree
        .lookup_entry(components.iter().map(|c| c.as_bytes()))
        .map_err(git_err("looking up a path"))?;
    Ok(entry.map(|e| (e.object_id(), e.mode())))
}

fn commit_tree<'r>(repo: &'r gix::Repository, commit: &CommitId) -> Result<gix::Tree<'r>, Error> {
    let commit_obj = match repo.try_find_object(commit.0) {
        Ok(Some(object)) => object.try_into_commit().map_err(|_| not_a_commit(commit))?,
        Ok(None) => return Err(commit_not_found(commit)),
        Err(e) => return Err(git_err("looking up a commit")(e)),
    };
    commit_obj
        .tree()
        .map_err(git_err("reading a commit's tree"))
}

/// Rejects ref names that would escape `refs/heads/` or `refs/tags/` or look up something else.
fn check_ref_name(name: &str) -> Result<&str, Error> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.ends_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || name.contains(|c: char| c.is_control() || " ~^:?*[\\".contains(c))
        || name.contains("@{");
    if bad {
        return Err(Error::InvalidRefName(name.to_owned()));
    }
    Ok(name)
}

/// Whether a tree entry's name is one Git would check out: not empty, `.`, `..` or `.git` (in
/// any case: case-insensitive file systems), and holding no `/` or NUL. Tree objects are not
/// checked when fetched, so a hand-made one can hold any bytes up to the NUL ending a name.
fn is_checkout_name(name: &str) -> bool {
    !(name.is_empty()
        || name == "."
        || name == ".."
        || name.eq_ignore_ascii_case(".git")
        || name.contains(['/', '\0']))
}

/// Splits a repository path into components. A leading or trailing `/` is accepted (`"/"` and
/// `""` are the root); `.`/`..` components are rejected because trees never contain them and a
/// caller using them is probably trying to escape a directory it was confined to.
fn split_path(path: &str) -> Result<Vec<&str>, Error> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let components: Vec<&str> = trimmed.split('/').collect();
    if components
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(Error::InvalidPath(path.to_owned()));
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_git_refuses_to_check_out_are_recognized() {
        for bad in ["", ".", "..", ".git", ".GIT", "a/b", "/etc/passwd", "a\0b"] {
            assert!(!is_checkout_name(bad), "{bad:?}");
        }
        for good in ["a", ".gitignore", "..a", "a..", ".github", "x.yaml"] {
            assert!(is_checkout_name(good), "{good:?}");
        }
    }

    #[test]
    fn paths_split() {
        assert_eq!(split_path("").ok(), Some(vec![]));
        assert_eq!(split_path("/").ok(), Some(vec![]));
        assert_eq!(split_path("a/b/").ok(), Some(vec!["a", "b"]));
        assert_eq!(split_path("/a").ok(), Some(vec!["a"]));
        for bad in ["a//b", "../a", "a/./b", "a/.."] {
            assert!(
                matches!(split_path(bad), Err(Error::InvalidPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn ref_names_checked() {
        for good in ["main", "feature/x", "v1.0.0"] {
            assert!(check_ref_name(good).is_ok(), "{good}");
        }
        for bad in ["", "/x", "x/", "a/../b", "a b", "a:b", "HEAD@{1}", "a//b"] {
            assert!(check_ref_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_ids_parse() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            CommitId::from_hex(hex).map(|c| c.to_hex()).ok(),
            Some(hex.to_owned())
        );
        assert!(matches!(
            CommitId::from_hex("xyz"),
            Err(Error::InvalidCommitId(_))
        ));
        assert!(CommitId::from_hex("0123").is_err());
    }
}
