//! The report's side-by-side section: agentk, the peers' engines (Flux's `fluxcd/pkg/ssa`,
//! cli-utils), kubectl and the bare-client floor on the same objects in the same run; and the
//! targets it can measure.

use std::fmt::Write as _;

use serde_json::Value;

use crate::apimetrics::writes_of;
use crate::peers::ENGINES;
use crate::report::{f, mib, num, thousands, verdict};

/// agentk's apply phase within this many times the floor client's.
const FLOOR_RATIO: f64 = 1.2;
/// agentk's time to all Current within this many times each peer's.
const PEER_RATIO: f64 = 0.3;
const PEAK_RSS_MIB: f64 = 32.0;
const RSS_AFTER_MIB: f64 = 24.0;
const STATUS_LAG_MS: f64 = 100.0;

fn syncs(c: &Value) -> Vec<Value> {
    c["gitops"]["syncs"].as_array().cloned().unwrap_or_default()
}

fn sync_of(c: &Value, n: u64) -> Option<Value> {
    syncs(c)
        .into_iter()
        .find(|s| s["objects"].as_u64() == Some(n))
}

fn requests_cell(r: &Value) -> String {
    if r.is_null() {
        return "—".into();
    }
    let verbs = r["by_verb"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let writes = writes_of(r).map_or("—".into(), |w| w.to_string());
    format!("{} ({writes} writes; {verbs})", r["total"])
}

fn mib_cell(v: &Value) -> String {
    f(v).map_or("—".into(), |b| format!("{:.1}", mib(b)))
}

/// One row per engine for one size; agentk's peak RSS (VmHWM of the whole run so far) is read
/// after the 5,000-object sync, so it is shown on that row only.
fn size_rows(out: &mut String, s: &Value, agentk_peak: &Value) {
    let objects = s["objects"].as_u64().unwrap_or(0);
    let n = thousands(objects);
    let peak = if objects == 5000 {
        mib_cell(agentk_peak)
    } else {
        "—".into()
    };
    let _ = writeln!(
        out,
        "| {n} | agentk (16) | {} | {} | {} | {} | {peak} |",
        num(&s["agentk_total_seconds"], 2),
        num(&s["agentk_apply_phase_seconds"], 2),
        requests_cell(&s["agentk_requests"]),
        num(&s["agentk_cpu_seconds"], 2),
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} | {} | {} | {} |",
            p["label"].as_str().unwrap_or("?"),
            num(&p["total_seconds"], 2),
            num(&p["apply_seconds"], 2),
            requests_cell(&p["requests"]),
            num(&p["cpu_seconds"], 2),
            mib_cell(&p["peak_rss_bytes"]),
        );
    }
    let _ = writeln!(
        out,
        "| {n} | kubectl (1) | {} | {} | {} | — | — |",
        num(&s["kubectl_total_seconds"], 2),
        num(&s["kubectl_apply_seconds"], 2),
        requests_cell(&s["kubectl_requests"]),
    );
    let fl = &s["floor"];
    let _ = writeln!(
        out,
        "| {n} | floor (16) | — | {} | {} | — | — |",
        num(&fl["apply_seconds"], 2),
        requests_cell(&fl["requests"]),
    );
}

/// `seconds s, N writes` of one later run (one change, re-sync, prune).
fn run_cell(seconds: &Value, writes: Option<u64>) -> String {
    let w = writes.map_or("—".into(), |w| w.to_string());
    format!("{} s, {w} writes", num(seconds, 2))
}

fn later_runs(out: &mut String, g: &Value) {
    let resync = g["resyncs"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["objects"].as_u64() == Some(5000)))
        .cloned()
        .unwrap_or_default();
    let rows = [
        (
            "one ConfigMap changed in 5,000",
            &g["one_change"],
            &g["one_change"]["peers"],
        ),
        (
            "re-sync of the unchanged 5,000",
            &resync,
            &g["peer_resyncs"],
        ),
        ("prune 999 of 1,000", &g["prune"], &g["prune"]["peers"]),
    ];
    out.push_str("\n| run | agentk |");
    for e in ENGINES {
        let _ = write!(out, " {} |", e.label);
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(ENGINES.len()));
    out.push('\n');
    for (name, agentk, peers) in rows {
        let writes = agentk["writes"].as_u64();
        let _ = write!(out, "| {name} | {} |", run_cell(&agentk["seconds"], writes));
        for p in peers.as_array().into_iter().flatten() {
            let writes = writes_of(&p["requests"]);
            let _ = write!(out, " {} |", run_cell(&p["total_seconds"], writes));
        }
        out.push('\n');
    }
}

/// The section: engines and settings, a table per size, the later runs, the status lag.
pub fn section(out: &mut String, c: &Value) {
    let g = &c["gitops"];
    let all = syncs(c);
    if all.iter().all(|s| s["peers"].is_null()) {
        out.push_str("Not measured.\n\n");
        return;
    }
    let version = |program: &str| {
        all.iter()
            .flat_map(|s| s["peers"].as_array().cloned().unwrap_or_default())
            .find(|p| p["engine"] == program)
            .and_then(|p| p["version"].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    out.push_str("Engines (same files, same ServiceAccount, same cluster, same run):\n\n");
    out.push_str("- agentk: concurrency 16; times from kas's push webhook (Git fetch included).\n");
    for e in ENGINES {
        let module = if e.program == "flux-ssa" {
            "github.com/fluxcd/pkg/ssa"
        } else {
            "sigs.k8s.io/cli-utils"
        };
        let _ = writeln!(
            out,
            "- {}: `{module}` {}; {}.",
            e.label,
            version(e.program),
            e.settings
        );
    }
    out.push_str(
        "- kubectl: `kubectl apply --server-side` + `kubectl wait`, one request at a time.\n",
    );
    out.push_str(
        "- floor: agentk's own SSA PATCH bodies at concurrency 16 and nothing else (apply phase only), with the bench watching its namespace as it watches agentk's; the mean of a run just before agentk's and one just after.\n\n",
    );
    out.push_str("| objects | engine (concurrency) | to all Current (s) | apply phase (s) | API requests on ConfigMaps/Deployments | CPU (s) | peak RSS (MiB) |\n|---|---|---|---|---|---|---|\n");
    for s in &all {
        size_rows(out, s, &g["footprint"]["agentk_peak_rss_bytes"]);
    }
    later_runs(out, g);
    out.push_str("\nStatus lag, agentk's `resourceStatus` Current minus the moment the bench's watch saw the object Current (kstatus rules):\n\n");
    for s in &all {
        let l = &s["status_lag"];
        let _ = writeln!(
            out,
            "- {} objects: p50 {} ms, p90 {} ms, max {} ms over {} objects ({} seen only by agentk, {} only by the watch)",
            thousands(s["objects"].as_u64().unwrap_or(0)),
            num(&l["p50_ms"], 1),
            num(&l["p90_ms"], 1),
            num(&l["max_ms"], 1),
            l["objects"],
            l["only_agentk"],
            l["only_watch"],
        );
    }
    out.push('\n');
}

/// agentk's apply phase over the floor's, at `n` objects.
fn floor_ratio(c: &Value, n: u64) -> Option<f64> {
    let s = sync_of(c, n)?;
    Some(f(&s["agentk_apply_phase_seconds"])? / f(&s["floor"]["apply_seconds"])?)
}

/// agentk's time to all Current over the slowest-ratio (best) peer's, at `n` objects: the
/// highest ratio and the engine it is against.
fn peer_ratio(c: &Value, n: u64) -> Option<(f64, String)> {
    let s = sync_of(c, n)?;
    let a = f(&s["agentk_total_seconds"])?;
    s["peers"]
        .as_array()?
        .iter()
        .filter_map(|p| {
            Some((
                a / f(&p["total_seconds"])?,
                p["label"].as_str()?.to_string(),
            ))
        })
        .max_by(|x, y| x.0.total_cmp(&y.0))
}

fn both_sizes<T>(
    c: &Value,
    m: impl Fn(&Value, u64) -> Option<T>,
    show: impl Fn(T) -> String,
) -> String {
    let cells: Vec<String> = [1000, 5000]
        .iter()
        .map(|&n| {
            format!(
                "{}: {}",
                thousands(n),
                m(c, n).map_or("not measured".into(), &show)
            )
        })
        .collect();
    cells.join("; ")
}

/// A line per target.
pub fn targets(out: &mut String, c: &Value) {
    let line = both_sizes(c, floor_ratio, |r| verdict(r, FLOOR_RATIO, true, "×", 2));
    let _ = writeln!(
        out,
        "- agentk's apply phase ≤ 1.2× the bare-client floor: {line}."
    );
    let line = both_sizes(c, peer_ratio, |(r, e)| {
        format!(
            "{} against {e} (the fastest peer)",
            verdict(r, PEER_RATIO, true, "×", 2)
        )
    });
    let _ = writeln!(
        out,
        "- agentk's time to all Current ≤ 0.3× Flux's engine and cli-utils: {line}."
    );
    let fp = &c["gitops"]["footprint"];
    let rss = |k: &str, t: f64| {
        f(&fp[k]).map_or("not measured".into(), |b| {
            verdict(mib(b), t, true, " MiB", 1)
        })
    };
    let _ = writeln!(
        out,
        "- agentk peak RSS during the 5,000-object sync ≤ 32 MiB: {}; ≤ 24 MiB a minute after it: {}.",
        rss("agentk_peak_rss_bytes", PEAK_RSS_MIB),
        rss("agentk_rss_minute_after_bytes", RSS_AFTER_MIB),
    );
    let worst = syncs(c)
        .iter()
        .filter_map(|s| f(&s["status_lag"]["max_ms"]))
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let line = worst.map_or("not measured".into(), |w| {
        format!(
            "{} (largest lag of any object, all sizes)",
            verdict(w, STATUS_LAG_MS, true, " ms", 1)
        )
    });
    let _ = writeln!(
        out,
        "- agentk reports Current within 100 ms of a watch: {line}."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios_and_verdicts() {
        let c = json!({"gitops": {
            "syncs": [{"objects": 1000, "agentk_total_seconds": 2.0, "agentk_apply_phase_seconds": 1.5,
                "floor": {"apply_seconds": 1.0},
                "peers": [{"label": "Flux ssa ×4", "total_seconds": 10.0},
                          {"label": "cli-utils", "total_seconds": 5.0}],
                "status_lag": {"max_ms": 40.0}}],
            "footprint": {"agentk_peak_rss_bytes": 50.0 * 1048576.0,
                "agentk_rss_minute_after_bytes": 20.0 * 1048576.0}}});
        let mut out = String::new();
        targets(&mut out, &c);
        assert!(
            out.contains("floor: 1,000: **missed** by 0.30×: 1.50×; 5,000: not measured."),
            "{out}"
        );
        assert!(
            out.contains("1,000: **missed** by 0.10×: 0.40× against cli-utils"),
            "{out}"
        );
        assert!(out.contains("≤ 32 MiB: **missed** by 18.0 MiB: 50.0 MiB; ≤ 24 MiB a minute after it: **met**: 20.0 MiB"), "{out}");
        assert!(
            out.contains("within 100 ms of a watch: **met**: 40.0 ms"),
            "{out}"
        );
        let mut out = String::new();
        section(&mut out, &c);
        assert!(
            out.contains("| 1,000 | cli-utils | 5.00 | — | — | — | — |"),
            "{out}"
        );
        assert!(
            out.contains("| 1,000 | floor (16) | — | 1.00 | — | — | — |"),
            "{out}"
        );
    }
}
