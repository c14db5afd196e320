//! Agent half of GitOps: decode manifests, apply them with server-side apply, keep the
//! inventory, prune what left Git and report each object's status.
