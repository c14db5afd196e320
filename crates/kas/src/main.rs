//! kas, the agent server.
//!
//! `kas [--configuration-file kas.yaml]` serves; the other subcommands are admin commands that
//! talk to a running kas through its internal API (address and admin token from the same
//! configuration file).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kas::config::Config;
use kas::install::{self, InstallTarget};
use tether_kas_api::AdminClient;
use tether_kas_api::AgentRef;

#[derive(Parser, Debug)]
#[command(
    name = "kas",
    version = tether_build_info::LONG_VERSION,
    about = "The agent server: accepts agentk connections and routes work to them"
)]
struct Cli {
    /// kas configuration (YAML). Without it kas runs on its embedded default: SQLite in
    /// ./kas-data, listeners on 127.0.0.1 (agents 8150, internal API 8153, observability 8151).
    #[arg(long, global = true, env = "KAS_CONFIGURATION_FILE")]
    configuration_file: Option<PathBuf>,
    /// Internal API URL for admin commands (default: from the configuration).
    #[arg(long, global = true)]
    api_url: Option<String>,
    /// Admin token file for admin commands (default: from the configuration).
    #[arg(long, global = true)]
    admin_token_file: Option<PathBuf>,
    /// PEM CA trusted for an https internal API (default: `api.ca_file`, else system roots).
    #[arg(long, global = true)]
    api_ca_file: Option<PathBuf>,
    /// Log lines as `json` (for collectors) or `text` (for reading during local runs).
    #[arg(long, global = true, default_value = "json")]
    log_format: tether_observability::LogFormat,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the server (the default).
    Serve,
    /// Manage agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Manage agent tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage projects (where their Git repositories are).
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Manage personal access tokens of people using the Kubernetes API through an agent.
    #[command(subcommand)]
    UserToken(UserTokenCmd),
    /// Check an agent's `config.yaml` offline, with the validation kas applies to it (for a
    /// merge-request pipeline: exit code 1 and `FILE:LINE` messages when it would be refused).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print a shell completion script: `source <(kas completions bash)`, or save it where your
    /// shell loads completions from (zsh: a file `_kas` in `$fpath`; fish:
    /// `~/.config/fish/completions/kas.fish`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Work on kas's database directly (no running kas needed).
    #[command(subcommand)]
    Store(StoreCmd),
    /// Write a kubeconfig for a CI job: one context per agent its ID token may use, named
    /// `<config project path>:<agent name>` (runs in the job; talks to kas's Kubernetes API
    /// proxy, not to the internal API).
    Kubeconfig {
        /// kas's Kubernetes API proxy URL, e.g. https://kas.example.com:8154/k8s-proxy.
        #[arg(long)]
        server: String,
        /// File with the job's OIDC ID token (GitLab `id_tokens`, GitHub Actions OIDC).
        #[arg(long)]
        id_token_file: PathBuf,
        /// PEM CA of the proxy's certificate (default: the system's roots).
        #[arg(long)]
        ca_cert_file: Option<PathBuf>,
        /// Where to write it (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate an agent configuration file, e.g. `.gitlab/agents/my-agent/config.yaml`.
    Validate {
        /// The file to check.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCmd {
    /// Apply the schema migrations the configured database lacks, then exit (kas also applies
    /// them when it starts; this does it ahead of a rollout).
    Migrate,
    /// Copy every record of a stopped kas's SQLite database into an empty PostgreSQL database
    /// (tokens keep working: their digests are copied). Refuses a target that holds records.
    Copy {
        /// The source: sqlite:PATH.
        #[arg(long)]
        from: String,
        /// The target: postgres://user[:password]@host[:port]/database.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
enum UserTokenCmd {
    /// Issue a token for one user on one agent (printed once). Use it as
    /// `Authorization: Bearer pat:<agent id>:<token>`.
    Create {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent")]
        agent_id: AgentRef,
        #[arg(long)]
        username: String,
        /// A membership, `project:<path>[:<id>]:<role>` or `group:<path>[:<id>]:<role>`
        /// (role: guest, reporter, developer, maintainer, owner); repeatable.
        #[arg(long = "member")]
        members: Vec<tether_kas_api::Membership>,
        /// Lifetime, like 8h or 30d (default 30 days).
        #[arg(long, default_value = "30d")]
        expires_in: String,
        /// Also write a kubeconfig using the token to this file…
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// …pointing at kas's Kubernetes API proxy URL (default: `kubernetes_api.public_url`)…
        #[arg(long)]
        server: Option<String>,
        /// …trusting this PEM CA (default: `kubernetes_api.ca_file`, else the system's roots).
        #[arg(long)]
        ca_cert_file: Option<PathBuf>,
    },
    /// Revoke a personal access token.
    Revoke { token_id: i64 },
}

#[derive(Subcommand, Debug)]
enum ProjectCmd {
    /// Add a project or change where its repository is.
    Add {
        /// Project path, like `group/sub/project`.
        #[arg(long)]
        path: String,
        /// Git remote: https://…, git://…, ssh://…, user@host:path, file://… or an absolute path.
        #[arg(long)]
        remote: String,
        /// File with credentials for an https remote (a token, or username=/password= lines).
        #[arg(long)]
        credentials_file: Option<PathBuf>,
        /// File with the secret push webhooks must present (GitLab token or GitHub/Gitea HMAC key).
        #[arg(long)]
        webhook_secret_file: Option<PathBuf>,
        /// Deploy key (OpenSSH private key, no passphrase) for an SSH remote.
        #[arg(long)]
        ssh_key_file: Option<PathBuf>,
        /// The SSH server's host keys (known_hosts format); other servers are refused.
        #[arg(long)]
        known_hosts_file: Option<PathBuf>,
        /// Trusted SSH signing keys (git's allowed-signers format): only commits signed by one
        /// of them are used.
        #[arg(long)]
        verify_allowed_signers: Option<PathBuf>,
        /// Trusted OpenPGP public keys (an armored keyring): only commits signed by one of
        /// them are used.
        #[arg(long)]
        verify_gpg_keyring: Option<PathBuf>,
    },
    /// List projects with the state of their mirrors.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a project (refused while agents belong to it).
    Remove {
        #[arg(long)]
        path: String,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// Register an agent in a project and print its first token (shown once).
    Register {
        /// Configuration project path, like `group/sub/project` (created if missing).
        #[arg(long)]
        project: String,
        /// Agent name: an RFC 1123 label (lowercase letters, digits, '-'; at most 63).
        #[arg(long)]
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The address agentk dials, as the cluster sees kas, for the printed install commands
        /// (default: this kas's agent listener, grpc:// or grpcs://).
        #[arg(long)]
        kas_address: Option<String>,
        /// The namespace agentk is installed into.
        #[arg(long, default_value = "gitlab-agent")]
        namespace: String,
        /// Also write ready-to-apply manifests (Namespace, token Secret, agentk) to FILE
        /// (mode 0600: it holds the token).
        #[arg(long, value_name = "FILE")]
        output_manifests: Option<PathBuf>,
    },
    /// List agents with their connection state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show each manifest project's last synchronization: commit, when, every object's status.
    Status {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        #[arg(long)]
        json: bool,
    },
    /// Preview a ref: what a synchronization of it would change in the agent's cluster
    /// (server-side dry run through the tunnel). Exit 0: no changes, 1: changes, 2: error.
    Diff(kas::diff::DiffArgs),
    /// Send bytes through an agent's tunnel and back; prints the round-trip time.
    Ping {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create another token for an agent (for rotation); printed once.
    Create {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent")]
        agent_id: AgentRef,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List an agent's tokens (never their values).
    List {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent")]
        agent_id: AgentRef,
    },
    /// Revoke a token; streams opened with it end at once.
    Revoke { token_id: i64 },
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

fn admin_client(cli: &Cli, cfg: &Config) -> Result<AdminClient> {
    let url = cli.api_url.clone().unwrap_or_else(|| default_api_url(cfg));
    let file = cli
        .admin_token_file
        .clone()
        .unwrap_or_else(|| cfg.admin_token_file());
    let ca = cli.api_ca_file.as_ref().or(cfg.api.ca_file.as_ref());
    Ok(AdminClient::from_token_file(&url, &file)?.trusting(ca.map(PathBuf::as_path))?)
}

/// The internal API's URL from the configuration: https when its listener has TLS, and a
/// wildcard bind address (0.0.0.0, ::) reached on loopback.
fn default_api_url(cfg: &Config) -> String {
    let l = &cfg.api.listen;
    let mut a = l.address;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if l.certificate_file.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{a}")
}

/// The agent listener's URL from the configuration, for install commands: grpcs:// when it has
/// TLS. A loopback or wildcard address is what agents in a cluster cannot reach; `--kas-address`
/// is then the way, which the printed commands cannot guess.
fn default_agent_url(cfg: &Config) -> String {
    let l = &cfg.agent.listen;
    let scheme = if l.certificate_file.is_some() {
        "grpcs"
    } else {
        "grpc"
    };
    format!("{scheme}://{}", l.address)
}

/// Writes a file only its owner may read (it holds a token).
fn write_secret_file(path: &std::path::Path, content: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode on open; narrow it too.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .and_then(|()| f.write_all(content))
        .with_context(|| format!("writing {}", path.display()))
}

/// `println!` that returns an error instead of panicking when stdout is gone
/// (`kas agent list | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `kas config validate`: the same parsing and validation as kas applies to a configuration
/// project's `config.yaml` (size, UTF-8, schema, every section's rules, lines in messages).
fn validate_agent_config(file: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let config = tether_agent_config::parse_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    out!(
        "{}: valid ({} manifest project(s), {} CI access project(s) and group(s), user access {})",
        file.display(),
        config.gitops.manifest_projects.len(),
        config.ci_access.projects.len() + config.ci_access.groups.len(),
        if config.user_access.is_some() {
            "configured"
        } else {
            "off"
        }
    )?;
    Ok(())
}

/// Whether `e` is only the reader of our output having gone away: not worth an error, as with
/// any Unix tool whose output is cut short by `head`.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Unix seconds as an RFC 3339 UTC time, for people (raw epoch seconds in listings were not).
fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `kas agent diff` exits 1 for "changes", so its errors need another code.
    let failure = match &cli.cmd {
        Some(Cmd::Agent(AgentCmd::Diff(_))) => std::process::ExitCode::from(kas::diff::EXIT_ERROR),
        _ => std::process::ExitCode::FAILURE,
    };
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kas: {e:#}");
            failure
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = load_config(cli.configuration_file.as_ref())?;
    match &cli.cmd {
        None | Some(Cmd::Serve) => serve(cfg, cli.log_format).await,
        Some(Cmd::Agent(a)) => agent_cmd(&admin_client(&cli, &cfg)?, a, &cfg).await,
        Some(Cmd::Token(t)) => token_cmd(&admin_client(&cli, &cfg)?, t).await,
        Some(Cmd::Project(p)) => project_cmd(&admin_client(&cli, &cfg)?, p).await,
        Some(Cmd::UserToken(u)) => user_token_cmd(&admin_client(&cli, &cfg)?, &cfg, u).await,
        Some(Cmd::Store(s)) => store_cmd(&cfg, s).await,
        Some(Cmd::Config(ConfigCmd::Validate { file })) => validate_agent_config(file),
        Some(Cmd::Completions { shell }) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "kas", &mut std::io::stdout());
            Ok(())
        }
        Some(Cmd::Kubeconfig {
            server,
            id_token_file,
            ca_cert_file,
            output,
        }) => {
            ci_kubeconfig(
                server,
                id_token_file,
                ca_cert_file.as_deref(),
                output.as_deref(),
            )
            .await
        }
    }
}

async fn store_cmd(cfg: &Config, cmd: &StoreCmd) -> Result<()> {
    use kas::config::DatabaseLocation;
    match cmd {
        StoreCmd::Migrate => {
            let location = cfg.database_location();
            kas::database::migrate(&location).await?;
            out!("{location}: schema up to date")?;
        }
        StoreCmd::Copy { from, to } => {
            let from = DatabaseLocation::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let to = DatabaseLocation::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            let counts = kas::database::copy(&from, &to).await?;
            for c in &counts {
                out!("{:<16}{:>8}", c.table, c.rows)?;
            }
            let total: u64 = counts.iter().map(|c| c.rows).sum();
            out!("copied {total} records from {from} to {to}")?;
        }
    }
    Ok(())
}

async fn serve(cfg: Config, log_format: tether_observability::LogFormat) -> Result<()> {
    let level = tether_observability::parse_level(&cfg.observability.logging.level)?;
    let _log = tether_observability::init_logging_as(level, log_format);
    // One crypto provider for every TLS use in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let running = kas::server::start(cfg).await.context("starting kas")?;
    tracing::info!(
        agent = %running.agent_addr,
        api = %running.api_addr,
        observability = %running.observability_addr,
        "kas is up"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = running.stopped() => {}
    }
    tracing::info!("kas is stopping");
    running.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

async fn agent_cmd(c: &AdminClient, cmd: &AgentCmd, cfg: &Config) -> Result<()> {
    match cmd {
        AgentCmd::Register {
            project,
            name,
            json,
            kas_address,
            namespace,
            output_manifests,
        } => {
            let t = c.register_agent(project, name).await?;
            let address = kas_address
                .clone()
                .unwrap_or_else(|| default_agent_url(cfg));
            let target = InstallTarget {
                kas_address: &address,
                namespace,
                release: name,
            };
            if let Some(file) = output_manifests {
                write_secret_file(file, install::manifests(&target, &t.token).as_bytes())?;
            }
            print_registered(&t, *json)?;
            if !*json {
                let file = output_manifests.as_ref().map(|f| f.display().to_string());
                out!(
                    "{}",
                    install::instructions(&target, &t.token, file.as_deref())
                )?;
            }
            Ok(())
        }
        AgentCmd::List { json } => {
            let agents = c.list_agents().await?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&agents)?)?;
                return Ok(());
            }
            print_agents(agents)
        }
        AgentCmd::Status { agent_id, json } => {
            let agent_id = &c.resolve_agent(agent_id).await?;
            let syncs = c.gitops_status(*agent_id).await?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&syncs)?)?;
                return Ok(());
            }
            print_syncs(*agent_id, syncs)
        }
        AgentCmd::Diff(args) => {
            let code = kas::diff::run(c, args, &mut std::io::stdout().lock()).await?;
            if code != kas::diff::EXIT_NO_CHANGES {
                // Printed and flushed already; nothing else is left to clean up.
                std::process::exit(i32::from(code));
            }
            Ok(())
        }
        AgentCmd::Ping { agent_id, bytes } => {
            ping(c, c.resolve_agent(agent_id).await?, *bytes).await
        }
    }
}

/// `kas agent register`'s output: the token, shown once.
fn print_registered(t: &tether_kas_api::TokenCreated, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(&t)?)?;
    } else {
        out!(
            "agent_id: {}\ntoken_id: {}\ntoken: {}",
            t.agent_id,
            t.token_id,
            t.token
        )?;
        eprintln!(
            "Store the token now (for example in a Kubernetes Secret): kas keeps only its hash."
        );
    }
    Ok(())
}

/// `kas agent list`'s table: a line per connection (or one for an offline agent), then the
/// configuration in force.
fn print_agents(agents: Vec<tether_kas_api::AgentView>) -> Result<()> {
    out!(
        "{:<6} {:<30} {:<20} {:<10} {:<22} {:<12} POD",
        "ID",
        "PROJECT",
        "NAME",
        "STATE",
        "SINCE",
        "VERSION"
    )?;
    for a in agents {
        if a.connections.is_empty() {
            out!(
                "{:<6} {:<30} {:<20} {:<10}",
                a.id,
                a.project,
                a.name,
                "offline"
            )?;
        }
        for con in &a.connections {
            out!(
                "{:<6} {:<30} {:<20} {:<10} {:<22} {:<12} {}/{}",
                a.id,
                a.project,
                a.name,
                "connected",
                con.connected_since,
                con.agent_version,
                con.pod_namespace,
                con.pod_name
            )?;
        }
        if let Some(cfg) = &a.config {
            let commit = if cfg.commit.is_empty() {
                "(none)"
            } else {
                &cfg.commit[..cfg.commit.len().min(12)]
            };
            out!("       config in force: commit {commit}")?;
            if let (Some(e), Some(c)) = (&cfg.error, &cfg.error_commit) {
                out!("       refused at commit {}: {e}", &c[..c.len().min(12)])?;
            }
        }
    }
    Ok(())
}

/// `kas agent status`: each manifest project's last synchronization and its objects.
fn print_syncs(agent_id: i64, syncs: Vec<tether_kas_api::SyncView>) -> Result<()> {
    if syncs.is_empty() {
        out!("agent {agent_id} has reported no synchronization yet")?;
    }
    for s in syncs {
        out!(
            "{}  commit {}  {}{}  at {}{}",
            s.project_id,
            &s.commit_id[..s.commit_id.len().min(12)],
            s.outcome,
            if s.dry_run { " (dry run)" } else { "" },
            s.finished_at,
            if s.error.is_empty() {
                String::new()
            } else {
                format!("  error: {}", s.error)
            }
        )?;
        for w in &s.warnings {
            out!("    warning: {w}")?;
        }
        for o in s.objects {
            out!(
                "    {:<12} {}/{} {}/{}  {}",
                o.status,
                if o.group.is_empty() { "core" } else { &o.group },
                o.kind,
                if o.namespace.is_empty() {
                    "-"
                } else {
                    &o.namespace
                },
                o.name,
                o.message
            )?;
        }
    }
    Ok(())
}

/// `kas agent ping`: a payload through the agent's echo service and back, timed.
async fn ping(c: &AdminClient, agent_id: i64, bytes: usize) -> Result<()> {
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let t0 = Instant::now();
    let back = c.echo(agent_id, payload.clone()).await?;
    let dt = t0.elapsed();
    anyhow::ensure!(
        back.as_ref() == payload.as_slice(),
        "the echo came back altered"
    );
    out!(
        "{} bytes through agent {agent_id} and back in {dt:?}",
        back.len()
    )?;
    Ok(())
}

fn absolute(p: &std::path::Path) -> Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
    Ok(abs.display().to_string())
}

async fn project_cmd(c: &AdminClient, cmd: &ProjectCmd) -> Result<()> {
    match cmd {
        ProjectCmd::Add {
            path,
            remote,
            credentials_file,
            webhook_secret_file,
            ssh_key_file,
            known_hosts_file,
            verify_allowed_signers,
            verify_gpg_keyring,
        } => {
            let file = |f: &Option<PathBuf>| f.as_deref().map(absolute).transpose();
            let req = kas::api::ProjectRequest {
                path: path.clone(),
                remote: Some(remote.clone()),
                credentials_file: credentials_file.as_deref().map(absolute).transpose()?,
                webhook_secret_file: webhook_secret_file.as_deref().map(absolute).transpose()?,
                ssh_key_file: file(ssh_key_file)?,
                known_hosts_file: file(known_hosts_file)?,
                verify_allowed_signers_file: file(verify_allowed_signers)?,
                verify_gpg_keyring_file: file(verify_gpg_keyring)?,
            };
            let p = c.set_project(&req).await?;
            out!("project {} (id {}) mirrors {}", p.path, p.id, remote)?;
            if p.webhooks {
                out!(
                    "push webhook URL: <kas internal API>/webhooks/projects/{}",
                    p.id
                )?;
            }
        }
        ProjectCmd::List { json } => {
            let projects = c.list_projects().await?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&projects)?)?;
                return Ok(());
            }
            out!(
                "{:<6} {:<30} {:<12} {:<22} REMOTE / ERROR",
                "ID",
                "PATH",
                "COMMIT",
                "FETCHED"
            )?;
            for p in projects {
                // Only printed when there is one, so the line is unchanged for other projects.
                let refusal = p
                    .refusal
                    .map(|r| {
                        let signer = r
                            .signer
                            .map(|s| format!(" (signer {s})"))
                            .unwrap_or_default();
                        format!("  refused: commit {}{signer}: {}", r.commit, r.reason)
                    })
                    .unwrap_or_default();
                out!(
                    "{:<6} {:<30} {:<12} {:<22} {}{}{refusal}",
                    p.id,
                    p.path,
                    p.commit
                        .as_deref()
                        .map(|c| &c[..c.len().min(12)])
                        .unwrap_or("-"),
                    p.last_fetch.as_deref().unwrap_or("-"),
                    p.remote.as_deref().unwrap_or("(no repository)"),
                    p.fetch_error
                        .map(|e| format!("  error: {e}"))
                        .unwrap_or_default()
                )?;
            }
        }
        ProjectCmd::Remove { path } => {
            c.remove_project(path).await?;
            out!("project {path} removed")?;
        }
    }
    Ok(())
}

/// Fetches the CI job's kubeconfig from kas's proxy.
async fn ci_kubeconfig(
    server: &str,
    id_token_file: &std::path::Path,
    ca: Option<&std::path::Path>,
    output: Option<&std::path::Path>,
) -> Result<()> {
    let token = std::fs::read_to_string(id_token_file)
        .with_context(|| format!("reading {}", id_token_file.display()))?;
    let ca_pem = ca
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fetcher = kas::jwks::HttpJwksFetcher::new(ca_pem.as_deref())?;
    let url = format!(
        "{}{}",
        server.trim_end_matches('/'),
        kas::kubeproxy::KUBECONFIG_PATH
    );
    let body = fetcher.get_with_bearer(&url, token.trim()).await?;
    match output {
        Some(p) => kas::auth::write_private(p, &body)?,
        None => print!("{body}"),
    }
    Ok(())
}

async fn user_token_cmd(c: &AdminClient, cfg: &Config, cmd: &UserTokenCmd) -> Result<()> {
    match cmd {
        UserTokenCmd::Create {
            agent_id,
            username,
            members,
            expires_in,
            kubeconfig,
            server,
            ca_cert_file,
        } => {
            // Settle where the kubeconfig goes and what it trusts before issuing a token, so a
            // mistake here leaves no token behind.
            let kc_target = kubeconfig
                .as_ref()
                .map(|file| {
                    person_kubeconfig_target(cfg, server.as_deref(), ca_cert_file.as_deref())
                        .map(|t| (file, t))
                })
                .transpose()?;
            let ttl = humantime::parse_duration(expires_in)
                .with_context(|| format!("{expires_in} is not a duration like 8h or 30d"))?;
            let req = kas::api::UserTokenRequest {
                username: username.clone(),
                memberships: members.clone(),
                expires_in_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            };
            let t = c
                .create_user_token(c.resolve_agent(agent_id).await?, &req)
                .await?;
            out!(
                "token_id: {}\ntoken: pat:{}:{}\nexpires_at: {}",
                t.token_id,
                t.agent_id,
                t.token,
                t.expires_at
            )?;
            if let Some((file, target)) = kc_target {
                write_person_kubeconfig(c, &t, file, &target).await?;
            }
        }
        UserTokenCmd::Revoke { token_id } => {
            let r = c.revoke_user_token(*token_id).await?;
            out!("{r}")?;
        }
    }
    Ok(())
}

/// Where a person's kubeconfig points and the CA it trusts (PEM).
struct KubeconfigTarget {
    server: String,
    ca_pem: Option<Vec<u8>>,
}

fn person_kubeconfig_target(
    cfg: &Config,
    server: Option<&str>,
    ca_cert_file: Option<&std::path::Path>,
) -> Result<KubeconfigTarget> {
    let server = server
        .map(str::to_owned)
        .or_else(|| cfg.kubernetes_api.public_url.clone())
        .context(
            "--kubeconfig needs --server (or kubernetes_api.public_url in kas's configuration)",
        )?;
    let ca_file = ca_cert_file.or(cfg.kubernetes_api.ca_file.as_deref());
    let ca_pem = ca_file
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    Ok(KubeconfigTarget { server, ca_pem })
}

async fn write_person_kubeconfig(
    c: &AdminClient,
    t: &kas::api::UserTokenCreated,
    file: &std::path::Path,
    target: &KubeconfigTarget,
) -> Result<()> {
    let agent = c
        .list_agents()
        .await?
        .into_iter()
        .find(|a| a.id == t.agent_id)
        .context("the agent disappeared")?;
    let name = format!("{}:{}", agent.project, agent.name);
    let mut kc =
        tether_kubeproxy_server::Kubeconfig::new(&target.server, target.ca_pem.as_deref())?;
    kc.add_context(&name, &format!("pat:{}:{}", t.agent_id, t.token), None)?;
    kas::auth::write_private(file, &format!("{}\n", kc.to_json()?))
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("kubeconfig written to {} (context {name})", file.display());
    Ok(())
}

async fn token_cmd(c: &AdminClient, cmd: &TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            agent_id,
            description,
        } => {
            let t = c
                .create_token(c.resolve_agent(agent_id).await?, description)
                .await?;
            out!("token_id: {}\ntoken: {}", t.token_id, t.token)?;
        }
        TokenCmd::List { agent_id } => {
            out!("{:<8} {:<10} {:<21} DESCRIPTION", "ID", "STATE", "CREATED")?;
            for t in c.list_tokens(c.resolve_agent(agent_id).await?).await? {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                out!(
                    "{:<8} {:<10} {:<21} {}",
                    t.id,
                    state,
                    when(t.created_at),
                    t.description
                )?;
            }
        }
        TokenCmd::Revoke { token_id } => {
            let r = c.revoke_token(*token_id).await?;
            out!(
                "token {} revoked (was active: {}, live streams ended: {})",
                r.token_id,
                r.was_active,
                r.streams_ended
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_membership_is_refused_when_the_command_line_is_parsed() {
        let args = [
            "kas",
            "user-token",
            "create",
            "--agent-id=1",
            "--username=alice",
            "--member=group:group:boss",
        ];
        let e = Cli::try_parse_from(args).expect_err("bad role");
        assert!(
            e.to_string()
                .contains("group:group:boss: role must be one of guest"),
            "{e}"
        );
        let ok = Cli::try_parse_from(args.map(|a| a.replace("boss", "maintainer")));
        assert!(ok.is_ok(), "{:?}", ok.err());
    }
}
