//! Charts of OCI registries, read as Helm reads them (see [`super::oci`]): the tag list (its
//! `Link` pages followed on the registry only), the manifest of the newest tag in range, its
//! chart layer (a blob, whose redirects to storage are followed, the registry's
//! `Authorization` never sent to another host). Authentication: anonymous, or the credentials
//! of `chart_repository_credentials` covering the `oci://` location; when the registry
//! answers with a Bearer challenge, a token from its realm (asked with those credentials).

use std::sync::{Arc, PoisonError};
use std::time::{Instant, SystemTime};

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
    resolved: Resolved,
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
            let resolved = k.resolved.clone();
            return Ok(Resolution {
                resolved,
                stale: None,
            });
        }
        let fetched = self.oci_fetch(chart).await;
        if let Err(Unresolved::Failed(RenderError::ChartRepository { detail, .. })) = &fetched
            && let Some(k) = kept.as_ref()
        {
            self.metrics.count("index", "stale");
            return Ok(Resolution {
                resolved: k.resolved.clone(),
                stale: Some(Stale {
                    repository: chart.repository.clone(),
                    fetched_at: k.wall,
                    error: detail.clone(),
                }),
            });
        }
        let resolved = fetched.inspect_err(|e| {
            let denied = matches!(
                e,
                Unresolved::Failed(RenderError::ChartRepositoryDenied { .. })
            );
            self.metrics
                .count("index", if denied { "denied" } else { "failed" });
        })?;
        self.metrics.count("index", "fetched");
        let wall = SystemTime::now();
        self.record(chart, &resolved, wall).await;
        *kept = Some(Kept {
            at: Instant::now(),
            wall,
            resolved: resolved.clone(),
        });
        Ok(Resolution {
            resolved,
            stale: None,
        })
    }

    /// `chart` resolved now: the newest tag in range, its manifest checked to be a Helm
    /// chart's with a chart layer within `max_chart_size`.
    async fn oci_fetch(&self, chart: &Dependency) -> Result<Resolved, Unresolved> {
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
        let manifest = session
            .get(&url, Some(oci::MANIFEST_MEDIA_TYPE), index_limit)
            .await
            .and_then(success)
            .map_err(failed)?;
        let layer = oci::chart_layer(&manifest.body)
            .map_err(|e| Unresolved::NoVersion(format!("{} {version} ({tag}): {e}", chart.name)))?;
        let max = self.config.max_archive_size;
        if layer.size > max {
            return Err(Unresolved::NoVersion(format!(
                "{} {version}: its archive is {} bytes, larger than {max} (gitops.render.max_chart_size)",
                chart.name, layer.size
            )));
        }
        Ok(Resolved {
            name: chart.name.clone(),
            version: version.to_string(),
            url: target.tagged(&tag),
            digest: layer.digest,
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
    /// The registry's token once a Bearer challenge was answered, sent instead.
    token: Option<http::HeaderValue>,
}

impl<'a> Session<'a> {
    fn new(fetcher: &'a ChartFetcher, target: &'a OciChart) -> Self {
        Self {
            fetcher,
            target,
            credential: credential_for(&fetcher.config.credentials, &target.location),
            token: None,
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

    /// A `GET` of `url` on the registry: with the token, else the credential; answered by a
    /// Bearer challenge, again with a token from its realm. Any answer but a refusal.
    async fn get(
        &mut self,
        url: &Url,
        accept: Option<&str>,
        limit: (u64, &str),
    ) -> Result<Answer, Failure> {
        let answer = self
            .fetcher
            .send(url, accept, self.authorization().await?, limit)
            .await?;
        if answer.status != http::StatusCode::UNAUTHORIZED || self.token.is_some() {
            return self.checked(answer);
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
        let again = self
            .fetcher
            .send(url, accept, self.token.clone(), limit)
            .await?;
        self.checked(again)
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

    /// `answer` unless it refuses kas (401, 403): then why, naming the credentials sent.
    fn checked(&self, answer: Answer) -> Result<Answer, Failure> {
        if is_refusal(answer.status) {
            return Err(Failure::Denied(refusal(answer.status, self.credential)));
        }
        Ok(answer)
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
        let scope = format!("repository:{}:pull", self.target.name);
        let url = oci::token_url(challenge, &scope)?;
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
        let answer = success(answer).map_err(|f| match f {
            Failure::Other(d) => {
                Failure::Other(format!("its token issuer {}: {d}", challenge.realm))
            }
            other => other,
        })?;
        let token = oci::parse_token(&answer.body)?;
        let mut header = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            format!(
                "its token issuer {} answered a token an HTTP header cannot carry",
                challenge.realm
            )
        })?;
        header.set_sensitive(true);
        Ok(header)
    }
}
