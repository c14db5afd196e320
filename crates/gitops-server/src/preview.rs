//! The files of one manifest project entry at a ref, for a preview (`kas agent diff`): the
//! same selection the GitOps stream sends an agent, at a ref the agent does not follow (yet).

use std::time::Duration;

use tether_git_source::{CommitId, Error as GitError, GitRef, Mirror, Sources};
use tether_store::{Project, Store};

use crate::render::{ManifestSource, Renderer};
use crate::select::{Limits, ManifestFile, SelectError, manifests_at};

/// A manifest project's files at a commit.
#[derive(Debug, Clone)]
pub struct PreviewFiles {
    pub project: Project,
    pub commit: CommitId,
    pub files: Vec<ManifestFile>,
    /// As [`crate::Selection::warnings`].
    pub warnings: Vec<String>,
}

/// Why a project's files at a ref could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("manifest project {0} is not known to kas")]
    UnknownProject(String),
    #[error("manifest project {0} has no Git repository configured")]
    NoRepository(String),
    #[error("manifest project {0} has not been fetched yet")]
    NotFetched(String),
    #[error("looking the manifest project up: {0}")]
    Store(#[from] tether_store::Error),
    #[error("{project} has no branch, tag or commit {git_ref}: {source}")]
    Ref {
        project: String,
        git_ref: String,
        source: GitError,
    },
    /// The project takes signed commits only and this one would be refused.
    #[error("commit {commit} of {project} would not be applied: {reason}")]
    Refused {
        project: String,
        commit: String,
        reason: String,
    },
    #[error("selecting the manifest files of {project}: {source}")]
    Select {
        project: String,
        /// The commit the ref resolved to, whose files could not be selected.
        commit: String,
        source: SelectError,
    },
}

impl PreviewError {
    /// The commit the ref resolved to when the failure came after resolving it (its signature
    /// refused, its files not selectable), so the preview can name what was tried.
    pub fn commit(&self) -> Option<&str> {
        match self {
            Self::Refused { commit, .. } | Self::Select { commit, .. } => Some(commit),
            _ => None,
        }
    }
}

/// The refs a `--ref` may name, in the order they are tried: 40 hexadecimal digits are a
/// commit; anything else a branch, else a tag.
pub fn ref_candidates(text: &str) -> Vec<GitRef> {
    let text = text.trim();
    if text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return vec![GitRef::Commit(text.to_ascii_lowercase())];
    }
    let short = text.strip_prefix("refs/heads/").unwrap_or(text);
    if let Some(tag) = text.strip_prefix("refs/tags/") {
        return vec![GitRef::Tag(tag.to_owned())];
    }
    vec![
        GitRef::Branch(short.to_owned()),
        GitRef::Tag(short.to_owned()),
    ]
}

/// The first of `candidates` the mirror has; the error of the first one otherwise.
fn resolve_first(mirror: &Mirror, candidates: &[GitRef]) -> Result<CommitId, GitError> {
    let mut first = None;
    for r in candidates {
        match mirror.resolve(r) {
            Ok(c) => return Ok(c),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| GitError::NotFound("no ref given".to_owned())))
}

/// Where and how to read a project for a preview.
#[derive(Debug)]
pub struct PreviewSource<'a> {
    /// The agent previewed: its renderings take its turns, as its stream's do.
    pub agent_id: i64,
    pub store: &'a dyn Store,
    pub sources: &'a Sources,
    pub limits: &'a Limits,
    /// Renders Kustomize and Helm projects, as for the stream.
    pub renderer: &'a Renderer,
    /// How long to wait for the fetch asked for first (so a branch pushed a moment ago is
    /// seen); the mirror as it is is used after that.
    pub fetch_wait: Duration,
}

impl PreviewSource<'_> {
    /// The files of the manifest project `project_id` (path or numeric id, as in the agent's
    /// configuration) from `manifests` (selected by glob or rendered) at the first of
    /// `candidates` the repository has, as the GitOps stream would send them to the agent.
    pub async fn files_at(
        &self,
        project_id: &str,
        candidates: &[GitRef],
        manifests: &ManifestSource,
    ) -> Result<PreviewFiles, PreviewError> {
        let project = self.project(project_id).await?;
        self.refresh(project.id).await;
        let mirror = self
            .sources
            .mirror(project.id)
            .ok_or_else(|| PreviewError::NotFetched(project.path.clone()))?;
        let commit = resolve_first(&mirror, candidates).map_err(|source| PreviewError::Ref {
            project: project.path.clone(),
            git_ref: describe(candidates),
            source,
        })?;
        if let Err(refusal) = self.sources.verify(project.id, commit).await {
            return Err(PreviewError::Refused {
                project: project.path,
                commit: commit.to_hex(),
                reason: refusal.reason,
            });
        }
        let selection = manifests_at(
            self.agent_id,
            &mirror,
            commit,
            manifests,
            self.limits,
            self.renderer,
        )
        .await
        .map_err(|source| PreviewError::Select {
            project: project.path.clone(),
            commit: commit.to_hex(),
            source,
        })?;
        Ok(PreviewFiles {
            project,
            commit,
            files: selection.files,
            warnings: selection.warnings,
        })
    }

    async fn project(&self, id: &str) -> Result<Project, PreviewError> {
        let found = match id.parse::<i64>() {
            Ok(n) => self.store.get_project(n).await?,
            Err(_) => self.store.get_project_by_path(id).await?,
        };
        let project = found.ok_or_else(|| PreviewError::UnknownProject(id.to_owned()))?;
        if project.remote.is_none() {
            return Err(PreviewError::NoRepository(project.path));
        }
        Ok(project)
    }

    /// Asks for a fetch now and waits (bounded) until one ended, successful or not.
    async fn refresh(&self, id: i64) {
        let mut heads = self.sources.watch(id);
        let ended = |h: &tether_git_source::ProjectHead| h.fetches + h.failures;
        let before = ended(&heads.borrow_and_update());
        if self.sources.trigger(id) {
            let wait = heads.wait_for(|h| ended(h) > before);
            // Timing out is not an error: the mirror as it is still has the commits it had.
            let _ = tokio::time::timeout(self.fetch_wait, wait).await;
        }
    }
}

/// The `--ref` as the user wrote it, for messages.
fn describe(candidates: &[GitRef]) -> String {
    match candidates.first() {
        Some(GitRef::Branch(n) | GitRef::Tag(n) | GitRef::Commit(n)) => n.clone(),
        Some(GitRef::DefaultBranch) => "the default branch".to_owned(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ref_is_a_commit_a_branch_or_a_tag() {
        let hex = "0123456789abcdef0123456789ABCDEF01234567";
        assert_eq!(
            ref_candidates(hex),
            vec![GitRef::Commit(hex.to_ascii_lowercase())]
        );
        assert_eq!(
            ref_candidates("feature/x"),
            vec![
                GitRef::Branch("feature/x".into()),
                GitRef::Tag("feature/x".into())
            ]
        );
        assert_eq!(
            ref_candidates("refs/heads/main"),
            vec![GitRef::Branch("main".into()), GitRef::Tag("main".into())]
        );
        assert_eq!(
            ref_candidates("refs/tags/v1"),
            vec![GitRef::Tag("v1".into())]
        );
        // Not 40 digits: a branch may be named like a short commit.
        assert_eq!(ref_candidates("abc123")[0], GitRef::Branch("abc123".into()));
    }
}
