//! What every section needs: the control plane, the release binaries, an agent identity with
//! cluster-admin, kas's TLS material, and starting kas and agentk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tether_kas_api::AdminClient;
use tether_testenv::TestEnv;
use tether_testenv::pki::Pki;

use crate::util::{Proc, free_port, spawn};

/// Shared by all sections.
pub struct Ctx {
    pub env: TestEnv,
    pub kas_bin: PathBuf,
    pub agentk_bin: PathBuf,
    /// Scratch folder of this run.
    pub work: PathBuf,
    /// Throwaway PKI for kas's listeners.
    pub pki: Pki,
    /// JWKS file trusted by kas for CI job ID tokens.
    pub jwks: PathBuf,
    /// Kubeconfig of the `bench` ServiceAccount (cluster-admin), used by every agentk.
    pub agent_kubeconfig: PathBuf,
    /// Its bearer token, for the direct path.
    pub sa_token: String,
    /// Namespace of the ServiceAccount and of the tunnel section's objects.
    pub ns: String,
}

pub struct KasOptions<'a> {
    /// TLS on the agent listener (for `wss://`).
    pub agent_tls: bool,
    pub git_poll: &'a str,
    pub log_level: &'a str,
}

/// A running kas (release binary) with free loopback ports and its own data folder.
pub struct Kas {
    pub proc: Proc,
    pub admin: AdminClient,
    pub dir: PathBuf,
    pub agent_port: u16,
    pub api_port: u16,
    pub k8s_port: u16,
}

impl Kas {
    pub async fn start(ctx: &Ctx, name: &str, o: &KasOptions<'_>) -> Result<Kas> {
        Self::start_with_yaml(ctx, name, o, "").await
    }

    /// [`Kas::start`] with `extra` (top-level YAML, e.g. `rate_limits:`) appended to the
    /// configuration.
    pub async fn start_with_yaml(
        ctx: &Ctx,
        name: &str,
        o: &KasOptions<'_>,
        extra: &str,
    ) -> Result<Kas> {
        let ports = KasPorts {
            agent: free_port()?,
            api: free_port()?,
            k8s: free_port()?,
            obs: free_port()?,
        };
        let dir = ctx.work.join(name);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("kas.yaml");
        std::fs::write(&cfg, kas_yaml(ctx, &dir, o, &ports, extra))?;
        let proc = spawn(
            &ctx.kas_bin,
            &["--configuration-file".into(), cfg.display().to_string()],
            &dir.join("kas.log"),
        )?;
        let admin = wait_for_admin(&dir, ports.api).await?;
        let (agent_port, api_port, k8s_port) = (ports.agent, ports.api, ports.k8s);
        Ok(Kas {
            proc,
            admin,
            dir,
            agent_port,
            api_port,
            k8s_port,
        })
    }

    /// Adds project `path` mirrored from the Git repository at `repo`, with a push-webhook
    /// secret when given; returns kas's id of the project.
    pub async fn add_project(
        &self,
        path: &str,
        repo: &std::path::Path,
        webhook_secret: Option<&std::path::Path>,
    ) -> Result<i64> {
        Ok(self
            .admin
            .set_project(&tether_kas_api::ProjectRequest {
                path: path.into(),
                remote: Some(repo.display().to_string()),
                webhook_secret_file: webhook_secret.map(|f| f.display().to_string()),
                ..Default::default()
            })
            .await?
            .id)
    }

    /// Registers agent `name` in `project`; writes its token next to kas's data; returns the
    /// agent's id and the token file.
    pub async fn register(&self, project: &str, name: &str) -> Result<(i64, PathBuf)> {
        let t = self.admin.register_agent(project, name).await?;
        let token_path = self.dir.join(format!("{name}.token"));
        std::fs::write(&token_path, &t.token)?;
        Ok((t.agent_id, token_path))
    }

    /// Waits until agent `id` is connected and has received a configuration.
    pub async fn wait_configured(&self, id: i64) -> Result<()> {
        crate::util::wait_until(
            "the agent's configuration",
            Duration::from_secs(120),
            || async move {
                self.admin
                    .list_agents()
                    .await
                    .ok()
                    .and_then(|v| v.into_iter().find(|a| a.id == id))
                    .is_some_and(|a| a.connected && a.config.is_some_and(|c| !c.commit.is_empty()))
            },
        )
        .await
        .with_context(|| format!("see {}", self.dir.display()))
    }
}

/// agentk's command line: `address`, the token file, the bench kubeconfig, a free metrics
/// port, then `extra`.
pub fn agentk_args(ctx: &Ctx, address: &str, token: &Path, extra: &[&str]) -> Result<Vec<String>> {
    let mut args = vec![
        "--kas-address".to_string(),
        address.to_string(),
        "--token-file".into(),
        token.display().to_string(),
        "--kubeconfig".into(),
        ctx.agent_kubeconfig.display().to_string(),
        "--observability-listen-address".into(),
        format!("127.0.0.1:{}", free_port()?),
        // The leader Lease goes where the ServiceAccount may write.
        "--leader-election-namespace".into(),
        ctx.ns.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(args)
}

/// The loopback ports of one kas.
struct KasPorts {
    agent: u16,
    api: u16,
    k8s: u16,
    obs: u16,
}

/// kas's configuration for a benchmark run; `extra` is appended as top-level YAML.
fn kas_yaml(ctx: &Ctx, dir: &Path, o: &KasOptions<'_>, ports: &KasPorts, extra: &str) -> String {
    let pki = &ctx.pki;
    let tls = if o.agent_tls {
        format!(
            "    certificate_file: {}\n    key_file: {}\n",
            pki.serving_cert.display(),
            pki.serving_key.display()
        )
    } else {
        String::new()
    };
    format!(
        concat!(
            "data_dir: {data}\n",
            // Every benchmark client is on loopback: the per-address caps, meant
            // for the internet, would refuse the high-concurrency runs.
            "agent:\n  listen:\n    address: 127.0.0.1:{agent_port}\n{tls}",
            "    max_connections: 30000\n    max_connections_per_address: 30000\n",
            "api:\n  listen:\n    address: 127.0.0.1:{api_port}\n",
            "    max_connections: 30000\n    max_connections_per_address: 30000\n",
            "git:\n  poll_interval: {poll}\n",
            "kubernetes_api:\n  listen:\n    address: 127.0.0.1:{k8s_port}\n",
            "    max_connections: 30000\n    max_connections_per_address: 30000\n",
            "    certificate_file: {cert}\n    key_file: {key}\n",
            "  ci_issuers:\n  - issuer: https://bench.local\n    audience: kas\n",
            "    jwks:\n      file: {jwks}\n",
            "observability:\n  listen:\n    address: 127.0.0.1:{obs_port}\n",
            "  logging:\n    level: {level}\n",
            "{extra}",
        ),
        extra = extra,
        agent_port = ports.agent,
        tls = tls,
        api_port = ports.api,
        poll = o.git_poll,
        k8s_port = ports.k8s,
        obs_port = ports.obs,
        level = o.log_level,
        data = dir.join("data").display(),
        cert = pki.serving_cert.display(),
        key = pki.serving_key.display(),
        jwks = ctx.jwks.display(),
    )
}

/// The admin client of the kas in `dir` once its internal API answers (up to 60 s).
async fn wait_for_admin(dir: &Path, api_port: u16) -> Result<AdminClient> {
    let api = format!("http://127.0.0.1:{api_port}");
    let token_file = dir.join("data/admin-token");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = AdminClient::from_token_file(&api, &token_file)
            && c.stats().await.is_ok()
        {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("kas did not start; see {}", dir.join("kas.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
