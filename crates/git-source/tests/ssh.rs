//! Fetching over SSH from a real sshd on loopback (OpenSSH, started by each test): the deploy key
//! logs in, the server's host key is pinned by a `known_hosts` file, and anything else is refused
//! with an error saying why.

use std::path::Path;

use tether_git_source::{CommitId, FetchError, GitRef, Mirror, Remote, SshAuth};
use tether_test_support::GitRepo;
use tether_testenv::sshd::{KeyPair, Sshd, keygen};

struct Fixture {
    tmp: tempfile::TempDir,
    repo: GitRepo,
    deploy: KeyPair,
    sshd: Sshd,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = GitRepo::init_on(&tmp.path().join("repos/project"), "main");
        let keys = tmp.path().join("keys");
        std::fs::create_dir_all(&keys).expect("keys dir");
        let deploy = keygen(&keys, "deploy").expect("deploy key");
        let sshd = Sshd::start(&[&deploy.public]).expect("sshd");
        Fixture {
            tmp,
            repo,
            deploy,
            sshd,
        }
    }

    fn mirror(&self, name: &str, ssh: SshAuth) -> Mirror {
        let remote = Remote::parse(&self.sshd.url(&self.repo.dir))
            .and_then(|r| r.with_ssh(ssh))
            .expect("remote");
        Mirror::open_or_init(self.tmp.path().join(format!("cache/{name}.git")), remote)
            .expect("mirror")
    }

    fn known_hosts(&self) -> std::path::PathBuf {
        self.sshd
            .write_known_hosts(&self.tmp.path().join("keys"))
            .expect("known_hosts")
    }

    fn auth(&self, key: &Path, known_hosts: Option<&Path>) -> SshAuth {
        SshAuth {
            key_file: Some(key.to_owned()),
            known_hosts_file: known_hosts.map(Path::to_owned),
        }
    }
}

fn auth_detail(
    result: Result<tether_git_source::FetchOutcome, tether_git_source::Error>,
) -> String {
    match result {
        Err(tether_git_source::Error::Fetch(FetchError::Auth { detail, .. })) => detail,
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

#[test]
fn deploy_key_and_pinned_host_key_fetch() {
    let f = Fixture::new();
    let commit = f.repo.commit_files(&[("app.yaml", b"v1")], &[], "one");
    let known_hosts = f.known_hosts();
    let mirror = f.mirror("ok", f.auth(&f.deploy.private, Some(&known_hosts)));
    let outcome = mirror.fetch().expect("fetch over ssh");
    assert_eq!(outcome.default_branch.as_deref(), Some("main"));
    let head = mirror.resolve(&GitRef::DefaultBranch).expect("resolve");
    assert_eq!(head, CommitId::from_hex(&commit).expect("id"));
    assert_eq!(
        mirror.read_file(&head, "app.yaml", 1 << 20).expect("read"),
        Some(b"v1".to_vec())
    );
    // A second fetch picks up a new commit the same way.
    let second = f.repo.commit_files(&[("app.yaml", b"v2")], &[], "two");
    assert!(mirror.fetch().expect("second fetch").changed());
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        CommitId::from_hex(&second).expect("id")
    );
}

#[test]
fn wrong_key_is_an_auth_error() {
    let f = Fixture::new();
    f.repo.commit_files(&[("a", b"1")], &[], "one");
    let other = keygen(&f.tmp.path().join("keys"), "other").expect("key");
    let known_hosts = f.known_hosts();
    let mirror = f.mirror("wrong-key", f.auth(&other.private, Some(&known_hosts)));
    let detail = auth_detail(mirror.fetch());
    assert!(detail.contains("refused the login"), "{detail}");
    assert!(detail.contains("Permission denied"), "{detail}");
    assert!(
        detail.contains(&other.private.display().to_string()),
        "{detail}"
    );
}

#[test]
fn changed_host_key_is_refused_with_its_fingerprint() {
    let f = Fixture::new();
    f.repo.commit_files(&[("a", b"1")], &[], "one");
    // known_hosts pins another key for this host and port: the server looks like an impostor.
    let impostor = keygen(&f.tmp.path().join("keys"), "impostor").expect("key");
    let known_hosts = f.tmp.path().join("keys/other_known_hosts");
    std::fs::write(
        &known_hosts,
        f.sshd.known_hosts_line_for(&impostor.public) + "\n",
    )
    .expect("write");
    let mirror = f.mirror("changed", f.auth(&f.deploy.private, Some(&known_hosts)));
    let detail = auth_detail(mirror.fetch());
    let fingerprint = f.sshd.host_fingerprint().expect("fingerprint");
    assert!(detail.contains("host key is not trusted"), "{detail}");
    assert!(
        detail.contains(&fingerprint),
        "{detail} lacks {fingerprint}"
    );
    assert!(
        detail.contains(&format!("[127.0.0.1]:{}", f.sshd.port)),
        "{detail}"
    );
    assert!(detail.contains("has changed"), "{detail}");
    assert!(
        mirror.resolve(&GitRef::DefaultBranch).is_err(),
        "nothing was fetched"
    );
}

#[test]
fn unknown_host_is_refused_never_trusted_on_first_use() {
    let f = Fixture::new();
    f.repo.commit_files(&[("a", b"1")], &[], "one");
    let fingerprint = f.sshd.host_fingerprint().expect("fingerprint");
    // No known_hosts at all, and an empty one: both refuse, naming the key the server showed.
    let empty = f.tmp.path().join("keys/empty_known_hosts");
    std::fs::write(&empty, "").expect("write");
    for (name, known_hosts) in [("none", None), ("empty", Some(empty.as_path()))] {
        let mirror = f.mirror(name, f.auth(&f.deploy.private, known_hosts));
        let detail = auth_detail(mirror.fetch());
        assert!(detail.contains(&fingerprint), "{name}: {detail}");
        assert!(detail.contains("is known for"), "{name}: {detail}");
        // Refusing did not write the key anywhere: the next attempt is refused too.
        let again = auth_detail(mirror.fetch());
        assert!(again.contains(&fingerprint), "{name}: {again}");
    }
    assert_eq!(std::fs::read_to_string(&empty).expect("read"), "");
}

#[test]
fn closed_port_is_unreachable() {
    let f = Fixture::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let remote = Remote::parse(&format!("ssh://git@127.0.0.1:{port}/srv/p.git"))
        .and_then(|r| r.with_ssh(f.auth(&f.deploy.private, Some(&f.known_hosts()))))
        .expect("remote");
    let mirror =
        Mirror::open_or_init(f.tmp.path().join("cache/closed.git"), remote).expect("mirror");
    match mirror.fetch() {
        Err(tether_git_source::Error::Fetch(FetchError::Unreachable { detail, .. })) => {
            assert!(detail.contains("Connection refused"), "{detail}");
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
}

/// A repository missing an object on the far side: the fetch's error carries what the remote
/// `git-upload-pack` said, which comes back as `ssh`'s stderr (gix printed it to the process's
/// own stderr, and the error only said the pack ended early).
#[test]
fn a_corrupt_remote_repository_fails_with_what_upload_pack_said() {
    let f = Fixture::new();
    f.repo.commit_files(&[("app.yaml", b"lost")], &[], "one");
    let blob = f.repo.git(&["rev-parse", "HEAD:app.yaml"]);
    let blob = blob.trim();
    let objects = f.repo.dir.join(".git/objects");
    std::fs::remove_file(objects.join(&blob[..2]).join(&blob[2..])).expect("remove the blob");
    let known_hosts = f.known_hosts();
    let mirror = f.mirror("corrupt", f.auth(&f.deploy.private, Some(&known_hosts)));
    let text = mirror
        .fetch()
        .expect_err("an object is missing")
        .to_string();
    assert!(
        text.contains("(git upload-pack said: ")
            && text.contains("aborting due to possible repository corruption on the remote side"),
        "{text}"
    );
}
