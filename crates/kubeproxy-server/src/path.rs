//! Where the proxy's Kubernetes API lives under `kubernetes_api.path_prefix`.

/// The Kubernetes API path of a request for `path` when the proxy is served under `prefix`
/// (`/k8s-proxy`, with or without a trailing `/`; `/` or empty for the root), or `None` when
/// the request is not under the prefix.
///
/// The prefix matches whole path segments: `/k8s-proxy/api` and `/k8s-proxy` are under
/// `/k8s-proxy`, `/k8s-proxyX/api` and `/k8s-proxy*` are not. A plain string prefix would
/// hand the API server paths like `X/api` or `*` that no client meant.
pub fn strip_path_prefix<'a>(prefix: &str, path: &'a str) -> Option<&'a str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    match rest {
        "" => Some("/"),
        r if r.starts_with('/') => Some(r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::strip_path_prefix;

    #[test]
    fn matches_whole_segments_only() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("/k8s-proxy", "/k8s-proxy/api/v1/pods", Some("/api/v1/pods")),
            ("/k8s-proxy/", "/k8s-proxy/api", Some("/api")),
            ("/k8s-proxy", "/k8s-proxy", Some("/")),
            ("/k8s-proxy", "/k8s-proxy/", Some("/")),
            ("/k8s-proxy", "/k8s-proxyX/api", None),
            ("/k8s-proxy", "/k8s-proxy*", None),
            ("/k8s-proxy", "/k8s-prox", None),
            ("/k8s-proxy", "/api/v1/pods", None),
            ("/k8s-proxy", "/other/k8s-proxy/api", None),
            ("/a/b", "/a/b/api", Some("/api")),
            ("/a/b", "/a/bc/api", None),
            ("/a/b", "/a/api", None),
            ("/", "/api/v1", Some("/api/v1")),
            ("/", "/", Some("/")),
            ("", "/api", Some("/api")),
            ("/", "*", None),
        ];
        for (prefix, path, want) in cases {
            assert_eq!(
                strip_path_prefix(prefix, path),
                *want,
                "{prefix:?} {path:?}"
            );
        }
    }
}
