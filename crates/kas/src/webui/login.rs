//! Logging in (admin token, OpenID Connect) and out.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Form, Router};

use super::html::{Html, page};
use super::oidc;
use super::session::{self, Person, Role};
use super::{LoggedIn, WebState, error_page, html_response};

/// Cookie binding a login under way to the browser that started it.
const STATE_COOKIE: &str = "tether_oidc_state";

pub fn routes(state: &WebState) -> Router<WebState> {
    // Failed logins (a wrong admin token, a callback the provider refused or this browser did
    // not start) count against the client's address like the admin API's failures (the token
    // is in the form, so there is no credential to key by); an address over its limit gets 429
    // on every login route, the OpenID Connect ones too, whose work reaches the provider.
    let guard = crate::limits::HttpGuard {
        guard: std::sync::Arc::clone(&state.api.guards.admin),
        credential: |_| None,
    };
    // The layer last: axum wraps only the routes added before it.
    Router::new()
        .route("/login", get(form).post(admin_login))
        .route("/login/oidc", get(oidc_start))
        .route("/login/oidc/callback", get(oidc_callback))
        .layer(axum::middleware::from_fn_with_state(
            guard,
            crate::limits::guard_http,
        ))
}

fn login_page(st: &WebState, message: Option<&str>, code: StatusCode) -> Response {
    let mut body = Html::default();
    if let Some(m) = message {
        body.push(Html::wrap(
            "p",
            "role=\"alert\" class=\"error\"",
            Html::text(m),
        ));
    }
    if st.oidc.is_some() {
        body.push(Html::raw(
            "<p><a class=\"button\" id=\"oidc-login\" href=\"/login/oidc\">Log in with your identity provider</a></p>",
        ));
    }
    body.push(Html::raw(
        "<h2>Admin token</h2><form method=\"post\" action=\"/login\">\
         <label for=\"token\">Admin token</label> \
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required> \
         <button type=\"submit\">Log in</button></form>",
    ));
    html_response(code, page("Log in", None, body))
}

async fn form(State(st): State<WebState>) -> Response {
    login_page(&st, None, StatusCode::OK)
}

/// Starts a session and sends the browser to the agents page.
async fn logged_in(st: &WebState, role: Role, person: Option<Person>) -> Response {
    let id = match st.sessions.create(role, person).await {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "Cannot record a web UI session");
            let why = format!("the login could not be recorded: {e}");
            return login_page(st, Some(&why), StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id, st.sessions.ttl(), st.tls)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn admin_login(
    State(st): State<WebState>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let token = f.get("token").map(|t| t.trim()).unwrap_or_default();
    if token.is_empty() || !st.api.admin.matches(token) {
        tracing::warn!("Web UI login with a wrong admin token");
        return login_page(&st, Some("wrong admin token"), StatusCode::UNAUTHORIZED);
    }
    tracing::info!("Web UI login with the admin token");
    logged_in(&st, Role::Admin, None).await
}

async fn oidc_start(State(st): State<WebState>) -> Response {
    let Some(p) = &st.oidc else {
        return error_page(
            StatusCode::NOT_FOUND,
            "OpenID Connect login is not configured",
            None,
        );
    };
    match p.start().await {
        Ok((login, url)) => {
            let mut r = Redirect::to(&url).into_response();
            let cookie = state_cookie(&login.cookie_value(), oidc::LOGIN_TTL, st.tls);
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "Web UI OIDC login cannot start");
            login_page(&st, Some(&e.to_string()), StatusCode::BAD_GATEWAY)
        }
    }
}

async fn oidc_callback(
    State(st): State<WebState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(p) = &st.oidc else {
        return error_page(
            StatusCode::NOT_FOUND,
            "OpenID Connect login is not configured",
            None,
        );
    };
    if let Some(e) = q.get("error") {
        let m = format!("the identity provider refused the login: {e}");
        return login_page(&st, Some(&m), StatusCode::UNAUTHORIZED);
    }
    let state = q.get("state").map(String::as_str).unwrap_or_default();
    let login = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| session::cookie_value(c, STATE_COOKIE))
        .and_then(oidc::LoginState::from_cookie)
        .filter(|l| l.matches(state));
    let Some(login) = login else {
        tracing::warn!("Web UI OIDC callback without this browser's login state");
        // 401, a failed login the guard counts: forged callbacks are how one would probe it.
        return login_page(
            &st,
            Some("this login was not started in this browser: start again"),
            StatusCode::UNAUTHORIZED,
        );
    };
    let code = q.get("code").map(String::as_str).unwrap_or_default();
    let mut r = match p.finish(&login, code).await {
        Ok((person, role)) => {
            tracing::info!(subject = %person.subject, username = %person.username, role = role.name(), "Web UI login with OpenID Connect");
            logged_in(&st, role, Some(person)).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "Web UI OIDC login failed");
            login_page(&st, Some(&e.to_string()), StatusCode::UNAUTHORIZED)
        }
    };
    // The login is over either way: its state goes with it.
    if let Ok(v) = HeaderValue::from_str(&state_cookie("", Duration::ZERO, st.tls)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// The `Set-Cookie` value carrying a login under way to its callback (only there).
fn state_cookie(value: &str, max_age: Duration, tls: bool) -> String {
    format!(
        "{STATE_COOKIE}={value}; Path=/login/oidc; Max-Age={}; HttpOnly; SameSite=Lax{}",
        max_age.as_secs(),
        if tls { "; Secure" } else { "" }
    )
}

pub async fn logout(State(st): State<WebState>, Extension(who): Extension<LoggedIn>) -> Response {
    if let Err(e) = st.sessions.remove(&who.id).await {
        // The cookie still goes; the session would outlive it until it expires.
        tracing::error!(error = %e, "Cannot end a web UI session in the store");
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("logging out failed: {e}; try again"),
            None,
        );
    }
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie(st.tls)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}
