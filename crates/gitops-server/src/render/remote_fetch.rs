//! Fetching the Git repositories of allowed remote Kustomize bases (see [`super::remote_bases`])
//! into mirrors of their own, with the Git client kas reads manifest projects with: its
//! timeouts, its isolation from the host's Git configuration, no credentials. A repository is
//! fetched at most once per [`RemoteBaseConfig::fetch_interval`] (resolutions waiting on one
//! fetch share it), and while it cannot be reached a ref its mirror still resolves is
//! rendered at that commit, with a warning ([`StaleBase`]). I/O, but for the decisions
//! ([`reusable`], [`may_fall_back`]).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tether_git_source::{CommitId, Error as GitError, FetchError, GitRef, Mirror, Remote};

use super::remote_bases::{AllowList, RemoteBase};

/// `gitops.render.remote_bases` and how kas fetches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBaseConfig {
    /// URL prefixes of the Git repositories kas fetches remote bases from; empty: none.
    pub allowed: Vec<String>,
    /// Where the repositories' mirrors are kept; nothing is fetched when `None`.
    pub cache_dir: Option<PathBuf>,
    /// A fetch is given up when nothing arrives for this long (`git.fetch_timeout`).
    pub fetch_timeout: Duration,
    /// A fetch of a repository that ended less than this ago is reused instead of fetching
    /// again (`gitops.render.remote_base_fetch_interval`): a kas restart, every stream
    /// rendering at once, fetches each repository once.
    pub fetch_interval: Duration,
    /// Most levels of remote bases naming remote bases in turn.
    pub max_depth: usize,
}

impl Default for RemoteBaseConfig {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            cache_dir: None,
            fetch_timeout: Duration::from_secs(120),
            fetch_interval: Duration::from_secs(60),
            max_depth: 5,
        }
    }
}

/// A base rendered at a commit its mirror held because its repository could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleBase {
    /// The repository's URL.
    pub repository: String,
    /// The ref asked for (`None`: the default branch).
    pub git_ref: Option<String>,
    /// The commit it resolved to in the mirror.
    pub commit: CommitId,
    /// Since when the repository's fetches fail.
    pub since: SystemTime,
    /// Why the last fetch failed.
    pub error: String,
}

impl StaleBase {
    /// The warning shown in the project's status and kas's log.
    pub fn warning(&self) -> String {
        format!(
            "remote base repository {} unreachable since {}: {} rendered at commit {} fetched earlier ({}); changes upstream are applied once it answers again",
            self.repository,
            humantime::format_rfc3339_seconds(self.since),
            self.git_ref.as_deref().unwrap_or("its default branch"),
            self.commit,
            self.error
        )
    }
}

/// A base's ref resolved: the mirror, the commit, and whether it is a stale one.
#[derive(Debug, Clone)]
pub struct BaseCommit {
    pub mirror: Mirror,
    pub commit: CommitId,
    pub stale: Option<StaleBase>,
}

/// How one repository's last fetch ended.
#[derive(Debug, Clone)]
struct Attempt {
    finished: Instant,
    /// Why it failed, and whether a commit the mirror holds may stand in (see
    /// [`may_fall_back`]).
    failure: Option<(String, bool)>,
}

/// One repository's fetches, held across a fetch so concurrent resolutions wait for it.
#[derive(Debug, Default)]
struct Fetches {
    last: Option<Attempt>,
    /// Since when its fetches fail (`None`: the last one succeeded).
    down_since: Option<SystemTime>,
    /// The refs whose stale use was logged during this outage: logged once per outage.
    logged: BTreeSet<Option<String>>,
}

/// Whether a fetch that ended at `finished` serves a resolution asked at `asked` (now
/// `now`): it ended while the resolution waited for it, or less than `interval` ago.
fn reusable(finished: Instant, asked: Instant, now: Instant, interval: Duration) -> bool {
    finished >= asked || now.saturating_duration_since(finished) < interval
}

/// Whether a fetch failing with `e` lets a commit the mirror already holds be rendered: yes
/// when the repository could not be reached or the transfer failed; no when it answered that
/// kas may not read it or that it does not exist (deleted or moved upstream: fail closed, as
/// for a ref that vanished).
fn may_fall_back(e: &GitError) -> bool {
    match e {
        GitError::Fetch(FetchError::Auth { .. } | FetchError::NotARepository { .. }) => false,
        GitError::Fetch(_) | GitError::Task(_) => true,
        _ => false,
    }
}

/// Remote base resolutions by outcome.
#[derive(Debug, Clone, Default)]
pub struct BaseFetchMetrics {
    fetches: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

impl BaseFetchMetrics {
    /// Registers `gitops_remote_base_fetches_total`.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "gitops_remote_base_fetches",
            "Remote Kustomize base resolutions by outcome (fetched; reused: a fetch within gitops.render.remote_base_fetch_interval, shared with concurrent resolutions, or a pinned commit held; stale: the repository could not be fetched and the commit held was rendered; failed)",
            self.fetches.clone(),
        );
    }

    fn count(&self, outcome: &'static str) {
        self.fetches.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// A repository's mirror and its fetches.
type Repository = (Mirror, Arc<tokio::sync::Mutex<Fetches>>);

/// Fetches remote bases' repositories; one per kas.
#[derive(Debug)]
pub struct BaseFetcher {
    allow: AllowList,
    dir: PathBuf,
    timeout: Duration,
    interval: Duration,
    /// See [`RemoteBaseConfig::max_depth`].
    pub max_depth: usize,
    /// One mirror per repository URL: a `Mirror` serialises its own fetches.
    repositories: Mutex<HashMap<String, Repository>>,
    metrics: BaseFetchMetrics,
}

impl BaseFetcher {
    /// `None` when no repository is allowed (or there is nowhere to keep them): every remote
    /// base is then refused.
    pub fn new(config: &RemoteBaseConfig) -> Option<Self> {
        if config.allowed.is_empty() {
            return None;
        }
        let allow = match AllowList::new(&config.allowed) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "gitops.render.remote_bases is invalid: kas fetches no remote base");
                return None;
            }
        };
        let Some(dir) = config.cache_dir.clone() else {
            tracing::error!(
                "gitops.render.remote_bases has no folder to keep repositories in: kas fetches no remote base"
            );
            return None;
        };
        Some(Self {
            allow,
            dir,
            timeout: config.fetch_timeout,
            interval: config.fetch_interval,
            max_depth: config.max_depth,
            repositories: Mutex::new(HashMap::new()),
            metrics: BaseFetchMetrics::default(),
        })
    }

    /// The counters of [`BaseFetcher::resolve`]'s outcomes.
    pub fn metrics(&self) -> &BaseFetchMetrics {
        &self.metrics
    }

    /// Whether the base's repository is allowed.
    pub fn allows(&self, base: &RemoteBase) -> bool {
        self.allow.allows(&base.repository)
    }

    /// The commit the base's ref names now, and the mirror holding it: the repository is
    /// fetched first (see [`RemoteBaseConfig::fetch_interval`]), unless the ref is a full
    /// commit id the mirror already holds (which no fetch can change). A branch is so read
    /// anew at every rendering past that interval. The error says why, for a message naming
    /// the kustomization and the reference.
    pub async fn resolve(&self, base: &RemoteBase) -> Result<BaseCommit, String> {
        let outcome = self.resolve_counted(base).await;
        self.metrics.count(match &outcome {
            Ok((_, counted)) => counted,
            Err(_) => "failed",
        });
        outcome.map(|(resolved, _)| resolved)
    }

    /// [`BaseFetcher::resolve`], with the outcome it counts as.
    async fn resolve_counted(
        &self,
        base: &RemoteBase,
    ) -> Result<(BaseCommit, &'static str), String> {
        let (mirror, fetches) = self.repository(&base.repository)?;
        let fresh = |commit| BaseCommit {
            mirror: mirror.clone(),
            commit,
            stale: None,
        };
        let pinned = base.git_ref.as_deref().filter(|r| is_commit_id(r));
        if let Some(hex) = pinned
            && let Ok(id) = mirror.resolve(&GitRef::Commit(hex.to_owned()))
        {
            return Ok((fresh(id), "reused"));
        }
        let asked = Instant::now();
        let mut state = fetches.lock().await;
        let reused = (state.last.clone())
            .filter(|a| reusable(a.finished, asked, Instant::now(), self.interval));
        let (attempt, counted) = match reused {
            // A ref created upstream since that fetch is fetched now rather than refused.
            Some(a)
                if a.failure.is_some() || resolve_ref(&mirror, base.git_ref.as_deref()).is_ok() =>
            {
                (a, "reused")
            }
            _ => (self.fetch(&mirror, &mut state, base).await, "fetched"),
        };
        match attempt.failure {
            None => Ok((
                fresh(resolve_ref(&mirror, base.git_ref.as_deref())?),
                counted,
            )),
            Some((error, fall_back)) => {
                let stale = stale_use(&mirror, &mut state, base, error, fall_back)?;
                Ok((stale, "stale"))
            }
        }
    }

    /// Fetches the repository (the caller holds its [`Fetches`]) and records how it ended,
    /// logging an outage's beginning and end.
    async fn fetch(&self, mirror: &Mirror, state: &mut Fetches, base: &RemoteBase) -> Attempt {
        let result = mirror.fetch_async_within(self.timeout).await;
        let failure = result.as_ref().err().map(|e| {
            (
                format!("fetching {} failed: {e}", base.repository),
                may_fall_back(e),
            )
        });
        match (&failure, state.down_since) {
            (Some((error, _)), None) => {
                tracing::warn!(repository = %base.repository, %error, "A remote base's repository cannot be fetched");
                state.down_since = Some(SystemTime::now());
            }
            (None, Some(since)) => {
                tracing::info!(repository = %base.repository, since = %humantime::format_rfc3339_seconds(since), "A remote base's repository is fetched again");
                state.down_since = None;
                state.logged.clear();
            }
            _ => {}
        }
        if result.is_ok() {
            // Repacks once fetches piled packs up, as after a manifest project's fetch; apart
            // from the rendering, which need not wait for it.
            let maintained = mirror.clone();
            tokio::spawn(async move { maintained.maintain_async().await });
        }
        let attempt = Attempt {
            finished: Instant::now(),
            failure,
        };
        state.last = Some(attempt.clone());
        attempt
    }

    /// The repository's mirror and fetches, opened (or created) at its first use.
    fn repository(&self, repository: &str) -> Result<Repository, String> {
        let mut repositories = self
            .repositories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = repositories.get(repository) {
            return Ok(r.clone());
        }
        let remote = Remote::parse(repository).map_err(|e| e.to_string())?;
        let dir = self.dir.join(mirror_name(repository));
        let mirror = Mirror::open_or_init(&dir, remote)
            .map_err(|e| format!("opening kas's copy of {repository}: {e}"))?;
        let r = (mirror, Arc::default());
        repositories.insert(repository.to_owned(), r.clone());
        Ok(r)
    }
}

/// The base at the commit its mirror holds for its ref, its repository's fetch having failed
/// with `error`; that error when the failure allows no fallback or the mirror holds no such
/// ref. Logged once per outage and ref.
fn stale_use(
    mirror: &Mirror,
    state: &mut Fetches,
    base: &RemoteBase,
    error: String,
    fall_back: bool,
) -> Result<BaseCommit, String> {
    if !fall_back {
        return Err(error);
    }
    let commit = resolve_ref(mirror, base.git_ref.as_deref())
        .map_err(|_| format!("{error}; kas holds no earlier copy of that ref"))?;
    let stale = StaleBase {
        repository: base.repository.clone(),
        git_ref: base.git_ref.clone(),
        commit,
        since: state.down_since.unwrap_or_else(SystemTime::now),
        error,
    };
    if state.logged.insert(base.git_ref.clone()) {
        tracing::warn!("{}", stale.warning());
    }
    Ok(BaseCommit {
        mirror: mirror.clone(),
        commit,
        stale: Some(stale),
    })
}

/// The folder of a repository's mirror: named by a digest of its URL, which may hold
/// anything.
fn mirror_name(repository: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(repository.as_bytes())[..16])
}

/// Whether `r` is a full commit id (40 hex digits).
fn is_commit_id(r: &str) -> bool {
    r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit `git_ref` names in the mirror: a full commit id, else a tag, else a branch, as
/// Git's own lookup prefers; the default branch when `None`.
fn resolve_ref(mirror: &Mirror, git_ref: Option<&str>) -> Result<CommitId, String> {
    let Some(r) = git_ref else {
        return mirror
            .resolve(&GitRef::DefaultBranch)
            .map_err(|e| format!("its default branch cannot be read: {e}"));
    };
    let mut candidates = Vec::new();
    if is_commit_id(r) {
        candidates.push(GitRef::Commit(r.to_owned()));
    }
    match (r.strip_prefix("refs/tags/"), r.strip_prefix("refs/heads/")) {
        (Some(tag), _) => candidates.push(GitRef::Tag(tag.to_owned())),
        (_, Some(branch)) => candidates.push(GitRef::Branch(branch.to_owned())),
        _ => candidates.extend([GitRef::Tag(r.to_owned()), GitRef::Branch(r.to_owned())]),
    }
    candidates
        .iter()
        .find_map(|c| mirror.resolve(c).ok())
        .ok_or_else(|| {
            format!(
                "the repository has no tag, branch or commit {r} (kas reads tags, branches and full commit ids)"
            )
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A fetcher of the repositories `daemon` serves, fetching at most once per `interval`,
    /// and the base at `git_ref` of its repository `upstream`.
    fn fetcher(
        root: &std::path::Path,
        daemon: &tether_test_support::GitDaemon,
        interval: Duration,
        git_ref: &str,
    ) -> (BaseFetcher, RemoteBase) {
        let config = RemoteBaseConfig {
            allowed: vec![daemon.url("upstream")],
            cache_dir: Some(root.join("bases")),
            fetch_interval: interval,
            ..RemoteBaseConfig::default()
        };
        let base = RemoteBase {
            repository: daemon.url("upstream"),
            path: String::new(),
            git_ref: Some(git_ref.into()),
        };
        (BaseFetcher::new(&config).unwrap(), base)
    }

    /// A repository under `root/git/upstream` with one commit tagged `v1`.
    fn upstream(root: &std::path::Path) -> tether_test_support::GitRepo {
        let repo = tether_test_support::GitRepo::init(&root.join("git").join("upstream"));
        repo.commit(
            &[("kustomization.yaml", Some(b"resources: []\n"))],
            "a base",
        );
        repo.git(&["tag", "v1"]);
        repo
    }

    fn counted(f: &BaseFetcher, outcome: &'static str) -> u64 {
        f.metrics()
            .fetches
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_resolutions_of_one_repository_share_one_fetch() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = upstream(tmp.path());
        let daemon = tether_test_support::GitDaemon::start(&tmp.path().join("git"));
        let (f, base) = fetcher(tmp.path(), &daemon, Duration::ZERO, "v1");
        let (a, b) = tokio::join!(f.resolve(&base), f.resolve(&base));
        let head = repo.head();
        assert_eq!(a.unwrap().commit.to_hex(), head);
        assert_eq!(b.unwrap().commit.to_hex(), head);
        assert_eq!((counted(&f, "fetched"), counted(&f, "reused")), (1, 1));
        // Asked after that fetch ended, with no interval: fetched again.
        f.resolve(&base).await.unwrap();
        assert_eq!(counted(&f, "fetched"), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repository_is_not_fetched_again_within_the_interval_unless_a_ref_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = upstream(tmp.path());
        let daemon = tether_test_support::GitDaemon::start(&tmp.path().join("git"));
        let (f, base) = fetcher(tmp.path(), &daemon, Duration::from_secs(3600), "v1");
        f.resolve(&base).await.unwrap();
        f.resolve(&base).await.unwrap();
        assert_eq!((counted(&f, "fetched"), counted(&f, "reused")), (1, 1));
        let v2 = repo.commit(&[("extra.yaml", Some(b"{}\n"))], "more");
        repo.git(&["tag", "v2"]);
        let newer = RemoteBase {
            git_ref: Some("v2".into()),
            ..base
        };
        let got = f.resolve(&newer).await.unwrap();
        assert_eq!(
            got.commit.to_hex(),
            v2,
            "a tag the mirror lacks is fetched at once"
        );
        assert_eq!(counted(&f, "fetched"), 2);
    }

    #[test]
    fn a_fetch_is_reused_within_the_interval_or_when_it_ended_while_the_resolution_waited() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let minute = s(60);
        // Ended 10 s before the resolution asked, which is now: within the interval.
        assert!(reusable(t0, t0 + s(10), t0 + s(10), minute));
        // Ended 61 s ago: fetched again.
        assert!(!reusable(t0, t0 + s(61), t0 + s(61), minute));
        // Ended while the resolution waited for the repository: shared, even with no interval.
        assert!(reusable(t0 + s(5), t0 + s(1), t0 + s(5), Duration::ZERO));
        // Ended before it asked, no interval: fetched again.
        assert!(!reusable(t0, t0 + s(1), t0 + s(1), Duration::ZERO));
    }

    #[test]
    fn only_an_unreachable_repository_or_a_failed_transfer_lets_a_held_commit_stand_in() {
        let (remote, detail) = ("git://example.com/r".to_owned(), "x".to_owned());
        let fetch = |f| GitError::Fetch(f);
        let falls_back = [
            fetch(FetchError::Unreachable {
                remote: remote.clone(),
                detail: detail.clone(),
            }),
            fetch(FetchError::Other {
                remote: remote.clone(),
                detail: detail.clone(),
            }),
            GitError::Task("cancelled".into()),
        ];
        for e in &falls_back {
            assert!(may_fall_back(e), "{e}");
        }
        let fails = [
            fetch(FetchError::Auth {
                remote: remote.clone(),
                detail: detail.clone(),
            }),
            fetch(FetchError::NotARepository { remote, detail }),
            GitError::NotFound("v1".into()),
        ];
        for e in &fails {
            assert!(!may_fall_back(e), "{e}");
        }
    }

    #[test]
    fn the_stale_warning_names_the_repository_ref_commit_outage_and_error() {
        let commit = CommitId::from_hex(&"ab".repeat(20)).unwrap();
        let stale = StaleBase {
            repository: "https://github.com/org/infra.git".into(),
            git_ref: Some("v1.2.3".into()),
            commit,
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(86_400),
            error: "cannot reach github.com".into(),
        };
        let w = stale.warning();
        for part in [
            "https://github.com/org/infra.git unreachable since 1970-01-02T00:00:00Z",
            "v1.2.3 rendered at commit ",
            &"ab".repeat(20),
            "(cannot reach github.com)",
        ] {
            assert!(w.contains(part), "{part:?} not in {w:?}");
        }
        let default = StaleBase {
            git_ref: None,
            ..stale
        };
        assert!(default.warning().contains("its default branch rendered"));
    }
}
