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
}

impl Redis {
    /// Starts a server with a password and no persistence, returning once it answers `PING`.
    /// Fails, rather than letting a test skip, when `redis-server` is not installed.
    pub fn start() -> Result<Redis> {
        let dir = tempfile::tempdir().map_err(io_err("creating a directory for Redis"))?;
        let mut redis = Redis {
            port: 0,
            password: format!("pw-{}", std::process::id()),
            child: None,
            dir,
        };
        let mut attempt = 1;
        loop {
            redis.port = crate::pick_local_port("Redis")?;
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

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("redis.log"))
            .map_err(io_err("creating the Redis log"))?;
        let child = Command::new("redis-server")
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

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
