//! Stopping, starting and restarting one component of a running control plane from a test, and
//! waiting until it is healthy again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::cluster::tail;
use crate::control::{self, Request, parse_status};
use crate::supervisor::StopSignal;
use crate::{Error, Result, TestEnv};

/// How long a restarted component may take to be healthy (2 shared cores, a cold apiserver).
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);

impl TestEnv {
    /// Stops one component (`etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`, `kwok`). It stays stopped, and the supervisor keeps the rest running,
    /// until [`TestEnv::start_component`].
    ///
    /// Do this only on a control plane of your own (`testenv up --state-dir …`), not on the one
    /// `testenv run` shares with every test.
    pub fn stop_component(&self, name: &str, signal: StopSignal) -> Result<()> {
        control::request(&self.dir, &Request::Stop(name.into(), signal)).map(drop)
    }

    /// Starts a stopped component again with the same flags, data and ports, and returns once
    /// it is healthy (see [`TestEnv::wait_healthy`]).
    pub fn start_component(&self, name: &str) -> Result<()> {
        control::request(&self.dir, &Request::Start(name.into()))?;
        self.wait_healthy(name, HEALTHY_TIMEOUT)
    }

    /// Stops a component with `signal` and starts it again with the same flags, data and ports;
    /// returns once it is healthy (see [`TestEnv::wait_healthy`]).
    pub fn restart_component(&self, name: &str, signal: StopSignal) -> Result<()> {
        control::request(&self.dir, &Request::Restart(name.into(), signal))?;
        self.wait_healthy(name, HEALTHY_TIMEOUT)
    }

    /// Pid of every component (`None` when stopped), in start order.
    pub fn components(&self) -> Result<Vec<(String, Option<u32>)>> {
        Ok(parse_status(&control::request(
            &self.dir,
            &Request::Status,
        )?))
    }

    /// Polls until `name` is healthy: for kube-apiserver `/readyz` through the admin kubeconfig,
    /// for etcd its `/health` endpoint; any other component counts as healthy while it runs
    /// (they have no probe reachable without their own credentials, and the supervisor tears
    /// the cluster down if one exits). Fails early when the component is not running.
    pub fn wait_healthy(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self
                .components()?
                .into_iter()
                .any(|(n, pid)| n == name && pid.is_some());
            if !running {
                return Err(self.unhealthy(name, "it is not running"));
            }
            if self.probe(name)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.unhealthy(name, &format!("not healthy after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn probe(&self, name: &str) -> Result<bool> {
        Ok(match name {
            "kube-apiserver" => self
                .kubectl()
                .args(["get", "--raw=/readyz", "--request-timeout=5s"])
                .output()
                .is_ok_and(|o| o.status.success()),
            "etcd" => {
                let url = self.etcd_url.as_deref().ok_or_else(|| Error::BadState {
                    dir: self.dir.clone(),
                    what: "cluster.json has no etcd URL".into(),
                })?;
                etcd_healthy(url)
            }
            _ => true,
        })
    }

    fn unhealthy(&self, name: &str, why: &str) -> Error {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        Error::Other(format!(
            "{name}: {why}; see {}:\n{}",
            log.display(),
            tail(&log, 20)
        ))
    }
}

/// Whether etcd at `url` (`http://127.0.0.1:PORT`) answers `/health` with `"health":"true"`,
/// which it does only once it has a leader and no alarm.
fn etcd_healthy(url: &str) -> bool {
    let Some(addr) = url.strip_prefix("http://") else {
        return false;
    };
    let get = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        // HTTP/1.0: the server closes the connection after the reply, so read to the end.
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    };
    let Ok(reply) = get() else {
        return false;
    };
    let Some((head, body)) = reply.split_once("\r\n\r\n") else {
        return false;
    };
    head.starts_with("HTTP/1.") && head.contains(" 200 ") && {
        serde_json::from_str::<serde_json::Value>(body)
            .is_ok_and(|v| v["health"] == serde_json::json!("true"))
    }
}
