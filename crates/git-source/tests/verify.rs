//! Signed commits only: commits signed by real `git commit -S` with `ssh-keygen` and `gpg` keys,
//! checked by `git verify-commit` against a project's trusted keys.

use std::path::PathBuf;
use std::time::Duration;

use tether_git_source::{
    CommitId, GitRef, Mirror, ProjectSpec, Refusal, Remote, Sources, VerifyPolicy,
};
use tether_test_support::GitRepo;
use tether_testenv::signing::{Signer, tamper_head};

struct Fixture {
    tmp: tempfile::TempDir,
    repo: GitRepo,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = GitRepo::init(&tmp.path().join("repo"));
        std::fs::create_dir_all(tmp.path().join("keys")).expect("keys dir");
        Fixture { tmp, repo }
    }

    fn keys(&self) -> PathBuf {
        self.tmp.path().join("keys")
    }

    fn mirror(&self) -> Mirror {
        let mirror = Mirror::open_or_init(
            self.tmp.path().join("cache/m.git"),
            Remote::local(&self.repo.dir),
        )
        .expect("mirror");
        mirror.fetch().expect("fetch");
        mirror
    }

    fn signed(&self, signer: &Signer, file: &str, message: &str) -> CommitId {
        std::fs::write(self.repo.dir.join(file), message).expect("write");
        id(&signer
            .commit(&self.repo.dir, message)
            .expect("signed commit"))
    }
}

fn id(hex: &str) -> CommitId {
    CommitId::from_hex(hex).expect("commit id")
}

fn refused(result: Result<tether_git_source::Verified, Refusal>) -> Refusal {
    match result {
        Err(refusal) => {
            assert!(
                refusal.definitive,
                "a verdict, not a tool failure: {refusal}"
            );
            refusal
        }
        Ok(v) => panic!("expected a refusal, {v:?} passed"),
    }
}

#[test]
fn ssh_signed_commits_pass_and_others_are_refused() {
    let f = Fixture::new();
    let alice = Signer::ssh(&f.keys(), "alice", "alice@example.com").expect("alice");
    let mallory = Signer::ssh(&f.keys(), "mallory", "mallory@example.com").expect("mallory");
    let policy = VerifyPolicy {
        allowed_signers_file: Some(alice.write_trust(&f.keys(), "allowed_signers").expect("w")),
        gpg_keyring_file: None,
    };
    let good = f.signed(&alice, "a", "signed by alice");
    let mirror = f.mirror();
    let verified = mirror
        .verify_commit(&good, &policy)
        .expect("alice is trusted");
    assert_eq!(verified.signer, "alice@example.com");

    let unsigned = id(&f.repo.commit_files(&[("b", b"x")], &[], "unsigned"));
    let untrusted = f.signed(&mallory, "c", "signed by mallory");
    mirror.fetch().expect("fetch");
    let r = refused(mirror.verify_commit(&unsigned, &policy));
    assert!(r.reason.contains("not signed"), "{r}");
    assert_eq!(r.signer, None);
    let r = refused(mirror.verify_commit(&untrusted, &policy));
    assert!(r.reason.contains("not trusted"), "{r}");
    assert_eq!(r.commit, untrusted);

    // Without an allowed-signers file, even alice's signature is not trusted.
    let gpg_only = VerifyPolicy {
        allowed_signers_file: None,
        gpg_keyring_file: None,
    };
    refused(mirror.verify_commit(&good, &gpg_only));
}

/// A key retired with `valid-before` in the allowed signers is not trusted once that time has
/// passed, even for a commit backdated to before it (git judges the validity at the committer
/// date, which the signer chooses: E14 F17); a key valid from a time still ahead is not trusted
/// yet; the refusal names the line and its validity.
#[test]
fn a_key_past_its_valid_before_is_refused_even_for_a_backdated_commit() {
    let f = Fixture::new();
    let old = Signer::ssh(&f.keys(), "old", "old@example.com").expect("old");
    let new = Signer::ssh(&f.keys(), "new", "new@example.com").expect("new");
    let public = |s: &Signer| {
        let line = std::fs::read_to_string(s.write_trust(&f.keys(), "one").expect("w")).expect("r");
        line.split_once(' ')
            .expect("principal key")
            .1
            .trim()
            .to_owned()
    };
    let allowed = f.keys().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!(
            "old@example.com valid-before=\"20261101000000Z\" {}\nnew@example.com {}\nlater@example.com valid-after=\"29990101\" {}\n",
            public(&old),
            public(&new),
            public(&new),
        ),
    )
    .expect("write allowed signers");
    let policy = VerifyPolicy {
        allowed_signers_file: Some(allowed),
        gpg_keyring_file: None,
    };
    let current = f.signed(&new, "a", "signed by the current key");
    std::fs::write(f.repo.dir.join("b"), "backdated").expect("write");
    let backdated = id(&old
        .commit_dated(&f.repo.dir, "backdated", Some("2026-10-15T12:00:00Z"))
        .expect("backdated commit"));
    let mirror = f.mirror();
    assert_eq!(
        mirror
            .verify_commit(&current, &policy)
            .expect("new is trusted")
            .signer,
        "new@example.com"
    );
    let r = refused(mirror.verify_commit(&backdated, &policy));
    assert!(
        r.reason.contains("not trusted now")
            && r.reason
                .contains("old@example.com (valid before 2026-11-01T00:00:00Z)"),
        "{r}"
    );
}

#[test]
fn gpg_signed_commits_pass_and_others_are_refused() {
    let f = Fixture::new();
    let bob = Signer::gpg(&f.keys(), "Bob", "bob@example.com").expect("bob");
    let eve = Signer::gpg(&f.keys(), "Eve", "eve@example.com").expect("eve");
    let policy = VerifyPolicy {
        allowed_signers_file: None,
        gpg_keyring_file: Some(bob.write_trust(&f.keys(), "trusted.asc").expect("w")),
    };
    let good = f.signed(&bob, "a", "signed by bob");
    let untrusted = f.signed(&eve, "b", "signed by eve");
    let mirror = f.mirror();
    let verified = mirror
        .verify_commit(&good, &policy)
        .expect("bob is trusted");
    assert!(verified.signer.contains("bob@example.com"), "{verified:?}");
    let r = refused(mirror.verify_commit(&untrusted, &policy));
    assert!(r.reason.contains("not trusted"), "{r}");
}

#[test]
fn tampered_commits_are_refused() {
    let f = Fixture::new();
    let alice = Signer::ssh(&f.keys(), "alice", "alice@example.com").expect("alice");
    let bob = Signer::gpg(&f.keys(), "Bob", "bob@example.com").expect("bob");
    let policy = VerifyPolicy {
        allowed_signers_file: Some(alice.write_trust(&f.keys(), "allowed_signers").expect("w")),
        gpg_keyring_file: Some(bob.write_trust(&f.keys(), "trusted.asc").expect("w")),
    };
    f.signed(&alice, "a", "signed by alice");
    let forged_ssh = id(&tamper_head(&f.repo.dir).expect("tamper"));
    f.signed(&bob, "b", "signed by bob");
    let forged_gpg = id(&tamper_head(&f.repo.dir).expect("tamper"));
    let mirror = f.mirror();
    for forged in [forged_ssh, forged_gpg] {
        let r = refused(mirror.verify_commit(&forged, &policy));
        assert!(r.reason.contains("bad signature"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_publish_only_verified_commits_and_report_refusals() {
    let f = Fixture::new();
    let alice = Signer::ssh(&f.keys(), "alice", "alice@example.com").expect("alice");
    let policy = VerifyPolicy {
        allowed_signers_file: Some(alice.write_trust(&f.keys(), "allowed_signers").expect("w")),
        gpg_keyring_file: None,
    };
    let good = f.signed(&alice, "a", "signed");
    let sources = Sources::new(
        f.tmp.path().join("cache"),
        Duration::from_secs(3600),
        Duration::from_secs(30),
    );
    let spec = || ProjectSpec {
        id: 1,
        path: "group/signed".into(),
        remote: Some(Remote::local(&f.repo.dir)),
        verify: Some(policy.clone()),
    };
    sources.upsert(spec()).expect("upsert");
    let mut heads = sources.watch(1);
    let head = heads
        .wait_for(|h| h.fetches >= 1)
        .await
        .expect("head")
        .clone();
    assert_eq!(head.commit, Some(good));
    assert_eq!(head.refusal, None);

    // An unsigned commit: refused, the verified commit stays published.
    let unsigned = id(&f.repo.commit_files(&[("b", b"x")], &[], "unsigned"));
    assert!(sources.trigger(1));
    let head = heads
        .wait_for(|h| h.fetches >= 2)
        .await
        .expect("head")
        .clone();
    assert_eq!(head.commit, Some(good), "the last verified commit stays");
    let refusal = head.refusal.expect("refusal reported");
    assert_eq!(refusal.commit, unsigned);
    assert!(refusal.reason.contains("not signed"), "{refusal}");
    assert!(sources.verify(1, unsigned).await.is_err());
    assert!(sources.verify(1, good).await.expect("verified").is_some());

    // After a restart the mirror on disk has the unsigned commit on its branch; the restored
    // head is the last verified commit, not that one.
    sources.shutdown();
    let mirror = sources.mirror(1).expect("mirror");
    assert_eq!(
        mirror.resolve(&GitRef::DefaultBranch).expect("resolve"),
        unsigned
    );
    drop(mirror);
    let restarted = Sources::new(
        f.tmp.path().join("cache"),
        Duration::from_secs(3600),
        Duration::from_secs(30),
    );
    restarted.upsert(spec()).expect("upsert");
    assert_eq!(restarted.head(1).commit, Some(good));

    // A signed commit on top passes and replaces it.
    let signed = f.signed(&alice, "c", "signed again");
    let mut heads = restarted.watch(1);
    assert!(restarted.trigger(1));
    let head = heads
        .wait_for(|h| h.commit == Some(signed))
        .await
        .expect("head")
        .clone();
    assert_eq!(head.refusal, None);
    restarted.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusting_a_new_key_takes_effect_at_the_next_fetch() {
    let f = Fixture::new();
    let alice = Signer::ssh(&f.keys(), "alice", "alice@example.com").expect("alice");
    let carol = Signer::ssh(&f.keys(), "carol", "carol@example.com").expect("carol");
    let allowed = alice.write_trust(&f.keys(), "allowed_signers").expect("w");
    let by_carol = f.signed(&carol, "a", "signed by carol");
    let sources = Sources::new(
        f.tmp.path().join("cache"),
        Duration::from_secs(3600),
        Duration::from_secs(30),
    );
    sources
        .upsert(ProjectSpec {
            id: 2,
            path: "group/rotated".into(),
            remote: Some(Remote::local(&f.repo.dir)),
            verify: Some(VerifyPolicy {
                allowed_signers_file: Some(allowed.clone()),
                gpg_keyring_file: None,
            }),
        })
        .expect("upsert");
    let mut heads = sources.watch(2);
    let head = heads
        .wait_for(|h| h.fetches >= 1)
        .await
        .expect("head")
        .clone();
    assert_eq!(head.commit, None, "nothing verified yet");
    assert_eq!(head.refusal.map(|r| r.commit), Some(by_carol));

    // Carol's key joins the allowed signers (the same path, new content): her commit passes.
    let carol_line =
        std::fs::read_to_string(carol.write_trust(&f.keys(), "c").expect("w")).expect("read");
    let mut both = std::fs::read_to_string(&allowed).expect("read");
    both.push_str(&carol_line);
    std::fs::write(&allowed, both).expect("write");
    assert!(sources.trigger(2));
    let head = heads
        .wait_for(|h| h.commit == Some(by_carol))
        .await
        .expect("head")
        .clone();
    assert_eq!(head.refusal, None);
    sources.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_verification_on_withdraws_an_unsigned_published_commit() {
    let f = Fixture::new();
    let alice = Signer::ssh(&f.keys(), "alice", "alice@example.com").expect("alice");
    let allowed = alice.write_trust(&f.keys(), "allowed_signers").expect("w");
    let unsigned = id(&f.repo.commit_files(&[("a", b"1")], &[], "unsigned"));
    let sources = Sources::new(
        f.tmp.path().join("cache"),
        Duration::from_secs(3600),
        Duration::from_secs(30),
    );
    let spec = |verify: Option<VerifyPolicy>| ProjectSpec {
        id: 4,
        path: "group/late".into(),
        remote: Some(Remote::local(&f.repo.dir)),
        verify,
    };
    sources.upsert(spec(None)).expect("upsert");
    let mut heads = sources.watch(4);
    heads
        .wait_for(|h| h.commit == Some(unsigned))
        .await
        .expect("published without a policy");
    sources
        .upsert(spec(Some(VerifyPolicy {
            allowed_signers_file: Some(allowed),
            gpg_keyring_file: None,
        })))
        .expect("upsert with a policy");
    let head = heads
        .wait_for(|h| h.refusal.is_some())
        .await
        .expect("refused under the policy")
        .clone();
    assert_eq!(head.commit, None, "the unsigned commit is withdrawn");
    assert_eq!(head.refusal.map(|r| r.commit), Some(unsigned));
    sources.shutdown();
}
