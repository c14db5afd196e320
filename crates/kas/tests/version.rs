//! `--version` names the commit on both binaries, so a running agent or server can be traced
//! to its source (the images carry the same commit in their labels).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

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
