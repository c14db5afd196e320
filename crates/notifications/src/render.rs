//! How each kind of receiver is told (pure): the HTTP request for a message.

use hmac::{KeyInit, Mac};
use serde_json::json;

use crate::config::Kind;
use crate::event::{CommitStatus, Message, State, Transition, TransitionKind};

/// A receiver with its secrets read.
#[derive(Clone)]
pub struct Receiver {
    pub name: String,
    pub kind: Kind,
    pub url: String,
    /// webhook: the HMAC key.
    pub secret: Option<Vec<u8>>,
    /// Forges: the API token.
    pub token: Option<String>,
    pub events: Vec<TransitionKind>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL (Slack's is a secret), the key or the token.
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Whether this receiver gets `message`.
    pub fn takes(&self, message: &Message) -> bool {
        match message {
            Message::Status(_) => self.kind.takes_statuses(),
            Message::Transition(t) => !self.kind.takes_statuses() && self.events.contains(&t.kind),
        }
    }
}

/// A POST to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// Why a message cannot be rendered for a receiver (kept as the message's error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("receiver {0} does not take this kind of message")]
    WrongKind(String),
}

/// The request telling `receiver` about `message`.
pub fn request(receiver: &Receiver, message: &Message, key: &str) -> Result<Request, RenderError> {
    match (receiver.kind, message) {
        (Kind::Webhook, Message::Transition(t)) => Ok(webhook(receiver, t, key)),
        (Kind::Slack, Message::Transition(t)) => Ok(slack(receiver, t)),
        (Kind::Gitlab | Kind::Github | Kind::Gitea, Message::Status(s)) => Ok(status(receiver, s)),
        _ => Err(RenderError::WrongKind(receiver.name.clone())),
    }
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn webhook(r: &Receiver, t: &Transition, key: &str) -> Request {
    let body = json!({
        "delivery": key,
        "event": t.kind.as_str(),
        "agent": t.agent.as_ref().map(|a| json!({"id": a.id, "name": a.name, "project": a.project})),
        "project": t.project,
        "commit": t.commit,
        "message": t.message,
        "summary": t.summary,
        "failed_objects": t.failed_objects,
        "at": t.at,
    });
    let body = body.to_string().into_bytes();
    let mut headers = vec![
        (JSON.0, JSON.1.to_owned()),
        ("x-tether-event", t.kind.as_str().to_owned()),
        ("x-tether-delivery", key.to_owned()),
    ];
    if let Some(secret) = &r.secret {
        headers.push((
            "x-tether-signature-256",
            format!("sha256={}", sign(secret, &body)),
        ));
    }
    Request {
        url: r.url.clone(),
        headers,
        body,
    }
}

/// Hex HMAC-SHA256 of `body` (what receivers recompute with the shared key).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        // HMAC accepts keys of any length; unreachable, but no panic in kas.
        return String::new();
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn slack(r: &Receiver, t: &Transition) -> Request {
    let who = t
        .agent
        .as_ref()
        .map_or_else(|| "kas".to_owned(), |a| format!("*{}*", a.display_name()));
    let commit = short(&t.commit);
    let mut text = match t.kind {
        TransitionKind::SyncFailed => format!(
            ":red_circle: {who} failed to sync `{}` at `{commit}`: {}",
            t.project, t.message
        ),
        TransitionKind::SyncRecovered => format!(
            ":large_green_circle: {who} synced `{}` at `{commit}` again ({})",
            t.project,
            t.summary.describe()
        ),
        TransitionKind::ConfigurationRefused => format!(
            ":warning: kas refused the configuration of {who} at `{commit}`: {}",
            t.message
        ),
        TransitionKind::CommitRefused => format!(
            ":no_entry: kas refused commit `{commit}` of `{}`: {}",
            t.project, t.message
        ),
    };
    for o in &t.failed_objects {
        text.push_str(&format!("\n• {o}"));
    }
    Request {
        url: r.url.clone(),
        headers: vec![(JSON.0, JSON.1.to_owned())],
        body: json!({ "text": text }).to_string().into_bytes(),
    }
}

fn status(r: &Receiver, s: &CommitStatus) -> Request {
    let base = r.url.trim_end_matches('/');
    let context = s.context();
    // GitHub limits descriptions to 140 characters.
    let description: String = s.description.chars().take(140).collect();
    let token = r.token.clone().unwrap_or_default();
    let (url, auth, state) = match r.kind {
        Kind::Gitlab => (
            format!(
                "{base}/api/v4/projects/{}/statuses/{}",
                encode_path(&s.project),
                s.commit
            ),
            ("private-token", token),
            gitlab_state(s.state),
        ),
        Kind::Github => (
            format!("{base}/repos/{}/statuses/{}", s.project, s.commit),
            ("authorization", format!("Bearer {token}")),
            github_state(s.state),
        ),
        _ => (
            format!("{base}/api/v1/repos/{}/statuses/{}", s.project, s.commit),
            ("authorization", format!("token {token}")),
            github_state(s.state),
        ),
    };
    let body = match r.kind {
        Kind::Gitlab => json!({"state": state, "name": context, "description": description}),
        _ => json!({"state": state, "context": context, "description": description}),
    };
    Request {
        url,
        headers: vec![
            (JSON.0, JSON.1.to_owned()),
            (auth.0, auth.1),
            ("accept", "application/json".to_owned()),
            // GitHub refuses requests without one.
            ("user-agent", "tether-kas".to_owned()),
        ],
        body: body.to_string().into_bytes(),
    }
}

fn gitlab_state(s: State) -> &'static str {
    match s {
        State::Pending => "pending",
        State::Success => "success",
        State::Failed => "failed",
        State::Superseded => "canceled",
    }
}

/// GitHub's and Gitea's states: no `canceled` there, so a superseded commit is an `error` (not
/// a `failure`: its manifests did not fail), its description saying which commit replaced it.
fn github_state(s: State) -> &'static str {
    match s {
        State::Pending => "pending",
        State::Success => "success",
        State::Failed => "failure",
        State::Superseded => "error",
    }
}

/// GitLab takes a project path as its id, URL-encoded (`group%2Fproject`).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::event::{AgentInfo, Summary};

    fn receiver(kind: Kind) -> Receiver {
        Receiver {
            name: "r".into(),
            kind,
            url: "https://forge.example/".into(),
            secret: Some(b"key".to_vec()),
            token: Some("tok".into()),
            events: TransitionKind::ALL.to_vec(),
        }
    }

    fn agent() -> AgentInfo {
        AgentInfo {
            id: 1,
            name: "prod".into(),
            project: "group/config".into(),
        }
    }

    fn failed() -> Message {
        Message::Transition(Transition {
            kind: TransitionKind::SyncFailed,
            agent: Some(agent()),
            project: "group/manifests".into(),
            commit: "0123456789abcdef".into(),
            message: "1 resources failed".into(),
            summary: Summary::default(),
            failed_objects: vec!["Deployment naww/nginx: forbidden".into()],
            at: 10,
        })
    }

    fn status(state: State) -> Message {
        Message::Status(CommitStatus {
            state,
            agent: agent(),
            project: "group/manifests".into(),
            entry: None,
            commit: "abc".into(),
            description: "d".repeat(200),
        })
    }

    #[test]
    fn webhooks_are_signed_over_the_exact_body() {
        let r = receiver(Kind::Webhook);
        let req = request(&r, &failed(), "k1").unwrap();
        let sig = req
            .headers
            .iter()
            .find(|(h, _)| *h == "x-tether-signature-256")
            .unwrap();
        assert_eq!(sig.1, format!("sha256={}", sign(b"key", &req.body)));
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["event"], "sync_failed");
        assert_eq!(body["delivery"], "k1");
        assert_eq!(body["agent"]["name"], "prod");
    }

    #[test]
    fn slack_says_who_what_and_which_objects() {
        let req = request(&receiver(Kind::Slack), &failed(), "k").unwrap();
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(
            text.contains("*group/config:prod* failed to sync `group/manifests` at `0123456789ab`"),
            "{text}"
        );
        assert!(
            text.ends_with("• Deployment naww/nginx: forbidden"),
            "{text}"
        );
    }

    #[test]
    fn forges_get_their_own_urls_states_and_auth() {
        let gl = request(&receiver(Kind::Gitlab), &status(State::Failed), "k").unwrap();
        assert_eq!(
            gl.url,
            "https://forge.example/api/v4/projects/group%2Fmanifests/statuses/abc"
        );
        assert!(gl.headers.contains(&("private-token", "tok".into())));
        let body: serde_json::Value = serde_json::from_slice(&gl.body).unwrap();
        assert_eq!(
            (body["state"].as_str(), body["name"].as_str()),
            (Some("failed"), Some("tether/group/config:prod"))
        );
        assert_eq!(body["description"].as_str().unwrap().len(), 140);

        let gh = request(&receiver(Kind::Github), &status(State::Failed), "k").unwrap();
        assert_eq!(
            gh.url,
            "https://forge.example/repos/group/manifests/statuses/abc"
        );
        let body: serde_json::Value = serde_json::from_slice(&gh.body).unwrap();
        assert_eq!(body["state"], "failure");
        assert_eq!(body["context"], "tether/group/config:prod");

        let gt = request(&receiver(Kind::Gitea), &status(State::Pending), "k").unwrap();
        assert_eq!(
            gt.url,
            "https://forge.example/api/v1/repos/group/manifests/statuses/abc"
        );
        assert!(gt.headers.contains(&("authorization", "token tok".into())));
    }

    #[test]
    fn a_superseded_commit_is_canceled_on_gitlab_and_an_error_elsewhere() {
        for (kind, state) in [
            (Kind::Gitlab, "canceled"),
            (Kind::Github, "error"),
            (Kind::Gitea, "error"),
        ] {
            let r = request(&receiver(kind), &status(State::Superseded), "k").unwrap();
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["state"], state, "{kind:?}");
        }
    }

    #[test]
    fn receivers_take_only_their_kind_of_message() {
        assert!(receiver(Kind::Webhook).takes(&failed()));
        assert!(!receiver(Kind::Webhook).takes(&status(State::Pending)));
        assert!(receiver(Kind::Gitea).takes(&status(State::Pending)));
        assert!(!receiver(Kind::Gitea).takes(&failed()));
        let mut quiet = receiver(Kind::Slack);
        quiet.events = vec![TransitionKind::SyncRecovered];
        assert!(!quiet.takes(&failed()));
        assert!(request(&receiver(Kind::Slack), &status(State::Pending), "k").is_err());
    }
}
