//! Keeps a group of child processes tied to one parent.
//!
//! Every child is started through `setpriv --pdeathsig KILL`, so the kernel kills it if the
//! supervising thread dies for any reason (a panic, SIGKILL, a crashed test run): no control-plane
//! process can be orphaned. A clean shutdown stops children in reverse start order with SIGTERM,
//! then SIGKILL after a grace period.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{Result, io_err};

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(15);

#[derive(Debug)]
struct Member {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Child processes started in order and stopped in reverse order.
#[derive(Debug, Default)]
pub struct Group {
    members: Vec<Member>,
}

impl Group {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `program` with `args`; its stdout and stderr go to `log`.
    ///
    /// Must be called from the thread that lives as long as the group: the parent-death signal
    /// fires when the *thread* that forked the child exits.
    pub fn spawn<I, S>(&mut self, name: &str, program: &Path, args: I, log: &Path) -> Result<u32>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("starting {name} ({})", program.display())))?;
        let pid = child.id();
        self.members.push(Member {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        });
        Ok(pid)
    }

    /// Name and pid of every running child, in start order.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.members
            .iter()
            .map(|m| (m.name.clone(), m.child.id()))
            .collect()
    }

    /// The first child found to have exited, with its status and log file.
    pub fn exited(&mut self) -> Option<(String, ExitStatus, PathBuf)> {
        for m in &mut self.members {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Some((m.name.clone(), status, m.log.clone()));
            }
        }
        None
    }

    /// Stops every child, last started first.
    pub fn shutdown(&mut self) {
        while let Some(mut m) = self.members.pop() {
            stop(&mut m.child);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// SIGTERM, wait up to [`GRACE`], then SIGKILL; always reaps the child.
pub fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A flag raised by SIGTERM, SIGINT or SIGHUP.
pub fn shutdown_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .map_err(io_err("installing a signal handler"))?;
    }
    Ok(flag)
}

/// True when the flag was raised.
pub fn requested(flag: &AtomicBool) -> bool {
    flag.load(Ordering::SeqCst)
}

/// Whether a process with this pid exists (and is not a zombie we could still reap).
pub fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Sends SIGTERM to a process by pid.
pub fn terminate(pid: i32) -> bool {
    kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok()
}
