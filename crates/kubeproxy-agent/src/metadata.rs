//! The metadata of a tunnelled `kubernetes_api` request: what kas decided about the caller,
//! carried to agentk in the tunnel's `RequestInfo.metadata` map.
//!
//! kas [`encode`s](RoutedRequest::encode) it and agentk [`decode`s](RoutedRequest::decode) it
//! with the same code, so the two sides cannot drift apart. Decoding is strict and fails
//! closed: a missing or unparsable key is an error, never a default. agentk answers such a
//! request with 403 and sends nothing to the API server, because any default would be
//! `access_as: agent` — the agent's own, usually broader, rights.

use std::collections::HashMap;

use crate::{AccessAs, RequestContext};

/// Metadata key of the identity mode ([`AccessAs`], JSON).
pub const META_ACCESS_AS: &str = "access_as";
/// Metadata key of the facts about the caller ([`RequestContext`], JSON).
pub const META_CONTEXT: &str = "context";

/// Everything agentk needs to replay a request as kas decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedRequest {
    /// The identity the request runs as.
    pub access_as: AccessAs,
    /// Facts about the caller, for the impersonation headers.
    pub context: RequestContext,
}

/// Why the metadata could not be encoded or decoded. Messages name keys, never values: a
/// context may hold a username, which has no place in a client-facing error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// A key the contract requires is absent.
    #[error("the request metadata has no {key:?} entry")]
    Missing {
        /// The missing key.
        key: &'static str,
    },
    /// A key's value does not parse as the contract's type.
    #[error("the request metadata's {key:?} entry does not parse: {reason}")]
    Malformed {
        /// The offending key.
        key: &'static str,
        /// What the parser said (positions and expectations, no values).
        reason: String,
    },
    /// A value could not be serialized (not expected for these types; reported, not hidden).
    #[error("the request metadata's {key:?} entry cannot be encoded: {reason}")]
    Encode {
        /// The key being encoded.
        key: &'static str,
        /// What the serializer said.
        reason: String,
    },
}

impl RoutedRequest {
    /// The tunnel metadata for this request.
    pub fn encode(&self) -> Result<HashMap<String, String>, MetadataError> {
        let enc = |key: &'static str, v: Result<String, serde_json::Error>| {
            v.map_err(|e| MetadataError::Encode {
                key,
                reason: e.to_string(),
            })
        };
        let access_as = enc(META_ACCESS_AS, serde_json::to_string(&self.access_as))?;
        let context = enc(META_CONTEXT, serde_json::to_string(&self.context))?;
        Ok(HashMap::from([
            (META_ACCESS_AS.to_owned(), access_as),
            (META_CONTEXT.to_owned(), context),
        ]))
    }

    /// The request kas routed, from the tunnel metadata. Other keys are ignored, so kas may
    /// add some (tracing, say) without breaking older agents.
    pub fn decode(meta: &HashMap<String, String>) -> Result<Self, MetadataError> {
        Ok(Self {
            access_as: field(meta, META_ACCESS_AS)?,
            context: field(meta, META_CONTEXT)?,
        })
    }
}

fn field<T: serde::de::DeserializeOwned>(
    meta: &HashMap<String, String>,
    key: &'static str,
) -> Result<T, MetadataError> {
    let raw = meta.get(key).ok_or(MetadataError::Missing { key })?;
    serde_json::from_str(raw).map_err(|e| MetadataError::Malformed {
        key,
        // serde_json's messages can quote the input ("unknown variant `x`"); keep only the
        // category and position so no caller data leaks into a response.
        reason: format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{CiJobContext, UserContext};
    use tether_agent_config::Impersonate;

    fn ci_job() -> RoutedRequest {
        RoutedRequest {
            access_as: AccessAs::CiJob,
            context: RequestContext {
                agent_id: 7,
                config_project_id: Some(3),
                ci_job: Some(CiJobContext {
                    job_id: 1,
                    pipeline_id: 2,
                    project_id: Some(42),
                    ..CiJobContext::default()
                }),
                user: None,
            },
        }
    }

    #[test]
    fn every_access_mode_round_trips() {
        let user = RoutedRequest {
            access_as: AccessAs::User,
            context: RequestContext {
                agent_id: 7,
                user: Some(UserContext {
                    username: "alice".into(),
                    ..UserContext::default()
                }),
                ..RequestContext::default()
            },
        };
        let imp = RoutedRequest {
            access_as: AccessAs::Impersonate(Impersonate {
                username: "deployer".into(),
                groups: vec!["ops".into()],
                uid: None,
                extra: Vec::new(),
            }),
            context: RequestContext::default(),
        };
        let agent = RoutedRequest {
            access_as: AccessAs::Agent,
            context: RequestContext::default(),
        };
        for r in [ci_job(), user, imp, agent] {
            let meta = r.encode().unwrap();
            assert_eq!(meta.len(), 2);
            assert_eq!(RoutedRequest::decode(&meta).unwrap(), r);
        }
    }

    #[test]
    fn missing_keys_are_errors_not_defaults() {
        for key in [META_ACCESS_AS, META_CONTEXT] {
            let mut meta = ci_job().encode().unwrap();
            meta.remove(key);
            assert_eq!(
                RoutedRequest::decode(&meta),
                Err(MetadataError::Missing { key })
            );
        }
        assert_eq!(
            RoutedRequest::decode(&HashMap::new()),
            Err(MetadataError::Missing {
                key: META_ACCESS_AS
            })
        );
    }

    #[test]
    fn unparsable_values_are_errors_not_defaults() {
        let cases = [
            (META_ACCESS_AS, ""),
            (META_ACCESS_AS, "agent"),
            (META_ACCESS_AS, "\"root\""),
            (META_ACCESS_AS, "null"),
            (META_CONTEXT, ""),
            (META_CONTEXT, "{"),
            (META_CONTEXT, "null"),
            (META_CONTEXT, r#"{"agent_id":7,"is_admin":true}"#),
            (META_CONTEXT, r#"{"agent_id":"7"}"#),
        ];
        for (key, value) in cases {
            let mut meta = ci_job().encode().unwrap();
            meta.insert(key.to_owned(), value.to_owned());
            match RoutedRequest::decode(&meta) {
                Err(MetadataError::Malformed { key: k, reason }) => {
                    assert_eq!(k, key, "{value:?}");
                    assert!(!reason.contains("root") && !reason.contains("is_admin"));
                }
                other => panic!("{key}={value:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_keys_are_ignored() {
        let mut meta = ci_job().encode().unwrap();
        meta.insert("trace_id".into(), "abc".into());
        assert_eq!(RoutedRequest::decode(&meta).unwrap(), ci_job());
    }
}
