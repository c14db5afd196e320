//! A real HTTP proxy (tinyproxy, a Debian package installed by scripts/setup) on 127.0.0.1, for
//! tests of agentk's egress through `CONNECT`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{Result, io_err};

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
        let port = crate::pick_local_port("tinyproxy")?;
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
        crate::wait_local_port("tinyproxy", proxy.port, || proxy.log())?;
        Ok(proxy)
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
