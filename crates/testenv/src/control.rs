//! Stopping and starting single components of a running control plane.
//!
//! The supervisor listens on a Unix socket, `control.sock` in its state directory. A client
//! connects, writes one request line and reads one reply line:
//!
//! | request                      | effect                                                  |
//! |------------------------------|---------------------------------------------------------|
//! | `stop NAME [TERM\|KILL]`     | signal NAME (default TERM), reap it, keep it stopped     |
//! | `start NAME`                 | start a stopped NAME again with the same flags          |
//! | `restart NAME [TERM\|KILL]`  | `stop` (when running), then `start`                     |
//! | `status`                     | `NAME=PID` or `NAME=stopped` for every component        |
//!
//! The reply is `ok TEXT` or `error TEXT`. The supervisor answers once the process has exited
//! or been spawned; waiting for it to be *healthy* is the client's job
//! ([`crate::TestEnv::restart_component`]), so that a slow start never stalls the supervisor.
//!
//! A socket (rather than signals or a FIFO) gives each request its own reply channel, and the
//! supervisor stays single-threaded: it accepts without blocking between its checks on the
//! children, which keeps every spawn on the thread that owns the parent-death signal.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::supervisor::{Group, StopSignal};
use crate::{Error, Result, io_err};

/// The socket's file name in the state directory.
pub const SOCKET: &str = "control.sock";

/// Longer than the supervisor's grace period for SIGTERM, so a slow stop still gets its answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// One request to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Stop(String, StopSignal),
    Start(String),
    Restart(String, StopSignal),
    Status,
}

impl Request {
    /// Parses a request line (see the module documentation).
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let signal = |w: Option<&&str>| w.map_or(Ok(StopSignal::Term), |s| s.parse());
        match words.as_slice() {
            ["stop", name, rest @ ..] if rest.len() <= 1 => {
                Ok(Self::Stop(name.to_string(), signal(rest.first())?))
            }
            ["restart", name, rest @ ..] if rest.len() <= 1 => {
                Ok(Self::Restart(name.to_string(), signal(rest.first())?))
            }
            ["start", name] => Ok(Self::Start(name.to_string())),
            ["status"] => Ok(Self::Status),
            _ => Err(format!(
                "bad request {line:?}: expected `stop NAME [TERM|KILL]`, `start NAME`, \
                 `restart NAME [TERM|KILL]` or `status`"
            )),
        }
    }

    /// The request line this parses back from.
    pub fn line(&self) -> String {
        match self {
            Self::Stop(n, s) => format!("stop {n} {s}"),
            Self::Start(n) => format!("start {n}"),
            Self::Restart(n, s) => format!("restart {n} {s}"),
            Self::Status => "status".into(),
        }
    }

    /// Carries the request out on `group`, returning the reply text.
    pub fn apply(&self, group: &mut Group) -> Result<String> {
        match self {
            Self::Stop(name, sig) => {
                let status = group.stop_member(name, *sig)?;
                Ok(format!("{name} stopped ({status})"))
            }
            Self::Start(name) => {
                let pid = group.start_member(name)?;
                Ok(format!("{name} started, pid {pid}"))
            }
            Self::Restart(name, sig) => {
                let running = group
                    .status()
                    .iter()
                    .any(|(n, pid)| n == name && pid.is_some());
                if running {
                    group.stop_member(name, *sig)?;
                }
                let pid = group.start_member(name)?;
                Ok(format!("{name} restarted, pid {pid}"))
            }
            Self::Status => Ok(group
                .status()
                .iter()
                .map(|(n, pid)| match pid {
                    Some(p) => format!("{n}={p}"),
                    None => format!("{n}=stopped"),
                })
                .collect::<Vec<_>>()
                .join(" ")),
        }
    }
}

/// Writes `pids` in the state directory: `PID NAME` per running component, in start order.
pub fn write_pids(state_dir: &Path, group: &Group) -> Result<()> {
    let pids: String = group
        .pids()
        .iter()
        .map(|(name, pid)| format!("{pid} {name}\n"))
        .collect();
    let path = state_dir.join("pids");
    std::fs::write(&path, pids).map_err(io_err(format!("writing {}", path.display())))
}

/// The supervisor's end of the socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    state_dir: PathBuf,
}

impl Server {
    /// Listens on `control.sock` in `state_dir`, replacing a socket left by a killed supervisor.
    pub fn bind(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let what = format!("listening on {}", path.display());
        let listener = UnixListener::bind(&path).map_err(io_err(&what))?;
        listener.set_nonblocking(true).map_err(io_err(what))?;
        Ok(Self {
            listener,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Answers every client waiting now; returns at once when there is none.
    pub fn serve_pending(&self, group: &mut Group) {
        while let Ok((stream, _)) = self.listener.accept() {
            if let Err(e) = self.serve(stream, group) {
                eprintln!("testenv: control request failed: {e}");
            }
        }
    }

    fn serve(&self, stream: UnixStream, group: &mut Group) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        // A client that connects and never writes must not hang the supervisor.
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let reply = match Request::parse(&line) {
            Err(e) => format!("error {e}"),
            Ok(Request::Status) => {
                format!("ok {}", Request::Status.apply(group).unwrap_or_default())
            }
            Ok(req) => self.change(&req, group),
        };
        (&stream).write_all(format!("{reply}\n").as_bytes())
    }

    /// Carries out a stop, start or restart, logged (health polls ask for `status` several times
    /// a second, so those are not) and reflected in the `pids` file.
    fn change(&self, req: &Request, group: &mut Group) -> String {
        eprintln!("testenv: control: {}", req.line());
        let reply = match req.apply(group) {
            Ok(text) => format!("ok {text}"),
            Err(e) => format!("error {e}"),
        };
        eprintln!("testenv: control: {reply}");
        if let Err(e) = write_pids(&self.state_dir, group) {
            eprintln!("testenv: {e}");
        }
        reply
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.state_dir.join(SOCKET));
    }
}

/// Sends one request to the supervisor of `state_dir` and returns the text of an `ok` reply.
pub fn request(state_dir: &Path, req: &Request) -> Result<String> {
    let path = state_dir.join(SOCKET);
    let mut stream = UnixStream::connect(&path).map_err(io_err(format!(
        "connecting to the supervisor at {} (is the control plane running?)",
        path.display()
    )))?;
    let what = format!("talking to the supervisor at {}", path.display());
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err(&what))?;
    stream
        .write_all(format!("{}\n", req.line()).as_bytes())
        .map_err(io_err(&what))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err(&what))?;
    let reply = reply.trim_end();
    match reply.split_once(' ') {
        Some(("ok", text)) => Ok(text.to_string()),
        Some(("error", text)) => Err(Error::Other(format!("{}: {text}", req.line()))),
        _ => Err(Error::Other(format!(
            "{}: unexpected reply {reply:?}",
            req.line()
        ))),
    }
}

/// Parses a `status` reply into name and pid (`None` when stopped).
pub fn parse_status(text: &str) -> Vec<(String, Option<u32>)> {
    text.split_whitespace()
        .filter_map(|w| {
            let (name, pid) = w.split_once('=')?;
            Some((name.to_string(), pid.parse().ok()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_term_as_the_default_signal() {
        assert_eq!(
            Request::parse("stop etcd\n"),
            Ok(Request::Stop("etcd".into(), StopSignal::Term))
        );
        assert_eq!(
            Request::parse("restart kube-apiserver SIGKILL"),
            Ok(Request::Restart("kube-apiserver".into(), StopSignal::Kill))
        );
        assert_eq!(
            Request::parse("start etcd"),
            Ok(Request::Start("etcd".into()))
        );
        assert_eq!(Request::parse("status"), Ok(Request::Status));
        for bad in [
            "",
            "stop",
            "stop etcd HUP",
            "start etcd KILL",
            "frobnicate x",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_lines_round_trip() {
        for req in [
            Request::Stop("etcd".into(), StopSignal::Kill),
            Request::Start("kwok".into()),
            Request::Restart("kube-apiserver".into(), StopSignal::Term),
            Request::Status,
        ] {
            assert_eq!(Request::parse(&req.line()), Ok(req));
        }
    }

    /// Serves `group` on the calling thread (which owns the children) while another thread
    /// sends `req`, until the reply arrives or a deadline passes.
    fn ask(dir: &Path, server: &Server, group: &mut Group, req: Request) -> Result<String> {
        let client = {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || request(&dir, &req))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !client.is_finished() {
            assert!(std::time::Instant::now() < deadline, "no reply within 30 s");
            server.serve_pending(group);
            std::thread::sleep(Duration::from_millis(10));
        }
        client.join().expect("client thread")
    }

    fn alive(pid: u32) -> bool {
        // A reaped process has no /proc entry; the group reaps what it stops.
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Waits (up to 10 s) until `log` has `n` lines.
    fn wait_for_lines(log: &Path, n: usize) {
        let poll_deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(log).expect("log").lines().count() < n {
            assert!(
                std::time::Instant::now() < poll_deadline,
                "log: {:?}",
                std::fs::read_to_string(log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_stopped_member_is_not_an_exit_and_starts_again_with_its_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sleeper.log");
        let mut group = Group::new();
        let first = group
            .spawn(
                "sleeper",
                Path::new("/bin/sh"),
                ["-c", "echo run; exec sleep 600"],
                &log,
            )
            .expect("spawn");
        // Each run writes one line; one stopped before its shell wrote would leave none.
        wait_for_lines(&log, 1);
        let server = Server::bind(dir.path()).expect("bind");

        let stopped = ask(
            dir.path(),
            &server,
            &mut group,
            Request::Stop("sleeper".into(), StopSignal::Kill),
        );
        assert!(stopped.expect("stop").starts_with("sleeper stopped"));
        assert!(!alive(first));
        assert_eq!(
            group.exited(),
            None,
            "a deliberate stop is not reported as an exit"
        );
        let status = ask(dir.path(), &server, &mut group, Request::Status).expect("status");
        assert_eq!(parse_status(&status), vec![("sleeper".to_string(), None)]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pids")).expect("pids"),
            ""
        );

        ask(
            dir.path(),
            &server,
            &mut group,
            Request::Start("sleeper".into()),
        )
        .expect("start");
        wait_for_lines(&log, 2);
        let restarted = ask(
            dir.path(),
            &server,
            &mut group,
            Request::Restart("sleeper".into(), StopSignal::Term),
        )
        .expect("restart");
        let [(_, pid)] = group.pids()[..] else {
            panic!("one member: {:?}", group.pids());
        };
        assert_ne!(pid, first);
        assert!(restarted.ends_with(&format!("pid {pid}")), "{restarted}");
        assert!(alive(pid));
        // Started three times with the same flags, into one log that keeps every run's output.
        wait_for_lines(&log, 3);
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "run\nrun\nrun\n"
        );

        let unknown = ask(
            dir.path(),
            &server,
            &mut group,
            Request::Start("etcd".into()),
        );
        assert!(
            unknown
                .expect_err("unknown")
                .to_string()
                .contains("no component named")
        );
        group.shutdown();
        assert!(!alive(pid));
    }

    #[test]
    fn status_replies_name_pids_and_stopped_components() {
        assert_eq!(
            parse_status("etcd=12 kube-apiserver=stopped"),
            vec![("etcd".into(), Some(12)), ("kube-apiserver".into(), None)]
        );
    }
}
