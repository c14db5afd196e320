//! The parsers that take input from outside kas and agentk, each as a fuzz target with seeds.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use tether_kubeproxy_server::{
    FetchError, JwksCache, JwksFetcher, JwksSource, OidcVerifier, TrustedIssuer,
};
use tether_protocol::agent_configuration::ConfigurationResponse;
use tether_protocol::gitops::ObjectsResponse;
use tether_protocol::tunnel::{
    AgentFrame, Data, Descriptor, RequestInfo, ServerFrame, agent_frame, server_frame,
};

/// One parser under test.
pub trait Target: Send + Sync {
    fn name(&self) -> &'static str;
    /// Valid (or nearly valid) inputs mutations start from.
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Feeds `input` to the parser; whether it accepted it. Must never panic.
    fn run(&self, input: &[u8]) -> bool;
}

/// Every target, in a stable order.
pub fn all() -> Vec<Box<dyn Target>> {
    vec![
        Box::new(TunnelFrames),
        Box::new(AgentConfig),
        Box::new(Manifests),
        Box::new(Webhooks),
        Box::new(ProxyCredentials),
        Box::new(ImpersonationMetadata),
        Box::new(Jwt::new(false)),
        Box::new(Jwt::new(true)),
        Box::new(KasConfig),
        Box::new(DiffInput),
    ]
}

/// `kas agent diff`: the request body the proxy and the admin API take (the ref and project
/// resolved as kas resolves them), and objects as the preview compares and redacts them.
struct DiffInput;

impl Target for DiffInput {
    fn name(&self) -> &'static str {
        "diff-request"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            r#"{"ref": "feature/x", "project": "group/manifests"}"#,
            r#"{"ref": "0123456789abcdef0123456789abcdef01234567"}"#,
            r#"{"ref": "refs/tags/v1", "project": "42"}"#,
            r#"{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "annotations": {"a": "b"}}, "data": {"k": "dg=="}, "stringData": {"p": "x"}}"#,
        ]
        .map(|s| s.as_bytes().to_vec())
        .to_vec()
    }

    fn run(&self, input: &[u8]) -> bool {
        use tether_agent_config::{ManifestProject, ProjectRef};
        use tether_gitops_agent::preview::{compare, pruned_view};
        if let Ok(req) = serde_json::from_slice::<tether_kas_api::DiffRequest>(input) {
            let projects = [
                ManifestProject::new(ProjectRef::Path("group/manifests".into())),
                ManifestProject::new(ProjectRef::Numeric(42)),
            ];
            let _ = tether_gitops_server::ref_candidates(&req.git_ref);
            return kas::preview::target_project(&projects, req.project.as_deref()).is_ok();
        }
        let Ok(obj) = serde_json::from_slice::<serde_json::Value>(input) else {
            return false;
        };
        let _ = pruned_view(&obj);
        let _ = compare(None, &obj);
        let mut changed = obj.clone();
        if let Some(map) = changed.as_object_mut() {
            map.insert("data".into(), serde_json::json!({"k": "changed"}));
        }
        let _ = compare(Some(&obj), &changed);
        true
    }
}

/// Tunnel frames and the other gRPC messages kas and agentk decode from each other.
struct TunnelFrames;

impl Target for TunnelFrames {
    fn name(&self) -> &'static str {
        "tunnel-frames"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let agent = [
            agent_frame::Frame::Descriptor(Descriptor {
                services: vec!["kubernetes_api".into(), "echo".into()],
                data_with_request: true,
                reusable: true,
            }),
            agent_frame::Frame::Data(Data {
                data: b"HTTP/1.1 200 OK\r\n\r\n".to_vec().into(),
            }),
        ];
        let server = [server_frame::Frame::Request(RequestInfo {
            service: "kubernetes_api".into(),
            ..RequestInfo::default()
        })];
        let mut seeds: Vec<Vec<u8>> = agent
            .into_iter()
            .map(|f| AgentFrame { frame: Some(f) }.encode_to_vec())
            .collect();
        seeds.extend(
            server
                .into_iter()
                .map(|f| ServerFrame { frame: Some(f) }.encode_to_vec()),
        );
        seeds.push(
            ConfigurationResponse {
                agent_id: 7,
                commit_id: "0".repeat(40),
                config_json: "{}".into(),
                ..ConfigurationResponse::default()
            }
            .encode_to_vec(),
        );
        seeds
    }

    fn run(&self, input: &[u8]) -> bool {
        let a = AgentFrame::decode(input).is_ok();
        let s = ServerFrame::decode(input).is_ok();
        let c = ConfigurationResponse::decode(input).is_ok();
        let o = ObjectsResponse::decode(input).is_ok();
        a || s || c || o
    }
}

/// An agent's `config.yaml` (from any Git repository kas mirrors).
struct AgentConfig;

impl Target for AgentConfig {
    fn name(&self) -> &'static str {
        "agent-config"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            "gitops:\n  manifest_projects:\n  - id: group/app\n    default_namespace: dude\n    paths:\n    - glob: '/manifests/**/*.{yaml,yml,json}'\n    reconcile_timeout: 1h30m\n    prune_propagation_policy: foreground\n    inventory_policy: adopt_if_no_inventory\n",
            "ci_access:\n  projects:\n  - id: group/app\n    default_namespace: ci\n    access_as:\n      ci_job: {}\n    environments: [production, 'review/*']\n  groups:\n  - id: group\n    access_as:\n      impersonate:\n        username: deployer\n        groups: [a, b]\n",
            "user_access:\n  access_as:\n    user: {}\n  projects:\n  - id: group/app\nobservability:\n  logging:\n    level: debug\n",
            "{\"gitops\": {\"manifest_projects\": [{\"id\": 42}]}}",
        ]
        .map(|s| s.as_bytes().to_vec())
        .to_vec()
    }

    fn run(&self, input: &[u8]) -> bool {
        tether_agent_config::parse_bytes(input).is_ok()
    }
}

/// Manifest files from a manifest project (YAML multi-document or JSON).
struct Manifests;

impl Target for Manifests {
    fn name(&self) -> &'static str {
        "manifests"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: dude\n  labels: {app: web}\nspec:\n  replicas: 2\n  template:\n    spec:\n      containers:\n      - name: c\n        image: nginx\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  a: \"1\"\n",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: s\n",
            "{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"j\"}, \"data\": {\"k\": \"v\"}}",
            "base: &b {apiVersion: v1, kind: ConfigMap}\n---\n<<: *b\nmetadata: {name: merged}\n",
        ]
        .map(|s| s.as_bytes().to_vec())
        .to_vec()
    }

    fn run(&self, input: &[u8]) -> bool {
        let yaml = tether_gitops_agent::decode_file("m/objects.yaml", input).is_ok();
        let json = tether_gitops_agent::decode_file("m/objects.json", input).is_ok();
        yaml || json
    }
}

/// Push webhooks: the first line is the token/signature header value, the rest the body.
struct Webhooks;

impl Target for Webhooks {
    fn name(&self) -> &'static str {
        "webhooks"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let body = br#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567","project":{"id":1}}"#;
        let mut gitlab = b"s3cret\n".to_vec();
        gitlab.extend_from_slice(body);
        let mut hub = b"sha256=".to_vec();
        hub.extend_from_slice(hex::encode(sha2_hmac_placeholder()).as_bytes());
        hub.push(b'\n');
        hub.extend_from_slice(body);
        vec![gitlab, hub]
    }

    fn run(&self, input: &[u8]) -> bool {
        let split = input
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(input.len());
        let (value, body) = input.split_at(split);
        let body = body.get(1..).unwrap_or_default();
        let header = |name: &str| match name {
            "x-gitlab-token" | "x-hub-signature-256" | "x-gitea-signature" => Some(value),
            _ => None,
        };
        let verified = tether_git_source::webhook::verify_webhook_with(header, body, b"s3cret");
        let event = tether_git_source::PushEvent::from_body(body);
        if let Some(e) = &event {
            let _ = (e.branch(), e.tag(), e.is_deletion());
        }
        verified.is_ok() || event.is_some()
    }
}

/// Not a real signature: only its shape (64 hex digits) matters as a seed.
fn sha2_hmac_placeholder() -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b"seed").into()
}

/// The `Authorization` header of Kubernetes API proxy requests.
struct ProxyCredentials;

impl Target for ProxyCredentials {
    fn name(&self) -> &'static str {
        "proxy-credentials"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            "Bearer ci:12:eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
            "Bearer pat:3:tether_0123456789abcdef0123456789abcdef",
            "bearer pat:0:",
        ]
        .map(|s| s.as_bytes().to_vec())
        .to_vec()
    }

    fn run(&self, input: &[u8]) -> bool {
        let Ok(value) = http::HeaderValue::from_bytes(input) else {
            return false;
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        tether_kubeproxy_server::Credential::from_headers(&headers).is_ok()
    }
}

/// What kas sends agentk with each tunnelled Kubernetes API request (identity to replay as and
/// the request context), and the client's headers agentk sanitizes.
struct ImpersonationMetadata;

impl Target for ImpersonationMetadata {
    fn name(&self) -> &'static str {
        "impersonation-metadata"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            r#"{"agent":{}}"#,
            r#"{"ci_job":{}}"#,
            r#"{"impersonate":{"username":"u","groups":["g"],"extra":[{"key":"k","val":["v"]}]}}"#,
            r#"{"agent_id":1,"config_project_id":2,"ci_job":{"job_id":3,"pipeline_id":4,"project_id":5,"group_ids":[6],"username":"u","environment":{"slug":"prod","tier":"production"}}}"#,
            "Impersonate-User: x\nAccept: application/json\n",
        ]
        .map(|s| s.as_bytes().to_vec())
        .to_vec()
    }

    fn run(&self, input: &[u8]) -> bool {
        let access = serde_json_from::<tether_kubeproxy_agent::AccessAs>(input);
        let context = serde_json_from::<tether_kubeproxy_agent::RequestContext>(input);
        // The tunnel metadata contract as agentk decodes it: the input split in two values.
        let text = String::from_utf8_lossy(input);
        let mid = (0..=text.len() / 2)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        let (a, c) = text.split_at(mid);
        let meta = std::collections::HashMap::from([
            (
                tether_kubeproxy_agent::META_ACCESS_AS.to_string(),
                a.to_string(),
            ),
            (
                tether_kubeproxy_agent::META_CONTEXT.to_string(),
                c.to_string(),
            ),
        ]);
        let routed = tether_kubeproxy_agent::RoutedRequest::decode(&meta).is_ok();
        let mut headers = http::HeaderMap::new();
        for line in input.split(|&b| b == b'\n') {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = line.split_at(colon);
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name),
                http::HeaderValue::from_bytes(value[1..].trim_ascii()),
            ) {
                headers.append(n, v);
            }
        }
        let sanitized = tether_kubeproxy_agent::sanitize_request_headers(&headers).is_ok();
        access || context || routed || sanitized
    }
}

fn serde_json_from<T: serde::de::DeserializeOwned>(input: &[u8]) -> bool {
    serde_json::from_slice::<T>(input).is_ok()
}

const ISSUER: &str = "https://gitlab.example.com";

/// A JWKS fetcher that serves one document (the fuzzed one, or a fixed seed).
#[derive(Debug)]
struct Served(Vec<u8>);

#[async_trait::async_trait]
impl JwksFetcher for Served {
    async fn fetch(&self, _url: &str) -> Result<Vec<u8>, FetchError> {
        Ok(self.0.clone())
    }
}

/// The RSA test key of the kubeproxy-server tests (a throwaway key, see its README).
const TEST_KEY: &[u8] = include_bytes!("../../kubeproxy-server/tests/data/rsa-test-key.pem");

/// CI job ID tokens (`jwks: false`) or the issuer's JWKS document (`jwks: true`), through
/// kas's real verifier.
struct Jwt {
    jwks: bool,
    runtime: tokio::runtime::Runtime,
    /// A job token signed with the test key, and the issuer's JWKS holding that key.
    token: String,
    document: Vec<u8>,
}

impl Jwt {
    fn new(jwks: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a tokio runtime for the JWT target: {e}"));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(TEST_KEY)
            .unwrap_or_else(|e| panic!("the RSA test key: {e}"));
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256)
                .unwrap_or_else(|e| panic!("its public JWK: {e}"));
        jwk.common.key_id = Some("k1".into());
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("k1".into());
        let token = jsonwebtoken::encode(&header, &claims(), &key)
            .unwrap_or_else(|e| panic!("signing a seed token: {e}"));
        let document = serde_json::to_vec(&serde_json::json!({"keys": [jwk]}))
            .unwrap_or_else(|e| panic!("encoding the JWKS: {e}"));
        Self {
            jwks,
            runtime,
            token,
            document,
        }
    }

    fn verifier(document: Vec<u8>) -> OidcVerifier {
        let source = JwksSource::Url(format!("{ISSUER}/oauth/discovery/keys"));
        let cache = JwksCache::new(
            [(ISSUER.to_string(), source.clone())],
            Arc::new(Served(document)),
        );
        let issuer = TrustedIssuer {
            issuer: ISSUER.into(),
            audience: "kas".into(),
            jwks: source,
            claims: Default::default(),
            namespaces: None,
        };
        OidcVerifier::with_cache(vec![issuer], cache)
    }
}

/// The claims of a GitLab CI job ID token, valid at the fixed time the target verifies at.
fn claims() -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "aud": "kas", "sub": "project_path:g/a:ref_type:branch:ref:main",
        "exp": 1_900_000_000u64, "nbf": 1_700_000_000u64, "iat": 1_700_000_000u64,
        "project_id": "42", "project_path": "g/a", "namespace_id": "7", "namespace_path": "g",
        "job_id": "1", "pipeline_id": "2", "user_login": "u", "ref": "main",
        "ref_type": "branch", "ref_protected": "true"
    })
}

impl Target for Jwt {
    fn name(&self) -> &'static str {
        if self.jwks { "jwks" } else { "jwt" }
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        if self.jwks {
            vec![self.document.clone()]
        } else {
            vec![self.token.clone().into_bytes()]
        }
    }

    fn run(&self, input: &[u8]) -> bool {
        let (document, token) = if self.jwks {
            (input.to_vec(), self.token.clone())
        } else {
            (
                self.document.clone(),
                String::from_utf8_lossy(input).into_owned(),
            )
        };
        let verifier = Self::verifier(document);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        self.runtime.block_on(verifier.verify(&token, now)).is_ok()
    }
}

/// kas's own configuration file.
struct KasConfig;

impl Target for KasConfig {
    fn name(&self) -> &'static str {
        "kas-config"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![
            include_bytes!("../../../docs/examples/kas.yaml").to_vec(),
            b"data_dir: /var/lib/kas\nagent:\n  listen:\n    address: '[::]:8150'\n".to_vec(),
        ]
    }

    fn run(&self, input: &[u8]) -> bool {
        let text = String::from_utf8_lossy(input);
        kas::config::Config::parse(&text, Path::new("kas.yaml")).is_ok()
    }
}
