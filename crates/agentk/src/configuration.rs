//! Agent half of agent configuration: keeps the configuration stream to kas open, validates
//! every new configuration (each module's part), applies the log level, and publishes the
//! configuration in force to the other modules. An invalid configuration is refused whole: the
//! last good one stays in force.

use std::sync::Arc;

use tether_agent_config::{AgentConfig, LogLevel};
use tether_configuration_agent::StreamEvents;
use tether_observability::LogHandle;
use tether_protocol::agent_configuration::ConfigurationResponse;
use tether_tunnel_agent::AgentMeta;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
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

/// Runs the configuration stream until `shutdown`. `other_agent` is cancelled when kas
/// answers as another agent than at first (the token file now holds another agent's token).
pub async fn run(
    channel: Channel,
    meta: AgentMeta,
    log: LogHandle,
    (publish, other_agent): (watch::Sender<Option<Arc<Applied>>>, CancellationToken),
    agent_span: tracing::Span,
    shutdown: CancellationToken,
) {
    let mut events = Apply {
        log,
        publish,
        agent_span,
        last_error: None,
        refused: None,
        agent_id: None,
        other_agent,
    };
    tether_configuration_agent::run(channel, &meta, &mut events, shutdown).await;
}

/// agentk's side of the stream: validates and applies each configuration, and logs each new
/// kind of failure once (not every retry).
struct Apply {
    log: LogHandle,
    publish: watch::Sender<Option<Arc<Applied>>>,
    agent_span: tracing::Span,
    last_error: Option<tonic::Code>,
    /// The newest configuration this agent refused (commit, why), until one is applied:
    /// told to kas, which would otherwise record that commit as in force.
    refused: Option<(String, String)>,
    /// The agent kas first answered as: who this process is.
    agent_id: Option<i64>,
    other_agent: CancellationToken,
}

/// Whether kas now answers as another agent than the one this process runs as (pure).
fn another_agent(was: Option<i64>, now: i64) -> Option<i64> {
    was.filter(|&was| was != now)
}

impl StreamEvents for Apply {
    fn commit_in_force(&self) -> String {
        self.publish
            .borrow()
            .as_ref()
            .map(|a| a.commit_id.clone())
            .unwrap_or_default()
    }

    fn refusal(&self) -> Option<(String, String)> {
        self.refused.clone()
    }

    fn open_failed(&mut self, status: &Status) {
        if self.last_error != Some(status.code()) {
            let error = tether_tunnel_agent::status_text(status);
            tracing::warn!(code = ?status.code(), error, "Cannot open the configuration stream; retrying");
            self.last_error = Some(status.code());
        }
    }

    fn failed(&mut self, status: &Status) {
        if !tether_tunnel_agent::is_refusal(status.code()) {
            // The connection ended under the stream: every 2 h kas rotates it (its maximum
            // age). Whether kas is reachable the reopening tells, and warns if not.
            tracing::debug!(code = ?status.code(), error = status.message(), "The configuration stream ended; reconnecting");
            self.last_error = None;
            return;
        }
        if self.last_error != Some(status.code()) {
            tracing::warn!(code = ?status.code(), error = status.message(), "The configuration stream ended; reconnecting");
            self.last_error = Some(status.code());
        }
    }

    fn received(&mut self, resp: ConfigurationResponse) {
        self.last_error = None;
        // A token of another agent put in the token file: this process's modules, Lease and
        // inventories are the first agent's, and would go on under the other one's name (its
        // reports shown as the other's, its objects failing at the next restart). Not taken:
        // agentk stops, and starts again (its Pod restarted) as that agent.
        if let Some(was) = another_agent(self.agent_id, resp.agent_id) {
            tracing::error!(
                agent_id = was,
                new_agent_id = resp.agent_id,
                "The agent token file now holds a token of another agent: agentk stops, to start again as that agent"
            );
            self.other_agent.cancel();
            return;
        }
        self.agent_id = Some(resp.agent_id);
        self.agent_span.record("agent_id", resp.agent_id);
        if !resp.error.is_empty() {
            tracing::error!(commit_id = %resp.commit_id, error = %resp.error, "kas refused the agent configuration at this commit; the last good configuration stays in force");
            return;
        }
        let config = match check(&resp.config_json) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(commit_id = %resp.commit_id, error = %e, "Invalid agent configuration; the last good configuration stays in force");
                self.refused = Some((resp.commit_id, e));
                return;
            }
        };
        self.refused = None;
        let same = self.publish.borrow().as_deref().is_some_and(|a| {
            a.agent_id == resp.agent_id && a.commit_id == resp.commit_id && a.config == config
        });
        if same {
            // Sent again after a token rotation (kas is asked afresh then): nothing changes.
            tracing::debug!(commit_id = %resp.commit_id, "Agent configuration unchanged");
            return;
        }
        tracing::info!(
            commit_id = %resp.commit_id,
            project_path = %resp.project_path,
            file = %resp.file_path,
            log_level = %config.observability.logging.level,
            "Agent configuration applied"
        );
        // After the line above, so it shows at the level that was in force until now.
        self.log
            .set_level(level_filter(config.observability.logging.level));
        tracing::debug!(
            commit_id = %resp.commit_id,
            config = field::display(&resp.config_json),
            "Agent configuration in force"
        );
        self.publish.send_replace(Some(Arc::new(Applied {
            agent_id: resp.agent_id,
            project_path: resp.project_path,
            commit_id: resp.commit_id,
            config,
        })));
    }
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
    fn only_an_answer_as_another_agent_than_the_first_is_another_agent() {
        assert_eq!(another_agent(None, 7), None);
        assert_eq!(another_agent(Some(7), 7), None);
        assert_eq!(another_agent(Some(7), 8), Some(7));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(check("{not json").is_err());
    }
}
