//! The kubeconfigs kas hands out: to a CI job (`GET <prefix>/.tether/kubeconfig`) and to a
//! person (`kas user-token create --kubeconfig`). Both come from [`Kubeconfig`], so both carry
//! the proxy's CA when kas has one (`kubernetes_api.ca_file`); before, the person's did not and
//! kubectl failed with "certificate signed by unknown authority".

use base64::Engine;
use serde::Serialize;

/// Name of the one cluster entry (kas's proxy).
pub const CLUSTER_NAME: &str = "kas";

/// Why a kubeconfig cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    /// The CA is not PEM certificates; kubectl would reject the kubeconfig.
    #[error("the proxy's CA is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    CaNotPem,
    /// The server URL is not `http(s)://...`.
    #[error("server {0:?} is not an http:// or https:// URL")]
    BadServer(String),
    /// No context was added: the kubeconfig would reach nothing.
    #[error("a kubeconfig needs at least one context")]
    NoContext,
    /// Two contexts with one name; kubectl would silently use one of them.
    #[error("context {0:?} is added twice")]
    DuplicateContext(String),
    /// JSON serialization failed (not expected: the document is strings only).
    #[error("serializing the kubeconfig failed: {0}")]
    Serialize(String),
}

/// Checks that `pem` holds at least one PEM certificate, as `certificate-authority-data`
/// requires; for checking `kubernetes_api.ca_file` when kas starts.
pub fn check_ca_pem(pem: &[u8]) -> Result<(), KubeconfigError> {
    let text = std::str::from_utf8(pem).map_err(|_| KubeconfigError::CaNotPem)?;
    if text.contains("-----BEGIN CERTIFICATE-----") && text.contains("-----END CERTIFICATE-----") {
        Ok(())
    } else {
        Err(KubeconfigError::CaNotPem)
    }
}

/// A kubeconfig for kas's proxy: one cluster, and per agent one user and one context of the
/// same name. The first context added is the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubeconfig {
    server: String,
    ca_data: Option<String>,
    contexts: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    token: String,
    namespace: Option<String>,
}

impl Kubeconfig {
    /// A kubeconfig for the proxy at `server`, trusting `ca_pem` (PEM) when given; without it,
    /// clients use their system's roots.
    pub fn new(server: &str, ca_pem: Option<&[u8]>) -> Result<Self, KubeconfigError> {
        if !(server.starts_with("https://") || server.starts_with("http://")) {
            return Err(KubeconfigError::BadServer(server.to_owned()));
        }
        let ca_data = ca_pem
            .map(|pem| {
                check_ca_pem(pem)?;
                Ok(base64::engine::general_purpose::STANDARD.encode(pem))
            })
            .transpose()?;
        Ok(Self {
            server: server.to_owned(),
            ca_data,
            contexts: Vec::new(),
        })
    }

    /// Adds a context `name` that sends `token` (`ci:…` or `pat:…`), in `namespace` if given.
    pub fn add_context(
        &mut self,
        name: &str,
        token: &str,
        namespace: Option<&str>,
    ) -> Result<&mut Self, KubeconfigError> {
        if self.contexts.iter().any(|c| c.name == name) {
            return Err(KubeconfigError::DuplicateContext(name.to_owned()));
        }
        self.contexts.push(Entry {
            name: name.to_owned(),
            token: token.to_owned(),
            namespace: namespace.map(str::to_owned),
        });
        Ok(self)
    }

    /// The kubeconfig as JSON (kubectl reads JSON as YAML), pretty-printed.
    pub fn to_json(&self) -> Result<String, KubeconfigError> {
        let current = self.contexts.first().ok_or(KubeconfigError::NoContext)?;
        let doc = Document {
            api_version: "v1",
            kind: "Config",
            clusters: [Named {
                name: CLUSTER_NAME,
                cluster: Some(Cluster {
                    server: &self.server,
                    certificate_authority_data: self.ca_data.as_deref(),
                }),
                user: None,
                context: None,
            }],
            users: self.contexts.iter().map(Entry::user).collect(),
            contexts: self.contexts.iter().map(Entry::context).collect(),
            current_context: &current.name,
        };
        serde_json::to_string_pretty(&doc).map_err(|e| KubeconfigError::Serialize(e.to_string()))
    }
}

impl Entry {
    fn user(&self) -> Named<'_> {
        Named {
            name: &self.name,
            cluster: None,
            user: Some(User { token: &self.token }),
            context: None,
        }
    }

    fn context(&self) -> Named<'_> {
        Named {
            name: &self.name,
            cluster: None,
            user: None,
            context: Some(Context {
                cluster: CLUSTER_NAME,
                user: &self.name,
                namespace: self.namespace.as_deref(),
            }),
        }
    }
}

#[derive(Serialize)]
struct Document<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: [Named<'a>; 1],
    users: Vec<Named<'a>>,
    contexts: Vec<Named<'a>>,
    #[serde(rename = "current-context")]
    current_context: &'a str,
}

/// `{name, cluster|user|context}`: the shape of every kubeconfig list entry.
#[derive(Serialize)]
struct Named<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<Cluster<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<User<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Context<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster<'a> {
    server: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_authority_data: Option<&'a str>,
}

#[derive(Serialize)]
struct User<'a> {
    token: &'a str,
}

#[derive(Serialize)]
struct Context<'a> {
    cluster: &'a str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::{Value, json};

    const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn parse(k: &Kubeconfig) -> Value {
        serde_json::from_str(&k.to_json().unwrap()).unwrap()
    }

    #[test]
    fn carries_the_ca_server_tokens_and_namespaces() {
        let mut k = Kubeconfig::new("https://kas.example:8154/k8s-proxy", Some(CA)).unwrap();
        k.add_context("group/config:prod", "ci:1:jwt", Some("apps"))
            .unwrap()
            .add_context("group/config:dev", "ci:2:jwt", None)
            .unwrap();
        let ca = base64::engine::general_purpose::STANDARD.encode(CA);
        assert_eq!(
            parse(&k),
            json!({
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kas", "cluster": {
                    "server": "https://kas.example:8154/k8s-proxy",
                    "certificate-authority-data": ca,
                }}],
                "users": [
                    {"name": "group/config:prod", "user": {"token": "ci:1:jwt"}},
                    {"name": "group/config:dev", "user": {"token": "ci:2:jwt"}},
                ],
                "contexts": [
                    {"name": "group/config:prod", "context": {"cluster": "kas", "user": "group/config:prod", "namespace": "apps"}},
                    {"name": "group/config:dev", "context": {"cluster": "kas", "user": "group/config:dev"}},
                ],
                "current-context": "group/config:prod",
            })
        );
    }

    #[test]
    fn without_a_ca_there_is_no_ca_data() {
        let mut k = Kubeconfig::new("https://kas.example", None).unwrap();
        k.add_context("a", "pat:1:t", None).unwrap();
        let v = parse(&k);
        assert_eq!(
            v["clusters"][0]["cluster"],
            json!({"server": "https://kas.example"})
        );
    }

    #[test]
    fn refuses_what_kubectl_could_not_use() {
        for bad in [&b"not a certificate"[..], b"", b"\xff\xfe"] {
            assert_eq!(
                Kubeconfig::new("https://k", Some(bad)),
                Err(KubeconfigError::CaNotPem)
            );
        }
        assert_eq!(
            Kubeconfig::new("kas.example:8154", None),
            Err(KubeconfigError::BadServer("kas.example:8154".into()))
        );
        let k = Kubeconfig::new("https://k", Some(CA)).unwrap();
        assert_eq!(k.to_json(), Err(KubeconfigError::NoContext));
        let mut k = k;
        k.add_context("a", "t", None).unwrap();
        assert_eq!(
            k.add_context("a", "u", None).err(),
            Some(KubeconfigError::DuplicateContext("a".into()))
        );
    }
}
