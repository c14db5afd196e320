//! The cluster as the logged-in person sees it: namespaces, Deployments, Pods and Events,
//! read through the agent's tunnel with the person's impersonated identity, authorized by the
//! agent's `user_access` on the Kubernetes API proxy's own path. The admin-token login has no
//! identity in the cluster and browses nothing.

use std::collections::BTreeSet;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;
use tether_kubeproxy_server::{AccessLevel, Membership, MembershipKind, UserIdentity};

use super::html::{Html, Table, badge, link, url_part};
use super::session::Person;
use super::{LoggedIn, WebState, api_error, html_response};

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Where {
    pub agent: Option<i64>,
    pub ns: Option<String>,
}

/// The person's identity for `user_access` on agent `agent_id`: each group of their login is
/// a group membership with the configured role.
pub fn identity(person: &Person, agent_id: i64, level: AccessLevel) -> UserIdentity {
    UserIdentity {
        username: person.username.clone(),
        token_agent_id: agent_id,
        memberships: person
            .groups
            .iter()
            .map(|g| Membership {
                kind: MembershipKind::Group,
                path: g.clone(),
                id: None,
                access_level: level,
            })
            .collect(),
    }
}

/// Why a request was refused: the `message` of a Kubernetes `Status`, or the body's text.
pub fn refusal(code: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    format!("{}: {message}", code.as_u16())
}

fn items(list: &Value) -> &[Value] {
    list.get("items")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn n(v: &Value, path: &[&str]) -> i64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// Names of the items of a list.
pub fn names(list: &Value) -> Vec<String> {
    items(list)
        .iter()
        .map(|i| s(i, &["metadata", "name"]).to_owned())
        .collect()
}

/// Deployments: name, ready/desired, whether Available.
pub fn deployment_rows(list: &Value) -> Vec<Vec<Html>> {
    items(list)
        .iter()
        .map(|d| {
            let available = d
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| s(c, &["type"]) == "Available"))
                .map_or("Unknown", |c| s(c, &["status"]));
            let state = if available == "True" {
                "Available"
            } else {
                "Unavailable"
            };
            vec![
                Html::text(s(d, &["metadata", "name"])),
                Html::text(&format!(
                    "{}/{}",
                    n(d, &["status", "readyReplicas"]),
                    n(d, &["spec", "replicas"])
                )),
                badge(state),
            ]
        })
        .collect()
}

/// Pods: name, phase, restarts, node.
pub fn pod_rows(list: &Value) -> Vec<Vec<Html>> {
    items(list)
        .iter()
        .map(|p| {
            let restarts: i64 = p
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |c| c.iter().map(|c| n(c, &["restartCount"])).sum());
            vec![
                Html::text(s(p, &["metadata", "name"])),
                badge(s(p, &["status", "phase"])),
                Html::text(&restarts.to_string()),
                Html::text(s(p, &["spec", "nodeName"])),
            ]
        })
        .collect()
}

/// Events, newest first: when, type, reason, object, message.
pub fn event_rows(list: &Value) -> Vec<Vec<Html>> {
    let mut events: Vec<(&str, &Value)> = items(list)
        .iter()
        .map(|e| {
            let when = [
                s(e, &["lastTimestamp"]),
                s(e, &["eventTime"]),
                s(e, &["metadata", "creationTimestamp"]),
            ]
            .into_iter()
            .find(|t| !t.is_empty())
            .unwrap_or("");
            (when, e)
        })
        .collect();
    // RFC 3339 UTC times compare as text, to the second (enough to read a namespace's story).
    events.sort_by(|a, b| b.0.cmp(a.0));
    events
        .into_iter()
        .map(|(when, e)| {
            vec![
                Html::text(when),
                Html::text(s(e, &["type"])),
                Html::text(s(e, &["reason"])),
                Html::text(&format!(
                    "{}/{}",
                    s(e, &["involvedObject", "kind"]),
                    s(e, &["involvedObject", "name"])
                )),
                Html::text(s(e, &["message"])),
            ]
        })
        .collect()
}

pub async fn page(
    State(st): State<WebState>,
    Extension(who): Extension<LoggedIn>,
    Query(at): Query<Where>,
) -> Response {
    let viewer = who.viewer();
    let body = match (&who.session.person, at.agent) {
        (None, _) => Html::raw(
            "<p role=\"status\">You are logged in with the admin token, which has no identity in \
             the cluster: log out and log in with your identity provider to browse the cluster \
             as yourself.</p>",
        ),
        (Some(_), None) => match crate::api::list_agents(State(st.api.clone()), None).await {
            Ok(list) => {
                let mut b =
                    Html::raw("<p>Choose an agent: you see its cluster as yourself.</p><ul>");
                for a in list.0 {
                    let item = link(
                        &format!("/browse?agent={}", a.id),
                        &format!("{} ({})", a.name, a.project),
                    );
                    b.push(Html::wrap("li", "", item));
                }
                b.push(Html::raw("</ul>"));
                b
            }
            Err(e) => return api_error(e, &who),
        },
        (Some(person), Some(agent)) => cluster(&st, person, agent, at.ns.as_deref()).await,
    };
    html_response(
        StatusCode::OK,
        super::html::page("Cluster", Some(&viewer), body),
    )
}

/// What the person sees through `agent`: its namespaces, or one namespace's workloads.
async fn cluster(st: &WebState, person: &Person, agent: i64, ns: Option<&str>) -> Html {
    let Some(proxy) = &st.proxy else {
        return Html::raw("<p class=\"error\">The Kubernetes API proxy is not running.</p>");
    };
    let level = st
        .oidc
        .as_ref()
        .map_or(AccessLevel::Developer, |o| o.groups_access_level());
    let get = |path: String| {
        let id = identity(person, agent, level);
        async move { proxy.get_as_person(agent, id, &path).await }
    };
    let mut out = Html::wrap(
        "p",
        "",
        Html::text(&format!(
            "Seen as {} through agent {agent}, with your own rights in the cluster.",
            person.username
        )),
    );
    match ns {
        None => out.push(namespaces(st, agent, get).await),
        Some(ns) => out.push(namespace(ns, get).await),
    }
    out
}

async fn namespaces<F, Fut>(st: &WebState, agent: i64, get: F) -> Html
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (StatusCode, bytes::Bytes)>,
{
    let (code, body) = get("/api/v1/namespaces".into()).await;
    let mut note = Html::default();
    let visible: Vec<String> = if code.is_success() {
        names(&serde_json::from_slice(&body).unwrap_or_default())
    } else {
        // Listing every namespace is often not allowed: try the ones the agent manages.
        note = Html::wrap(
            "p",
            "role=\"status\"",
            Html::text(&format!(
                "You may not list every namespace ({}); these are the namespaces of the agent's objects that you may read.",
                refusal(code, &body)
            )),
        );
        let mut seen = Vec::new();
        for candidate in managed_namespaces(st, agent).await {
            let (c, _) = get(format!("/api/v1/namespaces/{}", url_part(&candidate))).await;
            if c.is_success() {
                seen.push(candidate);
            }
        }
        seen
    };
    let rows = visible
        .iter()
        .map(|n| {
            vec![link(
                &format!("/browse?agent={agent}&ns={}", url_part(n)),
                n,
            )]
        })
        .collect();
    note.push(
        Table {
            id: "namespaces",
            caption: "Namespaces",
            headers: &["Name"],
            rows,
            empty: "none you may read",
        }
        .render(),
    );
    note
}

/// The namespaces of the objects in the agent's sync reports.
async fn managed_namespaces(st: &WebState, agent: i64) -> BTreeSet<String> {
    super::pages::sync_views(st, agent)
        .await
        .map(|(syncs, _, _)| {
            syncs
                .iter()
                .flat_map(|s| s.objects.iter().map(|o| o.namespace.clone()))
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// One kind of a namespace's page: table id and caption, columns, list path, rows.
struct Part<'a> {
    id: &'a str,
    caption: &'a str,
    headers: &'a [&'a str],
    path: String,
    rows: fn(&Value) -> Vec<Vec<Html>>,
}

async fn namespace<F, Fut>(ns: &str, get: F) -> Html
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (StatusCode, bytes::Bytes)>,
{
    let e = url_part(ns);
    let parts = [
        Part {
            id: "deployments",
            caption: "Deployments",
            headers: &["Name", "Ready", "State"],
            path: format!("/apis/apps/v1/namespaces/{e}/deployments"),
            rows: deployment_rows,
        },
        Part {
            id: "pods",
            caption: "Pods",
            headers: &["Name", "Phase", "Restarts", "Node"],
            path: format!("/api/v1/namespaces/{e}/pods"),
            rows: pod_rows,
        },
        Part {
            id: "events",
            caption: "Events",
            headers: &["When", "Type", "Reason", "Object", "Message"],
            path: format!("/api/v1/namespaces/{e}/events"),
            rows: event_rows,
        },
    ];
    let mut out = Html::wrap("h2", "", Html::text(&format!("Namespace {ns}")));
    for Part {
        id,
        caption,
        headers,
        path,
        rows,
    } in parts
    {
        let (code, body) = get(path).await;
        if !code.is_success() {
            out.push(Html::wrap(
                "p",
                "class=\"error\"",
                Html::text(&format!("{caption}: {}", refusal(code, &body))),
            ));
            continue;
        }
        let list: Value = serde_json::from_slice(&body).unwrap_or_default();
        out.push(
            Table {
                id,
                caption,
                headers,
                rows: rows(&list),
                empty: "none",
            }
            .render(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn groups_become_group_memberships_for_user_access() {
        let p = Person {
            subject: "s".into(),
            username: "alice".into(),
            groups: vec!["people".into()],
        };
        let id = identity(&p, 3, AccessLevel::Developer);
        assert_eq!(id.username, "alice");
        assert_eq!(id.token_agent_id, 3);
        assert_eq!(id.memberships[0].kind, MembershipKind::Group);
        assert_eq!(id.memberships[0].path, "people");
    }

    #[test]
    fn a_refusal_names_the_status_message() {
        let body = br#"{"kind":"Status","message":"namespaces is forbidden: User \"x\""}"#;
        assert_eq!(
            refusal(StatusCode::FORBIDDEN, body),
            "403: namespaces is forbidden: User \"x\""
        );
        assert_eq!(refusal(StatusCode::BAD_GATEWAY, b"down"), "502: down");
    }

    #[test]
    fn workloads_become_rows() {
        let deployments = json!({"items": [{"metadata": {"name": "nginx"}, "spec": {"replicas": 1},
            "status": {"readyReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}}]});
        let rows = deployment_rows(&deployments);
        assert_eq!(rows[0][0].as_str(), "nginx");
        assert_eq!(rows[0][1].as_str(), "1/1");
        assert!(rows[0][2].as_str().contains("badge good\">Available"));
        let pods = json!({"items": [{"metadata": {"name": "<p>"}, "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "containerStatuses": [{"restartCount": 2}, {"restartCount": 1}]}}]});
        let rows = pod_rows(&pods);
        assert_eq!(rows[0][0].as_str(), "&lt;p&gt;");
        assert_eq!(rows[0][2].as_str(), "3");
        let events = json!({"items": [{"type": "Normal", "reason": "Scheduled", "message": "ok",
            "lastTimestamp": "2026-11-26T10:00:00Z", "involvedObject": {"kind": "Pod", "name": "p"}}]});
        let rows = event_rows(&events);
        assert_eq!(rows[0][3].as_str(), "Pod/p");
        let two = json!({"items": [{"lastTimestamp": "2026-11-26T10:00:00Z", "reason": "old"},
            {"lastTimestamp": "2026-11-26T11:00:00Z", "reason": "new"}]});
        assert_eq!(event_rows(&two)[0][2].as_str(), "new", "newest first");
        assert_eq!(
            names(&json!({"items": [{"metadata": {"name": "dude"}}]})),
            ["dude"]
        );
        assert!(names(&json!({})).is_empty());
    }
}
