//! Housekeeping of a mirror's object directory, as `git maintenance` does for a clone: remove
//! what failed fetches left behind and consolidate packs with the real `git repack`.
//!
//! Every function here must run under the mirror's fetch lock: then no fetch or repack of ours
//! is writing into `objects/pack`, so every temporary file and `.keep` there is a leftover.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Repack once the mirror holds more packs than this. Each fetch that brings something adds
/// one pack and every object lookup that misses searches all packs, so reads slow down as packs
/// pile up; `git gc --auto` uses 50 (`gc.autoPackLimit`) for work trees fetched a few times a
/// day, but a mirror is fetched every poll interval, and a repack of a mirror with few new packs
/// is cheap. 8 keeps lookups fast and repacks rare (one per 8 changing fetches).
pub(crate) const PACK_THRESHOLD: usize = 8;

/// Longest a repack may run. A mirror of a large project repacks in seconds to a few minutes;
/// past this something is wrong (a stuck disk), and the fetch lock must not be held forever.
const REPACK_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a running `git` is checked for completion.
const WAIT_STEP: Duration = Duration::from_millis(20);

/// Why maintenance failed. The mirror stays readable: a failed repack keeps the old packs.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// `git` could not be started (not installed?).
    #[error("cannot run git: {0}")]
    Spawn(#[source] std::io::Error),
    /// `git repack` ran longer than allowed and was killed.
    #[error("git repack did not finish within {0:?} and was stopped")]
    TimedOut(Duration),
    /// `git repack` failed.
    #[error("git repack failed ({status}): {stderr}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Listing or removing files in `objects/pack` failed.
    #[error("cleaning {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The last repack of a mirror, for status pages and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepackReport {
    /// When it ended.
    pub ended_at: SystemTime,
    /// How long it ran.
    pub duration: Duration,
    /// Packs before it ran.
    pub packs_before: usize,
    /// Packs after it (the old ones are kept when it failed).
    pub packs_after: usize,
    /// Why it failed; `None` on success.
    pub error: Option<String>,
}

/// The state of a mirror's object directory, as of its last fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceStatus {
    /// `.pack` files in the mirror.
    pub packs: usize,
    /// The last repack of this process; `None` if none ran yet.
    pub last_repack: Option<RepackReport>,
    /// Leftover files of failed or interrupted fetches and repacks removed so far.
    pub leftovers_removed: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MaintenanceError + '_ {
    move |source| MaintenanceError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pack_dir_entries(pack_dir: &Path) -> Result<Vec<PathBuf>, MaintenanceError> {
    let entries = match std::fs::read_dir(pack_dir) {
        Ok(entries) => entries,
        // A fresh mirror has no pack directory until its first fetch.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(pack_dir)(e)),
    };
    entries
        .map(|e| e.map(|e| e.path()).map_err(io_err(pack_dir)))
        .collect()
}

fn has_ext(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
}

/// `.pack` files in `objects/pack` of the mirror at `dir`.
pub fn count_packs(dir: &Path) -> Result<usize, MaintenanceError> {
    let pack_dir = dir.join("objects/pack");
    Ok(pack_dir_entries(&pack_dir)?
        .iter()
        .filter(|p| has_ext(p, "pack"))
        .count())
}

/// Whether `path` in `objects/pack` is left over from a fetch or repack that did not finish.
///
/// - `*.keep`: gix writes one before a received pack and deletes it once refs point into the
///   pack; one that is still there makes `git repack -a` keep its pack forever.
/// - temporary files: gix's (`.tmp*`), and git's (`tmp_pack_*`, `tmp_idx_*`, `.tmp-*`).
/// - a `.pack` without its `.idx` (the index was never moved into place) and an `.idx`, `.rev`
///   or `.bitmap` without its `.pack`: unusable, and confusing to object lookups.
fn is_leftover(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with(".tmp") || name.starts_with("tmp_") || has_ext(path, "keep") {
        return true;
    }
    let sibling_missing = |ext: &str| !path.with_extension(ext).exists();
    if has_ext(path, "pack") {
        return sibling_missing("idx");
    }
    ["idx", "rev", "bitmap"].iter().any(|e| has_ext(path, e)) && sibling_missing("pack")
}

/// Removes leftovers of failed or interrupted fetches and repacks (see [`is_leftover`]) from
/// the mirror at `dir`; returns how many files were removed.
pub fn remove_leftovers(dir: &Path) -> Result<u64, MaintenanceError> {
    let pack_dir = dir.join("objects/pack");
    let mut removed = 0;
    for path in pack_dir_entries(&pack_dir)? {
        if !path.is_file() || !is_leftover(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            // Removing `x.pack` may have made `x.idx` a leftover we listed too, or the reverse.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "Removed leftovers of failed fetches from the mirror");
    }
    Ok(removed)
}

/// Consolidates all packs of the mirror at `dir` into one with `git repack -a -d`.
///
/// `-a -d` also packs loose objects and deletes them afterwards (`git prune-packed`), and drops
/// objects no branch or tag reaches any more (history rewritten on the remote). git writes the
/// new pack completely before it deletes the old ones, so a failure or a kill at any point
/// leaves every object readable.
/// How long after a slow failed repack the next one is put off.
pub const REPACK_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A failed repack that ran at least this long is slow to fail: worth putting off.
const SLOW_FAILURE: Duration = Duration::from_secs(60);

/// Whether `last` is a repack that failed slowly (typically by outlasting its timeout) less
/// than [`REPACK_RETRY_AFTER`] before `now` (pure). A quick failure (a bad setting) costs
/// little and is retried at the next fetch, so a fix takes effect at once.
pub fn failed_recently(last: Option<&RepackReport>, now: std::time::SystemTime) -> bool {
    last.is_some_and(|r| {
        r.error.is_some()
            && r.duration >= SLOW_FAILURE
            && now
                .duration_since(r.ended_at)
                .is_ok_and(|ago| ago < REPACK_RETRY_AFTER)
    })
}

pub fn repack(dir: &Path) -> Result<(), MaintenanceError> {
    let mut cmd = Command::new("git");
    cmd.arg("--git-dir")
        .arg(dir)
        // A bare repository would also write a bitmap, which only speeds up serving clones.
        .args(["repack", "-a", "-d", "-q", "--no-write-bitmap-index"])
        .current_dir(dir);
    isolate(&mut cmd);
    run_bounded(cmd, REPACK_TIMEOUT)
}

/// Runs `git` without the user's or system's configuration (hooks, `pack.*` settings, aliases)
/// and without any `GIT_*` variable of our environment pointing it at another repository.
fn isolate(cmd: &mut Command) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    cmd.env_clear()
        .env("PATH", path)
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also stops the `pack-objects` it starts.
        .process_group(0);
}

fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(), MaintenanceError> {
    let mut child = cmd.spawn().map_err(MaintenanceError::Spawn)?;
    // Read stderr on the side: a child blocked on a full pipe would never exit.
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(MaintenanceError::Spawn)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                return Err(MaintenanceError::TimedOut(timeout));
            }
            None => std::thread::sleep(WAIT_STEP),
        }
    };
    let stderr = stderr
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(MaintenanceError::Failed {
            status,
            stderr: stderr.trim().to_owned(),
        })
    }
}

/// Kills the process group led by `pid` (std can only kill the leader; `unsafe_code` rules
/// out calling `kill(2)` directly).
fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repack_that_failed_slowly_is_put_off_for_an_hour() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let report = |error: Option<&str>| RepackReport {
            ended_at: t0,
            duration: Duration::from_secs(600),
            packs_before: 60,
            packs_after: 60,
            error: error.map(str::to_owned),
        };
        let failed = report(Some("timed out"));
        assert!(failed_recently(Some(&failed), t0 + Duration::from_secs(60)));
        assert!(!failed_recently(Some(&failed), t0 + REPACK_RETRY_AFTER));
        assert!(!failed_recently(
            Some(&report(None)),
            t0 + Duration::from_secs(60)
        ));
        assert!(!failed_recently(None, t0));
        let quick = RepackReport {
            duration: Duration::from_millis(30),
            ..report(Some("bad setting"))
        };
        assert!(!failed_recently(Some(&quick), t0 + Duration::from_secs(60)));
    }

    #[test]
    fn leftovers_are_recognised() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let touch = |name: &str| {
            std::fs::write(dir.join(name), b"").expect("write");
            dir.join(name)
        };
        let live_pack = touch("pack-a.pack");
        let live_idx = touch("pack-a.idx");
        let rev = touch("pack-a.rev");
        assert!(!is_leftover(&live_pack));
        assert!(!is_leftover(&live_idx));
        assert!(!is_leftover(&rev));
        for leftover in [
            "pack-a.keep",
            "pack-b.pack",
            "pack-c.idx",
            "pack-c.rev",
            ".tmpAbC12",
            "tmp_pack_XYZ",
            "tmp_idx_XYZ",
            ".tmp-123-pack-x.pack",
        ] {
            assert!(is_leftover(&touch(leftover)), "{leftover}");
        }
    }
}
