//! A real OpenSSH server (`sshd` from Debian's `openssh-server`, installed by scripts/setup) on
//! 127.0.0.1, for tests of fetching Git repositories over SSH with deploy keys and pinned host
//! keys. It serves repositories by path (`git-upload-pack` in the login shell, as Git servers
//! without a forced command do) to the user running the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{Error, Result, io_err};

/// A running sshd, killed when dropped.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    user: String,
    host_public_key: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// An SSH key pair made by `ssh-keygen` (ed25519, no passphrase).
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// The private key file (mode 0600, as `ssh` requires).
    pub private: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA… comment`).
    pub public: String,
}

/// Makes an ed25519 key pair in `dir` named `name` (`name` and `name.pub`).
pub fn keygen(dir: &Path, name: &str) -> Result<KeyPair> {
    let private = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(io_err("running ssh-keygen"))?;
    if !status.success() {
        return Err(Error::Other(format!(
            "ssh-keygen for {name} failed: {status}"
        )));
    }
    let public = std::fs::read_to_string(private.with_extension("pub"))
        .map_err(io_err("reading a public key"))?
        .trim()
        .to_owned();
    Ok(KeyPair { private, public })
}

impl Sshd {
    /// Starts one that accepts the public keys `authorized` for the user running the test.
    ///
    /// sshd runs in the foreground (`-D`), logs to a file (`-e`), and reads only its own
    /// configuration and host key in a temporary directory.
    pub fn start(authorized: &[&str]) -> Result<Sshd> {
        let dir = tempfile::tempdir().map_err(io_err("creating a directory for sshd"))?;
        let host = keygen(dir.path(), "host_ed25519")?;
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(&authorized_keys, authorized.join("\n") + "\n")
            .map_err(io_err("writing authorized_keys"))?;
        // sshd checks that its privilege separation directory exists even when it does not use
        // it; Debian creates it only when the service starts.
        std::fs::create_dir_all("/run/sshd").map_err(io_err("creating /run/sshd"))?;
        let port = crate::pick_local_port("sshd")?;
        // `StrictModes no`: the temporary directory's modes are not what sshd wants for a home.
        let conf = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile none\n\
             AuthorizedKeysFile {keys}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nAcceptEnv GIT_PROTOCOL\nLogLevel VERBOSE\n",
            host = host.private.display(),
            keys = authorized_keys.display(),
        );
        let conf_path = dir.path().join("sshd_config");
        std::fs::write(&conf_path, conf).map_err(io_err("writing sshd_config"))?;
        let log = dir.path().join("sshd.log");
        let log_file = std::fs::File::create(&log).map_err(io_err("creating sshd.log"))?;
        // sshd must be started by its absolute path (it re-executes itself).
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(io_err(
                "starting /usr/sbin/sshd (openssh-server, installed by scripts/setup)",
            ))?;
        let user = current_user()?;
        let sshd = Sshd {
            child,
            port,
            user,
            host_public_key: host.public,
            log,
            dir,
        };
        crate::wait_local_port("sshd", sshd.port, || sshd.log())?;
        Ok(sshd)
    }

    /// `ssh://USER@127.0.0.1:PORT/PATH` for a repository at the absolute `path`.
    pub fn url(&self, path: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            path.display()
        )
    }

    /// The `known_hosts` line that pins this server's host key.
    pub fn known_hosts_line(&self) -> String {
        self.known_hosts_line_for(&self.host_public_key)
    }

    /// A `known_hosts` line pinning `public_key` (a `.pub` line) for this server's address: with
    /// another key than the server's, it makes the server look like an impostor.
    pub fn known_hosts_line_for(&self, public_key: &str) -> String {
        let key = public_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        format!("[127.0.0.1]:{} {key}", self.port)
    }

    /// Writes a `known_hosts` file with [`Sshd::known_hosts_line`] into `dir`.
    pub fn write_known_hosts(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("known_hosts");
        std::fs::write(&path, self.known_hosts_line() + "\n")
            .map_err(io_err("writing known_hosts"))?;
        Ok(path)
    }

    /// The host key's SHA256 fingerprint as `ssh` prints it (`SHA256:…`).
    pub fn host_fingerprint(&self) -> Result<String> {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.dir.path().join("host_ed25519.pub"))
            .output()
            .map_err(io_err("running ssh-keygen -l"))?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| Error::Other("ssh-keygen -l printed no fingerprint".into()))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The user sshd lets in: the one running the test.
fn current_user() -> Result<String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .map_err(io_err("running id -un"))?;
    let user = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if user.is_empty() {
        return Err(Error::Other("id -un printed no user name".into()));
    }
    Ok(user)
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
