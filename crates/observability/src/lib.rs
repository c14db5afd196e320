//! Logs and the observability endpoint, shared by kas and agentk.
//!
//! Logs are JSON lines on stderr with the keys users of GitLab's agent know: `level`, `time`,
//! `msg`, `mod_name`, plus every field of the event and of its spans (`agent_id`, ...). The level
//! can change while running (agentk follows `observability.logging.level` from its config).
//! For local runs, [`LogFormat::Text`] writes the same content as `TIME LEVEL msg key=value`.

pub mod endpoint;
mod limited;
mod logging;

pub use endpoint::{Endpoint, register_build_info, serve};
pub use limited::{LIMITS, Limits, serve_limited};
pub use logging::{
    BadFormat, JsonLayer, LogFormat, LogHandle, init_logging, init_logging_as, parse_level,
};
