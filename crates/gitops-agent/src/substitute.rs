//! Post-build variable substitution (`post_build:`), with Flux's semantics: `${var}` in a
//! manifest's text is replaced by the variable's value before the text is decoded.
//!
//! Substituting in the text, not in decoded strings, is what makes `replicas: ${replicas}`
//! become the number 3 (the substituted text is decoded as YAML), as with Flux, which
//! substitutes in the YAML kustomize writes. A quoted `"${replicas}"` stays a string.
//!
//! What is understood, as by Flux's `envsubst`:
//! - `${var}`: the value; an unset variable is an empty string, or an error when strict.
//! - `${var:=default}`, `${var:-default}`, `${var=default}`, `${var-default}`: the default
//!   when the variable is unset or empty (Flux makes no difference between the four), in
//!   strict mode too. The default may itself hold `${...}`.
//! - `${#var}` (length), `${var^}`, `${var^^}`, `${var,}`, `${var,,}` (case).
//! - `$$` is one `$`, so `$${var}` is the literal `${var}`. A `$` not followed by `{` (such as
//!   `$var` or `$1` in a script) is left alone.
//!
//! Flux's pattern operators (`${var#pattern}`, `${var/a/b}`, `${var:1:2}` …) are refused with
//! an error naming the expression rather than silently misread. Values lose their line breaks
//! (`\n` as in Flux, and `\r`, which Flux keeps but YAML reads as one), so that a value cannot
//! add lines to the YAML it lands in. Defaults nest at most 16 deep, and a text grows to at most
//! [`MAX_EXPANDED`] bytes: a commit or a ConfigMap must not be able to crash agentk.
//!
//! Everything here is pure; reading ConfigMaps and Secrets is [`crate::sync`]'s.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The label or annotation that turns substitution off for one object, with value
/// [`DISABLED`] (Flux's key, so that Flux repositories work unchanged).
pub const DISABLE_KEY: &str = "kustomize.toolkit.fluxcd.io/substitute";
/// See [`DISABLE_KEY`].
pub const DISABLED: &str = "disabled";

/// The variables of one sync, and whether an unset one is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Variables {
    values: BTreeMap<String, String>,
    strict: bool,
}

/// Why a text could not be substituted. Lines are 1-based, relative to the text given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error(
        "variable {name:?} is not set (post_build.strict is on; set it, or write ${{{name}:=default}})"
    )]
    Unset { name: String, line: usize },
    #[error("\"${{\" is not closed by \"}}\" (write $${{ for a literal ${{)")]
    Unclosed { line: usize },
    #[error(
        "{expression:?} is not a variable expression tether understands ({why}); write $${{ for a literal ${{, or label or annotate the object {DISABLE_KEY}: {DISABLED}"
    )]
    Unsupported {
        expression: String,
        why: &'static str,
        line: usize,
    },
    #[error(
        "the text would grow past {limit} bytes with its variables substituted (a large value used many times?)"
    )]
    TooLarge { limit: usize, line: usize },
}

/// How deep defaults may nest (`${a:=${b:=${c}}}`): each level is a recursion, and a commit
/// nesting thousands deep would overflow agentk's (or, in a preview, kas's) stack.
const MAX_NESTING: usize = 16;

/// Most bytes one text may grow to with its variables substituted: a value of a large
/// ConfigMap used many times over must not exhaust agentk's memory.
pub const MAX_EXPANDED: usize = 64 * 1024 * 1024;

impl ExpandError {
    /// The line of the expression, 1-based, in the text given to [`expand`].
    pub fn line(&self) -> usize {
        match self {
            ExpandError::Unset { line, .. }
            | ExpandError::Unclosed { line }
            | ExpandError::Unsupported { line, .. }
            | ExpandError::TooLarge { line, .. } => *line,
        }
    }
}

impl Variables {
    /// No variables yet; `strict` makes an unset variable without default an error.
    pub fn new(strict: bool) -> Self {
        Variables {
            values: BTreeMap::new(),
            strict,
        }
    }

    /// Sets `name` (replacing an earlier value), without the value's line breaks: every
    /// character YAML may read as one (`\r` too, which Flux keeps), so that a value cannot add
    /// a key to the object it lands in.
    pub fn set(&mut self, name: &str, value: &str) {
        let breaks = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
        self.values
            .insert(name.to_owned(), value.replace(breaks, ""));
    }

    /// Whether no variable is set: Flux then substitutes nothing at all (not even `$$`).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
}

/// Whether `object` opts out of substitution by label or annotation ([`DISABLE_KEY`]).
pub fn is_disabled(object: &Value) -> bool {
    ["labels", "annotations"]
        .iter()
        .any(|field| object["metadata"][field][DISABLE_KEY] == DISABLED)
}

/// `text` with its variable expressions replaced.
pub fn expand(text: &str, vars: &Variables) -> Result<String, ExpandError> {
    expand_noting(text, vars, &mut BTreeSet::new())
}

/// [`expand`], adding to `emptied` the variables that were not set and had no default, so
/// were replaced by an empty string (as Flux does, silently): a typo or a missing key in a
/// ConfigMap should not go unsaid. A default that is used does not count.
pub fn expand_noting(
    text: &str,
    vars: &Variables,
    emptied: &mut BTreeSet<String>,
) -> Result<String, ExpandError> {
    expand_nested(text, vars, 0, emptied)
}

/// The warning about the variables of file `path` that were `emptied` ([`expand_noting`]),
/// if any.
pub fn emptied_warning(path: &str, emptied: &BTreeSet<String>) -> Option<String> {
    if emptied.is_empty() {
        return None;
    }
    let names: Vec<String> = emptied.iter().map(|n| format!("${{{n}}}")).collect();
    Some(format!(
        "{path}: post_build variables not set, substituted as empty: {} (set them, give a default with ${{name:=default}}, or turn on post_build.strict to refuse the commit instead)",
        names.join(", ")
    ))
}

/// [`expand`] of a default nested `depth` deep.
fn expand_nested(
    text: &str,
    vars: &Variables,
    depth: usize,
    emptied: &mut BTreeSet<String>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner_start) = after.strip_prefix('{') {
            let offset = text.len() - inner_start.len();
            let line = line_at(text, offset);
            let close = closing_brace(inner_start).ok_or(ExpandError::Unclosed { line })?;
            let value = evaluate(&inner_start[..close], vars, line, depth, emptied)?;
            if out.len() + value.len() > MAX_EXPANDED {
                let limit = MAX_EXPANDED;
                return Err(ExpandError::TooLarge { limit, line });
            }
            out.push_str(&value);
            rest = &inner_start[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// 1-based line of byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// The byte index of the `}` closing an expression whose content starts `s`, counting nested
/// `${` (in defaults) and skipping `$$`.
fn closing_brace(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 1,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// What follows the variable name in an expression.
enum Operator<'a> {
    Value,
    Default(&'a str),
    Length,
    Case(fn(&str) -> String),
}

/// The value of the expression `inner` (the text between `${` and `}`).
fn evaluate(
    inner: &str,
    vars: &Variables,
    line: usize,
    depth: usize,
    emptied: &mut BTreeSet<String>,
) -> Result<String, ExpandError> {
    let unsupported = |why| ExpandError::Unsupported {
        expression: format!("${{{inner}}}"),
        why,
        line,
    };
    let (name, op) = parse(inner).map_err(unsupported)?;
    let value = vars.get(name);
    let default = match op {
        // Flux evaluates the default before knowing whether it is needed, so an error in it
        // (a strict unset variable) fails even when the variable is set.
        Operator::Default(_) if depth >= MAX_NESTING => {
            return Err(unsupported("defaults nested more than 16 deep"));
        }
        Operator::Default(text) => {
            let expanded = expand_nested(text, vars, depth + 1, emptied);
            Some(expanded.map_err(|e| shift(e, line - 1))?)
        }
        _ => None,
    };
    if value.is_none() && default.is_none() {
        if vars.strict {
            return Err(ExpandError::Unset {
                name: name.to_owned(),
                line,
            });
        }
        emptied.insert(name.to_owned());
    }
    let value = value.unwrap_or("");
    Ok(match op {
        Operator::Value => value.to_owned(),
        Operator::Default(_) if value.is_empty() => default.unwrap_or_default(),
        Operator::Default(_) => value.to_owned(),
        Operator::Length => value.chars().count().to_string(),
        Operator::Case(f) => f(value),
    })
}

/// An error found in a default, with its line made relative to the whole text.
fn shift(e: ExpandError, by: usize) -> ExpandError {
    match e {
        ExpandError::Unset { name, line } => ExpandError::Unset {
            name,
            line: line + by,
        },
        ExpandError::Unclosed { line } => ExpandError::Unclosed { line: line + by },
        ExpandError::TooLarge { limit, line } => ExpandError::TooLarge {
            limit,
            line: line + by,
        },
        ExpandError::Unsupported {
            expression,
            why,
            line,
        } => ExpandError::Unsupported {
            expression,
            why,
            line: line + by,
        },
    }
}

/// Splits an expression into the variable's name and its operator.
fn parse(inner: &str) -> Result<(&str, Operator<'_>), &'static str> {
    if let Some(name) = inner.strip_prefix('#') {
        return if is_name(name) {
            Ok((name, Operator::Length))
        } else {
            Err("the length of a variable is written ${#name}")
        };
    }
    let end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let (name, rest) = inner.split_at(end);
    if name.is_empty() {
        return Err("no variable name");
    }
    let op = match rest {
        "" => Operator::Value,
        "^" => Operator::Case(upper_first),
        "^^" => Operator::Case(str::to_uppercase),
        "," => Operator::Case(lower_first),
        ",," => Operator::Case(str::to_lowercase),
        _ => match ["=", ":=", "-", ":-"]
            .iter()
            .find_map(|op| rest.strip_prefix(op))
        {
            Some(default) => Operator::Default(default),
            None => return Err(why_unsupported(rest)),
        },
    };
    Ok((name, op))
}

fn why_unsupported(op: &str) -> &'static str {
    match op.strip_prefix(':').unwrap_or(op).chars().next() {
        Some('+' | '?') => "only the default operators =, :=, - and :- are supported",
        _ if op.starts_with(':') => "substrings are not supported",
        Some('#' | '%' | '/') => "pattern operators are not supported",
        _ => "a variable name is made of letters, digits and '_'",
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn upper_first(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)], strict: bool) -> Variables {
        let mut v = Variables::new(strict);
        for (k, val) in pairs {
            v.set(k, val);
        }
        v
    }

    fn ok(text: &str, pairs: &[(&str, &str)]) -> String {
        expand(text, &vars(pairs, false)).expect("expands")
    }

    #[test]
    fn a_variable_is_replaced_by_its_value() {
        let v = [("cluster_name", "prod-eu"), ("domain", "example.com")];
        assert_eq!(
            ok("host: ${cluster_name}.${domain}\n", &v),
            "host: prod-eu.example.com\n"
        );
        assert_eq!(ok("${cluster_name}${cluster_name}", &v), "prod-euprod-eu");
    }

    #[test]
    fn an_unset_variable_is_empty_unless_strict() {
        assert_eq!(ok("a: '${missing}'\n", &[("x", "1")]), "a: ''\n");
        let err = expand("a: 1\nb: ${missing}\n", &vars(&[("x", "1")], true)).expect_err("refused");
        assert_eq!(
            err,
            ExpandError::Unset {
                name: "missing".into(),
                line: 2
            }
        );
        assert!(err.to_string().contains("post_build.strict"), "{err}");
    }

    #[test]
    fn an_empty_value_is_set_even_when_strict() {
        let v = vars(&[("empty", "")], true);
        assert_eq!(expand("a: '${empty}'", &v).expect("expands"), "a: ''");
    }

    #[test]
    fn defaults_apply_when_unset_or_empty_in_all_four_forms() {
        for op in [":=", ":-", "=", "-"] {
            let text = format!("${{replicas{op}2}}");
            assert_eq!(ok(&text, &[]), "2", "{text} unset");
            assert_eq!(ok(&text, &[("replicas", "")]), "2", "{text} empty");
            assert_eq!(ok(&text, &[("replicas", "5")]), "5", "{text} set");
            let strict = expand(&text, &vars(&[], true)).expect("expands");
            assert_eq!(strict, "2", "{text} strict");
        }
    }

    #[test]
    fn a_default_may_hold_variables_and_text() {
        let v = [("base", "eu")];
        assert_eq!(ok("${region:=${base}-west}", &v), "eu-west");
        assert_eq!(ok("${region:=pre${base}}", &v), "preeu");
        assert_eq!(ok("${region:=}", &v), "");
        assert_eq!(ok("${url:=http://a:8080/x}", &v), "http://a:8080/x");
    }

    #[test]
    fn a_strict_unset_variable_in_a_default_fails_as_in_flux() {
        let err = expand("${a:=${b}}", &vars(&[("a", "1")], true)).expect_err("refused");
        assert_eq!(
            err,
            ExpandError::Unset {
                name: "b".into(),
                line: 1
            }
        );
    }

    #[test]
    fn double_dollar_escapes() {
        let v = [("var", "x")];
        assert_eq!(ok("$${var}", &v), "${var}");
        assert_eq!(ok("$${var:=d}", &v), "${var:=d}");
        assert_eq!(ok("price: $$5", &v), "price: $5");
        assert_eq!(ok("$$$", &v), "$$");
        assert_eq!(ok("${var}$${var}${var}", &v), "x${var}x");
    }

    #[test]
    fn a_dollar_without_brace_is_left_alone() {
        let v = [("var", "x")];
        let script = "echo $var $1 \"$@\" $(date) a$\n";
        assert_eq!(ok(script, &v), script);
    }

    #[test]
    fn length_and_case_operators() {
        let v = [("env", "prod"), ("Name", "EU")];
        assert_eq!(ok("${#env}", &v), "4");
        assert_eq!(ok("${env^}", &v), "Prod");
        assert_eq!(ok("${env^^}", &v), "PROD");
        assert_eq!(ok("${Name,}", &v), "eU");
        assert_eq!(ok("${Name,,}", &v), "eu");
        let strict = expand("${#missing}", &vars(&[], true)).expect_err("refused");
        assert!(matches!(strict, ExpandError::Unset { .. }), "{strict:?}");
    }

    #[test]
    fn unsupported_expressions_are_named() {
        for (text, why) in [
            ("${file#*.}", "pattern"),
            ("${file%.*}", "pattern"),
            ("${file/a/b}", "pattern"),
            ("${path:1:2}", "substrings"),
            ("${x:+set}", "default operators"),
            ("${}", "no variable name"),
            ("${@}", "no variable name"),
            ("${a b}", "letters, digits"),
        ] {
            let err = expand(text, &vars(&[("x", "1")], false)).expect_err("refused");
            match &err {
                ExpandError::Unsupported { expression, .. } => assert_eq!(expression, text),
                other => panic!("{text}: {other:?}"),
            }
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn an_unclosed_expression_names_its_line() {
        let err =
            expand("a: 1\nb: ${oops\nc: 2\n", &vars(&[("x", "1")], false)).expect_err("refused");
        assert_eq!(err, ExpandError::Unclosed { line: 2 });
    }

    #[test]
    fn values_lose_their_newlines() {
        assert_eq!(ok("k: ${v}", &[("v", "a\nb\n")]), "k: ab");
    }

    /// YAML reads `\r` (and, in 1.1, NEL and the Unicode separators) as a line break too: a
    /// value holding one could add a key to the object (`namespace: kube-system`).
    #[test]
    fn values_lose_every_character_yaml_reads_as_a_line_break() {
        let injected = "web\r  namespace: kube-system\u{85}\u{2028}\u{2029}";
        let text = ok("  name: ${app}\n", &[("app", injected)]);
        assert_eq!(text, "  name: web  namespace: kube-system\n");
    }

    /// Nested defaults are a recursion each: thousands deep would overflow the stack (and
    /// crash agentk, or kas in a preview), so nesting stops at 16 with an error naming it.
    #[test]
    fn defaults_nested_too_deep_are_refused_not_a_crash() {
        let deep = |n: usize| format!("{}x{}", "${a:=".repeat(n), "}".repeat(n));
        assert_eq!(ok(&deep(16), &[("b", "set")]), "x");
        let e = expand(&deep(100_000), &vars(&[("b", "set")], false)).expect_err("too deep");
        assert!(
            matches!(e, ExpandError::Unsupported { why, line: 1, .. } if why.contains("nested")),
            "{e:?}"
        );
    }

    /// A large value used many times over stops at [`MAX_EXPANDED`] with an error.
    #[test]
    fn a_text_growing_past_the_limit_is_refused() {
        let big = "x".repeat(1024 * 1024);
        let text = "${big}".repeat(MAX_EXPANDED / big.len() + 1);
        let e = expand(&text, &vars(&[("big", &big)], false)).expect_err("too large");
        assert_eq!(
            e,
            ExpandError::TooLarge {
                limit: MAX_EXPANDED,
                line: 1
            }
        );
    }

    #[test]
    fn values_are_not_expanded_again() {
        assert_eq!(ok("${a}", &[("a", "${b}"), ("b", "no")]), "${b}");
    }

    #[test]
    fn the_disabled_marker_is_read_from_labels_and_annotations() {
        let with = |field: &str, value: &str| serde_json::json!({"metadata": {field: {DISABLE_KEY: value}}});
        assert!(is_disabled(&with("labels", "disabled")));
        assert!(is_disabled(&with("annotations", "disabled")));
        assert!(!is_disabled(&with("annotations", "enabled")));
        assert!(!is_disabled(
            &serde_json::json!({"metadata": {"name": "a"}})
        ));
    }

    #[test]
    fn variables_emptied_for_want_of_a_value_are_noted_and_defaults_and_escapes_are_not() {
        let v = vars(&[("set", "1")], false);
        let mut emptied = BTreeSet::new();
        let text = "a: ${set}\nb: ${missing}\nc: ${dflt:=x}\nd: $${escaped}\ne: ${#len}\nf: ${dflt2:-${inner}}\n";
        let out = expand_noting(text, &v, &mut emptied).expect("expands");
        assert_eq!(out, "a: 1\nb: \nc: x\nd: ${escaped}\ne: 0\nf: \n");
        let names: Vec<&str> = emptied.iter().map(String::as_str).collect();
        assert_eq!(names, ["inner", "len", "missing"]);
        assert_eq!(expand(text, &v).expect("same"), out, "expand is unchanged");
    }

    #[test]
    fn the_warning_names_the_file_and_each_emptied_variable() {
        assert_eq!(emptied_warning("a.yaml", &BTreeSet::new()), None);
        let names: BTreeSet<String> = ["TAG".to_owned(), "replicas".to_owned()].into();
        let w = emptied_warning("apps/web.yaml", &names).expect("a warning");
        assert!(
            w.starts_with("apps/web.yaml: post_build variables not set, substituted as empty: ${TAG}, ${replicas} ("),
            "{w}"
        );
    }
}
