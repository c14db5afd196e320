//! Which manifest projects an agent's configuration may list. On a kas shared by several teams
//! any configuration could name any registered project, and kas sent its files to that agent:
//! a tenant read (and deployed) another tenant's private manifests by listing them (E13).
//! GitLab's agent lets a configuration use only projects it may read. Here a configuration may
//! list the manifest projects of its own top-level group (the first segment of the
//! configuration project's path), and those kas's `gitops.shared_manifest_projects` names for
//! every agent. Pure.

/// The rule in force: the projects shared with every agent, as path patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestAccess {
    shared: Vec<String>,
}

impl ManifestAccess {
    /// `shared`: exact paths, `group/*` (the projects right under a group), `group/**` (under it
    /// at any depth), or `**` (every project: listing any project, as before this rule).
    pub fn new(shared: Vec<String>) -> Self {
        Self {
            shared: shared.into_iter().map(|p| p.to_lowercase()).collect(),
        }
    }

    /// A pattern that is none of the forms [`ManifestAccess::new`] takes, if any.
    pub fn invalid_pattern(patterns: &[String]) -> Option<&String> {
        patterns.iter().find(|p| {
            let body = p.strip_suffix("/**").or_else(|| p.strip_suffix("/*"));
            let body = body.unwrap_or(p);
            p.as_str() != "**"
                && (body.is_empty()
                    || body.contains('*')
                    || body.starts_with('/')
                    || body.ends_with('/')
                    || body.split('/').any(str::is_empty))
        })
    }

    /// Whether the configuration in `config_project` may list `manifest_project` (paths, as
    /// kas records them; compared without case, as GitLab's paths are).
    pub fn allows(&self, config_project: &str, manifest_project: &str) -> bool {
        let (config, manifest) = (
            config_project.to_lowercase(),
            manifest_project.to_lowercase(),
        );
        top_group(&config) == top_group(&manifest)
            || self.shared.iter().any(|p| matches(p, &manifest))
    }

    /// Why the configuration in `config_project` may not list `manifest_project`.
    pub fn refusal(config_project: &str, manifest_project: &str) -> String {
        format!(
            "project {manifest_project:?} is outside this agent's group {:?}: a configuration lists only manifest projects of its own top-level group, or ones kas shares with every agent (gitops.shared_manifest_projects in kas's configuration)",
            top_group(config_project)
        )
    }
}

fn top_group(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

fn matches(pattern: &str, path: &str) -> bool {
    if pattern == "**" {
        return true;
    }
    if let Some(group) = pattern.strip_suffix("/**") {
        return path
            .strip_prefix(group)
            .is_some_and(|rest| rest.starts_with('/'));
    }
    if let Some(group) = pattern.strip_suffix("/*") {
        return path
            .strip_prefix(group)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|name| !name.is_empty() && !name.contains('/'));
    }
    pattern == path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_lists_its_own_groups_projects_and_the_shared_ones() {
        let none = ManifestAccess::default();
        assert!(none.allows("t1/config", "t1/manifests"));
        assert!(
            none.allows("t1/config", "T1/deep/sub/apps"),
            "any depth, any case"
        );
        assert!(
            !none.allows("t1/config", "t2/manifests"),
            "another tenant's"
        );
        assert!(
            !none.allows("t1/config", "t10/manifests"),
            "a prefix is not the group"
        );
        let shared = ManifestAccess::new(vec![
            "platform/base".into(),
            "charts/*".into(),
            "Common/**".into(),
        ]);
        assert!(shared.allows("t1/config", "platform/base"));
        assert!(!shared.allows("t1/config", "platform/secrets"));
        assert!(shared.allows("t1/config", "charts/nginx"));
        assert!(
            !shared.allows("t1/config", "charts/sub/nginx"),
            "* is one level"
        );
        assert!(shared.allows("t1/config", "common/a/b"));
        assert!(!shared.allows("t1/config", "commonly/a"));
        assert!(ManifestAccess::new(vec!["**".into()]).allows("t1/config", "t2/x"));
        let said = ManifestAccess::refusal("t1/config", "t2/manifests");
        assert!(
            said.starts_with("project \"t2/manifests\" is outside this agent's group \"t1\""),
            "{said}"
        );
    }

    #[test]
    fn patterns_of_another_form_are_named() {
        let bad = |p: &str| ManifestAccess::invalid_pattern(&[p.to_owned()]).cloned();
        for ok in ["**", "a/b", "a/*", "a/**", "a"] {
            assert_eq!(bad(ok), None, "{ok}");
        }
        for wrong in ["", "/a", "a/", "a*/b", "a//b", "*/b", "/**"] {
            assert_eq!(bad(wrong).as_deref(), Some(wrong), "{wrong:?}");
        }
    }
}
