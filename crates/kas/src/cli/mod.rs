//! The admin commands: arguments (`args`), how they print (`output`), and one module per
//! command group. `main` only dispatches.

pub mod agent;
pub mod args;
pub mod local;
pub mod man;
pub mod outage;
pub mod output;
pub mod project;
pub mod reconcile;
pub mod tokens;

use std::path::PathBuf;

use anyhow::{Context, Result};
use kas::config::Config;
use tether_kas_api::AdminClient;

use args::Cli;

pub fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

pub fn admin_client(cli: &Cli, cfg: &Config) -> Result<AdminClient> {
    let url = cli.api_url.clone().unwrap_or_else(|| default_api_url(cfg));
    let file = cli
        .admin_token_file
        .clone()
        .unwrap_or_else(|| cfg.admin_token_file());
    let ca = cli.api_ca_file.as_ref().or(cfg.api.ca_file.as_ref());
    Ok(AdminClient::from_token_file(&url, &file)?.trusting(ca.map(PathBuf::as_path))?)
}

/// The internal API's URL from the configuration: https when its listener has TLS, and a
/// wildcard bind address (0.0.0.0, ::) reached on loopback.
pub fn default_api_url(cfg: &Config) -> String {
    let l = &cfg.api.listen;
    let mut a = l.address();
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if l.certificate_file.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{a}")
}

/// The agent listener's URL from the configuration, for install commands: grpcs:// when it has
/// TLS. A loopback or wildcard address is what agents in a cluster cannot reach; `--kas-address`
/// is then the way, which the printed commands cannot guess.
pub fn default_agent_url(cfg: &Config) -> String {
    let l = &cfg.agent.listen;
    let scheme = if l.certificate_file.is_some() {
        "grpcs"
    } else {
        "grpc"
    };
    format!("{scheme}://{}", l.address())
}

/// Whether agents elsewhere could dial `listen` as it is: not a wildcard (the address to bind,
/// not to dial) nor loopback (this machine only).
pub fn reachable_by_agents(listen: std::net::SocketAddr) -> bool {
    !(listen.ip().is_unspecified() || listen.ip().is_loopback())
}

/// Writes a file only its owner may read (it holds a token).
pub fn write_secret_file(path: &std::path::Path, content: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode on open; narrow it too.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .and_then(|()| f.write_all(content))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_and_loopback_listen_addresses_are_not_for_agents_to_dial() {
        let reachable = |a: &str| reachable_by_agents(a.parse().expect("address"));
        assert!(!reachable("0.0.0.0:8150"));
        assert!(!reachable("[::]:8150"));
        assert!(!reachable("127.0.0.1:8150"));
        assert!(reachable("10.1.2.3:8150"));
    }
}
