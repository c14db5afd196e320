//! Selecting the manifest files of a manifest project at a commit.

use std::collections::{BTreeMap, HashMap};

use tether_git_source::{CommitId, Error as GitError, FileEntry, Mirror};

use crate::glob::{InvalidGlob, ManifestGlob};
use crate::render::{ManifestSource, RenderError, RenderSpec, Rendered, Renderer, unstable};

/// Bounds on what one manifest project may select; the defaults are upstream's.
///
/// They protect kas (memory, tree walks) and the agent (apply size) from a repository that grew
/// past what GitOps is meant for; exceeding one is a user error, not an outage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest single manifest file, in bytes.
    pub max_file_size: u64,
    /// Largest sum of the selected files' sizes for one project, in bytes.
    pub max_total_size: u64,
    /// Most `paths` (globs) per project: each is a separate tree walk.
    pub max_paths: usize,
    /// Most tree entries (files, directories, symlinks, submodules) one glob's listing may
    /// visit. Per listing, not per project: globs sharing a literal prefix share one listing,
    /// so the walk of a whole project is at most `max_paths` times this.
    pub max_visited_entries: usize,
    /// Most files the project may select across all its globs.
    pub max_files: usize,
}

impl Limits {
    /// Upstream: 5 MiB per file.
    pub const DEFAULT_MAX_FILE_SIZE: u64 = 5 << 20;
    /// Upstream: 20 MiB per project.
    pub const DEFAULT_MAX_TOTAL_SIZE: u64 = 20 << 20;
    /// Upstream: 100 paths per project (also checked when the agent config is validated).
    pub const DEFAULT_MAX_PATHS: usize = 100;
    /// Upstream: 1000 files visited.
    pub const DEFAULT_MAX_VISITED_ENTRIES: usize = 1000;
    /// Not an upstream limit (upstream only bounded visits); as many as can be visited.
    pub const DEFAULT_MAX_FILES: usize = 1000;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_size: Self::DEFAULT_MAX_FILE_SIZE,
            max_total_size: Self::DEFAULT_MAX_TOTAL_SIZE,
            max_paths: Self::DEFAULT_MAX_PATHS,
            max_visited_entries: Self::DEFAULT_MAX_VISITED_ENTRIES,
            max_files: Self::DEFAULT_MAX_FILES,
        }
    }
}

/// One selected manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Path from the repository root, `/`-separated, no leading `/`.
    pub path: String,
    /// The file's content.
    pub bytes: Vec<u8>,
}

/// The manifest files of one project at one commit, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The commit the files were read from.
    pub commit: CommitId,
    /// The selected files, sorted by path, each once.
    pub files: Vec<ManifestFile>,
    /// What the user should know although nothing failed: symlinks a glob matched (skipped),
    /// or globs that matched nothing (agentk refuses the commit, or prunes everything the
    /// project applied before when its entry sets `allow_empty`).
    pub warnings: Vec<String>,
    /// The version of the chart of a `helm.repository` entry rendered; "" for other entries.
    pub chart_version: String,
}

impl Selection {
    /// Sum of the files' sizes in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.bytes.len() as u64).sum()
    }
}

/// Why a selection failed.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// A glob does not compile.
    #[error(transparent)]
    InvalidGlob(#[from] InvalidGlob),
    /// More globs than allowed.
    #[error("{count} paths are configured for the manifest project, at most {limit} are allowed")]
    TooManyPaths {
        /// Configured globs.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// Listing for a glob visited too many tree entries.
    #[error(
        "glob {glob:?} makes kas walk more than {limit} entries under {dir}; use a narrower glob (with a longer literal directory prefix)",
        dir = display_dir(prefix)
    )]
    TooManyEntries {
        /// The glob.
        glob: String,
        /// The directory that was listed (its literal prefix).
        prefix: String,
        /// The limit.
        limit: usize,
    },
    /// A selected file is over the per-file limit.
    #[error("manifest file {path} is {size} bytes, over the limit of {limit} bytes per file")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The selected files together are over the per-project limit.
    #[error(
        "the selected manifest files total more than {limit} bytes (at least {size}), over the limit per project"
    )]
    TotalTooLarge {
        /// The total size counted when the limit was crossed (a lower bound of the full total).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// More files selected than allowed.
    #[error("the globs select more than {limit} manifest files (at least {count})")]
    TooManyFiles {
        /// Files counted when the limit was crossed (a lower bound of the full count).
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// One file is selected by two globs; upstream refuses this because the file would be
    /// applied twice, and which glob "owns" it is ambiguous.
    #[error("manifest file {path} is matched by two globs: {first:?} and {second:?}")]
    MatchedByTwoGlobs {
        /// The file.
        path: String,
        /// The first glob (in configuration order) that matched it.
        first: String,
        /// A later glob that matched it too.
        second: String,
    },
    /// A glob could select files inside a submodule, which kas does not fetch.
    #[error(
        "glob {glob:?} covers {path}, a Git submodule: kas does not fetch submodules, so its files would be missing (and objects applied from them pruned): refused, nothing was applied; commit the files into this repository, make the submodule's repository a manifest project of its own, or narrow the glob to leave {path} out"
    )]
    Submodule {
        /// The submodule's path.
        path: String,
        /// The glob.
        glob: String,
    },
    /// Rendering (Kustomize, Helm) failed or was refused.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Reading the mirror failed.
    #[error(transparent)]
    Git(GitError),
}

impl SelectError {
    /// Whether the error comes from the repository contents or the configuration, so it is
    /// reported to the user as theirs to fix rather than retried as an outage.
    pub fn is_user_error(&self) -> bool {
        match self {
            SelectError::InvalidGlob(_)
            | SelectError::TooManyPaths { .. }
            | SelectError::TooManyEntries { .. }
            | SelectError::FileTooLarge { .. }
            | SelectError::TotalTooLarge { .. }
            | SelectError::TooManyFiles { .. }
            | SelectError::MatchedByTwoGlobs { .. }
            | SelectError::Submodule { .. } => true,
            SelectError::Render(e) => e.is_user_error(),
            // A tree Git itself would refuse is the repository's doing; anything else of Git's
            // is kas's or its disk's.
            SelectError::Git(e) => matches!(e, GitError::InvalidTreeEntry { .. }),
        }
    }
}

fn display_dir(prefix: &str) -> String {
    if prefix.is_empty() {
        "the repository root".to_owned()
    } else {
        format!("{prefix:?}")
    }
}

/// The manifests of a project at `commit`: what the GitOps stream sends (and what a preview
/// of a ref compares). Plain files are selected by glob ([`select_manifests`]); a Kustomize
/// directory or a Helm chart is rendered in the sandbox (one file named after the command,
/// `kustomize build overlays/prod`, holding the whole YAML stream), in one of `agent_id`'s
/// turns to render.
pub async fn manifests_at(
    agent_id: i64,
    mirror: &Mirror,
    commit: CommitId,
    source: &ManifestSource,
    limits: &Limits,
    renderer: &Renderer,
) -> Result<Selection, SelectError> {
    let spec = match source {
        ManifestSource::Globs(globs) => {
            let (m, g, l) = (mirror.clone(), globs.clone(), limits.clone());
            return tokio::task::spawn_blocking(move || select_manifests(&m, &commit, &g, &l))
                .await
                .map_err(|e| {
                    SelectError::Render(RenderError::Io(format!("selection task: {e}")))
                })?;
        }
        ManifestSource::Render(spec) => spec,
    };
    let output = renderer.render(agent_id, mirror, commit, spec).await?;
    let rendered = &output.rendered;
    let mut warnings = unstable_warnings(spec, rendered)?;
    warnings.extend(output.warnings.iter().cloned());
    let bytes = &rendered.bytes;
    let label = rendered.label(spec);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        warnings.push(selects_nothing(&format!("{label} rendered nothing")));
    }
    let mut files = vec![ManifestFile {
        path: label,
        bytes: bytes.to_vec(),
    }];
    files.extend(created_namespace(spec, bytes));
    Ok(Selection {
        commit,
        files,
        warnings,
        chart_version: rendered
            .chart
            .as_ref()
            .map(|c| c.version.clone())
            .unwrap_or_default(),
    })
}

/// `helm.create_namespace`: the release's Namespace, as a file of its own after the chart's
/// output (agentk applies Namespaces first, whatever their place).
fn created_namespace(spec: &RenderSpec, rendered: &[u8]) -> Option<ManifestFile> {
    let RenderSpec::Helm(h) = spec else {
        return None;
    };
    if !h.create_namespace {
        return None;
    }
    let yaml = crate::render::namespace::namespace_to_add(
        &String::from_utf8_lossy(rendered),
        &h.namespace,
    )?;
    Some(ManifestFile {
        path: crate::render::namespace::SOURCE.to_owned(),
        bytes: yaml.into_bytes(),
    })
}

/// The warning about a commit that selects no object, true whatever agentk then does: kas does
/// not know the entry's `allow_empty`, and agentk refuses such a commit without it, so a
/// warning that everything "is pruned" contradicted the refusal shown next to it.
fn selects_nothing(what: &str) -> String {
    format!(
        "{what} at this commit: it selects no object, and agentk prunes every object this project applied before for it only if the entry sets allow_empty: true"
    )
}

/// What a chart rendering differently at every rendering means for `spec`: refused
/// ([`RenderError::Unstable`]) unless its entry accepts it (`helm.random: apply`), then a
/// warning; and warnings for its other `lookup` calls.
fn unstable_warnings(spec: &RenderSpec, rendered: &Rendered) -> Result<Vec<String>, RenderError> {
    let RenderSpec::Helm(h) = spec else {
        return Ok(Vec::new());
    };
    if rendered.unstable.is_empty() {
        let mut warnings = unstable::lookup_warnings(&rendered.calls);
        warnings.extend(unstable::clock_warnings(&rendered.calls));
        return Ok(warnings);
    }
    // Agents send `default_namespace` since `helm.random`; this version's put objects without
    // a namespace in `helm.namespace` (sent always: it defaults to `default_namespace`).
    let lands_in = if h.default_namespace.is_empty() {
        ""
    } else {
        h.namespace.as_str()
    };
    let why = unstable::explain(
        &rendered.label(spec),
        (&h.chart, lands_in),
        &rendered.unstable,
        &rendered.calls,
    );
    // Agents older than `helm.random` send no `default_namespace` either (theirs always has
    // one). They applied such charts before and their users cannot set the key (those agents
    // refuse it): a kas upgrade must not stop their GitOps, so they are warned instead.
    let older_agent = h.default_namespace.is_empty();
    if !h.apply_random && !older_agent {
        return Err(RenderError::Unstable(why));
    }
    let how = if older_agent {
        "applied, as this agent is older than helm.random (upgrade agentk to have it refused)"
    } else {
        "applied anyway (helm.random: apply)"
    };
    Ok(vec![format!(
        "{why}: {how}; set the values the chart generates in helm.values or a values file to keep them"
    )])
}

/// Selects the files of `commit` matched by `globs`, enforcing `limits`.
///
/// Every glob is compiled before any I/O, so a config error is reported even when the repository
/// is unreadable. Each glob lists only its literal prefix (see [`crate::literal_prefix`]); globs
/// with the same prefix share one listing. Sizes come from object headers, so the size limits
/// are enforced before any content is inflated. An empty `globs` selects nothing: substituting
/// the default glob is the configuration's job.
///
/// Blocking (object database reads): from async code run it on the blocking pool.
pub fn select_manifests<S: AsRef<str>>(
    mirror: &Mirror,
    commit: &CommitId,
    globs: &[S],
    limits: &Limits,
) -> Result<Selection, SelectError> {
    let compiled = compile_globs(globs, limits)?;
    let mut matched = Matched::default();
    let mut listings: HashMap<&str, Vec<FileEntry>> = HashMap::new();
    for (index, glob) in compiled.iter().enumerate() {
        let prefix = glob.literal_prefix();
        if !listings.contains_key(prefix) {
            listings.insert(prefix, list_prefix(mirror, commit, glob, limits)?);
        }
        let entries = listings.get(prefix).map(Vec::as_slice).unwrap_or_default();
        for entry in entries {
            if entry.submodule {
                check_submodule(glob, &entry.path)?;
            } else if glob.is_match(&entry.path) {
                matched.add(entry, index, &compiled, limits)?;
            }
        }
    }
    let Matched {
        files,
        mut warnings,
        ..
    } = matched;
    if files.is_empty() {
        let globs: Vec<&str> = compiled.iter().map(ManifestGlob::as_str).collect();
        warnings.push(selects_nothing(&format!("no file matches {globs:?}")));
    }
    Ok(Selection {
        commit: *commit,
        files: read_files(mirror, commit, files.into_keys(), limits)?,
        warnings,
        chart_version: String::new(),
    })
}

/// Compiles every glob (before any I/O), within `max_paths`.
fn compile_globs<S: AsRef<str>>(
    globs: &[S],
    limits: &Limits,
) -> Result<Vec<ManifestGlob>, SelectError> {
    if globs.len() > limits.max_paths {
        return Err(SelectError::TooManyPaths {
            count: globs.len(),
            limit: limits.max_paths,
        });
    }
    Ok(globs
        .iter()
        .map(|g| ManifestGlob::new(g.as_ref()))
        .collect::<Result<Vec<_>, _>>()?)
}

/// The files under `glob`'s literal prefix, within `max_visited_entries`.
fn list_prefix(
    mirror: &Mirror,
    commit: &CommitId,
    glob: &ManifestGlob,
    limits: &Limits,
) -> Result<Vec<FileEntry>, SelectError> {
    let prefix = glob.literal_prefix();
    mirror
        .list_files(commit, prefix, limits.max_visited_entries)
        .map_err(|e| match e {
            GitError::TooManyEntries { limit, .. } => SelectError::TooManyEntries {
                glob: glob.as_str().to_owned(),
                prefix: prefix.to_owned(),
                limit,
            },
            other => SelectError::Git(other),
        })
}

/// Refuses a submodule at `path` whose files `glob` could select: kas does not fetch them, so
/// they would be missing from the commit, and the objects they held before would be pruned
/// (a directory moved into a submodule). A submodule the glob cannot reach inside is nothing
/// missing, and says nothing.
fn check_submodule(glob: &ManifestGlob, path: &str) -> Result<(), SelectError> {
    if glob.is_match(path) || glob.could_match_under(path) {
        return Err(SelectError::Submodule {
            path: path.to_owned(),
            glob: glob.as_str().to_owned(),
        });
    }
    Ok(())
}

/// The files matched so far, within the limits.
#[derive(Default)]
struct Matched {
    /// Path → index of the glob that matched it.
    files: BTreeMap<String, usize>,
    /// Sum of their sizes.
    total: u64,
    warnings: Vec<String>,
}

impl Matched {
    /// Adds a file the glob `compiled[index]` matched.
    fn add(
        &mut self,
        entry: &FileEntry,
        index: usize,
        compiled: &[ManifestGlob],
        limits: &Limits,
    ) -> Result<(), SelectError> {
        let glob = compiled[index].as_str();
        if entry.symlink {
            // Never followed: its target may be outside the repository or the glob.
            self.warnings.push(format!(
                "{} is a symbolic link matched by {glob}: skipped (links are not followed)",
                entry.path
            ));
            return Ok(());
        }
        if let Some(&first) = self.files.get(&entry.path) {
            return Err(SelectError::MatchedByTwoGlobs {
                path: entry.path.clone(),
                first: compiled[first].as_str().to_owned(),
                second: glob.to_owned(),
            });
        }
        if entry.size > limits.max_file_size {
            return Err(SelectError::FileTooLarge {
                path: entry.path.clone(),
                size: entry.size,
                limit: limits.max_file_size,
            });
        }
        self.total = self.total.saturating_add(entry.size);
        if self.total > limits.max_total_size {
            return Err(SelectError::TotalTooLarge {
                size: self.total,
                limit: limits.max_total_size,
            });
        }
        self.files.insert(entry.path.clone(), index);
        if self.files.len() > limits.max_files {
            return Err(SelectError::TooManyFiles {
                count: self.files.len(),
                limit: limits.max_files,
            });
        }
        Ok(())
    }
}

/// Reads the matched files, in the order given (the selection promises sorted paths).
fn read_files(
    mirror: &Mirror,
    commit: &CommitId,
    paths: impl Iterator<Item = String>,
    limits: &Limits,
) -> Result<Vec<ManifestFile>, SelectError> {
    let mut files = Vec::new();
    for path in paths {
        let bytes = match mirror.read_file(commit, &path, limits.max_file_size) {
            Ok(Some(bytes)) => bytes,
            // The listing saw this blob at this (immutable) commit, so it cannot be missing
            // unless the object database is damaged.
            Ok(None) => {
                return Err(SelectError::Git(GitError::NotFound(format!(
                    "file {path} at commit {commit} not found in the mirror"
                ))));
            }
            Err(GitError::TooLarge { path, size, limit }) => {
                return Err(SelectError::FileTooLarge { path, size, limit });
            }
            Err(e) => return Err(SelectError::Git(e)),
        };
        files.push(ManifestFile { path, bytes });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chart rendering differently: refused for an agent that knows `helm.random`, applied
    /// with a warning when it says `apply`, and when the agent is older than the key (it sends
    /// no `default_namespace`): a kas upgrade must not stop those agents' GitOps.
    #[test]
    fn an_unstable_chart_is_refused_unless_accepted_or_the_agent_predates_the_key() {
        let spec = |apply_random, default_namespace: &str| {
            RenderSpec::Helm(Box::new(crate::render::spec::HelmSpec {
                chart: "charts/app".into(),
                repository: String::new(),
                version: String::new(),
                release_name: "web".into(),
                namespace: "prod".into(),
                values_files: vec![],
                values_json: String::new(),
                kube_version: String::new(),
                api_versions: vec![],
                apply_random,
                default_namespace: default_namespace.into(),
                create_namespace: false,
            }))
        };
        let rendered = Rendered {
            bytes: Vec::new(),
            unstable: vec![unstable::Unstable {
                source: "app/templates/secret.yaml".into(),
                kind: "Secret".into(),
                namespace: None,
                name: "db".into(),
            }],
            calls: vec![(
                "charts/app/templates/secret.yaml".into(),
                vec!["randAlphaNum"],
            )],
            chart: None,
        };
        let refused = unstable_warnings(&spec(false, "prod"), &rendered);
        assert!(
            matches!(refused, Err(RenderError::Unstable(_))),
            "{refused:?}"
        );
        let accepted = unstable_warnings(&spec(true, "prod"), &rendered).expect("accepted");
        assert!(accepted[0].contains("helm.random: apply"), "{accepted:?}");
        let older = unstable_warnings(&spec(false, ""), &rendered).expect("older agent");
        assert!(older[0].contains("older than helm.random"), "{older:?}");
    }

    #[test]
    fn user_errors() {
        let user = [
            SelectError::TooManyPaths { count: 2, limit: 1 },
            SelectError::FileTooLarge {
                path: "a".into(),
                size: 2,
                limit: 1,
            },
            SelectError::MatchedByTwoGlobs {
                path: "a".into(),
                first: "*".into(),
                second: "a".into(),
            },
        ];
        assert!(user.iter().all(SelectError::is_user_error));
        assert!(!SelectError::Git(GitError::NotFound("x".into())).is_user_error());
    }

    #[test]
    fn defaults_are_upstreams() {
        let l = Limits::default();
        assert_eq!(l.max_file_size, 5 * 1024 * 1024);
        assert_eq!(l.max_total_size, 20 * 1024 * 1024);
        assert_eq!(l.max_paths, 100);
        assert_eq!(l.max_visited_entries, 1000);
    }
}
