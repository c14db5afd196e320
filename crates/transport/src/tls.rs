//! Loading certificates and keys, and building rustls configurations.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

mod mutual;
mod validity;
pub use mutual::{MutualConfigs, MutualTls, MutualTlsFiles, check_client_name, peer_server_name};
pub use validity::{Standing, Validity, validity};

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
/// ALPN `h2` (gRPC clients) and `http/1.1` (WebSocket clients) on the same port. The files
/// are read again when they change (see [`ReloadingCert`]), so a certificate renewed on disk
/// (cert-manager, a rotated Secret) is served without a restart.
pub fn load_server_tls(cert_file: &Path, key_file: &Path) -> Result<ServerTls> {
    Ok(load_served_tls(cert_file, key_file)?.0)
}

/// [`load_server_tls`], and the certificate it serves, to follow its validity.
pub fn load_served_tls(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(ServerTls, ServedCertificate)> {
    let resolver = Arc::new(ReloadingCert::load(cert_file, key_file)?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok((Arc::new(config), ServedCertificate(resolver)))
}

/// The certificate a listener serves, as reloaded from its files.
#[derive(Debug, Clone)]
pub struct ServedCertificate(Arc<ReloadingCert>);

impl ServedCertificate {
    /// The certificate file.
    pub fn file(&self) -> &Path {
        &self.0.cert_file
    }

    /// The validity of the certificate served now (its files read again first if they
    /// changed, as a handshake would); `None` when its DER could not be read as X.509.
    pub fn validity(&self) -> Option<Validity> {
        validity(self.0.current().end_entity_cert().ok()?)
    }
}

/// Checks of the files' stamps at most this often (a handshake storm stats them no more).
const RECHECK: Duration = Duration::from_secs(1);

/// Size and modification time of a file, `None` when it cannot be read.
type FileStamp = Option<(u64, SystemTime)>;

fn file_stamp(file: &Path) -> FileStamp {
    let m = std::fs::metadata(file).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Size and modification time of the certificate and key files.
type Stamp = [FileStamp; 2];

fn stamp(cert_file: &Path, key_file: &Path) -> Stamp {
    [cert_file, key_file].map(file_stamp)
}

/// The server certificate, read again from its files when their size or modification time
/// changes. A pair that does not load (half-written, or a new certificate with the old key)
/// keeps the last good one in service and is tried again when the files change next.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    state: Mutex<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
    /// Files whose pair loaded but was kept out of service for its validity (said once).
    held: Option<Stamp>,
}

impl ReloadingCert {
    fn load(cert_file: &Path, key_file: &Path) -> Result<Self> {
        let stamp = stamp(cert_file, key_file);
        let key = Arc::new(certified_key(cert_file, key_file)?);
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            state: Mutex::new(Served {
                key,
                stamp,
                checked: Instant::now(),
                held: None,
            }),
        })
    }

    /// The certificate to serve now, reloaded first if the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.checked.elapsed() < RECHECK {
            return Arc::clone(&s.key);
        }
        s.checked = Instant::now();
        let now = stamp(&self.cert_file, &self.key_file);
        if now != s.stamp {
            match certified_key(&self.cert_file, &self.key_file) {
                Ok(k) => match held_back(&s.key, &k, SystemTime::now()) {
                    None => {
                        (s.stamp, s.key, s.held) = (now, Arc::new(k), None);
                        tracing::info!(certificate_file = %self.cert_file.display(), "TLS certificate reloaded");
                    }
                    // The stamp is left as it was: the pair is read again at each check, and
                    // served once it becomes valid (a notBefore a little ahead of kas's clock).
                    Some(why) => {
                        if s.held.replace(now) != Some(now) {
                            tracing::warn!(certificate_file = %self.cert_file.display(), why, "The TLS certificate files changed to a certificate that is not valid now; still serving the previous one (tried again every second)");
                        }
                    }
                },
                Err(e) => {
                    s.stamp = now;
                    tracing::warn!(certificate_file = %self.cert_file.display(), error = %e, "The TLS certificate files changed but do not load; still serving the previous certificate");
                }
            }
        }
        Arc::clone(&s.key)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Why the loaded pair `new` is kept out of service at `now` in favour of `served`: it is not
/// valid now while the one served is (kas swapped a good certificate for one already expired
/// or not yet valid, and every client refused kas from the next handshake: E14). `None`: put
/// it in service (it is valid, or the one served is no better, or either cannot be read).
fn held_back(served: &CertifiedKey, new: &CertifiedKey, now: SystemTime) -> Option<String> {
    let of = |k: &CertifiedKey| validity(k.end_entity_cert().ok()?);
    let (served, new) = (of(served)?, of(new)?);
    let valid = |v: &Validity| v.not_before <= now && now < v.not_after;
    if valid(&new) || !valid(&served) {
        return None;
    }
    let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    Some(if now < new.not_before {
        format!("not valid before {}", at(new.not_before))
    } else {
        format!("expired at {}", at(new.not_after))
    })
}

/// A certificate chain and its private key, checked to belong together.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

/// The client config of a long-lived client (agentk dialing kas), built again from the CA
/// file when its size or modification time changes: a CA rotated in the mounted Secret is
/// trusted from the next connection on, without a restart. A file that does not load keeps
/// the last good config (warn) and is tried again when it changes next. Checked at each dial:
/// dials are rare (a connection lives for hours; reconnects back off).
#[derive(Debug)]
pub(crate) struct ClientTls {
    ca_file: Option<PathBuf>,
    alpn: &'static [u8],
    state: Mutex<(Arc<ClientConfig>, FileStamp)>,
}

impl ClientTls {
    pub(crate) fn load(ca_file: Option<&Path>, alpn: &'static [u8]) -> Result<Self> {
        let stamp = ca_file.and_then(file_stamp);
        let config = client_config(ca_file, alpn)?;
        Ok(Self {
            ca_file: ca_file.map(Path::to_owned),
            alpn,
            state: Mutex::new((config, stamp)),
        })
    }

    /// The config for a new connection, rebuilt first if the CA file changed.
    pub(crate) fn current(&self) -> Arc<ClientConfig> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(file) = &self.ca_file else {
            return Arc::clone(&s.0);
        };
        let now = file_stamp(file);
        if now != s.1 {
            s.1 = now;
            match client_config(Some(file), self.alpn) {
                Ok(c) => {
                    s.0 = c;
                    tracing::info!(ca_cert_file = %file.display(), "CA certificate file changed; trusting its certificates from the next connection");
                }
                Err(e) => {
                    tracing::warn!(ca_cert_file = %file.display(), error = %e, "The CA certificate file changed but does not load; still trusting the previous certificates");
                }
            }
        }
        Arc::clone(&s.0)
    }
}

/// An HTTP/1.1 client config trusting only `ca_file` when given, otherwise the system's roots
/// (for clients of kas's HTTPS listeners, such as the admin commands).
pub fn load_client_tls(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    client_config(ca_file, ALPN_HTTP11)
}

/// An HTTP/1.1 connector for `https://` (trusting only `ca_file` when given, otherwise the
/// system's roots) and plain `http://` URLs, for hyper's client.
pub fn https_connector(
    ca_file: Option<&Path>,
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>> {
    let tls = load_client_tls(ca_file)?;
    // hyper-rustls sets the ALPN protocols itself (HTTP/1.1 here).
    let mut tls = (*tls).clone();
    tls.alpn_protocols.clear();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tether_test_support::Pki;

    /// The end-entity certificate served now, after letting the recheck interval pass.
    fn served(r: &ReloadingCert) -> Vec<u8> {
        let mut s = r.state.lock().unwrap();
        s.checked = Instant::now().checked_sub(RECHECK).unwrap();
        drop(s);
        r.current().cert[0].to_vec()
    }

    fn pem_der(pki: &Pki) -> Vec<u8> {
        load_certs(&pki.cert).unwrap()[0].to_vec()
    }

    #[test]
    fn a_changed_ca_file_gives_a_new_client_config_and_a_broken_one_keeps_the_last() {
        let (a, b) = (Pki::temporary(), Pki::temporary());
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::copy(&a.ca, &ca).unwrap();
        let tls = ClientTls::load(Some(&ca), ALPN_H2).unwrap();
        let first = tls.current();
        assert!(Arc::ptr_eq(&first, &tls.current()), "unchanged file");

        std::fs::write(&ca, "not a certificate, and longer than one").unwrap();
        assert!(Arc::ptr_eq(&first, &tls.current()), "broken file");

        std::fs::copy(&b.ca, &ca).unwrap();
        let second = tls.current();
        assert!(!Arc::ptr_eq(&first, &second), "new CA");
        assert_eq!(second.alpn_protocols, [ALPN_H2.to_vec()]);
    }

    #[test]
    fn files_that_do_not_load_keep_the_last_good_certificate() {
        let (a, b) = (Pki::temporary(), Pki::temporary());
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::copy(&a.cert, &cert).unwrap();
        std::fs::copy(&a.key, &key).unwrap();
        let r = ReloadingCert::load(&cert, &key).unwrap();
        assert_eq!(served(&r), pem_der(&a));
        // A new certificate with the old key: refused, the old pair stays.
        std::fs::copy(&b.cert, &cert).unwrap();
        assert_eq!(served(&r), pem_der(&a));
        // A half-written key: still the old pair.
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        assert_eq!(served(&r), pem_der(&a));
        // The new key arrives: the new pair is served.
        std::fs::copy(&b.key, &key).unwrap();
        assert_eq!(served(&r), pem_der(&b));
    }

    /// A renewed pair that is not valid now (issued for later, or already expired) is not put
    /// in service while the one served is valid; a pair that becomes valid is served without
    /// its files changing again.
    #[test]
    fn a_pair_not_valid_now_does_not_replace_a_valid_one() {
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let good = Pki::temporary();
        let later = Pki::temporary_valid(now + day, now + 30 * day);
        let expired = Pki::temporary_valid(now - 30 * day, now - day);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let put = |pki: &Pki| {
            std::fs::copy(&pki.cert, &cert).unwrap();
            std::fs::copy(&pki.key, &key).unwrap();
        };
        put(&good);
        let r = ReloadingCert::load(&cert, &key).unwrap();
        put(&later);
        assert_eq!(served(&r), pem_der(&good), "not valid yet");
        put(&expired);
        assert_eq!(served(&r), pem_der(&good), "expired");
        put(&Pki::temporary());
        let renewed = served(&r);
        assert_ne!(renewed, pem_der(&good), "a valid renewal is served");

        let (old, new) = (r.current(), certified_key(&later.cert, &later.key).unwrap());
        assert!(held_back(&old, &new, now).is_some_and(|why| why.starts_with("not valid before")));
        assert_eq!(held_back(&old, &new, now + 2 * day), None, "valid by then");
        let gone = certified_key(&expired.cert, &expired.key).unwrap();
        assert_eq!(
            held_back(&gone, &new, now),
            None,
            "no better than an expired one"
        );
    }

    #[test]
    fn a_mismatched_pair_is_refused_at_start() {
        let (a, b) = (Pki::temporary(), Pki::temporary());
        assert!(load_server_tls(&a.cert, &b.key).is_err());
    }
}
