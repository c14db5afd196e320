//! kas's notifications: when a sync starts failing or recovers, or kas refuses an agent's
//! configuration or a manifest commit, kas tells configured receivers — a generic JSON webhook
//! (HMAC-signed), a Slack-compatible chat, and commit statuses on GitLab, GitHub and Gitea
//! (`pending` → `success`/`failed` with the object summary).
//!
//! - [`event`] (pure): what is said and when ([`event::report_change`]), deduplication keys.
//! - [`render`] (pure): the HTTP request for each kind of receiver, HMAC signatures.
//! - [`Notifier`]: what kas's modules call; puts messages in the store's outbox, once per
//!   (receiver, key), so a report re-sent after a restart or seen by two replicas is said once.
//! - [`Dispatcher`]: sends due messages with retries (backoff up to 5 min, `max_attempts`),
//!   surviving restarts; a claimed message is held by one replica at a time. It deletes
//!   finished messages past `retention` (7 days by default), in batches.

pub mod config;
mod dispatch;
pub mod event;
mod notifier;
pub mod render;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use config::{ConfigError, NotificationsConfig, ReceiverConfig};
pub use dispatch::Dispatcher;
pub use notifier::{Entry, Notifier};

use crate::notifier::Shared;
use crate::render::Receiver;

/// Why kas cannot start its notifications.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("notifications.receivers[{receiver}]: reading {file}: {source}")]
    Read {
        receiver: String,
        file: String,
        source: std::io::Error,
    },
    #[error("notifications.receivers[{receiver}]: {file} does not hold an http:// or https:// URL")]
    BadUrlFile { receiver: String, file: String },
    #[error("notifications.receivers[{receiver}]: TLS: {source}")]
    Tls {
        receiver: String,
        source: tether_transport::Error,
    },
}

/// Reads the receivers' secrets and builds the notifier and its dispatcher (none when no
/// receiver is configured).
pub fn start(
    cfg: &NotificationsConfig,
    store: Arc<dyn tether_store::Store>,
) -> Result<(Notifier, Option<Dispatcher>), StartError> {
    cfg.validate()?;
    if cfg.receivers.is_empty() {
        return Ok((Notifier::disabled(), None));
    }
    let mut receivers = Vec::new();
    let mut clients = HashMap::new();
    for r in &cfg.receivers {
        receivers.push(load(r)?);
        let connector =
            tether_transport::https_connector(r.ca_file.as_deref()).map_err(|source| {
                StartError::Tls {
                    receiver: r.name.clone(),
                    source,
                }
            })?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        clients.insert(r.name.clone(), client);
    }
    let shared = Arc::new(Shared {
        store,
        receivers,
        wake: tokio::sync::Notify::new(),
        lost: Default::default(),
    });
    let notifier = Notifier {
        shared: Some(Arc::clone(&shared)),
    };
    let dispatcher = Dispatcher::new(
        shared,
        clients,
        cfg.max_attempts,
        cfg.timeout,
        cfg.retention,
    );
    Ok((notifier, Some(dispatcher)))
}

fn read(receiver: &str, file: &Path) -> Result<String, StartError> {
    std::fs::read_to_string(file)
        .map(|s| s.trim().to_owned())
        .map_err(|source| StartError::Read {
            receiver: receiver.to_owned(),
            file: file.display().to_string(),
            source,
        })
}

fn load(r: &ReceiverConfig) -> Result<Receiver, StartError> {
    let url = match (&r.url, &r.url_file) {
        (Some(url), _) => url.clone(),
        (None, Some(file)) => {
            let url = read(&r.name, file)?;
            if !config::is_http(&url) {
                return Err(StartError::BadUrlFile {
                    receiver: r.name.clone(),
                    file: file.display().to_string(),
                });
            }
            url
        }
        (None, None) => return Err(ConfigError::Url(r.name.clone()).into()),
    };
    let secret = match &r.secret_file {
        Some(f) => Some(read(&r.name, f)?.into_bytes()),
        None => None,
    };
    let token = match &r.token_file {
        Some(f) => Some(read(&r.name, f)?),
        None => None,
    };
    Ok(Receiver {
        name: r.name.clone(),
        kind: r.kind,
        url,
        secret,
        token,
        events: r.events.clone(),
    })
}
