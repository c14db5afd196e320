//! `POST /api/v1/agents/{id}/diff`: what a synchronization of a ref would change in the
//! agent's cluster (`kas agent diff`).

use serde::{Deserialize, Serialize};

/// Path, under the Kubernetes API proxy's prefix, where a CI job (or a person) gets a
/// kubeconfig for every agent it may use.
pub const PROXY_KUBECONFIG_PATH: &str = "/.tether/kubeconfig";
/// Path, under the Kubernetes API proxy's prefix, of `kas agent diff` for CI jobs and people:
/// `POST` a [`DiffRequest`] with the proxy's credential (`Bearer ci:<agent id>:<ID token>`),
/// get a [`DiffView`] previewed with the caller's identity.
pub const PROXY_DIFF_PATH: &str = "/.tether/diff";

/// What to preview.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiffRequest {
    /// A branch, a tag or a full commit id of the manifest project.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The manifest project the ref is of (path or numeric id, as in the agent's
    /// configuration); may be left out when the agent has exactly one. The agent's other
    /// manifest projects are previewed at the ref they follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// The preview of every manifest project of the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiffView {
    pub agent_id: i64,
    pub projects: Vec<ProjectDiffView>,
}

/// One manifest project's preview.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProjectDiffView {
    /// As in the agent's configuration.
    pub project: String,
    /// The ref previewed (the `--ref`, or the one the configuration follows).
    pub git_ref: String,
    /// The commit it resolved to; `None` when it did not.
    pub commit: Option<String>,
    /// Why the ref was not resolved when the ref is not the cause (the preview failed before
    /// resolving it: the agent's cluster could not be read); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
    /// Why the project could not be previewed (bad ref, unreadable file, inventory, …): no
    /// object of it is listed then.
    pub error: Option<String>,
    /// What kas warned about the selection (as for a sync).
    #[serde(default)]
    pub warnings: Vec<String>,
    pub objects: Vec<ObjectDiffView>,
}

/// What a synchronization would do to one object.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DiffChange {
    Created,
    Changed,
    Unchanged,
    Pruned,
    /// The synchronization would fail for this object (`error` says why).
    Failed,
}

impl DiffChange {
    /// Whether the cluster would change.
    pub fn is_change(self) -> bool {
        matches!(
            self,
            DiffChange::Created | DiffChange::Changed | DiffChange::Pruned
        )
    }
}

/// One object of a preview.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectDiffView {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub change: DiffChange,
    /// A unified diff of the object's YAML, live (`---`) to what it would be (`+++`), without
    /// the fields the cluster sets by itself; empty when unchanged or failed.
    #[serde(default)]
    pub diff: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DiffView {
    /// Whether any object would be created, changed or pruned.
    pub fn has_changes(&self) -> bool {
        self.projects.iter().any(ProjectDiffView::has_changes)
    }

    /// Whether a project or an object could not be previewed.
    pub fn has_errors(&self) -> bool {
        self.projects.iter().any(ProjectDiffView::has_errors)
    }

    /// The projects whose preview answers the request: with `project` (`--project`) only that
    /// one, named as kas matches it (the entry's key, case-insensitive); the others are
    /// previewed at the ref they follow, as context, and are not what was asked about.
    /// Without, every one (kas then previews a single project). Pure.
    pub fn judged(&self, project: Option<&str>) -> Vec<&ProjectDiffView> {
        self.projects
            .iter()
            .filter(|p| project.is_none_or(|n| p.project.eq_ignore_ascii_case(n.trim())))
            .collect()
    }
}

impl ProjectDiffView {
    /// Whether any object of the project would be created, changed or pruned.
    pub fn has_changes(&self) -> bool {
        self.objects.iter().any(|o| o.change.is_change())
    }

    /// Whether the project or one of its objects could not be previewed.
    pub fn has_errors(&self) -> bool {
        self.error.is_some() || self.objects.iter().any(|o| o.change == DiffChange::Failed)
    }
}
