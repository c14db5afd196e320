//! The programs a project needs besides kas: a project set up where one is missing is reported
//! when it is set up, with what to install, instead of failing at every fetch or check with
//! "No such file or directory".

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::remote::RemoteKind;
use crate::sources::ProjectSpec;

/// A program a project may need, and the Debian package that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tool {
    /// Looked up on `PATH`, or an absolute path.
    pub program: &'static str,
    pub package: &'static str,
}

const fn tool(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package }
}

/// Repacks every mirror.
const GIT: Tool = tool("git", "git");
/// gix's SSH transport runs `ssh` through the shell, as Git does.
const SH: Tool = tool("/bin/sh", "dash");
const SSH: Tool = tool("ssh", "openssh-client");
/// `git verify-commit` checks SSH signatures with it.
const SSH_KEYGEN: Tool = tool("ssh-keygen", "openssh-client");
/// OpenPGP signatures: importing the trusted keys and `git verify-commit`.
const GPG: Tool = tool("gpg", "gnupg");
const GPGCONF: Tool = tool("gpgconf", "gnupg");

/// The programs mirroring and verifying `spec` runs (pure): none without a remote.
pub fn needed_tools(spec: &ProjectSpec) -> Vec<Tool> {
    let Some(remote) = &spec.remote else {
        return Vec::new();
    };
    let mut tools = vec![GIT];
    if remote.kind() == RemoteKind::Ssh {
        tools.extend([SH, SSH]);
    }
    if let Some(policy) = &spec.verify {
        if policy.allowed_signers_file.is_some() {
            tools.push(SSH_KEYGEN);
        }
        if policy.gpg_keyring_file.is_some() {
            tools.extend([GPG, GPGCONF]);
        }
    }
    tools
}

/// Those of `tools` that are not an executable file, by absolute path or in a folder of `path`
/// (a `PATH` value).
pub fn missing_tools(tools: &[Tool], path: Option<&OsStr>) -> Vec<Tool> {
    let dirs: Vec<_> = path
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .collect();
    tools
        .iter()
        .filter(|t| {
            let program = Path::new(t.program);
            if program.is_absolute() {
                return !executable(program);
            }
            !dirs.iter().any(|d| executable(&d.join(program)))
        })
        .copied()
        .collect()
}

fn executable(file: &Path) -> bool {
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Warns (once per call) about the programs `spec` needs that this process's `PATH` lacks.
pub(crate) fn warn_if_missing(spec: &ProjectSpec) {
    let missing = missing_tools(&needed_tools(spec), std::env::var_os("PATH").as_deref());
    if missing.is_empty() {
        return;
    }
    let programs: Vec<_> = missing.iter().map(|t| t.program).collect();
    let mut packages: Vec<_> = missing.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    tracing::warn!(
        project = %spec.path,
        missing = ?programs,
        install = ?packages,
        "A program this project needs is not installed: its fetches or signature checks will fail"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Remote, VerifyPolicy};

    fn spec(remote: Option<&str>, verify: Option<VerifyPolicy>) -> ProjectSpec {
        ProjectSpec {
            id: 1,
            path: "group/app".into(),
            remote: remote.map(|r| Remote::parse(r).unwrap()),
            verify,
        }
    }

    fn programs(tools: &[Tool]) -> Vec<&'static str> {
        tools.iter().map(|t| t.program).collect()
    }

    /// git for every mirror; the shell and ssh for SSH remotes; ssh-keygen for SSH signatures;
    /// gpg and gpgconf for OpenPGP ones; nothing without a remote.
    #[test]
    fn the_tools_follow_the_remote_and_the_signature_policy() {
        assert!(needed_tools(&spec(None, None)).is_empty());
        let https = spec(Some("https://gitlab.example/g/p.git"), None);
        assert_eq!(programs(&needed_tools(&https)), ["git"]);
        let ssh = spec(Some("ssh://git@gitlab.example/g/p.git"), None);
        assert_eq!(programs(&needed_tools(&ssh)), ["git", "/bin/sh", "ssh"]);
        let both = VerifyPolicy {
            allowed_signers_file: Some("/etc/kas/signers".into()),
            gpg_keyring_file: Some("/etc/kas/keyring".into()),
        };
        let signed = spec(Some("git@gitlab.example:g/p.git"), Some(both));
        assert_eq!(
            programs(&needed_tools(&signed)),
            ["git", "/bin/sh", "ssh", "ssh-keygen", "gpg", "gpgconf"]
        );
    }

    /// A program counts as there only as an executable file in a `PATH` folder (or at its
    /// absolute path): not a plain file, not a folder, not outside `PATH`.
    #[test]
    fn missing_tools_are_those_no_path_folder_has_as_an_executable() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, other) = (dir.path().join("bin"), dir.path().join("other"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(other.join("gpg")).unwrap();
        std::fs::write(bin.join("git"), "").unwrap();
        std::fs::set_permissions(bin.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("ssh"), "").unwrap();
        let path = std::env::join_paths([&bin, &other]).unwrap();
        let all = [GIT, SSH, GPG];
        assert_eq!(programs(&missing_tools(&all, Some(&path))), ["ssh", "gpg"]);
        assert_eq!(programs(&missing_tools(&all, None)), ["git", "ssh", "gpg"]);
        let absolute = tool("/nonexistent/sh", "dash");
        assert_eq!(
            programs(&missing_tools(&[absolute], Some(&path))),
            ["/nonexistent/sh"]
        );
    }
}
