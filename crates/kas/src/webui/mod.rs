//! The web UI: server-rendered pages over the admin API's own handlers and views (no second
//! copy of their logic), live sync progress over server-sent events, admin actions, and the
//! cluster browsed through the agent's tunnel with the logged-in person's identity.
//!
//! Served on its own listener (`web.listen`). Pages need a session (`session.rs`): the admin
//! token's login makes an admin; OpenID Connect logins make viewers unless configured as
//! admins. Every POST carries the session's CSRF token, checked here before any handler runs.

mod actions;
mod browse;
pub mod html;
mod live;
mod login;
pub mod oidc;
mod pages;
pub mod render;
pub mod session;
mod through;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest as _, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::{ApiError, ApiState};
use html::{Html, Viewer};
use session::{Role, Session, Sessions};

/// Largest form accepted (the forms are a few fields).
const MAX_FORM: usize = 64 * 1024;

/// What the web UI's handlers share.
#[derive(Clone)]
pub struct WebState {
    /// The admin API's state: the UI calls the API's handlers with it.
    pub api: ApiState,
    /// The admin API's routes in process, for calls the agent's replica must serve.
    pub api_router: Router,
    pub sessions: Arc<Sessions>,
    pub oidc: Option<Arc<oidc::Provider>>,
    /// Whether the UI is served over TLS (cookies get `Secure`).
    pub tls: bool,
    /// The address agentk dials, for the install commands.
    pub agent_address: String,
    /// Tokens of just-registered agents, each shown once.
    pub once: Arc<actions::ShownOnce>,
    /// The Kubernetes API proxy: the cluster is browsed through its `user_access` path.
    pub proxy: Option<crate::kubeproxy::Proxy>,
}

impl std::fmt::Debug for WebState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebState")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The logged-in session of a request (put there by `require_session`).
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub id: String,
    pub session: Session,
}

impl LoggedIn {
    pub fn viewer(&self) -> Viewer {
        Viewer {
            name: self.session.display_name(),
            role: self.session.role.name(),
            csrf: self.session.csrf.clone(),
        }
    }

    /// The CSRF token when the session may act (admins); `None` for viewers.
    pub fn admin_csrf(&self) -> Option<&str> {
        (self.session.role == Role::Admin).then_some(self.session.csrf.as_str())
    }
}

/// A page's HTML response; never cached (pages show tokens and live state).
pub fn html_response(code: StatusCode, page: Html) -> Response {
    let mut r = (code, page.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// An error page.
pub fn error_page(code: StatusCode, message: &str, viewer: Option<&Viewer>) -> Response {
    let body = Html::wrap("p", "role=\"alert\" class=\"error\"", Html::text(message));
    html_response(
        code,
        html::page(&format!("Error {}", code.as_u16()), viewer, body),
    )
}

/// The admin API's error as a page (the same message the CLI would print).
pub fn api_error(e: ApiError, who: &LoggedIn) -> Response {
    if e.0.is_server_error() {
        tracing::error!(code = e.0.as_u16(), error = %e.1, "Web UI request failed");
    }
    error_page(e.0, &e.1, Some(&who.viewer()))
}

/// Every route of the UI.
pub fn router(state: WebState) -> Router {
    let protected = Router::new()
        .route("/", get(pages::agents))
        .route("/agents/{id}", get(pages::agent))
        .route("/agents/{id}/live", get(live::stream))
        .route("/projects", get(pages::projects))
        .route("/browse", get(browse::page))
        .route("/logout", post(login::logout))
        .merge(actions::routes())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/assets/app.css", get(asset_css))
        .route("/assets/app.js", get(asset_js))
        .merge(login::routes(&state))
        .merge(protected)
        // The login form is read before anyone is known: bounded in time as well as in size.
        .layer(middleware::map_request(crate::listener::bound_body))
        .with_state(state)
}

async fn asset_css() -> Response {
    asset("text/css", include_str!("assets/app.css"))
}

async fn asset_js() -> Response {
    asset("text/javascript", include_str!("assets/app.js"))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// The live session with this id (from the request's cookie); an error when the store cannot
/// say.
async fn session_of(
    st: &WebState,
    id: Option<String>,
) -> Result<Option<LoggedIn>, tether_store::Error> {
    let Some(id) = id else { return Ok(None) };
    let session = st.sessions.get(&id).await?;
    Ok(session.map(|session| LoggedIn { id, session }))
}

/// The answer while the sessions cannot be read: 503, the cookie kept (nothing is said about
/// it), so the same page works again once the database answers.
fn sessions_unreadable(e: &tether_store::Error) -> Response {
    tracing::warn!(error = %e, "Cannot read web UI sessions: answering 503 (the session is kept)");
    let mut page = error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "kas cannot read its database right now ({e}), so it cannot tell who you are; \
             you are still logged in: reload this page in a moment"
        ),
        None,
    );
    page.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    page
}

/// The session id in a request's cookie.
fn session_id(req: &Request, tls: bool) -> Option<String> {
    let cookies = req.headers().get(header::COOKIE)?.to_str().ok()?;
    session::cookie_value(cookies, session::cookie_name(tls)).map(str::to_owned)
}

/// Lets through requests of a live session: pages to anyone logged in; a POST only with the
/// session's CSRF token, and (except logging out) only for admins.
async fn require_session(State(st): State<WebState>, req: Request, next: Next) -> Response {
    // The id owned before awaiting: a request (its body) is not `Sync`, so the future may not
    // hold a reference to it.
    let id = session_id(&req, st.tls);
    let who = match session_of(&st, id).await {
        Ok(Some(who)) => who,
        Ok(None) if req.method() == Method::GET => return Redirect::to("/login").into_response(),
        Ok(None) => return error_page(StatusCode::UNAUTHORIZED, "log in first", None),
        Err(e) => return sessions_unreadable(&e),
    };
    let mut req = req;
    if req.method() == Method::POST {
        req = match check_post(req, &who).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

/// A POST's CSRF token and role; the request is rebuilt from the buffered form.
async fn check_post(req: Request, who: &LoggedIn) -> Result<Request, Response> {
    let logout = req.uri().path() == "/logout";
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM)
        .await
        .map_err(|_| error_page(StatusCode::PAYLOAD_TOO_LARGE, "form too large", None))?;
    let probe = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
    let form = axum::extract::Form::<HashMap<String, String>>::from_request(probe, &())
        .await
        .map(|f| f.0)
        .unwrap_or_default();
    let submitted = form.get("csrf").map(String::as_str).unwrap_or_default();
    if !session::csrf_matches(&who.session, submitted) {
        tracing::warn!(path = %parts.uri.path(), user = %who.session.display_name(), "Web UI POST refused: missing or wrong CSRF token");
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is missing or wrong (reload the page and try again)",
            Some(&who.viewer()),
        ));
    }
    if !logout && who.session.role != Role::Admin {
        tracing::warn!(path = %parts.uri.path(), user = %who.session.display_name(), "Web UI action refused: viewer role");
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "refused: your role (viewer) may not change anything",
            Some(&who.viewer()),
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}
