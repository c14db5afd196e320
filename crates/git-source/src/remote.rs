//! Where a project's repository lives, and the credentials used to reach it.

use std::fmt;
use std::path::{Path, PathBuf};

/// Errors from parsing a [`Remote`] or loading [`Credentials`].
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote string was empty.
    #[error("the remote is empty")]
    Empty,
    /// A URL scheme this crate does not fetch from.
    #[error(
        "unsupported remote {input:?}: expected an https://, http://, git://, ssh:// or file:// URL, an scp-like user@host:path, or an absolute path"
    )]
    Unsupported {
        /// The string as given.
        input: String,
    },
    /// A URL with no host part.
    #[error("remote {input:?} has no host")]
    MissingHost {
        /// The string as given.
        input: String,
    },
    /// Credentials embedded in the URL. They would end up in logs and in the mirror's
    /// configuration, so they must come from a credentials file instead.
    #[error(
        "remote {input:?} contains user information; put credentials in a credentials file instead of the URL"
    )]
    CredentialsInUrl {
        /// The string as given, with the user information removed.
        input: String,
    },
    /// `file://` URLs must name an absolute path on this machine.
    #[error("file remote {input:?} must be of the form file:///absolute/path")]
    BadFileUrl {
        /// The string as given.
        input: String,
    },
    /// A relative local path: it would depend on the server's working directory.
    #[error("local remote path {input:?} must be absolute")]
    RelativePath {
        /// The string as given.
        input: String,
    },
    /// Credentials were attached to a remote that would send them in clear text (or not at all).
    #[error("credentials can only be used with https:// remotes, not {remote}")]
    CredentialsNeedHttps {
        /// The remote, without credentials.
        remote: String,
    },
    /// The credentials file could not be read.
    #[error("cannot read credentials file {path}: {source}")]
    CredentialsRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An SSH key or `known_hosts` file was attached to a remote that is not reached over SSH.
    #[error("SSH keys and known_hosts files can only be used with SSH remotes, not {remote}")]
    SshKeysNeedSsh {
        /// The remote.
        remote: String,
    },
    /// An SSH key or `known_hosts` path that is not absolute: it would depend on the server's
    /// working directory.
    #[error("{what} {path} must be an absolute path")]
    SshFileRelative {
        /// Which file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// An SSH key or `known_hosts` path with characters `ssh` would expand or split.
    #[error(
        "{what} {path} contains whitespace, quotes, '%', '~', '$' or '\\', which ssh would expand or split; use a plainer path"
    )]
    SshFileUnsafe {
        /// Which file.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// The credentials file did not have a usable shape.
    #[error("invalid credentials file {path}: {reason}")]
    CredentialsInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never includes the secret).
        reason: &'static str,
    },
}

/// Credentials for an `https://` remote.
///
/// A token is sent as HTTP basic auth with user `oauth2` and the token as password: GitLab accepts
/// personal, project, group and OAuth tokens that way, and GitHub/Gitea accept tokens as the
/// password for any user name. Basic auth (rather than a custom header) is what gix's HTTP
/// transport supports natively, including answering a `401` challenge.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// An access token.
    Token(String),
    /// A user name and password.
    Basic {
        /// The user name.
        username: String,
        /// The password (or a token used as password).
        password: String,
    },
}

impl fmt::Debug for Credentials {
    // Never print secrets, even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Credentials::Token(<redacted>)"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Credentials::Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl Credentials {
    /// The user name and password sent as HTTP basic auth.
    pub fn basic_auth(&self) -> (&str, &str) {
        match self {
            Credentials::Token(token) => ("oauth2", token),
            Credentials::Basic { username, password } => (username, password),
        }
    }

    /// Reads credentials from a file, as mounted from a Kubernetes secret for example.
    ///
    /// Two shapes are accepted:
    /// - the whole file (trimmed) is a token, on one line;
    /// - `key=value` lines, like Git's credential protocol: `token=...`, or `username=...` and
    ///   `password=...`. Blank lines and lines starting with `#` are ignored.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Credentials, RemoteError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| RemoteError::CredentialsRead {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text).map_err(|reason| RemoteError::CredentialsInvalid {
            path: path.to_owned(),
            reason,
        })
    }

    fn parse(text: &str) -> Result<Credentials, &'static str> {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let is_key_value = lines.first().is_some_and(|l| {
            l.starts_with("token=") || l.starts_with("username=") || l.starts_with("password=")
        });
        if !is_key_value {
            return match lines.as_slice() {
                [] => Err("the file is empty"),
                [token] => Ok(Credentials::Token((*token).to_owned())),
                _ => Err("expected a single token line or key=value lines"),
            };
        }
        let (mut token, mut username, mut password) = (None, None, None);
        for line in lines {
            let Some((key, value)) = line.split_once('=') else {
                return Err("a line is not of the form key=value");
            };
            let slot = match key.trim() {
                "token" => &mut token,
                "username" => &mut username,
                "password" => &mut password,
                _ => return Err("unknown key (expected token, username or password)"),
            };
            if slot.replace(value.trim().to_owned()).is_some() {
                return Err("a key is repeated");
            }
        }
        match (token, username, password) {
            (Some(t), None, None) if !t.is_empty() => Ok(Credentials::Token(t)),
            (None, Some(username), Some(password)) if !username.is_empty() => {
                Ok(Credentials::Basic { username, password })
            }
            (Some(_), _, _) => Err("token cannot be combined with username/password"),
            _ => Err("expected token=..., or both username=... and password=..."),
        }
    }
}

/// The kind of transport a [`Remote`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKind {
    /// `https://`
    Https,
    /// `http://` (no credentials allowed; meant for local servers and tests).
    Http,
    /// `git://` (the Git daemon protocol, unauthenticated).
    Git,
    /// A repository on this machine, given as `file:///path` or as an absolute path.
    Local,
    /// `ssh://[user@]host[:port]/path` or scp-like `user@host:path`, through the `ssh` program.
    Ssh,
}

/// How kas authenticates to an SSH remote and recognises its server.
///
/// Both are paths, read by `ssh` at each fetch (so a rotated key or `known_hosts` file mounted
/// from a Kubernetes secret is picked up without a restart). Host keys are pinned: a server
/// whose key is not in `known_hosts_file` is refused, never trusted on first use, and without
/// a `known_hosts_file` every server is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshAuth {
    /// The deploy key (an OpenSSH private key without passphrase); `None` tries no key, for
    /// servers serving a repository anonymously over SSH.
    pub key_file: Option<PathBuf>,
    /// The server's host keys, in OpenSSH `known_hosts` format.
    pub known_hosts_file: Option<PathBuf>,
}

/// Where a project's repository is, plus optional credentials.
///
/// `Display` shows the location without credentials, so it is safe to log.
#[derive(Clone, PartialEq, Eq)]
pub struct Remote {
    kind: RemoteKind,
    /// For network remotes, the URL as given; for local ones, the absolute path.
    location: String,
    credentials: Option<CredentialSource>,
    ssh: SshAuth,
}

/// Where a remote's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CredentialSource {
    Given(Credentials),
    /// Read at each use: a token rotated in a mounted Secret is used at the next fetch, and a
    /// file missing for now fails that project's fetches (reported), never a whole start.
    File(PathBuf),
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("kind", &self.kind)
            .field("location", &self.location)
            .field("credentials", &self.credentials)
            .field("ssh", &self.ssh)
            .finish()
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.location)
    }
}

impl std::str::FromStr for Remote {
    type Err = RemoteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Remote::parse(s)
    }
}

impl Remote {
    /// Parses `https://host/path`, `http://host/path`, `git://host[:port]/path`,
    /// `ssh://[user@]host[:port]/path`, scp-like `user@host:path`, `file:///abs/path` or
    /// `/abs/path`. User information in URLs is rejected (see
    /// [`RemoteError::CredentialsInUrl`]), except an SSH user name (no password); use
    /// [`Remote::with_credentials`] and [`Remote::with_ssh`].
    pub fn parse(input: &str) -> Result<Remote, RemoteError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(RemoteError::Empty);
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            let kind = match scheme.to_ascii_lowercase().as_str() {
                "https" => RemoteKind::Https,
                "http" => RemoteKind::Http,
                "git" => RemoteKind::Git,
                "ssh" => RemoteKind::Ssh,
                "file" => {
                    // Only `file:///abs`: a host part would silently be ignored by Git.
                    if !rest.starts_with('/') {
                        return Err(RemoteError::BadFileUrl {
                            input: s.to_owned(),
                        });
                    }
                    return Ok(Remote::local(PathBuf::from(rest)));
                }
                _ => {
                    return Err(RemoteError::Unsupported {
                        input: s.to_owned(),
                    });
                }
            };
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let ssh_user_only = |userinfo: &str| kind == RemoteKind::Ssh && !userinfo.contains(':');
            let host_port = match authority.rsplit_once('@') {
                // An SSH user name says which account the key logs into; it is not a secret.
                Some((userinfo, host)) if ssh_user_only(userinfo) => host,
                None => authority,
                Some((_userinfo, host)) => {
                    return Err(RemoteError::CredentialsInUrl {
                        input: format!("{scheme}://{host}{}", &rest[authority.len()..]),
                    });
                }
            };
            let host = host_port.rsplit_once(':').map_or(host_port, |(h, _port)| h);
            if host.is_empty() {
                return Err(RemoteError::MissingHost {
                    input: s.to_owned(),
                });
            }
            return Ok(Remote {
                kind,
                location: s.to_owned(),
                credentials: None,
                ssh: SshAuth::default(),
            });
        }
        let path = Path::new(s);
        if path.is_absolute() {
            return Ok(Remote::local(path.to_owned()));
        }
        // `[user@]host:path` is SSH's scp-like syntax (a `/` before the `:` makes it a relative
        // path, as Git decides); anything else is a relative path.
        if let Some((user_host, path)) = s.split_once(':')
            && !user_host.contains('/')
            && !s.starts_with('.')
        {
            let host = user_host.rsplit_once('@').map_or(user_host, |(_, h)| h);
            if host.is_empty() || path.is_empty() || user_host.starts_with('-') {
                return Err(RemoteError::Unsupported {
                    input: s.to_owned(),
                });
            }
            return Ok(Remote {
                kind: RemoteKind::Ssh,
                location: s.to_owned(),
                credentials: None,
                ssh: SshAuth::default(),
            });
        }
        Err(RemoteError::RelativePath {
            input: s.to_owned(),
        })
    }

    /// A repository on this machine.
    pub fn local(path: impl Into<PathBuf>) -> Remote {
        Remote {
            kind: RemoteKind::Local,
            location: path.into().to_string_lossy().into_owned(),
            credentials: None,
            ssh: SshAuth::default(),
        }
    }

    /// Attaches a deploy key and pinned host keys; only SSH remotes accept them. Both paths must
    /// be absolute.
    pub fn with_ssh(mut self, ssh: SshAuth) -> Result<Remote, RemoteError> {
        if self.kind != RemoteKind::Ssh {
            return Err(RemoteError::SshKeysNeedSsh {
                remote: self.location,
            });
        }
        for (what, path) in [
            ("the SSH key file", &ssh.key_file),
            ("the known_hosts file", &ssh.known_hosts_file),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(RemoteError::SshFileRelative {
                    what,
                    path: path.clone(),
                });
            }
            if let Some(path) = path {
                crate::ssh::check_path(what, path)?;
            }
        }
        self.ssh = ssh;
        Ok(self)
    }

    /// The SSH key and `known_hosts` file (both unset for other remotes).
    pub fn ssh(&self) -> &SshAuth {
        &self.ssh
    }

    /// Attaches credentials; only `https://` remotes accept them, so secrets never travel in
    /// clear text.
    pub fn with_credentials(mut self, credentials: Credentials) -> Result<Remote, RemoteError> {
        if self.kind != RemoteKind::Https {
            return Err(RemoteError::CredentialsNeedHttps {
                remote: self.location,
            });
        }
        self.credentials = Some(CredentialSource::Given(credentials));
        Ok(self)
    }

    /// Attaches credentials read from `file` at each use (see [`Remote::credentials`]); only
    /// `https://` remotes accept them.
    pub fn with_credentials_file(
        mut self,
        file: impl Into<PathBuf>,
    ) -> Result<Remote, RemoteError> {
        if self.kind != RemoteKind::Https {
            return Err(RemoteError::CredentialsNeedHttps {
                remote: self.location,
            });
        }
        self.credentials = Some(CredentialSource::File(file.into()));
        Ok(self)
    }

    /// The transport kind.
    pub fn kind(&self) -> RemoteKind {
        self.kind
    }

    /// Whether the remote is given credentials (without reading a credentials file).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The credentials, if any, as their file says now.
    pub fn credentials(&self) -> Result<Option<Credentials>, RemoteError> {
        match &self.credentials {
            None => Ok(None),
            Some(CredentialSource::Given(c)) => Ok(Some(c.clone())),
            Some(CredentialSource::File(file)) => Credentials::from_file(file).map(Some),
        }
    }

    /// For local remotes, the repository's path.
    pub fn local_path(&self) -> Option<&Path> {
        (self.kind == RemoteKind::Local).then(|| Path::new(&self.location))
    }

    /// The URL handed to the Git transport (never contains credentials).
    pub(crate) fn transport_url(&self) -> String {
        match self.kind {
            RemoteKind::Local => format!("file://{}", self.location),
            _ => self.location.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_file_is_read_at_each_use() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        let remote = Remote::parse("https://git.example/g/p.git")
            .and_then(|r| r.with_credentials_file(&file))
            .expect("remote");
        assert!(remote.has_credentials());
        let missing = remote.credentials().expect_err("no file yet");
        assert!(missing.to_string().contains("token"), "{missing}");
        std::fs::write(&file, "first\n").expect("write");
        assert_eq!(
            remote.credentials().expect("read"),
            Some(Credentials::Token("first".into()))
        );
        std::fs::write(&file, "rotated\n").expect("write");
        assert_eq!(
            remote.credentials().expect("read"),
            Some(Credentials::Token("rotated".into()))
        );
        let plain = Remote::parse("http://git.example/g/p.git").expect("remote");
        assert!(plain.with_credentials_file(&file).is_err());
    }

    #[test]
    fn parses_supported_remotes() {
        let cases = [
            ("https://gitlab.com/g/p.git", RemoteKind::Https),
            ("http://127.0.0.1:8080/p.git", RemoteKind::Http),
            ("git://127.0.0.1:9418/p.git", RemoteKind::Git),
            ("ssh://git@gitlab.com:2222/g/p.git", RemoteKind::Ssh),
            ("ssh://127.0.0.1/srv/p.git", RemoteKind::Ssh),
            ("git@gitlab.com:g/p.git", RemoteKind::Ssh),
            ("host:p.git", RemoteKind::Ssh),
            ("file:///srv/repos/p.git", RemoteKind::Local),
            ("/srv/repos/p.git", RemoteKind::Local),
            ("  https://gitlab.com/g/p  ", RemoteKind::Https),
        ];
        for (input, kind) in cases {
            let remote = Remote::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(remote.kind(), kind, "{input}");
        }
        assert_eq!(
            Remote::parse("file:///srv/p.git")
                .map(|r| r.transport_url())
                .ok(),
            Some("file:///srv/p.git".to_owned())
        );
    }

    #[test]
    fn rejects_bad_remotes() {
        type Check = fn(&RemoteError) -> bool;
        let cases: [(&str, Check); 10] = [
            ("", |e| matches!(e, RemoteError::Empty)),
            ("ftp://gitlab.com/g/p.git", |e| {
                matches!(e, RemoteError::Unsupported { .. })
            }),
            ("git@gitlab.com:", |e| {
                matches!(e, RemoteError::Unsupported { .. })
            }),
            ("-oProxyCommand=x:p", |e| {
                matches!(e, RemoteError::Unsupported { .. })
            }),
            (
                "ssh://git:secret@gitlab.com/g/p.git",
                |e| matches!(e, RemoteError::CredentialsInUrl { input } if !input.contains("secret")),
            ),
            ("relative/path", |e| {
                matches!(e, RemoteError::RelativePath { .. })
            }),
            ("file://host/path", |e| {
                matches!(e, RemoteError::BadFileUrl { .. })
            }),
            ("https:///path", |e| {
                matches!(e, RemoteError::MissingHost { .. })
            }),
            ("https://:443/path", |e| {
                matches!(e, RemoteError::MissingHost { .. })
            }),
            (
                "https://user:secret@gitlab.com/g/p.git",
                |e| matches!(e, RemoteError::CredentialsInUrl { input } if !input.contains("secret")),
            ),
        ];
        for (input, check) in cases {
            match Remote::parse(input) {
                Ok(r) => panic!("{input:?} parsed as {r:?}"),
                Err(e) => assert!(check(&e), "{input:?}: unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn credentials_only_over_https() {
        let token = Credentials::Token("t".into());
        assert!(
            Remote::parse("https://gitlab.com/p")
                .and_then(|r| r.with_credentials(token.clone()))
                .is_ok()
        );
        for input in ["http://h/p", "git://h/p", "/p"] {
            let err = Remote::parse(input).and_then(|r| r.with_credentials(token.clone()));
            assert!(
                matches!(err, Err(RemoteError::CredentialsNeedHttps { .. })),
                "{input}"
            );
        }
    }

    #[test]
    fn ssh_keys_only_for_ssh_remotes() {
        let ssh = SshAuth {
            key_file: Some("/keys/deploy".into()),
            known_hosts_file: Some("/keys/known_hosts".into()),
        };
        let remote = Remote::parse("git@h:p.git").and_then(|r| r.with_ssh(ssh.clone()));
        assert_eq!(remote.map(|r| r.ssh().clone()).ok(), Some(ssh.clone()));
        assert!(matches!(
            Remote::parse("https://h/p").and_then(|r| r.with_ssh(ssh)),
            Err(RemoteError::SshKeysNeedSsh { .. })
        ));
        let relative = SshAuth {
            key_file: Some("deploy".into()),
            known_hosts_file: None,
        };
        assert!(matches!(
            Remote::parse("ssh://h/p").and_then(|r| r.with_ssh(relative)),
            Err(RemoteError::SshFileRelative { .. })
        ));
    }

    #[test]
    fn credentials_file_shapes() {
        assert_eq!(
            Credentials::parse("glpat-abc\n"),
            Ok(Credentials::Token("glpat-abc".into()))
        );
        assert_eq!(
            Credentials::parse("# comment\ntoken=abc=\n"),
            Ok(Credentials::Token("abc=".into()))
        );
        assert_eq!(
            Credentials::parse("username=bot\npassword=p=w\n"),
            Ok(Credentials::Basic {
                username: "bot".into(),
                password: "p=w".into()
            })
        );
        for bad in [
            "",
            "a\nb",
            "username=bot",
            "token=a\nusername=b\npassword=c",
            "token=a\ntoken=b",
            "token=a\nfoo=b",
        ] {
            assert!(Credentials::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Credentials::Token("x".into()).basic_auth(), ("oauth2", "x"));
        let debug = format!(
            "{:?}",
            Credentials::Basic {
                username: "u".into(),
                password: "hunter2".into()
            }
        );
        assert!(!debug.contains("hunter2"));
    }

    #[test]
    fn credentials_from_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("creds");
        std::fs::write(&path, "token=abc\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Credentials::from_file(&path).ok(),
            Some(Credentials::Token("abc".into()))
        );
        assert!(matches!(
            Credentials::from_file(dir.path().join("missing")),
            Err(RemoteError::CredentialsRead { .. })
        ));
    }
}
