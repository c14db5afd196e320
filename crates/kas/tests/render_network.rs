//! Renderers cannot reach the network even where no network namespace can be made, as in
//! kas's Helm chart (RuntimeDefault seccomp, no capabilities): the real kustomize, confined by
//! kas's own `kas render-confine` seccomp filter, against a listener on 127.0.0.1; and kas
//! renders nothing where it cannot confine at all.
//!
//! The checks refuse every URL field they know of; to show the filter holds for one they
//! would not know, the "kustomize" kas runs is a script that runs the real kustomize on a
//! kustomization outside the repository, which fetches from the listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tether_git_source::{GitRef, Mirror, Remote};
use tether_gitops_server::render::{RenderSpec, Sandbox, probe_sandbox};
use tether_gitops_server::{RenderConfig, RenderError, Renderer};
use tether_test_support::GitRepo;
use tether_testenv::TestEnv;

fn kas() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kas"))
}

/// A listener on 127.0.0.1 and a "kustomize" in `tmp` that builds a kustomization whose
/// ConfigMap generator fetches a file from it (as `files: [http://169.254.169.254/…]` would
/// from cloud metadata); with what the script reads outside the checkout (the real kustomize
/// and that kustomization), for the Landlock fence to let through.
fn fetching_kustomize(tmp: &Path) -> (TcpListener, PathBuf, Vec<PathBuf>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/latest/meta-data", listener.local_addr().unwrap());
    let evil = tmp.join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    std::fs::write(
        evil.join("kustomization.yaml"),
        format!("configMapGenerator:\n- name: stolen\n  files:\n  - data={url}\n"),
    )
    .unwrap();
    let env = TestEnv::from_env().expect("run under testenv (for the pinned kustomize)");
    let script = tmp.join("kustomize");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} build {}\n",
            env.bin_dir.join("kustomize").display(),
            evil.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (listener, script, vec![env.bin_dir.join("kustomize"), evil])
}

/// Renders a one-commit repository with the stand-in kustomize, in `sandbox`.
async fn render(
    tmp: &Path,
    (script, read_paths): (PathBuf, Vec<PathBuf>),
    sandbox: Sandbox,
    allow_network: bool,
) -> Result<Vec<u8>, RenderError> {
    let repo = GitRepo::init(&tmp.join("project"));
    repo.commit(
        &[("app/kustomization.yaml", Some(&b"resources: []\n"[..]))],
        "app",
    );
    let mirror =
        Mirror::open_or_init(tmp.join("project.git"), Remote::local(&repo.dir)).expect("mirror");
    mirror.fetch().expect("fetch");
    let commit = mirror.resolve(&GitRef::DefaultBranch).expect("commit");
    let config = RenderConfig {
        kustomize_path: Some(script),
        work_dir: Some(tmp.join("work")),
        allow_network,
        read_paths,
        ..RenderConfig::default()
    };
    let renderer = Renderer::with_sandbox(config, sandbox);
    let spec = RenderSpec::Kustomize { path: "app".into() };
    renderer
        .render(1, &mirror, commit, &spec)
        .await
        .map(|out| out.bytes.clone())
}

/// Whether a connection waits in the listener's backlog. The renderer has exited when this is
/// asked, and a connection to 127.0.0.1 is established by the kernel before `connect`
/// returns, so one it made would be there.
fn connection_waiting(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    }
}

#[tokio::test]
async fn kas_probes_its_seccomp_filter_and_a_program_that_only_exits_0_is_no_filter() {
    assert_eq!(probe_sandbox(Some(&kas())).confine, Some(kas()));
    assert_eq!(probe_sandbox(Some(Path::new("/bin/true"))).confine, None);
}

#[tokio::test]
async fn a_renderer_under_the_seccomp_filter_alone_opens_no_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let (listener, script, reads) = fetching_kustomize(tmp.path());
    // The chart's situation: no network namespace, only kas's filter.
    let sandbox = Sandbox {
        confine: Some(kas()),
        ..Sandbox::default()
    };
    let out = render(tmp.path(), (script, reads), sandbox, false).await;
    assert!(
        !connection_waiting(&listener),
        "the renderer connected to 127.0.0.1"
    );
    match out {
        Err(RenderError::NetworkRefused { message, .. }) => {
            assert!(message.contains("socket: permission denied"), "{message}")
        }
        other => panic!("expected the network refused, got {other:?}"),
    }
}

#[tokio::test]
async fn without_a_namespace_or_the_filter_kas_renders_nothing_unless_allowed_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let (listener, script, reads) = fetching_kustomize(tmp.path());
    let out = render(
        tmp.path(),
        (script.clone(), reads.clone()),
        Sandbox::default(),
        false,
    )
    .await;
    assert!(
        matches!(out, Err(RenderError::NoNetworkIsolation)),
        "{out:?}"
    );
    assert!(!connection_waiting(&listener), "the renderer ran");
    // Allowed the network, the same renderer reaches the listener: the route is real.
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request).unwrap();
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret")
            .unwrap();
    });
    let out = render(
        &tmp.path().join("2"),
        (script, reads),
        Sandbox::default(),
        true,
    )
    .await;
    server.join().unwrap();
    let out = String::from_utf8(out.expect("rendered")).unwrap();
    assert!(out.contains("data: secret"), "{out}");
}

/// An x32 system call (the x86_64 number with bit 30 set) reaches the same kernel handler as
/// the x86_64 one, so a filter matching x86_64 numbers alone lets x32 `socket` through. perl's
/// `syscall` makes the raw call; the filter answers `EACCES` before the kernel looks at the
/// number (a kernel without x32 would answer `ENOSYS`, one with it would open the socket).
#[cfg(target_arch = "x86_64")]
#[test]
fn an_x32_socket_call_is_refused_under_render_confine() {
    let script = "my $r = syscall(0x40000000 | 41, 2, 2, 0); \
                  print $r >= 0 ? \"opened\" : $! + 0";
    let out = std::process::Command::new(kas())
        .args(["render-confine", "--", "/usr/bin/perl", "-e", script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 13: EACCES.
    assert_eq!(said, "13", "errno of x32 socket(AF_INET)");
}

/// Under `kas render-confine` a renderer reads the system's files and what kas gives it (the
/// checkout), writes only its scratch folder, and no other file kas's user may: kas's admin
/// token, database, TLS key, other projects' mirrors.
#[test]
fn a_renderer_under_render_confine_reaches_only_the_files_it_is_given() {
    assert!(
        probe_sandbox(Some(&kas())).landlock,
        "this machine's kernel has Landlock; the sandbox must use it"
    );
    let tmp = tempfile::tempdir().unwrap();
    let (repo, scratch) = (tmp.path().join("repo"), tmp.path().join("scratch"));
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(repo.join("kustomization.yaml"), "resources: []\n").unwrap();
    let token = tmp.path().join("admin-token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    let script = format!(
        "cat {r}/kustomization.yaml; cat {t}; echo w > {s}/out; echo w > {e}; exit 0",
        r = repo.display(),
        t = token.display(),
        s = scratch.display(),
        e = elsewhere.display()
    );
    let out = std::process::Command::new(kas())
        .arg("render-confine")
        .arg("--read")
        .arg(&repo)
        .arg("--write")
        .arg(&scratch)
        .args(["--", "/bin/sh", "-c", &script])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("resources: []"),
        "the checkout is read: {stdout}"
    );
    assert!(
        !stdout.contains("s3cret"),
        "a file outside was read: {stdout}"
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(
        scratch.join("out").exists(),
        "the scratch folder is written"
    );
    assert!(!elsewhere.exists(), "a file outside was written");
}
