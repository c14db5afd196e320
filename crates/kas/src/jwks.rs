//! Fetching the JWKS documents of trusted CI issuers over HTTP(S).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tether_kubeproxy_server::{FetchError, JwksFetcher};

/// Largest JWKS document accepted (real ones are a few KiB).
const MAX_JWKS: usize = 1024 * 1024;
/// Longest a whole exchange (connection, headers and body) may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches with the system's trust roots (plus an optional extra CA for private issuers).
///
/// Every request is under one deadline that covers the body too: the verifier runs one load per
/// issuer at a time, and tokens whose key it lacks wait for that load, so a server that sends
/// its headers and then stalls the body would otherwise hold them, and every later reload of
/// the issuer's keys, forever.
pub struct HttpJwksFetcher {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpJwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpJwksFetcher").finish_non_exhaustive()
    }
}

impl HttpJwksFetcher {
    pub fn new(extra_ca_pem: Option<&[u8]>) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system bundle with one unparsable certificate should not stop kas.
            let _ = roots.add(cert);
        }
        if let Some(pem) = extra_ca_pem {
            use rustls_pki_types::pem::PemObject;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                roots.add(cert?)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout: TIMEOUT,
        })
    }

    /// Sets the deadline of each request (10 s by default), body included.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The error of a request that did not end within the deadline.
    fn timed_out(&self, url: &str) -> String {
        format!("{url}: no complete answer within {:?}", self.timeout)
    }
}

impl HttpJwksFetcher {
    /// GETs `url` with a bearer token; the body as text, or an error naming the status.
    pub async fn get_with_bearer(&self, url: &str, token: &str) -> anyhow::Result<String> {
        let req = http::Request::get(url)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::default())?;
        self.text_of(url, req).await
    }

    /// GETs `url`; the body as text, or an error naming the status.
    pub async fn get_text(&self, url: &str) -> anyhow::Result<String> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::default())?;
        self.text_of(url, req).await
    }

    /// POSTs a form (`application/x-www-form-urlencoded`): an OIDC token request.
    pub async fn post_form(&self, url: &str, form: String) -> anyhow::Result<String> {
        let req = http::Request::post(url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))?;
        self.text_of(url, req).await
    }

    /// Sends `req`; the body as text, or an error naming the status.
    async fn text_of(&self, url: &str, req: http::Request<Full<Bytes>>) -> anyhow::Result<String> {
        tokio::time::timeout(self.timeout, self.exchange(url, req))
            .await
            .map_err(|_| anyhow::anyhow!(self.timed_out(url)))?
    }

    /// [`HttpJwksFetcher::text_of`] without its deadline.
    async fn exchange(&self, url: &str, req: http::Request<Full<Bytes>>) -> anyhow::Result<String> {
        let resp = self.client.request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading {url}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        anyhow::ensure!(status.is_success(), "{url} answered {status}: {text}");
        Ok(text)
    }

    /// The JWKS document at `uri`, without the deadline.
    async fn jwks(&self, url: &str, uri: http::Uri) -> Result<Vec<u8>, FetchError> {
        let resp = self
            .client
            .get(uri)
            .await
            .map_err(|e| FetchError::with_source(format!("fetching {url}"), e))?;
        if !resp.status().is_success() {
            return Err(FetchError::new(format!("{url} answered {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| FetchError::new(format!("reading {url}: {e}")))?;
        Ok(body.to_bytes().to_vec())
    }
}

#[tonic::async_trait]
impl JwksFetcher for HttpJwksFetcher {
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| FetchError::with_source(format!("invalid JWKS URL {url}"), e))?;
        tokio::time::timeout(self.timeout, self.jwks(url, uri))
            .await
            .map_err(|_| FetchError::new(self.timed_out(url)))?
    }
}
