//! Server half of the reverse tunnel: the registry of connected agents and their idle streams,
//! from which kas's modules take a tunnel to reach an agent.
//!
//! Every `Connect` stream an agent opens is authenticated, announces what it serves and then
//! waits, idle, in the [`Registry`]. A module that needs the agent calls
//! [`Registry::get_tunnel`], which hands it one idle stream for its request alone (waiting up to
//! a timeout for one to appear) and then [`Tunnel::request`] turns it into a byte pipe.

mod answer;
mod auth;
mod known;
mod registry;
mod resend;
mod service;

pub use answer::{AnswerFirst, AnswerWatch, Answered};
pub use auth::{AgentIdentity, AuthError, Authenticator};
pub use registry::{
    AgentConnections, ConnectionInfo, DEFAULT_MAX_STREAMS_PER_AGENT, Lease, MAX_RESENDS, OpenError,
    Presence, Registry, RegistryError, RegistryStats, Tunnel, TunnelConn, TunnelError,
};
pub use resend::{Io, RESEND_MAX_BYTES, Reopen, Reopened, Resending};
pub use service::{TunnelService, authenticate_metadata, authenticate_request};

/// The boxed future type [`Authenticator`] methods return.
pub mod service_future {
    pub use crate::auth::BoxFuture;
}
