//! The kas process under test: its configuration, start, stop and what /proc says about it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tether_kas_api::AdminClient;
use tether_test_support::Pki;
use tokio::process::{Child, Command};

/// Ports and files of one kas setup; they stay the same across restarts so the agents can come
/// back to the same address and kas finds the same database.
#[derive(Debug)]
pub struct KasSetup {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub agent_port: u16,
    pub api_port: u16,
    /// Where kas's health endpoints (`/liveness`, `/readiness`) answer.
    pub observability_port: u16,
}

impl KasSetup {
    /// Writes a configuration that binds free ports on 127.0.0.1 and keeps its data in `dir`.
    pub fn write(bin: &Path, dir: &Path, log_level: &str, tls: Option<&Pki>) -> Result<Self> {
        Self::write_with(bin, dir, log_level, tls, "")
    }

    /// [`KasSetup::write`] with `extra` top-level YAML (a shared database, Redis, peers).
    pub fn write_with(
        bin: &Path,
        dir: &Path,
        log_level: &str,
        tls: Option<&Pki>,
        extra: &str,
    ) -> Result<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let [agent_port, api_port, obs_port, k8s_port] = free_ports()?;
        let config = dir.join("kas.yaml");
        // Every fake agent connects from loopback: the agent listener's per-address cap (meant
        // for the internet) is lifted. Git is never polled during a run (no project has a
        // repository anyway); 1h keeps any background fetch out of the CPU numbers.
        let yaml = format!(
            "data_dir: {data}\n\
             agent:\n  listen:\n    address: 127.0.0.1:{agent_port}\n{agent_tls}\
             \x20   max_connections: 30000\n    max_connections_per_address: 30000\n\
             api:\n  listen:\n    address: 127.0.0.1:{api_port}\n\
             git:\n  poll_interval: 1h\n\
             kubernetes_api:\n  listen:\n    address: 127.0.0.1:{k8s_port}\n\
             observability:\n  listen:\n    address: 127.0.0.1:{obs_port}\n  logging:\n    level: {log_level}\n{extra}",
            data = data.display(),
            agent_tls = tls.map_or(String::new(), |p| format!(
                "    certificate_file: {}\n    key_file: {}\n",
                p.cert.display(),
                p.key.display()
            )),
        );
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        Ok(Self {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            agent_port,
            api_port,
            observability_port: obs_port,
        })
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("kas.log")
    }

    fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Starts kas and waits until its internal API answers.
    pub async fn start(&self) -> Result<Kas> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("opening {}", self.log_file().display()))?;
        // The parent-death signal makes the kernel kill kas if loadgen dies in any way (even
        // SIGKILL), so an interrupted run leaves no kas behind. The signal fires when the
        // *thread* that forked exits: this runs on the main thread (the one `block_on` drives),
        // which lives as long as the process. setpriv execs kas, so the pid we get is kas's.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.bin)
            .arg("--configuration-file")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Belt and braces for the paths where loadgen unwinds instead of dying.
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} through setpriv", self.bin.display()))?;
        let pid = child.id().context("kas exited at once")?;
        let token_file = self.dir.join("data/admin-token");
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Ok(admin) = AdminClient::from_token_file(&self.api_url(), &token_file)
                && admin.stats().await.is_ok()
            {
                return Ok(Kas {
                    pid,
                    child: Some(child),
                    admin,
                    startup: started.elapsed(),
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "kas exited with {status} before its API answered; last log lines:\n{}",
                    log_tail(&self.log_file(), 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kas's internal API did not answer within 60 s; last log lines:\n{}",
                    log_tail(&self.log_file(), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running kas.
#[derive(Debug)]
pub struct Kas {
    pub pid: u32,
    child: Option<Child>,
    pub admin: AdminClient,
    /// From spawn until the internal API answered.
    pub startup: Duration,
}

impl Kas {
    /// SIGTERM, then wait for the exit (SIGKILL after `grace`). Returns how long kas took.
    pub async fn stop(&mut self, grace: Duration) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let t = Instant::now();
        // No libc in safe Rust: kill(1) sends the signal.
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!("loadgen: kas exited with {status} after SIGTERM");
                }
            }
            Err(_) => {
                eprintln!(
                    "loadgen: kas did not exit within {} s of SIGTERM; killing it",
                    grace.as_secs()
                );
                child.kill().await?;
            }
        }
        Ok(t.elapsed())
    }

    /// kill -9 (a replica that died); returns once the process is gone.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// User plus system CPU time kas has used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid))
    }

    /// Open file descriptors of kas (one per agent connection plus a few dozen of its own).
    pub fn open_fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .ok()
            .map(Iterator::count)
    }
}

/// Ports nobody listens on right now. kas binds them a moment later; a clash with another
/// program in between is possible but rare, and shows up as kas exiting at start.
fn free_ports() -> Result<[u16; 4]> {
    // All four listeners are held at once so the kernel cannot hand out the same port twice.
    let ls = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    let mut ports = [0u16; 4];
    for (p, l) in ports.iter_mut().zip(&ls) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Clock ticks per second for /proc times (`getconf CLK_TCK`; 100 on every Linux we know).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a /proc/<pid>/stat file, in seconds.
pub fn cpu_seconds(stat_file: &str) -> Result<f64> {
    let stat =
        std::fs::read_to_string(stat_file).with_context(|| format!("reading {stat_file}"))?;
    let (utime, stime) = parse_cpu_ticks(&stat).with_context(|| format!("parsing {stat_file}"))?;
    Ok((utime + stime) as f64 / clock_ticks())
}

/// utime and stime (fields 14 and 15) in clock ticks. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted from the last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// Resident set size of a process from /proc/<pid>/status (VmRSS, in kB), in bytes.
pub fn rss_bytes(status_file: &str) -> Option<u64> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The soft limit on open files of this process (kas inherits it), from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat =
            "1234 (my (odd) kas) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some((250, 37)));
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(rss_bytes("/proc/self/status").is_some_and(|b| b > 0));
        assert!(cpu_seconds("/proc/self/stat").is_ok());
        assert!(open_files_limit().is_some());
    }
}
