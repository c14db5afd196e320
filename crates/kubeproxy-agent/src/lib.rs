//! Agent half of Kubernetes API access: replay requests routed by kas against the
//! kube-apiserver with the agent's ServiceAccount and the configured impersonation.
