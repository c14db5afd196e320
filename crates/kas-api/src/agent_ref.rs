//! How people name an agent on the command line: its id, or `<configuration project
//! path>:<agent name>` — the kubeconfig context name they already know.

use std::fmt;
use std::str::FromStr;

/// An agent by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRef {
    Id(i64),
    Name { project: String, name: String },
}

/// Why a text names no agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither an agent id nor <project path>:<agent name> (e.g. group/app:my-agent)")]
pub struct InvalidAgentRef(String);

impl FromStr for AgentRef {
    type Err = InvalidAgentRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = s.parse::<i64>() {
            return Ok(Self::Id(id));
        }
        // Project paths never hold ':' and agent names never do either, so the split is
        // unambiguous.
        match s.split_once(':') {
            Some((project, name))
                if !project.is_empty() && !name.is_empty() && !name.contains(':') =>
            {
                Ok(Self::Name {
                    project: project.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(InvalidAgentRef(s.to_owned())),
        }
    }
}

impl fmt::Display for AgentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Name { project, name } => write!(f, "{project}:{name}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_context_names_parse() {
        assert_eq!("42".parse::<AgentRef>().unwrap(), AgentRef::Id(42));
        let r: AgentRef = "group/sub/app:my-agent".parse().unwrap();
        assert_eq!(
            r,
            AgentRef::Name {
                project: "group/sub/app".into(),
                name: "my-agent".into()
            }
        );
        assert_eq!(r.to_string(), "group/sub/app:my-agent");
        for bad in ["", "group/app", ":agent", "group/app:", "a:b:c"] {
            assert!(bad.parse::<AgentRef>().is_err(), "{bad:?}");
        }
    }
}
