//! The identity of a Kubernetes object: group, kind, namespace and name.
//!
//! The version is deliberately not part of the identity: `apps/v1` and `apps/v1beta2`
//! Deployments named `nginx` in `dude` are the same stored object, so duplicate detection,
//! the inventory and pruning must treat them as one.
//!
//! # String form
//!
//! `group/kind/namespace/name`, with an empty group for the core API group and an empty
//! namespace for cluster-scoped objects:
//!
//! - `apps/Deployment/dude/nginx`
//! - `/ConfigMap/dude/settings`
//! - `/Namespace//dude`
//! - `rbac.authorization.k8s.io/ClusterRole//system:viewer`
//!
//! Kubernetes forbids `/` and `%` in all four parts, so valid objects print exactly as above.
//! To make [`ObjRef::from_str`] a lossless inverse of `Display` for *any* value (a manifest
//! may be invalid; the inventory must still round-trip it), `%`, `/` and ASCII control
//! characters are percent-encoded (`%2F`, `%25`, `%0A`, ...).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Identity of one object in a cluster (no version).
///
/// `namespace` is `None` for cluster-scoped objects; never store `Some("")` (use
/// [`ObjRef::new`], which normalizes it), because the string form cannot tell the two apart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    /// API group; empty for the core group (`v1`).
    pub group: String,
    /// Kind, such as `Deployment`.
    pub kind: String,
    /// Namespace; `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl ObjRef {
    /// Builds a reference; an empty namespace is stored as `None` (cluster-scoped).
    pub fn new(
        group: impl Into<String>,
        kind: impl Into<String>,
        namespace: Option<&str>,
        name: impl Into<String>,
    ) -> Self {
        ObjRef {
            group: group.into(),
            kind: kind.into(),
            namespace: namespace.filter(|ns| !ns.is_empty()).map(str::to_owned),
            name: name.into(),
        }
    }

    /// The namespace, or `""` for cluster-scoped objects (the form events and logs use).
    pub fn namespace_or_empty(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }

    /// Whether this is a `CustomResourceDefinition`.
    pub fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.kind == "CustomResourceDefinition"
    }

    /// Whether this is a core `Namespace`.
    pub fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.kind == "Namespace"
    }
}

impl fmt::Display for ObjRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            escape(&self.group),
            escape(&self.kind),
            escape(self.namespace_or_empty()),
            escape(&self.name)
        )
    }
}

/// Why a string is not an [`ObjRef`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseObjRefError {
    /// Not exactly four `/`-separated parts.
    #[error("{input:?} is not an object reference (expected group/kind/namespace/name)")]
    Shape {
        /// The rejected input.
        input: String,
    },
    /// Kind or name is empty.
    #[error("{input:?} is not an object reference: the {part} is empty")]
    Empty {
        /// The rejected input.
        input: String,
        /// `kind` or `name`.
        part: &'static str,
    },
    /// A `%` not followed by two hexadecimal digits, or an escape that is not UTF-8.
    #[error("{input:?} is not an object reference: invalid %-escape")]
    Escape {
        /// The rejected input.
        input: String,
    },
}

impl FromStr for ObjRef {
    type Err = ParseObjRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let [group, kind, namespace, name] = parts.as_slice() else {
            return Err(ParseObjRefError::Shape {
                input: s.to_owned(),
            });
        };
        let un = |part: &str| {
            unescape(part).ok_or_else(|| ParseObjRefError::Escape {
                input: s.to_owned(),
            })
        };
        let (group, kind, namespace, name) = (un(group)?, un(kind)?, un(namespace)?, un(name)?);
        for (part, value) in [("kind", &kind), ("name", &name)] {
            if value.is_empty() {
                return Err(ParseObjRefError::Empty {
                    input: s.to_owned(),
                    part,
                });
            }
        }
        Ok(ObjRef::new(group, kind, Some(&namespace), name))
    }
}

/// Whether a character must be escaped in the string form (see the module docs).
fn needs_escape(c: char) -> bool {
    c == '%' || c == '/' || c.is_ascii_control()
}

/// Percent-encodes the few characters that would break the string form; every other
/// character (including non-ASCII) is kept, so valid objects print unchanged.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            // All escaped characters are ASCII, so one byte each.
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Inverse of [`escape`]; `None` for a malformed escape.
pub(crate) fn unescape(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        assert_eq!(
            ObjRef::new("apps", "Deployment", Some("dude"), "nginx").to_string(),
            "apps/Deployment/dude/nginx"
        );
        assert_eq!(
            ObjRef::new("", "Namespace", None, "dude").to_string(),
            "/Namespace//dude"
        );
        assert_eq!(
            ObjRef::new("", "ConfigMap", Some("dude"), "settings").to_string(),
            "/ConfigMap/dude/settings"
        );
        assert_eq!(
            ObjRef::new(
                "rbac.authorization.k8s.io",
                "ClusterRole",
                None,
                "system:viewer"
            )
            .to_string(),
            "rbac.authorization.k8s.io/ClusterRole//system:viewer"
        );
    }

    #[test]
    fn empty_namespace_is_cluster_scoped() {
        assert_eq!(ObjRef::new("", "Namespace", Some(""), "x").namespace, None);
    }

    #[test]
    fn round_trip() {
        let refs = [
            ObjRef::new("apps", "Deployment", Some("dude"), "nginx"),
            ObjRef::new("", "Namespace", None, "dude"),
            ObjRef::new("", "Secret", Some("ns"), "a.b-c"),
            ObjRef::new("x.io", "Weird", Some("n/s"), "we%ird/na\nme"),
            ObjRef::new("", "ConfigMap", Some("ns"), "ünïcode"),
        ];
        for r in refs {
            let s = r.to_string();
            assert_eq!(s.matches('/').count(), 3, "{s}");
            assert!(!s.contains('\n'));
            assert_eq!(s.parse::<ObjRef>(), Ok(r));
        }
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            "apps/Deployment/nginx".parse::<ObjRef>(),
            Err(ParseObjRefError::Shape { .. })
        ));
        assert!(matches!(
            "a/b/c/d/e".parse::<ObjRef>(),
            Err(ParseObjRefError::Shape { .. })
        ));
        assert!(matches!(
            "apps//dude/nginx".parse::<ObjRef>(),
            Err(ParseObjRefError::Empty { part: "kind", .. })
        ));
        assert!(matches!(
            "apps/Deployment/dude/".parse::<ObjRef>(),
            Err(ParseObjRefError::Empty { part: "name", .. })
        ));
        assert!(matches!(
            "apps/Deployment/dude/a%zz".parse::<ObjRef>(),
            Err(ParseObjRefError::Escape { .. })
        ));
        assert!(matches!(
            "apps/Deployment/dude/a%2".parse::<ObjRef>(),
            Err(ParseObjRefError::Escape { .. })
        ));
        assert!(matches!(
            "apps/Deployment/dude/%FF".parse::<ObjRef>(),
            Err(ParseObjRefError::Escape { .. })
        ));
    }

    #[test]
    fn ordering_groups_by_group_kind_namespace() {
        let mut v = [
            ObjRef::new("apps", "Deployment", Some("b"), "x"),
            ObjRef::new("", "Namespace", None, "b"),
            ObjRef::new("apps", "Deployment", Some("a"), "y"),
            ObjRef::new("", "ConfigMap", Some("a"), "z"),
        ];
        v.sort();
        let s: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            [
                "/ConfigMap/a/z",
                "/Namespace//b",
                "apps/Deployment/a/y",
                "apps/Deployment/b/x"
            ]
        );
    }
}
