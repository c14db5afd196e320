//! Running a renderer: its own process group, an empty environment, a time limit and an output
//! limit, each enforced by killing the whole group.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

use super::spec::CommandLine;

/// Most bytes of stderr kept (the rest is read and dropped so the renderer never blocks).
const MAX_STDERR: usize = 64 * 1024;

/// How one run ended, short of a failure to start it.
#[derive(Debug)]
pub enum Ran {
    /// It exited by itself.
    Exited {
        /// Exit code 0.
        success: bool,
        /// Its output.
        stdout: Vec<u8>,
        /// Its error output (at most [`MAX_STDERR`] bytes).
        stderr: String,
        /// The signal that ended it, if one did (not kas's: a kernel or cgroup OOM kill).
        killed_by: Option<i32>,
    },
    /// Killed: it ran past the time limit.
    TimedOut,
    /// Killed: its output went past the limit.
    OutputTooLarge,
}

/// Bounds of one run.
#[derive(Debug, Clone)]
pub struct RunLimits {
    /// Wall-clock time.
    pub timeout: Duration,
    /// Bytes on stdout.
    pub max_output: u64,
}

/// Runs `line` in `cwd` with exactly `env`.
pub async fn run(
    line: &CommandLine,
    env: &[(&'static str, PathBuf)],
    cwd: &Path,
    limits: &RunLimits,
) -> std::io::Result<Ran> {
    let mut child = tokio::process::Command::new(&line.program)
        .args(&line.args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let ran = tokio::time::timeout(limits.timeout, collect(&mut child, limits.max_output)).await;
    match ran {
        Ok(Ok(Some(ran))) => Ok(ran),
        Ok(Ok(None)) => {
            kill_group(group, &mut child).await;
            Ok(Ran::OutputTooLarge)
        }
        Ok(Err(e)) => {
            kill_group(group, &mut child).await;
            Err(e)
        }
        Err(_) => {
            kill_group(group, &mut child).await;
            Ok(Ran::TimedOut)
        }
    }
}

/// Reads both outputs and waits for the exit; `None` as soon as stdout passes `max_output`.
async fn collect(child: &mut Child, max_output: u64) -> std::io::Result<Option<Ran>> {
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other(
            "the renderer's output was not captured",
        ));
    };
    let errors = tokio::spawn(read_capped(stderr, MAX_STDERR as u64, false));
    let Some(out) = read_capped(stdout, max_output, true).await? else {
        errors.abort();
        return Ok(None);
    };
    let status = child.wait().await?;
    let err = errors
        .await
        .map_err(std::io::Error::other)??
        .unwrap_or_default();
    Ok(Some(Ran::Exited {
        success: status.success(),
        killed_by: std::os::unix::process::ExitStatusExt::signal(&status),
        stdout: out,
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }))
}

/// Reads to the end, keeping at most `max` bytes; past it, `None` when `strict`, otherwise the
/// rest is read and dropped.
async fn read_capped(
    mut r: impl AsyncRead + Unpin,
    max: u64,
    strict: bool,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(Some(kept));
        }
        let room = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .saturating_sub(kept.len());
        if n > room && strict {
            return Ok(None);
        }
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// Kills the renderer's whole process group (it may have started helpers) and reaps it.
async fn kill_group(group: Option<i32>, child: &mut Child) {
    if let Some(pgid) = group
        && let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL)
    {
        tracing::debug!(error = %e, "Killing the renderer's process group");
    }
    let _ = child.kill().await;
}
