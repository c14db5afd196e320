//! A real HTTP proxy (tinyproxy, a Debian package installed by scripts/setup) on 127.0.0.1, for
//! tests of agentk's egress through `CONNECT`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, io_err};

/// A running tinyproxy, killed when dropped.
#[derive(Debug)]
pub struct Tinyproxy {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts one; with `basic_auth`, it requires those credentials.
    pub fn start(basic_auth: Option<(&str, &str)>) -> Result<Tinyproxy> {
        let dir = tempfile::tempdir().map_err(io_err("creating a directory for tinyproxy"))?;
        // tinyproxy cannot report a port it picked itself, so one is chosen here; the short
        // window in which another process could take it makes the start fail loudly, not wrong.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io_err("picking a port for tinyproxy"))?
            .port();
        let log = dir.path().join("tinyproxy.log");
        // No `ConnectPort` line: CONNECT is allowed to any port (test ports are random).
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nLogLevel Info\n\
             LogFile \"{}\"\nAllow 127.0.0.1\n",
            log.display()
        );
        if let Some((user, password)) = basic_auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).map_err(io_err("writing tinyproxy.conf"))?;
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("starting tinyproxy (installed by scripts/setup)"))?;
        let proxy = Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        };
        proxy.wait_listening()?;
        Ok(proxy)
    }

    /// Polls until the proxy accepts connections (it starts in milliseconds).
    fn wait_listening(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(Error::Other(format!(
            "tinyproxy did not listen on {}",
            self.port
        )))
    }

    /// `http://[credentials@]127.0.0.1:PORT`.
    pub fn url(&self, credentials: Option<&str>) -> String {
        let userinfo = credentials.map(|c| format!("{c}@")).unwrap_or_default();
        format!("http://{userinfo}127.0.0.1:{}", self.port)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `CONNECT` requests to `target` (`host:port`) it received.
    pub fn connects_to(&self, target: &str) -> usize {
        self.log().matches(&format!("CONNECT {target} ")).count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
