//! Mutual TLS for a private hop between servers of one installation (kas replicas): each end
//! presents the same kind of certificate, signed by a CA both trust, and checks the other's.
//! Built from three files, read again when they change, so a certificate or CA rotated in the
//! mounted Secret is used from the next connection on without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;

use super::{FileStamp, RECHECK, certified_key, file_stamp, load_certs, provider};
use crate::{Error, Result};

/// Where a [`MutualTls`] reads its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutualTlsFiles {
    /// This end's certificate chain (PEM), presented both as server and as client.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The CA (PEM) the other ends' certificates must chain to; nothing else is trusted.
    pub ca_file: PathBuf,
}

impl MutualTlsFiles {
    fn stamp(&self) -> [FileStamp; 3] {
        [&self.cert_file, &self.key_file, &self.ca_file].map(|f| file_stamp(f))
    }
}

/// Both sides' rustls configurations, built from [`MutualTlsFiles`].
#[derive(Debug, Clone)]
pub struct MutualConfigs {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

/// The configurations of a mutual-TLS hop, rebuilt when a file changes (checked at most once a
/// second). Files that do not load (half-written, a new certificate with the old key) keep the
/// last good configurations in service, said at warn, and are tried again when they change.
#[derive(Debug)]
pub struct MutualTls {
    files: MutualTlsFiles,
    state: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    configs: MutualConfigs,
    stamp: [FileStamp; 3],
    checked: Instant,
}

impl MutualTls {
    /// Loads the files; an error names the file that does not load.
    pub fn load(files: MutualTlsFiles) -> Result<Self> {
        let stamp = files.stamp();
        let configs = build(&files)?;
        Ok(Self {
            files,
            state: Mutex::new(Current {
                configs,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The configurations for a new connection, rebuilt first if a file changed.
    pub fn current(&self) -> MutualConfigs {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.checked.elapsed() < RECHECK {
            return s.configs.clone();
        }
        s.checked = Instant::now();
        let now = self.files.stamp();
        if now != s.stamp {
            s.stamp = now;
            let cert_file = self.files.cert_file.display();
            match build(&self.files) {
                Ok(c) => {
                    s.configs = c;
                    tracing::info!(certificate_file = %cert_file, "Mutual TLS files reloaded");
                }
                Err(e) => {
                    tracing::warn!(certificate_file = %cert_file, error = %e, "The mutual TLS files changed but do not load; still using the previous ones");
                }
            }
        }
        s.configs.clone()
    }

    /// Marks the files as due for a check at the next [`MutualTls::current`] (tests).
    #[doc(hidden)]
    pub fn recheck_now(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.checked = Instant::now().checked_sub(RECHECK).unwrap_or(s.checked);
    }
}

/// The name a client checks the other end's certificate for: `name` when configured (one name
/// every replica's certificate carries, as Pod addresses change), else the host of `address`
/// (`host:port`, IPv6 hosts in brackets).
pub fn peer_server_name(name: Option<&str>, address: &str) -> Result<ServerName<'static>> {
    let host = match name {
        Some(n) => n,
        None => address
            .rsplit_once(':')
            .map_or(address, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']'),
    };
    ServerName::try_from(host.to_owned()).map_err(|_| Error::InvalidServerName(host.to_owned()))
}

/// Checks that the certificate a client presented (already verified against the hop's CA) was
/// made for `name`, as its server certificate must be: a CA that also signs certificates of
/// other workloads (a cluster-wide issuer) must not let them in.
pub fn check_client_name(
    presented: Option<&[rustls_pki_types::CertificateDer<'_>]>,
    name: &ServerName<'_>,
) -> Result<()> {
    let end_entity = presented
        .and_then(<[_]>::first)
        .ok_or(Error::ClientVerifier("no client certificate".to_owned()))?;
    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_name(&parsed, name).map_err(|e| {
        let name = name.to_str();
        Error::ClientVerifier(format!(
            "the client certificate is not made for {name:?}: {e}"
        ))
    })
}

fn roots(ca_file: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

fn build(files: &MutualTlsFiles) -> Result<MutualConfigs> {
    let key = Arc::new(certified_key(&files.cert_file, &files.key_file)?);
    let roots = roots(&files.ca_file)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
        .build()
        .map_err(|e| Error::ClientVerifier(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(Arc::clone(&key))));
    // No session tickets: a connection kept open ahead of need is judged closed by peeking at
    // its socket (end of stream), and tickets left unread there would make a closed one look
    // open. Connections are opened ahead of need, so resumption would save nothing anyway.
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Fixed(key)));
    client.resumption = rustls::client::Resumption::disabled();
    Ok(MutualConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// One certificate, served as server and presented as client.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use tether_test_support::Pki;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn files(pki: &Pki) -> MutualTlsFiles {
        MutualTlsFiles {
            cert_file: pki.cert.clone(),
            key_file: pki.key.clone(),
            ca_file: pki.ca.clone(),
        }
    }

    /// A client with `client`'s configs talks to a server with `server`'s over a pipe: whether
    /// a byte crossed.
    async fn talk(server: &MutualConfigs, client: &MutualConfigs) -> bool {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&server.server));
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client.client));
        let name = peer_server_name(Some("localhost"), "10.0.0.1:8155").unwrap();
        let serve = async move {
            let mut s = acceptor.accept(a).await.ok()?;
            s.write_all(b"x").await.ok()?;
            s.flush().await.ok()
        };
        let dial = async move {
            let mut c = connector.connect(name, b).await.ok()?;
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.ok()?;
            Some(byte == *b"x")
        };
        let (_, read) = tokio::join!(serve, dial);
        read == Some(true)
    }

    #[tokio::test]
    async fn ends_with_certificates_of_the_same_ca_talk_and_others_are_refused_both_ways() {
        let ours = MutualTls::load(files(&Pki::temporary())).unwrap().current();
        let stranger = MutualTls::load(files(&Pki::temporary())).unwrap().current();
        assert!(talk(&ours, &ours).await);
        assert!(!talk(&ours, &stranger).await, "a client of another CA");
        assert!(!talk(&stranger, &ours).await, "a server of another CA");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let pki = Pki::temporary();
        let ours = MutualTls::load(files(&pki)).unwrap().current();
        let anonymous = super::super::client_config(Some(&pki.ca), b"x").unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(ours.server);
        let connector = tokio_rustls::TlsConnector::from(anonymous);
        let name = peer_server_name(Some("localhost"), "").unwrap();
        let serve = async move { acceptor.accept(a).await.is_ok() };
        let dial = async move {
            let mut c = connector.connect(name, b).await.ok()?;
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.ok()
        };
        let (accepted, read) = tokio::join!(serve, dial);
        assert!(!accepted);
        assert!(read.is_none());
    }

    #[tokio::test]
    async fn rotated_files_are_used_from_the_next_connection_and_broken_ones_are_not() {
        let (old, new) = (Pki::temporary(), Pki::temporary());
        let tls = MutualTls::load(files(&old)).unwrap();
        let renewed = MutualTls::load(files(&new)).unwrap().current();
        assert!(!talk(&tls.current(), &renewed).await);
        for (from, to) in [
            (&new.cert, &old.cert),
            (&new.key, &old.key),
            (&new.ca, &old.ca),
        ] {
            std::fs::copy(from, to).unwrap();
        }
        tls.recheck_now();
        assert!(talk(&tls.current(), &renewed).await, "rotated files in use");
        std::fs::write(&old.key, "half-written").unwrap();
        tls.recheck_now();
        assert!(talk(&tls.current(), &renewed).await, "last good files kept");
    }

    #[test]
    fn a_client_certificate_must_be_made_for_the_hops_name() {
        let pki = Pki::temporary();
        let pem = std::fs::read(&pki.cert).unwrap();
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        let name = |n| peer_server_name(Some(n), "").unwrap();
        assert!(check_client_name(Some(&certs), &name("localhost")).is_ok());
        let e = check_client_name(Some(&certs), &name("kas-peers")).unwrap_err();
        assert!(e.to_string().contains("not made for \"kas-peers\""), "{e}");
        assert!(check_client_name(None, &name("localhost")).is_err());
    }

    #[test]
    fn the_server_name_is_the_configured_one_else_the_addresss_host() {
        let name = |n, a| peer_server_name(n, a).map(|s| s.to_str().into_owned());
        assert_eq!(
            name(Some("kas-peers"), "10.1.2.3:8155").unwrap(),
            "kas-peers"
        );
        assert_eq!(name(None, "10.1.2.3:8155").unwrap(), "10.1.2.3");
        assert_eq!(name(None, "[fd00::1]:8155").unwrap(), "fd00::1");
        assert_eq!(name(None, "kas-0.kas:8155").unwrap(), "kas-0.kas");
        assert!(name(Some("bad name!"), "x:1").is_err());
    }
}
