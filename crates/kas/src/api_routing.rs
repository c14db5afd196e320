//! The admin API with several replicas: a request about an agent is served by the replica
//! holding the agent's connection, and the agent list gathers every replica's connections.
//!
//! An agent's tunnels, its configuration and GitOps streams and what it reported live on the
//! replica it is connected to (one HTTP/2 connection carries them all). `kas agent ping`,
//! `diff`, `reconcile`, `suspend`/`resume` and the GitOps views need them, so a replica that does
//! not hold the agent forwards the request, over the private peers listener (see
//! [`crate::peers`]), to one that does; the answer comes back unchanged. Requests that only read
//! or write the database (tokens, projects, deleting an agent) are served where they arrive.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::Full;
use std::collections::BTreeMap;
use tether_kas_api::{AgentView, TokenView};

use crate::api::{ApiError, ApiState};
use crate::peers::Peers;

/// Largest admin request body forwarded (diff and reconcile requests are a few hundred bytes).
const MAX_FORWARDED_BODY: usize = 1024 * 1024;

/// Marks a request another replica forwarded: served here, never forwarded again.
#[derive(Debug, Clone, Copy)]
pub struct FromPeer;

/// The agent a request is about when it needs the replica holding the agent (pure):
/// `/api/v1/agents/{id}/…` for the sub-resources served from the agent's connection.
pub fn agent_of(path: &str) -> Option<i64> {
    let rest = path.strip_prefix("/api/v1/agents/")?;
    let (id, sub) = rest.split_once('/')?;
    let needs_holder = matches!(
        sub,
        "echo"
            | "gitops"
            | "gitops/progress"
            | "gitops/unreported"
            | "diff"
            | "reconcile"
            | "suspend"
            | "resume"
    );
    needs_holder.then(|| id.parse().ok()).flatten()
}

/// Middleware: forwards a request about an agent held by another replica to it. Served here
/// when this replica holds the agent, when no replica does (the handler says it is not
/// connected), and when the directory cannot be read (Redis down: local answers only).
pub async fn to_holder(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let (Some(peers), Some(agent)) = (&st.peers, agent_of(req.uri().path())) else {
        return next.run(req).await;
    };
    if req.extensions().get::<FromPeer>().is_some() || peers.holds(agent) {
        return next.run(req).await;
    }
    let holders = match peers.holders(agent).await {
        Ok(h) if !h.is_empty() => h,
        Ok(_) => return next.run(req).await,
        Err(e) => {
            tracing::warn!(agent_id = agent, error = %e, "Cannot read the replicas' agent directory; answering from this replica only");
            return next.run(req).await;
        }
    };
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_FORWARDED_BODY).await else {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            .into_response();
    };
    let mut errors = Vec::new();
    for address in holders {
        match forward(peers, &address, &parts, body.clone()).await {
            Ok(response) => return response,
            Err(e) => errors.push(format!("{address}: {e}")),
        }
    }
    let message = format!(
        "agent {agent} is connected to another replica, which did not answer: {}",
        errors.join("; ")
    );
    tracing::warn!(agent_id = agent, error = %message, "Forwarding an admin request failed");
    ApiError::new(StatusCode::BAD_GATEWAY, message).into_response()
}

/// One HTTP/1.1 exchange with `address`'s admin API over the peers listener.
async fn forward(
    peers: &Peers,
    address: &str,
    parts: &Parts,
    body: Bytes,
) -> Result<Response, String> {
    let stream = peers.open_admin(address).await.map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    // Drives the connection until the answer's body is read by whoever reads it.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (name, value) in &parts.headers {
        // The holder trusts the signed preamble: the admin token stays on this replica.
        if name != header::AUTHORIZATION && name != header::HOST {
            request = request.header(name, value);
        }
    }
    let request = request
        .header(header::HOST, HeaderValue::from_static("kas"))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The other replicas' lists (of agents, of tokens), and those that could not be asked.
#[derive(Debug)]
pub struct OtherLists<T> {
    /// Each replica that answered (its address) with its list.
    pub lists: Vec<(String, Vec<T>)>,
    /// Replicas that did not answer (their address), or why none could be listed.
    pub unreachable: Vec<String>,
}

impl<T> Default for OtherLists<T> {
    fn default() -> Self {
        OtherLists {
            lists: Vec::new(),
            unreachable: Vec::new(),
        }
    }
}

/// Every other replica's agent list (its own connections), for `GET /api/v1/agents`. A replica
/// that does not answer is named in `unreachable` (logged at warn): the list then misses its
/// connections, and says so.
pub async fn other_replicas_agents(peers: &Peers) -> OtherLists<AgentView> {
    ask_the_others(peers, "/api/v1/agents").await
}

/// Every other replica's token list of `agent_id` (each with the streams open there), for
/// `GET /api/v1/agents/{id}/tokens`: streams of a token live on whichever replica agentk's
/// connections reached.
pub async fn other_replicas_tokens(peers: &Peers, agent_id: i64) -> OtherLists<PeerTokenStreams> {
    ask_the_others(peers, &format!("/api/v1/agents/{agent_id}/tokens")).await
}

/// `GET path` of every other replica's admin API; a replica that does not answer is named in
/// `unreachable` and logged at warn.
async fn ask_the_others<T: serde::de::DeserializeOwned>(
    peers: &Peers,
    path: &str,
) -> OtherLists<T> {
    let addresses = match peers.other_replicas().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, path, "Cannot list the other replicas; answering with this replica's connections only");
            return OtherLists {
                lists: Vec::new(),
                unreachable: vec![format!(
                    "the other replicas (the replicas' directory in Redis cannot be read: {e})"
                )],
            };
        }
    };
    let (parts, _) = hyper::Request::get(path)
        .body(())
        .unwrap_or_default()
        .into_parts();
    let mut others = OtherLists::default();
    for address in addresses {
        match ask::<Vec<T>>(peers, &address, &parts, Bytes::new()).await {
            Ok(list) => others.lists.push((address, list)),
            Err(e) => {
                tracing::warn!(replica = %address, error = %e, path, "A replica did not answer a listing");
                others.unreachable.push(format!("replica {address}"));
            }
        }
    }
    others
}

/// One admin API exchange with the replica at `address` (the request `parts` with `body`),
/// its JSON answer read as `T`.
pub async fn ask<T: serde::de::DeserializeOwned>(
    peers: &Peers,
    address: &str,
    parts: &Parts,
    body: Bytes,
) -> Result<T, String> {
    let response = forward(peers, address, parts, body).await?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// This replica's agent list with the others' (pure): an agent's connections are all of its
/// connections on every replica; its configuration in force comes from a replica holding it.
/// Each agent names the replicas that did not answer.
pub fn merge_agents(local: Vec<AgentView>, others: OtherLists<AgentView>) -> Vec<AgentView> {
    let mut by_id: BTreeMap<i64, AgentView> = local.into_iter().map(|a| (a.id, a)).collect();
    for view in others.lists.into_iter().flat_map(|(_, list)| list) {
        let Some(mine) = by_id.get_mut(&view.id) else {
            // Registered since this replica read the database: shown as the holder sees it.
            by_id.insert(view.id, view);
            continue;
        };
        if view.connected && !mine.connected || mine.config.is_none() {
            mine.config = view.config.or(mine.config.take());
        }
        mine.connections.extend(view.connections);
        mine.idle_tunnels += view.idle_tunnels;
        mine.connected |= view.connected;
        // RFC 3339 UTC times of one format: the greater is the later.
        mine.last_seen = mine.last_seen.take().max(view.last_seen);
    }
    let mut merged: Vec<AgentView> = by_id.into_values().collect();
    for a in &mut merged {
        a.unreachable_replicas.clone_from(&others.unreachable);
    }
    merged
}

/// A token as another replica lists it: the streams open with it there; `None` from a kas
/// older than that field, which does not count them (unknown, not 0).
#[derive(Debug, serde::Deserialize)]
pub struct PeerTokenStreams {
    pub id: i64,
    pub open_streams: Option<usize>,
}

/// This replica's token list with the others' (pure): a token's open streams are those of
/// every replica; each token names the replicas that did not say theirs — those that did not
/// answer, and those too old to count them (during a rolling upgrade: read as 0, a token still
/// in use there looked unused). The tokens are this replica's (all read the same database).
pub fn merge_tokens(
    mut local: Vec<TokenView>,
    others: OtherLists<PeerTokenStreams>,
) -> Vec<TokenView> {
    let mut streams: BTreeMap<i64, usize> = BTreeMap::new();
    let mut unknown = others.unreachable;
    for (address, list) in others.lists {
        if list.iter().any(|t| t.open_streams.is_none()) {
            unknown.push(format!(
                "replica {address} (a kas too old to count a token's streams)"
            ));
            continue;
        }
        for t in list {
            *streams.entry(t.id).or_default() += t.open_streams.unwrap_or(0);
        }
    }
    for t in &mut local {
        t.open_streams += streams.get(&t.id).copied().unwrap_or(0);
        t.streams_unknown_on.clone_from(&unknown);
    }
    local
}

/// An active token of `agent_id` with `open_streams` (for tests).
#[cfg(test)]
pub(crate) fn token_view(id: i64, agent_id: i64, open_streams: usize) -> TokenView {
    TokenView {
        id,
        agent_id,
        description: String::new(),
        created_at: 0,
        revoked_at: None,
        last_used_at: None,
        open_streams,
        streams_unknown_on: Vec::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_served_from_the_agents_connection_follow_it() {
        assert_eq!(agent_of("/api/v1/agents/7/echo"), Some(7));
        assert_eq!(agent_of("/api/v1/agents/7/gitops/progress"), Some(7));
        assert_eq!(agent_of("/api/v1/agents/12/reconcile"), Some(12));
        assert_eq!(agent_of("/api/v1/agents/12/suspend"), Some(12));
        assert_eq!(agent_of("/api/v1/agents/12/diff"), Some(12));
        assert_eq!(
            agent_of("/api/v1/agents/12/gitops/resync"),
            None,
            "sent by the replica a reconcile reached to each holder: served there"
        );
        assert_eq!(agent_of("/api/v1/agents/12/tokens"), None);
        assert_eq!(agent_of("/api/v1/agents/12/user-tokens"), None);
        assert_eq!(agent_of("/api/v1/agents/12"), None);
        assert_eq!(agent_of("/api/v1/agents"), None);
        assert_eq!(agent_of("/api/v1/agents/x/echo"), None);
        assert_eq!(agent_of("/api/v1/projects"), None);
    }

    fn token(id: i64, open_streams: usize) -> TokenView {
        token_view(id, 1, open_streams)
    }

    fn there(id: i64, open_streams: usize) -> PeerTokenStreams {
        PeerTokenStreams {
            id,
            open_streams: Some(open_streams),
        }
    }

    #[test]
    fn a_tokens_streams_are_summed_over_the_replicas_and_the_silent_ones_named() {
        let others = OtherLists {
            lists: vec![
                ("10.0.0.4:8156".into(), vec![there(1, 3), there(2, 0)]),
                ("10.0.0.5:8156".into(), vec![there(1, 1), there(9, 5)]),
            ],
            unreachable: Vec::new(),
        };
        let merged = merge_tokens(vec![token(1, 2), token(2, 0)], others);
        let streams: Vec<(i64, usize)> = merged.iter().map(|t| (t.id, t.open_streams)).collect();
        // A token another replica read after this one did is left to the next listing.
        assert_eq!(streams, [(1, 6), (2, 0)]);
        assert!(merged.iter().all(|t| t.streams_unknown_on.is_empty()));

        let silent = OtherLists {
            lists: Vec::new(),
            unreachable: vec!["replica 10.0.0.6:8156".into()],
        };
        let merged = merge_tokens(vec![token(1, 0)], silent);
        assert_eq!(merged[0].open_streams, 0);
        assert_eq!(merged[0].streams_unknown_on, ["replica 10.0.0.6:8156"]);
    }

    /// A replica of a kas older than the field (a rolling upgrade) lists tokens without
    /// `open_streams`: unknown there, not 0 (a token in use through it read as unused, and
    /// `kas token list` exited 0, so a rotation revoked it).
    #[test]
    fn a_replica_that_does_not_count_streams_is_named_not_read_as_zero() {
        let older: Vec<PeerTokenStreams> = serde_json::from_value(serde_json::json!([
            {"id": 1, "agent_id": 1, "description": "", "created_at": 0, "revoked_at": null}
        ]))
        .unwrap();
        let others = OtherLists {
            lists: vec![
                ("10.0.0.4:8156".into(), older),
                ("10.0.0.5:8156".into(), vec![there(1, 2)]),
            ],
            unreachable: Vec::new(),
        };
        let merged = merge_tokens(vec![token(1, 0)], others);
        assert_eq!(merged[0].open_streams, 2);
        assert_eq!(
            merged[0].streams_unknown_on,
            ["replica 10.0.0.4:8156 (a kas too old to count a token's streams)"]
        );
    }

    fn view(id: i64, connected: bool) -> AgentView {
        serde_json::from_value(serde_json::json!({
            "id": id, "project": "g/p", "name": format!("a{id}"), "connected": connected,
            "idle_tunnels": u32::from(connected),
            "connections": if connected {
                serde_json::json!([{"connected_since": "2026-11-26T00:00:00Z",
                    "agent_version": "v", "pod_name": "p", "pod_namespace": "n",
                    "remote_addr": "r", "streams": 1}])
            } else { serde_json::json!([]) },
        }))
        .unwrap()
    }

    #[test]
    fn an_agent_connected_to_another_replica_shows_as_connected() {
        let others = OtherLists {
            lists: vec![(
                "10.0.0.4:8156".into(),
                vec![view(1, false), view(2, true), view(3, false)],
            )],
            unreachable: Vec::new(),
        };
        let merged = merge_agents(vec![view(1, true), view(2, false)], others);
        let ids: Vec<(i64, bool, usize)> = merged
            .iter()
            .map(|a| (a.id, a.connected, a.connections.len()))
            .collect();
        assert_eq!(ids, vec![(1, true, 1), (2, true, 1), (3, false, 0)]);
        assert!(merged.iter().all(|a| !a.connection_unknown()));
    }

    #[test]
    fn an_agent_not_seen_connected_while_a_replica_did_not_answer_is_unknown_not_offline() {
        let others = OtherLists {
            lists: Vec::new(),
            unreachable: vec!["replica 10.0.0.6:8156".into()],
        };
        let merged = merge_agents(vec![view(1, true), view(2, false)], others);
        let states: Vec<String> = merged.iter().map(AgentView::connection_state).collect();
        assert_eq!(
            states,
            [
                "connected",
                "unknown (replica 10.0.0.6:8156 did not answer)"
            ]
        );
    }
}
