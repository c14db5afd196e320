//! Records the Git commit the workspace is built from. Kept in its own tiny crate so that a new
//! commit recompiles only this crate and the two binaries, not everything else.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=TETHER_COMMIT");
    // Image builds from a source tarball have no .git; they pass the commit in.
    let commit = std::env::var("TETHER_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TETHER_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (detached, or a branch switch) and the refs it may
    // point to (loose and packed; in a worktree they live in the common directory).
    for (flag, files) in [
        ("--git-dir", &["HEAD"][..]),
        ("--git-common-dir", &["packed-refs", "refs/heads"][..]),
    ] {
        if let Some(dir) = git(&["rev-parse", flag]) {
            for f in files {
                let path = PathBuf::from(&dir).join(f);
                if path.exists() {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
        }
    }
}
