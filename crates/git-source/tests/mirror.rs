//! Mirrors of real repositories made with the `git` CLI: local paths, `file://`, `git://` through
//! a real `git daemon`, and an HTTP server that demands authentication.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_git_source::{
    CommitId, Error, FetchError, FileEntry, GitRef, Mirror, Remote, RemoteKind,
};
use tether_test_support::{GitDaemon, GitRepo, git, listener};

const MAX: u64 = 1 << 20;

/// A work-tree repository to push commits into, plus a cache directory for mirrors.
struct Fixture {
    tmp: tempfile::TempDir,
    repo: GitRepo,
}

impl Fixture {
    fn new(default_branch: &str) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = GitRepo::init_on(&tmp.path().join("repos/project"), default_branch);
        Fixture { tmp, repo }
    }

    fn repos(&self) -> PathBuf {
        self.tmp.path().join("repos")
    }

    fn src(&self) -> PathBuf {
        self.repo.dir.clone()
    }

    fn cache(&self, name: &str) -> PathBuf {
        self.tmp.path().join("cache").join(format!("{name}.git"))
    }

    /// Writes `files`, removes `remove`, commits everything; returns the commit id.
    fn commit(&self, files: &[(&str, &[u8])], remove: &[&str], message: &str) -> CommitId {
        CommitId::from_hex(&self.repo.commit_files(files, remove, message)).expect("commit id")
    }

    fn head(&self) -> CommitId {
        CommitId::from_hex(&self.repo.head()).expect("commit id")
    }

    fn local_mirror(&self) -> Mirror {
        Mirror::open_or_init(self.cache("local"), Remote::local(self.src())).expect("mirror")
    }
}

fn read(mirror: &Mirror, commit: &CommitId, path: &str) -> Option<String> {
    mirror
        .read_file(commit, path, MAX)
        .expect("read_file")
        .map(|b| String::from_utf8(b).expect("utf-8"))
}

#[test]
fn local_path_fetch_read_and_history() {
    let f = Fixture::new("main");
    let first = f.commit(&[("app.yaml", b"v1"), ("README", b"hi")], &[], "one");
    let mirror = f.local_mirror();

    let outcome = mirror.fetch().expect("first fetch");
    assert!(outcome.changed());
    assert_eq!(outcome.default_branch.as_deref(), Some("main"));
    assert_eq!(
        mirror
            .resolve(&GitRef::Branch("main".into()))
            .expect("resolve"),
        first
    );
    assert_eq!(read(&mirror, &first, "app.yaml").as_deref(), Some("v1"));
    assert_eq!(read(&mirror, &first, "/app.yaml").as_deref(), Some("v1"));
    assert_eq!(read(&mirror, &first, "missing.yaml"), None);
    assert_eq!(read(&mirror, &first, "app.yaml/deeper"), None);

    // Nothing new: no ref changes.
    assert!(!mirror.fetch().expect("idle fetch").changed());

    let second = f.commit(&[("app.yaml", b"v2")], &["README"], "two");
    // Not visible before the next fetch.
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        first
    );
    let outcome = mirror.fetch().expect("second fetch");
    assert_eq!(outcome.changes.len(), 1);
    assert_eq!(outcome.changes[0].name, "refs/heads/main");
    assert_eq!(
        outcome.changes[0].old.as_deref(),
        Some(first.to_hex().as_str())
    );
    assert_eq!(
        outcome.changes[0].new.as_deref(),
        Some(second.to_hex().as_str())
    );
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        second
    );
    assert_eq!(read(&mirror, &second, "app.yaml").as_deref(), Some("v2"));
    assert_eq!(read(&mirror, &second, "README"), None);
    // The old commit stays readable.
    assert_eq!(read(&mirror, &first, "app.yaml").as_deref(), Some("v1"));
    assert_eq!(read(&mirror, &first, "README").as_deref(), Some("hi"));

    // Reopening an existing mirror keeps its content.
    drop(mirror);
    let reopened = f.local_mirror();
    assert_eq!(read(&reopened, &second, "app.yaml").as_deref(), Some("v2"));
}

#[test]
fn file_url_remote() {
    let f = Fixture::new("main");
    let commit = f.commit(&[("a.txt", b"from file url")], &[], "one");
    let remote = Remote::parse(&format!("file://{}", f.src().display())).expect("remote");
    assert_eq!(remote.kind(), RemoteKind::Local);
    let mirror = Mirror::open_or_init(f.cache("file"), remote).expect("mirror");
    mirror.fetch().expect("fetch");
    assert_eq!(
        read(&mirror, &commit, "a.txt").as_deref(),
        Some("from file url")
    );
}

#[test]
fn branches_tags_commits_and_default_branch() {
    let f = Fixture::new("trunk");
    let first = f.commit(&[("f", b"1")], &[], "one");
    git(&f.src(), &["tag", "light"]);
    git(
        &f.src(),
        &["tag", "-a", "annotated", "-m", "an annotated tag"],
    );
    git(&f.src(), &["checkout", "-q", "-b", "main"]);
    let on_main = f.commit(&[("f", b"main")], &[], "main");
    git(&f.src(), &["checkout", "-q", "-b", "master"]);
    git(&f.src(), &["checkout", "-q", "trunk"]);
    let second = f.commit(&[("f", b"2")], &[], "two");

    let mirror = f.local_mirror();
    // Before any fetch there is no default branch.
    assert_eq!(mirror.default_branch().expect("default"), None);
    assert!(matches!(
        mirror.resolve(&GitRef::DefaultBranch),
        Err(Error::NotFound(_))
    ));

    mirror.fetch().expect("fetch");
    // `trunk` although `main` and `master` exist: it comes from the remote's HEAD.
    assert_eq!(
        mirror.default_branch().expect("default").as_deref(),
        Some("trunk")
    );
    let resolve = |r: GitRef| mirror.resolve(&r);
    assert_eq!(resolve(GitRef::DefaultBranch).expect("default"), second);
    assert_eq!(
        resolve(GitRef::Branch("trunk".into())).expect("trunk"),
        second
    );
    assert_eq!(
        resolve(GitRef::Branch("main".into())).expect("main"),
        on_main
    );
    assert_eq!(resolve(GitRef::Tag("light".into())).expect("light"), first);
    assert_eq!(
        resolve(GitRef::Tag("annotated".into())).expect("annotated"),
        first
    );
    assert_eq!(
        resolve(GitRef::Commit(first.to_hex())).expect("commit"),
        first
    );
    assert!(matches!(
        resolve(GitRef::Branch("nope".into())),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        resolve(GitRef::Tag("nope".into())),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        resolve(GitRef::Commit("0".repeat(40))),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        resolve(GitRef::Commit("abc".into())),
        Err(Error::InvalidCommitId(_))
    ));
    assert!(matches!(
        resolve(GitRef::Branch("../HEAD".into())),
        Err(Error::InvalidRefName(_))
    ));

    // The remote switches its default branch: the next fetch follows.
    git(&f.src(), &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let outcome = mirror.fetch().expect("fetch");
    assert_eq!(outcome.default_branch.as_deref(), Some("main"));
    assert_eq!(resolve(GitRef::DefaultBranch).expect("default"), on_main);
}

/// `in_history`: a commit on the branch, or the branch's tip, is in its history; one of
/// another branch is not, nor is one beyond the walk's limit.
#[test]
fn a_commit_is_in_a_branchs_history_only_if_the_branch_reaches_it() {
    let f = Fixture::new("main");
    let first = f.commit(&[("f", b"1")], &[], "one");
    git(&f.src(), &["checkout", "-q", "-b", "side"]);
    let side = f.commit(&[("f", b"side")], &[], "side");
    git(&f.src(), &["checkout", "-q", "main"]);
    let second = f.commit(&[("f", b"2")], &[], "two");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");
    let in_main = |c: &CommitId, limit| mirror.in_history(c, &second, limit).expect("walk");
    assert!(in_main(&second, 10));
    assert!(in_main(&first, 10));
    assert!(!in_main(&side, 10), "a commit of another branch");
    assert!(!in_main(&first, 1), "beyond the limit");
}

#[test]
fn default_branch_falls_back_to_main_then_master() {
    let f = Fixture::new("master");
    f.commit(&[("f", b"1")], &[], "one");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");
    assert_eq!(
        mirror.default_branch().expect("default").as_deref(),
        Some("master")
    );
    // The remote's HEAD points at a branch that does not exist: fall back.
    git(&f.src(), &["branch", "-q", "main"]);
    git(&f.src(), &["symbolic-ref", "HEAD", "refs/heads/gone"]);
    mirror.fetch().expect("fetch");
    assert_eq!(
        mirror.default_branch().expect("default").as_deref(),
        Some("main")
    );
}

#[test]
fn force_updates_and_prunes_like_a_mirror() {
    let f = Fixture::new("main");
    f.commit(&[("f", b"1")], &[], "one");
    git(&f.src(), &["branch", "-q", "feature"]);
    git(&f.src(), &["tag", "v1"]);
    let rewritten_away = f.commit(&[("f", b"2")], &[], "two");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("main"),
        rewritten_away
    );

    // Rewrite history (non-fast-forward) and delete a branch and a tag.
    git(&f.src(), &["commit", "-q", "--amend", "-m", "two, amended"]);
    let amended = f.head();
    git(&f.src(), &["branch", "-q", "-D", "feature"]);
    git(&f.src(), &["tag", "-d", "v1"]);
    let outcome = mirror.fetch().expect("fetch");
    let mut names: Vec<&str> = outcome.changes.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["refs/heads/feature", "refs/heads/main", "refs/tags/v1"]
    );
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("main"),
        amended
    );
    assert!(matches!(
        mirror.resolve(&GitRef::Branch("feature".into())),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        mirror.resolve(&GitRef::Tag("v1".into())),
        Err(Error::NotFound(_))
    ));
    // The rewritten-away commit's objects are still there: only a repack (after more fetches
    // than this test makes) drops objects no ref reaches.
    assert_eq!(read(&mirror, &rewritten_away, "f").as_deref(), Some("2"));
}

/// A submodule's files are not fetched: its gitlink is listed as such, so the caller can say
/// what is missing instead of skipping it silently.
#[test]
fn submodules_are_listed_as_such() {
    let f = Fixture::new("main");
    let lib = GitRepo::init(&f.repos().join("lib"));
    lib.commit(&[("crd.yaml", Some(&b"kind: X"[..]))], "lib");
    f.commit(&[("manifests/a.yaml", b"a")], &[], "a");
    let commit = CommitId::from_hex(&f.repo.add_submodule(&lib.dir, "manifests/lib", "lib"))
        .expect("commit id");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");
    let listed = mirror.list_files(&commit, "manifests", 100).expect("list");
    let submodules: Vec<(&str, bool)> = listed
        .iter()
        .map(|e| (e.path.as_str(), e.submodule))
        .collect();
    assert_eq!(
        submodules,
        [("manifests/a.yaml", false), ("manifests/lib", true)]
    );
}

#[test]
fn list_files_prefix_dot_dirs_and_limit() {
    let f = Fixture::new("main");
    let commit = f.commit(
        &[
            ("root.yaml", b"r"),
            (".gitignore", b"x"),
            (".gitlab/ci.yml", b"ci"),
            (".git-hidden/x.yaml", b"x"),
            ("manifests/a.yaml", b"aaa"),
            ("manifests/sub/b.yaml", b"bb"),
            ("manifests/.hidden/c.yaml", b"c"),
            ("manifests-other/d.yaml", b"d"),
        ],
        &[],
        "tree",
    );
    std::os::unix::fs::symlink("root.yaml", f.src().join("manifests/link")).expect("symlink");
    let commit_with_link = f.commit(&[], &[], "link");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");

    let entry = |path: &str, size: u64| FileEntry {
        path: path.to_owned(),
        size,
        symlink: false,
        submodule: false,
    };
    assert_eq!(
        mirror.list_files(&commit, "", 100).expect("list"),
        vec![
            entry(".gitignore", 1),
            entry("manifests-other/d.yaml", 1),
            entry("manifests/a.yaml", 3),
            entry("manifests/sub/b.yaml", 2),
            entry("root.yaml", 1),
        ]
    );
    let under_manifests = vec![
        entry("manifests/a.yaml", 3),
        entry("manifests/sub/b.yaml", 2),
    ];
    for prefix in ["manifests", "manifests/", "/manifests/"] {
        assert_eq!(
            mirror.list_files(&commit, prefix, 100).expect("list"),
            under_manifests,
            "{prefix}"
        );
    }
    // Symlinks are listed as such (the caller says it skips them).
    let mut with_link = under_manifests.clone();
    with_link.insert(
        1,
        FileEntry {
            path: "manifests/link".to_owned(),
            size: "root.yaml".len() as u64,
            symlink: true,
            submodule: false,
        },
    );
    assert_eq!(
        mirror
            .list_files(&commit_with_link, "manifests", 100)
            .expect("list"),
        with_link
    );
    assert_eq!(
        mirror
            .list_files(&commit, "manifests/sub", 100)
            .expect("list"),
        vec![entry("manifests/sub/b.yaml", 2)]
    );
    assert_eq!(
        mirror.list_files(&commit, "nope", 100).expect("list"),
        vec![]
    );
    assert_eq!(
        mirror.list_files(&commit, "root.yaml", 100).expect("list"),
        vec![]
    );
    assert!(matches!(
        mirror.list_files(&commit, "../x", 100),
        Err(Error::InvalidPath(_))
    ));

    // manifests/ has a.yaml, sub, .hidden (3), then sub/ has b.yaml (1): 4 visits.
    assert_eq!(
        mirror
            .list_files(&commit, "manifests", 4)
            .map(|v| v.len())
            .ok(),
        Some(2)
    );
    let err = mirror
        .list_files(&commit, "manifests", 3)
        .expect_err("over the limit");
    assert!(
        matches!(err, Error::TooManyEntries { limit: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("narrower path"), "{err}");
}

#[test]
fn too_large_is_checked_before_reading() {
    let f = Fixture::new("main");
    let commit = f.commit(&[("big", &[b'x'; 100])], &[], "big");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");
    let err = mirror.read_file(&commit, "big", 99).expect_err("too large");
    assert!(
        matches!(
            err,
            Error::TooLarge {
                size: 100,
                limit: 99,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        mirror
            .read_file(&commit, "big", 100)
            .expect("read")
            .map(|b| b.len()),
        Some(100)
    );
}

#[test]
fn failed_fetch_keeps_previous_data() {
    let f = Fixture::new("main");
    let commit = f.commit(&[("app.yaml", b"kept")], &[], "one");
    let mirror = f.local_mirror();
    mirror.fetch().expect("fetch");

    // The remote disappears.
    std::fs::rename(f.src(), f.repos().join("moved")).expect("rename");
    let err = mirror.fetch().expect_err("remote is gone");
    assert!(
        matches!(err, Error::Fetch(FetchError::NotARepository { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a Git repository"), "{err}");
    assert_eq!(read(&mirror, &commit, "app.yaml").as_deref(), Some("kept"));
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        commit
    );

    // A path that exists but is not a repository.
    let not_repo = f.tmp.path().join("empty");
    std::fs::create_dir_all(&not_repo).expect("mkdir");
    let other = Mirror::open_or_init(f.cache("local"), Remote::local(&not_repo)).expect("mirror");
    let err = other.fetch().expect_err("not a repository");
    assert!(
        matches!(err, Error::Fetch(FetchError::NotARepository { .. })),
        "{err:?}"
    );
    assert_eq!(read(&other, &commit, "app.yaml").as_deref(), Some("kept"));
}

#[test]
fn open_rejects_non_mirror_directories() {
    let f = Fixture::new("main");
    f.commit(&[("f", b"1")], &[], "one");
    // A work-tree repository is not a mirror.
    assert!(matches!(
        Mirror::open_or_init(f.src(), Remote::local("/nonexistent")),
        Err(Error::NotBare { .. })
    ));
    // A directory with unrelated content is left alone.
    let junk = f.tmp.path().join("junk");
    std::fs::create_dir_all(&junk).expect("mkdir");
    std::fs::write(junk.join("file"), "x").expect("write");
    assert!(matches!(
        Mirror::open_or_init(&junk, Remote::local("/nonexistent")),
        Err(Error::Open { .. })
    ));
    assert!(junk.join("file").exists());
}

#[tokio::test]
async fn fetch_async_runs_on_the_blocking_pool() {
    let f = Fixture::new("main");
    let commit = f.commit(&[("a", b"async")], &[], "one");
    let mirror = f.local_mirror();
    let outcome = mirror.fetch_async().await.expect("fetch");
    assert!(outcome.changed());
    assert_eq!(read(&mirror, &commit, "a").as_deref(), Some("async"));
}

#[test]
fn git_daemon_transport() {
    let f = Fixture::new("trunk");
    let first = f.commit(&[("deploy/app.yaml", b"v1")], &[], "one");
    let daemon = GitDaemon::start(&f.repos());
    let remote = Remote::parse(&daemon.url("project")).expect("remote");
    assert_eq!(remote.kind(), RemoteKind::Git);
    let mirror = Mirror::open_or_init(f.cache("daemon"), remote).expect("mirror");

    let outcome = mirror.fetch().expect("fetch over git://");
    assert_eq!(outcome.default_branch.as_deref(), Some("trunk"));
    assert_eq!(
        read(&mirror, &first, "deploy/app.yaml").as_deref(),
        Some("v1")
    );

    let second = f.commit(&[("deploy/app.yaml", b"v2")], &[], "two");
    mirror.fetch().expect("second fetch over git://");
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        second
    );
    assert_eq!(
        read(&mirror, &second, "deploy/app.yaml").as_deref(),
        Some("v2")
    );
    assert_eq!(
        read(&mirror, &first, "deploy/app.yaml").as_deref(),
        Some("v1")
    );

    // A repository the daemon does not have.
    let missing = Mirror::open_or_init(
        f.cache("daemon-missing"),
        Remote::parse(&daemon.url("nope")).expect("remote"),
    )
    .expect("mirror");
    let err = missing.fetch().expect_err("no such repository");
    assert!(
        matches!(err, Error::Fetch(FetchError::NotARepository { .. })),
        "{err:?}"
    );

    // Nothing listens: unreachable, and the mirror keeps what it had.
    drop(daemon);
    let remote = Remote::parse("git://127.0.0.1:1/project").expect("remote");
    let unreachable = Mirror::open_or_init(f.cache("daemon"), remote).expect("mirror");
    let err = unreachable.fetch().expect_err("nothing listens");
    assert!(
        matches!(err, Error::Fetch(FetchError::Unreachable { .. })),
        "{err:?}"
    );
    assert_eq!(
        read(&unreachable, &second, "deploy/app.yaml").as_deref(),
        Some("v2")
    );
}

/// An HTTP server that answers every request with `401`, as a forge does for a private project
/// without credentials. Serves requests until the test process ends.
fn unauthorized_http_server() -> u16 {
    let (listener, addr) = listener();
    let port = addr.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    port
}

#[test]
fn http_auth_and_unreachable_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = unauthorized_http_server();
    let remote =
        Remote::parse(&format!("http://127.0.0.1:{port}/group/project.git")).expect("remote");
    let mirror = Mirror::open_or_init(tmp.path().join("http.git"), remote).expect("mirror");
    let err = mirror.fetch().expect_err("401");
    assert!(
        matches!(err, Error::Fetch(FetchError::Auth { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("none are configured"), "{err}");

    // Port 1 (tcpmux) has no listener on a test machine, unlike a "free" port picked
    // earlier, which a parallel test may take in between.
    let closed = 1;
    let remote = Remote::parse(&format!("http://127.0.0.1:{closed}/p.git")).expect("remote");
    let mirror = Mirror::open_or_init(tmp.path().join("closed.git"), remote).expect("mirror");
    let err = mirror.fetch().expect_err("nothing listens");
    assert!(
        matches!(err, Error::Fetch(FetchError::Unreachable { .. })),
        "{err:?}"
    );
}

/// A minimal HTTP/1.1 server running `git http-backend` as a CGI program per request, one
/// connection per request (`Connection: close`). Serves until the test process ends.
fn git_http_server(project_root: PathBuf) -> u16 {
    let (listener, addr) = listener();
    let port = addr.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let root = project_root.clone();
            std::thread::spawn(move || {
                let _ = serve_cgi(stream, &root);
            });
        }
    });
    port
}

fn serve_cgi(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    use std::io::BufRead;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = header("content-length") {
        let len: usize = len.parse().unwrap_or(0);
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(protocol) = header("git-protocol") {
        cmd.env("GIT_PROTOCOL", protocol);
    }
    if let Some(encoding) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", encoding);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output()?;
    let _ = writer.join();
    // CGI output: headers, blank line, body. `Status:` becomes the status line.
    let out = output.stdout;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            out.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        })
        .unwrap_or((out.len(), out.len()));
    let cgi_headers = String::from_utf8_lossy(&out[..split.0]).into_owned();
    let mut status = "200 OK".to_owned();
    let mut response = Vec::new();
    for line in cgi_headers.lines() {
        if let Some(s) = line.strip_prefix("Status:") {
            status = s.trim().to_owned();
        } else if !line.is_empty() {
            response.extend_from_slice(line.as_bytes());
            response.extend_from_slice(b"\r\n");
        }
    }
    let body = &out[split.1..];
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&response)?;
    stream.write_all(b"\r\n")?;
    stream.write_all(body)?;
    stream.flush()
}

#[test]
fn http_smart_transport_via_git_http_backend() {
    let f = Fixture::new("trunk");
    let first = f.commit(&[("k8s/app.yaml", b"http v1")], &[], "one");
    let port = git_http_server(f.repos());
    let url = format!("http://127.0.0.1:{port}/project");
    let mirror = Mirror::open_or_init(f.cache("http"), Remote::parse(&url).expect("remote"))
        .expect("mirror");
    let outcome = mirror.fetch().expect("fetch over http");
    assert_eq!(outcome.default_branch.as_deref(), Some("trunk"));
    assert_eq!(
        read(&mirror, &first, "k8s/app.yaml").as_deref(),
        Some("http v1")
    );

    let second = f.commit(&[("k8s/app.yaml", b"http v2")], &[], "two");
    mirror.fetch().expect("second fetch over http");
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        second
    );
    assert_eq!(
        read(&mirror, &second, "k8s/app.yaml").as_deref(),
        Some("http v2")
    );

    let missing = Mirror::open_or_init(
        f.cache("http-missing"),
        Remote::parse(&format!("http://127.0.0.1:{port}/nope")).expect("remote"),
    )
    .expect("mirror");
    let err = missing.fetch().expect_err("no such repository");
    assert!(
        matches!(err, Error::Fetch(FetchError::NotARepository { .. })),
        "{err:?}"
    );
}

#[test]
fn empty_remote_is_not_an_error() {
    let f = Fixture::new("main");
    let mirror = f.local_mirror();
    let outcome = mirror.fetch().expect("fetch of an empty repository");
    assert!(!outcome.changed());
    assert_eq!(outcome.default_branch, None);
    // The first commit arrives later.
    let commit = f.commit(&[("a", b"1")], &[], "one");
    mirror.fetch().expect("fetch");
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        commit
    );
}

/// The first head `done` holds for (within 20 s).
async fn head_until(
    mut head: tokio::sync::watch::Receiver<tether_git_source::ProjectHead>,
    done: fn(&tether_git_source::ProjectHead) -> bool,
) -> tether_git_source::ProjectHead {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let h = head.borrow_and_update().clone();
            if done(&h) {
                return h;
            }
            head.changed().await.expect("head");
        }
    })
    .await
    .expect("the head should get there")
}

/// `git_projects_failing` as `sources` exports it.
fn projects_failing(sources: &tether_git_source::Sources) -> Option<String> {
    let mut reg = prometheus_client::registry::Registry::default();
    sources.metrics().register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
    text.lines()
        .find_map(|l| l.strip_prefix("git_projects_failing "))
        .map(str::to_owned)
}

/// The followed branch deleted on the remote is a failing fetch, not an empty repository: the
/// last good commit stays published with an error that says what happened (it used to be a
/// successful fetch of no commit), also for a kas restarted meanwhile, which knows no commit;
/// the branch pushed again clears it. A repository nothing was pushed to is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_default_branch_fails_the_fetch_and_keeps_the_last_good_commit() {
    use tether_git_source::{ProjectHead, ProjectSpec, Sources};

    let f = Fixture::new("main");
    let c1 = f.commit(&[("a", b"1")], &[], "one");
    let empty = GitRepo::init_on(&f.repos().join("empty"), "main");
    let spec = |id: i64, dir: PathBuf| ProjectSpec {
        id,
        path: format!("group/p{id}"),
        remote: Some(Remote::local(dir)),
        verify: None,
    };
    let until = |sources: &std::sync::Arc<Sources>, id: i64, done: fn(&ProjectHead) -> bool| {
        head_until(sources.watch(id), done)
    };
    let start = || {
        Sources::new(
            f.cache("sources"),
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
    };
    let sources = start();
    let failing = |sources: &std::sync::Arc<Sources>| projects_failing(sources);
    let gauge_becomes = |sources: &std::sync::Arc<Sources>, want: &'static str| {
        let sources = std::sync::Arc::clone(sources);
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while projects_failing(&sources).as_deref() != Some(want) {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the gauge should follow the head");
        }
    };
    sources.upsert(spec(1, f.src())).expect("upsert");
    sources.upsert(spec(2, empty.dir.clone())).expect("upsert");
    until(&sources, 1, |h| h.commit.is_some()).await;
    let nothing = until(&sources, 2, |h| h.fetches >= 1).await;
    assert_eq!((nothing.commit, nothing.error), (None, None));

    f.repo.git(&["checkout", "--detach"]);
    f.repo.git(&["branch", "-D", "main"]);
    let gone = until(&sources, 1, |h| h.error.is_some()).await;
    assert_eq!(gone.commit, Some(c1));
    let error = gone.error.unwrap_or_default();
    assert!(
        error.contains("no default branch") && error.contains("deleted?"),
        "{error}"
    );
    // The one failing project among healthy ones shows (alert TetherGitProjectFetchFailing),
    // counted right after the head is published.
    gauge_becomes(&sources, "1").await;
    sources.remove(1);
    assert_eq!(failing(&sources).as_deref(), Some("0"));
    sources.shutdown();
    // Its mirror goes in the background, once the fetch running in it has ended.
    let cache = f.cache("sources");
    wait_until(20, "the removed project's mirror deleted", || {
        std::fs::read_dir(&cache)
            .expect("cache")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("1-"))
    });

    // A restarted kas: the mirror no longer has the branch, yet the fetch fails all the same.
    let again = start();
    again.upsert(spec(1, f.src())).expect("upsert");
    let first = until(&again, 1, |h| h.error.is_some() || h.fetches >= 1).await;
    assert!(first.error.is_some(), "{first:?}");

    f.repo.git(&["checkout", "-b", "main"]);
    let back = until(&again, 1, |h| h.error.is_none() && h.commit.is_some()).await;
    assert_eq!(back.commit, Some(c1));
    gauge_becomes(&again, "0").await;
    again.shutdown();
}

/// A project moved to a remote that does not answer yet keeps serving its last good commit
/// from the former remote's mirror (its files stay readable: drift correction and reconciles go
/// on), with the new remote's error published; once a remote answers, its commit is served
/// and the former mirror goes. The former mirror used to be deleted at once, so the last good
/// commit's files were gone until the new remote answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_moved_to_a_silent_remote_keeps_serving_its_last_good_commit() {
    use tether_git_source::{ProjectHead, ProjectSpec, Sources};

    let f = Fixture::new("main");
    let c1 = f.commit(&[("a", b"1")], &[], "one");
    let (silent, addr) = listener();
    let spec = |remote: Remote| ProjectSpec {
        id: 4,
        path: "group/moved".into(),
        remote: Some(remote),
        verify: None,
    };
    let sources = Sources::new(
        f.cache("sources"),
        Duration::from_millis(200),
        Duration::from_millis(300),
    );
    let until = |done: fn(&ProjectHead) -> bool| head_until(sources.watch(4), done);
    sources
        .upsert(spec(Remote::local(f.src())))
        .expect("upsert");
    until(|h| h.commit.is_some()).await;

    let port = addr.port();
    sources
        .upsert(spec(
            Remote::parse(&format!("git://127.0.0.1:{port}/r")).expect("remote"),
        ))
        .expect("upsert");
    let failing = until(|h| h.error.is_some()).await;
    assert_eq!(failing.commit, Some(c1));
    let mirror = sources.mirror(4).expect("a mirror");
    assert_eq!(read(&mirror, &c1, "a").as_deref(), Some("1"));

    let other = GitRepo::init_on(&f.repos().join("other"), "main");
    let c2 = CommitId::from_hex(&other.commit_files(&[("a", b"2")], &[], "two")).expect("id");
    sources
        .upsert(spec(Remote::local(other.dir.clone())))
        .expect("upsert");
    let moved = until(|h| h.error.is_none() && h.fetches >= 2).await;
    assert_eq!(moved.commit, Some(c2));
    let mirror = sources.mirror(4).expect("a mirror");
    assert_eq!(read(&mirror, &c2, "a").as_deref(), Some("2"));
    let left: Vec<_> = std::fs::read_dir(f.cache("sources"))
        .expect("cache")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("4-"))
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    sources.shutdown();
    drop(silent);
}

/// A server that accepts connections and never answers must not stop updates: the fetch
/// times out, the error is published, and the last good commit stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_time_out_a_silent_server_and_keep_the_last_good_commit() {
    use std::time::Duration;
    use tether_git_source::{ProjectSpec, Sources};

    let f = Fixture::new("main");
    let (silent, addr) = listener();
    let port = addr.port();
    let sources = Sources::new(
        f.cache("sources"),
        Duration::from_millis(200),
        Duration::from_millis(500),
    );
    let mut head = sources.watch(7);
    sources
        .upsert(ProjectSpec {
            id: 7,
            path: "group/silent".into(),
            remote: Some(Remote::parse(&format!("git://127.0.0.1:{port}/r")).expect("remote")),
            verify: None,
        })
        .expect("upsert");
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            head.changed().await.expect("head");
            let h = head.borrow().clone();
            if h.error.is_some() {
                break h;
            }
        }
    })
    .await
    .expect("the silent server's fetch should time out");
    assert!(
        seen.error
            .as_deref()
            .is_some_and(|e| e.contains("no answer within")),
        "{seen:?}"
    );
    assert_eq!(seen.commit, None);
    assert_eq!(seen.fetches, 0);
    sources.shutdown();
    drop(silent);
}

/// Mirrors no project uses any more go: a former remote's folder when the remote changes, and
/// at start (`sweep_cache`) those of projects removed while kas was down and deletions a kill
/// -9 interrupted. Nothing else in the cache folder is touched, symlinked folders included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_no_project_uses_are_deleted_and_nothing_else() {
    use std::time::Duration;
    use tether_git_source::{ProjectSpec, Sources};

    let f = Fixture::new("main");
    f.commit(&[("a.txt", b"a")], &[], "first");
    let cache = f.tmp.path().join("cache");
    std::fs::create_dir_all(&cache).expect("test setup");
    let sources = Sources::new(
        cache.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(10),
    );
    let spec = |remote: &Path| ProjectSpec {
        id: 3,
        path: "group/p".into(),
        remote: Some(Remote::parse(&remote.display().to_string()).expect("test setup")),
        verify: None,
    };
    sources.upsert(spec(&f.src())).expect("test setup");
    let first: Vec<PathBuf> = mirrors(&cache);
    assert_eq!(first.len(), 1, "{first:?}");

    // The remote changes: the former mirror goes, the new one stays.
    let moved = f.repos().join("moved");
    git(
        &f.repos(),
        &[
            "clone",
            "-q",
            "--bare",
            &f.src().display().to_string(),
            "moved",
        ],
    );
    sources.upsert(spec(&moved)).expect("test setup");
    // Once the fetch running in it has ended: renamed away under that fetch, the folder was
    // made again by its last ref write (a lone HEAD), and stayed (seen in 3 runs of 40 on a
    // loaded machine).
    let deadline = Instant::now() + Duration::from_secs(30);
    let entries = || std::fs::read_dir(&cache).expect("cache").count();
    while first[0].exists() || entries() > 1 {
        assert!(
            Instant::now() < deadline,
            "the former remote's mirror is still there: {:?}",
            std::fs::read_dir(&cache)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let current = mirrors(&cache);
    assert_eq!(current.len(), 1, "{current:?}");

    // Left by projects removed while kas was down, and by an interrupted deletion; and what
    // is not ours: a symlinked folder with a mirror's name, a file, another name.
    for stale in ["9-0a1b2c.git", ".removed-4-abcdef.git-17"] {
        std::fs::create_dir_all(cache.join(stale).join("objects")).expect("test setup");
    }
    let elsewhere = f.tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("test setup");
    std::os::unix::fs::symlink(&elsewhere, cache.join("8-0a1b2c.git")).expect("test setup");
    std::fs::write(cache.join("7-0a1b2c.git"), b"a file").expect("test setup");
    std::fs::create_dir_all(cache.join("notes")).expect("test setup");
    assert_eq!(sources.sweep_cache(), 2);
    assert!(!cache.join("9-0a1b2c.git").exists());
    assert!(!cache.join(".removed-4-abcdef.git-17").exists());
    assert!(current[0].exists(), "the mirror in use stays");
    assert!(elsewhere.exists() && cache.join("8-0a1b2c.git").exists());
    assert!(cache.join("7-0a1b2c.git").is_file() && cache.join("notes").is_dir());
    sources.shutdown();
}

/// The mirror folders (`{id}-{hash}.git`) in `cache`.
fn mirrors(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache)
        .expect("test setup")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "git"))
        .collect()
}

/// A git:// server that accepts its first connection and then says nothing (holding it open
/// until the test process ends, like a host whose connection went half-open), and forwards
/// every later connection to the real `git daemon` on `daemon_port`.
fn silent_once_then_forward(daemon_port: u16) -> u16 {
    silent_once_then_forward_telling(daemon_port).0
}

/// [`silent_once_then_forward`], telling on the channel when it has taken the connection it
/// holds (a fetch is then under way and hung).
fn silent_once_then_forward_telling(daemon_port: u16) -> (u16, std::sync::mpsc::Receiver<()>) {
    let (listener, addr) = listener();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(client) = stream else { continue };
            if i == 0 {
                held.push(client);
                let _ = held_tx.send(());
                continue;
            }
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", daemon_port)) else {
                continue;
            };
            forward(client, upstream);
        }
    });
    (addr.port(), held_rx)
}

/// Copies bytes both ways between `a` and `b` on two threads, passing on each half-close.
fn forward(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [
        (a.try_clone(), b.try_clone()),
        (b.try_clone(), a.try_clone()),
    ]
    .map(|(x, y)| (x.expect("clone"), y.expect("clone")))
    {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// A fetch hung on a silent connection must not keep the project from updating: once its
/// timeout fires the fetch is interrupted (its connection closed, the mirror's fetch lock
/// released), the error is published, and the next fetch, once the host answers again,
/// publishes the commit.
///
/// A plain `#[test]` with its own runtime: a fetch thread that is never interrupted would make
/// dropping a `#[tokio::test]` runtime wait for it forever instead of failing the test.
#[test]
fn sources_interrupt_a_hung_fetch_and_the_next_one_publishes_the_commit() {
    use tether_git_source::{ProjectHead, ProjectSpec};

    let f = Fixture::new("main");
    let commit = f.commit(&[("a", b"1")], &[], "one");
    let daemon = GitDaemon::start(&f.repos());
    let port = silent_once_then_forward(daemon.port);
    // A poll interval far beyond the test: only the retry after the failure fetches again.
    let (runtime, sources) = runtime_and_sources(&f, Duration::from_millis(500));
    let remote = Remote::parse(&format!("git://127.0.0.1:{port}/project")).expect("remote");
    let (timed_out, published) = runtime.block_on(async {
        let mut head = sources.watch(9);
        let spec = ProjectSpec {
            id: 9,
            path: "group/hangs-once".into(),
            remote: Some(remote),
            verify: None,
        };
        sources.upsert(spec).expect("upsert");
        let mut timed_out = None;
        // No assertion in here: a panic would drop the runtime, which waits for a hung fetch.
        let published = tokio::time::timeout(Duration::from_secs(20), async {
            while head.changed().await.is_ok() {
                let h: ProjectHead = head.borrow().clone();
                timed_out = timed_out.take().or(h.error.clone());
                if h.commit.is_some() {
                    return Some(h);
                }
            }
            None
        })
        .await;
        (timed_out, published.ok().flatten())
    });
    sources.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(5));
    assert!(
        timed_out
            .as_deref()
            .is_some_and(|e| e.contains("no answer within")),
        "the hung fetch's timeout should be published first: {timed_out:?}"
    );
    let h = published.expect("the fetch after the hung one should publish the commit");
    assert_eq!((h.commit, h.error, h.fetches), (Some(commit), None, 1));
}

/// A fetch asked for (kas's reconcile after a push) is answered only by a fetch that starts
/// after the request: one already running may have read the remote before the push. Here the
/// running one hangs and fails; the request is answered by the next, which brings the pushed
/// commit (it used to be answered by the hung one's failure).
#[test]
fn a_requested_fetch_is_answered_by_a_fetch_started_after_the_request() {
    use tether_git_source::ProjectSpec;

    let f = Fixture::new("main");
    f.commit(&[("a", b"1")], &[], "one");
    let daemon = GitDaemon::start(&f.repos());
    let (port, held) = silent_once_then_forward_telling(daemon.port);
    let (runtime, sources) = runtime_and_sources(&f, Duration::from_secs(2));
    let remote = Remote::parse(&format!("git://127.0.0.1:{port}/project")).expect("remote");
    let in_runtime = runtime.enter();
    sources
        .upsert(ProjectSpec {
            id: 5,
            path: "group/requested".into(),
            remote: Some(remote),
            verify: None,
        })
        .expect("upsert");
    drop(in_runtime);
    held.recv_timeout(Duration::from_secs(20))
        .expect("the first fetch connects");
    let pushed = f.commit(&[("a", b"2")], &[], "two");
    let asked = sources.request_fetch(5).expect("mirrored");
    let answered = runtime.block_on(async {
        let mut head = sources.watch(5);
        let done = head.wait_for(|h| h.served >= asked);
        // No assertion in here: a panic would drop the runtime, which waits for a hung fetch.
        tokio::time::timeout(Duration::from_secs(20), done)
            .await
            .ok()
            .and_then(Result::ok)
            .map(|h| h.clone())
    });
    sources.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let h = answered.expect("the request should be answered");
    assert_eq!((h.commit, h.error), (Some(pushed), None));
}

/// A runtime of its own (see the hung-fetch tests: dropping it must not wait forever) and
/// sources that poll only when asked (or to retry), with `fetch_timeout`.
fn runtime_and_sources(
    f: &Fixture,
    fetch_timeout: Duration,
) -> (
    tokio::runtime::Runtime,
    std::sync::Arc<tether_git_source::Sources>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sources = tether_git_source::Sources::new(
        f.cache("sources"),
        Duration::from_secs(600),
        fetch_timeout,
    );
    (runtime, sources)
}

/// `.pack` and `.keep` files in a mirror's `objects/pack`.
fn pack_files(mirror: &Mirror, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(mirror.dir().join("objects/pack"))
        .expect("objects/pack")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect()
}

/// Production defect: every fetch added a pack and gix's object store, sized when the mirror was
/// opened, ran out of index slots after about 32 packs ("too few index slots"). Many fetches
/// into one mirror must keep working, with the pack count bounded by maintenance.
#[test]
fn many_fetches_stay_readable_and_bounded() {
    let f = Fixture::new("main");
    let mirror = f.local_mirror();
    let mut repacks = 0;
    for i in 0..64 {
        commit_fetch_and_check(&f, &mirror, i);
        let packs = pack_files(&mirror, "pack").len();
        assert!(
            packs <= Mirror::PACK_THRESHOLD,
            "{packs} packs after fetch {i}"
        );
        assert_eq!(mirror.maintenance_status().packs, packs);
        assert_eq!(
            pack_files(&mirror, "keep"),
            Vec::<PathBuf>::new(),
            "fetch {i}"
        );
        assert_eq!(temp_files(&mirror), Vec::<PathBuf>::new(), "fetch {i}");
        if packs == 1 && i > 0 {
            repacks += 1;
        }
    }
    assert!(
        repacks >= 64 / (Mirror::PACK_THRESHOLD + 1),
        "{repacks} repacks"
    );
}

/// Temporary files (gix's `.tmp*`, git's `tmp_*`) in a mirror's `objects/pack`.
fn temp_files(mirror: &Mirror) -> Vec<PathBuf> {
    std::fs::read_dir(mirror.dir().join("objects/pack"))
        .expect("objects/pack")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".tmp") || n.starts_with("tmp_"))
        })
        .collect()
}

/// Commits `version {i}` of `app.yaml`, fetches, and checks the mirror serves it.
fn commit_fetch_and_check(f: &Fixture, mirror: &Mirror, i: usize) -> CommitId {
    let content = format!("version {i}");
    let commit = f.commit(&[("app.yaml", content.as_bytes())], &[], &format!("c{i}"));
    mirror.fetch().unwrap_or_else(|e| panic!("fetch {i}: {e}"));
    let head = mirror
        .resolve(&GitRef::DefaultBranch)
        .unwrap_or_else(|e| panic!("resolve after fetch {i}: {e}"));
    assert_eq!(head, commit, "fetch {i}");
    assert_eq!(
        read(mirror, &commit, "app.yaml").as_deref(),
        Some(content.as_str()),
        "fetch {i}"
    );
    commit
}

/// A failed fetch must not leave a `.keep` (it would pin its pack forever) or temporary files,
/// and the next fetch must succeed.
#[test]
fn failed_fetches_leave_no_leftovers() {
    let f = Fixture::new("main");
    let mirror = f.local_mirror();
    commit_fetch_and_check(&f, &mirror, 0);

    // A stale ref lock (another git process, or one that crashed) makes the ref update fail
    // after the pack was received: gix leaves that pack's `.keep`.
    let new = f.commit(&[("app.yaml", b"locked out")], &[], "locked");
    let ref_lock = mirror.dir().join("refs/heads/main.lock");
    std::fs::write(&ref_lock, b"").expect("lock file");
    let err = mirror.fetch().expect_err("the ref is locked");
    assert!(matches!(err, Error::Fetch(_)), "{err:?}");
    assert_eq!(pack_files(&mirror, "keep"), Vec::<PathBuf>::new());
    assert_eq!(temp_files(&mirror), Vec::<PathBuf>::new());
    std::fs::remove_file(&ref_lock).expect("unlock");
    mirror.fetch().expect("fetch after the lock is gone");
    assert_eq!(mirror.resolve(&GitRef::DefaultBranch).expect("head"), new);

    // The remote disappears for a while.
    std::fs::rename(f.src(), f.repos().join("away")).expect("rename");
    mirror.fetch().expect_err("remote is gone");
    std::fs::rename(f.repos().join("away"), f.src()).expect("rename back");
    assert_eq!(pack_files(&mirror, "keep"), Vec::<PathBuf>::new());
    commit_fetch_and_check(&f, &mirror, 1);

    // What a killed fetch or repack leaves: temporary files, a pack without its index, and
    // a `.keep` beside a live pack. The next fetch removes them and keeps the live pack.
    let pack_dir = mirror.dir().join("objects/pack");
    let live = pack_files(&mirror, "pack");
    let planted = [
        ".tmp8fGh2k",
        "tmp_pack_Ab12Cd",
        "tmp_idx_Ab12Cd",
        "pack-0000000000000000000000000000000000000001.pack",
    ];
    for name in planted {
        std::fs::write(pack_dir.join(name), b"junk").expect("plant");
    }
    std::fs::write(live[0].with_extension("keep"), b"").expect("plant keep");
    commit_fetch_and_check(&f, &mirror, 2);
    for name in planted {
        assert!(!pack_dir.join(name).exists(), "{name} was not removed");
    }
    assert_eq!(pack_files(&mirror, "keep"), Vec::<PathBuf>::new());
    // 5 planted here, and at least the `.keep` of the fetch that failed on the ref lock.
    assert!(mirror.maintenance_status().leftovers_removed >= 6);
    // Every commit stays readable.
    let first = CommitId::from_hex(&git(&f.src(), &["rev-list", "--max-parents=0", "HEAD"]))
        .expect("root commit");
    assert_eq!(
        read(&mirror, &first, "app.yaml").as_deref(),
        Some("version 0")
    );
}

/// Reads from other threads never fail while fetches and repacks replace packs under them.
#[test]
fn reads_during_fetches_and_repacks_never_fail() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let f = Fixture::new("main");
    let mirror = f.local_mirror();
    let first = commit_fetch_and_check(&f, &mirror, 0);
    // What each fetched commit's app.yaml says, filled in before the commit is fetched.
    let expected = Arc::new(Mutex::new(HashMap::from([(first, "version 0".to_owned())])));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (mirror, expected) = (mirror.clone(), expected.clone());
            let (stop, reads) = (stop.clone(), reads.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let head = mirror.resolve(&GitRef::DefaultBranch).expect("resolve");
                    let want = expected.lock().expect("map").get(&head).cloned();
                    let got = mirror.read_file(&head, "app.yaml", MAX).expect("read head");
                    assert_eq!(got.map(String::from_utf8), want.map(Ok), "at {head}");
                    let old = mirror
                        .read_file(&first, "app.yaml", MAX)
                        .expect("read first");
                    assert_eq!(old.as_deref(), Some(&b"version 0"[..]));
                    let files = mirror.list_files(&head, "", 100).expect("list");
                    assert_eq!(files.len(), 1);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_until(10, "the readers to start", || {
        reads.load(Ordering::Relaxed) > 0
    });
    let reads_before = reads.load(Ordering::Relaxed);
    let mut repacks = 0;
    for i in 1..=40 {
        let content = format!("version {i}");
        let commit = f.commit(&[("app.yaml", content.as_bytes())], &[], &format!("c{i}"));
        expected.lock().expect("map").insert(commit, content);
        let outcome = mirror.fetch().expect("fetch");
        if let Some(report) = outcome.repack {
            assert_eq!(report.error, None);
            repacks += 1;
        }
    }
    let reads_during = reads.load(Ordering::Relaxed) - reads_before;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader
            .join()
            .expect("a reader failed (see its panic above)");
    }
    assert!(repacks >= 4, "only {repacks} repacks ran");
    assert!(
        reads_during > 40,
        "only {reads_during} reads ran during the fetches"
    );
}

/// A mirror repacked many times and opened again (kas restarted) reads and fetches; so does a
/// mirror left with many packs by a version without maintenance.
#[test]
fn reopened_mirrors_keep_working() {
    let f = Fixture::new("main");
    let mirror = f.local_mirror();
    let mut last = commit_fetch_and_check(&f, &mirror, 0);
    for i in 1..40 {
        last = commit_fetch_and_check(&f, &mirror, i);
    }
    drop(mirror);
    let reopened = f.local_mirror();
    assert_eq!(
        reopened.resolve(&GitRef::DefaultBranch).expect("head"),
        last
    );
    assert_eq!(
        read(&reopened, &last, "app.yaml").as_deref(),
        Some("version 39")
    );
    for i in 40..50 {
        commit_fetch_and_check(&f, &reopened, i);
    }

    // 40 packs, as the old code left them: real git keeping each fetch's pack.
    let old = f.cache("old");
    std::fs::create_dir_all(&old).expect("mkdir");
    git(&old, &["init", "-q", "--bare"]);
    let src = f.src().display().to_string();
    for i in 50..90 {
        f.commit(&[("app.yaml", format!("version {i}").as_bytes())], &[], "c");
        git(
            &old,
            &[
                "-c",
                "fetch.unpackLimit=1",
                "fetch",
                "-q",
                &src,
                "+refs/heads/*:refs/heads/*",
            ],
        );
    }
    let adopted = Mirror::open_or_init(&old, Remote::local(f.src())).expect("open");
    assert_eq!(pack_files(&adopted, "pack").len(), 40);
    let head = f.head();
    assert_eq!(
        read(&adopted, &head, "app.yaml").as_deref(),
        Some("version 89")
    );
    commit_fetch_and_check(&f, &adopted, 90);
    assert_eq!(pack_files(&adopted, "pack").len(), 1);
    assert_eq!(adopted.maintenance_status().packs, 1);
}

/// A repack that fails is reported, and the fetched commit stays readable.
#[test]
fn failed_repack_is_reported_and_keeps_the_fetched_commit() {
    let f = Fixture::new("main");
    let mirror = f.local_mirror();
    commit_fetch_and_check(&f, &mirror, 0);
    // git refuses to run with a bad value for a setting it reads; gix never reads it.
    let config = mirror.dir().join("config");
    let good = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        format!("{good}[repack]\n\tpackKeptObjects = maybe\n"),
    )
    .expect("bad");
    let mut failed = None;
    for i in 1..=Mirror::PACK_THRESHOLD {
        let content = format!("version {i}");
        let commit = f.commit(&[("app.yaml", content.as_bytes())], &[], "c");
        let outcome = mirror.fetch().expect("the fetch succeeds");
        assert_eq!(
            mirror.resolve(&GitRef::DefaultBranch).expect("head"),
            commit
        );
        assert_eq!(read(&mirror, &commit, "app.yaml"), Some(content));
        failed = failed.or(outcome.repack);
    }
    let report = failed.expect("a repack ran");
    let error = report.error.expect("and failed");
    assert!(error.to_lowercase().contains("packkeptobjects"), "{error}");
    assert_eq!(report.packs_after, report.packs_before);
    let status = mirror.maintenance_status();
    assert_eq!(status.last_repack.and_then(|r| r.error), Some(error));

    std::fs::write(&config, good).expect("fix config");
    let outcome = mirror.fetch().expect("fetch");
    let report = outcome.repack.expect("repacks again");
    assert_eq!((report.error, report.packs_after), (None, 1));
}

/// Polls `cond` until it holds, failing the test after `secs` seconds.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a restart the commit of the mirror on disk is published at once, before any fetch,
/// and stays while the remote is down; `succeeded_at` only moves on success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_publish_the_mirror_on_disk_at_once_after_a_restart() {
    use tether_git_source::{ProjectSpec, Sources};

    let f = Fixture::new("main");
    let c1 = f.commit(&[("a", b"1")], &[], "one");
    let spec = || ProjectSpec {
        id: 3,
        path: "group/p".into(),
        remote: Some(Remote::local(f.src())),
        verify: None,
    };
    let poll = Duration::from_secs(60);
    let first = Sources::new(f.cache("sources"), poll, Duration::from_secs(10));
    first.upsert(spec()).expect("upsert");
    wait_until(20, "the first fetch", || first.head(3).fetches > 0);
    let h = first.head(3);
    assert_eq!((h.commit, h.restored), (Some(c1), false));
    assert!(
        h.succeeded_at.is_some() && h.succeeded_at == h.fetched_at,
        "{h:?}"
    );
    first.shutdown();

    // kas restarts while the remote is down.
    std::fs::rename(f.src(), f.repos().join("away")).expect("rename");
    let second = Sources::new(f.cache("sources"), poll, Duration::from_secs(10));
    second.upsert(spec()).expect("upsert");
    let h = second.head(3);
    assert_eq!(
        (h.commit, h.restored, h.fetches),
        (Some(c1), true, 0),
        "{h:?}"
    );
    wait_until(20, "a failed fetch", || second.head(3).failures > 0);
    let h = second.head(3);
    assert_eq!(
        (h.commit, h.restored, h.succeeded_at),
        (Some(c1), true, None),
        "{h:?}"
    );
    assert!(h.fetched_at.is_some() && h.error.is_some(), "{h:?}");

    // The remote is back.
    std::fs::rename(f.repos().join("away"), f.src()).expect("rename back");
    let c2 = f.commit(&[("a", b"2")], &[], "two");
    second.trigger(3);
    wait_until(20, "a successful fetch", || second.head(3).fetches > 0);
    let h = second.head(3);
    assert_eq!(
        (h.commit, h.restored, h.error.clone()),
        (Some(c2), false, None),
        "{h:?}"
    );
    assert!(
        h.succeeded_at.is_some() && h.succeeded_at == h.fetched_at,
        "{h:?}"
    );
    second.shutdown();
}

/// Removing a project deletes its mirror, and only its mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_remove_deletes_the_mirror() {
    use tether_git_source::{ProjectSpec, Sources};

    let f = Fixture::new("main");
    f.commit(&[("a", b"1")], &[], "one");
    let cache = f.cache("sources");
    let sources = Sources::new(
        cache.clone(),
        Duration::from_secs(60),
        Duration::from_secs(10),
    );
    for id in [1, 2] {
        sources
            .upsert(ProjectSpec {
                id,
                path: format!("group/p{id}"),
                remote: Some(Remote::local(f.src())),
                verify: None,
            })
            .expect("upsert");
    }
    wait_until(20, "the first fetches", || {
        sources.head(1).fetches > 0 && sources.head(2).fetches > 0
    });
    let removed = sources.mirror(1).expect("mirror 1").dir().to_owned();
    let kept = sources.mirror(2).expect("mirror 2").dir().to_owned();
    sources.remove(1);
    wait_until(20, "the mirror's deletion", || {
        std::fs::read_dir(&cache).expect("cache").count() == 1
    });
    assert!(!removed.exists());
    assert!(kept.join("objects").is_dir());
    assert!(sources.mirror(1).is_none());
    sources.shutdown();
}

/// Forwards connections to the daemon, passing the first `free` bytes of each answer at once
/// and the rest in `chunk`-byte pieces `every` apart: a slow link, not a silent one.
fn throttled(daemon_port: u16, free: usize, chunk: usize, every: Duration) -> u16 {
    use std::io::{Read, Write};
    let (listener, addr) = listener();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(client) = stream else { continue };
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", daemon_port)) else {
                continue;
            };
            let (mut up_read, mut to_client) = (
                upstream.try_clone().expect("clone"),
                client.try_clone().expect("clone"),
            );
            let (mut from_client, mut to_up) = (client, upstream);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_up);
                let _ = to_up.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut sent, mut buf) = (0, vec![0u8; chunk]);
                loop {
                    let n = match up_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if to_client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                    if sent > free {
                        // The pace of the link, not a wait for something to happen.
                        std::thread::sleep(every);
                    }
                }
                let _ = to_client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr.port()
}

/// `len` bytes that do not compress, so the pack is as large as the file.
fn incompressible(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `git.fetch_timeout` is a deadline of inactivity: a fetch that keeps receiving over a slow
/// link succeeds although it takes several times the timeout (it used to fail "no answer
/// within" at the timeout, and a large repository never finished its first fetch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_keeps_receiving_is_not_cut_at_the_timeout() {
    let f = Fixture::new("main");
    let big = incompressible(400 * 1024);
    let commit = f.commit(&[("big.bin", &big)], &[], "big");
    let daemon = GitDaemon::start(&f.repos());
    // 400 KiB at 4 KiB per 20 ms: about 2 s, four times the timeout.
    let port = throttled(daemon.port, 8 * 1024, 4 * 1024, Duration::from_millis(20));
    let remote = Remote::parse(&format!("git://127.0.0.1:{port}/project")).expect("remote");
    let mirror = Mirror::open_or_init(f.cache("slow"), remote).expect("mirror");
    let timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    mirror
        .fetch_async_within(timeout)
        .await
        .expect("a fetch that keeps receiving succeeds");
    let took = started.elapsed();
    assert!(
        took > timeout * 2,
        "the link was meant to be slower than the timeout: {took:?}"
    );
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        commit
    );
}

/// The inactivity deadline has a cap: a server that trickles data forever does not hold the
/// project's fetches for good; it ends at 15 times the timeout, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_trickles_forever_ends_at_the_cap() {
    let f = Fixture::new("main");
    f.commit(&[("big.bin", &incompressible(4 * 1024 * 1024))], &[], "big");
    let daemon = GitDaemon::start(&f.repos());
    // 4 MiB at 4 KiB per 10 ms would take 10 s; the cap is 15 × 300 ms. (gix counts a
    // side-band packet, up to 64 KiB, once it is whole: 160 ms apart here.)
    let port = throttled(daemon.port, 8 * 1024, 4 * 1024, Duration::from_millis(10));
    let remote = Remote::parse(&format!("git://127.0.0.1:{port}/project")).expect("remote");
    let mirror = Mirror::open_or_init(f.cache("trickle"), remote).expect("mirror");
    let err = mirror
        .fetch_async_within(Duration::from_millis(300))
        .await
        .expect_err("the cap ends the fetch");
    assert!(
        err.to_string().contains("still running after 4.5s"),
        "{err}"
    );
}

/// A local repository missing an object: the fetch's error carries what `git upload-pack` said
/// about it (gix's own file transport dropped upload-pack's stderr, leaving only its opaque
/// protocol error).
#[test]
fn a_corrupt_local_remote_fails_with_what_upload_pack_said() {
    let f = Fixture::new("main");
    f.commit(&[("app.yaml", b"lost")], &[], "one");
    let blob = f.repo.git(&["rev-parse", "HEAD:app.yaml"]);
    let blob = blob.trim();
    let object = f
        .src()
        .join(".git/objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    std::fs::remove_file(&object).expect("remove the blob's loose object");
    let err = f.local_mirror().fetch().expect_err("an object is missing");
    let text = err.to_string();
    assert!(
        text.contains("(git upload-pack said: ")
            && text.contains("fatal: git upload-pack: aborting due to possible repository corruption on the remote side."),
        "{text}"
    );
}
