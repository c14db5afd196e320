//! Charts of OCI registries (`helm.repository: oci://registry/path`), read as `helm pull
//! oci://registry/path/<chart> --version <constraint>` reads them: the chart is the registry
//! repository `path/<chart>`, its versions are its tags (`+` written `_`), and a version is a
//! manifest whose config is Helm's and whose one chart layer is the archive. Pure: where each
//! request goes, and what the registry's answers (tag lists, `Link` pages, `WWW-Authenticate`
//! challenges, tokens, manifests) say. The requests themselves are in [`super::fetch`].

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use tether_agent_config::chart_repository::{is_chart_name, oci_url};

use super::dependencies::{parse_version, sha256_hex};

/// The manifest media type asked for (Helm pushes charts as OCI image manifests).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config media type of a Helm chart's manifest.
pub const HELM_CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.helm.config.v1+json";
/// The media type of the layer holding the chart's archive.
pub const HELM_CHART_MEDIA_TYPE: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";

/// The header a registry names a manifest's digest in (lowercase, as `http` names headers).
pub const DIGEST_HEADER: &str = "docker-content-digest";

/// Tags asked for per page of a tag list: a size every registry accepts (some refuse more).
pub const TAG_PAGE: usize = 100;

/// Whether `repository` names an OCI registry location (`oci://…`).
pub fn is_oci(repository: &str) -> bool {
    repository
        .trim()
        .get(..6)
        .is_some_and(|s| s.eq_ignore_ascii_case("oci://"))
}

/// A chart in a registry: where the registry answers and the chart's repository there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciChart {
    /// The registry's base URL (`https://host[:port]/`, `http://` for a plain-HTTP one).
    pub origin: Url,
    /// The registry repository holding the chart's versions (`path/<chart>`).
    pub name: String,
    /// The chart's location as written, `oci://host[:port]/path/<chart>`: what credentials
    /// and the allow list are matched against.
    pub location: String,
}

impl OciChart {
    /// The chart `chart` of the registry location `repository`; `plain_http` says whether the
    /// registry is read over plain HTTP (see `gitops.render.plain_http_registries`).
    pub fn new(repository: &str, chart: &str, plain_http: bool) -> Result<Self, String> {
        if !is_chart_name(chart) {
            return Err(format!("{chart:?} is not a chart name"));
        }
        let base = repository.trim().trim_end_matches('/');
        Self::at(&format!("{base}/{chart}"), plain_http)
    }

    /// The chart at `location` (`oci://host/path/<chart>`).
    pub fn at(location: &str, plain_http: bool) -> Result<Self, String> {
        let url = oci_url(location).ok_or_else(|| {
            format!("{location:?} is not an oci:// URL without user, query or fragment")
        })?;
        let name = url.path().trim_matches('/').to_owned();
        if !is_repository_name(&name) {
            return Err(format!(
                "{location:?}: {name:?} is not a registry repository name (lowercase letters, digits, '.', '_', '-', separated by '/')"
            ));
        }
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let scheme = if plain_http { "http" } else { "https" };
        let origin = Url::parse(&format!("{scheme}://{authority}/"))
            .map_err(|e| format!("{location:?}: {e}"))?;
        Ok(Self {
            origin,
            name,
            location: format!("oci://{authority}/{}", url.path().trim_matches('/')),
        })
    }

    /// The first page of its tag list, of [`TAG_PAGE`] tags (registries page only when asked
    /// for a size, and may answer fewer with a `Link` to the next page).
    pub fn tags_url(&self) -> Url {
        let mut url = self.api("tags/list");
        url.set_query(Some(&format!("n={TAG_PAGE}")));
        url
    }

    /// The manifest of `tag`.
    pub fn manifest_url(&self, tag: &str) -> Url {
        self.api(&format!("manifests/{tag}"))
    }

    /// The blob of SHA-256 `digest` (lowercase hex).
    pub fn blob_url(&self, digest: &str) -> Url {
        self.api(&format!("blobs/sha256:{digest}"))
    }

    fn api(&self, rest: &str) -> Url {
        let mut url = self.origin.clone();
        url.set_path(&format!("/v2/{}/{rest}", self.name));
        url
    }

    /// Its location with `tag` (`oci://host/path/<chart>:<tag>`), as a resolution names it.
    pub fn tagged(&self, tag: &str) -> String {
        format!("{}:{tag}", self.location)
    }

    /// The chart and tag of a location made by [`OciChart::tagged`].
    pub fn from_tagged(tagged: &str, plain_http: bool) -> Result<(Self, String), String> {
        let slash = tagged.rfind('/').unwrap_or(0);
        let (location, tag) = match tagged[slash..].rfind(':') {
            Some(i) => (&tagged[..slash + i], &tagged[slash + i + 1..]),
            None => return Err(format!("{tagged:?} names no tag")),
        };
        Ok((Self::at(location, plain_http)?, tag.to_owned()))
    }

    /// Whether `url` is on the registry itself (same scheme, host and port): only there is
    /// its `Authorization` sent.
    pub fn same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.origin.scheme()
            && url.host_str() == self.origin.host_str()
            && url.port_or_known_default() == self.origin.port_or_known_default()
    }
}

/// Whether `name` is a registry repository name as the OCI distribution spec has them (each
/// `/`-separated part lowercase alphanumerics joined by `.`, `_`, `__` or dashes), so it makes
/// a plain URL path.
fn is_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|part| {
            let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            part.starts_with(alnum)
                && part.ends_with(alnum)
                && part
                    .chars()
                    .all(|c| alnum(c) || matches!(c, '.' | '_' | '-'))
        })
}

/// The version a tag stands for: Helm writes a version's `+` as `_` in tags (a tag cannot hold
/// `+`).
pub fn tag_version(tag: &str) -> Option<semver::Version> {
    parse_version(&tag.replace('_', "+"))
}

/// Whether kas may send a request to `url` the registry named (a token realm, where a blob
/// moved to): HTTPS, or plain HTTP on a loopback address only. A registry answering over HTTPS
/// could otherwise move credentials (sent to a realm) or a download onto plain HTTP through
/// the network; loopback stays on this host, which the tests' registries use.
pub fn secure_or_loopback(url: &Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => is_loopback(url.host_str().unwrap_or_default()),
        _ => false,
    }
}

/// An entry of `gitops.render.plain_http_registries`: `oci://host[:port]` of a loopback host.
/// Plain HTTP is for a registry on kas's own host (a test's, a local mirror): through a
/// network it would let anyone on the path swap the charts kas renders.
pub fn plain_http_registry(text: &str) -> Result<Url, String> {
    let url = oci_url(text).ok_or_else(|| format!("{text:?} is not an oci://host[:port] URL"))?;
    if !is_loopback(url.host_str().unwrap_or_default()) {
        return Err(format!(
            "{text:?}: only a loopback registry (127.0.0.0/8, ::1, localhost) may be read over plain HTTP"
        ));
    }
    Ok(url)
}

/// Whether `host` is a loopback address (`127.0.0.0/8`, `::1`) or `localhost`.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A registry's tag list page.
#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// The tags of a tag list page.
pub fn parse_tags(body: &[u8]) -> Result<Vec<String>, String> {
    let list: TagList =
        serde_json::from_slice(body).map_err(|e| format!("the tag list cannot be read: {e}"))?;
    Ok(list.tags.unwrap_or_default())
}

/// The next page of a tag list, from the `Link` headers of the page at `current`
/// (`<url>; rel="next"`, the URL relative to `current`); `None` on the last page.
pub fn next_page<'a>(
    links: impl IntoIterator<Item = &'a str>,
    current: &Url,
) -> Option<Result<Url, String>> {
    for header in links {
        for link in header.split(',') {
            let Some((target, params)) = link
                .trim()
                .strip_prefix('<')
                .and_then(|l| l.split_once('>'))
            else {
                continue;
            };
            let next = params.split(';').any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p == "rel=\"next\"" || p == "rel=next"
            });
            if next {
                return Some(
                    current
                        .join(target)
                        .map_err(|e| format!("the tag list's next page {target:?}: {e}")),
                );
            }
        }
    }
    None
}

/// A `WWW-Authenticate: Bearer …` challenge: where a token for the request is issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// The Bearer challenge among `WWW-Authenticate` header values, if any (a registry may offer
/// Basic instead, or beside it).
pub fn bearer_challenge<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    values.into_iter().find_map(|value| {
        let value = value.trim();
        let (scheme, rest) = value.split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = auth_params(rest);
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        Some(Challenge {
            realm: get("realm").filter(|r| !r.is_empty())?,
            service: get("service"),
            scope: get("scope"),
        })
    })
}

/// The `key=value` parameters of a challenge, values quoted (with `\` escapes) or bare.
fn auth_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if chars.next_if_eq(&'=').is_none() {
            if key.trim().is_empty() && chars.peek().is_none() {
                return out;
            }
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// The URL a token is asked at for `challenge`, with its service and scope (`scope` when the
/// challenge names none); refused unless HTTPS or loopback (see [`secure_or_loopback`]).
pub fn token_url(challenge: &Challenge, scope: &str) -> Result<Url, String> {
    let mut url = Url::parse(&challenge.realm)
        .map_err(|e| format!("its token realm {:?} is not a URL: {e}", challenge.realm))?;
    if !secure_or_loopback(&url) {
        return Err(format!(
            "its token realm {} is not https:// (plain http:// is followed on loopback only): kas sends no credentials there",
            challenge.realm
        ));
    }
    {
        let mut query = url.query_pairs_mut();
        if let Some(service) = &challenge.service {
            query.append_pair("service", service);
        }
        query.append_pair("scope", challenge.scope.as_deref().unwrap_or(scope));
    }
    Ok(url)
}

/// A token issuer's answer (Docker's `token`, OAuth's `access_token`).
#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A token as its issuer answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    /// Its life in seconds, if the issuer said.
    pub expires_in: Option<u64>,
}

/// The token of a token issuer's answer.
pub fn parse_token(body: &[u8]) -> Result<IssuedToken, String> {
    let answer: TokenAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("its token issuer's answer cannot be read: {e}"))?;
    let token = answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| "its token issuer answered no token".to_owned())?;
    Ok(IssuedToken {
        token,
        expires_in: answer.expires_in,
    })
}

/// A token's life when its issuer says none (the distribution spec's default).
const DEFAULT_TOKEN_LIFE: u64 = 60;
/// How long before its end a token stops being reused: counted from its receipt (after its
/// issue), it must still be valid when the registry reads the request that carries it.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// How long a token issued with `expires_in` is reused, from its receipt: its life less a
/// margin; zero (not reused) for a life within the margin.
pub fn token_reuse(expires_in: Option<u64>) -> Duration {
    Duration::from_secs(expires_in.unwrap_or(DEFAULT_TOKEN_LIFE)).saturating_sub(TOKEN_MARGIN)
}

/// What a registry's token is kept under: the registry it is sent to, the scope it grants,
/// and a digest of the credential it was asked with (`None`: anonymously), so a credential
/// rotated in its file is not served a token of the old one, and no secret is kept as a key.
pub fn token_key(origin: &Url, scope: &str, credential: Option<&[u8]>) -> String {
    let asker = credential.map_or_else(|| "anonymous".to_owned(), sha256_hex);
    format!("{origin} {scope} {asker}")
}

/// The digest of a manifest's bytes, as registries name it (`sha256:<hex>`).
pub fn manifest_digest(manifest: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(manifest))
}

/// Whether a `HEAD` of a tag's manifest answering `Docker-Content-Digest: answered` shows the
/// manifest kept (of digest `kept`) is still the tag's, so it need not be read again: only the
/// same well-formed SHA-256 digest does. Another digest (the tag moved), none, or another
/// algorithm: the manifest is read again.
pub fn same_manifest(kept: &str, answered: Option<&str>) -> bool {
    let well_formed = |d: &str| {
        d.strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    answered.is_some_and(|a| well_formed(a.trim()) && a.trim().eq_ignore_ascii_case(kept))
        && well_formed(kept)
}

/// Why `who` (a registry, a token issuer) answered 429 Too Many Requests, with its
/// `Retry-After` if any: it throttled kas, which reads it again at the next `chart_index_ttl`.
pub fn throttled(who: &str, retry_after: Option<&str>) -> String {
    let after = retry_after
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| format!(", Retry-After: {r}"))
        .unwrap_or_default();
    format!(
        "answered 429 Too Many Requests{after}: {who} throttled kas (its rate limit for this client); kas asks again at the next gitops.render.chart_index_ttl"
    )
}

/// A chart manifest's layer holding the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartLayer {
    /// Its SHA-256, lowercase hex.
    pub digest: String,
    /// Its size in bytes, as the manifest says.
    pub size: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    size: u64,
}

/// The chart layer of a manifest, checked to be a Helm chart's (its config media type) with
/// one chart layer of a SHA-256 digest.
pub fn chart_layer(manifest: &[u8]) -> Result<ChartLayer, String> {
    let m: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| format!("its manifest cannot be read: {e}"))?;
    let config = m.config.map(|c| c.media_type).unwrap_or_default();
    if config != HELM_CONFIG_MEDIA_TYPE {
        return Err(format!(
            "it is not a Helm chart: its manifest's config is {config:?}, not {HELM_CONFIG_MEDIA_TYPE}"
        ));
    }
    let mut charts = m
        .layers
        .into_iter()
        .filter(|l| l.media_type == HELM_CHART_MEDIA_TYPE);
    let (Some(layer), None) = (charts.next(), charts.next()) else {
        return Err(format!(
            "its manifest has not exactly one layer of type {HELM_CHART_MEDIA_TYPE}"
        ));
    };
    let digest = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            format!(
                "its chart layer's digest {:?} is not a SHA-256 one, so kas cannot check the archive",
                layer.digest
            )
        })?;
    Ok(ChartLayer {
        digest: digest.to_ascii_lowercase(),
        size: layer.size,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_chart_of_a_registry_location_is_the_repository_under_it() {
        let c = OciChart::new("oci://Registry.Example.com:5000/charts/", "greeter", false).unwrap();
        assert_eq!(c.name, "charts/greeter");
        assert_eq!(c.location, "oci://registry.example.com:5000/charts/greeter");
        assert_eq!(
            c.tags_url().as_str(),
            "https://registry.example.com:5000/v2/charts/greeter/tags/list?n=100"
        );
        assert_eq!(
            c.manifest_url("1.0.0_build.1").as_str(),
            "https://registry.example.com:5000/v2/charts/greeter/manifests/1.0.0_build.1"
        );
        let digest = "ab".repeat(32);
        assert_eq!(
            c.blob_url(&digest).as_str(),
            format!("https://registry.example.com:5000/v2/charts/greeter/blobs/sha256:{digest}")
        );
        let (back, tag) = OciChart::from_tagged(&c.tagged("1.1.0"), false).unwrap();
        assert_eq!((back, tag.as_str()), (c.clone(), "1.1.0"));
        let plain = OciChart::new("oci://127.0.0.1:5000", "greeter", true).unwrap();
        assert_eq!(
            plain.tags_url().as_str(),
            "http://127.0.0.1:5000/v2/greeter/tags/list?n=100"
        );
        // Only the registry itself gets its credentials.
        assert!(c.same_origin(&Url::parse("https://registry.example.com:5000/v2/x").unwrap()));
        for other in [
            "https://registry.example.com/v2/x",
            "http://registry.example.com:5000/v2/x",
            "https://storage.example.com:5000/blob",
        ] {
            assert!(!c.same_origin(&Url::parse(other).unwrap()), "{other}");
        }
        for (repository, chart) in [
            ("oci://r.example.com/Charts", "greeter"),
            ("oci://r.example.com/charts", "../x"),
            ("oci://r.example.com/a//b", "greeter"),
            ("https://r.example.com/charts", "greeter"),
        ] {
            assert!(
                OciChart::new(repository, chart, false).is_err(),
                "{repository} {chart}"
            );
        }
        assert!(OciChart::from_tagged("oci://r.example.com/charts/greeter", false).is_err());
        assert!(is_oci(" OCI://r/x") && !is_oci("https://r/x"));
    }

    #[test]
    fn tags_are_versions_with_underscore_for_plus() {
        assert_eq!(
            tag_version("1.2.3_build.5").unwrap().to_string(),
            "1.2.3+build.5"
        );
        assert_eq!(tag_version("v1.2").unwrap().to_string(), "1.2.0");
        assert!(tag_version("latest").is_none());
        assert_eq!(
            parse_tags(br#"{"name":"charts/greeter","tags":["1.0.0","2.0.0"]}"#).unwrap(),
            ["1.0.0", "2.0.0"]
        );
        assert!(
            parse_tags(br#"{"name":"x","tags":null}"#)
                .unwrap()
                .is_empty()
        );
        assert!(parse_tags(b"<html>").is_err());
    }

    #[test]
    fn the_next_tag_page_is_the_link_of_rel_next_relative_to_the_page() {
        let page = Url::parse("https://r.example.com/v2/charts/greeter/tags/list").unwrap();
        let next = next_page(
            [r#"</v2/charts/greeter/tags/list?last=1.0.0&n=2>; rel="next""#],
            &page,
        );
        assert_eq!(
            next.unwrap().unwrap().as_str(),
            "https://r.example.com/v2/charts/greeter/tags/list?last=1.0.0&n=2"
        );
        let other_rel = [r#"<https://r.example.com/docs>; rel="help", <?last=b>; rel=next"#];
        assert_eq!(
            next_page(other_rel, &page).unwrap().unwrap().as_str(),
            "https://r.example.com/v2/charts/greeter/tags/list?last=b"
        );
        assert!(next_page([r#"<https://x/>; rel="prev""#], &page).is_none());
        assert!(next_page(Vec::<&str>::new(), &page).is_none());
    }

    #[test]
    fn a_bearer_challenge_is_read_with_quoted_commas_and_escapes() {
        let c = bearer_challenge([
            r#"Basic realm="registry""#,
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:charts/greeter:pull,push""#,
        ])
        .unwrap();
        assert_eq!(
            c,
            Challenge {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:charts/greeter:pull,push".into()),
            }
        );
        let bare =
            bearer_challenge([r#"bearer  realm=http://127.0.0.1:9/t , service = "a \"b\"""#])
                .unwrap();
        assert_eq!(bare.realm, "http://127.0.0.1:9/t");
        assert_eq!(bare.service.as_deref(), Some("a \"b\""));
        assert_eq!(bare.scope, None);
        assert!(bearer_challenge([r#"Basic realm="x""#]).is_none());
        assert!(
            bearer_challenge([r#"Bearer service="x""#]).is_none(),
            "no realm"
        );
        assert!(bearer_challenge([r#"Bearer realm="#]).is_none());
    }

    #[test]
    fn a_token_is_asked_at_an_https_or_loopback_realm_with_service_and_scope() {
        let challenge = |realm: &str, scope: Option<&str>| Challenge {
            realm: realm.into(),
            service: Some("registry.example.com".into()),
            scope: scope.map(Into::into),
        };
        let url = token_url(
            &challenge("https://auth.example.com/token", None),
            "repository:c:pull",
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://auth.example.com/token?service=registry.example.com&scope=repository%3Ac%3Apull"
        );
        let theirs = token_url(
            &challenge("http://127.0.0.1:8/token?a=1", Some("repository:x:pull")),
            "repository:c:pull",
        )
        .unwrap();
        assert_eq!(
            theirs.as_str(),
            "http://127.0.0.1:8/token?a=1&service=registry.example.com&scope=repository%3Ax%3Apull"
        );
        for refused in [
            "http://auth.example.com/token",
            "ftp://127.0.0.1/t",
            "/token",
        ] {
            let e = token_url(&challenge(refused, None), "s").unwrap_err();
            assert!(e.contains(refused), "{e}");
        }
        assert_eq!(
            parse_token(br#"{"token":"t1","access_token":"t2","expires_in":300}"#).unwrap(),
            IssuedToken {
                token: "t1".into(),
                expires_in: Some(300)
            }
        );
        let oauth = parse_token(br#"{"access_token":"t2"}"#).unwrap();
        assert_eq!((oauth.token.as_str(), oauth.expires_in), ("t2", None));
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"nope").is_err());
    }

    #[test]
    fn a_token_is_reused_until_shortly_before_it_expires_and_60_s_when_unsaid() {
        assert_eq!(token_reuse(Some(300)), Duration::from_secs(290));
        assert_eq!(
            token_reuse(None),
            Duration::from_secs(50),
            "the spec's 60 s"
        );
        assert_eq!(token_reuse(Some(10)), Duration::ZERO, "within the margin");
        assert_eq!(token_reuse(Some(0)), Duration::ZERO);
    }

    #[test]
    fn a_token_is_kept_per_registry_scope_and_credential_never_under_its_secret() {
        let r = Url::parse("https://registry.example.com/").unwrap();
        let key = |origin: &Url, scope: &str, c: Option<&[u8]>| token_key(origin, scope, c);
        let basic = key(&r, "repository:a:pull", Some(b"Basic cmVhZGVyOnMzY3JldA=="));
        assert_eq!(
            basic,
            key(&r, "repository:a:pull", Some(b"Basic cmVhZGVyOnMzY3JldA=="))
        );
        assert!(!basic.contains("cmVhZGVyOnMzY3JldA"), "{basic}");
        let rotated = key(&r, "repository:a:pull", Some(b"Basic cmVhZGVyOm5ldw=="));
        let anonymous = key(&r, "repository:a:pull", None);
        let other_scope = key(&r, "repository:b:pull", Some(b"Basic cmVhZGVyOnMzY3JldA=="));
        let other = Url::parse("https://other.example.com/").unwrap();
        let other_registry = key(&other, "repository:a:pull", None);
        let all = [&basic, &rotated, &anonymous, &other_scope, &other_registry];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn a_kept_manifest_is_reused_only_when_head_answers_its_very_digest() {
        let kept = manifest_digest(b"{}");
        assert_eq!(kept, format!("sha256:{}", sha256_hex(b"{}")));
        assert!(same_manifest(&kept, Some(&kept)));
        assert!(same_manifest(
            &kept,
            Some(&format!(
                " {} ",
                kept.to_uppercase().replacen("SHA256", "sha256", 1)
            ))
        ));
        let moved = manifest_digest(b"{ }");
        assert!(!same_manifest(&kept, Some(&moved)), "the tag moved");
        assert!(!same_manifest(&kept, None), "no Docker-Content-Digest");
        assert!(!same_manifest(&kept, Some("")));
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        assert!(!same_manifest(&sha512, Some(&sha512)), "not SHA-256");
        assert!(!same_manifest("sha256:x", Some("sha256:x")));
    }

    #[test]
    fn a_429_says_who_throttled_kas_and_when_to_retry() {
        let e = throttled("the registry registry-1.docker.io", Some(" 3600 "));
        assert!(
            e.starts_with(
                "answered 429 Too Many Requests, Retry-After: 3600: the registry registry-1.docker.io throttled kas"
            ),
            "{e}"
        );
        let e = throttled("its token issuer https://auth.docker.io/token", None);
        assert!(
            e.starts_with("answered 429 Too Many Requests: its token issuer https://auth.docker.io/token throttled kas"),
            "{e}"
        );
    }

    #[test]
    fn loopback_alone_may_be_plain_http() {
        for ok in [
            "http://127.0.0.1:5000/v2",
            "http://[::1]/x",
            "http://localhost/x",
            "https://r.example.com/",
        ] {
            assert!(secure_or_loopback(&Url::parse(ok).unwrap()), "{ok}");
        }
        for refused in [
            "http://r.example.com/",
            "http://10.0.0.1/",
            "ftp://127.0.0.1/",
        ] {
            assert!(
                !secure_or_loopback(&Url::parse(refused).unwrap()),
                "{refused}"
            );
        }
        assert!(plain_http_registry("oci://127.0.0.1:5000").is_ok());
        assert!(plain_http_registry("oci://[::1]:5000").is_ok());
        let e = plain_http_registry("oci://registry.example.com").unwrap_err();
        assert!(e.contains("only a loopback registry"), "{e}");
        assert!(plain_http_registry("http://127.0.0.1:5000").is_err());
    }

    fn manifest(config: &str, layers: &[(&str, &str)]) -> Vec<u8> {
        let layers: Vec<_> = layers
            .iter()
            .map(|(t, d)| serde_json::json!({"mediaType": t, "digest": d, "size": 1234}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": config, "digest": "sha256:00", "size": 2},
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn a_manifest_is_a_charts_with_one_sha256_chart_layer() {
        let digest = format!("sha256:{}", "AB".repeat(32));
        let prov = (
            "application/vnd.cncf.helm.chart.provenance.v1.prov",
            "sha256:11",
        );
        let m = manifest(
            HELM_CONFIG_MEDIA_TYPE,
            &[(HELM_CHART_MEDIA_TYPE, &digest), prov],
        );
        assert_eq!(
            chart_layer(&m).unwrap(),
            ChartLayer {
                digest: "ab".repeat(32),
                size: 1234
            }
        );
        let image = manifest(
            "application/vnd.oci.image.config.v1+json",
            &[(HELM_CHART_MEDIA_TYPE, &digest)],
        );
        assert!(
            chart_layer(&image)
                .unwrap_err()
                .contains("not a Helm chart")
        );
        let two = manifest(
            HELM_CONFIG_MEDIA_TYPE,
            &[
                (HELM_CHART_MEDIA_TYPE, &digest),
                (HELM_CHART_MEDIA_TYPE, &digest),
            ],
        );
        assert!(
            chart_layer(&two)
                .unwrap_err()
                .contains("not exactly one layer")
        );
        let none = manifest(HELM_CONFIG_MEDIA_TYPE, &[prov]);
        assert!(
            chart_layer(&none)
                .unwrap_err()
                .contains("not exactly one layer")
        );
        let sha512 = manifest(
            HELM_CONFIG_MEDIA_TYPE,
            &[(HELM_CHART_MEDIA_TYPE, "sha512:abcd")],
        );
        assert!(
            chart_layer(&sha512)
                .unwrap_err()
                .contains("not a SHA-256 one")
        );
        assert!(chart_layer(b"{").is_err());
    }
}
