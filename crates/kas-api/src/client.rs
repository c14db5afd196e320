//! The admin commands' client for kas's internal API.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{
    AgentDeleted, AgentView, ProgressView, ProjectRequest, ProjectView, ReconcileRequest,
    ReconcileStarted, Resumed, Revoked, Stats, SuspendRequest, SuspensionView, SyncView,
    TokenCreated, TokenView, UserTokenCreated, UserTokenRequest, UserTokenView,
};

/// Why a call to kas's internal API failed. Displayed as the admin commands print it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("loading the CA trusted for the internal API")]
    Tls(#[source] tether_transport::Error),
    #[error("reading the admin token from {}", .file.display())]
    TokenFile {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the request")]
    Request(#[from] http::Error),
    #[error("calling kas at {base}")]
    Call {
        base: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading kas's answer")]
    Body(#[source] hyper::Error),
    #[error("encoding the request")]
    Encode(#[source] serde_json::Error),
    /// kas refused: its status and its error message.
    #[error("kas answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("decoding kas's answer")]
    Decode(#[source] serde_json::Error),
}

type Result<T> = std::result::Result<T, ClientError>;

impl ClientError {
    /// Whether kas was not there to answer: no connection, one dropped mid-answer, or a proxy
    /// or load balancer in front of kas with no replica behind it (502, 503, 504). That is a
    /// restart or a rolling restart of replicas, worth waiting out; anything else is kas's
    /// own answer.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Call { .. } | Self::Body(_) => true,
            Self::Status { status, .. } => matches!(
                *status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            _ => false,
        }
    }
}

/// Talks to one kas's internal API with its admin token, over HTTP or HTTPS.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: Http,
}

/// Plain HTTP needs no trust roots, so it gets its own client: hosts without a system bundle
/// must still reach a loopback API.
#[derive(Clone)]
enum Http {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// `base` is like `http://127.0.0.1:8153`; for an `https://` base call
    /// [`AdminClient::trusting`].
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            http: Http::Plain(Client::builder(TokioExecutor::new()).build_http()),
        }
    }

    /// For an `https://` base: trusts only `ca_file` when given, else the system's roots. A
    /// plain `http://` base is returned unchanged.
    pub fn trusting(mut self, ca_file: Option<&Path>) -> Result<Self> {
        if !self.base.starts_with("https://") {
            return Ok(self);
        }
        let tls = tether_transport::load_client_tls(ca_file).map_err(ClientError::Tls)?;
        let mut tls = (*tls).clone();
        // The connector sets ALPN itself (and refuses a config that already has it).
        tls.alpn_protocols.clear();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        self.http = Http::Tls(Client::builder(TokioExecutor::new()).build(connector));
        Ok(self)
    }

    /// Reads the admin token from a file (as kas writes it).
    pub fn from_token_file(base: &str, file: &Path) -> Result<Self> {
        let token = std::fs::read_to_string(file).map_err(|source| ClientError::TokenFile {
            file: file.to_path_buf(),
            source,
        })?;
        Ok(Self::new(base, &token))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = match &self.http {
            Http::Plain(c) => c.request(req).await,
            Http::Tls(c) => c.request(req).await,
        }
        .map_err(|source| ClientError::Call {
            base: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Body)?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let (status, bytes) = self.call(method, path, body).await?;
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    pub async fn register_agent(&self, project: &str, name: &str) -> Result<TokenCreated> {
        let body = serde_json::json!({"project": project, "name": name});
        self.json(Method::POST, "/api/v1/agents", Some(&body)).await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentView>> {
        self.json(Method::GET, "/api/v1/agents", None::<&()>).await
    }

    /// The id of the agent `r` names; a name is looked up in the agent list (an unknown one is
    /// kas's 404, as for an unknown id).
    pub async fn resolve_agent(&self, r: &crate::AgentRef) -> Result<i64> {
        let (project, name) = match r {
            crate::AgentRef::Id(id) => return Ok(*id),
            crate::AgentRef::Name { project, name } => (project, name),
        };
        self.list_agents()
            .await?
            .into_iter()
            .find(|a| &a.project == project && &a.name == name)
            .map(|a| a.id)
            .ok_or_else(|| ClientError::Status {
                status: StatusCode::NOT_FOUND,
                message: format!("no agent {project}:{name}"),
            })
    }

    pub async fn create_token(&self, agent_id: i64, description: &str) -> Result<TokenCreated> {
        let body = serde_json::json!({"description": description});
        self.json(
            Method::POST,
            &format!("/api/v1/agents/{agent_id}/tokens"),
            Some(&body),
        )
        .await
    }

    pub async fn list_tokens(&self, agent_id: i64) -> Result<Vec<TokenView>> {
        self.json(
            Method::GET,
            &format!("/api/v1/agents/{agent_id}/tokens"),
            None::<&()>,
        )
        .await
    }

    pub async fn revoke_token(&self, token_id: i64) -> Result<Revoked> {
        self.json(
            Method::DELETE,
            &format!("/api/v1/tokens/{token_id}"),
            None::<&()>,
        )
        .await
    }

    pub async fn set_project(&self, req: &ProjectRequest) -> Result<ProjectView> {
        self.json(Method::PUT, "/api/v1/projects", Some(req)).await
    }

    pub async fn list_projects(&self) -> Result<Vec<ProjectView>> {
        self.json(Method::GET, "/api/v1/projects", None::<&()>)
            .await
    }

    pub async fn remove_project(&self, path: &str) -> Result<()> {
        let (status, bytes) = self
            .call(
                Method::DELETE,
                &format!("/api/v1/projects?path={}", urlencode(path)),
                None,
            )
            .await?;
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        Ok(())
    }

    /// Each manifest project's last synchronization, as the agent reported it.
    pub async fn gitops_status(&self, agent_id: i64) -> Result<Vec<SyncView>> {
        self.json(
            Method::GET,
            &format!("/api/v1/agents/{agent_id}/gitops"),
            None::<&()>,
        )
        .await
    }

    /// The entries of the agent's configuration in force with no synchronization report, and
    /// why each has none.
    pub async fn gitops_unreported(&self, agent_id: i64) -> Result<Vec<crate::UnreportedView>> {
        self.json(
            Method::GET,
            &format!("/api/v1/agents/{agent_id}/gitops/unreported"),
            None::<&()>,
        )
        .await
    }

    /// What a synchronization of `req.git_ref` would change in the agent's cluster.
    pub async fn diff(&self, agent_id: i64, req: &crate::DiffRequest) -> Result<crate::DiffView> {
        self.json(
            Method::POST,
            &format!("/api/v1/agents/{agent_id}/diff"),
            Some(req),
        )
        .await
    }

    /// [`AdminClient::diff`] through the Kubernetes API proxy: this client's base is the
    /// proxy's URL and its token the proxy's credential (`ci:<agent id>:<ID token>`).
    pub async fn proxy_diff(&self, req: &crate::DiffRequest) -> Result<crate::DiffView> {
        self.json(Method::POST, crate::PROXY_DIFF_PATH, Some(req))
            .await
    }

    /// The CI job's kubeconfig (JSON) from the Kubernetes API proxy: this client's base is the
    /// proxy's URL and its token the job's ID token.
    pub async fn proxy_kubeconfig(&self) -> Result<serde_json::Value> {
        self.json(Method::GET, crate::PROXY_KUBECONFIG_PATH, None::<&()>)
            .await
    }

    pub async fn create_user_token(
        &self,
        agent_id: i64,
        req: &UserTokenRequest,
    ) -> Result<UserTokenCreated> {
        self.json(
            Method::POST,
            &format!("/api/v1/agents/{agent_id}/user-tokens"),
            Some(req),
        )
        .await
    }

    pub async fn revoke_user_token(&self, id: i64) -> Result<serde_json::Value> {
        self.json(
            Method::DELETE,
            &format!("/api/v1/user-tokens/{id}"),
            None::<&()>,
        )
        .await
    }

    /// Fetches the agent's configuration and manifest projects now and asks the agent to
    /// synchronize them now, even unchanged.
    pub async fn reconcile(
        &self,
        agent_id: i64,
        req: &ReconcileRequest,
    ) -> Result<ReconcileStarted> {
        let path = format!("/api/v1/agents/{agent_id}/reconcile");
        self.json(Method::POST, &path, Some(req)).await
    }

    /// Whether `req.reported` is a newer commit than `req.fetched` that includes it.
    pub async fn supersedes(&self, agent_id: i64, req: &crate::SupersedesRequest) -> Result<bool> {
        let path = format!("/api/v1/agents/{agent_id}/reconcile/supersedes");
        let view: crate::SupersedesView = self.json(Method::POST, &path, Some(req)).await?;
        Ok(view.supersedes)
    }

    /// How far the agent's syncs under way for a reconcile got.
    pub async fn gitops_progress(&self, agent_id: i64) -> Result<Vec<ProgressView>> {
        let path = format!("/api/v1/agents/{agent_id}/gitops/progress");
        self.json(Method::GET, &path, None::<&()>).await
    }

    pub async fn suspend(&self, agent_id: i64, req: &SuspendRequest) -> Result<SuspensionView> {
        let path = format!("/api/v1/agents/{agent_id}/suspend");
        self.json(Method::POST, &path, Some(req)).await
    }

    pub async fn resume(&self, agent_id: i64, req: &SuspendRequest) -> Result<Resumed> {
        let path = format!("/api/v1/agents/{agent_id}/resume");
        self.json(Method::POST, &path, Some(req)).await
    }

    /// Revokes the agent's tokens, ends its streams and removes its records.
    pub async fn delete_agent(&self, agent_id: i64) -> Result<AgentDeleted> {
        let path = format!("/api/v1/agents/{agent_id}");
        self.json(Method::DELETE, &path, None::<&()>).await
    }

    /// Personal access tokens (never their values), of one agent or of all.
    pub async fn list_user_tokens(&self, agent_id: Option<i64>) -> Result<Vec<UserTokenView>> {
        let path = match agent_id {
            Some(id) => format!("/api/v1/user-tokens?agent_id={id}"),
            None => "/api/v1/user-tokens".to_owned(),
        };
        self.json(Method::GET, &path, None::<&()>).await
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.json(Method::GET, "/api/v1/debug/stats", None::<&()>)
            .await
    }

    /// Sends `payload` through the agent's echo service and returns what came back.
    pub async fn echo(&self, agent_id: i64, payload: Vec<u8>) -> Result<Bytes> {
        let (status, bytes) = self
            .call(
                Method::POST,
                &format!("/api/v1/agents/{agent_id}/echo"),
                Some(payload),
            )
            .await?;
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        Ok(bytes)
    }
}

/// kas's refusal in words, as every command prints it: the admin API's `{"error": …}`, or the
/// proxy's Kubernetes `Status` message. Any other body (a proxy's page, plain text) is kept
/// as text, on one line and cut short; a body without words gets the status's reason. A user
/// never sees a raw JSON body.
fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    const MAX_CHARS: usize = 300;
    let message = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => v["error"]
            .as_str()
            .or(v["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_default(),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
            match line.char_indices().nth(MAX_CHARS) {
                Some((cut, _)) => format!("{}…", &line[..cut]),
                None => line,
            }
        }
    };
    let message = if message.is_empty() {
        format!(
            "no reason given ({})",
            status.canonical_reason().unwrap_or("unknown status")
        )
    } else {
        message
    };
    ClientError::Status { status, message }
}

/// Percent-encodes a query value (project paths contain `/`).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn status(status: StatusCode) -> ClientError {
        ClientError::Status {
            status,
            message: String::new(),
        }
    }

    fn message(body: &[u8]) -> String {
        match refusal(StatusCode::NOT_FOUND, body) {
            ClientError::Status { message, .. } => message,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refusal_is_said_in_words_never_as_raw_json() {
        assert_eq!(
            message(br#"{"error":"agent 7 is not connected"}"#),
            "agent 7 is not connected"
        );
        let status = br#"{"kind":"Status","message":"forbidden: no","code":403}"#;
        assert_eq!(message(status), "forbidden: no");
        assert_eq!(message(br#"{"other":1}"#), "no reason given (Not Found)");
        assert_eq!(message(b""), "no reason given (Not Found)");
        assert_eq!(
            message(b"<html>\n <h1>Bad   gateway</h1>\n</html>"),
            "<html> <h1>Bad gateway</h1> </html>"
        );
        let long = message("é".repeat(400).as_bytes());
        assert_eq!(long.chars().count(), 301, "{long}");
    }

    #[tokio::test]
    async fn no_kas_and_no_replica_behind_a_proxy_are_unreachable_but_refusals_are_not() {
        // Nothing listens on port 1 of the loopback address: the connection is refused.
        let refused = AdminClient::new("http://127.0.0.1:1", "t").stats().await;
        assert!(refused.is_err_and(|e| e.is_unreachable()));
        for code in [502, 503, 504] {
            assert!(status(StatusCode::from_u16(code).unwrap()).is_unreachable());
        }
        for code in [400, 401, 404, 409, 500] {
            assert!(!status(StatusCode::from_u16(code).unwrap()).is_unreachable());
        }
    }
}
