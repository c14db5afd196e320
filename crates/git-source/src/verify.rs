//! Signed commits only: whether a commit is signed by a key the project trusts, checked by the
//! real tools (`git verify-commit`, which runs `gpg` or `ssh-keygen -Y`).
//!
//! Each check runs in an isolated environment made for it: an empty temporary `HOME`, no system
//! or global Git configuration, and a temporary `GNUPGHOME` holding only the project's trusted
//! OpenPGP keys (imported and marked trusted there). Nothing of the user running kas (keyrings,
//! `~/.gitconfig`, `~/.ssh/allowed_signers`) can make a commit pass. `gpg.minTrustLevel=fully`
//! is what makes "trusted" mean "listed by the project": without it, `git verify-commit`
//! accepts an SSH signature by any key whose signature is merely valid.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::CommitId;

mod signers;

/// How long one tool may run before the check is abandoned.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// A project's trusted signing keys. With a policy, only commits signed by one of these keys are
/// used (mode `head`: the commit applied must itself be signed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// SSH signing keys, in Git's allowed-signers format (`principal key-type key`).
    pub allowed_signers_file: Option<PathBuf>,
    /// OpenPGP public keys, as an armored keyring (`gpg --export --armor`).
    pub gpg_keyring_file: Option<PathBuf>,
}

/// A commit that passed: who signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The commit.
    pub commit: CommitId,
    /// The signer: the allowed-signers principal, or the OpenPGP user id.
    pub signer: String,
}

/// Why a commit is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The refused commit.
    pub commit: CommitId,
    /// Who signed it, if it is signed and the signer could be told.
    pub signer: Option<String>,
    /// Why it is refused.
    pub reason: String,
    /// The refusal is the commit's verdict (unsigned, untrusted, bad signature); `false` when the
    /// check itself could not run (a tool missing or timing out), which is retried.
    pub definitive: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "commit {} refused: {}", self.commit, self.reason)?;
        if let Some(signer) = &self.signer {
            write!(f, " (signer: {signer})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

/// Checks `commit` in the repository `git_dir` against `policy`.
pub(crate) fn verify_commit(
    git_dir: &Path,
    commit: &CommitId,
    policy: &VerifyPolicy,
) -> Result<Verified, Refusal> {
    let tool_failure = |reason: String| Refusal {
        commit: *commit,
        signer: None,
        reason: format!("the signature could not be checked: {reason}"),
        definitive: false,
    };
    let env = Isolated::new(policy).map_err(tool_failure)?;
    let (allowed, out_of_date) = env
        .allowed_signers_now(policy.allowed_signers_file.as_deref())
        .map_err(tool_failure)?;
    let git = |args: &[&str]| {
        let mut cmd = env.command("git");
        cmd.arg("--git-dir")
            .arg(git_dir)
            .arg("-c")
            .arg(format!("gpg.ssh.allowedSignersFile={}", allowed.display()))
            .args(["-c", "gpg.minTrustLevel=fully"])
            .args(args);
        cmd
    };
    let hex = commit.to_hex();
    // The signature's status and signer, for the report; the verdict is verify-commit's.
    let show = env
        .run(
            // Not %GT: git 2.39 aborts on it for a signature it cannot check.
            git(&["show", "-s", "--format=%G?%x00%GS%x00%GK%x00", &hex]),
            "git show",
        )
        .map_err(tool_failure)?;
    if !show.ok {
        return Err(tool_failure(format!(
            "git show failed: {}",
            show.stderr.trim()
        )));
    }
    let fields: Vec<&str> = show.stdout.split('\0').collect();
    let field = |i: usize| fields.get(i).map(|s| s.trim()).unwrap_or_default();
    let (status, name, key) = (field(0), field(1), field(2));
    let signer = [name, key]
        .into_iter()
        .find(|s| !s.is_empty())
        .map(str::to_owned);
    let verdict = env
        .run(git(&["verify-commit", &hex]), "git verify-commit")
        .map_err(tool_failure)?;
    if verdict.ok && status == "G" {
        return Ok(Verified {
            commit: *commit,
            signer: signer.unwrap_or_default(),
        });
    }
    let reason = match status {
        "N" => "the commit is not signed".to_owned(),
        "B" => "bad signature: the commit is not what was signed (tampered with)".to_owned(),
        "E" => "signed by a key that is not trusted (the signature cannot be checked with the project's keys)".to_owned(),
        "X" => "the signature has expired".to_owned(),
        "Y" => "signed by an expired key".to_owned(),
        "R" => "signed by a revoked key".to_owned(),
        // "G" or "U": a valid signature, but by a key below full trust, that is, one the
        // project's files do not list (or list only for another time).
        _ if !out_of_date.is_empty() => format!(
            "signed by a key that is not trusted now (not in the project's allowed signers or keyring, or listed there only for another time: {})",
            out_of_date.join(", ")
        ),
        _ => "signed by a key that is not trusted (not in the project's allowed signers or keyring)"
            .to_owned(),
    };
    Err(Refusal {
        commit: *commit,
        signer,
        reason,
        definitive: true,
    })
}

/// A temporary home for one check.
struct Isolated {
    dir: tempfile::TempDir,
}

impl Drop for Isolated {
    /// Should gpg have started an agent for its home after all, it must not outlive the home.
    fn drop(&mut self) {
        if self.dir.path().join("gnupg").join("pubring.kbx").exists() {
            let mut kill = self.command("gpgconf");
            kill.args(["--kill", "all"]);
            let _ = self.run(kill, "gpgconf --kill all");
        }
    }
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Isolated {
    fn new(policy: &VerifyPolicy) -> Result<Isolated, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("creating a temporary home: {e}"))?;
        // A missing or unreadable file is an operator's mistake to report as such, not a
        // verdict on the commit (which would be cached).
        for file in [&policy.allowed_signers_file, &policy.gpg_keyring_file]
            .into_iter()
            .flatten()
        {
            std::fs::File::open(file).map_err(|e| {
                format!("cannot read the trusted keys file {}: {e}", file.display())
            })?;
        }
        let env = Isolated { dir };
        let gnupg = env.gnupg_home();
        std::fs::create_dir(&gnupg).map_err(|e| format!("creating GNUPGHOME: {e}"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // gpg warns about (and some versions refuse) a home others can read.
            std::fs::set_permissions(&gnupg, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("restricting GNUPGHOME: {e}"))?;
        }
        if let Some(keyring) = &policy.gpg_keyring_file {
            env.import_keyring(keyring)?;
        }
        Ok(env)
    }

    /// The project's allowed-signers file judged at kas's clock ([`signers::judge`]), written
    /// into this home (`/dev/null` without one), and the lines left out as not valid now.
    fn allowed_signers_now(&self, file: Option<&Path>) -> Result<(PathBuf, Vec<String>), String> {
        let Some(file) = file else {
            return Ok((PathBuf::from("/dev/null"), Vec::new()));
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the trusted keys file {}: {e}", file.display()))?;
        let judged = signers::judge(&text, std::time::SystemTime::now());
        let now = self.dir.path().join("allowed_signers");
        std::fs::write(&now, judged.text)
            .map_err(|e| format!("writing the allowed signers judged now: {e}"))?;
        Ok((now, judged.out_of_date))
    }

    fn gnupg_home(&self) -> PathBuf {
        self.dir.path().join("gnupg")
    }

    /// Imports the trusted keys and marks each fully trusted, so their signatures verify at
    /// `gpg.minTrustLevel=fully`; being in this keyring is what trust means here. Public keys
    /// need no gpg-agent, so none is started (`--no-autostart`).
    fn import_keyring(&self, keyring: &Path) -> Result<(), String> {
        let mut import = self.command("gpg");
        import
            .args(["--batch", "--no-autostart", "--quiet", "--import"])
            .arg(keyring);
        let ran = self.run(import, "gpg --import")?;
        if !ran.ok {
            return Err(format!(
                "importing the OpenPGP keyring {} failed: {}",
                keyring.display(),
                ran.stderr.trim()
            ));
        }
        let mut list = self.command("gpg");
        list.args(["--batch", "--no-autostart", "--with-colons", "--list-keys"]);
        let listed = self.run(list, "gpg --list-keys")?;
        // The fingerprint line right after each primary key (`pub`) line.
        let mut ownertrust = String::new();
        let mut after_pub = false;
        for line in listed.stdout.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.first().copied() {
                Some("pub") => after_pub = true,
                Some("fpr") if after_pub => {
                    if let Some(fpr) = fields.get(9) {
                        ownertrust.push_str(&format!("{fpr}:6:\n"));
                    }
                    after_pub = false;
                }
                _ => {}
            }
        }
        let trust_file = self.dir.path().join("ownertrust");
        std::fs::write(&trust_file, ownertrust).map_err(|e| format!("writing ownertrust: {e}"))?;
        let mut trust = self.command("gpg");
        trust
            .args([
                "--batch",
                "--no-autostart",
                "--quiet",
                "--import-ownertrust",
            ])
            .arg(&trust_file);
        let ran = self.run(trust, "gpg --import-ownertrust")?;
        if !ran.ok {
            return Err(format!(
                "trusting the imported keys failed: {}",
                ran.stderr.trim()
            ));
        }
        Ok(())
    }

    /// `program` with only the environment a check needs.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.dir.path())
            .env("GNUPGHOME", self.gnupg_home())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("LANG", "C")
            .env("LC_ALL", "C")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `cmd` to its end or [`TOOL_TIMEOUT`], whichever comes first. Output goes to files,
    /// so a chatty tool can never block on a full pipe while we wait.
    fn run(&self, mut cmd: Command, what: &str) -> Result<Ran, String> {
        let out_path = self.dir.path().join("stdout");
        let err_path = self.dir.path().join("stderr");
        let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{what}: {e}"));
        cmd.stdout(file(&out_path)?).stderr(file(&err_path)?);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{what} could not start: {e}"))?;
        let deadline = Instant::now() + TOOL_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{what} did not finish within {TOOL_TIMEOUT:?}"));
                }
                Err(e) => return Err(format!("{what}: {e}")),
            }
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        Ok(Ran {
            ok: status.success(),
            stdout: read(&out_path),
            stderr: read(&err_path),
        })
    }
}
