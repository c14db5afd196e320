//! The pages' content from the admin API's views, I/O-free: what the API returns is what the
//! pages show.

use tether_kas_api::{
    AgentView, ConfigView, ObjectView, ProgressView, ProjectView, ReportedStatus, SyncView,
    TokenView, UnreportedView,
};

use super::html::{Html, Table, badge, esc, hidden, link, post_form, text_field, url_part};

/// Which objects of a sync the agent page shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ObjectFilter {
    /// Only this status (`Current`, `Failed`, ...); empty: every status.
    pub status: String,
    /// Only objects whose kind, namespace, name or message contains this (any case).
    pub q: String,
}

impl ObjectFilter {
    pub fn matches(&self, o: &ObjectView) -> bool {
        let status_ok = self.status.is_empty() || o.status.as_str() == self.status;
        let q = self.q.trim().to_lowercase();
        let text_ok = q.is_empty()
            || [&o.kind, &o.namespace, &o.name, &o.message]
                .iter()
                .any(|f| f.to_lowercase().contains(&q));
        status_ok && text_ok
    }

    /// The query string that selects this filter (for the live stream's URL).
    pub fn query(&self) -> String {
        format!("status={}&q={}", url_part(&self.status), url_part(&self.q))
    }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn agent_href(id: i64) -> String {
    format!("/agents/{id}")
}

/// Which replicas hold the agent's connections: "this kas" for the one serving the page
/// (`own`, its peers address; every connection of a kas without peers), "replica ADDRESS" for
/// another; "—" when not connected.
fn holders(a: &AgentView, own: &str) -> String {
    let mut names: Vec<String> = a
        .connections
        .iter()
        .map(|c| {
            if c.replica.is_empty() || c.replica == own {
                "this kas".to_owned()
            } else {
                format!("replica {}", c.replica)
            }
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "—".to_owned()
    } else {
        names.join(", ")
    }
}

/// The agents table; `own` is the serving replica's peers address (empty without peers).
pub fn agents(list: &[AgentView], own: &str) -> Html {
    let rows = list
        .iter()
        .map(|a| {
            let c = a.connections.first();
            let cell = |f: fn(&tether_kas_api::ConnectionView) -> &str| {
                Html::text(c.map(f).unwrap_or("—"))
            };
            let (commit, refusal) = match &a.config {
                Some(cfg) => (
                    Html::text(short(&cfg.commit)),
                    match (&cfg.error, &cfg.error_commit) {
                        (Some(e), Some(at)) => Html::text(&format!("{}: {e}", short(at))),
                        (Some(e), None) => Html::text(e),
                        _ => Html::text("—"),
                    },
                ),
                None => (Html::text("—"), Html::text("—")),
            };
            vec![
                link(&agent_href(a.id), &a.name),
                Html::text(&a.project),
                if a.connected {
                    badge("connected")
                } else if a.connection_unknown() {
                    badge("unknown")
                } else {
                    badge("offline")
                },
                cell(|c| &c.connected_since),
                cell(|c| &c.agent_version),
                Html::text(
                    &c.map(|c| format!("{}/{}", c.pod_namespace, c.pod_name))
                        .unwrap_or_else(|| "—".into()),
                ),
                Html::text(&holders(a, own)),
                commit,
                refusal,
            ]
        })
        .collect();
    let mut out = Html::default();
    // Every agent names the same replicas: those that did not answer this listing.
    if let Some(missing) = list.iter().find(|a| !a.unreachable_replicas.is_empty()) {
        out.push(incomplete(&format!(
            "Incomplete: {} did not answer. An agent shown as unknown may be connected there.",
            missing.unreachable_replicas.join(", ")
        )));
    }
    out.push(
        Table {
            id: "agents",
            caption: "Agents",
            headers: &[
                "Name",
                "Project",
                "State",
                "Connected since",
                "Version",
                "Pod",
                "Replica",
                "Configuration commit",
                "Refusal",
            ],
            rows,
            empty: "none registered yet",
        }
        .render(),
    );
    out
}

/// One manifest project's last sync and its objects (filtered), then each entry of the
/// configuration in force without a report and why, as the live stream sends it.
pub fn syncs(
    syncs: &[SyncView],
    progress: &[ProgressView],
    unreported: &[UnreportedView],
    filter: &ObjectFilter,
) -> Html {
    let mut out = Html::default();
    for p in progress {
        out.push(Html::wrap(
            "p",
            "class=\"progress\" role=\"status\"",
            Html::text(&p.unrecorded_note().map_or_else(
                || {
                    format!(
                        "Sync of {} at commit {} in progress: {} objects, {} current, {} failed{}",
                        p.project_id,
                        short(&p.commit_id),
                        p.objects,
                        p.current,
                        p.failed,
                        p.pending_note()
                    )
                },
                |note| format!("{}: {note}", p.project_id),
            )),
        ));
    }
    if syncs.is_empty() {
        out.push(Html::raw("<p class=\"empty\">No sync reported yet.</p>"));
    }
    for s in syncs {
        out.push(sync(s, filter));
    }
    for u in unreported {
        // As the CLI: an entry that cannot synchronize is an error, a pending one is not.
        let class = if u.state.is_unhealthy() {
            "unreported error"
        } else {
            "unreported progress"
        };
        out.push(Html::wrap(
            "p",
            &format!("class=\"{class}\""),
            Html::text(&format!("{} — {}: {}", u.project_id, u.state, u.reason)),
        ));
    }
    out
}

fn sync(s: &SyncView, filter: &ObjectFilter) -> Html {
    let outcome = match s.outcome {
        tether_kas_api::ReportedOutcome::Succeeded => "Succeeded",
        tether_kas_api::ReportedOutcome::Failed => "Failed",
        tether_kas_api::ReportedOutcome::Waiting => "Waiting",
        tether_kas_api::ReportedOutcome::Superseded => "Superseded",
        tether_kas_api::ReportedOutcome::Unknown => "Unknown",
    };
    let mut head = Html::text(&format!(
        "{} — commit {} applied {} ",
        s.project_id,
        short(&s.commit_id),
        s.finished_at
    ));
    head.push(badge(outcome));
    let mut body = Html::wrap(
        "h3",
        &format!("data-commit=\"{}\"", esc(&s.commit_id)),
        head,
    );
    if !s.error.is_empty() {
        body.push(Html::wrap("p", "class=\"error\"", Html::text(&s.error)));
    }
    if !s.chart_version.is_empty() {
        let version = format!("chart version {}", s.chart_version);
        body.push(Html::wrap("p", "class=\"chart\"", Html::text(&version)));
    }
    for w in &s.warnings {
        body.push(Html::wrap("p", "class=\"warning\"", Html::text(w)));
    }
    let rows = s
        .objects
        .iter()
        .filter(|o| filter.matches(o))
        .map(|o| {
            vec![
                Html::text(&if o.group.is_empty() {
                    o.kind.clone()
                } else {
                    format!("{}.{}", o.kind, o.group)
                }),
                Html::text(&o.namespace),
                Html::text(&o.name),
                badge(o.status.as_str()),
                // Its write failed: the message is the API server's refusal.
                Html::text(&if o.not_applied {
                    format!("not applied: {}", o.message)
                } else {
                    o.message.clone()
                }),
            ]
        })
        .collect();
    body.push(
        Table {
            id: &format!("objects-{}", s.project_id),
            caption: "Objects",
            headers: &["Kind", "Namespace", "Name", "Status", "Message"],
            rows,
            empty: "none match",
        }
        .render(),
    );
    Html::wrap("section", "class=\"sync\"", body)
}

/// The status filter form (GET: works without the script).
pub fn filter_form(agent_id: i64, f: &ObjectFilter) -> Html {
    let mut options = String::from("<option value=\"\">any</option>");
    for st in ReportedStatus::ALL {
        let sel = if f.status == st.as_str() {
            " selected"
        } else {
            ""
        };
        options.push_str(&format!(
            "<option value=\"{0}\"{sel}>{0}</option>",
            st.as_str()
        ));
    }
    Html::assembled(format!(
        "<form method=\"get\" action=\"{}\" class=\"filter\" role=\"search\">\
         <label for=\"f-status\">Status</label> <select id=\"f-status\" name=\"status\">{options}</select> \
         <label for=\"f-q\">Contains</label> <input id=\"f-q\" name=\"q\" value=\"{}\"> \
         <button type=\"submit\">Filter</button></form>",
        esc(&agent_href(agent_id)),
        esc(&f.q)
    ))
}

/// What the agent page shows besides its syncs.
#[derive(Debug)]
pub struct AgentPage<'a> {
    pub agent: &'a AgentView,
    pub syncs: &'a [SyncView],
    pub progress: &'a [ProgressView],
    /// The entries of the configuration in force without a report.
    pub unreported: &'a [UnreportedView],
    /// The agent's `ci_access` and `user_access` in force, as JSON (none: not known yet).
    pub access: Option<String>,
    pub tokens: &'a [TokenView],
    pub filter: &'a ObjectFilter,
    /// The session's CSRF token when the viewer may act (admin); `None` hides every button.
    pub csrf: Option<&'a str>,
    /// The serving replica's peers address (empty without peers): who "this kas" is.
    pub own: &'a str,
}

/// The whole agent page body.
pub fn agent(p: &AgentPage<'_>) -> Html {
    let a = p.agent;
    let mut out = agents(std::slice::from_ref(a), p.own);
    if let Some(csrf) = p.csrf {
        out.push(agent_actions(a.id, p.syncs, csrf));
    }
    out.push(Html::raw("<h2 id=\"syncs-h\">Manifest projects</h2>"));
    out.push(filter_form(a.id, p.filter));
    out.push(Html::assembled(format!(
        "<div id=\"syncs\" aria-live=\"polite\" aria-labelledby=\"syncs-h\" data-live=\"/agents/{}/live?{}\">",
        a.id,
        esc(&p.filter.query())
    )));
    out.push(syncs(p.syncs, p.progress, p.unreported, p.filter));
    out.push(Html::raw("</div><h2>Recent events</h2>"));
    out.push(events(a, p.syncs));
    out.push(Html::raw("<h2>Access rules in force</h2>"));
    out.push(match &p.access {
        Some(json) => Html::wrap("pre", "class=\"access\"", Html::text(json)),
        None => Html::raw("<p class=\"empty\">No configuration in force yet.</p>"),
    });
    out.push(Html::raw("<h2>Agent tokens</h2>"));
    out.push(tokens(p.tokens, p.csrf));
    out
}

fn agent_actions(agent_id: i64, syncs: &[SyncView], csrf: &str) -> Html {
    let base = agent_href(agent_id);
    let mut out = Html::raw("<h2>Actions</h2><div class=\"actions\">");
    out.push(post_form(
        &format!("{base}/reconcile"),
        csrf,
        Html::default(),
        "Reconcile now",
    ));
    // Suspensions are per project: one pair of buttons for all entries of a project listed
    // more than once (`group/app#infra`, `group/app#apps`).
    let mut projects: Vec<&str> = syncs
        .iter()
        .map(|s| tether_agent_config::split_entry_key(&s.project_id).0)
        .collect();
    projects.dedup();
    for p in projects {
        let project = hidden("project", p);
        let mut fields = project.clone();
        fields.push(Html::assembled(
            "<input type=\"hidden\" name=\"reason\" value=\"from the web UI\">".into(),
        ));
        out.push(post_form(
            &format!("{base}/suspend"),
            csrf,
            fields,
            &format!("Suspend {p}"),
        ));
        out.push(post_form(
            &format!("{base}/resume"),
            csrf,
            project,
            &format!("Resume {p}"),
        ));
    }
    out.push(Html::raw("</div>"));
    out
}

/// "sync of P at C finished" or "… failed: why", of one of entry `s`'s syncs.
fn sync_event(s: &SyncView, commit: &str, error: &str) -> String {
    if error.is_empty() {
        format!("sync of {} at {} finished", s.project_id, short(commit))
    } else {
        format!(
            "sync of {} at {} failed: {error}",
            s.project_id,
            short(commit)
        )
    }
}

/// The newest things kas knows happened to the agent, newest first: its syncs' outcomes,
/// a refused configuration, suspensions.
fn events(a: &AgentView, syncs: &[SyncView]) -> Html {
    // Each entry's last sync, and those it replaced shortly before (kept in short with it): a
    // sync that pruned, replaced a moment later by a re-sync, is an event too.
    let mut list: Vec<(String, Html)> = syncs
        .iter()
        .flat_map(|s| {
            let last = (s.finished_at.clone(), sync_event(s, &s.commit_id, &s.error));
            let earlier = s.earlier.iter().map(|e| {
                let mut what = sync_event(s, &e.commit_id, &e.error);
                if e.pruned > 0 {
                    what.push_str(&format!(" ({} pruned)", e.pruned));
                }
                (e.finished_at.clone(), what)
            });
            std::iter::once(last).chain(earlier)
        })
        .map(|(at, what)| (at, Html::text(&what)))
        .collect();
    for s in &a.suspensions {
        let what = format!(
            "{} suspended by {}: {}",
            s.project.as_deref().unwrap_or("every manifest project"),
            s.suspended_by,
            s.reason
        );
        list.push((s.suspended_at.clone(), Html::text(&what)));
    }
    if let Some(cfg) = &a.config
        && let Some(e) = &cfg.error
    {
        let at = cfg.error_commit.as_deref().map(short).unwrap_or("?");
        list.push((
            String::new(),
            Html::text(&format!("configuration at {at} refused: {e}")),
        ));
    }
    if let Some(note) = a.config.as_ref().and_then(ConfigView::unstored_note) {
        list.push((String::new(), Html::text(&note)));
    }
    if let Some(e) = &a.config_fetch_error {
        let what = format!(
            "configuration project fetch failing: {e} (a config.yaml pushed since is not fetched)"
        );
        list.push((String::new(), Html::text(&what)));
    }
    list.sort_by(|x, y| y.0.cmp(&x.0));
    let rows = list
        .into_iter()
        .map(|(at, what)| vec![Html::text(if at.is_empty() { "—" } else { &at }), what])
        .collect();
    Table {
        id: "events",
        caption: "Recent events",
        headers: &["When", "What"],
        rows,
        empty: "none yet",
    }
    .render()
}

/// RFC 3339 of Unix seconds.
fn unix_time(secs: i64) -> String {
    crate::api::rfc3339(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
    )
}

/// A listing's warning that some replicas did not answer.
fn incomplete(text: &str) -> Html {
    Html::wrap("p", "class=\"warning\" role=\"alert\"", Html::text(text))
}

fn tokens(list: &[TokenView], csrf: Option<&str>) -> Html {
    let mut out = Html::default();
    // Every token names the same replicas: those that did not answer this listing.
    if let Some(missing) = list.iter().find(|t| !t.streams_unknown_on.is_empty()) {
        out.push(incomplete(&format!(
            "Streams incomplete: {} did not answer; streams open there are not counted.",
            missing.streams_unknown_on.join(", ")
        )));
    }
    let rows = list
        .iter()
        .map(|t| {
            let state = match (t.revoked_at, csrf) {
                (Some(_), _) => badge("revoked"),
                (None, Some(csrf)) => post_form(
                    &format!("/tokens/{}/revoke?agent={}", t.id, t.agent_id),
                    csrf,
                    Html::default(),
                    &format!("Revoke token {}", t.id),
                ),
                (None, None) => badge("active"),
            };
            vec![
                Html::text(&t.id.to_string()),
                Html::text(&t.description),
                Html::text(&unix_time(t.created_at)),
                Html::text(&t.last_used_at.map_or_else(|| "never".to_owned(), unix_time)),
                Html::text(&t.open_streams.to_string()),
                state,
            ]
        })
        .collect();
    let table = Table {
        id: "tokens",
        caption: "Tokens",
        headers: &[
            "Id",
            "Description",
            "Created",
            "Last used",
            "Streams",
            "State",
        ],
        rows,
        empty: "none",
    }
    .render();
    out.push(table);
    out
}

/// The form registering an agent (admins only).
pub fn register_form(csrf: &str) -> Html {
    let mut fields = text_field("project", "Configuration project", "");
    fields.push(Html::raw(" "));
    fields.push(text_field("name", "Agent name", ""));
    let mut out = Html::raw("<h2>Install a new agent</h2>");
    out.push(post_form("/agents/register", csrf, fields, "Register"));
    out
}

/// The projects table.
pub fn projects(
    list: &[ProjectView],
    deliveries: &dyn Fn(i64) -> Vec<(String, &'static str)>,
) -> Html {
    let rows = list
        .iter()
        .map(|p| {
            let state = match (&p.fetch_error, &p.refusal) {
                (Some(_), _) => badge("error"),
                (None, Some(_)) => badge("refused"),
                (None, None) if p.commit.is_some() => badge("ok"),
                (None, None) => badge("not fetched"),
            };
            let errors = match (&p.fetch_error, &p.refusal) {
                (Some(e), _) => e.clone(),
                (None, Some(r)) => format!("commit {} refused: {}", short(&r.commit), r.reason),
                (None, None) => "—".into(),
            };
            let hooks = if p.webhooks {
                let d = deliveries(p.id);
                if d.is_empty() {
                    "configured, none received".to_owned()
                } else {
                    d.iter()
                        .map(|(at, outcome)| format!("{at} {outcome}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            } else {
                "not configured".to_owned()
            };
            vec![
                Html::text(&p.path),
                Html::text(p.remote.as_deref().unwrap_or("—")),
                state,
                Html::text(p.commit.as_deref().map(short).unwrap_or("—")),
                Html::text(p.last_fetch.as_deref().unwrap_or("never")),
                Html::text(&format!("{} / {}", p.fetches, p.fetch_failures)),
                Html::text(&errors),
                Html::text(&hooks),
            ]
        })
        .collect();
    Table {
        id: "projects",
        caption: "Projects",
        headers: &[
            "Path",
            "Remote",
            "Mirror",
            "Commit",
            "Last fetch",
            "Fetches / failures",
            "Errors",
            "Webhook deliveries",
        ],
        rows,
        empty: "none",
    }
    .render()
}

/// The page shown once after registering: the token and the install commands.
pub fn registered(agent_id: i64, token: &str, install: &str) -> Html {
    Html::assembled(format!(
        "<p role=\"alert\">Agent {agent_id} registered. Store this token now: it is shown only \
         once, kas keeps only its hash.</p>\
         <p><label for=\"token\">Token</label> <input id=\"token\" readonly size=\"70\" value=\"{}\"></p>\
         <h2>Install</h2><pre id=\"install\">{}</pre><p><a href=\"/agents/{agent_id}\">Go to the agent</a></p>",
        esc(token),
        esc(install)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_kas_api::{ConfigView, ReportedOutcome};

    fn object(ns: &str, status: ReportedStatus, message: &str) -> ObjectView {
        ObjectView {
            status,
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: ns.into(),
            name: "nginx".into(),
            message: message.into(),
            not_applied: false,
        }
    }

    fn seed_sync() -> SyncView {
        SyncView {
            outcome: ReportedOutcome::Failed,
            project_id: "group/manifests".into(),
            commit_id: "0123456789abcdef".into(),
            error: "1 resources failed".into(),
            finished_at: "2026-11-26T11:00:00Z".into(),
            dry_run: false,
            warnings: vec![],
            resync_id: 0,
            chart_version: String::new(),
            fetch_error: String::new(),
            newer_commit: String::new(),
            newer_since: None,
            suspended: false,
            streams: None,
            earlier: Vec::new(),
            objects: vec![
                object(
                    "dude",
                    ReportedStatus::Current,
                    "Deployment is available. Replicas: 1",
                ),
                object(
                    "naww",
                    ReportedStatus::Failed,
                    "deployments.apps is forbidden: <User>",
                ),
            ],
        }
    }

    #[test]
    fn the_filter_selects_by_status_and_text() {
        let s = seed_sync();
        let f = ObjectFilter {
            status: "Failed".into(),
            q: String::new(),
        };
        let kept: Vec<_> = s.objects.iter().filter(|o| f.matches(o)).collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].namespace, "naww");
        let f = ObjectFilter {
            status: String::new(),
            q: "AVAILABLE".into(),
        };
        assert!(f.matches(&s.objects[0]) && !f.matches(&s.objects[1]));
        assert!(ObjectFilter::default().matches(&s.objects[1]));
        assert_eq!(
            ObjectFilter {
                status: "Failed".into(),
                q: "a b".into()
            }
            .query(),
            "status=Failed&q=a%20b"
        );
    }

    #[test]
    fn a_sync_shows_outcome_objects_and_escaped_messages() {
        let h = syncs(&[seed_sync()], &[], &[], &ObjectFilter::default());
        let s = h.as_str();
        assert!(s.contains("data-commit=\"0123456789abcdef\""));
        assert!(s.contains("group/manifests — commit 0123456789ab applied"));
        assert!(s.contains("<span class=\"badge bad\">Failed</span>"));
        assert!(s.contains("forbidden: &lt;User&gt;"), "{s}");
        assert!(s.contains("<span class=\"badge good\">Current</span>"));
        assert!(!s.contains("<User>"));
    }

    #[test]
    fn entries_without_a_report_are_shown_with_state_and_escaped_reason() {
        let u = |id: &str, state, reason: &str| UnreportedView {
            project_id: id.into(),
            state,
            reason: reason.into(),
        };
        let rows = [
            u(
                "group/new",
                tether_kas_api::EntryState::Pending,
                "first sync not reported yet",
            ),
            u(
                "group/ghost",
                tether_kas_api::EntryState::UnknownProject,
                "\"group/ghost\" <not registered>",
            ),
        ];
        let h = syncs(&[], &[], &rows, &ObjectFilter::default());
        let s = h.as_str();
        assert!(
            s.contains("<p class=\"unreported progress\">group/new — pending: first sync not reported yet</p>"),
            "{s}"
        );
        assert!(
            s.contains("<p class=\"unreported error\">group/ghost — unknown project: "),
            "{s}"
        );
        assert!(
            s.contains("&lt;not registered&gt;") && !s.contains("<not registered>"),
            "{s}"
        );
    }

    #[test]
    fn progress_is_announced() {
        let p = ProgressView {
            project_id: "group/manifests".into(),
            commit_id: "abc".into(),
            resync_id: 0,
            objects: 3,
            current: 1,
            failed: 0,
            pending: None,
            unrecorded: None,
        };
        let h = syncs(&[], &[p], &[], &ObjectFilter::default());
        assert!(h.as_str().contains(
            "Sync of group/manifests at commit abc in progress: 3 objects, 1 current, 0 failed"
        ));
    }

    fn agent_view() -> AgentView {
        AgentView {
            id: 7,
            project: "group/config".into(),
            name: "seed<1>".into(),
            connected: false,
            idle_tunnels: 0,
            connections: vec![],
            config: Some(ConfigView {
                commit: "c0ffee".into(),
                file: ".gitlab/agents/seed/config.yaml".into(),
                error: Some("bad <yaml>".into()),
                error_commit: Some("badbad".into()),
                updated_at: 0,
                unstored: None,
            }),
            suspensions: vec![],
            unreachable_replicas: vec![],
            last_seen: None,
            config_fetch_error: None,
        }
    }

    /// A sync that pruned, replaced a moment later by a re-sync, stays among the events (only
    /// each entry's last sync was shown).
    #[test]
    fn recent_events_keep_the_syncs_an_entrys_last_one_replaced() {
        let mut s = seed_sync();
        s.earlier = vec![tether_kas_api::EarlierView {
            commit_id: "fedcba9876543210".into(),
            outcome: ReportedOutcome::Succeeded,
            error: String::new(),
            finished_at: "2026-11-26T10:59:58Z".into(),
            resync_id: 0,
            current: 1,
            not_current: 0,
            not_applied: 0,
            pruned: 3,
            left_in_place: 0,
        }];
        let h = events(&agent_view(), &[s]);
        let html = h.as_str();
        let last = html.find("sync of group/manifests at 0123456789ab failed");
        let replaced = html.find("sync of group/manifests at fedcba987654 finished (3 pruned)");
        assert!(
            matches!((last, replaced), (Some(l), Some(r)) if l < r),
            "both, newest first: {html}"
        );
    }

    #[test]
    fn the_agents_table_links_each_agent_and_shows_refusals() {
        let h = agents(&[agent_view()], "r1");
        let s = h.as_str();
        assert!(s.contains("<a href=\"/agents/7\">seed&lt;1&gt;</a>"));
        assert!(s.contains("badbad: bad &lt;yaml&gt;"));
        assert!(s.contains(">offline<"), "the CLI's word: {s}");
        assert!(!s.contains("Incomplete"));
    }

    fn connection(replica: &str) -> tether_kas_api::ConnectionView {
        tether_kas_api::ConnectionView {
            connected_since: String::new(),
            agent_version: String::new(),
            pod_name: "agentk-0".into(),
            pod_namespace: "agents".into(),
            cluster_id: String::new(),
            remote_addr: String::new(),
            streams: 2,
            replica: replica.into(),
        }
    }

    /// An operator drains the replica the page names: it must be the one holding the
    /// connection, not the one serving the page (both replicas showed their own id).
    #[test]
    fn the_replica_column_names_the_replica_holding_each_connection() {
        let mut a = agent_view();
        a.connected = true;
        a.connections = vec![connection("10.0.0.2:8156")];
        let cell = |a: &AgentView, own: &str| holders(a, own);
        assert_eq!(cell(&a, "10.0.0.1:8156"), "replica 10.0.0.2:8156");
        assert_eq!(cell(&a, "10.0.0.2:8156"), "this kas");
        a.connections.push(connection("10.0.0.1:8156"));
        assert_eq!(cell(&a, "10.0.0.1:8156"), "replica 10.0.0.2:8156, this kas");
        // A kas without peers holds every connection it lists.
        a.connections = vec![connection("")];
        assert_eq!(cell(&a, ""), "this kas");
        a.connections.clear();
        a.connected = false;
        assert_eq!(cell(&a, "10.0.0.1:8156"), "—");
        let page = agents(&[agent_view()], "10.0.0.1:8156");
        assert!(!page.as_str().contains("this kas"), "{}", page.as_str());
    }

    #[test]
    fn the_agent_page_says_when_its_configuration_in_force_is_not_yet_stored() {
        let mut a = agent_view();
        if let Some(c) = a.config.as_mut() {
            c.unstored = Some(tether_kas_api::UnstoredView {
                since: 1,
                error: "disk full".into(),
                stored_commit: Some("0ld0ld".into()),
            });
        }
        let h = events(&a, &[]);
        let s = h.as_str();
        assert!(s.contains("commit c0ffee, not yet stored"), "{s}");
        assert!(s.contains("still use commit 0ld0ld"), "{s}");
        assert!(
            !events(&agent_view(), &[])
                .as_str()
                .contains("not yet stored")
        );
    }

    #[test]
    fn agents_a_replica_could_not_be_asked_about_show_as_unknown_under_a_banner() {
        let a = AgentView {
            unreachable_replicas: vec!["replica 10.0.0.6:8156".into()],
            ..agent_view()
        };
        let h = agents(&[a], "r1");
        let s = h.as_str();
        assert!(
            s.contains("role=\"alert\">Incomplete: replica 10.0.0.6:8156 did not answer."),
            "{s}"
        );
        assert!(s.contains(">unknown<"), "{s}");
        assert!(!s.contains(">offline<"), "{s}");
    }

    #[test]
    fn viewers_get_no_buttons_and_admins_do() {
        let a = agent_view();
        let syncs = [seed_sync()];
        let tokens = [token_view(0)];
        let filter = ObjectFilter::default();
        let mut p = AgentPage {
            own: "",
            agent: &a,
            syncs: &syncs,
            progress: &[],
            unreported: &[],
            access: None,
            tokens: &tokens,
            filter: &filter,
            csrf: None,
        };
        let viewer = agent(&p);
        assert!(
            !viewer.as_str().contains("method=\"post\""),
            "{}",
            viewer.as_str()
        );
        p.csrf = Some("t");
        let admin = agent(&p);
        for b in [
            "Reconcile now",
            "Suspend group/manifests",
            "Resume group/manifests",
            "Revoke token 3",
        ] {
            assert!(admin.as_str().contains(b), "{b}");
        }
    }

    /// Active token 3 of agent 7 with `open_streams`.
    fn token_view(open_streams: usize) -> TokenView {
        crate::api_routing::token_view(3, 7, open_streams)
    }

    #[test]
    fn token_streams_a_replica_did_not_say_are_flagged() {
        let mut token = token_view(2);
        assert!(
            !tokens(std::slice::from_ref(&token), None)
                .as_str()
                .contains("alert")
        );
        token.streams_unknown_on = vec!["replica 10.0.0.6:8156".into()];
        let s = tokens(&[token], None);
        assert!(
            s.as_str().contains(
                "role=\"alert\">Streams incomplete: replica 10.0.0.6:8156 did not answer"
            ),
            "{}",
            s.as_str()
        );
    }
}
