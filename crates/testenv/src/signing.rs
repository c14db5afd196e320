//! Signed commits made by the real tools: `git commit -S` with an `ssh-keygen` key or a `gpg` key
//! (batch-generated, no passphrase), for tests of "signed commits only".

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::sshd::{KeyPair, keygen};
use crate::{Error, Result, io_err};

/// Who signs a commit, and the trusted-keys file that accepts them.
#[derive(Debug)]
pub enum Signer {
    /// An SSH signing key.
    Ssh {
        /// The key pair.
        key: KeyPair,
        /// The principal (an email) in the allowed-signers line.
        principal: String,
    },
    /// An OpenPGP key in its own `GNUPGHOME`.
    Gpg {
        /// The `GNUPGHOME` holding the secret key.
        home: PathBuf,
        /// The key's user id email.
        email: String,
    },
}

impl Signer {
    /// A new ed25519 SSH signing key in `dir`, for `principal`.
    pub fn ssh(dir: &Path, name: &str, principal: &str) -> Result<Signer> {
        Ok(Signer::Ssh {
            key: keygen(dir, name)?,
            principal: principal.to_owned(),
        })
    }

    /// A new OpenPGP key (ed25519, signing only, no passphrase) for `name <email>`, in a new
    /// `GNUPGHOME` under `dir`.
    pub fn gpg(dir: &Path, name: &str, email: &str) -> Result<Signer> {
        let home = dir.join(format!("gnupg-{email}"));
        std::fs::create_dir_all(&home).map_err(io_err("creating a GNUPGHOME"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("restricting a GNUPGHOME"))?;
        }
        let signer = Signer::Gpg {
            home,
            email: email.to_owned(),
        };
        signer.gpg_cmd(&[
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            &format!("{name} <{email}>"),
            "ed25519",
            "sign",
            "never",
        ])?;
        Ok(signer)
    }

    fn gpg_cmd(&self, args: &[&str]) -> Result<String> {
        let Signer::Gpg { home, .. } = self else {
            return Err(Error::Other("not an OpenPGP signer".into()));
        };
        let out = Command::new("gpg")
            .args(args)
            .env("GNUPGHOME", home)
            .output()
            .map_err(io_err("running gpg"))?;
        if !out.status.success() {
            return Err(Error::Other(format!(
                "gpg {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The name the verification reports as signer: the principal, or the OpenPGP email.
    pub fn identity(&self) -> &str {
        match self {
            Signer::Ssh { principal, .. } => principal,
            Signer::Gpg { email, .. } => email,
        }
    }

    /// Writes the file that trusts this signer into `dir` and returns its path: an
    /// allowed-signers file (SSH) or an armored keyring (OpenPGP).
    pub fn write_trust(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let path = dir.join(name);
        let content = match self {
            Signer::Ssh { key, principal } => format!("{principal} {}\n", key.public),
            Signer::Gpg { email, .. } => self.gpg_cmd(&["--armor", "--export", email])?,
        };
        std::fs::write(&path, content).map_err(io_err("writing a trust file"))?;
        Ok(path)
    }

    /// Commits everything in the work tree `repo` (allowing an empty commit), signed with
    /// `git commit -S`; returns the commit id.
    pub fn commit(&self, repo: &Path, message: &str) -> Result<String> {
        self.commit_dated(repo, message, None)
    }

    /// [`Signer::commit`] with the author and committer date `date` (e.g.
    /// `2026-10-15T12:00:00Z`), as whoever signs may choose it.
    pub fn commit_dated(&self, repo: &Path, message: &str, date: Option<&str>) -> Result<String> {
        let mut cmd = Command::new("git");
        if let Some(date) = date {
            cmd.env("GIT_COMMITTER_DATE", date)
                .env("GIT_AUTHOR_DATE", date);
        }
        cmd.current_dir(repo)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"]);
        match self {
            Signer::Ssh { key, .. } => {
                cmd.args(["-c", "gpg.format=ssh", "-c"])
                    .arg(format!("user.signingkey={}", key.private.display()));
            }
            Signer::Gpg { home, email } => {
                cmd.env("GNUPGHOME", home)
                    .args(["-c", "gpg.format=openpgp", "-c"])
                    .arg(format!("user.signingkey={email}"));
            }
        }
        run_git(Command::new("git").current_dir(repo).args(["add", "-A"]))?;
        run_git(cmd.args(["commit", "-q", "-S", "--allow-empty", "-m", message]))?;
        run_git(
            Command::new("git")
                .current_dir(repo)
                .args(["rev-parse", "HEAD"]),
        )
    }
}

impl Drop for Signer {
    /// Signing started a gpg-agent for the home; it must not outlive the test.
    fn drop(&mut self) {
        if let Signer::Gpg { home, .. } = self {
            let _ = Command::new("gpgconf")
                .args(["--kill", "all"])
                .env("GNUPGHOME", home)
                .status();
        }
    }
}

fn run_git(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(io_err("running git"))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Rewrites the commit `HEAD` of `repo` with another message but the same signature header, so
/// the signature no longer matches what it signs; moves `HEAD`'s branch to it and returns its id.
pub fn tamper_head(repo: &Path) -> Result<String> {
    let raw = run_git(
        Command::new("git")
            .current_dir(repo)
            .args(["cat-file", "commit", "HEAD"]),
    )?;
    // The message follows the first blank line; the signature header stays above it.
    let Some((headers, message)) = raw.split_once("\n\n") else {
        return Err(Error::Other("a commit without a message".into()));
    };
    let forged = format!("{headers}\n\n{message} (rewritten)\n");
    let path = repo.join(".git").join("forged-commit");
    std::fs::write(&path, forged).map_err(io_err("writing a forged commit"))?;
    let id = run_git(
        Command::new("git")
            .current_dir(repo)
            .args(["hash-object", "-t", "commit", "-w"])
            .arg(&path),
    )?;
    run_git(
        Command::new("git")
            .current_dir(repo)
            .args(["update-ref", "HEAD", &id]),
    )?;
    Ok(id)
}
