//! The rendering sandbox with real processes: a stand-in renderer (a shell script in the place
//! of kustomize) reports what it can see, and links that escape only when resolved are refused.
//! The real kustomize and helm are tested end to end in `kas/tests/rendering.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tether_git_source::{CommitId, GitRef, Mirror, Remote};
use tether_gitops_server::render::{RenderSpec, probe_sandbox};
use tether_gitops_server::{RenderConfig, RenderError, Renderer};
use tether_test_support::GitRepo;

/// Prints what the renderer sees as YAML comments: its environment and the network interfaces
/// of its network namespace (`/proc/net/dev`; `/sys/class/net` shows the mounter's).
const REPORTER: &str = "#!/bin/sh\n\
echo \"# env: $(/usr/bin/env | /usr/bin/cut -d= -f1 | /usr/bin/sort | /usr/bin/tr '\\n' ' ')\"\n\
echo \"# net: $(/usr/bin/tail -n +3 /proc/net/dev | /usr/bin/cut -d: -f1 | /usr/bin/tr -d ' ' | /usr/bin/tr '\\n' ' ')\"\n\
echo \"# dir: $2\"\n\
echo run >> \"$(/usr/bin/dirname \"$0\")/runs\"\n";

/// A repository with `links` (name, target) committed and mirrored, rendered once; the
/// outcome, the renderer, the mirror and the commit.
async fn render_with_reporter(
    tmp: &Path,
    links: &[(&str, &str)],
) -> (Result<String, RenderError>, Renderer, Mirror, CommitId) {
    let repo = GitRepo::init(&tmp.join("project"));
    for (name, target) in links {
        let link = repo.dir.join(name);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("folder");
        std::os::unix::fs::symlink(target, link).expect("symlink");
    }
    repo.commit(
        &[("app/kustomization.yaml", Some(&b"resources: []\n"[..]))],
        "app",
    );
    let (mirror, commit) = mirrored(tmp, &repo);
    let renderer = kustomize_renderer(tmp, script(tmp, REPORTER));
    let spec = RenderSpec::Kustomize { path: "app".into() };
    let out = renderer.render(1, &mirror, commit, &spec).await;
    let text = out.map(|bytes| String::from_utf8_lossy(&bytes.bytes).into_owned());
    (text, renderer, mirror, commit)
}

/// `repo` mirrored in `tmp/project.git`, and its head.
fn mirrored(tmp: &Path, repo: &GitRepo) -> (Mirror, CommitId) {
    let mirror =
        Mirror::open_or_init(tmp.join("project.git"), Remote::local(&repo.dir)).expect("mirror");
    mirror.fetch().expect("fetch");
    let commit = mirror.resolve(&GitRef::DefaultBranch).expect("commit");
    (mirror, commit)
}

/// `tmp/kustomize`, an executable script of `text`.
fn script(tmp: &Path, text: &str) -> std::path::PathBuf {
    let path = tmp.join("kustomize");
    std::fs::write(&path, text).expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A renderer running `kustomize` as Kustomize, its checkouts under `tmp/work`.
fn kustomize_renderer(tmp: &Path, kustomize: std::path::PathBuf) -> Renderer {
    let work = tmp.join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    Renderer::new(RenderConfig {
        kustomize_path: Some(kustomize),
        work_dir: Some(work),
        ..RenderConfig::default()
    })
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

#[tokio::test]
async fn the_renderer_gets_no_environment_of_kas_and_no_network() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (out, ..) = render_with_reporter(tmp.path(), &[("inside", "app")]).await;
    let out = out.expect("rendered");
    let env: Vec<&str> = line(&out, "env").split_whitespace().collect();
    // cargo runs this test with CARGO_* and more in its environment: none may leak.
    let allowed = [
        "HOME",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "HELM_CACHE_HOME",
        "HELM_CONFIG_HOME",
        "HELM_DATA_HOME",
        "KUSTOMIZE_PLUGIN_HOME",
        "PATH",
        // Set by the shell itself.
        "PWD",
    ];
    let leaked: Vec<&&str> = env.iter().filter(|k| !allowed.contains(k)).collect();
    assert!(leaked.is_empty(), "leaked into the renderer: {leaked:?}");
    assert!(env.contains(&"HOME"), "{env:?}");
    assert!(
        probe_sandbox(None).unshare.is_some(),
        "this machine can create network namespaces; the sandbox must use one"
    );
    assert_eq!(
        line(&out, "net").trim(),
        "lo",
        "only loopback in the namespace"
    );
    assert!(line(&out, "dir").ends_with("/repo/app"), "{out}");
    let left = std::fs::read_dir(tmp.path().join("work"))
        .expect("work")
        .count();
    assert_eq!(left, 0, "the checkout is removed after rendering");
}

/// Links leaving the repository refuse the rendering under the entry's folder (here `app`),
/// also when they leave only once resolved through other links; elsewhere they are left out
/// (the rendering goes on), and named when the renderer fails.
#[tokio::test]
async fn links_that_escape_are_refused_in_the_entrys_folder_and_left_out_elsewhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // By name `app/c` stays inside (`app/a/../..` is the root); resolved, `app/a` is `app`,
    // so `app/c` is the root's parent.
    let links = [("app/a", "."), ("app/c", "a/../..")];
    let (out, ..) = render_with_reporter(tmp.path(), &links).await;
    match out {
        Err(RenderError::SymlinkEscapes { path, target }) => {
            assert_eq!((path.as_str(), target.as_str()), ("app/c", "a/../.."));
        }
        other => panic!("expected the link app/c to be refused, got {other:?}"),
    }
    let (out, ..) = render_with_reporter(&tmp.path().join("2"), &[("app/up", "../../etc")]).await;
    let e = out.expect_err("refused");
    assert_eq!(
        e.to_string(),
        "symbolic link app/up points to \"../../etc\", outside the repository: refused"
    );

    // Outside `app`: left out, the rendering succeeds.
    let stray = [("docs/share", "/usr/share"), ("up", "../../etc")];
    let (out, ..) = render_with_reporter(&tmp.path().join("3"), &stray).await;
    let text = out.expect("rendered");
    assert!(text.contains("# dir: "), "{text}");
}

/// A renderer failing in a checkout that left links out names them after its error.
#[tokio::test]
async fn a_failed_rendering_names_the_links_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path();
    let repo = GitRepo::init(&tmp.join("project"));
    std::fs::create_dir_all(repo.dir.join("shared")).expect("dir");
    std::os::unix::fs::symlink("/etc/passwd", repo.dir.join("shared/base.yaml")).expect("link");
    repo.commit(
        &[(
            "app/kustomization.yaml",
            Some(&b"resources: [../shared/base.yaml]\n"[..]),
        )],
        "app",
    );
    let (mirror, commit) = mirrored(tmp, &repo);
    let failing =
        "#!/bin/sh\necho 'Error: ../shared/base.yaml: no such file or directory' >&2\nexit 1\n";
    let renderer = kustomize_renderer(tmp, script(tmp, failing));
    let spec = RenderSpec::Kustomize { path: "app".into() };
    let e = renderer
        .render(1, &mirror, commit, &spec)
        .await
        .expect_err("failed");
    let text = e.to_string();
    assert!(
        text.contains("no such file or directory")
            && text.contains("symbolic links pointing outside the repository are left out where kas renders: shared/base.yaml -> /etc/passwd"),
        "{text}"
    );
}

#[tokio::test]
async fn each_commit_and_settings_render_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (first, renderer, mirror, commit) = render_with_reporter(tmp.path(), &[]).await;
    let runs = || {
        std::fs::read_to_string(tmp.path().join("runs"))
            .expect("runs")
            .lines()
            .count()
    };
    let app = RenderSpec::Kustomize { path: "app".into() };
    let again = renderer
        .render(1, &mirror, commit, &app)
        .await
        .expect("again");
    assert_eq!(
        String::from_utf8_lossy(&again.bytes),
        first.expect("rendered")
    );
    assert_eq!(
        runs(),
        1,
        "the same commit and settings are served from the cache"
    );
    let root = RenderSpec::Kustomize { path: ".".into() };
    renderer
        .render(1, &mirror, commit, &root)
        .await
        .expect("root");
    assert_eq!(runs(), 2, "other settings render again");
}

/// Two projects holding the same commit id (here another project mirroring the same
/// repository) each get their own rendering: a commit id names a commit within one repository
/// only, so the cache must not hand one project's rendering to another.
#[tokio::test]
async fn the_same_commit_in_another_project_renders_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (first, renderer, mirror, commit) = render_with_reporter(tmp.path(), &[]).await;
    first.expect("rendered");
    let other = Mirror::open_or_init(tmp.path().join("other.git"), Remote::local(mirror.dir()))
        .expect("other project's mirror");
    other.fetch().expect("fetch");
    let same = other.resolve(&GitRef::DefaultBranch).expect("commit");
    assert_eq!(same, commit, "both projects hold the same commit id");
    let app = RenderSpec::Kustomize { path: "app".into() };
    renderer
        .render(1, &other, same, &app)
        .await
        .expect("other project rendered");
    let runs = std::fs::read_to_string(tmp.path().join("runs")).expect("runs");
    assert_eq!(
        runs.lines().count(),
        2,
        "the other project's rendering came from the cache"
    );
}

/// A stand-in renderer that notes in `runs` whether another one was running when it started.
const TURN_TAKER: &str = "#!/bin/sh\n\
d=\"$(/usr/bin/dirname \"$0\")\"\n\
/usr/bin/mkdir \"$d/running\" 2>/dev/null || echo overlap >> \"$d/runs\"\n\
/usr/bin/sleep 0.3\n\
/usr/bin/rmdir \"$d/running\" 2>/dev/null\n\
echo done >> \"$d/runs\"\n";

/// Renderings beyond `max_concurrent` wait their turn: many agents' streams asking at once (a
/// kas restart, a commit every agent follows) never run more renderers together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renderings_beyond_max_concurrent_wait_their_turn() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = GitRepo::init(&tmp.path().join("project"));
    let app = |n: &str| format!("resources: []\n# {n}\n").into_bytes();
    repo.commit(&[("app/kustomization.yaml", Some(&app("1")[..]))], "one");
    let (mirror, first) = mirrored(tmp.path(), &repo);
    repo.commit(&[("app/kustomization.yaml", Some(&app("2")[..]))], "two");
    mirror.fetch().expect("fetch");
    let second = mirror.resolve(&GitRef::DefaultBranch).expect("commit");
    let script = tmp.path().join("kustomize");
    std::fs::write(&script, TURN_TAKER).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let renderer = Renderer::new(RenderConfig {
        kustomize_path: Some(script),
        work_dir: Some(work),
        max_concurrent: 1,
        ..RenderConfig::default()
    });
    let spec = RenderSpec::Kustomize { path: "app".into() };
    let (a, b) = tokio::join!(
        renderer.render(1, &mirror, first, &spec),
        renderer.render(1, &mirror, second, &spec)
    );
    a.expect("first rendering");
    b.expect("second rendering");
    let runs = std::fs::read_to_string(tmp.path().join("runs")).expect("runs");
    assert_eq!(runs, "done\ndone\n", "{runs}");
}

/// A tree object made by hand (`git hash-object --literally`) whose root has a blob named by
/// an absolute path: written out by joining the name to the checkout, it landed at that path,
/// anywhere kas may write (another project's mirror, kas's database). Such a commit is refused
/// as the repository's fault, and nothing is written outside the checkout.
#[tokio::test]
async fn a_hand_made_tree_entry_named_by_an_absolute_path_is_refused_and_nothing_escapes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("escaped");
    let repo = GitRepo::init(&tmp.path().join("project"));
    repo.commit(
        &[("app/kustomization.yaml", Some(&b"resources: []\n"[..]))],
        "app",
    );
    let git = |args: &[&str], stdin: Option<&[u8]>| -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo.dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("git");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input)
                .expect("write");
        }
        let out = child.wait_with_output().expect("git ran");
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    let blob = git(
        &["hash-object", "-w", "--stdin"],
        Some(b"kas writes here\n"),
    );
    let app = git(&["rev-parse", "HEAD:app"], None);
    // Tree entries: mode, space, name, NUL, the raw object id; sorted by name.
    let mut tree = Vec::new();
    for (mode, name, id) in [
        ("100644", target.display().to_string(), &blob),
        ("40000", "app".to_owned(), &app),
    ] {
        tree.extend_from_slice(format!("{mode} {name}\0").as_bytes());
        tree.extend(
            (0..id.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&id[i..i + 2], 16).expect("hex")),
        );
    }
    let tree_id = git(
        &["hash-object", "-t", "tree", "-w", "--literally", "--stdin"],
        Some(&tree),
    );
    let commit = git(
        &["commit-tree", &tree_id, "-p", "HEAD", "-m", "hand-made"],
        None,
    );
    git(&["update-ref", "HEAD", &commit], None);

    let (mirror, head) = mirrored(tmp.path(), &repo);
    assert_eq!(head.to_string(), commit);
    let renderer = kustomize_renderer(tmp.path(), "/bin/true".into());
    let spec = RenderSpec::Kustomize { path: "app".into() };
    let e = renderer
        .render(1, &mirror, head, &spec)
        .await
        .expect_err("refused");
    assert!(
        matches!(e, RenderError::UncheckableTree(_)) && e.is_user_error(),
        "{e:?}"
    );
    assert!(e.to_string().contains("escaped"), "names the entry: {e}");
    assert!(!target.exists(), "a file was written outside the checkout");
}

/// A stand-in renderer: a kustomization under `slow*` notes its start and waits until the
/// test creates `open`; any other renders at once.
const GATED: &str = "#!/bin/sh\n\
d=\"$(/usr/bin/dirname \"$0\")\"\n\
case \"$2\" in */slow*) echo \"$2\" >> \"$d/started\"; \
until [ -e \"$d/open\" ]; do /usr/bin/sleep 0.05; done;; esac\n\
echo \"# rendered $2\"\n";

/// One agent whose renderings never end (its stream, or its previews with ever new values)
/// holds one of kas's turns, not all of them: another agent's rendering runs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_stuck_renderings_do_not_hold_up_another_agents() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = GitRepo::init(&tmp.path().join("project"));
    let kustomization = &b"resources: []\n"[..];
    repo.commit(
        &[
            ("slow1/kustomization.yaml", Some(kustomization)),
            ("slow2/kustomization.yaml", Some(kustomization)),
            ("slow3/kustomization.yaml", Some(kustomization)),
            ("fast/kustomization.yaml", Some(kustomization)),
        ],
        "four",
    );
    let (mirror, commit) = mirrored(tmp.path(), &repo);
    let script = tmp.path().join("kustomize");
    std::fs::write(&script, GATED).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let renderer = std::sync::Arc::new(Renderer::new(RenderConfig {
        kustomize_path: Some(script),
        work_dir: Some(work),
        max_concurrent: 2,
        ..RenderConfig::default()
    }));
    let stuck: Vec<_> = ["slow1", "slow2", "slow3"]
        .into_iter()
        .map(|path| {
            let (renderer, mirror) = (std::sync::Arc::clone(&renderer), mirror.clone());
            tokio::spawn(async move {
                let spec = RenderSpec::Kustomize { path: path.into() };
                renderer.render(1, &mirror, commit, &spec).await
            })
        })
        .collect();
    let started = tmp.path().join("started");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "no rendering started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let fast = RenderSpec::Kustomize {
        path: "fast".into(),
    };
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        renderer.render(2, &mirror, commit, &fast),
    )
    .await
    .expect("agent 2's rendering waited behind agent 1's")
    .expect("agent 2's rendering");
    assert!(
        String::from_utf8_lossy(&other.bytes).contains("/fast"),
        "{other:?}"
    );
    let running = std::fs::read_to_string(&started).expect("started");
    assert_eq!(
        running.lines().count(),
        1,
        "agent 1 runs one at a time: {running}"
    );

    std::fs::write(tmp.path().join("open"), "").expect("open the gate");
    for s in stuck {
        s.await.expect("joined").expect("agent 1's rendering");
    }
}

/// A submodule is an empty folder in the checkout (kas fetches none, as Git leaves one it did
/// not fetch), and a renderer failing in such a repository has the submodule named after its
/// error, so "no such file" does not read as the repository's mistake.
#[tokio::test]
async fn a_submodule_is_an_empty_folder_and_a_failure_names_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lib = GitRepo::init(&tmp.path().join("lib"));
    lib.commit(&[("crd.yaml", Some(&b"kind: X\n"[..]))], "lib");
    let repo = GitRepo::init(&tmp.path().join("project"));
    repo.commit(
        &[(
            "app/kustomization.yaml",
            Some(&b"resources: [../lib/crd.yaml]\n"[..]),
        )],
        "app",
    );
    repo.add_submodule(&lib.dir, "lib", "a submodule");
    let (mirror, commit) = mirrored(tmp.path(), &repo);
    // Says whether the submodule's folder is there and empty, then fails as kustomize would.
    let text = "#!/bin/sh\n[ -d \"$2/../lib\" ] && [ -z \"$(/usr/bin/ls -A \"$2/../lib\")\" ] && echo 'lib is an empty folder' >&2\necho \"error: '$2/../lib/crd.yaml' doesn't exist\" >&2\nexit 1\n";
    let renderer = kustomize_renderer(tmp.path(), script(tmp.path(), text));
    let spec = RenderSpec::Kustomize { path: "app".into() };
    let e = renderer
        .render(1, &mirror, commit, &spec)
        .await
        .expect_err("failed");
    let text = e.to_string();
    for words in [
        "lib is an empty folder",
        "crd.yaml' doesn't exist",
        "the repository's submodules lib are empty where kas renders: kas does not fetch submodules",
    ] {
        assert!(text.contains(words), "{words:?} not in {text}");
    }
}
