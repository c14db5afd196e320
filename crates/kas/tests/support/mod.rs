//! Real kas and agentk processes on 127.0.0.1 for end-to-end tests.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kas::api::AgentView;
use tether_kas_api::AdminClient;

pub use tether_test_support::{GitDaemon, GitRepo, Pki};

pub mod browser;
pub mod gitops;
pub mod monitoring;
pub mod oidc;
pub mod source;
pub mod upgrade;

/// A port for a kas or agentk child process; see [`tether_test_support::unused_port`] for the
/// race, which [`Kas::start`] handles by retrying.
pub fn free_port() -> u16 {
    tether_test_support::unused_port()
}

/// Polls `probe` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kas"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn agentk_bin() -> PathBuf {
    let p = target_dir().join("agentk");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

pub struct KasOptions {
    pub tls: Option<(PathBuf, PathBuf)>,
    pub tunnel_wait: &'static str,
    pub token_recheck: &'static str,
    pub git_poll: &'static str,
    /// YAML lines appended under `agent:` (indented by two spaces), e.g.
    /// `  authentication_timeout: 2s\n`.
    pub agent_extra: &'static str,
    /// YAML lines appended under `git:` (indented by two spaces), e.g. `  fetch_timeout: 3s\n`.
    pub git_extra: &'static str,
    /// YAML lines appended under `kubernetes_api:` (indented by two spaces).
    pub kubernetes_api_extra: String,
    /// TLS for the Kubernetes API proxy listener.
    pub k8s_tls: Option<(PathBuf, PathBuf)>,
    /// YAML lines appended under each listener's `listen:` (indented by four spaces), e.g.
    /// limits such as `    header_timeout: 1s\n`.
    pub agent_listen_extra: String,
    pub k8s_listen_extra: String,
    pub api_listen_extra: String,
    pub observability_listen_extra: String,
    pub webhooks_listen_extra: String,
    /// Webhooks on their own listener (`webhooks.listen`); otherwise on the internal API.
    pub webhooks_listener: bool,
    /// TLS for the webhook listener.
    pub webhooks_tls: Option<(PathBuf, PathBuf)>,
    /// TLS for the internal API: certificate, key and the CA the admin client trusts.
    pub api_tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Top-level YAML appended to the configuration (e.g. a `rate_limits:` section).
    /// [`WEB_PORT`] in it becomes a fresh port at each start attempt ([`Kas::web_port`]).
    pub extra_yaml: String,
    /// Environment variables of the process (e.g. [`faketime`]'s, to run it on another clock).
    pub env: Vec<(String, String)>,
}

/// The environment that runs a process with its wall clock `offset` away (libfaketime, e.g.
/// `+6m`; its monotonic clock untouched, as after an NTP step). scripts/setup installs it.
pub fn faketime(offset: &str) -> Vec<(String, String)> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| PathBuf::from(d).join("faketime/libfaketime.so.1"))
    .find(|p| p.exists())
    .expect("libfaketime (the faketime package; scripts/setup installs it)");
    [
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec()
}

/// Stands for the web UI's port in [`KasOptions::extra_yaml`].
pub const WEB_PORT: &str = "{web_port}";

impl Default for KasOptions {
    fn default() -> Self {
        Self {
            tls: None,
            tunnel_wait: "5s",
            token_recheck: "1m",
            git_poll: "20s",
            git_extra: "",
            agent_extra: "",
            kubernetes_api_extra: String::new(),
            k8s_tls: None,
            agent_listen_extra: String::new(),
            k8s_listen_extra: String::new(),
            api_listen_extra: String::new(),
            observability_listen_extra: String::new(),
            webhooks_listen_extra: String::new(),
            webhooks_listener: true,
            webhooks_tls: None,
            api_tls: None,
            extra_yaml: String::new(),
            env: Vec::new(),
        }
    }
}

/// A kas process with its own data directory and ports.
pub struct Kas {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub agent_port: u16,
    pub api_port: u16,
    pub k8s_port: u16,
    /// The webhook listener's port (the internal API's when webhooks share it).
    pub webhook_port: u16,
    /// The port [`WEB_PORT`] stood for (unused unless the configuration has a web UI).
    pub web_port: u16,
    pub obs_port: u16,
    /// The internal API's base URL (https://localhost:… with TLS).
    pub api_url: String,
    /// CA the admin client trusts when the internal API has TLS.
    pub api_ca: Option<PathBuf>,
    pub admin: AdminClient,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

impl Kas {
    pub async fn start(dir: &Path, opts: KasOptions) -> Kas {
        std::fs::create_dir_all(dir).unwrap();
        // A "free" port can be taken by a parallel test before kas binds it; then kas exits
        // and we try again with new ports.
        for _ in 0..5 {
            if let Some(kas) = Self::try_start(dir, &opts).await {
                return kas;
            }
        }
        panic!(
            "kas did not start; log:\n{}",
            std::fs::read_to_string(dir.join("kas.log")).unwrap_or_default()
        );
    }

    async fn try_start(dir: &Path, opts: &KasOptions) -> Option<Kas> {
        let (agent_port, api_port, obs_port, k8s_port) =
            (free_port(), free_port(), free_port(), free_port());
        let webhook_port = if opts.webhooks_listener {
            free_port()
        } else {
            api_port
        };
        let web_port = free_port();
        let config = dir.join("kas.yaml");
        let yaml = config_yaml(
            dir,
            opts,
            [agent_port, api_port, obs_port, k8s_port, webhook_port],
        );
        std::fs::write(&config, yaml.replace(WEB_PORT, &web_port.to_string())).unwrap();
        let scheme = if opts.api_tls.is_some() {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        let api_url = format!("{scheme}:{api_port}");
        let mut kas = Kas {
            dir: dir.to_path_buf(),
            config,
            agent_port,
            api_port,
            k8s_port,
            webhook_port,
            web_port,
            obs_port,
            admin: AdminClient::new(&api_url, "unset"),
            api_url,
            api_ca: opts.api_tls.as_ref().map(|(_, _, ca)| ca.clone()),
            child: None,
            env: opts.env.clone(),
        };
        kas.spawn().await.then_some(kas)
    }

    /// Starts the process; false if it exited before its API answered (e.g. a port clash).
    async fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kas.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kas"))
            .arg("--configuration-file")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let token_file = self.dir.join("data/admin-token");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = AdminClient::from_token_file(&self.api_url, &token_file)
                && let Ok(c) = c.trusting(self.api_ca.as_deref())
                && c.stats().await.is_ok()
                // Bound last of kas's listeners: once it answers, a port lost to another
                // process on any listener would have stopped kas (and been retried) already.
                && self.observability_get("/liveness").await.is_some()
            {
                self.admin = c;
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for kas's internal API"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9, without a restart (a replica that died).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts kas again after [`Kas::kill9`] or [`Kas::stop`], on the same data and ports;
    /// returns when its API answers.
    pub async fn start_again(&mut self) {
        assert!(
            self.spawn().await,
            "kas did not start again:\n{}",
            self.log()
        );
    }

    /// SIGTERM, without waiting ([`Kas::stop`] then waits for the exit).
    pub fn sigterm(&self) {
        let pid = self.pid().expect("kas is running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the process is still running (it may have been told to stop).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let status = c.wait().unwrap();
            assert!(status.success(), "kas exited with {status}");
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        assert!(self.spawn().await, "kas did not restart:\n{}", self.log());
    }

    /// Points each project `path` at the repository `repo`.
    pub async fn set_projects(&self, projects: &[(&str, &GitRepo)]) {
        for (path, repo) in projects {
            self.admin
                .set_project(&kas::api::ProjectRequest {
                    path: (*path).into(),
                    remote: Some(repo.dir.display().to_string()),
                    ..kas::api::ProjectRequest::default()
                })
                .await
                .unwrap();
        }
    }

    /// The running process's id.
    /// The `kas` command line (admin commands) aimed at this kas by its configuration file.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kas"));
        c.arg("--configuration-file").arg(&self.config);
        c
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory (bytes) and open file descriptors of the running process.
    pub fn footprint(&self) -> (u64, usize) {
        let pid = self.pid().expect("kas is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        (rss_kib * 1024, fds)
    }

    /// kill -9 (no shutdown at all), then start again on the same data and ports.
    pub async fn kill9_restart(&mut self) {
        self.kill9();
        assert!(self.spawn().await, "kas did not restart:\n{}", self.log());
    }

    /// Restarts kas by SIGTERM (`kill9: false`) or kill -9; returns when its API answers.
    pub async fn restart_by(&mut self, kill9: bool) {
        if kill9 {
            self.kill9_restart().await;
        } else {
            self.restart().await;
        }
    }

    pub fn url(&self, scheme: &str) -> String {
        let host = if scheme.ends_with('s') {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{}", self.agent_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kas.log")).unwrap_or_default()
    }

    /// Log lines as JSON objects.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// POSTs a streaming body to the agent's echo service; the response streams back.
    pub async fn echo_streaming<B>(
        &self,
        agent_id: i64,
        body: B,
    ) -> http::Response<hyper::body::Incoming>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let client: hyper_util::client::legacy::Client<_, B> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let token = std::fs::read_to_string(self.dir.join("data/admin-token")).unwrap();
        let req = http::Request::post(format!(
            "http://127.0.0.1:{}/api/v1/agents/{agent_id}/echo",
            self.api_port
        ))
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(body)
        .unwrap();
        client.request(req).await.unwrap()
    }

    pub async fn agent(&self, id: i64) -> AgentView {
        self.admin
            .list_agents()
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.id == id)
            .expect("agent listed")
    }

    pub async fn wait_connected(&self, id: i64) -> AgentView {
        wait_for(
            &format!("agent {id} to connect"),
            Duration::from_secs(30),
            || async {
                let a = self.agent(id).await;
                (a.connected && a.idle_tunnels > 0).then_some(a)
            },
        )
        .await
    }

    pub async fn wait_disconnected(&self, id: i64) {
        wait_for(
            &format!("agent {id} to disconnect"),
            Duration::from_secs(30),
            || async { (!self.agent(id).await.connected).then_some(()) },
        )
        .await;
    }
}

/// `    certificate_file: …\n    key_file: …\n` for a `listen:` section.
fn tls_yaml(tls: Option<(&PathBuf, &PathBuf)>) -> String {
    tls.map(|(c, k)| {
        format!(
            "    certificate_file: {}\n    key_file: {}\n",
            c.display(),
            k.display()
        )
    })
    .unwrap_or_default()
}

/// kas's configuration file for a test; `ports` are agent, api, observability, Kubernetes
/// API proxy and webhooks.
fn config_yaml(dir: &Path, opts: &KasOptions, ports: [u16; 5]) -> String {
    let [agent_port, api_port, obs_port, k8s_port, webhook_port] = ports;
    let tls = tls_yaml(opts.tls.as_ref().map(|(c, k)| (c, k)));
    let k8s_tls = tls_yaml(opts.k8s_tls.as_ref().map(|(c, k)| (c, k)));
    let api_tls = tls_yaml(opts.api_tls.as_ref().map(|(c, k, _)| (c, k)));
    let api_ca = opts
        .api_tls
        .as_ref()
        .map(|(_, _, ca)| format!("  ca_file: {}\n", ca.display()))
        .unwrap_or_default();
    let webhooks = if opts.webhooks_listener {
        format!(
            "webhooks:\n  listen:\n    address: 127.0.0.1:{webhook_port}\n{}{}",
            tls_yaml(opts.webhooks_tls.as_ref().map(|(c, k)| (c, k))),
            opts.webhooks_listen_extra
        )
    } else {
        String::new()
    };
    format!(
        "data_dir: {data}\nagent:\n  listen:\n    address: 127.0.0.1:{agent_port}\n{tls}{agent_extra}  tunnel_wait_timeout: {wait}\n  token_recheck_interval: {recheck}\n{agent_section_extra}\
api:\n  listen:\n    address: 127.0.0.1:{api_port}\n{api_tls}{api_extra}{api_ca}git:\n  poll_interval: {poll}\n{git_extra}kubernetes_api:\n  listen:\n    address: 127.0.0.1:{k8s_port}\n{k8s_tls}{k8s_listen_extra}{k8s_extra}observability:\n  listen:\n    address: 127.0.0.1:{obs_port}\n{obs_extra}{webhooks}{extra}",
        extra = opts.extra_yaml,
        data = dir.join("data").display(),
        wait = opts.tunnel_wait,
        recheck = opts.token_recheck,
        poll = opts.git_poll,
        git_extra = opts.git_extra,
        obs_extra = opts.observability_listen_extra,
        agent_section_extra = opts.agent_extra,
        agent_extra = opts.agent_listen_extra,
        api_extra = opts.api_listen_extra,
        k8s_listen_extra = opts.k8s_listen_extra,
        k8s_extra = &opts.kubernetes_api_extra,
    )
}

/// The last lines of a log, for failure messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Kas {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- kas log ({}):\n{}",
                self.dir.display(),
                tail(&self.log(), 40)
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An agentk process.
pub struct Agent {
    pub log_path: PathBuf,
    pub obs_port: u16,
    child: Option<Child>,
}

impl Agent {
    pub fn start(dir: &Path, name: &str, kas_url: &str, token: &str, ca: Option<&Path>) -> Agent {
        Self::start_with(dir, name, kas_url, token, ca, &[])
    }

    pub fn start_with(
        dir: &Path,
        name: &str,
        kas_url: &str,
        token: &str,
        ca: Option<&Path>,
        extra: &[&str],
    ) -> Agent {
        Self::start_env(dir, name, kas_url, token, (ca, extra), &[])
    }

    /// [`Agent::start_with`] with environment variables (e.g. [`faketime`]'s).
    pub fn start_env(
        dir: &Path,
        name: &str,
        kas_url: &str,
        token: &str,
        (ca, extra): (Option<&Path>, &[&str]),
        env: &[(String, String)],
    ) -> Agent {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let obs_port = free_port();
        let mut cmd = Command::new(agentk_bin());
        cmd.arg("--kas-address")
            .arg(kas_url)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--observability-listen-address")
            .arg(format!("127.0.0.1:{obs_port}"))
            .args(extra)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "gitlab-agent")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(ca) = ca {
            cmd.arg("--ca-cert-file").arg(ca);
        }
        Agent {
            log_path,
            obs_port,
            child: Some(cmd.spawn().unwrap()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Log lines as JSON objects.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        self.sigterm();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (Kubernetes stopping the Pod) without waiting for agentk to exit.
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    /// Whether agentk has exited (its status is then collected).
    pub fn exited(&mut self) -> bool {
        let done = self
            .child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some());
        if done {
            self.child = None;
        }
        done
    }

    /// GET on the agent's observability endpoint; returns the status code.
    pub async fn probe(&self, path: &str) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.obs_port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        sample(&self.metrics_text().await?, name)
    }

    /// The body of agentk's `/metrics` (Prometheus text format).
    pub async fn metrics_text(&self) -> Option<String> {
        http10_get(self.obs_port, "/metrics").await
    }
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The body of a GET over HTTP/1.0 (so the server neither chunks nor keeps the connection).
async fn http10_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agentk log ({}):\n{}",
                self.log_path.display(),
                tail(&self.log(), 30)
            );
        }
        self.kill9();
    }
}

impl Kas {
    /// POSTs a webhook for a project with the given headers to the webhook listener (or the
    /// internal API when webhooks share it); returns the HTTP status.
    pub async fn webhook(&self, project_id: i64, headers: &[(&str, String)], body: &[u8]) -> u16 {
        use http_body_util::Full;
        let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut req = http::Request::post(format!(
            "http://127.0.0.1:{}/webhooks/projects/{project_id}",
            self.webhook_port
        ));
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let resp = client
            .request(
                req.body(Full::new(bytes::Bytes::copy_from_slice(body)))
                    .unwrap(),
            )
            .await
            .unwrap();
        resp.status().as_u16()
    }
}

impl Kas {
    /// A sample of kas's `/metrics`: the value of the line starting with `series` (name and
    /// labels exactly as kas prints them), or `None` if there is no such line yet.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.metrics_text().await?, series)
    }

    /// The body of kas's `/metrics` (Prometheus text format).
    pub async fn metrics_text(&self) -> Option<String> {
        http10_get(self.obs_port, "/metrics").await
    }
}

impl Kas {
    /// The whole HTTP response (status line, headers, body) to a GET of `path` on kas's
    /// observability endpoint, or `None` if it does not answer.
    /// The status of `/readiness`, or `None` if the endpoint does not answer.
    pub async fn readiness(&self) -> Option<u16> {
        let response = self.observability_get("/readiness").await?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    pub async fn observability_get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.obs_port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    }
}

impl Agent {
    /// Waits for a JSON log line with this `msg` and `commit_id`; returns it.
    pub async fn wait_log(&self, msg: &str, commit: &str) -> serde_json::Value {
        wait_for(
            &format!("agent log {msg:?} for {commit}"),
            Duration::from_secs(30),
            || async move {
                self.log_lines()
                    .into_iter()
                    .find(|l| l["msg"] == msg && l["commit_id"] == commit)
            },
        )
        .await
    }
}

impl Agent {
    /// Waits for a JSON log line matching `pred`; returns it.
    pub async fn wait_line(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let pred = &pred;
        wait_for(what, Duration::from_secs(120), || async move {
            self.log_lines().into_iter().find(|l| pred(l))
        })
        .await
    }
}

/// Opens the configuration stream as the agent with `token`, saying what it has in force and
/// what it refused.
pub async fn config_stream(
    kas: &Kas,
    token: &str,
    said: (&str, &str, &str),
) -> tonic::Streaming<tether_protocol::agent_configuration::ConfigurationResponse> {
    config_stream_from(kas, token, "", said).await
}

/// As [`config_stream`], from the agent replica in Pod `pod`.
pub async fn config_stream_from(
    kas: &Kas,
    token: &str,
    pod: &str,
    (in_force, refused, why): (&str, &str, &str),
) -> tonic::Streaming<tether_protocol::agent_configuration::ConfigurationResponse> {
    use tether_protocol::agent_configuration::ConfigurationRequest;
    use tether_protocol::agent_configuration::agent_configuration_client::AgentConfigurationClient;
    let address = tether_transport::KasAddress::parse(&kas.url("grpc")).unwrap();
    let channel = tether_transport::connect_lazy(&address, &Default::default()).unwrap();
    let mut req = tonic::Request::new(ConfigurationRequest {
        commit_id: in_force.into(),
        refused_commit_id: refused.into(),
        refusal: why.into(),
    });
    req.metadata_mut().insert(
        tether_protocol::metadata::AUTHORIZATION,
        tether_protocol::metadata::bearer(token).unwrap(),
    );
    req.metadata_mut()
        .insert(tether_protocol::metadata::POD_NAME, pod.parse().unwrap());
    AgentConfigurationClient::new(channel)
        .get_configuration(req)
        .await
        .unwrap()
        .into_inner()
}
