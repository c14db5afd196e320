//! Turning manifest files (as fetched from Git) into Kubernetes objects.
//!
//! - Files ending in `.json` (any case) are read as JSON: one object, several concatenated
//!   objects, or an array of objects. Everything else is read as YAML 1.2 with any number of
//!   `---`-separated documents (JSON is valid YAML, so a `.yml` file holding JSON works too).
//! - Empty, `null` and comment-only documents are skipped.
//! - A `kind: List` (or a typed list such as `DeploymentList`) with `items` is flattened into
//!   its items; an array document is treated the same way.
//! - Every object must have a non-empty `apiVersion`, `kind` and `metadata.name`. Errors name
//!   the file, the document and its first line, so users can find the offending object.
//!
//! Documents are split by this module rather than by the YAML library so that each document
//! keeps its position in the file (the library silently drops empty documents, which would
//! shift every later document number). Splitting on column-0 `---`/`...` lines is exactly
//! what YAML does: those markers cannot occur inside a document's content.
//!
//! Scalars resolve like `kubectl`'s YAML reader (YAML 1.1 style): unquoted `yes`, `on`, `y`
//! and `n` are booleans, so `name: n` is rejected here just as `kubectl apply` rejects it, and
//! a number with a leading zero is octal (`defaultMode: 0644` is 420), as are `0o644`.
//!
//! Billion-laughs protection: each document is parsed with a node/event budget proportional
//! to its own length, so aliases cannot make a document expand to much more than its text
//! could spell out (see `yaml_options`).

use std::collections::BTreeSet;

use serde_json::Value;
use thiserror::Error;

use crate::object_ref::ObjRef;
use crate::substitute::{self, ExpandError, Variables};

/// One object decoded from a manifest file.
///
/// The object is kept as compact JSON text with its identity parsed out: a sync holds every
/// object of a commit from decoding (nothing is written before all files decode) to its end,
/// and a decoded `serde_json::Value` takes about ten times the memory of its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Path of the file in the repository.
    pub source_path: String,
    /// 0-based index of the document in the file, counting empty documents too (so it
    /// matches what a user counts by `---` separators). Items of a `List` share the list's
    /// index. Error messages print it 1-based ("document 1").
    pub doc_index: usize,
    /// 1-based line where the document's content starts.
    pub line: usize,
    /// The object (validated to have `apiVersion`, `kind` and `metadata.name`) as JSON.
    json: Box<str>,
    id: Identity,
}

/// The fields of an object that identify it, read once.
#[derive(Debug, Clone, PartialEq)]
struct Identity {
    api_version: Box<str>,
    kind: Box<str>,
    name: Box<str>,
    /// `metadata.namespace`, an empty string read as absent.
    namespace: Option<Box<str>>,
    /// `metadata` has a `namespace` key at all (even an empty one).
    namespace_key: bool,
}

impl Identity {
    fn of(object: &Value) -> Self {
        let text = |path: &[&str]| Box::from(str_at(object, path).unwrap_or(""));
        Identity {
            api_version: text(&["apiVersion"]),
            kind: text(&["kind"]),
            name: text(&["metadata", "name"]),
            namespace: str_at(object, &["metadata", "namespace"])
                .filter(|ns| !ns.is_empty())
                .map(Box::from),
            namespace_key: object["metadata"].get("namespace").is_some(),
        }
    }
}

impl Manifest {
    /// A manifest of `object`, found in document `doc_index` (starting at `line`) of `path`.
    pub fn new(source_path: &str, doc_index: usize, line: usize, object: &Value) -> Self {
        Manifest {
            source_path: source_path.to_owned(),
            doc_index,
            line,
            json: object.to_string().into_boxed_str(),
            id: Identity::of(object),
        }
    }

    /// The object, decoded anew (callers that change it get their own copy).
    pub fn object(&self) -> Value {
        // The text was written from a `Value` by this type, so it always parses.
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }

    /// Changes the object with `f`.
    pub fn edit(&mut self, f: impl FnOnce(&mut Value)) {
        let mut object = self.object();
        f(&mut object);
        self.json = object.to_string().into_boxed_str();
        self.id = Identity::of(&object);
    }

    /// [`crate::plan::set_default_namespace`], without decoding when nothing would change.
    pub fn set_default_namespace(&mut self, default_namespace: &str, namespaced: bool) {
        let unchanged = if namespaced {
            self.id.namespace.is_some()
        } else {
            !self.id.namespace_key
        };
        if !unchanged {
            self.edit(|o| crate::plan::set_default_namespace(o, default_namespace, namespaced));
        }
    }

    /// `apiVersion`, such as `apps/v1` or `v1`.
    pub fn api_version(&self) -> &str {
        &self.id.api_version
    }

    /// The API group: the part of `apiVersion` before `/`; empty for the core group.
    pub fn group(&self) -> &str {
        split_api_version(self.api_version()).0
    }

    /// The API version without the group, such as `v1`.
    pub fn version(&self) -> &str {
        split_api_version(self.api_version()).1
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        &self.id.kind
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.id.name
    }

    /// `metadata.namespace`, treating an empty string as absent.
    pub fn namespace(&self) -> Option<&str> {
        self.id.namespace.as_deref()
    }

    /// The object's identity.
    pub fn obj_ref(&self) -> ObjRef {
        ObjRef::new(self.group(), self.kind(), self.namespace(), self.name())
    }

    /// Where the object came from, as `path:line` (the form editors and CI logs link).
    pub fn source(&self) -> String {
        format!("{}:{}", self.source_path, self.line)
    }
}

/// `(group, version)` of an `apiVersion`; the core group is empty.
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.split_once('/').unwrap_or(("", api_version))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, key| v.get(key))
        .and_then(Value::as_str)
}

/// Why a manifest file could not be decoded. Line and column numbers are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The file is not UTF-8 text.
    #[error("{path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 {
        /// File path.
        path: String,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The text is not valid YAML/JSON, or exceeds the parser's limits.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// File path.
        path: String,
        /// Line of the error (0 when the parser could not tell).
        line: usize,
        /// Column of the error (0 when the parser could not tell).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// `post_build` variable substitution failed (nothing of the value is shown: it may come
    /// from a Secret).
    #[error("{path}:{line}: post_build variable substitution: {message}")]
    Substitute {
        /// File path.
        path: String,
        /// Line of the expression.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The document parsed but is not a usable Kubernetes object.
    #[error("{path}: document {number} (line {line}): {message}", number = .doc_index + 1)]
    Invalid {
        /// File path.
        path: String,
        /// 0-based document index (printed 1-based).
        doc_index: usize,
        /// First line of the document.
        line: usize,
        /// What is missing or wrong.
        message: String,
    },
}

/// Decodes one manifest file into objects, in file order.
pub fn decode_file(path: &str, bytes: &[u8]) -> Result<Vec<Manifest>, DecodeError> {
    decode_file_with(path, bytes, None)
}

/// [`decode_file`], substituting `vars` first ([`crate::substitute`]): in a YAML document's
/// text before it is decoded (so `replicas: ${n}` is a number), in the strings of a JSON
/// object (JSON has no unquoted scalars). Objects labelled or annotated
/// [`substitute::DISABLE_KEY`]` disabled` are left alone. No variables, no substitution
/// (as in Flux: not even `$$` is touched).
pub fn decode_file_with(
    path: &str,
    bytes: &[u8],
    vars: Option<&Variables>,
) -> Result<Vec<Manifest>, DecodeError> {
    decode_file_noting(path, bytes, vars, &mut BTreeSet::new())
}

/// [`decode_file_with`], adding to `emptied` the variables substituted as empty for want of a
/// value ([`substitute::expand_noting`]).
pub fn decode_file_noting(
    path: &str,
    bytes: &[u8],
    vars: Option<&Variables>,
    emptied: &mut BTreeSet<String>,
) -> Result<Vec<Manifest>, DecodeError> {
    let vars = vars.filter(|v| !v.is_empty());
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8 {
        path: path.to_owned(),
        offset: e.valid_up_to(),
    })?;
    // Editors on Windows like to prepend a byte-order mark; it is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_json = path
        .rsplit_once('.')
        .is_some_and(|(_, ext)| ext.eq_ignore_ascii_case("json"));
    let documents = if is_json {
        json_documents(path, text)?
    } else {
        yaml_documents(path, text, vars, emptied)?
    };
    let mut out = Vec::new();
    for doc in documents {
        let invalid = |message: String| DecodeError::Invalid {
            path: path.to_owned(),
            doc_index: doc.index,
            line: doc.line,
            message,
        };
        let mut objects = Vec::new();
        flatten(doc.value, "", &mut objects).map_err(invalid)?;
        if let (true, Some(vars)) = (is_json, vars) {
            for object in objects.iter_mut().filter(|o| !substitute::is_disabled(o)) {
                expand_strings(object, vars, emptied)
                    .map_err(|e| substitute_error(path, doc.line, &e))?;
            }
        }
        out.extend(objects.iter_mut().map(|object| {
            string_data_into_data(object);
            Manifest::new(path, doc.index, doc.line, object)
        }));
    }
    Ok(out)
}

/// A parsed, non-empty document.
struct Document {
    index: usize,
    line: usize,
    value: Value,
}

/// Lists are flattened recursively; each object is validated. `at` is the position inside
/// the document (`""`, `items[2]`, `items[2].items[0]`) for error messages.
fn flatten(value: Value, at: &str, out: &mut Vec<Value>) -> Result<(), String> {
    let prefix = |at: &str| {
        if at.is_empty() {
            String::new()
        } else {
            format!("{at}: ")
        }
    };
    let (items, typed_list) = match value {
        Value::Array(items) => (items, None),
        Value::Object(mut map) if is_list(&map) => {
            let items = match map.remove("items") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items,
                Some(other) => {
                    return Err(format!(
                        "{}items must be a list, found {}",
                        prefix(at),
                        type_name(&other)
                    ));
                }
            };
            // Typed lists (`DeploymentList`) as returned by the API omit apiVersion and
            // kind on their items; they are implied by the list itself.
            let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
            let typed = match (kind.strip_suffix("List"), map.get("apiVersion")) {
                (Some(item_kind), Some(Value::String(api))) if !item_kind.is_empty() => {
                    Some((api.clone(), item_kind.to_owned()))
                }
                _ => None,
            };
            (items, typed)
        }
        Value::Object(map) => {
            let value = Value::Object(map);
            validate(&value).map_err(|m| format!("{}{m}", prefix(at)))?;
            out.push(value);
            return Ok(());
        }
        Value::Null => return Ok(()),
        other => {
            return Err(format!(
                "{}expected a Kubernetes object (a mapping), found {}",
                prefix(at),
                type_name(&other)
            ));
        }
    };
    let base = if at.is_empty() {
        "items".to_owned()
    } else {
        format!("{at}.items")
    };
    for (i, mut item) in items.into_iter().enumerate() {
        if let (Some((api, kind)), Value::Object(map)) = (&typed_list, &mut item) {
            map.entry("apiVersion")
                .or_insert_with(|| Value::String(api.clone()));
            map.entry("kind")
                .or_insert_with(|| Value::String(kind.clone()));
        }
        flatten(item, &format!("{base}[{i}]"), out)?;
    }
    Ok(())
}

/// `kind: List`, or a typed list (`...List`) that actually carries `items`. A custom kind
/// that merely ends in "List" but has no `items` array is an ordinary object.
fn is_list(map: &serde_json::Map<String, Value>) -> bool {
    match map.get("kind").and_then(Value::as_str) {
        Some("List") => true,
        Some(kind) => kind.ends_with("List") && map.get("items").is_some_and(Value::is_array),
        None => false,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Checks the identity fields; everything else is the API server's business.
fn validate(obj: &Value) -> Result<(), String> {
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    let mut field = |name: &'static str, value: Option<&Value>| -> Option<String> {
        match value {
            None | Some(Value::Null) => missing.push(name),
            Some(Value::String(s)) if s.is_empty() => missing.push(name),
            Some(Value::String(s)) => return Some(s.clone()),
            Some(other) => problems.push(format!(
                "{name} must be a string, found {}",
                type_name(other)
            )),
        }
        None
    };
    let api_version = field("apiVersion", obj.get("apiVersion"));
    let kind = field("kind", obj.get("kind"));
    let metadata = obj.get("metadata");
    let (name, namespace) = match metadata {
        None | Some(Value::Null) => (field("metadata.name", None), None),
        Some(Value::Object(m)) => {
            let name = field("metadata.name", m.get("name"));
            if name.is_none() && m.get("generateName").is_some_and(is_non_empty_string) {
                // Named as the cause rather than "missing metadata.name".
                missing.retain(|f| *f != "metadata.name");
                problems.push(GENERATE_NAME.to_owned());
            }
            let namespace = match m.get("namespace") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => {
                    problems.push(format!(
                        "metadata.namespace must be a string, found {}",
                        type_name(other)
                    ));
                    None
                }
            };
            (name, namespace)
        }
        Some(other) => {
            problems.push(format!(
                "metadata must be a mapping, found {}",
                type_name(other)
            ));
            (None, None)
        }
    };
    if let Some(api) = &api_version {
        let (group, version) = split_api_version(api);
        if version.is_empty() || version.contains('/') || has_bad_chars(group) {
            problems.push(format!(
                "invalid apiVersion {api:?} (expected \"v1\" or \"group/version\")"
            ));
        }
    }
    if let Some(kind) = &kind
        && has_bad_chars(kind)
    {
        problems.push(format!("invalid kind {kind:?}"));
    }
    // `/`, `%`, `.` and `..` would change the meaning of the object's API path, and no
    // Kubernetes resource accepts them; catching them here keeps ObjRefs clean.
    for (what, value) in [("metadata.name", &name), ("metadata.namespace", &namespace)] {
        if let Some(v) = value
            && (v.contains(['/', '%']) || v == "." || v == ".." || has_bad_chars(v))
        {
            problems.push(format!("invalid {what} {v:?}"));
        }
    }
    if is_sops_encrypted(obj) {
        problems.push(SOPS_ENCRYPTED.to_owned());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing {}", missing.join(", ")));
    }
    parts.extend(problems);
    if parts.is_empty() {
        Ok(())
    } else {
        Err(parts.join("; "))
    }
}

/// Moves a Secret's `stringData` into `data` (base64), as the API server does when it stores
/// the Secret; a `stringData` key wins over a `data` key of the same name, as there.
///
/// The stored Secret never has `stringData`, so an object applied with it never looked up to
/// date: it was applied again at every resync. And a key removed from `stringData` stayed in
/// the live `data`, which the apply had not named.
fn string_data_into_data(obj: &mut Value) {
    use base64::Engine as _;
    if obj.get("apiVersion").and_then(Value::as_str) != Some("v1")
        || obj.get("kind").and_then(Value::as_str) != Some("Secret")
    {
        return;
    }
    let Some(fields) = obj.as_object_mut() else {
        return;
    };
    // Anything but mappings is left as it is, for the API server to refuse.
    let data_is_a_mapping = matches!(
        fields.get("data"),
        None | Some(Value::Null | Value::Object(_))
    );
    if !data_is_a_mapping || !fields.get("stringData").is_some_and(Value::is_object) {
        return;
    }
    let Some(Value::Object(map)) = fields.remove("stringData") else {
        return;
    };
    // A non-string value is left in `stringData` for the API server to refuse by name.
    let (strings, others): (Vec<_>, Vec<_>) = map.into_iter().partition(|(_, v)| v.is_string());
    if !others.is_empty() {
        fields.insert(
            "stringData".into(),
            Value::Object(others.into_iter().collect()),
        );
    }
    if strings.is_empty() {
        return;
    }
    let data = fields
        .entry("data")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if data.is_null() {
        *data = Value::Object(serde_json::Map::new());
    }
    let Some(data) = data.as_object_mut() else {
        return;
    };
    for (key, value) in strings {
        let text = value.as_str().unwrap_or_default();
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        data.insert(key, Value::String(encoded));
    }
}

/// Why an object named by `metadata.generateName` (Argo CD's hook and sync-wave examples) is
/// refused: the API server picks a new name at every create, so every sync would create
/// another object and none could be found again to update or prune.
const GENERATE_NAME: &str = "metadata.generateName is not supported: a GitOps object needs a \
     fixed metadata.name (every sync would create another)";

fn is_non_empty_string(v: &Value) -> bool {
    v.as_str().is_some_and(|s| !s.is_empty())
}

/// Why a SOPS-encrypted object is refused. Applied as it is, the API server answered with
/// "field not declared in schema" or "illegal base64 data", which says nothing of SOPS.
const SOPS_ENCRYPTED: &str = "encrypted with SOPS (it has a top-level `sops` block): tether \
     applies manifests as they are in Git and does not decrypt them; keep such secrets in the \
     cluster instead (External Secrets, or Sealed Secrets, whose objects apply as they are)";

/// Whether an object is a SOPS file: SOPS adds a top-level `sops` mapping holding the
/// message authentication code of what it encrypted.
fn is_sops_encrypted(obj: &Value) -> bool {
    obj.get("sops")
        .and_then(Value::as_object)
        .is_some_and(|sops| sops.contains_key("mac") || sops.contains_key("lastmodified"))
}

/// Whitespace, control characters and `/` never appear in groups, kinds or names.
fn has_bad_chars(s: &str) -> bool {
    s.chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
}

// ---------------------------------------------------------------------------------------
// JSON

fn json_documents(path: &str, text: &str) -> Result<Vec<Document>, DecodeError> {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    // Line numbers are counted incrementally so a file of many small objects stays linear.
    let mut counted_to = 0;
    let mut line = 1;
    let mut end = 0;
    loop {
        let next = stream.next();
        let start = end + leading_whitespace(&text[end..]);
        match next {
            None => break,
            Some(Ok(value)) => {
                line += text[counted_to..start].matches('\n').count();
                counted_to = start;
                end = stream.byte_offset();
                if !value.is_null() {
                    docs.push(Document {
                        index: docs.len(),
                        line,
                        value,
                    });
                }
            }
            Some(Err(e)) => {
                let message = e.to_string();
                let message = match message.rfind(" at line ") {
                    Some(at) => message[..at].to_owned(),
                    None => message,
                };
                return Err(DecodeError::Syntax {
                    path: path.to_owned(),
                    line: e.line(),
                    column: e.column(),
                    message,
                });
            }
        }
    }
    Ok(docs)
}

fn leading_whitespace(s: &str) -> usize {
    s.len() - s.trim_start_matches([' ', '\t', '\r', '\n']).len()
}

// ---------------------------------------------------------------------------------------
// YAML

/// A document's text and where it sits in the file.
#[derive(Debug, PartialEq)]
struct Chunk<'a> {
    /// 0-based document index.
    index: usize,
    /// Line of the chunk's first line of text.
    first_line: usize,
    /// Line of the first line with content (not blank, comment, directive or bare marker).
    content_line: Option<usize>,
    text: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum LineKind {
    /// `---`; `true` when content follows on the same line (`--- !tag` or `--- {a: 1}`).
    Start(bool),
    /// `...`
    End,
    /// Blank or comment-only.
    Blank,
    /// `%YAML` / `%TAG`; only meaningful before a document's content.
    Directive,
    Content,
}

fn classify(line: &str) -> LineKind {
    let marker = |m: &str| {
        line.strip_prefix(m)
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    if let Some(rest) = marker("---") {
        let rest = rest.trim();
        return LineKind::Start(!rest.is_empty() && !rest.starts_with('#'));
    }
    if marker("...").is_some() {
        return LineKind::End;
    }
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        LineKind::Blank
    } else if line.starts_with('%') {
        LineKind::Directive
    } else {
        LineKind::Content
    }
}

/// Splits a YAML stream into documents. Only documents that exist in the YAML sense are
/// returned (and counted): anything after a `---`, and text before the first `---` or after
/// a `...` only if it has content. Leading comments and directives join the document that
/// follows them.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    /// The document being collected.
    struct Open {
        start: usize,
        first_line: usize,
        /// Started by `---`, so it is a document even if empty.
        explicit: bool,
        content_line: Option<usize>,
    }
    impl Open {
        fn at(start: usize, first_line: usize, explicit: bool) -> Self {
            Open {
                start,
                first_line,
                explicit,
                content_line: None,
            }
        }
        fn exists(&self) -> bool {
            self.explicit || self.content_line.is_some()
        }
    }
    let mut chunks = Vec::new();
    let mut close = |open: &Open, end: usize| {
        if open.exists() {
            chunks.push(Chunk {
                index: chunks.len(),
                first_line: open.first_line,
                content_line: open.content_line,
                text: &text[open.start..end],
            });
        }
    };
    let mut cur = Open::at(0, 1, false);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        let kind = match classify(line) {
            // A `%` line after content is part of that content (say, a plain scalar).
            LineKind::Directive if cur.content_line.is_some() => LineKind::Content,
            kind => kind,
        };
        match kind {
            LineKind::Start(inline) => {
                if cur.exists() {
                    close(&cur, offset);
                    cur = Open::at(offset, lineno, true);
                } else {
                    // Only comments/directives so far: they belong to this document.
                    cur.explicit = true;
                }
                if inline {
                    cur.content_line = Some(lineno);
                }
            }
            LineKind::End => {
                let end = offset + line.len();
                close(&cur, end);
                cur = Open::at(end, lineno + 1, false);
            }
            LineKind::Content => {
                cur.content_line.get_or_insert(lineno);
            }
            LineKind::Blank | LineKind::Directive => {}
        }
        offset += line.len();
    }
    close(&cur, text.len());
    chunks
}

/// Parser options: duplicate keys are errors (as in `kubectl`), and the budget grows with
/// the document's length so that alias expansion ("billion laughs") stays linear in the
/// input while legitimate reuse of anchors keeps plenty of room.
pub(crate) fn yaml_options(doc_len: usize) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    // Any node needs at least one byte of text; the constant leaves room for modest
    // anchor reuse in small documents.
    budget.max_nodes = doc_len.saturating_add(50_000);
    budget.max_events = budget.max_nodes.saturating_mul(2).saturating_add(1_000);
    budget.max_total_scalar_bytes = doc_len.saturating_mul(4).saturating_add(1 << 20);
    // Deserializing into `Value` recurses once per level, and a stack overflow aborts the
    // whole agent; 64 levels (the library's default) stays well inside a 2 MiB thread stack
    // even in debug builds (which overflow near 85), and leaves room for the deepest real
    // CRD schemas (embedded pod templates reach about 40).
    budget.max_depth = 64;
    serde_saphyr::options! {
        budget: Some(budget),
        with_snippet: false,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        // YAML 1.1 octal, as kubectl reads it: `defaultMode: 0644` is 420. Read as decimal
        // 644, the API server refused it (over 0777); worse, `0444` passed as decimal 444,
        // octal 0674: a secret volume's files silently group-writable.
        legacy_octal_numbers: true,
    }
}

fn yaml_documents(
    path: &str,
    text: &str,
    vars: Option<&Variables>,
    emptied: &mut BTreeSet<String>,
) -> Result<Vec<Document>, DecodeError> {
    let mut docs = Vec::new();
    for chunk in split_documents(text) {
        let Some(content_line) = chunk.content_line else {
            // `---` followed by nothing but comments: an empty document.
            continue;
        };
        let parsed = match vars {
            Some(vars) if chunk.text.contains('$') => {
                substituted_chunk(path, &chunk, content_line, vars, emptied)?
            }
            _ => parse_chunk(path, chunk.text, chunk.first_line, content_line)?,
        };
        if let Some(value) = parsed {
            docs.push(Document {
                index: chunk.index,
                line: content_line,
                value,
            });
        }
    }
    Ok(docs)
}

/// A document with its variables substituted, unless its objects opt out. The text is read
/// once as written to find out (as Flux reads the object before substituting); text that does
/// not parse before substitution is substituted all the same.
fn substituted_chunk(
    path: &str,
    chunk: &Chunk<'_>,
    content_line: usize,
    vars: &Variables,
    emptied: &mut BTreeSet<String>,
) -> Result<Option<Value>, DecodeError> {
    let original = parse_chunk(path, chunk.text, chunk.first_line, content_line);
    if let Ok(value) = &original {
        let (enabled, disabled) = opt_outs(value.as_ref());
        if enabled == 0 {
            return original;
        }
        if disabled > 0 {
            return Err(DecodeError::Substitute {
                path: path.to_owned(),
                line: content_line,
                message: format!(
                    "a list mixes objects labelled or annotated {}: {} with others: put them in \
                     separate documents",
                    substitute::DISABLE_KEY,
                    substitute::DISABLED
                ),
            });
        }
    }
    let text = substitute::expand_noting(chunk.text, vars, emptied)
        .map_err(|e| substitute_error(path, chunk.first_line - 1 + e.line(), &e))?;
    parse_chunk(path, &text, chunk.first_line, content_line).map_err(|e| match e {
        DecodeError::Syntax {
            path,
            line,
            column,
            message,
        } => DecodeError::Syntax {
            path,
            line,
            column,
            message: format!("{message} (after post_build variable substitution)"),
        },
        other => other,
    })
}

/// How many objects of a document (a List's items each) substitute, and how many opt out.
fn opt_outs(value: Option<&Value>) -> (usize, usize) {
    let (mut enabled, mut disabled) = (0, 0);
    let mut stack: Vec<&Value> = value.into_iter().collect();
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) if is_list(map) => {
                stack.extend(
                    map.get("items")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten(),
                );
            }
            Value::Null => {}
            v if substitute::is_disabled(v) => disabled += 1,
            _ => enabled += 1,
        }
    }
    (enabled, disabled)
}

fn substitute_error(path: &str, line: usize, e: &ExpandError) -> DecodeError {
    DecodeError::Substitute {
        path: path.to_owned(),
        line,
        message: e.to_string(),
    }
}

/// Substitutes in every string (keys too) of a JSON object.
fn expand_strings(
    value: &mut Value,
    vars: &Variables,
    emptied: &mut BTreeSet<String>,
) -> Result<(), ExpandError> {
    match value {
        Value::String(s) if s.contains('$') => *s = substitute::expand_noting(s, vars, emptied)?,
        Value::Array(items) => {
            for item in items {
                expand_strings(item, vars, emptied)?;
            }
        }
        Value::Object(map) if map.keys().any(|k| k.contains('$')) => {
            let old = std::mem::take(map);
            for (k, mut v) in old {
                expand_strings(&mut v, vars, emptied)?;
                map.insert(substitute::expand_noting(&k, vars, emptied)?, v);
            }
        }
        Value::Object(map) => {
            for v in map.values_mut() {
                expand_strings(v, vars, emptied)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// One document's text parsed; `None` when it holds nothing (`null`).
fn parse_chunk(
    path: &str,
    text: &str,
    first_line: usize,
    content_line: usize,
) -> Result<Option<Value>, DecodeError> {
    match serde_saphyr::from_str_with_options::<Option<Value>>(text, yaml_options(text.len())) {
        Ok(Some(value)) if !value.is_null() => Ok(Some(value)),
        Ok(_) => Ok(None),
        Err(err) => {
            let (line, column) = match err.location() {
                Some(loc) if loc.line() > 0 => (
                    usize::try_from(loc.line())
                        .unwrap_or(usize::MAX)
                        .saturating_add(first_line - 1),
                    usize::try_from(loc.column()).unwrap_or(0),
                ),
                _ => (content_line, 0),
            };
            Err(DecodeError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message: yaml_message(&err),
            })
        }
    }
}

/// The library appends ` at line X, column Y` (relative to the document, not the file);
/// the location is reported separately, so it is cut off.
fn yaml_message(err: &serde_saphyr::Error) -> String {
    let mut inner = err;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    if let serde_saphyr::Error::Budget { breach, .. } = inner {
        return budget_message(breach);
    }
    let message = err.without_snippet().to_string();
    match message.find(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

/// Why a document over the parser's budget is refused, in words (the library's text was its
/// Debug form: "budget breached: Nodes { nodes: 50414 }").
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    if let B::Depth { depth } = breach {
        return format!(
            "the document nests {depth} levels deep, more than the agent reads (64): flatten it"
        );
    }
    let over = match breach {
        B::Nodes { nodes } => format!("{nodes} nodes"),
        B::Events { events } => format!("{events} parser events"),
        B::Aliases { aliases } => format!("{aliases} aliases"),
        B::Anchors { anchors } => format!("{anchors} anchors"),
        B::ScalarBytes { total_scalar_bytes } => format!("{total_scalar_bytes} bytes of values"),
        B::MergeKeys { merge_keys } => format!("{merge_keys} merge keys"),
        _ => "its limits".to_owned(),
    };
    format!(
        "the document reaches {over} once its aliases are expanded, more than the agent reads from a file of this size (aliases of aliases, as in a \"billion laughs\" document?): write the repeated parts out, or split the file"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(path: &str, text: &str) -> Vec<Manifest> {
        match decode_file(path, text.as_bytes()) {
            Ok(m) => m,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn err(path: &str, text: &str) -> DecodeError {
        match decode_file(path, text.as_bytes()) {
            Ok(m) => panic!("expected an error, got {m:?}"),
            Err(e) => e,
        }
    }

    const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nginx\n  namespace: dude\nspec:\n  replicas: 2\n";

    #[test]
    fn the_compact_object_decodes_to_what_was_read_and_edits_update_the_identity() {
        let mut m = ok("d.yaml", DEPLOYMENT).remove(0);
        let expected = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "nginx", "namespace": "dude"}, "spec": {"replicas": 2}});
        assert_eq!(m.object(), expected);
        m.edit(|o| o["metadata"]["name"] = json!("web"));
        assert_eq!(m.name(), "web");
        assert_eq!(m.object()["metadata"]["name"], "web");
    }

    #[test]
    fn default_namespace_is_set_kept_or_removed_by_scope() {
        let cm = |meta: &str| {
            ok(
                "c.yaml",
                &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n{meta}"),
            )
            .remove(0)
        };
        let mut absent = cm("  name: a\n");
        absent.set_default_namespace("dflt", true);
        assert_eq!(absent.namespace(), Some("dflt"));
        assert_eq!(absent.object()["metadata"]["namespace"], "dflt");
        let mut own = cm("  name: a\n  namespace: mine\n");
        own.set_default_namespace("dflt", true);
        assert_eq!(own.object()["metadata"]["namespace"], "mine");
        // Cluster-scoped: a namespace, even an empty one, is removed from what is sent.
        for meta in [
            "  name: a\n  namespace: mine\n",
            "  name: a\n  namespace: \"\"\n",
        ] {
            let mut scoped = cm(meta);
            scoped.set_default_namespace("dflt", false);
            assert_eq!(scoped.namespace(), None);
            assert!(
                scoped.object()["metadata"].get("namespace").is_none(),
                "{meta}"
            );
        }
    }

    #[test]
    fn single_yaml_document_and_helpers() {
        let m = ok("deploy.yaml", DEPLOYMENT);
        assert_eq!(m.len(), 1);
        let d = &m[0];
        assert_eq!(d.source_path, "deploy.yaml");
        assert_eq!((d.doc_index, d.line), (0, 1));
        assert_eq!(d.api_version(), "apps/v1");
        assert_eq!(d.group(), "apps");
        assert_eq!(d.version(), "v1");
        assert_eq!(d.kind(), "Deployment");
        assert_eq!(d.name(), "nginx");
        assert_eq!(d.namespace(), Some("dude"));
        assert_eq!(d.object()["spec"]["replicas"], json!(2));
        assert_eq!(d.obj_ref().to_string(), "apps/Deployment/dude/nginx");
        assert_eq!(d.source(), "deploy.yaml:1");
    }

    #[test]
    fn core_group_helpers() {
        let m = ok(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: dude\n  namespace: ''\n",
        );
        assert_eq!(m[0].group(), "");
        assert_eq!(m[0].version(), "v1");
        assert_eq!(m[0].namespace(), None);
        assert_eq!(m[0].obj_ref().to_string(), "/Namespace//dude");
    }

    #[test]
    fn multi_document_skips_empty_and_comment_only_documents() {
        let text = "# leading comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n---\n# only a comment\n---   # marker comment\n\n---\n# a comment first\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n...\n---\nnull\n---\n~\n";
        let m = ok("many.yml", text);
        let got: Vec<(usize, usize, &str)> =
            m.iter().map(|d| (d.doc_index, d.line, d.name())).collect();
        // Documents: 0 = a, 1 = empty, 2 = comment only, 3 = marker comment only, 4 = b,
        // 5 = null, 6 = ~.
        assert_eq!(got, [(0, 3, "a"), (4, 13, "b")]);
    }

    #[test]
    fn implicit_first_document_and_trailing_separator() {
        let text = format!("{DEPLOYMENT}---\n{DEPLOYMENT}---\n");
        let m = ok(
            "x.yaml",
            &text.replace("name: nginx\n  namespace: dude", "name: web"),
        );
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].doc_index, m[0].line), (0, 1));
        assert_eq!((m[1].doc_index, m[1].line), (1, 8));
    }

    #[test]
    fn directive_joins_its_document() {
        let m = ok(
            "d.yaml",
            "%YAML 1.2\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        );
        assert_eq!((m[0].doc_index, m[0].line), (0, 3));
    }

    #[test]
    fn inline_document_content_on_marker_line() {
        let m = ok(
            "flow.yaml",
            "--- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n",
        );
        assert_eq!((m[0].doc_index, m[0].line), (0, 1));
    }

    #[test]
    fn marker_lookalikes_inside_content_are_not_separators() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  script: |\n    ---\n    echo ---x\n  other: \"---\"\n";
        let m = ok("c.yaml", text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].object()["data"]["script"], json!("---\necho ---x\n"));
    }

    #[test]
    fn crlf_and_bom() {
        let text = "\u{feff}apiVersion: v1\r\nkind: ConfigMap\r\nmetadata:\r\n  name: a\r\n---\r\napiVersion: v1\r\nkind: ConfigMap\r\nmetadata:\r\n  name: b\r\n";
        let m = ok("w.yaml", text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].name(), "b");
        assert_eq!(m[1].line, 6);
    }

    #[test]
    fn empty_files() {
        assert!(ok("e.yaml", "").is_empty());
        assert!(ok("e.yaml", "# nothing\n\n").is_empty());
        assert!(ok("e.yaml", "---\n---\n").is_empty());
        assert!(ok("e.json", "").is_empty());
        assert!(ok("e.json", " \n null \n").is_empty());
    }

    #[test]
    fn list_is_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Secret\n  metadata: {name: b, namespace: x}\n";
        let m = ok("list.yaml", text);
        let names: Vec<&str> = m.iter().map(Manifest::name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(m.iter().all(|d| d.doc_index == 0 && d.line == 1));
        assert!(ok("l.yaml", "apiVersion: v1\nkind: List\nitems: []\n").is_empty());
        assert!(ok("l.yaml", "apiVersion: v1\nkind: List\n").is_empty());
    }

    #[test]
    fn typed_list_items_inherit_api_version_and_kind() {
        let text = "apiVersion: apps/v1\nkind: DeploymentList\nitems:\n- metadata: {name: a, namespace: team}\n";
        let m = ok("dl.yaml", text);
        assert_eq!(m[0].obj_ref().to_string(), "apps/Deployment/team/a");
    }

    #[test]
    fn kind_ending_in_list_without_items_is_an_object() {
        let m = ok(
            "pl.yaml",
            "apiVersion: music.example.com/v1\nkind: PlayList\nmetadata: {name: a}\nspec: {}\n",
        );
        assert_eq!(m[0].kind(), "PlayList");
    }

    /// Argo CD's helm-hooks and sync-waves examples name their Jobs by `generateName`: the
    /// error names that as the cause, not a missing `metadata.name`.
    #[test]
    fn an_object_named_by_generate_name_is_refused_naming_it() {
        let text =
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  generateName: upgrade-sql-schema\n";
        assert_eq!(
            err("hook.yaml", text).to_string(),
            "hook.yaml: document 1 (line 1): metadata.generateName is not supported: a GitOps object needs a fixed metadata.name (every sync would create another)"
        );
        let both =
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fixed\n  generateName: x-\n";
        assert!(decode_file("both.yaml", both.as_bytes()).is_ok());
    }

    #[test]
    fn nested_list_error_names_the_item() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {}\n";
        let e = err("list.yaml", text);
        assert_eq!(
            e.to_string(),
            "list.yaml: document 1 (line 1): items[1]: missing metadata.name"
        );
        let e = err("list.yaml", "apiVersion: v1\nkind: List\nitems: 3\n");
        assert_eq!(
            e.to_string(),
            "list.yaml: document 1 (line 1): items must be a list, found a number"
        );
    }

    #[test]
    fn missing_fields_name_file_document_and_line() {
        let text = format!("{DEPLOYMENT}---\n# the broken one\nmetadata:\n  labels: {{}}\n");
        let e = err("apps/deploy.yaml", &text);
        assert_eq!(
            e,
            DecodeError::Invalid {
                path: "apps/deploy.yaml".into(),
                doc_index: 1,
                line: 10,
                message: "missing apiVersion, kind, metadata.name".into(),
            }
        );
        assert_eq!(
            e.to_string(),
            "apps/deploy.yaml: document 2 (line 10): missing apiVersion, kind, metadata.name"
        );
    }

    #[test]
    fn wrong_types_and_invalid_values() {
        let cases = [
            (
                "apiVersion: 1\nkind: X\nmetadata: {name: a}\n",
                "apiVersion must be a string, found a number",
            ),
            (
                "apiVersion: v1\nkind: ''\nmetadata: {name: a}\n",
                "missing kind",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: [a]\n",
                "metadata must be a mapping, found a list",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: 3}\n",
                "metadata.namespace must be a string, found a number",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a/b}\n",
                "invalid metadata.name \"a/b\"",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ..}\n",
                "invalid metadata.name \"..\"",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: 'x y'}\n",
                "invalid metadata.namespace \"x y\"",
            ),
            (
                "apiVersion: a/b/c\nkind: ConfigMap\nmetadata: {name: a}\n",
                "invalid apiVersion \"a/b/c\" (expected \"v1\" or \"group/version\")",
            ),
            (
                "apiVersion: apps/\nkind: ConfigMap\nmetadata: {name: a}\n",
                "invalid apiVersion \"apps/\" (expected \"v1\" or \"group/version\")",
            ),
            (
                "apiVersion: v1\nkind: Config Map\nmetadata: {name: a}\n",
                "invalid kind \"Config Map\"",
            ),
            (
                "just a string\n",
                "expected a Kubernetes object (a mapping), found a string",
            ),
            (
                "- 1\n",
                "items[0]: expected a Kubernetes object (a mapping), found a number",
            ),
        ];
        for (text, want) in cases {
            match err("f.yaml", text) {
                DecodeError::Invalid { message, .. } => assert_eq!(message, want, "{text}"),
                other => panic!("{text}: {other}"),
            }
        }
    }

    #[test]
    fn yaml_syntax_error_has_file_line_and_column() {
        let text = format!(
            "{DEPLOYMENT}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n   bad: indentation\n"
        );
        let e = err("cm.yaml", &text);
        let DecodeError::Syntax {
            path, line, column, ..
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!((path.as_str(), *line), ("cm.yaml", 13));
        assert!(*column > 0);
        assert!(e.to_string().starts_with("cm.yaml:13:"), "{e}");
        assert!(!e.to_string().contains(" at line "), "{e}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = err(
            "d.yaml",
            "apiVersion: v1\nkind: ConfigMap\nkind: Secret\nmetadata: {name: a}\n",
        );
        assert!(matches!(e, DecodeError::Syntax { line: 3, .. }), "{e}");
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn billion_laughs_is_rejected() {
        let mut text = String::from(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n  a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for i in 0..9u8 {
            let (prev, cur) = ((b'a' + i) as char, (b'b' + i) as char);
            text.push_str(&format!(
                "  {cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
            ));
        }
        let e = err("lol.yaml", &text);
        assert!(matches!(e, DecodeError::Syntax { .. }), "{e}");
        let said = e.to_string();
        assert!(
            said.contains("once its aliases are expanded") && said.contains("billion laughs"),
            "{said}"
        );
        assert!(!said.contains("{ nodes"), "no Debug form: {said}");
    }

    #[test]
    fn modest_anchor_reuse_is_fine() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec:\n  template:\n    spec:\n      containers:\n      - name: a\n        env: &env\n        - {name: A, value: '1'}\n        - {name: B, value: '2'}\n      - name: b\n        env: *env\n";
        let m = ok("anchors.yaml", text);
        let c = &m[0].object()["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["env"], c[1]["env"]);
    }

    #[test]
    fn a_secrets_string_data_is_applied_as_data_as_the_api_server_stores_it() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: b2xk, keep: eA==}\nstringData: {a: new, p: 'pass word'}\n";
        let o = ok("s.yaml", text)[0].object();
        assert_eq!(o.get("stringData"), None);
        assert_eq!(
            o["data"],
            serde_json::json!({"a": "bmV3", "keep": "eA==", "p": "cGFzcyB3b3Jk"}),
            "stringData wins over data, as on the API server"
        );
        let only = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {a: x}\n";
        assert_eq!(
            ok("s.yaml", only)[0].object()["data"],
            serde_json::json!({"a": "eA=="})
        );
        let odd = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {n: 1}\n";
        assert_eq!(
            ok("s.yaml", odd)[0].object()["stringData"],
            serde_json::json!({"n": 1}),
            "left for the API server to refuse"
        );
        let other =
            "apiVersion: example.com/v1\nkind: Secret\nmetadata: {name: s}\nstringData: {a: x}\n";
        assert_eq!(
            ok("s.yaml", other)[0].object()["stringData"],
            serde_json::json!({"a": "x"}),
            "only core Secrets"
        );
    }

    #[test]
    fn a_sops_encrypted_secret_is_refused_naming_sops() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata:\n  password: ENC[AES256_GCM,data:qP8=,iv:x,tag:y,type:str]\nsops:\n  mac: ENC[AES256_GCM,data:z]\n  lastmodified: '2026-11-27T10:00:00Z'\n  version: 3.9.0\n";
        let e = err("secret.enc.yaml", text).to_string();
        assert!(
            e.starts_with("secret.enc.yaml: document 1 (line 1): encrypted with SOPS"),
            "{e}"
        );
        let plain = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {sops: x}\n";
        assert_eq!(
            ok("c.yaml", plain).len(),
            1,
            "a key named sops elsewhere is fine"
        );
    }

    #[test]
    fn yaml_1_1_octal_numbers_match_kubectl() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  volumes:\n  - name: a\n    secret: {secretName: s, defaultMode: 0644}\n  - name: b\n    secret: {secretName: s, defaultMode: 0444}\n  - name: c\n    secret: {secretName: s, defaultMode: 0o440}\n  - name: d\n    secret: {secretName: s, defaultMode: 420}\n  - name: e\n    secret: {secretName: s, defaultMode: \"0644\"}\n";
        let m = ok("modes.yaml", text);
        let v = &m[0].object()["spec"]["volumes"];
        let mode = |i: usize| v[i]["secret"]["defaultMode"].clone();
        assert_eq!(mode(0), serde_json::json!(0o644));
        assert_eq!(mode(1), serde_json::json!(0o444));
        assert_eq!(mode(2), serde_json::json!(0o440));
        assert_eq!(mode(3), serde_json::json!(420), "decimal stays decimal");
        assert_eq!(mode(4), serde_json::json!("0644"), "quoted stays a string");
    }

    #[test]
    fn yaml_1_1_booleans_match_kubectl() {
        let e = err(
            "b.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n",
        );
        assert!(
            e.to_string()
                .ends_with("metadata.name must be a string, found a boolean"),
            "{e}"
        );
        assert_eq!(
            ok(
                "b.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: 'n'}\n"
            )[0]
            .name(),
            "n"
        );
    }

    #[test]
    fn not_utf8() {
        let e = decode_file("bin.yaml", b"apiVersion: v1\n\xff\xfe").err();
        assert_eq!(
            e,
            Some(DecodeError::NotUtf8 {
                path: "bin.yaml".into(),
                offset: 15
            })
        );
    }

    #[test]
    fn json_single_object_array_and_stream() {
        let one = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#;
        assert_eq!(ok("a.json", one).len(), 1);
        let arr = format!("[{one},\n {one}]");
        let m = ok("arr.JSON", &arr);
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|d| d.doc_index == 0 && d.line == 1));
        let stream = format!("{one}\n\n{one}\n");
        let m = ok("s.json", &stream);
        assert_eq!(
            m.iter().map(|d| (d.doc_index, d.line)).collect::<Vec<_>>(),
            [(0, 1), (1, 3)]
        );
        let list = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{one}]}}"#);
        assert_eq!(ok("l.json", &list).len(), 1);
    }

    #[test]
    fn json_errors() {
        let e = err("bad.json", "{\n  \"apiVersion\": \"v1\",\n  \"kind\": }\n");
        let DecodeError::Syntax {
            line,
            column,
            message,
            ..
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!((*line, *column), (3, 11));
        assert!(!message.contains(" at line "), "{message}");
        let e = err("m.json", "{}\n{\"apiVersion\":\"v1\"}");
        assert_eq!(
            e.to_string(),
            "m.json: document 1 (line 1): missing apiVersion, kind, metadata.name"
        );
        let e = err(
            "m.json",
            "{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"a\"}}\n\n{\"kind\":\"X\",\"metadata\":{\"name\":\"b\"}}",
        );
        assert_eq!(
            e.to_string(),
            "m.json: document 2 (line 3): missing apiVersion"
        );
    }

    #[test]
    fn json_in_a_yaml_file_is_read_as_yaml() {
        let m = ok(
            "j.yaml",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#,
        );
        assert_eq!(m[0].name(), "a");
    }

    #[test]
    fn split_documents_positions() {
        let chunks = split_documents("a: 1\n---\n---\nb: 2\n...\n# c\n...\nc: 3\n");
        let got: Vec<(usize, usize, Option<usize>, &str)> = chunks
            .iter()
            .map(|c| (c.index, c.first_line, c.content_line, c.text))
            .collect();
        assert_eq!(
            got,
            [
                (0, 1, Some(1), "a: 1\n"),
                (1, 2, None, "---\n"),
                (2, 3, Some(4), "---\nb: 2\n...\n"),
                (3, 8, Some(8), "c: 3\n"),
            ]
        );
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    #[test]
    fn many_documents_and_deep_nesting() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app-{i}\n  namespace: team-{}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: app-{i}}}\n  template:\n    metadata:\n      labels: {{app: app-{i}}}\n    spec:\n      containers:\n      - name: app\n        image: registry.example.com/app:{i}\n        ports: [{{containerPort: 8080}}]\n", i % 10));
        }
        let m = decode_file("big.yaml", text.as_bytes());
        assert_eq!(m.map(|m| m.len()).ok(), Some(2000));

        let nested = |depth: usize| {
            let mut deep =
                String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n");
            for level in 0..depth {
                deep.push_str(&"  ".repeat(level + 1));
                deep.push_str("x:\n");
            }
            deep.push_str(&"  ".repeat(depth + 1));
            deep.push_str("y: 1\n");
            deep
        };
        // The root mapping and `data` are two levels.
        assert!(decode_file("deep.yaml", nested(61).as_bytes()).is_ok());
        for depth in [63, 200, 5000] {
            let e = decode_file("deep.yaml", nested(depth).as_bytes()).err();
            assert!(
                matches!(&e, Some(DecodeError::Syntax { message, .. }) if message.contains("levels deep, more than the agent reads (64)")),
                "{e:?}"
            );
        }
        // Flow style too: it does not go through the block-indentation parser.
        let flow = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        assert!(matches!(
            decode_file("flow.yaml", flow.as_bytes()),
            Err(DecodeError::Syntax { .. })
        ));
        // serde_json has its own recursion limit (128) that stays inside the stack.
        let json = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"a\"}},\"data\":{}1{}}}",
            "[".repeat(120),
            "]".repeat(120)
        );
        assert!(decode_file("deep.json", json.as_bytes()).is_ok());
        let json = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        assert!(matches!(
            decode_file("deep.json", json.as_bytes()),
            Err(DecodeError::Syntax { .. })
        ));
    }
}

#[cfg(test)]
#[path = "decode_substitute_tests.rs"]
mod substitute_tests;
