//! Charts of OCI registries, read as Helm reads them (see [`super::oci`]): the tag list (its
//! `Link` pages followed on the registry only), the manifest of the newest tag in range, its
//! chart layer (a blob, whose redirects to storage are followed, the registry's
//! `Authorization` never sent to another host). Authentication: anonymous, or the credentials
//! of `chart_repository_credentials` covering the `oci://` location; when the registry
//! answers with a Bearer challenge, a token from its realm (asked with those credentials).
//!
//! Polite to registries that count or limit requests (Docker Hub counts each manifest `GET`
//! as a pull, and limits them; most limit token requests): a re-resolution choosing the tag
//! kept asks with a `HEAD` whether it still names the manifest kept, reading it again only
//! when it moved; a token is reused within its life; a 429 says which registry throttled kas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use url::Url;

use super::{
    Answer, ChartFetcher, Failure, RenderError, Resolution, Unresolved, denied, is_refusal, refusal,
};
use crate::render::credentials::{ChartCredential, Scheme, credential_for};
use crate::render::dependencies::{self, Dependency, Resolved};
use crate::render::oci::{self, OciChart};
use crate::render::resolutions::{self, Stale};

/// Most pages of a tag list read: a registry naming pages without end is not followed forever.
const MAX_TAG_PAGES: usize = 100;
/// Most redirects of a blob followed (a registry to its storage, maybe a CDN).
const MAX_REDIRECTS: usize = 5;

/// A registry chart's last resolution, in memory.
#[derive(Debug)]
pub(super) struct Kept {
    at: Instant,
    wall: SystemTime,
    known: Known,
}

/// What a registry chart resolved to, and the digest of the manifest it was read in.
#[derive(Debug, Clone)]
struct Known {
    resolved: Resolved,
    manifest: String,
}

/// Registry tokens by [`oci::token_key`], each with the moment it stops being reused: a
/// re-resolution within a token's life sends it at once instead of asking its realm again.
#[derive(Default)]
pub(super) struct Tokens(Mutex<HashMap<String, (http::HeaderValue, Instant)>>);

impl std::fmt::Debug for Tokens {
    /// Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens")
    }
}

impl Tokens {
    /// The token kept under `key`, unless its reuse ended by `now`.
    fn get(&self, key: &str, now: Instant) -> Option<http::HeaderValue> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(key)
            .filter(|(_, until)| now < *until)
            .map(|(token, _)| token.clone())
    }

    /// Keeps `token` under `key` for `reuse` from `now` (not at all for zero). Tokens past
    /// their reuse go, so the map holds live ones only (a rotated credential's old key is
    /// never asked again).
    fn keep(&self, key: &str, token: http::HeaderValue, now: Instant, reuse: Duration) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|_, (_, until)| now < *until);
        if let Some(until) = now.checked_add(reuse).filter(|_| !reuse.is_zero()) {
            all.insert(key.to_owned(), (token, until));
        }
    }

    /// Drops the token of `key` (refused by its registry: revoked, or ended early).
    fn forget(&self, key: &str) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.remove(key);
    }
}

impl ChartFetcher {
    /// `chart` (of an `oci://` location) resolved in its tag list and manifest: kept if read
    /// within `index_ttl`, else read again; when the registry cannot be read, the last one
    /// kept (stale), else the failure. A fresh resolution is kept on disk too.
    pub(super) async fn oci_resolve(&self, chart: &Dependency) -> Result<Resolution, Unresolved> {
        let slot = {
            let mut all = self.oci.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(all.entry(resolutions::file_name(chart)).or_default())
        };
        let mut kept = slot.lock().await;
        if let Some(k) = kept
            .as_ref()
            .filter(|k| k.at.elapsed() < self.config.index_ttl)
        {
            self.metrics.count("index", "cached");
            let resolved = k.known.resolved.clone();
            return Ok(Resolution {
                resolved,
                stale: None,
            });
        }
        let previous = match kept.as_ref() {
            Some(k) => Some(k.known.clone()),
            None => self.recorded(chart).await.and_then(|r| {
                let manifest = r.manifest.clone()?;
                let resolved = r.resolved();
                Some(Known { resolved, manifest })
            }),
        };
        let fetched = self.oci_fetch(chart, previous).await;
        if let Err(Unresolved::Failed(RenderError::ChartRepository { detail, .. })) = &fetched
            && let Some(k) = kept.as_ref()
        {
            self.metrics.count("index", "stale");
            return Ok(Resolution {
                resolved: k.known.resolved.clone(),
                stale: Some(Stale {
                    repository: chart.repository.clone(),
                    fetched_at: k.wall,
                    error: detail.clone(),
                }),
            });
        }
        let known = fetched.inspect_err(|e| {
            let denied = matches!(
                e,
                Unresolved::Failed(RenderError::ChartRepositoryDenied { .. })
            );
            self.metrics
                .count("index", if denied { "denied" } else { "failed" });
        })?;
        self.metrics.count("index", "fetched");
        let wall = SystemTime::now();
        let manifest = Some(known.manifest.clone());
        self.record(chart, &known.resolved, manifest, wall).await;
        let resolved = known.resolved.clone();
        *kept = Some(Kept {
            at: Instant::now(),
            wall,
            known,
        });
        Ok(Resolution {
            resolved,
            stale: None,
        })
    }

    /// `chart` resolved now: the newest tag in range, its manifest checked to be a Helm
    /// chart's with a chart layer within `max_chart_size`. When that is the tag of
    /// `previous` and a `HEAD` shows it still names the manifest read then, `previous`.
    async fn oci_fetch(
        &self,
        chart: &Dependency,
        previous: Option<Known>,
    ) -> Result<Known, Unresolved> {
        let location = format!(
            "{}/{}",
            chart.repository.trim().trim_end_matches('/'),
            chart.name
        );
        let target = OciChart::new(&chart.repository, &chart.name, self.plain_http(&location))
            .map_err(Unresolved::NoVersion)?;
        let failed = |f: Failure| match f {
            Failure::Denied(detail) => Unresolved::Failed(denied(&chart.repository, detail)),
            Failure::Other(detail) => Unresolved::Failed(RenderError::ChartRepository {
                url: target.location.clone(),
                detail,
            }),
        };
        let mut session = Session::new(self, &target);
        let tags = session.tags().await.map_err(failed)?;
        let (version, tag) =
            dependencies::newest(chart, tags.into_iter().map(|t| (oci::tag_version(&t), t)))
                .map_err(Unresolved::NoVersion)?;
        let index_limit = (self.config.max_index_size, "max_chart_index_size");
        let url = target.manifest_url(&tag);
        if let Some(p) = previous.filter(|p| p.resolved.url == target.tagged(&tag))
            && session.unchanged(&url, &p.manifest).await.map_err(failed)?
        {
            self.metrics.count("manifest", "unchanged");
            return Ok(p);
        }
        let manifest = session
            .get(&url, Some(oci::MANIFEST_MEDIA_TYPE), index_limit)
            .await
            .and_then(success)
            .map_err(failed)?;
        self.metrics.count("manifest", "fetched");
        let layer = oci::chart_layer(&manifest.body)
            .map_err(|e| Unresolved::NoVersion(format!("{} {version} ({tag}): {e}", chart.name)))?;
        let max = self.config.max_archive_size;
        if layer.size > max {
            return Err(Unresolved::NoVersion(format!(
                "{} {version}: its archive is {} bytes, larger than {max} (gitops.render.max_chart_size)",
                chart.name, layer.size
            )));
        }
        let resolved = Resolved {
            name: chart.name.clone(),
            version: version.to_string(),
            url: target.tagged(&tag),
            digest: layer.digest,
        };
        Ok(Known {
            resolved,
            manifest: oci::manifest_digest(&manifest.body),
        })
    }

    /// The chart layer of `resolved` (a registry chart), following the registry's redirects
    /// to its storage; the caller checks its digest.
    pub(super) async fn blob(&self, resolved: &Resolved) -> Result<Vec<u8>, Failure> {
        let (target, _) = OciChart::from_tagged(&resolved.url, self.plain_http(&resolved.url))?;
        let mut session = Session::new(self, &target);
        let limit = (self.config.max_archive_size, "max_chart_size");
        let mut url = target.blob_url(&resolved.digest);
        let mut answer = session.get(&url, None, limit).await?;
        for _ in 0..MAX_REDIRECTS {
            if !answer.status.is_redirection() {
                break;
            }
            url = moved_to(&answer, &url)?;
            // The registry's credentials or token are for the registry alone: storage it
            // sends blobs from authenticates the URL it signed. Its refusal (an expired
            // signature) is no refusal of kas's credentials.
            answer = if target.same_origin(&url) {
                let authorization = session.authorization().await?;
                session.checked(self.send(&url, None, authorization, limit).await?)?
            } else {
                self.send(&url, None, None, limit).await?
            };
        }
        success(answer).map(|a| a.body).map_err(|f| match f {
            Failure::Other(d) if !target.same_origin(&url) => {
                Failure::Other(format!("{d} (its storage, {})", without_query(&url)))
            }
            other => other,
        })
    }

    /// Whether the registry of `location` (`oci://…`) is one of `plain_http_registries`.
    fn plain_http(&self, location: &str) -> bool {
        tether_agent_config::chart_repository::oci_url(location).is_some_and(|url| {
            self.plain_http
                .iter()
                .any(|p| p.host_str() == url.host_str() && p.port() == url.port())
        })
    }
}

/// Where a redirect sends a blob: an absolute or relative `Location`, HTTPS (or loopback).
fn moved_to(answer: &Answer, from: &Url) -> Result<Url, Failure> {
    let location = answer
        .headers
        .get(http::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| {
            format!(
                "{} answered {} without a Location",
                without_query(from),
                answer.status
            )
        })?;
    let to = from.join(location).map_err(|e| {
        format!(
            "{} moved the blob to an invalid Location: {e}",
            without_query(from)
        )
    })?;
    if !oci::secure_or_loopback(&to) {
        return Err(Failure::Other(format!(
            "{} moved to {}: kas follows a blob to https:// only (plain http:// on loopback)",
            without_query(from),
            without_query(&to)
        )));
    }
    Ok(to)
}

/// `url` without its query: a storage URL's query holds the signature granting the read,
/// which no error or log shows.
fn without_query(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
}

/// `answer` if it is a success; why not (its status), otherwise.
fn success(answer: Answer) -> Result<Answer, Failure> {
    if answer.status.is_success() {
        Ok(answer)
    } else {
        Err(Failure::Other(format!("answered {}", answer.status)))
    }
}

/// Requests to one registry for one chart, authenticated as it asks.
struct Session<'a> {
    fetcher: &'a ChartFetcher,
    target: &'a OciChart,
    /// The credential covering the chart's `oci://` location, if any.
    credential: Option<&'a ChartCredential>,
    /// The registry's token (reused, or issued once a Bearer challenge was answered), sent
    /// instead.
    token: Option<http::HeaderValue>,
    /// Whether a token kept was looked for (at the first request).
    looked_up: bool,
    /// Where its token is kept (see [`oci::token_key`]); none for a `token_file` credential,
    /// which is sent as it is.
    key: Option<String>,
    /// Whether the token was issued to this session: a refusal of it is final, where one of a
    /// token reused asks for a new token once.
    issued: bool,
}

impl<'a> Session<'a> {
    fn new(fetcher: &'a ChartFetcher, target: &'a OciChart) -> Self {
        Self {
            fetcher,
            target,
            credential: credential_for(&fetcher.config.credentials, &target.location),
            token: None,
            looked_up: false,
            key: None,
            issued: false,
        }
    }

    /// Every tag of the chart, page after page (each on the registry itself).
    async fn tags(&mut self) -> Result<Vec<String>, Failure> {
        let limit = (self.fetcher.config.max_index_size, "max_chart_index_size");
        let mut url = self.target.tags_url();
        let mut tags = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            let page = success(self.get(&url, Some("application/json"), limit).await?)?;
            tags.extend(oci::parse_tags(&page.body)?);
            let links = page
                .headers
                .get_all(http::header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok());
            let Some(next) = oci::next_page(links, &url) else {
                return Ok(tags);
            };
            url = next?;
            if !self.target.same_origin(&url) {
                return Err(Failure::Other(format!(
                    "its tag list's next page {url} is not on the registry"
                )));
            }
        }
        Err(Failure::Other(format!(
            "its tag list has more than {MAX_TAG_PAGES} pages"
        )))
    }

    /// Whether the manifest at `url` (a tag's) is still the one of digest `kept`, asked with a
    /// `HEAD`, which registries counting pulls do not count. Any answer but a success naming
    /// that digest says no: the manifest is read again.
    async fn unchanged(&mut self, url: &Url, kept: &str) -> Result<bool, Failure> {
        let limit = (self.fetcher.config.max_index_size, "max_chart_index_size");
        let accept = Some(oci::MANIFEST_MEDIA_TYPE);
        let answer = self.request(http::Method::HEAD, url, accept, limit).await?;
        let digest = answer
            .headers
            .get(oci::DIGEST_HEADER)
            .and_then(|d| d.to_str().ok());
        Ok(answer.status.is_success() && oci::same_manifest(kept, digest))
    }

    /// A `GET` of `url` on the registry (see [`Session::request`]).
    async fn get(
        &mut self,
        url: &Url,
        accept: Option<&str>,
        limit: (u64, &str),
    ) -> Result<Answer, Failure> {
        self.request(http::Method::GET, url, accept, limit).await
    }

    /// A request of `url` on the registry: with the token, else the credential; answered by a
    /// Bearer challenge, again with a token from its realm (a token reused and refused is
    /// dropped for a new one). Any answer but a refusal or a throttling.
    async fn request(
        &mut self,
        method: http::Method,
        url: &Url,
        accept: Option<&str>,
        limit: (u64, &str),
    ) -> Result<Answer, Failure> {
        self.reuse_token().await?;
        let authorization = self.authorization().await?;
        let answer = self
            .fetcher
            .send_as(method.clone(), url, accept, authorization, limit)
            .await?;
        if answer.status != http::StatusCode::UNAUTHORIZED || self.issued {
            return self.checked(answer);
        }
        if self.token.take().is_some()
            && let Some(key) = &self.key
        {
            self.fetcher.tokens.forget(key);
        }
        let challenges = answer
            .headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let Some(challenge) = oci::bearer_challenge(challenges) else {
            return self.checked(answer);
        };
        self.token = Some(self.token(&challenge).await?);
        self.issued = true;
        let again = self
            .fetcher
            .send_as(method, url, accept, self.token.clone(), limit)
            .await?;
        self.checked(again)
    }

    /// The token kept for this registry, scope and credential (its file read now), if its
    /// reuse has not ended: looked for once, at the session's first request.
    async fn reuse_token(&mut self) -> Result<(), Failure> {
        if std::mem::replace(&mut self.looked_up, true) {
            return Ok(());
        }
        let credential = match self.credential {
            Some(c) if c.scheme() == Ok(Scheme::Bearer) => return Ok(()),
            Some(c) => Some(self.fetcher.authorization(c).await?),
            None => None,
        };
        let key = oci::token_key(
            &self.target.origin,
            &self.scope(),
            credential.as_ref().map(http::HeaderValue::as_bytes),
        );
        self.token = self.fetcher.tokens.get(&key, Instant::now());
        if self.token.is_some() {
            self.fetcher.metrics.count("token", "cached");
        }
        self.key = Some(key);
        Ok(())
    }

    /// The scope of a token kas asks for: reading the chart.
    fn scope(&self) -> String {
        format!("repository:{}:pull", self.target.name)
    }

    /// What the registry is sent: its token, else the credential, else nothing.
    async fn authorization(&self) -> Result<Option<http::HeaderValue>, Failure> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        match self.credential {
            Some(c) => Ok(Some(self.fetcher.authorization(c).await?)),
            None => Ok(None),
        }
    }

    /// `answer` unless it refuses kas (401, 403): then why, naming the credentials sent; or
    /// throttles it (429): then which registry.
    fn checked(&self, answer: Answer) -> Result<Answer, Failure> {
        if is_refusal(answer.status) {
            return Err(Failure::Denied(refusal(answer.status, self.credential)));
        }
        self.unthrottled(answer, || {
            let origin = &self.target.origin;
            let host = origin.host_str().unwrap_or_default();
            match origin.port() {
                Some(port) => format!("the registry {host}:{port}"),
                None => format!("the registry {host}"),
            }
        })
    }

    /// `answer` unless it is a 429 Too Many Requests: then that `who` throttled kas.
    fn unthrottled(&self, answer: Answer, who: impl FnOnce() -> String) -> Result<Answer, Failure> {
        if answer.status != http::StatusCode::TOO_MANY_REQUESTS {
            return Ok(answer);
        }
        self.fetcher.metrics.count("registry", "throttled");
        let retry_after = answer
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|r| r.to_str().ok());
        Err(Failure::Other(oci::throttled(&who(), retry_after)))
    }

    /// A token for the chart from the realm of `challenge`, asked with the credential's user
    /// and password (anonymously without one), as the `Authorization` the registry is sent.
    async fn token(&self, challenge: &oci::Challenge) -> Result<http::HeaderValue, Failure> {
        if let Some(c) = self.credential
            && c.scheme() == Ok(Scheme::Bearer)
        {
            // A token_file holds a token the registry takes as it is; one it answers with a
            // challenge is refused, not sent on to a realm it names.
            return Err(Failure::Denied(refusal(
                http::StatusCode::UNAUTHORIZED,
                self.credential,
            )));
        }
        let url = oci::token_url(challenge, &self.scope())?;
        let authorization = self.authorization().await?;
        let limit = (self.fetcher.config.max_index_size, "max_chart_index_size");
        let answer = self
            .fetcher
            .send(&url, Some("application/json"), authorization, limit)
            .await?;
        if is_refusal(answer.status) {
            let why = refusal(answer.status, self.credential);
            return Err(Failure::Denied(format!(
                "its token issuer {}: {why}",
                challenge.realm
            )));
        }
        let issuer = || format!("its token issuer {}", challenge.realm);
        let answer = self.unthrottled(answer, issuer)?;
        let answer = success(answer).map_err(|f| match f {
            Failure::Other(d) => {
                Failure::Other(format!("its token issuer {}: {d}", challenge.realm))
            }
            other => other,
        })?;
        let issued = oci::parse_token(&answer.body)?;
        let bearer = format!("Bearer {}", issued.token);
        let mut header = http::HeaderValue::from_str(&bearer).map_err(|_| {
            format!(
                "its token issuer {} answered a token an HTTP header cannot carry",
                challenge.realm
            )
        })?;
        header.set_sensitive(true);
        self.fetcher.metrics.count("token", "fetched");
        if let Some(key) = &self.key {
            let reuse = oci::token_reuse(issued.expires_in);
            let tokens = &self.fetcher.tokens;
            tokens.keep(key, header.clone(), Instant::now(), reuse);
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_is_reused_until_its_reuse_ends_and_not_once_forgotten() {
        let tokens = Tokens::default();
        let t0 = Instant::now();
        let token = http::HeaderValue::from_static("Bearer t");
        let reuse = Duration::from_secs(50);
        tokens.keep("a", token.clone(), t0, reuse);
        assert_eq!(
            tokens.get("a", t0 + reuse - Duration::from_millis(1)),
            Some(token.clone())
        );
        assert_eq!(tokens.get("a", t0 + reuse), None, "its reuse ended");
        assert_eq!(tokens.get("b", t0), None);
        tokens.keep("z", token.clone(), t0, Duration::ZERO);
        assert_eq!(
            tokens.get("z", t0),
            None,
            "a life within the margin is not kept"
        );
        tokens.keep("b", token.clone(), t0, reuse);
        tokens.forget("b");
        assert_eq!(tokens.get("b", t0), None);
        // Keeping one drops those past their reuse.
        tokens.keep("c", token, t0 + reuse, reuse);
        let all = tokens.0.lock().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["c"]);
        assert!(!format!("{tokens:?}").contains("Bearer"));
    }
}
