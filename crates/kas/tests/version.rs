//! `--version` names the commit on both binaries, so a running agent or server can be traced
//! to its source (the images carry the same commit in their labels).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;

use std::time::Duration;

use support::{Kas, KasOptions, wait_for};

fn version_of(binary: &PathBuf) -> String {
    let out = Command::new(binary).arg("--version").output().unwrap();
    assert!(
        out.status.success(),
        "{} --version failed",
        binary.display()
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn both_binaries_name_the_commit_they_were_built_from() {
    let kas = PathBuf::from(env!("CARGO_BIN_EXE_kas"));
    let agentk = kas.with_file_name("agentk");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap().trim().to_owned();
    assert_eq!(head.len(), 12, "not in a Git checkout?");
    for (name, binary) in [("kas", &kas), ("agentk", &agentk)] {
        let version = version_of(binary);
        assert_eq!(
            version,
            format!("{name} {} (commit {head})", env!("CARGO_PKG_VERSION")),
            "{}",
            binary.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kas_says_its_build_in_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(dir.path(), KasOptions::default()).await;
    let series = format!(
        r#"kas_build_info{{version="{}",commit="{}"}}"#,
        env!("CARGO_PKG_VERSION"),
        tether_build_info::COMMIT
    );
    // The observability listener is the last module kas starts; wait for it.
    let value = wait_for(&series, Duration::from_secs(10), || kas.metric(&series)).await;
    assert_eq!(value, 1.0, "{series}");
}
