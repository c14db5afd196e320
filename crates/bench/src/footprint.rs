//! Memory and CPU of a process, from `/proc/<pid>/status` and `/proc/<pid>/stat`.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .with_context(|| format!("no {field} in {path}"))?;
    Ok(kb * 1024)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process so far (`utime` + `stime` of `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: split after the last `)`.
    // What follows starts at field 3 (state); utime and stime are fields 14 and 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        Ok(f.get(i)
            .with_context(|| format!("short {path}"))?
            .parse::<f64>()?)
    };
    Ok((tick(11)? + tick(12)?) / clock_ticks())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(status_bytes(pid, "VmRSS").unwrap() > 0);
        assert!(status_bytes(pid, "VmHWM").unwrap() >= status_bytes(pid, "VmRSS").unwrap() / 2);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
