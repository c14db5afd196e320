//! Chart repositories as Helm reads them: plain HTTP(S) URLs and OCI registry locations
//! (`oci://`), chart names and version constraints (Masterminds semver). Shared by the
//! `helm.repository` keys of `config.yaml` and kas's chart fetching, so both read a constraint
//! or a URL the same way. Pure.

use url::Url;

/// `text` parsed as an HTTP(S) URL with a host and no credentials, query or fragment (kas
/// sends none: a URL carrying them is refused rather than fetched differently than written).
pub fn plain_url(text: &str) -> Option<Url> {
    let url = Url::parse(text.trim()).ok()?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    plain.then_some(url)
}

/// `text` parsed as an OCI registry location (`oci://registry[:port]/path`, as `helm pull
/// oci://…` reads it) with a host and no credentials, query or fragment; the host lowercased,
/// as a registry's host is compared (an `oci://` URL's host is otherwise kept as written).
pub fn oci_url(text: &str) -> Option<Url> {
    let mut url = Url::parse(text.trim()).ok()?;
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())?
        .to_ascii_lowercase();
    let plain = url.scheme() == "oci"
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    if !plain {
        return None;
    }
    url.set_host(Some(&host)).ok()?;
    Some(url)
}

/// `text` as the URL of a chart repository kas reads: a plain HTTP(S) URL (see [`plain_url`])
/// or a registry location (see [`oci_url`]).
pub fn repository_url(text: &str) -> Option<Url> {
    plain_url(text).or_else(|| oci_url(text))
}

/// Whether `name` is a chart's name, usable as a file name's start (`<name>-<version>.tgz`):
/// no path, no hidden file, nothing read as an option.
pub fn is_chart_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 250
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A version constraint as Helm reads it (Masterminds semver): alternatives joined by `||`,
/// each comparators joined by spaces or commas; a bare version is exact (`1.2.3` is `=1.2.3`,
/// not Cargo's `^1.2.3`), `1.2 - 1.4` is a range, `v` prefixes are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint(Vec<semver::VersionReq>);

impl Constraint {
    /// Parses `text`; empty (no `version`) is any version.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self(vec![semver::VersionReq::STAR]));
        }
        text.split("||")
            .map(|alt| {
                let comparators = comparators(alt)?;
                let joined = comparators.join(", ");
                semver::VersionReq::parse(&joined)
                    .map_err(|e| format!("{text:?} is not a version constraint Helm reads: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `version` satisfies one of the alternatives.
    pub fn matches(&self, version: &semver::Version) -> bool {
        self.0.iter().any(|r| r.matches(version))
    }
}

/// One alternative's comparators in Cargo's syntax.
fn comparators(alt: &str) -> Result<Vec<String>, String> {
    let words: Vec<&str> = alt
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    if let [low, "-", high] = words[..] {
        return Ok(vec![
            format!(">={}", bare(low)),
            format!("<={}", bare(high)),
        ]);
    }
    if words.is_empty() {
        return Err(format!("{alt:?}: an empty alternative"));
    }
    let mut out = Vec::new();
    let mut pending_op: Option<&str> = None;
    for w in words {
        // `>= 1.2` (an operator, then its version) as well as `>=1.2`.
        if w.chars().all(|c| "<>=~^!".contains(c)) {
            pending_op = Some(w);
            continue;
        }
        let op_len = w.find(|c: char| !"<>=~^!".contains(c)).unwrap_or(w.len());
        let (op, version) = w.split_at(op_len);
        let op = pending_op.take().unwrap_or(op);
        let version = bare(version);
        let wildcard = version == "*" || version.split('.').any(|p| matches!(p, "x" | "X" | "*"));
        out.push(match op {
            "!=" => return Err(format!("{w:?}: != is not supported by kas")),
            // Masterminds reads a bare version as exact; a wildcard as itself.
            "" if wildcard => version.to_owned(),
            "" | "==" => format!("={version}"),
            op => format!("{op}{version}"),
        });
    }
    Ok(out)
}

/// `version` without its `v` prefix.
pub fn bare(version: &str) -> &str {
    version
        .strip_prefix('v')
        .or_else(|| version.strip_prefix('V'))
        .unwrap_or(version)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v(text: &str) -> semver::Version {
        semver::Version::parse(text).unwrap()
    }

    #[test]
    fn constraints_read_as_helm_reads_them() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            // A bare version is exact in Helm (Cargo would read ^1.2.3).
            ("1.2.3", &["1.2.3"], &["1.2.4", "1.3.0"]),
            ("v1.2.3", &["1.2.3"], &["1.2.4"]),
            ("~1.2.3", &["1.2.3", "1.2.9"], &["1.3.0"]),
            ("^1.2", &["1.2.0", "1.9.0"], &["2.0.0", "1.1.0"]),
            ("1.2.x", &["1.2.0", "1.2.7"], &["1.3.0"]),
            ("17.x", &["17.0.1", "17.9.0"], &["18.0.0"]),
            (">=1.0.0 <2.0.0", &["1.0.0", "1.5.5"], &["2.0.0", "0.9.0"]),
            (">= 1.0, < 2.0", &["1.0.0"], &["2.0.0"]),
            // A partial upper bound covers its patches, as in Helm.
            ("1.0 - 1.4", &["1.0.0", "1.4.9"], &["1.5.0", "0.9.0"]),
            ("~1.0 || ^3.0", &["1.0.5", "3.2.0"], &["2.0.0"]),
            ("*", &["0.1.0", "9.0.0"], &[]),
            ("", &["0.1.0"], &[]),
        ];
        for (text, yes, no) in cases {
            let c = Constraint::parse(text).unwrap();
            for y in *yes {
                assert!(c.matches(&v(y)), "{text} should match {y}");
            }
            for n in *no {
                assert!(!c.matches(&v(n)), "{text} should not match {n}");
            }
        }
        assert!(Constraint::parse("!=1.0.0").is_err());
        assert!(Constraint::parse(">=banana").is_err());
    }

    #[test]
    fn plain_urls_and_chart_names() {
        for ok in [
            "https://charts.example.com/stable",
            "http://127.0.0.1:8080/",
        ] {
            assert!(plain_url(ok).is_some(), "{ok}");
        }
        for bad in [
            "ftp://x/",
            "https://u:p@x/",
            "https://u@x/",
            "https://x/?q=1",
            "https://x/#f",
            "oci://x/c",
            "charts/x",
        ] {
            assert!(plain_url(bad).is_none(), "{bad}");
        }
        let oci = oci_url("oci://Registry.Example.com:5000/charts/").unwrap();
        assert_eq!(oci.as_str(), "oci://registry.example.com:5000/charts/");
        assert!(repository_url("oci://127.0.0.1/x").is_some());
        assert!(repository_url("https://x/").is_some());
        for bad in [
            "oci://u:p@x/c",
            "oci://x/c?tag=1",
            "oci:///c",
            "oci:x/c",
            "docker://x/c",
        ] {
            assert!(repository_url(bad).is_none(), "{bad}");
        }
        for ok in ["podinfo", "ingress-nginx", "cert_manager.v1"] {
            assert!(is_chart_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "charts/podinfo",
            "../x",
            "a b",
            "--set=x",
            "-x",
        ] {
            assert!(!is_chart_name(bad), "{bad}");
        }
    }
}
