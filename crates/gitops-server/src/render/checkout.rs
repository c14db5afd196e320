//! The renderer's view of the repository: a temporary, read-only checkout of one commit,
//! written from the mirror's object database (no Git process, no work tree of the mirror).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tether_git_source::{CommitId, Error as GitError, FileEntry, Mirror};

use super::RenderError;
use super::checks::link_stays_inside;
use super::remote_bases::MATERIALIZED_DIR;
use super::remote_plan::Plan;

/// A link to write: its tree's mirror, commit and checkout folder, and its path there.
type Link = (Mirror, CommitId, String, String);

/// Bounds on what one checkout may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutLimits {
    /// Most tree entries (files, directories, links) read.
    pub max_entries: usize,
    /// Largest sum of the files' sizes, in bytes.
    pub max_size: u64,
}

/// A checkout in a temporary directory, removed when dropped.
#[derive(Debug)]
pub struct Checkout {
    dir: tempfile::TempDir,
    /// The repository's files.
    pub repo: PathBuf,
    /// The renderer's home, caches and temporary files; writable.
    pub scratch: PathBuf,
    /// The repository's submodules (paths), left as empty folders as Git leaves a submodule
    /// it did not fetch: a rendering failing for want of their files says so.
    pub submodules: Vec<String>,
    /// Symbolic links leaving their tree outside the folder the entry renders
    /// (`path -> target`), not written: a rendering failing for want of them says so.
    pub left_out: Vec<String>,
}

/// Where a symbolic link leaving its tree refuses the rendering: under `folder` (the entry's
/// kustomization or chart, `""` for the whole repository). Elsewhere such a link is left out,
/// so one stray link (a docs folder's link to `/usr/share`) does not fail every entry of the
/// project; a renderer that needed it fails naming it.
#[derive(Debug, Clone, Copy)]
pub struct Strict<'a>(pub Option<&'a str>);

impl Strict<'_> {
    fn covers(self, path: &str) -> bool {
        let Some(folder) = self.0 else { return false };
        let folder = folder.trim_start_matches("./").trim_end_matches('/');
        let folder = if folder == "." { "" } else { folder };
        folder.is_empty()
            || path == folder
            || path
                .strip_prefix(folder)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl Checkout {
    /// Writes `commit` into a new directory under `parent` (the system's temporary directory
    /// when `None`), with the files of `added` (repository path, content: chart dependencies
    /// kas fetched) beside the commit's, and the remote bases of `remote`: each repository's
    /// commit in its folder, and the kustomizations `remote` rewrote in their new text.
    /// Blocking. Symbolic links whose target leaves the checkout (or a remote base's
    /// repository) are refused under `strict`'s folder, left out elsewhere.
    pub fn write(
        mirror: &Mirror,
        commit: &CommitId,
        limits: &CheckoutLimits,
        parent: Option<&Path>,
        added: &[(String, &[u8])],
        remote: &Plan,
        strict: Strict<'_>,
    ) -> Result<Checkout, RenderError> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(PREFIX);
        let dir = match parent {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .map_err(|e| RenderError::Io(format!("creating the checkout directory: {e}")))?;
        let repo = dir.path().join("repo");
        let scratch = dir.path().join("scratch");
        for d in [&repo, &scratch.join("home"), &scratch.join("tmp")] {
            fs::create_dir_all(d).map_err(io("creating", d))?;
        }
        let mut checkout = Checkout {
            dir,
            repo,
            scratch,
            submodules: Vec::new(),
            left_out: Vec::new(),
        };
        let mut budget = limits.clone();
        let mut links = checkout.write_tree(mirror, commit, "", &mut budget, remote)?;
        if !remote.grafts.is_empty() && checkout.repo.join(MATERIALIZED_DIR).exists() {
            return Err(RenderError::Failed {
                tool: super::Tool::Kustomize,
                message: format!(
                    "the repository holds {MATERIALIZED_DIR}/, the folder kas writes remote bases to: rename it"
                ),
            });
        }
        for g in &remote.grafts {
            links.extend(checkout.write_tree(
                &g.mirror,
                &g.commit,
                &g.root,
                &mut budget,
                remote,
            )?);
        }
        // Before the links too; never over a file of the commit (`create_new`).
        for (path, bytes) in added {
            checkout.add_file(path, bytes)?;
        }
        // Links last, so no file is ever written through one.
        for (m, c, root, path) in &links {
            checkout.write_link(m, c, root, path, strict)?;
        }
        checkout.check_links_resolved(&links, strict)?;
        make_read_only(&checkout.repo)?;
        Ok(checkout)
    }

    /// Writes the files of `commit` under the checkout folder `root` (`""`: the repository's
    /// own), within what is left of `budget`, with `remote`'s rewritten kustomizations; returns
    /// its links, to be written last.
    fn write_tree(
        &mut self,
        mirror: &Mirror,
        commit: &CommitId,
        root: &str,
        budget: &mut CheckoutLimits,
        remote: &Plan,
    ) -> Result<Vec<Link>, RenderError> {
        let entries = list(mirror, commit, budget)?;
        budget.max_entries = budget.max_entries.saturating_sub(entries.len());
        budget.max_size = budget
            .max_size
            .saturating_sub(entries.iter().map(|e| e.size).sum());
        let (submodules, entries): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|e| e.submodule);
        for e in submodules {
            let path = join(root, &e.path);
            let dest = inside(&self.repo, &path)?;
            fs::create_dir_all(&dest).map_err(io("creating", &dest))?;
            self.submodules.push(path);
        }
        let (links, files): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.symlink);
        for f in &files {
            let path = join(root, &f.path);
            match remote.rewritten.get(&path) {
                Some(text) => self.put(&path, text.as_bytes())?,
                None => self.write_file(mirror, commit, &f.path, &path, f.size)?,
            }
        }
        Ok(links
            .into_iter()
            .map(|l| (mirror.clone(), *commit, root.to_owned(), l.path))
            .collect())
    }

    fn write_file(
        &self,
        mirror: &Mirror,
        commit: &CommitId,
        from: &str,
        to: &str,
        max_size: u64,
    ) -> Result<(), RenderError> {
        let bytes = mirror
            .read_file(commit, from, max_size)
            .map_err(git)?
            .ok_or_else(|| RenderError::Io(format!("{from} was listed but cannot be read")))?;
        self.put(to, &bytes)
    }

    fn put(&self, path: &str, bytes: &[u8]) -> Result<(), RenderError> {
        let dest = inside(&self.repo, path)?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        fs::write(&dest, bytes).map_err(io("writing", &dest))
    }

    fn add_file(&self, path: &str, bytes: &[u8]) -> Result<(), RenderError> {
        let dest = inside(&self.repo, path)?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
            .map_err(io("adding", &dest))?;
        std::io::Write::write_all(&mut file, bytes).map_err(io("writing", &dest))
    }

    /// Writes the link `path` of the tree at `root`; one whose target leaves that tree is
    /// refused under `strict`'s folder and left out elsewhere.
    fn write_link(
        &mut self,
        mirror: &Mirror,
        commit: &CommitId,
        root: &str,
        path: &str,
        strict: Strict<'_>,
    ) -> Result<(), RenderError> {
        let target = mirror
            .read_link(commit, path)
            .map_err(git)?
            .unwrap_or_default();
        // Judged inside its own tree: a remote base's link never reaches the project's files.
        let stays = link_stays_inside(path, &target);
        let path = join(root, path);
        if !stays {
            return self.escaping(path, target, strict);
        }
        let dest = inside(&self.repo, &path)?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::os::unix::fs::symlink(&target, &dest).map_err(io("linking", &dest))
    }

    /// Names alone cannot see through chains (`a -> .`, `b -> a/..`): resolve every link as
    /// the renderer's system calls would, now that all of them exist. Each must stay in its own
    /// tree: a remote base's links never reach the project's files.
    fn check_links_resolved(
        &mut self,
        links: &[Link],
        strict: Strict<'_>,
    ) -> Result<(), RenderError> {
        for (_, _, root, path) in links {
            let tree = self.repo.join(root);
            let tree = fs::canonicalize(&tree).map_err(io("resolving", &tree))?;
            let path = join(root, path);
            let resolved = fs::canonicalize(self.repo.join(&path));
            // A dangling link leads nowhere; its name was checked above.
            if let Ok(p) = resolved
                && !p.starts_with(&tree)
            {
                let link = self.repo.join(&path);
                let target = fs::read_link(&link)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                // Removing a link only takes paths away: no other link can escape through it.
                fs::remove_file(&link).map_err(io("removing", &link))?;
                self.escaping(path, target, strict)?;
            }
        }
        Ok(())
    }

    /// A link leaving its tree: refused under `strict`'s folder, else noted as left out.
    fn escaping(
        &mut self,
        path: String,
        target: String,
        strict: Strict<'_>,
    ) -> Result<(), RenderError> {
        if strict.covers(&path) {
            return Err(RenderError::SymlinkEscapes { path, target });
        }
        self.left_out.push(format!("{path} -> {target}"));
        Ok(())
    }

    /// The checkout's root, for tests and messages.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        // Directories were made read-only; removal needs them writable again.
        let _ = set_modes(&self.repo, 0o755, 0o644);
    }
}

/// The prefix of every checkout's directory: what [`sweep_leftovers`] may delete.
const PREFIX: &str = "tether-render-";

/// Deletes the checkouts a killed kas left in `dir` (its drops never ran): real directories
/// named as checkouts are named, never links or other files. Blocking; returns how many were
/// deleted. Only for a directory this kas alone writes checkouts to, before it renders.
pub fn sweep_leftovers(dir: &Path) -> usize {
    let Ok(listing) = fs::read_dir(dir) else {
        return 0;
    };
    let mut deleted = 0;
    for entry in listing.flatten() {
        let path = entry.path();
        // `file_type` does not follow links: a link named like a checkout is left alone.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        // The repository inside was made read-only; its entries cannot be removed as it is.
        let removed = set_modes(&path, 0o755, 0o644).and_then(|()| fs::remove_dir_all(&path));
        match removed {
            Ok(()) => {
                deleted += 1;
                tracing::info!(dir = %path.display(), "Deleted a checkout left by an earlier kas");
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "Deleting a checkout left by an earlier kas failed")
            }
        }
    }
    deleted
}

fn list(
    mirror: &Mirror,
    commit: &CommitId,
    limits: &CheckoutLimits,
) -> Result<Vec<FileEntry>, RenderError> {
    let entries = mirror
        .list_files(commit, "", limits.max_entries)
        .map_err(|e| match e {
            GitError::TooManyEntries { limit, .. } => RenderError::CheckoutTooLarge {
                what: format!("more than {limit} entries"),
            },
            e @ GitError::InvalidTreeEntry { .. } => RenderError::UncheckableTree(e.to_string()),
            other => git(other),
        })?;
    let total: u64 = entries.iter().map(|e| e.size).sum();
    if total > limits.max_size {
        return Err(RenderError::CheckoutTooLarge {
            what: format!("{total} bytes, over the limit of {} bytes", limits.max_size),
        });
    }
    Ok(entries)
}

fn make_read_only(repo: &Path) -> Result<(), RenderError> {
    set_modes(repo, 0o555, 0o444).map_err(io("protecting", repo))
}

/// Sets every directory under `dir` (and `dir`) to `dirs` and every file to `files`, without
/// following links.
fn set_modes(dir: &Path, dirs: u32, files: u32) -> std::io::Result<()> {
    // Opened first: a read-only directory can still be listed (r-x), but be generous.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            set_modes(&entry.path(), dirs, files)?;
        } else if kind.is_file() {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(files))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(dirs))
}

/// `path` (a repository path) under `repo`, refused unless every component is a plain name:
/// `Path::join` with an absolute path, or one with `..`, would write outside the checkout.
fn inside(repo: &Path, path: &str) -> Result<PathBuf, RenderError> {
    let plain = !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(RenderError::UncheckableTree(format!(
            "the repository path {path:?} is not a plain relative path"
        )));
    }
    Ok(repo.join(path))
}

/// `dir/path`, `dir` may be empty.
fn join(dir: &str, path: &str) -> String {
    if dir.is_empty() {
        path.to_owned()
    } else {
        format!("{dir}/{path}")
    }
}

fn git(e: GitError) -> RenderError {
    RenderError::Io(format!("reading the repository: {e}"))
}

fn io(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> RenderError {
    let path = path.display().to_string();
    move |e| RenderError::Io(format!("{what} {path}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A local repository's mirror at its head, for the checkout to read.
    fn mirrored(repo: &tether_test_support::GitRepo, dir: &Path) -> (Mirror, CommitId) {
        let remote = tether_git_source::Remote::local(&repo.dir);
        let mirror = Mirror::open_or_init(dir, remote).unwrap();
        mirror.fetch().unwrap();
        let commit = mirror
            .resolve(&tether_git_source::GitRef::DefaultBranch)
            .unwrap();
        (mirror, commit)
    }

    #[test]
    fn only_links_under_the_entrys_folder_refuse_the_rendering() {
        let app = Strict(Some("./app/"));
        assert!(app.covers("app") && app.covers("app/base/link"));
        assert!(!app.covers("apps/link") && !app.covers("docs/link"));
        assert!(Strict(Some(".")).covers("docs/link"));
        assert!(Strict(Some("")).covers("docs/link"));
        assert!(!Strict(None).covers("app/link"));
    }

    #[test]
    fn a_remote_bases_links_stay_in_its_own_tree_even_through_chains() {
        let tmp = tempfile::tempdir().unwrap();
        let project = tether_test_support::GitRepo::init(&tmp.path().join("project"));
        project.commit(
            &[("app/kustomization.yaml", Some(b"resources: []\n"))],
            "app",
        );
        let base = tether_test_support::GitRepo::init(&tmp.path().join("base"));
        base.commit(&[("base/cm.yaml", Some(b"kind: ConfigMap\n"))], "base");
        // Each link stays by name (`b/b/../..` is the root); through `b -> .` the kernel
        // reaches two folders up, the project's own files.
        std::os::unix::fs::symlink(".", base.dir.join("b")).unwrap();
        std::os::unix::fs::symlink("b/b/../..", base.dir.join("a")).unwrap();
        base.commit(&[], "links");
        let (pm, pc) = mirrored(&project, &tmp.path().join("pm"));
        let (bm, bc) = mirrored(&base, &tmp.path().join("bm"));
        let plan = Plan {
            grafts: vec![super::super::remote_plan::Graft {
                root: format!("{MATERIALIZED_DIR}/x"),
                repository: "https://h.example/base".into(),
                mirror: bm,
                commit: bc,
            }],
            ..Plan::default()
        };
        let limits = CheckoutLimits {
            max_entries: 100,
            max_size: 1 << 20,
        };
        let work = tmp.path().join("work");
        fs::create_dir_all(&work).unwrap();
        let whole = Strict(Some(""));
        let e = Checkout::write(&pm, &pc, &limits, Some(&work), &[], &plan, whole)
            .expect_err("refused");
        match e {
            RenderError::SymlinkEscapes { path, .. } => {
                assert_eq!(path, format!("{MATERIALIZED_DIR}/x/a"));
            }
            other => panic!("{other}"),
        }
        // Outside the entry's folder, the link is left out instead, and named.
        let app = Strict(Some("app"));
        let checkout = Checkout::write(&pm, &pc, &limits, Some(&work), &[], &plan, app).unwrap();
        assert_eq!(
            checkout.left_out,
            vec![format!("{MATERIALIZED_DIR}/x/a -> b/b/../..")]
        );
        let graft = checkout.repo.join(MATERIALIZED_DIR).join("x");
        assert!(
            fs::symlink_metadata(graft.join("a")).is_err(),
            "not written"
        );
        assert!(graft.join("b").is_symlink(), "the link staying inside is");
        drop(checkout);
        base.commit_files(&[], &["a"], "no chain");
        let (bm, bc) = mirrored(&base, &tmp.path().join("bm"));
        let plan = Plan {
            grafts: vec![super::super::remote_plan::Graft {
                mirror: bm,
                commit: bc,
                ..plan.grafts[0].clone()
            }],
            ..Plan::default()
        };
        let checkout = Checkout::write(&pm, &pc, &limits, Some(&work), &[], &plan, whole).unwrap();
        let graft = checkout.repo.join(MATERIALIZED_DIR).join("x");
        assert!(graft.join("base/cm.yaml").is_file());
        assert!(graft.join("b").is_symlink());
        assert!(checkout.repo.join("app/kustomization.yaml").is_file());
    }

    #[test]
    fn only_real_checkout_directories_are_swept_even_read_only_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A checkout as a killed kas leaves it: the repository read-only.
        let left = d.join("tether-render-abc123");
        fs::create_dir_all(left.join("repo/charts/app")).unwrap();
        fs::create_dir_all(left.join("scratch/home")).unwrap();
        fs::write(left.join("repo/charts/app/Chart.yaml"), "name: app\n").unwrap();
        make_read_only(&left.join("repo")).unwrap();
        // What must stay: a link named like a checkout (and what it points at), a file named
        // like one, and anything else.
        let kept = d.join("kept");
        fs::create_dir_all(&kept).unwrap();
        fs::write(kept.join("data"), "x").unwrap();
        std::os::unix::fs::symlink(&kept, d.join("tether-render-link")).unwrap();
        fs::write(d.join("tether-render-file"), "y").unwrap();
        fs::create_dir_all(d.join("other")).unwrap();

        assert_eq!(sweep_leftovers(d), 1);
        assert!(!left.exists());
        let mut names: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["kept", "other", "tether-render-file", "tether-render-link"]
        );
        assert_eq!(fs::read_to_string(kept.join("data")).unwrap(), "x");
        assert_eq!(sweep_leftovers(&d.join("missing")), 0);
    }
}
