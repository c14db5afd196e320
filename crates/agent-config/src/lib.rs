//! The agent's `config.yaml`: schema, defaults and validation, as pure functions.
//!
//! kas validates a new file before sending it; each agent module validates its own part again.
