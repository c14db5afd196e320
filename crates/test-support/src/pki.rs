//! A throwaway certificate authority and a server certificate for `localhost` and 127.0.0.1.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// PEM files: the CA certificate, and the server certificate and key it signed.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set by [`Pki::temporary`]: the files live as long as the `Pki`.
    _dir: Option<tempfile::TempDir>,
}

impl Pki {
    /// Writes `ca.pem`, `server.pem` and `server-key.pem` into `dir`.
    pub fn generate(dir: &Path) -> Pki {
        Self::generate_valid(dir, None)
    }

    /// Like [`Pki::temporary`], with a server certificate valid from `not_before` to
    /// `not_after` (e.g. already expired, or expiring in an hour).
    pub fn temporary_valid(not_before: SystemTime, not_after: SystemTime) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pki = Pki::generate_valid(dir.path(), Some((not_before, not_after)));
        pki._dir = Some(dir);
        pki
    }

    fn generate_valid(dir: &Path, validity: Option<(SystemTime, SystemTime)>) -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        if let Some((not_before, not_after)) = validity {
            params.not_before = not_before.into();
            params.not_after = not_after.into();
        }
        let cert = params.signed_by(&key, &issuer).expect("server certificate");

        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            _dir: None,
        };
        std::fs::write(&pki.ca, ca_cert.pem()).expect("write CA");
        std::fs::write(&pki.cert, cert.pem()).expect("write certificate");
        std::fs::write(&pki.key, key.serialize_pem()).expect("write key");
        pki
    }

    /// Like [`Pki::generate`], in a temporary directory removed with the `Pki`.
    pub fn temporary() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pki = Pki::generate(dir.path());
        pki._dir = Some(dir);
        pki
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_are_pem_and_removed_with_the_pki() {
        let pki = Pki::temporary();
        for path in [&pki.ca, &pki.cert, &pki.key] {
            let pem = std::fs::read_to_string(path).expect("read");
            assert!(pem.starts_with("-----BEGIN "), "{}", path.display());
        }
        let ca = pki.ca.clone();
        drop(pki);
        assert!(!ca.exists());
    }
}
