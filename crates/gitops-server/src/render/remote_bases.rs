//! Remote Kustomize bases: the Git repositories a kustomization names in `resources`, `bases`
//! or `components` (`github.com/org/repo/base?ref=v1`, `https://host/org/repo//deploy?ref=v1`,
//! `git::…`, `ssh://…`, `git@host:org/repo`), read as Kustomize reads them, and the allow list
//! of `gitops.render.remote_bases`. kas fetches an allowed base itself, outside the sandbox
//! (see [`super::remote_fetch`]): Kustomize never reaches the network. Pure.

use tether_agent_config::chart_repository::plain_url;
use url::Url;

use super::dependencies;

/// Hosts whose repositories are `host/owner/repo`: Kustomize reads the path after those two
/// segments as the directory in the repository, without `//`.
const SHORTHAND_HOSTS: [&str; 3] = ["github.com", "gitlab.com", "bitbucket.org"];

/// Query parameters Kustomize accepts that change nothing kas fetches: `timeout` is kas's own
/// (`git.fetch_timeout`), and kas fetches no submodules.
const IGNORED_PARAMETERS: [&str; 2] = ["timeout", "submodules"];

/// The folder of the checkout where fetched bases are written (a name Git repositories rarely
/// hold; a repository holding it is refused rather than written over).
pub const MATERIALIZED_DIR: &str = ".kas-remote-bases";

/// A remote base as kas fetches it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteBase {
    /// The repository's URL as fetched (`https://github.com/org/repo.git` for the shorthand).
    pub repository: String,
    /// The directory in the repository (`""`: its root), `/`-separated, without `.` or `..`.
    pub path: String,
    /// The tag, branch or commit of `?ref=` or `?version=`; `None`: the default branch.
    pub git_ref: Option<String>,
}

/// Why a reference is not a remote base kas can fetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotABase {
    /// A plain file URL (`https://host/x.yaml`): Kustomize downloads it over HTTP, not Git.
    #[error("a remote file, not a Git repository")]
    RemoteFile,
    /// Not read as a remote Git base.
    #[error("{0}")]
    Invalid(String),
}

/// `reference` (an entry of `resources`, `bases` or `components` that
/// [`super::checks::is_remote`] calls remote) as the Git repository, directory and ref
/// Kustomize would clone.
pub fn parse(reference: &str) -> Result<RemoteBase, NotABase> {
    let trimmed = reference.trim();
    let without_prefix = trimmed.strip_prefix("git::").unwrap_or(trimmed);
    let (location, query) = without_prefix
        .split_once('?')
        .unwrap_or((without_prefix, ""));
    let git_ref = ref_of(query)?;
    let (repository, path) = split_repository(location)?;
    let path = clean_path(&path)?;
    if git_ref.is_none() && is_file_url(&repository, &path, location) {
        return Err(NotABase::RemoteFile);
    }
    Ok(RemoteBase {
        repository,
        path,
        git_ref,
    })
}

/// The ref of a query (`ref=` or `version=`); other parameters than [`IGNORED_PARAMETERS`] are
/// refused rather than guessed at.
fn ref_of(query: &str) -> Result<Option<String>, NotABase> {
    let mut git_ref = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "ref" | "version" if value.is_empty() => {
                return Err(NotABase::Invalid(format!("{key}= names no ref")));
            }
            "ref" | "version" if git_ref.is_some() => {
                return Err(NotABase::Invalid("more than one ref= or version=".into()));
            }
            "ref" | "version" => git_ref = Some(value.to_owned()),
            k if IGNORED_PARAMETERS.contains(&k) => {}
            k => {
                return Err(NotABase::Invalid(format!(
                    "the query parameter {k:?} is not one Kustomize reads (ref, version, timeout, submodules)"
                )));
            }
        }
    }
    if let Some(r) = &git_ref
        && (r.starts_with('-') || r.contains("..") || r.chars().any(char::is_whitespace))
    {
        return Err(NotABase::Invalid(format!("{r:?} is not a Git ref")));
    }
    Ok(git_ref)
}

/// The repository's URL and the directory in it, of a location without query.
fn split_repository(location: &str) -> Result<(String, String), NotABase> {
    let location = scp_to_ssh(location);
    let (scheme, rest) = match location.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r.to_owned()),
        None => ("https".to_owned(), location.clone()),
    };
    if !["https", "http", "ssh", "git"].contains(&scheme.as_str()) {
        return Err(NotABase::Invalid(format!(
            "{scheme}:// is not a Git transport kas fetches (https, http, git, ssh)"
        )));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((&rest, ""));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (repo_path, dir) = split_path(&host, path);
    if repo_path.trim_matches('/').is_empty() {
        return Err(NotABase::Invalid("no repository path".into()));
    }
    let repo_path = if location.contains("://") || repo_path.ends_with(".git") {
        repo_path
    } else {
        // The shorthand names the repository without `.git`; Kustomize clones it with.
        format!("{repo_path}.git")
    };
    let url = format!("{scheme}://{authority}/{repo_path}");
    let parsed = Url::parse(&url).map_err(|e| NotABase::Invalid(format!("{url}: {e}")))?;
    if parsed.host_str().is_none_or(str::is_empty) || parsed.password().is_some() {
        return Err(NotABase::Invalid(format!(
            "{url} has no host, or a password in it"
        )));
    }
    if scheme != "ssh" && !parsed.username().is_empty() {
        return Err(NotABase::Invalid(format!(
            "{url} has a user name in it (kas sends no credentials to remote bases)"
        )));
    }
    Ok((parsed.to_string(), dir))
}

/// `git@host:org/repo` (SSH's scp-like syntax) as `ssh://git@host/org/repo`.
fn scp_to_ssh(location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    match location.split_once(':') {
        Some((user_host, path)) if user_host.contains('@') && !user_host.contains('/') => {
            format!("ssh://{user_host}/{}", path.trim_start_matches('/'))
        }
        _ => location.to_owned(),
    }
}

/// The repository's path and the directory in it: split at `//`, else after a segment ending
/// in `.git`, else after `owner/repo` on [`SHORTHAND_HOSTS`], else the whole path is the
/// repository (Kustomize's order).
fn split_path(host: &str, path: &str) -> (String, String) {
    if let Some((repo, dir)) = path.split_once("//") {
        return (repo.to_owned(), dir.to_owned());
    }
    let segments: Vec<&str> = path.split('/').collect();
    if let Some(i) = segments.iter().position(|s| s.ends_with(".git")) {
        return (segments[..=i].join("/"), segments[i + 1..].join("/"));
    }
    if SHORTHAND_HOSTS.contains(&host) && segments.len() > 2 {
        return (segments[..2].join("/"), segments[2..].join("/"));
    }
    (path.to_owned(), String::new())
}

/// `dir` without `.` or empty segments; `..` is refused, since a base leaving its repository
/// would read files of kas's checkout instead.
fn clean_path(dir: &str) -> Result<String, NotABase> {
    let mut out = Vec::new();
    for part in dir.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(NotABase::Invalid(format!(
                    "the directory {dir:?} leaves the repository"
                )));
            }
            p => out.push(p),
        }
    }
    Ok(out.join("/"))
}

/// Whether an http(s) location without ref names a manifest file rather than a repository:
/// Kustomize downloads such a URL over HTTP.
fn is_file_url(repository: &str, path: &str, location: &str) -> bool {
    let last = if path.is_empty() { repository } else { path };
    let lower = last.to_ascii_lowercase();
    location.to_ascii_lowercase().starts_with("http")
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| lower.ends_with(ext))
}

/// The Git repositories kas fetches remote bases from (`gitops.render.remote_bases`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    prefixes: Vec<Url>,
}

impl AllowList {
    /// The allow list of `prefixes`; an error names the first that is not an `https://`,
    /// `http://` or `git://` URL without user, query or fragment.
    pub fn new<S: AsRef<str>>(prefixes: &[S]) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for p in prefixes.iter().map(AsRef::as_ref) {
            parsed.push(git_url(p).ok_or_else(|| {
                format!("{p:?} is not an https://, http:// or git:// URL without user, query or fragment")
            })?);
        }
        Ok(Self { prefixes: parsed })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Whether the repository `url` is under one of the prefixes (as chart repositories are,
    /// see [`dependencies::is_under`]), compared without a trailing `.git` (so
    /// `https://h/org/repo` allows `https://h/org/repo.git`, never `https://h/org/repo-evil`).
    /// SSH repositories are never allowed: kas holds no key for them.
    pub fn allows(&self, url: &str) -> bool {
        let Some(url) = git_url(url).map(without_git_suffix) else {
            return false;
        };
        self.prefixes
            .iter()
            .any(|p| dependencies::is_under(&without_git_suffix(p.clone()), &url))
    }
}

/// `url` without the `.git` ending its path.
fn without_git_suffix(mut url: Url) -> Url {
    let path = url.path().trim_end_matches(".git").to_owned();
    url.set_path(&path);
    url
}

/// `s` parsed as an `https://`, `http://` or `git://` URL with a host and no credentials,
/// query or fragment (`..` resolved by the parser), or `None`.
fn git_url(s: &str) -> Option<Url> {
    let url = Url::parse(s.trim()).ok()?;
    match url.scheme().strip_prefix("git") {
        // A git:// URL is held to what a plain http(s) one is.
        Some("") => plain_url(&format!("http{}", &url.as_str()["git".len()..])).map(|_| url),
        _ => plain_url(s),
    }
}

/// Where the base's repository at `commit` is written in the checkout: a folder of
/// [`MATERIALIZED_DIR`] named from both, so two refs of one repository are two folders.
pub fn materialized_root(repository: &str, commit_hex: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(repository.as_bytes());
    let short = &hex::encode(digest)[..12];
    let commit = commit_hex.get(..12).unwrap_or(commit_hex);
    format!("{MATERIALIZED_DIR}/{short}-{commit}")
}

/// The relative path from the directory `from` to `to` (both checkout paths, `/`-separated,
/// without `.` or `..`), as a kustomization in `from` names `to`.
pub fn relative_path(from: &str, to: &str) -> String {
    let from: Vec<&str> = from.split('/').filter(|p| !p.is_empty()).collect();
    let to: Vec<&str> = to.split('/').filter(|p| !p.is_empty()).collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; from.len() - common];
    parts.extend(&to[common..]);
    if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    }
}

/// The kustomization `text` with each entry of `resources`, `bases` and `components` found in
/// `replaced` (reference, local path) replaced, as JSON (which Kustomize reads as YAML; keys
/// keep their spelling, YAML merges are resolved). Only the kustomization's copy in the
/// checkout is changed: the repository's file stays as it is.
pub fn rewrite_kustomization(text: &str, replaced: &[(String, String)]) -> Result<String, String> {
    let mut doc: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(map) = &mut doc else {
        return Err("not a mapping".into());
    };
    for (key, value) in map.iter_mut() {
        if !["resources", "bases", "components"].contains(&key.to_ascii_lowercase().as_str()) {
            continue;
        }
        let entries: Vec<&mut serde_json::Value> = match value {
            serde_json::Value::Array(items) => items.iter_mut().collect(),
            single @ serde_json::Value::String(_) => vec![single],
            _ => Vec::new(),
        };
        for entry in entries {
            let local = entry
                .as_str()
                .and_then(|s| replaced.iter().find(|(r, _)| r == s))
                .map(|(_, local)| local.clone());
            if let Some(local) = local {
                *entry = serde_json::Value::String(local);
            }
        }
    }
    serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(repository: &str, path: &str, git_ref: Option<&str>) -> RemoteBase {
        RemoteBase {
            repository: repository.into(),
            path: path.into(),
            git_ref: git_ref.map(Into::into),
        }
    }

    #[test]
    fn the_forms_kustomize_accepts_are_normalised() {
        let cases = [
            (
                "github.com/org/repo/base?ref=v1",
                base("https://github.com/org/repo.git", "base", Some("v1")),
            ),
            (
                "https://github.com/org/repo//deploy/app?ref=v1.2.0",
                base("https://github.com/org/repo", "deploy/app", Some("v1.2.0")),
            ),
            (
                "git::https://gitlab.example/org/repo.git//x?version=main",
                base("https://gitlab.example/org/repo.git", "x", Some("main")),
            ),
            (
                "https://host.example/org/repo.git/sub/dir?ref=abc&timeout=90s",
                base("https://host.example/org/repo.git", "sub/dir", Some("abc")),
            ),
            (
                "ssh://git@host.example/org/repo//path?ref=v2",
                base("ssh://git@host.example/org/repo", "path", Some("v2")),
            ),
            (
                "git@github.com:org/repo.git//base?ref=v3",
                base("ssh://git@github.com/org/repo.git", "base", Some("v3")),
            ),
            (
                "git://127.0.0.1:9418/upstream//base/./x?ref=v1",
                base("git://127.0.0.1:9418/upstream", "base/x", Some("v1")),
            ),
            (
                "github.com/org/repo",
                base("https://github.com/org/repo.git", "", None),
            ),
        ];
        for (reference, want) in cases {
            assert_eq!(parse(reference), Ok(want), "{reference}");
        }
    }

    #[test]
    fn escaping_paths_files_and_odd_queries_are_not_bases() {
        for bad in [
            "https://github.com/org/repo//../../etc?ref=v1",
            "github.com/org/repo/base/../../x?ref=v1",
            "https://github.com/org/repo//base?ref=",
            "https://github.com/org/repo//base?ref=v1&ref=v2",
            "https://github.com/org/repo//base?ref=--upload-pack=x",
            "https://github.com/org/repo//base?depth=1",
            "https://user:pw@github.com/org/repo//base?ref=v1",
            "https://token@github.com/org/repo//base?ref=v1",
            "file:///etc//base?ref=v1",
            "oci://registry.example/manifests:v1",
        ] {
            assert!(
                matches!(parse(bad), Err(NotABase::Invalid(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        assert_eq!(
            parse("https://example.com/manifests/cm.yaml"),
            Err(NotABase::RemoteFile)
        );
        assert_eq!(
            parse("http://169.254.169.254/latest/meta-data/iam"),
            Ok(base(
                "http://169.254.169.254/latest/meta-data/iam",
                "",
                None
            )),
            "a URL that is no file is read as a repository, and the allow list decides"
        );
    }

    #[test]
    fn the_allow_list_matches_whole_path_segments_of_one_host() {
        let allow = AllowList::new(&["https://github.com/org/", "git://127.0.0.1:9418/upstream"])
            .expect("valid");
        for ok in [
            "https://github.com/org/repo.git",
            "https://github.com/org/repo",
            "https://github.com:443/org/repo",
            "git://127.0.0.1:9418/upstream",
            "git://127.0.0.1:9418/upstream.git",
        ] {
            assert!(allow.allows(ok), "{ok}");
        }
        for no in [
            "https://github.com/other/repo.git",
            "https://github.com/org/../other/repo",
            "http://github.com/org/repo",
            "https://github.com.evil.example/org/repo",
            "git://127.0.0.1:9419/upstream",
            "git://127.0.0.1:9418/upstream-evil",
            "ssh://git@github.com/org/repo",
        ] {
            assert!(!allow.allows(no), "{no}");
        }
        assert!(AllowList::new::<&str>(&[]).expect("valid").is_empty());
        for bad in [
            "github.com/org",
            "ssh://git@github.com/org",
            "file:///srv/git",
            "https://u:p@h/x",
        ] {
            let e = AllowList::new(&[bad]).expect_err("refused");
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn materialized_bases_are_named_apart_and_reached_by_relative_paths() {
        let a = materialized_root("https://h/a", "0123456789abcdef0123");
        let b = materialized_root("https://h/b", "0123456789abcdef0123");
        assert!(a.starts_with(".kas-remote-bases/"), "{a}");
        assert!(a.ends_with("-0123456789ab"), "{a}");
        assert_ne!(a, b);
        assert_eq!(
            relative_path("overlays/prod", ".kas-remote-bases/x/base"),
            "../../.kas-remote-bases/x/base"
        );
        assert_eq!(
            relative_path(".kas-remote-bases/x/base", ".kas-remote-bases/y"),
            "../../y"
        );
        assert_eq!(relative_path("", "a/b"), "a/b");
        assert_eq!(relative_path("a", "a"), ".");
    }

    #[test]
    fn only_the_named_remote_entries_are_rewritten_in_any_key_case() {
        let text = "Resources:\n- github.com/org/repo/base?ref=v1\n- github.com/org/repo/base?ref=v10\n- local.yaml\ncomponents: github.com/org/repo/base?ref=v1\ncommonLabels:\n  from: github.com/org/repo/base?ref=v1\n";
        let replaced = vec![(
            "github.com/org/repo/base?ref=v1".to_owned(),
            "../.kas-remote-bases/x/base".to_owned(),
        )];
        let out = rewrite_kustomization(text, &replaced).expect("rewritten");
        let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(
            doc["Resources"],
            serde_json::json!([
                "../.kas-remote-bases/x/base",
                "github.com/org/repo/base?ref=v10",
                "local.yaml"
            ])
        );
        assert_eq!(doc["components"], "../.kas-remote-bases/x/base");
        assert_eq!(
            doc["commonLabels"]["from"],
            "github.com/org/repo/base?ref=v1"
        );
        assert!(rewrite_kustomization("- a\n", &replaced).is_err());
    }
}
