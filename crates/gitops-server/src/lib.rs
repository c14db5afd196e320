//! Server half of GitOps: select manifest files by glob at a commit, stream them to agents and
//! keep the agents' sync reports.
//!
//! - [`ManifestGlob`] / [`literal_prefix`]: `paths[].glob` with doublestar semantics (pure).
//! - [`select_manifests`]: the files of a manifest project at a commit, read through a
//!   [`tether_git_source::Mirror`], within [`Limits`]; failures are [`SelectError`]s that say
//!   whether they are the user's to fix ([`SelectError::is_user_error`]).
//! - [`manifests_at`]: what a project sends at a commit — the glob selection, or a Kustomize
//!   directory or Helm chart rendered by [`Renderer`] in a sandbox ([`render`]).
//! - [`GitOpsModule`]: the `GitOps` gRPC service kas adds to its agent listener (streaming each
//!   new commit's selection in chunks, taking sync reports), built from explicit
//!   [`GitOpsDeps`]; and [`SyncStates`], the reports kept in the store for `kas agent status`,
//!   whose outcome and statuses read as [`ReportedOutcome`] / [`ReportedStatus`].
//! - [`PreviewSource`]: the same selection at a ref the agent does not follow, for
//!   `kas agent diff` ([`ref_candidates`]: what a `--ref` names).
//! - [`ProjectAccess`]: an agent reads and reports on only the manifest projects its
//!   configuration in force lists ([`lists`], pure).
//! - [`Controls`]: kas's directives to open streams beyond new commits: re-sync now
//!   ([`ResyncId`], `kas agent reconcile`) and suspension changes (`kas agent suspend`).

mod access;
pub mod control;
pub mod glob;
mod lag;
mod preview;
pub mod render;
mod reports;
mod select;
mod service;

pub use access::{ProjectAccess, is_commit_id, lists};
pub use control::{Controls, ResyncId};
pub use glob::{InvalidGlob, ManifestGlob, literal_prefix};
// The admin API's words for outcomes and statuses; they live with the API types.
pub use preview::{PreviewError, PreviewFiles, PreviewSource, ref_candidates};
pub use render::{
    ChartCredential, ChartRepoConfig, ManifestSource, RemoteBaseConfig, RenderConfig, RenderError,
    RenderSpec, Renderer,
};
pub use reports::{SyncStates, Unrecorded};
pub use select::{Limits, ManifestFile, SelectError, Selection, manifests_at, select_manifests};
pub use service::{GitOpsDeps, GitOpsModule, GitOpsService};
pub use tether_kas_api::{ReportedOutcome, ReportedStatus};
