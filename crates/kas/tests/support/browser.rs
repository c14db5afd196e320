//! A real headless Chromium driven through the DevTools protocol over its WebSocket: open a
//! page, run JavaScript in it, wait for DOM conditions with a deadline, take screenshots.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The Chromium program (Debian's `chromium`; `CHROMIUM` overrides).
fn program() -> PathBuf {
    let p = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        p.exists(),
        "{} is missing: the web UI test needs a real Chromium (scripts/setup installs Debian's chromium)",
        p.display()
    );
    p
}

/// Chromium, headless, with the flags this machine needs and a DevTools port of its choosing
/// (written to `DevToolsActivePort` in `profile`).
fn spawn(profile: &std::path::Path) -> Child {
    Command::new(program())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=1366,768",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium")
}

pub struct Browser {
    child: Child,
    socket: Socket,
    session: String,
    next_id: u64,
    /// Where screenshots go (printed once).
    pub shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium (fresh profile) with one page at 1366×768, a laptop screen.
    pub async fn launch(shots: PathBuf) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = spawn(profile.path());
        let port_file = profile.path().join("DevToolsActivePort");
        let text = super::wait_for("Chromium's DevTools port", Duration::from_secs(30), || {
            let f = port_file.clone();
            async move {
                std::fs::read_to_string(f)
                    .ok()
                    .filter(|t| t.lines().count() >= 2)
            }
        })
        .await;
        let mut lines = text.lines();
        let (port, path) = (lines.next().unwrap(), lines.next().unwrap());
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .expect("connecting to Chromium's DevTools");
        std::fs::create_dir_all(&shots).unwrap();
        println!("web UI screenshots: {}", shots.display());
        let mut b = Browser {
            child,
            socket,
            session: String::new(),
            next_id: 0,
            shots,
            _profile: profile,
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        let metrics =
            json!({"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": false});
        b.call("Emulation.setDeviceMetricsOverride", metrics).await;
        b.call("Page.enable", json!({})).await;
        b
    }

    /// Sends a command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(msg.to_string()))
            .await
            .expect("sending to Chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("Chromium did not answer {method}"))
                .expect("Chromium closed the DevTools connection")
                .expect("reading from Chromium");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Loads `url` (events of the load are not awaited: callers wait for what they expect).
    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits until `js` evaluates to `true`, failing the test with `what` (and the page's
    /// text) after `timeout`.
    pub async fn wait_until(&mut self, what: &str, js: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let guarded =
            format!("(() => {{ try {{ return !!({js}); }} catch (e) {{ return false; }} }})()");
        loop {
            if self.eval(&guarded).await == json!(true) {
                return;
            }
            if Instant::now() >= deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("timed out waiting for {what}; the page shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the element matching `selector` ("" when there is none).
    pub async fn text(&mut self, selector: &str) -> String {
        let js = format!(
            "(document.querySelector({}) || {{innerText: ''}}).innerText",
            json!(selector)
        );
        self.eval(&js).await.as_str().unwrap_or_default().to_owned()
    }

    /// Clicks the button whose text is `label`.
    pub async fn click_button(&mut self, label: &str) {
        let js = format!(
            "(() => {{ const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === {}); if (!b) return false; b.click(); return true; }})()",
            json!(label)
        );
        assert_eq!(self.eval(&js).await, json!(true), "no button {label:?}");
    }

    /// Presses Tab, as a person moving the keyboard focus does.
    pub async fn press_tab(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            let key =
                json!({"type": kind, "key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9});
            self.call("Input.dispatchKeyEvent", key).await;
        }
    }

    /// Saves a PNG of the page as `name`.png.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
