//! Git work trees and a `git daemon`, driven with the `git` CLI.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `git` in `dir` as a fixed author, isolated from the machine's configuration (no global
/// or system config, no signing); fails the test on error. Returns stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A work-tree repository.
#[derive(Debug)]
pub struct GitRepo {
    pub dir: PathBuf,
}

impl GitRepo {
    /// Creates `dir` and an empty repository in it whose branch is `main`.
    pub fn init(dir: &Path) -> GitRepo {
        GitRepo::init_on(dir, "main")
    }

    /// Creates `dir` and an empty repository in it whose branch is `branch`.
    pub fn init_on(dir: &Path, branch: &str) -> GitRepo {
        std::fs::create_dir_all(dir).expect("create repository directory");
        let r = GitRepo {
            dir: dir.to_path_buf(),
        };
        r.git(&["init", "-q", "-b", branch]);
        r
    }

    /// Runs `git` in the work tree; returns stdout, trimmed.
    pub fn git(&self, args: &[&str]) -> String {
        git(&self.dir, args)
    }

    /// Writes (or with `None`, deletes) files and commits everything, even when nothing
    /// changed; returns the commit id.
    pub fn commit(&self, files: &[(&str, Option<&[u8]>)], message: &str) -> String {
        for (path, content) in files {
            let p = self.dir.join(path);
            match content {
                Some(c) => {
                    std::fs::create_dir_all(p.parent().expect("file in a directory"))
                        .expect("create directory");
                    std::fs::write(&p, c).expect("write file");
                }
                // Already absent is fine: the commit has the file deleted either way.
                None => match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        panic!("removing {}: {e}", p.display())
                    }
                    _ => {}
                },
            }
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    /// Writes `files`, removes `remove` and commits; returns the commit id.
    pub fn commit_files(&self, files: &[(&str, &[u8])], remove: &[&str], message: &str) -> String {
        let changes: Vec<(&str, Option<&[u8]>)> = files
            .iter()
            .map(|(path, content)| (*path, Some(*content)))
            .chain(remove.iter().map(|path| (*path, None)))
            .collect();
        self.commit(&changes, message)
    }

    /// Adds the repository at the local path `url` as a submodule at `path` (a gitlink to its
    /// `HEAD`, and `.gitmodules`) and commits; returns the commit id.
    pub fn add_submodule(&self, url: &Path, path: &str, message: &str) -> String {
        let url = url.display().to_string();
        // Git refuses local submodule URLs unless told (CVE-2022-39253).
        let allow = ["-c", "protocol.file.allow=always"];
        self.git(&[&allow[..], &["submodule", "add", "-q", &url, path]].concat());
        self.git(&["commit", "-q", "-m", message]);
        self.head()
    }

    /// The commit `HEAD` points at.
    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }
}

/// `git daemon` serving every repository under a base directory over git:// on 127.0.0.1;
/// killed, with the children it forked, on drop.
#[derive(Debug)]
pub struct GitDaemon {
    pub port: u16,
    child: Child,
}

impl GitDaemon {
    /// Starts the daemon and waits (up to 10 s) until it accepts connections.
    pub fn start(base: &Path) -> GitDaemon {
        // git daemon cannot report a port it chose, hence the (documented) race.
        Self::start_on(base, crate::net::unused_port())
    }

    /// [`GitDaemon::start`] on `port`: a daemon stopped and started again at the same URLs,
    /// for a repository that goes down and comes back.
    pub fn start_on(base: &Path, port: u16) -> GitDaemon {
        let child = Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--informative-errors",
                "--reuseaddr",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so dropping the guard also ends the per-connection
            // children it forks.
            .process_group(0)
            .spawn()
            .expect("git daemon starts");
        let daemon = GitDaemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// The git:// URL of repository `repo` (a path under the base directory).
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_writes_deletes_and_returns_head() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = GitRepo::init_on(&tmp.path().join("r"), "trunk");
        let first = repo.commit(&[("a/b.txt", Some(b"one")), ("c", Some(b"c"))], "one");
        let second = repo.commit(&[("c", None)], "two");
        assert_ne!(first, second);
        assert_eq!(repo.head(), second);
        assert_eq!(repo.git(&["branch", "--show-current"]), "trunk");
        assert_eq!(repo.git(&["ls-files"]), "a/b.txt");
    }

    #[test]
    fn daemon_serves_the_repositories_under_its_base() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = GitRepo::init(&tmp.path().join("project"));
        let head = repo.commit(&[("f", Some(b"x"))], "one");
        let daemon = GitDaemon::start(tmp.path());
        let listed = git(tmp.path(), &["ls-remote", &daemon.url("project"), "HEAD"]);
        assert!(listed.starts_with(&head), "{listed}");
    }
}
