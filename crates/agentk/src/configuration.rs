//! Agent half of agent configuration: keeps the configuration stream to kas open, validates
//! every new configuration (each module's part), applies the log level, and publishes the
//! configuration in force to the other modules. An invalid configuration is refused whole: the
//! last good one stays in force.

use std::sync::Arc;
use std::time::Duration;

use tether_agent_config::{AgentConfig, LogLevel};
use tether_observability::LogHandle;
use tether_protocol::agent_configuration::ConfigurationRequest;
use tether_protocol::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use tether_protocol::metadata;
use tether_tunnel_agent::{AgentMeta, Backoff};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tracing::field;

/// A configuration in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub agent_id: i64,
    pub project_path: String,
    pub commit_id: String,
    pub config: AgentConfig,
}

fn level_filter(l: LogLevel) -> tracing_subscriber_level::LevelFilter {
    use tracing_subscriber_level::LevelFilter;
    match l {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
    }
}

/// `tracing`'s level filter, as the log handle takes it.
mod tracing_subscriber_level {
    pub use tracing::level_filters::LevelFilter;
}

/// Why a received configuration was not put in force.
pub fn check(resp_json: &str) -> Result<AgentConfig, String> {
    let config: AgentConfig =
        serde_json::from_str(resp_json).map_err(|e| format!("undecodable configuration: {e}"))?;
    // Each module validates its own part; one invalid part refuses the whole configuration.
    config.gitops.validate().map_err(|e| e.to_string())?;
    config.ci_access.validate().map_err(|e| e.to_string())?;
    if let Some(u) = &config.user_access {
        u.validate().map_err(|e| e.to_string())?;
    }
    config.observability.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// Runs the configuration stream until `shutdown`.
pub async fn run(
    channel: Channel,
    meta: AgentMeta,
    log: LogHandle,
    publish: watch::Sender<Option<Arc<Applied>>>,
    agent_span: tracing::Span,
    shutdown: CancellationToken,
) {
    let mut client = AgentConfigurationClient::new(channel)
        .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE);
    // Upstream retries the configuration stream more slowly than the tunnel.
    let backoff = Backoff {
        // Back within a second of a kas restart; a kas that stays down is retried less often.
        initial: Duration::from_millis(500),
        max: Duration::from_secs(60),
        ..Backoff::default()
    };
    let mut failures = 0u32;
    let mut last_error: Option<tonic::Code> = None;
    loop {
        if failures > 0 {
            let delay = backoff.delay(failures, rand_unit());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
        let in_force = publish
            .borrow()
            .as_ref()
            .map(|a| a.commit_id.clone())
            .unwrap_or_default();
        let mut req = tonic::Request::new(ConfigurationRequest {
            commit_id: in_force,
        });
        if let Ok(mut v) = MetadataValue::try_from(format!("Bearer {}", meta.token)) {
            v.set_sensitive(true);
            req.metadata_mut().insert(metadata::AUTHORIZATION, v);
        }
        let opened = tokio::select! {
            r = client.get_configuration(req) => r,
            () = shutdown.cancelled() => return,
        };
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(status) => {
                failures = failures.saturating_add(1);
                if last_error != Some(status.code()) {
                    tracing::warn!(code = ?status.code(), error = status.message(), "Cannot open the configuration stream; retrying");
                    last_error = Some(status.code());
                }
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                () = shutdown.cancelled() => return,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(status) => {
                    if last_error != Some(status.code()) {
                        tracing::warn!(code = ?status.code(), error = status.message(), "The configuration stream ended; reconnecting");
                        last_error = Some(status.code());
                    }
                    failures = failures.saturating_add(1);
                    break;
                }
            };
            failures = 0;
            last_error = None;
            agent_span.record("agent_id", resp.agent_id);
            if !resp.error.is_empty() {
                tracing::error!(commit_id = %resp.commit_id, error = %resp.error, "kas refused the agent configuration at this commit; the last good configuration stays in force");
                continue;
            }
            let config = match check(&resp.config_json) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(commit_id = %resp.commit_id, error = %e, "Invalid agent configuration; the last good configuration stays in force");
                    continue;
                }
            };
            tracing::info!(
                commit_id = %resp.commit_id,
                project_path = %resp.project_path,
                file = %resp.file_path,
                log_level = %config.observability.logging.level,
                "Agent configuration applied"
            );
            // After the line above, so it shows at the level that was in force until now.
            log.set_level(level_filter(config.observability.logging.level));
            tracing::debug!(
                commit_id = %resp.commit_id,
                config = field::display(&resp.config_json),
                "Agent configuration in force"
            );
            publish.send_replace(Some(Arc::new(Applied {
                agent_id: resp.agent_id,
                project_path: resp.project_path,
                commit_id: resp.commit_id,
                config,
            })));
        }
    }
}

fn rand_unit() -> f64 {
    // Jitter only; not security relevant.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_configuration_passes_every_module() {
        let json = serde_json::to_string(&AgentConfig::default()).expect("json");
        assert_eq!(check(&json).expect("valid"), AgentConfig::default());
    }

    #[test]
    fn an_invalid_part_refuses_the_whole_configuration() {
        let mut v = serde_json::to_value(AgentConfig::default()).expect("json");
        v["gitops"]["manifest_projects"] = serde_json::json!([
            {"id": "group/a", "default_namespace": "Not A Label"}
        ]);
        let e = check(&v.to_string()).expect_err("bad namespace");
        assert!(e.contains("default_namespace"), "{e}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(check("{not json").is_err());
    }
}
