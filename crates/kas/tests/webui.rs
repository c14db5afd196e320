//! The web UI in a real headless Chromium against real kas, agentk, control plane and Git,
//! with people logging in through a real (minimal) OpenID Connect provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::browser::Browser;
use support::gitops::{Rig, deployment, rig_with};
use support::oidc::Issuer;
use support::{Kas, KasOptions, WEB_PORT};
use tether_testenv::{TestEnv, seed_agent_rbac};

/// The person whose RBAC allows only `dude` (a name no other test binds).
const PERSON: &str = "webui-alice";
const WAIT: Duration = Duration::from_secs(60);

/// The seed's RBAC, plus impersonation for the agent and `view` in dude for the person.
fn rbac(agent_ns: &str, dude: &str) -> String {
    let mut y = seed_agent_rbac(agent_ns, "gitlab-agent", dude);
    y.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {agent_ns}-impersonate\n\
rules:\n- apiGroups: [\"\", \"authentication.k8s.io\"]\n  resources: [\"*\"]\n  verbs: [\"impersonate\"]\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {agent_ns}-impersonate\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {agent_ns}-impersonate\n\
subjects:\n- kind: ServiceAccount\n  name: gitlab-agent\n  namespace: {agent_ns}\n\
---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: person-view\n  namespace: {dude}\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: view\n\
subjects:\n- kind: User\n  name: gitlab:user:{PERSON}\n  apiGroup: rbac.authorization.k8s.io\n"
    ));
    y
}

fn screenshots_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
            std::path::PathBuf::from,
        )
        .join("webui-screenshots")
}

/// Every field is labelled and the page fits a 1366-pixel-wide laptop screen.
async fn check_accessible(b: &mut Browser, page: &str) {
    let unlabelled = b
        .eval("[...document.querySelectorAll('input:not([type=hidden]), select')].filter(i => !i.labels || i.labels.length === 0).map(i => i.name)")
        .await;
    assert_eq!(unlabelled, json!([]), "{page}: fields without a label");
    let width = b.eval("document.documentElement.scrollWidth").await;
    assert!(width.as_i64().unwrap() <= 1366, "{page} is {width} px wide");
    // The keyboard reaches the page: the first Tab focuses "Skip to content".
    b.eval("document.activeElement && document.activeElement.blur()")
        .await;
    b.press_tab().await;
    let focused = b.eval("document.activeElement.innerText").await;
    assert_eq!(focused, json!("Skip to content"), "{page}");
}

/// `selector`'s text contains `text` (a JavaScript condition).
fn has_text(selector: &str, text: &str) -> String {
    format!(
        "!!document.querySelector({0}) && document.querySelector({0}).innerText.includes({1})",
        json!(selector),
        json!(text)
    )
}

/// A row of the syncs section names `ns` with `status`.
fn object_row(ns: &str, status: &str) -> String {
    format!(
        "[...document.querySelectorAll('#syncs tr')].some(r => r.innerText.includes({}) && r.innerText.includes({}))",
        json!(ns),
        json!(status)
    )
}

/// The seed's agent, the identity provider, a browser on the web UI.
struct Walk {
    rig: Rig,
    issuer: Issuer,
    b: Browser,
    web: String,
    id: i64,
    dude: String,
    naww: String,
}

impl Walk {
    async fn start() -> Walk {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let env = TestEnv::from_env().expect("a running control plane");
        let agent_ns = env.create_namespace("gitlab-k8s-agent").unwrap();
        let dude = env.create_namespace("dude").unwrap();
        let naww = env.create_namespace("naww").unwrap();
        let issuer = Issuer::start("tether-web").await;
        // kas picks the port at each start attempt (see `WEB_PORT`).
        let kas_yaml = format!(
            "web:\n  listen:\n    address: 127.0.0.1:{WEB_PORT}\n  oidc:\n    issuer: {}\n    client_id: tether-web\n    \
             redirect_url: http://127.0.0.1:{WEB_PORT}/login/oidc/callback\n    admin_subjects: [admin-sub]\n    viewer_groups: [people]\n",
            issuer.url
        );
        let users = "user_access:\n  access_as:\n    user: {}\n  groups:\n  - id: people\n";
        let manifests = [
            ("manifests/dude.yaml", Some(deployment("nginx", &dude, 1))),
            ("manifests/naww.yaml", Some(deployment("nginx", &naww, 1))),
        ];
        let initial: Vec<(&str, Option<&[u8]>)> =
            manifests.iter().map(|(f, d)| (*f, d.as_deref())).collect();
        let rbac = rbac(&agent_ns, &dude);
        let (rig, c1) = rig_with(env, agent_ns, &rbac, users, &initial, &[], kas_yaml).await;
        rig.synced(&c1).await;
        let web = format!("http://127.0.0.1:{}", rig.kas.web_port);
        let b = Browser::launch(screenshots_dir()).await;
        let id = rig.agent_id;
        Walk {
            rig,
            issuer,
            b,
            web,
            id,
            dude,
            naww,
        }
    }

    async fn goto(&mut self, path: &str) {
        let url = format!("{}{path}", self.web);
        self.b.goto(&url).await;
    }

    async fn wait(&mut self, what: &str, js: &str) {
        self.b.wait_until(what, js, WAIT).await;
    }

    /// Logs in through the identity provider as whoever it approves next.
    async fn oidc_login(&mut self) {
        self.goto("/login").await;
        self.wait("the login page", "document.getElementById('oidc-login')")
            .await;
        self.b
            .eval("document.getElementById('oidc-login').click()")
            .await;
        self.wait("the agents page", "document.getElementById('agents')")
            .await;
    }

    async fn log_out(&mut self) {
        self.b.click_button("Log out").await;
        self.wait("the login page", "document.getElementById('token')")
            .await;
    }

    /// An admin logs in with OpenID Connect and sees the agent, dude Current, naww Failed.
    async fn an_admin_sees_the_seed(&mut self) {
        self.issuer.log_in_as("admin-sub", "ada", &["ops"]);
        self.oidc_login().await;
        assert!(self.b.text("#agents").await.contains("seed"));
        assert!(self.b.text("header").await.contains("ada (admin)"));
        check_accessible(&mut self.b, "agents").await;
        self.b.screenshot("agents").await;
        self.goto(&format!("/agents/{}", self.id)).await;
        let (dude, naww) = (self.dude.clone(), self.naww.clone());
        self.wait("dude Current", &object_row(&dude, "Current"))
            .await;
        let failed = format!(
            "{} && {}",
            object_row(&naww, "Failed"),
            has_text("#syncs", "forbidden")
        );
        self.wait("naww Failed, forbidden", &failed).await;
        check_accessible(&mut self.b, "agent").await;
        self.b.screenshot("agent").await;
    }

    /// A commit shows up without a reload, within 2 s of kas having agentk's report.
    async fn a_commit_shows_up_live(&mut self) {
        self.b.eval("window.__sameDocument = true").await;
        let two = deployment("nginx", &self.dude, 2);
        let c2 = self
            .rig
            .manifests
            .commit(&[("manifests/dude.yaml", Some(&two))], "two replicas");
        self.rig.synced(&c2).await;
        let reported = Instant::now();
        let shown = format!("!!document.querySelector('#syncs [data-commit=\"{c2}\"]')");
        self.b
            .wait_until("the new commit, live", &shown, Duration::from_secs(10))
            .await;
        let delay = reported.elapsed();
        let same = self.b.eval("window.__sameDocument === true").await;
        assert_eq!(same, json!(true), "the page reloaded");
        println!("live update shown {delay:?} after kas had the report");
        assert!(delay < Duration::from_secs(2), "{delay:?}");
        self.b.screenshot("agent-live").await;
    }

    /// Reconcile now, then suspend the manifest project, resume it and suspend it again.
    async fn reconcile_suspend_and_resume(&mut self) {
        let kas = &self.rig.kas;
        self.b
            .eval("window.__sameDocument = 'before reconcile'")
            .await;
        self.b.click_button("Reconcile now").await;
        let back = "window.__sameDocument === undefined && document.querySelector('#syncs h3')";
        self.b.wait_until("the agent page again", back, WAIT).await;
        assert!(kas.log().contains("Reconcile requested"));
        let suspended = has_text("#events", "suspended by admin (web: ada)");
        self.b.click_button("Suspend group/manifests").await;
        self.b
            .wait_until("the suspension in the events", &suspended, WAIT)
            .await;
        let suspensions = kas.agent(self.id).await.suspensions;
        assert_eq!(suspensions.len(), 1, "{suspensions:?}");
        self.b.screenshot("agent-suspended").await;
        self.b.click_button("Resume group/manifests").await;
        let resumed = format!("document.querySelector('#events') && !({suspended})");
        self.b
            .wait_until("the suspension gone", &resumed, WAIT)
            .await;
        assert!(kas.agent(self.id).await.suspensions.is_empty());
        self.b.click_button("Suspend group/manifests").await;
        self.b.wait_until("suspended again", &suspended, WAIT).await;
    }

    /// "Reconcile now" for an agent that is offline says nothing will happen, naming the
    /// project, instead of returning to the page as if it worked.
    async fn a_reconcile_nobody_hears_says_so(&mut self) {
        self.goto(&format!("/agents/{}", self.id)).await;
        self.wait("the agent page", "document.querySelector('#syncs h3')")
            .await;
        // Suspended projects refuse a reconcile outright (409); this is about an offline agent.
        self.b.click_button("Resume group/manifests").await;
        let suspended = has_text("#events", "suspended by admin (web: ada)");
        let resumed = format!("document.querySelector('#events') && !({suspended})");
        self.wait("the project resumed", &resumed).await;
        self.rig.agent.stop();
        self.rig.kas.wait_disconnected(self.id).await;
        self.goto(&format!("/agents/{}", self.id)).await;
        self.wait("the agent page", "document.querySelector('#syncs h3')")
            .await;
        self.b.click_button("Reconcile now").await;
        let named = has_text(
            "#reconcile-problems",
            "group/manifests: no GitOps stream heard the request",
        );
        self.wait("the problem named", &named).await;
        check_accessible(&mut self.b, "reconcile-problems").await;
        self.rig.agent = self.rig.start_agent("agentk-2");
        self.rig.kas.wait_connected(self.id).await;
    }

    /// Register an agent: its token once, with the install command; a reload shows it no more.
    async fn register_an_agent_and_revoke_its_token(&mut self) {
        self.goto("/").await;
        self.wait("the register form", "document.getElementById('f-name')")
            .await;
        self.b.eval("document.getElementById('f-project').value = 'group/config'; document.getElementById('f-name').value = 'second'").await;
        self.b.click_button("Register").await;
        self.wait("the token", "document.getElementById('token')")
            .await;
        let token = self.b.eval("document.getElementById('token').value").await;
        let token = token.as_str().unwrap().to_owned();
        assert!(token.len() >= 32, "{token}");
        let install = self.b.text("#install").await;
        assert!(
            install.contains("--set config.secretName=agentk-agent-token")
                && !install.contains(&token),
            "{install}"
        );
        self.b.screenshot("registered").await;
        self.b.call("Page.reload", json!({})).await;
        self.wait(
            "the token gone",
            "document.body.innerText.includes('shown once and is gone')",
        )
        .await;
        assert_eq!(
            self.b.eval("!!document.getElementById('token')").await,
            json!(false)
        );

        let agents = self.rig.kas.admin.list_agents().await.unwrap();
        let second = agents.into_iter().find(|a| a.name == "second").unwrap();
        self.goto(&format!("/agents/{}", second.id)).await;
        self.wait("the tokens", "document.querySelector('#tokens button')")
            .await;
        let revoke = self
            .b
            .eval("document.querySelector('#tokens button').innerText")
            .await;
        self.b.click_button(revoke.as_str().unwrap()).await;
        self.wait("the token revoked", &has_text("#tokens", "revoked"))
            .await;
        let tokens = self.rig.kas.admin.list_tokens(second.id).await.unwrap();
        assert!(tokens.iter().all(|t| t.revoked_at.is_some()), "{tokens:?}");
    }

    /// Projects: mirror state and last fetch.
    async fn the_projects(&mut self) {
        self.goto("/projects").await;
        self.wait("the projects", &has_text("#projects", "group/manifests"))
            .await;
        check_accessible(&mut self.b, "projects").await;
        self.b.screenshot("projects").await;
    }

    /// A viewer: no buttons; a forged POST without the CSRF token, or with it, is refused; so
    /// is a login callback this browser did not start.
    async fn a_viewer_may_not_act(&mut self) {
        self.log_out().await;
        self.issuer.log_in_as("alice-sub", PERSON, &["people"]);
        self.oidc_login().await;
        assert!(
            self.b
                .text("header")
                .await
                .contains(&format!("{PERSON} (viewer)"))
        );
        let forms = self
            .b
            .eval("document.querySelectorAll('main form').length")
            .await;
        assert_eq!(forms, json!(0), "a viewer gets no registration form");
        self.goto(&format!("/agents/{}", self.id)).await;
        self.wait("the agent page", "document.querySelector('#syncs h3')")
            .await;
        let buttons = self.b.eval("[...document.querySelectorAll('main button')].map(b => b.innerText).filter(t => t !== 'Filter')").await;
        assert_eq!(buttons, json!([]), "a viewer sees no action buttons");
        let id = self.id;
        let post = |csrf: &str| {
            format!(
                "fetch('/agents/{id}/reconcile', {{method: 'POST', body: new URLSearchParams({{csrf: {}}})}}).then(r => r.status)",
                json!(csrf)
            )
        };
        assert_eq!(self.b.eval(&post("")).await, json!(403), "no CSRF token");
        let csrf = self
            .b
            .eval("document.querySelector('header input[name=csrf]').value")
            .await;
        let with_token = self.b.eval(&post(csrf.as_str().unwrap())).await;
        assert_eq!(with_token, json!(403), "a viewer's role");
        self.goto("/login/oidc/callback?state=forged&code=stolen")
            .await;
        let refused =
            "document.body.innerText.includes('this login was not started in this browser')";
        self.wait("the forged callback refused", refused).await;
    }

    /// The cluster as the viewer, whose RBAC allows only dude: dude, not naww.
    async fn the_cluster_as_the_viewer(&mut self) {
        let (id, dude, naww) = (self.id, self.dude.clone(), self.naww.clone());
        self.goto(&format!("/browse?agent={id}")).await;
        self.wait("the namespaces", "document.querySelector('#namespaces')")
            .await;
        let namespaces = self.b.text("#namespaces").await;
        assert!(namespaces.contains(&dude), "{}", self.b.text("main").await);
        assert!(!namespaces.contains(&naww), "{namespaces}");
        self.b.screenshot("cluster").await;
        self.goto(&format!("/browse?agent={id}&ns={dude}")).await;
        self.wait("dude's deployments", &has_text("#deployments", "nginx"))
            .await;
        assert!(self.b.text("#pods").await.contains("nginx"));
        check_accessible(&mut self.b, "cluster").await;
        self.b.screenshot("cluster-dude").await;
        self.goto(&format!("/browse?agent={id}&ns={naww}")).await;
        self.wait(
            "naww refused",
            "document.body.innerText.includes('Deployments: 403')",
        )
        .await;
        assert_eq!(
            self.b
                .eval("!!document.querySelector('#deployments')")
                .await,
            json!(false)
        );
    }

    /// The admin token's login works and says it has no identity in the cluster.
    async fn the_admin_token_has_no_cluster_identity(&mut self) {
        self.log_out().await;
        let admin = std::fs::read_to_string(self.rig.kas.dir.join("data/admin-token")).unwrap();
        let fill = format!(
            "document.getElementById('token').value = {}",
            json!(admin.trim())
        );
        self.b.eval(&fill).await;
        self.b.click_button("Log in").await;
        self.wait("the agents page", "document.getElementById('agents')")
            .await;
        self.goto(&format!("/browse?agent={}", self.id)).await;
        self.wait(
            "no identity",
            "document.body.innerText.includes('no identity in the cluster')",
        )
        .await;
    }
}

/// What a plain-HTTP exchange returned: the status, the headers (names lower-case), the body.
type Answer = (u16, Vec<(String, String)>, String);

/// Sends `head` (the request line and headers after `Host`) and `body` to `url`'s host
/// (`http://host:port/path`) and reads the whole answer; redirects are not followed.
async fn http_exchange(method: &str, url: &str, head: &str, body: &str) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = tokio::net::TcpStream::connect(authority).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{head}Connection: close\r\n\r\n{body}"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1)?.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

async fn http_get(url: &str, cookie: Option<&str>) -> Answer {
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    http_exchange("GET", url, &cookie, "").await
}

async fn http_post_form(url: &str, form: &str) -> Answer {
    let head = format!(
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
        form.len()
    );
    http_exchange("POST", url, &head, form).await
}

/// The first value of header `name`.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// The `name=value` part of the `Set-Cookie` header setting cookie `name`.
fn set_cookie(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .filter_map(|(_, v)| v.split(';').next())
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {headers:?}"))
        .to_owned()
}

/// How soon an open live view must end once its session is over: the stream checks the
/// session at least every second.
const LIVE_ENDS_WITHIN: Duration = Duration::from_secs(5);

/// An agent page's live view (`/agents/<id>/live`), open as a browser keeps it, read raw.
struct LiveView {
    stream: tokio::net::TcpStream,
    read: String,
}

impl LiveView {
    /// Opens the live view of agent `id` with the session `cookie` and reads its first section.
    async fn open(web: &str, id: i64, cookie: &str) -> LiveView {
        use tokio::io::AsyncWriteExt;
        let authority = web.strip_prefix("http://").expect("an http:// URL");
        let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        let request = format!(
            "GET /agents/{id}/live HTTP/1.1\r\nHost: {authority}\r\nCookie: {cookie}\r\n\
             Accept: text/event-stream\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut live = LiveView {
            stream,
            read: String::new(),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !live.read.contains("event: syncs") {
            let more = live.read_some(deadline).await;
            assert_eq!(more, Some(true), "the first section: {}", live.read);
        }
        assert!(live.read.starts_with("HTTP/1.1 200"), "{}", live.read);
        live
    }

    /// Reads what comes before `deadline`: `Some(false)` once kas ended the stream, `None`
    /// when nothing came in time.
    async fn read_some(&mut self, deadline: tokio::time::Instant) -> Option<bool> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => Some(false),
            Ok(Ok(n)) => {
                self.read.push_str(&String::from_utf8_lossy(&buf[..n]));
                Some(true)
            }
            Err(_) => None,
        }
    }

    /// Waits for kas to end the stream, at most [`LIVE_ENDS_WITHIN`].
    async fn ends(mut self, why: &str) {
        let deadline = tokio::time::Instant::now() + LIVE_ENDS_WITHIN;
        loop {
            match self.read_some(deadline).await {
                Some(true) => {}
                Some(false) => break,
                None => panic!(
                    "the live view still streams {LIVE_ENDS_WITHIN:?} after its session ended \
                     {why}; it sent:\n{}",
                    self.read
                ),
            }
        }
        println!("the live view ended {why}");
    }
}

/// Logs in with the admin token through the form; the session's cookie (`name=value`).
async fn admin_token_login(web: &str, token: &str) -> String {
    let (status, headers, _) =
        http_post_form(&format!("{web}/login"), &format!("token={token}")).await;
    assert_eq!(status, 303, "{headers:?}");
    set_cookie(&headers, "tether_session")
}

impl Walk {
    /// A login outlives kas: the browser logged in with the admin token is still logged in
    /// after a kill -9 and restart (sessions used to live in kas's memory only), and logging
    /// out there still works.
    async fn a_login_survives_a_kas_restart(&mut self) {
        self.rig.kas.kill9_restart().await;
        self.goto("/").await;
        self.wait("the agents page", "document.getElementById('agents')")
            .await;
        assert!(self.b.text("header").await.contains("admin token"));
        self.log_out().await;
        self.goto("/").await;
        self.wait("the login page", "document.getElementById('token')")
            .await;
    }

    /// An OpenID Connect login under way when kas restarts finishes on the new kas: the login's
    /// state travels in the browser's cookie, not in kas's memory, as it must for a callback
    /// that reaches another replica.
    async fn an_oidc_login_finishes_across_a_kas_restart(&mut self) {
        self.issuer.log_in_as("alice-sub", PERSON, &["people"]);
        let (status, headers, _) = http_get(&format!("{}/login/oidc", self.web), None).await;
        assert_eq!(status, 303, "{headers:?}");
        let (authorize, state) = (
            header(&headers, "location").to_owned(),
            set_cookie(&headers, "tether_oidc_state"),
        );
        self.rig.kas.kill9_restart().await;
        let (status, headers, _) = http_get(&authorize, None).await;
        assert_eq!(status, 303, "the provider approves: {headers:?}");
        let callback = header(&headers, "location").to_owned();
        let (status, headers, body) = http_get(&callback, Some(&state)).await;
        assert_eq!((status, header(&headers, "location")), (303, "/"), "{body}");
        let session = set_cookie(&headers, "tether_session");
        let (status, _, page) = http_get(&format!("{}/", self.web), Some(&session)).await;
        assert_eq!(status, 200);
        assert!(page.contains(&format!("{PERSON} (viewer)")), "{page}");
    }

    /// A person the identity provider knows, but who is neither an admin nor in
    /// `viewer_groups`/`viewer_subjects`, gets no session and is told why (anyone at the
    /// provider used to become a viewer of every agent).
    async fn a_person_not_listed_may_not_log_in(&mut self) {
        self.issuer.log_in_as("eve-sub", "eve", &["elsewhere"]);
        let (status, headers, _) = http_get(&format!("{}/login/oidc", self.web), None).await;
        assert_eq!(status, 303, "{headers:?}");
        let (authorize, state) = (
            header(&headers, "location").to_owned(),
            set_cookie(&headers, "tether_oidc_state"),
        );
        let (status, headers, _) = http_get(&authorize, None).await;
        assert_eq!(status, 303, "the provider approves: {headers:?}");
        let callback = header(&headers, "location").to_owned();
        let (status, headers, body) = http_get(&callback, Some(&state)).await;
        assert_eq!(status, 401, "{body}");
        assert!(
            body.contains("eve (subject eve-sub) may not use this web UI"),
            "{body}"
        );
        assert!(
            !headers
                .iter()
                .any(|(k, v)| k == "set-cookie" && v.starts_with("tether_session=")),
            "{headers:?}"
        );
    }

    /// An agent page left open gets nothing more once its person logs out (elsewhere, say): its
    /// live view ends within seconds. It used to stream on for as long as the page was open,
    /// the session being checked only when the stream was opened.
    async fn logging_out_ends_an_open_live_view(&mut self) {
        let token = std::fs::read_to_string(self.rig.kas.dir.join("data/admin-token")).unwrap();
        let session = admin_token_login(&self.web, token.trim()).await;
        let live = LiveView::open(&self.web, self.id, &session).await;
        let (_, _, page) = http_get(&format!("{}/", self.web), Some(&session)).await;
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the page's CSRF token");
        let form = format!("csrf={csrf}");
        let head = format!(
            "Cookie: {session}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n",
            form.len()
        );
        let url = format!("{}/logout", self.web);
        let (status, headers, _) = http_exchange("POST", &url, &head, &form).await;
        assert_eq!((status, header(&headers, "location")), (303, "/login"));
        live.ends("at logout").await;
    }

    /// Rotating the admin token (a new one in its file, as a rotated Secret does) takes
    /// effect without a restart: the new token works, the old one no longer does, and the web
    /// UI logins opened with the old one end, their open live views too.
    async fn rotating_the_admin_token_ends_its_logins(&mut self) {
        let file = self.rig.kas.dir.join("data/admin-token");
        let old = std::fs::read_to_string(&file).unwrap().trim().to_owned();
        let session = admin_token_login(&self.web, &old).await;
        let (status, _, _) = http_get(&format!("{}/", self.web), Some(&session)).await;
        assert_eq!(status, 200);
        let live = LiveView::open(&self.web, self.id, &session).await;

        std::fs::write(&file, "a-rotated-admin-token-0123456789\n").unwrap();
        support::wait_for("the old admin token refused", WAIT, || async {
            self.rig
                .kas
                .admin
                .list_agents()
                .await
                .is_err()
                .then_some(())
        })
        .await;
        let (status, headers, _) = http_get(&format!("{}/", self.web), Some(&session)).await;
        assert_eq!((status, header(&headers, "location")), (303, "/login"));
        live.ends("at the admin token's rotation").await;
        // The admin commands read the file: they work with the new token.
        let out = self.rig.kas.cli().args(["agent", "list"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_walkthrough() {
    let mut w = Walk::start().await;
    w.an_admin_sees_the_seed().await;
    w.a_commit_shows_up_live().await;
    w.reconcile_suspend_and_resume().await;
    w.register_an_agent_and_revoke_its_token().await;
    w.the_projects().await;
    w.a_reconcile_nobody_hears_says_so().await;
    w.a_viewer_may_not_act().await;
    w.the_cluster_as_the_viewer().await;
    w.the_admin_token_has_no_cluster_identity().await;
    w.a_login_survives_a_kas_restart().await;
    w.an_oidc_login_finishes_across_a_kas_restart().await;
    w.a_person_not_listed_may_not_log_in().await;
    w.logging_out_ends_an_open_live_view().await;
    w.rotating_the_admin_token_ends_its_logins().await;
}

/// Failed logins one address may make before every login route answers it 429.
const LOGIN_BURST: usize = 5;

/// Every login route is behind the failed-login limit: forged OpenID Connect callbacks from one
/// address are refused (401) up to the burst, then answered 429 with `Retry-After`, and so is
/// starting a login from there. The OpenID Connect routes used to be added after the limit's
/// layer, which axum puts only around the routes added before it: callbacks were never limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_oidc_callbacks_are_rate_limited_after_the_burst() {
    let issuer = Issuer::start("tether-web").await;
    let dir = tempfile::tempdir().unwrap();
    let extra_yaml = format!(
        "web:\n  listen:\n    address: 127.0.0.1:{WEB_PORT}\n  oidc:\n    issuer: {}\n    \
         client_id: tether-web\n    redirect_url: http://127.0.0.1:{WEB_PORT}/login/oidc/callback\n\
         rate_limits:\n  limited_response_delay: 0s\n  \
         failed_auth_per_address: {{per_minute: 1, burst: {LOGIN_BURST}}}\n",
        issuer.url
    );
    let opts = KasOptions {
        extra_yaml,
        ..KasOptions::default()
    };
    let kas = Kas::start(dir.path(), opts).await;
    let web = format!("http://127.0.0.1:{}", kas.web_port);
    let forged = format!("{web}/login/oidc/callback?state=forged&code=stolen");

    let mut codes = Vec::new();
    for _ in 0..LOGIN_BURST + 3 {
        codes.push(http_get(&forged, None).await.0);
    }
    let mut want = vec![401; LOGIN_BURST];
    want.extend([429; 3]);
    assert_eq!(codes, want);
    let (status, headers, _) = http_get(&format!("{web}/login/oidc"), None).await;
    assert_eq!(status, 429, "starting a login from the same address");
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!(retry > 0, "{headers:?}");
}

/// A database outage must not look like being logged out: a logged-in page answers 503
/// saying kas cannot read its database (it redirected to the login page, whose form then
/// failed too), keeps the session cookie, and works again once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_and_keeps_the_login() {
    let dir = tempfile::tempdir().unwrap();
    let pg = tether_testenv::postgres::Postgres::start().unwrap();
    let url = pg.create_database("kas").unwrap();
    let opts = KasOptions {
        extra_yaml: format!(
            "database:\n  url: {url}\nweb:\n  listen:\n    address: 127.0.0.1:{WEB_PORT}\n"
        ),
        ..KasOptions::default()
    };
    let kas = Kas::start(&dir.path().join("kas"), opts).await;
    let web = format!("http://127.0.0.1:{}", kas.web_port);
    let token = std::fs::read_to_string(kas.dir.join("data/admin-token")).unwrap();
    let session = admin_token_login(&web, token.trim()).await;
    let root = format!("{web}/");
    let page = || http_get(&root, Some(&session));
    assert_eq!(page().await.0, 200);

    pg.stop().unwrap();
    let (status, headers, body) = page().await;
    assert_eq!(status, 503, "{headers:?}\n{body}");
    assert!(
        body.contains("kas cannot read its database right now")
            && body.contains("you are still logged in"),
        "{body}"
    );
    assert!(
        !headers
            .iter()
            .any(|(k, _)| k == "set-cookie" || k == "location"),
        "{headers:?}"
    );

    pg.restart().unwrap();
    support::wait_for("the page again", Duration::from_secs(30), || async {
        (page().await.0 == 200).then_some(())
    })
    .await;
}
