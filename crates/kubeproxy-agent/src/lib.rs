//! Agent half of Kubernetes API access: replay requests routed by kas against the
//! kube-apiserver with the agent's ServiceAccount and the configured impersonation.
//!
//! The pure parts live here:
//!
//! - [`sanitize_request_headers`] — what of the client's request may reach the API server
//!   (no client impersonation, no hop-by-hop headers except an upgrade's, no kas credentials);
//! - [`impersonation_headers`] — the `Impersonate-*` headers for the `access_as` kas chose,
//!   with GitLab's identity strings (listed in `IDENTITIES.md`);
//! - [`RoutedRequest`] — the tunnel metadata kas sends and agentk reads (one contract, decoded
//!   strictly: missing or malformed metadata is an error, never the agent's own rights).

mod headers;
mod impersonation;
mod metadata;

pub use headers::{Refused, sanitize_request_headers, status_json};
pub use impersonation::{
    AccessAs, CiJobContext, EnvironmentContext, IMPERSONATE_EXTRA_PREFIX, IMPERSONATE_GROUP,
    IMPERSONATE_UID, IMPERSONATE_USER, ImpersonationError, RequestContext, Roles, UserContext,
    escape_extra_key, impersonation_headers,
};
pub use metadata::{META_ACCESS_AS, META_CONTEXT, MetadataError, RoutedRequest};
