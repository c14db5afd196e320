//! Wire types shared by kas and agentk.
//!
//! Holds the gRPC services and messages of every capability (reverse tunnel, agent
//! configuration, GitOps, Kubernetes API access). Both binaries depend on it; it depends on
//! neither half of any capability.

/// Generated code does not follow our lint rules; keep it contained.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod tunnel {
    tonic::include_proto!("tether.tunnel.v1");
}

/// The agent configuration stream.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod agent_configuration {
    tonic::include_proto!("tether.agent_configuration.v1");
}

/// GitOps: manifests from kas, sync reports from the agent.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod gitops {
    tonic::include_proto!("tether.gitops.v1");
}

/// Words both halves write into sync reports.
pub mod report {
    /// Starts the warning of a report whose objects were applied at an earlier commit than the
    /// one it reports (of which nothing was applied); that commit follows.
    pub const OBJECTS_AS_OF: &str =
        "nothing was applied at this commit; the objects are as of commit";
}

pub mod codec;
pub mod frames;
pub mod render;
pub mod returning;

/// gRPC metadata keys agentk sends on every RPC so kas can show who is connected.
pub mod metadata {
    /// `authorization: Bearer <agent token>`.
    pub const AUTHORIZATION: &str = "authorization";
    pub const AGENT_VERSION: &str = "x-tether-agent-version";
    pub const POD_NAME: &str = "x-tether-pod-name";
    pub const POD_NAMESPACE: &str = "x-tether-pod-namespace";
    /// The UID of the ServiceAccount agentk runs as: the same for an agent's replicas,
    /// another in another cluster (kas warns when one token is used from two).
    pub const CLUSTER_ID: &str = "x-tether-cluster-id";

    use tonic::metadata::AsciiMetadataValue;
    use tonic::metadata::errors::InvalidMetadataValue;

    /// The [`AUTHORIZATION`] value for `token`: `Bearer <token>`, marked sensitive so that
    /// tonic, hyper and `Debug` output never show the token. Fails only for a token with
    /// characters not allowed in metadata (e.g. a newline).
    pub fn bearer(token: &str) -> Result<AsciiMetadataValue, InvalidMetadataValue> {
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))?;
        value.set_sensitive(true);
        Ok(value)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn bearer_is_sensitive_and_refuses_control_characters() {
            let v = super::bearer("abc").expect("valid token");
            assert_eq!(v.to_str().ok(), Some("Bearer abc"));
            assert!(v.is_sensitive());
            assert!(!format!("{v:?}").contains("abc"));
            assert!(super::bearer("a\nb").is_err());
        }
    }
}

/// Names of the services an agent serves over the tunnel.
pub mod services {
    /// Copies every byte back: a health check and a benchmark of the tunnel itself.
    pub const ECHO: &str = "echo";
    /// One HTTP/1.1 connection to the Kubernetes API, replayed by the agent with impersonation.
    pub const KUBERNETES_API: &str = "kubernetes_api";
}

/// How agentk's error frame starts when its side of a tunnelled request ended before the
/// answer did (the Kubernetes API server broke the connection under a watch): kas tells its
/// caller that, not that the agent or the tunnel went away.
pub const CUT_SHORT: &str = "the agent's side of the request ended before its answer did";

/// Largest gRPC message either side accepts (data frames are much smaller; this bounds abuse).
pub const MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;
/// Size of the data frames the tunnel sends.
pub const DATA_CHUNK: usize = 64 * 1024;
