//! The server side of `kas agent diff` (`POST /api/v1/agents/{id}/diff`): for each manifest
//! project of the agent's configuration in force, the files at the ref (the `--ref` for the
//! named project, the configured one for the others) selected as the GitOps stream would, then
//! previewed against the cluster through the agent's tunnel, as its ServiceAccount, with
//! server-side dry run ([`tether_gitops_agent::preview`]). Nothing is written to the cluster.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::Value;
use tether_agent_config::{GitRef as ConfigRef, ManifestProject};
use tether_configuration_server::ConfigStates;
use tether_git_source::{GitRef, Sources};
use tether_gitops_agent::ObjRef;
use tether_gitops_agent::preview::{Change, ObjectChange, preview};
use tether_gitops_agent::sync::{Settings, Syncer};
use tether_gitops_agent::takeover::DriftManagers;
use tether_gitops_server::{Limits, ManifestSource, PreviewSource, ref_candidates};
use tether_kas_api::{DiffChange, DiffRequest, DiffView, ObjectDiffView, ProjectDiffView};
use tether_kubeproxy_agent::{AccessAs, RequestContext, RoutedRequest};
use tether_protocol::render::Cluster;
use tether_store::Store;
use tether_tunnel_server::Registry;

use crate::api::{ApiError, ApiState};

/// What previews need from the rest of kas; shared by the admin API and the Kubernetes API
/// proxy (where a CI job or a person asks with their own identity).
#[derive(Debug, Clone)]
pub struct Previews {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub sources: Arc<Sources>,
    pub config_states: Arc<ConfigStates>,
    /// Bounds of one manifest selection (as for the GitOps stream).
    pub limits: Limits,
    /// Renders Kustomize and Helm projects (shared with the GitOps stream, so its cache too).
    pub renderer: Arc<tether_gitops_server::Renderer>,
    /// How long a preview waits for the fetch it asks for.
    pub fetch_timeout: Duration,
    /// How long each request waits for a tunnel of the agent.
    pub tunnel_wait: Duration,
    /// The replica holding the agent's tunnels, when it is another one (`peers:`): a CI job's
    /// preview through the Kubernetes API proxy may reach any replica.
    pub peers: Option<crate::peers::Peers>,
}

/// Why a preview was refused as a whole, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: StatusCode,
    pub message: String,
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        ApiError::new(r.code, r.message)
    }
}

/// The admin API's handler: the preview runs as the agent's own ServiceAccount, as the
/// synchronization it previews would.
pub async fn diff(
    State(st): State<ApiState>,
    Path(agent_id): Path<i64>,
    Json(req): Json<DiffRequest>,
) -> Result<Json<DiffView>, ApiError> {
    let as_agent = RoutedRequest {
        access_as: AccessAs::Agent,
        context: RequestContext {
            agent_id,
            ..RequestContext::default()
        },
    };
    Ok(Json(st.previews.diff(agent_id, as_agent, &req).await?))
}

impl Previews {
    /// Where the agent's configuration in force is read (the store, for an agent another
    /// replica holds: this replica's memory of it may be old).
    fn in_force(&self) -> crate::config_in_force::InForce<'_> {
        crate::config_in_force::InForce {
            configs: &self.config_states,
            store: self.store.as_ref(),
            registry: &self.registry,
            several: self.peers.is_some(),
        }
    }

    /// Previews `req` for agent `agent_id`, its cluster read (and dry-run applied to) with the
    /// identity `routed` through the agent's tunnel.
    pub async fn diff(
        &self,
        agent_id: i64,
        routed: RoutedRequest,
        req: &DiffRequest,
    ) -> Result<DiffView, Refused> {
        let refused = |code, message: String| Refused { code, message };
        let config = self
            .in_force()
            .wait(agent_id, self.tunnel_wait)
            .await
            .ok_or_else(|| refused(StatusCode::CONFLICT, format!("kas knows no configuration of agent {agent_id}: is it registered and has it connected?")))?;
        let projects = &config.gitops.manifest_projects;
        let target = target_project(projects, req.project.as_deref())
            .map_err(|e| refused(StatusCode::BAD_REQUEST, e))?;
        self.connected(agent_id, &routed).await?;
        let client = self
            .agent_client(agent_id, &routed, self.tunnel_wait)
            .map_err(|e| refused(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let source = PreviewSource {
            agent_id,
            store: self.store.as_ref(),
            sources: &self.sources,
            limits: &self.limits,
            renderer: &self.renderer,
            fetch_wait: self.fetch_timeout,
        };
        let agent_namespace = self.agent_namespace(agent_id);
        let drift_managers = config.gitops.drift_managers();
        let mut views = Vec::with_capacity(projects.len());
        for (i, p) in projects.iter().enumerate() {
            let (candidates, shown) = if i == target {
                (ref_candidates(&req.git_ref), req.git_ref.clone())
            } else {
                configured_ref(p)
            };
            let at = ProjectAt {
                agent_id,
                agent_namespace: agent_namespace.clone(),
                drift_managers: &drift_managers,
                project: p,
                candidates: &candidates,
                shown,
            };
            views.push(project_diff(&source, client.clone(), at).await);
        }
        let view = DiffView {
            agent_id,
            projects: views,
        };
        tracing::info!(agent_id, git_ref = %req.git_ref, changes = view.has_changes(), errors = view.has_errors(), "Previewed a synchronization (diff)");
        Ok(view)
    }
}

/// How long a preview waits for an agent that is not connected before it is refused: one
/// reconnecting (agentk or kas restarting) is back within seconds, and one that is not coming
/// must be said promptly — each project's first request waited for a tunnel (20 s) in turn
/// before failing with a reason less plain than this.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

impl Previews {
    /// A client of the agent's cluster as `routed`, each request waiting up to `wait` for a
    /// tunnel (here or on the replica holding the agent).
    fn agent_client(
        &self,
        agent_id: i64,
        routed: &RoutedRequest,
        wait: Duration,
    ) -> Result<kube::Client, tether_kubeproxy_agent::MetadataError> {
        let reach = crate::agent_kube::Reach {
            registry: Arc::clone(&self.registry),
            peers: self.peers.clone(),
            wait,
        };
        crate::agent_kube::client(reach, agent_id, routed)
    }

    /// Refuses the preview (503) when no tunnel of the agent comes within [`CONNECT_WAIT`],
    /// here or on another replica, asking its API server's version (readable by anyone). Any
    /// other failure is left to each project's preview to say.
    async fn connected(&self, agent_id: i64, routed: &RoutedRequest) -> Result<(), Refused> {
        let Ok(client) = self.agent_client(agent_id, routed, CONNECT_WAIT.min(self.tunnel_wait))
        else {
            return Ok(());
        };
        match client.apiserver_version().await {
            Err(e) if no_tunnel(&e) => Err(Refused {
                code: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "agent {agent_id} is not connected (waited {} for it): nothing can carry the preview",
                    humantime::format_duration(CONNECT_WAIT.min(self.tunnel_wait))
                ),
            }),
            _ => Ok(()),
        }
    }

    /// agentk's namespace as its connection to this replica tells (empty when it is connected
    /// to another one): where `post_build.substitute_from` references without a namespace are.
    fn agent_namespace(&self, agent_id: i64) -> String {
        self.registry
            .connections()
            .into_iter()
            .filter(|a| a.agent_id == agent_id)
            .flat_map(|a| a.connections)
            .map(|c| c.pod_namespace)
            .find(|ns| !ns.is_empty())
            .unwrap_or_default()
    }
}

/// Whether a request through the tunnel failed for want of one (the agent not connected).
fn no_tunnel(e: &kube::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(crate::agent_kube::ReachError::NoTunnel(
            tether_tunnel_server::RegistryError::AgentNotConnected(_),
        )) = err.downcast_ref::<crate::agent_kube::ReachError>()
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Which manifest project entry `--ref` is of: the one `named` (path, case-insensitive, or
/// numeric id as in the configuration, followed by `#name` for a named entry), or the only
/// one.
pub fn target_project(projects: &[ManifestProject], named: Option<&str>) -> Result<usize, String> {
    let listed = || {
        projects
            .iter()
            .map(ManifestProject::entry_key)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (named, projects.len()) {
        (_, 0) => Err("the agent's configuration lists no manifest projects".to_owned()),
        (Some(n), _) => projects
            .iter()
            .position(|p| p.entry_key().eq_ignore_ascii_case(n.trim()))
            .ok_or_else(|| {
                format!(
                    "the agent's configuration has no manifest project {n} (it has {})",
                    listed()
                )
            }),
        (None, 1) => Ok(0),
        (None, count) => Err(format!(
            "the agent has {count} manifest projects ({}): name the one the ref is of with --project",
            listed()
        )),
    }
}

/// The ref a manifest project follows, and how to show it.
fn configured_ref(p: &ManifestProject) -> (Vec<GitRef>, String) {
    match &p.git_ref {
        None => (vec![GitRef::DefaultBranch], "default branch".to_owned()),
        Some(ConfigRef::Branch(b)) => (vec![GitRef::Branch(b.clone())], b.clone()),
        Some(ConfigRef::Tag(t)) => (vec![GitRef::Tag(t.clone())], t.clone()),
        Some(ConfigRef::Commit(c)) => (vec![GitRef::Commit(c.clone())], c.clone()),
    }
}

/// One manifest project to preview, at a ref.
struct ProjectAt<'a> {
    agent_id: i64,
    agent_namespace: String,
    /// The agent's `gitops.drift_managers`: the fields the sync takes over, and so reverts.
    drift_managers: &'a [String],
    project: &'a ManifestProject,
    candidates: &'a [GitRef],
    shown: String,
}

/// Why a Helm project's ref was not resolved when the agent's cluster could not be read.
const CLUSTER_UNREAD: &str = "the agent's cluster could not be read first";

async fn project_diff(
    source: &PreviewSource<'_>,
    client: kube::Client,
    at: ProjectAt<'_>,
) -> ProjectDiffView {
    let p = at.project;
    let mut view = ProjectDiffView {
        project: p.entry_key(),
        git_ref: at.shown,
        commit: None,
        unresolved: None,
        error: None,
        warnings: Vec::new(),
        objects: Vec::new(),
    };
    // The chart sees the agent's cluster, as agentk tells kas when it asks for a rendering.
    let cluster = match p.helm {
        None => Cluster::default(),
        Some(_) => match Syncer::new(client.clone()).cluster().await {
            Ok((kube_version, api_versions)) => Cluster {
                kube_version,
                api_versions,
            },
            Err(e) => {
                // The ref is fine as far as anyone knows: it was never looked up.
                view.unresolved = Some(CLUSTER_UNREAD.to_owned());
                view.error = Some(format!(
                    "could not read the agent's cluster (its Kubernetes version and API groups, which the chart is rendered for): {e}"
                ));
                return view;
            }
        },
    };
    let files = match ManifestSource::from_project(p, &cluster) {
        Ok(manifests) => {
            source
                .files_at(&p.id.to_string(), at.candidates, &manifests)
                .await
        }
        Err(e) => {
            view.error = Some(e.to_string());
            return view;
        }
    };
    let files = match files {
        Ok(f) => f,
        Err(e) => {
            // A commit whose files could not be selected is still the one tried: named, so
            // the user knows which commit to fix.
            view.commit = e.commit().map(str::to_owned);
            view.error = Some(e.to_string());
            return view;
        }
    };
    view.commit = Some(files.commit.to_hex());
    view.warnings = files.warnings;
    let files: Vec<(String, Vec<u8>)> =
        files.files.into_iter().map(|f| (f.path, f.bytes)).collect();
    let settings = Settings {
        agent_namespace: at.agent_namespace,
        drift_managers: DriftManagers::new(at.drift_managers.to_vec()),
        ..Settings::for_project(at.agent_id, p)
    };
    match preview(client, &settings, &files).await {
        Ok(changes) => view.objects = changes.iter().map(object_view).collect(),
        Err(e) => view.error = Some(e.to_string()),
    }
    view
}

/// `Kind/namespace/name` (`Kind/name` when cluster-scoped), as `flux diff` names objects.
pub fn title(obj: &ObjRef) -> String {
    match &obj.namespace {
        Some(ns) => format!("{}/{ns}/{}", obj.kind, obj.name),
        None => format!("{}/{}", obj.kind, obj.name),
    }
}

/// One object's change as the API shows it, with the unified diff of its YAML.
pub fn object_view(c: &ObjectChange) -> ObjectDiffView {
    let name = title(&c.obj);
    let (change, diff, error) = match &c.change {
        Change::Created { after } => (DiffChange::Created, unified(None, Some(after), &name), None),
        Change::Changed { before, after } => (
            DiffChange::Changed,
            unified(Some(before), Some(after), &name),
            None,
        ),
        Change::Unchanged => (DiffChange::Unchanged, String::new(), None),
        Change::Pruned { before } => (DiffChange::Pruned, unified(Some(before), None, &name), None),
        Change::Failed { error } => (DiffChange::Failed, String::new(), Some(error.clone())),
    };
    ObjectDiffView {
        group: c.obj.group.clone(),
        kind: c.obj.kind.clone(),
        namespace: c.obj.namespace.clone().unwrap_or_default(),
        name: c.obj.name.clone(),
        change,
        diff,
        error,
    }
}

/// The unified diff (3 lines of context) from `before` to `after` as YAML; an absent side is
/// empty, so a created object is all `+` and a pruned one all `-`.
pub fn unified(before: Option<&Value>, after: Option<&Value>, name: &str) -> String {
    let (a, b) = (
        before.map(yaml).unwrap_or_default(),
        after.map(yaml).unwrap_or_default(),
    );
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{name} (live)"), &format!("{name} (after sync)"))
        .to_string()
}

fn yaml(v: &Value) -> String {
    serde_saphyr::to_string(v)
        .or_else(|_| serde_json::to_string_pretty(v).map(|s| s + "\n"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;
    use tether_agent_config::ProjectRef;

    fn deployment(replicas: u32) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "app"},
               "spec": {"replicas": replicas, "template": {"metadata": {"labels": {"app": "web"}}}}})
    }

    fn web() -> ObjRef {
        ObjRef::new("apps", "Deployment", Some("app"), "web")
    }

    #[test]
    fn a_changed_object_shows_only_the_changed_lines_and_their_context() {
        let view = object_view(&ObjectChange {
            obj: web(),
            change: Change::Changed {
                before: deployment(1),
                after: deployment(3),
            },
        });
        assert_eq!(view.change, DiffChange::Changed);
        assert!(
            view.diff.starts_with(
                "--- Deployment/app/web (live)\n+++ Deployment/app/web (after sync)\n"
            )
        );
        let changed: Vec<&str> = view
            .diff
            .lines()
            .skip(2)
            .filter(|l| l.starts_with(['-', '+']))
            .collect();
        assert_eq!(changed, ["-  replicas: 1", "+  replicas: 3"]);
    }

    #[test]
    fn created_and_pruned_objects_are_all_added_or_all_removed() {
        let created = object_view(&ObjectChange {
            obj: web(),
            change: Change::Created {
                after: deployment(1),
            },
        });
        let body: Vec<&str> = created.diff.lines().skip(3).collect();
        assert!(!body.is_empty() && body.iter().all(|l| l.starts_with('+')));
        let pruned = object_view(&ObjectChange {
            obj: ObjRef::new("", "Namespace", None, "old"),
            change: Change::Pruned {
                before: json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "old"}}),
            },
        });
        assert_eq!(pruned.namespace, "");
        assert!(pruned.diff.starts_with("--- Namespace/old (live)"));
        assert!(pruned.diff.lines().skip(3).all(|l| l.starts_with('-')));
    }

    #[test]
    fn unchanged_and_failed_objects_have_no_diff() {
        let failed = object_view(&ObjectChange {
            obj: web(),
            change: Change::Failed {
                error: "forbidden".into(),
            },
        });
        assert_eq!(failed.change, DiffChange::Failed);
        assert_eq!(failed.error.as_deref(), Some("forbidden"));
        assert!(failed.diff.is_empty());
        let same = object_view(&ObjectChange {
            obj: web(),
            change: Change::Unchanged,
        });
        assert!(same.diff.is_empty() && same.error.is_none());
    }

    #[test]
    fn the_ref_is_of_the_named_project_or_the_only_one() {
        let one = [ManifestProject::new(ProjectRef::Path("g/app".into()))];
        let two = [
            ManifestProject::new(ProjectRef::Path("g/app".into())),
            ManifestProject::new(ProjectRef::Numeric(42)),
        ];
        assert_eq!(target_project(&one, None), Ok(0));
        assert_eq!(target_project(&two, Some("42")), Ok(1));
        assert_eq!(target_project(&two, Some("G/App")), Ok(0));
        let several = target_project(&two, None).unwrap_err();
        assert!(
            several.contains("--project") && several.contains("g/app, 42"),
            "{several}"
        );
        let mut named = ManifestProject::new(ProjectRef::Path("g/app".into()));
        named.name = Some("apps".into());
        let three = [two[0].clone(), two[1].clone(), named];
        assert_eq!(target_project(&three, Some("g/app#apps")), Ok(2));
        assert_eq!(target_project(&three, Some("g/app")), Ok(0));
        let unknown = target_project(&two, Some("g/other")).unwrap_err();
        assert!(unknown.contains("no manifest project g/other"), "{unknown}");
        assert!(target_project(&[], None).is_err());
    }
}
