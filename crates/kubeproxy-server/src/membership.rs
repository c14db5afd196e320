//! A membership as people write it on the command line, `project:<path>[:<id>]:<role>` or
//! `group:<path>[:<id>]:<role>`, parsed once at the edge; and memberships as the store keeps
//! them (JSON text).

use std::str::FromStr;

use crate::{AccessLevel, Membership, MembershipKind};

/// Why a membership spec was refused. Each message starts with the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipSpecError {
    #[error("{0}: expected project|group:<path>[:<id>]:<role>")]
    Shape(String),
    #[error("{0}: kind must be project or group")]
    Kind(String),
    #[error("{0}: id must be a number")]
    Id(String),
    #[error("{0}: role must be one of guest, planner, reporter, developer, maintainer, owner")]
    Role(String),
}

impl FromStr for AccessLevel {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        AccessLevel::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or(())
    }
}

impl FromStr for Membership {
    type Err = MembershipSpecError;

    /// `project:group/app:42:developer` or `group:group:maintainer`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (kind, path, id, role) = match parts.as_slice() {
            [k, p, r] => (*k, *p, None, *r),
            [k, p, i, r] => (*k, *p, Some(*i), *r),
            _ => return Err(MembershipSpecError::Shape(spec.into())),
        };
        let kind = match kind {
            "project" => MembershipKind::Project,
            "group" => MembershipKind::Group,
            _ => return Err(MembershipSpecError::Kind(spec.into())),
        };
        let id = id
            .map(|i| i.parse::<i64>())
            .transpose()
            .map_err(|_| MembershipSpecError::Id(spec.into()))?;
        let access_level = role
            .parse()
            .map_err(|()| MembershipSpecError::Role(spec.into()))?;
        Ok(Membership {
            kind,
            path: path.into(),
            id,
            access_level,
        })
    }
}

/// What a token with these memberships will not get, said when it is issued: with
/// `access_as: user`, a project or group is named in the impersonated groups by its id
/// (`gitlab:project_role:<id>:<role>`), so a membership without one authorizes requests but
/// adds no such group, and RoleBindings on them do not match (a 403 from Kubernetes with
/// nothing saying why). Roles below Developer grant nothing, so they are not mentioned.
pub fn membership_warnings(memberships: &[Membership]) -> Vec<String> {
    memberships
        .iter()
        .filter(|m| m.id.is_none() && m.access_level >= AccessLevel::Developer)
        .map(|m| {
            let (kind, prefix) = match m.kind {
                MembershipKind::Project => ("project", "project_role"),
                MembershipKind::Group => ("group", "group_role"),
            };
            let role = m.access_level.as_str();
            format!(
                "{kind}:{path}:{role} has no id: with access_as: user, requests are authorized but carry no gitlab:{prefix}:<id>:<role> groups for it, so RoleBindings on those groups do not match; give it as {kind}:{path}:<id>:{role}",
                path = m.path,
            )
        })
        .collect()
}

/// Memberships as the store keeps them.
pub fn memberships_to_json(memberships: &[Membership]) -> String {
    // A Vec of plain structs and enums always serializes.
    serde_json::to_string(memberships).unwrap_or_else(|_| "[]".into())
}

/// Memberships as the store keeps them, read back.
pub fn memberships_from_json(json: &str) -> Result<Vec<Membership>, serde_json::Error> {
    serde_json::from_str(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse() {
        assert_eq!(
            "project:group/app:42:developer".parse::<Membership>(),
            Ok(Membership {
                kind: MembershipKind::Project,
                path: "group/app".into(),
                id: Some(42),
                access_level: AccessLevel::Developer,
            })
        );
        assert_eq!(
            "group:group:maintainer".parse::<Membership>(),
            Ok(Membership {
                kind: MembershipKind::Group,
                path: "group".into(),
                id: None,
                access_level: AccessLevel::Maintainer,
            })
        );
    }

    #[test]
    fn each_mistake_has_its_own_error() {
        let e = |s: &str| s.parse::<Membership>().expect_err(s).to_string();
        assert_eq!(
            e("group"),
            "group: expected project|group:<path>[:<id>]:<role>"
        );
        assert_eq!(
            e("user:x:developer"),
            "user:x:developer: kind must be project or group"
        );
        assert_eq!(
            e("group:g:x1:owner"),
            "group:g:x1:owner: id must be a number"
        );
        assert!(e("group:g:boss").starts_with("group:g:boss: role must be one of guest"));
    }

    #[test]
    fn a_membership_without_an_id_is_warned_of_unless_it_grants_nothing() {
        let parse = |s: &str| s.parse::<Membership>().expect(s);
        let m = [
            parse("project:group/app:42:developer"),
            parse("project:group/web:maintainer"),
            parse("group:group:owner"),
            parse("project:group/docs:reporter"),
        ];
        let w = membership_warnings(&m);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("project:group/web:maintainer has no id:")
                && w[0].contains("gitlab:project_role:<id>:<role>")
                && w[0].ends_with("give it as project:group/web:<id>:maintainer"),
            "{}",
            w[0]
        );
        assert!(
            w[1].starts_with("group:group:owner has no id:")
                && w[1].contains("gitlab:group_role:<id>:<role>"),
            "{}",
            w[1]
        );
    }

    #[test]
    fn the_stored_form_round_trips() {
        let m: Vec<Membership> = vec!["group:g:7:owner".parse().expect("membership")];
        let json = memberships_to_json(&m);
        assert_eq!(
            json,
            r#"[{"kind":"group","path":"g","id":7,"access_level":"owner"}]"#
        );
        assert_eq!(memberships_from_json(&json).expect("decode"), m);
    }
}
