//! The `notifications:` section of kas's configuration file.
//!
//! ```yaml
//! notifications:
//!   retention: 7d                   # finished messages are deleted after this
//!   receivers:
//!     - name: ops
//!       type: webhook                 # generic JSON, HMAC-SHA256 signed
//!       url: https://hooks.example.com/tether
//!       secret_file: /etc/kas/notify-secret
//!     - name: chat
//!       type: slack                   # Slack-compatible incoming webhook
//!       url_file: /etc/kas/slack-url  # the URL is the secret
//!       events: [sync_failed, sync_recovered]
//!     - name: forge
//!       type: gitlab                  # or github, gitea: commit statuses
//!       url: https://gitlab.example.com
//!       token_file: /etc/kas/gitlab-token
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::event::TransitionKind;

/// Where messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// POST of a JSON document, signed with HMAC-SHA256 (`X-Tether-Signature-256`).
    Webhook,
    /// POST of `{"text": …}` to a Slack-compatible incoming webhook (Mattermost, Rocket.Chat).
    Slack,
    /// Commit statuses through GitLab's API (`/api/v4/projects/:id/statuses/:sha`).
    Gitlab,
    /// Commit statuses through GitHub's API (`/repos/:owner/:repo/statuses/:sha`).
    Github,
    /// Commit statuses through Gitea's or Forgejo's API (`/api/v1/repos/…/statuses/:sha`).
    Gitea,
}

impl Kind {
    /// Forges take commit statuses; the others take transitions.
    pub fn takes_statuses(self) -> bool {
        matches!(self, Kind::Gitlab | Kind::Github | Kind::Gitea)
    }
}

/// One receiver as configured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Unique; messages in the outbox are addressed by it.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The webhook URL, or the forge's base URL (`https://gitlab.example.com`,
    /// `https://api.github.com`, `https://gitea.example.com`).
    pub url: Option<String>,
    /// A file holding the URL instead (for URLs that are secrets, like Slack's).
    pub url_file: Option<PathBuf>,
    /// webhook: the HMAC key.
    pub secret_file: Option<PathBuf>,
    /// Forges: the API token (GitLab: `api` scope; GitHub/Gitea: commit statuses write).
    pub token_file: Option<PathBuf>,
    /// PEM CA trusted instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// webhook/slack: which transitions to send (default: all).
    #[serde(default = "all_events")]
    pub events: Vec<TransitionKind>,
}

fn all_events() -> Vec<TransitionKind> {
    TransitionKind::ALL.to_vec()
}

/// The whole section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    pub receivers: Vec<ReceiverConfig>,
    /// Sends of one message before kas gives up on it.
    pub max_attempts: u32,
    /// One send's deadline.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a finished message (delivered or given up) stays in the outbox: while it is
    /// there, its key keeps the same event from being sent again; then it is deleted, so the
    /// outbox holds about this long's worth of messages rather than every one ever sent.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

/// The shortest retention: a report re-sent after a reconnect, or seen by a second replica,
/// comes within minutes, and a refused commit is said again at each new stream once its
/// message is gone, so much shorter would say things twice.
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            receivers: Vec::new(),
            max_attempts: 10,
            timeout: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A receiver configuration kas cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("notifications.receivers: the name {0:?} is used twice")]
    DuplicateName(String),
    #[error("notifications.receivers[{0}]: set exactly one of url and url_file")]
    Url(String),
    #[error("notifications.receivers[{0}]: a webhook needs secret_file (its messages are signed)")]
    NoSecret(String),
    #[error("notifications.receivers[{0}]: a {1:?} receiver needs token_file")]
    NoToken(String, Kind),
    #[error("notifications.receivers[{0}]: {1} is not an http:// or https:// URL")]
    BadUrl(String, String),
    #[error("notifications.max_attempts must be at least 1")]
    MaxAttempts,
    #[error("notifications.retention must be at least 1h")]
    Retention,
}

impl NotificationsConfig {
    /// Checks what can be checked without reading files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::MaxAttempts);
        }
        if self.retention < MIN_RETENTION {
            return Err(ConfigError::Retention);
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.receivers {
            if !names.insert(r.name.as_str()) {
                return Err(ConfigError::DuplicateName(r.name.clone()));
            }
            r.validate()?;
        }
        Ok(())
    }
}

impl ReceiverConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let name = || self.name.clone();
        match (&self.url, &self.url_file) {
            (Some(url), None) if !is_http(url) => {
                return Err(ConfigError::BadUrl(name(), url.clone()));
            }
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err(ConfigError::Url(name())),
        }
        if self.kind == Kind::Webhook && self.secret_file.is_none() {
            return Err(ConfigError::NoSecret(name()));
        }
        if self.kind.takes_statuses() && self.token_file.is_none() {
            return Err(ConfigError::NoToken(name(), self.kind));
        }
        Ok(())
    }
}

pub(crate) fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> NotificationsConfig {
        serde_json::from_value(serde_json::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn a_webhook_without_a_secret_is_refused() {
        let c = parse(r#"{"receivers":[{"name":"a","type":"webhook","url":"https://x"}]}"#);
        assert_eq!(c.validate(), Err(ConfigError::NoSecret("a".into())));
    }

    #[test]
    fn forges_need_a_token_and_names_are_unique() {
        let c =
            parse(r#"{"receivers":[{"name":"g","type":"github","url":"https://api.github.com"}]}"#);
        assert_eq!(
            c.validate(),
            Err(ConfigError::NoToken("g".into(), Kind::Github))
        );
        let c = parse(
            r#"{"receivers":[{"name":"s","type":"slack","url_file":"/u"},{"name":"s","type":"slack","url_file":"/v"}]}"#,
        );
        assert_eq!(c.validate(), Err(ConfigError::DuplicateName("s".into())));
    }

    #[test]
    fn exactly_one_url_source_of_http_scheme() {
        let c = parse(r#"{"receivers":[{"name":"s","type":"slack"}]}"#);
        assert_eq!(c.validate(), Err(ConfigError::Url("s".into())));
        let c = parse(r#"{"receivers":[{"name":"s","type":"slack","url":"ftp://x"}]}"#);
        assert!(matches!(c.validate(), Err(ConfigError::BadUrl(..))));
    }

    #[test]
    fn receivers_take_every_transition_by_default() {
        let c = parse(r#"{"receivers":[{"name":"s","type":"slack","url":"https://x"}]}"#);
        assert_eq!(c.receivers[0].events, TransitionKind::ALL);
        assert!(c.validate().is_ok());
        assert_eq!(c.max_attempts, 10);
    }

    #[test]
    fn finished_messages_are_kept_a_week_by_default_and_at_least_an_hour() {
        let c = parse(r#"{"receivers":[]}"#);
        assert_eq!(c.retention, Duration::from_secs(7 * 24 * 3600));
        let c = parse(r#"{"retention":"30d"}"#);
        assert_eq!(c.retention, Duration::from_secs(30 * 24 * 3600));
        assert!(c.validate().is_ok());
        let c = parse(r#"{"retention":"59m"}"#);
        assert_eq!(c.validate(), Err(ConfigError::Retention));
    }
}
