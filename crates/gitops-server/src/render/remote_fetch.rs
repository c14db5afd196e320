//! Fetching the Git repositories of allowed remote Kustomize bases (see [`super::remote_bases`])
//! into mirrors of their own, with the Git client kas reads manifest projects with: its
//! timeouts, its isolation from the host's Git configuration, no credentials. I/O.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tether_git_source::{CommitId, GitRef, Mirror, Remote};

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
    /// Most levels of remote bases naming remote bases in turn.
    pub max_depth: usize,
}

impl Default for RemoteBaseConfig {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            cache_dir: None,
            fetch_timeout: Duration::from_secs(120),
            max_depth: 5,
        }
    }
}

/// Fetches remote bases' repositories; one per kas.
#[derive(Debug)]
pub struct BaseFetcher {
    allow: AllowList,
    dir: PathBuf,
    timeout: Duration,
    /// See [`RemoteBaseConfig::max_depth`].
    pub max_depth: usize,
    /// One mirror per repository URL: a `Mirror` serialises its own fetches.
    mirrors: Mutex<HashMap<String, Mirror>>,
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
            max_depth: config.max_depth,
            mirrors: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the base's repository is allowed.
    pub fn allows(&self, base: &RemoteBase) -> bool {
        self.allow.allows(&base.repository)
    }

    /// The commit the base's ref names now, and the mirror holding it: the repository is
    /// fetched first, unless the ref is a full commit id the mirror already holds (which no
    /// fetch can change). A branch is so read anew at every rendering. The error says why,
    /// for a message naming the kustomization and the reference.
    pub async fn resolve(&self, base: &RemoteBase) -> Result<(Mirror, CommitId), String> {
        let mirror = self.mirror(&base.repository)?;
        let pinned = base.git_ref.as_deref().filter(|r| is_commit_id(r));
        if let Some(hex) = pinned
            && let Ok(id) = mirror.resolve(&GitRef::Commit(hex.to_owned()))
        {
            return Ok((mirror, id));
        }
        mirror
            .fetch_async_within(self.timeout)
            .await
            .map_err(|e| format!("fetching {} failed: {e}", base.repository))?;
        // Repacks once fetches piled packs up, as after a manifest project's fetch; apart from
        // the rendering, which need not wait for it.
        let maintained = mirror.clone();
        tokio::spawn(async move { maintained.maintain_async().await });
        let id = resolve_ref(&mirror, base.git_ref.as_deref())?;
        Ok((mirror, id))
    }

    /// The repository's mirror, opened (or created) at its first use.
    fn mirror(&self, repository: &str) -> Result<Mirror, String> {
        let mut mirrors = self
            .mirrors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = mirrors.get(repository) {
            return Ok(m.clone());
        }
        let remote = Remote::parse(repository).map_err(|e| e.to_string())?;
        let dir = self.dir.join(mirror_name(repository));
        let mirror = Mirror::open_or_init(&dir, remote)
            .map_err(|e| format!("opening kas's copy of {repository}: {e}"))?;
        mirrors.insert(repository.to_owned(), mirror.clone());
        Ok(mirror)
    }
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
