//! kas, the agent server, as a library: the binary in `main.rs` parses the command line and
//! calls [`server::start`] (serve) or `tether_kas_api::AdminClient` (admin commands against a
//! running kas).
//!
//! Modules are wired explicitly here; each gets its dependencies injected.

pub mod agent_kube;
pub mod agent_memory;
pub mod api;
pub mod api_routing;
pub mod auth;
pub mod caller_slots;
pub mod cluster;
pub mod config;
pub mod config_durations;
pub mod config_in_force;
pub mod config_replicas;
pub mod connections;
pub mod database;
pub mod diff;
pub mod followed;
pub mod fresh;
pub mod install;
pub mod jwks;
pub mod kubeproxy;
pub mod limits;
pub mod listener;
pub mod live_access;
pub mod modules;
pub mod operate;
mod outbound;
pub mod peer_stream;
pub mod peers;
pub mod preview;
pub mod projects;
pub mod revocation;
pub mod server;
pub mod store_metrics;
pub mod token_use;
pub mod unreported;
pub mod validated_tokens;
pub mod webui;
