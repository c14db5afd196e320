//! Helpers shared by the sections: child processes, ports, Git, HTTP clients, polling.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tether_testenv::run_output;

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A loopback port for a kas or agentk child process, which takes a fixed address. The port is
/// released before the child binds it, so another process could take it in between; the
/// benchmark runs alone on the machine, and a clash makes the child exit and the run fail loudly.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A TLS client configuration trusting only the CAs in `ca_pem`.
pub fn tls_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
        ca_pem,
    ) {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tls)
}

/// An HTTPS client (HTTP/1.1, pooled) trusting only the CAs in `ca_pem`.
pub fn https_client(ca_pem: &[u8]) -> Result<HttpsClient> {
    https_client_for(ca_pem)
}

/// [`https_client`] for requests with bodies of type `B`.
pub fn https_client_for<B>(
    ca_pem: &[u8],
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, B>>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
{
    let tls = tls_trusting(ca_pem)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(https))
}

/// Sends `req`; the body, or an error naming `what` with the status and the body when the
/// status is not 2xx.
pub async fn body_of<C, B>(c: &Client<C, B>, req: http::Request<B>, what: &str) -> Result<Bytes>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let resp = c.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{what}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// GET `url`; the body (see [`body_of`]).
async fn get_bytes(c: &HttpsClient, url: &str, auth: &str) -> Result<Bytes> {
    let req = http::Request::get(url)
        .header(http::header::AUTHORIZATION, auth)
        .body(Empty::new())?;
    body_of(c, req, url).await
}

/// GET `url`; the body's size (see [`get_bytes`]).
pub async fn get(c: &HttpsClient, url: &str, auth: &str) -> Result<usize> {
    Ok(get_bytes(c, url, auth).await?.len())
}

/// GET `url`; the body as text (see [`get_bytes`]).
pub async fn get_text(c: &HttpsClient, url: &str, auth: &str) -> Result<String> {
    Ok(String::from_utf8(get_bytes(c, url, auth).await?.to_vec())?)
}

/// A child process (kas or agentk) started through `setpriv --pdeathsig KILL`, so it dies with
/// the benchmark. `setpriv` execs the program, so [`Proc::pid`] is the program's own pid.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            run_output(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// Starts `bin` with `args`, stdout and stderr into `log` (truncated).
pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    let child = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc { child: Some(child) })
}

/// Polls `probe` every 100 ms until it is true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !probe().await {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs `git -C dir ARGS` as a fixed author; returns stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = run_output(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@example.com",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args),
    )?;
    Ok(String::from_utf8(out)?.trim().to_string())
}

/// Creates a repository in `dir` (branch `main`) from the files already there; returns the
/// commit.
pub fn git_init_commit(dir: &Path, message: &str) -> Result<String> {
    git(dir, &["init", "-q", "-b", "main"])?;
    git_commit_all(dir, message)
}

/// Commits everything in `dir`; returns the new commit.
pub fn git_commit_all(dir: &Path, message: &str) -> Result<String> {
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-qm", message])?;
    git(dir, &["rev-parse", "HEAD"])
}

/// The program a process runs, from `/proc/<pid>/exe`.
pub fn exe_of(pid: u32) -> Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))
}

/// Fails unless `pid` runs `bin` (so `setpriv` has exec'd it, and /proc numbers are the
/// program's own).
pub async fn check_runs(pid: u32, bin: &Path) -> Result<()> {
    let want = std::fs::canonicalize(bin)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exe = exe_of(pid)?;
        if exe == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "pid {pid} runs {} instead of {}",
                exe.display(),
                want.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
