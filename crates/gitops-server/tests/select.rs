//! Selecting manifests from real repositories made with the `git` CLI and mirrored by
//! `tether-git-source`.

use std::path::PathBuf;

use tether_git_source::{CommitId, GitRef, Mirror, Remote};
use tether_gitops_server::{Limits, SelectError, Selection, select_manifests};
use tether_test_support::GitRepo;

const SEED_GLOB: &str = "/manifests/*.{yaml,yml,json}";

/// A work-tree repository to commit into and a mirror of it.
struct Fixture {
    _tmp: tempfile::TempDir,
    repo: GitRepo,
    mirror: Mirror,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = GitRepo::init(&tmp.path().join("project"));
        let mirror = Mirror::open_or_init(
            tmp.path().join("cache/project.git"),
            Remote::local(&repo.dir),
        )
        .expect("mirror");
        Fixture {
            _tmp: tmp,
            repo,
            mirror,
        }
    }

    fn src(&self) -> PathBuf {
        self.repo.dir.clone()
    }

    /// Writes `files`, removes `remove`, commits, fetches; returns the new default-branch commit.
    fn commit(&self, files: &[(&str, &[u8])], remove: &[&str]) -> CommitId {
        self.repo.commit_files(files, remove, "change");
        self.mirror.fetch().expect("fetch");
        self.mirror
            .resolve(&GitRef::DefaultBranch)
            .expect("resolve")
    }

    fn select(&self, commit: &CommitId, globs: &[&str]) -> Result<Selection, SelectError> {
        self.select_with(commit, globs, &Limits::default())
    }

    fn select_with(
        &self,
        commit: &CommitId,
        globs: &[&str],
        limits: &Limits,
    ) -> Result<Selection, SelectError> {
        select_manifests(&self.mirror, commit, globs, limits)
    }
}

/// The seed repository: manifests at the top of `manifests/`, a nested one, agent config in a
/// dot-directory, and files that no manifest glob should pick up.
fn seed() -> (Fixture, CommitId) {
    let f = Fixture::new();
    let commit = f.commit(
        &[
            ("manifests/dude.yaml", b"kind: Deployment\nname: dude\n"),
            ("manifests/naww.yaml", b"kind: Deployment\nname: naww\n"),
            ("manifests/sub/x.yaml", b"kind: ConfigMap\n"),
            ("manifests/notes.txt", b"not a manifest"),
            (".gitlab/agents/x/config.yaml", b"gitops: {}\n"),
            ("apps/a/deploy.yml", b"kind: Service\n"),
            ("apps/b/deploy.json", b"{}"),
            ("README.md", b"# project\n"),
        ],
        &[],
    );
    (f, commit)
}

fn paths(selection: &Selection) -> Vec<&str> {
    selection.files.iter().map(|f| f.path.as_str()).collect()
}

#[test]
fn seed_glob_selects_top_level_manifests() {
    let (f, commit) = seed();
    let selection = f.select(&commit, &[SEED_GLOB]).expect("select");
    assert_eq!(selection.commit, commit);
    assert_eq!(
        paths(&selection),
        ["manifests/dude.yaml", "manifests/naww.yaml"]
    );
    assert_eq!(
        selection.files[0].bytes,
        b"kind: Deployment\nname: dude\n".to_vec()
    );
    assert_eq!(selection.total_size(), 56);
}

#[test]
fn doublestar_skips_dot_directories() {
    let (f, commit) = seed();
    let selection = f.select(&commit, &["**/*.yaml"]).expect("select");
    assert_eq!(
        paths(&selection),
        [
            "manifests/dude.yaml",
            "manifests/naww.yaml",
            "manifests/sub/x.yaml"
        ]
    );
    // Naming the dot-directory literally does not select from it either.
    let selection = f
        .select(&commit, &[".gitlab/agents/x/config.yaml"])
        .expect("select");
    assert!(selection.files.is_empty());
}

#[test]
fn several_globs_merge_sorted() {
    let (f, commit) = seed();
    let selection = f
        .select(
            &commit,
            &["apps/**/*.{yml,json}", "manifests/sub/*.yaml", "README.md"],
        )
        .expect("select");
    assert_eq!(
        paths(&selection),
        [
            "README.md",
            "apps/a/deploy.yml",
            "apps/b/deploy.json",
            "manifests/sub/x.yaml"
        ]
    );
    // A glob matching nothing, or a missing directory, is not an error.
    let selection = f.select(&commit, &["nope/**", "*.yaml"]).expect("select");
    assert!(selection.files.is_empty());
    let selection = f.select(&commit, &[]).expect("select");
    assert!(selection.files.is_empty());
}

#[test]
fn file_matched_by_two_globs_is_an_error() {
    let (f, commit) = seed();
    let err = f
        .select(&commit, &[SEED_GLOB, "manifests/**"])
        .expect_err("overlap");
    match &err {
        SelectError::MatchedByTwoGlobs {
            path,
            first,
            second,
        } => {
            assert_eq!(path, "manifests/dude.yaml");
            assert_eq!(first, SEED_GLOB);
            assert_eq!(second, "manifests/**");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_user_error());
    let message = err.to_string();
    assert!(message.contains("manifests/dude.yaml"), "{message}");
    assert!(
        message.contains(SEED_GLOB) && message.contains("manifests/**"),
        "{message}"
    );
}

#[test]
fn invalid_glob_is_reported_before_io() {
    let (f, commit) = seed();
    let err = f
        .select(&commit, &[SEED_GLOB, "manifests/[a-"])
        .expect_err("invalid");
    assert!(
        matches!(&err, SelectError::InvalidGlob(e) if e.glob == "manifests/[a-"),
        "{err:?}"
    );
    assert!(err.is_user_error());
    assert!(err.to_string().contains("manifests/[a-"), "{err}");

    // Config errors win even over a commit the mirror does not have.
    let missing = CommitId::from_hex("0123456789abcdef0123456789abcdef01234567").expect("id");
    let err = f.select(&missing, &["{a,b"]).expect_err("invalid");
    assert!(matches!(err, SelectError::InvalidGlob(_)), "{err:?}");
    let err = f
        .select(&missing, &[SEED_GLOB])
        .expect_err("missing commit");
    assert!(matches!(err, SelectError::Git(_)), "{err:?}");
    assert!(!err.is_user_error());
}

#[test]
fn too_many_paths() {
    let (f, commit) = seed();
    let limits = Limits {
        max_paths: 2,
        ..Limits::default()
    };
    let err = f
        .select_with(&commit, &["a/*", "b/*", "c/*"], &limits)
        .expect_err("too many");
    assert!(
        matches!(err, SelectError::TooManyPaths { count: 3, limit: 2 }),
        "{err:?}"
    );
    assert!(err.is_user_error());
    let globs: Vec<String> = (0..101).map(|i| format!("dir{i}/*.yaml")).collect();
    let err = select_manifests(&f.mirror, &commit, &globs, &Limits::default())
        .expect_err("over upstream's 100");
    assert!(matches!(
        err,
        SelectError::TooManyPaths {
            count: 101,
            limit: 100
        }
    ));
}

#[test]
fn file_too_large() {
    let f = Fixture::new();
    let big = vec![b'#'; 5 * 1024 * 1024 + 1];
    let commit = f.commit(
        &[
            ("manifests/ok.yaml", b"kind: ConfigMap\n"),
            ("manifests/big.yaml", &big),
        ],
        &[],
    );
    let err = f.select(&commit, &[SEED_GLOB]).expect_err("too large");
    match &err {
        SelectError::FileTooLarge { path, size, limit } => {
            assert_eq!(path, "manifests/big.yaml");
            assert_eq!(*size, big.len() as u64);
            assert_eq!(*limit, 5 * 1024 * 1024);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_user_error());
    // A big file that no glob selects does not matter.
    let selection = f.select(&commit, &["manifests/ok.yaml"]).expect("select");
    assert_eq!(paths(&selection), ["manifests/ok.yaml"]);
}

#[test]
fn total_too_large() {
    let f = Fixture::new();
    let chunk = vec![b'#'; 400];
    let commit = f.commit(
        &[
            ("manifests/a.yaml", &chunk),
            ("manifests/b.yaml", &chunk),
            ("manifests/c.yaml", &chunk),
        ],
        &[],
    );
    let limits = Limits {
        max_total_size: 1000,
        ..Limits::default()
    };
    let err = f
        .select_with(&commit, &[SEED_GLOB], &limits)
        .expect_err("total");
    assert!(
        matches!(
            err,
            SelectError::TotalTooLarge {
                size: 1200,
                limit: 1000
            }
        ),
        "{err:?}"
    );
    assert!(err.is_user_error());
    let limits = Limits {
        max_total_size: 1200,
        ..Limits::default()
    };
    let selection = f.select_with(&commit, &[SEED_GLOB], &limits).expect("fits");
    assert_eq!(selection.total_size(), 1200);
}

#[test]
fn visit_and_file_count_limits() {
    let f = Fixture::new();
    let many: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                format!("manifests/m{i:02}.yaml"),
                b"kind: ConfigMap\n".to_vec(),
            )
        })
        .chain([("other/x.yaml".to_owned(), b"x: 1\n".to_vec())])
        .collect();
    let files: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let commit = f.commit(&files, &[]);

    let limits = Limits {
        max_visited_entries: 20,
        ..Limits::default()
    };
    let err = f
        .select_with(&commit, &[SEED_GLOB], &limits)
        .expect_err("visits");
    match &err {
        SelectError::TooManyEntries {
            glob,
            prefix,
            limit,
        } => {
            assert_eq!(glob, SEED_GLOB);
            assert_eq!(prefix, "manifests");
            assert_eq!(*limit, 20);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_user_error());
    assert!(err.to_string().contains(SEED_GLOB), "{err}");
    // The literal prefix keeps the walk small: `other/` is listed alone.
    let selection = f
        .select_with(&commit, &["other/*.yaml"], &limits)
        .expect("narrow glob");
    assert_eq!(paths(&selection), ["other/x.yaml"]);

    let limits = Limits {
        max_files: 10,
        ..Limits::default()
    };
    let err = f
        .select_with(&commit, &[SEED_GLOB], &limits)
        .expect_err("files");
    assert!(
        matches!(
            err,
            SelectError::TooManyFiles {
                count: 11,
                limit: 10
            }
        ),
        "{err:?}"
    );
    assert!(err.is_user_error());
    let selection = f.select(&commit, &[SEED_GLOB]).expect("default limits");
    assert_eq!(selection.files.len(), 30);
}

#[test]
fn symlinks_are_skipped_with_a_warning_not_silently() {
    let (f, _) = seed();
    std::os::unix::fs::symlink("dude.yaml", f.src().join("manifests/link.yaml")).expect("symlink");
    let commit = f.commit(&[], &[]);
    let selection = f.select(&commit, &[SEED_GLOB]).expect("select");
    assert_eq!(
        paths(&selection),
        ["manifests/dude.yaml", "manifests/naww.yaml"]
    );
    assert_eq!(selection.warnings.len(), 1, "{:?}", selection.warnings);
    assert!(
        selection.warnings[0].contains("manifests/link.yaml is a symbolic link"),
        "{:?}",
        selection.warnings
    );
}

#[test]
fn globs_matching_nothing_warn_that_allow_empty_would_prune_everything() {
    let (f, commit) = seed();
    let selection = f
        .select(&commit, &["/nothing-here/*.yaml"])
        .expect("select");
    assert!(selection.files.is_empty());
    assert_eq!(selection.warnings.len(), 1, "{:?}", selection.warnings);
    assert!(
        selection.warnings[0].contains("no file matches")
            && selection.warnings[0].contains("only if the entry sets allow_empty: true")
            && !selection.warnings[0].contains("is pruned"),
        "{:?}",
        selection.warnings
    );
    // A normal selection warns about nothing.
    let selection = f.select(&commit, &[SEED_GLOB]).expect("select");
    assert!(selection.warnings.is_empty(), "{:?}", selection.warnings);
}

/// kas does not fetch submodules: a glob that could select files inside one fails the commit
/// naming the submodule (the files would be missing, the objects they held pruned); a glob
/// that cannot reach inside it selects as before, without a word.
#[test]
fn a_glob_reaching_into_a_submodule_fails_naming_it() {
    let (f, _) = seed();
    let lib = GitRepo::init(&f._tmp.path().join("lib"));
    lib.commit(&[("crd.yaml", Some(&b"kind: X\n"[..]))], "lib");
    f.repo
        .add_submodule(&lib.dir, "manifests/lib", "a submodule");
    f.mirror.fetch().expect("fetch");
    let commit = f.mirror.resolve(&GitRef::DefaultBranch).expect("resolve");
    let e = f
        .select(&commit, &["manifests/**/*.yaml"])
        .expect_err("refused");
    assert!(matches!(e, SelectError::Submodule { .. }), "{e:?}");
    assert!(e.is_user_error());
    let text = e.to_string();
    for words in [
        "glob \"manifests/**/*.yaml\" covers manifests/lib, a Git submodule",
        "kas does not fetch submodules",
        "nothing was applied",
    ] {
        assert!(text.contains(words), "{words:?} not in {text}");
    }
    // A glob whose fixed part is the submodule, or lies inside it, is refused too (it was
    // listed from there, and found nothing).
    for glob in [
        "manifests/lib/*.yaml",
        "manifests/lib/**",
        "manifests/lib/deep/*.yaml",
    ] {
        let e = f.select(&commit, &[glob]).expect_err(glob);
        assert!(matches!(e, SelectError::Submodule { .. }), "{glob}: {e:?}");
    }
    let selection = f.select(&commit, &[SEED_GLOB]).expect("select");
    assert_eq!(
        paths(&selection),
        ["manifests/dude.yaml", "manifests/naww.yaml"]
    );
    assert!(selection.warnings.is_empty(), "{:?}", selection.warnings);
}
