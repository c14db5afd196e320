//! `kas agent …`.

use std::time::{Duration, Instant};

use anyhow::Result;
use kas::config::Config;
use kas::install::{self, InstallTarget};
use tether_kas_api::{
    AdminClient, AgentView, ClientError, ConfigView, ProgressView, ReportedOutcome, SuspendRequest,
    SuspensionView, SyncView, UnreportedView,
};

use super::args::AgentCmd;
use super::output::{OutputFormat, Reported, Table, out, print_data, short};
use super::{default_agent_url, write_secret_file};

pub async fn agent_cmd(c: &AdminClient, cmd: &AgentCmd, cfg: &Config) -> Result<()> {
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
            let address = kas_address.clone().unwrap_or_else(|| {
                if !super::reachable_by_agents(cfg.agent.listen.address()) {
                    eprintln!(
                        "warning: the commands below dial kas at its listen address {}, which agents in a cluster cannot reach; register with --kas-address set to the address they dial",
                        cfg.agent.listen.address()
                    );
                }
                default_agent_url(cfg)
            });
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
                out!("{}", install::instructions(&target, file.as_deref()))?;
            }
            Ok(())
        }
        AgentCmd::List { format } => {
            let agents = c.list_agents().await?;
            if !print_data(format.format(), &agents)? {
                print_agents(&agents)?;
            }
            unknown_exit(&agents)
        }
        AgentCmd::Status { agent_id, format } => {
            let agent_id = c.resolve_agent(agent_id).await?;
            status(c, agent_id, format.format()).await
        }
        AgentCmd::Diff(args) => {
            connected(c, c.resolve_agent(&args.agent).await?, "preview").await?;
            diff_exit(kas::diff::run(c, args, &mut super::output::Stdout).await?)
        }
        AgentCmd::Ping { agent_id, bytes } => {
            let agent_id = c.resolve_agent(agent_id).await?;
            connected(c, agent_id, "ping").await?;
            ping(c, agent_id, *bytes).await
        }
        AgentCmd::Reconcile {
            agent_id,
            project,
            wait,
            timeout,
        } => super::reconcile::run(c, agent_id, project.clone(), *wait, *timeout).await,
        AgentCmd::Suspend {
            agent_id,
            project,
            reason,
        } => {
            let id = c.resolve_agent(agent_id).await?;
            let req = SuspendRequest {
                project: project.clone(),
                reason: reason.clone(),
                requested_by: std::env::var("USER").ok(),
            };
            let s = c.suspend(id, &req).await?;
            out!(
                "agent {id}: GitOps suspended for {} by {} at {}",
                s.project.as_deref().unwrap_or("every manifest project"),
                s.suspended_by,
                s.suspended_at
            )?;
            if let Some(note) = whole_project_note(project.as_deref(), &s.entries) {
                out!("{note}")?;
            }
            Ok(())
        }
        AgentCmd::Resume { agent_id, project } => {
            let id = c.resolve_agent(agent_id).await?;
            let req = SuspendRequest {
                project: project.clone(),
                ..SuspendRequest::default()
            };
            let r = c.resume(id, &req).await?;
            out!(
                "agent {id}: GitOps resumed ({} suspension(s) lifted); the newest commit is applied now",
                r.resumed
            )?;
            Ok(())
        }
        AgentCmd::Delete { agent_id } => {
            let id = c.resolve_agent(agent_id).await?;
            let d = c.delete_agent(id).await?;
            out!(
                "agent {id} deleted: {} token(s) revoked, {} live stream(s) ended, {} request(s) of people ended",
                d.tokens_revoked,
                d.streams_ended,
                d.user_requests_ended
            )?;
            Ok(())
        }
    }
}

/// What a suspension of a project holds beyond what was named: suspensions hold a whole
/// project, so naming one entry (`project#name`) holds its other entries too. Pure.
fn whole_project_note(named: Option<&str>, entries: &[String]) -> Option<String> {
    let named = named?;
    entries.iter().any(|e| e != named).then(|| {
        format!(
            "note: suspensions hold a whole project: every entry of it is held ({})",
            entries.join(", ")
        )
    })
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
/// configuration in force and any suspension. The agent is named as in kubeconfig contexts,
/// never cut.
fn print_agents(agents: &[AgentView]) -> Result<()> {
    let mut t = Table::new(&["ID", "AGENT", "STATE", "SINCE", "VERSION", "POD"]);
    for a in agents {
        let name = format!("{}:{}", a.project, a.name);
        if a.connections.is_empty() {
            t.row(vec![a.id.to_string(), name.clone(), a.connection_state()]);
        }
        for con in &a.connections {
            t.row(vec![
                a.id.to_string(),
                name.clone(),
                "connected".into(),
                con.connected_since.clone(),
                con.agent_version.clone(),
                format!("{}/{}", con.pod_namespace, con.pod_name),
            ]);
        }
    }
    t.print()?;
    for a in agents {
        print_agent_notes(a)?;
    }
    Ok(())
}

/// What does not fit a table row: the configuration commit, a refusal, suspensions.
fn print_agent_notes(a: &AgentView) -> Result<()> {
    let mut notes = Vec::new();
    if let Some(cfg) = &a.config {
        let commit = if cfg.commit.is_empty() {
            "(none)"
        } else {
            short(&cfg.commit)
        };
        notes.push(format!("config in force: commit {commit}"));
        if let (Some(e), Some(c)) = (&cfg.error, &cfg.error_commit) {
            notes.push(format!("refused at commit {}: {e}", short(c)));
        }
        notes.extend(cfg.unstored_note());
    }
    notes.extend(a.suspensions.iter().map(suspension_line));
    notes.extend(shared_token(a));
    if !notes.is_empty() {
        out!("{}:{} (agent {})", a.project, a.name, a.id)?;
        for n in notes {
            out!("    {n}")?;
        }
    }
    Ok(())
}

/// The warning for an agent connected from several clusters, if it is.
fn shared_token(a: &AgentView) -> Option<String> {
    let clusters = a.clusters_sharing_token();
    (!clusters.is_empty()).then(|| {
        format!(
            "WARNING: connected from {} clusters (ServiceAccount UIDs {}): one agent token must serve one cluster; register an agent per cluster",
            clusters.len(),
            clusters.join(", ")
        )
    })
}

fn suspension_line(s: &SuspensionView) -> String {
    format!(
        "SUSPENDED {} by {} at {}{}",
        s.project.as_deref().unwrap_or("(every manifest project)"),
        s.suspended_by,
        s.suspended_at,
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", s.reason)
        }
    )
}

/// `kas agent status`'s exit code when the agent's newest configuration was refused: the
/// report was printed, but what was pushed is not in force.
pub const EXIT_CONFIG_REFUSED: u8 = 5;

/// `kas agent status`'s exit code when the agent is connected from several clusters (its
/// token installed in each): CI jobs reach either, and GitOps applies in each.
pub const EXIT_TOKEN_SHARED: u8 = 6;

/// `kas agent status`'s and `kas agent list`'s exit code when a kas replica did not answer
/// (or Redis could not list them) and an agent is connected to none that did: whether it is
/// connected is unknown, and "offline" would be a guess.
pub const EXIT_CONNECTION_UNKNOWN: u8 = 7;

/// `kas agent status`'s exit code when an entry of the configuration in force cannot
/// synchronize: its project is not registered in kas, or kas cannot fetch it. Like a refused
/// configuration, what was pushed does not reach the cluster, and no report would say so.
pub const EXIT_ENTRY_UNHEALTHY: u8 = 8;

/// Fails with [`EXIT_CONNECTION_UNKNOWN`], saying so on stderr, when an agent's connection is
/// unknown.
fn unknown_exit(agents: &[AgentView]) -> Result<()> {
    let unknown: Vec<&AgentView> = agents.iter().filter(|a| a.connection_unknown()).collect();
    let Some(first) = unknown.first() else {
        return Ok(());
    };
    eprintln!(
        "kas: whether {} of the agents {} connected is unknown: {} did not answer",
        unknown.len(),
        if unknown.len() == 1 { "is" } else { "are" },
        first.unreachable_replicas.join(", ")
    );
    Err(Reported {
        code: EXIT_CONNECTION_UNKNOWN,
    }
    .into())
}

/// `kas agent status -o json|yaml`: the agent's state, then its projects' last syncs.
#[derive(serde::Serialize)]
struct StatusView<'a> {
    agent_id: i64,
    connected: bool,
    /// The kas replicas that did not answer: with `connected` false, whether the agent is
    /// connected is unknown.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unreachable_replicas: &'a [String],
    /// "connected", "offline" or "unknown (… did not answer)".
    #[serde(skip)]
    state: String,
    /// The configuration in force and the newest refusal, as kas knows them.
    config: Option<&'a ConfigView>,
    /// Why kas cannot fetch the configuration project: pushes since are not seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    config_fetch_error: Option<&'a str>,
    suspensions: &'a [SuspensionView],
    /// The ServiceAccount UIDs of the clusters it is connected from, when more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clusters_sharing_token: Vec<&'a str>,
    syncs: &'a [SyncView],
    /// The entries of the configuration in force with no report, and why.
    unreported: &'a [UnreportedView],
    /// Syncs under way: how far each got (its last report is the one before it).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    under_way: &'a [ProgressView],
}

/// `kas agent status`: connection, configuration (in force, refused), suspensions, syncs.
async fn status(c: &AdminClient, agent_id: i64, format: OutputFormat) -> Result<()> {
    let agent = agent_view(c, agent_id).await?;
    let syncs = c.gitops_status(agent_id).await?;
    let unreported = unreported(c, agent_id).await?;
    let under_way = under_way(c, agent_id).await?;
    let view = StatusView {
        agent_id,
        connected: agent.connected,
        unreachable_replicas: &agent.unreachable_replicas,
        state: agent.connection_state(),
        config: agent.config.as_ref(),
        config_fetch_error: agent.config_fetch_error.as_deref(),
        suspensions: &agent.suspensions,
        clusters_sharing_token: agent.clusters_sharing_token(),
        syncs: &syncs,
        unreported: &unreported,
        under_way: &under_way,
    };
    if !print_data(format, &view)? {
        print_state(&view)?;
        for s in view.suspensions {
            out!("{}", suspension_line(s))?;
        }
        print_syncs(agent_id, &syncs, &unreported, &under_way)?;
    }
    unknown_exit(std::slice::from_ref(&agent))?;
    if let Some(warning) = shared_token(&agent) {
        eprintln!("kas: agent {agent_id}: {warning}");
        return Err(Reported {
            code: EXIT_TOKEN_SHARED,
        }
        .into());
    }
    // Old successful syncs must not read as "all is well" to a script.
    if let Some(why) = view.config.and_then(refusal) {
        eprintln!("kas: agent {agent_id}: {why}");
        return Err(Reported {
            code: EXIT_CONFIG_REFUSED,
        }
        .into());
    }
    let running: Vec<&SyncView> = syncs
        .iter()
        .filter(|s| !held(s, view.suspensions))
        .collect();
    let connected_for = connected_for(&agent, std::time::SystemTime::now());
    unhealthy_exit(
        agent_id,
        (view.config_fetch_error, &syncs, &running, connected_for),
        &unreported,
        &under_way,
    )
}

/// How long the agent has been connected: since its oldest connection (pure; `None` offline).
fn connected_for(agent: &AgentView, now: std::time::SystemTime) -> Option<std::time::Duration> {
    agent
        .connections
        .iter()
        .filter_map(|c| humantime::parse_rfc3339_weak(&c.connected_since).ok())
        .min()
        .and_then(|since| now.duration_since(since).ok())
}

/// Whether a suspension holds the entry of `s`, on purpose: a newer commit waiting there is no
/// stall. kas says it (`suspended`: matched by project id, whatever form the entry's `id`
/// has); for a kas older than that field, by the entry's path — an entry written as a numeric
/// id read as stalled.
fn held(s: &SyncView, suspensions: &[SuspensionView]) -> bool {
    if s.suspended {
        return true;
    }
    let project = s
        .project_id
        .split_once('#')
        .map_or(s.project_id.as_str(), |(p, _)| p);
    suspensions
        .iter()
        .any(|h| h.project.as_deref().is_none_or(|p| p == project))
}

/// The agent as `kas agent list` shows it. An id kas does not have is an error, not an agent
/// "offline" (a deleted one read so).
async fn agent_view(c: &AdminClient, agent_id: i64) -> Result<AgentView> {
    c.list_agents()
        .await?
        .into_iter()
        .find(|a| a.id == agent_id)
        .ok_or_else(|| anyhow::anyhow!("no agent {agent_id}"))
}

/// `kas agent ping`'s and `kas agent diff`'s exit code when the agent is not connected to kas
/// (as `kas agent reconcile`'s when no stream of the agent heard it): nothing can carry the
/// request.
pub const EXIT_NOT_CONNECTED: u8 = kas::diff::EXIT_NOT_CONNECTED;

/// How long `kas agent ping` and `kas agent diff` wait for an offline agent to connect: one
/// reconnecting (agentk or kas restarting) is back within seconds, and one that is not coming
/// must be said promptly, not after kas's own wait for a tunnel (20 s).
const RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// How often the agent's connection is looked at meanwhile (one agent listing).
const RECONNECT_POLL: Duration = Duration::from_millis(250);

/// Waits up to [`RECONNECT_WAIT`] for the agent to be connected, or fails with
/// [`EXIT_NOT_CONNECTED`], saying why on stderr. An agent whose connection is unknown (a
/// replica did not answer) is asked anyway: it may be connected there.
async fn connected(c: &AdminClient, agent_id: i64, what: &str) -> Result<()> {
    let deadline = Instant::now() + RECONNECT_WAIT;
    loop {
        let agent = agent_view(c, agent_id).await?;
        if agent.connected || agent.connection_unknown() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return not_connected(&agent, what);
        }
        tokio::time::sleep(RECONNECT_POLL).await;
    }
}

/// Fails with [`EXIT_NOT_CONNECTED`], naming the agent and when kas last saw it.
fn not_connected(a: &AgentView, what: &str) -> Result<()> {
    let seen = a.last_seen.as_deref().map_or_else(
        || "kas has never seen it connected".to_owned(),
        |t| format!("last seen connected at {t}"),
    );
    eprintln!(
        "kas: agent {} ({}:{}) is not connected ({seen}): nothing can carry the {what}; waited {} for it to connect",
        a.id,
        a.project,
        a.name,
        humantime::format_duration(RECONNECT_WAIT)
    );
    Err(Reported {
        code: EXIT_NOT_CONNECTED,
    }
    .into())
}

/// The entries of the configuration in force without a report.
async fn unreported(c: &AdminClient, agent_id: i64) -> Result<Vec<UnreportedView>> {
    known_or_none(c.gitops_unreported(agent_id).await)
}

/// The agent's syncs under way.
async fn under_way(c: &AdminClient, agent_id: i64) -> Result<Vec<ProgressView>> {
    known_or_none(c.gitops_progress(agent_id).await)
}

/// A list kas answered. A kas older than its route answers 404: it knows none, which must not
/// make the whole status fail.
fn known_or_none<T>(answer: Result<Vec<T>, ClientError>) -> Result<Vec<T>> {
    match answer {
        Err(ClientError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            Ok(Vec::new())
        }
        other => Ok(other?),
    }
}

/// Fails with [`EXIT_ENTRY_UNHEALTHY`], naming each such entry on stderr, when an entry of the
/// configuration in force cannot synchronize, or its synchronization cannot be recorded (the
/// status shown is then older than what the agent did).
fn unhealthy_exit(
    agent_id: i64,
    (config_fetch, syncs, unsuspended, connected_for): (
        Option<&str>,
        &[SyncView],
        &[&SyncView],
        Option<std::time::Duration>,
    ),
    unreported: &[UnreportedView],
    under_way: &[ProgressView],
) -> Result<()> {
    // A report of the last commit kas fetched is old news while the fetches fail.
    let stale: Vec<String> = syncs
        .iter()
        .filter(|s| !s.fetch_error.is_empty())
        .map(|s| format!("{}  {}", s.project_id, stale_line(s)))
        .collect();
    let now = std::time::SystemTime::now();
    let stalled = unsuspended.iter().filter_map(|s| {
        let line = stalled(s, under_way, now)?;
        Some(format!("{}  {line}", s.project_id))
    });
    let leaderless = unsuspended.iter().filter_map(|s| {
        let line = no_stream(s, connected_for)?;
        Some(format!("{}  {line}", s.project_id))
    });
    let unhealthy: Vec<String> = config_fetch
        .map(config_stale_line)
        .into_iter()
        .chain(stalled)
        .chain(leaderless)
        .chain(
            unreported
                .iter()
                .filter(|u| u.state.is_unhealthy())
                .map(unreported_line),
        )
        .chain(stale)
        .chain(under_way.iter().filter_map(|p| {
            Some(format!(
                "{}  NOT RECORDED: {}",
                p.project_id,
                p.unrecorded_note()?
            ))
        }))
        .collect();
    if unhealthy.is_empty() {
        return Ok(());
    }
    for line in unhealthy {
        eprintln!("kas: agent {agent_id}: {line}");
    }
    Err(Reported {
        code: EXIT_ENTRY_UNHEALTHY,
    }
    .into())
}

/// How long a commit kas has may go without the agent reporting on it before `kas agent
/// status` calls it stalled (exit 8): well past a sync's usual minutes to start.
const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// "newer commit X, fetched at T (N ago): not reported on yet", under a report of an older
/// commit (pure).
fn behind_line(s: &SyncView, now: std::time::SystemTime) -> String {
    let since = s.newer_since.as_deref().map_or_else(String::new, |t| {
        let ago = humantime::parse_rfc3339_weak(t)
            .ok()
            .and_then(|at| now.duration_since(at).ok())
            .map(|d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs())));
        match ago {
            Some(ago) => format!(", fetched at {t} ({ago} ago)"),
            None => format!(", fetched at {t}"),
        }
    });
    format!(
        "newer commit {}{since}: the agent has not reported on it yet",
        short(&s.newer_commit)
    )
}

/// Why an entry counts as stalled (pure): kas has had a newer commit for over
/// [`STALLED_AFTER`] and no sync of it is under way — no replica of the agent leads while
/// connected to kas, or the agent is offline. A report of the older commit read as "all is
/// well" meanwhile.
fn stalled(s: &SyncView, under_way: &[ProgressView], now: std::time::SystemTime) -> Option<String> {
    let since = humantime::parse_rfc3339_weak(s.newer_since.as_deref()?).ok()?;
    let waited = now.duration_since(since).ok()?;
    let running = under_way
        .iter()
        .any(|p| p.project_id == s.project_id && p.commit_id == s.newer_commit);
    (waited >= STALLED_AFTER && !running).then(|| {
        format!(
            "stalled: commit {} was fetched {} ago and the agent has not reported on it (is a replica leading and connected to kas? kas agent reconcile --wait says why)",
            short(&s.newer_commit),
            humantime::format_duration(std::time::Duration::from_secs(waited.as_secs()))
        )
    })
}

/// How long an agent may be connected with no GitOps stream for an entry before `kas agent
/// status` says so (exit 8): agentk opens them within seconds of taking its Lease, and a
/// replica taking over a crashed leader's Lease waits out its duration (15 s).
const NO_STREAM_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Why an entry's report no longer tells what happens (pure): the agent has been connected for
/// over [`NO_STREAM_AFTER`] and kas has no GitOps stream of it for the entry — no agentk replica
/// leads, so nothing applies, prunes or corrects drift, whatever the last report says. A
/// Kubernetes API server that does not answer does that (agentk cannot renew its Lease).
fn no_stream(s: &SyncView, connected_for: Option<std::time::Duration>) -> Option<String> {
    (s.streams == Some(0) && connected_for? >= NO_STREAM_AFTER).then(|| {
        "no GitOps stream: the agent is connected, but no agentk replica leads (it cannot take or renew its Lease: its Kubernetes API server does not answer, or refuses; agentk logs `Leader election failed`): nothing is applied, pruned or corrected until one does".to_owned()
    })
}

/// What `kas agent status` says when kas cannot fetch the agent's configuration project.
fn config_stale_line(error: &str) -> String {
    format!(
        "configuration project fetch failing: {error} (a config.yaml pushed since is not fetched; the configuration in force is the last kas has)"
    )
}

/// What `kas agent status` says under a report whose project kas cannot fetch.
fn stale_line(s: &SyncView) -> String {
    format!(
        "fetch failing: {} (pushes since are not fetched; this is the last commit kas has)",
        s.fetch_error
    )
}

/// `<entry>  <state>: <reason>`, as `kas agent status` shows an entry without a report.
fn unreported_line(u: &UnreportedView) -> String {
    format!("{}  {}: {}", u.project_id, u.state, u.reason)
}

/// "configuration refused at commit C: why", when the newest configuration was refused.
pub(super) fn refusal(cfg: &ConfigView) -> Option<String> {
    let (e, c) = (
        cfg.error.as_ref()?,
        cfg.error_commit.as_deref().unwrap_or("?"),
    );
    if c == cfg.commit {
        // Accepted once (by an older kas, or an agentk that read it otherwise) and refused
        // now: "commit X refused; commit X stays in force" read as a contradiction (E11).
        return Some(format!(
            "the configuration in force, commit {}, is refused now: {e}; it was accepted before (by an earlier kas or agentk) and stays in force here, but an agentk that refuses it runs no configuration at all: fix config.yaml",
            short(c)
        ));
    }
    Some(format!(
        "configuration refused at commit {}: {e}; commit {} stays in force",
        short(c),
        if cfg.commit.is_empty() {
            "(none)"
        } else {
            short(&cfg.commit)
        }
    ))
}

/// The head of `kas agent status`: connected or not, the configuration in force, a refusal, a
/// configuration in force not yet stored.
fn print_state(v: &StatusView<'_>) -> Result<()> {
    out!("agent {}: {}", v.agent_id, v.state)?;
    match v.config {
        None => out!("configuration: none in force yet (has it connected?)")?,
        Some(cfg) if cfg.commit.is_empty() => out!("configuration in force: none yet")?,
        Some(cfg) => out!(
            "configuration in force: commit {} ({})",
            short(&cfg.commit),
            if cfg.file.is_empty() {
                "empty default"
            } else {
                &cfg.file
            }
        )?,
    }
    if let Some(why) = v.config.and_then(refusal) {
        out!("REFUSED: {why}")?;
    }
    if let Some(note) = v.config.and_then(ConfigView::unstored_note) {
        out!("NOT STORED: {note}")?;
    }
    if let Some(e) = v.config_fetch_error {
        out!("{}", config_stale_line(e))?;
    }
    Ok(())
}

/// `kas agent status`: each manifest project's last synchronization and its objects, then
/// each entry of the configuration in force without one, and why; a sync under way is said
/// first (its project's last report is older than it).
fn print_syncs(
    agent_id: i64,
    syncs: &[SyncView],
    unreported: &[UnreportedView],
    under_way: &[ProgressView],
) -> Result<()> {
    for p in under_way {
        out!("{}", super::reconcile::progress_line(p))?;
    }
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
            match (s.error.is_empty(), s.outcome) {
                (true, _) => String::new(),
                // The reason it waits, or that a newer sync cut its wait, is no error.
                (false, ReportedOutcome::Waiting | ReportedOutcome::Superseded) => {
                    format!("  {}", s.error)
                }
                (false, _) => format!("  error: {}", s.error),
            }
        )?;
        if !s.chart_version.is_empty() {
            out!("    chart version: {}", s.chart_version)?;
        }
        if !s.fetch_error.is_empty() {
            out!("    {}", stale_line(s))?;
        }
        if !s.newer_commit.is_empty() {
            out!("    {}", behind_line(s, std::time::SystemTime::now()))?;
        }
        for w in &s.warnings {
            out!("    warning: {w}")?;
        }
        for o in &s.objects {
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
    for u in unreported {
        out!("{}", unreported_line(u))?;
    }
    Ok(())
}

/// `kas agent ping`: a payload through the agent's echo service and back, timed.
async fn ping(c: &AdminClient, agent_id: i64, bytes: usize) -> Result<()> {
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let t0 = Instant::now();
    let back = match c.echo(agent_id, payload.clone()).await {
        // Gone since it was seen connected (kas answers so once its wait for a tunnel ends).
        Err(ClientError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            return not_connected(&agent_view(c, agent_id).await?, "ping");
        }
        answer => answer?,
    };
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

/// Ends `kas agent diff` with its exit code (1: changes, 2: errors).
pub fn diff_exit(code: u8) -> Result<()> {
    if code != kas::diff::EXIT_NO_CHANGES {
        // Printed and flushed already; nothing else is left to clean up.
        std::process::exit(i32::from(code));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Naming one entry of a project with several holds them all: said. A project with one
    /// entry, or the whole agent, needs no note.
    #[test]
    fn a_suspension_naming_one_entry_says_it_holds_the_whole_project() {
        let entries = ["plat/apps#kust".to_owned(), "plat/apps#chart".to_owned()];
        assert_eq!(
            whole_project_note(Some("plat/apps#kust"), &entries).as_deref(),
            Some(
                "note: suspensions hold a whole project: every entry of it is held (plat/apps#kust, plat/apps#chart)"
            )
        );
        assert!(whole_project_note(Some("plat/apps"), &entries).is_some());
        let one = ["plat/web".to_owned()];
        assert_eq!(whole_project_note(Some("plat/web"), &one), None);
        assert_eq!(whole_project_note(None, &entries), None);
    }

    /// A commit kas has had for over two minutes without the agent reporting on it is
    /// stalled (exit 8), unless its sync is under way; a newer one is only said before that.
    /// A refusal of the commit in force itself (valid before, refused by newer rules) says
    /// so, rather than "commit X refused; commit X stays in force".
    #[test]
    fn a_refusal_of_the_commit_in_force_says_it_was_accepted_before() {
        let cfg = |commit: &str| ConfigView {
            commit: commit.into(),
            file: ".gitlab/agents/a/config.yaml".into(),
            error: Some("reconcile_timeout: 240h is longer than the maximum of 168h".into()),
            error_commit: Some("c0ffee0000001111".into()),
            updated_at: 0,
            unstored: None,
        };
        let same = refusal(&cfg("c0ffee0000001111")).unwrap();
        assert!(
            same.starts_with(
                "the configuration in force, commit c0ffee000000, is refused now: reconcile_timeout"
            ),
            "{same}"
        );
        let older = refusal(&cfg("aaaabbbbccccdddd")).unwrap();
        assert!(
            older.ends_with("; commit aaaabbbbcccc stays in force"),
            "{older}"
        );
    }

    /// A connected agent without a GitOps stream for an entry is said after a minute (no
    /// replica leads); not while it may be taking its Lease, not when kas does not know.
    #[test]
    fn an_entry_without_a_stream_of_a_connected_agent_is_said_after_a_minute() {
        let sync = |streams: Option<usize>| -> SyncView {
            serde_json::from_value(serde_json::json!({
                "project_id": "group/app", "commit_id": "c", "outcome": "succeeded",
                "error": "", "finished_at": "2026-11-29T10:00:00Z", "dry_run": false,
                "objects": [], "streams": streams,
            }))
            .unwrap()
        };
        let minute = Some(std::time::Duration::from_secs(61));
        let said = no_stream(&sync(Some(0)), minute).unwrap();
        assert!(
            said.starts_with(
                "no GitOps stream: the agent is connected, but no agentk replica leads"
            ),
            "{said}"
        );
        assert_eq!(no_stream(&sync(Some(1)), minute), None);
        assert_eq!(
            no_stream(&sync(None), minute),
            None,
            "unknown: another replica"
        );
        let moments = Some(std::time::Duration::from_secs(20));
        assert_eq!(no_stream(&sync(Some(0)), moments), None, "taking its Lease");
        assert_eq!(
            no_stream(&sync(Some(0)), None),
            None,
            "offline: said otherwise"
        );
    }

    #[test]
    fn an_entry_is_held_by_a_suspension_kas_says_holds_it_whatever_its_id_form() {
        let sync = |project_id: &str, suspended: bool| -> SyncView {
            serde_json::from_value(serde_json::json!({
                "project_id": project_id, "commit_id": "old", "outcome": "succeeded",
                "error": "", "finished_at": "2026-11-29T10:00:00Z", "dry_run": false,
                "objects": [], "suspended": suspended,
            }))
            .unwrap()
        };
        let by_path: SuspensionView = serde_json::from_value(serde_json::json!({
            "project": "group/app", "reason": "", "suspended_by": "admin",
            "suspended_at": "2026-11-29T10:00:00Z",
        }))
        .unwrap();
        let suspensions = std::slice::from_ref(&by_path);
        // An entry written as the project's numeric id: kas matched the suspension by id.
        assert!(held(&sync("42", true), suspensions));
        assert!(!held(&sync("42", false), suspensions));
        // An older kas, without the field: by path.
        assert!(held(&sync("group/app#one", false), suspensions));
        assert!(!held(&sync("group/other", false), suspensions));
    }

    #[test]
    fn an_entry_behind_for_minutes_with_nothing_under_way_is_stalled() {
        let s: SyncView = serde_json::from_value(serde_json::json!({
            "project_id": "group/app", "commit_id": "old", "outcome": "succeeded",
            "error": "", "finished_at": "2026-11-29T10:00:00Z", "dry_run": false,
            "objects": [], "newer_commit": "973dd4292720abcd",
            "newer_since": "2026-11-29T10:00:00Z",
        }))
        .unwrap();
        let at = |t: &str| humantime::parse_rfc3339_weak(t).unwrap();
        let stalled_at = |now: &str, under_way: &[ProgressView]| stalled(&s, under_way, at(now));
        assert_eq!(stalled_at("2026-11-29T10:01:59Z", &[]), None);
        let line = stalled_at("2026-11-29T10:02:30Z", &[]).unwrap();
        assert!(
            line.starts_with("stalled: commit 973dd4292720 was fetched 2m 30s ago"),
            "{line}"
        );
        let running: ProgressView = serde_json::from_value(serde_json::json!({
            "project_id": "group/app", "commit_id": "973dd4292720abcd", "resync_id": 0,
            "objects": 1, "current": 0, "failed": 0, "started_at": "2026-11-29T10:02:00Z",
        }))
        .unwrap();
        assert_eq!(stalled_at("2026-11-29T10:05:00Z", &[running]), None);
        assert_eq!(
            behind_line(&s, at("2026-11-29T10:00:05Z")),
            "newer commit 973dd4292720, fetched at 2026-11-29T10:00:00Z (5s ago): the agent has not reported on it yet"
        );
    }
}
