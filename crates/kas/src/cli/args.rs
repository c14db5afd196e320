//! The command line: every subcommand, argument and its help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tether_kas_api::AgentRef;

use super::output::FormatArgs;

const SEC: std::time::Duration = std::time::Duration::from_secs(1);
const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// A duration (`8h`, `30d`) from `min` to `max`, refused naming the flag otherwise: `--timeout
/// 18446744073709551615s` overflowed the clock and panicked, `0s` and `1ms` were taken
/// literally or rounded to nothing (E14).
fn between(
    min: std::time::Duration,
    max: std::time::Duration,
) -> impl Fn(&str) -> Result<std::time::Duration, String> + Clone {
    move |s| {
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{s} is not a duration like 30s, 8h or 30d: {e}"))?;
        if d < min || d > max {
            return Err(format!(
                "{s} is not between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ));
        }
        Ok(d)
    }
}

const MAIN_EXAMPLES: &str = "\
Examples:
  kas                                              # serve (embedded default: ./kas-data)
  kas agent register --project group/app --name dude
  kas agent list -o yaml
  kas agent reconcile group/app:dude --wait        # fetch, sync now, watch it finish
  kas agent suspend group/app:dude --reason 'incident 42'
  kas man --dir /usr/local/share/man/man1";

const RECONCILE_EXAMPLES: &str = "\
Examples:
  kas agent reconcile group/app:dude --wait
  kas agent reconcile 3 --project group/manifests --wait --timeout 10m

Exit codes with --wait:
  0  every project synchronized and every object Current
  1  a synchronization failed or an object is not Current (or kas refused the request)
  3  no report within --timeout (kas unreachable meanwhile is waited out until then)
  4  the agent has no GitOps stream for a project (offline, or no replica leads)
  5  a project's fetch failed or made no progress for git.fetch_timeout (2 min) plus 5 s:
     the newest commit was not fetched
     (the last good one is synchronized), or kas refused the agent's newest config.yaml
     (the one in force is used); also without --wait
  6  kas could not record the agent's report (its database refused the write)";

const SUSPEND_EXAMPLES: &str = "\
Examples:
  kas agent suspend group/app:dude --reason 'incident 42: hands off'
  kas agent suspend group/app:dude --project group/manifests
  kas agent resume group/app:dude                  # applies the newest commit at once";

#[derive(Parser, Debug)]
#[command(
    name = "kas",
    version = tether_build_info::LONG_VERSION,
    about = "The agent server: accepts agentk connections and routes work to them",
    after_help = MAIN_EXAMPLES
)]
pub struct Cli {
    /// kas configuration (YAML). Without it kas runs on its embedded default: SQLite in
    /// ./kas-data, listeners on 127.0.0.1 (agents 8150, internal API 8153, observability 8151).
    #[arg(long, global = true, env = "KAS_CONFIGURATION_FILE")]
    pub configuration_file: Option<PathBuf>,
    /// Internal API URL for admin commands (default: from the configuration).
    #[arg(long, global = true)]
    pub api_url: Option<String>,
    /// Admin token file for admin commands (default: from the configuration).
    #[arg(long, global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// PEM CA trusted for an https internal API (default: `api.ca_file`, else system roots).
    #[arg(long, global = true)]
    pub api_ca_file: Option<PathBuf>,
    /// Log lines as `json` (for collectors) or `text` (for reading during local runs).
    #[arg(long, global = true, default_value = "json")]
    pub log_format: tether_observability::LogFormat,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
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
    /// Write a man page for kas and each of its subcommands (`kas.1`, `kas-agent-reconcile.1`,
    /// …) into a directory.
    Man {
        /// The directory to write the pages into (created if missing).
        #[arg(long)]
        dir: PathBuf,
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
pub enum ConfigCmd {
    /// Validate an agent configuration file, e.g. `.gitlab/agents/my-agent/config.yaml`.
    Validate {
        /// The file to check.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
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
    /// Write a consistent copy of the configured SQLite database to a new file while kas runs
    /// (restore it with `kas store restore --from FILE`, kas stopped: it keeps ids unique and
    /// lists what the backup undoes; take one before every upgrade). PostgreSQL is backed up
    /// with pg_dump.
    #[command(after_help = "Examples:\n  kas store backup --to /backups/kas-$(date +%F).sqlite")]
    Backup {
        /// The file to write (refused if it exists, unless --force).
        #[arg(long)]
        to: PathBuf,
        /// Replace the file if it exists (the old one stays whole until the new one is
        /// complete).
        #[arg(long)]
        force: bool,
    },
    /// Replace a stopped kas's SQLite database with a backup; ids keep counting after the
    /// largest the replaced database gave, and what the restore undoes (revocations,
    /// suspensions made since the backup) is listed.
    Restore {
        /// The backup file (from `kas store backup`).
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserTokenCmd {
    /// Issue a token for one user on one agent (printed once). Use it as
    /// `Authorization: Bearer pat:<agent id>:<token>`.
    #[command(
        after_help = "Examples:\n  kas user-token create --agent group/app:dude --username alice \\\n      --member project:group/app:developer --expires-in 8h --kubeconfig alice.kubeconfig"
    )]
    Create {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent")]
        agent_id: AgentRef,
        /// The person's username, as `user_access` authorizes and impersonates it.
        #[arg(long)]
        username: String,
        /// A membership, `project:<path>[:<id>]:<role>` or `group:<path>[:<id>]:<role>`
        /// (role: guest, reporter, developer, maintainer, owner); repeatable.
        #[arg(long = "member")]
        members: Vec<tether_kas_api::Membership>,
        /// Lifetime, like 8h or 30d (default 30 days; 1 s to a year).
        #[arg(long, default_value = "30d", value_parser = between(SEC, YEAR))]
        expires_in: std::time::Duration,
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
    /// List personal access tokens: who, on which agent, memberships, expiry (never the
    /// tokens themselves).
    #[command(
        after_help = "Examples:\n  kas user-token list\n  kas user-token list --agent group/app:dude -o json"
    )]
    List {
        /// Only this agent's: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent-id")]
        agent: Option<AgentRef>,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Revoke a personal access token.
    Revoke {
        /// The token's id (from `kas user-token list`).
        token_id: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// Add a project or change where its repository is.
    #[command(
        after_help = "Examples:\n  kas project add --path group/app --remote https://gitlab.example.com/group/app.git \\\n      --credentials-file /etc/kas/app-token --webhook-secret-file /etc/kas/app-hook\n  kas project add --path group/app --remote git@gitlab.example.com:group/app.git \\\n      --ssh-key-file /etc/kas/deploy-key --known-hosts-file /etc/kas/known_hosts"
    )]
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
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Remove a project (refused while agents belong to it).
    Remove {
        /// Project path, like `group/sub/project`.
        #[arg(long)]
        path: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
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
    /// List agents with their connection state, configuration in force and suspensions.
    #[command(
        after_help = "Examples:\n  kas agent list\n  kas agent list -o json | jq '.[] | select(.connected | not)'"
    )]
    List {
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Show whether the agent is connected, its configuration in force (and a refused newer
    /// one, with why), its suspensions, and each manifest project's last synchronization:
    /// commit, when, every object's status; each entry not reported on yet says why (pending,
    /// fetch failing, unknown project).
    #[command(
        after_help = "Examples:\n  kas agent status group/app:dude\n  kas agent status 3 -o yaml\n\n\
Exit codes:\n  0  shown\n  1  kas refused the request (unknown agent, …)\n  \
5  shown, and the agent's newest configuration was refused (an older one stays in force)\n  \
6  shown, and the agent is connected from several clusters (one token, several clusters)\n  \
7  shown, and whether the agent is connected is unknown (a kas replica did not answer)\n  \
8  shown, and an entry cannot synchronize: its project is unknown to kas or its fetch fails, it is stalled, or no agentk replica leads (no GitOps stream)"
    )]
    Status {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Fetch the agent's configuration and manifest projects now and have it synchronize now,
    /// even when no commit changed (drift correction now). With --wait, follow it to the end.
    #[command(after_help = RECONCILE_EXAMPLES)]
    Reconcile {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        /// Only this manifest project (its path or id; default: all of the agent's).
        #[arg(long)]
        project: Option<String>,
        /// Wait for the agent's report of this synchronization, showing progress; the exit
        /// code tells the outcome.
        #[arg(long)]
        wait: bool,
        /// How long the whole command may take with --wait, like 90s or 10m (1 s to a year; without --wait,
        /// at most 15 s to be heard: kas reading a config.yaml just pushed, the agent's
        /// GitOps stream coming back, kas restarting).
        #[arg(long, default_value = "5m", value_parser = between(SEC, YEAR))]
        timeout: std::time::Duration,
    },
    /// Suspend GitOps: nothing is applied, pruned or drift-corrected (new commits are held)
    /// until `kas agent resume`. Kept across kas and agentk restarts.
    #[command(after_help = SUSPEND_EXAMPLES)]
    Suspend {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        /// Only this manifest project (its path or id; default: every one of the agent's,
        /// including ones added later).
        #[arg(long)]
        project: Option<String>,
        /// Why, shown in `kas agent list` and `status` and in agentk's log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume GitOps after `kas agent suspend`: the newest commit is applied at once.
    #[command(after_help = SUSPEND_EXAMPLES)]
    Resume {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        /// Only this manifest project (its path or id; default: every suspension of the agent).
        #[arg(long)]
        project: Option<String>,
    },
    /// Delete an agent: revoke its tokens and personal access tokens, end its live tunnel and
    /// streams at once, and remove its records (its objects stay in the cluster).
    #[command(after_help = "Examples:\n  kas agent delete group/app:dude\n  kas agent delete 3")]
    Delete {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
    },
    /// Preview a ref: what a synchronization of it would change in the agent's cluster
    /// (server-side dry run through the tunnel). Exit 0: no changes, 1: changes, 2: error,
    /// 4: the agent is not connected (after up to 5 s for it to connect).
    Diff(kas::diff::DiffArgs),
    /// Send bytes through an agent's tunnel and back; prints the round-trip time. Exit 4: the
    /// agent is not connected (after up to 5 s for it to connect).
    Ping {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        agent_id: AgentRef,
        /// How many bytes to send.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create another token for an agent (for rotation); printed once.
    Create {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent")]
        agent_id: AgentRef,
        /// What the token is for (shown in `kas token list`).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List an agent's tokens (never their values).
    List {
        /// The agent: its id or `<configuration project path>:<agent name>`.
        #[arg(long, alias = "agent")]
        agent_id: AgentRef,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Revoke a token; streams opened with it end at once.
    Revoke {
        /// The token's id (from `kas token list`).
        token_id: i64,
    },
}
