//! Keeps a group of child processes tied to one parent.
//!
//! Every child is started through `setpriv --pdeathsig KILL`, so the kernel kills it if the
//! supervising thread dies for any reason (a panic, SIGKILL, a crashed test run): no control-plane
//! process can be orphaned. A clean shutdown stops children in reverse start order with SIGTERM,
//! then SIGKILL after a grace period.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{Error, Result, io_err};

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(15);

#[derive(Debug)]
struct Member {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    /// `None` while the member is deliberately stopped (see [`Group::stop_member`]).
    child: Option<Child>,
}

/// How to ask a child to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM, then SIGKILL after a grace period: a clean shutdown.
    Term,
    /// SIGKILL: a crash, with no chance to clean up.
    Kill,
}

impl std::str::FromStr for StopSignal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().trim_start_matches("SIG") {
            "TERM" => Ok(Self::Term),
            "KILL" => Ok(Self::Kill),
            _ => Err(format!("unknown signal {s:?} (TERM or KILL)")),
        }
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Term => "TERM",
            Self::Kill => "KILL",
        })
    }
}

/// Child processes started in order and stopped in reverse order. Each remembers how it was
/// started, so one can be stopped and started again with the same flags (hence the same ports,
/// PKI and data directory).
#[derive(Debug, Default)]
pub struct Group {
    members: Vec<Member>,
}

/// Starts `program` through `setpriv` with its output appended to `log`.
fn launch(name: &str, program: &Path, args: &[OsString], log: &Path) -> Result<Child> {
    // Append, so that the log of a restarted component keeps what its previous run wrote.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("opening {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io_err(format!("opening {}", log.display())))?;
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io_err(format!("starting {name} ({})", program.display())))
}

impl Group {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `program` with `args`; its stdout and stderr go to `log` (truncated first).
    ///
    /// Must be called from the thread that lives as long as the group: the parent-death signal
    /// fires when the *thread* that forked the child exits. The same holds for
    /// [`Group::start_member`].
    pub fn spawn<I, S>(&mut self, name: &str, program: &Path, args: I, log: &Path) -> Result<u32>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let child = launch(name, program, &args, log)?;
        let pid = child.id();
        self.members.push(Member {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            log: log.to_path_buf(),
            child: Some(child),
        });
        Ok(pid)
    }

    /// Name and pid of every running child, in start order.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.members
            .iter()
            .filter_map(|m| Some((m.name.clone(), m.child.as_ref()?.id())))
            .collect()
    }

    /// Name and pid (`None` when deliberately stopped) of every member, in start order.
    pub fn status(&self) -> Vec<(String, Option<u32>)> {
        self.members
            .iter()
            .map(|m| (m.name.clone(), m.child.as_ref().map(Child::id)))
            .collect()
    }

    /// The first running child found to have exited, with its status and log file. Members
    /// stopped through [`Group::stop_member`] are not running, so never reported here.
    pub fn exited(&mut self) -> Option<(String, ExitStatus, PathBuf)> {
        for m in &mut self.members {
            if let Some(child) = &mut m.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some((m.name.clone(), status, m.log.clone()));
            }
        }
        None
    }

    fn member(&mut self, name: &str) -> Result<&mut Member> {
        let known = || {
            let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
            names.join(", ")
        };
        let err = Error::Other(format!(
            "no component named {name:?} (there are: {})",
            known()
        ));
        self.members.iter_mut().find(|m| m.name == name).ok_or(err)
    }

    /// Stops one member deliberately and reaps it; it stays stopped until
    /// [`Group::start_member`]. Returns how it exited.
    pub fn stop_member(&mut self, name: &str, signal: StopSignal) -> Result<String> {
        let m = self.member(name)?;
        let mut child = m
            .child
            .take()
            .ok_or_else(|| Error::Other(format!("{name} is already stopped")))?;
        let status = match signal {
            StopSignal::Term => stop(&mut child),
            StopSignal::Kill => {
                let _ = child.kill();
                child.wait().ok()
            }
        };
        Ok(status.map_or_else(|| "unknown status".into(), |s| s.to_string()))
    }

    /// Starts a stopped member again with the flags and log it was first started with.
    pub fn start_member(&mut self, name: &str) -> Result<u32> {
        let m = self.member(name)?;
        if m.child.is_some() {
            return Err(Error::Other(format!("{name} is already running")));
        }
        let child = launch(&m.name, &m.program, &m.args, &m.log)?;
        let pid = child.id();
        m.child = Some(child);
        Ok(pid)
    }

    /// Stops every child, last started first.
    pub fn shutdown(&mut self) {
        while let Some(m) = self.members.pop() {
            if let Some(mut child) = m.child {
                stop(&mut child);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// SIGTERM, wait up to [`GRACE`], then SIGKILL; always reaps the child and returns how it
/// exited (when that could be read).
pub fn stop(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Err(_) => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _ = child.kill();
    child.wait().ok()
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
