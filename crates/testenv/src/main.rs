//! `testenv`: a real Kubernetes control plane on loopback, for people and for the test suite.
//!
//! - `testenv build` builds (or finds in the cache) the control-plane programs.
//! - `testenv up` starts one in the background and prints the variables to export;
//!   `testenv down` stops it.
//! - `testenv run -- CMD…` starts a fresh one, runs CMD with `KUBECONFIG` and
//!   `TETHER_TESTENV_DIR` set, stops it and exits with CMD's status.
//! - `testenv stop NAME [--signal TERM|KILL]`, `testenv start NAME`,
//!   `testenv restart NAME [--signal TERM|KILL]` and `testenv status` ask a running supervisor
//!   to stop or start one component (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler, kwok) with the same flags, ports and data; `start` and `restart` return
//!   once it is healthy again.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tether_testenv::cluster::{self, tail};
use tether_testenv::control::{self, Request};
use tether_testenv::supervisor::{self, Group, StopSignal, requested};
use tether_testenv::{ENV_DIR, TestEnv};

#[derive(Parser, Debug)]
#[command(
    name = "testenv",
    version,
    about = "A real Kubernetes control plane on 127.0.0.1"
)]
struct Cli {
    /// Folder with etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and
    /// kwok. Default: the build cache (built on first use).
    #[arg(long, env = "TETHER_TESTENV_BIN", global = true)]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the control-plane programs (a no-op when the cache has them) and print their folder.
    Build,
    /// Start a control plane in the background and print the variables to export.
    Up {
        #[arg(
            long,
            env = "TETHER_TESTENV_STATE",
            default_value = "/tmp/tether-testenv"
        )]
        state_dir: PathBuf,
    },
    /// Stop the control plane started by `up` (`--state-dir`, else `TETHER_TESTENV_STATE`,
    /// else `TETHER_TESTENV_DIR` as `up` says to export, else the folder `up` uses).
    Down {
        #[command(flatten)]
        at: Running,
    },
    /// Start a fresh control plane, run a command against it, then stop it.
    Run {
        /// Keep the state folder (logs, PKI) after the command ends.
        #[arg(long)]
        keep: bool,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Stop one component of a running control plane; it stays stopped until `start`.
    Stop {
        name: String,
        #[arg(long, default_value = "TERM")]
        signal: StopSignal,
        #[command(flatten)]
        at: Running,
    },
    /// Start a stopped component again (same flags, ports and data) and wait until it is healthy.
    Start {
        name: String,
        #[command(flatten)]
        at: Running,
    },
    /// Stop one component and start it again, then wait until it is healthy.
    Restart {
        name: String,
        #[arg(long, default_value = "TERM")]
        signal: StopSignal,
        #[command(flatten)]
        at: Running,
    },
    /// Print each component's pid, or `stopped`.
    Status {
        #[command(flatten)]
        at: Running,
    },
    /// Run the control plane in the foreground (used by `up` and `run`).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        state_dir: PathBuf,
    },
}

/// Which running control plane a `stop`/`start`/`restart`/`status` talks to.
#[derive(clap::Args, Debug)]
struct Running {
    /// State folder of the control plane. Default: `TETHER_TESTENV_STATE` (the variable `up`
    /// and `down` read), else `TETHER_TESTENV_DIR` (what `up` says to export, and what
    /// `testenv run` sets), else the folder `up` uses.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl Running {
    fn dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .or_else(|| std::env::var_os("TETHER_TESTENV_STATE").map(PathBuf::from))
            .or_else(|| std::env::var_os(ENV_DIR).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/tmp/tether-testenv"))
    }

    fn env(&self) -> Result<TestEnv> {
        Ok(TestEnv::open(&self.dir())?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("testenv: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Build => {
            println!("{}", bin_dir(cli.bin_dir)?.display());
            Ok(0)
        }
        Cmd::Up { state_dir } => up(&bin_dir(cli.bin_dir)?, &state_dir),
        Cmd::Down { at } => down(&at.dir()),
        Cmd::Run { keep, command } => run(&bin_dir(cli.bin_dir)?, keep, &command),
        Cmd::Supervise { state_dir } => supervise(&bin_dir(cli.bin_dir)?, &state_dir),
        Cmd::Stop { name, signal, at } => {
            at.env()?.stop_component(&name, signal)?;
            eprintln!("testenv: {name} stopped");
            Ok(0)
        }
        Cmd::Start { name, at } => {
            at.env()?.start_component(&name)?;
            eprintln!("testenv: {name} started and healthy");
            Ok(0)
        }
        Cmd::Restart { name, signal, at } => {
            at.env()?.restart_component(&name, signal)?;
            eprintln!("testenv: {name} restarted and healthy");
            Ok(0)
        }
        Cmd::Status { at } => {
            let env = at.env()?;
            println!("{}", control::request(&env.dir, &Request::Status)?);
            Ok(0)
        }
    }
}

/// The programs' folder: given, or the cache, building into it when something is missing.
fn bin_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testenv/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn self_exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the testenv program")
}

/// Waits for a supervisor to write `cluster.json` (ready) or `failed`, or to exit.
fn wait_ready(child: &mut std::process::Child, state_dir: &Path, log: &Path) -> Result<TestEnv> {
    let stop = supervisor::shutdown_flag()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if state_dir.join("ready").exists() {
            return Ok(TestEnv::open(state_dir)?);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the control plane did not start ({status}); log {}:\n{}",
                log.display(),
                tail(log, 40)
            );
        }
        if requested(&stop) || Instant::now() > deadline {
            supervisor::stop(child);
            bail!(
                "the control plane did not become ready; log {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exports(env: &TestEnv) -> String {
    format!(
        "export KUBECONFIG={}\nexport {ENV_DIR}={}\nexport PATH={}:$PATH\n",
        env.kubeconfig.display(),
        env.dir.display(),
        env.bin_dir.display()
    )
}

fn running_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state_dir.join("supervisor.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    supervisor::alive(pid).then_some(pid)
}

fn up(bin: &Path, state_dir: &Path) -> Result<u8> {
    if running_pid(state_dir).is_some() {
        let env = TestEnv::open(state_dir)?;
        eprintln!("testenv: already running in {}", state_dir.display());
        print!("{}", exports(&env));
        return Ok(0);
    }
    let _ = std::fs::remove_dir_all(state_dir);
    std::fs::create_dir_all(state_dir)?;
    let log = state_dir.join("supervisor.log");
    // setsid detaches the supervisor from this terminal so it outlives `up`; its own children
    // stay tied to it by their parent-death signal.
    let mut child = Command::new("setsid")
        .arg(self_exe()?)
        .arg("--bin-dir")
        .arg(bin)
        .arg("supervise")
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?.try_clone()?)
        .spawn()
        .context("starting the supervisor")?;
    let env = wait_ready(&mut child, state_dir, &log)?;
    eprintln!(
        "testenv: control plane up at {} (logs in {}/logs); stop it with `testenv down`",
        env.server,
        state_dir.display()
    );
    print!("{}", exports(&env));
    Ok(0)
}

fn down(state_dir: &Path) -> Result<u8> {
    let Some(pid) = running_pid(state_dir) else {
        eprintln!("testenv: nothing running in {}", state_dir.display());
        return Ok(0);
    };
    supervisor::terminate(pid);
    let deadline = Instant::now() + Duration::from_secs(60);
    while supervisor::alive(pid) {
        if Instant::now() > deadline {
            bail!("supervisor {pid} did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("testenv: stopped");
    Ok(0)
}

fn run(bin: &Path, keep: bool, command: &[String]) -> Result<u8> {
    let state_dir = std::env::temp_dir().join(format!("tether-testenv-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    std::fs::create_dir_all(&state_dir)?;
    let log = state_dir.join("supervisor.log");
    // The supervisor dies with this process, whatever kills it.
    let mut sup = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(self_exe()?)
        .arg("--bin-dir")
        .arg(bin)
        .arg("supervise")
        .arg("--state-dir")
        .arg(&state_dir)
        .stdin(Stdio::null())
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?.try_clone()?)
        .spawn()
        .context("starting the supervisor")?;
    let env = wait_ready(&mut sup, &state_dir, &log)?;
    eprintln!("testenv: control plane ready at {}", env.server);
    let path = format!(
        "{}:{}",
        env.bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (program, args) = command.split_first().context("no command given")?;
    let status = Command::new(program)
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .env(ENV_DIR, &env.dir)
        .env("PATH", path)
        .status();
    supervisor::stop(&mut sup);
    let code = match status {
        Ok(s) => s.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)),
        Err(e) => {
            eprintln!("testenv: could not run {program}: {e}");
            1
        }
    };
    if keep || code != 0 {
        eprintln!("testenv: logs kept in {}/logs", state_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    Ok(code)
}

/// etcd data of supervisors that were killed outright (SIGKILL leaves no chance to clean up).
fn remove_stale_etcd_dirs(shm: &Path) {
    let Ok(entries) = std::fs::read_dir(shm) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("tether-etcd-")
            .and_then(|p| p.parse::<i32>().ok())
            && !supervisor::alive(pid)
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn supervise(bin: &Path, state_dir: &Path) -> Result<u8> {
    let stop = supervisor::shutdown_flag()?;
    std::fs::create_dir_all(state_dir)?;
    std::fs::write(
        state_dir.join("supervisor.pid"),
        std::process::id().to_string(),
    )?;
    let shm = Path::new("/dev/shm");
    remove_stale_etcd_dirs(shm);
    // The data outlives a restart of etcd (only this process removes it, on its way out).
    let etcd_dir = if shm.is_dir() {
        shm.join(format!("tether-etcd-{}", std::process::id()))
    } else {
        state_dir.join("etcd")
    };
    let opts = cluster::Options {
        bin_dir: bin.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
        etcd_dir: etcd_dir.clone(),
    };
    let mut group = Group::new();
    let code = match cluster::start(&opts, &mut group, &stop) {
        Err(e) => {
            eprintln!("testenv: {e}");
            1
        }
        Ok(info) => {
            eprintln!("testenv: ready at {}", info.server);
            watch(state_dir, &mut group, &stop).unwrap_or_else(|e| {
                eprintln!("testenv: {e:#}");
                1
            })
        }
    };
    group.shutdown();
    let _ = std::fs::remove_dir_all(&etcd_dir);
    let _ = std::fs::remove_file(state_dir.join("ready"));
    let _ = std::fs::remove_file(state_dir.join("supervisor.pid"));
    eprintln!("testenv: stopped");
    Ok(code)
}

/// Serves control requests and watches the children until shutdown is requested (exit code 0)
/// or a component exits on its own (1).
///
/// An unexpected exit tears everything down, as before restarts existed, rather than being
/// restarted the way a kubelet would: this cluster is a test fixture, and a component that
/// crashes (or is killed by something other than a control request) means the run is no longer
/// testing what it thinks it is. Restarting it quietly would let a suite pass across a crash
/// nobody asked for, with the crash visible only in a log. Tests that want a restart ask for
/// one, and the supervisor then knows the exit is deliberate.
fn watch(state_dir: &Path, group: &mut Group, stop: &std::sync::atomic::AtomicBool) -> Result<u8> {
    let server = control::Server::bind(state_dir)?;
    control::write_pids(state_dir, group)?;
    std::fs::write(state_dir.join("ready"), "")?;
    loop {
        if requested(stop) {
            return Ok(0);
        }
        server.serve_pending(group);
        if let Some((name, status, log)) = group.exited() {
            eprintln!(
                "testenv: {name} exited unexpectedly ({status}); stopping the control plane. \
                 Last lines of {}:\n{}",
                log.display(),
                tail(&log, 20)
            );
            return Ok(1);
        }
        // Polling keeps the supervisor one thread (every spawn must come from it: see
        // `Group::spawn`); 100 ms is quick enough for a control request.
        std::thread::sleep(Duration::from_millis(100));
    }
}
