//! Server half of GitOps: select manifest files by glob at a commit and stream them to agents.
//!
//! - [`ManifestGlob`] / [`literal_prefix`]: `paths[].glob` with doublestar semantics (pure).
//! - [`select_manifests`]: the files of a manifest project at a commit, read through a
//!   [`tether_git_source::Mirror`], within [`Limits`]; failures are [`SelectError`]s that say
//!   whether they are the user's to fix ([`SelectError::is_user_error`]).
//! - [`fingerprint`]: whether an agent's manifests actually changed between two commits.
//!
//! Streaming the selection to agents (chunking) is left to the protocol layer, which defines the
//! message shapes.

pub mod glob;
mod select;

pub use glob::{InvalidGlob, ManifestGlob, literal_prefix};
pub use select::{Limits, ManifestFile, SelectError, Selection, fingerprint, select_manifests};
