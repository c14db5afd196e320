//! The Markdown report: header (date, machine, versions, method), one table per measurement,
//! and a line per target saying met or missed and by how much.
//!
//! Input: the JSON of the cluster run (`tether-bench run`) and the last JSON line of each
//! `loadgen` run. Every number is optional, so a partial run still renders.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Targets of the issue.
const TUNNEL_OVERHEAD_MS: f64 = 1.0;
/// Issue 17's target (was 70 %): the median of five runs.
const THROUGHPUT_SHARE: f64 = 0.90;
const GITOPS_RATIO: f64 = 1.5;
/// Pruning 1,000 objects within this many times the time to apply them.
const PRUNE_RATIO: f64 = 3.0;
const AGENTK_IDLE_RSS_MIB: f64 = 20.0;
const KAS_BYTES_PER_AGENT: f64 = 50.0 * 1024.0;
/// The same with TLS on the agent listener, as agents connect in production (issue 17).
const KAS_BYTES_PER_TLS_AGENT: f64 = 30.0 * 1024.0;
const RECONNECT_SECONDS: f64 = 10.0;

pub(crate) fn mib(b: f64) -> f64 {
    b / 1048576.0
}

pub(crate) fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

pub(crate) fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "—".to_string(), |x| format!("{x:.digits$}"))
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    })
}

/// Cores, CPU model, memory, kernel and OS of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default();
    format!(
        "{cores} cores ({model}), {:.1} GiB memory, Linux {kernel}, {os}",
        mem_kb / 1048576.0
    )
}

/// What the report needs besides the measurements.
#[derive(Debug, Default)]
pub struct Header {
    pub date: String,
    pub machine: String,
    pub kas_version: String,
    pub rustc_version: String,
    /// Pinned control-plane versions (`testenv/versions.env`), when found.
    pub pinned: String,
    /// Whole run, from scripts/bench.
    pub elapsed_seconds: Option<f64>,
}

impl Header {
    pub fn collect(kas_bin: &Path) -> Header {
        let pinned = std::fs::read_to_string("testenv/versions.env")
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", ");
        Header {
            date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            machine: machine(),
            kas_version: command_line(&kas_bin.display().to_string(), &["--version"])
                .unwrap_or_else(|| "unknown".into()),
            rustc_version: command_line("rustc", &["--version"])
                .unwrap_or_else(|| "unknown".into()),
            pinned,
            elapsed_seconds: None,
        }
    }
}

const METHOD: &str = "\
Everything runs on this one machine, on 127.0.0.1: a real control plane (etcd, kube-apiserver, \
kube-controller-manager with `--kube-api-qps=100 --kube-api-burst=200`, kube-scheduler, kwok \
playing the kubelet of one fake node, with a node Lease, that makes Pods Ready; all built from \
source), release \
builds of kas and agentk (out of cluster, with a cluster-admin ServiceAccount token), and the \
benchmark client. The direct path and the path through kas and agentk are measured **in the \
same run**; on a shared 2-core machine absolute times are noise, ratios are what to read.

- **Tunnel latency**: GET of one ConfigMap with a pooled Rust hyper client (the same for both \
paths), at concurrency 1, 16 and 128 (400, 3,200, 6,400 requests). Direct: client → TLS → \
kube-apiserver. Through kas: client → TLS → kas's Kubernetes API proxy (CI job ID token, \
`ci_access`) → reverse tunnel (`grpc`: HTTP/2 over TCP; `wss`: HTTP/2 in a TLS WebSocket) → \
agentk → TLS → kube-apiserver.
- **Tunnel throughput**: LIST of 5,000 ConfigMaps of 10 KB, five runs of each path taken in turns (direct, kas, direct, …), the median of each and the spread of the per-run ratios, over `grpc`.
- **GitOps sync**: three manifest projects (own Git repositories on local disk) with 100, 1,000 \
and 5,000 objects: 90 % ConfigMaps with three small keys, 10 % Deployments (1 replica, one \
`registry.k8s.io/pause:3.10` container), 50 objects per multi-document file, no namespace in \
the files. For each size **kubectl runs first**: `kubectl apply --server-side --recursive -n \
kubectl-N -f DIR` of the same files, then `kubectl wait --for=condition=Available deployment \
--all`, with a watch of the namespace's Deployments alongside that notes when the last one \
became Available (`kubectl wait` checks the Deployments one after another, about 0.1 s each \
even when all are already Available, so it returns well after that moment); then agentk: \
commit, t0, POST the push webhook to kas (`git.poll_interval` 1 h, so only the webhook \
fetches), until agentk logs `Synchronization done` for that commit (applied, and every object \
Current; agentk's `default_namespace` = gitops-N). Phases from agentk's log timestamps: to \
`Synchronizing objects` (kas fetch, selection, streaming) and to the last `resourceApplied` \
event (logged when the apply phase ends; the rest is waiting for status). agentk runs with \
`--gitops-resync-interval 1h` so no periodic re-sync overlaps a measurement.
- **Peers' engines and the floor**: after agentk, for each size, the same files go into a \
namespace per engine: Flux's engine (`fluxcd/pkg/ssa`: `ApplyAllStaged` with \
kustomize-controller's options, `DeleteAll` of what left the inventory, `WaitForSet` polling \
every 500 ms) at kustomize-controller's default concurrency 4 and at agentk's 16, and cli-utils' \
applier (inventory ConfigMap, server-side apply, status watcher; sequential), each a Go program \
of `bench/engines` run with the agents' ServiceAccount and no client rate limit; each reports its \
phases and its own CPU seconds and peak RSS (getrusage). The floor client sends the same \
server-side-apply PATCHes as agentk (JSON, `force`) at concurrency 16 with everything prepared \
before the clock starts: nothing but the writes. API requests: kube-apiserver's \
`apiserver_request_total` on ConfigMaps and Deployments (no subresource), by verb, before and \
after each run (all clients: kube-controller-manager's revision annotation of new Deployments is \
in every column). The peers then run again on a one-ConfigMap change of the 5,000 set, on the \
unchanged set (re-sync), and on the 1,000 set cut to one object (prune). Status lag: agentk's \
per-object `resourceStatus` Current log line (its time, microseconds) minus the first moment a \
watch of the bench, computing kstatus with agentk's rules, saw the object Current.
- **Write requests**: the `writes` of agentk's `Synchronization done` line: the first sync of \
each size, a commit changing one ConfigMap of the 5,000-object project, and the re-sync of \
unchanged commits by a restarted agentk (SIGTERM, same arguments; its first sync of each \
project re-applies the commit already applied).
- **agentk footprint**: VmRSS from `/proc/<pid>/status` when connected and configured, after \
the first (empty) sync of each project and before any object; VmHWM right after the \
5,000-object sync (peak of the process so far); CPU = utime + stime of `/proc/<pid>/stat` of \
kas and of the restarted agentk over 60 s idle once everything is synchronized. The pids are \
the programs' own (checked through `/proc/<pid>/exe`).
- **kas per connected agent and reconnect storm**: `loadgen` (its own kas, release build; N fake \
agents in one process, each its own TCP/HTTP/2 connection and token, two idle tunnel streams \
(agentk's default) and the configuration stream, as agentk opens them): kas RSS with no agent and with N connected, \
kas CPU while idle, then kas is restarted (SIGTERM, start again) and the time until kas counts \
all N again, from the SIGTERM and from the new kas's API answering. The control plane is \
stopped before loadgen runs.";

fn latency_table(out: &mut String, c: &Value) {
    let rows = c["tunnel"]["latency"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if rows.is_empty() {
        out.push_str("Not measured.\n\n");
        return;
    }
    out.push_str("| transport | concurrency | requests | direct p50 | direct p99 | kas p50 | kas p99 | overhead p50 | ratio p50 |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let (dp50, kp50) = (f(&r["direct_p50_ms"]), f(&r["kas_p50_ms"]));
        let (over, ratio) = match (dp50, kp50) {
            (Some(d), Some(k)) => (format!("{:.2}", k - d), format!("{:.2}", k / d)),
            _ => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {over} | {ratio} |",
            r["transport"].as_str().unwrap_or("?"),
            r["concurrency"],
            thousands(r["requests"].as_u64().unwrap_or(0)),
            num(&r["direct_p50_ms"], 2),
            num(&r["direct_p99_ms"], 2),
            num(&r["kas_p50_ms"], 2),
            num(&r["kas_p99_ms"], 2),
        );
    }
    out.push('\n');
}

/// Throughput through the tunnel as a share of direct.
fn throughput_share(t: &Value) -> Option<(f64, f64, f64)> {
    let (db, ds) = (f(&t["bytes"])?, f(&t["direct_seconds"])?);
    let (kb, ks) = (f(&t["kas_bytes"])?, f(&t["kas_seconds"])?);
    let (d, k) = (db / ds / 1e6, kb / ks / 1e6);
    Some((d, k, k / d))
}

/// The lowest and highest ratio of direct to tunnel time over the runs taken in turns, and
/// their number.
fn share_spread(t: &Value) -> Option<(f64, f64, usize)> {
    let (d, k) = (t["direct_runs"].as_array()?, t["kas_runs"].as_array()?);
    let shares: Vec<f64> = d
        .iter()
        .zip(k)
        .filter_map(|(d, k)| Some(f(d)? / f(k)?))
        .collect();
    let lo = shares.iter().copied().reduce(f64::min)?;
    let hi = shares.iter().copied().reduce(f64::max)?;
    Some((lo, hi, shares.len()))
}

fn throughput_table(out: &mut String, c: &Value) {
    let t = &c["tunnel"]["throughput"];
    let Some((d, k, share)) = throughput_share(t) else {
        out.push_str("Not measured.\n\n");
        return;
    };
    let _ = write!(
        out,
        "LIST of {:.1} MB, median of the runs.\n\n| path | seconds | MB/s |\n|---|---|---|\n| direct | {} | {d:.1} |\n| through kas + agentk ({}) | {} | {k:.1} |\n\nThroughput through the tunnel: **{:.0} % of direct**{}.\n\n",
        f(&t["bytes"]).unwrap_or(0.0) / 1e6,
        num(&t["direct_seconds"], 2),
        t["transport"].as_str().unwrap_or("grpc"),
        num(&t["kas_seconds"], 2),
        100.0 * share,
        share_spread(t).map_or(String::new(), |(lo, hi, n)| format!(
            " (per run, {n} runs: {:.0}–{:.0} %)",
            100.0 * lo,
            100.0 * hi
        ))
    );
}

/// agentk's time over kubectl's: `base` is `kubectl_total_seconds` (apply + `kubectl wait`) or
/// `kubectl_available_seconds` (apply until a watch saw every Deployment Available).
fn gitops_ratio(s: &Value, base: &str) -> Option<f64> {
    Some(f(&s["agentk_total_seconds"])? / f(&s[base])?)
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}×"))
}

fn gitops_table(out: &mut String, c: &Value) {
    let syncs = c["gitops"]["syncs"].as_array().cloned().unwrap_or_default();
    if syncs.is_empty() {
        out.push_str("Not measured.\n\n");
        return;
    }
    out.push_str("Seconds. kubectl: from the start of `kubectl apply` until it returned, until a watch of the namespace's Deployments saw every one Available, and until `kubectl wait` returned. agentk: from the webhook until `Synchronization done` (everything applied and Current); its phases from agentk's log: until `Synchronizing objects` (kas fetch, selection, streaming to agentk) and until the apply phase ended (the last `resourceApplied` event; agentk logs them when the phase ends); the rest is waiting for every object to be Current.\n\n");
    out.push_str("| objects (Deployments) | files | kubectl apply | kubectl: all Available | kubectl wait returned | agentk | **agentk / kubectl (wait)** | agentk / kubectl (all Available) | agentk: sync starts | agentk: all applied | agentk CPU | kas CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in &syncs {
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} |",
            thousands(s["objects"].as_u64().unwrap_or(0)),
            thousands(s["deployments"].as_u64().unwrap_or(0)),
            s["files"],
            num(&s["kubectl_apply_seconds"], 2),
            num(&s["kubectl_available_seconds"], 2),
            num(&s["kubectl_total_seconds"], 2),
            num(&s["agentk_total_seconds"], 2),
            ratio_cell(gitops_ratio(s, "kubectl_total_seconds")),
            ratio_cell(gitops_ratio(s, "kubectl_available_seconds")),
            num(&s["agentk_started_seconds"], 2),
            num(&s["agentk_applied_seconds"], 2),
            num(&s["agentk_cpu_seconds"], 2),
            num(&s["kas_cpu_seconds"], 2),
        );
    }
    out.push('\n');
}

/// "start / applied / done" seconds of a synchronization.
fn phase_cells(v: &Value) -> String {
    format!(
        "{} / {} / {}",
        num(&v["started_seconds"], 2),
        num(&v["applied_seconds"], 2),
        num(&v["seconds"], 2)
    )
}

fn writes_table(out: &mut String, c: &Value) {
    let g = &c["gitops"];
    let syncs = g["syncs"].as_array().cloned().unwrap_or_default();
    if syncs.is_empty() {
        out.push_str("Not measured.\n\n");
        return;
    }
    out.push_str("Re-sync: agentk restarted (SIGTERM, same arguments); its first sync of each project re-applies the commit already applied, all three projects at once. Seconds from the restart: until `Synchronizing objects`, until the apply phase ended (every object applied or found unchanged), until `Synchronization done`.\n\n");
    out.push_str("| objects | writes, first sync of the commit | writes, re-sync of the unchanged commit | re-sync: starts / all applied / done (s) |\n|---|---|---|---|\n");
    let resyncs = g["resyncs"].as_array().cloned().unwrap_or_default();
    for s in &syncs {
        let n = s["objects"].as_u64().unwrap_or(0);
        let r = resyncs
            .iter()
            .find(|r| r["objects"].as_u64() == Some(n))
            .cloned()
            .unwrap_or(Value::Null);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            thousands(n),
            thousands(s["writes"].as_u64().unwrap_or(0)),
            r["writes"]
                .as_u64()
                .map_or_else(|| "—".to_string(), thousands),
            phase_cells(&r)
        );
    }
    let o = &g["one_change"];
    if !o.is_null() {
        let _ = writeln!(
            out,
            "\nA commit changing one ConfigMap of the {}-object project: **{} write(s)**; from the webhook, starts / all applied / done: {} s.",
            thousands(o["objects"].as_u64().unwrap_or(0)),
            o["writes"],
            phase_cells(o)
        );
    }
    out.push('\n');
}

fn footprint_table(out: &mut String, c: &Value) {
    let fp = &c["gitops"]["footprint"];
    if fp.is_null() {
        out.push_str("Not measured.\n\n");
        return;
    }
    let m = |k: &str| f(&fp[k]).map_or("—".into(), |b| format!("{:.1} MiB", mib(b)));
    let idle = num(&fp["idle_seconds"], 0);
    let _ = write!(
        out,
        "| measure | value |\n|---|---|\n\
| agentk RSS idle (connected, configured, 3 empty projects) | {} |\n\
| agentk peak RSS (VmHWM after the 5,000-object sync) | {} |\n\
| agentk RSS after all syncs | {} |\n\
| agentk RSS at least a minute after the 5,000-object sync | {} |\n\
| agentk RSS after restart, re-sync of 6,100 objects and {idle} s idle | {} |\n\
| agentk CPU while idle ({idle} s) | {} s |\n\
| kas RSS (4 projects, 1 agent), before the syncs / at the end | {} / {} |\n\
| kas CPU while idle ({idle} s) | {} s |\n\n",
        m("agentk_idle_rss_bytes"),
        m("agentk_peak_rss_bytes"),
        m("agentk_rss_after_syncs_bytes"),
        m("agentk_rss_minute_after_bytes"),
        m("agentk_rss_end_bytes"),
        num(&fp["agentk_cpu_idle_seconds"], 2),
        m("kas_rss_idle_bytes"),
        m("kas_rss_end_bytes"),
        num(&fp["kas_cpu_idle_seconds"], 2),
    );
}

fn loadgen_table(out: &mut String, runs: &[Value]) {
    if runs.is_empty() {
        out.push_str("Not measured.\n\n");
        return;
    }
    out.push_str("| agents | idle window | kas RSS 0 → N | per agent | connect all | kas CPU while idle | all back after restart, from the new kas's API | from SIGTERM |\n|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let st = &r["storm"];
        let idle = f(&r["idle_seconds"]);
        let cpu = match (f(&r["kas_cpu_idle_seconds"]), idle) {
            (Some(c), Some(i)) if i > 0.0 => format!("{c:.2} s ({:.2} % of a core)", 100.0 * c / i),
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {}{} | {} s | {:.1} → {:.1} MiB | {} | {} s | {cpu} | {} s | {} s |",
            thousands(r["agents"].as_u64().unwrap_or(0)),
            if r["tls"] == true { " (TLS)" } else { "" },
            idle.map_or("—".into(), |i| format!("{i:.0}")),
            mib(f(&r["kas_rss_baseline_bytes"]).unwrap_or(0.0)),
            mib(f(&r["kas_rss_connected_bytes"]).unwrap_or(0.0)),
            f(&r["kas_bytes_per_agent"]).map_or("—".into(), |b| format!("{:.1} KiB", b / 1024.0)),
            num(&r["connect_seconds"], 2),
            num(&st["reconnect_seconds"], 2),
            num(&st["reconnect_from_sigterm_seconds"], 2),
        );
    }
    out.push_str("\nWith a single agent the per-agent figure is within the noise of kas's own allocations; read the 1,000 and 10,000 rows.\n\n");
}

/// "**met**: x, y under the target" or "**missed** by y: x". `lower_is_better`: the target is a
/// maximum.
pub(crate) fn verdict(
    value: f64,
    target: f64,
    lower_is_better: bool,
    unit: &str,
    digits: usize,
) -> String {
    verdict_with(value, target, lower_is_better, (unit, unit), digits)
}

/// [`verdict`] with a different unit for the difference (percentage points).
fn verdict_with(
    value: f64,
    target: f64,
    lower_is_better: bool,
    (unit, diff_unit): (&str, &str),
    digits: usize,
) -> String {
    let met = if lower_is_better {
        value <= target
    } else {
        value >= target
    };
    let diff = (value - target).abs();
    if met {
        format!(
            "**met**: {value:.digits$}{unit}, {diff:.digits$}{diff_unit} {} the target",
            if lower_is_better { "under" } else { "over" }
        )
    } else {
        format!("**missed** by {diff:.digits$}{diff_unit}: {value:.digits$}{unit}")
    }
}

fn targets(out: &mut String, c: &Value, runs: &[Value]) {
    let missing = "not measured";
    // Tunnel overhead at concurrency 1.
    let overhead = |t: &str| {
        c["tunnel"]["latency"]
            .as_array()?
            .iter()
            .find(|r| r["transport"] == t && r["concurrency"] == 1)
            .and_then(|r| Some(f(&r["kas_p50_ms"])? - f(&r["direct_p50_ms"])?))
    };
    let line = match (overhead("grpc"), overhead("wss")) {
        (Some(g), w) => format!(
            "{} over `grpc`{}",
            verdict(g, TUNNEL_OVERHEAD_MS, true, " ms", 2),
            w.map_or(String::new(), |w| format!(
                "; over `wss`: {}",
                verdict(w, TUNNEL_OVERHEAD_MS, true, " ms", 2)
            ))
        ),
        _ => missing.into(),
    };
    let _ = writeln!(out, "- Tunnel p50 overhead ≤ 1 ms (concurrency 1): {line}.");
    let line = throughput_share(&c["tunnel"]["throughput"]).map_or(missing.into(), |(_, _, s)| {
        verdict_with(
            100.0 * s,
            100.0 * THROUGHPUT_SHARE,
            false,
            (" %", " points"),
            0,
        )
    });
    let _ = writeln!(
        out,
        "- Throughput ≥ 90 % of direct (median of 5 runs): {line}."
    );
    let apply_1000 = c["gitops"]["syncs"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["objects"].as_u64() == Some(1000)))
        .and_then(|s| f(&s["agentk_total_seconds"]));
    let prune = &c["gitops"]["prune"];
    let line = match (f(&prune["seconds"]), apply_1000) {
        (Some(p), Some(a)) if a > 0.0 => format!(
            "{} (pruning {} objects {p:.2} s with background propagation, applying 1,000 {a:.2} s)",
            verdict(p / a, PRUNE_RATIO, true, "×", 2),
            thousands(prune["pruned"].as_u64().unwrap_or(0))
        ),
        _ => missing.into(),
    };
    let _ = writeln!(
        out,
        "- Pruning 1,000 objects within 3× the time to apply them: {line}."
    );
    let syncs = c["gitops"]["syncs"].as_array().cloned().unwrap_or_default();
    let worst = |base: &str| {
        let ratios: Vec<(u64, f64)> = syncs
            .iter()
            .filter_map(|s| Some((s["objects"].as_u64()?, gitops_ratio(s, base)?)))
            .collect();
        let (n, worst) = ratios.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
        Some(format!(
            "{} at worst ({} objects; {})",
            verdict(worst, GITOPS_RATIO, true, "×", 2),
            thousands(n),
            ratios
                .iter()
                .map(|(n, r)| format!("{}: {r:.2}×", thousands(*n)))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    let line = match (worst("kubectl_total_seconds"), worst("kubectl_available_seconds")) {
        (Some(w), a) => format!(
            "{w}{}",
            a.map_or(String::new(), |a| format!(
                ". Against the moment every Deployment of the kubectl path was Available (without `kubectl wait`'s own time): {a}"
            ))
        ),
        _ => missing.into(),
    };
    let _ = writeln!(
        out,
        "- GitOps sync within 1.5× of `kubectl apply --server-side` + `kubectl wait`: {line}."
    );
    let line = f(&c["gitops"]["footprint"]["agentk_idle_rss_bytes"]).map_or(missing.into(), |b| {
        verdict(mib(b), AGENTK_IDLE_RSS_MIB, true, " MiB", 1)
    });
    let _ = writeln!(out, "- agentk idle RSS ≤ 20 MiB: {line}.");
    let per_agent = |n: u64| {
        runs.iter()
            .find(|r| r["agents"].as_u64() == Some(n) && r["tls"] != true)
            .and_then(|r| f(&r["kas_bytes_per_agent"]))
    };
    let line = match (per_agent(10_000), per_agent(1_000)) {
        (Some(b), other) => format!(
            "{} with 10,000 agents{}",
            verdict(b / 1024.0, KAS_BYTES_PER_AGENT / 1024.0, true, " KiB", 1),
            other.map_or(String::new(), |o| format!(
                "; {:.1} KiB with 1,000",
                o / 1024.0
            ))
        ),
        (None, Some(b)) => format!(
            "{} with 1,000 agents",
            verdict(b / 1024.0, KAS_BYTES_PER_AGENT / 1024.0, true, " KiB", 1)
        ),
        _ => missing.into(),
    };
    let _ = writeln!(out, "- kas ≤ 50 KiB per connected agent: {line}.");
    let tls = runs
        .iter()
        .filter(|r| r["tls"] == true)
        .max_by_key(|r| r["agents"].as_u64())
        .and_then(|r| Some((r["agents"].as_u64()?, f(&r["kas_bytes_per_agent"])?)));
    let line = tls.map_or(missing.into(), |(n, b)| {
        format!(
            "{} with {} agents",
            verdict(
                b / 1024.0,
                KAS_BYTES_PER_TLS_AGENT / 1024.0,
                true,
                " KiB",
                1
            ),
            thousands(n)
        )
    });
    let _ = writeln!(
        out,
        "- kas ≤ 30 KiB per connected agent with TLS on the agent listener: {line}."
    );
    let back = |n: u64, k: &str| {
        runs.iter()
            .find(|r| r["agents"].as_u64() == Some(n))
            .and_then(|r| f(&r["storm"][k]))
    };
    let line = match back(1_000, "reconnect_from_sigterm_seconds") {
        Some(s) => format!(
            "{} for 1,000 agents counted from the SIGTERM ({} s from the new kas's API){}",
            verdict(s, RECONNECT_SECONDS, true, " s", 2),
            back(1_000, "reconnect_seconds").map_or("—".into(), |x| format!("{x:.2}")),
            match (
                back(10_000, "reconnect_from_sigterm_seconds"),
                back(10_000, "reconnect_seconds")
            ) {
                (Some(a), Some(b)) =>
                    format!("; 10,000 agents: {a:.2} s from the SIGTERM, {b:.2} s from the API"),
                _ => String::new(),
            }
        ),
        None => missing.into(),
    };
    let _ = writeln!(
        out,
        "- All agents back within 10 s of a kas restart: {line}."
    );
    let line = crate::flood::ratio(c).map_or(missing.into(), |r| {
        verdict(r, crate::flood::FLOOD_RATIO, true, "×", 2)
    });
    let _ = writeln!(
        out,
        "- Valid requests during a 6-way flood of bad credentials not slower than 2× (median): {line}."
    );
    let line = crate::routed::hop_p50(c).map_or(missing.into(), |d| {
        verdict(d, crate::routed::HOP_P50_MS, true, " ms", 2)
    });
    let _ = writeln!(
        out,
        "- A request routed through a second replica adds at most 0.3 ms p50 (concurrency 1): {line}."
    );
}

/// The whole report.
pub fn render(h: &Header, cluster: &Value, loadgen: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# tether benchmarks\n");
    let _ = writeln!(out, "- Date: {}", h.date);
    let _ = writeln!(out, "- Machine: {}", h.machine);
    let _ = writeln!(
        out,
        "- Versions: {}; kubectl {} (client), Kubernetes {} (server); {}{}",
        h.kas_version,
        cluster["versions"]["kubectl"].as_str().unwrap_or("?"),
        cluster["versions"]["server"].as_str().unwrap_or("?"),
        h.rustc_version,
        if h.pinned.is_empty() {
            String::new()
        } else {
            format!("; pinned: {}", h.pinned)
        }
    );
    if let Some(s) = h.elapsed_seconds {
        let _ = writeln!(
            out,
            "- Run time: {:.1} min (`scripts/bench`, builds included)",
            s / 60.0
        );
    }
    let _ = writeln!(out, "\n## Method\n\n{METHOD}\n");
    out.push_str("## 1. Tunnel latency: GET of one ConfigMap, milliseconds\n\n");
    latency_table(&mut out, cluster);
    out.push_str("## 2. Tunnel throughput (best of 3)\n\n");
    throughput_table(&mut out, cluster);
    out.push_str("## 3. GitOps sync vs `kubectl apply --server-side`\n\n");
    gitops_table(&mut out, cluster);
    out.push_str(
        "## 3b. GitOps engines side by side: agentk, Flux, cli-utils, kubectl, the floor\n\n",
    );
    crate::report_peers::section(&mut out, cluster);
    out.push_str("## 4. Write requests per synchronization (agentk's `writes`)\n\n");
    writes_table(&mut out, cluster);
    out.push_str("## 5. agentk and kas footprint\n\n");
    footprint_table(&mut out, cluster);
    // `loadgen --replicas` runs have their own section.
    let (replica_runs, loadgen): (Vec<Value>, Vec<Value>) = loadgen
        .iter()
        .cloned()
        .partition(|r| r["mode"] == "replicas");
    let loadgen = loadgen.as_slice();
    out.push_str("## 6. kas per connected agent, and the reconnect storm (`loadgen`)\n\n");
    loadgen_table(&mut out, loadgen);
    out.push_str("## 7. Valid requests during a flood of bad credentials\n\n");
    crate::flood::table(&mut out, cluster);
    out.push_str("## 8. Routing between kas replicas\n\n");
    crate::routed::table(&mut out, cluster);
    crate::routed::replicas_table(&mut out, &replica_runs);
    out.push_str("## Targets\n\n");
    targets(&mut out, cluster, loadgen);
    crate::report_peers::targets(&mut out, cluster);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_partial_and_full_input() {
        let h = Header::default();
        let empty = render(&h, &Value::Null, &[]);
        assert!(empty.contains("Tunnel p50 overhead ≤ 1 ms (concurrency 1): not measured."));
        assert!(empty.contains("not slower than 2× (median): not measured."));
        let c = json!({
            "tunnel": {"latency": [{"transport": "grpc", "concurrency": 1, "requests": 400,
                "direct_p50_ms": 0.6, "direct_p99_ms": 1.0, "kas_p50_ms": 1.5, "kas_p99_ms": 3.0}],
                "throughput": {"transport": "grpc", "bytes": 50e6, "direct_seconds": 0.1,
                "kas_bytes": 50e6, "kas_seconds": 0.2}},
            "gitops": {"syncs": [{"objects": 100, "deployments": 10, "files": 2,
                "kubectl_apply_seconds": 1.0, "kubectl_total_seconds": 2.0, "agentk_total_seconds": 4.0,
                "writes": 101}],
                "resyncs": [{"objects": 100, "writes": 0, "seconds": 1.0}],
                "one_change": {"objects": 5000, "writes": 1, "seconds": 3.0},
                "footprint": {"agentk_idle_rss_bytes": 15.0 * 1048576.0}},
            "flood": {"limited": {"alone_p50_ms": 2.0, "flood_p50_ms": 2.5, "ratio": 1.25,
                "flood_refused": 150, "flood_limited": 9000, "flood_other": 0}},
        });
        let lg = [
            json!({"agents": 1000, "idle_seconds": 60.0, "kas_bytes_per_agent": 60_000.0,
            "storm": {"reconnect_from_sigterm_seconds": 1.5, "reconnect_seconds": 1.2}}),
        ];
        let r = render(&h, &c, &lg);
        assert!(
            r.contains("**met**: 0.90 ms, 0.10 ms under the target over `grpc`"),
            "{r}"
        );
        assert!(
            r.contains(
                "Throughput ≥ 90 % of direct (median of 5 runs): **missed** by 40 points: 50 %."
            ),
            "{r}"
        );
        assert!(
            r.contains("**missed** by 0.50×: 2.00× at worst (100 objects; 100: 2.00×)"),
            "{r}"
        );
        assert!(
            r.contains("agentk idle RSS ≤ 20 MiB: **met**: 15.0 MiB"),
            "{r}"
        );
        assert!(
            r.contains("**missed** by 8.6 KiB: 58.6 KiB with 1,000 agents"),
            "{r}"
        );
        assert!(
            r.contains("**met**: 1.50 s, 8.50 s under the target for 1,000 agents"),
            "{r}"
        );
        assert!(r.contains("| 100 | 101 | 0 | — / — / 1.00 |"), "{r}");
        assert!(
            r.contains("| default | 2.00 | 2.50 | **1.25×** | 9150 | 150 | 9000 |"),
            "{r}"
        );
        assert!(
            r.contains("not slower than 2× (median): **met**: 1.25×, 0.75× under the target."),
            "{r}"
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn throughput_is_the_median_with_the_spread_of_the_runs() {
        assert_eq!(crate::tunnel::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(crate::tunnel::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let c = json!({"tunnel": {"throughput": {"transport": "grpc", "bytes": 50e6,
            "direct_seconds": 1.0, "kas_seconds": 1.0, "kas_bytes": 50e6,
            "direct_runs": [1.0, 1.0, 0.9], "kas_runs": [1.0, 1.25, 1.0]}}});
        let mut out = String::new();
        throughput_table(&mut out, &c);
        assert!(
            out.contains("**100 % of direct** (per run, 3 runs: 80–100 %)"),
            "{out}"
        );
    }
}
