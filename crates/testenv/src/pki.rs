//! Certificates and keys for a local control plane, made with the `openssl` CLI.
//!
//! Everything is EC P-256: quick to generate and accepted by every component, including as the
//! service-account signing key (ES256).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, io_err, run_output};

/// Paths of the generated material.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// Service-account token signing key (private) and its public half.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

fn openssl(dir: &Path) -> Command {
    let mut c = Command::new("openssl");
    c.current_dir(dir);
    c
}

fn ec_key(dir: &Path, name: &str) -> Result<()> {
    run_output(openssl(dir).args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        name,
    ]))?;
    Ok(())
}

/// Issues a certificate signed by the CA in `dir`.
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    ec_key(dir, &format!("{name}.key"))?;
    run_output(openssl(dir).args([
        "req",
        "-new",
        "-key",
        &format!("{name}.key"),
        "-subj",
        subject,
        "-out",
        &format!("{name}.csr"),
    ]))?;
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext).map_err(io_err("writing extension file"))?;
    run_output(openssl(dir).args([
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        &ext_file,
        "-out",
        &format!("{name}.crt"),
    ]))?;
    Ok(())
}

/// Generates a CA, the apiserver's serving certificate, an admin client certificate and the
/// service-account key pair in `dir`.
pub fn generate(dir: &Path) -> Result<Pki> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    ec_key(dir, "ca.key")?;
    run_output(openssl(dir).args([
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=tether-testenv-ca",
        "-days",
        "30",
        "-sha256",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        "-out",
        "ca.crt",
    ]))?;
    issue(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
extendedKeyUsage=serverAuth\n\
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.0.0.1\n",
    )?;
    issue(
        dir,
        "admin",
        "/O=system:masters/CN=tether-admin",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
extendedKeyUsage=clientAuth\n",
    )?;
    ec_key(dir, "sa.key")?;
    run_output(openssl(dir).args(["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]))?;
    Ok(Pki {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    })
}
