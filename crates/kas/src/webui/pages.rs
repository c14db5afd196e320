//! The read-only pages: each calls the admin API's handlers (the same data the CLI shows)
//! and renders their views.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;

use super::html::{Html, page};
use super::render::{self, AgentPage, ObjectFilter};
use super::{LoggedIn, WebState, api_error, html_response};
use crate::api;

/// The agents list (and, for admins, the registration form).
pub async fn agents(State(st): State<WebState>, Extension(who): Extension<LoggedIn>) -> Response {
    let list = match api::list_agents(State(st.api.clone()), None).await {
        Ok(l) => l.0,
        Err(e) => return api_error(e, &who),
    };
    let mut body = render::agents(&list, st.api.own_address());
    if let Some(csrf) = who.admin_csrf() {
        body.push(render::register_form(csrf));
    }
    html_response(StatusCode::OK, page("Agents", Some(&who.viewer()), body))
}

/// One agent: its syncs (filtered), recent events, access rules, tokens.
pub async fn agent(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(id): Path<i64>,
    Query(filter): Query<ObjectFilter>,
) -> Response {
    match agent_body(&st, &who, id, &filter).await {
        Ok((title, body)) => html_response(StatusCode::OK, page(&title, Some(&who.viewer()), body)),
        Err(e) => api_error(e, &who),
    }
}

async fn agent_body(
    st: &WebState,
    who: &LoggedIn,
    id: i64,
    filter: &ObjectFilter,
) -> Result<(String, Html), api::ApiError> {
    let all = api::list_agents(State(st.api.clone()), None).await?.0;
    let agent = all
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| api::ApiError::new(StatusCode::NOT_FOUND, format!("no agent {id}")))?;
    let (syncs, progress, unreported) = sync_views(st, id).await?;
    let tokens = api::list_tokens(State(st.api.clone()), Path(id), None)
        .await?
        .0;
    // As the proxy decides: the stored configuration when another replica holds the agent.
    let access = st.api.in_force().now(id).await.map(|c| {
        let rules = serde_json::json!({"ci_access": c.ci_access, "user_access": c.user_access});
        serde_json::to_string_pretty(&rules).unwrap_or_default()
    });
    let body = render::agent(&AgentPage {
        agent: &agent,
        syncs: &syncs,
        progress: &progress,
        unreported: &unreported,
        access,
        tokens: &tokens,
        filter,
        csrf: who.admin_csrf(),
        own: st.api.own_address(),
    });
    Ok((format!("Agent {} ({})", agent.name, agent.project), body))
}

/// The agent's last syncs, the ones under way and the entries without a report, as `kas
/// agent status` and `reconcile --wait` see them (from the replica holding the agent).
pub async fn sync_views(st: &WebState, id: i64) -> Result<SyncViews, api::ApiError> {
    let (router, base) = (&st.api_router, format!("/api/v1/agents/{id}/gitops"));
    let syncs = super::through::call(router, Method::GET, &base, None).await?;
    let progress = format!("{base}/progress");
    let progress = super::through::call(router, Method::GET, &progress, None).await?;
    let unreported = format!("{base}/unreported");
    let unreported = super::through::call(router, Method::GET, &unreported, None).await?;
    Ok((syncs, progress, unreported))
}

/// [`sync_views`]' answer: last syncs, syncs under way, entries without a report.
pub type SyncViews = (
    Vec<api::SyncView>,
    Vec<tether_kas_api::ProgressView>,
    Vec<tether_kas_api::UnreportedView>,
);

/// The projects: mirror state, last fetch, errors, webhook deliveries.
pub async fn projects(State(st): State<WebState>, Extension(who): Extension<LoggedIn>) -> Response {
    let list = match api::list_projects(State(st.api.clone())).await {
        Ok(l) => l.0,
        Err(e) => return api_error(e, &who),
    };
    let deliveries = |id: i64| st.api.deliveries.of(id);
    let body = render::projects(&list, &deliveries);
    html_response(StatusCode::OK, page("Projects", Some(&who.viewer()), body))
}
