//! GitOps: time from a commit reaching kas (push webhook) until agentk has applied every object
//! and every object is Current, against `kubectl apply --server-side` + `kubectl wait` of the
//! same files; write requests per sync and re-sync; agentk's memory and the idle CPU of kas and
//! agentk.
//!
//! One kas (grpc, `git.poll_interval` 1 h so only webhooks fetch) and one agentk (log level
//! info, `--gitops-resync-interval` 1 h so no periodic re-sync runs during a measurement) with
//! three manifest projects `bench/m100`, `bench/m1000` and `bench/m5000`, each its own Git
//! repository and its own namespace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::agent_log::{LogTail, phases, unix_now, wait_sync, wait_syncs};
use crate::apimetrics::Scraper;
use crate::footprint::{cpu_seconds, status_bytes};
use crate::kubectl::kubectl_baseline;
use crate::peers::{ENGINES, run_engine, slug};
use crate::servers::{Ctx, Kas, KasOptions, agentk_args};
use crate::util::{
    Proc, body_of, check_runs, git_commit_all, git_init_commit, https_client, spawn,
};
use crate::watch::{CurrentWatch, lag};

/// Objects per manifest project.
pub const SIZES: [usize; 3] = [100, 1000, 5000];
/// Objects per multi-document file (kas selects at most 1,000 files per project).
const PER_FILE: usize = 50;
/// Every tenth object is a Deployment, the rest are ConfigMaps.
const DEPLOYMENT_EVERY: usize = 10;
const IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The agent and kas sit idle this long while their CPU time is measured.
const IDLE: Duration = Duration::from_secs(60);
const HOOK_SECRET: &str = "bench-webhook-secret";
/// Where the manifests live in each repository, and the glob that selects them.
const MANIFEST_DIR: &str = "manifests";
const GLOB: &str = "/manifests/**/*.yaml";

fn object_yaml(i: usize, version: u32) -> String {
    if i % DEPLOYMENT_EVERY == DEPLOYMENT_EVERY - 1 {
        let name = format!("deploy-{i:05}");
        [
            "apiVersion: apps/v1",
            "kind: Deployment",
            "metadata:",
            &format!("  name: {name}"),
            "  labels:",
            &format!("    app: {name}"),
            "spec:",
            "  replicas: 1",
            "  selector:",
            "    matchLabels:",
            &format!("      app: {name}"),
            "  template:",
            "    metadata:",
            "      labels:",
            &format!("        app: {name}"),
            "    spec:",
            "      containers:",
            "      - name: pause",
            &format!("        image: {IMAGE}"),
            "",
        ]
        .join("\n")
    } else {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:05}\ndata:\n  index: \"{i}\"\n  version: \"{version}\"\n  greeting: hello from git\n"
        )
    }
}

/// Writes `n` objects into `<repo>/manifests/objects-NNN.yaml`, `PER_FILE` per file, with no
/// namespace (agentk uses the project's `default_namespace`, kubectl its `-n`). Object
/// `changed` gets `version: "2"`. Returns the number of files.
pub(crate) fn write_manifests(repo: &Path, n: usize, changed: Option<usize>) -> Result<usize> {
    let dir = repo.join(MANIFEST_DIR);
    std::fs::create_dir_all(&dir)?;
    let mut files = 0;
    for (f, start) in (0..n).step_by(PER_FILE).enumerate() {
        let docs: Vec<String> = (start..(start + PER_FILE).min(n))
            .map(|i| object_yaml(i, if changed == Some(i) { 2 } else { 1 }))
            .collect();
        std::fs::write(dir.join(format!("objects-{f:03}.yaml")), docs.join("---\n"))?;
        files += 1;
    }
    Ok(files)
}

/// One manifest project: its repository, kas id and namespaces.
struct Project {
    objects: usize,
    path: String,
    repo: PathBuf,
    kas_id: i64,
    gitops_ns: String,
    kubectl_ns: String,
    /// The floor client's namespaces (a run before agentk's and one after), and one per engine
    /// of [`ENGINES`].
    floor_ns: [String; 2],
    peer_ns: Vec<String>,
    head: String,
}

/// POSTs a GitLab push webhook for `project` to kas's API listener.
async fn push_webhook(kas: &Kas, project: &Project) -> Result<()> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = json!({"object_kind": "push", "ref": "refs/heads/main", "after": project.head});
    let req = http::Request::post(format!(
        "http://127.0.0.1:{}/webhooks/projects/{}",
        kas.api_port, project.kas_id
    ))
    .header("x-gitlab-token", HOOK_SECRET)
    .header("x-gitlab-event", "Push Hook")
    .header(http::header::CONTENT_TYPE, "application/json")
    .body(Full::new(Bytes::from(body.to_string())))?;
    body_of(&client, req, &format!("webhook for {}", project.path)).await?;
    Ok(())
}

/// The agent process with its log, restarted for the re-sync measurement.
struct Agent {
    proc: Proc,
    tail: LogTail,
}

impl Agent {
    async fn start(ctx: &Ctx, args: &[String], log: &Path) -> Result<Agent> {
        let proc = spawn(&ctx.agentk_bin, args, log)?;
        // `Proc` runs setpriv, which execs agentk: the pid must be agentk's own.
        check_runs(proc.pid(), &ctx.agentk_bin).await?;
        Ok(Agent {
            proc,
            tail: LogTail::new(log),
        })
    }
}

/// The GitOps section. Without `full` (`--only gitops-agentk`, for working on agentk), only
/// agentk's first sync of each size and the floor client run, then memory a minute after.
pub async fn run(ctx: &Ctx, full: bool) -> Result<Value> {
    let dir = ctx.work.join("gitops");
    std::fs::create_dir_all(&dir)?;
    let http = https_client(&std::fs::read(&ctx.env.ca_file)?)?;
    let auth = format!("Bearer {}", ctx.sa_token);
    let api = Scraper {
        http: &http,
        server: &ctx.env.server,
        auth: &auth,
    };
    let peers = Peers {
        ctx,
        api: &api,
        state: dir.join("peers"),
    };
    std::fs::create_dir_all(&peers.state)?;
    let mut projects = create_projects(ctx, &dir)?;
    let config = agent_config_repo(&dir, &projects)?;
    let (kas, agent_id, token) = start_kas(ctx, &dir, &config, &mut projects).await?;
    let args = agentk_args(
        ctx,
        &format!("grpc://127.0.0.1:{}", kas.agent_port),
        &token,
        &["--log-level", "info", "--gitops-resync-interval", "1h"],
    )?;
    let mut agent = Agent::start(ctx, &args, &kas.dir.join("agentk-1.log")).await?;
    kas.wait_configured(agent_id).await?;
    // The first synchronization of each (empty) project, then idle memory.
    wait_syncs(&mut agent.tail, &sync_targets(&projects)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = status_bytes(agent.proc.pid(), "VmRSS")?;
    let kas_rss_idle = status_bytes(kas.proc.pid(), "VmRSS")?;
    eprintln!(
        "bench: agentk idle RSS {:.1} MiB",
        idle_rss as f64 / 1048576.0
    );

    // Each size: kubectl first (into its own namespace), then agentk, then the floor client and
    // the peers' engines (each into its own namespace).
    let mut syncs = Vec::new();
    for p in &mut projects {
        let mut sync = measure_sync(ctx, &api, &kas, &mut agent, p, full, &peers).await?;
        if full {
            sync["peers"] = peers.engines(p).await?.into();
        }
        syncs.push(sync);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let peak_rss = status_bytes(agent.proc.pid(), "VmHWM")?;
    let rss_after = status_bytes(agent.proc.pid(), "VmRSS")?;
    let rss_minute_after = rss_a_minute_after(&agent, &syncs).await?;
    eprintln!(
        "bench: agentk peak RSS {:.1} MiB, {:.1} MiB a minute after",
        peak_rss as f64 / 1048576.0,
        rss_minute_after as f64 / 1048576.0
    );
    if !full {
        return Ok(json!({
            "syncs": syncs,
            "footprint": {
                "agentk_idle_rss_bytes": idle_rss,
                "agentk_peak_rss_bytes": peak_rss,
                "agentk_rss_minute_after_bytes": rss_minute_after,
            },
        }));
    }

    let mut one_change = measure_one_change(&kas, &mut agent, &mut projects).await?;
    let largest = projects
        .iter()
        .max_by_key(|p| p.objects)
        .context("no projects")?;
    one_change["peers"] = peers.engines(largest).await?.into();
    // The peers' re-sync: the same set again, unchanged since their last apply.
    let peer_resyncs = peers.engines(largest).await?;
    // (b) Re-sync of unchanged commits: restart agentk; its first sync of each project is a
    // re-sync of the commit it already applied.
    agent.proc.stop()?;
    let t0 = unix_now();
    let mut agent = Agent::start(ctx, &args, &kas.dir.join("agentk-2.log")).await?;
    let seen = wait_syncs(&mut agent.tail, &sync_targets(&projects)).await?;
    let mut resyncs = Vec::new();
    for (p, seen) in projects.iter().zip(seen) {
        eprintln!(
            "bench: re-sync of {} after restart: {:.2} s, {} writes",
            p.path,
            seen.done - t0,
            seen.writes
        );
        resyncs.push(phases(p.objects, &seen, t0));
    }

    let idle = measure_idle(&kas, &agent).await?;
    let mut prune = measure_prune(&kas, &mut agent, &mut projects).await?;
    let thousand = projects
        .iter()
        .find(|p| p.objects == 1000)
        .context("no 1,000-object project")?;
    prune["peers"] = peers.engines(thousand).await?.into();
    agent.proc.stop()?;

    Ok(json!({
        "syncs": syncs,
        "resyncs": resyncs,
        "peer_resyncs": peer_resyncs,
        "one_change": one_change,
        "prune": prune,
        "footprint": {
            "agentk_idle_rss_bytes": idle_rss,
            "agentk_peak_rss_bytes": peak_rss,
            "agentk_rss_after_syncs_bytes": rss_after,
            "agentk_rss_minute_after_bytes": rss_minute_after,
            "agentk_rss_end_bytes": idle.agent_rss_end,
            "kas_rss_idle_bytes": kas_rss_idle,
            "kas_rss_end_bytes": idle.kas_rss_end,
            "idle_seconds": idle.wall,
            "agentk_cpu_idle_seconds": idle.agent_cpu,
            "kas_cpu_idle_seconds": idle.kas_cpu,
        },
    }))
}

/// Repositories that start with one commit without YAML, and a namespace per size and path.
fn create_projects(ctx: &Ctx, dir: &Path) -> Result<Vec<Project>> {
    let mut projects = Vec::new();
    for n in SIZES {
        let repo = dir.join(format!("m{n}"));
        std::fs::create_dir_all(&repo)?;
        std::fs::write(repo.join("README.md"), "Benchmark manifests.\n")?;
        let head = git_init_commit(&repo, "empty")?;
        projects.push(Project {
            objects: n,
            path: format!("bench/m{n}"),
            repo,
            kas_id: 0,
            gitops_ns: ctx.env.create_namespace(&format!("gitops-{n}"))?,
            kubectl_ns: ctx.env.create_namespace(&format!("kubectl-{n}"))?,
            floor_ns: [
                ctx.env.create_namespace(&format!("floor-{n}-before"))?,
                ctx.env.create_namespace(&format!("floor-{n}-after"))?,
            ],
            peer_ns: ENGINES
                .iter()
                .map(|e| ctx.env.create_namespace(&format!("{}-{n}", slug(e))))
                .collect::<Result<_, _>>()?,
            head,
        });
    }
    Ok(projects)
}

/// The agent configuration project: every manifest project, each into its own namespace.
fn agent_config_repo(dir: &Path, projects: &[Project]) -> Result<PathBuf> {
    let config = dir.join("config");
    let agent_dir = config.join(".gitlab/agents/gitops");
    std::fs::create_dir_all(&agent_dir)?;
    let mut yaml = String::from("gitops:\n  manifest_projects:\n");
    for p in projects {
        yaml.push_str(&format!(
            "  - id: {}\n    default_namespace: {}\n    paths:\n    - glob: '{GLOB}'\n",
            p.path, p.gitops_ns
        ));
        // The prune measurement uses background propagation, the default of Flux and cli-utils:
        // with GitLab's default (foreground) the time is kube-controller-manager's garbage
        // collection of the Deployments' ReplicaSets and Pods (20 QPS), not the agent's work.
        yaml.push_str("    prune_propagation_policy: background\n");
    }
    yaml.push_str("observability:\n  logging:\n    level: info\n");
    std::fs::write(agent_dir.join("config.yaml"), yaml)?;
    git_init_commit(&config, "agent configuration")?;
    Ok(config)
}

/// kas with the projects (webhooks signed with [`HOOK_SECRET`]) and the agent registered;
/// returns it, the agent's id and its token file.
async fn start_kas(
    ctx: &Ctx,
    dir: &Path,
    config: &Path,
    projects: &mut [Project],
) -> Result<(Kas, i64, PathBuf)> {
    let secret = dir.join("webhook-secret");
    std::fs::write(&secret, HOOK_SECRET)?;
    let kas = Kas::start(
        ctx,
        "kas-gitops",
        &KasOptions {
            agent_tls: false,
            git_poll: "1h",
            log_level: "warn",
        },
    )
    .await?;
    check_runs(kas.proc.pid(), &ctx.kas_bin).await?;
    kas.add_project("bench/config", config, None).await?;
    for p in projects.iter_mut() {
        p.kas_id = kas.add_project(&p.path, &p.repo, Some(&secret)).await?;
    }
    let (agent_id, token) = kas.register("bench/config", "gitops").await?;
    Ok((kas, agent_id, token))
}

/// (project path, commit) of every project's current head.
fn sync_targets(projects: &[Project]) -> Vec<(&str, &str)> {
    projects
        .iter()
        .map(|p| (p.path.as_str(), p.head.as_str()))
        .collect()
}

/// (a) `p.objects` objects: `kubectl apply` + wait into its own namespace, then the same commit
/// through kas and agentk (push webhook until the agent reports it synchronized).
async fn measure_sync(
    ctx: &Ctx,
    api: &Scraper<'_>,
    kas: &Kas,
    agent: &mut Agent,
    p: &mut Project,
    with_kubectl: bool,
    peers: &Peers<'_>,
) -> Result<Value> {
    let n = p.objects;
    let files = write_manifests(&p.repo, n, None)?;
    p.head = git_commit_all(&p.repo, &format!("{n} objects"))?;
    let mut out = if with_kubectl {
        let out = kubectl_path(ctx, api, p).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        out
    } else {
        json!({})
    };
    // The floor runs just before agentk and just after it, each into a fresh namespace: a run
    // right after another one is faster (0.9× when the floor went first, 1.3× when it went
    // second), so the floor is the mean of the two.
    let floor_before = peers.floor(p, 0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let current = CurrentWatch::start(api.http, api.server, api.auth, &p.gitops_ns).await?;
    let before = api.counts().await?;
    let (cpu_agent, cpu_kas) = (cpu_seconds(agent.proc.pid())?, cpu_seconds(kas.proc.pid())?);
    let t0 = unix_now();
    let t = Instant::now();
    push_webhook(kas, p).await?;
    let seen = wait_sync(&mut agent.tail, &p.path, &p.head).await?;
    let observed = t.elapsed().as_secs_f64();
    let cpu_agent = cpu_seconds(agent.proc.pid())? - cpu_agent;
    let cpu_kas = cpu_seconds(kas.proc.pid())? - cpu_kas;
    let agentk_requests = api.since(&before).await?;
    current
        .catch_up(seen.current.keys(), Duration::from_secs(10))
        .await;
    let status_lag = lag(&seen.current, &current.stop());
    let total = seen.done - t0;
    let apply_phase = seen.started.zip(seen.last_applied).map(|(s, a)| a - s);
    eprintln!(
        "bench: agentk {n} objects: {total:.2} s (seen after {observed:.2} s, apply phase \
         {apply_phase:.2?} s), {} writes, CPU agentk {cpu_agent:.2} s, kas {cpu_kas:.2} s, \
         status lag {status_lag}",
        seen.writes
    );
    if seen.objects != n as u64 {
        bail!(
            "agentk reported {} objects for {}, expected {n}",
            seen.objects,
            p.path
        );
    }
    let agentk = json!({
        "objects": n,
        "deployments": n / DEPLOYMENT_EVERY,
        "files": files,
        "agentk_total_seconds": total,
        "agentk_started_seconds": seen.started.map(|s| s - t0),
        "agentk_applied_seconds": seen.last_applied.map(|s| s - t0),
        "agentk_apply_phase_seconds": apply_phase,
        "agentk_done_unix_seconds": seen.done,
        "agentk_requests": agentk_requests,
        "status_lag": status_lag,
        "agentk_cpu_seconds": cpu_agent,
        "kas_cpu_seconds": cpu_kas,
        "writes": seen.writes,
    });
    if let (Some(out), Value::Object(agentk)) = (out.as_object_mut(), agentk) {
        out.extend(agentk);
    }
    let floor_after = peers.floor(p, 1).await?;
    out["floor"] = crate::floor::bracket(&floor_before, &floor_after);
    Ok(out)
}

/// `kubectl apply` + wait of `p`'s manifests into its own namespace, and the API requests it
/// sent.
async fn kubectl_path(ctx: &Ctx, api: &Scraper<'_>, p: &Project) -> Result<Value> {
    let n = p.objects;
    let before = api.counts().await?;
    let k = kubectl_baseline(
        &ctx.env,
        (api.http, api.auth),
        &p.repo.join(MANIFEST_DIR),
        &p.kubectl_ns,
        n / DEPLOYMENT_EVERY,
    )
    .await?;
    let requests = api.since(&before).await?;
    eprintln!(
        "bench: kubectl {n} objects: apply {:.2} s, all Available {:.2} s, kubectl wait \
         returned {:.2} s",
        k.apply, k.available, k.wait
    );
    Ok(json!({
        "kubectl_apply_seconds": k.apply,
        "kubectl_available_seconds": k.available,
        "kubectl_total_seconds": k.wait,
        "kubectl_requests": requests,
    }))
}

/// The floor client and the peers' engines, run on a project's manifests as they are.
struct Peers<'a> {
    ctx: &'a Ctx,
    api: &'a Scraper<'a>,
    /// Where the engines keep state between runs (Flux's inventory).
    state: PathBuf,
}

impl Peers<'_> {
    /// The bare client's apply of `p`'s manifests into its `run`th namespace, and the API
    /// requests it sent.
    async fn floor(&self, p: &Project, run: usize) -> Result<Value> {
        let ns = &p.floor_ns[run];
        let ca = std::fs::read(&self.ctx.env.ca_file)?;
        let before = self.api.counts().await?;
        let dir = p.repo.join(MANIFEST_DIR);
        // The bench watches the floor's namespace as it watches agentk's (for the status lag),
        // so both apply phases run with the same watchers on the API server.
        let watch = CurrentWatch::start(self.api.http, self.api.server, self.api.auth, ns).await?;
        let run = crate::floor::run(&ca, self.api.server, self.api.auth, &dir, ns).await;
        drop(watch.stop());
        let mut v = run.with_context(|| format!("the floor client on {}", p.path))?;
        v["requests"] = self.api.since(&before).await?;
        eprintln!(
            "bench: floor {} objects: apply {:.2} s",
            p.objects,
            v["apply_seconds"].as_f64().unwrap_or(f64::NAN)
        );
        Ok(v)
    }

    /// Every engine of [`ENGINES`] on `p`'s manifests, each into its own namespace.
    async fn engines(&self, p: &Project) -> Result<Vec<Value>> {
        let dir = p.repo.join(MANIFEST_DIR);
        let mut out = Vec::new();
        for (e, ns) in ENGINES.iter().zip(&p.peer_ns) {
            out.push(run_engine(self.ctx, self.api, e, &dir, ns, &self.state).await?);
        }
        Ok(out)
    }
}

/// agentk's RSS at least a minute after its last (largest) synchronization ended.
async fn rss_a_minute_after(agent: &Agent, syncs: &[Value]) -> Result<u64> {
    let done = syncs
        .iter()
        .filter_map(|s| s["agentk_done_unix_seconds"].as_f64())
        .fold(0.0, f64::max);
    let left = done + 60.0 - unix_now();
    if left > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(left)).await;
    }
    status_bytes(agent.proc.pid(), "VmRSS")
}

/// (c) One ConfigMap changes in the largest project.
async fn measure_one_change(
    kas: &Kas,
    agent: &mut Agent,
    projects: &mut [Project],
) -> Result<Value> {
    let p = projects
        .iter_mut()
        .max_by_key(|p| p.objects)
        .context("no projects")?;
    write_manifests(&p.repo, p.objects, Some(0))?;
    p.head = git_commit_all(&p.repo, "one ConfigMap changed")?;
    let t0 = unix_now();
    push_webhook(kas, p).await?;
    let seen = wait_sync(&mut agent.tail, &p.path, &p.head).await?;
    eprintln!(
        "bench: one ConfigMap changed in {}: {:.2} s, {} writes",
        p.path,
        seen.done - t0,
        seen.writes
    );
    Ok(phases(p.objects, &seen, t0))
}

/// CPU and memory of agentk and kas sitting idle, everything synchronized.
struct Idle {
    wall: f64,
    agent_cpu: f64,
    kas_cpu: f64,
    agent_rss_end: u64,
    kas_rss_end: u64,
}

async fn measure_idle(kas: &Kas, agent: &Agent) -> Result<Idle> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a0, k0) = (cpu_seconds(agent.proc.pid())?, cpu_seconds(kas.proc.pid())?);
    let t = Instant::now();
    tokio::time::sleep(IDLE).await;
    let (a1, k1) = (cpu_seconds(agent.proc.pid())?, cpu_seconds(kas.proc.pid())?);
    let idle = Idle {
        wall: t.elapsed().as_secs_f64(),
        agent_cpu: a1 - a0,
        kas_cpu: k1 - k0,
        agent_rss_end: status_bytes(agent.proc.pid(), "VmRSS")?,
        kas_rss_end: status_bytes(kas.proc.pid(), "VmRSS")?,
    };
    eprintln!(
        "bench: idle {:.0} s: CPU agentk {:.2} s, kas {:.2} s",
        idle.wall, idle.agent_cpu, idle.kas_cpu
    );
    Ok(idle)
}

/// (d) Pruning: the 1,000-object project drops to one object; 999 are deleted.
async fn measure_prune(kas: &Kas, agent: &mut Agent, projects: &mut [Project]) -> Result<Value> {
    let p = projects
        .iter_mut()
        .find(|p| p.objects == 1000)
        .context("no 1,000-object project")?;
    std::fs::remove_dir_all(p.repo.join(MANIFEST_DIR))?;
    write_manifests(&p.repo, 1, None)?;
    p.head = git_commit_all(&p.repo, "999 objects removed")?;
    let t0 = unix_now();
    push_webhook(kas, p).await?;
    let seen = wait_sync(&mut agent.tail, &p.path, &p.head).await?;
    let seconds = seen.done - t0;
    eprintln!("bench: pruning 999 objects of {}: {seconds:.2} s", p.path);
    Ok(json!({"pruned": p.objects - 1, "seconds": seconds}))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_split_and_mixed() {
        let dir = std::env::temp_dir().join(format!("bench-manifests-{}", std::process::id()));
        let files = write_manifests(&dir, 120, Some(0)).unwrap();
        assert_eq!(files, 3);
        let all: String = (0..3)
            .map(|f| {
                std::fs::read_to_string(dir.join(format!("manifests/objects-{f:03}.yaml"))).unwrap()
            })
            .collect::<Vec<_>>()
            .join("---\n");
        assert_eq!(all.matches("kind: Deployment").count(), 12);
        assert_eq!(all.matches("kind: ConfigMap").count(), 108);
        assert_eq!(all.matches("version: \"2\"").count(), 1);
        assert!(all.contains("\n    spec:\n      containers:\n      - name: pause\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
