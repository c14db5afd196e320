//! The mirrors kas keeps up to date: one task per project fetches on a poll interval or when a
//! push webhook asks, retries failures with backoff, and publishes the default branch's commit.
//!
//! A failed fetch never takes the last good commit away: readers keep using it, and the error
//! is published beside it so admins can see it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Ended, FetchMetrics};
use crate::{CommitId, GitRef, Mirror, Refusal, Remote, Verified, VerifyPolicy};

/// What readers see of a project's repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectHead {
    /// The default branch's commit at the last successful fetch, or, until the first fetch of
    /// this process succeeds, the one in the mirror left on disk by an earlier run (`restored`).
    pub commit: Option<CommitId>,
    /// When the last fetch attempt (successful or not) ended.
    pub fetched_at: Option<SystemTime>,
    /// When a fetch of this process published `commit`, or, for a commit restored from the
    /// mirror on disk, when this process opened the mirror (kas has had it at least since
    /// then): how long an agent that has not applied it is behind.
    pub commit_since: Option<SystemTime>,
    /// When the last successful fetch ended; `None` until one succeeded in this process.
    pub succeeded_at: Option<SystemTime>,
    /// `commit` was read from the mirror already on disk when it was opened (kas restarted), and
    /// no fetch of this process has succeeded yet: it is the last commit known good, possibly
    /// behind the remote. Cleared by the first successful fetch.
    pub restored: bool,
    /// Why the last fetch failed; `None` after a success.
    pub error: Option<String>,
    /// Successful fetches so far in this process (a restored commit does not count).
    pub fetches: u64,
    /// Failed fetches so far.
    pub failures: u64,
    /// With a [`VerifyPolicy`]: why the default branch's commit at the last fetch was refused
    /// (not signed by a trusted key); `commit` stays the last verified one. `None` once a
    /// commit passes.
    pub refusal: Option<Refusal>,
    /// The last [`Sources::request_fetch`] number answered: its fetch started after it was
    /// asked for, and ended (well or not) with this head.
    pub served: u64,
}

/// A project to mirror.
#[derive(Debug, Clone)]
pub struct ProjectSpec {
    pub id: i64,
    pub path: String,
    /// `None`: the project has no repository yet (its head stays empty).
    pub remote: Option<Remote>,
    /// Signed commits only: `Some` makes every published commit (and every commit
    /// [`Sources::verify`] is asked about) pass this policy.
    pub verify: Option<VerifyPolicy>,
}

struct Entry {
    head: watch::Sender<ProjectHead>,
    trigger: Arc<Notify>,
    /// Fetches asked for by [`Sources::request_fetch`] so far.
    requested: std::sync::atomic::AtomicU64,
    mirror: Mutex<Option<Mirror>>,
    /// The mirror of a new remote until its first fetch succeeds: `mirror` (the former remote's)
    /// keeps serving the last good commit meanwhile. Without it, a project moved to a remote
    /// that did not answer yet lost its last good commit's files, and drift correction stopped.
    pending: Mutex<Option<Mirror>>,
    /// Stops the poll task of the current remote.
    task: Mutex<Option<CancellationToken>>,
    verify: Mutex<Option<VerifyPolicy>>,
    /// Verdicts per commit under the current policy files (a commit's content never changes, so
    /// neither does its verdict until the trusted keys do); only definitive ones are kept.
    verdicts: Mutex<HashMap<(CommitId, PolicyStamp), Result<Verified, Refusal>>>,
    /// Whether the project counts in the failing projects' gauge, and whether it was removed
    /// (then it never counts again): one lock, so a fetch ending as the project is removed
    /// cannot leave it counted.
    failing: Mutex<(bool, bool)>,
    /// Refs other than the default branch that entries follow → the commit this process last
    /// found there and since when ([`Sources::ref_since`]); at most [`MAX_REFS_SEEN`].
    refs_seen: Mutex<HashMap<GitRef, (CommitId, SystemTime)>>,
}

/// Refs of one project whose commits [`Entry::refs_seen`] keeps: as many as entries follow in
/// practice; past it, the one seen moving longest ago is forgotten.
const MAX_REFS_SEEN: usize = 64;

impl Entry {
    /// Counts the project in `metrics`' failing gauge as its head now says (`remove`: it
    /// is gone, and counts no more).
    fn count_failing(&self, metrics: &FetchMetrics, remove: bool) {
        let is = !remove && self.head.borrow().error.is_some();
        let mut mark = lock(&self.failing);
        if mark.1 {
            return;
        }
        metrics.failing(mark.0, is);
        *mark = (is, remove);
    }
}

/// A cache folder entry named as this kas names mirrors (`{id}-{hash}.git`) or mirrors being
/// deleted (`.removed-…`) (pure).
fn leftover_name(name: &str) -> bool {
    if name.starts_with(".removed-") {
        return true;
    }
    let Some((id, rest)) = name.split_once('-') else {
        return false;
    };
    let Some(hash) = rest.strip_suffix(".git") else {
        return false;
    };
    !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
        && !hash.is_empty()
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Verdicts kept per project before the cache starts over.
const MAX_VERDICTS: usize = 1024;

/// Size and modification time of each trusted-keys file: a verdict is reused only while these
/// are unchanged, so adding or removing a key takes effect at the next check.
type PolicyStamp = Vec<Option<(u64, Option<SystemTime>)>>;

fn policy_stamp(policy: &VerifyPolicy) -> PolicyStamp {
    [&policy.allowed_signers_file, &policy.gpg_keyring_file]
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(file.as_ref()?).ok()?;
            Some((meta.len(), meta.modified().ok()))
        })
        .collect()
}

/// All mirrors of one kas.
pub struct Sources {
    cache_dir: PathBuf,
    poll_interval: Duration,
    fetch_timeout: Duration,
    max_backoff: Duration,
    entries: Mutex<HashMap<i64, Arc<Entry>>>,
    /// The folders of the mirrors entries hold: a deletion waiting for a fetch to end leaves
    /// alone a folder opened again meanwhile (a project moved back to its former remote).
    in_use: Arc<Mutex<std::collections::HashSet<PathBuf>>>,
    shutdown: CancellationToken,
    metrics: FetchMetrics,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("cache_dir", &self.cache_dir)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Delay before retry `n` (1-based) after failures: 1 s doubling, capped.
fn retry_delay(n: u64, cap: Duration) -> Duration {
    let exp = u32::try_from(n.saturating_sub(1).min(16)).unwrap_or(16);
    Duration::from_secs(1u64 << exp).min(cap)
}

impl Sources {
    /// `fetch_timeout` bounds one fetch: a server that accepts the connection and then says
    /// nothing must not stop the project's updates (and error reports) forever.
    pub fn new(cache_dir: PathBuf, poll_interval: Duration, fetch_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            cache_dir,
            poll_interval,
            fetch_timeout,
            max_backoff: Duration::from_secs(300),
            entries: Mutex::new(HashMap::new()),
            in_use: Arc::default(),
            shutdown: CancellationToken::new(),
            metrics: FetchMetrics::default(),
        })
    }

    /// How long one fetch may take before it counts as failed.
    pub fn fetch_timeout(&self) -> Duration {
        self.fetch_timeout
    }

    /// The fetch metrics, to register with the process's metrics registry.
    pub fn metrics(&self) -> &FetchMetrics {
        &self.metrics
    }

    fn entry(&self, id: i64) -> Arc<Entry> {
        Arc::clone(lock(&self.entries).entry(id).or_insert_with(|| {
            let (head, _) = watch::channel(ProjectHead::default());
            Arc::new(Entry {
                head,
                trigger: Arc::new(Notify::new()),
                requested: std::sync::atomic::AtomicU64::new(0),
                mirror: Mutex::new(None),
                pending: Mutex::new(None),
                task: Mutex::new(None),
                verify: Mutex::new(None),
                verdicts: Mutex::new(HashMap::new()),
                failing: Mutex::new((false, false)),
                refs_seen: Mutex::new(HashMap::new()),
            })
        }))
    }

    /// Starts (or restarts, when the remote changed) mirroring a project.
    pub fn upsert(self: &Arc<Self>, spec: ProjectSpec) -> Result<(), crate::Error> {
        let entry = self.entry(spec.id);
        // The remote being moved to, if a move is under way, else the one in use.
        let target = lock(&entry.pending)
            .clone()
            .or_else(|| lock(&entry.mirror).clone());
        let same_remote = target
            .as_ref()
            .map(|m| Some(m.remote()) == spec.remote.as_ref())
            .unwrap_or(spec.remote.is_none());
        let same_policy = *lock(&entry.verify) == spec.verify;
        if same_remote && same_policy {
            return Ok(());
        }
        crate::tools::warn_if_missing(&spec);
        if let Some(old) = lock(&entry.task).take() {
            old.cancel();
        }
        // A move to a remote that never answered, superseded: its mirror goes.
        let unfinished = lock(&entry.pending).take();
        if let Some(p) = unfinished.filter(|_| !same_remote) {
            self.delete_mirror(spec.id, p);
        }
        *lock(&entry.verify) = spec.verify.clone();
        lock(&entry.verdicts).clear();
        if !same_policy && spec.verify.is_some() {
            // A commit published under no or other trusted keys is not known good under these;
            // the next fetch (or the last verified commit on disk) publishes one that is.
            entry.head.send_modify(|h| {
                h.commit = None;
                h.refusal = None;
            });
        }
        // A former remote's mirror is never read again: its folder goes (it would stay on
        // disk for as long as kas runs, and after a restart nothing would know it).
        let former = if same_remote {
            None
        } else {
            lock(&entry.mirror).clone()
        };
        let Some(remote) = spec.remote else {
            *lock(&entry.mirror) = None;
            entry.head.send_replace(ProjectHead::default());
            if let Some(old) = former {
                self.delete_mirror(spec.id, old);
            }
            return Ok(());
        };
        // A new remote gets a fresh folder, so objects of the old one never mix in.
        let dir = self.cache_dir.join(format!(
            "{}-{}.git",
            spec.id,
            short_hash(&remote.to_string())
        ));
        // Only the policy changed: keep the mirror, since fetches are serialized per instance and
        // one of the old task may still be running.
        let current = target.filter(|_| same_remote);
        let mirror = match current {
            Some(mirror) => mirror,
            None => self.open_mirror(dir, remote)?,
        };
        publish_restored(&entry, &mirror, &spec.path, spec.verify.is_some());
        let former = former.filter(|o| o.dir() != mirror.dir());
        // The former remote's mirror serves the last good commit until the new one has a
        // commit of its own (see `Entry::pending`).
        if former.is_some() && entry.head.borrow().commit.is_some() {
            *lock(&entry.pending) = Some(mirror.clone());
        } else {
            *lock(&entry.mirror) = Some(mirror.clone());
            if let Some(old) = former {
                self.delete_mirror(spec.id, old);
            }
        }
        let cancel = self.shutdown.child_token();
        *lock(&entry.task) = Some(cancel.clone());
        let this = Arc::clone(self);
        let (id, path) = (spec.id, spec.path);
        tokio::spawn(async move {
            this.poll(entry, mirror, (id, path), cancel).await;
        });
        Ok(())
    }

    /// Once a new remote's mirror fetched: it serves from now on, and the former one goes.
    fn finish_move(&self, id: i64, entry: &Entry, mirror: &Mirror) {
        let Some(pending) = lock(&entry.pending).take() else {
            return;
        };
        if pending.dir() != mirror.dir() {
            *lock(&entry.pending) = Some(pending);
            return;
        }
        let former = lock(&entry.mirror).replace(pending);
        if let Some(old) = former.filter(|o| o.dir() != mirror.dir()) {
            self.delete_mirror(id, old);
        }
    }

    /// Stops mirroring a project and deletes its mirror from disk, in the background once a
    /// fetch still running in it has ended ([`Sources::delete_mirror`]).
    pub fn remove(&self, id: i64) {
        let Some(entry) = lock(&self.entries).remove(&id) else {
            return;
        };
        if let Some(t) = lock(&entry.task).take() {
            t.cancel();
        }
        // A removed project fails no more.
        entry.count_failing(&self.metrics, true);
        let pending = lock(&entry.pending).take();
        for mirror in [lock(&entry.mirror).take(), pending].into_iter().flatten() {
            self.delete_mirror(id, mirror);
        }
    }

    /// Opens (or creates) the mirror in `dir`, counted in use.
    fn open_mirror(&self, dir: PathBuf, remote: Remote) -> Result<Mirror, crate::Error> {
        let mut in_use = lock(&self.in_use);
        let mirror = Mirror::open_or_init(&dir, remote)?;
        in_use.insert(dir);
        Ok(mirror)
    }

    /// Deletes `mirror`'s directory, but only if it is one this `Sources` made: directly in the
    /// cache directory, named after the project, and a real directory (not a symlink).
    ///
    /// In the background, once a fetch still running in it has ended: the fetch holds the
    /// folder's path, and renamed away under it, its last ref writes made the folder again
    /// with a lone `HEAD` — left on disk, and a folder kas could not open when the project
    /// came back to that remote. A folder opened again meanwhile is kept.
    fn delete_mirror(&self, id: i64, mirror: Mirror) {
        let dir = mirror.dir().to_owned();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let ours = dir.parent() == Some(self.cache_dir.as_path())
            && name.starts_with(&format!("{id}-"))
            && name.ends_with(".git")
            && std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir());
        if !ours {
            tracing::warn!(dir = %dir.display(), "Not deleting the mirror of a removed project: it is not a mirror directory of this kas");
            return;
        }
        lock(&self.in_use).remove(&dir);
        let doomed = self
            .cache_dir
            .join(format!(".removed-{name}-{}", nanos_now()));
        let in_use = Arc::clone(&self.in_use);
        let delete = move || {
            let _fetch = mirror.lock_fetches();
            {
                let in_use = lock(&in_use);
                if in_use.contains(&dir) {
                    tracing::debug!(dir = %dir.display(), "Not deleting a mirror in use again");
                    return;
                }
                // Renamed first: a deletion cut short (kill -9) leaves a name the cache sweep
                // at the next start knows to delete.
                if let Err(e) = std::fs::rename(&dir, &doomed) {
                    tracing::warn!(dir = %dir.display(), error = %e, "Deleting the mirror of a removed project failed");
                    return;
                }
            }
            match std::fs::remove_dir_all(&doomed) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "Deleted the mirror of a removed project")
                }
                Err(e) => {
                    tracing::warn!(dir = %doomed.display(), error = %e, "Deleting the mirror of a removed project failed")
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(delete)),
            Err(_) => delete(),
        }
    }

    /// Deletes what the cache folder holds besides the mirrors in use: mirrors of projects
    /// removed or of remotes changed while kas was down, and deletions a kill -9 interrupted
    /// (`.removed-*`). Only real directories named as this kas names them are touched (never a
    /// symlink, never anything else). Call once the stored projects are upserted. Returns
    /// how many were deleted.
    pub fn sweep_cache(&self) -> usize {
        // By name: a mirror's path may be spelled differently from the listing's.
        let in_use: std::collections::HashSet<std::ffi::OsString> = lock(&self.entries)
            .values()
            .filter_map(|e| lock(&e.mirror).as_ref()?.dir().file_name().map(Into::into))
            .collect();
        let Ok(listing) = std::fs::read_dir(&self.cache_dir) else {
            return 0;
        };
        let mut deleted = 0;
        for entry in listing.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if !is_dir || in_use.contains(&entry.file_name()) || !leftover_name(&name) {
                continue;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(dir = %path.display(), "Deleted a mirror no project uses");
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "Deleting a mirror no project uses failed")
                }
            }
        }
        deleted
    }

    /// Asks for an immediate fetch (a push webhook arrived). False if the project is unknown.
    pub fn trigger(&self, id: i64) -> bool {
        match lock(&self.entries).get(&id) {
            Some(e) => {
                e.trigger.notify_one();
                true
            }
            None => false,
        }
    }

    /// Asks for a fetch that starts after this call, as [`Sources::trigger`] does; returns its
    /// number, which the project's head shows in [`ProjectHead::served`] once that fetch
    /// ended. A fetch already running when this is called does not answer it: it may have
    /// read the remote before the push the caller wants fetched. `None`: not mirrored.
    pub fn request_fetch(&self, id: i64) -> Option<u64> {
        let entries = lock(&self.entries);
        let entry = entries.get(&id)?;
        let n = entry
            .requested
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        entry.trigger.notify_one();
        Some(n)
    }

    /// Follows a project's head (created empty if the project is not mirrored yet).
    pub fn watch(&self, id: i64) -> watch::Receiver<ProjectHead> {
        self.entry(id).head.subscribe()
    }

    /// The project's current head.
    pub fn head(&self, id: i64) -> ProjectHead {
        lock(&self.entries)
            .get(&id)
            .map(|e| e.head.borrow().clone())
            .unwrap_or_default()
    }

    /// Since when this process has known `git_ref` of project `id` at `commit` (`None` when
    /// it does not): for the default branch, [`ProjectHead::commit_since`]; for another ref,
    /// when it was first found there — each manifests stream following the ref resolves it
    /// after every fetch and tells it here, so that is the fetch that moved it, or, after a
    /// restart or with no stream open, the first time anyone asked (a lower bound).
    pub fn ref_since(&self, id: i64, git_ref: &GitRef, commit: &CommitId) -> Option<SystemTime> {
        let entry = lock(&self.entries).get(&id).cloned()?;
        if *git_ref == GitRef::DefaultBranch {
            let head = entry.head.borrow();
            return (head.commit.as_ref() == Some(commit))
                .then_some(head.commit_since)
                .flatten();
        }
        let mut seen = lock(&entry.refs_seen);
        if let Some((c, since)) = seen.get(git_ref)
            && c == commit
        {
            return Some(*since);
        }
        if seen.len() >= MAX_REFS_SEEN && !seen.contains_key(git_ref) {
            let oldest = seen
                .iter()
                .min_by_key(|(_, (_, since))| *since)
                .map(|(r, _)| r.clone());
            if let Some(r) = oldest {
                seen.remove(&r);
            }
        }
        let now = SystemTime::now();
        seen.insert(git_ref.clone(), (*commit, now));
        Some(now)
    }

    /// The project's mirror, for reading files at a commit.
    pub fn mirror(&self, id: i64) -> Option<Mirror> {
        lock(&self.entries)
            .get(&id)
            .and_then(|e| lock(&e.mirror).clone())
    }

    /// Checks `commit` of project `id` against the project's [`VerifyPolicy`]: `Ok(None)` when
    /// the project has none (every commit may be used), `Ok(Some(_))` when it passes.
    pub async fn verify(&self, id: i64, commit: CommitId) -> Result<Option<Verified>, Refusal> {
        let entry = self.entry(id);
        let Some(policy) = lock(&entry.verify).clone() else {
            return Ok(None);
        };
        let Some(mirror) = lock(&entry.mirror).clone() else {
            return Err(Refusal {
                commit,
                signer: None,
                reason: "the project has no mirror".to_owned(),
                definitive: false,
            });
        };
        verdict(&entry, &mirror, &policy, commit).await.map(Some)
    }

    /// Stops every poll task.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    async fn poll(
        &self,
        entry: Arc<Entry>,
        mirror: Mirror,
        (id, path): (i64, String),
        cancel: CancellationToken,
    ) {
        let mut failures: u64 = 0;
        loop {
            tracing::debug!(project = %path, "Fetching");
            let started = std::time::Instant::now();
            // Requests made until now are answered by this fetch; later ones by the next.
            let serving = entry.requested.load(std::sync::atomic::Ordering::SeqCst);
            // Past the timeout, or cancelled, the fetch is interrupted rather than left to
            // hold the mirror's fetch lock.
            let result = tokio::select! {
                r = mirror.fetch_async_within(self.fetch_timeout) => r,
                () = cancel.cancelled() => return,
            };
            tracing::debug!(project = %path, ok = result.is_ok(), "Fetch ended");
            let fetched = result.is_ok();
            let result = match result {
                Ok(_) => self.verified_head(&entry, &mirror, &path).await,
                Err(e) => Err(e),
            };
            // Before the head names the new remote's commit: readers must find it.
            if matches!(result, Ok(Ok(Some(_)))) {
                self.finish_move(id, &entry, &mirror);
            }
            let ended = publish(&entry, (&path, serving), result, &mut failures);
            self.metrics.record(ended, started.elapsed().as_secs_f64());
            entry.count_failing(&self.metrics, false);
            // After publishing: a long repack delays neither the new commit nor its fetch's
            // verdict (it used to count against the fetch's timeout).
            // Not while a fetch is asked for (a reconcile waits for it): it runs first.
            let asked = entry.requested.load(std::sync::atomic::Ordering::SeqCst) > serving;
            if fetched && !asked {
                tokio::select! {
                    _ = mirror.maintain_async() => {}
                    () = cancel.cancelled() => return,
                }
            }
            let delay = if failures == 0 {
                self.poll_interval
            } else {
                retry_delay(failures, self.max_backoff)
                    .min(self.poll_interval.max(Duration::from_secs(1)) * 16)
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = entry.trigger.notified() => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// Publishes a fetch's result on the project's watch channel (what kas serves and shows) and
/// says how the fetch ended. A refusal or a failure keeps the last good commit in force.
fn publish(
    entry: &Entry,
    (path, serving): (&str, u64),
    result: Result<Result<Option<CommitId>, Refusal>, crate::Error>,
    failures: &mut u64,
) -> Ended {
    let now = Some(SystemTime::now());
    let served = |h: &mut ProjectHead| h.served = h.served.max(serving);
    match result {
        Ok(Err(refusal)) => {
            *failures = 0;
            entry.head.send_modify(|h| {
                if h.refusal.as_ref() != Some(&refusal) {
                    tracing::warn!(project = %path, commit_id = %refusal.commit, signer = refusal.signer.as_deref().unwrap_or_default(), reason = %refusal.reason, last_good = h.commit.as_ref().map(CommitId::to_hex).unwrap_or_default(), "Refused the project's new commit: it is not signed by a trusted key; the last verified commit stays in force");
                }
                h.refusal = Some(refusal);
                h.error = None;
                h.fetched_at = now;
                h.succeeded_at = now;
                h.fetches += 1;
                served(h);
            });
            Ended::Refused
        }
        Ok(Ok(commit)) => {
            *failures = 0;
            entry.head.send_modify(|h| {
                h.refusal = None;
                match (&commit, h.commit != commit) {
                    (Some(c), true) => tracing::info!(project = %path, commit_id = %c, "Project has a new commit"),
                    (None, true) => tracing::info!(project = %path, "Project has no commit yet (nothing was pushed to it)"),
                    (_, false) => {}
                }
                if h.commit != commit {
                    h.commit_since = now;
                }
                h.commit = commit;
                h.error = None;
                h.fetched_at = now;
                h.succeeded_at = now;
                h.restored = false;
                h.fetches += 1;
                served(h);
            });
            Ended::Succeeded
        }
        Err(e) => {
            *failures += 1;
            let msg = e.to_string();
            tracing::warn!(project = %path, error = %msg, attempt = *failures, "Fetching the project failed; the last good commit stays in use");
            entry.head.send_modify(|h| {
                h.error = Some(msg);
                h.fetched_at = now;
                h.failures += 1;
                served(h);
            });
            Ended::Failed
        }
    }
}

impl Sources {
    /// The default branch's commit after a fetch (`None` for an empty repository), or why it is
    /// refused under the project's [`VerifyPolicy`].
    async fn verified_head(
        &self,
        entry: &Entry,
        mirror: &Mirror,
        path: &str,
    ) -> Result<Result<Option<CommitId>, Refusal>, crate::Error> {
        let commit = match mirror.resolve(&GitRef::DefaultBranch) {
            Ok(commit) => commit,
            // A repository nothing was pushed to has no default branch yet: not an error. One
            // whose branch was deleted (it had a commit, or the mirror has other refs or a pack)
            // is: the last good commit stays in force, and the fetch is failing where people
            // look.
            Err(crate::Error::NotFound(why)) => {
                if entry.head.borrow().commit.is_none() && !mirror.ever_fetched_anything()? {
                    return Ok(Ok(None));
                }
                return Err(crate::Error::NotFound(format!(
                    "{why}: was the branch deleted? The last good commit stays in force"
                )));
            }
            Err(e) => return Err(e),
        };
        let Some(policy) = lock(&entry.verify).clone() else {
            return Ok(Ok(Some(commit)));
        };
        // Checked even when already published: the cache answers at once unless the trusted
        // keys changed, and then the published commit must pass again.
        match verdict(entry, mirror, &policy, commit).await {
            Ok(verified) => {
                if entry.head.borrow().commit != Some(commit) {
                    tracing::info!(project = %path, commit_id = %commit, signer = %verified.signer, "Verified the project's new commit");
                    if let Err(e) = mirror.mark_verified(&commit) {
                        tracing::warn!(project = %path, error = %e, "Recording the verified commit failed; after a restart it is verified again");
                    }
                }
                Ok(Ok(Some(commit)))
            }
            Err(refusal) => Ok(Err(refusal)),
        }
    }
}

/// The verdict on `commit`, from the cache or by running the check on the blocking pool.
async fn verdict(
    entry: &Entry,
    mirror: &Mirror,
    policy: &VerifyPolicy,
    commit: CommitId,
) -> Result<Verified, Refusal> {
    let key = (commit, policy_stamp(policy));
    if let Some(known) = lock(&entry.verdicts).get(&key) {
        return known.clone();
    }
    let (m, p) = (mirror.clone(), policy.clone());
    let result = tokio::task::spawn_blocking(move || m.verify_commit(&commit, &p))
        .await
        .unwrap_or_else(|e| {
            Err(Refusal {
                commit,
                signer: None,
                reason: format!("the signature check task failed: {e}"),
                definitive: false,
            })
        });
    if result.as_ref().err().is_none_or(|r| r.definitive) {
        let mut verdicts = lock(&entry.verdicts);
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(key, result.clone());
    }
    result
}

/// Publishes the default branch's commit of a mirror already on disk (with signed commits only,
/// the last verified one), so readers have the last known good commit while the first fetch of
/// this process is slow or failing. Only into a head that has nothing yet: a head fed by
/// fetches is newer.
fn publish_restored(entry: &Entry, mirror: &Mirror, path: &str, verified_only: bool) {
    let restored = if verified_only {
        mirror.last_verified().and_then(|c| {
            c.ok_or_else(|| crate::Error::NotFound("the mirror has no verified commit".into()))
        })
    } else {
        mirror.resolve(&GitRef::DefaultBranch)
    };
    let commit = match restored {
        Ok(commit) => commit,
        // A new, empty mirror: nothing to restore.
        Err(crate::Error::NotFound(_)) => return,
        Err(e) => {
            tracing::warn!(project = %path, error = %e, "Reading the mirror left on disk failed; waiting for the first fetch");
            return;
        }
    };
    entry.head.send_if_modified(|h| {
        if h.commit.is_some() || h.fetches > 0 {
            return false;
        }
        tracing::info!(project = %path, commit_id = %commit, "Using the commit in the mirror on disk until the first fetch");
        h.commit = Some(commit);
        // A lower bound: an agent behind it is called stalled no sooner than it truly is
        // (with no time at all, an agent behind across a kas restart never was).
        h.commit_since = Some(SystemTime::now());
        h.restored = true;
        true
    });
}

fn nanos_now() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn short_hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(s.as_bytes())[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_this_kas_gives_mirrors_are_leftovers() {
        for yes in ["7-0a1b2c3d4e5f.git", "12-ab.git", ".removed-7-0a1b.git-123"] {
            assert!(leftover_name(yes), "{yes}");
        }
        for no in [
            "7-0a1b.gitx",
            "x-0a1b.git",
            "-0a1b.git",
            "7-.git",
            "7-zz.git",
            "notes",
            "7.git",
        ] {
            assert!(!leftover_name(no), "{no}");
        }
    }

    #[test]
    fn retries_back_off_and_stop_at_the_cap() {
        let cap = Duration::from_secs(300);
        assert_eq!(retry_delay(1, cap), Duration::from_secs(1));
        assert_eq!(retry_delay(2, cap), Duration::from_secs(2));
        assert_eq!(retry_delay(5, cap), Duration::from_secs(16));
        assert_eq!(retry_delay(40, cap), cap);
    }
}
