//! Which projects each trusted issuer may speak for, and the checks on the `ci_issuers` list
//! kas refuses to start without.
//!
//! A verified token proves only that *its issuer* vouches for the project path in it. kas's
//! projects and `ci_access` entries are bare paths, with no issuer attached: with a GitLab and
//! GitHub Actions both trusted, the owner of GitHub organisation `acme` could mint a token for
//! repository `acme/infra` and be taken for GitLab project `acme/infra`. So each issuer lists
//! the top-level namespaces it is authoritative for ([`TrustedIssuer::namespaces`]); a token
//! whose project lies outside them is refused, and no namespace may belong to two issuers.
//! A single issuer may leave the list out: it then speaks for every path, as before (nothing
//! else could claim them).
//!
//! The list is also refused when an issuer appears twice (only the first entry would ever be
//! used, whatever the second says) or its keys come from a plain `http://` URL (whoever sits
//! on the path could serve their own keys and mint any job's token).

use crate::{JwksSource, TrustedIssuer};

/// A `kubernetes_api.ci_issuers` list kas must not start with. Entries are named by their
/// position and `issuer`, so the operator finds them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerConfigError {
    /// The same `issuer` twice.
    #[error(
        "ci_issuers[{first}] and ci_issuers[{second}] are both {issuer}: list each issuer once"
    )]
    DuplicateIssuer {
        /// Position of the first entry.
        first: usize,
        /// Position of the second entry.
        second: usize,
        /// The issuer.
        issuer: String,
    },
    /// A JWKS URL that is not `https://`.
    #[error(
        "ci_issuers[{index}] ({issuer}): jwks url {url:?} is not https: keys fetched in the \
         clear could be replaced on the way (use https, or a file)"
    )]
    InsecureJwksUrl {
        /// Position in `ci_issuers`.
        index: usize,
        /// Its `issuer`.
        issuer: String,
        /// The URL.
        url: String,
    },
    /// Several issuers, and this one does not say which namespaces it speaks for.
    #[error(
        "ci_issuers[{index}] ({issuer}): `namespaces` is required when several issuers are \
         trusted, so that one issuer's tokens cannot stand for another issuer's projects"
    )]
    NamespacesRequired {
        /// Position in `ci_issuers`.
        index: usize,
        /// Its `issuer`.
        issuer: String,
    },
    /// `namespaces: []`: the issuer could speak for nothing, which is surely a mistake.
    #[error("ci_issuers[{index}] ({issuer}): `namespaces` is empty; leave it out or list some")]
    NoNamespaces {
        /// Position in `ci_issuers`.
        index: usize,
        /// Its `issuer`.
        issuer: String,
    },
    /// A namespace that is not a path (empty, or with empty segments).
    #[error(
        "ci_issuers[{index}] ({issuer}): namespace {namespace:?} is not a path like `acme` or `acme/team`"
    )]
    InvalidNamespace {
        /// Position in `ci_issuers`.
        index: usize,
        /// Its `issuer`.
        issuer: String,
        /// The namespace.
        namespace: String,
    },
    /// Two issuers could both speak for the projects under one namespace.
    #[error(
        "namespace {first_namespace:?} of ci_issuers[{first}] ({first_issuer}) and namespace \
         {second_namespace:?} of ci_issuers[{second}] ({second_issuer}) overlap: a namespace \
         may belong to one issuer only"
    )]
    SharedNamespace {
        /// Position of the first issuer.
        first: usize,
        /// The first issuer.
        first_issuer: String,
        /// Its namespace.
        first_namespace: String,
        /// Position of the second issuer.
        second: usize,
        /// The second issuer.
        second_issuer: String,
        /// Its namespace.
        second_namespace: String,
    },
}

/// Whether a token of an issuer with `namespaces` may name project `project_path`: `None`
/// means every path; otherwise the path must be one of them or lie below one, compared
/// case-insensitively on whole segments (`acme` covers `ACME/infra`, not `acme-corp/infra`).
pub fn issuer_speaks_for(namespaces: Option<&[String]>, project_path: &str) -> bool {
    namespaces.is_none_or(|list| list.iter().any(|ns| covers(ns, project_path)))
}

/// Whether namespace `ns` is `path` or one of its ancestors (case-insensitive, whole segments).
fn covers(ns: &str, path: &str) -> bool {
    match path.get(..ns.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(ns) => {
            path.len() == ns.len() || path.as_bytes()[ns.len()] == b'/'
        }
        _ => false,
    }
}

/// Checks `ci_issuers` as kas loads its configuration (see the module docs).
pub fn validate_issuers(issuers: &[TrustedIssuer]) -> Result<(), IssuerConfigError> {
    let several = issuers.len() > 1;
    for (index, i) in issuers.iter().enumerate() {
        if let Some(first) = issuers[..index].iter().position(|o| o.issuer == i.issuer) {
            let issuer = i.issuer.clone();
            let second = index;
            return Err(IssuerConfigError::DuplicateIssuer {
                first,
                second,
                issuer,
            });
        }
        if let JwksSource::Url(url) = &i.jwks
            && !url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            let (issuer, url) = (i.issuer.clone(), url.clone());
            return Err(IssuerConfigError::InsecureJwksUrl { index, issuer, url });
        }
        let err_ctx = || (index, i.issuer.clone());
        match &i.namespaces {
            None if several => {
                let (index, issuer) = err_ctx();
                return Err(IssuerConfigError::NamespacesRequired { index, issuer });
            }
            None => {}
            Some(list) if list.is_empty() => {
                let (index, issuer) = err_ctx();
                return Err(IssuerConfigError::NoNamespaces { index, issuer });
            }
            Some(list) => {
                if let Some(bad) = list.iter().find(|ns| !is_namespace_path(ns)) {
                    let (index, issuer) = err_ctx();
                    let namespace = bad.clone();
                    return Err(IssuerConfigError::InvalidNamespace {
                        index,
                        issuer,
                        namespace,
                    });
                }
            }
        }
    }
    shared_namespace(issuers).map_or(Ok(()), Err)
}

/// `acme` or `acme/team`: non-empty segments separated by single slashes.
fn is_namespace_path(ns: &str) -> bool {
    !ns.is_empty() && ns.split('/').all(|segment| !segment.is_empty())
}

/// The first pair of namespaces of different issuers where one covers the other.
fn shared_namespace(issuers: &[TrustedIssuer]) -> Option<IssuerConfigError> {
    let listed: Vec<(usize, &TrustedIssuer, &String)> = issuers
        .iter()
        .enumerate()
        .flat_map(|(index, i)| i.namespaces.iter().flatten().map(move |ns| (index, i, ns)))
        .collect();
    for (n, &(first, a, a_ns)) in listed.iter().enumerate() {
        for &(second, b, b_ns) in &listed[n + 1..] {
            if first != second && (covers(a_ns, b_ns) || covers(b_ns, a_ns)) {
                return Some(IssuerConfigError::SharedNamespace {
                    first,
                    first_issuer: a.issuer.clone(),
                    first_namespace: a_ns.clone(),
                    second,
                    second_issuer: b.issuer.clone(),
                    second_namespace: b_ns.clone(),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClaimMapping;

    fn issuer(iss: &str, namespaces: Option<&[&str]>) -> TrustedIssuer {
        TrustedIssuer {
            issuer: iss.into(),
            audience: "kas".into(),
            jwks: JwksSource::File("/keys.json".into()),
            claims: ClaimMapping::default(),
            namespaces: namespaces.map(|l| l.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn list(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_issuer_speaks_for_paths_under_its_namespaces_on_whole_segments() {
        let ns = list(&["acme", "corp/team"]);
        let ns = Some(ns.as_slice());
        assert!(issuer_speaks_for(ns, "acme/infra"));
        assert!(issuer_speaks_for(ns, "ACME/Infra/deep"));
        assert!(issuer_speaks_for(ns, "corp/team/app"));
        assert!(issuer_speaks_for(ns, "acme"));
        assert!(!issuer_speaks_for(ns, "acme-corp/infra"));
        assert!(!issuer_speaks_for(ns, "corp/other"));
        assert!(!issuer_speaks_for(ns, "corp"));
        assert!(!issuer_speaks_for(ns, "evil/acme/infra"));
    }

    #[test]
    fn an_issuer_without_namespaces_speaks_for_every_path() {
        assert!(issuer_speaks_for(None, "anything/at/all"));
        assert!(!issuer_speaks_for(Some(&[]), "anything/at/all"));
    }

    #[test]
    fn a_single_issuer_may_leave_namespaces_out() {
        assert_eq!(validate_issuers(&[issuer("https://gl", None)]), Ok(()));
        assert_eq!(validate_issuers(&[]), Ok(()));
    }

    #[test]
    fn several_issuers_must_each_list_namespaces() {
        let err = validate_issuers(&[
            issuer("https://gl", Some(&["acme"])),
            issuer("https://gh", None),
        ])
        .expect_err("the second lists none");
        assert!(
            matches!(&err, IssuerConfigError::NamespacesRequired { index: 1, issuer } if issuer == "https://gh"),
            "{err}"
        );
        assert!(
            err.to_string().contains("ci_issuers[1] (https://gh)"),
            "{err}"
        );
    }

    #[test]
    fn a_namespace_may_belong_to_one_issuer_only() {
        for (a, b) in [("acme", "ACME"), ("acme", "acme/infra"), ("acme/x", "acme")] {
            let err = validate_issuers(&[
                issuer("https://gl", Some(&["other", a])),
                issuer("https://gh", Some(&[b])),
            ])
            .expect_err("shared");
            let m = err.to_string();
            assert!(
                m.contains("ci_issuers[0] (https://gl)")
                    && m.contains("ci_issuers[1] (https://gh)"),
                "{m}"
            );
        }
        let disjoint = [
            issuer("https://gl", Some(&["acme", "acme-corp"])),
            issuer("https://gh", Some(&["acme-gh"])),
        ];
        assert_eq!(validate_issuers(&disjoint), Ok(()));
    }

    #[test]
    fn empty_lists_and_malformed_namespaces_are_refused() {
        let err = validate_issuers(&[issuer("https://gl", Some(&[]))]).expect_err("empty");
        assert!(
            matches!(err, IssuerConfigError::NoNamespaces { .. }),
            "{err}"
        );
        for bad in ["", "/acme", "acme//x"] {
            let err = validate_issuers(&[issuer("https://gl", Some(&[bad]))]).expect_err(bad);
            assert!(
                matches!(err, IssuerConfigError::InvalidNamespace { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn an_issuer_listed_twice_is_refused() {
        let err = validate_issuers(&[
            issuer("https://gl", Some(&["acme"])),
            issuer("https://gh", Some(&["octo"])),
            issuer("https://gl", Some(&["other"])),
        ])
        .expect_err("listed twice");
        assert_eq!(
            err,
            IssuerConfigError::DuplicateIssuer {
                first: 0,
                second: 2,
                issuer: "https://gl".into()
            }
        );
        assert!(
            err.to_string().contains("ci_issuers[0] and ci_issuers[2]"),
            "{err}"
        );
    }

    #[test]
    fn jwks_urls_must_be_https() {
        let with_url = |url: &str| TrustedIssuer {
            jwks: JwksSource::Url(url.into()),
            ..issuer("https://gl", None)
        };
        for bad in ["http://gl/oauth/discovery/keys", "ftp://gl/keys", "gl/keys"] {
            let err = validate_issuers(&[with_url(bad)]).expect_err(bad);
            assert!(
                matches!(err, IssuerConfigError::InsecureJwksUrl { .. }),
                "{err}"
            );
            assert!(
                err.to_string().contains("ci_issuers[0] (https://gl)"),
                "{err}"
            );
        }
        assert_eq!(validate_issuers(&[with_url("HTTPS://gl/keys")]), Ok(()));
        // Files stay allowed (air-gapped setups): `issuer()` reads its keys from one.
        assert_eq!(validate_issuers(&[issuer("https://gl", None)]), Ok(()));
    }
}
