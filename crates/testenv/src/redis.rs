//! A throwaway Redis server (the Debian `redis-server` package, installed by scripts/setup) on
//! 127.0.0.1, for tests of kas replicas sharing Redis. No system service is involved: each
//! [`Redis`] is its own process with its own directory, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, io_err};

/// Where a start that lost its port to another process is retried with a new one.
const START_ATTEMPTS: u32 = 3;

/// A running Redis server, killed when dropped.
#[derive(Debug)]
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The password clients must give (`requirepass`).
    pub password: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// With [`Redis::start_tls`]: the TLS port and the server's certificate and key (the plain
    /// port stays open for this helper's own checks).
    tls: Option<Tls>,
}

#[derive(Debug)]
struct Tls {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
}

impl Redis {
    /// Starts a server with a password and no persistence, returning once it answers `PING`.
    /// Fails, rather than letting a test skip, when `redis-server` is not installed.
    pub fn start() -> Result<Redis> {
        Self::start_with(None)
    }

    /// As [`Redis::start`], also serving TLS with `cert` and `key` (for `localhost`) on a second
    /// port: [`Redis::tls_url`].
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<Redis> {
        Self::start_with(Some(Tls {
            port: 0,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    fn start_with(tls: Option<Tls>) -> Result<Redis> {
        let dir = tempfile::tempdir().map_err(io_err("creating a directory for Redis"))?;
        let mut redis = Redis {
            port: 0,
            password: format!("pw-{}", std::process::id()),
            child: None,
            dir,
            tls,
        };
        let mut attempt = 1;
        loop {
            redis.port = crate::pick_local_port("Redis")?;
            if let Some(t) = redis.tls.as_mut() {
                t.port = crate::pick_local_port("Redis over TLS")?;
            }
            match redis.spawn() {
                Ok(()) => return Ok(redis),
                Err(e) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `redis://:password@127.0.0.1:port/0` without the password (kas reads it from a file).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `rediss://localhost:port/0`, when started with [`Redis::start_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|t| format!("rediss://localhost:{}/0", t.port))
    }

    /// Writes the password to a file (for kas's `redis.password_file`) and returns its path.
    pub fn password_file(&self) -> Result<PathBuf> {
        let path = self.dir.path().join("password");
        std::fs::write(&path, format!("{}\n", self.password))
            .map_err(io_err("writing the Redis password file"))?;
        Ok(path)
    }

    /// Kills the server (as when it crashes); [`Redis::restart`] starts it again on its port.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server after it saved its data (`SHUTDOWN SAVE`): [`Redis::restart`] then
    /// brings every key back with its expiry, as after a network partition or a restart with
    /// persistence (rather than a crash without it, as [`Redis::stop`]).
    pub fn stop_keeping_data(&mut self) -> Result<()> {
        let mut s = self.send("*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n", "SHUTDOWN SAVE")?;
        // AUTH's `+OK`, then the connection closes as the server exits.
        let _ = s.read_to_end(&mut Vec::new());
        if let Some(mut c) = self.child.take() {
            c.wait()
                .map_err(io_err("waiting for redis-server to exit"))?;
        }
        if !self.dir.path().join("dump.rdb").exists() {
            return Err(Error::Other("Redis exited without saving its data".into()));
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("redis.log"))
            .map_err(io_err("creating the Redis log"))?;
        let mut command = Command::new("redis-server");
        if let Some(t) = &self.tls {
            command
                .arg("--tls-port")
                .arg(t.port.to_string())
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .args(["--tls-auth-clients", "no"]);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--requirepass"])
            .arg(&self.password)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(
                "starting redis-server (is the redis-server package installed?)",
            ))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(Error::Other(format!(
                    "redis-server exited with {status} (port {} taken?)",
                    self.port
                )));
            }
            if self.answers() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(Error::Other(
            "redis-server did not answer PING within 10 s".into(),
        ))
    }

    /// Whether the server answers an authenticated `PING` with `PONG`.
    pub fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let auth = format!(
            "*2\r\n$4\r\nAUTH\r\n${}\r\n{}\r\n*1\r\n$4\r\nPING\r\n",
            self.password.len(),
            self.password
        );
        if s.write_all(auth.as_bytes()).is_err() {
            return false;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"+PONG\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    }
}

impl Redis {
    /// A new connection that has sent `AUTH` and then `command` (RESP, `what` for errors);
    /// the caller reads both answers.
    fn send(&self, command: &str, what: &str) -> Result<TcpStream> {
        let mut s =
            TcpStream::connect(("127.0.0.1", self.port)).map_err(io_err("connecting to Redis"))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "*2\r\n$4\r\nAUTH\r\n${}\r\n{}\r\n{command}",
            self.password.len(),
            self.password,
        );
        s.write_all(request.as_bytes())
            .map_err(io_err(format!("sending {what} to Redis")))?;
        Ok(s)
    }

    /// `INFO <section>`'s text, e.g. `stats` for `total_commands_processed`.
    pub fn info(&self, section: &str) -> Result<String> {
        let command = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
        let mut s = self.send(&command, "INFO")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(text) = bulk_after_ok(&got) {
                return Ok(text);
            }
            match s.read(&mut buf) {
                Ok(0) => return Err(Error::Other("Redis closed before answering INFO".into())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(io_err("reading Redis's INFO")(e)),
            }
        }
    }

    /// `FLUSHALL`: Redis loses every key, as after a restart without persistence or a
    /// failover to a replica that had not caught up.
    pub fn flush_all(&self) -> Result<()> {
        let mut s = self.send("*1\r\n$8\r\nFLUSHALL\r\n", "FLUSHALL")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < b"+OK\r\n+OK\r\n".len() {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(io_err("reading Redis's answer to FLUSHALL")(e)),
            }
        }
        if got != b"+OK\r\n+OK\r\n" {
            let got = String::from_utf8_lossy(&got).into_owned();
            return Err(Error::Other(format!("FLUSHALL answered {got:?}")));
        }
        Ok(())
    }

    /// `total_commands_processed` of `INFO stats`.
    pub fn commands_processed(&self) -> Result<u64> {
        let info = self.info("stats")?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| Error::Other("no total_commands_processed in INFO stats".into()))
    }
}

/// The bulk string that follows `+OK\r\n` (AUTH's answer), once all of it arrived (pure).
fn bulk_after_ok(got: &[u8]) -> Option<String> {
    let rest = got.strip_prefix(b"+OK\r\n$")?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    let body = rest.get(end + 2..end + 2 + len)?;
    Some(String::from_utf8_lossy(body).into_owned())
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_reply_is_read_once_complete() {
        assert_eq!(bulk_after_ok(b"+OK\r\n$5\r\nab"), None);
        assert_eq!(
            bulk_after_ok(b"+OK\r\n$5\r\nabcde\r\n").as_deref(),
            Some("abcde")
        );
        assert_eq!(bulk_after_ok(b"-ERR wrong\r\n"), None);
    }
}
