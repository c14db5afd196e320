//! The agent page's live part: server-sent events carrying the syncs section, rendered from
//! the same views as the page (the stored reports and the progress kas keeps for
//! `reconcile --wait`), sent whenever it changed. It is rendered again as soon as this kas
//! receives a report or progress (`SyncStates::changes`), and at least every [`TICK`] for
//! reports another replica received. The stream ends once its session is over.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::Stream;

use super::render::{self, ObjectFilter};
use super::{LoggedIn, WebState};

/// How often the section is rendered again without news from this kas.
const TICK: Duration = Duration::from_secs(1);

pub async fn stream(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Path(id): Path<i64>,
    Query(filter): Query<ObjectFilter>,
) -> Response {
    Sse::new(changes(st, who.id, id, filter))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The syncs section each time it differs from the last one sent (the first one at once), for
/// as long as the session `session` lasts.
fn changes(
    st: WebState,
    session: String,
    id: i64,
    filter: ObjectFilter,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let changes = st.api.sync_states.changes();
    futures_util::stream::unfold(
        (st, changes, String::new()),
        move |(st, mut changes, last)| {
            let (filter, session) = (filter.clone(), session.clone());
            async move {
                loop {
                    // Checked at every turn, not only when the page opened the stream: after a
                    // logout, the session's expiry or a rotation of the admin token it was
                    // opened with, an open page must get nothing more. Ending the stream is
                    // enough: the browser's reconnection is sent to the login page.
                    // A database that does not answer ends the stream too (fail closed: a
                    // session revoked meanwhile cannot be told apart); the page's reload then
                    // says kas cannot read its database, and works again once it can.
                    if !matches!(st.sessions.get(&session).await, Ok(Some(_))) {
                        tracing::debug!(
                            agent_id = id,
                            "Web UI live view ended: its session is over or cannot be read"
                        );
                        return None;
                    }
                    // Marked seen before reading, so a report arriving meanwhile wakes the next turn.
                    changes.borrow_and_update();
                    let html = syncs_section(&st, id, &filter).await;
                    if html != last {
                        let event = Event::default().event("syncs").data(html.clone());
                        return Some((Ok(event), (st, changes, html)));
                    }
                    let woken = tokio::time::timeout(TICK, changes.changed()).await;
                    if matches!(woken, Ok(Err(_))) {
                        // The channel closed (kas stopping): the tick alone, never a busy loop.
                        tokio::time::sleep(TICK).await;
                    }
                }
            }
        },
    )
}

/// The syncs section as the page shows it, or why it cannot be read.
async fn syncs_section(st: &WebState, id: i64, filter: &ObjectFilter) -> String {
    match super::pages::sync_views(st, id).await {
        Ok((syncs, progress, unreported)) => {
            render::syncs(&syncs, &progress, &unreported, filter).into_string()
        }
        // Said in the page; the API's error type logs failures of kas itself.
        Err(e) => {
            tracing::warn!(agent_id = id, error = %e.1, "Web UI live view cannot read the syncs");
            format!("<p class=\"error\">{}</p>", super::html::esc(&e.1))
        }
    }
}
