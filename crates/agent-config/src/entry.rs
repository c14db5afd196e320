//! Naming one `gitops.manifest_projects[]` entry: by its project alone, or (when a project is
//! listed more than once, one entry per folder of a monorepo) by project and `name`, written
//! `group/app#apps`. `#` cannot occur in a project path, so the two forms never meet.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ConfigError;
use crate::gitops::ProjectRef;

/// Separates a project from an entry's name in entry keys and `depends_on`.
pub const NAME_SEPARATOR: char = '#';

/// The longest entry `name`: short enough that `group/app#name` stays readable in status
/// rows, and that inventory ids (which keep a readable part) stay informative.
pub const MAX_ENTRY_NAME: usize = 40;

/// The rule an entry `name` follows, as error messages state it.
pub const ENTRY_NAME_RULE: &str = "1 to 40 lowercase letters, digits or '-', starting and \
     ending with a letter or digit (a DNS label)";

/// Whether `name` is a valid entry name ([`ENTRY_NAME_RULE`]). Pure.
pub fn is_entry_name(name: &str) -> bool {
    let b = name.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=MAX_ENTRY_NAME).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

pub(crate) fn check_entry_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if is_entry_name(name) {
        return Ok(());
    }
    Err(ConfigError::invalid(
        path,
        format!("{name:?} is not a valid entry name: expected {ENTRY_NAME_RULE}"),
    ))
}

/// The key of an entry: `project` as written (unnamed: exactly what it always was, so that
/// inventories and stored reports carry over), or `project#name`.
pub fn entry_key(project: &ProjectRef, name: Option<&str>) -> String {
    match name {
        None => project.to_string(),
        Some(name) => format!("{project}{NAME_SEPARATOR}{name}"),
    }
}

/// Splits an entry key (as agents send it in `project_id`) into the project as written and
/// the entry's name; a key without `#` is an unnamed entry. Pure.
pub fn split_entry_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once(NAME_SEPARATOR) {
        Some((project, name)) => (project, Some(name)),
        None => (key, None),
    }
}

/// A `depends_on` item: another entry, by project (the unnamed entry) or `project#name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryRef {
    pub project: ProjectRef,
    pub name: Option<String>,
}

impl EntryRef {
    /// The unnamed entry of `project`.
    pub fn project(project: ProjectRef) -> Self {
        EntryRef {
            project,
            name: None,
        }
    }

    /// How entries are matched: [`ProjectRef::identity`], plus `#name` for a named one.
    pub fn identity(&self) -> String {
        entry_identity(&self.project, self.name.as_deref())
    }

    pub(crate) fn validate(&self, path: &str) -> Result<(), ConfigError> {
        self.project.validate(path)?;
        match &self.name {
            Some(name) => check_entry_name(path, name),
            None => Ok(()),
        }
    }
}

/// [`EntryRef::identity`] of the entry of `project` named `name`.
pub fn entry_identity(project: &ProjectRef, name: Option<&str>) -> String {
    match name {
        None => project.identity(),
        Some(name) => format!("{}{NAME_SEPARATOR}{name}", project.identity()),
    }
}

impl fmt::Display for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&entry_key(&self.project, self.name.as_deref()))
    }
}

impl Serialize for EntryRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.name {
            None => self.project.serialize(s),
            Some(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for EntryRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = EntryRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a project path (group/project), a numeric project id, or either followed \
                     by #name",
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EntryRef, E> {
                Ok(EntryRef::project(ProjectRef::Numeric(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EntryRef, E> {
                ProjectRef::deserialize(de::value::U64Deserializer::<E>::new(v))
                    .map(EntryRef::project)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EntryRef, E> {
                let (project, name) = split_entry_key(v);
                let project =
                    ProjectRef::deserialize(de::value::StrDeserializer::<E>::new(project))?;
                Ok(EntryRef {
                    project,
                    name: name.map(str::to_owned),
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_short_dns_labels() {
        for good in ["a", "apps", "infra-1", "0", &"a".repeat(40)] {
            assert!(is_entry_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Apps",
            "a_b",
            "a.b",
            "a#b",
            "a/b",
            &"a".repeat(41),
        ] {
            assert!(!is_entry_name(bad), "{bad}");
        }
    }

    #[test]
    fn an_unnamed_entry_keeps_the_project_as_its_key() {
        let path = ProjectRef::Path("Group/App".to_owned());
        assert_eq!(entry_key(&path, None), "Group/App");
        assert_eq!(entry_key(&ProjectRef::Numeric(42), None), "42");
        assert_eq!(entry_key(&path, Some("apps")), "Group/App#apps");
        assert_eq!(entry_identity(&path, None), "group/app");
        assert_eq!(entry_identity(&path, Some("apps")), "group/app#apps");
        assert_eq!(
            split_entry_key("Group/App#apps"),
            ("Group/App", Some("apps"))
        );
        assert_eq!(split_entry_key("42"), ("42", None));
    }

    #[test]
    fn a_dependency_reads_a_project_and_an_optional_name() {
        let read = |json: &str| serde_json::from_str::<EntryRef>(json).expect("parses");
        let named = read("\"group/app#infra\"");
        assert_eq!(named.project, ProjectRef::Path("group/app".to_owned()));
        assert_eq!(named.name.as_deref(), Some("infra"));
        assert_eq!(read("42"), EntryRef::project(ProjectRef::Numeric(42)));
        assert_eq!(read("\"42\""), EntryRef::project(ProjectRef::Numeric(42)));
        assert_eq!(read("\"42#x\"").name.as_deref(), Some("x"));
        assert_eq!(read("\"42#x\"").project, ProjectRef::Numeric(42));
        assert_eq!(
            serde_json::to_string(&named).expect("json"),
            "\"group/app#infra\""
        );
        let numeric = EntryRef::project(ProjectRef::Numeric(7));
        assert_eq!(serde_json::to_string(&numeric).expect("json"), "7");
    }
}
