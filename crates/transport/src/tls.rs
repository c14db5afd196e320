//! Loading certificates and keys, and building rustls configurations.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// The TLS configuration kas serves with (see [`load_server_tls`]).
pub type ServerTls = Arc<ServerConfig>;

pub(crate) const ALPN_H2: &[u8] = b"h2";
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The `ring` provider, passed explicitly so no process-wide default needs installing (and two
/// crates installing different defaults cannot clash).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificates(path.to_owned()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| Error::Pem {
        path: path.to_owned(),
        source,
    })
}

/// Loads kas's certificate chain and private key (PEM files) into a server config offering
/// ALPN `h2` (gRPC clients) and `http/1.1` (WebSocket clients) on the same port.
pub fn load_server_tls(cert_file: &Path, key_file: &Path) -> Result<ServerTls> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// An HTTP/1.1 client config trusting only `ca_file` when given, otherwise the system's roots
/// (for clients of kas's HTTPS listeners, such as the admin commands).
pub fn load_client_tls(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    client_config(ca_file, ALPN_HTTP11)
}

/// A client config trusting only `ca_file` when given (a private kas CA should not be
/// combined with every public CA), otherwise the system's roots.
pub(crate) fn client_config(ca_file: Option<&Path>, alpn: &[u8]) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert)?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "skipping unreadable system root certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            if ignored > 0 {
                tracing::debug!(ignored, "skipped unparsable system root certificates");
            }
            if added == 0 {
                let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
                return Err(Error::NoNativeRoots(if errors.is_empty() {
                    "none found".to_owned()
                } else {
                    errors.join("; ")
                }));
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}
