//! `kas agent reconcile [--wait]`: ask kas to fetch and the agent to sync now, then follow the
//! agent's reports until the one answering this request arrives for every project.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tether_kas_api::{
    AdminClient, AgentRef, ClientError, EarlierView, ProgressView, ReconcileRequest,
    ReconcileStarted, ReportedOutcome, ReportedStatus, SupersedesRequest, SyncView,
};
use tokio::time::Instant;

use super::outage::Outage;
use super::output::{out, short};

/// How often the agent's reports are read while waiting.
const POLL: Duration = Duration::from_millis(300);

/// How a reconcile ended, and its exit code (documented in `kas agent reconcile --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Synchronized, every object Current.
    Synced,
    /// A synchronization failed or an object is not Current.
    Failed,
    /// No report within the timeout.
    TimedOut,
    /// A project's fetch failed or did not finish in time: the newest commit may not be the
    /// one synchronized (the last good one is).
    FetchFailed,
    /// The agent has no stream for a project: nobody heard the request.
    NotDelivered,
    /// The agent's sync ended but kas could not record its report (its database refused the
    /// write): what kas says of the agent cannot be trusted until it can.
    NotRecorded,
}

impl Outcome {
    pub fn code(self) -> u8 {
        match self {
            Self::Synced => 0,
            Self::Failed => 1,
            Self::TimedOut => 3,
            Self::NotDelivered => 4,
            Self::FetchFailed => 5,
            Self::NotRecorded => 6,
        }
    }
}

/// A reconcile that did not end well: the message was printed, the code is the exit code.
#[derive(Debug, thiserror::Error)]
#[error("reconcile {outcome:?}")]
pub struct Unsuccessful {
    pub outcome: Outcome,
}

/// What one report says, counted for a line of progress.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Objects of the commit written (or found as Git has them); not those refused.
    pub applied: usize,
    pub current: usize,
    pub pruned: usize,
    /// Objects whose write failed (`ObjectView::not_applied`), counted in `not_current` too.
    pub not_applied: usize,
    /// `kind/namespace/name status: message` of every object neither Current nor pruned (nor
    /// left in place).
    pub not_current: Vec<String>,
    /// The same of every object that left Git but was not deleted (no longer the agent's): not
    /// a failure, but worth saying, as it still exists.
    pub left_in_place: Vec<String>,
}

/// Counts a report's objects.
pub fn summarize(s: &SyncView) -> Summary {
    let mut out = Summary::default();
    for o in &s.objects {
        let line = || o.line();
        match o.status {
            ReportedStatus::Pruned => out.pruned += 1,
            ReportedStatus::PruneSkipped => out.left_in_place.push(line()),
            ReportedStatus::Current => {
                out.applied += 1;
                out.current += 1;
            }
            _ => {
                if o.not_applied {
                    out.not_applied += 1;
                } else {
                    out.applied += 1;
                }
                out.not_current.push(line());
            }
        }
    }
    out
}

/// How many objects the API server refused to write, after the counts (nothing when none).
fn not_applied_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(", {n} not applied"),
    }
}

/// A report's outcome for the exit code: synced only if it is of the commit fetched (when kas
/// named one), succeeded and all is Current. A report of another commit means the fetched one
/// is not what the cluster runs (refused, or not renderable, while an earlier commit is
/// re-applied), however well that sync went.
pub fn judge(s: &SyncView, summary: &Summary, fetched: Option<&str>) -> Outcome {
    if fetched.is_none_or(|c| c == s.commit_id)
        && s.outcome == ReportedOutcome::Succeeded
        && summary.not_current.is_empty()
    {
        Outcome::Synced
    } else {
        Outcome::Failed
    }
}

/// When the agent reports a commit pushed after the fetched one, on top of it (someone
/// pushed while the reconcile waited), the line saying so: the fetched commit is applied
/// too. Asked of kas, which has the history; an error (an older kas) counts as not.
async fn superseded_line(
    c: &AdminClient,
    agent_id: i64,
    s: &SyncView,
    fetched: Option<&str>,
) -> Option<String> {
    let fetched = fetched.filter(|f| *f != s.commit_id)?;
    let req = SupersedesRequest {
        project: s.project_id.clone(),
        fetched: fetched.to_owned(),
        reported: s.commit_id.clone(),
    };
    c.supersedes(agent_id, &req)
        .await
        .unwrap_or(false)
        .then(|| newer_commit_line(s, fetched))
}

/// The line saying a report is of a newer commit than the one fetched, which it includes.
pub fn newer_commit_line(s: &SyncView, fetched: &str) -> String {
    format!(
        "{}: commit {} was pushed on top of commit {} after the fetch, and supersedes it",
        s.project_id,
        short(&s.commit_id),
        short(fetched)
    )
}

/// The line saying a report is not of the commit fetched, naming that commit.
pub fn other_commit_line(s: &SyncView, fetched: Option<&str>) -> Option<String> {
    let fetched = fetched.filter(|c| *c != s.commit_id)?;
    Some(format!(
        "{}: commit {} was fetched, but the agent reports commit {}: {} is not applied",
        s.project_id,
        short(fetched),
        short(&s.commit_id),
        short(fetched)
    ))
}

/// The commit a report's objects were applied at, when nothing was applied at its own (kas
/// then shows the earlier commit's objects, with a warning naming it).
fn objects_as_of(s: &SyncView) -> Option<&str> {
    s.warnings.iter().find_map(|w| {
        w.strip_prefix(tether_protocol::report::OBJECTS_AS_OF)
            .map(str::trim)
    })
}

/// The progress line of one project's report. Of a commit that applied nothing (refused,
/// waiting), the objects are an earlier commit's: counting them as "applied" said the
/// opposite of what happened.
pub fn report_line(s: &SyncView, summary: &Summary) -> String {
    let (project, commit, outcome) = (&s.project_id, short(&s.commit_id), s.outcome);
    let mut line = match objects_as_of(s) {
        Some(earlier) => format!(
            "{project}: commit {commit} {outcome}: nothing applied at this commit; {} object(s) from commit {} stay: {} Current, {} not Current",
            summary.applied,
            short(earlier),
            summary.current,
            summary.not_current.len()
        ),
        None => format!(
            "{project}: commit {commit} {outcome}: {} applied, {} Current, {} not Current, {} pruned{}",
            summary.applied,
            summary.current,
            summary.not_current.len(),
            summary.pruned,
            not_applied_note(summary.not_applied),
        ),
    };
    if !summary.left_in_place.is_empty() {
        line.push_str(&format!(", {} left in place", summary.left_in_place.len()));
    }
    if !s.error.is_empty() {
        line.push_str(&format!("; error: {}", s.error));
    }
    line
}

/// A sync by identity: the same sync's report is the same in each poll, and kas keeps it in
/// short among the earlier syncs of the reports that replace it.
type SyncKey = (String, String, String, u64, ReportedOutcome);

fn key_of(s: &SyncView) -> SyncKey {
    (
        s.project_id.clone(),
        s.commit_id.clone(),
        s.finished_at.clone(),
        s.resync_id,
        s.outcome,
    )
}

fn earlier_key(project: &str, e: &EarlierView) -> SyncKey {
    (
        project.to_owned(),
        e.commit_id.clone(),
        e.finished_at.clone(),
        e.resync_id,
        e.outcome,
    )
}

/// The syncs known before the request (the reports then and those they replaced) and those
/// shown since: a sync that ran during the reconcile is shown once.
#[derive(Debug, Default)]
pub struct Seen(HashSet<SyncKey>);

impl Seen {
    pub fn before(reports: &[SyncView]) -> Self {
        let mut seen = Self::default();
        for s in reports {
            seen.0.insert(key_of(s));
            let earlier = s.earlier.iter().map(|e| earlier_key(&s.project_id, e));
            seen.0.extend(earlier);
        }
        seen
    }

    /// Whether `key` was not seen yet; it is from now on.
    fn first_time(&mut self, key: SyncKey) -> bool {
        self.0.insert(key)
    }
}

/// Whether a sync ran during the reconcile `resync_id` without answering it: an earlier one,
/// or one a newer commit cut short (a superseded sync is followed by the one that answers).
fn not_the_answer(sync_resync_id: u64, outcome: ReportedOutcome, resync_id: u64) -> bool {
    sync_resync_id < resync_id || outcome == ReportedOutcome::Superseded
}

/// The lines of the syncs during the reconcile `resync_id` that report `s` and the syncs it
/// replaced tell, oldest first, each once. A sync replaced before a poll read it (a commit's
/// sync that pruned, then at once the reconcile's re-sync that found nothing to prune) is
/// told from kas's short record of it.
pub fn during_lines(s: &SyncView, resync_id: u64, seen: &mut Seen) -> Vec<String> {
    let mut lines = Vec::new();
    for e in s.earlier.iter().rev() {
        if not_the_answer(e.resync_id, e.outcome, resync_id)
            && seen.first_time(earlier_key(&s.project_id, e))
        {
            lines.push(earlier_line(&s.project_id, e));
        }
    }
    if not_the_answer(s.resync_id, s.outcome, resync_id) && seen.first_time(key_of(s)) {
        lines.push(during_line(s));
    }
    lines
}

/// The line of a sync that ran during the reconcile without answering it: what it applied and
/// pruned (the answering sync, finding those objects gone, says "0 pruned").
pub fn during_line(s: &SyncView) -> String {
    format!("{}{DURING}", report_line(s, &summarize(s)))
}

const DURING: &str = " (a synchronization during this reconcile, not its answer)";

/// [`during_line`] of a sync kas keeps in short.
fn earlier_line(project: &str, e: &EarlierView) -> String {
    let mut line = format!(
        "{project}: commit {} {}: {} applied, {} Current, {} not Current, {} pruned",
        short(&e.commit_id),
        e.outcome,
        (e.current + e.not_current).saturating_sub(e.not_applied),
        e.current,
        e.not_current,
        e.pruned
    );
    line.push_str(&not_applied_note(
        usize::try_from(e.not_applied).unwrap_or(0),
    ));
    if e.left_in_place > 0 {
        line.push_str(&format!(", {} left in place", e.left_in_place));
    }
    if !e.error.is_empty() {
        line.push_str(&format!("; error: {}", e.error));
    }
    line + DURING
}

/// The line of a sync under way: its objects so far.
pub fn progress_line(p: &ProgressView) -> String {
    if let Some(note) = p.unrecorded_note() {
        return format!("{}: NOT RECORDED: {note}", p.project_id);
    }
    format!(
        "{}: synchronizing commit {}: {} object(s) so far, {} Current, {} failed{}",
        p.project_id,
        short(&p.commit_id),
        p.objects,
        p.current,
        p.failed,
        p.pending_note()
    )
}

/// Where progress goes: a bar and lines above it on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(total: usize) -> Self {
        if !std::io::stdout().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::with_draw_target(
            Some(u64::try_from(total).unwrap_or(u64::MAX)),
            ProgressDrawTarget::stdout(),
        );
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{bar:24}] {pos}/{len} synchronized  {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar: Some(bar) }
    }

    fn line(&self, text: &str) -> Result<()> {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => out!("{text}")?,
        }
        Ok(())
    }

    fn waiting(&self, text: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(text);
        }
    }

    fn done_one(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// A line on standard error (kas coming and going), above the bar on a terminal.
    fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("kas: {text}")),
            None => eprintln!("kas: {text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// How long a reconcile without `--wait` may take to be heard (within `--timeout`): long
/// enough for kas to read a `config.yaml` just pushed and for agentk to restart the GitOps
/// worker of an entry it changed, or for a kas restart.
const START_WITHOUT_WAIT: Duration = Duration::from_secs(15);

pub async fn run(
    c: &AdminClient,
    agent: &AgentRef,
    project: Option<String>,
    wait: bool,
    timeout: Duration,
) -> Result<()> {
    // The whole command, asking included, ends by `--timeout`.
    let budget = if wait {
        timeout
    } else {
        timeout.min(START_WITHOUT_WAIT)
    };
    let deadline = Instant::now() + budget;
    let mut outage = Outage::new(budget);
    // An agent named `project:name` is looked up in kas, which may be restarting as well.
    let agent_id = ride_out(
        (deadline, budget),
        &mut outage,
        "the agent's lookup",
        || c.resolve_agent(agent),
    )
    .await?;
    // The reports before the request: any other one shown while following is of a sync that
    // ran during it (one the request or a configuration change cut, say), whose prunes the
    // answering report does not repeat. None to compare with when kas does not answer.
    let before = if wait {
        c.gitops_status(agent_id).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let started = start(c, agent_id, project, (deadline, budget), &mut outage).await?;
    let followed = started.projects.iter().filter(|t| t.suspended.is_none());
    let progress = Progress::new(if wait { followed.count() } else { 0 });
    let mut worst = Outcome::Synced;
    // kas answered once it had read the newest `config.yaml`: a refused one is not what the
    // agent runs, so a CI step "push config.yaml, then reconcile --wait" must not pass.
    if let Some(why) = config_refusal(c, agent_id).await {
        progress.line(&format!("REFUSED: {why}"))?;
        worst = worst.max(Outcome::FetchFailed);
    }
    for t in &started.projects {
        if let Some(why) = &t.suspended {
            // Held on purpose by an operator: said, not waited for, not a failure.
            progress.line(&format!(
                "{}: {why}: skipped (`kas agent resume {agent} --project {}` resumes it)",
                t.project, t.project
            ))?;
            continue;
        }
        let commit = t.commit.as_deref().map_or("(none)", short);
        let fetched = match &t.fetch_error {
            // Nothing the agent could apply or answer with: following it would only wait out
            // the timeout.
            Some(e) if t.commit.is_none() => {
                worst = worst.max(Outcome::FetchFailed);
                format!(
                    "fetch failed ({e}); no commit of it was ever fetched, so there is nothing to synchronize"
                )
            }
            Some(e) => {
                // The agent still re-applies (drift correction), but whatever was pushed
                // since is not in it: a CI "push, then reconcile --wait" step must fail.
                worst = worst.max(Outcome::FetchFailed);
                format!(
                    "fetch failed ({e}); the newest commit was not fetched, syncing the last good commit {commit}"
                )
            }
            None => format!("fetched, commit {commit}"),
        };
        progress.line(&format!("{}: {fetched}", t.project))?;
        if t.streams == 0 && !never_fetched(t) {
            progress.line(&format!(
                "{}: agent {agent_id} has no GitOps stream for it (offline, or no replica leads)",
                t.project
            ))?;
            worst = worst.max(Outcome::NotDelivered);
        }
    }
    if !wait {
        // Not "asked" when no stream of the agent heard it (exit 4): the lines above say so.
        let heard = started.projects.iter().any(|t| t.streams > 0);
        if heard || started.projects.is_empty() {
            progress.line(&format!(
                "agent {agent_id} asked to synchronize now (reconcile {}); `kas agent status` shows the result",
                started.resync_id
            ))?;
        }
        return finish(worst);
    }
    let outcome = follow(
        c,
        agent_id,
        (&started, &before),
        (deadline, timeout),
        &progress,
    )
    .await?;
    progress.finish();
    finish(worst.max(outcome))
}

/// Why kas refused the agent's newest configuration, if it did. A failure to ask is said on
/// standard error (the reconcile goes on: kas just answered it).
async fn config_refusal(c: &AdminClient, agent_id: i64) -> Option<String> {
    match c.list_agents().await {
        Ok(agents) => agents
            .iter()
            .find(|a| a.id == agent_id)
            .and_then(|a| a.config.as_ref())
            .and_then(super::agent::refusal),
        Err(e) => {
            eprintln!(
                "kas: could not check whether the agent's newest configuration was refused: {e}"
            );
            None
        }
    }
}

/// A project kas never fetched: the agent has no commit of it to synchronize or report on.
fn never_fetched(t: &tether_kas_api::ReconcileTarget) -> bool {
    t.fetch_error.is_some() && t.commit.is_none()
}

fn finish(outcome: Outcome) -> Result<()> {
    match outcome {
        Outcome::Synced => Ok(()),
        outcome => Err(Unsuccessful { outcome }.into()),
    }
}

/// The request, letting kas wait for the configuration in force and the agent's streams
/// until shortly before `deadline`: kas must have time to answer before this side gives up,
/// or an offline agent read "kas did not answer" (exit 1) instead of "no GitOps stream"
/// (exit 4).
fn request(project: Option<String>, deadline: Instant) -> ReconcileRequest {
    let left = deadline.saturating_duration_since(Instant::now());
    ReconcileRequest {
        project,
        wait_ms: Some(u64::try_from(kas_wait(left).as_millis()).unwrap_or(u64::MAX)),
    }
}

/// How long kas may wait of the `left` before the command's deadline (pure): all but the
/// time its answer needs to arrive, a second, or half of what is left when that is short.
fn kas_wait(left: Duration) -> Duration {
    const ANSWER_TIME: Duration = Duration::from_secs(1);
    if left >= ANSWER_TIME * 2 {
        left - ANSWER_TIME
    } else {
        left / 2
    }
}

/// Asks kas for the reconcile, riding out kas being unreachable (a restart, a rolling restart
/// of replicas) until `deadline`, as `--wait` rides it out later: a CI step must not fail
/// because kas was briefly not there when it started.
async fn start(
    c: &AdminClient,
    agent_id: i64,
    project: Option<String>,
    limits: (Instant, Duration),
    outage: &mut Outage,
) -> Result<ReconcileStarted> {
    let deadline = limits.0;
    ride_out(limits, outage, "the reconcile request", || {
        let req = request(project.clone(), deadline);
        async move { c.reconcile(agent_id, &req).await }
    })
    .await
}

/// Makes `ask` until kas answers it or `deadline`, saying once that kas is unreachable and
/// once that it is back. Any answer (a refusal included) ends it.
async fn ride_out<T, F, Fut>(
    (deadline, budget): (Instant, Duration),
    outage: &mut Outage,
    what: &str,
    mut ask: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    loop {
        let Ok(asked) = tokio::time::timeout_at(deadline, ask()).await else {
            anyhow::bail!(
                "kas did not answer {what} within {}",
                humantime::format_duration(budget)
            );
        };
        match asked {
            Ok(answer) => {
                if let Some(line) = outage.answered() {
                    eprintln!("kas: {line}");
                }
                return Ok(answer);
            }
            Err(e) if e.is_unreachable() && Instant::now() < deadline => {
                if let Some(line) = outage.lost_asking(&e) {
                    eprintln!("kas: {line}");
                }
                tokio::time::sleep_until(deadline.min(Instant::now() + outage.delay(POLL))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the agent's reports until each project delivered to has answered, or the deadline.
async fn follow(
    c: &AdminClient,
    agent_id: i64,
    (started, before): (&ReconcileStarted, &[SyncView]),
    (deadline, timeout): (Instant, Duration),
    progress: &Progress,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut pending: Vec<&str> = started
        .projects
        .iter()
        .filter(|t| t.streams > 0 && !never_fetched(t) && t.suspended.is_none())
        .map(|t| t.project.as_str())
        .collect();
    let mut worst = Outcome::Synced;
    let mut shown = Vec::new();
    // Entries waiting for a dependency, with the wait last shown: not an answer yet.
    let mut waits: HashMap<String, String> = HashMap::new();
    let mut failed: Vec<String> = Vec::new();
    let mut outage = Outage::new(timeout);
    let mut seen = Seen::before(before);
    while !pending.is_empty() {
        for s in poll_reports(c, agent_id, &mut outage, progress).await? {
            if !pending.contains(&s.project_id.as_str()) {
                continue;
            }
            for line in during_lines(&s, started.resync_id, &mut seen) {
                progress.line(&line)?;
            }
            if not_the_answer(s.resync_id, s.outcome, started.resync_id) {
                continue;
            }
            // A superseded sync (shown above) is followed by the one that answers: a new
            // commit cut its wait after the request.
            let not_yet = s.outcome == ReportedOutcome::Waiting && !waiting_is_final(&s, &failed);
            if not_yet {
                if waits.get(&s.project_id) != Some(&s.error) {
                    progress.line(&format!(
                        "{}: commit {} {}",
                        s.project_id,
                        short(&s.commit_id),
                        s.error
                    ))?;
                    waits.insert(s.project_id.clone(), s.error.clone());
                }
                continue;
            }
            waits.remove(&s.project_id);
            pending.retain(|p| *p != s.project_id);
            let summary = summarize(&s);
            let fetched = started
                .projects
                .iter()
                .find(|t| t.project == s.project_id)
                .and_then(|t| t.commit.as_deref());
            progress.line(&report_line(&s, &summary))?;
            let fetched = match superseded_line(c, agent_id, &s, fetched).await {
                Some(line) => {
                    progress.line(&line)?;
                    None
                }
                None => fetched,
            };
            if let Some(line) = other_commit_line(&s, fetched) {
                progress.line(&line)?;
            }
            for o in summary.not_current.iter().chain(&summary.left_in_place) {
                progress.line(&format!("    {o}"))?;
            }
            let judged = judge(&s, &summary, fetched);
            if judged != Outcome::Synced {
                failed.push(s.project_id.clone());
            }
            worst = worst.max(judged);
            progress.done_one();
        }
        if pending.is_empty() {
            break;
        }
        if outage.reask_due() {
            reask(c, agent_id, &pending, (&mut outage, deadline), progress).await?;
        }
        if !outage.is_down() {
            let unrecorded = show_progress(
                c,
                agent_id,
                started.resync_id,
                &pending,
                progress,
                &mut shown,
            )
            .await?;
            // Its report will not show until kas can record it: waiting would time out.
            if !unrecorded.is_empty() {
                pending.retain(|p| !unrecorded.iter().any(|u| u == p));
                worst = worst.max(Outcome::NotRecorded);
            }
        }
        if Instant::now() >= deadline {
            if let Some(down) = outage.down_for() {
                progress.note(&format!("kas has been unreachable for {}s", down.as_secs()));
            }
            return timed_out(progress, (agent_id, timeout), &pending, (&waits, &shown))
                .map(|o| worst.max(o));
        }
        if shown.is_empty() {
            progress.waiting(format!(
                "agent {agent_id} synchronizing {} ({}s)",
                pending.join(", "),
                t0.elapsed().as_secs()
            ));
        }
        tokio::time::sleep(outage.delay(POLL).min(deadline - Instant::now())).await;
    }
    Ok(worst)
}

/// The agent's reports, or none while kas is unreachable (a restart, a rolling restart of
/// replicas): that is waited out until `--timeout`, saying so when it starts and ends.
async fn poll_reports(
    c: &AdminClient,
    agent_id: i64,
    outage: &mut Outage,
    progress: &Progress,
) -> Result<Vec<SyncView>> {
    match c.gitops_status(agent_id).await {
        Ok(reports) => {
            if let Some(line) = outage.answered() {
                progress.note(&line);
            }
            Ok(reports)
        }
        Err(e) if e.is_unreachable() => {
            if let Some(line) = outage.lost(&e) {
                progress.note(&line);
            }
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// Asks again for the synchronization of the projects still pending, once kas answers after
/// being unreachable. kas holds a reconcile request only in memory (the directive channels of
/// `tether_gitops_server::control`); a restarted kas starts with none. A request the agent
/// had heard is still answered — its sync goes on, and agentk re-sends its report when its
/// stream reopens — but nothing tells whether it was heard before kas went away (kas killed
/// between answering the request and writing it to the agent's stream, or the peer replica
/// holding that stream stopping), and an unheard one would be waited for until `--timeout`.
/// Asking again costs at most one more synchronization, and its id is higher, so its report
/// answers this wait too (`resync_id >= started.resync_id`). Asked until every pending
/// project's stream heard it: the agent's stream comes back to a new kas after a backoff.
async fn reask(
    c: &AdminClient,
    agent_id: i64,
    pending: &[&str],
    (outage, deadline): (&mut Outage, Instant),
    progress: &Progress,
) -> Result<()> {
    let mut heard = Vec::new();
    for project in pending {
        let req = request(Some((*project).to_owned()), deadline);
        // A restarted kas fetches before it answers: no later than `--timeout` all the same.
        let Ok(asked) = tokio::time::timeout_at(deadline, c.reconcile(agent_id, &req)).await else {
            return Ok(());
        };
        match asked {
            Ok(started) => heard.push((started.resync_id, started.projects)),
            Err(e) => return lost_again(e, outage, progress),
        }
    }
    if heard.iter().flat_map(|(_, t)| t).all(|t| t.streams > 0) {
        outage.reasked();
        let ids: Vec<String> = heard.iter().map(|(id, _)| id.to_string()).collect();
        progress.note(&format!(
            "asked the agent again to synchronize {} (reconcile {}): kas may have lost the first request while unreachable",
            pending.join(", "),
            ids.join(", ")
        ));
    }
    Ok(())
}

/// Asking again found no kas: waited out like a poll. A conflict is asked again at the next
/// poll too: a restarted kas has no configuration of the agent in force until the agent's
/// configuration stream is back, and says 409 until then. Any other error ends the wait.
fn lost_again(e: ClientError, outage: &mut Outage, progress: &Progress) -> Result<()> {
    let line = match &e {
        ClientError::Status { status, message } if *status == http::StatusCode::CONFLICT => {
            outage.refused(message)
        }
        e if e.is_unreachable() => outage.lost(e),
        _ => return Err(e.into()),
    };
    if let Some(line) = line {
        progress.note(&line);
    }
    Ok(())
}

/// Whether a `waiting` report ends the wait: only when the dependency it waits for failed in
/// this very reconcile (it will not become ready without a change). Otherwise the dependency is
/// synchronizing, rolling out or not fetched yet, and the entry applies once it is ready — its
/// report then answers this reconcile too — so `--wait` follows it (a monorepo commit makes
/// every dependant wait a moment; that is no failure).
fn waiting_is_final(s: &SyncView, failed: &[String]) -> bool {
    failed
        .iter()
        .any(|p| s.error.starts_with(&format!("waiting for dependency {p}:")))
}

/// The end of `--wait` at `--timeout`: entries still waiting for a dependency did not apply
/// this reconcile's commit (exit 1, naming the wait); entries that sent nothing time out
/// (exit 3), each with the progress last heard of it — which names the object the sync was
/// waiting for, so that the user knows what to look at.
fn timed_out(
    progress: &Progress,
    (agent_id, timeout): (i64, Duration),
    pending: &[&str],
    (waits, shown): (&HashMap<String, String>, &[String]),
) -> Result<Outcome> {
    let silent: Vec<&str> = pending
        .iter()
        .copied()
        .filter(|p| !waits.contains_key(*p))
        .collect();
    for p in pending.iter().filter(|p| waits.contains_key(**p)) {
        progress.line(&format!(
            "{p}: still waiting after {timeout:?}, nothing applied: {}",
            waits[*p]
        ))?;
    }
    if silent.is_empty() {
        return Ok(Outcome::Failed);
    }
    progress.line(&format!(
        "timed out after {timeout:?} waiting for agent {agent_id}'s report of {}",
        silent.join(", ")
    ))?;
    for line in last_heard(shown, &silent) {
        progress.line(&format!("    last heard: {line}"))?;
    }
    Ok(Outcome::TimedOut)
}

/// The progress lines shown last of these projects.
fn last_heard<'a>(shown: &'a [String], projects: &[&str]) -> Vec<&'a str> {
    shown
        .iter()
        .filter(|l| projects.iter().any(|p| l.starts_with(&format!("{p}: "))))
        .map(String::as_str)
        .collect()
}

/// Shows the progress the agent reported for the pending projects of this reconcile: on a
/// terminal in the bar's message, piped a line each time it changes. Returns the projects
/// whose sync for it ended with a report kas could not record, said on a line of their own.
async fn show_progress(
    c: &AdminClient,
    agent_id: i64,
    resync_id: u64,
    pending: &[&str],
    progress: &Progress,
    shown: &mut Vec<String>,
) -> Result<Vec<String>> {
    let reported = match c.gitops_progress(agent_id).await {
        // Progress is only shown: the next poll of the reports says kas went away.
        Err(e) if e.is_unreachable() => return Ok(Vec::new()),
        reported => reported?,
    };
    let (ended, running): (Vec<&ProgressView>, Vec<&ProgressView>) = reported
        .iter()
        .filter(|p| p.resync_id >= resync_id && pending.contains(&p.project_id.as_str()))
        .partition(|p| p.unrecorded.is_some());
    for p in &ended {
        progress.line(&progress_line(p))?;
    }
    let unrecorded = ended.iter().map(|p| p.project_id.clone()).collect();
    let lines: Vec<String> = running.into_iter().map(progress_line).collect();
    if lines.is_empty() || lines == *shown {
        return Ok(unrecorded);
    }
    match &progress.bar {
        Some(_) => progress.waiting(lines.join("; ")),
        None => {
            for l in lines.iter().filter(|l| !shown.contains(l)) {
                progress.line(l)?;
            }
        }
    }
    *shown = lines;
    Ok(unrecorded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_kas_api::ObjectView;

    fn object(kind: &str, name: &str, status: ReportedStatus, message: &str) -> ObjectView {
        ObjectView {
            group: String::new(),
            kind: kind.into(),
            namespace: "ns".into(),
            name: name.into(),
            status,
            message: message.into(),
            not_applied: false,
        }
    }

    fn report(outcome: ReportedOutcome, objects: Vec<ObjectView>) -> SyncView {
        SyncView {
            project_id: "group/manifests".into(),
            commit_id: "0123456789abcdef".into(),
            outcome,
            error: String::new(),
            finished_at: String::new(),
            dry_run: false,
            objects,
            warnings: Vec::new(),
            resync_id: 1,
            chart_version: String::new(),
            fetch_error: String::new(),
            newer_commit: String::new(),
            newer_since: None,
            suspended: false,
            streams: None,
            earlier: Vec::new(),
        }
    }

    /// A monorepo commit makes a dependant wait while its dependency synchronizes: `--wait`
    /// follows it (exit 1 on every such commit made CI gates useless); only a dependency that
    /// failed in the same reconcile ends the wait.
    #[test]
    fn a_wait_for_a_dependency_ends_the_follow_only_once_that_dependency_failed() {
        let mut waiting = report(ReportedOutcome::Waiting, Vec::new());
        waiting.error = "waiting for dependency group/infra: its synchronization of commit \
                         925c8abd is under way"
            .into();
        assert!(!waiting_is_final(&waiting, &[]));
        assert!(!waiting_is_final(&waiting, &["group/infra-extra".into()]));
        assert!(waiting_is_final(&waiting, &["group/infra".into()]));
    }

    #[test]
    fn all_current_is_synced_and_anything_else_fails_naming_the_object() {
        let ok = report(
            ReportedOutcome::Succeeded,
            vec![
                object("Deployment", "web", ReportedStatus::Current, ""),
                object("ConfigMap", "old", ReportedStatus::Pruned, ""),
            ],
        );
        let s = summarize(&ok);
        assert_eq!((s.applied, s.current, s.pruned), (1, 1, 1));
        assert_eq!(judge(&ok, &s, None), Outcome::Synced);
        assert_eq!(
            report_line(&ok, &s),
            "group/manifests: commit 0123456789ab succeeded: 1 applied, 1 Current, 0 not Current, 1 pruned"
        );

        let bad = report(
            ReportedOutcome::Failed,
            vec![object(
                "Deployment",
                "web",
                ReportedStatus::Failed,
                "forbidden",
            )],
        );
        let s = summarize(&bad);
        assert_eq!(s.not_current, ["Deployment/ns/web Failed: forbidden"]);
        assert_eq!(judge(&bad, &s, None), Outcome::Failed);
        // A Deployment refused by the API server was not applied: not counted as such.
        let mut refused = object("Deployment", "web", ReportedStatus::Failed, "forbidden");
        refused.not_applied = true;
        let ok = object("ConfigMap", "cm", ReportedStatus::Current, "");
        let partly = report(ReportedOutcome::Failed, vec![refused, ok]);
        let s = summarize(&partly);
        assert_eq!((s.applied, s.current, s.not_applied), (1, 1, 1));
        assert_eq!(
            report_line(&partly, &s),
            "group/manifests: commit 0123456789ab failed: 1 applied, 1 Current, 1 not Current, 0 pruned, 1 not applied"
        );
        // Succeeded but still rolling out is not "synced" either.
        let slow = report(
            ReportedOutcome::Succeeded,
            vec![object("Deployment", "web", ReportedStatus::InProgress, "")],
        );
        assert_eq!(judge(&slow, &summarize(&slow), None), Outcome::Failed);
    }

    #[test]
    fn an_object_left_in_place_is_said_but_is_no_failure() {
        let kept = report(
            ReportedOutcome::Succeeded,
            vec![
                object("Deployment", "web", ReportedStatus::Current, ""),
                object(
                    "ConfigMap",
                    "kept",
                    ReportedStatus::PruneSkipped,
                    "left in place",
                ),
            ],
        );
        let s = summarize(&kept);
        assert_eq!((s.applied, s.pruned), (1, 0));
        assert_eq!(
            s.left_in_place,
            ["ConfigMap/ns/kept PruneSkipped: left in place"]
        );
        assert_eq!(judge(&kept, &s, None), Outcome::Synced);
        assert_eq!(
            report_line(&kept, &s),
            "group/manifests: commit 0123456789ab succeeded: 1 applied, 1 Current, 0 not Current, 0 pruned, 1 left in place"
        );
    }

    /// A refused or waiting commit applied nothing: the objects kas shows are an earlier
    /// commit's, and the line says so rather than "2 applied".
    #[test]
    fn a_commit_that_applied_nothing_is_not_said_to_have_applied_the_earlier_objects() {
        let mut refused = report(
            ReportedOutcome::Failed,
            vec![
                object("Deployment", "web", ReportedStatus::Current, ""),
                object("Service", "web", ReportedStatus::Current, ""),
            ],
        );
        refused.error = "refused".into();
        refused.warnings.push(format!(
            "{} fedcba9876543210",
            tether_protocol::report::OBJECTS_AS_OF
        ));
        let line = report_line(&refused, &summarize(&refused));
        assert_eq!(
            line,
            "group/manifests: commit 0123456789ab failed: nothing applied at this commit; 2 object(s) from commit fedcba987654 stay: 2 Current, 0 not Current; error: refused"
        );
        refused.outcome = ReportedOutcome::Waiting;
        refused.error.clear();
        let line = report_line(&refused, &summarize(&refused));
        assert!(
            line.contains("waiting: nothing applied at this commit") && !line.contains("applied,"),
            "{line}"
        );
    }

    #[test]
    fn a_report_of_another_commit_than_the_fetched_one_fails_naming_it() {
        let older = report(
            ReportedOutcome::Succeeded,
            vec![object("Deployment", "web", ReportedStatus::Current, "")],
        );
        let s = summarize(&older);
        let fetched = Some("fedcba9876543210");
        assert_eq!(judge(&older, &s, fetched), Outcome::Failed);
        assert_eq!(
            other_commit_line(&older, fetched).as_deref(),
            Some(
                "group/manifests: commit fedcba987654 was fetched, but the agent reports commit 0123456789ab: fedcba987654 is not applied"
            )
        );
        assert_eq!(
            newer_commit_line(&older, "fedcba9876543210"),
            "group/manifests: commit 0123456789ab was pushed on top of commit fedcba987654 after the fetch, and supersedes it"
        );
        let same = Some("0123456789abcdef");
        assert_eq!(judge(&older, &s, same), Outcome::Synced);
        assert_eq!(other_commit_line(&older, same), None);
        assert_eq!(other_commit_line(&older, None), None);
    }

    /// A sync that pruned and was cut by the reconcile (or ran before its answer) is shown
    /// with its prunes once, and a report already there before the request is not.
    #[test]
    fn a_sync_during_the_reconcile_is_shown_once_with_what_it_pruned() {
        let mut cut = report(
            ReportedOutcome::Superseded,
            vec![object("ConfigMap", "extra", ReportedStatus::Pruned, "")],
        );
        cut.finished_at = "2026-11-28T10:00:00Z".into();
        let older = report(ReportedOutcome::Succeeded, Vec::new());
        let mut seen = Seen::before(std::slice::from_ref(&older));
        assert_eq!(
            during_lines(&cut, 7, &mut seen),
            [
                "group/manifests: commit 0123456789ab superseded: 0 applied, 0 Current, 0 not Current, 1 pruned (a synchronization during this reconcile, not its answer)"
            ]
        );
        assert!(during_lines(&cut, 7, &mut seen).is_empty(), "shown twice");
        let mut seen = Seen::before(std::slice::from_ref(&cut));
        assert!(during_lines(&cut, 7, &mut seen).is_empty(), "there before");
    }

    /// The sync of a commit that pruned, replaced by the reconcile's answer before any poll
    /// read it, is told from kas's short record of it (it was not shown at all), once; one
    /// already known before the request is not.
    #[test]
    fn a_sync_replaced_before_a_poll_read_it_is_told_from_the_answers_earlier_syncs() {
        let pruning = EarlierView {
            commit_id: "fedcba9876543210".into(),
            outcome: ReportedOutcome::Succeeded,
            error: String::new(),
            finished_at: "2026-11-28T10:00:01Z".into(),
            resync_id: 6,
            current: 1,
            not_current: 0,
            not_applied: 0,
            pruned: 2,
            left_in_place: 1,
        };
        let known = EarlierView {
            finished_at: "2026-11-28T09:00:00Z".into(),
            resync_id: 5,
            ..pruning.clone()
        };
        let mut answer = report(ReportedOutcome::Succeeded, Vec::new());
        answer.resync_id = 7;
        answer.earlier = vec![pruning, known.clone()];
        let mut before = report(ReportedOutcome::Succeeded, Vec::new());
        before.finished_at = known.finished_at.clone();
        before.commit_id = known.commit_id.clone();
        before.resync_id = known.resync_id;
        let mut seen = Seen::before(&[before]);
        assert_eq!(
            during_lines(&answer, 7, &mut seen),
            [
                "group/manifests: commit fedcba987654 succeeded: 1 applied, 1 Current, 0 not Current, 2 pruned, 1 left in place (a synchronization during this reconcile, not its answer)"
            ]
        );
        assert!(during_lines(&answer, 7, &mut seen).is_empty(), "told twice");
    }

    #[test]
    fn progress_says_how_many_objects_so_far_how_they_are_and_what_it_waits_for() {
        let mut p = ProgressView {
            project_id: "group/manifests".into(),
            commit_id: "0123456789abcdef".into(),
            resync_id: 7,
            objects: 3,
            current: 1,
            failed: 1,
            pending: None,
            unrecorded: None,
        };
        assert_eq!(
            progress_line(&p),
            "group/manifests: synchronizing commit 0123456789ab: 3 object(s) so far, 1 Current, 1 failed"
        );
        p.pending = Some(object(
            "Deployment",
            "web",
            ReportedStatus::InProgress,
            "Deployment rollout: 0 of 1 updated replicas are available",
        ));
        assert_eq!(
            progress_line(&p),
            "group/manifests: synchronizing commit 0123456789ab: 3 object(s) so far, 1 Current, 1 failed; not Current yet: Deployment/ns/web InProgress: Deployment rollout: 0 of 1 updated replicas are available"
        );
    }

    #[test]
    fn the_timeout_repeats_the_progress_last_heard_of_each_silent_project() {
        let shown = [
            "a/b: synchronizing commit 0123: 1 object(s) so far".to_string(),
            "a/bc: synchronizing commit 4567: 2 object(s) so far".to_string(),
        ];
        assert_eq!(last_heard(&shown, &["a/b"]), [shown[0].as_str()]);
        assert!(last_heard(&shown, &["a"]).is_empty());
    }

    #[test]
    fn kas_is_given_time_to_answer_before_the_deadline() {
        assert_eq!(kas_wait(Duration::from_secs(20)), Duration::from_secs(19));
        assert_eq!(kas_wait(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            kas_wait(Duration::from_millis(800)),
            Duration::from_millis(400)
        );
        assert_eq!(kas_wait(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn exit_codes_are_distinct_and_the_worst_outcome_wins() {
        let codes: Vec<u8> = [
            Outcome::Synced,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::FetchFailed,
            Outcome::NotDelivered,
            Outcome::NotRecorded,
        ]
        .map(Outcome::code)
        .to_vec();
        assert_eq!(codes, [0, 1, 3, 5, 4, 6]);
        assert_eq!(Outcome::Synced.max(Outcome::Failed), Outcome::Failed);
        assert_eq!(Outcome::Failed.max(Outcome::TimedOut), Outcome::TimedOut);
        // A synchronization that went well does not hide that the newest commit is not in it.
        assert_eq!(
            Outcome::FetchFailed.max(Outcome::Synced),
            Outcome::FetchFailed
        );
        assert_eq!(
            Outcome::Failed.max(Outcome::FetchFailed),
            Outcome::FetchFailed
        );
    }
}
