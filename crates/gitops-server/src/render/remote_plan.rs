//! The remote bases of one Kustomize rendering: found in the kustomizations the entry's path
//! reaches, allowed, fetched and resolved (bases naming bases in turn, to a depth bound), and
//! what the checkout needs to hold them: each repository's commit in a folder of its own (a
//! graft), and copies of the kustomizations naming those folders instead of the URLs. Before
//! the rendering's cache key, which holds the commits resolved.

use std::collections::{BTreeMap, BTreeSet};

use tether_git_source::{CommitId, Mirror};

use super::RenderError;
use super::checks::{self, RemoteRef};
use super::remote_bases::{self, NotABase, RemoteBase};
use super::remote_fetch::{BaseFetcher, StaleBase};

/// A remote base's repository at the commit resolved, and where it goes in the checkout.
#[derive(Debug, Clone)]
pub struct Graft {
    /// The checkout folder (see [`remote_bases::materialized_root`]).
    pub root: String,
    /// The repository's URL.
    pub repository: String,
    /// Its mirror.
    pub mirror: Mirror,
    /// The commit the base's ref resolved to.
    pub commit: CommitId,
}

/// What a rendering's remote bases add to its checkout.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The repositories, one per (repository, commit), sorted by folder.
    pub grafts: Vec<Graft>,
    /// Kustomizations whose copy names local folders instead of remote bases: checkout path,
    /// new text.
    pub rewritten: BTreeMap<String, String>,
    /// Bases rendered at a commit held from an earlier fetch, their repository unreachable
    /// (see [`StaleBase::warning`]); not part of the key: the same rendering is fresh again
    /// once the repository answers.
    pub warnings: Vec<String>,
}

impl Plan {
    /// What the rendering depends on besides the commit: each repository's resolved commit.
    pub fn key(&self) -> Vec<(String, CommitId)> {
        self.grafts
            .iter()
            .map(|g| (g.repository.clone(), g.commit))
            .collect()
    }
}

/// Where kustomizations are read: the manifest project's commit, or a graft.
#[derive(Clone)]
struct Site {
    mirror: Mirror,
    commit: CommitId,
    /// The checkout folder (`""`: the manifest project's own files).
    root: String,
    /// How its files are named in messages (`None`: by their path alone).
    label: Option<String>,
}

/// The plan for rendering `start` of `commit` (kustomizations read up to `max_size` bytes);
/// with no fetcher, any remote base is refused naming `gitops.render.remote_bases`.
pub async fn plan(
    fetcher: Option<&BaseFetcher>,
    mirror: &Mirror,
    commit: CommitId,
    start: &str,
    max_size: u64,
) -> Result<Plan, RenderError> {
    let main = Site {
        mirror: mirror.clone(),
        commit,
        root: String::new(),
        label: None,
    };
    let mut plan = Plan::default();
    let mut scanned = BTreeSet::new();
    let mut todo = vec![(main, start.trim_matches('/').to_owned(), 0)];
    while let Some((site, start, depth)) = todo.pop() {
        if !scanned.insert((site.root.clone(), start.clone())) {
            continue;
        }
        let found = scan(&site, &start, max_size).await?;
        let mut replaced: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for r in found {
            let (base, fetcher) = allowed_base(fetcher, &site, &r, depth)?;
            let resolved =
                fetcher
                    .resolve(&base)
                    .await
                    .map_err(|detail| RenderError::RemoteBaseFailed {
                        file: named(&site, &r.file),
                        reference: r.reference.clone(),
                        detail,
                    })?;
            let (m, id) = (resolved.mirror, resolved.commit);
            plan.warnings
                .extend(resolved.stale.as_ref().map(StaleBase::warning));
            let root = remote_bases::materialized_root(&base.repository, &id.to_hex());
            let file_dir = r.file.rsplit_once('/').map_or("", |(d, _)| d);
            let local =
                remote_bases::relative_path(&join(&site.root, file_dir), &join(&root, &base.path));
            replaced
                .entry(r.file.clone())
                .or_default()
                .push((r.reference.clone(), local));
            let graft = Site {
                mirror: m.clone(),
                commit: id,
                root: root.clone(),
                label: Some(format!(
                    "{} at {}",
                    base.repository,
                    base.git_ref.as_deref().unwrap_or("its default branch")
                )),
            };
            if !plan.grafts.iter().any(|g| g.root == root) {
                plan.grafts.push(Graft {
                    root,
                    repository: base.repository.clone(),
                    mirror: m,
                    commit: id,
                });
            }
            todo.push((graft, base.path, depth + 1));
        }
        for (file, pairs) in replaced {
            let text = read(&site, &file, max_size).await?.unwrap_or_default();
            let new = remote_bases::rewrite_kustomization(&text, &pairs).map_err(|message| {
                RenderError::Failed {
                    tool: super::Tool::Kustomize,
                    message: format!("{}: {message}", named(&site, &file)),
                }
            })?;
            plan.rewritten.insert(join(&site.root, &file), new);
        }
    }
    plan.grafts.sort_by(|a, b| a.root.cmp(&b.root));
    plan.warnings.sort();
    plan.warnings.dedup();
    Ok(plan)
}

/// The base `r` names, refused unless it is a Git repository the fetcher allows within the
/// depth bound.
fn allowed_base<'f>(
    fetcher: Option<&'f BaseFetcher>,
    site: &Site,
    r: &RemoteRef,
    depth: usize,
) -> Result<(RemoteBase, &'f BaseFetcher), RenderError> {
    let refused = |detail: String| RenderError::RemoteBaseRefused {
        file: named(site, &r.file),
        reference: r.reference.clone(),
        detail,
    };
    let base = match remote_bases::parse(&r.reference) {
        Ok(b) => b,
        Err(NotABase::RemoteFile) => {
            return Err(refused(
                "it is a file Kustomize would download over HTTP, and kas fetches only Git repositories".into(),
            ));
        }
        Err(NotABase::Invalid(why)) => return Err(refused(why)),
    };
    match fetcher {
        Some(f) if f.allows(&base) && depth >= f.max_depth => Err(refused(format!(
            "remote bases nest more than {} deep",
            f.max_depth
        ))),
        Some(f) if f.allows(&base) => Ok((base, f)),
        _ => Err(RenderError::RemoteBaseNotAllowed {
            file: named(site, &r.file),
            reference: r.reference.clone(),
            repository: base.repository,
        }),
    }
}

/// The remote bases the kustomizations of `site` reachable from `start` name, after the
/// checks of [`checks::remote_bases_named`]; a graft's `start` must hold a kustomization.
async fn scan(site: &Site, start: &str, max_size: u64) -> Result<Vec<RemoteRef>, RenderError> {
    let (s, from) = (site.clone(), start.to_owned());
    let found = tokio::task::spawn_blocking(move || {
        let read = |p: &str| read_blocking(&s, p, max_size).ok().flatten();
        let has_kustomization = checks::KUSTOMIZATION_FILES
            .iter()
            .any(|n| read(&join(&from, n)).is_some());
        if s.label.is_some() && !has_kustomization {
            return Err(RenderError::Failed {
                tool: super::Tool::Kustomize,
                message: format!(
                    "{} holds no kustomization (kustomization.yaml, kustomization.yml or Kustomization)",
                    named(&s, if from.is_empty() { "." } else { &from })
                ),
            });
        }
        checks::remote_bases_named(&from, read).map_err(|e| in_site(e, &s))
    })
    .await
    .map_err(|e| RenderError::Io(format!("reading kustomizations: {e}")))??;
    Ok(found)
}

/// The text of `path` in the site (`None`: no such file).
async fn read(site: &Site, path: &str, max_size: u64) -> Result<Option<String>, RenderError> {
    let (s, p) = (site.clone(), path.to_owned());
    tokio::task::spawn_blocking(move || read_blocking(&s, &p, max_size))
        .await
        .map_err(|e| RenderError::Io(format!("reading {path}: {e}")))?
}

fn read_blocking(site: &Site, path: &str, max_size: u64) -> Result<Option<String>, RenderError> {
    let bytes = site
        .mirror
        .read_file(&site.commit, path, max_size)
        .map_err(|e| RenderError::Io(format!("reading {}: {e}", named(site, path))))?;
    Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// `path` of the site as a message names it: a graft's files with their repository and ref.
fn named(site: &Site, path: &str) -> String {
    match &site.label {
        Some(label) => format!("{path} of {label}"),
        None => path.to_owned(),
    }
}

/// A check's error in a graft, naming the graft's files with their repository.
fn in_site(e: RenderError, site: &Site) -> RenderError {
    let name = |file: String| named(site, &file);
    match e {
        RenderError::RemoteReference { file, reference } => RenderError::RemoteReference {
            file: name(file),
            reference,
        },
        RenderError::LeavesRepository { file, reference } => RenderError::LeavesRepository {
            file: name(file),
            reference,
        },
        RenderError::AmbiguousKey { file, key } => RenderError::AmbiguousKey {
            file: name(file),
            key,
        },
        RenderError::HelmChartsInKustomization { file } => {
            RenderError::HelmChartsInKustomization { file: name(file) }
        }
        RenderError::Failed { tool, message } => RenderError::Failed {
            tool,
            message: format!("{message} (in {})", named(site, ".")),
        },
        other => other,
    }
}

/// `dir/path`, either may be empty.
fn join(dir: &str, path: &str) -> String {
    match (dir.is_empty(), path.is_empty()) {
        (true, _) => path.to_owned(),
        (_, true) => dir.to_owned(),
        _ => format!("{dir}/{path}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;

    use tether_git_source::{GitRef, Remote};
    use tether_test_support::{GitDaemon, GitRepo};

    use super::*;
    use crate::render::remote_fetch::RemoteBaseConfig;

    /// A repository under `root/git/<name>` holding `files`, committed and tagged `v1`.
    fn repo(root: &Path, name: &str, files: &[(&str, &str)]) -> GitRepo {
        let r = GitRepo::init(&root.join("git").join(name));
        let files: Vec<(&str, Option<&[u8]>)> = files
            .iter()
            .map(|(p, t)| (*p, Some(t.as_bytes())))
            .collect();
        r.commit(&files, "files");
        r.git(&["tag", "v1"]);
        r
    }

    /// The plan for `app` of `project`'s head, fetching bases allowed under `allowed`, nested
    /// at most `depth` deep.
    async fn plan_of(
        root: &Path,
        project: &GitRepo,
        allowed: &str,
        depth: usize,
    ) -> Result<Plan, RenderError> {
        let mirror =
            Mirror::open_or_init(root.join("mirror"), Remote::local(&project.dir)).unwrap();
        mirror.fetch_async().await.unwrap();
        let commit = mirror.resolve(&GitRef::Branch("main".into())).unwrap();
        let fetcher = BaseFetcher::new(&RemoteBaseConfig {
            allowed: vec![allowed.into()],
            cache_dir: Some(root.join("bases")),
            max_depth: depth,
            ..RemoteBaseConfig::default()
        });
        plan(fetcher.as_ref(), &mirror, commit, "app", 1 << 20).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nested_bases_are_fetched_and_every_kustomization_names_them_locally() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("git")).unwrap();
        let daemon = GitDaemon::start(&tmp.path().join("git"));
        let inner = daemon.url("inner");
        repo(
            tmp.path(),
            "inner",
            &[("base/kustomization.yaml", "resources:\n- cm.yaml\n")],
        );
        let outer_base = format!("resources:\n- {inner}//base?ref=v1\n- ../common\n");
        repo(
            tmp.path(),
            "outer",
            &[
                ("deploy/kustomization.yaml", &outer_base),
                ("common/kustomization.yaml", "resources:\n- x.yaml\n"),
            ],
        );
        let outer = daemon.url("outer");
        let app = format!("resources:\n- {outer}//deploy?ref=v1\n- local.yaml\n");
        let project = repo(tmp.path(), "project", &[("app/kustomization.yaml", &app)]);
        let allowed = format!("git://127.0.0.1:{}/", daemon.port);

        let plan = plan_of(tmp.path(), &project, &allowed, 5)
            .await
            .expect("planned");
        let repositories: Vec<&str> = plan.grafts.iter().map(|g| g.repository.as_str()).collect();
        assert_eq!(repositories.len(), 2, "{repositories:?}");
        assert!(repositories.contains(&inner.as_str()) && repositories.contains(&outer.as_str()));
        let root_of = |url: &str| {
            plan.grafts
                .iter()
                .find(|g| g.repository == url)
                .unwrap()
                .root
                .clone()
        };
        let (outer_root, inner_root) = (root_of(&outer), root_of(&inner));
        let app_copy: serde_json::Value =
            serde_json::from_str(&plan.rewritten["app/kustomization.yaml"]).unwrap();
        assert_eq!(
            app_copy["resources"],
            serde_json::json!([format!("../{outer_root}/deploy"), "local.yaml"])
        );
        let outer_copy: serde_json::Value = serde_json::from_str(
            &plan.rewritten[&format!("{outer_root}/deploy/kustomization.yaml")],
        )
        .unwrap();
        let inner_name = inner_root.rsplit('/').next().unwrap();
        assert_eq!(
            outer_copy["resources"],
            serde_json::json!([format!("../../{inner_name}/base"), "../common"])
        );

        // One level fewer allowed: the inner base is refused, naming the outer's file.
        let e = plan_of(tmp.path(), &project, &allowed, 1)
            .await
            .expect_err("too deep");
        assert!(matches!(e, RenderError::RemoteBaseRefused { .. }), "{e}");
        let said = e.to_string();
        assert!(
            said.starts_with(&format!("deploy/kustomization.yaml of {outer} at v1 refers to the remote {inner}//base?ref=v1")),
            "{said}"
        );
        assert!(said.contains("nest more than 1 deep"), "{said}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_ref_a_path_out_of_the_base_and_an_unallowed_repository_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("git")).unwrap();
        let daemon = GitDaemon::start(&tmp.path().join("git"));
        let leaving = "resources:\n- ../../outside\n";
        repo(tmp.path(), "up", &[("base/kustomization.yaml", leaving)]);
        let up = daemon.url("up");
        let allowed = up.clone();
        let cases = [
            (
                format!("{up}//base?ref=v9"),
                "has no tag, branch or commit v9",
            ),
            (
                format!("{up}//base?ref=v1"),
                "base/kustomization.yaml of git://",
            ),
            (
                format!("{}//base?ref=v1", daemon.url("upper")),
                "which does not allow",
            ),
            (
                "https://example.com/cm.yaml".to_owned(),
                "a file Kustomize would download",
            ),
        ];
        for (i, (reference, words)) in cases.iter().enumerate() {
            let app = format!("resources:\n- {reference}\n");
            let project = repo(
                tmp.path(),
                &format!("p{i}"),
                &[("app/kustomization.yaml", &app)],
            );
            let dir = tmp.path().join(format!("run{i}"));
            let e = plan_of(&dir, &project, &allowed, 5)
                .await
                .expect_err(reference);
            let said = e.to_string();
            assert!(said.contains(words), "{reference}: {said}");
            if i != 1 {
                assert!(
                    said.starts_with("app/kustomization.yaml refers to the remote"),
                    "{said}"
                );
                assert!(said.contains(reference.as_str()), "{said}");
            } else {
                assert!(matches!(e, RenderError::LeavesRepository { .. }), "{said}");
            }
        }
    }
}
