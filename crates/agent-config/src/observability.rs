//! `observability:` — the agent's log levels, changeable at run time through the file.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::check::null_as_default;

/// The `observability` section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observability {
    /// Log levels.
    #[serde(default, deserialize_with = "null_as_default")]
    pub logging: Logging,
}

/// `observability.logging`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// Level of the agent's own logs; default `info`.
    #[serde(default)]
    pub level: LogLevel,
    /// Level of the gRPC library's logs; default `error`, since it is chatty below that.
    #[serde(default = "grpc_default")]
    pub grpc_level: LogLevel,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            level: LogLevel::default(),
            grpc_level: grpc_default(),
        }
    }
}

const fn grpc_default() -> LogLevel {
    LogLevel::Error
}

/// A log level as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// `info`.
    #[default]
    Info,
    /// `debug`.
    Debug,
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

impl LogLevel {
    /// The name used in the file, which is also what `tracing`'s filters accept.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Observability {
    /// Every value the types can hold is valid; kept so each section has the same interface.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
