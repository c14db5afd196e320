//! The one error type of this crate, and the translation of YAML deserializer errors into it.

use serde_saphyr::{ExternalMessageSource, Location};

/// Why a `config.yaml` was refused.
///
/// The `Display` form is meant to be shown as-is in a log line or an admin command's output:
/// it names the key path and, when known, the line (`gitops.manifest_projects[0].prune: invalid
/// type: string "maybe", expected a boolean (line 4)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file is over [`crate::MAX_CONFIG_SIZE`].
    #[error("config file is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The file's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The file is not UTF-8 text.
    #[error("config file is not valid UTF-8 (first invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// How many leading bytes are valid UTF-8.
        valid_up_to: usize,
    },
    /// The file is not well-formed YAML.
    #[error("invalid YAML at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line; 0 when the parser did not say.
        line: usize,
        /// 1-based column; 0 when the parser did not say.
        column: usize,
        /// The parser's description of the problem.
        message: String,
    },
    /// The YAML is well formed but does not match the schema or breaks a validation rule.
    #[error("{path}: {message}{}", line_suffix(*line))]
    Invalid {
        /// Key path such as `gitops.manifest_projects[0].ref`; `(top level)` for the document.
        path: String,
        /// 1-based line of the offending key or value, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

/// Shown for errors about the document as a whole, where a key path would be empty.
pub(crate) const ROOT_PATH: &str = "(top level)";

fn line_suffix(line: Option<usize>) -> String {
    match line {
        Some(line) => format!(" (line {line})"),
        None => String::new(),
    }
}

impl ConfigError {
    /// A validation error at `path`, line not yet known.
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            line: None,
            message: message.into(),
        }
    }

    /// The key path of an [`ConfigError::Invalid`] error.
    pub fn path(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            ConfigError::Syntax { line, .. } if *line > 0 => Some(*line),
            _ => None,
        }
    }

    /// Fills in a missing line of an `Invalid` error by looking its path up.
    pub(crate) fn locate(self, lookup: impl FnOnce(&str) -> Option<usize>) -> Self {
        match self {
            ConfigError::Invalid {
                path,
                line: None,
                message,
            } => {
                let line = lookup(&path);
                ConfigError::Invalid {
                    path,
                    line,
                    message,
                }
            }
            other => other,
        }
    }
}

fn known_line(location: Option<Location>) -> Option<(usize, usize)> {
    let location = location?;
    let line = usize::try_from(location.line()).ok()?;
    let column = usize::try_from(location.column()).ok()?;
    (line > 0).then_some((line, column))
}

/// `one, two, three` for "expected one of" lists.
fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "no keys (this must be empty)".to_owned()
    } else {
        names.join(", ")
    }
}

/// Joins a parent path from `serde_path_to_error` with a child key.
fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// Removes the ` at line X, column Y` the YAML library appends, since we report the line ourselves.
fn strip_location_suffix(message: String) -> String {
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(", column ") => message[..at].to_owned(),
        _ => message,
    }
}

/// Turns a deserializer error plus the key path where it happened into a [`ConfigError`].
///
/// `path` is `serde_path_to_error`'s rendering with the root (`.`) mapped to an empty string.
pub(crate) fn from_yaml(err: &serde_saphyr::Error, path: &str) -> ConfigError {
    let err = err.without_snippet();
    let position = known_line(err.location());
    if let Some((path, message)) = key_problem(err, path) {
        return ConfigError::Invalid {
            path: root_if_empty(&path),
            line: position.map(|(line, _)| line),
            message,
        };
    }
    let whole_mapping = |message: String| ConfigError::Invalid {
        path: root_if_empty(path),
        line: None,
        message,
    };
    match err {
        // The library notices a missing key at the end of its mapping, which can be several
        // lines further down; the line is left out here so that `locate` fills in the line
        // of the mapping's own key instead.
        serde_saphyr::Error::SerdeMissingField { field, .. } => {
            whole_mapping(format!("missing required key {field:?}"))
        }
        // Custom messages come from our `TryFrom` conversions (one-of rules) and
        // `deserialize_with` functions; like missing keys they are about a whole mapping, so
        // they get the line of the mapping's key.
        serde_saphyr::Error::Message { msg, .. } => {
            whole_mapping(strip_location_suffix(msg.clone()))
        }
        // Parser (scanner) failures and structural problems are about the text, not a key.
        serde_saphyr::Error::ExternalMessage { source, msg, .. }
            if matches!(**source, ExternalMessageSource::Parser(_)) =>
        {
            syntax(position, msg.clone())
        }
        serde_saphyr::Error::Eof { .. }
        | serde_saphyr::Error::MultipleDocuments { .. }
        | serde_saphyr::Error::UnknownAnchor { .. }
        | serde_saphyr::Error::IndentationError { .. }
        | serde_saphyr::Error::ContainerEndMismatch { .. }
        | serde_saphyr::Error::Budget { .. }
        | serde_saphyr::Error::IOError { .. } => {
            syntax(position, strip_location_suffix(err.to_string()))
        }
        // Anything else the library reports while a value is being read belongs to the key
        // being read.
        _ => ConfigError::Invalid {
            path: root_if_empty(path),
            line: position.map(|(line, _)| line),
            message: strip_location_suffix(err.to_string()),
        },
    }
}

/// The key path and message of an error about one key's name or value (reported at the line
/// where the library found it); `None` for errors about a whole mapping or the text.
fn key_problem(err: &serde_saphyr::Error, path: &str) -> Option<(String, String)> {
    let here = |message: String| Some((path.to_owned(), message));
    match err {
        serde_saphyr::Error::SerdeUnknownField {
            field, expected, ..
        } => Some((
            // The tracked path usually ends at the unknown key already; make sure it does.
            if path == field.as_str() || path.ends_with(&format!(".{field}")) {
                path.to_owned()
            } else {
                child_path(path, field)
            },
            format!("unknown key {field:?}, expected one of {}", list(expected)),
        )),
        serde_saphyr::Error::SerdeUnknownVariant {
            variant, expected, ..
        } => here(format!(
            "unknown variant {variant:?}, expected one of {}",
            list(expected)
        )),
        serde_saphyr::Error::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => here(format!("invalid type: {unexpected}, expected {expected}")),
        serde_saphyr::Error::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => here(format!("invalid value: {unexpected}, expected {expected}")),
        serde_saphyr::Error::DuplicateMappingKey { key, .. } => {
            // The path tracker could not name the repeated key (it ends in `?`); we can.
            let parent = path.strip_suffix('?').unwrap_or(path).trim_end_matches('.');
            Some(match key {
                Some(key) => (child_path(parent, key), format!("duplicate key {key:?}")),
                None => (parent.to_owned(), "duplicate key".to_owned()),
            })
        }
        serde_saphyr::Error::Unexpected { expected, .. } => here(match *expected {
            "mapping start" => "invalid type, expected a mapping (key: value)".to_owned(),
            "sequence start" => "invalid type, expected a list".to_owned(),
            other => format!("invalid type, expected {other}"),
        }),
        serde_saphyr::Error::InvalidBooleanStrict { .. } => {
            here("invalid boolean, expected true or false".to_owned())
        }
        serde_saphyr::Error::InvalidScalar { ty, .. } => here(format!(
            "invalid value, expected {}",
            match *ty {
                "boolean" | "bool" => "true or false",
                "integer" | "i64" | "u64" | "i32" | "u32" => "an integer",
                other => other,
            }
        )),
        _ => None,
    }
}

fn root_if_empty(path: &str) -> String {
    if path.is_empty() {
        ROOT_PATH.to_owned()
    } else {
        path.to_owned()
    }
}

fn syntax(position: Option<(usize, usize)>, message: String) -> ConfigError {
    let (line, column) = position.unwrap_or((0, 0));
    ConfigError::Syntax {
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_reads_well() {
        let cases = [
            (
                ConfigError::TooLarge {
                    size: 131_073,
                    limit: 131_072,
                },
                "config file is 131073 bytes, over the limit of 131072 bytes",
            ),
            (
                ConfigError::NotUtf8 { valid_up_to: 3 },
                "config file is not valid UTF-8 (first invalid byte at offset 3)",
            ),
            (
                ConfigError::Syntax {
                    line: 2,
                    column: 5,
                    message: "did not find expected key".to_owned(),
                },
                "invalid YAML at line 2, column 5: did not find expected key",
            ),
            (
                ConfigError::Invalid {
                    path: "gitops.manifest_projects[0].id".to_owned(),
                    line: Some(3),
                    message: "duplicate project id".to_owned(),
                },
                "gitops.manifest_projects[0].id: duplicate project id (line 3)",
            ),
            (
                ConfigError::invalid("observability", "bad"),
                "observability: bad",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.to_string(), want);
        }
    }

    #[test]
    fn strips_only_a_trailing_location() {
        assert_eq!(
            strip_location_suffix("bad thing at line 3, column 4".to_owned()),
            "bad thing"
        );
        assert_eq!(
            strip_location_suffix("look at line endings".to_owned()),
            "look at line endings"
        );
    }
}
