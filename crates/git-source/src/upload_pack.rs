//! Fetching from a local repository through a `git upload-pack` spawned here rather than by
//! gix, so that what it says on standard error is kept. gix's file transport (gix-transport
//! 0.62, `SpawnProcessOnDemand`) sends a local upload-pack's stderr to `/dev/null`: a corrupt or
//! unreadable repository then reads as gix's opaque protocol error, while upload-pack's own
//! words ("fatal: …", "error: … missing") name the cause. They are kept in a [`StderrTail`]
//! and added to the fetch's error. Over `ssh` the remote upload-pack's stderr comes back as
//! `ssh`'s, which the command line sends to a file (see `crate::ssh`), read by [`file_text`].

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::Transport;
use gix::protocol::transport::client::git;

/// How much of the end of upload-pack's stderr is kept: its last lines say why it failed, and
/// an error message must stay readable.
const TAIL_BYTES: usize = 2048;

/// How long a failed fetch waits for upload-pack's stderr to close (it exits right after saying
/// why), so its last line is not lost to the race with the error.
const STDERR_WAIT: Duration = Duration::from_secs(1);

/// Variables that would point the spawned upload-pack at another repository or configuration
/// than the project's (set in kas's environment by a wrapper script or a Git hook, say).
const FOREIGN_GIT_ENV: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_INDEX_FILE",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_NAMESPACE",
    "GIT_SHALLOW_FILE",
    "GIT_GRAFT_FILE",
    "GIT_REPLACE_REF_BASE",
    "GIT_NO_REPLACE_OBJECTS",
];

/// The end of what a spawned process wrote to its standard error, read on a thread of its own
/// (a process blocked on a full stderr pipe would never answer).
#[derive(Debug, Clone)]
pub(crate) struct StderrTail {
    kept: Arc<Mutex<Vec<u8>>>,
    closed: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl StderrTail {
    /// Starts reading `pipe` until it closes.
    pub(crate) fn read(mut pipe: impl Read + Send + 'static) -> std::io::Result<StderrTail> {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let (done, closed) = mpsc::channel();
        let sink = Arc::clone(&kept);
        std::thread::Builder::new()
            .name("upload-pack stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    keep_tail(&mut lock(&sink), &buf[..n]);
                }
                let _ = done.send(());
            })?;
        Ok(StderrTail {
            kept,
            closed: Arc::new(Mutex::new(closed)),
        })
    }

    /// What was written, its lines trimmed and joined with "; ", once the pipe closed (or
    /// after [`STDERR_WAIT`]); `None` when nothing was.
    pub(crate) fn text(&self) -> Option<String> {
        let _ = lock(&self.closed).recv_timeout(STDERR_WAIT);
        one_line(&lock(&self.kept))
    }
}

/// The end of what a remote upload-pack wrote to the file `path` (over `ssh`, whose stderr
/// goes there), as [`StderrTail::text`]; `None` when the file is empty or unreadable.
pub(crate) fn file_text(path: &Path) -> Option<String> {
    let written = std::fs::read(path).ok()?;
    let mut kept = Vec::new();
    keep_tail(&mut kept, &written);
    one_line(&kept)
}

/// Lines trimmed and joined with "; ", for an error message; `None` without any.
fn one_line(kept: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(kept);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Appends `more` to `kept`, keeping only its last [`TAIL_BYTES`] bytes, cut at a line start
/// when one is near, so a half line does not open the message.
fn keep_tail(kept: &mut Vec<u8>, more: &[u8]) {
    kept.extend_from_slice(more);
    if kept.len() <= TAIL_BYTES {
        return;
    }
    let mut cut = kept.len() - TAIL_BYTES;
    if let Some(newline) = kept[cut..].iter().position(|b| *b == b'\n') {
        cut += newline + 1;
    }
    kept.drain(..cut);
}

/// upload-pack's stdout, owning the process: dropping the connection kills and reaps it (a
/// fetch that failed or was interrupted leaves no process behind).
struct Output {
    stdout: ChildStdout,
    child: Child,
}

impl Read for Output {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `git upload-pack` for the repository at `path` (protocol version 2, as gix's own
/// file transport asks) and connects to it.
pub(crate) fn transport(path: &Path) -> Result<(Box<dyn Transport + Send>, StderrTail), String> {
    let mut command = Command::new("git");
    command
        .arg("upload-pack")
        .arg(path)
        .env("GIT_PROTOCOL", "version=2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in FOREIGN_GIT_ENV {
        command.env_remove(name);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("running git upload-pack: {e}"))?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("git upload-pack started without its pipes".to_owned());
    };
    let tail =
        StderrTail::read(stderr).map_err(|e| format!("reading git upload-pack's stderr: {e}"))?;
    let connection = git::blocking_io::Connection::new(
        Output { stdout, child },
        stdin,
        gix::protocol::transport::Protocol::V2,
        path.to_string_lossy().into_owned(),
        None::<(String, Option<u16>)>,
        git::ConnectMode::Process,
        false,
    );
    Ok((Box::new(connection), tail))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_last_lines_of_a_long_stderr_are_kept_from_a_line_start() {
        let mut kept = Vec::new();
        for i in 0..500 {
            keep_tail(
                &mut kept,
                format!("error: object {i:04} is missing\n").as_bytes(),
            );
        }
        assert!(kept.len() <= TAIL_BYTES, "{}", kept.len());
        let text = String::from_utf8(kept).unwrap();
        assert!(text.starts_with("error: object "), "{text}");
        assert!(text.ends_with("error: object 0499 is missing\n"), "{text}");
    }

    #[test]
    fn a_process_stderr_is_read_to_its_end_and_joined_on_one_line() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "echo 'error: object abc is missing' >&2; echo 'fatal: bad pack' >&2",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let tail = StderrTail::read(child.stderr.take().unwrap()).unwrap();
        child.wait().unwrap();
        assert_eq!(
            tail.text().as_deref(),
            Some("error: object abc is missing; fatal: bad pack")
        );
        let mut quiet = Command::new("true").stderr(Stdio::piped()).spawn().unwrap();
        let tail = StderrTail::read(quiet.stderr.take().unwrap()).unwrap();
        quiet.wait().unwrap();
        assert_eq!(tail.text(), None);
    }
}
