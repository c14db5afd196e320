//! Agent half of the reverse tunnel: keeps a pool of idle streams open to kas, each serving
//! one routed request at a time, so every request has its own HTTP/2 flow control (a stream
//! whose request ended cleanly on both sides waits for the next one).
//!
//! [`Pool::run`] is the whole module: it opens `Connect` streams (never more than
//! `max_streams`), keeps at least `min_idle` of them idle, opens `scale_up_step` at a time when
//! requests take the idle ones, closes idle streams above the minimum after `idle_timeout`, and
//! backs off exponentially with jitter while kas is unreachable or refuses the token.

mod backoff;
mod cluster_id;
mod pool;
mod token;

pub use backoff::Backoff;
pub use cluster_id::ClusterId;
pub use pool::{
    AgentConn, AgentMeta, BoxFuture, ConnState, EchoHandler, Handler, Pool, PoolConfig, PoolStats,
    QuietWatch, is_refusal, status_text,
};
pub use token::{AgentToken, TokenError};
