//! Fetching over SSH: the `ssh` program gix spawns, and what its log says when it fails.
//!
//! gix's SSH transport runs the `ssh` program, like Git. Rather than `GIT_SSH_COMMAND` (process
//! environment, shared by every fetch) or `core.sshCommand` in the mirror's configuration
//! (persisted, and read by anything opening the mirror), each fetch builds its own transport with
//! the command line for that project: its deploy key, its pinned `known_hosts`, and options that
//! shut out everything else the user running kas may have (`-F /dev/null` skips
//! `~/.ssh/config` and `/etc/ssh/ssh_config`, no agent, no default identities, no global
//! `known_hosts`, never a prompt, never trust on first use).
//!
//! `ssh` writes its messages to a log file in the mirror directory (`-E`) at debug level one:
//! gix only turns a few of `ssh`'s stderr lines into errors and prints the others to kas's
//! stderr, where nobody would connect them to the project. The log tells which host key the
//! server presented, so a refusal can name its fingerprint.

use std::path::{Path, PathBuf};

use crate::error::FetchError;
use crate::remote::{Remote, RemoteError, SshAuth};

/// How long `ssh` may take to open the TCP connection.
const CONNECT_TIMEOUT_SECS: u32 = 30;

/// Keep-alives on an open connection: `ssh` asks the server every this many seconds and gives
/// up after [`SERVER_ALIVE_COUNT_MAX`] unanswered asks. Without them a half-open connection
/// (a server or NAT that dropped it silently) blocks the fetch's read forever, and gix's ssh
/// transport cannot be interrupted while it reads; with them it ends within about a minute.
const SERVER_ALIVE_INTERVAL_SECS: u32 = 15;
const SERVER_ALIVE_COUNT_MAX: u32 = 4;

/// The log file `ssh` writes to, in the mirror directory. Truncated before each fetch; fetches of
/// one mirror are serialized.
pub(crate) fn log_path(mirror_dir: &Path) -> PathBuf {
    mirror_dir.join("tether-ssh.log")
}

/// Where `ssh`'s standard error goes, in the mirror directory. With `-E` its own messages go to
/// the log, so what reaches its stderr is the remote `git-upload-pack`'s ("fatal: …"): gix
/// would print it to kas's own stderr, where nobody would connect it to the project, and the
/// fetch's error would only say the connection ended. Truncated before each fetch.
pub(crate) fn stderr_path(mirror_dir: &Path) -> PathBuf {
    mirror_dir.join("tether-upload-pack.stderr")
}

/// Checks that `path` can be handed to `ssh`: it expands `%` tokens and `~` in file options, and
/// splits option values on whitespace and quotes.
pub(crate) fn check_path(what: &'static str, path: &Path) -> Result<(), RemoteError> {
    let text = path.to_string_lossy();
    let unsafe_char = |c: char| c.is_whitespace() || c.is_control() || "%~\"'\\$`".contains(c);
    if text.contains(unsafe_char) {
        return Err(RemoteError::SshFileUnsafe {
            what,
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Quotes `s` for `sh`, which gix uses to run a command with arguments.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The `ssh` command line (without host and remote command, which gix appends after it, so
/// the redirection of stderr to `stderr` stays a part of the one `sh` command).
pub(crate) fn command(ssh: &SshAuth, log: &Path, stderr: &Path) -> String {
    let known_hosts = ssh.known_hosts_file.as_deref().map_or_else(
        || "/dev/null".to_owned(),
        |p| p.to_string_lossy().into_owned(),
    );
    let identity = ssh
        .key_file
        .as_deref()
        .map_or_else(|| "none".to_owned(), |p| p.to_string_lossy().into_owned());
    let options = [
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        "UpdateHostKeys=no".to_owned(),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        format!("UserKnownHostsFile={known_hosts}"),
        "IdentitiesOnly=yes".to_owned(),
        "IdentityAgent=none".to_owned(),
        format!("IdentityFile={identity}"),
        "PasswordAuthentication=no".to_owned(),
        "KbdInteractiveAuthentication=no".to_owned(),
        format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}"),
        format!("ServerAliveInterval={SERVER_ALIVE_INTERVAL_SECS}"),
        format!("ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"),
        "LogLevel=DEBUG1".to_owned(),
    ];
    let mut cmd = format!(
        "ssh -F /dev/null -E {}",
        shell_quote(&log.to_string_lossy())
    );
    for option in options {
        cmd.push_str(" -o ");
        cmd.push_str(&shell_quote(&option));
    }
    cmd.push_str(" 2>");
    cmd.push_str(&shell_quote(&stderr.to_string_lossy()));
    cmd
}

/// Builds the transport for one fetch from `remote`.
pub(crate) fn transport(
    remote: &Remote,
    log: &Path,
    stderr: &Path,
) -> Result<Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>, String> {
    use gix::protocol::transport::client::blocking_io::ssh;
    let url = gix::url::parse(gix::bstr::BStr::new(remote.transport_url().as_bytes()))
        .map_err(|e| format!("invalid SSH remote: {e}"))?;
    let options = ssh::connect::Options {
        command: Some(command(remote.ssh(), log, stderr).into()),
        disallow_shell: false,
        // The command is a command line, not a program name gix could tell the variant from.
        kind: Some(ssh::ProgramKind::Ssh),
    };
    let transport = ssh::connect(url, gix::protocol::transport::Protocol::V2, options, false)
        .map_err(|e| e.to_string())?;
    Ok(Box::new(transport))
}

/// Reads what `ssh` logged and, when it explains the failure, the [`FetchError`] to report.
pub(crate) fn classify(remote: &Remote, log: &Path) -> Option<FetchError> {
    let text = std::fs::read_to_string(log).ok()?;
    classify_log(remote, &text)
}

fn classify_log(remote: &Remote, text: &str) -> Option<FetchError> {
    let name = remote.to_string();
    let messages: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("debug") && !l.starts_with('@'))
        .collect();
    let find = |needle: &str| messages.iter().find(|l| l.contains(needle)).copied();
    if messages
        .iter()
        .any(|l| l.contains("Host key verification failed"))
    {
        let presented = text
            .lines()
            .find_map(|l| l.split_once("Server host key: ").map(|(_, k)| k.trim()))
            .unwrap_or("unknown");
        let known_hosts = remote.ssh().known_hosts_file.as_deref().map_or_else(
            || "no known_hosts file is configured for the project".to_owned(),
            |p| format!("known_hosts file {}", p.display()),
        );
        let what = find("has changed")
            .or_else(|| find("host key is known for"))
            .or_else(|| find("REMOTE HOST IDENTIFICATION HAS CHANGED"))
            .unwrap_or("Host key verification failed.");
        return Some(FetchError::Auth {
            remote: name,
            detail: format!(
                "the server's host key is not trusted: {what} The server presented {presented}; {known_hosts}. Add the server's host key to the known_hosts file if it is the right one"
            ),
        });
    }
    if let Some(line) = find("Permission denied") {
        let key = remote.ssh().key_file.as_deref().map_or_else(
            || "no SSH key is configured for the project".to_owned(),
            |p| format!("SSH key {}", p.display()),
        );
        return Some(FetchError::Auth {
            remote: name,
            detail: format!("the server refused the login ({key}): {line}"),
        });
    }
    if let Some(line) = find("Load key").or_else(|| find("no such identity")) {
        return Some(FetchError::Auth {
            remote: name,
            detail: format!("the SSH key cannot be used: {line}"),
        });
    }
    let unreachable = [
        "Connection refused",
        "Connection timed out",
        "Could not resolve hostname",
        "No route to host",
        "Network is unreachable",
        "Connection reset",
        "Connection closed by",
        // What ssh says when the server stopped answering keep-alives.
        "not responding",
    ];
    if let Some(line) = messages
        .iter()
        .find(|l| unreachable.iter().any(|u| l.contains(u)))
    {
        return Some(FetchError::Unreachable {
            remote: name,
            detail: (*line).to_owned(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_pins_keys_and_shuts_out_user_config() {
        let ssh = SshAuth {
            key_file: Some("/keys/deploy".into()),
            known_hosts_file: Some("/keys/known_hosts".into()),
        };
        let cmd = command(
            &ssh,
            Path::new("/cache/1-x.git/tether-ssh.log"),
            Path::new("/cache/1-x.git/tether-upload-pack.stderr"),
        );
        for part in [
            "ssh -F /dev/null -E '/cache/1-x.git/tether-ssh.log'",
            "'StrictHostKeyChecking=yes'",
            "'UserKnownHostsFile=/keys/known_hosts'",
            "'GlobalKnownHostsFile=/dev/null'",
            "'IdentityFile=/keys/deploy'",
            "'IdentitiesOnly=yes'",
            "'IdentityAgent=none'",
            "'BatchMode=yes'",
            "'ServerAliveInterval=15'",
            "'ServerAliveCountMax=4'",
            " 2>'/cache/1-x.git/tether-upload-pack.stderr'",
        ] {
            assert!(cmd.contains(part), "{part} missing in {cmd}");
        }
        let none = command(&SshAuth::default(), Path::new("/l"), Path::new("/e"));
        assert!(none.contains("'UserKnownHostsFile=/dev/null'"), "{none}");
        assert!(none.contains("'IdentityFile=none'"), "{none}");
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["/a b", "/a%d", "/~x", "/a'b", "/a\"b"] {
            assert!(check_path("f", Path::new(bad)).is_err(), "{bad}");
        }
        assert!(check_path("f", Path::new("/keys/deploy_key-1.pem")).is_ok());
    }

    #[test]
    fn log_lines_classify() {
        let remote =
            Remote::parse("ssh://git@127.0.0.1:2222/r.git").unwrap_or_else(|e| panic!("{e}"));
        let changed = "debug1: Server host key: ssh-ed25519 SHA256:abc\n@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key for [127.0.0.1]:2222 has changed and you have requested strict checking.\nHost key verification failed.\n";
        match classify_log(&remote, changed) {
            Some(FetchError::Auth { detail, .. }) => {
                assert!(detail.contains("SHA256:abc"), "{detail}");
                assert!(detail.contains("[127.0.0.1]:2222"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        let denied = "git@127.0.0.1: Permission denied (publickey).\n";
        assert!(matches!(
            classify_log(&remote, denied),
            Some(FetchError::Auth { .. })
        ));
        let refused = "ssh: connect to host 127.0.0.1 port 2222: Connection refused\n";
        assert!(matches!(
            classify_log(&remote, refused),
            Some(FetchError::Unreachable { .. })
        ));
        let silent = "Timeout, server 127.0.0.1 not responding.\n";
        assert!(matches!(
            classify_log(&remote, silent),
            Some(FetchError::Unreachable { .. })
        ));
        assert!(classify_log(&remote, "debug1: all fine\n").is_none());
    }
}
