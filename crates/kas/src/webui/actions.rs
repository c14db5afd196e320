//! The admin actions: each calls the admin API's handler with what the form says, then
//! sends the browser back to the page it came from. The role and CSRF token were checked
//! before (see `require_session`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use serde_json::json;
use tether_kas_api::{ReconcileRequest, ReconcileStarted, RegisterRequest, SuspendRequest};

use super::html::{Html, page};
use super::session::random_token;
use super::{LoggedIn, WebState, api_error, error_page, html_response, render};
use crate::api;

/// How long a registration's token waits to be shown.
const SHOW_WITHIN: Duration = Duration::from_secs(60);

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/agents/register", post(register))
        .route("/agents/registered/{key}", get(registered))
        .route("/agents/{id}/reconcile", post(reconcile))
        .route("/agents/{id}/suspend", post(suspend))
        .route("/agents/{id}/resume", post(resume))
        .route("/tokens/{id}/revoke", post(revoke))
}

/// A new agent's token, waiting to be shown once to the session that registered it.
#[derive(Debug)]
struct Shown {
    session: String,
    agent_id: i64,
    token: String,
    expires: Instant,
}

/// Tokens to show once: taken (removed) by the page that shows them, so a reload finds
/// nothing.
#[derive(Debug, Default)]
pub struct ShownOnce(Mutex<HashMap<String, Shown>>);

impl ShownOnce {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Shown>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn put(&self, session: &str, agent_id: i64, token: String) -> String {
        let key = random_token();
        let now = Instant::now();
        let mut map = self.map();
        map.retain(|_, s| s.expires > now);
        map.insert(
            key.clone(),
            Shown {
                session: session.to_owned(),
                agent_id,
                token,
                expires: now + SHOW_WITHIN,
            },
        );
        key
    }

    fn take(&self, key: &str, session: &str) -> Option<(i64, String)> {
        let mut map = self.map();
        let s = map.remove(key)?;
        (s.session == session && s.expires > Instant::now()).then_some((s.agent_id, s.token))
    }
}

fn field<'a>(f: &'a HashMap<String, String>, name: &str) -> &'a str {
    f.get(name).map(|s| s.trim()).unwrap_or_default()
}

async fn register(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let req = RegisterRequest {
        project: field(&f, "project").to_owned(),
        name: field(&f, "name").to_owned(),
        description: format!("registered in the web UI by {}", who.session.display_name()),
    };
    match api::register_agent(State(st.api.clone()), Json(req)).await {
        Ok((_, Json(t))) => {
            let key = st.once.put(&who.id, t.agent_id, t.token);
            Redirect::to(&format!("/agents/registered/{key}")).into_response()
        }
        Err(e) => api_error(e, &who),
    }
}

/// Shows a registration's token and install commands, once.
async fn registered(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(key): Path<String>,
) -> Response {
    let Some((agent_id, token)) = st.once.take(&key, &who.id) else {
        return error_page(
            StatusCode::GONE,
            "This token was shown once and is gone: kas keeps only its hash. Create a new token if it was lost.",
            Some(&who.viewer()),
        );
    };
    let target = crate::install::InstallTarget {
        kas_address: &st.agent_address,
        namespace: "gitlab-agent",
        release: "agentk",
    };
    let install = crate::install::instructions(&target, None);
    let body = render::registered(agent_id, &token, &install);
    html_response(
        StatusCode::OK,
        page("Agent registered", Some(&who.viewer()), body),
    )
}

fn back_to(agent_id: i64) -> Response {
    Redirect::to(&format!("/agents/{agent_id}")).into_response()
}

fn project_of(f: &HashMap<String, String>) -> Option<String> {
    Some(field(f, "project"))
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

/// How long a reconcile clicked in the web UI may wait for the configuration in force or
/// the agent's GitOps streams (a page waiting longer looks broken).
const WEB_RECONCILE_WAIT_MS: u64 = 10_000;

async fn reconcile(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(id): Path<i64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let req = ReconcileRequest {
        project: project_of(&f),
        // A click right after a configuration change: ride it out briefly, as the CLI does.
        wait_ms: Some(WEB_RECONCILE_WAIT_MS),
    };
    let path = format!("/api/v1/agents/{id}/reconcile");
    let started: Result<ReconcileStarted, _> =
        super::through::call(&st.api_router, Method::POST, &path, Some(json!(req))).await;
    let started = match started {
        Ok(s) => s,
        Err(e) => return api_error(e, &who),
    };
    let problems = reconcile_problems(&started);
    if problems.is_empty() {
        return back_to(id);
    }
    // Requested, but it will not do what was asked: say so, as `kas agent reconcile` does.
    tracing::warn!(agent_id = id, problems = ?problems, "Web UI reconcile cannot take effect");
    let mut body = Html::wrap(
        "p",
        "role=\"alert\" class=\"error\"",
        Html::text("The reconcile was requested, but:"),
    );
    body.push(Html::wrap(
        "ul",
        "id=\"reconcile-problems\"",
        problems
            .iter()
            .map(|p| Html::wrap("li", "", Html::text(p)))
            .collect(),
    ));
    body.push(Html::assembled(format!(
        "<p><a href=\"/agents/{id}\">Back to the agent</a></p>"
    )));
    let viewer = who.viewer();
    html_response(
        StatusCode::SERVICE_UNAVAILABLE,
        page("Reconcile", Some(&viewer), body),
    )
}

/// What keeps a reconcile from doing what was asked, per project, in words for the page.
/// Pure.
fn reconcile_problems(started: &ReconcileStarted) -> Vec<String> {
    if started.projects.is_empty() {
        return vec!["the agent's configuration has no manifest project to synchronize".into()];
    }
    let mut out = Vec::new();
    for t in &started.projects {
        if let Some(why) = &t.suspended {
            out.push(format!("{}: {why}: skipped until it is resumed", t.project));
            continue;
        }
        if let Some(e) = &t.fetch_error {
            out.push(format!(
                "{}: fetching the newest commit failed ({e}); the last good commit is synchronized instead",
                t.project
            ));
        }
        if t.streams == 0 {
            out.push(format!(
                "{}: no GitOps stream heard the request — the agent is offline or not leading; nothing will be synchronized until it is back",
                t.project
            ));
        }
    }
    out
}

fn suspend_request(who: &LoggedIn, f: &HashMap<String, String>) -> SuspendRequest {
    SuspendRequest {
        project: project_of(f),
        reason: field(f, "reason").to_owned(),
        requested_by: Some(format!("web: {}", who.session.display_name())),
    }
}

async fn suspend(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(id): Path<i64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    agent_action(&st, &who, id, "suspend", json!(suspend_request(&who, &f))).await
}

async fn resume(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(id): Path<i64>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    agent_action(&st, &who, id, "resume", json!(suspend_request(&who, &f))).await
}

/// `POST /api/v1/agents/{id}/{op}` through the admin API's routes (served by the replica
/// holding the agent), then back to the agent's page.
async fn agent_action(
    st: &WebState,
    who: &LoggedIn,
    id: i64,
    op: &str,
    body: serde_json::Value,
) -> Response {
    let path = format!("/api/v1/agents/{id}/{op}");
    let done: Result<serde_json::Value, _> =
        super::through::call(&st.api_router, Method::POST, &path, Some(body)).await;
    match done {
        Ok(_) => back_to(id),
        Err(e) => api_error(e, who),
    }
}

async fn revoke(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(id): Path<i64>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let agent: Option<i64> = q.get("agent").and_then(|a| a.parse().ok());
    match api::revoke_token(State(st.api.clone()), Path(id)).await {
        // Stored, but the other replicas were not told: no plain success, as in the CLI.
        Ok(Json(tether_kas_api::Revoked {
            replicas_not_told: Some(note),
            ..
        })) => {
            let body = revoked_not_told(id, &note, agent);
            html_response(StatusCode::OK, page("Revoke", Some(&who.viewer()), body))
        }
        Ok(_) => match agent {
            Some(agent) => back_to(agent),
            None => Redirect::to("/").into_response(),
        },
        Err(e) => api_error(e, &who),
    }
}

/// The page of a revocation stored but not told to the other replicas (pure).
fn revoked_not_told(token_id: i64, note: &str, agent: Option<i64>) -> Html {
    let mut body = Html::wrap(
        "p",
        "role=\"alert\" class=\"warning\"",
        Html::text(&format!("Token {token_id} is revoked, but {note}.")),
    );
    let back = agent.map_or_else(|| "/".to_owned(), |a| format!("/agents/{a}"));
    body.push(Html::assembled(format!(
        "<p><a href=\"{}\">Back</a></p>",
        super::html::esc(&back)
    )));
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The web UI's revoke button said nothing when Redis did not carry the revocation to the
    /// other replicas (it went back to the agent page as for a full success).
    #[test]
    fn a_revocation_the_other_replicas_were_not_told_of_is_said() {
        let h = revoked_not_told(
            5,
            "the other kas replicas could not be told now <Redis>",
            Some(3),
        );
        let s = h.as_str();
        assert!(
            s.contains("role=\"alert\"")
                && s.contains("Token 5 is revoked, but the other kas replicas could not be told now &lt;Redis&gt;."),
            "{s}"
        );
        assert!(s.contains("href=\"/agents/3\""), "{s}");
    }

    #[test]
    fn a_reconcile_nobody_hears_or_without_a_fetch_is_named_per_project() {
        let target =
            |project: &str, streams, fetch_error: Option<&str>| tether_kas_api::ReconcileTarget {
                project: project.into(),
                commit: None,
                fetch_error: fetch_error.map(str::to_owned),
                streams,
                suspended: None,
            };
        let fine = ReconcileStarted {
            resync_id: 1,
            projects: vec![target("group/a", 1, None)],
        };
        assert!(reconcile_problems(&fine).is_empty());
        let bad = ReconcileStarted {
            resync_id: 2,
            projects: vec![
                target("group/a", 0, None),
                target("group/b", 2, Some("connection refused")),
                target("group/c", 1, None),
            ],
        };
        let p = reconcile_problems(&bad);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("group/a: no GitOps stream"), "{p:?}");
        assert!(p[1].contains("group/b: fetching the newest commit failed (connection refused)"));
        let none = ReconcileStarted {
            resync_id: 3,
            projects: Vec::new(),
        };
        assert_eq!(reconcile_problems(&none).len(), 1);
        let held = ReconcileStarted {
            resync_id: 4,
            projects: vec![tether_kas_api::ReconcileTarget {
                suspended: Some("suspended (by admin, reason: none)".into()),
                ..target("group/d", 0, None)
            }],
        };
        assert_eq!(
            reconcile_problems(&held),
            ["group/d: suspended (by admin, reason: none): skipped until it is resumed"]
        );
    }

    #[test]
    fn a_token_is_shown_once_and_only_to_its_session() {
        let once = ShownOnce::default();
        let key = once.put("s1", 4, "secret".into());
        assert_eq!(once.take(&key, "s2"), None, "another session");
        let key = once.put("s1", 4, "secret".into());
        assert_eq!(once.take(&key, "s1"), Some((4, "secret".into())));
        assert_eq!(once.take(&key, "s1"), None, "shown once");
    }
}
