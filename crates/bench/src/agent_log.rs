//! agentk's JSON log, read as it grows: when a synchronization started, when its apply phase
//! ended, when it was done, and its `writes`.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Longest wait for one synchronization (and for `kubectl wait`).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(1800);

/// Unix seconds of an RFC 3339 UTC time as agentk logs it (`2026-11-23T10:00:00.123456Z`).
fn parse_rfc3339_utc(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time
        .strip_suffix('Z')
        .or_else(|| time.strip_suffix("+00:00"))?;
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss = t.next()?.parse::<f64>().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn log_time(l: &Value) -> Option<f64> {
    l["time"].as_str().and_then(parse_rfc3339_utc)
}

/// Reads a JSON-lines log file incrementally.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LogTail {
    pub fn new(path: &Path) -> Self {
        LogTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The complete lines written since the last call that are JSON objects.
    pub fn read_new(&mut self) -> Result<Vec<Value>> {
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        Ok(complete
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
            .filter(Value::is_object)
            .collect())
    }
}

/// What agentk's log said about one synchronization (times are Unix seconds from the log).
#[derive(Debug, Default, Clone)]
pub struct SyncSeen {
    /// "Synchronizing objects" for the commit.
    pub started: Option<f64>,
    /// The last "resourceApplied" event of the project after `started`.
    pub last_applied: Option<f64>,
    /// "Synchronization done".
    pub done: f64,
    pub writes: u64,
    pub objects: u64,
    /// `Kind/name` → when agentk logged the object's "resourceStatus" as Current (its log
    /// line's time, microseconds), the first time after `started`.
    pub current: HashMap<String, f64>,
}

impl SyncSeen {
    /// Takes in one log line about `project` at `commit`; true once it said the
    /// synchronization is done, an error when it failed.
    fn note(&mut self, l: &Value, project: &str, commit: &str) -> Result<bool> {
        let msg = l["msg"].as_str().unwrap_or_default();
        let this_commit = l["commit_id"].as_str() == Some(commit);
        let this_project = l["project_id"].as_str() == Some(project);
        if msg == "Synchronizing objects" && this_commit && self.started.is_none() {
            self.started = log_time(l);
        } else if l["eventType"] == "resourceApplied" && this_project && self.started.is_some() {
            self.last_applied = log_time(l).or(self.last_applied);
        } else if l["eventType"] == "resourceStatus"
            && l["status"] == "Current"
            && this_project
            && self.started.is_some()
        {
            let k = crate::watch::key(
                l["kind"].as_str().unwrap_or_default(),
                l["name"].as_str().unwrap_or_default(),
            );
            if let Some(t) = log_time(l) {
                self.current.entry(k).or_insert(t);
            }
        } else if msg == "Synchronization failed" && this_commit {
            bail!(
                "agentk: synchronization of {project} at {commit} failed: {}",
                l["error"]
            );
        } else if msg == "Synchronization done" && this_commit {
            self.done = log_time(l).unwrap_or_else(unix_now);
            self.writes = l["writes"].as_u64().unwrap_or_default();
            self.objects = l["objects"].as_u64().unwrap_or_default();
            return Ok(true);
        }
        Ok(false)
    }
}

/// Waits for agentk's "Synchronization done" for each `(project, commit)`, failing with the
/// error of a "Synchronization failed" line for one of them.
pub async fn wait_syncs(tail: &mut LogTail, targets: &[(&str, &str)]) -> Result<Vec<SyncSeen>> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let mut seen = vec![SyncSeen::default(); targets.len()];
    let mut done = vec![false; targets.len()];
    while done.contains(&false) {
        for l in tail.read_new()? {
            for (i, &(project, commit)) in targets.iter().enumerate() {
                if !done[i] {
                    done[i] = seen[i].note(&l, project, commit)?;
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {SYNC_TIMEOUT:?} waiting for agentk to synchronize {targets:?}; \
                 see {}",
                tail.path.display()
            );
        }
        if done.contains(&false) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(seen)
}

pub async fn wait_sync(tail: &mut LogTail, project: &str, commit: &str) -> Result<SyncSeen> {
    let mut v = wait_syncs(tail, &[(project, commit)]).await?;
    v.pop().context("no synchronization")
}

/// Writes and phases of one synchronization, in seconds from `t0`.
pub fn phases(objects: usize, seen: &SyncSeen, t0: f64) -> Value {
    json!({
        "objects": objects,
        "writes": seen.writes,
        "started_seconds": seen.started.map(|s| s - t0),
        "applied_seconds": seen.last_applied.map(|s| s - t0),
        "seconds": seen.done - t0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339_utc("2024-05-01T10:00:00.5Z"),
            Some(1_714_557_600.5)
        );
        assert_eq!(
            parse_rfc3339_utc("2000-03-01T00:00:00+00:00"),
            Some(951_868_800.0)
        );
        assert_eq!(parse_rfc3339_utc("nonsense"), None);
    }
}
