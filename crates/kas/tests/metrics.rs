//! kas's own metrics, scraped from the real process: what users alert on about Git.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{GitRepo, Kas, KasOptions, wait_for};
use tether_kas_api::ProjectRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_fetches_are_counted_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            git_poll: "300ms",
            ..KasOptions::default()
        },
    )
    .await;
    let repo = GitRepo::init(&dir.path().join("repo"));
    repo.commit(&[("README.md", Some(b"hello"))], "first");
    kas.set_projects(&[("group/good", &repo)]).await;
    // A folder, but no repository: every fetch fails (a missing one is refused at once).
    let missing = dir.path().join("no-such-repository");
    std::fs::create_dir(&missing).unwrap();
    kas.admin
        .set_project(&ProjectRequest {
            path: "group/broken".into(),
            remote: Some(missing.to_str().unwrap().into()),
            ..ProjectRequest::default()
        })
        .await
        .unwrap();
    for outcome in ["succeeded", "failed"] {
        let series = format!(r#"kas_git_fetches_total{{outcome="{outcome}"}}"#);
        let n = wait_for(&series, Duration::from_secs(20), || async {
            kas.metric(&series).await.filter(|n| *n >= 1.0)
        })
        .await;
        assert!(n >= 1.0);
        let count = format!(r#"kas_git_fetch_duration_seconds_count{{outcome="{outcome}"}}"#);
        assert!(kas.metric(&count).await >= Some(1.0), "{count}");
    }
}

/// The renderers' memory settings in force are exported where operators look: as configured
/// here, where kas's cgroup has no memory limit (on a limited one they may be lower, see
/// `render::memory`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_renderers_memory_settings_in_force_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(
        &dir.path().join("kas"),
        KasOptions {
            extra_yaml: "gitops:\n  render:\n    memory_limit: 1610612736\n    max_concurrent: 3\n"
                .into(),
            ..KasOptions::default()
        },
    )
    .await;
    assert_eq!(
        kas.metric("kas_gitops_render_memory_limit_bytes").await,
        Some(1_610_612_736.0)
    );
    assert_eq!(
        kas.metric("kas_gitops_render_max_concurrent").await,
        Some(3.0)
    );
}
