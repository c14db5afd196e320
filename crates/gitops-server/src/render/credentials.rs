//! Credentials kas sends to private chart repositories (`gitops.render.chart_repository_credentials`):
//! in kas's configuration, never in an agent's Git, and read from files (a mounted Secret) at
//! each request, so a rotated Secret is used without a restart. A credential goes only to URLs
//! under its own prefix (same scheme, host and port): an index naming archives on another host
//! sends none there, and kas follows no redirect of an HTTP(S) repository. A registry's
//! (`oci://` prefix) goes to the registry and to the token realm it names (HTTPS), never to the
//! storage its blobs are moved to. Pure: which credential a URL gets and its `Authorization`
//! header.

use std::path::PathBuf;

use base64::Engine;
use serde::Deserialize;

use super::dependencies::AllowList;

/// One repository's credentials: HTTP basic (`username`, `password_file`) or a bearer token
/// (`token_file`). Holds file paths only, so printing it shows no secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartCredential {
    /// The URL prefix it is sent to, as in `chart_repositories`.
    pub url: String,
    /// The user of HTTP basic authentication (with `password_file`).
    #[serde(default)]
    pub username: Option<String>,
    /// The file holding that user's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The file holding a bearer token (instead of a user and password).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Which secret a credential reads, and how it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme<'a> {
    Basic { username: &'a str },
    Bearer,
}

impl ChartCredential {
    /// How it is sent, or why it is not valid (named by its URL, never its secret).
    pub fn scheme(&self) -> Result<Scheme<'_>, String> {
        match (&self.username, &self.password_file, &self.token_file) {
            (Some(u), Some(_), None) if !u.is_empty() && !u.contains(':') => {
                Ok(Scheme::Basic { username: u })
            }
            (None, None, Some(_)) => Ok(Scheme::Bearer),
            _ => Err(format!(
                "{}: set either username (without ':') and password_file, or token_file",
                self.url
            )),
        }
    }

    /// The file holding its secret.
    pub fn secret_file(&self) -> Option<&PathBuf> {
        self.password_file.as_ref().or(self.token_file.as_ref())
    }

    /// Checks the URL (a plain http(s) prefix, or a registry location, `oci://`) and the fields.
    pub fn validate(&self) -> Result<(), String> {
        AllowList::new(std::slice::from_ref(&self.url)).map_err(|e| format!("url {e}"))?;
        self.scheme().map(|_| ())
    }

    /// Whether `url` is under its prefix (see [`AllowList::allows`]).
    fn covers(&self, url: &str) -> bool {
        AllowList::new(std::slice::from_ref(&self.url)).is_ok_and(|a| a.allows(url))
    }
}

/// The credential sent with a request for `url`: the one with the longest prefix covering
/// it (a repository's own credential before its host's), none when none covers it.
pub fn credential_for<'a>(all: &'a [ChartCredential], url: &str) -> Option<&'a ChartCredential> {
    all.iter()
        .filter(|c| c.covers(url))
        .max_by_key(|c| c.url.trim_end_matches('/').len())
}

/// The `Authorization` header of `credential` with its secret (trailing newline of a file
/// dropped), marked sensitive so no HTTP layer logs it.
pub fn authorization(
    credential: &ChartCredential,
    secret: &str,
) -> Result<http::HeaderValue, String> {
    let secret = secret.trim_end_matches(['\n', '\r']);
    let value = match credential.scheme()? {
        Scheme::Basic { username } => {
            let pair = format!("{username}:{secret}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        }
        Scheme::Bearer => format!("Bearer {secret}"),
    };
    let mut header = http::HeaderValue::from_str(&value).map_err(|_| {
        format!(
            "the secret of {} holds characters an HTTP header cannot carry",
            credential.url
        )
    })?;
    header.set_sensitive(true);
    Ok(header)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn basic(url: &str) -> ChartCredential {
        ChartCredential {
            url: url.into(),
            username: Some("reader".into()),
            password_file: Some("/s/password".into()),
            token_file: None,
        }
    }

    fn bearer(url: &str) -> ChartCredential {
        ChartCredential {
            url: url.into(),
            username: None,
            password_file: None,
            token_file: Some("/s/token".into()),
        }
    }

    #[test]
    fn a_credential_goes_only_to_urls_under_its_prefix_the_longest_first() {
        let all = [
            basic("https://charts.example.com"),
            bearer("https://charts.example.com/private"),
        ];
        let got = |url: &str| credential_for(&all, url).map(|c| c.url.as_str());
        assert_eq!(
            got("https://charts.example.com/private/index.yaml"),
            Some("https://charts.example.com/private")
        );
        assert_eq!(
            got("https://charts.example.com/public/index.yaml"),
            Some("https://charts.example.com")
        );
        // Another host, scheme or port, or a host merely starting alike: none.
        for other in [
            "https://objects.example.net/private/app-1.0.0.tgz",
            "http://charts.example.com/private/index.yaml",
            "https://charts.example.com:8443/private/index.yaml",
            "https://charts.example.com.evil.example/private/index.yaml",
        ] {
            assert_eq!(got(other), None, "{other}");
        }
    }

    #[test]
    fn basic_and_bearer_headers_carry_the_secret_without_its_newline_and_are_sensitive() {
        let h = authorization(&basic("https://h"), "s3cret\n").unwrap();
        // base64("reader:s3cret")
        assert_eq!(h.to_str().unwrap(), "Basic cmVhZGVyOnMzY3JldA==");
        assert!(h.is_sensitive());
        let h = authorization(&bearer("https://h"), "tok\r\n").unwrap();
        assert_eq!(h.to_str().unwrap(), "Bearer tok");
        let e = authorization(&bearer("https://h"), "a\nb").unwrap_err();
        assert!(!e.contains("a\nb"), "{e}");
    }

    #[test]
    fn a_credential_is_basic_or_bearer_on_a_plain_or_oci_url() {
        assert!(basic("https://h/x").validate().is_ok());
        assert!(bearer("https://h/x").validate().is_ok());
        let mut both = basic("https://h/x");
        both.token_file = Some("/s/t".into());
        assert!(both.validate().unwrap_err().contains("https://h/x"));
        let mut no_password = basic("https://h/x");
        no_password.password_file = None;
        assert!(no_password.validate().is_err());
        assert!(basic("https://user@h/x").validate().is_err());
        assert!(basic("oci://h/x").validate().is_ok(), "a registry location");
        assert!(basic("ftp://h/x").validate().is_err());
    }
}
