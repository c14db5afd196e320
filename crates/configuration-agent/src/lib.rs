//! Agent half of agent configuration, the part every agent shares: keeping kas's configuration
//! stream open. [`run`] opens it with the agent's token, hands each message to the caller's
//! [`StreamEvents`], and reopens it with agentk's backoff when it ends, until shutdown. What a
//! configuration means (validating it, applying it) stays with the caller.

use std::time::Duration;

use tether_protocol::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use tether_protocol::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use tether_tunnel_agent::Backoff;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

/// How the stream is retried: more slowly than the tunnel, as upstream does; back within a
/// second of a kas restart, while a kas that stays down is retried less often.
pub fn backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(60),
        ..Backoff::default()
    }
}

/// What the stream's owner learns of it. Every method has a default that ignores the event.
pub trait StreamEvents {
    /// The commit of the configuration in force, sent when (re)opening so that kas sends a
    /// configuration only when it differs ("" for none).
    fn commit_in_force(&self) -> String {
        String::new()
    }
    /// A configuration the owner refused since its last good one: its commit and why. The
    /// stream is reopened at once to tell kas (which otherwise records the commit as in force),
    /// and every reopening says it again until a configuration is accepted.
    fn refusal(&self) -> Option<(String, String)> {
        None
    }
    /// kas refused to open the stream (or could not be reached); it is retried after a delay.
    fn open_failed(&mut self, _status: &Status) {}
    /// The stream is open.
    fn opened(&mut self) {}
    /// A message arrived.
    fn received(&mut self, _response: ConfigurationResponse) {}
    /// The stream ended with an error; it is reopened after a delay.
    fn failed(&mut self, _status: &Status) {}
    /// An open stream is over, however it ended (shutdown included).
    fn closed(&mut self) {}
}

/// Keeps the configuration stream of the agent `meta` open over `channel` until `shutdown`. A
/// message resets the backoff; a stream that ends cleanly is reopened at once. Each (re)open
/// presents the token as it is now, and a changed token reopens the stream at once.
pub async fn run(
    channel: Channel,
    meta: &tether_tunnel_agent::AgentMeta,
    events: &mut impl StreamEvents,
    shutdown: CancellationToken,
) {
    let mut client = AgentConfigurationClient::new(channel)
        .max_decoding_message_size(tether_protocol::MAX_MESSAGE_SIZE);
    let backoff = backoff();
    let mut failures = 0u32;
    let mut rotations = meta.token.changes();
    // After a token change, the next opening asks for the configuration whatever commit is in
    // force: the new token may be another agent's, whose configuration at that same commit
    // kas would otherwise not send, and the owner would never learn who it now is.
    let mut rotated = false;
    loop {
        if failures > 0 {
            tokio::select! {
                () = tokio::time::sleep(backoff.delay(failures, rand_unit())) => {}
                () = shutdown.cancelled() => return,
            }
        }
        rotations.borrow_and_update();
        let in_force = if rotated {
            String::new()
        } else {
            events.commit_in_force()
        };
        let req = request(meta, in_force, events.refusal());
        let opened = tokio::select! {
            r = client.get_configuration(req) => r,
            () = shutdown.cancelled() => return,
        };
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(status) => {
                failures = failures.saturating_add(1);
                events.open_failed(&status);
                continue;
            }
        };
        events.opened();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                // A new agent token: reopen with it, so the old one can be revoked.
                Ok(()) = rotations.changed() => {
                    rotated = true;
                    break;
                }
                () = shutdown.cancelled() => {
                    events.closed();
                    return;
                }
            };
            match msg {
                Ok(Some(r)) => {
                    failures = 0;
                    rotated = false;
                    let commit = r.commit_id.clone();
                    events.received(r);
                    if events
                        .refusal()
                        .is_some_and(|(refused, _)| refused == commit)
                    {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    failures = failures.saturating_add(1);
                    events.failed(&status);
                    break;
                }
            }
        }
        events.closed();
    }
}

/// The request that opens the stream: the commit in force, a refused one, the token and the
/// pod (kas tells the agent's replicas apart by it).
fn request(
    meta: &tether_tunnel_agent::AgentMeta,
    commit_id: String,
    refused: Option<(String, String)>,
) -> tonic::Request<ConfigurationRequest> {
    let (refused_commit_id, refusal) = refused.unwrap_or_default();
    meta.request(ConfigurationRequest {
        commit_id,
        refused_commit_id,
        refusal,
    })
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
    use tether_protocol::agent_configuration::agent_configuration_server::{
        AgentConfiguration, AgentConfigurationServer,
    };
    use tokio::sync::mpsc;

    /// What an opening carried: token, commit in force, refused commit and reason.
    type Opening = (String, String, String, String);

    /// A kas stand-in: reports each opening, answers the first with one configuration and
    /// ends that stream, and keeps later ones open.
    struct OneConfig {
        opened: mpsc::UnboundedSender<Opening>,
        /// The senders of the streams kept open.
        open: std::sync::Mutex<Vec<mpsc::UnboundedSender<Result<ConfigurationResponse, Status>>>>,
    }

    type Responses =
        tokio_stream::wrappers::UnboundedReceiverStream<Result<ConfigurationResponse, Status>>;

    #[tonic::async_trait]
    impl AgentConfiguration for OneConfig {
        type GetConfigurationStream = Responses;

        async fn get_configuration(
            &self,
            req: tonic::Request<ConfigurationRequest>,
        ) -> Result<tonic::Response<Responses>, Status> {
            let token = req
                .metadata()
                .get(tether_protocol::metadata::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let r = req.into_inner();
            let first = r.commit_id.is_empty() && r.refused_commit_id.is_empty();
            let _ = self
                .opened
                .send((token, r.commit_id, r.refused_commit_id, r.refusal));
            let (tx, rx) = mpsc::unbounded_channel();
            if first {
                let _ = tx.send(Ok(ConfigurationResponse {
                    agent_id: 7,
                    commit_id: "c1".into(),
                    ..ConfigurationResponse::default()
                }));
            } else if let Ok(mut open) = self.open.lock() {
                open.push(tx);
            }
            Ok(tonic::Response::new(Responses::new(rx)))
        }
    }

    #[derive(Default)]
    struct Recorder {
        /// Refuse every configuration (as an older agent would one it cannot read).
        refuse: bool,
        commit: String,
        refused: Option<(String, String)>,
        open: i32,
        received: Vec<String>,
    }

    impl StreamEvents for Recorder {
        fn commit_in_force(&self) -> String {
            self.commit.clone()
        }
        fn refusal(&self) -> Option<(String, String)> {
            self.refused.clone()
        }
        fn opened(&mut self) {
            self.open += 1;
        }
        fn received(&mut self, r: ConfigurationResponse) {
            if self.refuse {
                self.refused = Some((r.commit_id.clone(), "unknown field `x`".into()));
            } else {
                self.commit = r.commit_id.clone();
            }
            self.received.push(r.commit_id);
        }
        fn closed(&mut self) {
            self.open -= 1;
        }
    }

    /// Runs the stream against [`OneConfig`] until the second opening; returns both openings
    /// and the recorder.
    async fn two_openings(refuse: bool) -> (Opening, Opening, Recorder) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (opened, mut openings) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentConfigurationServer::new(OneConfig {
                    opened,
                    open: Default::default(),
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let client = tokio::spawn(async move {
            let mut events = Recorder {
                refuse,
                ..Recorder::default()
            };
            let meta = tether_tunnel_agent::AgentMeta {
                token: tether_tunnel_agent::AgentToken::fixed("secret"),
                ..Default::default()
            };
            run(channel, &meta, &mut events, stop).await;
            events
        });
        let first = openings.recv().await.expect("first opening");
        let second = openings.recv().await.expect("second opening");
        shutdown.cancel();
        let events = client.await.expect("client task");
        assert_eq!(events.received, ["c1"]);
        assert_eq!(events.open, 0, "every opened stream was reported closed");
        (first, second, events)
    }

    fn opening(commit: &str, refused: &str, why: &str) -> Opening {
        let s = |x: &str| x.to_string();
        (s("Bearer secret"), s(commit), s(refused), s(why))
    }

    #[tokio::test]
    async fn the_stream_is_reopened_with_the_token_and_the_commit_in_force() {
        let (first, second, _) = two_openings(false).await;
        assert_eq!(first, opening("", "", ""));
        assert_eq!(second, opening("c1", "", ""));
    }

    #[tokio::test]
    async fn a_refused_configuration_is_told_to_kas_at_once() {
        let (first, second, events) = two_openings(true).await;
        assert_eq!(first, opening("", "", ""));
        assert_eq!(second, opening("", "c1", "unknown field `x`"));
        assert!(events.commit.is_empty(), "nothing in force");
    }
}
