//! Agent half of GitOps: decode manifests, apply them with server-side apply, keep the
//! inventory, prune what left Git and report each object's status.
//!
//! The pure (I/O-free) rules live in the modules below; [`sync`] is the one module that talks
//! to the cluster, wiring them together (with [`status_watch`], which watches objects an apply
//! left in progress while the sync goes on). Objects are plain `serde_json::Value`s. One sync, in order:
//!
//! 1. [`decode::decode_file`] every fetched file — any error aborts the sync (and with it
//!    pruning: an incomplete set must never drive deletions);
//! 2. [`plan::set_default_namespace`], then refuse [`plan::duplicates`];
//! 3. check ownership of existing objects ([`inventory::may_take_over`]), mark ours
//!    ([`inventory::set_owner`]) and stamp the digest ([`drift::stamp_digest`]);
//! 4. apply [`plan::apply_stages`] in order, skipping objects [`drift::is_up_to_date`] says
//!    need no write, emitting [`events`];
//! 5. write the inventory ([`inventory::encode`]) when its set changed, and prune
//!    [`prune::to_prune`];
//! 6. follow [`status::compute_status`] (watched from the apply answer on, polled as the
//!    fallback) until [`status::sync_outcome`] is no longer waiting
//!    or `reconcile_timeout` passes; the sync failed unless every object is Current, pruned or
//!    left in place as no longer ours ([`prune::Skip`]; [`sync::SyncError`]).
//!
//! [`preview`] runs steps 1–3 with server-side dry run and reads what step 5 would prune,
//! for `kas agent diff`: what a sync would change, changing nothing.

mod apis;
pub mod decode;
pub mod drift;
pub mod events;
pub mod inventory;
pub mod kube_events;
pub mod lease;
pub mod metrics;
pub mod object_ref;
pub mod plan;
pub mod preview;
pub mod prune;
pub mod record;
pub mod status;
mod status_watch;
pub mod substitute;
pub mod sync;
pub mod takeover;
pub mod variables;

pub use decode::{DecodeError, Manifest, decode_file};
pub use inventory::{InventoryError, OwnershipConflict};
pub use object_ref::{ObjRef, ParseObjRefError};
pub use status::{Outcome, ResourceStatus, Status, SyncState, compute_status, sync_outcome};
pub use sync::{ObjectState, SyncError, SyncStop};
