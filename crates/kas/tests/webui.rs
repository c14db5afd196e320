//! The web UI in a real headless Chromium against real kas, agentk, control plane and Git,
//! with people logging in through a real (minimal) OpenID Connect provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::WEB_PORT;
use support::browser::Browser;
use support::gitops::{Rig, deployment, rig_with};
use support::oidc::Issuer;
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

/// Logs in through the identity provider as whoever it approves next.
async fn oidc_login(b: &mut Browser, web: &str) {
    b.goto(&format!("{web}/login")).await;
    b.wait_until(
        "the login page",
        "document.getElementById('oidc-login')",
        WAIT,
    )
    .await;
    b.eval("document.getElementById('oidc-login').click()")
        .await;
    b.wait_until("the agents page", "document.getElementById('agents')", WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_walkthrough() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let agent_ns = env.create_namespace("gitlab-k8s-agent").unwrap();
    let dude = env.create_namespace("dude").unwrap();
    let naww = env.create_namespace("naww").unwrap();
    let issuer = Issuer::start("tether-web").await;
    // kas picks the port at each start attempt (see `WEB_PORT`).
    let kas_yaml = format!(
        "web:\n  listen:\n    address: 127.0.0.1:{WEB_PORT}\n  oidc:\n    issuer: {}\n    client_id: tether-web\n    \
         redirect_url: http://127.0.0.1:{WEB_PORT}/login/oidc/callback\n    admin_subjects: [admin-sub]\n",
        issuer.url
    );
    let users = "user_access:\n  access_as:\n    user: {}\n  groups:\n  - id: people\n";
    let (rig, c1) = rig_with(
        env,
        agent_ns.clone(),
        &rbac(&agent_ns, &dude),
        users,
        &[
            ("manifests/dude.yaml", Some(&deployment("nginx", &dude, 1))),
            ("manifests/naww.yaml", Some(&deployment("nginx", &naww, 1))),
        ],
        &[],
        kas_yaml,
    )
    .await;
    let Rig {
        kas,
        manifests,
        agent_id,
        ..
    } = &rig;
    let id = *agent_id;
    let web = format!("http://127.0.0.1:{}", kas.web_port);
    rig.synced(&c1).await;
    let mut b = Browser::launch(screenshots_dir()).await;

    // An admin logs in with OpenID Connect and sees the agent, dude Current, naww Failed.
    issuer.log_in_as("admin-sub", "ada", &["ops"]);
    oidc_login(&mut b, &web).await;
    assert!(b.text("#agents").await.contains("seed"));
    assert!(b.text("header").await.contains("ada (admin)"));
    check_accessible(&mut b, "agents").await;
    b.screenshot("agents").await;
    b.goto(&format!("{web}/agents/{id}")).await;
    let row = |ns: &str, status: &str| {
        format!(
            "[...document.querySelectorAll('#syncs tr')].some(r => r.innerText.includes({}) && r.innerText.includes({}))",
            json!(ns),
            json!(status)
        )
    };
    b.wait_until("dude Current", &row(&dude, "Current"), WAIT)
        .await;
    b.wait_until(
        "naww Failed, forbidden",
        &format!(
            "{} && document.querySelector('#syncs').innerText.includes('forbidden')",
            row(&naww, "Failed")
        ),
        WAIT,
    )
    .await;
    check_accessible(&mut b, "agent").await;
    b.screenshot("agent").await;

    // A commit shows up without a reload, within 2 s of kas having agentk's report.
    b.eval("window.__sameDocument = true").await;
    let c2 = manifests.commit(
        &[("manifests/dude.yaml", Some(&deployment("nginx", &dude, 2)))],
        "two replicas",
    );
    rig.synced(&c2).await;
    let reported = Instant::now();
    let shown = format!("!!document.querySelector('#syncs [data-commit=\"{c2}\"]')");
    b.wait_until("the new commit, live", &shown, Duration::from_secs(10))
        .await;
    let delay = reported.elapsed();
    assert_eq!(
        b.eval("window.__sameDocument === true").await,
        json!(true),
        "the page reloaded"
    );
    println!("live update shown {delay:?} after kas had the report");
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    b.screenshot("agent-live").await;

    // Reconcile now, then suspend the manifest project, resume it and suspend it again.
    b.eval("window.__sameDocument = 'before reconcile'").await;
    b.click_button("Reconcile now").await;
    let back = "window.__sameDocument === undefined && document.querySelector('#syncs h3')";
    b.wait_until("the agent page again", back, WAIT).await;
    assert!(kas.log().contains("Reconcile requested"));
    let events = |text: &str| {
        format!(
            "document.querySelector('#events') && document.querySelector('#events').innerText.includes({})",
            json!(text)
        )
    };
    b.click_button("Suspend group/manifests").await;
    let suspended = events("suspended by admin (web: ada)");
    b.wait_until("the suspension in the events", &suspended, WAIT)
        .await;
    let suspensions = kas.agent(id).await.suspensions;
    assert_eq!(suspensions.len(), 1, "{suspensions:?}");
    b.screenshot("agent-suspended").await;
    b.click_button("Resume group/manifests").await;
    let resumed = format!("document.querySelector('#events') && !({suspended})");
    b.wait_until("the suspension gone", &resumed, WAIT).await;
    assert!(kas.agent(id).await.suspensions.is_empty());
    b.click_button("Suspend group/manifests").await;
    b.wait_until("suspended again", &suspended, WAIT).await;

    // Register an agent: its token once, with the install command; a reload shows it no more.
    b.goto(&format!("{web}/")).await;
    b.wait_until(
        "the register form",
        "document.getElementById('f-name')",
        WAIT,
    )
    .await;
    b.eval("document.getElementById('f-project').value = 'group/config'; document.getElementById('f-name').value = 'second'").await;
    b.click_button("Register").await;
    b.wait_until("the token", "document.getElementById('token')", WAIT)
        .await;
    let token = b.eval("document.getElementById('token').value").await;
    let token = token.as_str().unwrap().to_owned();
    assert!(token.len() >= 32, "{token}");
    assert!(
        b.text("#install")
            .await
            .contains(&format!("--set config.token={token}"))
    );
    b.screenshot("registered").await;
    b.call("Page.reload", json!({})).await;
    b.wait_until(
        "the token gone",
        "document.body.innerText.includes('shown once and is gone')",
        WAIT,
    )
    .await;
    assert_eq!(
        b.eval("!!document.getElementById('token')").await,
        json!(false)
    );

    // Revoke the new agent's token.
    let agents = kas.admin.list_agents().await.unwrap();
    let second = agents.into_iter().find(|a| a.name == "second").unwrap();
    b.goto(&format!("{web}/agents/{}", second.id)).await;
    b.wait_until(
        "the tokens",
        "document.querySelector('#tokens button')",
        WAIT,
    )
    .await;
    let revoke = b
        .eval("document.querySelector('#tokens button').innerText")
        .await;
    b.click_button(revoke.as_str().unwrap()).await;
    let revoked = "document.querySelector('#tokens') && document.querySelector('#tokens').innerText.includes('revoked')";
    b.wait_until("the token revoked", revoked, WAIT).await;
    let tokens = kas.admin.list_tokens(second.id).await.unwrap();
    assert!(tokens.iter().all(|t| t.revoked_at.is_some()), "{tokens:?}");

    // Projects: mirror state and last fetch.
    b.goto(&format!("{web}/projects")).await;
    b.wait_until("the projects", "document.querySelector('#projects') && document.querySelector('#projects').innerText.includes('group/manifests')", WAIT).await;
    check_accessible(&mut b, "projects").await;
    b.screenshot("projects").await;

    // A viewer: no buttons; a forged POST without the CSRF token, or with it, is refused.
    b.click_button("Log out").await;
    b.wait_until(
        "the login page",
        "document.getElementById('oidc-login')",
        WAIT,
    )
    .await;
    issuer.log_in_as("alice-sub", PERSON, &["people"]);
    oidc_login(&mut b, &web).await;
    assert!(
        b.text("header")
            .await
            .contains(&format!("{PERSON} (viewer)"))
    );
    let forms = b
        .eval("document.querySelectorAll('main form').length")
        .await;
    assert_eq!(forms, json!(0), "a viewer gets no registration form");
    b.goto(&format!("{web}/agents/{id}")).await;
    b.wait_until(
        "the agent page",
        "document.querySelector('#syncs h3')",
        WAIT,
    )
    .await;
    let buttons = b.eval("[...document.querySelectorAll('main button')].map(b => b.innerText).filter(t => t !== 'Filter')").await;
    assert_eq!(buttons, json!([]), "a viewer sees no action buttons");
    let post = |csrf: &str| {
        format!(
            "fetch('/agents/{id}/reconcile', {{method: 'POST', body: new URLSearchParams({{csrf: {}}})}}).then(r => r.status)",
            json!(csrf)
        )
    };
    assert_eq!(b.eval(&post("")).await, json!(403), "no CSRF token");
    let csrf = b
        .eval("document.querySelector('header input[name=csrf]').value")
        .await;
    assert_eq!(
        b.eval(&post(csrf.as_str().unwrap())).await,
        json!(403),
        "a viewer's role"
    );

    // A login callback this browser did not start is refused.
    let forged = format!("{web}/login/oidc/callback?state=forged&code=stolen");
    b.goto(&forged).await;
    let refused = "document.body.innerText.includes('this login was not started in this browser')";
    b.wait_until("the forged callback refused", refused, WAIT)
        .await;

    // The cluster as the viewer: dude, not naww.
    b.goto(&format!("{web}/browse?agent={id}")).await;
    b.wait_until(
        "the namespaces",
        "document.querySelector('#namespaces')",
        WAIT,
    )
    .await;
    let namespaces = b.text("#namespaces").await;
    assert!(namespaces.contains(&dude), "{}", b.text("main").await);
    assert!(!namespaces.contains(&naww), "{namespaces}");
    b.screenshot("cluster").await;
    b.goto(&format!("{web}/browse?agent={id}&ns={dude}")).await;
    b.wait_until("dude's deployments", "document.querySelector('#deployments') && document.querySelector('#deployments').innerText.includes('nginx')", WAIT).await;
    assert!(b.text("#pods").await.contains("nginx"));
    check_accessible(&mut b, "cluster").await;
    b.screenshot("cluster-dude").await;
    b.goto(&format!("{web}/browse?agent={id}&ns={naww}")).await;
    b.wait_until(
        "naww refused",
        "document.body.innerText.includes('Deployments: 403')",
        WAIT,
    )
    .await;
    assert_eq!(
        b.eval("!!document.querySelector('#deployments')").await,
        json!(false)
    );

    // The admin token's login works and says it has no identity in the cluster.
    b.click_button("Log out").await;
    b.wait_until("the login page", "document.getElementById('token')", WAIT)
        .await;
    let admin = std::fs::read_to_string(kas.dir.join("data/admin-token")).unwrap();
    b.eval(&format!(
        "document.getElementById('token').value = {}",
        json!(admin.trim())
    ))
    .await;
    b.click_button("Log in").await;
    b.wait_until("the agents page", "document.getElementById('agents')", WAIT)
        .await;
    b.goto(&format!("{web}/browse?agent={id}")).await;
    b.wait_until(
        "no identity",
        "document.body.innerText.includes('no identity in the cluster')",
        WAIT,
    )
    .await;
}
